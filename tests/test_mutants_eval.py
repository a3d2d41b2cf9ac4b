"""Hand-valued tests of eval/metrics.py's metric registry and config choices, small enough for mutation
testing (docs/testing.md): whole error messages, the metric order a config choice gives, BLEU's edges."""

from __future__ import annotations

import pytest

from asymlora.data import DataError, Example, Task, build_task
from asymlora.eval.metrics import (
    apply_metric_choices,
    bleu_score,
    check_metric,
    exact_match_score,
    metric_choices,
    primary_metric,
    score_generations,
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


# --------------------------------------------------------------------------- apply_metric_choices


def test_no_choice_returns_the_tasks_as_a_list() -> None:
    tasks = (_gen(), _choice())
    for choices in (None, {}):
        out = apply_metric_choices(tasks, choices)
        assert isinstance(out, list) and out == list(tasks)


def test_choice_moves_the_metric_first_without_duplicates_and_clears_the_note() -> None:
    gen = _gen(metrics=["exact_match", "bleu", "rougeLsum"], note="BIG-bench prefers bleurt")
    quiz = _choice()
    out = apply_metric_choices([quiz, gen], {"summaries": "bleu"})
    assert out[0] is quiz  # a task without a choice is passed through unchanged
    assert out[1].metrics == ["bleu", "exact_match", "rougeLsum"]
    assert out[1].metric_note is None
    assert (
        gen.metrics == ["exact_match", "bleu", "rougeLsum"] and gen.metric_note
    )  # the input is not modified
    new = apply_metric_choices([gen], {"summaries": "rougeL"})[0]
    assert new.metrics == ["rougeL", "exact_match", "bleu", "rougeLsum"]


def test_spec_keys_need_one_spec_per_task() -> None:
    gen, quiz = _gen(), _choice()
    specs = ["jsonl:/d/s.jsonl#summaries", "bigbench:quiz"]
    out = apply_metric_choices([gen, quiz], {specs[0]: "bleu"}, specs)
    assert out[0].metrics == ["bleu", "exact_match"] and out[1] is quiz
    # specs that do not match the tasks one to one are not used: the spec key names no task
    with pytest.raises(DataError) as err:
        apply_metric_choices([gen, quiz], {specs[0]: "bleu"}, specs[:1])
    assert str(err.value) == (
        "data.metric names task 'jsonl:/d/s.jsonl#summaries', which is not loaded; tasks: ['summaries', 'quiz']"
    )


def test_non_strict_skips_unknown_keys_and_applies_the_others() -> None:
    gen, quiz = _gen(), _choice()
    out = apply_metric_choices([gen, quiz], {"elsewhere": "bleu", "summaries": "rougeL"}, strict=False)
    assert out[0].metrics == ["rougeL", "exact_match"] and out[1] is quiz
    with pytest.raises(DataError, match=r"^data\.metric names task 'elsewhere', which is not loaded; "):
        apply_metric_choices([gen, quiz], {"elsewhere": "bleu", "summaries": "rougeL"})


def test_choice_checked_against_the_task_kind() -> None:
    with pytest.raises(DataError) as err:
        apply_metric_choices([_gen(), _choice()], {"quiz": "bleu"})
    assert str(err.value) == (
        "task 'quiz' is a choice task (scored by option log-likelihood): metric 'bleu' scores generate "
        "tasks; choose one of ['accuracy']"
    )
    assert apply_metric_choices([_choice()], {"quiz": "accuracy"})[0].metrics == ["accuracy"]


# --------------------------------------------------------------------------- BLEU edges
#
# "the dog ran away" against "a dog ran away fast now": matches 3/4, 2/3, 1/2, 0/1; exponential smoothing
# replaces the first zero count by 1/(2 · 1) → geometric mean (3/4 · 2/3 · 1/2 · 1/2)^(1/4) = (1/8)^(1/4);
# lengths 4 < 6 → brevity penalty exp(1 − 6/4); BLEU = 0.59460 · 0.60653 = 0.36065 (no smoothing: 0).
# "«the cat» sat" against "« the cat » sat": the intl tokenizer splits the guillemets off → 1.0 (13a: 0).


def test_bleu_exponential_smoothing_by_hand() -> None:
    got = bleu_score(["the dog ran away"], ["a dog ran away fast now"])["bleu"]
    assert got == pytest.approx((1 / 8) ** 0.25 * 2.718281828459045**-0.5, abs=1e-9)


def test_bleu_uses_the_intl_tokenizer() -> None:
    assert bleu_score(["«the cat» sat"], ["« the cat » sat"])["bleu"] == pytest.approx(1.0)


def test_bleu_pads_short_reference_lists_with_their_first_reference() -> None:
    # example 1 has one reference, example 2 three: example 1's stream is padded with its only reference
    refs = [["the cat sat on a mat"], ["x y z", "the dog ran away", "q"]]
    assert bleu_score(["the cat sat on a mat", "the dog ran away"], refs)["bleu"] == pytest.approx(1.0)
    refs = [["the cat sat on a mat", "zz"], ["the dog ran away"]]
    assert bleu_score(["the cat sat on a mat", "the dog ran away"], refs)["bleu"] == pytest.approx(1.0)


def test_bleu_message_of_an_example_without_reference() -> None:
    with pytest.raises(ValueError) as err:
        bleu_score(["a", "b"], ["a", []])
    assert str(err.value) == "prediction 'b'… has no reference answer"


# --------------------------------------------------------------------------- score_generations, primary_metric
#
# prediction (first line) "the cat", whole generation "the cat\nsat", reference "the cat":
#   exact match on the first line: 1.0 (on the whole generation it would be 0.0)
#   flan_rouge (a `raw` metric, on the whole generation): unigrams "the cat sat" vs "the cat":
#   P = 2/3, R = 1 → F = 2 · (2/3) · 1 / (2/3 + 1) = 0.8 (on the first line: 1.0)


def test_raw_metrics_read_the_whole_generation_and_the_others_the_prediction() -> None:
    got = score_generations(["the cat"], ["the cat"], ["flan_rouge"], raw_predictions=["the cat\nsat"])
    assert got == pytest.approx({"exact_match": 1.0, "flan_rouge1": 0.8, "flan_rougeL": 0.8})
    # without whole generations the raw metrics fall back to the predictions
    got = score_generations(["the cat"], ["the cat"], ["flan_rouge1"])
    assert got == pytest.approx({"exact_match": 1.0, "flan_rouge1": 1.0, "flan_rougeL": 1.0})


@pytest.mark.parametrize("name", ["accuracy", "bleurt"])
def test_score_generations_refuses_metrics_that_do_not_score_text(name) -> None:
    with pytest.raises(ValueError) as err:
        score_generations(["a"], ["a"], ["bleu", name])
    assert str(err.value) == f"metric {name!r} does not score generated text; choose from {GENERATE}"


def test_exact_match_score_of_no_example_is_zero() -> None:
    assert exact_match_score([], []) == {"exact_match": 0.0}
    assert exact_match_score(["The Cat", "dog"], ["cat", ["a dog", "x"]]) == {"exact_match": 1.0}
    assert exact_match_score(["cat", "dog"], ["cat", "cow"]) == {"exact_match": 0.5}


def test_primary_metric_of_a_registry_name_is_its_first_key() -> None:
    assert primary_metric("flan_rouge") == "flan_rouge1"
    assert primary_metric("flan_rougeL") == "flan_rougeL"
    assert primary_metric("bleu") == "bleu"  # one key: the name itself
    assert primary_metric(["answer_number", "exact_match"]) == "answer_number"
