"""Greedy generation speed: a task-routed ALoRA adapter merged vs unmerged vs the base model alone.

An ALoRA adapter with ``router="task"`` (N = 3 tasks, r = 8, q_proj + v_proj) is
randomly initialised (B non-zero, so the adapter changes the outputs), then:

- ``base``: the base model alone;
- ``unmerged``: the peft model, routed by ``task_ids`` passed to ``generate`` (every adapted layer runs
  the adapter path at every decoding step);
- ``merged``: ``asymlora.merge_task`` of task 0 on a deep copy: the base architecture with W0 + s·B·A_0.

Tokens/s of greedy generation (``--new-tokens`` new tokens, EOS suppressed, prompt of ``--prompt``
random tokens) at batch sizes ``--batches``; variants alternate, round after round, median of ``--reps``
after one warm-up. Merged must equal the base model's speed within noise: the tolerance is 5 % or half
the base model's own spread (max − min over its runs, relative to its median), whichever is larger.
The warm-up also checks that merged and unmerged generate the same tokens.

    python benchmarks/inference.py              # SmolLM2-135M (a few minutes on 2 CPU cores)
    python benchmarks/inference.py --smoke      # tiny random Llama, seconds, for CI
    python benchmarks/inference.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Any

import peft
import torch
from torch import nn

import asymlora

try:  # imported as the package `benchmarks`
    from benchmarks.common import benchmark_parser, finish, parse, positive_int, positive_ints, sync
    from benchmarks.train_step import QV, load_base
except ImportError:  # run as a script: Python puts this folder first on sys.path
    from common import benchmark_parser, finish, parse, positive_int, positive_ints, sync
    from train_step import QV, load_base

TOLERANCE = 0.05
"""Merged vs base tokens/s: at least this close to 1 counts as equal (or half the base's own spread)."""


def build(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(base, unmerged peft model, merged model), all in eval mode on ``device``."""
    base = load_base(args.smoke, device, dtype).eval()
    torch.manual_seed(0)
    cfg = asymlora.AsymLoraConfig(
        method="alora",
        r=args.r,
        lora_alpha=2 * args.r,
        num_experts=args.experts,
        router="task",
        target_modules=list(QV),
    )
    unmerged = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    with torch.no_grad():
        for name, p in unmerged.named_parameters():
            if "asymlora_B" in name:
                p.normal_(std=args.b_std)  # a trained-looking adapter: B is zero only at init
    merged = asymlora.merge_task(copy.deepcopy(unmerged), args.task).eval()
    return base, unmerged, merged


def generate(
    model: nn.Module, ids: torch.Tensor, new_tokens: int, task_ids: torch.Tensor | None
) -> torch.Tensor:
    """Greedy decoding of exactly ``new_tokens`` tokens (EOS suppressed)."""
    kwargs: dict[str, Any] = {"task_ids": task_ids} if task_ids is not None else {}
    with torch.inference_mode():
        return model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            **kwargs,
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = benchmark_parser(__doc__, "tiny random Llama, 8 new tokens, 1 rep, for CI")
    parser.add_argument("--new-tokens", type=positive_int, default=64)
    parser.add_argument("--prompt", type=positive_int, default=32, help="prompt length (random tokens)")
    parser.add_argument("--batches", type=positive_ints, default="1,4", help="comma-separated batch sizes")
    parser.add_argument("--r", type=positive_int, default=8)
    parser.add_argument("--experts", type=positive_int, default=3, help="N = number of tasks")
    parser.add_argument("--task", type=int, default=0, help="the task merged and routed to")
    parser.add_argument("--b-std", type=float, default=0.05, help="std of the random B (non-zero adapter)")
    parser.add_argument("--reps", type=positive_int, default=5)
    args = parse(parser, argv)
    if args.smoke:
        args.new_tokens, args.prompt, args.reps = 8, 8, 1
    if not 0 <= args.task < args.experts:
        parser.error(
            f"--task must be one of the --experts {args.experts} tasks (0..{args.experts - 1}), got {args.task}"
        )
    return args


def alternate(
    args: argparse.Namespace, models: dict[str, nn.Module], prompts: dict[int, torch.Tensor]
) -> tuple:
    """(seconds per (batch, variant) over ``args.reps`` alternating rounds, the warm-up's token checks)."""
    device = next(iter(prompts.values())).device

    def run(name: str, b: int) -> tuple[float, torch.Tensor]:
        task_ids = torch.full((b,), args.task, device=device) if name == "unmerged" else None
        sync(device)
        t0 = time.perf_counter()
        out = generate(models[name], prompts[b], args.new_tokens, task_ids)
        sync(device)
        return time.perf_counter() - t0, out

    checks: dict[str, dict[str, float]] = {}
    for b in prompts:  # warm-up, and check that merged == unmerged (and != base)
        outs = {name: run(name, b)[1][:, args.prompt :] for name in models}
        checks[str(b)] = {
            "merged_equals_unmerged": float((outs["merged"] == outs["unmerged"]).float().mean()),
            "merged_equals_base": float((outs["merged"] == outs["base"]).float().mean()),
        }
    times: dict[tuple[int, str], list[float]] = {(b, n): [] for b in prompts for n in models}
    names = list(models)
    for rnd in range(args.reps):
        for b in prompts:
            for name in names[rnd % len(names) :] + names[: rnd % len(names)]:
                times[(b, name)].append(run(name, b)[0])
    return times, checks


def batch_row(
    b: int, new_tokens: int, times: dict[str, list[float]], checks: dict[str, float]
) -> dict[str, Any]:
    """Tokens/s of every variant at batch ``b``, the ratios to base and whether merged = base within noise."""
    tps = {n: b * new_tokens / statistics.median(t) for n, t in times.items()}
    base_t = times["base"]
    spread = (max(base_t) - min(base_t)) / statistics.median(base_t) if len(base_t) > 1 else 0.0
    tol = max(TOLERANCE, spread / 2)
    merged_ratio = tps["merged"] / tps["base"]
    return {
        "tokens_per_s": {n: round(v, 2) for n, v in tps.items()},
        "ms_all": {n: [round(1e3 * t, 1) for t in ts] for n, ts in times.items()},
        "merged_vs_base": round(merged_ratio, 4),
        "unmerged_vs_base": round(tps["unmerged"] / tps["base"], 4),
        "merged_vs_unmerged": round(tps["merged"] / tps["unmerged"], 4),
        "base_spread": round(spread, 4),
        "tolerance": round(tol, 4),
        "merged_equals_base_speed": abs(merged_ratio - 1) <= tol,
        **checks,
    }


def print_table(result: dict[str, Any], args: argparse.Namespace) -> None:
    print(
        f"greedy generation: {result['model']}, prompt {args.prompt} + {args.new_tokens} new tokens, ALoRA "
        f"router=task (N={args.experts}, r={args.r}, q_proj,v_proj), {args.device}/{args.dtype}, "
        f"median of {args.reps} alternating runs after 1 warm-up (tokens/s)"
    )
    print(f"{'batch':<7}{'base':>10}{'merged':>10}{'unmerged':>10}{'merged/base':>13}{'unmerged/base':>15}"
          f"{'base spread':>13}{'merged==unmerged':>18}")  # fmt: skip
    for b, r in result["batches"].items():
        t = r["tokens_per_s"]
        print(
            f"{b:<7}{t['base']:>10.1f}{t['merged']:>10.1f}{t['unmerged']:>10.1f}{r['merged_vs_base']:>13.3f}"
            f"{r['unmerged_vs_base']:>15.3f}{r['base_spread']:>13.1%}{r['merged_equals_unmerged']:>18.1%}"
        )
    print(f"merged equals the base model's speed within noise: {'yes' if result['target_met'] else 'NO'}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    t_start = time.perf_counter()
    base, unmerged, merged = build(args, device, dtype)
    g = torch.Generator().manual_seed(0)
    vocab = base.config.vocab_size
    prompts = {b: torch.randint(3, vocab, (b, args.prompt), generator=g).to(device) for b in args.batches}
    models = {"base": base, "merged": merged, "unmerged": unmerged}
    times, checks = alternate(args, models, prompts)
    results = {
        str(b): batch_row(b, args.new_tokens, {n: times[(b, n)] for n in models}, checks[str(b)])
        for b in prompts
    }
    result = {
        "benchmark": "inference",
        "model": "tiny random Llama" if args.smoke else "SmolLM2-135M",
        "setting": {
            "prompt": args.prompt,
            "new_tokens": args.new_tokens,
            "r": args.r,
            "experts": args.experts,
            "reps": args.reps,
            "tolerance_floor": TOLERANCE,
            "threads": torch.get_num_threads(),
        },
        "device": args.device,
        "dtype": args.dtype,
        "batches": results,
        "target_met": all(r["merged_equals_base_speed"] for r in results.values()),
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    print_table(result, args)
    return finish(result, args)


if __name__ == "__main__":
    main()
