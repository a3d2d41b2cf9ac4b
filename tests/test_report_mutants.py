"""`asymlora.eval.report` and `asymlora.recipes.groups` against values worked out by hand (mutation tests).

These two modules turn a campaign's ledger into the published numbers: per-task primary values, the average,
population std, worst task and Δm% of each run, the per-metric means and tables (`eval/report.py`), and the
seed groups, paired tests over seeds, Holm lines, t-tests over seeds and "what would resolve it" lines of the
sweep reports (`recipes/groups.py`). Every expected value below is worked out in the comments (or comes from
scipy where a power computation is involved), never from the code under test. docs/testing.md, "Mutation
results: `recipes/groups.py` and `eval/report.py`", lists what they kill.
"""

from __future__ import annotations

import hashlib
import logging
import math

import pytest
from scipy.stats import nct
from scipy.stats import t as student

from asymlora.eval import report, stats
from asymlora.eval.report import (
    MIXED,
    average_label,
    column_metrics,
    delta_m,
    format_table,
    markdown_table,
    per_metric_means,
    primary_values,
    summarize,
)
from asymlora.recipes import groups
from asymlora.recipes.groups import SeedGroup, config_key, latest_per_cell, paired_over_seeds

EXACT = {"rel": 1e-12, "abs": 1e-12}


SEED_TEST_HEADER = (
    "The average's difference over seeds (pairs with 3 seeds or more): a one-sample t-test of the per-seed "
    "differences, 95% t interval (scipy's `ttest_1samp`, `asymlora.eval.stats.seed_test`). The table's tests "
    "hold the seeds fixed and sample test examples; this one samples seeds, so it says whether a difference "
    "would recur at other seeds:"
)
"""The header of the report's seed-test lines, written out (the text a reader sees)."""


# --------------------------------------------------------------------------- eval/report.py


def test_primary_of_picks_the_declared_then_accuracy_then_exact_match() -> None:
    metrics = {"accuracy": 0.25, "exact_match": 0.5, "rougeL": 0.75, "rouge1": 0.125}
    # declared: "rouge" means rougeL (`primary_metric`), declared wins over accuracy
    assert report._primary_of("t", metrics, {"t": "rouge"}) == "rougeL"
    assert report._primary_of("t", metrics, {"t": "exact_match"}) == "exact_match"
    # not declared: accuracy before exact_match, exact_match when there is no accuracy
    assert report._primary_of("t", metrics, {"other": "rouge"}) == "accuracy"
    assert report._primary_of("t", {"exact_match": 0.5, "rougeL": 0.75}, {}) == "exact_match"
    with pytest.raises(ValueError) as err:
        report._primary_of("t", {"rougeL": 0.75, "bleu": 0.1}, {})
    assert str(err.value) == "no primary metric given for task 't' (metrics: ['bleu', 'rougeL'])"
    with pytest.raises(ValueError) as err:
        report._primary_of("t", {"rougeL": 0.75, "accuracy": 0.1}, {"t": "exact_match"})
    assert (
        str(err.value)
        == "task 't': primary metric 'exact_match' is not among its results ['accuracy', 'rougeL']"
    )


def test_primary_values_in_task_order_as_floats() -> None:
    per_task = {"b": {"exact_match": 1, "accuracy": 0}, "a": {"rougeL": 0.5}}
    values = primary_values(per_task, {"a": "rouge"})
    # b: accuracy (0, an int, given as the float 0.0); a: rougeL
    assert list(values.items()) == [("b", 0.0), ("a", 0.5)]
    assert all(type(v) is float for v in values.values())


def test_average_label() -> None:
    assert average_label(["accuracy", "accuracy", "accuracy"]) == "mean accuracy"
    assert average_label(iter(["exact_match"])) == "mean exact_match"
    assert average_label(["accuracy", "exact_match", "accuracy"]) == MIXED == "mean of mixed metrics"


def test_per_metric_means_by_hand() -> None:
    values = {"a": 0.2, "b": 0.5, "c": 0.9, "d": 0.25}
    names = {"a": "accuracy", "b": "rougeL", "c": "accuracy", "d": "rougeL"}
    # accuracy: (0.2 + 0.9) / 2 = 0.55 over a, c; rougeL: (0.5 + 0.25) / 2 = 0.375 over b, d
    means = per_metric_means(values, names)
    assert list(means) == ["accuracy", "rougeL"]
    assert means["accuracy"]["tasks"] == ["a", "c"] and means["rougeL"]["tasks"] == ["b", "d"]
    assert means["accuracy"]["average"] == pytest.approx(0.55, **EXACT)
    assert means["rougeL"]["average"] == pytest.approx(0.375, **EXACT)
    assert per_metric_means({"x": 0.125}, {"x": "bleu"}) == {"bleu": {"average": 0.125, "tasks": ["x"]}}


def test_delta_m_by_hand(caplog: pytest.LogCaptureFixture) -> None:
    """Δm% = mean over tasks of (single − multi) / single × 100 over the tasks with a usable baseline."""
    # one task: (0.5 − 0.4) / 0.5 × 100 = 20 (not (0.5 − 0.4) / 0.4 × 100 = 25, nor the fraction 0.2)
    assert delta_m({"a": 0.4}, {"a": 0.5})[0] == pytest.approx(20.0, **EXACT)
    # a: 20; b: (0.8 − 0.9) / 0.8 × 100 = −12.5; mean (20 − 12.5) / 2 = 3.75
    assert delta_m({"a": 0.4, "b": 0.9}, {"a": 0.5, "b": 0.8}) == (pytest.approx(3.75, **EXACT), [])
    # an int baseline is a number like any other: (2 − 1) / 2 × 100 = 50
    assert delta_m({"a": 1.0}, {"a": 2}) == (pytest.approx(50.0, **EXACT), [])
    values = {"c": 0.3, "a": 0.4, "d": 0.5, "e": 0.7, "b": 0.9, "f": 0.2, "g": 0.1, "h": 0.6}
    baselines = {"a": 0.5, "b": 0.8, "c": None, "d": 0.0, "f": math.inf, "g": math.nan, "h": 0}
    caplog.set_level(logging.WARNING, logger="asymlora.eval.report")
    dm, notes = delta_m(values, baselines)
    # only a and b count (the same 3.75); e has no baseline, c's is None, d's and h's 0, f's and g's not finite
    assert dm == pytest.approx(3.75, **EXACT)
    assert notes == [
        "Δm%: no single-task baseline for task 'c'; left out",
        "Δm%: single-task baseline of task 'd' is 0.0; left out",
        "Δm%: no single-task baseline for task 'e'; left out",
        "Δm%: single-task baseline of task 'f' is inf; left out",
        "Δm%: single-task baseline of task 'g' is nan; left out",
        "Δm%: single-task baseline of task 'h' is 0.0; left out",
    ]
    logged = [(r.name, r.levelno, r.getMessage()) for r in caplog.records]
    assert logged == [("asymlora.eval.report", logging.WARNING, note) for note in notes]
    # no usable baseline: None, with the notes; no baselines at all: None and no note
    assert delta_m({"a": 0.4, "b": 0.1}, {"a": 0.0, "c": 1.0}) == (
        None,
        [
            "Δm%: single-task baseline of task 'a' is 0.0; left out",
            "Δm%: no single-task baseline for task 'b'; left out",
        ],
    )
    assert delta_m({"a": 0.4}, None) == (None, [])
    assert delta_m({"a": 0.4}, {}) == (None, [])


def test_summarize_by_hand() -> None:
    per_task = {
        "t1": {"accuracy": 0.5, "exact_match": 0.125},  # accuracy before exact_match: 0.5
        "t2": {"exact_match": 0.25, "n": 4.0},  # exact_match: 0.25
        "t3": {"rougeLsum": 0.75, "accuracy": 0.875},  # declared rougeLsum: 0.75
    }
    summary = summarize(
        per_task,
        {"t3": "rougeLsum"},
        {"t1": 0.625, "t2": 0.25, "t3": 0.5},
        metric_notes={"t2": "declared bleu, scored exact_match", "t9": "not a task of this run"},
    )
    # mean (0.5 + 0.25 + 0.75) / 3 = 0.5; population std sqrt((0 + 0.0625 + 0.0625) / 3) = sqrt(1/24)
    # (the sample std, ddof 1, would be 0.25); worst t2 = 0.25
    assert summary["average"] == pytest.approx(0.5, **EXACT)
    assert summary["std"] == pytest.approx(math.sqrt(1 / 24), **EXACT)
    assert summary["std_ddof"] == 0
    assert summary["worst"] == {"task": "t2", "value": 0.25}
    # Δm%: t1 (0.625 − 0.5) / 0.625 = 20, t2 0, t3 (0.5 − 0.75) / 0.5 = −50 → mean −10
    assert summary["delta_m"] == pytest.approx(-10.0, **EXACT)
    assert summary["average_of"] == MIXED
    assert summary["primary"] == {"t1": "accuracy", "t2": "exact_match", "t3": "rougeLsum"}
    assert summary["per_metric"] == {
        "accuracy": {"average": 0.5, "tasks": ["t1"]},
        "exact_match": {"average": 0.25, "tasks": ["t2"]},
        "rougeLsum": {"average": 0.75, "tasks": ["t3"]},
    }
    assert summary["metric_notes"] == {"t2": "declared bleu, scored exact_match"}
    assert summary["notes"] == ["declared bleu, scored exact_match"]
    # notes: the declared ones first, then Δm%'s; one metric: "mean accuracy"; a tie: the first task is the worst
    tied = summarize(
        {"a": {"accuracy": 0.5}, "b": {"accuracy": 0.5}}, {}, {"b": 1.0}, metric_notes={"a": "n"}
    )
    assert tied["notes"] == ["n", "Δm%: no single-task baseline for task 'a'; left out"]
    assert tied["average_of"] == "mean accuracy" and tied["worst"] == {"task": "a", "value": 0.5}
    assert tied["delta_m"] == pytest.approx(50.0, **EXACT) and tied["std"] == 0.0
    assert summarize({"a": {"accuracy": 1}}, {})["metric_notes"] == {}
    with pytest.raises(ValueError) as err:
        summarize({}, {})
    assert str(err.value) == "summarize needs at least one task result"


def test_markdown_table_alignment_and_message() -> None:
    assert markdown_table(["m", "x", "y"], [["a", "1", "2"], ["b", "3", "4"]]) == [
        "| m | x | y |",
        "|---|---:|---:|",
        "| a | 1 | 2 |",
        "| b | 3 | 4 |",
    ]
    assert markdown_table(["only"], []) == ["| only |", "|---|"]
    with pytest.raises(ValueError) as err:
        markdown_table(["m", "x", "y"], [["a", "1", "2"], ["b"]])
    assert str(err.value) == "a table row has 1 cells for 3 columns: ['b']"


def test_column_metrics_declared_then_first_row_with_the_task_then_auto() -> None:
    rows = {
        "a": {"t": {}},
        "b": {"t": {"exact_match": 1.0}, "u": {"accuracy": 0.5}},
        "c": {"t": {"accuracy": 1}},
    }
    # t: a's entry is empty, so b's (the first with metrics) decides: exact_match; u: declared "rouge" → rougeL
    # (b has no rougeL: the declared name is shown all the same); v: no row has it and none declared: auto
    assert column_metrics(rows, {"u": "rouge"}, ["t", "u", "v"]) == {
        "t": "exact_match",
        "u": "rougeL",
        "v": "auto",
    }


def test_with_interval_only_for_the_same_value() -> None:
    iv = {"value": 0.5, "low": 0.25, "high": 0.75}
    assert report._with_interval(0.5, iv) == "0.500 [0.250, 0.750]"
    assert report._with_interval(0.5 + 5e-10, iv) == "0.500 [0.250, 0.750]"  # within 1e-9
    assert report._with_interval(0.5 + 2e-9, iv) == "0.500"  # another value: bare
    assert report._with_interval(0.5, iv, 1) == "0.5 [0.2, 0.8]"
    assert report._with_interval(0.5, None) == "0.500"
    assert report._with_interval(0.5, {}) == "0.500"
    assert report._with_interval(None, iv) == "–"
    assert report._with_interval(0.5, {"value": 0.5}) == "0.500"  # no bounds: the bare value
    assert report._fmt(None) == "–" and report._fmt(0.12345) == "0.123" and report._fmt(0.16, 1) == "0.2"


MIXED_ROWS = {
    "lora": {
        "t1": {"accuracy": 0.5},
        "t2": {"rougeLsum": 0.25},
        "t3": {"accuracy": 0.75, "exact_match": 0.0},
    },
    "base": {"t1": {"accuracy": 0.75}},
    "alora": {"t1": {"accuracy": 0.5}, "t9": {"accuracy": 0.125}},  # t9: not a column
    "none": {"t9": {"accuracy": 0.125}},  # no column at all
}
BASELINES = {"t1": 0.625, "t2": 0.5, "t3": 0.75}
INTERVALS = {
    "lora": {
        "per_task": {
            "t1": {"value": 0.5, "low": 0.25, "high": 0.75},
            "t2": {"value": 0.3, "low": 0.1, "high": 0.5},
        },
        "average": {"value": 0.5, "low": 0.4, "high": 0.6},
        "delta_m": {"value": 70 / 3, "low": 10.0, "high": 30.0},
    },
    # alora's run has a task (t9) outside the columns: its run intervals are not those of the row's summary
    "alora": {
        "average": {"value": 0.5, "low": 0.1, "high": 0.9},
        "delta_m": {"value": 20.0, "low": 1.0, "high": 2.0},
    },
}


def test_format_table_mixed_metrics_by_hand() -> None:
    """lora: 0.5, 0.25, 0.75 → mean 0.5, population std sqrt(1/24) = 0.204, worst t2, Δm% (20 + 50 + 0) / 3 =
    23.3 (t1 (0.625 − 0.5) / 0.625, t2 (0.5 − 0.25) / 0.5, t3 0); base: t1 only, Δm% (0.625 − 0.75) / 0.625 =
    −20; alora: t1 only among the columns, Δm% 20; none: no column. Per-metric: lora accuracy (0.5 + 0.75) / 2."""
    table = format_table(
        MIXED_ROWS,
        {"t2": "rougeLsum"},
        ["t1", "t2", "t3", "t4"],
        BASELINES,
        metric_notes={"t2": "declared bleu, scored rougeLsum", "t9": "not a column"},
        intervals=INTERVALS,
    )
    assert table.splitlines() == [
        "| method | t1 (accuracy) | t2 (rougeLsum) | t3 (accuracy) | t4 (auto) | mean of mixed metrics | std | worst | Δm% |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        "| lora | 0.500 [0.250, 0.750] | 0.250 | 0.750 | – | 0.500 [0.400, 0.600] | 0.204 | 0.250 (t2) | 23.3 [10.0, 30.0] |",
        "| base | 0.750 | – | – | – | 0.750 | 0.000 | 0.750 (t1) | -20.0 |",
        "| alora | 0.500 | – | – | – | 0.500 | 0.000 | 0.500 (t1) | 20.0 |",
        "| none | – | – | – | – | – | – | – | – |",
        "",
        "Per-metric averages (mean over the tasks scored by each metric):",
        "",
        "| method | accuracy (2 tasks) | rougeLsum (1 task) |",
        "|---|---:|---:|",
        "| lora | 0.625 | 0.250 |",
        "| base | 0.750 | – |",
        "| alora | 0.500 | – |",
        "| none | – | – |",
        "",
        "Each task column shows the task's primary metric (fractions 0–1). average / std (population) / "
        "worst: over the tasks. Δm%: mean relative drop against the single-task baselines, in percent; "
        "lower is better.",
        "[low, high]: 95 % interval (Wilson for accuracy / exact match, bootstrap over examples "
        "otherwise; stratified bootstrap for the average and Δm%).",
        "Note: declared bleu, scored rougeLsum",
    ]


def test_format_table_one_metric_without_baselines_or_intervals() -> None:
    rows = {"lora": {"a": {"accuracy": 0.5}, "b": {"accuracy": 0.25}}}
    # one metric: "average (accuracy)", no per-metric table, no interval line; no baselines: Δm% "–"
    assert format_table(rows, {}, ["a", "b"]).splitlines() == [
        "| method | a (accuracy) | b (accuracy) | average (accuracy) | std | worst | Δm% |",
        "|---|---:|---:|---:|---:|---:|---:|",
        "| lora | 0.500 | 0.250 | 0.375 | 0.125 | 0.250 (b) | – |",
        "",
        "Each task column shows the task's primary metric (fractions 0–1). average / std (population) / "
        "worst: over the tasks. Δm%: mean relative drop against the single-task baselines, in percent; "
        "lower is better.",
    ]
    with pytest.raises(ValueError) as err:
        format_table({}, {}, ["a"])
    assert str(err.value) == "format_table needs at least one row"


def test_per_metric_table_counts_and_auto() -> None:
    summaries = {"m": {"per_metric": {"bleu": {"average": 0.125}}}, "n": None}
    lines = report._per_metric_table(summaries, {"a": "bleu", "b": "auto", "c": "rougeL", "d": "bleu"})
    assert lines == [
        "Per-metric averages (mean over the tasks scored by each metric):",
        "",
        "| method | bleu (2 tasks) | rougeL (1 task) |",
        "|---|---:|---:|",
        "| m | 0.125 | – |",
        "| n | – | – |",
    ]


# --------------------------------------------------------------------------- recipes/groups.py


def t_test_sample_size(effect: float, power: float = 0.8, alpha: float = 0.05) -> int:
    """The smallest n ≥ 2 at which a two-sided one-sample t-test at level ``alpha`` reaches ``power`` for a
    standardised effect: P(T > c) + P(T < −c), T noncentral t (n − 1 df, noncentrality effect·√n), from scipy."""
    n = 2
    while True:
        crit = student.ppf(1 - alpha / 2, n - 1)
        if nct.sf(crit, n - 1, effect * math.sqrt(n)) + nct.cdf(-crit, n - 1, effect * math.sqrt(n)) >= power:
            return n
        n += 1


def record(seed: int, **units: list[float] | None) -> dict:
    """A ledger record: per unit ``{"keys": <the unit's example hash>, "scores": [...]}``; None: no scores."""
    return {
        "seed": seed,
        "rows": {u: None if s is None else {"keys": f"k-{u}", "scores": s} for u, s in units.items()},
    }


def rows(rec: dict, unit: str):
    return rec["rows"].get(unit)


def test_seed_group_config_key_and_latest_per_cell() -> None:
    group = SeedGroup("g", [{"seed": 0, "v": "a"}, {"seed": 2, "v": "b"}, {"seed": 5, "v": "c"}])
    assert group.seeds == [0, 2, 5]
    assert group.by_seed(2) == {"seed": 2, "v": "b"} and group.by_seed(5)["v"] == "c"
    # sha256 of the sorted-key JSON, by hand: '{"a": 1, "b": [2, 3]}', 8 hex digits
    assert config_key({"b": [2, 3], "a": 1}) == hashlib.sha256(b'{"a": 1, "b": [2, 3]}').hexdigest()[:8]
    assert len(config_key({})) == 8 and config_key({}) == hashlib.sha256(b"{}").hexdigest()[:8]
    recs = [
        {"c": "x", "n": 1},
        {"c": "y", "n": 2},
        {"c": "x", "n": 3},
        {"c": "z", "n": 4},
        {"c": "y", "n": 5},
    ]
    # one per cell, the last recorded, in the order of each cell's first record: x (3), y (5), z (4)
    assert [r["n"] for r in latest_per_cell(recs, lambda r: r["c"])] == [3, 5, 4]


# Three seeds of A and B on unit x (2 examples) and y (4 examples), scores 0/1:
#   x: A [1, 1] at every seed; B [1, 0], [0, 1], [0, 0]  → per seed mean(A) − mean(B) = 0.5, 0.5, 1
#   y: A [1, 1, 0, 0], [0, 1, 1, 1], [1, 0, 1, 1]; B [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1] → 0, 0.5, 0.5
# the average's per-seed differences: (0.5 + 0)/2, (0.5 + 0.5)/2, (1 + 0.5)/2 = 0.25, 0.5, 0.75.
# Each example averaged over the seeds: x A (1, 1), B (1/3, 1/3); y A 2/3 and B 1/3 on every example.
A3 = SeedGroup("A", [record(0, x=[1, 1], y=[1, 1, 0, 0]), record(1, x=[1, 1], y=[0, 1, 1, 1]),
                     record(2, x=[1, 1], y=[1, 0, 1, 1])])  # fmt: skip
B3 = SeedGroup("B", [record(0, x=[1, 0], y=[1, 1, 0, 0]), record(1, x=[0, 1], y=[0, 0, 1, 0]),
                     record(2, x=[0, 0], y=[0, 0, 0, 1])])  # fmt: skip


def test_paired_over_three_seeds_by_hand() -> None:
    result = paired_over_seeds(A3, B3, ["x", "y"], rows)
    assert isinstance(result, dict)
    assert result["seeds"] == [0, 1, 2] and result["left_out"] == []
    tests = result["tests"]
    # x: differences (2/3, 2/3), one size: the sign test, both positive, p = 2/2² = 0.5
    assert tests["x"]["difference"] == pytest.approx(2 / 3, **EXACT) and tests["x"][
        "p_value"
    ] == pytest.approx(0.5)
    # y: differences 1/3 on all 4 examples: p = 2/2⁴ = 0.125
    assert tests["y"]["difference"] == pytest.approx(1 / 3, **EXACT) and tests["y"][
        "p_value"
    ] == pytest.approx(0.125)
    assert tests["x"]["n"] == 2 and tests["y"]["n"] == 4
    # the average: weighted differences 1/6, 1/6 (x, weight 1/(2·2)) and 1/24 × 4 (y, weight 1/(2·4)), sum 1/2;
    # of the 2⁶ sign flips only all-plus and all-minus reach |1/2|: p = 2/64
    avg = tests["average"]
    assert avg["difference"] == pytest.approx(0.5, **EXACT) and avg["p_value"] == pytest.approx(2 / 64)
    assert avg["n"] == 6 and "p_holm" not in avg
    # Holm over x, y: sorted 0.125 → 2 × 0.125 = 0.25; 0.5 → max(0.25, 1 × 0.5) = 0.5
    assert tests["y"]["p_holm"] == pytest.approx(0.25) and tests["x"]["p_holm"] == pytest.approx(0.5)
    resolve = result["resolve"]
    assert resolve["per_seed_differences"] == pytest.approx([0.25, 0.5, 0.75], **EXACT)
    assert resolve["seeds_now"] == 3 and resolve["examples_now"] == 2  # the smallest unit: x
    # every paired difference of a unit is the same (2/3 on x, 1/3 on y): no spread to size examples by
    assert resolve["examples_per_unit"] is None
    # seeds: effect = mean / sd = 0.5 / 0.25 = 2
    assert resolve["seeds"] == t_test_sample_size(2.0)
    # t over seeds: t = 0.5 / (0.25/√3) = 2√3; at 2 df, two-sided p = 1 − t/√(2 + t²) = 1 − 2√3/√14; the 95 %
    # interval 0.5 ± q·0.25/√3 with q = (2u − 1)/√(2u(1 − u)) at u = 0.975 (the t quantile at 2 df)
    seed = resolve["seed_test"]
    t = 2 * math.sqrt(3)
    q = 0.95 / math.sqrt(2 * 0.975 * 0.025)
    assert seed["t"] == pytest.approx(t, rel=1e-9) and seed["seeds"] == 3
    assert seed["p_value"] == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-9)
    assert seed["difference"] == pytest.approx(0.5, **EXACT)
    assert seed["low"] == pytest.approx(0.5 - q * 0.25 / math.sqrt(3), rel=1e-9)
    assert seed["high"] == pytest.approx(0.5 + q * 0.25 / math.sqrt(3), rel=1e-9)
    # B against A: every difference changes sign, the p-values stay
    back = paired_over_seeds(B3, A3, ["x", "y"], rows)
    assert isinstance(back, dict)
    assert back["tests"]["average"]["difference"] == pytest.approx(-0.5, **EXACT)
    assert back["resolve"]["per_seed_differences"] == pytest.approx([-0.25, -0.5, -0.75], **EXACT)


def test_paired_over_the_common_seeds_with_a_corpus_level_unit() -> None:
    """A has seeds 0, 1, 2 and B 0, 2, 3: the common seeds are 0 and 2, in A's order. z has no per-example scores
    (corpus BLEU): left out, the average is x's alone.
    x: A [1, 0, 1, 0], [1, 1, 0, 0]; B [0, 0, 1, 1], [0, 1, 0, 0] → per seed 0.5 − 0.5 = 0 and 0.5 − 0.25 = 0.25;
    averaged over the seeds A (1, 0.5, 0.5, 0), B (0, 0.5, 0.5, 0.5): differences (1, 0, 0, −0.5), mean 1/8;
    the two non-zero ones flip 4 ways, sums ±0.5, ±1.5, all reaching |0.5|: p = 1."""
    a = SeedGroup("A", [record(2, x=[1, 1, 0, 0], z=None), record(0, x=[1, 0, 1, 0], z=None),
                        record(1, x=[9, 9, 9, 9], z=None)])  # fmt: skip
    b = SeedGroup("B", [record(0, x=[0, 0, 1, 1], z=None), record(2, x=[0, 1, 0, 0], z=None),
                        record(3, x=[9, 9, 9, 9], z=None)])  # fmt: skip
    result = paired_over_seeds(a, b, ["x", "z"], rows)
    assert isinstance(result, dict)
    assert result["seeds"] == [2, 0] and result["left_out"] == ["z"]
    assert set(result["tests"]) == {"x", "average"}
    for name in ("x", "average"):
        assert result["tests"][name]["difference"] == pytest.approx(0.125, **EXACT)
        assert result["tests"][name]["p_value"] == 1.0
    assert result["tests"]["x"]["p_holm"] == 1.0
    resolve = result["resolve"]
    assert resolve["per_seed_differences"] == pytest.approx([0.25, 0.0], **EXACT)  # seeds 2, 0
    assert resolve["seeds_now"] == 2 and resolve["examples_now"] == 4 and resolve["seed_test"] is None
    # seeds: mean 0.125, sd (ddof 1) √((0.125² + 0.125²)/1) = 0.125·√2: effect 1/√2
    assert resolve["seeds"] == t_test_sample_size(1 / math.sqrt(2))
    # examples: differences (1, 0, 0, −0.5): mean 1/8, deviations 7/8, −1/8, −1/8, −5/8, Σ² = 19/16, variance
    # 19/48 (ddof 1); effect (1/8)/√(19/48)
    assert resolve["examples_per_unit"] == t_test_sample_size(0.125 / math.sqrt(19 / 48))


def test_paired_over_seeds_per_seed_averages_weigh_each_unit_once() -> None:
    """Two seeds, x (1 example) and y (3 examples) of unequal scores (not 0/1):
    seed 0: x 0.5 − 0.25 = 0.25, y mean(0.9, 0.6, 0.3) − mean(0.3, 0.3, 0.3) = 0.3 → (0.25 + 0.3)/2 = 0.275
    seed 1: x 1.0 − 0.0 = 1.0,   y mean(0.6, 0.6, 0.6) − mean(0.0, 0.3, 0.0) = 0.5 → 0.75
    the examples averaged over the seeds: x A 0.75, B 0.125; y A (0.75, 0.6, 0.45), B (0.15, 0.3, 0.15)."""
    a = SeedGroup("A", [record(0, x=[0.5], y=[0.9, 0.6, 0.3]), record(1, x=[1.0], y=[0.6, 0.6, 0.6])])
    b = SeedGroup("B", [record(0, x=[0.25], y=[0.3, 0.3, 0.3]), record(1, x=[0.0], y=[0.0, 0.3, 0.0])])
    result = paired_over_seeds(a, b, ["x", "y"], rows)
    assert isinstance(result, dict)
    assert result["resolve"]["per_seed_differences"] == pytest.approx([0.275, 0.75], **EXACT)
    assert result["resolve"]["examples_now"] == 1 and result["resolve"]["seeds_now"] == 2
    # x: 0.75 − 0.125; y: mean(0.6, 0.3, 0.3) = 0.4; the average (0.625 + 0.4)/2 = 0.5125
    assert result["tests"]["x"]["difference"] == pytest.approx(0.625, **EXACT)
    assert result["tests"]["y"]["difference"] == pytest.approx(0.4, **EXACT)
    assert result["tests"]["average"]["difference"] == pytest.approx(0.5125, **EXACT)


def test_paired_over_seeds_says_why_not() -> None:
    a = SeedGroup("A", [record(0, x=[1, 0]), record(1, x=[1, 1])])
    assert paired_over_seeds(a, SeedGroup("B", [record(2, x=[1, 0])]), ["x"], rows) == (
        "no seed in common (seeds [0, 1] and [2])"
    )
    # x has scores at seed 0 only: the records of seeds [0, 1] disagree
    some = SeedGroup("B", [record(0, x=[0, 0]), record(1, x=None)])
    assert (
        paired_over_seeds(a, some, ["x"], rows)
        == "x: per-example scores in some of the records of seeds [0, 1] only"
    )
    assert (
        paired_over_seeds(some, a, ["x"], rows)
        == "x: per-example scores in some of the records of seeds [0, 1] only"
    )
    other = SeedGroup(
        "B", [record(0, x=[0, 0]), {"seed": 1, "rows": {"x": {"keys": "k-other", "scores": [0, 0]}}}]
    )
    assert paired_over_seeds(a, other, ["x"], rows) == (
        "x: scored on other test examples in B seed 1 than in A seed 0 (their example keys differ: another "
        "data.seed, data.max_test or eval.max_examples)"
    )
    corpus = SeedGroup("C", [record(0, z=None, w=None)])
    assert paired_over_seeds(corpus, corpus, ["z", "w"], rows) == (
        "no per-example scores to pair (z, w: corpus-level metrics such as BLEU)"
    )
    # the first unit that cannot be paired is the one named, after the units that can
    mixed = SeedGroup("M", [{"seed": 0, "rows": {"x": {"keys": "k-x", "scores": [1, 0]}, "y": None}}])
    partial = SeedGroup(
        "P",
        [{"seed": 0, "rows": {"x": {"keys": "k-x", "scores": [1, 1]}, "y": {"keys": "k", "scores": [1]}}}],
    )
    assert (
        paired_over_seeds(mixed, partial, ["x", "y"], rows)
        == "y: per-example scores in some of the records of seeds [0] only"
    )


def _test(difference: float, p: float, low: float | None = None, high: float | None = None, **extra) -> dict:
    return {"difference": difference, "low": low, "high": high, "p_value": p, **extra}


ALPHA = 1 - 0.95  # 0.050000000000000044 in floats, as the module computes it


def test_holm_lines_keep_p_holm_strictly_below_alpha() -> None:
    paired = [
        {"a": "A", "b": "B", "tests": {
            "x": _test(0.1234, 0.01, p_holm=0.02),
            "y": _test(-0.05, 0.03, p_holm=ALPHA),  # at alpha: not below it
            "z": _test(-0.3, 0.001, p_holm=0.0499),
            "w": _test(0.01, 0.0, p_holm=0.0),  # 0 is below alpha (not "no p_holm")
            "average": _test(0.2, 0.001),  # no p_holm: the average is one test of its own
        }},
        {"a": "C", "b": "D", "tests": {"x": _test(0.5, 0.2, p_holm=0.4), "average": _test(0.5, 0.2)}},
    ]  # fmt: skip
    assert groups._holm_lines(paired, "client") == [
        "",
        "Per-client differences that hold after Holm's correction over each pair's clients (p_Holm < 0.05: at "
        "most a 5% chance of any false call among a pair's clients):",
        "",
        "- A − B: x +0.123 (p_Holm=0.02), z -0.300 (p_Holm=0.0499), w +0.010 (p_Holm=0)",
        "- C − D: none",
    ]


SEED_TEST_3 = {
    "difference": 0.5,
    "low": -0.12103,
    "high": 1.12103,
    "p_value": 0.07418,
    "t": 3.4641,
    "seeds": 3,
}


def test_seed_test_lines() -> None:
    paired = [
        {
            "a": "A",
            "b": "B",
            "resolve": {"seed_test": SEED_TEST_3, "per_seed_differences": [0.25, 0.5, -0.75]},
        },
        {"a": "C", "b": "D", "resolve": {"seed_test": None, "per_seed_differences": [0.1, 0.2]}},
        {"a": "E", "b": "F"},  # no "resolve" at all
        {"a": "G", "b": "H", "resolve": None},
    ]
    assert groups._seed_test_lines(paired) == [
        "",
        SEED_TEST_HEADER,
        "",
        "- A − B: 0.500 [-0.121, 1.121] (p=0.0742, t = 3.46, 3 seeds); per seed +0.2500, +0.5000, -0.7500",
    ]
    assert groups._seed_test_lines(paired[1:]) == []


def line(diff: float, p: float, **resolve) -> str:
    return groups._resolve_line(
        {"a": "A", "b": "B", "tests": {"average": _test(diff, p)}, "resolve": resolve}, "task"
    )


def test_resolve_line_every_branch() -> None:
    head = "- A − B: +0.1250 (p=0.25)"
    # examples and seeds that would resolve it; thousands separated
    assert line(0.125, 0.25, examples_per_unit=12345, examples_now=4, seeds=9, seeds_now=3) == (
        f"{head}: ≈ 12,345 test examples per task (now 4), or ≈ 9 seeds (now 3)"
    )
    # no more seeds than now: the seeds agree too closely to be taken at face value (at the boundary, equal)
    agree = (
        f"{head}: ≈ 12 test examples per task (now 4), or more seeds (the 3 per-seed differences agree so closely "
        "that, taken at face value, 3 seeds would do, but so few seeds size their spread only roughly)"
    )
    assert line(0.125, 0.25, examples_per_unit=12, examples_now=4, seeds=3, seeds_now=3) == agree
    assert line(0.125, 0.25, examples_per_unit=12, examples_now=4, seeds=2, seeds_now=3) == agree
    assert line(0.125, 0.25, examples_per_unit=12, examples_now=4, seeds=4, seeds_now=3).endswith(
        "or ≈ 4 seeds (now 3)"
    )
    # no seed count: one seed (or none given) has no spread; two or more gave the same difference
    one = f"{head}: ≈ 12 test examples per task (now 4), or more seeds (their spread needs 2 seeds or more to estimate)"
    assert line(0.125, 0.25, examples_per_unit=12, examples_now=4, seeds=None, seeds_now=1) == one
    assert line(0.125, 0.25, examples_per_unit=12, examples_now=4) == one
    assert line(0.125, 0.25, examples_per_unit=12, examples_now=4, seeds=None, seeds_now=2) == (
        f"{head}: ≈ 12 test examples per task (now 4), or more seeds (the 2 seeds gave the same difference: no "
        "spread to size by)"
    )
    # no example count: no difference (below 1e-12 in size, either sign), too few examples, or no spread
    assert (
        line(-5e-13, 1.0, examples_per_unit=None, examples_now=4)
        == "- A − B: -0.0000 (p=1): no difference to resolve"
    )
    assert line(1e-12, 1.0, examples_per_unit=None, examples_now=1).endswith(": too few test examples per task to "
        "estimate their spread (now 1 in the smallest), so there is none to size a study by: score more test "
        "examples per task")  # fmt: skip
    assert line(-0.5, 0.5, examples_now=0).endswith("(now 0 in the smallest), so there is none "
        "to size a study by: score more test examples per task")  # fmt: skip
    assert line(-0.5, 0.5).endswith("(now None in the smallest), so there is none to size a study by: score more "
        "test examples per task")  # fmt: skip
    assert line(-0.5, 0.5, examples_per_unit=None, examples_now=2) == (
        "- A − B: -0.5000 (p=0.5): every test example differs by the same amount (now 2 per task), so there is no "
        "spread to size a study by: score more test examples per task"
    )


def test_paired_lines_by_hand() -> None:
    paired = [
        {"a": "A", "b": "B", "seeds": [0, 1, 2], "left_out": [],
         "tests": {"x": _test(0.1, 0.01, 0.05, 0.15, p_holm=0.02), "y": _test(-0.25, 0.5, p_holm=0.5),
                   "average": _test(-0.075, 0.04, -0.1, -0.05)},
         "resolve": {"seed_test": SEED_TEST_3, "per_seed_differences": [0.25, 0.5, 0.75]}},
        {"a": "C", "b": "D", "seeds": [1, 4], "left_out": ["z", "w"],
         "tests": {"x": _test(0.2, 1.0, p_holm=1.0), "average": _test(0.2, ALPHA)},
         "resolve": {"examples_per_unit": 1234, "examples_now": 4, "seeds": 9, "seeds_now": 2, "seed_test": None}},
    ]  # fmt: skip
    unpaired = [{"a": "E", "b": "F", "why": "no seed in common (seeds [0] and [1])"}]
    assert groups.paired_lines(paired, ["x", "y", "z"], "Paired tests:", "task", unpaired) == [
        "",
        "Paired tests:",
        "",
        "| A | B | seeds | x | y | z | average |",
        "|---|---|---|---:|---:|---:|---:|",
        "| A | B | 0,1,2 | 0.100 [0.050, 0.150] (p=0.01) | -0.250 (p=0.5) | – | -0.075 [-0.100, -0.050] (p=0.04) |",
        "| C | D | 1,4 | 0.200 (p=1) | – | – | 0.200 (p=0.05) |",
        "",
        "Left out of the paired tests (a task scored by a corpus-level metric such as BLEU has no per-example "
        "scores to pair); the average's test is over the other tasks, so its difference is not the difference of "
        "the averages over every task:",
        "",
        "- C − D: z, w",
        "",
        "Per-task differences that hold after Holm's correction over each pair's tasks (p_Holm < 0.05: at most a "
        "5% chance of any false call among a pair's tasks):",
        "",
        "- A − B: x +0.100 (p_Holm=0.02)",
        "- C − D: none",
        "",
        SEED_TEST_HEADER,
        "",
        "- A − B: 0.500 [-0.121, 1.121] (p=0.0742, t = 3.46, 3 seeds); per seed +0.2500, +0.5000, +0.7500",
        "",
        "Averages the paired test does not resolve (p ≥ 0.05), and what would detect a difference of that size with "
        "80% power (two-sided, from the measured variance; `asymlora.eval.stats.examples_to_resolve`, "
        "`seeds_to_resolve`):",
        "",
        "- C − D: +0.2000 (p=0.05): ≈ 1,234 test examples per task (now 4), or ≈ 9 seeds (now 2)",
        "",
        "No paired test of:",
        "",
        "- E − F: no seed in common (seeds [0] and [1])",
    ]
    # no pair: only the unpaired ones; nothing at all: no line
    assert groups.paired_lines([], ["x"], "Paired tests:", "task", unpaired) == [
        "",
        "No paired test of:",
        "",
        "- E − F: no seed in common (seeds [0] and [1])",
    ]
    assert groups.paired_lines([], ["x"], "Paired tests:", "task") == []
    # every average resolved, nothing left out, fewer than 3 seeds: the table and the Holm lines only
    short = groups.paired_lines([{**paired[1], "left_out": [], "tests": {"x": _test(0.2, 0.01, p_holm=0.01),
                                 "average": _test(0.2, 0.01)}}], ["x"], "Paired:", "client")  # fmt: skip
    assert short == [
        "",
        "Paired:",
        "",
        "| A | B | seeds | x | average |",
        "|---|---|---|---:|---:|",
        "| C | D | 1,4 | 0.200 (p=0.01) | 0.200 (p=0.01) |",
        "",
        "Per-client differences that hold after Holm's correction over each pair's clients (p_Holm < 0.05: at "
        "most a 5% chance of any false call among a pair's clients):",
        "",
        "- C − D: x +0.200 (p_Holm=0.01)",
    ]


def test_seed_mean_averages_each_example_over_the_seeds() -> None:
    # three seeds of two examples: (0 + 0.5 + 1)/3 = 0.5, (1 + 1 + 0.25)/3 = 0.75
    assert groups._seed_mean([[0.0, 1.0], [0.5, 1.0], [1.0, 0.25]]) == pytest.approx([0.5, 0.75], **EXACT)
    with pytest.raises(ValueError):
        groups._seed_mean([[0.0, 1.0], [0.5]])  # not aligned by example


def test_differences_equal_up_to_rounding_have_no_spread() -> None:
    """Fixed defect. Differences that are equal but computed along different float paths have a std of about
    1e-17; taken as a spread it gave a t-test over seeds of t = 1.6e15, p = 4e-31, and "≈ 2 test examples per task
    (now 4)" for a task whose 4 examples all differ by 1/3 (a sign test on 2 examples cannot go below p = 0.5).

    Seeds: A beats B on 5 of 100 examples at each of 3 seeds, on different baselines: 0.55 − 0.50, 0.60 − 0.55,
    0.45 − 0.40, all 0.05 (0.050000000000000044, 0.04999999999999993, 0.04999999999999999 in floats)."""
    a = SeedGroup("A", [record(0, x=[1] * 55 + [0] * 45), record(1, x=[1] * 60 + [0] * 40),
                        record(2, x=[1] * 45 + [0] * 55)])  # fmt: skip
    b = SeedGroup("B", [record(0, x=[1] * 50 + [0] * 50), record(1, x=[1] * 55 + [0] * 45),
                        record(2, x=[1] * 40 + [0] * 60)])  # fmt: skip
    result = paired_over_seeds(a, b, ["x"], rows)
    assert isinstance(result, dict)
    assert result["resolve"]["per_seed_differences"] == pytest.approx([0.05] * 3, **EXACT)
    assert result["resolve"]["seed_test"] is None  # was p = 4.1e-31, t = 1.6e15
    assert result["resolve"]["seeds"] is None  # was 2
    # the examples averaged over the seeds differ by 1/3 on 40..44, 50..54, 55..59, by 0 elsewhere: the sign
    # test on 15 positive differences, p = 2/2¹⁵ (resolved: no resolve line, and no seed test line either)
    assert result["tests"]["average"]["p_value"] == pytest.approx(2 / 2**15)
    assert groups._seed_test_lines([{"a": "A", "b": "B", **result}]) == []


def test_example_differences_equal_up_to_rounding_have_no_spread() -> None:
    """Fixed defect (as above), the examples' side: y (4 examples) averaged over 3 seeds is A (1, 2/3, 2/3, 1/3),
    B (2/3, 1/3, 1/3, 0): every difference is 1/3 (0.33333333333333326 or ...37 in floats), the sign test
    p = 2/2⁴ = 0.125, unresolved."""
    a = SeedGroup("A", [record(0, y=[1, 0, 1, 0]), record(1, y=[1, 1, 1, 0]), record(2, y=[1, 1, 0, 1])])
    b = SeedGroup("B", [record(0, y=[1, 0, 1, 0]), record(1, y=[1, 0, 0, 0]), record(2, y=[0, 1, 0, 0])])
    result = paired_over_seeds(a, b, ["y"], rows)
    assert isinstance(result, dict)
    assert result["resolve"]["examples_per_unit"] is None  # was 2
    assert result["tests"]["average"]["p_value"] == pytest.approx(0.125)
    assert groups.paired_lines([{"a": "A", "b": "B", **result}], ["y"], "Paired:", "task")[-1] == (
        "- A − B: +0.3333 (p=0.125): every test example differs by the same amount (now 4 per task), so there is "
        "no spread to size a study by: score more test examples per task"
    )  # was "≈ 2 test examples per task (now 4), or ≈ 9 seeds (now 3)"


def test_seed_test_lines_go_on_past_a_pair_without_one() -> None:
    paired = [
        {"a": "C", "b": "D", "resolve": {"seed_test": None, "per_seed_differences": [0.1, 0.2]}},
        {
            "a": "A",
            "b": "B",
            "resolve": {"seed_test": SEED_TEST_3, "per_seed_differences": [0.25, 0.5, 0.75]},
        },
    ]
    assert groups._seed_test_lines(paired)[-1] == (
        "- A − B: 0.500 [-0.121, 1.121] (p=0.0742, t = 3.46, 3 seeds); per seed +0.2500, +0.5000, +0.7500"
    )


def test_a_column_of_no_row_does_not_make_the_average_mixed() -> None:
    # b: no row has it and none is declared ("auto"): the average is still over accuracy alone
    table = format_table({"lora": {"a": {"accuracy": 0.5}}}, {}, ["a", "b"]).splitlines()
    assert table[0] == "| method | a (accuracy) | b (auto) | average (accuracy) | std | worst | Δm% |"
    assert table[2] == "| lora | 0.500 | – | 0.500 | 0.000 | 0.500 (a) | – |"
    assert "Per-metric averages (mean over the tasks scored by each metric):" not in table


def test_column_metrics_names_the_task_without_a_primary_metric() -> None:
    with pytest.raises(ValueError) as err:
        column_metrics({"m": {"t": {"rougeL": 0.5}}}, {}, ["t"])
    assert str(err.value) == "no primary metric given for task 't' (metrics: ['rougeL'])"


def test_no_spread_threshold_and_no_difference_boundary() -> None:
    """`stats.NO_SPREAD`: a sample std (ddof 1) at most 1e-9 × the largest |difference| is no spread.
    (1, 1, 1 + e): deviations −e/3, −e/3, 2e/3, Σ² = 2e²/3, so the std is e/√3 with ddof 1 (e·√2/3 with ddof 0,
    e·√(2/3) with ddof 2), against 1e-9 × (1 + e) ≈ 1e-9:
    e = 2e-9 → 1.155e-9 > 1e-9, a spread (ddof 0 would give 0.943e-9, none);
    e = 1.5e-9 → 0.866e-9, none (ddof 2 would give 1.22e-9, a spread). All zeros: std 0 = 1e-9 × 0, none."""
    assert stats.seed_test([1.0, 1.0, 1.0 + 2e-9]) is not None
    assert stats.seed_test([1.0, 1.0, 1.0 + 1.5e-9]) is None
    assert stats.seed_test([0.0, 0.0, 0.0]) is None
    assert stats.seeds_to_resolve([0.0, 0.0]) is None
    # a mean of exactly 1e-12 (2e-12 / 2) is not below NO_DIFFERENCE: sized as any other, std √2·1e-12, effect 1/√2
    assert stats.seeds_to_resolve([0.0, 2e-12]) == t_test_sample_size(1 / math.sqrt(2))
    assert stats.examples_to_resolve({"t": [2e-12, 0.0]}, {"t": [0.0, 0.0]}) == t_test_sample_size(
        1 / math.sqrt(2)
    )


def test_plot_groups_labels_and_heights_by_hand() -> None:
    rows = {
        "lora": {"a": {"accuracy": 0.5}, "b": {"rougeL": 0.25}, "c": {"accuracy": 0.75}},
        "base": {"a": {"accuracy": 1.0}},
        "none": {},
    }
    labels, heights = report._plot_groups(rows, {"b": "rouge"}, ["a", "b", "c"])
    assert labels == ["a\n(accuracy)", "b\n(rougeL)", "c\n(accuracy)", "mean of\nmixed metrics", "mean\naccuracy",
                      "mean\nrougeL"]  # fmt: skip
    # lora: the tasks, their mean (0.5 + 0.25 + 0.75)/3 = 0.5, accuracy (0.5 + 0.75)/2 = 0.625, rougeL 0.25
    assert heights["lora"] == pytest.approx([0.5, 0.25, 0.75, 0.5, 0.625, 0.25], **EXACT)
    # base: a only; no bar (NaN) where it has no value; none: no bar at all
    base = heights["base"]
    assert [base[i] for i in (0, 3, 4)] == [1.0, 1.0, 1.0] and all(math.isnan(base[i]) for i in (1, 2, 5))
    assert len(heights["none"]) == 6 and all(math.isnan(h) for h in heights["none"])
    assert list(heights) == ["lora", "base", "none"]
    labels, heights = report._plot_groups(
        {"m": {"a": {"accuracy": 0.5}, "b": {"accuracy": 0.25}}}, {}, ["a", "b"]
    )
    assert labels == ["a\n(accuracy)", "b\n(accuracy)", "average\n(accuracy)"]
    assert heights == {"m": [0.5, 0.25, 0.375]}


def test_error_bars_by_hand() -> None:
    """yerr = (height − low, high − height) for a task or the average with an interval of that same value,
    clamped at 0; 0 for the per-metric bars, another value, or no bounds."""
    intervals = {
        "per_task": {
            "a": {"value": 0.5, "low": 0.375, "high": 0.75},  # 0.125 below, 0.25 above
            "b": {"value": 0.3, "low": 0.1, "high": 0.5},  # for another value than the bar's 0.25: none
            "c": {"value": 0.5, "low": None, "high": None},  # no bounds
            "d": {"value": 0.5, "low": 0.625, "high": 0.375},  # an interval beside its value: clamped at 0
        },
        "average": {"value": 0.375 + 5e-10, "low": 0.25, "high": 0.625},  # within 1e-9 of 0.375: 0.125, 0.25
    }
    below, above = report._error_bars([0.5, 0.25, 0.5, 0.5, 0.375, 0.9], ["a", "b", "c", "d"], intervals)
    assert below == pytest.approx([0.125, 0.0, 0.0, 0.0, 0.125, 0.0], abs=1e-15)
    assert above == pytest.approx([0.25, 0.0, 0.0, 0.0, 0.25, 0.0], abs=1e-15)
    assert report._error_bars([0.5, 0.5], ["a"], None) == [[0.0, 0.0], [0.0, 0.0]]
    assert report._error_bars([0.5, 0.5], ["a"], {"per_task": None}) == [[0.0, 0.0], [0.0, 0.0]]
    far = {"per_task": {"a": {"value": 0.5 + 2e-9, "low": 0.25, "high": 0.75}}}
    assert report._error_bars([0.5, 0.5], ["a"], far) == [[0.0, 0.0], [0.0, 0.0]]
    # fewer bars than the tasks and the average: a caller's error, refused rather than cut short
    with pytest.raises(ValueError):
        report._error_bars([0.5], ["a"], far)
