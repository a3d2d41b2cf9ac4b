"""How the adapter's step time and memory grow with the number of experts N and the rank r.

ALoRA vs MoLoRA vs HydraLoRA (plain LoRA of rank r as the reference), N in
(1, 2, 4, 8, 16) at r = 8 and r in (4, 8, 16, 32, 64) at N = 3.

**Layer level, at the LLaMA-7B attention shape** (4096 × 4096, 2048 tokens, as ``benchmarks/layers.py``),
not the whole SmolLM2 model: the question is how the *adapter's* cost grows, and at whole-model level the
frozen base model dominates the step (``train_step.py``), so 3 methods × 10 points of whole-model steps
would take hours and the growth would drown in the noise. At layer level the adapter path is timed alone, with the frozen base product left out.
Times are forward + backward of the adapter path (x requiring grad, as inside a network), alternating
methods round after round, median of ``--reps``; each is split into

- the **x side**: the product of the layer input with every A-side matrix (and the router, fused into it
  as the core does), forward + backward: for ALoRA it reads N·r·d_in weights;
- the **B side** (``method.combine``): the gate mix and the product with B: for ALoRA one d_out × r
  product whatever N, for HydraLoRA and MoLoRA one d_out × N·r product.

Memory = adapter parameters + gradients + AdamW state (2 tensors per parameter) + the activations saved
for backward (``torch.autograd.graph.saved_tensors_hooks``, unique storages; the layer input x, which
every method and the next layer keep anyway, is left out). The claim checked: ALoRA's extra cost over
LoRA grows with N·r·d_in only (its B side does not grow with N).

    python benchmarks/scaling.py                       # about two minutes on 2 CPU cores
    python benchmarks/scaling.py --plot docs/scaling.png
    python benchmarks/scaling.py --smoke               # tiny shapes, seconds, for CI
    python benchmarks/scaling.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import asymlora
from asymlora.io import atomic_file
from asymlora.methods.base import Role
from asymlora.routing import RoutingState
from asymlora.tuner.layer import Linear as AsymLinear

try:  # imported as the package `benchmarks`
    from benchmarks.common import (
        MiB,
        benchmark_parser,
        finish,
        layer_shape,
        parse,
        positive_int,
        positive_ints,
        spread,
        timed,
    )
    from benchmarks.train_step import count_saved
except ImportError:  # run as a script: Python puts this folder first on sys.path
    from common import (
        MiB,
        benchmark_parser,
        finish,
        layer_shape,
        parse,
        positive_int,
        positive_ints,
        spread,
        timed,
    )
    from train_step import count_saved

METHODS: tuple[str, ...] = ("alora", "hydralora", "molora")
REFERENCE = "lora"
PARTS: tuple[str, ...] = ("total", "x_side", "b_side")


def make_layer(
    base: nn.Linear, method: str, r: int, n: int, device: torch.device, dtype: torch.dtype
) -> AsymLinear:
    """One adapted layer with small random values in every tensor (B non-zero: a trained-looking adapter)."""
    cfg = asymlora.AsymLoraConfig(method=method, r=r, lora_alpha=2 * r, num_experts=n, target_modules=["x"])
    layer = AsymLinear(base, "default", cfg, RoutingState()).to(device=device, dtype=dtype)
    with torch.no_grad():
        for p in layer.tensors("default").values():
            p.normal_(std=0.02)
    return layer


def parts(
    layer: AsymLinear, x: torch.Tensor
) -> tuple[dict[str, Callable[[], torch.Tensor]], list[torch.Tensor]]:
    """The adapter path (``total``) and its two halves, each a closure returning a tensor to backprop,
    and the leaf tensors whose gradients they fill."""
    t = layer.tensors("default")
    cfg = layer.asymlora_config["default"]
    method = asymlora.get_method(cfg.method)
    x_side, router = method.x_side(t), t.get("router")
    with torch.no_grad():
        h0 = F.linear(x, x_side)
        gate0 = layer.gate("default", x)
    h = h0.detach().requires_grad_(True)
    gate = None if gate0 is None else gate0.to(x.dtype).detach().requires_grad_(True)
    fns = {
        "total": lambda: cfg.scaling * layer.adapter_path("default", x, t),
        # the core's fused first product: the router stacked under the A-side matrix
        "x_side": lambda: F.linear(x, x_side if router is None else torch.cat([x_side, router])),
        "b_side": lambda: method.combine(h, t, gate),
    }
    leaves = [x, h, *t.values()] + ([] if gate is None else [gate])
    return fns, leaves


def memory(layer: AsymLinear, x: torch.Tensor) -> dict[str, int]:
    """Adapter params (by role) + grads + AdamW state + saved activations, in bytes."""
    t = layer.tensors("default")
    specs = layer.specs("default")
    by_role = {role.value: 0 for role in Role}
    for name, p in t.items():
        by_role[specs[name].role.value] += p.numel()
    params = [p for p in t.values() if p.requires_grad]
    p_bytes = sum(p.numel() * p.element_size() for p in params)
    cfg = layer.asymlora_config["default"]
    with count_saved(exclude=[*t.values(), x]) as saved:
        out = cfg.scaling * layer.adapter_path("default", x, t)
    out.float().sum().backward()
    for p in params:
        p.grad = None
    x.grad = None
    return {
        "params": sum(p.numel() for p in params),
        "params_A": by_role["A"],
        "params_B": by_role["B"],
        "params_router": by_role["router"],
        "param_bytes": p_bytes,
        "grad_bytes": p_bytes,
        "adam_bytes": 2 * p_bytes,
        "saved_bytes": saved["bytes"],
        "total_bytes": 4 * p_bytes + saved["bytes"],
    }


def points(args: argparse.Namespace) -> list[tuple[str, int, int]]:
    """(sweep, N, r) of every measured configuration."""
    pts = [("N", n, args.r) for n in args.ns] + [("r", args.experts, r) for r in args.rs]
    return pts


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least squares y = a + b x: (a, b, R²)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    b = sxy / sxx if sxx else 0.0
    a = my - b * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys, strict=True))
    return a, b, 1 - ss_res / ss_tot if ss_tot else 1.0


COLORS = {"alora": "tab:red", "hydralora": "tab:blue", "molora": "tab:green", "lora": "tab:gray"}
LABELS = {"alora": "ALoRA", "hydralora": "HydraLoRA", "molora": "MoLoRA", "lora": "LoRA (rank r)"}
Row = dict[str, Any]


def series(
    rows: list[Row], sweep: str, method: str, key: Callable[[Row], float]
) -> tuple[list[int], list[float]]:
    """(N or r, key(row)) of one method's rows in one sweep."""
    pts = [row for row in rows if row["sweep"] == sweep and row["method"] == method]
    return [row["N"] if sweep == "N" else row["r"] for row in pts], [key(row) for row in pts]


def finish_axes(ax: Any, xlabel: str, ylabel: str, title: str, legend_size: float | None = None) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=legend_size)


def plot_sweeps(axes: Any, rows: list[Row], shape: dict[str, int]) -> None:
    """Columns 0-1: adapter time (top) and memory (bottom) against N, then against r."""
    for col, sweep in enumerate(("N", "r")):
        ax_t, ax_m = axes[0][col], axes[1][col]
        for m in (*METHODS, REFERENCE):
            xs, ys = series(rows, sweep, m, lambda row: row["ms"]["total"])
            ax_t.plot(xs, ys, "o-", color=COLORS[m], label=LABELS[m])
            xs, ys = series(rows, sweep, m, lambda row: row["memory"]["total_bytes"] / MiB)
            ax_m.plot(xs, ys, "o-", color=COLORS[m], label=LABELS[m])
        fixed = f"r = {shape['r']}" if sweep == "N" else f"N = {shape['experts']}"
        xlabel = "number of experts N" if sweep == "N" else "rank r"
        finish_axes(ax_t, xlabel, "ms (median)", f"adapter path fwd+bwd time vs {sweep} ({fixed})")
        finish_axes(ax_m, xlabel, "MiB: params + grads + AdamW + saved activations",
                    f"adapter memory vs {sweep} ({fixed})")  # fmt: skip


def plot_halves(ax: Any, rows: list[Row], shape: dict[str, int]) -> None:
    """The x side and B side times of each method against N, LoRA's B side as the no-N line."""
    for m in METHODS:
        xs, ys = series(rows, "N", m, lambda row: row["ms"]["x_side"])
        ax.plot(xs, ys, "o-", color=COLORS[m], label=f"{LABELS[m]}: x side (A, router)")
        xs, ys = series(rows, "N", m, lambda row: row["ms"]["b_side"])
        ax.plot(xs, ys, "s--", color=COLORS[m], label=f"{LABELS[m]}: B side (gate mix, B)")
    xs, ys = series(rows, "N", REFERENCE, lambda row: row["ms"]["b_side"])
    ax.plot(xs, ys, ":", color=COLORS[REFERENCE], label="LoRA: B side (no N)")
    finish_axes(ax, "number of experts N", "ms (median)", f"where the time goes vs N (r = {shape['r']})", 8)


def plot_params(ax: Any, rows: list[Row], shape: dict[str, int]) -> None:
    """A-side and B-side parameters of each method against N (log scale)."""
    widths = {"alora": 7, "hydralora": 4, "molora": 1.5}  # equal lines overlap: widest drawn first
    for m in METHODS:
        xs, ys = series(rows, "N", m, lambda row: row["memory"]["params_A"] / 1e6)
        ax.plot(xs, ys, "-", color=COLORS[m], lw=widths[m], alpha=0.6, label=f"{LABELS[m]}: A side")
        xs, ys = series(rows, "N", m, lambda row: row["memory"]["params_B"] / 1e6)
        ax.plot(xs, ys, "--", color=COLORS[m], lw=widths[m], alpha=0.6, label=f"{LABELS[m]}: B side")
    text = "ALoRA A = MoLoRA A = N·r·d_in\nALoRA B = HydraLoRA A = r·d\nHydraLoRA B = MoLoRA B = N·r·d_out"
    ax.text(0.02, 0.62, text, transform=ax.transAxes, fontsize=8, va="top")
    ax.set_yscale("log")
    finish_axes(ax, "number of experts N", "parameters (millions)",
                f"parameters per layer by side vs N (r = {shape['r']})", 8)  # fmt: skip


def plot(result: dict[str, Any], path: str | Path) -> None:
    """Six panels: time vs N, time vs r, ALoRA/HydraLoRA/MoLoRA halves vs N; memory vs N, vs r, params vs N."""
    import matplotlib  # optional: only --plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, shape = result["rows"], result["shape"]
    fig, axes = plt.subplots(2, 3, figsize=(16, 9.5))
    plot_sweeps(axes, rows, shape)
    plot_halves(axes[0][2], rows, shape)
    plot_params(axes[1][2], rows, shape)
    fig.suptitle(
        f"Scaling of the adapter path: one {shape['dim']}×{shape['dim']} layer, {shape['tokens']} tokens, "
        f"{result['device']}/{result['dtype']} (medians of {shape['reps']} alternating runs)"
    )
    fig.tight_layout()
    try:  # atomically: an interrupted run leaves the previous plot, not half a PNG
        atomic_file(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = benchmark_parser(__doc__, "tiny shapes, 1 rep, for CI")
    parser.add_argument("--dim", type=positive_int, default=4096, help="d_in = d_out (LLaMA-7B: 4096)")
    parser.add_argument("--tokens", type=positive_int, default=2048)
    parser.add_argument("--ns", type=positive_ints, default="1,2,4,8,16", help="numbers of experts (at --r)")
    parser.add_argument("--rs", type=positive_ints, default="4,8,16,32,64", help="ranks (at --experts)")
    parser.add_argument("--r", type=positive_int, default=8, help="rank of the N sweep")
    parser.add_argument("--experts", type=positive_int, default=3, help="N of the r sweep")
    parser.add_argument("--reps", type=positive_int, default=5)
    parser.add_argument("--plot", default=None, help="write the PNG plot here")
    args = parse(parser, argv)
    if args.smoke:
        args.dim, args.tokens, args.reps, args.ns, args.rs = 128, 64, 1, [1, 2, 4], [4, 8]
    return args


Key = tuple[str, int, int, str]


def measure(args: argparse.Namespace) -> list[Row]:
    """Every (sweep, N, r, method): median ms of each part of the adapter path, and its memory."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    base = nn.Linear(args.dim, args.dim, bias=False, device=device, dtype=dtype).requires_grad_(False)
    x = torch.randn(args.tokens, args.dim, device=device, dtype=dtype, requires_grad=True)
    cases: dict[Key, dict[str, Callable[[], torch.Tensor]]] = {}
    leaves: dict[Key, list[torch.Tensor]] = {}
    mems: dict[Key, dict[str, int]] = {}
    for sweep, n, r in points(args):
        for m in (*METHODS, REFERENCE):
            layer = make_layer(base, m, r, n, device, dtype)
            cases[(sweep, n, r, m)], leaves[(sweep, n, r, m)] = parts(layer, x)
            mems[(sweep, n, r, m)] = memory(layer, x)

    def run(k: Key, p: str) -> float:
        seconds = timed(cases[k][p], device)
        for leaf in leaves[k]:  # fresh gradients every time (no accumulation into old ones)
            leaf.grad = None
        return seconds

    keys = list(cases)
    times: dict[Key, dict[str, list[float]]] = {k: {p: [] for p in PARTS} for k in keys}
    for k in keys:  # warm-up
        for p in PARTS:
            run(k, p)
    for rnd in range(args.reps):  # alternate: every (point, method, part) once per round
        for k in keys[rnd % len(keys) :] + keys[: rnd % len(keys)]:
            for p in PARTS:
                times[k][p].append(run(k, p))
    return [
        {"sweep": k[0], "N": k[1], "r": k[2], "method": k[3],
         "ms": {p: round(1e3 * statistics.median(v), 3) for p, v in ts.items()},
         "spread": {p: round(spread(v), 4) for p, v in ts.items()}, "memory": mems[k]}
        for k, ts in times.items()
    ]  # fmt: skip


def get(rows: list[Row], sweep: str, m: str, key: Callable[[Row], float]) -> list[float]:
    return [key(row) for row in rows if row["sweep"] == sweep and row["method"] == m]


def n_checks(rows: list[Row], ns: list[int]) -> dict[str, Any]:
    """The N sweep: per-expert slopes of each half, growths, LoRA's noise floor, is ALoRA's B side flat."""
    checks: dict[str, Any] = {"N_range": [min(ns), max(ns)]}
    xs = [float(n) for n in ns]
    for m in (*METHODS, REFERENCE):
        b_ms = get(rows, "N", m, lambda row: row["ms"]["b_side"])
        x_ms = get(rows, "N", m, lambda row: row["ms"]["x_side"])
        params_b = get(rows, "N", m, lambda row: row["memory"]["params_B"])
        checks[m] = {
            "b_side_ms_per_expert": round(linear_fit(xs, b_ms)[1], 4),
            "x_side_ms_per_expert": round(linear_fit(xs, x_ms)[1], 4),
            "b_side_growth": round(b_ms[-1] / b_ms[0], 3),
            "x_side_growth": round(x_ms[-1] / x_ms[0], 3),
            "params_B_growth": params_b[-1] / params_b[0],
        }
    # LoRA does not depend on N: the spread of its B side over the N sweep is the noise floor
    lora_b = get(rows, "N", REFERENCE, lambda row: row["ms"]["b_side"])
    checks["noise_b_side_ms"] = round(max(lora_b) - min(lora_b), 3)
    others = min(checks["hydralora"]["b_side_ms_per_expert"], checks["molora"]["b_side_ms_per_expert"])
    slope = checks["alora"]["b_side_ms_per_expert"]
    checks["b_side_flat_alora"] = slope <= 0.25 * max(others, 0.0) or (
        slope * (max(ns) - min(ns)) <= checks["noise_b_side_ms"]
    )
    return checks


def fit_checks(rows: list[Row], dim: int) -> dict[str, Any]:
    """ALoRA against N·r·d_in over both sweeps: x-side time, extra time and memory over LoRA (least squares)."""
    alora_rows = [row for row in rows if row["method"] == "alora"]
    nrd = [float(row["N"] * row["r"] * dim) for row in alora_rows]
    lora = {(row["sweep"], row["N"], row["r"]): row for row in rows if row["method"] == REFERENCE}

    def extra(row: Row, key: Callable[[Row], float]) -> float:
        return key(row) - key(lora[(row["sweep"], row["N"], row["r"])])

    fits = {
        "extra_ms_vs_Nrd": linear_fit(nrd, [extra(row, lambda x: x["ms"]["total"]) for row in alora_rows]),
        "x_side_ms_vs_Nrd": linear_fit(nrd, [row["ms"]["x_side"] for row in alora_rows]),
        "extra_MiB_vs_Nrd": linear_fit(
            nrd, [extra(row, lambda x: x["memory"]["total_bytes"] / MiB) for row in alora_rows]
        ),
    }
    out: dict[str, Any] = {
        k: {"intercept": round(a, 4), "per_M": round(b * 1e6, 4), "r2": round(r2, 4)}
        for k, (a, b, r2) in fits.items()
    }
    out["params_A_is_N_r_d_in_and_B_is_r_d_out"] = all(
        row["memory"]["params_A"] == row["N"] * row["r"] * dim and row["memory"]["params_B"] == row["r"] * dim
        for row in alora_rows
    )
    return out


def print_table(result: dict[str, Any]) -> None:
    sh, checks = result["shape"], result["checks"]
    print(f"adapter path scaling: one {sh['dim']}x{sh['dim']} layer, {sh['tokens']} tokens, {result['device']}/"
          f"{result['dtype']}, forward+backward, median of {sh['reps']} alternating runs")  # fmt: skip
    print(f"{'sweep':<6}{'N':>4}{'r':>4} {'method':<10}{'total ms':>10}{'x side':>9}{'B side':>9}"
          f"{'params':>10}{'A side':>10}{'B side':>9}{'saved MiB':>10}{'memory MiB':>11}")  # fmt: skip
    for row in result["rows"]:
        mem, ms = row["memory"], row["ms"]
        print(f"{row['sweep']:<6}{row['N']:>4}{row['r']:>4} {row['method']:<10}{ms['total']:>10.2f}"
              f"{ms['x_side']:>9.2f}{ms['b_side']:>9.2f}{mem['params']:>10d}{mem['params_A']:>10d}"
              f"{mem['params_B']:>9d}{mem['saved_bytes'] / MiB:>10.2f}{mem['total_bytes'] / MiB:>11.2f}")  # fmt: skip
    print(
        "B-side time slope over N (ms per expert): "
        + ", ".join(f"{m} {checks[m]['b_side_ms_per_expert']:+.2f}" for m in (*METHODS, REFERENCE))
        + f" (noise floor: LoRA's B side varies by {checks['noise_b_side_ms']:.2f} ms over the sweep); "
        + f"ALoRA B side flat in N: {'yes' if checks['b_side_flat_alora'] else 'NO'}"
    )
    fit = checks["fit_alora"]
    print(
        f"ALoRA vs N·r·d_in: x-side time {fit['x_side_ms_vs_Nrd']['per_M']:.2f} ms per million (R² "
        f"{fit['x_side_ms_vs_Nrd']['r2']:.3f}); extra time over LoRA {fit['extra_ms_vs_Nrd']['per_M']:.2f} ms "
        f"per million (R² {fit['extra_ms_vs_Nrd']['r2']:.3f}); extra memory {fit['extra_MiB_vs_Nrd']['per_M']:.2f} "
        f"MiB per million (R² {fit['extra_MiB_vs_Nrd']['r2']:.3f}); A params = N·r·d_in and B params = r·d_out "
        f"at every point: {fit['params_A_is_N_r_d_in_and_B_is_r_d_out']}"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t_start = time.perf_counter()
    rows = measure(args)
    # The claim: ALoRA's extra cost over LoRA grows with N·r·d_in only; its B side does not grow with N.
    checks = {**n_checks(rows, args.ns), "fit_alora": fit_checks(rows, args.dim)}
    result: dict[str, Any] = {
        "benchmark": "scaling",
        "shape": layer_shape(args),
        "device": args.device,
        "dtype": args.dtype,
        "rows": rows,
        "checks": checks,
        "threads": torch.get_num_threads(),
    }
    print_table(result)
    if args.plot:
        plot(result, args.plot)
        result["plot"] = str(args.plot)
        print(f"plot written to {args.plot}")
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    return finish(result, args)


if __name__ == "__main__":
    main()
