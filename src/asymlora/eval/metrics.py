"""Answer metrics, the metric registry, and each task's primary metric (docs/design.md §6).

Computed metrics (every one "higher is better", in [0, 1]):

- ``accuracy`` (choice tasks): option log-likelihood accuracy, scored in :mod:`asymlora.eval.scoring`.
- ``exact_match``: SQuAD normalisation, then equality with any reference.
- ``rouge``: ROUGE-1/2/L F-measure and ROUGE-Lsum (``rouge-score``, Porter stemming); ROUGE-Lsum
  is the summary-level LCS over sentences, split with nltk's Punkt algorithm and joined by
  newlines, as ``rouge-score``'s ``split_summaries`` does.
- ``bleu``: corpus BLEU from ``sacrebleu`` with BIG-bench's settings, divided by 100.

:data:`METRICS` is the registry: metric name → :class:`Metric` (task kind, result keys, function).
A task lists metric names or result keys (``rougeLsum``) in ``Task.metrics``; the first entry is
its primary metric, the one summaries and Δm% use (:func:`primary_metric`).
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

import sacrebleu

from asymlora.data.tasks import (
    METRIC_ACCURACY,
    METRIC_BLEU,
    METRIC_EXACT_MATCH,
    METRIC_ROUGE,
    METRIC_ROUGE_LSUM,
    DataError,
    Task,
    TaskKind,
)
from asymlora.eval.extract import (
    ANSWER_LETTER,
    ANSWER_NUMBER,
    ANSWER_WORD,
    FLAN_ROUGE,
    PAPER_METRICS,
    PAPER_PRIMARY,
)

__all__ = [
    "METRICS",
    "ROUGE_KEYS",
    "Metric",
    "apply_metric_choices",
    "bleu_score",
    "check_metric",
    "corpus_level",
    "exact_match",
    "exact_match_score",
    "metric_choices",
    "metric_notes",
    "normalize_answer",
    "primary_metric",
    "primary_metrics",
    "rouge_scores",
    "score_generations",
    "split_sentences",
]

ROUGE_KEYS: tuple[str, ...] = ("rouge1", "rouge2", "rougeL", METRIC_ROUGE_LSUM)
"""Keys :func:`rouge_scores` returns (F-measures); ``rouge`` in a task's metrics reports all of them."""

PRIMARY_ROUGE = "rougeL"
"""The primary metric of a task whose first configured metric is the group name ``rouge``."""

BLEU_TOKENIZER = "intl"
"""sacrebleu tokenizer BIG-bench uses for ``bleu`` (via ``t5.evaluation.metrics.bleu``)."""

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)

References = Sequence[str | Sequence[str]]
MetricFn = Callable[[Sequence[str], References], dict[str, float]]


@dataclass(frozen=True)
class Metric:
    """One entry of :data:`METRICS`.

    Attributes:
        kind: the task kind it scores (``"choice"`` or ``"generate"``).
        keys: the result keys it adds to a task's scores.
        compute: ``(predictions, references) -> {key: value in [0, 1]}``, references being per
            example a string or a list of strings; None for ``accuracy``, which is scored from
            option log-likelihoods by :func:`asymlora.eval.scoring.evaluate_task`.
        raw: scores the whole generation (the papers' extraction rules, :mod:`asymlora.eval.extract`)
            rather than its first line.
        corpus: one score of the whole corpus, not a mean over examples (BLEU pools n-gram counts): no
            per-example scores (:func:`asymlora.eval.scoring.evaluate_task`), so no interval or paired test.
    """

    kind: TaskKind
    keys: tuple[str, ...]
    compute: MetricFn | None = None
    raw: bool = False
    corpus: bool = False


# --------------------------------------------------------------------------- exact match


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation, drop articles (a/an/the), collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, references: str | Sequence[str]) -> float:
    """1.0 when ``prediction`` equals any reference after :func:`normalize_answer`, else 0.0."""
    if isinstance(references, str):
        references = [references]
    if not references:
        raise ValueError("exact_match needs at least one reference answer")
    predicted = normalize_answer(prediction)
    return float(any(predicted == normalize_answer(reference) for reference in references))


def _reference_lists(predictions: Sequence[str], references: References) -> list[list[str]]:
    """The reference answers of each prediction, as lists (index i: prediction i's). Raises ValueError on a
    length mismatch or a prediction without reference. (Indexing rather than ``zip``: the lengths are
    checked first, with a message that says so.)"""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    lists = [[refs] if isinstance(refs, str) else list(refs) for refs in references]
    for i, refs in enumerate(lists):
        if not refs:
            raise ValueError(f"prediction {predictions[i][:60]!r}… has no reference answer")
    return lists


def exact_match_score(predictions: Sequence[str], references: References) -> dict[str, float]:
    """``{"exact_match": share of predictions matching a reference}`` (0.0 for no example)."""
    lists = _reference_lists(predictions, references)
    hits = sum(exact_match(predictions[i], refs) for i, refs in enumerate(lists))
    return {METRIC_EXACT_MATCH: hits / len(lists) if lists else 0.0}


# --------------------------------------------------------------------------- ROUGE


@lru_cache(maxsize=1)
def _scorer() -> Any:
    from rouge_score import rouge_scorer  # imported on first use: ~1.2 s (nltk), and most runs score no ROUGE

    return rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)


@lru_cache(maxsize=1)
def _sentence_tokenizer() -> Any:
    # The Punkt algorithm behind nltk.sent_tokenize (what rouge-score's split_summaries calls),
    # without its trained English model: that one is a separate download, which these machines
    # cannot make, and a result must not depend on whether it happens to be installed.
    from nltk.tokenize.punkt import PunktSentenceTokenizer  # on first use: importing nltk takes ~1.2 s

    return PunktSentenceTokenizer()


def split_sentences(text: str) -> str:
    """``text`` with one sentence per line (existing line breaks kept), as ROUGE-Lsum expects.

    Untrained Punkt splits after ``.``/``!``/``?`` followed by a space and a new word, so an
    abbreviation (``Dr. Smith``) also ends a sentence; BIG-bench's own split (``" . "`` only) is
    contained in it.
    """
    tokenizer = _sentence_tokenizer()
    lines = (line.strip() for line in text.splitlines())
    return "\n".join(sentence for line in lines if line for sentence in tokenizer.tokenize(line))


def rouge_scores(predictions: Sequence[str], references: References) -> dict[str, float]:
    """Mean ROUGE-1/2/L/Lsum F-measure (``rouge-score``, Porter stemming) over the examples.

    Each example is scored against each of its references and keeps, per ROUGE variant, the best
    one (BIG-bench's and the usual multi-reference convention). Texts are split into sentences
    (:func:`split_sentences`) for ROUGE-Lsum; the other variants ignore line breaks. An empty
    list gives zeros.

    Args:
        predictions: one generated text per example.
        references: per example, a reference string or a list of reference strings.

    Raises:
        ValueError: the two lists differ in length, or an example has no reference.
    """
    lists = _reference_lists(predictions, references)
    totals = dict.fromkeys(ROUGE_KEYS, 0.0)
    if not lists:
        return totals
    scorer = _scorer()
    for i, refs in enumerate(lists):
        candidate = split_sentences(predictions[i])
        scores = [scorer.score(split_sentences(reference), candidate) for reference in refs]
        for key in ROUGE_KEYS:
            totals[key] += max(score[key].fmeasure for score in scores)
    return {key: value / len(lists) for key, value in totals.items()}


# --------------------------------------------------------------------------- BLEU


def bleu_score(predictions: Sequence[str], references: References) -> dict[str, float]:
    """``{"bleu": corpus BLEU / 100}`` from ``sacrebleu``, with BIG-bench's settings.

    One corpus-level score over all examples (n-gram counts summed, then the geometric mean of the
    1–4-gram precisions times the brevity penalty), ``tokenize="intl"``, exponential smoothing,
    case kept. An example with fewer references than the most has its first one repeated, as
    BIG-bench does (a repeated reference changes neither the clipped counts nor the closest
    length). 0.0 for no example.

    Raises:
        ValueError: the two lists differ in length, or an example has no reference.
    """
    lists = _reference_lists(predictions, references)
    if not lists:
        return {METRIC_BLEU: 0.0}
    most = max(len(refs) for refs in lists)
    streams = [[refs[i] if i < len(refs) else refs[0] for refs in lists] for i in range(most)]
    result = sacrebleu.corpus_bleu(list(predictions), streams, tokenize=BLEU_TOKENIZER, smooth_method="exp")
    return {METRIC_BLEU: result.score / 100.0}


# --------------------------------------------------------------------------- the registry

METRICS: dict[str, Metric] = {
    METRIC_ACCURACY: Metric("choice", (METRIC_ACCURACY,)),
    METRIC_EXACT_MATCH: Metric("generate", (METRIC_EXACT_MATCH,), exact_match_score),
    METRIC_ROUGE: Metric("generate", ROUGE_KEYS, rouge_scores),
    METRIC_BLEU: Metric("generate", (METRIC_BLEU,), bleu_score, corpus=True),
    # the ALoRA paper's benchmarks (commonsense, math, FLAN / FedDPA), on the whole generation
    ANSWER_WORD: Metric("generate", (ANSWER_WORD,), PAPER_METRICS[ANSWER_WORD], raw=True),
    ANSWER_NUMBER: Metric("generate", (ANSWER_NUMBER,), PAPER_METRICS[ANSWER_NUMBER], raw=True),
    ANSWER_LETTER: Metric("generate", (ANSWER_LETTER,), PAPER_METRICS[ANSWER_LETTER], raw=True),
    FLAN_ROUGE: Metric(
        "generate", (PAPER_PRIMARY[FLAN_ROUGE], f"{FLAN_ROUGE}L"), PAPER_METRICS[FLAN_ROUGE], raw=True
    ),
}
"""Metric name → :class:`Metric`. Add an entry to make a new metric available to tasks and configs."""


def _metric_of_key(name: str) -> str | None:
    """The registry name computing ``name`` (a registry name itself or one of its result keys)."""
    if name in METRICS:
        return name
    return next((metric for metric, spec in METRICS.items() if name in spec.keys), None)


def corpus_level(key: str) -> bool:
    """Whether result key ``key`` is a corpus-level score (:attr:`Metric.corpus`, e.g. ``bleu``)."""
    metric = _metric_of_key(key)
    return metric is not None and METRICS[metric].corpus


def metric_choices(kind: TaskKind | None = None) -> list[str]:
    """Every name a task or config may use as its metric (of one ``kind``, or all)."""
    names: list[str] = []
    for metric, spec in METRICS.items():
        if kind is None or spec.kind == kind:
            names += [metric, *(key for key in spec.keys if key != metric)]
    return names


def primary_metric(task_kind_or_metrics: Any) -> str:
    """The metric summaries and Δm% are computed on (a result key of :func:`score_generations`).

    Args:
        task_kind_or_metrics: a task kind (``"choice"`` → ``accuracy``, ``"generate"`` →
            ``exact_match``); a metric name (``rouge`` means ``rougeL``, a registry name with one
            key means that key); a list of metric names (the first one decides); or a
            :class:`~asymlora.data.Task` (its ``metrics``).

    Raises:
        ValueError: an unknown kind or metric name, or an empty list.
    """
    value = getattr(task_kind_or_metrics, "metrics", task_kind_or_metrics)
    if isinstance(value, str):
        if value in ("choice", "generate"):
            return METRIC_ACCURACY if value == "choice" else METRIC_EXACT_MATCH
        if value == METRIC_ROUGE:
            return PRIMARY_ROUGE
        metric = _metric_of_key(value)
        if metric is None:
            raise ValueError(
                f"unknown task kind or metric {value!r}; expected 'choice', 'generate' or one of "
                f"{metric_choices()}"
            )
        keys = METRICS[metric].keys
        return value if value in keys else keys[0]
    metrics = list(value)
    if not metrics:
        raise ValueError("primary_metric needs a task kind or at least one metric name")
    return primary_metric(str(metrics[0]))


def check_metric(task: str, kind: TaskKind, metric: str) -> str:
    """Refuse a metric that is unknown or cannot score a task of ``kind``; returns ``metric``.

    Raises:
        DataError: naming the task, the metric and the metrics a task of that kind can use.
    """
    owner = _metric_of_key(metric)
    choices = metric_choices(kind)
    if owner is None:
        raise DataError(f"task {task!r}: unknown metric {metric!r}; choose one of {choices}")
    if METRICS[owner].kind != kind:
        why = "scored by option log-likelihood" if kind == "choice" else "scored on generated text"
        raise DataError(
            f"task {task!r} is a {kind} task ({why}): metric {metric!r} scores {METRICS[owner].kind} "
            f"tasks; choose one of {choices}"
        )
    return metric


def score_generations(
    predictions: Sequence[str],
    references: References,
    metrics: Iterable[str],
    raw_predictions: Sequence[str] | None = None,
) -> dict[str, float]:
    """Exact match plus every metric of ``metrics`` (names or result keys) on generated answers.

    ``raw_predictions``: the whole generations, for the metrics marked ``raw`` (the papers' extraction
    rules); ``predictions`` (e.g. first lines) are used for those too when None.

    Raises:
        ValueError: a metric that does not score generated text (e.g. ``accuracy``) or is unknown.
    """
    owners: dict[str, None] = {METRIC_EXACT_MATCH: None}
    for name in metrics:
        owner = _metric_of_key(name)
        if owner is None or METRICS[owner].compute is None:
            raise ValueError(
                f"metric {name!r} does not score generated text; choose from {metric_choices('generate')}"
            )
        owners[owner] = None
    results: dict[str, float] = {}
    for owner in owners:
        compute = METRICS[owner].compute
        assert compute is not None
        use_raw = METRICS[owner].raw and raw_predictions is not None
        results.update(
            compute(raw_predictions if use_raw and raw_predictions is not None else predictions, references)
        )
    return results


# --------------------------------------------------------------------------- tasks


def primary_metrics(tasks: Iterable[Task]) -> dict[str, str]:
    """``{task name: primary metric}`` for :func:`~asymlora.eval.report.summarize` and the tables."""
    return {task.name: primary_metric(task) for task in tasks}


def metric_notes(tasks: Iterable[Task]) -> dict[str, str]:
    """``{task name: note}`` for the tasks whose primary metric is not the one their source declares."""
    return {task.name: task.metric_note for task in tasks if task.metric_note}


def apply_metric_choices(
    tasks: Sequence[Task],
    choices: Mapping[str, str] | None,
    specs: Sequence[str] = (),
    *,
    strict: bool = True,
) -> list[Task]:
    """Give the tasks named in ``choices`` (a run config's ``data.metric``) that primary metric.

    Args:
        tasks: the loaded tasks.
        choices: ``{task name or task spec: metric}``; a spec key (``jsonl:/data/x.jsonl#qa``) is
            matched through ``specs``, the specs the tasks were loaded from, in the same order.
        specs: ``data.tasks`` (optional; only needed for spec keys).
        strict: refuse a key that names no loaded task (False: ignore it, for a federated client
            that holds only some of the tasks).

    Returns:
        The tasks, each chosen one with ``metrics = [metric, *its other metrics]`` and no note.

    Raises:
        DataError: a key naming no task (when ``strict``), or a metric unknown or impossible for the task's kind
            (:func:`check_metric`), before anything is trained.
    """
    if not choices:
        return list(tasks)
    by_key = {task.name: task.name for task in tasks}
    if len(specs) == len(tasks):
        by_key |= {spec: tasks[i].name for i, spec in enumerate(specs)}  # same length: checked above
    wanted: dict[str, str] = {}
    for key, metric in choices.items():
        if key not in by_key and not strict:
            continue
        if key not in by_key:
            raise DataError(
                f"data.metric names task {key!r}, which is not loaded; tasks: {[t.name for t in tasks]}"
            )
        wanted[by_key[key]] = metric
    out = []
    for task in tasks:
        chosen = wanted.get(task.name)
        if chosen is None:
            out.append(task)
            continue
        check_metric(task.name, task.kind, chosen)
        out.append(replace(task, metrics=list(dict.fromkeys([chosen, *task.metrics])), metric_note=None))
    return out
