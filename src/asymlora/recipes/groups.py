"""The groups of a sweep report: the ledger's records of one config over its seeds (`asymlora.recipes.sweep`
for multi-task cells, `asymlora.recipes.fed_sweep` for federated ones)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from asymlora.eval import stats


@dataclasses.dataclass
class SeedGroup:
    """The records of one config over seeds, one record per seed, sorted by seed; ``label`` names the config."""

    label: str
    records: list[dict[str, Any]]

    @property
    def seeds(self) -> list[int]:
        return [r["seed"] for r in self.records]

    def by_seed(self, seed: int) -> dict[str, Any]:
        return next(r for r in self.records if r["seed"] == seed)


def config_key(config: Mapping[str, Any]) -> str:
    """8 hex digits of the sha256 of ``config`` as sorted-key JSON: records with equal keys form one group
    (the caller blanks what varies within a group: the seed, the run directory)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]


def reference_names(reference: str | Sequence[str] | None) -> list[str]:
    """``report.reference`` as a list: one method (strategy) name, several (each once, in their order), or none
    (`reference_pairs`)."""
    if reference is None:
        return []
    return [reference] if isinstance(reference, str) else list(dict.fromkeys(reference))


def rank(names: Sequence[str], name: str) -> int | None:
    """``name``'s place in ``names`` (`reference_names`), None when it is not there: a `reference_pairs` rank."""
    return names.index(name) if name in names else None


G = TypeVar("G", bound=SeedGroup)


def reference_pairs(
    groups: Sequence[G], rank: Callable[[G], int | None], comparable: Callable[[G, G], bool]
) -> Iterator[tuple[G, G]]:
    """The (A, B) pairs a report tests: every reference group (``rank`` not None: its method's place in
    ``report.reference``) as A against every ``comparable`` group, references in ``report.reference`` order then
    ledger order, and each pair once: no A − A, and no B − A after A − B (two reference groups, e.g. Fed-ALoRA
    and local-only, are tested once, with the one named first in ``report.reference`` as A)."""
    refs = sorted((g for g in groups if rank(g) is not None), key=lambda g: rank(g) or 0)  # sort is stable
    seen: set[frozenset[int]] = set()
    for ref in refs:
        for peer in groups:
            pair = frozenset((id(ref), id(peer)))
            if peer is ref or pair in seen or not comparable(ref, peer):
                continue
            seen.add(pair)
            yield ref, peer


def latest_per_cell(
    records: Sequence[dict[str, Any]], cell: Callable[[dict[str, Any]], Any]
) -> list[dict[str, Any]]:
    """One record per cell (``cell``: a record's cell, e.g. its config without the seed and its seed), the last
    one recorded, in the order of each cell's first record: a cell recorded twice (again after a kill, shard
    ledgers concatenated with an overlap) or under the id older code gave it counts once, with its last record."""
    latest: dict[Any, dict[str, Any]] = {}
    for record in records:
        latest[cell(record)] = record
    return list(latest.values())


ExampleRows = Callable[[dict[str, Any], str], "Mapping[str, Any] | None"]
"""(a record, a unit) -> that unit's per-example scores in the record, ``{"keys": hash, "scores": [...]}``,
or None when the record has none."""


def paired_over_seeds(
    ref: SeedGroup, peer: SeedGroup, units: Sequence[str], examples: ExampleRows
) -> dict[str, Any] | str:
    """Paired tests of ``ref`` against ``peer`` per unit (a task, or a federated client) and on the average
    over units (`asymlora.eval.stats.paired_test`, `paired_average_test`), on the seeds both groups have, each
    example's score averaged over those seeds: ``{"seeds": [...], "tests": {unit: ..., "average": ...},
    "left_out": [...]}``.

    A unit without per-example scores in any of those records (a corpus-level metric such as BLEU) has no test
    and is left out of the average's (``left_out``), which is then the average over the other units. None when
    the groups share no seed, no unit has per-example scores, or a unit was scored on other examples (or has
    per-example scores in some of the records only): then why, in words, for the report to say (`paired_lines`)."""
    seeds = [s for s in ref.seeds if s in peer.seeds]
    if not seeds:
        return f"no seed in common (seeds {ref.seeds} and {peer.seeds})"
    a: dict[str, list[float]] = {}
    b: dict[str, list[float]] = {}
    left_out: list[str] = []
    unit_diffs: list[list[float]] = []  # per unit, per seed: mean(A) − mean(B)
    for unit in units:
        rows_a = [examples(ref.by_seed(s), unit) for s in seeds]
        rows_b = [examples(peer.by_seed(s), unit) for s in seeds]
        rows = rows_a + rows_b
        if all(r is None for r in rows):  # a corpus-level metric: no per-example scores to pair
            left_out.append(unit)
            continue
        if any(r is None for r in rows):
            return f"{unit}: per-example scores in some of the records of seeds {seeds} only"
        if len({r["keys"] for r in rows if r is not None}) != 1:
            first = rows_a[0]["keys"]  # type: ignore[index]
            other = [f"{g.label} seed {s}" for g, group_rows in ((ref, rows_a), (peer, rows_b))
                     for s, r in zip(seeds, group_rows, strict=True) if r["keys"] != first]  # type: ignore[index]  # fmt: skip
            return (f"{unit}: scored on other test examples in {', '.join(other)} than in {ref.label} seed "
                    f"{seeds[0]} (their example keys differ: another data.seed, data.max_test or "
                    "eval.max_examples)")  # fmt: skip
        scores_a = [r["scores"] for r in rows_a if r is not None]
        scores_b = [r["scores"] for r in rows_b if r is not None]
        a[unit], b[unit] = _seed_mean(scores_a), _seed_mean(scores_b)
        unit_diffs.append(
            [sum(x) / len(x) - sum(y) / len(y) for x, y in zip(scores_a, scores_b, strict=True)]
        )
    if not a:
        return f"no per-example scores to pair ({', '.join(left_out)}: corpus-level metrics such as BLEU)"
    tests: dict[str, Any] = {unit: stats.paired_test(a[unit], b[unit]) for unit in a}
    tests["average"] = stats.paired_average_test(a, b)
    tests = stats.holm_adjusted(tests)  # each unit's p also adjusted over the units (`p_holm`)
    per_seed = [sum(col) / len(col) for col in zip(*unit_diffs, strict=True)]  # the average's, per seed
    return {"seeds": seeds, "tests": tests, "resolve": _resolve(seeds, a, b, per_seed), "left_out": left_out}


def _resolve(
    seeds: Sequence[int],
    a: Mapping[str, Sequence[float]],
    b: Mapping[str, Sequence[float]],
    per_seed: list[float],
) -> dict[str, Any]:
    """What would resolve the average's difference at 80 % power: test examples per unit (with these seeds,
    `stats.examples_to_resolve`) or seeds (from the per-seed differences of the average,
    `stats.seeds_to_resolve`), and the numbers there are now; the per-seed differences of the average and their
    t-test over seeds (`stats.seed_test`, None below 3 seeds)."""
    return {
        "examples_per_unit": stats.examples_to_resolve(a, b),
        "examples_now": min(len(v) for v in a.values()),
        "seeds": stats.seeds_to_resolve(per_seed),
        "seeds_now": len(seeds),
        "per_seed_differences": per_seed,
        "seed_test": stats.seed_test(per_seed),
    }


def holm_over_pairs(paired: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``paired`` (a report's pair tests, `paired_over_seeds` with ``a`` and ``b``) with ``p_holm_pairs`` in each
    pair's average test: its p-value adjusted by Holm's procedure over the report's pairs (`stats.holm`), so that
    calling every pair with ``p_holm_pairs`` < 0.05 a difference keeps the chance of any false call among the
    page's pairs at 5 % (the more pairs a page tests, the more cross p < 0.05 by chance). Pairs with a
    ``family`` (a string; none: ``""``) are corrected within their family, each family answering its own
    question (e.g. the float32 cells of a campaign apart from its earlier bf16 ones: `fed_sweep.summarize`)."""
    families: dict[str, list[int]] = {}
    for i, p in enumerate(paired):
        families.setdefault(p.get("family", ""), []).append(i)
    q = [0.0] * len(paired)
    for members in families.values():
        for i, adjusted in zip(
            members, stats.holm([paired[i]["tests"]["average"]["p_value"] for i in members]), strict=True
        ):
            q[i] = adjusted
    return [
        {**p, "tests": {**p["tests"], "average": {**p["tests"]["average"], "p_holm_pairs": q[i]}}}
        for i, p in enumerate(paired)
    ]


def paired_lines(
    paired: Sequence[Mapping[str, Any]],
    units: Sequence[str],
    intro: str,
    unit: str,
    unpaired: Sequence[Mapping[str, Any]] = (),
) -> list[str]:
    """The markdown of a report's paired tests: a table (A − B per ``units`` and on the average, interval and
    p-value), the ``unit``s left out of a test (`paired_over_seeds`: no per-example scores) and, for each average
    the test does not resolve (p ≥ 0.05), how many test examples per ``unit`` (a task, a client) or seeds would
    resolve a difference of its size; then the pairs with no paired test and why (``unpaired``: ``{"a", "b",
    "why"}``, what `paired_over_seeds` said), so that no comparison leaves the page without a word."""
    none = [f"- {p['a']} − {p['b']}: {p['why']}" for p in unpaired]
    none = ["", "No paired test of:", "", *none] if none else []
    if not paired:
        return none
    lines = ["", intro, "", "| A | B | seeds | " + " | ".join([*units, "average"]) + " |",
             "|---|---|---|" + "---:|" * (len(units) + 1)]  # fmt: skip
    for p in paired:
        cells = [
            f"{stats.format_interval(t['difference'], t['low'], t['high'])} (p={t['p_value']:.3g})"
            if t
            else "–"
            for t in (p["tests"].get(name) for name in [*units, "average"])
        ]
        lines.append(
            f"| {p['a']} | {p['b']} | {','.join(map(str, p['seeds']))} | " + " | ".join(cells) + " |"
        )
    partial = [f"- {p['a']} − {p['b']}: {', '.join(p['left_out'])}" for p in paired if p.get("left_out")]
    if partial:
        lines += ["", f"Left out of the paired tests (a {unit} scored by a corpus-level metric such as BLEU has no "
                  f"per-example scores to pair); the average's test is over the other {unit}s, so its difference is "
                  f"not the difference of the averages over every {unit}:", "", *partial]  # fmt: skip
    lines += _holm_lines(paired, unit)
    lines += _pairs_holm_lines(paired)
    lines += _seed_test_lines(paired)
    unresolved = [
        _resolve_line(p, unit) for p in paired if p["tests"]["average"]["p_value"] >= 1 - stats.CONFIDENCE
    ]
    if unresolved:
        lines += ["", f"Averages the paired test does not resolve (p ≥ {1 - stats.CONFIDENCE:.2g}), and what would "
                  f"detect a difference of that size with {stats.POWER:.0%} power (two-sided, from the measured "
                  "variance; `asymlora.eval.stats.examples_to_resolve`, `seeds_to_resolve`):", "", *unresolved]  # fmt: skip
    return lines + none


def _holm_lines(paired: Sequence[Mapping[str, Any]], unit: str) -> list[str]:
    """Each pair's per-``unit`` differences that stay significant after Holm's correction over its units."""
    alpha = 1 - stats.CONFIDENCE
    lines = []
    for p in paired:
        held = [
            (name, t) for name, t in p["tests"].items() if t.get("p_holm") is not None and t["p_holm"] < alpha
        ]
        found = ", ".join(f"{name} {t['difference']:+.3f} (p_Holm={t['p_holm']:.3g})" for name, t in held)
        lines.append(f"- {p['a']} − {p['b']}: {found or 'none'}")
    return ["", f"Per-{unit} differences that hold after Holm's correction over each pair's {unit}s (p_Holm < "
            f"{alpha:.2g}: at most a {alpha:.0%} chance of any false call among a pair's {unit}s):", "", *lines]  # fmt: skip


def _pairs_holm_lines(paired: Sequence[Mapping[str, Any]]) -> list[str]:
    """For each family (`holm_over_pairs`) of several pairs: the averages' differences that hold after Holm's
    correction over its pairs."""
    alpha = 1 - stats.CONFIDENCE
    families: dict[str, list[tuple[Mapping[str, Any], Mapping[str, Any]]]] = {}
    for p in paired:
        if "p_holm_pairs" in p["tests"]["average"]:
            families.setdefault(p.get("family", ""), []).append((p, p["tests"]["average"]))
    lines = []
    for family, tests in families.items():
        if len(tests) < 2:
            continue
        held = [f"- {p['a']} − {p['b']}: {t['difference']:+.3f} (p_Holm={t['p_holm_pairs']:.3g})"
                for p, t in tests if t["p_holm_pairs"] < alpha]  # fmt: skip
        which = f"{len(tests)} pairs" + (f" of {family}" if family else "")
        lines += ["", f"Averages that hold after Holm's correction over the page's {which} (p_Holm < {alpha:.2g}: "
                  f"at most a {alpha:.0%} chance of any false call among them):", "", *(held or ["none"])]  # fmt: skip
    return lines


def _seed_test_lines(paired: Sequence[Mapping[str, Any]]) -> list[str]:
    """For pairs with 3 seeds or more: the average's difference tested over seeds (`stats.seed_test`), beside
    its per-seed values. The table's tests hold the seeds fixed; this says whether the difference recurs."""
    lines = []
    for p in paired:
        r = p.get("resolve") or {}
        t = r.get("seed_test")
        if t is None:
            continue
        per_seed = ", ".join(f"{d:+.4f}" for d in r["per_seed_differences"])
        lines.append(f"- {p['a']} − {p['b']}: {stats.format_interval(t['difference'], t['low'], t['high'])} "
                     f"(p={t['p_value']:.3g}, t = {t['t']:.2f}, {t['seeds']} seeds); per seed {per_seed}")  # fmt: skip
    if not lines:
        return []
    return ["", f"The average's difference over seeds (pairs with {stats.MIN_SEEDS_FOR_TEST} seeds or more): a "
            f"one-sample t-test of the per-seed differences, {stats.CONFIDENCE:.0%} t interval (scipy's "
            "`ttest_1samp`, `asymlora.eval.stats.seed_test`). The table's tests hold the seeds fixed and sample "
            "test examples; this one samples seeds, so it says whether a difference would recur at other seeds:",
            "", *lines]  # fmt: skip


def _resolve_line(p: Mapping[str, Any], unit: str) -> str:
    avg, r = p["tests"]["average"], p.get("resolve") or {}
    head = f"- {p['a']} − {p['b']}: {avg['difference']:+.4f} (p={avg['p_value']:.3g})"
    if r.get("examples_per_unit") is None:
        if abs(avg["difference"]) < stats.NO_DIFFERENCE:
            return f"{head}: no difference to resolve"
        if r.get("examples_now", 0) < 2:  # a unit of one test example: no variance of its own
            return (
                f"{head}: too few test examples per {unit} to estimate their spread (now {r.get('examples_now')} "
                f"in the smallest), so there is none to size a study by: score more test examples per {unit}"
            )
        # a difference, but every example's the same: no variance to size by
        return (
            f"{head}: every test example differs by the same amount (now {r.get('examples_now')} per {unit}), "
            f"so there is no spread to size a study by: score more test examples per {unit}"
        )
    if r.get("seeds") is not None and r["seeds"] <= r["seeds_now"]:  # the seeds agree (or only 2 to tell)
        seeds = (f"more seeds (the {r['seeds_now']} per-seed differences agree so closely that, taken at face "
                 f"value, {r['seeds_now']} seeds would do, but so few seeds size their spread only roughly)")  # fmt: skip
    elif r.get("seeds") is not None:
        seeds = f"≈ {r['seeds']} seeds (now {r['seeds_now']})"
    elif r.get("seeds_now", 0) < 2:
        seeds = "more seeds (their spread needs 2 seeds or more to estimate)"
    else:
        seeds = f"more seeds (the {r['seeds_now']} seeds gave the same difference: no spread to size by)"
    return (
        f"{head}: ≈ {r['examples_per_unit']:,} test examples per {unit} (now {r['examples_now']}), or {seeds}"
    )


def _seed_mean(scores: Sequence[Sequence[float]]) -> list[float]:
    """Each example's score averaged over the seeds (one score list per seed, aligned by example)."""
    return [sum(col) / len(scores) for col in zip(*scores, strict=True)]
