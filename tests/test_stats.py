"""Statistics of evaluation scores against values computed by hand or by an independent route."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from asymlora.eval import stats

Z95 = 1.959963984540054  # Φ⁻¹(0.975)


def wilson_by_hand(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval written out (Wilson 1927; Agresti & Coull 1998, eq. 2)."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


@pytest.mark.parametrize(("k", "n"), [(7, 10), (0, 12), (40, 40), (13, 57)])
def test_wilson_interval_matches_the_formula(k, n) -> None:
    low, high = stats.wilson_interval(k, n)
    assert (low, high) == pytest.approx(wilson_by_hand(k, n), abs=1e-12)
    if (k, n) == (7, 10):  # the textbook value
        assert (round(low, 4), round(high, 4)) == (0.3968, 0.8922)


def test_accuracy_gets_wilson_and_rouge_gets_a_bootstrap() -> None:
    acc = stats.metric_interval([1, 1, 0, 1, 1, 0, 1, 1, 0, 1], "accuracy")
    assert acc["method"] == "wilson" and acc["value"] == 0.7 and acc["n"] == 10
    assert (acc["low"], acc["high"]) == pytest.approx(wilson_by_hand(7, 10))
    rouge = stats.metric_interval([0.2, 0.5, 0.3, 0.9], "rougeL")
    assert rouge["method"] == "bootstrap" and rouge["value"] == pytest.approx(0.475)
    assert 0.2 <= rouge["low"] < 0.475 < rouge["high"] <= 0.9
    assert stats.metric_interval([0.4], "rougeL")["low"] is None  # one example: no interval
    with pytest.raises(ValueError, match="finite"):
        stats.metric_interval([0.1, float("nan")], "rougeL")
    with pytest.raises(ValueError, match="successes"):
        stats.wilson_interval(11, 10)


def test_bootstrap_interval_of_a_normal_mean_matches_the_t_interval() -> None:
    x = np.random.default_rng(7).normal(0.3, 2.0, size=3000)
    half = Z95 * x.std(ddof=1) / math.sqrt(x.size)
    low, high = stats.bootstrap_interval(x)
    assert low == pytest.approx(x.mean() - half, abs=0.1 * half)
    assert high == pytest.approx(x.mean() + half, abs=0.1 * half)
    assert stats.bootstrap_interval(x) == (low, high)  # fixed seed: reproducible


def test_stratified_average_interval_has_the_width_of_independent_tasks() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.normal(0.6, 0.2, size=2000), rng.normal(0.3, 0.4, size=1000)
    result = stats.average_interval({"a": a, "b": b})
    # Var((mean_a + mean_b) / 2) = (σa²/na + σb²/nb) / 4
    half = Z95 * math.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size) / 2
    assert result["value"] == pytest.approx((a.mean() + b.mean()) / 2)
    assert result["high"] - result["low"] == pytest.approx(2 * half, rel=0.1)
    assert result["low"] < result["value"] < result["high"]


def test_worst_task_and_std_over_tasks_intervals() -> None:
    rng = np.random.default_rng(9)
    low_task, high_task = rng.normal(0.2, 0.3, 2000), rng.normal(0.8, 0.3, 1000)
    out = stats.run_intervals(
        {
            "lo": [{"scores": {"rougeL": v}} for v in low_task],
            "hi": [{"scores": {"rougeL": v}} for v in high_task],
        },
        {"lo": "rougeL", "hi": "rougeL"},
    )
    assert out["worst"]["value"] == pytest.approx(low_task.mean())
    # the low task is the worst in every resample: the interval is that of its mean
    half = Z95 * low_task.std(ddof=1) / math.sqrt(low_task.size)
    assert (out["worst"]["low"], out["worst"]["high"]) == pytest.approx(
        (low_task.mean() - half, low_task.mean() + half), abs=0.1 * half
    )
    # population std of two means is half their distance
    assert out["std_over_tasks"]["value"] == pytest.approx(abs(high_task.mean() - low_task.mean()) / 2)
    assert out["std_over_tasks"]["low"] < out["std_over_tasks"]["value"] < out["std_over_tasks"]["high"]


def test_delta_m_value_and_interval_with_fixed_and_paired_baselines() -> None:
    multi = {"a": [1, 0, 1, 1], "b": [0.5, 0.25]}
    # by hand: ((0.5 - 0.75) / 0.5 + (0.5 - 0.375) / 0.5) / 2 × 100 = (-50 + 25) / 2 = -12.5
    fixed = stats.delta_m_interval(multi, {"a": 0.5, "b": 0.5})
    assert fixed["value"] == pytest.approx(-12.5) and fixed["tasks"] == ["a", "b"]
    assert fixed["low"] < -12.5 < fixed["high"]
    paired = stats.delta_m_interval(multi, {"a": [0.9, 0.1, 0.8, 0.2], "b": [0.6, 0.4]})
    assert paired["value"] == pytest.approx(-12.5) and paired["low"] < -12.5 < paired["high"]
    # baselines equal to the run example by example: Δm = 0 in every resample
    graded = {"a": [0.2, 0.5, 0.9], "b": [0.3, 0.6]}
    same = stats.delta_m_interval(graded, {k: list(v) for k, v in graded.items()})
    assert same["value"] == same["low"] == same["high"] == 0.0
    assert stats.delta_m_interval(multi, {"c": 0.4}) is None
    with pytest.raises(stats.ExampleMismatchError, match="'a' has 4 scores but 3"):
        stats.delta_m_interval(multi, {"a": [1, 0, 1]})


def test_delta_m_interval_width_matches_the_delta_method() -> None:
    rng = np.random.default_rng(5)
    a, b = rng.normal(0.5, 0.2, 1500), rng.normal(0.4, 0.3, 1500)
    result = stats.delta_m_interval({"a": a, "b": b}, {"a": 0.6, "b": 0.5})
    # Δm = 100 (1 − (ā/0.6 + b̄/0.5)/2): linear in the means
    sd = 100 / 2 * math.sqrt(a.var(ddof=1) / a.size / 0.36 + b.var(ddof=1) / b.size / 0.25)
    assert result["high"] - result["low"] == pytest.approx(2 * Z95 * sd, rel=0.1)


def test_seed_summary_is_mean_and_sample_std() -> None:
    summary = stats.seed_summary([0.5, 0.7, 0.6])
    assert summary["mean"] == pytest.approx(0.6) and summary["std"] == pytest.approx(0.1)  # √(0.02/2)
    assert summary["ddof"] == 1 and summary["values"] == [0.5, 0.7, 0.6] and summary["n_seeds"] == 3
    assert stats.seed_summary([0.4])["std"] is None


def sign_flip_pvalue_by_enumeration(diffs: list[float]) -> float:
    """P(|Σ s_i d_i| ≥ |Σ d_i|) over all 2^n sign vectors s: the exact paired permutation test."""
    observed = abs(sum(diffs))
    hits = sum(
        abs(sum(s * d for s, d in zip(signs, diffs, strict=True))) >= observed - 1e-12
        for signs in itertools.product((1, -1), repeat=len(diffs))
    )
    return hits / 2 ** len(diffs)


def test_paired_permutation_test_matches_exact_enumeration() -> None:
    a = [0.9, 0.4, 0.75, 0.3, 0.8, 0.6, 0.55, 0.2]
    b = [0.5, 0.45, 0.2, 0.1, 0.65, 0.6, 0.3, 0.25]
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    result = stats.paired_test(a, b)
    assert result["difference"] == pytest.approx(sum(diffs) / len(diffs))
    assert result["p_value"] == pytest.approx(sign_flip_pvalue_by_enumeration(diffs))
    assert result["low"] < result["difference"] < result["high"]
    assert stats.paired_test([1, 0, 1], [1, 0, 1])["p_value"] == 1.0


def test_paired_average_test_weights_each_task_by_one_over_its_size() -> None:
    a = {"x": [1, 0, 1, 1], "y": [0.1, 0.2]}
    b = {"x": [0, 0, 1, 0], "y": [0.9, 0.6]}
    # D = (mean(1,0,0,1) + mean(-0.8, -0.4)) / 2 = (0.5 − 0.6) / 2
    result = stats.paired_average_test(a, b)
    assert result["difference"] == pytest.approx(-0.05)
    weighted = [1 / 8, 0, 0, 1 / 8, -0.8 / 4, -0.4 / 4]  # (a − b) / (T · n_task)
    assert result["p_value"] == pytest.approx(sign_flip_pvalue_by_enumeration(weighted))  # 1.0
    unweighted = [1, 0, 0, 1, -0.8, -0.4]  # pooling the examples instead would give 0.75
    assert result["p_value"] != pytest.approx(sign_flip_pvalue_by_enumeration(unweighted))
    with pytest.raises(stats.ExampleMismatchError, match="task 'y': run A has 2 scored examples, run B 3"):
        stats.paired_average_test(a, {**b, "y": [0.5, 0.2, 0.1]})


def test_paired_bootstrap_interval_of_the_difference_matches_the_normal_approximation() -> None:
    rng = np.random.default_rng(11)
    base = rng.uniform(size=800)
    a, b = base + rng.normal(0.05, 0.1, 800), base
    result = stats.paired_test(a, b)
    d = a - b
    half = Z95 * d.std(ddof=1) / math.sqrt(d.size)
    assert result["low"] == pytest.approx(d.mean() - half, abs=0.1 * half)
    assert result["high"] == pytest.approx(d.mean() + half, abs=0.1 * half)
    assert result["p_value"] < 1e-3


def test_compare_examples_checks_the_examples_match() -> None:
    def rows(keys, values):
        return [{"key": k, "scores": {"accuracy": v}} for k, v in zip(keys, values, strict=True)]

    a = {"t": rows("pqrs", [1, 1, 0, 1])}
    b = {"t": rows("pqrs", [0, 1, 0, 0])}
    out = stats.compare_examples(a, b, {"t": "accuracy"})
    assert out["t"]["difference"] == pytest.approx(0.5) and out["t"]["metric"] == "accuracy"
    assert out["average"]["difference"] == pytest.approx(0.5)
    with pytest.raises(
        stats.ExampleMismatchError, match="task 't': run A was scored on 4 examples and run B on 3"
    ):
        stats.compare_examples(a, {"t": rows("pqr", [0, 1, 0])}, {"t": "accuracy"})
    with pytest.raises(stats.ExampleMismatchError, match="share no task"):
        stats.compare_examples(a, {"u": b["t"]}, {"t": "accuracy"})


def test_format_interval() -> None:
    assert stats.format_interval(0.625, 0.47, 0.76) == "0.625 [0.470, 0.760]"
    assert stats.format_interval(0.625) == "0.625" and stats.format_interval(None) == "–"


def test_table_cells_and_bars_show_intervals(tmp_path) -> None:
    from asymlora.eval import format_table, plot_results

    rows = {"alora": {"t": {"accuracy": 0.625, "n": 8.0}, "u": {"exact_match": 0.5, "n": 8.0}}}
    intervals = {"alora": stats.run_intervals(
        {"t": [{"scores": {"accuracy": v}} for v in [1, 1, 1, 1, 1, 0, 0, 0]],
         "u": [{"scores": {"exact_match": v}} for v in [1, 0] * 4]},
        {"t": "accuracy", "u": "exact_match"},
    )}  # fmt: skip
    table = format_table(rows, {"t": "accuracy", "u": "exact_match"}, ["t", "u"], intervals=intervals)
    low, high = wilson_by_hand(5, 8)
    assert f"0.625 [{low:.3f}, {high:.3f}]" in table and "95 % interval" in table
    average = intervals["alora"]["average"]
    assert f"| 0.562 [{average['low']:.3f}, {average['high']:.3f}] |" in table
    plain = format_table(rows, {"t": "accuracy", "u": "exact_match"}, ["t", "u"])
    assert "[" not in plain.split("\n")[2]
    assert (
        plot_results(rows, {"t": "accuracy"}, tmp_path / "bars.png", intervals=intervals).stat().st_size > 0
    )


def test_evaluate_task_returns_each_examples_scores() -> None:
    """Per-example scores of a model that always answers "z" (see tests/test_eval.py), by hand."""
    from tests.conftest import make_char_tokenizer
    from tests.test_eval import steered_model

    from asymlora.data import Example, Task
    from asymlora.eval import evaluate_task

    tok = make_char_tokenizer()
    test = [
        Example(prompt="Question: one?", target="z"),
        Example(prompt="Question: two?", target="The Z."),
        Example(prompt="Question: three?", target="q", references=["q", "z!"]),
        Example(prompt="Question: four?", target="y"),
    ]
    task = Task("z", "generate", train=test[:1], test=test, metrics=["exact_match", "rouge"])
    model = steered_model(tok)
    metrics, rows = evaluate_task(model, tok, task, task_id=None, max_new_tokens=4, with_examples=True)
    assert metrics == evaluate_task(
        model, tok, task, task_id=None, max_new_tokens=4
    )  # unchanged without rows
    assert [r["index"] for r in rows] == [0, 1, 2, 3] and len({r["key"] for r in rows}) == 4
    assert [r["scores"]["exact_match"] for r in rows] == [1.0, 1.0, 1.0, 0.0]
    assert [r["scores"]["rouge1"] for r in rows] == pytest.approx([1, 2 / 3, 1, 0])  # "the z" vs "z": 2/3
    assert rows[0]["key"] == stats.example_key("Question: one?", "z")


def test_a_corpus_level_primary_metric_gets_no_interval_and_no_crash() -> None:
    """BLEU pools n-grams over the corpus: its task has no per-example scores, so no interval (not a KeyError)."""
    from asymlora.eval.scoring import _per_example_scores
    from asymlora.eval.stats import run_intervals

    predictions = ["the cat sat on the mat", "a dog"]
    references = [["the cat sat on the mat"], ["the dog ran in the park today"]]
    results = {"bleu": 0.4, "exact_match": 0.5}  # any corpus BLEU that is not the mean of sentence BLEUs
    kept = _per_example_scores(predictions, predictions, references, ["bleu"], results)
    assert kept == {"exact_match": [1.0, 0.0]}
    examples = {
        "gen": [{"scores": {"exact_match": v}} for v in kept["exact_match"]],
        "acc": [{"scores": {"accuracy": v}} for v in (1.0, 1.0, 0.0)],
    }
    iv = run_intervals(examples, {"gen": "bleu", "acc": "accuracy"}, n_resamples=200)
    assert set(iv["per_task"]) == {"acc"} and iv["no_example_scores"] == ["gen"]
    assert iv["average"] is None and iv["worst"] is None and iv["delta_m"] is None
    both = run_intervals(examples, {"gen": "exact_match", "acc": "accuracy"}, n_resamples=200)
    assert both["average"]["value"] == pytest.approx((0.5 + 2 / 3) / 2) and both["no_example_scores"] == []


def test_std_is_the_one_definition_with_its_ddof_stated() -> None:
    # [1, 2, 3, 4]: mean 2.5, squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5
    assert stats.std([1.0, 2.0, 3.0, 4.0], 0) == pytest.approx(math.sqrt(5 / 4))
    assert stats.std([1.0, 2.0, 3.0, 4.0], 1) == pytest.approx(math.sqrt(5 / 3))
    with pytest.raises(ValueError, match="ddof must be 0"):
        stats.std([1.0, 2.0], 2)
    with pytest.raises(ValueError, match="more than 1 values"):
        stats.std([1.0], 1)
    assert stats.nan_mean([1.0, None, float("nan"), 3.0]) == 2.0 and stats.nan_mean([None]) is None
    from asymlora.eval import summarize

    summary = summarize({"a": {"accuracy": 0.2}, "b": {"accuracy": 0.6}}, {})
    assert summary["std"] == pytest.approx(0.2) and summary["std_ddof"] == 0  # population: √((0.04 + 0.04)/2)
    assert stats.seed_summary([0.2, 0.6])["std"] == pytest.approx(math.sqrt(0.08)) and stats.STD_DDOF == 1


def test_markdown_table_aligns_names_left_and_numbers_right() -> None:
    from asymlora.eval import markdown_table

    assert markdown_table(["method", "a", "b"], [["lora", "0.5", "0.25"]]) == [
        "| method | a | b |",
        "|---|---:|---:|",
        "| lora | 0.5 | 0.25 |",
    ]
    with pytest.raises(ValueError, match="2 cells for 3 columns"):
        markdown_table(["method", "a", "b"], [["lora", "0.5"]])


# --- how many examples or seeds would resolve a difference -----------------------------------------------
def _t_test_power(effect: float, n: int, alpha: float = 0.05) -> float:
    """Power of a two-sided one-sample t-test with n observations at standardised effect ``effect``, from
    scipy's noncentral t (independent of statsmodels, which the library uses)."""
    from scipy.stats import nct
    from scipy.stats import t as student

    crit = student.ppf(1 - alpha / 2, n - 1)
    nc = effect * n**0.5
    return float(nct.sf(crit, n - 1, nc) + nct.cdf(-crit, n - 1, nc))


def test_examples_to_resolve_sizes_the_paired_average_test_by_hand() -> None:
    """Two tasks of 4 examples. Differences a − b: task x [1, 0, 1, 0] (mean 0.5, sample variance 1/3),
    task y [0, 0, 1, -1] (mean 0, variance 2/3). D = (0.5 + 0) / 2 = 0.25; with n examples per task
    Var(D) = (1/3 + 2/3) / (4 n), so one observation's std is s = sqrt(1) / 2 = 0.5 and the effect 0.5:
    the answer is the smallest n whose t-test power reaches 0.8."""
    from asymlora.eval.stats import examples_to_resolve

    a = {"x": [1, 1, 1, 1], "y": [0, 1, 1, 0]}
    b = {"x": [0, 1, 0, 1], "y": [0, 1, 0, 1]}
    n = examples_to_resolve(a, b)
    assert n is not None and _t_test_power(0.5, n) >= 0.8 > _t_test_power(0.5, n - 1)
    assert n == 34  # the textbook value for d = 0.5, alpha 0.05, power 0.8 (33.4 rounded up)
    assert examples_to_resolve(a, a) is None  # every difference is 0: nothing to resolve
    with pytest.raises(stats.ExampleMismatchError):
        examples_to_resolve(a, {"x": [0, 1, 0, 1]})


def test_seeds_to_resolve_from_the_spread_over_seeds() -> None:
    """Per-seed differences [0.02, 0.01, 0.03]: mean 0.02, sample std 0.01, effect 2."""
    from asymlora.eval.stats import seeds_to_resolve

    n = seeds_to_resolve([0.02, 0.01, 0.03])
    assert n is not None and _t_test_power(2.0, n) >= 0.8 and (n == 2 or _t_test_power(2.0, n - 1) < 0.8)
    assert n == 5
    small = seeds_to_resolve([0.004, -0.006, 0.011])  # mean 0.003, std ≈ 0.00854: effect ≈ 0.35
    assert small is not None and small > 50
    assert seeds_to_resolve([0.02]) is None and seeds_to_resolve([0.01, 0.01]) is None
    assert seeds_to_resolve([5.0, 5.1]) == 2  # an effect so large that 2 seeds suffice


def _t_test_power_by_integration(effect: float, n: int, alpha: float = 0.05) -> float:
    """The same power written out: with V ~ χ²(n − 1), T = (Z + effect·√n) / √(V / (n − 1)), so
    P(|T| > c) = E_V[Φ(−c·√(V/(n−1)) + effect·√n) + Φ(−c·√(V/(n−1)) − effect·√n)], integrated numerically
    over u = F_χ²(V) in (0, 1) (no noncentral t: scipy's ``nct.cdf`` is NaN in this lower tail)."""
    from scipy import integrate
    from scipy.stats import chi2, norm
    from scipy.stats import t as student

    df, nc = n - 1, effect * math.sqrt(n)
    crit = student.ppf(1 - alpha / 2, df)

    def tails(u: float) -> float:
        scale = crit * math.sqrt(chi2.ppf(u, df) / df)
        return float(norm.sf(scale - nc) + norm.cdf(-scale - nc))

    return float(integrate.quad(tails, 0, 1, limit=400)[0])


@pytest.mark.parametrize(
    ("effect", "expected"), [(4.5, 3), (6.0, 3), (10.0, 3), (12.5, 2), (3.5, 3), (2.0, 5)]
)
def test_sample_size_of_a_large_effect_is_not_the_z_tests(effect, expected) -> None:
    """statsmodels' t-test power is NaN at n = 2 from an effect of about 5.5 (and at n = 3 to 5 from about 4), so
    its root finder failed and `_sample_size` fell back on the z-test's n, ((1.96 + 0.84) / 6)² = 0.22 → 2 for an
    effect of 6, where the t-test's power with 2 observations is only 0.49: 3 are needed. Reference: the power
    integrated over the χ² of the sample variance."""
    assert _t_test_power_by_integration(effect, expected) >= 0.8
    if expected > 2:
        assert _t_test_power_by_integration(effect, expected - 1) < 0.8
    assert stats._sample_size(effect, 0.8, 0.05) == expected


def test_seeds_to_resolve_three_closely_agreeing_seeds() -> None:
    """Per-seed differences [0.10, 0.12, 0.09]: mean 0.1033, sample std 0.01528, effect 6.76. The t-test with 2
    seeds has power 0.547 (1 degree of freedom: its critical value is 12.7), with 3 seeds 0.9988: 3 seeds, not
    the 2 given before."""
    values = [0.10, 0.12, 0.09]
    effect = float(np.mean(values) / np.std(values, ddof=1))
    assert _t_test_power_by_integration(effect, 2) == pytest.approx(0.5468, abs=1e-3)
    assert _t_test_power_by_integration(effect, 3) == pytest.approx(0.9988, abs=1e-3)
    assert stats.seeds_to_resolve(values) == 3


def test_a_paired_difference_of_zero_has_p_value_one() -> None:
    """A better on 20 examples, B on 20 others, 10 ties: the mean difference is 0, so every one of the 2⁴⁰
    sign flips of the 40 non-zero differences reaches |0| and the two-sided p-value is 1 (by hand). It was
    0.870: the observed sum, rounding noise around 0, was compared with the flips' sums within a tolerance
    relative to itself (scipy's), so the flips that also sum to 0 but rounded the other way were not counted.
    In the campaign (strategyqa, ALoRA − LoRA, 20 + 20 non-zero differences) it read p=0.993."""
    a = np.array([1] * 20 + [0] * 20 + [1] * 10, dtype=float)
    b = np.array([0] * 20 + [1] * 20 + [1] * 10, dtype=float)
    assert stats.paired_test(a, b)["p_value"] == 1.0
    order = np.random.default_rng(3).permutation(a.size)
    assert stats.paired_test(a[order], b[order])["p_value"] == 1.0
    # over tasks of 2 and 4 examples: x differences [1, 0] (mean +0.5), y [−1, −1, 0, 0] (−0.5): D = 0
    x_a, x_b, y_a, y_b = [1, 0], [0, 0], [0, 0, 1, 0], [1, 1, 1, 0]
    assert stats.paired_average_test({"x": x_a, "y": y_a}, {"x": x_b, "y": y_b})["p_value"] == 1.0
    # a difference that is not 0 keeps its p-value: 3 of 3 non-zero differences positive, 2/8 flips reach |3|
    assert stats.paired_test([1, 1, 1, 0], [0, 0, 0, 0])["p_value"] == pytest.approx(2 / 8)


def test_sign_flips_are_enumerated_exactly_when_few_differences_are_not_zero() -> None:
    """200 examples, 5 of them scored differently (+1 on four, −1 on one; sum 3): flipping a tie changes
    nothing, so the exact p-value is over the 2⁵ sign vectors of the five, 12/32 by hand (|Σ| ≥ 3 with
    4 or 5 signs alike: 2·(1 + 5)). Random flips of all 200 pairs only estimated it (0.3754 with seed 0)."""
    a = np.zeros(200)
    b = np.zeros(200)
    a[[3, 50, 97, 120]] = 1.0
    b[181] = 1.0
    assert stats.paired_test(a, b)["p_value"] == 12 / 32
    assert stats.paired_test(a, b, seed=7)["p_value"] == 12 / 32  # no randomness left to vary
    b[[3, 50, 97, 120]] = 1.0  # one non-zero pair left: both of its flips reach it
    assert stats.paired_test(a, b)["p_value"] == 1.0


def test_scores_of_0_or_1_get_the_exact_sign_test() -> None:
    """24 examples where A and B differ, 20 for A and 4 for B, the rest tied (the het campaign's arithmetic
    client): every non-zero difference is ±1, so the sign flips' sum is 2K − 24 with K ~ Binomial(24, 1/2)
    and p = 2·Σ_{k≤4} C(24, k)/2²⁴ = 2·12,951/16,777,216 by hand (Monte Carlo read 0.0022)."""
    a = np.array([1.0] * 20 + [0.0] * 4 + [1.0] * 100 + [0.0] * 76)
    b = np.array([0.0] * 20 + [1.0] * 4 + [1.0] * 100 + [0.0] * 76)
    exact = 2 * (1 + 24 + 276 + 2024 + 10626) / 2**24
    assert stats.paired_test(a, b)["p_value"] == pytest.approx(exact, rel=1e-12)
    # the average over two tasks of 200 examples each: weights 1/400 for both, so still ±w: the sign test
    result = stats.paired_average_test({"x": a, "y": b}, {"x": b, "y": a})
    assert result["difference"] == pytest.approx(0.0) and result["p_value"] == 1.0
    result = stats.paired_average_test({"x": a, "y": a}, {"x": b, "y": a})
    assert result["p_value"] == pytest.approx(exact, rel=1e-12)
    # tasks of different sizes weight their differences differently (1/(2·200) vs 1/(2·100)): random flips
    result = stats.paired_average_test({"x": a, "y": a[:100]}, {"x": b, "y": b[:100]})
    assert result["p_value"] != pytest.approx(exact, rel=1e-3)


def test_holm_adjusts_each_tasks_p_over_the_tasks_by_hand() -> None:
    """p = 0.01, 0.04, 0.03, 0.5 over four tasks. Holm by hand: sorted 0.01, 0.03, 0.04, 0.5 times 4, 3, 2, 1
    = 0.04, 0.09, 0.08, 0.5, then a running maximum: 0.04, 0.09, 0.09, 0.5. The average's test is its own."""
    tests = {
        t: {"p_value": p, "difference": 0.1} for t, p in zip("wxyz", (0.01, 0.04, 0.03, 0.5), strict=True)
    }
    tests["average"] = {"p_value": 0.02, "difference": 0.1}
    out = stats.holm_adjusted(tests)
    assert [out[t]["p_holm"] for t in "wxyz"] == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert "p_holm" not in out["average"] and "p_holm" not in tests["w"]  # the input is left as it was
    assert stats.holm_adjusted({"x": {"p_value": 0.7}})["x"]["p_holm"] == pytest.approx(0.7)  # one task
    assert stats.holm_adjusted({"x": {"p_value": 0.4}, "y": {"p_value": 0.9}})["x"]["p_holm"] == 0.8


def test_seed_test_is_a_t_test_over_the_per_seed_differences_by_hand() -> None:
    """Differences +0.03, +0.02, −0.01 over three seeds: mean 0.04/3, sample variance (0.05² + 0.02² + 0.07²)/(9·2)
    = 0.0078/18, s.e. = sqrt(0.0078/54). With 2 degrees of freedom the t distribution has closed forms: two-sided
    p = 1 − t / sqrt(2 + t²), and the 97.5 % quantile (2q − 1) / sqrt(2q(1 − q)) at q = 0.975."""
    from asymlora.eval.stats import seed_test

    mean, se = 0.04 / 3, math.sqrt(0.0078 / 54)
    t = mean / se
    q = 0.975
    crit = (2 * q - 1) / math.sqrt(2 * q * (1 - q))  # 4.3027
    got = seed_test([0.03, 0.02, -0.01])
    assert got is not None
    assert got["difference"] == pytest.approx(mean, rel=1e-12)
    assert got["t"] == pytest.approx(t, rel=1e-12)
    assert got["p_value"] == pytest.approx(1 - t / math.sqrt(2 + t**2), rel=1e-9)
    assert got["low"] == pytest.approx(mean - crit * se, rel=1e-9)
    assert got["high"] == pytest.approx(mean + crit * se, rel=1e-9)
    assert (got["seeds"], got["method"]) == (3, "t over seeds")
    # the sign carries through: the mirrored differences give the mirrored interval and the same p
    neg = seed_test([-0.03, -0.02, 0.01])
    assert (
        neg is not None
        and neg["low"] == pytest.approx(-got["high"])
        and neg["p_value"] == pytest.approx(got["p_value"])
    )


def test_seed_test_needs_three_seeds_and_a_spread() -> None:
    from asymlora.eval.stats import seed_test

    assert seed_test([0.02, 0.01]) is None  # 1 degree of freedom: ±12.7 s.e., no use
    assert seed_test([0.01, 0.01, 0.01]) is None  # no spread: t undefined
    with pytest.raises(
        ValueError, match=r"seed_test: per-example scores must be finite numbers, example 1 is nan"
    ):
        seed_test([0.01, float("nan"), 0.02])
