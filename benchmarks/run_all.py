"""Run every benchmark in one command, print every figure with its ratio, write the docs.

    python benchmarks/run_all.py                     # full: writes docs/performance.md and docs/scaling.png
    python benchmarks/run_all.py --all-projections   # + the training step with all seven projections
    python benchmarks/run_all.py --smoke --out-dir /tmp/perf   # seconds-long smoke (CI)
    python benchmarks/run_all.py --device cuda --dtype bfloat16

Benchmarks run in this process, one after the other (never two at once): ``layers.py`` (layer level),
``train_step.py`` (whole-model step, with a torch.profiler comparison of ALoRA and peft LoRA),
``inference.py`` (merged / unmerged / base generation), ``scaling.py`` (N and r sweeps, the PNG) and
``federated.py`` (Flower's per-round overhead against local training, bytes per round per strategy). With
``--smoke`` nothing is written unless ``--out-dir`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

try:  # imported as the package `benchmarks` (the tests, `python -m benchmarks.run_all`)
    from benchmarks import federated, inference, layers, scaling, train_step
except ImportError:  # run as a script: Python puts this folder first on sys.path
    import federated
    import inference
    import layers
    import scaling
    import train_step

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ("layers", "train_step", "inference", "scaling", "candidate", "federated")
MiB = 1024**2


# --- running ---------------------------------------------------------------------------------------
def cpu_seconds() -> float:
    """CPU time of this process and its finished children (user + system)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run_candidate(common: list[str]) -> dict[str, Any]:
    """The hot-path candidate, recorded with the command that reproduces it alone."""
    command = " ".join(["python benchmarks/run_all.py --only candidate", *common])
    return run("candidate", hot_path_candidate, common, command)


def run(
    name: str, fn: Callable[[list[str]], dict[str, Any]], argv: list[str], command: str | None = None
) -> dict[str, Any]:
    """Run one benchmark's ``main(argv)``; record its command line, wall and CPU seconds, load average.

    A benchmark that raises is reported (``_failed``) and the run goes on."""
    command = command or " ".join(["python", f"benchmarks/{name}.py", *argv])
    print(f"\n=== {command}", flush=True)
    load0, t0, c0 = os.getloadavg()[0], time.perf_counter(), cpu_seconds()
    try:
        result = fn(argv)
    except Exception as e:  # one broken benchmark must not hide the others' figures
        import traceback

        traceback.print_exc()
        result = {"_failed": f"{type(e).__name__}: {e}"[:500]}
    result["_run"] = {
        "command": command,
        "wall_s": round(time.perf_counter() - t0, 1),
        "cpu_s": round(cpu_seconds() - c0, 1),
        "load_avg_1min": [round(load0, 2), round(os.getloadavg()[0], 2)],
    }
    return result


# --- the hot-path candidate: the scaling folded into the rank side ----------------------------------
def folded_adapter_path(layer: Any, name: str, x: Any, t: dict[str, Any]) -> Any:
    """s · delta(x) with s applied to h = x · x_sideᵀ (..., k ≤ N·r + N) instead of the (..., d_out) output.

    The proposed `AsymLoraLayer.adapter_path` (see FINDINGS); exact because every method's ``combine``
    is linear in h. Otherwise the same code paths as the core's current method."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from asymlora.methods import get_method

    cfg = layer.asymlora_config[name]
    method = get_method(cfg.method)
    x_side, router, dropout = method.x_side(t), t.get("router"), layer.asymlora_dropout[name]
    no_dropout = isinstance(dropout, nn.Identity) or not dropout.training
    if x_side is not None and router is not None and no_dropout and x.dtype.itemsize >= 4:
        h, logits = F.linear(x, torch.cat([x_side, router])).split([x_side.shape[0], router.shape[0]], -1)
        return method.combine(h * cfg.scaling, t, layer.gate(name, x, logits).to(x.dtype))
    gate = layer.gate(name, x)
    gate = None if gate is None else gate.to(x.dtype)
    if x_side is not None:
        return method.combine(F.linear(dropout(x), x_side) * cfg.scaling, t, gate)
    return cfg.scaling * method.delta(dropout(x), t, gate)


def hot_path_candidate(argv: list[str]) -> dict[str, Any]:
    """Adapter path and whole layer, current core vs the scaling folded into the rank side, vs peft LoRA.

    Same shape and protocol as ``layers.py`` (one 4096 × 4096 layer, 2048 tokens, r = 8, N = 3, forward +
    backward, alternating, median); the outputs of both forms are checked equal."""
    import peft
    import torch
    from torch import nn

    from asymlora import AsymLoraConfig
    from asymlora.routing import RoutingState
    from asymlora.tuner.layer import Linear as AsymLinear

    parser = argparse.ArgumentParser()
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.dim, args.tokens, args.reps = 128, 64, 1
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    base = nn.Linear(args.dim, args.dim, bias=False, device=device, dtype=dtype).requires_grad_(False)
    x = torch.randn(args.tokens, args.dim, device=device, dtype=dtype, requires_grad=True)
    made: dict[str, Any] = {}
    for m in ("lora", "alora", "hydralora", "molora", "malora"):
        cfg = AsymLoraConfig(method=m, r=8, num_experts=3, target_modules=["x"])
        layer = AsymLinear(base, "default", cfg, RoutingState()).to(device=device, dtype=dtype)
        with torch.no_grad():
            for p in layer.tensors("default").values():
                p.normal_(std=0.02)
        made[m] = layer
    peft_layer = peft.get_peft_model(  # adapter in the model dtype, like asymlora's (bf16-safe)
        nn.Sequential(base),
        peft.LoraConfig(r=8, lora_alpha=16, target_modules=["0"]),
        autocast_adapter_dtype=False,
    ).base_model.model[0]

    def now(layer: Any) -> Callable[[], Any]:
        t = layer.tensors("default")
        return lambda: layer.asymlora_config["default"].scaling * layer.adapter_path("default", x, t)

    def fold(layer: Any) -> Callable[[], Any]:
        t = layer.tensors("default")
        return lambda: folded_adapter_path(layer, "default", x, t)

    fns: dict[str, Callable[[], Any]] = {
        "peft_lora": lambda: peft_layer.lora_B["default"](peft_layer.lora_A["default"](x)) * 2.0
    }
    for m, layer in made.items():
        fns[f"now_{m}"], fns[f"fold_{m}"] = now(layer), fold(layer)
    whole: dict[str, Callable[[], Any]] = {
        "peft_lora": lambda: peft_layer(x),
        "now_alora": lambda: made["alora"](x),
        "fold_alora": lambda: base(x) + fold(made["alora"])(),
    }
    with torch.no_grad():
        max_diff = max(
            float((fns[f"now_{m}"]() - fns[f"fold_{m}"]()).abs().max() / fns[f"now_{m}"]().abs().max())
            for m in made
        )
    leaves = [x, *(p for layer in made.values() for p in layer.tensors("default").values())]
    leaves += [p for p in peft_layer.parameters() if p.requires_grad]

    def measure(group: dict[str, Callable[[], Any]]) -> dict[str, float]:
        times: dict[str, list[float]] = {k: [] for k in group}
        for rnd in range(args.reps + 1):
            for k in list(group)[rnd % len(group) :] + list(group)[: rnd % len(group)]:
                seconds = scaling.timed(group[k], device)
                for leaf in leaves:
                    leaf.grad = None
                if rnd:  # round 0 is the warm-up
                    times[k].append(seconds)
        return {k: statistics.median(v) for k, v in times.items()}

    adapter, layer_ms = measure(fns), measure(whole)
    ratios = {k: v / adapter["peft_lora"] for k, v in adapter.items()}
    layer_ratios = {k: v / layer_ms["peft_lora"] for k, v in layer_ms.items()}
    print(
        f"hot-path candidate, one {args.dim}x{args.dim} layer, {args.tokens} tokens, r=8, N=3, median of {args.reps}"
    )
    print(f"{'adapter path':<16}{'ms':>10}{'x peft':>9}")
    for k, v in adapter.items():
        print(f"{k:<16}{1e3 * v:>10.2f}{ratios[k]:>9.3f}")
    print(f"{'whole layer':<16}{'ms':>10}{'x peft':>9}")
    for k, v in layer_ms.items():
        print(f"{k:<16}{1e3 * v:>10.2f}{layer_ratios[k]:>9.3f}")
    print(f"largest relative difference between the two forms' outputs: {max_diff:.2e}")
    result = {
        "benchmark": "hot_path_candidate",
        "shape": {"dim": args.dim, "tokens": args.tokens, "r": 8, "experts": 3, "reps": args.reps},
        "adapter_ms": {k: round(1e3 * v, 3) for k, v in adapter.items()},
        "adapter_vs_peft_lora": {k: round(v, 4) for k, v in ratios.items()},
        "layer_ms": {k: round(1e3 * v, 3) for k, v in layer_ms.items()},
        "layer_vs_peft_lora": {k: round(v, 4) for k, v in layer_ratios.items()},
        "max_rel_diff": max_diff,
    }
    print(json.dumps(result))
    return result


# --- federated ---------------------------------------------------------------------------------
def federated_section(args: argparse.Namespace) -> dict[str, Any]:
    """Item 4: ``benchmarks/federated.py`` (real simulation runs; ``--smoke`` passed through)."""
    argv = (["--smoke"] if args.smoke else []) + ["--device", "cuda" if args.device == "cuda" else "cpu"]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    result = run("federated", federated.main, argv)
    return {"status": "failed" if "_failed" in result else "measured", "result": result}


# --- machine ---------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    """CPU, cores, memory, library versions, commit."""
    import peft
    import torch
    import transformers

    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal"))
        mem_gib = int(mem.split()[1]) / 1024**2
    except (OSError, StopIteration):
        mem_gib = float("nan")
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "?"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(mem_gib, 1),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "commit": commit,
    }


# --- the report ------------------------------------------------------------------------------------
def fmt_ratio(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}×"


def status(met: bool | None) -> str:
    return "—" if met is None else ("met" if met else "**missed**")


def target_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Every figure that has a target: (name, measured, target, met, gap)."""
    rows = []
    for key, where in (("train_step", ""), ("train_step_all", ", all seven projections")):
        ts = res.get(key)
        if ts and "alora" in ts["ratios"]:
            r = ts["ratios"]["alora"]
            name = f"ALoRA / peft LoRA, training step time (whole model{where})"
            rows.append((name, r["step_time"], "≤ 1.10×", 1.10))
            if "peak_memory" in r:
                name = f"ALoRA / peft LoRA, peak memory (whole model{where})"
                rows.append((name, r["peak_memory"], "≤ 1.10×", 1.10))
    ly = res.get("layers")
    if ly:
        rows.append(
            ("fused ALoRA vs loop form, adapter path (layer)", ly["ratios"]["adapter_vs_loop"], "≥ 3×", -3.0)
        )
        rows.append(
            ("ALoRA / peft LoRA, adapter path (layer)", ly["ratios"]["adapter_vs_peft_lora"], "≤ 1.3×", 1.3)
        )
        rows.append(("ALoRA / peft LoRA, whole layer", ly["ratios"]["layer_vs_peft_lora"], "≤ 1.05×", 1.05))
    inf = res.get("inference")
    if inf:
        for b, r in inf["batches"].items():
            rows.append(
                (
                    f"merged / base tokens/s, batch {b}",
                    r["merged_vs_base"],
                    f"1 ± {r['tolerance']:.0%}",
                    None,
                    r,
                )
            )
    fed = res.get("federated") or {}
    if fed.get("status") == "measured":
        ratios = [
            v
            for st in fed["result"]["strategies"].values()
            for v in (st["payload_up_vs_predicted"], st["payload_down_vs_predicted"])
        ]
        worst = max(ratios, key=lambda v: abs(v - 1))
        rows.append(("federated bytes moved / accounting (every strategy, both ways)", worst, "= 1", "exact"))
    out = []
    for row in rows:
        name, value, target, bound = row[:4]
        if bound == "exact":
            met, gap = value == 1.0, abs(value - 1)
        elif bound is None:
            met = row[4]["merged_equals_base_speed"]
            gap = abs(value - 1) - row[4]["tolerance"]
        elif bound < 0:
            met, gap = value >= -bound, (-bound - value) / -bound
        else:
            met, gap = value <= bound, (value - bound) / bound
        out.append({"figure": name, "measured": value, "target": target, "met": met, "gap": gap})
    return out


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def train_step_tables(ts: dict[str, Any]) -> str:
    """The whole-model step table (times, memory, ratios) of one train_step result."""
    s = ts["setting"]
    rows = []
    for n, step_ms in ts["step_ms"].items():
        r, mem, pk = ts["ratios"][n], ts["memory"][n], ts["peak"].get(n)
        rows.append(
            [
                f"`{n}`",
                s["routers"].get(n, "—"),
                f"{mem['trainable_params']:,}",
                f"{step_ms:.0f}",
                fmt_ratio(r["step_time"]),
                f"{ts['cpu_ms'][n]:.0f}",
                fmt_ratio(r["cpu_time"]),
                f"{ts['spread'][n]:.0%}",
                f"{pk['peak_bytes'] / MiB:.0f}" if pk else "—",
                fmt_ratio(r.get("peak_memory")),
                f"{pk['increment_bytes'] / MiB:.0f}" if pk else "—",
                fmt_ratio(r.get("peak_increment")),
                f"{mem['saved_activation_bytes'] / MiB:.1f}",
                f"{mem['training_state_bytes'] / MiB:.1f}",
                fmt_ratio(r["training_state"]),
            ]
        )
    header = [
        "variant", "router", "trainable params", "step ms", "× peft", "CPU ms", "× peft", "spread",
        "peak MiB", "× peft", "step peak − model MiB", "× peft", "saved act. MiB", "training state MiB", "× peft",
    ]  # fmt: skip
    return md_table(header, rows)


def profile_table(ts: dict[str, Any]) -> str:
    """Top ops of one profiled step, peft LoRA and ALoRA side by side, plus the ops ALoRA calls more often."""
    prof = ts.get("profile") or {}
    if not {"peft_lora", "alora"} <= set(prof):
        return "_not profiled_"
    p, a = prof["peft_lora"], prof["alora"]
    a_top = {row["op"]: row for row in a["top"]}
    p_top = {row["op"]: row for row in p["top"]}
    ops = list(dict.fromkeys([row["op"] for row in a["top"]] + [row["op"] for row in p["top"]]))
    rows = []
    for op in ops:
        pr, ar = p_top.get(op), a_top.get(op)
        rows.append(
            [
                f"`{op[:70]}`",
                f"{pr['self_ms']:.0f} ({pr['share']:.1%})" if pr else "—",
                p["calls"].get(op, 0),
                f"{ar['self_ms']:.0f} ({ar['share']:.1%})" if ar else "—",
                a["calls"].get(op, 0),
            ]
        )
    text = md_table(["op", "peft LoRA self ms (share)", "calls", "ALoRA self ms (share)", "calls"], rows)
    extra = sorted(
        ((op, a["calls"].get(op, 0) - p["calls"].get(op, 0)) for op in set(a["calls"]) | set(p["calls"])),
        key=lambda kv: -abs(kv[1]),
    )
    extra = [(op, d) for op, d in extra if d and op.startswith("aten::")][:12]
    text += (
        f"\n\nTotal self {p['clock']} time of the profiled step: peft LoRA {p['total_self_ms']:.0f} ms, "
        f"ALoRA {a['total_self_ms']:.0f} ms (one step each, on the loaded machine: compare shares and calls "
        "more than milliseconds).\n\nOps ALoRA calls more (or fewer) times than peft LoRA per step "
        "(exact, from the profiler): " + ", ".join(f"`{op}` {d:+d}" for op, d in extra) + "."
    )
    return text


def layers_table(ly: dict[str, Any]) -> str:
    rows = []
    for name, ms in ly["adapter_ms"].items():
        rows.append(
            [
                f"`{name}`",
                f"{ms:.1f}",
                fmt_ratio(ms / ly["adapter_ms"]["peft_lora"]),
                f"{ly['layer_ms'][name]:.1f}",
                fmt_ratio(ly["layer_ms"][name] / ly["layer_ms"]["peft_lora"]),
            ]
        )
    rows.append(["`base W0 x only`", "", "", f"{ly['layer_ms']['base_only']:.1f}", ""])
    return md_table(["variant", "adapter path ms", "× peft LoRA", "whole layer ms", "× peft LoRA"], rows)


def inference_table(inf: dict[str, Any]) -> str:
    rows = []
    for b, r in inf["batches"].items():
        t = r["tokens_per_s"]
        rows.append(
            [
                b,
                f"{t['base']:.1f}",
                f"{t['merged']:.1f}",
                f"{t['unmerged']:.1f}",
                fmt_ratio(r["merged_vs_base"]),
                fmt_ratio(r["unmerged_vs_base"]),
                f"{r['base_spread']:.1%}",
                f"± {r['tolerance']:.1%}",
                "yes" if r["merged_equals_base_speed"] else "**no**",
                f"{r['merged_equals_unmerged']:.0%}",
                f"{r['merged_equals_base']:.0%}",
            ]
        )
    header = [
        "batch", "base tok/s", "merged tok/s", "unmerged tok/s", "merged / base", "unmerged / base",
        "base spread", "tolerance", "merged = base speed", "merged tokens = unmerged", "merged tokens = base",
    ]  # fmt: skip
    return md_table(header, rows)


def scaling_tables(sc: dict[str, Any]) -> str:
    rows = []
    for row in sc["rows"]:
        mem = row["memory"]
        rows.append(
            [
                row["sweep"],
                row["N"],
                row["r"],
                row["method"],
                f"{row['ms']['total']:.1f}",
                f"{row['ms']['x_side']:.1f}",
                f"{row['ms']['b_side']:.1f}",
                f"{mem['params_A']:,}",
                f"{mem['params_B']:,}",
                f"{mem['params_router']:,}",
                f"{mem['saved_bytes'] / MiB:.2f}",
                f"{mem['total_bytes'] / MiB:.2f}",
            ]
        )
    header = [
        "sweep", "N", "r", "method", "adapter ms", "x side ms", "B side ms", "A-side params", "B-side params",
        "router params", "saved act. MiB", "memory MiB",
    ]  # fmt: skip
    return md_table(header, rows)


def federated_text(fed: dict[str, Any]) -> str:
    if fed["status"] == "skipped":
        return "_Not run (`--only`)._"
    res = fed["result"]
    if fed["status"] == "failed":
        return f"_Failed: {res['_failed']}_ (command: `{res['_run']['command']}`)"
    st = res["setting"]
    rows = []
    for name, r in res["strategies"].items():
        ratio = r["overhead_vs_training"]
        rows.append(
            [
                f"`{name}`",
                ",".join(map(str, r["ranks"])),
                f"{r['round_s_no_training']:.2f}",
                f"{r['round_s_training']:.2f}",
                f"{r['training_s_per_round']:.2f}",
                "–" if ratio is None else f"{ratio:.3f}",
                f"{r['bytes_up']:,}",
                f"{r['bytes_down']:,}",
                f"{r['predicted_up']:,} / {r['predicted_down']:,}",
                f"{r['payload_up_vs_predicted']:.4f} / {r['payload_down_vs_predicted']:.4f}",
                f"{r['framing_up']:.5f}",
            ]
        )
    header = ["strategy", "client ranks", "T0: round, no training (s)", "T1: round, training (s)",
              "T1 − T0 (s)", "T0 / (T1 − T0)", "bytes up / client", "bytes down / client",
              "predicted payload up / down", "payload / predicted (up / down)", "message / payload"]  # fmt: skip
    return (
        f"Command: `{res['_run']['command']}`. {res['model']}, {st['clients']} clients with one task each "
        f"({', '.join(st['tasks'])}), Flower's simulation engine with {st['threads_per_client']} torch "
        f"thread(s) per client, {st['rounds']} rounds of {st['local_steps']} local steps at batch "
        f"{st['batch_size']} × {st['max_length']} tokens (the demo's size); homogeneous strategies at r = "
        f"{st['r']}, `zeropad` / `fedalora-het` at ranks {st['ranks']} (d_m = {st['d_m']}). Each group of "
        "strategies runs twice on the same clients, data and seed: with `train.local_steps=0` (T0: the "
        "clients return what they received, so the round is only Flower's messages, (de)serialisation, "
        "the aggregation, the checkpoint and the client's adapter setup) and with training (T1); medians of "
        "the warm rounds (round 1 loads the base model on the clients). The bytes are the run's own "
        "(`rounds.jsonl`: `ArrayRecord.count_bytes()` of each message, and its tensor payload) per client "
        'per round; "predicted" is `asymlora.federated.accounting.run_round_cost`, the code that writes '
        "the tables of `docs/federated.md`.\n\n"
        + md_table(header, rows)
        + f"\n\nBytes moved equal the accounting for every strategy: "
        f"**{'yes' if res['bytes_match_accounting'] else 'NO'}**."
    )


def why_missed(row: dict[str, Any], res: dict[str, Any]) -> str:
    """A sentence on why a missed target was missed, from the measured figures."""
    name = row["figure"]
    ts = res.get("train_step_all" if "all seven" in name else "train_step")
    ly = res.get("layers")
    if "training step time" in name and ts:
        noise = ts["spread"]["peft_lora"]
        cpu = ts["ratios"]["alora"]["cpu_time"]
        return (
            f"peft LoRA's own steps spread by {noise:.0%} (max − min over median) on this loaded machine and "
            f"ALoRA's CPU-time ratio is {cpu:.3f}×: "
            + (
                "the wall-clock gap is within the noise of other jobs."
                if row["measured"] - 1 <= noise
                else "the gap exceeds the noise; see the profile below for the ops ALoRA adds."
            )
        )
    if "peak memory" in name and ts:
        return "see the training-state column: adapters, gradients, AdamW state and saved activations."
    if "adapter path" in name and ly and "peft" in name:
        return (
            "ALoRA's first product is (N·r + N) × d_in = 27 × 4096 against LoRA's 8 × 4096 (3.4× the FLOPs "
            "of the A side); the adapter path is bound by reading x and writing the (tokens × d_out) "
            "outputs, which both do, and by the full-size scaling multiply (forward and backward) that "
            "both do too; the hot-path change below removes the latter for every asymlora method."
        )
    if "vs loop" in name and ly:
        return (
            "both forms make the same full passes over x and over the (tokens × d_out) output and its "
            "gradient (product with the stacked A's, scaling, sum with W0 x); the loop's extra work is N − 1 "
            "more products with B, small at r = 8, so the ratio is bounded by those shared passes."
        )
    if "whole layer" in name and ly:
        return "the frozen base product dominates; the gap is the adapter path's (row above)."
    if "merged" in name:
        return "merged runs the base architecture with the same shapes; a gap is noise from other jobs."
    return ""


# Sections of docs/performance.md written from benchmarks this script does not run (their own command and
# JSON are in the section): kept as they are when the rest of the page is regenerated.
KEPT_SECTIONS = ("## 6. Serving mixed-task batches",)


def write_doc(path: Path, doc: str) -> None:
    """Write the regenerated page, carrying over the `KEPT_SECTIONS` of the current one before its
    "## Findings" section (atomically, like every file asymlora writes)."""
    from asymlora.io import atomic_write_text

    old = path.read_text() if path.is_file() else ""
    kept = []
    for heading in KEPT_SECTIONS:
        if heading in old:
            start = old.index(heading)
            end = old.find("\n## ", start + len(heading))
            kept.append(old[start : end + 1 if end >= 0 else len(old)])
    if kept:
        at = doc.find("## Findings")
        at = at if at >= 0 else len(doc)
        doc = doc[:at] + "".join(part if part.endswith("\n\n") else part + "\n" for part in kept) + doc[at:]
    atomic_write_text(path, doc)


def render(res: dict[str, Any], args: argparse.Namespace, mach: dict[str, Any], plot_name: str | None) -> str:
    """docs/performance.md."""
    ts, ly, inf, sc = res.get("train_step"), res.get("layers"), res.get("inference"), res.get("scaling")
    loads = [r["_run"]["load_avg_1min"] for r in (ly, ts, res.get("train_step_all"), inf, sc) if r]
    all_loads = [v for pair in loads for v in pair]
    date = res["date"]
    out: list[str] = []
    out.append("# Performance\n")
    out.append(
        "Every figure here is a **ratio measured side by side in one run**: the compared variants run in one "
        "process, alternately, round after round, and the medians are compared. Generated by "
        f"`{res['command']}` on {date} (commit `{mach['commit']}`), in {res['wall_s'] / 60:.1f} min "
        f"({res['cpu_s'] / 60:.1f} CPU-min).\n"
    )
    out.append(
        f"**Machine**: {mach['cpu']}, {mach['cores']} cores (torch threads: {mach['torch_threads']}), "
        f"{mach['memory_gib']} GiB RAM, {'GPU ' + mach['gpu'] if mach['gpu'] else 'no GPU'}; "
        f"{args.device}/{args.dtype}; Python {mach['python']}, torch {mach['torch']}, "
        f"transformers {mach['transformers']}, peft {mach['peft']}.\n"
    )
    if all_loads:
        own = mach["torch_threads"]
        span = f"1-minute load average {min(all_loads):.1f}–{max(all_loads):.1f} on {mach['cores']} cores"
        if max(all_loads) > own + 0.5:
            out.append(
                f"**Other processes shared the machine** during parts of the run: {span}, of which this run's "
                f"own {own} thread(s) account for about {own}. Absolute times are noisy there (each table "
                "gives the spread); the ratios, taken from alternating runs, are what to read. The CPU-time "
                "columns (CPU seconds this process used per step) are less sensitive to other jobs than "
                "wall-clock time.\n"
            )
        else:
            out.append(
                f"**The machine was otherwise quiet**: {span}, this run's own {own} thread(s) included.\n"
            )
    if mach["torch_threads"] < (mach["cores"] or 1) and args.device == "cpu":
        out.append(
            f"**Threads**: every benchmark ran with {mach['torch_threads']} torch thread(s) (`--threads`). On "
            "this 2-vCPU virtual machine, shared with other jobs, two OpenMP threads wait for each other at "
            "every parallel region. Measured before this run, a peft LoRA step (SmolLM2-135M, batch 8 × 128) "
            "took 8.7–9.1 s (5.7 CPU-s) with 1 thread against 26–40 s (25 CPU-s) with 2 at load average ~3, "
            "and 9.4–10.2 s against 62–89 s at load average 5–7; greedy decoding was 15–30× slower with 2. "
            "One thread is both faster here and fairer to the other jobs; on an idle machine with real cores "
            "use the default.\n"
        )
    if res.get("failed"):
        out.append("**Failed benchmarks** (the others' figures below are complete):\n")
        for failure in res["failed"].values():
            out.append(f"- `{failure['command']}`: {failure['error']}")
        out.append("")
    out.append("## Targets\n")
    trows = target_rows(res)
    out.append(
        md_table(
            ["figure", "measured", "target", "status"],
            [[r["figure"], fmt_ratio(r["measured"]), r["target"], status(r["met"])] for r in trows],
        )
    )
    missed = [r for r in trows if not r["met"]]
    if missed:
        out.append("\n**Missed targets, by how much and why**\n")
        for r in missed:
            out.append(
                f"- {r['figure']}: {fmt_ratio(r['measured'])} against {r['target']} — {why_missed(r, res)}"
            )
    out.append("")

    if ts:
        s = ts["setting"]
        out.append("## 1. Training step, whole model\n")
        out.append(
            f"Command: `{ts['_run']['command']}` ({ts['_run']['wall_s'] / 60:.1f} min). {ts['model']}, "
            f"batch {s['batch']} × {s['seq']} tokens, r = {s['r']}, N = {s['experts']}, targets "
            f"{', '.join(s['targets'])}; a step is forward + backward + AdamW step + zero_grad; median of "
            f"{s['steps']} alternating steps after one warm-up (the order rotates each round). Baseline: "
            "peft's own LoRA (`peft.LoraConfig`, same r, alpha and targets). Routers as in each method's paper "
            "(MoLoRA/MALoRA top-2 of N).\n"
        )
        out.append(train_step_tables(ts))
        out.append(
            "\n- **step ms / CPU ms**: medians; **spread**: (max − min) / median of the variant's own steps.\n"
            "- **peak MiB**: peak RSS of a fresh child process per variant (`--memory-child`; VmHWM reset "
            "after the model is built, so loading does not count) over "
            f"{next(iter(ts['peak'].values()))['steps'] if ts['peak'] else '—'} steps, with glibc's mmap "
            "threshold fixed at 64 KiB (`MALLOC_MMAP_THRESHOLD_`) so that freed tensors return to the OS at "
            "once and the RSS follows the live tensors (with glibc's growing default threshold the same step "
            "peaked at 2460 or 2935 MiB depending on allocation history); it includes the frozen "
            "base model and the Python/torch runtime. **step peak − model**: that peak minus the RSS of the "
            "built model before the first step.\n"
            "- **training state**: in-process and exact: tensors saved for backward (unique storages, "
            "parameters excluded) + trainable parameters + gradients + AdamW state.\n"
        )
        ts7 = res.get("train_step_all")
        if ts7:
            out.append("### All seven projections\n")
            out.append(f"Command: `{ts7['_run']['command']}` ({ts7['_run']['wall_s'] / 60:.1f} min).\n")
            out.append(train_step_tables(ts7))
            out.append("")
        out.append("### Where the time goes (torch.profiler, one step each)\n")
        out.append(profile_table(ts))
        out.append("")

    if ly:
        sh = ly["shape"]
        out.append("## 2. Layer level\n")
        out.append(
            f"Command: `{ly['_run']['command']}`. One {sh['dim']} × {sh['dim']} linear layer (LLaMA-7B "
            f"attention shape), {sh['tokens']} tokens, r = {sh['r']}, N = {sh['experts']}, forward + "
            "backward with x requiring grad; `loop_alora` is the released code's algorithm (one product "
            "pair per expert). Ratios are of the adapter path (layer output minus W0 x, docs/design.md §11).\n"
        )
        out.append(layers_table(ly))
        r = ly["ratios"]
        out.append(
            f"\nfused ALoRA vs loop (adapter path) {r['adapter_vs_loop']:.2f}× faster; ALoRA / peft LoRA "
            f"adapter path {r['adapter_vs_peft_lora']:.3f}×, whole layer {r['layer_vs_peft_lora']:.3f}×; "
            f"loop / fused whole layer {r['layer_vs_loop']:.3f}×.\n"
        )

    if inf:
        s = inf["setting"]
        out.append("## 3. Inference: merged vs unmerged vs base\n")
        out.append(
            f'Command: `{inf["_run"]["command"]}`. {inf["model"]}, ALoRA with `router="task"` '
            f"(N = {s['experts']}, r = {s['r']}, q_proj + v_proj, B random non-zero), greedy generation of "
            f"{s['new_tokens']} new tokens after a {s['prompt']}-token prompt, median of {s['reps']} "
            "alternating runs after one warm-up. `merged` = `asymlora.merge_task` of task 0 on a deep copy; "
            "`unmerged` passes `task_ids` to `generate`. The tolerance is 5 % or half the base model's own "
            "spread, whichever is larger.\n"
        )
        out.append(inference_table(inf))
        out.append("")

    out.append("## 4. Federated\n")
    out.append(federated_text(res["federated"]))
    out.append("")

    if sc:
        sh, ck = sc["shape"], sc["checks"]
        out.append("## 5. Scaling with N and r\n")
        out.append(
            f"Command: `{sc['_run']['command']}`. Layer level at the LLaMA-7B attention shape "
            f"({sh['dim']} × {sh['dim']}, {sh['tokens']} tokens): the question is how the adapter's cost "
            "grows, and at whole-model level the frozen base model dominates the step (a SmolLM2 step "
            "is ~1000× the adapter path at these ranks and takes 10–30 s on the shared cores, so 3 methods "
            "× 10 points × 6 steps would take hours and the growth would drown in the noise). Forward + "
            f"backward of the adapter path, median of {sh['reps']} alternating runs; N sweep at r = "
            f"{sh['r']}, r sweep at N = {sh['experts']}. *x side* = the product of x with every A-side "
            "matrix and the router (fused, as in the core); *B side* = `method.combine` (gate mix and the "
            "product with B). Memory = params + grads + AdamW state + saved activations (x itself, kept "
            "by every method, left out).\n"
        )
        if plot_name:
            out.append(f"![scaling]({plot_name})\n")
        fit = ck["fit_alora"]
        n_lo, n_hi = ck["N_range"]
        slopes = ", ".join(
            f"{name} {ck[m]['b_side_ms_per_expert']:+.2f}"
            for m, name in (
                ("alora", "ALoRA"),
                ("hydralora", "HydraLoRA"),
                ("molora", "MoLoRA"),
                ("lora", "LoRA"),
            )
        )
        out.append(
            f"- **ALoRA's B side does not grow with N** "
            f"({'confirmed' if ck['b_side_flat_alora'] else '**not confirmed**'}): B-side time fitted against N "
            f"(N = {n_lo}…{n_hi}, ms per expert): {slopes} (LoRA has no N: its spread over the sweep, "
            f"{ck['noise_b_side_ms']:.1f} ms, is the noise floor). At this shape the B side of every method is "
            "dominated by writing the (tokens × d_out) output and reading its gradient, which no method "
            "avoids; HydraLoRA's and MoLoRA's d_out × N·r product adds to it with N, ALoRA's d_out × r "
            f"product does not. B-side parameters, N = {n_hi} over N = {n_lo}: ALoRA "
            f"{ck['alora']['params_B_growth']:.0f}×, HydraLoRA {ck['hydralora']['params_B_growth']:.0f}×, "
            f"MoLoRA {ck['molora']['params_B_growth']:.0f}×.\n"
            f"- **ALoRA's extra cost grows with N·r·d_in**: A-side parameters = N·r·d_in and B-side = "
            f"r·d_out at every point: {fit['params_A_is_N_r_d_in_and_B_is_r_d_out']}. Fitted against N·r·d_in "
            f"over both sweeps: x-side time {fit['x_side_ms_vs_Nrd']['per_M']:.2f} ms per million "
            f"(R² = {fit['x_side_ms_vs_Nrd']['r2']:.3f}); ALoRA's extra time over LoRA "
            f"{fit['extra_ms_vs_Nrd']['per_M']:.2f} ms per million (R² = {fit['extra_ms_vs_Nrd']['r2']:.3f}); "
            f"its extra memory {fit['extra_MiB_vs_Nrd']['per_M']:.2f} MiB per million "
            f"(R² = {fit['extra_MiB_vs_Nrd']['r2']:.3f}: parameters, gradients and AdamW state, 16 bytes per "
            "A-side value, plus the saved (tokens × N·r) activations and the concatenated [A; W_g] copy the "
            "fused product saves for backward).\n"
        )
        out.append(scaling_tables(sc))
        out.append("")

    out.append(findings(res))
    out.append("## Reproduce\n")
    commands = list(res["commands"])
    if (res.get("federated") or {}).get("status") == "measured":
        commands.append(res["federated"]["result"]["_run"]["command"])
    out.append("```bash\n. .venv/bin/activate\n" + "\n".join(commands) + "\n```\n")
    out.append(
        "Each benchmark prints a human table and one JSON line; `--smoke` runs it in seconds on a tiny "
        "random Llama (tests/test_benchmarks.py); `--device cuda --dtype bfloat16` runs it unchanged on a "
        "GPU (peak memory is then `torch.cuda.max_memory_allocated`).\n"
    )
    return "\n".join(out)


def findings(res: dict[str, Any]) -> str:
    """The findings section: what the profile shows, the hot-path change (measured), torch.compile."""
    out = ["## Findings and recommended changes\n"]
    out.append(
        "- **The whole-model step is dominated by the frozen base model.** In the profile, the matrix products "
        "(`aten::mm`) and the element-wise ops of the transformer (RMSNorm, rotary, SiLU, the softmax over "
        "the vocabulary) take nearly all the time for both peft LoRA and ALoRA; ALoRA adds a few small "
        "calls per adapted module (the router softmax, the gate mix, the concatenation of the A's with "
        "W_g and its backward), listed exactly above. ALoRA's memory overhead is its adapter state and a "
        "(tokens × N·r) activation per module: megabytes against the model's gigabytes."
    )
    cand = res.get("candidate")
    if cand:
        a, lay = cand["adapter_vs_peft_lora"], cand["layer_vs_peft_lora"]
        sh = cand["shape"]
        out.append(
            "- **Hot path: fold the scaling s into the rank side** (recommended, not yet applied: every target "
            "above is met without it, its whole-model gain is below this machine's noise, and it is a "
            "one-function change in `AsymLoraLayer.adapter_path`, `folded_adapter_path` here). Every asymlora method, like peft's LoRA, multiplies the (tokens × d_out) "
            "adapter output by s in the forward pass, and the (tokens × d_out) gradient by s in the backward "
            "pass: two full-size memory passes per adapted module and step. Every method's `combine` is "
            "linear in h = x·x_sideᵀ, so s·combine(h) = combine(s·h) exactly, and h is (tokens × k) with "
            f"k ≤ N·r + N ≪ d_out. Measured (`{cand['_run']['command']}`, {sh['dim']}², {sh['tokens']} "
            f"tokens, median of {sh['reps']} alternating, outputs equal to {cand['max_rel_diff']:.0e}): "
            f"adapter path / peft LoRA: ALoRA {a['now_alora']:.3f}× → {a['fold_alora']:.3f}×, LoRA "
            f"{a['now_lora']:.3f}× → {a['fold_lora']:.3f}×, HydraLoRA {a['now_hydralora']:.3f}× → "
            f"{a['fold_hydralora']:.3f}×, MoLoRA {a['now_molora']:.3f}× → {a['fold_molora']:.3f}×, MALoRA "
            f"{a['now_malora']:.3f}× → {a['fold_malora']:.3f}×; whole layer ALoRA {lay['now_alora']:.3f}× → "
            f"{lay['fold_alora']:.3f}×. At whole-model level (adapted modules are a small share of the step) "
            "the gain is below the noise of this machine."
        )
    out.append(
        "- **torch.compile** (regional: each decoder layer, `train_step.py --compile`) is explored in the "
        "benchmark only and off by default; it compiles in minutes on these cores and, with the base model "
        "frozen, would speed up peft LoRA and ALoRA alike (the transformer's element-wise ops), not the "
        "ratio between them."
    )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="every benchmark with --smoke (seconds)")
    parser.add_argument(
        "--out-dir", default=None, help="where performance.md and scaling.png go (default docs/)"
    )
    parser.add_argument(
        "--all-projections", action="store_true", help="also the step with all seven projections"
    )
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads for every benchmark (default: torch's, one per core); on a machine "
        "oversubscribed by other jobs, 1 avoids OpenMP threads waiting for each other",
    )
    parser.add_argument("--save", default=None, help="also write every figure, as JSON, to this file")
    parser.add_argument(
        "--render", default=None, help="write the doc from a JSON saved with --save, running nothing"
    )
    parser.add_argument(
        "--only",
        default=None,
        help=f"comma-separated subset of {','.join(BENCHMARKS)} (the doc is then written only with --out-dir)",
    )
    args = parser.parse_args(argv)
    import torch

    if args.render:
        res = json.loads(Path(args.render).read_text())
        out_dir = Path(args.out_dir) if args.out_dir else ROOT / "docs"
        saved = argparse.Namespace(**res["args"])
        plot = "scaling.png" if "scaling" in res and (out_dir / "scaling.png").is_file() else None
        write_doc(out_dir / "performance.md", render(res, saved, res["machine"], plot))
        print(f"wrote {out_dir / 'performance.md'} from {args.render}")
        return res
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    only = set(args.only.split(",")) if args.only else set(BENCHMARKS)
    if only - set(BENCHMARKS):
        parser.error(f"--only: unknown {sorted(only - set(BENCHMARKS))}; choose from {BENCHMARKS}")
    skip = set(BENCHMARKS) - only
    out_dir = Path(args.out_dir) if args.out_dir else (None if args.smoke or skip else ROOT / "docs")
    base_args = ["--device", args.device, "--dtype", args.dtype] + (["--smoke"] if args.smoke else [])
    common, env_prefix = list(base_args), ""
    if args.threads:
        torch.set_num_threads(args.threads)  # every benchmark runs in this process
        env_prefix = f"OMP_NUM_THREADS={args.threads} "  # layers.py has no --threads option
        common += ["--threads", str(args.threads)]
    plot_path = out_dir / "scaling.png" if out_dir else None
    t0, c0 = time.perf_counter(), cpu_seconds()
    mach = machine()

    res: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/run_all.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    if "layers" not in skip:
        cmd = env_prefix + " ".join(["python benchmarks/layers.py", *base_args])
        res["layers"] = run("layers", layers.main, base_args, cmd)
    if "train_step" not in skip:
        res["train_step"] = run("train_step", train_step.main, [*common, "--profile"])
        if args.all_projections:
            res["train_step_all"] = run("train_step", train_step.main, [*common, "--all-projections"])
    if "inference" not in skip:
        res["inference"] = run("inference", inference.main, common)
    if "scaling" not in skip:
        plot_args = ["--plot", str(plot_path)] if plot_path else []
        shown = ["--plot", os.path.relpath(plot_path, ROOT)] if plot_path else []
        cmd = " ".join(["python benchmarks/scaling.py", *common, *shown])
        res["scaling"] = run("scaling", scaling.main, [*common, *plot_args], cmd)
    if "candidate" not in skip:
        res["candidate"] = run_candidate(common)
    res["federated"] = federated_section(args) if "federated" not in skip else {"status": "skipped"}
    res["failed"] = {}
    for key in ("layers", "train_step", "train_step_all", "inference", "scaling", "candidate"):
        if key in res and "_failed" in res[key]:
            res["failed"][key] = {"error": res[key]["_failed"], "command": res[key]["_run"]["command"]}
            del res[key]
    res["commands"] = [
        r["_run"]["command"]
        for r in (
            res.get(k)
            for k in ("layers", "train_step", "train_step_all", "inference", "scaling", "candidate")
        )
        if r
    ]
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    res["cpu_s"] = round(cpu_seconds() - c0, 1)
    res["machine"] = mach
    res["args"] = {"device": args.device, "dtype": args.dtype, "smoke": args.smoke, "threads": args.threads}

    print("\n=== every figure, with its ratio")
    for row in target_rows(res):
        print(
            f"{row['figure']:<58}{fmt_ratio(row['measured']):>10}  target {row['target']:<10} {status(row['met'])}"
        )
    if "train_step" in res:
        for n, r in res["train_step"]["ratios"].items():
            print(
                f"whole-model step {n:<12} time {fmt_ratio(r['step_time'])} cpu {fmt_ratio(r['cpu_time'])} "
                f"peak {fmt_ratio(r.get('peak_memory'))} training state {fmt_ratio(r['training_state'])} vs peft LoRA"
            )
    print(f"federated: {res['federated']['status']}")
    for key, failure in res["failed"].items():
        print(f"FAILED {key}: {failure['error']} ({failure['command']})")
    print(f"total: {res['wall_s'] / 60:.1f} min wall, {res['cpu_s'] / 60:.1f} CPU-min")

    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        doc = render(res, args, mach, "scaling.png" if plot_path and "scaling" in res else None)
        write_doc(out_dir / "performance.md", doc)
        res["doc"] = str(out_dir / "performance.md")
        print(f"wrote {res['doc']}" + (f" and {plot_path}" if plot_path and "scaling" in res else ""))
    if args.save:
        Path(args.save).write_text(json.dumps(res, indent=1, default=str))
        print(f"saved every figure to {args.save}")
    summary = {
        "benchmark": "run_all",
        "wall_s": res["wall_s"],
        "targets": [{k: v for k, v in r.items()} for r in target_rows(res)],
        "federated": res["federated"]["status"],
        "failed": res["failed"],
    }
    print(json.dumps(summary, default=str))
    return res


if __name__ == "__main__":
    main()
