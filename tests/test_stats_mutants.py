"""`asymlora.eval.stats` against references that do not go through the module (mutation tests, session 10).

Each bootstrap interval is recomputed with ``scipy.stats.bootstrap`` called directly on the *scores* (the
module resamples example indices and looks the scores up; scipy draws the same indices from the same
seeded generator, so the documented settings — percentile method, 2000 resamples, seed 0, 95 % — give
the same interval to rounding, and any other setting gives another). Small cases are worked out by hand
in the comments. docs/testing.md, "Mutation results, session 10", lists what these tests kill.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import warnings

import numpy as np
import pytest
from scipy import stats as sps
from scipy.stats import nct
from scipy.stats import t as student

from asymlora.eval import stats

Z90 = 1.6448536269514722  # Φ⁻¹(0.95)
Z95 = 1.959963984540054  # Φ⁻¹(0.975)
EXACT = {"rel": 1e-12, "abs": 1e-12}


def wilson_by_hand(k: int, n: int, z: float) -> tuple[float, float]:
    """(p + z²/2n ± z·sqrt(p(1 − p)/n + z²/4n²)) / (1 + z²/n) (Wilson 1927)."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def scipy_percentile(samples, statistic, *, n_resamples=2000, confidence=0.95, seed=0) -> tuple[float, float]:
    """scipy's percentile bootstrap on the scores themselves (each sample resampled independently)."""
    ci = sps.bootstrap(
        samples,
        statistic,
        n_resamples=n_resamples,
        confidence_level=confidence,
        method="percentile",
        vectorized=True,
        rng=np.random.default_rng(seed),
    ).confidence_interval
    return float(ci.low), float(ci.high)


def average_of_means(*samples, axis=-1):
    return np.mean([s.mean(axis=axis) for s in samples], axis=0)


def sign_flip_pvalue_by_enumeration(diffs) -> float:
    """P(|Σ s_i d_i| ≥ |Σ d_i|) over all 2^n sign vectors s (the exact paired permutation test)."""
    d = np.asarray(diffs, dtype=float)
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=d.size)))
    return float(np.mean(np.abs(signs @ d) >= abs(d.sum()) - 1e-12))


def t_test_power(effect: float, n: int, alpha: float = 0.05) -> float:
    """Power of a two-sided one-sample t-test (scipy's noncentral t; the module uses statsmodels)."""
    crit = student.ppf(1 - alpha / 2, n - 1)
    nc = effect * math.sqrt(n)
    return float(nct.sf(crit, n - 1, nc) + nct.cdf(-crit, n - 1, nc))


# --- example keys and input checks ------------------------------------------------------------------------
def test_example_key_is_the_first_16_hex_digits_of_the_sha1_of_the_unit_separated_fields() -> None:
    expected = hashlib.sha1(b"Q?\x1fA\x1fA\x1fB").hexdigest()[:16]
    assert stats.example_key("Q?", "A", ["A", "B"]) == expected and len(expected) == 16
    assert stats.example_key("Q?", "A") == hashlib.sha1(b"Q?\x1fA").hexdigest()[:16]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: stats.bootstrap_interval([]), "bootstrap_interval: expected a non-empty list of per-example "
         "scores, got shape (0,)"),
        (lambda: stats.bootstrap_interval([[0.1, 0.2], [0.3, 0.4]]), "bootstrap_interval: expected a "
         "non-empty list of per-example scores, got shape (2, 2)"),
        (lambda: stats.metric_interval([0.1, math.inf], "rougeL"),
         "metric_interval(rougeL): per-example scores must be finite numbers, example 1 is inf"),
        (lambda: stats.seed_summary([]), "seed_summary: expected a non-empty list of per-example scores, "
         "got shape (0,)"),
        (lambda: stats.seeds_to_resolve([math.nan, 1.0]), "seeds_to_resolve: per-example scores must be "
         "finite numbers, example 0 is nan"),
        (lambda: stats.average_interval({}), "over_tasks_interval: needs per-example scores of at least one "
         "task"),
        (lambda: stats.average_interval({"a": [0.5, math.nan]}),
         "over_tasks_interval: task 'a': per-example scores must be finite numbers, example 1 is nan"),
        (lambda: stats.delta_m_interval({"a": [math.nan]}, {"a": 1.0}),
         "delta_m_interval: task 'a': per-example scores must be finite numbers, example 0 is nan"),
        (lambda: stats.paired_test([0.1, math.nan], [0.1, 0.2]),
         "paired_average_test (run A): task 'task': per-example scores must be finite numbers, example 1 is nan"),
        (lambda: stats.paired_test([0.1, 0.2], [math.inf, 0.2]),
         "paired_average_test (run B): task 'task': per-example scores must be finite numbers, example 0 is inf"),
        (lambda: stats.examples_to_resolve({"t": [0.1]}, {"t": [math.nan]}),
         "examples_to_resolve (run B): task 't': per-example scores must be finite numbers, example 0 is nan"),
        (lambda: stats.wilson_interval(1, 0),
         "wilson_interval needs 0 <= successes <= n and n >= 1, got 1/0"),
        (lambda: stats.std([1.0], 1), "std with ddof=1 needs more than 1 values, got shape (1,)"),
        (lambda: stats.std([], 0), "std with ddof=0 needs more than 0 values, got shape (0,)"),
    ],
)  # fmt: skip
def test_bad_scores_are_refused_with_the_whole_message(call, message) -> None:
    with pytest.raises(ValueError) as info:
        call()
    assert str(info.value) == message


def test_mismatched_runs_are_refused_with_the_whole_message() -> None:
    with pytest.raises(stats.ExampleMismatchError) as info:
        stats.paired_average_test({"x": [1.0]}, {"y": [1.0]})
    assert str(info.value) == "the runs cover different tasks: ['x'] vs ['y']"
    with pytest.raises(stats.ExampleMismatchError) as info:
        stats.paired_test([1.0, 0.0], [1.0])
    assert str(info.value) == (
        "task 'task': run A has 2 scored examples, run B 1; a paired test needs the same test examples"
    )
    with pytest.raises(stats.ExampleMismatchError) as info:
        stats.delta_m_interval({"a": [1.0, 0.0]}, {"a": [1.0, 0.0, 1.0]})
    assert str(info.value) == (
        "delta_m_interval: task 'a' has 2 scores but 3 baseline scores; score both on the same test examples"
    )

    def rows(keys):
        return [{"key": k, "scores": {"accuracy": 1.0}} for k in keys]

    with pytest.raises(stats.ExampleMismatchError) as info:
        stats.compare_examples({"t": rows("pqr")}, {"t": rows("pqs")}, {"t": "accuracy"})
    assert str(info.value) == (
        "task 't': run A was scored on 3 examples and run B on 3 (2 in common); re-evaluate both on the same "
        "test split (same data.seed, data.max_test and eval.max_examples)"
    )


def test_boolean_correctness_flags_are_scores_like_floats() -> None:
    # [T, T, F] − [F, T, F] = [1, 0, 0]: difference 1/3 (numpy refuses to subtract bool arrays)
    out = stats.paired_test([True, True, False], [False, True, False])
    assert out["difference"] == pytest.approx(1 / 3) and out["n"] == 3


# --- Wilson -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("k", "n"), [(0, 1), (1, 1), (7, 10)])
def test_wilson_interval_at_one_trial_and_at_90_percent(k, n) -> None:
    assert stats.wilson_interval(k, n) == pytest.approx(wilson_by_hand(k, n, Z95), abs=1e-12)
    assert stats.wilson_interval(k, n, confidence=0.9) == pytest.approx(wilson_by_hand(k, n, Z90), abs=1e-12)


def test_metric_interval_passes_its_options_to_wilson_and_to_the_bootstrap() -> None:
    acc = stats.metric_interval([1, 1, 0, 1, 1, 0, 1, 1, 0, 1], "accuracy", confidence=0.9)
    assert (acc["low"], acc["high"]) == pytest.approx(wilson_by_hand(7, 10, Z90), abs=1e-12)
    # a graded metric whose scores happen to be 0/1 is still bootstrapped
    graded = stats.metric_interval([1.0, 0.0, 1.0, 1.0], "rougeL")
    assert graded["method"] == "bootstrap"
    assert (graded["low"], graded["high"]) == pytest.approx(
        scipy_percentile(([1.0, 0.0, 1.0, 1.0],), np.mean)
    )
    # a 0/1 metric with a fractional score is bootstrapped too
    assert stats.metric_interval([1.0, 0.5], "exact_match")["method"] == "bootstrap"
    scores = [0.2, 0.5, 0.3, 0.9, 0.65]
    out = stats.metric_interval(scores, "rougeL", confidence=0.8, n_resamples=300, seed=3)
    ref = scipy_percentile((scores,), np.mean, n_resamples=300, confidence=0.8, seed=3)
    assert (out["low"], out["high"]) == pytest.approx(ref, **EXACT)
    assert out == {"value": pytest.approx(0.51), "low": out["low"], "high": out["high"], "method": "bootstrap",
                   "n": 5}  # fmt: skip


# --- bootstrap intervals ----------------------------------------------------------------------------------
def test_bootstrap_interval_is_scipys_percentile_bootstrap_with_the_documented_settings() -> None:
    scores = [0.2, 0.5, 0.3, 0.9, 0.1, 0.45]
    assert stats.bootstrap_interval(scores) == pytest.approx(scipy_percentile((scores,), np.mean), **EXACT)
    custom = stats.bootstrap_interval(scores, confidence=0.9, n_resamples=500, seed=7)
    assert custom == pytest.approx(
        scipy_percentile((scores,), np.mean, n_resamples=500, confidence=0.9, seed=7), **EXACT
    )
    # not BCa (scipy's default method), not 9999 resamples (its default count)
    bca = sps.bootstrap(
        (scores,), np.mean, n_resamples=2000, rng=np.random.default_rng(0)
    ).confidence_interval
    assert stats.bootstrap_interval(scores) != pytest.approx((bca.low, bca.high))


def test_two_examples_already_give_an_interval() -> None:
    # scores (0, 1): a resample's mean is 0, 1/2 or 1 with probabilities 1/4, 1/2, 1/4, so the 2.5 % and
    # 97.5 % percentiles of 2000 resampled means are 0 and 1
    assert stats.bootstrap_interval([0.0, 1.0]) == (0.0, 1.0)
    # two tasks of two: the average is 0 with probability 1/16 > 2.5 % (and 1 likewise)
    two = stats.average_interval({"a": [0.0, 1.0], "b": [1.0, 0.0]})
    assert two == {"value": 0.5, "low": 0.0, "high": 1.0, "method": "stratified bootstrap", "n": 4}
    # the paired test on two pairs: differences (1, 0) → the same (0, 1)
    paired = stats.paired_test([1.0, 0.0], [0.0, 0.0])
    assert (paired["low"], paired["high"]) == (0.0, 1.0)


def test_average_interval_is_scipys_stratified_percentile_bootstrap() -> None:
    a, b, c = [0.1, 0.9, 0.4, 0.6, 0.3], [1.0, 0.0, 1.0], [0.25, 0.75, 0.5, 0.5]
    out = stats.average_interval({"a": a, "b": b, "c": c})
    assert out["value"] == pytest.approx((0.46 + 2 / 3 + 0.5) / 3) and out["n"] == 12
    assert (out["low"], out["high"]) == pytest.approx(scipy_percentile((a, b, c), average_of_means), **EXACT)
    custom = stats.average_interval({"a": a, "b": b, "c": c}, confidence=0.8, n_resamples=400, seed=5)
    ref = scipy_percentile((a, b, c), average_of_means, n_resamples=400, confidence=0.8, seed=5)
    assert (custom["low"], custom["high"]) == pytest.approx(ref, **EXACT)
    assert custom["method"] == "stratified bootstrap"


def test_a_task_with_one_example_gives_the_value_without_an_interval() -> None:
    out = stats.average_interval({"a": [0.25], "b": [0.5, 1.0, 0.0]})
    assert out == {"value": 0.375, "low": None, "high": None, "method": "stratified bootstrap", "n": 4}


# --- Δm% --------------------------------------------------------------------------------------------------
def _delta_term(z, axis):
    """Scores s + i·b of one task (run s, baseline b, paired by example): (mean b − mean s) / mean b."""
    m = z.mean(axis=axis)
    return (m.imag - m.real) / m.imag


def test_delta_m_with_per_example_baselines_resamples_each_example_with_its_baseline() -> None:
    s, b = np.array([0.9, 0.4, 0.7, 0.2]), np.array([0.8, 0.5, 0.9, 0.6])
    s2, b2 = np.array([0.3, 0.6, 0.1]), np.array([0.5, 0.4, 0.2])
    out = stats.delta_m_interval({"x": s, "y": s2}, {"x": b, "y": b2})
    # by hand: x (0.7 − 0.55) / 0.7 = 3/14, y (11/30 − 1/3) / (11/30) = 1/11 → 100 (3/14 + 1/11) / 2
    assert out["value"] == pytest.approx(100 * (3 / 14 + 1 / 11) / 2) and out["n"] == 7
    # the pairing: example i of a task carries (s_i, b_i) as one complex number through scipy's resampling
    ref = scipy_percentile(
        (s + 1j * b, s2 + 1j * b2),
        lambda x, y, axis=-1: 100 * (_delta_term(x, axis) + _delta_term(y, axis)) / 2,
    )
    assert (out["low"], out["high"]) == pytest.approx(ref, **EXACT)
    custom = stats.delta_m_interval(
        {"x": s, "y": s2}, {"x": b, "y": b2}, confidence=0.9, seed=2, n_resamples=300
    )
    ref = scipy_percentile(
        (s + 1j * b, s2 + 1j * b2),
        lambda x, y, axis=-1: 100 * (_delta_term(x, axis) + _delta_term(y, axis)) / 2,
        confidence=0.9,
        seed=2,
        n_resamples=300,
    )
    assert (custom["low"], custom["high"]) == pytest.approx(ref, **EXACT)
    assert out["method"] == "stratified bootstrap" and out["tasks"] == ["x", "y"]


def test_delta_m_skips_tasks_without_a_baseline_and_keeps_a_baseline_of_one() -> None:
    per_task = {"first": [0.5, 0.7], "second": [0.2, 0.4], "third": [0.9, 0.9]}
    # "first" has no baseline, "second" none either (None), "third" 1.0, then (1 − 0.9) / 1 · 100 = 10
    out = stats.delta_m_interval(per_task, {"second": None, "third": 1.0})
    assert out["value"] == pytest.approx(10.0) and out["tasks"] == ["third"] and out["n"] == 2
    # a baseline of 0 is left out (division by zero); the others stay
    zero = stats.delta_m_interval(per_task, {"first": 0.0, "third": 1})
    assert zero["tasks"] == ["third"]
    # one example: the value, no interval (None, not another falsy value)
    one = stats.delta_m_interval({"a": [0.5]}, {"a": 1.0})
    assert one["value"] == 50.0 and one["low"] is None and one["high"] is None


# scipy's standard error of a bootstrap distribution holding −inf warns (inf − inf) outside the module's
# errstate; the interval is still reported as None (docs/testing.md, "Mutation results, session 10")
@pytest.mark.filterwarnings("ignore:invalid value encountered in subtract:RuntimeWarning")
def test_delta_m_interval_is_none_when_resamples_hit_a_zero_baseline() -> None:
    # run (1, 1), baseline (1, 0): the value is (0.5 − 1) / 0.5 = −100 %; the resample that draws example 1
    # twice (probability 1/4) has baseline 0 and gives −inf, so the lower percentile is −inf: no interval
    out = stats.delta_m_interval({"a": [1.0, 1.0]}, {"a": [1.0, 0.0]})
    assert out["value"] == -100.0 and out["low"] is None and out["high"] is None
    # run (1, 1, 0), baseline (1, 0, 0): resamples with baseline 0 give x/0 and 0/0; numpy says nothing
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = stats.delta_m_interval({"a": [1.0, 1.0, 0.0]}, {"a": [1.0, 0.0, 0.0]})
    assert out["value"] == pytest.approx(-100.0) and out["low"] is None and out["high"] is None


# --- spread and summaries ---------------------------------------------------------------------------------
def test_format_interval_with_one_bound_missing_shows_the_value() -> None:
    assert (
        stats.format_interval(0.5, 0.4, None) == "0.500" and stats.format_interval(0.5, None, 0.6) == "0.500"
    )
    assert stats.format_interval(0.5, 0.25, 0.75, digits=1) == "0.5 [0.2, 0.8]"


def test_run_intervals_passes_its_options_on_and_states_the_confidence() -> None:
    t, u = [1.0, 1.0, 0.0, 1.0, 0.0], [0.2, 0.9, 0.4, 0.7]
    examples = {"t": [{"scores": {"accuracy": v}} for v in t], "u": [{"scores": {"rougeL": v}} for v in u]}
    primary = {"t": "accuracy", "u": "rougeL"}
    kw = {"confidence": 0.9, "n_resamples": 400, "seed": 3}
    out = stats.run_intervals(examples, primary, baselines={"t": 0.8, "u": 0.5}, **kw)
    assert out["confidence"] == 0.9 and stats.run_intervals(examples, primary)["confidence"] == 0.95
    assert (out["per_task"]["t"]["low"], out["per_task"]["t"]["high"]) == pytest.approx(
        wilson_by_hand(3, 5, Z90), abs=1e-12
    )
    ref = {"n_resamples": 400, "confidence": 0.9, "seed": 3}
    assert (out["per_task"]["u"]["low"], out["per_task"]["u"]["high"]) == pytest.approx(
        scipy_percentile((u,), np.mean, **ref), **EXACT
    )
    assert (out["average"]["low"], out["average"]["high"]) == pytest.approx(
        scipy_percentile((t, u), average_of_means, **ref), **EXACT
    )
    worst = scipy_percentile((t, u), lambda x, y, axis=-1: np.minimum(x.mean(axis), y.mean(axis)), **ref)
    assert (out["worst"]["low"], out["worst"]["high"]) == pytest.approx(worst, **EXACT)
    spread = scipy_percentile((t, u), lambda x, y, axis=-1: np.abs(x.mean(axis) - y.mean(axis)) / 2, **ref)
    assert (out["std_over_tasks"]["low"], out["std_over_tasks"]["high"]) == pytest.approx(spread, **EXACT)
    # Δm% = 100 ((0.8 − 0.6) / 0.8 + (0.5 − 0.55) / 0.5) / 2 = 100 (0.25 − 0.1) / 2 = 7.5
    assert out["delta_m"]["value"] == pytest.approx(7.5) and out["delta_m"]["tasks"] == ["t", "u"]
    delta = scipy_percentile(
        (t, u),
        lambda x, y, axis=-1: 100 * ((0.8 - x.mean(axis)) / 0.8 + (0.5 - y.mean(axis)) / 0.5) / 2,
        **ref,
    )
    assert (out["delta_m"]["low"], out["delta_m"]["high"]) == pytest.approx(delta, **EXACT)


def test_run_intervals_without_every_task_scored_has_no_over_task_interval() -> None:
    examples = {"a": [{"scores": {"exact_match": 1.0}}], "b": [{"scores": {"accuracy": v}} for v in (1, 0)]}
    out = stats.run_intervals(examples, {"a": "bleu", "b": "accuracy"}, baselines={"b": 0.5})
    assert out["std_over_tasks"] is None and out["average"] is None and out["delta_m"] is None
    assert out["no_example_scores"] == ["a"]


# --- paired tests -----------------------------------------------------------------------------------------
def test_paired_test_on_one_or_two_pairs() -> None:
    # one pair: both sign flips reach |0.5|, p = 2/2; no interval
    assert stats.paired_test([0.7], [0.2]) == {
        "difference": pytest.approx(0.5), "low": None, "high": None, "p_value": 1.0, "n": 1,
        "method": "paired permutation (sign flips) + stratified paired bootstrap",
    }  # fmt: skip
    # two pairs, differences (1, 2): the sums over the four sign vectors are 3, −1, 1, −3; two reach 3
    assert stats.paired_test([1.0, 2.0], [0.0, 0.0])["p_value"] == 0.5
    assert stats.paired_average_test({"x": [1.0], "y": [0.5]}, {"x": [0.0], "y": [0.0]})["low"] is None


def _sign_flip_scipy(weighted_diffs, n_resamples=10000, seed=0) -> float:
    """scipy's paired permutation test on (w·a, w·b) written out, as the exact test would be."""
    d = np.asarray(weighted_diffs, dtype=float)
    return float(
        sps.permutation_test(
            (d, np.zeros_like(d)),
            lambda x, y, axis=-1: np.sum(x - y, axis=axis),
            permutation_type="samples",
            n_resamples=n_resamples,
            rng=np.random.default_rng(seed),
        ).pvalue
    )


def test_randomised_sign_flips_are_seeded_and_weighted_per_task() -> None:
    """18 pairs (2^18 sign vectors > 10 000): the p-value is scipy's randomised test with 10 000 flips from
    seed 0, near the exact enumeration. Tasks of 12 and 6 pairs weigh each pair by 1/(2·12) and 1/(2·6)."""
    rng = np.random.default_rng(1)
    a_x, b_x = rng.uniform(size=12), rng.uniform(size=12)
    a_y, b_y = rng.uniform(size=6), rng.uniform(size=6)
    b_y = b_y - 0.3
    out = stats.paired_average_test({"x": a_x, "y": a_y}, {"x": b_x, "y": b_y})
    weighted = np.concatenate([(a_x - b_x) / 24, (a_y - b_y) / 12])
    assert out["difference"] == pytest.approx(weighted.sum())
    assert out["p_value"] == pytest.approx(_sign_flip_scipy(weighted), **EXACT)
    assert out["p_value"] == pytest.approx(sign_flip_pvalue_by_enumeration(weighted), abs=0.02)
    other = stats.paired_average_test({"x": a_x, "y": a_y}, {"x": b_x, "y": b_y}, seed=4, n_permutations=3000)
    assert other["p_value"] == pytest.approx(_sign_flip_scipy(weighted, n_resamples=3000, seed=4), **EXACT)
    assert other["p_value"] != out["p_value"]
    # the interval: scipy's stratified bootstrap of the two tasks' mean differences
    ref = scipy_percentile((a_x - b_x, a_y - b_y), average_of_means, seed=4)
    assert (other["low"], other["high"]) == pytest.approx(ref, **EXACT)
    assert other["n"] == 18


def test_paired_test_and_compare_examples_pass_their_options_on() -> None:
    a, b = [0.9, 0.4, 0.75, 0.3, 0.8, 0.6], [0.5, 0.45, 0.2, 0.1, 0.65, 0.6]
    d = np.subtract(a, b)
    out = stats.paired_test(a, b, seed=9, n_resamples=300, confidence=0.9)
    ref = scipy_percentile((d,), np.mean, seed=9, n_resamples=300, confidence=0.9)
    assert (out["low"], out["high"]) == pytest.approx(ref, **EXACT)

    def rows(values):
        return [{"key": str(i), "scores": {"rougeL": v}} for i, v in enumerate(values)]

    cmp = stats.compare_examples({"t": rows(a)}, {"t": rows(b)}, {"t": "rougeL"}, seed=9, n_resamples=300,
                                 confidence=0.9)  # fmt: skip
    assert (cmp["t"]["low"], cmp["t"]["high"]) == pytest.approx(ref, **EXACT)
    assert (cmp["average"]["low"], cmp["average"]["high"]) == pytest.approx(ref, **EXACT)
    assert cmp["average"]["metric"] == "primary" and cmp["t"]["metric"] == "rougeL"


# --- power ------------------------------------------------------------------------------------------------
def test_seeds_to_resolve_when_three_seeds_suffice_but_two_do_not() -> None:
    # differences (0.25, 0.35, 0.45): mean 0.35, sample std 0.1, effect 3.5; t-test power 0.30 at n = 2,
    # 0.84 at n = 3 → 3
    assert t_test_power(3.5, 2) < 0.8 <= t_test_power(3.5, 3)
    assert stats.seeds_to_resolve([0.25, 0.35, 0.45]) == 3
    # at power 0.9 and level 0.01 instead: the smallest n with power ≥ 0.9 at α = 0.01
    n = stats.seeds_to_resolve([0.25, 0.35, 0.45], power=0.9, confidence=0.99)
    assert t_test_power(3.5, n, alpha=0.01) >= 0.9 > t_test_power(3.5, n - 1, alpha=0.01) and n == 5


def test_examples_to_resolve_no_difference_and_tasks_of_one_or_two_examples() -> None:
    # differences (1, −1): D = 0 with a non-zero spread: nothing to resolve
    assert stats.examples_to_resolve({"t": [1.0, 0.0]}, {"t": [0.0, 1.0]}) is None
    # task x differences (1, 0, 1, 0): mean 1/2, variance 1/3; task y one difference 1: no variance of its own,
    # so the pooled variance of the tasks of two examples or more, here x's 1/3 (as 0 it understated the
    # spread: effect 2.598 and n = 4, too few);
    # D = (1/2 + 1) / 2 = 3/4, s = sqrt(1/3 + 1/3) / 2, effect = 3/4 · 2 / sqrt(2/3) = 1.837
    a, b = {"x": [1.0, 1.0, 1.0, 1.0], "y": [1.0]}, {"x": [0.0, 1.0, 0.0, 1.0], "y": [0.0]}
    effect = 0.75 / (math.sqrt(2 / 3) / 2)
    n = stats.examples_to_resolve(a, b)
    assert t_test_power(effect, n) >= 0.8 > t_test_power(effect, n - 1) and n == 5
    # task y of two differences (1, 0): mean 1/2, variance 1/2; D = (1/2 + 1/2) / 2 = 1/2
    a2, b2 = {"x": a["x"], "y": [1.0, 1.0]}, {"x": b["x"], "y": [0.0, 1.0]}
    effect2 = 0.5 / (math.sqrt(1 / 3 + 1 / 2) / 2)
    n2 = stats.examples_to_resolve(a2, b2)
    assert t_test_power(effect2, n2) >= 0.8 > t_test_power(effect2, n2 - 1)
    n3 = stats.examples_to_resolve(a, b, power=0.95, confidence=0.99)
    assert t_test_power(effect, n3, alpha=0.01) >= 0.95 > t_test_power(effect, n3 - 1, alpha=0.01)


def test_examples_to_resolve_pools_the_variance_for_a_task_of_one_example() -> None:
    """x differences (1, 0, 1, 0): variance 1/3 on 3 degrees of freedom; y (1, −1): variance 2 on 1; z one
    difference 1: the pooled (3 · 1/3 + 1 · 2) / (3 + 1) = 3/4 (not 0). D = (1/2 + 0 + 1) / 3 = 1/2,
    s = sqrt(1/3 + 2 + 3/4) / 3 = sqrt(37/12) / 3, effect = 1.5 / sqrt(37/12) = 0.8542. Every task of one
    example: no variance to estimate, None."""
    a = {"x": [1.0, 1.0, 1.0, 1.0], "y": [1.0, 0.0], "z": [1.0]}
    b = {"x": [0.0, 1.0, 0.0, 1.0], "y": [0.0, 1.0], "z": [0.0]}
    effect = 1.5 / math.sqrt(37 / 12)
    n = stats.examples_to_resolve(a, b)
    assert n is not None and t_test_power(effect, n) >= 0.8 > t_test_power(effect, n - 1) and n == 13
    assert stats.examples_to_resolve({"x": [1.0], "y": [1.0]}, {"x": [0.0], "y": [0.0]}) is None
