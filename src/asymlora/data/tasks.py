"""The data model (:class:`Example`, :class:`Task`), prompt formatting and splitting.

Loading a task from a spec is :mod:`asymlora.data.loading`, which dispatches to the source readers
(:mod:`~asymlora.data.bigbench`, :mod:`~asymlora.data.files`, :mod:`~asymlora.data.paper_formats`);
those import this module, never the other way round.

Prompt format (one function, :func:`format_prompt`)::

    <instruction>            ← task-level instruction (BIG-bench ``task_prefix``), if any
                             ← blank line
    Question: <input>        ← ``Example.prompt`` ends here (input prefix: BIG-bench
                               ``example_input_prefix`` when the task has one)
    Options:                 ← choice tasks only: every option, one per line
    - <option 1>
    - <option 2>
    Answer:                  ← ``Example.answer_prefix`` (BIG-bench ``example_output_prefix``)

The model then continues with the answer text (:func:`answer_continuation` adds the single
separating space): for choice tasks the text of the correct option, for generative tasks the
first reference. No chat template is needed for SmolLM2-Instruct.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, get_args

__all__ = [
    "DEFAULT_ANSWER_PREFIX",
    "DEFAULT_INPUT_PREFIX",
    "METRIC_ACCURACY",
    "METRIC_BLEU",
    "METRIC_EXACT_MATCH",
    "METRIC_ROUGE",
    "METRIC_ROUGE_LSUM",
    "DataError",
    "Example",
    "Task",
    "TaskKind",
    "answer_continuation",
    "build_task",
    "compose_prompt",
    "default_metrics",
    "format_prompt",
    "infer_kind",
    "split_examples",
    "split_validation",
]

TaskKind = Literal["choice", "generate"]
TASK_KINDS: tuple[str, ...] = get_args(TaskKind)

DEFAULT_INPUT_PREFIX = "Question: "
"""Put before an example's input unless the source defines its own prefix."""
DEFAULT_ANSWER_PREFIX = "\nAnswer:"
"""Put after the input (and options); the answer follows after one space."""
OPTIONS_HEADER = "\nOptions:"
OPTION_BULLET = "\n- "
PREFIX_JOINERS = (":", "?")
"""An input prefix ending in one of these gets a space before the input (``"Q:"`` → ``"Q: x"``)."""

METRIC_ACCURACY = "accuracy"
"""Choice tasks: option log-likelihood accuracy."""
METRIC_EXACT_MATCH = "exact_match"
"""Generative tasks: greedy decoding, exact match against any reference after normalisation."""
METRIC_ROUGE = "rouge"
"""Generative free-text tasks: ROUGE-1/2/L/Lsum against the references (primary: ROUGE-L)."""
METRIC_ROUGE_LSUM = "rougeLsum"
"""Generative free-text tasks: summary-level ROUGE-L over sentences (BIG-bench's ``rougeLsum``)."""
METRIC_BLEU = "bleu"
"""Generative free-text tasks: corpus BLEU against the references, in [0, 1]."""
FREE_TEXT_MIN_WORDS = 4
"""Generative tasks whose median reference has at least this many words also get ROUGE."""


class DataError(ValueError):
    """Bad data or a bad task spec; the message names the bad value and how to fix it."""


@dataclass
class Example:
    """One prompt/answer pair.

    Attributes:
        prompt: the text before the options and the answer cue: task instruction (if any) and
            the prefixed input (see :func:`compose_prompt`). :func:`format_prompt` turns it into
            the model prompt.
        target: the answer the model learns: for ``choice`` tasks the text of the correct
            option, for ``generate`` tasks the first reference.
        options: ``choice`` tasks only: every option text, in a fixed order.
        answer_index: ``choice`` tasks only: index of the correct option in ``options``.
        references: every acceptable answer (``generate``: all references, ``target`` first;
            ``choice``: the option(s) with the best score).
        answer_prefix: the answer cue put after the prompt (and options).
    """

    prompt: str
    target: str
    options: list[str] | None = None
    answer_index: int | None = None
    references: list[str] = field(default_factory=list)
    answer_prefix: str = DEFAULT_ANSWER_PREFIX

    def __post_init__(self) -> None:
        if self.options is not None:
            self._check_choice()
        elif not self.references:
            self.references = [self.target]
        if not self.target.strip():
            raise DataError(f"example {self.prompt[:60]!r}…: the target (answer) is empty")

    def _check_choice(self) -> None:
        if len(self.options or []) < 2:
            raise DataError(f"example {self.prompt[:60]!r}…: a choice example needs at least 2 options")
        options = self.options or []
        if self.answer_index is None:
            if self.target not in options:
                raise DataError(
                    f"example {self.prompt[:60]!r}…: target {self.target!r} is not one of the options {options}"
                )
            self.answer_index = options.index(self.target)
        if not 0 <= self.answer_index < len(options):
            raise DataError(
                f"example {self.prompt[:60]!r}…: answer_index {self.answer_index} is out of range "
                f"for {len(options)} options"
            )
        if self.target != options[self.answer_index]:
            raise DataError(
                f"example {self.prompt[:60]!r}…: target {self.target!r} differs from "
                f"options[{self.answer_index}] = {options[self.answer_index]!r}"
            )
        if not self.references:
            self.references = [self.target]

    @property
    def kind(self) -> TaskKind:
        """``"choice"`` when the example has options, else ``"generate"``."""
        return "choice" if self.options is not None else "generate"


@dataclass
class Task:
    """A named task with a train and a held-out test split.

    Attributes:
        name: task name (BIG-bench path such as ``multiemo/hotels_sentence_en``, the ``task``
            value of a data file, or the file/dataset name).
        kind: ``"choice"`` (scored by option log-likelihood) or ``"generate"`` (greedy decoding).
        train: training examples.
        test: held-out test examples (disjoint from ``train``).
        metrics: metric names to report; the first one is the task's primary metric, the one
            summaries and Δm% use (:data:`METRIC_ACCURACY`, :data:`METRIC_EXACT_MATCH`,
            :data:`METRIC_ROUGE`, :data:`METRIC_ROUGE_LSUM`, :data:`METRIC_BLEU`, or any name of
            :data:`asymlora.eval.metrics.METRICS`).
        metric_note: why the primary metric is not the one the source declares (e.g. BIG-bench's
            model-based ``bleurt``, which is not computed), or None when it is.
    """

    name: str
    kind: TaskKind
    train: list[Example]
    test: list[Example]
    metrics: list[str]
    metric_note: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise DataError(f"task {self.name!r}: kind must be one of {TASK_KINDS}, got {self.kind!r}")


# --------------------------------------------------------------------------- prompt formatting


def _join_prefix(prefix: str, text: str) -> str:
    prefix = prefix.lstrip()
    if prefix.endswith(PREFIX_JOINERS):
        prefix += " "
    return prefix + text.strip()


def compose_prompt(text: str, *, instruction: str = "", input_prefix: str = DEFAULT_INPUT_PREFIX) -> str:
    """Build :attr:`Example.prompt`: ``instruction``, a blank line, then ``input_prefix + text``.

    Either part may be empty (an instruction-only row gives just the instruction).
    """
    parts = [instruction.strip()] if instruction.strip() else []
    if text.strip():
        parts.append(_join_prefix(input_prefix, text))
    if not parts:
        raise DataError("an example needs a non-empty input or instruction")
    return "\n\n".join(parts)


def format_prompt(example: Example) -> str:
    """The model prompt of ``example``: its prompt, the options (choice tasks), the answer cue.

    Trailing spaces are removed; :func:`answer_continuation` adds the space before the answer,
    so that the answer's first word is tokenised as it is in running text.
    """
    text = example.prompt.rstrip()
    cue = example.answer_prefix
    if example.options:
        text += OPTIONS_HEADER + "".join(OPTION_BULLET + option for option in example.options)
        if not cue.startswith("\n"):
            cue = "\n" + cue.lstrip()
    return (text + cue).rstrip(" ")


def answer_continuation(prompt: str, answer: str) -> str:
    """The text that follows ``prompt`` for answer ``answer`` (one space unless the prompt ends in whitespace).

    Use it for training targets and for scoring options, so both see the same tokens.
    """
    answer = answer.strip()
    return answer if not prompt or prompt[-1].isspace() else " " + answer


# --------------------------------------------------------------------------- building tasks


def infer_kind(examples: Sequence[Example], name: str) -> TaskKind:
    """``"choice"`` if every example has options, ``"generate"`` if none has; mixing is an error."""
    with_options = sum(example.options is not None for example in examples)
    if with_options == len(examples):
        return "choice"
    if with_options == 0:
        return "generate"
    raise DataError(
        f"task {name!r} mixes {with_options} examples with options and {len(examples) - with_options} "
        "without; give every row of one task 'options' (choice) or none (generative), or split them "
        "into two tasks with a 'task' column (a file whose rows have a 'task' column is read as one task "
        "per value with 'jsonl:FILE#*', or one of them with 'jsonl:FILE#NAME')"
    )


def default_metrics(kind: TaskKind, examples: Sequence[Example]) -> list[str]:
    """Accuracy for choice tasks; exact match for generative ones, plus ROUGE for free text.

    The first entry (the primary metric) depends only on the kind; a run config's ``data.metric``
    chooses another one per task (:func:`asymlora.eval.metrics.apply_metric_choices`).
    """
    if kind == "choice":
        return [METRIC_ACCURACY]
    words = [len(example.target.split()) for example in examples] or [0]
    free_text = statistics.median(words) >= FREE_TEXT_MIN_WORDS
    return [METRIC_EXACT_MATCH, METRIC_ROUGE] if free_text else [METRIC_EXACT_MATCH]


def _check_cap(label: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or value < 0):
        raise DataError(f"{label} must be a non-negative integer or None, got {value!r}")


def _test_size(total: int, test_fraction: float) -> int:
    return min(total - 1, max(1, round(total * test_fraction)))


def _shuffled(examples: Sequence[Example], seed: int) -> list[Example]:
    order = list(examples)
    random.Random(seed).shuffle(order)
    return order


def split_examples(
    examples: Sequence[Example],
    *,
    name: str,
    seed: int = 0,
    test_fraction: float = 0.2,
    max_train: int | None = None,
    max_test: int | None = None,
) -> tuple[list[Example], list[Example]]:
    """Deterministic train/test split: shuffle once with ``seed``, take the test split first, then cap.

    The split depends only on ``seed`` and ``test_fraction``, never on the caps: raising
    ``max_train`` adds examples without moving any between the splits.
    """
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must be strictly between 0 and 1, got {test_fraction!r}")
    if len(examples) < 2:
        raise DataError(f"task {name!r} has {len(examples)} example(s); at least 2 are needed to split it")
    shuffled = _shuffled(examples, seed)
    n_test = _test_size(len(shuffled), test_fraction)
    return _cap(shuffled[n_test:], max_train), _cap(shuffled[:n_test], max_test)


def _cap(examples: list[Example], cap: int | None) -> list[Example]:
    return examples if cap is None else examples[:cap]


def build_task(
    name: str,
    splits: Mapping[str, Sequence[Example]],
    *,
    seed: int = 0,
    max_train: int | None = None,
    max_test: int | None = None,
    test_fraction: float = 0.2,
    kind: TaskKind | None = None,
    metrics: list[str] | None = None,
    metric_note: str | None = None,
) -> Task:
    """Make a :class:`Task` from loaded examples.

    ``splits`` is either ``{"all": examples}`` (split here by :func:`split_examples`) or
    ``{"train": ..., "test": ...}`` as given by the source (each shuffled with ``seed`` and
    capped). ``kind`` and ``metrics`` default to :func:`infer_kind` / :func:`default_metrics`;
    ``metric_note`` is kept on the task (see :attr:`Task.metric_note`).
    """
    _check_cap("max_train", max_train)
    _check_cap("max_test", max_test)
    if "test" in splits:
        train = _cap(_shuffled(splits.get("train", []), seed), max_train)
        test = _cap(_shuffled(splits["test"], seed), max_test)
    else:
        train, test = split_examples(
            splits.get("all", []),
            name=name,
            seed=seed,
            test_fraction=test_fraction,
            max_train=max_train,
            max_test=max_test,
        )
    if not train or not test:
        raise DataError(
            f"task {name!r} is empty after splitting and capping: {len(train)} train, {len(test)} test "
            f"examples (max_train={max_train}, max_test={max_test}, test_fraction={test_fraction}); "
            "raise the caps or add data"
        )
    everything = [*train, *test]
    kind = kind or infer_kind(everything, name)
    return Task(name, kind, train, test, metrics or default_metrics(kind, everything), metric_note)


def split_validation(task: Task, n: int) -> tuple[Task, Task]:
    """(``task`` without its last ``n`` training examples, a task whose ``train`` split is those ``n``).

    The validation examples come from the training split only (the test split is untouched; the validation
    task's ``test`` is empty). The training split is already in the seeded order of :func:`build_task`, so
    the carve is deterministic in the data seed; a task loaded with ``max_train + n`` keeps exactly the
    ``max_train`` training examples a run without validation has (docs/sweep.md, the stopping rule).

    Raises:
        DataError: ``n`` < 1, or the training split has no more than ``n`` examples.
    """
    if n < 1:
        raise DataError(f"validation examples n={n!r} must be >= 1")
    if len(task.train) <= n:
        raise DataError(
            f"task {task.name!r} has {len(task.train)} training example(s): too few to carve "
            f"stopping.val_examples={n} validation examples and keep one to train on; lower stopping.val_examples"
        )
    train, val = task.train[:-n], task.train[-n:]
    return replace(task, train=train), replace(task, train=val, test=[])
