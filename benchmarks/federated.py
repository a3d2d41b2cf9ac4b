"""Federated cost per round: Flower's own per-round overhead against local training, and
the bytes each strategy moves, read from real runs' ``rounds.jsonl``.

    python benchmarks/federated.py            # SmolLM2-135M, 2 clients, 2 demo tasks, 3 rounds (minutes)
    python benchmarks/federated.py --smoke    # tiny random Llama, synthetic tasks, for CI

Every group of strategies runs twice with the real simulation runner (`asymlora.federated.run`, Flower's
simulation engine, the same clients, data and seed): once with ``train.local_steps=0`` — the clients
return what they received, so a round costs only the federation itself (messages, (de)serialisation,
aggregation, the checkpoint, the client's adapter setup) — and once with local training at the demo's
size (batch 8, 128 tokens, ``--local-steps`` steps). Per strategy it prints

* ``T0`` and ``T1``: the median wall time of a warm round (round 1, which loads the base model on the
  clients, is left out when there are more rounds) without and with training;
* ``T1 − T0``: what local training adds to a round, and the ratio ``T0 / (T1 − T0)`` — Flower's per-round
  overhead relative to the local training it wraps;
* the bytes per client per round up and down as logged by the run (``ArrayRecord.count_bytes`` of the
  messages actually sent), their tensor payload, and the payload predicted by
  `asymlora.federated.accounting.run_round_cost` — the same accounting that writes ``docs/federated.md``
  — with the ratio measured / predicted (1.000 when the run moves exactly what the tables say).

Homogeneous strategies run at rank ``--r`` on every client, the heterogeneous ones at ``--ranks``.
"""

from __future__ import annotations

import os

os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import importlib.util
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from asymlora.config import ConfigError, from_dict

try:  # imported as the package `benchmarks`
    from benchmarks.common import ROOT, benchmark_parser, check_device, finish, positive_int, positive_ints
except ImportError:  # run as a script: Python puts this folder first on sys.path
    from common import ROOT, benchmark_parser, check_device, finish, positive_int, positive_ints
HOMOGENEOUS = ("fedit", "ffa", "fedsa", "fedalora")
HETEROGENEOUS = ("zeropad", "fedalora-het")
DEMO_TASKS = ("bigbench:multiemo/hotels_sentence_en", "bigbench:fact_checker/fever")
"""Two of the demo's tasks, one per client (both scored by option log-likelihood: a short evaluation)."""


# --- the setting ---------------------------------------------------------------------------------------
def smoke_assets(root: Path) -> tuple[str, list[str]]:
    """A tiny random Llama with a character tokenizer and two synthetic choice tasks (no download)."""
    spec = importlib.util.spec_from_file_location("_asymlora_test_conftest", ROOT / "tests" / "conftest.py")
    if spec is None or spec.loader is None:
        raise FileNotFoundError(ROOT / "tests" / "conftest.py")
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    tok = helpers.make_char_tokenizer()
    model = helpers.make_tiny_llama(vocab_size=len(tok), hidden=32, layers=2)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    rng = random.Random(0)
    rows = []
    for _ in range(40):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        rows.append({"task": "parity", "input": f"{a} {b}", "options": ["odd", "even"],
                     "target": ["even", "odd"][(a + b) % 2]})  # fmt: skip
        rows.append({"task": "bigger", "input": f"{a} vs {b}", "options": ["left", "right"],
                     "target": "left" if a >= b else "right"})  # fmt: skip
    (root / "tasks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(root / "model"), [f"jsonl:{root / 'tasks.jsonl'}#{t}" for t in ("parity", "bigger")]


def fed_config(
    args: argparse.Namespace, model: str, tasks: list[str], strategies: list[str], ranks: list[int] | None,
    local_steps: int, run_dir: Path, secagg: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """The federated config of one run (a dict, validated by `asymlora.federated.config`); ``secagg``:
    with Flower's SecAgg+ (`asymlora.federated.secagg`, its defaults)."""
    return {
        **({"secagg": {"enabled": True}} if secagg else {}),
        "model": {"name": model},
        "strategies": strategies,
        "adapter": {
            "r": args.r,
            "lora_alpha": 2 * args.r,
            "target_modules": ["q_proj", "v_proj"],
            "intermediate_rank": args.d_m,
        },
        "clients": {"num": len(tasks), "ranks": ranks, "partition": "task"},
        "data": {"tasks": tasks, "max_train": args.max_train, "max_test": 4, "max_length": args.max_length},
        "rounds": args.rounds,
        "train": {"local_steps": local_steps, "batch_size": args.batch_size, "lr": 1e-3},
        "eval": {"batch_size": 8, "max_examples": 4, "max_new_tokens": 4, "global_scores": False},
        "simulation": {
            "num_cpus": len(tasks),
            "cpus_per_client": 1,
            "threads_per_client": args.threads,
            **({"num_gpus": 1, "gpus_per_client": 1 / len(tasks)} if args.device == "cuda" else {}),
        },
        "run_dir": str(run_dir),
        "seed": 0,
    }


def groups(args: argparse.Namespace) -> list[tuple[list[str], list[int] | None]]:
    """(strategies, client ranks) of each simulation: homogeneous at ``--r``, heterogeneous at ``--ranks``
    (one group when the ranks are all equal to ``--r``)."""
    homo = [s for s in args.strategies if s in HOMOGENEOUS]
    het = [s for s in args.strategies if s in HETEROGENEOUS]
    ranks = args.ranks
    if set(ranks) == {args.r}:
        return [(homo + het, None)] if homo + het else []
    return [g for g in ((homo, None), (het, ranks)) if g[0]]


# --- reading a run -------------------------------------------------------------------------------------
def read_rounds(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def warm(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rounds after the first (which loads the base model on the clients), if there are any."""
    return rounds[1:] if len(rounds) > 1 else rounds


def per_client(rounds: list[dict[str, Any]], key: str) -> float:
    """Mean over rounds and clients of a per-client field (bytes per client per round)."""
    return statistics.fmean(c[key] for r in rounds for c in r["clients"] if c.get("status") == "ok")


def summarise(no_train: list[dict[str, Any]], train: list[dict[str, Any]], predicted: Any) -> dict[str, Any]:
    t0 = statistics.median(r["seconds"] for r in warm(no_train))
    t1 = statistics.median(r["seconds"] for r in warm(train))
    client_t1 = statistics.median(max(c["client_seconds"] for c in r["clients"]) for r in warm(train))
    pred_up = statistics.fmean(c.bytes_up for c in predicted)
    pred_down = statistics.fmean(c.bytes_down for c in predicted)
    out = {
        "round_s_no_training": round(t0, 3),
        "round_s_training": round(t1, 3),
        "slowest_client_s_training": round(client_t1, 3),
        "training_s_per_round": round(t1 - t0, 3),
        "overhead_vs_training": round(t0 / (t1 - t0), 4) if t1 > t0 else None,
        "overhead_share_of_round": round(t0 / t1, 4),
        "rounds": [len(no_train), len(train)],
    }
    for way, pred in (("up", pred_up), ("down", pred_down)):
        bytes_, payload = per_client(train, f"bytes_{way}"), per_client(train, f"payload_{way}")
        out[f"bytes_{way}"] = round(bytes_)
        out[f"payload_{way}"] = round(payload)
        out[f"predicted_{way}"] = round(pred)
        out[f"payload_{way}_vs_predicted"] = round(payload / pred, 6)
        out[f"framing_{way}"] = round(bytes_ / payload, 6)  # message bytes over tensor bytes
        same = per_client(no_train, f"payload_{way}") == payload
        out[f"payload_{way}_same_without_training"] = same
    return out


def secagg_summary(plain: list[dict[str, Any]], secagg: list[dict[str, Any]]) -> dict[str, Any]:
    """What SecAgg+ adds to a round with training (``--secagg``): seconds (median of the warm rounds) and
    bytes per client per round, against the same run without it."""
    out: dict[str, Any] = {
        "round_s": round(statistics.median(r["seconds"] for r in warm(secagg)), 3),
        "extra_round_s": round(
            statistics.median(r["seconds"] for r in warm(secagg))
            - statistics.median(r["seconds"] for r in warm(plain)),
            3,
        ),
        "clipped": sum(v for r in secagg for v in r["secagg"]["clipped"].values()),
        "error_bound": max(r["secagg"]["error_bound"] for r in secagg),
    }
    for way in ("up", "down"):
        out[f"bytes_{way}"] = round(per_client(secagg, f"bytes_{way}"))
        out[f"extra_bytes_{way}"] = out[f"bytes_{way}"] - round(per_client(plain, f"bytes_{way}"))
    return out


# --- main ------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = benchmark_parser(__doc__, "tiny random Llama, 2 rounds of 1 step, for CI", dtype=False,
                              threads_help="torch threads per client (2 clients)")  # fmt: skip
    parser.set_defaults(device="cpu", threads=1)  # cuda: the clients share one GPU (bf16)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rounds", type=positive_int, default=3)
    parser.add_argument(
        "--local-steps", type=positive_int, default=5, help="local steps per round with training"
    )
    parser.add_argument("--batch-size", type=positive_int, default=8, help="the demo's batch")
    parser.add_argument("--max-length", type=positive_int, default=128, help="the demo's sequence length")
    parser.add_argument("--max-train", type=positive_int, default=64, help="training examples per client")
    parser.add_argument("--r", type=positive_int, default=8, help="rank of the homogeneous strategies")
    parser.add_argument(
        "--ranks", type=positive_ints, default="64,8", help="client ranks of zeropad and fedalora-het"
    )
    parser.add_argument("--d-m", type=positive_int, default=16, help="fedalora-het's intermediate rank")
    parser.add_argument("--strategies", default=",".join([*HOMOGENEOUS, *HETEROGENEOUS]))
    parser.add_argument("--out-dir", default=None, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--secagg", action="store_true", help="also run with training under Flower's SecAgg+")
    args = parser.parse_args(argv)  # --threads is per client: not this process's
    check_device(parser, args)
    args.strategies = [s for s in args.strategies.split(",") if s]
    unknown = sorted(set(args.strategies) - {*HOMOGENEOUS, *HETEROGENEOUS})
    if unknown or not args.strategies:
        parser.error(
            f"--strategies: unknown {unknown or 'none given'}; choose from {[*HOMOGENEOUS, *HETEROGENEOUS]}"
        )
    if args.smoke:
        args.rounds, args.local_steps, args.batch_size, args.max_length = 2, 1, 4, 32
        args.max_train, args.r, args.ranks, args.d_m = 16, 2, [2, 2], 4
    return args


def check_configs(args: argparse.Namespace, model: str, tasks: list[str], plan: list, root: Path) -> None:
    """Every run's config validated before the first run starts: an invalid one (``--ranks`` not one per
    client, ...) exits 2 naming the error, not after the groups before it have run."""
    from asymlora.federated.config import FedConfig

    for k, (names, ranks) in enumerate(plan):
        for steps in (0, args.local_steps):
            data = fed_config(args, model, tasks, names, ranks, steps, root / f"group{k}-steps{steps}")
            try:
                from_dict(FedConfig, data).validate()
            except ConfigError as e:
                print(f"benchmarks/federated.py: {e}", file=sys.stderr)
                raise SystemExit(2) from None


def run_group(
    args: argparse.Namespace, k: int, model: str, tasks: list[str], group: tuple, root: Path
) -> dict:
    """One group of strategies, run without (T0) and with (T1) training; each strategy's summary."""
    # asymlora.federated needs the optional `fed` extra (flwr): imported only when a benchmark runs
    from asymlora.federated.accounting import run_round_cost
    from asymlora.federated.config import FedConfig
    from asymlora.federated.run import run

    names, ranks = group
    logs: dict[int, Path] = {}
    cfgs: dict[int, Any] = {}
    for steps in (0, args.local_steps):
        run_dir = root / f"group{k}-steps{steps}"
        data = fed_config(args, model, tasks, names, ranks, steps, run_dir)
        try:
            cfgs[steps] = from_dict(FedConfig, data).validate()
        except ConfigError as e:
            raise SystemExit(f"benchmarks/federated.py: {e}") from None
        print(f"\n=== {', '.join(names)}: local_steps={steps}, ranks {ranks or args.r} → {run_dir}")
        code = run(cfgs[steps], overwrite=True)
        if code != 0:
            raise RuntimeError(f"the federated run in {run_dir} exited with {code}")
        logs[steps] = run_dir
    if args.secagg:  # the run with training again, under SecAgg+
        logs[-1] = root / f"group{k}-steps{args.local_steps}-secagg"
        data = fed_config(args, model, tasks, names, ranks, args.local_steps, logs[-1], secagg=True)
        print(f"\n=== {', '.join(names)}: local_steps={args.local_steps} under SecAgg+ → {logs[-1]}")
        if run(from_dict(FedConfig, data).validate(), overwrite=True) != 0:
            raise RuntimeError(f"the federated run in {logs[-1]} exited with an error")
    out = {
        name: {
            "ranks": ranks or [args.r] * len(tasks),
            **summarise(read_rounds(logs[0] / name / "rounds.jsonl"),
                        read_rounds(logs[args.local_steps] / name / "rounds.jsonl"),
                        run_round_cost(cfgs[args.local_steps], name)),
        }
        for name in names
    }  # fmt: skip
    for name in names if args.secagg else ():
        out[name]["secagg"] = secagg_summary(
            read_rounds(logs[args.local_steps] / name / "rounds.jsonl"),
            read_rounds(logs[-1] / name / "rounds.jsonl"),
        )
    return out


def print_table(result: dict[str, Any], args: argparse.Namespace) -> None:
    st = result["setting"]
    print(
        f"\nfederated rounds: {result['model']}, {st['clients']} clients (one task each, simulation engine, "
        f"{args.threads} torch thread(s) per client), batch {args.batch_size} × {args.max_length} tokens, "
        f"{args.local_steps} local steps per round; median of the warm rounds"
    )
    print(f"{'strategy':<14}{'T0 s':>8}{'T1 s':>8}{'T1-T0':>8}{'T0/(T1-T0)':>12}{'up B/client':>14}"
          f"{'down B/client':>15}{'payload/pred':>14}{'framing':>9}")  # fmt: skip
    for name, s in result["strategies"].items():
        ratio = "–" if s["overhead_vs_training"] is None else f"{s['overhead_vs_training']:.3f}"
        match = min(s["payload_up_vs_predicted"], s["payload_down_vs_predicted"])
        print(f"{name:<14}{s['round_s_no_training']:>8.2f}{s['round_s_training']:>8.2f}"
              f"{s['training_s_per_round']:>8.2f}{ratio:>12}{s['bytes_up']:>14,}{s['bytes_down']:>15,}"
              f"{match:>14.4f}{s['framing_up']:>9.4f}")  # fmt: skip
    print(
        f"bytes moved match the accounting of docs/federated.md: {'yes' if result['bytes_match_accounting'] else 'NO'}"
    )
    for name, s in result["strategies"].items():
        if "secagg" in s:
            sa = s["secagg"]
            print(f"{name} under SecAgg+: +{sa['extra_round_s']:.2f} s per round ({sa['round_s']:.2f} s), "
                  f"+{sa['extra_bytes_up']:,} B up and +{sa['extra_bytes_down']:,} B down per client per round, "
                  f"{sa['clipped']} values clipped, error bound {sa['error_bound']:.3g}")  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="asymlora-fedbench-") as tmp:
        root = Path(args.out_dir) if args.out_dir else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        model, tasks = smoke_assets(root / "assets") if args.smoke else (args.model, list(DEMO_TASKS))
        plan = groups(args)
        check_configs(args, model, tasks, plan, root)
        strategies: dict[str, dict[str, Any]] = {}
        for k, group in enumerate(plan):
            strategies.update(run_group(args, k, model, tasks, group, root))
    exact = all(
        s["payload_up_vs_predicted"] == 1.0 and s["payload_down_vs_predicted"] == 1.0
        for s in strategies.values()
    )
    result = {
        "benchmark": "federated",
        "model": "tiny random Llama" if args.smoke else args.model,
        "setting": {
            "clients": len(tasks),
            "tasks": tasks if not args.smoke else ["synthetic parity", "synthetic bigger"],
            "rounds": args.rounds,
            "local_steps": args.local_steps,
            "batch_size": args.batch_size,
            "max_length": args.max_length,
            "r": args.r,
            "ranks": args.ranks,
            "d_m": args.d_m,
            "threads_per_client": args.threads,
        },
        "strategies": strategies,
        "bytes_match_accounting": exact,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    print_table(result, args)
    return finish(result, args)


if __name__ == "__main__":
    main()
