"""Each task is scored by the metric its source declares: ROUGE-Lsum and BLEU by hand, BIG-bench's
``preferred_score``, a config's ``data.metric``, and tables that say which metric each number is."""

from __future__ import annotations

import json
import math

import pytest

import asymlora.eval.scoring as scoring
from asymlora.config import ConfigError, load_config
from asymlora.data import DataError, Example, Task, build_task
from asymlora.data import bigbench as bb
from asymlora.eval import (
    MIXED,
    apply_metric_choices,
    bleu_score,
    check_metric,
    evaluate_task,
    format_table,
    metric_notes,
    plot_results,
    primary_metric,
    primary_metrics,
    rouge_scores,
    summarize,
)
from asymlora.eval.metrics import split_sentences

# --------------------------------------------------------------------------- BLEU by hand
#
# Example 1: "the cat sat on the mat" against "the cat sat on a mat" (6 words each).
#   1-grams: the(2, clipped to 1), cat, sat, on, mat match → 5 of 6
#   2-grams: "the cat", "cat sat", "sat on" match; "on the", "the mat" do not → 3 of 5
#   3-grams: "the cat sat", "cat sat on" → 2 of 4;   4-grams: "the cat sat on" → 1 of 3
#   lengths 6 and 6 → brevity penalty 1;  BLEU = (5/6 · 3/5 · 1/2 · 1/3)^(1/4) = (1/12)^(1/4) = 0.53728
#
# Example 2: "the dog ran away" against {"a dog ran away fast now", "the dog ran"} (n-grams may match
#   either reference): 1-grams 4/4; 2-grams "the dog", "dog ran", "ran away" 3/3; 3-grams "the dog ran",
#   "dog ran away" 2/2; 4-gram "the dog ran away" 0/1; closest reference length 3 (|4-3| < |4-6|).
# Corpus of both: precisions 9/10, 6/8, 4/6, 1/4; hypothesis length 10 > reference length 6+3 = 9 → BP 1;
#   BLEU = (0.9 · 0.75 · 2/3 · 0.25)^(1/4) = 0.1125^(1/4) = 0.57915
#
# Example 2 with only "a dog ran away fast now": 1-grams dog, ran, away 3/4; 2-grams 2/3; 3-grams 1/2; 4-grams 0/1.
# Corpus: precisions 8/10, 5/8, 3/6, 1/4 → geometric mean 0.0625^(1/4) = 0.5; lengths 10 < 6+6 = 12 →
#   BP = exp(1 − 12/10) = exp(−0.2);  BLEU = 0.5 · exp(−0.2) = 0.40937

HYP1, REF1 = "the cat sat on the mat", "the cat sat on a mat"
HYP2 = "the dog ran away"


def test_bleu_single_sentence_by_hand() -> None:
    assert bleu_score([HYP1], [REF1])["bleu"] == pytest.approx((1 / 12) ** 0.25, abs=1e-9)


def test_bleu_corpus_with_two_references_by_hand() -> None:
    refs = [REF1, ["a dog ran away fast now", "the dog ran"]]
    assert bleu_score([HYP1, HYP2], refs)["bleu"] == pytest.approx(0.1125**0.25, abs=1e-9)
    # the first example's reference repeated (BIG-bench's padding) changes nothing
    padded = [[REF1, REF1], ["a dog ran away fast now", "the dog ran"]]
    assert bleu_score([HYP1, HYP2], padded)["bleu"] == pytest.approx(0.1125**0.25, abs=1e-9)


def test_bleu_brevity_penalty_by_hand() -> None:
    refs = [REF1, "a dog ran away fast now"]
    assert bleu_score([HYP1, HYP2], refs)["bleu"] == pytest.approx(0.5 * math.exp(-0.2), abs=1e-9)


def test_bleu_edges() -> None:
    assert bleu_score(["alpha"], ["beta"]) == {"bleu": 0.0}
    assert bleu_score([], []) == {"bleu": 0.0}
    assert bleu_score([REF1], [REF1])["bleu"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no reference"):
        bleu_score(["a"], [[]])
    with pytest.raises(ValueError, match="1 predictions but 2"):
        bleu_score(["a"], ["a", "b"])


# --------------------------------------------------------------------------- ROUGE-Lsum by hand
#
# Example A: reference "the cat sat. the dog ran." (sentences r1 = the cat sat, r2 = the dog ran),
#   prediction "the dog ran. the cat sat." (c1 = the dog ran, c2 = the cat sat).
#   ROUGE-L on the whole text: LCS of "the cat sat the dog ran" and "the dog ran the cat sat" is 3
#     words ("the cat sat") → P = R = 3/6 → F = 0.5.
#   ROUGE-Lsum: r1's union LCS with c1 (the) and c2 (the cat sat) covers all 3 words; r2's union with
#     c1 covers its 3 words; 6 hits (no word used more often than it occurs) → P = R = 6/6 → F = 1.0.
# Example B: reference "the cat sat on the mat. it was happy." (9 words), prediction "a cat sat. it
#   was sad." (6 words): r1 ∪ LCS = {cat, sat}, r2 ∪ LCS = {it, was} → 4 hits; P = 4/6, R = 4/9,
#   F = 2PR/(P+R) = 8/15.
# Multi-reference: each example keeps its best reference; the mean over A and B is (1 + 8/15)/2 = 23/30.

PRED_A, REF_A = "the dog ran. the cat sat.", "the cat sat. the dog ran."
PRED_B, REF_B = "a cat sat. it was sad.", "the cat sat on the mat. it was happy."


def test_rouge_lsum_by_hand() -> None:
    a = rouge_scores([PRED_A], [REF_A])
    assert a["rougeLsum"] == pytest.approx(1.0) and a["rougeL"] == pytest.approx(0.5)
    b = rouge_scores([PRED_B], [REF_B])
    assert b["rougeLsum"] == pytest.approx(8 / 15)
    both = rouge_scores([PRED_A, PRED_B], [[REF_A, "a bird flew."], ["no overlap at all", REF_B]])
    assert both["rougeLsum"] == pytest.approx(23 / 30)
    assert both["rougeL"] == pytest.approx((0.5 + 8 / 15) / 2)


def test_sentence_split_for_rouge_lsum() -> None:
    assert (
        split_sentences("The cat sat . The dog ran .") == "The cat sat .\nThe dog ran ."
    )  # BIG-bench's " . "
    assert split_sentences("One. Two!  Three?\n\nfour") == "One.\nTwo!\nThree?\nfour"
    assert split_sentences("no end mark") == "no end mark"


# --------------------------------------------------------------------------- BIG-bench declarations


def _task_json(preferred: str | None, metrics: list[str], choice: bool = False) -> dict:
    example = (
        {"input": "a b", "target_scores": {"x": 1, "y": 0}} if choice else {"input": "a b", "target": "c d"}
    )
    data = {"metrics": metrics, "examples": [example, dict(example)]}
    if preferred is not None:
        data["preferred_score"] = preferred
    return data


@pytest.mark.parametrize(
    ("preferred", "metrics", "expected", "noted"),
    [
        ("rougeLsum", ["bleu", "rouge"], ["rougeLsum", "bleu", "rouge"], False),
        ("bleu", ["bleu", "rouge", "exact_str_match"], ["bleu", "rouge", "exact_match"], False),
        ("exact_str_match", ["exact_str_match"], ["exact_match"], False),
        ("rouge", ["rouge"], ["rougeLsum", "rouge"], False),  # BIG-bench ranks its "rouge" by rougeLsum
        ("bleurt", ["bleu", "bleurt"], ["bleu"], True),  # BIG-bench's few_shot_nlg
        ("log_likelihood", ["log_likelihood", "rouge"], ["rougeLsum", "rouge"], True),
        (
            "numeric_match_with_0_1_relative_error",
            ["numeric_match_with_0_1_relative_error"],
            ["exact_match"],
            True,
        ),
        (None, ["exact_str_match"], ["exact_match"], True),
    ],
)
def test_generative_task_follows_preferred_score(preferred, metrics, expected, noted) -> None:
    parsed = bb.parse_task_json(_task_json(preferred, metrics), "toy")
    assert parsed.kind == "generate" and parsed.metrics == expected
    assert (parsed.metric_note is not None) == noted
    if noted:
        assert str(preferred or "no preferred_score") in parsed.metric_note
        assert f"scored by {primary_metric(expected)!r} instead" in parsed.metric_note


def test_choice_task_is_scored_by_accuracy() -> None:
    parsed = bb.parse_task_json(_task_json("multiple_choice_grade", ["multiple_choice_grade"], True), "c")
    assert parsed.kind == "choice" and parsed.metrics == ["accuracy"] and parsed.metric_note is None
    macro = bb.parse_task_json(_task_json("macro_f1", ["macro_f1"], True), "social_support")
    assert macro.metrics == ["accuracy"] and "macro_f1" in macro.metric_note
    assert "the default for choice tasks" in macro.metric_note


def test_evaluate_task_reports_declared_metrics(monkeypatch) -> None:
    """A generative task declaring ROUGE-Lsum and BLEU gets both, and ROUGE-Lsum is its primary metric."""
    monkeypatch.setattr(scoring, "greedy_generate", lambda *a, **k: [PRED_A, HYP1])
    examples = [Example("Question: q1", REF_A), Example("Question: q2", REF1)]
    task = Task("gen", "generate", examples[:1], examples, ["rougeLsum", "bleu", "rouge"])
    result = evaluate_task(None, None, task, task_id=None)
    assert set(result) == {"exact_match", "rouge1", "rouge2", "rougeL", "rougeLsum", "bleu", "n"}
    # HYP1 vs REF1 is one sentence: LCS "the cat sat on mat" = 5 of 6 words → F = 5/6 for L and Lsum
    assert result["rougeLsum"] == pytest.approx((1.0 + 5 / 6) / 2)
    assert result["rougeL"] == pytest.approx((0.5 + 5 / 6) / 2)
    assert result["bleu"] == pytest.approx(bleu_score([PRED_A, HYP1], [REF_A, REF1])["bleu"])
    # SQuAD normalisation drops articles: "the cat sat on the mat" matches "the cat sat on a mat"
    assert result["exact_match"] == 0.5 and result["n"] == 2.0
    assert primary_metric(task) == "rougeLsum"


def test_corpus_bleu_has_no_per_example_scores_even_where_they_would_average_to_it(monkeypatch) -> None:
    """Corpus BLEU is not a mean over examples, so its per-example "scores" were dropped only when their mean
    differed from the corpus score. Where nothing matches, every sentence's BLEU and the corpus's are 0 (by hand:
    no unigram in common), the mean agreed and ``bleu`` got per-example scores in this run but not in a run whose
    BLEU is not 0: a sweep's paired test of the two groups was then dropped whole (`groups.paired_over_seeds`).
    Exact match still gets its per-example scores."""
    monkeypatch.setattr(scoring, "greedy_generate", lambda *a, **k: ["zzz qqq", "xxx"])
    examples = [Example("Question: q1", "the cat sat"), Example("Question: q2", "a dog ran")]
    task = Task("gen", "generate", examples[:1], examples, ["bleu"])
    result, rows = evaluate_task(None, None, task, task_id=None, with_examples=True)
    assert result["bleu"] == 0.0 and result["exact_match"] == 0.0
    assert [row["scores"] for row in rows] == [{"exact_match": 0.0}, {"exact_match": 0.0}]


# --------------------------------------------------------------------------- configured metrics


def _gen_task(name: str = "summaries") -> Task:
    examples = [Example(f"Question: {i}", f"answer number {i} here") for i in range(4)]
    return build_task(name, {"all": examples})


def _choice_task(name: str = "quiz") -> Task:
    examples = [Example(f"Question: {i}", "yes", options=["yes", "no"]) for i in range(4)]
    return build_task(name, {"all": examples})


def test_default_primary_metric_by_kind() -> None:
    assert primary_metric(_gen_task()) == "exact_match"
    assert primary_metric(_choice_task()) == "accuracy"


def test_configured_metric_becomes_primary() -> None:
    gen, quiz = _gen_task(), _choice_task()
    out = apply_metric_choices(
        [gen, quiz], {"jsonl:/data/s.jsonl#summaries": "rougeLsum"}, ["jsonl:/data/s.jsonl#summaries", "x"]
    )
    assert primary_metrics(out) == {"summaries": "rougeLsum", "quiz": "accuracy"}
    assert out[0].metrics[0] == "rougeLsum" and "exact_match" in out[0].metrics
    assert primary_metric(apply_metric_choices([gen], {"summaries": "bleu"})[0]) == "bleu"
    assert apply_metric_choices([gen], {"other": "bleu"}, strict=False) == [gen]


def test_impossible_or_unknown_metric_is_refused() -> None:
    with pytest.raises(DataError, match=r"task 'quiz' is a choice task .*metric 'rougeLsum'.*\['accuracy'\]"):
        apply_metric_choices([_choice_task()], {"quiz": "rougeLsum"})
    with pytest.raises(DataError, match=r"task 'summaries' is a generate task .*'accuracy'.*'rougeLsum'"):
        check_metric("summaries", "generate", "accuracy")
    with pytest.raises(DataError, match=r"task 'summaries': unknown metric 'bleurt'; choose one of"):
        check_metric("summaries", "generate", "bleurt")
    with pytest.raises(DataError, match=r"names task 'sumaries', which is not loaded"):
        apply_metric_choices([_gen_task()], {"sumaries": "bleu"})


def test_config_refuses_unknown_metric_name() -> None:
    cfg = load_config(None, ["data.tasks=[bigbench:strategyqa]", "data.metric={summaries: rougeLsum}"])
    assert cfg.data.metric == {"summaries": "rougeLsum"}
    with pytest.raises(ConfigError, match=r"data.metric: task 'summaries' has unknown metric 'bleurt'"):
        load_config(None, ["data.tasks=[bigbench:strategyqa]", "data.metric={summaries: bleurt}"])


def test_recipe_refuses_rouge_on_a_choice_file_before_training(tmp_path) -> None:
    from asymlora.recipes.multitask import load_tasks_for

    data = tmp_path / "quiz.jsonl"
    rows = [{"input": f"q{i}", "options": ["yes", "no"], "target": "yes"} for i in range(5)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = load_config(None, [f"data.tasks=[jsonl:{data}]", "data.metric={quiz: rouge}"])
    with pytest.raises(DataError, match=r"task 'quiz' is a choice task"):
        load_tasks_for(cfg)


# --------------------------------------------------------------------------- tables and plots


ROWS = {
    "base": {"quiz": {"accuracy": 0.5}, "gem": {"exact_match": 0.0, "rougeLsum": 0.2}, "sum": {"bleu": 0.1}},
    "alora": {
        "quiz": {"accuracy": 0.7},
        "gem": {"exact_match": 0.0, "rougeLsum": 0.53},
        "sum": {"bleu": 0.3},
    },
}
PRIMARY = {"quiz": "accuracy", "gem": "rougeLsum", "sum": "bleu"}


def test_summary_labels_mixed_metrics_and_gives_per_metric_means() -> None:
    summary = summarize(ROWS["alora"], PRIMARY, metric_notes={"sum": "declared bleurt"})
    assert summary["average"] == pytest.approx((0.7 + 0.53 + 0.3) / 3)  # not pulled down by exact match 0
    assert summary["average_of"] == MIXED
    assert summary["per_metric"] == {
        "accuracy": {"average": pytest.approx(0.7), "tasks": ["quiz"]},
        "rougeLsum": {"average": pytest.approx(0.53), "tasks": ["gem"]},
        "bleu": {"average": pytest.approx(0.3), "tasks": ["sum"]},
    }
    assert summary["metric_notes"] == {"sum": "declared bleurt"} and "declared bleurt" in summary["notes"]
    same = summarize({"a": {"accuracy": 0.2}, "b": {"accuracy": 0.4}}, {})
    assert same["average_of"] == "mean accuracy" and list(same["per_metric"]) == ["accuracy"]


def test_table_names_each_metric_and_the_mixed_average(tmp_path) -> None:
    table = format_table(ROWS, PRIMARY, ["quiz", "gem", "sum"], metric_notes={"sum": "declared bleurt"})
    lines = table.splitlines()
    assert (
        lines[0]
        == "| method | quiz (accuracy) | gem (rougeLsum) | sum (bleu) | mean of mixed metrics | std | worst | Δm% |"
    )
    assert lines[3].startswith("| alora | 0.700 | 0.530 | 0.300 | 0.510 |")
    per_metric = lines.index("| method | accuracy (1 task) | rougeLsum (1 task) | bleu (1 task) |")
    assert lines[per_metric + 3] == "| alora | 0.700 | 0.530 | 0.300 |"
    assert "Note: declared bleurt" in table
    single = format_table({"m": {"quiz": {"accuracy": 0.5}}}, PRIMARY, ["quiz"])
    assert single.splitlines()[0].startswith("| method | quiz (accuracy) | average (accuracy) |")
    assert "Per-metric" not in single
    path = plot_results(ROWS, PRIMARY, tmp_path / "chart.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_metric_notes_of_tasks() -> None:
    noted = Task("n", "generate", [], [], ["bleu"], metric_note="declares bleurt")
    assert metric_notes([noted, _gen_task()]) == {"n": "declares bleurt"}


# --------------------------------------------------------------------------- real BIG-bench tasks


@pytest.mark.slow
def test_bigbench_free_text_tasks_get_their_declared_metric() -> None:
    """gem/common_gen declares preferred_score rougeLsum (metrics bleu, rouge); few_shot_nlg declares
    bleurt, which is not computed, and says so; the demo's four tasks keep accuracy / exact match."""
    from asymlora.data import load_tasks

    names = ["gem/common_gen", "few_shot_nlg", "multiemo/hotels_sentence_en", "arithmetic/2_digit_addition"]
    common_gen, few_shot, hotels, addition = load_tasks(
        [f"bigbench:{n}" for n in names], max_train=4, max_test=4
    )
    assert common_gen.kind == "generate" and primary_metric(common_gen) == "rougeLsum"
    assert common_gen.metric_note is None and {"bleu", "rouge"} <= set(common_gen.metrics)
    assert len(common_gen.test[0].references) > 1  # several reference sentences per concept set
    assert primary_metric(few_shot) == "bleu" and "'bleurt'" in few_shot.metric_note
    assert primary_metric(hotels) == "accuracy" and primary_metric(addition) == "exact_match"
