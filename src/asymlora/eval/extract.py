"""The scoring rules of the ALoRA paper's benchmarks: answer extraction from a free generation, ROUGE.

The paper (arXiv 2509.25414, code at github.com/OptMN-Lab/ALoRA) scores its tables with the rules
of the projects it builds on; this module reproduces them, rule for rule:

- **Commonsense** (``answer_word``): LLM-Adapters' ``commonsense_evaluate.py``
  (github.com/AGI-Edgerunners/LLM-Adapters, copied unchanged into ALoRA's
  ``multi_task_fine_tuning/intra_domain/commonsense``): the *first* match, case-sensitive and
  without word boundaries, of the dataset's label alternation — ``true|false`` (BoolQ),
  ``solution1|solution2`` (PIQA), ``answer1|…|answer5`` (SIQA, ARC-e, ARC-c, OBQA),
  ``ending1|…|ending4`` (HellaSwag), ``option1|option2`` (WinoGrande) — equal to the label.
  No match scores 0.
- **Math, numeric answers** (``answer_number``): LLM-Adapters' ``evaluate.py`` /
  ALoRA's ``math_evaluate.py``: drop every comma, take the *last* match of ``-?\\d+\\.?\\d*``,
  correct when ``|prediction − label| ≤ 0.001``. No number scores 0 (the reference code uses +inf).
- **AQuA** (``answer_letter``): the same scripts' ``extract_answer_letter``: the first capital
  ``A``–``E`` anywhere in the output (so a sentence starting "After …" answers A — the published
  rule, kept as is so numbers stay comparable).
- **FLAN cross-domain and FedDPA** (``flan_rouge``): ALoRA's and FedDPA's ``metric.py`` call
  ``t5.evaluation.metrics.rouge``, i.e. ``rouge_score`` F-measures *without* stemming, averaged over
  the examples (t5 reports the bootstrap median of the mean, which equals the mean up to resampling
  noise, ×100). Here: ``flan_rouge1`` and ``flan_rougeL`` in [0, 1].

Every metric here maps ``(predictions, references) → {key: mean score in [0, 1]}``; each example's
first reference is its label. :data:`PAPER_METRICS` is the name → function registry and
:data:`PAPER_PRIMARY` the key a task reports as its primary metric (see docs/reproduce.md).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from typing import Any

__all__ = [
    "ANSWER_LETTER",
    "ANSWER_NUMBER",
    "ANSWER_WORD",
    "FLAN_ROUGE",
    "NUMBER_TOLERANCE",
    "PAPER_METRICS",
    "PAPER_PRIMARY",
    "ExtractionError",
    "detect_rule",
    "extract_letter",
    "extract_number",
    "extract_word",
    "label_family",
    "paper_metric_scores",
]

ANSWER_WORD = "answer_word"
ANSWER_NUMBER = "answer_number"
ANSWER_LETTER = "answer_letter"
FLAN_ROUGE = "flan_rouge"

NUMBER_TOLERANCE = 0.001
"""``miss`` in LLM-Adapters' ``evaluate.py``: a numeric answer within this distance is correct."""

WORD_PATTERNS: dict[str, re.Pattern[str]] = {
    "true/false": re.compile(r"true|false"),
    "solution": re.compile(r"solution1|solution2"),
    "answer": re.compile(r"answer1|answer2|answer3|answer4|answer5"),
    "ending": re.compile(r"ending1|ending2|ending3|ending4"),
    "option": re.compile(r"option1|option2"),
}
"""Label family → the alternation LLM-Adapters' ``extract_answer`` searches for (order matters only
through ``re.findall``'s left-to-right scan: the first match in the text wins)."""

_NUMBER = re.compile(r"-?\d+\.?\d*")
_LETTER = re.compile(r"A|B|C|D|E")
_LETTER_LABELS = frozenset("ABCDE")


class ExtractionError(ValueError):
    """Labels that fit none of the extraction rules; the message names them and the rules."""


# --------------------------------------------------------------------------- single generations


def label_family(label: str) -> str | None:
    """The :data:`WORD_PATTERNS` family whose alternation matches ``label`` exactly, or None."""
    for family, pattern in WORD_PATTERNS.items():
        if pattern.fullmatch(label.strip()):
            return family
    return None


def extract_word(text: str, family: str) -> str:
    """The first occurrence in ``text`` of a label of ``family`` (``""`` when there is none).

    Raises:
        KeyError: ``family`` is not one of :data:`WORD_PATTERNS`.
    """
    found = WORD_PATTERNS[family].search(text.strip())
    return found.group(0) if found else ""


def extract_number(text: str) -> float:
    """The last number of ``text`` after removing commas; ``inf`` when there is none.

    ``"1,234.5 apples, -3 left"`` → -3.0; ``"The answer is 18."`` → 18.0.
    """
    numbers = _NUMBER.findall(text.replace(",", ""))
    return float(numbers[-1]) if numbers else float("inf")


def extract_letter(text: str) -> str:
    """The first capital ``A``–``E`` in ``text`` (``""`` when there is none), as AQuA is scored."""
    found = _LETTER.search(text.strip())
    return found.group(0) if found else ""


def _as_number(label: str) -> float | None:
    try:
        return float(label.replace(",", ""))
    except ValueError:
        return None


# --------------------------------------------------------------------------- rule detection


def detect_rule(labels: Iterable[str]) -> str:
    """The extraction metric that fits every label: word, letter (A–E) or number.

    Args:
        labels: the reference answers of one test set (e.g. its ``answer`` column).

    Returns:
        :data:`ANSWER_WORD` (all labels of one word family), :data:`ANSWER_LETTER` (all in A–E)
        or :data:`ANSWER_NUMBER` (all parse as numbers).

    Raises:
        ExtractionError: no label, labels of several word families, or labels that fit no rule.
    """
    values = [str(label).strip() for label in labels]
    if not values:
        raise ExtractionError("no labels to choose an extraction rule from")
    families = {label_family(value) for value in values}
    if None not in families:
        if len(families) > 1:
            raise ExtractionError(
                f"labels mix the answer formats {sorted(f for f in families if f is not None)}; one test set has one"
            )
        return ANSWER_WORD
    if all(value in _LETTER_LABELS for value in values):
        return ANSWER_LETTER
    if all(_as_number(value) is not None for value in values):
        return ANSWER_NUMBER
    odd = [value for value in values if label_family(value) is None and _as_number(value) is None][:3]
    raise ExtractionError(
        f"labels such as {odd or values[:3]} match none of the extraction rules: a label word "
        f"({', '.join(p.pattern for p in WORD_PATTERNS.values())}), an option letter A-E, or a number"
    )


# --------------------------------------------------------------------------- corpus-level metrics


def _labels(references: Sequence[Sequence[str] | str]) -> list[str]:
    return [refs if isinstance(refs, str) else refs[0] for refs in references]


def _check_lengths(predictions: Sequence[str], references: Sequence[Any]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def answer_word_accuracy(predictions: Sequence[str], references: Sequence[Any]) -> dict[str, float]:
    """Commonsense accuracy: the first label word of the reference's family equals the reference."""
    _check_lengths(predictions, references)
    scores = []
    for prediction, label in zip(predictions, _labels(references), strict=True):
        family = label_family(label)
        if family is None:
            raise ExtractionError(f"label {label!r} is not a label word ({', '.join(WORD_PATTERNS)})")
        scores.append(float(extract_word(prediction, family) == label.strip()))
    return {ANSWER_WORD: _mean(scores)}


def answer_number_accuracy(predictions: Sequence[str], references: Sequence[Any]) -> dict[str, float]:
    """Math accuracy: the last number of the output within :data:`NUMBER_TOLERANCE` of the label."""
    _check_lengths(predictions, references)
    scores = []
    for prediction, label in zip(predictions, _labels(references), strict=True):
        value = _as_number(label.strip())
        if value is None:
            raise ExtractionError(f"label {label!r} is not a number")
        scores.append(float(abs(value - extract_number(prediction)) <= NUMBER_TOLERANCE))
    return {ANSWER_NUMBER: _mean(scores)}


def answer_letter_accuracy(predictions: Sequence[str], references: Sequence[Any]) -> dict[str, float]:
    """AQuA accuracy: the first capital A–E of the output equals the label letter."""
    _check_lengths(predictions, references)
    labels = [label.strip() for label in _labels(references)]
    scores = [float(extract_letter(p) == label) for p, label in zip(predictions, labels, strict=True)]
    return {ANSWER_LETTER: _mean(scores)}


@lru_cache(maxsize=1)
def _unstemmed_scorer() -> Any:
    # imported on first use: ~1.2 s (it loads nltk), and only FLAN-style tasks need it
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)


def flan_rouge(predictions: Sequence[str], references: Sequence[Any]) -> dict[str, float]:
    """ROUGE-1 and ROUGE-L F-measure without stemming (t5's default), mean over examples, in [0, 1].

    Each example keeps its best reference per variant (one reference in FedDPA's files).
    """
    _check_lengths(predictions, references)
    scorer = _unstemmed_scorer()
    totals = {"rouge1": 0.0, "rougeL": 0.0}
    for prediction, refs in zip(predictions, references, strict=True):
        refs = [refs] if isinstance(refs, str) else list(refs)
        scores = [scorer.score(reference, prediction) for reference in refs]
        for key in totals:
            totals[key] += max(score[key].fmeasure for score in scores)
    n = max(len(predictions), 1)
    return {f"{FLAN_ROUGE}1": totals["rouge1"] / n, f"{FLAN_ROUGE}L": totals["rougeL"] / n}


PaperMetric = Callable[[Sequence[str], Sequence[Any]], dict[str, float]]

PAPER_METRICS: dict[str, PaperMetric] = {
    ANSWER_WORD: answer_word_accuracy,
    ANSWER_NUMBER: answer_number_accuracy,
    ANSWER_LETTER: answer_letter_accuracy,
    FLAN_ROUGE: flan_rouge,
}
"""Metric name (as listed in a task's ``metrics``) → scorer of raw generations."""

PAPER_PRIMARY: dict[str, str] = {
    ANSWER_WORD: ANSWER_WORD,
    ANSWER_NUMBER: ANSWER_NUMBER,
    ANSWER_LETTER: ANSWER_LETTER,
    FLAN_ROUGE: f"{FLAN_ROUGE}1",
}
"""Metric name → the result key that is the task's primary metric (ROUGE-1 for FLAN/FedDPA)."""


def paper_metric_scores(
    metric_names: Iterable[str], predictions: Sequence[str], references: Sequence[Any]
) -> dict[str, float]:
    """Every :data:`PAPER_METRICS` entry named in ``metric_names``, on the raw generations."""
    results: dict[str, float] = {}
    for name in metric_names:
        if name in PAPER_METRICS:
            results.update(PAPER_METRICS[name](predictions, references))
    return results
