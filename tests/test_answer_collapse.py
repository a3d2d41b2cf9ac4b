"""scripts/answer_collapse.py: a correctness vector is "one answer throughout" exactly when it is the indicator
of one option among the targets (hand-made vectors; docs/federated.md, "Three binary clients ...")."""

import importlib.util
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "answer_collapse", Path(__file__).resolve().parents[1] / "scripts" / "answer_collapse.py"
)
answer_collapse = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(answer_collapse)

TARGETS = ["yes", "no", "yes", "yes", "no"]


@pytest.mark.parametrize(
    ("scores", "expected"),
    [
        ([1.0, 0.0, 1.0, 1.0, 0.0], ["yes"]),  # always "yes": right exactly where the target is "yes"
        ([0.0, 1.0, 0.0, 0.0, 1.0], ["no"]),  # always "no"
        ([1.0, 1.0, 1.0, 1.0, 0.0], []),  # four right: answered both
        ([1.0, 0.0, 1.0, 0.0, 0.0], []),  # a "yes" example wrong, so not always "yes"
        ([0.0, 0.0, 0.0, 0.0, 0.0], []),  # all wrong on a two-option task: not one answer throughout
    ],
)
def test_collapsed_options_on_hand_vectors(scores, expected):
    assert answer_collapse.collapsed_options(TARGETS, scores) == expected


def test_a_three_option_task_wrong_everywhere_is_not_collapsed_onto_a_target():
    # always answering the third, never-correct option scores 0 everywhere: no target option explains it
    assert answer_collapse.collapsed_options(["a", "b", "a"], [0.0, 0.0, 0.0]) == []


def test_lengths_must_match():
    with pytest.raises(ValueError):
        answer_collapse.collapsed_options(TARGETS, [1.0, 0.0])
    with pytest.raises(ValueError):  # even when the first example already rules every option out
        answer_collapse.collapsed_options(["yes", "no", "no"], [0.0, 0.0])
