"""Hand-valued tests of eval/metrics.py's metric registry and config choices, small enough for mutation
testing (docs/testing.md): whole error messages, the metric order a config choice gives, BLEU's edges."""

from __future__ import annotations

import pytest

from asymlora.data import DataError, Example, Task, build_task
from asymlora.eval.metrics import (
    apply_metric_choices,
    bleu_score,
    check_metric,
    metric_choices,
)

GENERATE = [
    "exact_match",
    "rouge",
    "rouge1",
    "rouge2",
    "rougeL",
    "rougeLsum",
    "bleu",
    "answer_word",
    "answer_number",
    "answer_letter",
    "flan_rouge",
    "flan_rouge1",
    "flan_rougeL",
]


def _gen(name: str = "summaries", metrics: list[str] | None = None, note: str | None = None) -> Task:
    examples = [Example(f"Text {i}", f"sum {i}") for i in range(4)]
    task = build_task(name, {"all": examples})
    return Task(task.name, task.kind, task.train, task.test, metrics or ["exact_match"], note)


def _choice(name: str = "quiz") -> Task:
    return build_task(name, {"all": [Example(f"Q {i}", "yes", options=["yes", "no"]) for i in range(4)]})


def test_metric_choices_by_kind() -> None:
    assert metric_choices("choice") == ["accuracy"]
    assert metric_choices("generate") == GENERATE
    assert metric_choices() == ["accuracy", *GENERATE]


def test_check_metric_returns_the_name_it_accepts() -> None:
    assert check_metric("t", "generate", "rougeL") == "rougeL"  # a result key of "rouge"
    assert check_metric("t", "generate", "flan_rouge") == "flan_rouge"
    assert check_metric("q", "choice", "accuracy") == "accuracy"


def test_check_metric_messages_whole() -> None:
    with pytest.raises(DataError) as err:
        check_metric("summaries", "generate", "bleurt")
    assert str(err.value) == f"task 'summaries': unknown metric 'bleurt'; choose one of {GENERATE}"
    with pytest.raises(DataError) as err:
        check_metric("quiz", "choice", "rougeL")
    assert str(err.value) == (
        "task 'quiz' is a choice task (scored by option log-likelihood): metric 'rougeL' scores generate "
        "tasks; choose one of ['accuracy']"
    )
    with pytest.raises(DataError) as err:
        check_metric("summaries", "generate", "accuracy")
    assert str(err.value) == (
        "task 'summaries' is a generate task (scored on generated text): metric 'accuracy' scores choice "
        f"tasks; choose one of {GENERATE}"
    )
