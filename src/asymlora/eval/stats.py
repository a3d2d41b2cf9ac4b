"""Uncertainty of evaluation scores: intervals, runs over seeds, paired tests between two runs.

Every function takes per-example scores (one value per test example: 0/1 correctness for
``accuracy`` / ``exact_match``, a ROUGE F-measure in [0, 1] for ``rouge*``) and uses scipy's
maintained implementations (``binomtest``, ``bootstrap``, ``permutation_test``) rather than
hand-written samplers:

- a task's score: Wilson 95 % interval for 0/1 metrics, percentile bootstrap over examples for
  graded ones (:func:`metric_interval`);
- the average over tasks and Δm% (docs/design.md §6): a *stratified* bootstrap, i.e. the examples
  of each task are resampled independently and the statistic recomputed
  (:func:`average_interval`, :func:`delta_m_interval`);
- spread: :func:`std` is the one standard deviation of the package, with its ``ddof`` always stated
  in the output (population std, ddof = 0, over tasks; sample std, ddof = 1, over seeds and repeats);
- several seeds: mean ± sample std (ddof = 1), the per-seed values kept (:func:`seed_summary`);
- two runs on the same test examples: a paired sign-flip permutation test and a paired bootstrap
  interval of the mean difference, per task and on the average over tasks (:func:`paired_test`,
  :func:`paired_average_test`, :func:`compare_examples`);
- a difference the paired test cannot resolve: the test examples per task, or the seeds, at which a
  difference of the observed size would be detected with 80 % power, from the observed variance
  (statsmodels' ``TTestPower``: :func:`examples_to_resolve`, :func:`seeds_to_resolve`);
- whether a difference recurs with other seeds: a one-sample t-test over the per-seed differences
  (scipy's ``ttest_1samp``: :func:`seed_test`). The paired tests above hold the seeds fixed (their
  interval is over test examples); this one treats the seeds as the sample.

Intervals are dicts ``{"value", "low", "high", "method", "n"}`` (``low``/``high`` None when an
interval cannot be formed, e.g. a single example), ready for JSON.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestPower
from statsmodels.tools.sm_exceptions import ConvergenceWarning

__all__ = [
    "BINARY_METRICS",
    "CONFIDENCE",
    "STD_DDOF",
    "ExampleMismatchError",
    "average_interval",
    "bootstrap_interval",
    "compare_examples",
    "delta_m_interval",
    "example_key",
    "examples_to_resolve",
    "format_interval",
    "holm",
    "holm_adjusted",
    "metric_interval",
    "nan_mean",
    "over_tasks_interval",
    "paired_average_test",
    "paired_test",
    "run_intervals",
    "seed_summary",
    "seed_test",
    "seeds_to_resolve",
    "std",
    "wilson_interval",
]

CONFIDENCE = 0.95
"""Confidence level of every interval."""
N_BOOTSTRAP = 2000
"""Bootstrap resamples (percentile method)."""
N_PERMUTATIONS = 10000
"""Random sign flips of a permutation test; with 2**n ≤ this many sign flips of the n pairs whose scores
differ, all of them are enumerated exactly instead."""
PERMUTATION_NOTE = (
    "exact when the differing examples differ by the same amount (0/1 scores: the sign test) or when at most "
    f"{int(math.log2(N_PERMUTATIONS))} examples' scores differ, else from {N_PERMUTATIONS:,} random flips "
    f"(standard error √(p(2 − p)/{N_PERMUTATIONS:,}): ±{math.sqrt(0.01 * 1.99 / N_PERMUTATIONS):.2g} at p = 0.01, "
    f"±{math.sqrt(0.5 * 1.5 / N_PERMUTATIONS):.2g} at p = 0.5)"
)
"""How a paired p-value was computed and how precise it is, for the reports' notes. The two-sided p is twice
the smaller one-sided tail q = p/2 (scipy's ``permutation_test``), each a proportion of the random flips:
its standard error is 2·√(q(1 − q)/n) = √(p(2 − p)/n)."""
SEED = 0
"""Seed of the resampling: the same scores always give the same interval and p-value."""
STD_DDOF = 1
"""Std over seeds is the sample std (divisor n − 1)."""
POWER = 0.8
"""Power at which `examples_to_resolve` / `seeds_to_resolve` size a study (the conventional 80 %)."""
BINARY_METRICS = frozenset({"accuracy", "exact_match"})
"""Metrics whose per-example score is 0 or 1 (Wilson interval)."""


class ExampleMismatchError(ValueError):
    """Two runs were not scored on the same test examples; a paired test is meaningless."""


def example_key(prompt: str, target: str, options: Sequence[str] | None = None) -> str:
    """A short stable id of a test example (sha1 of prompt, target and options), to check two runs align."""
    text = "\x1f".join([prompt, target, *(options or [])])
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def _array(scores: Sequence[float] | np.ndarray, what: str) -> np.ndarray:
    values = np.asarray(scores, dtype=float)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"{what}: expected a non-empty list of per-example scores, got shape {values.shape}")
    if not np.all(np.isfinite(values)):
        bad = int(np.flatnonzero(~np.isfinite(values))[0])
        raise ValueError(f"{what}: per-example scores must be finite numbers, example {bad} is {values[bad]}")
    return values


def _interval(value: float, low: float | None, high: float | None, method: str, n: int) -> dict[str, Any]:
    return {"value": float(value), "low": low, "high": high, "method": method, "n": int(n)}


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n`` (``scipy.stats.binomtest``).

    Raises:
        ValueError: ``n < 1`` or ``successes`` outside ``[0, n]``.
    """
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"wilson_interval needs 0 <= successes <= n and n >= 1, got {successes}/{n}")
    ci = stats.binomtest(int(successes), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def _stratified_bootstrap(
    sizes: Sequence[int],
    statistic: Callable[[list[np.ndarray]], np.ndarray],
    *,
    confidence: float,
    n_resamples: int,
    seed: int,
) -> tuple[float, float]:
    """Percentile bootstrap of ``statistic(indices per stratum)``, each stratum resampled on its own.

    scipy resamples arrays of example *indices* (``paired=False``: every stratum independently), and
    ``statistic`` looks the scores up, so several score arrays of one stratum (two runs, a run and
    its baseline) stay paired example by example.
    """
    samples = tuple(np.arange(size) for size in sizes)

    def wrapped(*indices: np.ndarray, axis: int = -1) -> np.ndarray:
        return statistic([np.asarray(ix, dtype=int) for ix in indices])

    result = stats.bootstrap(
        samples,
        wrapped,
        n_resamples=n_resamples,
        confidence_level=confidence,
        method="percentile",
        paired=False,
        vectorized=True,
        rng=np.random.default_rng(seed),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def bootstrap_interval(
    scores: Sequence[float] | np.ndarray,
    *,
    confidence: float = CONFIDENCE,
    n_resamples: int = N_BOOTSTRAP,
    seed: int = SEED,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean of per-example ``scores``; None with fewer than 2 examples."""
    values = _array(scores, "bootstrap_interval")
    if values.size < 2:
        return None
    return _stratified_bootstrap(
        [values.size],
        lambda ix: values[ix[0]].mean(axis=-1),
        confidence=confidence,
        n_resamples=n_resamples,
        seed=seed,
    )


def metric_interval(scores: Sequence[float], metric: str, **kwargs: Any) -> dict[str, Any]:
    """The mean of per-example ``scores`` with its interval: Wilson for 0/1 metrics, else bootstrap.

    ``kwargs`` (``confidence``, ``n_resamples``, ``seed``) go to the bootstrap; Wilson takes ``confidence``.
    """
    values = _array(scores, f"metric_interval({metric})")
    if metric in BINARY_METRICS and np.all((values == 0) | (values == 1)):
        low, high = wilson_interval(int(values.sum()), values.size, kwargs.get("confidence", CONFIDENCE))
        return _interval(values.mean(), low, high, "wilson", values.size)
    ci = bootstrap_interval(values, **kwargs)
    return _interval(values.mean(), ci and ci[0], ci and ci[1], "bootstrap", values.size)


def _per_task_arrays(per_task: Mapping[str, Sequence[float]], what: str) -> dict[str, np.ndarray]:
    if not per_task:
        raise ValueError(f"{what}: needs per-example scores of at least one task")
    return {task: _array(scores, f"{what}: task {task!r}") for task, scores in per_task.items()}


def over_tasks_interval(
    per_task: Mapping[str, Sequence[float]],
    reduce: Callable[[np.ndarray], np.ndarray],
    *,
    confidence: float = CONFIDENCE,
    n_resamples: int = N_BOOTSTRAP,
    seed: int = SEED,
) -> dict[str, Any]:
    """A statistic of the per-task mean scores with a stratified bootstrap interval.

    Args:
        per_task: ``{task: per-example scores of its primary metric}``.
        reduce: maps the task means, an array of shape ``(T, ...)``, to the statistic, shape ``(...)``
            (e.g. ``lambda m: m.mean(axis=0)`` for the average, ``m.min(axis=0)`` for the worst task).
    """
    arrays = list(_per_task_arrays(per_task, "over_tasks_interval").values())
    value = float(reduce(np.array([a.mean() for a in arrays])))
    n = sum(a.size for a in arrays)
    if min(a.size for a in arrays) < 2:
        return _interval(value, None, None, "stratified bootstrap", n)

    def statistic(ix: list[np.ndarray]) -> np.ndarray:
        return reduce(np.stack([a[i].mean(axis=-1) for a, i in zip(arrays, ix, strict=True)]))

    low, high = _stratified_bootstrap(
        [a.size for a in arrays], statistic, confidence=confidence, n_resamples=n_resamples, seed=seed
    )
    return _interval(value, low, high, "stratified bootstrap", n)


def average_interval(per_task: Mapping[str, Sequence[float]], **kwargs: Any) -> dict[str, Any]:
    """The unweighted average over tasks of each task's mean score, with a stratified bootstrap interval.

    Args:
        per_task: ``{task: per-example scores of its primary metric}``.
        kwargs: ``confidence``, ``n_resamples``, ``seed``.
    """
    return over_tasks_interval(per_task, lambda means: means.mean(axis=0), **kwargs)


def _baseline_pairs(
    arrays: Mapping[str, np.ndarray], baselines: Mapping[str, float | Sequence[float]]
) -> tuple[list[str], list[tuple[np.ndarray, np.ndarray]]]:
    """(tasks, [(run scores, baseline scores)]) of the tasks with a non-zero baseline; numbers broadcast."""
    pairs: list[tuple[np.ndarray, np.ndarray]] = []
    used: list[str] = []
    for task, scores in arrays.items():
        if task not in baselines or baselines[task] is None:
            continue
        base = np.asarray(baselines[task], dtype=float)
        if base.ndim == 0:
            base = np.full(scores.size, float(base))
        elif base.shape != scores.shape:
            raise ExampleMismatchError(
                f"delta_m_interval: task {task!r} has {scores.size} scores but {base.size} baseline scores; "
                "score both on the same test examples"
            )
        if base.mean() != 0.0:
            pairs.append((scores, base))
            used.append(task)
    return used, pairs


def delta_m_interval(
    per_task: Mapping[str, Sequence[float]],
    baselines: Mapping[str, float | Sequence[float]],
    *,
    confidence: float = CONFIDENCE,
    n_resamples: int = N_BOOTSTRAP,
    seed: int = SEED,
) -> dict[str, Any] | None:
    """Δm% = (1/T) Σ_t (M_single,t − M_multi,t) / M_single,t × 100 with a stratified bootstrap interval.

    Args:
        per_task: ``{task: per-example primary scores of the multi-task model}``.
        baselines: ``{task: single-task baseline}``, either a fixed number (then only the multi-task
            scores vary) or the single-task model's per-example scores on the SAME examples (then
            both are resampled together, example by example).

    Returns:
        The interval dict over the tasks that have a non-zero baseline, plus ``"tasks"`` (those
        used); None when no task has one.

    Raises:
        ExampleMismatchError: per-example baseline scores of another length than the task's.
    """
    arrays = _per_task_arrays(per_task, "delta_m_interval")
    used, pairs = _baseline_pairs(arrays, baselines)
    if not pairs:
        return None

    def statistic(ix: list[np.ndarray]) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):  # a resampled baseline of 0: no interval
            terms = [
                (b[i].mean(-1) - s[i].mean(-1)) / b[i].mean(-1) for (s, b), i in zip(pairs, ix, strict=True)
            ]
        return 100.0 * np.mean(terms, axis=0)

    full = [np.arange(s.size) for s, _ in pairs]
    value = float(statistic(full))
    n = sum(s.size for s, _ in pairs)
    low = high = None
    if min(s.size for s, _ in pairs) >= 2:
        with warnings.catch_warnings():  # resamples with a zero baseline are nan: reported as no interval
            warnings.simplefilter("ignore", stats.DegenerateDataWarning)
            low, high = _stratified_bootstrap(
                [s.size for s, _ in pairs],
                statistic,
                confidence=confidence,
                n_resamples=n_resamples,
                seed=seed,
            )
        low, high = (None, None) if not (math.isfinite(low) and math.isfinite(high)) else (low, high)
    return {**_interval(value, low, high, "stratified bootstrap", n), "tasks": used}


def std(values: Sequence[float] | np.ndarray, ddof: int) -> float:
    """Standard deviation √(Σ (v − mean)² / (n − ddof)) (``numpy.std``).

    ``ddof=0``: population std (the spread of the tasks of one run: every task is in the population);
    ``ddof=1``: sample std (seeds or repeats drawn from a larger population). Callers state the ddof
    they used in their output.

    Raises:
        ValueError: ``ddof`` not 0 or 1, or no more than ``ddof`` values.
    """
    if ddof not in (0, 1):
        raise ValueError(f"ddof must be 0 (population) or 1 (sample), got {ddof!r}")
    array = np.asarray(values, dtype=float)
    if array.ndim != 1 or array.size <= ddof:
        raise ValueError(f"std with ddof={ddof} needs more than {ddof} values, got shape {array.shape}")
    return float(np.std(array, ddof=ddof))


def nan_mean(values: Sequence[float | None]) -> float | None:
    """Mean of the values that are not None or NaN; None when there is none."""
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return sum(kept) / len(kept) if kept else None


def seed_summary(values: Sequence[float]) -> dict[str, Any]:
    """Mean ± sample std (ddof = 1) of one score over seeds, with the per-seed values kept.

    Returns:
        ``{"mean", "std" (None for one seed), "ddof": 1, "n_seeds", "values"}``.
    """
    array = _array(values, "seed_summary")
    spread = std(array, STD_DDOF) if array.size > STD_DDOF else None
    return {"mean": float(array.mean()), "std": spread, "ddof": STD_DDOF, "n_seeds": int(array.size),
            "values": [float(v) for v in array]}  # fmt: skip


def _mean_difference(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.sum(x - y, axis=axis)


ZERO_SUM = 1e-9
"""A sum of paired differences below this fraction of the sum of their sizes is 0 (rounding noise): its
sign-flip p-value is 1 (to within 1e-6 even if it was not noise: the sign flips' sums spread over
√(Σ d²) ≥ Σ |d| / √n)."""


def _sign_flip_pvalue(weighted_a: np.ndarray, weighted_b: np.ndarray, n_resamples: int, seed: int) -> float:
    """Two-sided p-value of Σ (a_i − b_i) under random swaps of a_i and b_i (``permutation_type="samples"``)."""
    differences = weighted_a - weighted_b
    if abs(float(differences.sum())) <= ZERO_SUM * float(np.abs(differences).sum()):
        # a difference of 0 (+1 on 20 examples, −1 on 20 others): every sign flip reaches it, p = 1. scipy
        # counts a flip as reaching it within a tolerance relative to it, so a sum of 0 computed as 1e-17
        # and flips that sum to 0 computed as −1e-17 were not counted: p = 0.87 there
        return 1.0
    # a pair with a − b = 0 adds 0 to every sign flip's sum, so leaving it out gives the same null
    # distribution; with fewer pairs, scipy enumerates all 2^n flips exactly when 2^n ≤ n_resamples
    # instead of estimating p from random flips (tasks scored 0/1 have many ties)
    nonzero = differences != 0
    if int(nonzero.sum()) < 2:
        return 1.0  # one non-zero pair: both of its sign flips reach |a − b|, p = 2/2 (scipy needs two)
    sizes = np.abs(differences[nonzero])
    if np.allclose(sizes, sizes[0], rtol=1e-9, atol=0.0):
        # every non-zero difference has one size w (0/1 scores; tasks of equal size for the average): the
        # flips' sum is w·(2K − n), K ~ Binomial(n, 1/2), so the exact p is the two-sided sign test's
        # (scipy's binomtest sums the outcomes no likelier than the observed one: |2K − n| ≥ |2k − n|)
        return float(stats.binomtest(int((differences > 0).sum()), int(nonzero.sum()), 0.5).pvalue)
    result = stats.permutation_test(
        (weighted_a[nonzero], weighted_b[nonzero]),
        _mean_difference,
        permutation_type="samples",
        vectorized=True,
        n_resamples=n_resamples,
        alternative="two-sided",
        rng=np.random.default_rng(seed),
    )
    return float(min(1.0, result.pvalue))


def _paired_arrays(
    per_task_a: Mapping[str, Sequence[float]], per_task_b: Mapping[str, Sequence[float]], what: str
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The two runs' scores as arrays, task by task in A's order; ExampleMismatchError when their tasks or a
    task's number of examples differ."""
    if set(per_task_a) != set(per_task_b):
        raise ExampleMismatchError(
            f"the runs cover different tasks: {sorted(per_task_a)} vs {sorted(per_task_b)}"
        )
    a = _per_task_arrays(per_task_a, f"{what} (run A)")
    b = _per_task_arrays({t: per_task_b[t] for t in a}, f"{what} (run B)")
    for task in a:
        if a[task].size != b[task].size:
            raise ExampleMismatchError(
                f"task {task!r}: run A has {a[task].size} scored examples, run B {b[task].size}; "
                "a paired test needs the same test examples"
            )
    return a, b


def paired_average_test(
    per_task_a: Mapping[str, Sequence[float]],
    per_task_b: Mapping[str, Sequence[float]],
    *,
    confidence: float = CONFIDENCE,
    n_resamples: int = N_BOOTSTRAP,
    n_permutations: int = N_PERMUTATIONS,
    seed: int = SEED,
) -> dict[str, Any]:
    """Paired test of run A against run B on the average over tasks of the per-task mean score.

    The difference is D = (1/T) Σ_t mean_i (a_ti − b_ti). Its p-value comes from a sign-flip
    permutation test (H0: within each example, A's and B's scores are exchangeable), its interval
    from a stratified paired bootstrap (examples resampled within each task, A and B together).

    Args:
        per_task_a, per_task_b: ``{task: per-example scores}``, the same tasks with the same
            examples in the same order.

    Returns:
        ``{"difference", "low", "high", "p_value", "n", "method"}``; ``low``/``high`` None
        below 2 examples in a task.

    Raises:
        ExampleMismatchError: different tasks, or a task with different numbers of examples.
    """
    a, b = _paired_arrays(per_task_a, per_task_b, "paired_average_test")
    diffs = [a[t] - b[t] for t in a]
    # weight 1/(T·n_t) per example: Σ_j w_j (a_j − b_j) is D, and a sign flip of a pair swaps its terms
    weights = np.concatenate([np.full(d.size, 1.0 / (len(diffs) * d.size)) for d in diffs])
    flat_a = np.concatenate([a[t] for t in a]) * weights
    flat_b = np.concatenate([b[t] for t in a]) * weights
    difference = float(np.mean([d.mean() for d in diffs]))
    p_value = _sign_flip_pvalue(flat_a, flat_b, n_permutations, seed)
    low = high = None
    if min(d.size for d in diffs) >= 2:
        low, high = _stratified_bootstrap(
            [d.size for d in diffs],
            lambda ix: np.mean([d[i].mean(axis=-1) for d, i in zip(diffs, ix, strict=True)], axis=0),
            confidence=confidence,
            n_resamples=n_resamples,
            seed=seed,
        )
    return {"difference": difference, "low": low, "high": high, "p_value": p_value, "n": int(weights.size),
            "method": "paired permutation (sign flips) + stratified paired bootstrap"}  # fmt: skip


def paired_test(a: Sequence[float], b: Sequence[float], **kwargs: Any) -> dict[str, Any]:
    """Paired test of mean(a − b) on one task's examples (see :func:`paired_average_test`)."""
    return paired_average_test({"task": a}, {"task": b}, **kwargs)


def holm_adjusted(tests: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """``tests`` with ``"p_holm"`` added to each per-task test (every key but ``"average"``): its p-value
    adjusted by Holm's step-down procedure over the tasks (statsmodels' ``multipletests``), so that calling
    each task with ``p_holm`` < 0.05 a difference keeps the chance of any false call among them at 5 %.

    Holm: sort the T p-values, p_(1) ≤ ... ≤ p_(T); the k-th becomes max_{j ≤ k} min(1, (T − j + 1)·p_(j)).
    The average's test is one test of its own and is left as it is.
    """
    tasks = [t for t in tests if t != "average"]
    out = {t: dict(test) for t, test in tests.items()}
    for task, p in zip(tasks, holm([tests[t]["p_value"] for t in tasks]), strict=True):
        out[task]["p_holm"] = p
    return out


def holm(p_values: Sequence[float]) -> list[float]:
    """The p-values adjusted by Holm's step-down procedure (statsmodels' ``multipletests``; see
    :func:`holm_adjusted`), in their order; ``[]`` for none."""
    if not p_values:
        return []
    return [float(p) for p in multipletests(list(p_values), method="holm")[1]]


def compare_examples(
    examples_a: Mapping[str, Sequence[Mapping[str, Any]]],
    examples_b: Mapping[str, Sequence[Mapping[str, Any]]],
    primary: Mapping[str, str],
    **kwargs: Any,
) -> dict[str, dict[str, Any]]:
    """Paired tests of run A against run B per task and on the average over tasks.

    Args:
        examples_a, examples_b: ``{task: [{"key": example id, "scores": {metric: value}}, ...]}``
            as written to ``per_example.jsonl``.
        primary: ``{task: metric}`` compared on each task.

    Examples are paired by key: B's rows of a task may list A's examples in another order (keys unique).

    Returns:
        ``{task: paired test, ..., "average": paired test}`` (see :func:`paired_average_test`),
        each with the ``"metric"`` used (``"average"``: ``"primary"``); each task's with ``"p_holm"``,
        its p-value adjusted over the tasks (:func:`holm_adjusted`).

    Raises:
        ExampleMismatchError: the runs share no task, or a shared task was scored on other examples
            (the message names the task and both counts).
    """
    tasks = [t for t in examples_a if t in examples_b]
    if not tasks:
        raise ExampleMismatchError(
            f"the runs share no task: A has {sorted(examples_a)}, B has {sorted(examples_b)}"
        )
    scores_a: dict[str, list[float]] = {}
    scores_b: dict[str, list[float]] = {}
    for task in tasks:
        keys_a = [row["key"] for row in examples_a[task]]
        keys_b = [row["key"] for row in examples_b[task]]
        rows_b = examples_b[task]
        if keys_a != keys_b and sorted(keys_a) == sorted(keys_b) and len(set(keys_a)) == len(keys_a):
            # the same examples in another order (e.g. scored with another eval.batch_size): pair them by key
            by_key = {row["key"]: row for row in rows_b}
            rows_b, keys_b = [by_key[k] for k in keys_a], keys_a
        if keys_a != keys_b:
            same = len(set(keys_a) & set(keys_b))
            raise ExampleMismatchError(
                f"task {task!r}: run A was scored on {len(keys_a)} examples and run B on {len(keys_b)} "
                f"({same} in common); re-evaluate both on the same test split (same data.seed, "
                "data.max_test and eval.max_examples)"
            )
        metric = primary[task]
        scores_a[task] = [float(row["scores"][metric]) for row in examples_a[task]]
        scores_b[task] = [float(row["scores"][metric]) for row in rows_b]
    out = {t: {**paired_average_test({t: scores_a[t]}, {t: scores_b[t]}, **kwargs), "metric": primary[t]}
           for t in tasks}  # fmt: skip
    out["average"] = {**paired_average_test(scores_a, scores_b, **kwargs), "metric": "primary"}
    return holm_adjusted(out)


def with_example_scores(
    examples: Mapping[str, Sequence[Mapping[str, Any]]], primary: Mapping[str, str]
) -> dict[str, Sequence[Mapping[str, Any]]]:
    """The tasks whose rows hold a per-example score of the task's primary metric.

    A corpus-level metric (BLEU pools n-gram counts over the corpus) has no per-example score, so its
    tasks get no interval and no paired test (:func:`asymlora.eval.scoring.evaluate_task`).
    """
    return {
        task: rows
        for task, rows in examples.items()
        if rows and all(primary[task] in row["scores"] for row in rows)
    }


def run_intervals(
    examples: Mapping[str, Sequence[Mapping[str, Any]]],
    primary: Mapping[str, str],
    baselines: Mapping[str, float | Sequence[float]] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """The intervals of one run from its per-example rows (as written to ``per_example.jsonl``).

    Args:
        examples: ``{task: [{"scores": {metric: value}, ...}, ...]}``.
        primary: ``{task: primary metric}``; intervals are on each task's primary metric.
        baselines: single-task baselines for Δm% (see :func:`delta_m_interval`), or None.
        kwargs: ``confidence``, ``n_resamples``, ``seed``.

    Returns:
        ``{"per_task": {task: interval}, "average": interval, "worst": interval (of the lowest
        task mean), "std_over_tasks": interval (population std of the task means), "delta_m":
        interval | None, "no_example_scores": [tasks whose primary metric is corpus-level, without
        intervals; then the over-task intervals are None too], "confidence": level}``.
    """
    scored = with_example_scores(examples, primary)
    per_task = {task: [float(row["scores"][primary[task]]) for row in rows] for task, rows in scored.items()}
    whole = bool(per_task) and len(scored) == len(examples)  # over-task intervals need every task
    return {
        "per_task": {
            task: metric_interval(values, primary[task], **kwargs) for task, values in per_task.items()
        },
        "average": average_interval(per_task, **kwargs) if whole else None,
        "worst": over_tasks_interval(per_task, lambda means: means.min(axis=0), **kwargs) if whole else None,
        "std_over_tasks": (
            over_tasks_interval(per_task, lambda means: means.std(axis=0), **kwargs) if whole else None
        ),
        "delta_m": delta_m_interval(per_task, baselines, **kwargs) if baselines and whole else None,
        "no_example_scores": sorted(set(examples) - set(scored)),
        "confidence": kwargs.get("confidence", CONFIDENCE),
    }


def format_interval(
    value: float | None, low: float | None = None, high: float | None = None, digits: int = 3
) -> str:
    """``"0.625 [0.470, 0.760]"``; the bare value when there is no interval; ``"–"`` for None."""
    if value is None:
        return "–"
    if low is None or high is None:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


NO_DIFFERENCE = 1e-12
"""A mean difference smaller than this is none: differences that cancel (+2/5, −3/5, +1/5 over three tasks)
leave rounding noise (1e-17), at which no sample size is defined (statsmodels' root finder gives NaN)."""


NO_SPREAD = 1e-9
"""A standard deviation below this fraction of the largest difference's size is none: differences that are equal
but computed along different paths differ by rounding (three seeds at which A beats B on the same 5 of 100
examples give 0.55 − 0.50, 0.60 − 0.55, 0.45 − 0.40 = 0.050000000000000044, 0.04999999999999993,
0.04999999999999999, a std of 6e-17), and a t statistic or a sample size computed from that spread describes the
rounding (t = 1.6e15, p = 4e-31; "≈ 2 test examples" for 4 that all differ by 1/3)."""


def _no_spread(std: float, values: np.ndarray) -> bool:
    """Whether ``std`` (of ``values``, or pooled over them) is 0 or rounding noise (`NO_SPREAD`)."""
    return std <= NO_SPREAD * float(np.max(np.abs(values)))


EXACT_SIZE_BELOW = 10**6
"""Sample sizes below this are checked against the t-test's power at n and n − 1 (`_t_power`)."""


def _t_power(effect: float, n: int, alpha: float) -> float:
    """Power of the two-sided one-sample t-test at level ``alpha`` with ``n`` observations and standardised
    effect ``effect`` > 0: P(T > c) + P(T < −c), T noncentral t (n − 1 degrees of freedom, noncentrality
    effect·√n), each tail as scipy's ``nct.sf`` (P(T < −c) = P(T' > c) with T' of noncentrality −effect·√n).
    statsmodels' ``TTestPower.power`` is the same number where it is finite, but NaN from an effect of
    about 4 at n = 2 to 5 (its lower tail, ``nct.cdf(−c)``, is NaN there)."""
    df, nc = n - 1, effect * math.sqrt(n)
    crit = stats.t.ppf(1 - alpha / 2, df)
    return float(stats.nct.sf(crit, df, nc) + stats.nct.sf(crit, df, -nc))


def _sample_size(effect: float, power: float, alpha: float) -> int | None:
    """The smallest n at which a two-sided one-sample t-test at level ``alpha`` detects a standardised
    effect ``effect`` (mean / std of one observation) with probability ``power`` (statsmodels'
    ``TTestPower.solve_power``, then checked against the power at n and n − 1, `_t_power`); 2 when even that
    many suffice; None for no effect. Where the root finder fails (NaN) the z-test's n,
    ((z_(1−α/2) + z_power) / effect)², is the start: below an effect of about 1e-9 (n ~1e17 or more, where
    the t-test is the z-test), and above an effect of about 5, where statsmodels' power is NaN at small n and
    the z-test's n (below 1) is too small: an effect of 6 needs 3 observations (power 0.49 at n = 2)."""
    if not effect > 0 or not math.isfinite(effect):
        return None
    if _t_power(effect, 2, alpha) >= power:
        return 2  # the root finder has no root above n = 2 to find (it warns and gives nan)
    with warnings.catch_warnings():  # its ConvergenceWarning: the NaN is replaced below
        warnings.simplefilter("ignore", ConvergenceWarning)
        n = TTestPower().solve_power(effect_size=effect, alpha=alpha, power=power, alternative="two-sided")
    if not math.isfinite(n):
        n = ((stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)) / effect) ** 2
    size = max(2, math.ceil(n))
    if size < EXACT_SIZE_BELOW:  # the smallest n whose power reaches ``power`` (power grows with n)
        while size > 2 and _t_power(effect, size - 1, alpha) >= power:
            size -= 1
        while _t_power(effect, size, alpha) < power:
            size += 1
    return size


def examples_to_resolve(
    per_task_a: Mapping[str, Sequence[float]],
    per_task_b: Mapping[str, Sequence[float]],
    *,
    power: float = POWER,
    confidence: float = CONFIDENCE,
) -> int | None:
    """Test examples per task at which the paired test on the average over tasks (`paired_average_test`)
    would detect the observed difference with probability ``power`` (two-sided, level 1 − ``confidence``).

    With n examples in each of the T tasks, D = (1/T) Σ_t mean_i d_ti has variance Σ_t σ_t² / (T² n), σ_t²
    the sample variance (ddof 1) of task t's paired differences d_ti = a_ti − b_ti; so D is a one-sample mean of
    n observations of standard deviation s = sqrt(Σ_t σ_t²) / T, and n solves the t-test's power at effect
    |D| / s (`_sample_size`). It holds the examples' difficulty mix and the seeds fixed.

    A task of one example has no sample variance (ddof 1 divides by 0); taking it as 0 would understate s and so
    the examples needed. Its σ_t² is instead the pooled variance of the tasks with two examples or more,
    Σ_u (n_u − 1) σ_u² / Σ_u (n_u − 1) (the pooled estimate of a common variance, as the two-sample t-test's).

    Returns None when D = 0 (below `NO_DIFFERENCE`), every difference is the same (to rounding, `NO_SPREAD`),
    or no task has two examples (no variance to estimate). Raises ExampleMismatchError as `paired_average_test`."""
    a, b = _paired_arrays(per_task_a, per_task_b, "examples_to_resolve")
    diffs = [a[t] - b[t] for t in a]
    difference = float(np.mean([d.mean() for d in diffs]))
    spread = _pooled_spread(diffs)
    if spread is None or _no_spread(spread, np.concatenate(diffs)) or abs(difference) < NO_DIFFERENCE:
        return None
    return _sample_size(abs(difference) / spread, power, 1 - confidence)


def _pooled_spread(diffs: Sequence[np.ndarray]) -> float | None:
    """sqrt(Σ_t σ_t²) / T over the T tasks' paired differences, σ_t² of a one-example task the pooled ddof-1
    variance of the others (`examples_to_resolve`); None when no task has two examples."""
    several = [d for d in diffs if d.size > 1]
    if not several:
        return None
    pooled = sum(float(np.var(d, ddof=1)) * (d.size - 1) for d in several) / sum(d.size - 1 for d in several)
    variances = [float(np.var(d, ddof=1)) if d.size > 1 else pooled for d in diffs]
    return math.sqrt(sum(variances)) / len(diffs)


MIN_SEEDS_FOR_TEST = 3
"""Fewest seeds `seed_test` tests: with 2, the t-test has 1 degree of freedom and its 95 % interval is the mean
± 12.7 standard errors, which says nothing a reader can use."""


def seed_test(differences: Sequence[float], *, confidence: float = CONFIDENCE) -> dict[str, Any] | None:
    """One-sample t-test of per-seed differences (A − B, one value per seed, e.g. of the average over tasks)
    against 0, two-sided (scipy's ``ttest_1samp``): ``{"difference": mean, "low", "high" (the t interval at
    ``confidence``), "p_value", "t", "seeds": n, "method": "t over seeds"}``.

    Where `paired_test` asks whether two runs differ on these test examples *at these seeds*, this asks whether
    the difference would recur at other seeds (seed-to-seed spread as the noise). None below
    `MIN_SEEDS_FOR_TEST` seeds or when every seed gives the same difference (to rounding, `NO_SPREAD`: no
    spread, t undefined). Raises ValueError for a non-finite difference (`_array`)."""
    values = _array(differences, "seed_test")
    if values.size < MIN_SEEDS_FOR_TEST or _no_spread(float(np.std(values, ddof=1)), values):
        return None
    result = stats.ttest_1samp(values, 0.0)
    ci = result.confidence_interval(confidence)
    return {
        "difference": float(values.mean()),
        "low": float(ci.low),
        "high": float(ci.high),
        "p_value": float(result.pvalue),
        "t": float(result.statistic),
        "seeds": int(values.size),
        "method": "t over seeds",
    }


def seeds_to_resolve(
    differences: Sequence[float], *, power: float = POWER, confidence: float = CONFIDENCE
) -> int | None:
    """Seeds at which a one-sample t-test over per-seed differences (A − B, one value per seed, e.g. of
    the average over tasks) would detect their observed mean with probability ``power`` (two-sided, level
    1 − ``confidence``): effect = |mean| / sample std (ddof 1). None below 2 seeds, when every seed
    gives the same difference (to rounding, `NO_SPREAD`), or when their mean is 0 (below `NO_DIFFERENCE`)."""
    values = _array(differences, "seeds_to_resolve")
    if values.size < 2:
        return None
    spread = float(np.std(values, ddof=1))
    if _no_spread(spread, values) or abs(float(values.mean())) < NO_DIFFERENCE:
        return None
    return _sample_size(abs(float(values.mean())) / spread, power, 1 - confidence)
