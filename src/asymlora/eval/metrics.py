"""Answer metrics: SQuAD-style normalisation and exact match, ROUGE-1/2/L, the primary metric of a task.

Every metric here is "higher is better" and lies in [0, 1].
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from asymlora.data.tasks import METRIC_ACCURACY, METRIC_EXACT_MATCH, METRIC_ROUGE
from asymlora.eval.extract import PAPER_PRIMARY

__all__ = [
    "ROUGE_KEYS",
    "exact_match",
    "normalize_answer",
    "primary_metric",
    "rouge_scores",
]

ROUGE_KEYS: tuple[str, ...] = ("rouge1", "rouge2", "rougeL")
"""Keys :func:`rouge_scores` returns (F-measures); ``rouge`` in a task's metrics reports all three."""

PRIMARY_ROUGE = "rougeL"
"""The primary metric of a task whose first configured metric is ``rouge``."""

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)
_KNOWN = (METRIC_ACCURACY, METRIC_EXACT_MATCH, *ROUGE_KEYS, *PAPER_PRIMARY.values())


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


@lru_cache(maxsize=1)
def _scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)


def rouge_scores(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure (``rouge_score`` with Porter stemming) over the examples.

    Each example is scored against each of its references and keeps, per ROUGE variant, the best
    one (the usual multi-reference convention). An empty list gives zeros.

    Args:
        predictions: one generated text per example.
        references: per example, a reference string or a list of reference strings.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    totals = dict.fromkeys(ROUGE_KEYS, 0.0)
    if not predictions:
        return totals
    scorer = _scorer()
    for prediction, refs in zip(predictions, references, strict=True):
        refs = [refs] if isinstance(refs, str) else list(refs)
        if not refs:
            raise ValueError(f"prediction {prediction[:60]!r}… has no reference answer")
        scores = [scorer.score(reference, prediction) for reference in refs]
        for key in ROUGE_KEYS:
            totals[key] += max(score[key].fmeasure for score in scores)
    return {key: value / len(predictions) for key, value in totals.items()}


def primary_metric(task_kind_or_metrics: Any) -> str:
    """The metric summaries and Δm% are computed on.

    Args:
        task_kind_or_metrics: a task kind (``"choice"`` → ``accuracy``, ``"generate"`` →
            ``exact_match``); a metric name; a list of configured metric names (the first one
            decides; ``rouge`` means ``rougeL``); or a :class:`~asymlora.data.Task` (its ``metrics``).

    Raises:
        ValueError: an unknown kind or metric name, or an empty list.
    """
    value = getattr(task_kind_or_metrics, "metrics", task_kind_or_metrics)
    if isinstance(value, str):
        if value == "choice":
            return METRIC_ACCURACY
        if value == "generate":
            return METRIC_EXACT_MATCH
        if value == METRIC_ROUGE:
            return PRIMARY_ROUGE
        if value in PAPER_PRIMARY:  # the papers' extraction rules and ROUGE (eval/extract.py)
            return PAPER_PRIMARY[value]
        if value in _KNOWN:
            return value
        raise ValueError(
            f"unknown task kind or metric {value!r}; expected 'choice', 'generate', {METRIC_ROUGE!r} "
            f"or one of {list(_KNOWN)}"
        )
    metrics = list(value)
    if not metrics:
        raise ValueError("primary_metric needs a task kind or at least one metric name")
    return primary_metric(str(metrics[0]))
