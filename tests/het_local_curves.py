"""Fed-ALoRA-het with fresh vs persisted A, M, B1 against zero-padding, at equal rounds, on a tiny model.

The clients' and the server's own round functions (`asymlora.federated.client.train_round`,
`asymlora.federated.strategies.aggregate`, `client.evaluate_client`) run in one process, without Flower
(a Flower run does the same arithmetic; see ``asymlora fed``). The base model is a tiny random Llama with a
character tokenizer; each client has one synthetic choice task (every client learns something different).
Prints, per variant, the example-weighted training loss of every round and the final personalised accuracy.

    python tests/het_local_curves.py --rounds 10 --local-steps 5
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

import torch

from asymlora.federated.client import evaluate_client, train_round
from asymlora.federated.config import load_fed_config
from asymlora.federated.partition import load_client_tasks
from asymlora.federated.server_app import server_roles
from asymlora.federated.strategies import aggregate, download_payload
from conftest import (  # beside this script: the tests' tiny model builders
    make_char_tokenizer,
    make_tiny_llama,
)

TASKS = ("parity", "bigger", "small", "sum")


def make_assets(root: Path, seed: int) -> None:
    """A tiny random Llama (hidden 64, 2 layers) with a character tokenizer, and four synthetic tasks."""
    tok = make_char_tokenizer()
    make_tiny_llama(vocab_size=len(tok), hidden=64, layers=2, seed=seed).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    rng, rows = random.Random(seed), []
    for _ in range(200):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        rows += [
            {"task": "parity", "input": f"{a} {b}", "options": ["odd", "even"], "target": ["even", "odd"][(a + b) % 2]},
            {"task": "bigger", "input": f"{a} vs {b}", "options": ["left", "right"], "target": "left" if a >= b else "right"},
            {"task": "small", "input": f"is {a} small", "options": ["yes", "no"], "target": "yes" if a < 5 else "no"},
            {"task": "sum", "input": f"{a}+{b} big", "options": ["yes", "no"], "target": "yes" if a + b > 9 else "no"},
        ]  # fmt: skip
    (root / "tasks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def run_variant(root: Path, strategy_name: str, het_local: str, args: argparse.Namespace) -> dict:
    """Every round of one variant: (mean training loss per round, final personalised accuracy per client)."""
    cfg = load_fed_config(
        None,
        [
            f"model.name={root / 'model'}",
            f"strategies=[{strategy_name}]",
            f"het_local={het_local}",
            "clients.num=4",
            f"clients.ranks={args.ranks}",
            "adapter.intermediate_rank=16",
            "adapter.target_modules=[q_proj,v_proj]",
            "data.tasks=[" + ",".join(f"jsonl:{root / 'tasks.jsonl'}#{t}" for t in TASKS) + "]",
            "data.max_train=150",
            "data.max_test=50",
            "data.max_length=32",
            f"train.local_steps={args.local_steps}",
            "train.batch_size=8",
            f"train.lr={args.lr}",
            f"rounds={args.rounds}",
            "eval.global_scores=false",
            f"seed={args.seed}",
        ],
    )
    s = cfg.strategy(strategy_name)
    ranks = [cfg.client_rank(k) for k in range(cfg.clients.num)]
    roles, server = server_roles(cfg, s, ranks)
    tasks = [load_client_tasks(cfg, k) for k in range(cfg.clients.num)]
    carried: list[dict | None] = [None] * cfg.clients.num
    losses = []
    for rnd in range(1, cfg.rounds + 1):
        down, ups, total = download_payload(s, server), [], 0.0
        for k in range(cfg.clients.num):
            res = train_round(cfg, s, k, ranks[k], rnd, down, carried[k], tasks[k])
            carried[k] = res.trained
            ups.append((res.upload, res.num_examples))
            total += res.train_loss * res.num_examples
        losses.append(total / sum(n for _, n in ups))
        server = aggregate(s, server, ups, roles).state
    scores = [
        evaluate_client(cfg, s, k, ranks[k], server, carried[k], tasks[k])["personalised"]["score"]  # type: ignore[arg-type]
        for k in range(cfg.clients.num)
    ]
    return {"train_loss": losses, "accuracy": scores}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--local-steps", type=int, default=5)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--ranks", default="[16,16,8,8]")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_assets(root, args.seed)
        out = {
            "zeropad": run_variant(root, "zeropad", "fresh", args),
            "fedalora-het fresh": run_variant(root, "fedalora-het", "fresh", args),
            "fedalora-het persist": run_variant(root, "fedalora-het", "persist", args),
        }
    print(
        "| variant | " + " | ".join(f"r{r}" for r in range(1, args.rounds + 1)) + " | accuracy (mean of 4) |"
    )
    print("|---|" + "---:|" * (args.rounds + 1))
    for name, r in out.items():
        acc = sum(r["accuracy"]) / len(r["accuracy"])
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in r["train_loss"]) + f" | {acc:.3f} |")


if __name__ == "__main__":
    main()
