"""Forward + backward of one adapted linear layer: fused asymlora methods vs the loop form vs peft LoRA.

Default shape: LLaMA-7B attention projection (4096 × 4096), 2048 tokens, r = 8, N = 3 (docs/design.md §11).
Ratios are of the *adapter path* (the layer's output minus W0 x), forward + backward, with x requiring
grad as inside a network; the frozen base product is timed beside them, and whole-layer ratios too.
Methods are timed alternately, round after round (the order rotating each round), and the median is
reported with the spread (shared, noisy machines).
Before any timing, fused ALoRA's outputs (adapter path and whole layer) must equal the loop form's
(`check_fused_equals_loop`; largest difference relative to the loop's largest value, `EQUAL_RTOL`).

    python benchmarks/layers.py                 # full size (about a minute on 2 CPU cores)
    python benchmarks/layers.py --smoke         # seconds, for CI
    python benchmarks/layers.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import peft
import torch
from torch import nn

import asymlora
from asymlora.routing import RoutingState, router_probs
from asymlora.tuner.layer import Linear as AsymLinear

try:  # imported as the package `benchmarks`
    from benchmarks.common import benchmark_parser, finish, layer_shape, parse, positive_int, spread, timed
except ImportError:  # run as a script: Python puts this folder first on sys.path
    from common import benchmark_parser, finish, layer_shape, parse, positive_int, spread, timed

TARGETS = {"adapter_vs_loop": 3.0, "adapter_vs_peft_lora": 1.3, "layer_vs_peft_lora": 1.05}
EQUAL_RTOL = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 2e-3}
"""Fused vs loop ALoRA: largest |fused − loop| over the loop's largest |value|, per dtype (rounding only)."""


def loop_alora_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, w_g: torch.Tensor) -> torch.Tensor:
    """The released ALoRA code's algorithm: one (A_i, B) product pair per expert, summed."""
    gate = router_probs(x, w_g).to(x.dtype)
    out = 0
    for i in range(a.shape[0]):
        out = out + gate[..., i : i + 1] * ((x @ a[i].T) @ b.T)
    return out


def build(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    d_in = d_out = args.dim
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out, bias=False, device=device, dtype=dtype).requires_grad_(False)
    x = torch.randn(args.tokens, d_in, device=device, dtype=dtype, requires_grad=True)

    layers: dict[str, AsymLinear] = {}
    for method in ("lora", "alora", "hydralora", "molora", "malora"):
        cfg = asymlora.AsymLoraConfig(method=method, r=args.r, num_experts=args.experts, target_modules=["x"])
        layer = AsymLinear(base, "default", cfg, RoutingState()).to(device=device, dtype=dtype)
        with torch.no_grad():
            for p in layer.tensors("default").values():
                p.normal_(std=0.02)
        layers[method] = layer

    # peft's own LoRA at the same r on the same base layer, its adapter in the layer's dtype like asymlora's
    # (peft's default autocast_adapter_dtype keeps a bf16/fp16 model's LoRA in float32)
    holder = nn.Sequential(base)
    lora_cfg = peft.LoraConfig(r=args.r, lora_alpha=16, target_modules=["0"])
    peft_lora = peft.get_peft_model(holder, lora_cfg, autocast_adapter_dtype=False)
    peft_layer = peft_lora.base_model.model[0]
    peft_scale = peft_layer.scaling["default"]

    def adapter_path(layer: AsymLinear) -> Callable[[], torch.Tensor]:
        cfg, t = layer.asymlora_config["default"], layer.tensors("default")
        return lambda: cfg.scaling * layer.adapter_path("default", x, t)

    alora = layers["alora"].tensors("default")
    scale = layers["alora"].asymlora_config["default"].scaling
    adapter: dict[str, Callable[[], torch.Tensor]] = {
        "fused_alora": adapter_path(layers["alora"]),
        "loop_alora": lambda: scale * loop_alora_delta(x, alora["A"], alora["B"], alora["router"]),
        "peft_lora": lambda: peft_layer.lora_B["default"](peft_layer.lora_A["default"](x)) * peft_scale,
    }
    adapter.update({f"{m}_fused": adapter_path(layers[m]) for m in ("lora", "hydralora", "molora", "malora")})
    whole: dict[str, Callable[[], torch.Tensor]] = {
        "base_only": lambda: base(x),
        "fused_alora": lambda: layers["alora"](x),
        "loop_alora": lambda: base(x) + scale * loop_alora_delta(x, alora["A"], alora["B"], alora["router"]),
        "peft_lora": lambda: peft_layer(x),
    }
    whole.update(
        {f"{m}_fused": (lambda m=m: layers[m](x)) for m in ("lora", "hydralora", "molora", "malora")}
    )
    return x, adapter, whole


def check_fused_equals_loop(
    adapter: dict[str, Callable[[], torch.Tensor]], whole: dict[str, Callable[[], torch.Tensor]], dtype: str
) -> dict[str, float]:
    """Largest |fused − loop| / max |loop| of the adapter path and of the whole layer (no grad); raises
    AssertionError above `EQUAL_RTOL` (the timed loop form would not compute what fused ALoRA computes)."""
    found = {}
    with torch.no_grad():
        for part, fns in (("adapter", adapter), ("layer", whole)):
            fused, loop = fns["fused_alora"]().float(), fns["loop_alora"]().float()
            found[part] = float((fused - loop).abs().max() / loop.abs().max().clamp_min(1e-30))
    if not max(found.values()) <= EQUAL_RTOL[dtype]:
        raise AssertionError(
            f"fused ALoRA differs from the loop form by {found} (relative to the loop's largest value; "
            f"at most {EQUAL_RTOL[dtype]:g} in {dtype}): the ratios would compare different computations"
        )
    return {k: float(f"{v:.3g}") for k, v in found.items()}


def measure(
    fns: dict[str, Callable[[], torch.Tensor]], x: torch.Tensor, reps: int, device
) -> tuple[dict[str, float], dict[str, float]]:
    """(median seconds, spread) of each of ``fns``, timed alternately round after round after a warm-up, the
    order rotating each round (as the other benchmarks: no variant always runs first, or after the same one)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():  # warm-up
        timed(fn, device)
        x.grad = None
    names = list(fns)
    for rnd in range(reps):
        for name in names[rnd % len(names) :] + names[: rnd % len(names)]:
            times[name].append(timed(fns[name], device))
            x.grad = None
    return {k: statistics.median(v) for k, v in times.items()}, {k: spread(v) for k, v in times.items()}


def report(
    args: argparse.Namespace, a: dict[str, float], w: dict[str, float], ratios: dict[str, float]
) -> None:
    """The human table: adapter path and whole layer ms per variant, the three target ratios."""
    print(
        f"one linear layer {args.dim}x{args.dim}, {args.tokens} tokens, r={args.r}, N={args.experts}, "
        f"{args.device}/{args.dtype}, forward+backward, median of {args.reps} (ms)"
    )
    print(f"{'variant':<18}{'adapter path':>14}{'whole layer':>14}")
    for name in a:
        print(f"{name:<18}{1e3 * a[name]:>14.2f}{1e3 * w[name]:>14.2f}")
    print(f"{'base W0 x only':<18}{'':>14}{1e3 * w['base_only']:>14.2f}")
    print(f"fused ALoRA vs loop form (adapter path): {ratios['adapter_vs_loop']:.2f}x faster "
          f"(target >= {TARGETS['adapter_vs_loop']}x)")  # fmt: skip
    print(f"fused ALoRA / peft LoRA (adapter path):  {ratios['adapter_vs_peft_lora']:.2f}x "
          f"(target <= {TARGETS['adapter_vs_peft_lora']}x)")  # fmt: skip
    print(f"fused ALoRA / peft LoRA (whole layer):   {ratios['layer_vs_peft_lora']:.2f}x "
          f"(target <= {TARGETS['layer_vs_peft_lora']}x)")  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = benchmark_parser(__doc__, "tiny shape and 2 reps, for CI")
    parser.add_argument("--dim", type=positive_int, default=4096, help="d_in = d_out (LLaMA-7B: 4096)")
    parser.add_argument("--tokens", type=positive_int, default=2048, help="tokens per batch")
    parser.add_argument("--r", type=positive_int, default=8)
    parser.add_argument("--experts", type=positive_int, default=3)
    parser.add_argument("--reps", type=positive_int, default=7)
    args = parse(parser, argv)
    if args.smoke:
        args.dim, args.tokens, args.reps = 256, 128, 2
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    x, adapter, whole = build(args, device, dtype)
    equal = check_fused_equals_loop(adapter, whole, args.dtype)
    a, a_spread = measure(adapter, x, args.reps, device)
    w, w_spread = measure(whole, x, args.reps, device)
    ratios = {
        "adapter_vs_loop": a["loop_alora"] / a["fused_alora"],
        "adapter_vs_peft_lora": a["fused_alora"] / a["peft_lora"],
        "layer_vs_peft_lora": w["fused_alora"] / w["peft_lora"],
        "layer_vs_loop": w["loop_alora"] / w["fused_alora"],
    }
    report(args, a, w, ratios)
    print(f"fused ALoRA = loop form (checked before timing; max |diff| / max |loop|): {equal}")
    result = {
        "benchmark": "layers",
        "shape": layer_shape(args),
        "device": args.device,
        "dtype": args.dtype,
        "adapter_ms": {k: round(1e3 * v, 3) for k, v in a.items()},
        "layer_ms": {k: round(1e3 * v, 3) for k, v in w.items()},
        "adapter_spread": {k: round(v, 4) for k, v in a_spread.items()},
        "layer_spread": {k: round(v, 4) for k, v in w_spread.items()},
        "adapter_vs_peft": {k: round(v / a["peft_lora"], 4) for k, v in a.items()},
        "layer_vs_peft": {k: round(v / w["peft_lora"], 4) for k, v in w.items() if k in a},
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "fused_vs_loop_max_rel_diff": equal,
    }
    return finish(result, args)


if __name__ == "__main__":
    main()
