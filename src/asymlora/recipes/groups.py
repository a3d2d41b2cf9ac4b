"""The groups of a sweep report: the ledger's records of one config over its seeds (`asymlora.recipes.sweep`
for multi-task cells, `asymlora.recipes.fed_sweep` for federated ones)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any


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
