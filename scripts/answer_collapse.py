"""Which federated cells answer one option for every test example of a choice task (docs/federated.md).

A personalised adapter that has collapsed onto one label scores exactly that label's share of the test split,
whatever the strategy: its differences from another cell on that client are which label the seed landed on,
not what the strategy learned. A ledger record keeps only each example's correctness, so this script rebuilds
each client's test split from the record's config (the same data code as `asymlora fed`) and checks, per cell
and client, whether the correctness vector is exactly "the target is option X" for one option X.

    python scripts/answer_collapse.py results/campaign_federated/ledger.jsonl

Prints one line per choice client: the share of each label in its test split, then the cells that answered one
label throughout (strategy, variant, rounds, seed: label). Only float32 cells and the clients of a
``clients.partition=task`` campaign are checked. A one-off diagnostic, not yet a column of the sweep report.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from asymlora.federated.config import fed_config_from_json
from asymlora.federated.partition import load_client_tasks


def _label(record: dict) -> str:
    p = record["params"]
    variant = " ".join(f"{k}={v}" for k, v in p.items() if k not in ("strategy", "seed", "rounds"))
    return f"{record['strategy']}{' ' + variant if variant else ''} r{p.get('rounds', record['rounds'])} s{p['seed']}"


def collapsed_options(targets: Sequence[str], scores: Sequence[float]) -> list[str]:
    """The options X for which ``scores`` (1.0 correct, 0.0 wrong, one per test example) is exactly "the
    target is X": the answer given to every example, when the adapter answered one option throughout; an empty
    list when it did not (at most one option: two options cannot both match one vector of mixed targets).
    Raises ValueError when the two sequences differ in length."""
    if len(targets) != len(scores):
        raise ValueError(
            f"{len(scores)} scores for {len(targets)} test examples: the record is of another test split"
        )
    return [
        x
        for x in dict.fromkeys(targets)
        if all((t == x) == (s == 1.0) for t, s in zip(targets, scores, strict=True))
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("ledger", type=Path)
    args = parser.parse_args()
    records = [json.loads(line) for line in args.ledger.read_text().splitlines() if line.strip()]
    records = [r for r in records if not (r["config"].get("train") or {}).get("mixed_precision")]
    cfg = fed_config_from_json(json.dumps(records[-1]["config"]))  # the data and clients of every cell
    if cfg.clients.partition != "task":
        raise SystemExit(
            f"clients.partition={cfg.clients.partition}: this check needs one task per client (task)"
        )
    for client in range(cfg.clients.num):
        task = load_client_tasks(cfg, client)[0]
        if task.kind != "choice":
            continue
        name = next(
            k for k in records[-1]["personalised"]["per_example"] if k.startswith(f"client-{client} ")
        )
        targets = [e.target for e in task.test]
        shares = Counter(targets)
        collapsed = []
        for r in records:
            for option in collapsed_options(targets, r["personalised"]["per_example"][name]["scores"]):
                collapsed.append(f"{_label(r)}: {option}")
        top = ", ".join(f"{k} {v / len(targets):.3f}" for k, v in shares.most_common(4))
        print(f"{name}: {len(collapsed)} of {len(records)} cells answer one label ({top})")
        for line in collapsed:
            print(f"    {line}")


if __name__ == "__main__":
    main()
