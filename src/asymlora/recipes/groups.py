"""The groups of a sweep report: the ledger's records of one config over its seeds (`asymlora.recipes.sweep`
for multi-task cells, `asymlora.recipes.fed_sweep` for federated ones)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

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


ExampleRows = Callable[[dict[str, Any], str], "Mapping[str, Any] | None"]
"""(a record, a unit) -> that unit's per-example scores in the record, ``{"keys": hash, "scores": [...]}``,
or None when the record has none."""


def paired_over_seeds(
    ref: SeedGroup, peer: SeedGroup, units: Sequence[str], examples: ExampleRows
) -> dict[str, Any] | None:
    """Paired tests of ``ref`` against ``peer`` per unit (a task, or a federated client) and on the average
    over units (`asymlora.eval.stats.paired_test`, `paired_average_test`), on the seeds both groups have, each
    example's score averaged over those seeds: ``{"seeds": [...], "tests": {unit: ..., "average": ...}}``.
    None when they share no seed, or a unit lacks per-example scores or was scored on other examples."""
    seeds = [s for s in ref.seeds if s in peer.seeds]
    if not seeds:
        return None
    a: dict[str, list[float]] = {}
    b: dict[str, list[float]] = {}
    for unit in units:
        rows_a = [examples(ref.by_seed(s), unit) for s in seeds]
        rows_b = [examples(peer.by_seed(s), unit) for s in seeds]
        rows = rows_a + rows_b
        if any(r is None for r in rows) or len({r["keys"] for r in rows if r is not None}) != 1:
            return None  # scored on other examples (or without per-example scores): no paired test
        a[unit] = _seed_mean([r["scores"] for r in rows_a if r is not None])
        b[unit] = _seed_mean([r["scores"] for r in rows_b if r is not None])
    tests: dict[str, Any] = {unit: stats.paired_test(a[unit], b[unit]) for unit in units}
    tests["average"] = stats.paired_average_test(a, b)
    return {"seeds": seeds, "tests": tests}


def _seed_mean(scores: Sequence[Sequence[float]]) -> list[float]:
    """Each example's score averaged over the seeds (one score list per seed, aligned by example)."""
    return [sum(col) / len(scores) for col in zip(*scores, strict=True)]
