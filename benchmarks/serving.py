"""Mixed-task batched greedy generation: task-routed adapters served unmerged, every row a different task.

Variants, all on one base model (SmolLM2-135M; ``--smoke``: the tiny random Llama of tests/conftest.py),
adapters on q_proj + v_proj, r = 8, B random non-zero (a trained-looking adapter):

- ``base``: the base model alone (the speed to match);
- ``alora`` / ``hydralora`` / ``molora`` / ``malora``: one adapter with ``router="task"`` and N experts,
  ``generate(..., task_ids=...)`` (each row its own expert: `AdapterMethod.routed_delta`);
- ``peft``: what a peft user does today: N ordinary LoRA adapters of rank r in one ``PeftModel`` (the N
  tasks of the ALoRA adapter, written by `asymlora.export_task_adapter` and loaded with
  ``PeftModel.from_pretrained`` / ``load_adapter``), served in one batch with ``adapter_names=[...]``.

Row b of a batch has task b mod N. Tokens/s of greedy decoding (``--new-tokens``, EOS suppressed, prompt of
``--prompt`` random tokens); the variants alternate round after round, median of ``--reps`` after one
warm-up. The warm-up also checks, row by row, that each method's mixed batch generates the tokens of its
task's merged model (`asymlora.merge_task`, the row alone; its first ``--check-tokens``), and that peft's
mixed batch generates ALoRA's (all tokens).
Then the scaling with N (``--scaling-n``) at the largest batch, and a torch.profiler breakdown of where
ALoRA's extra time goes against the base model (self CPU time per op, one generation each).

    python benchmarks/serving.py --save benchmarks/results/serving.json   # minutes on 2 CPU cores
    python benchmarks/serving.py --smoke                                  # seconds, for CI
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import peft
import torch
from torch import nn

import asymlora

try:  # imported as the package `benchmarks`
    from benchmarks.common import benchmark_parser, finish, parse, positive_int, positive_ints, sync, utc_now
    from benchmarks.train_step import QV, load_base
except ImportError:  # run as a script: Python puts this folder first on sys.path
    from common import benchmark_parser, finish, parse, positive_int, positive_ints, sync, utc_now
    from train_step import QV, load_base

METHODS = ("alora", "hydralora", "molora", "malora")
TARGETS = {"vs_base": 0.95, "vs_peft_batch8": 1.5}  # task-routed ALoRA's tokens/s ratios
"""Task-routed ALoRA unmerged: ≥ 0.95× the base model's tokens/s (batch 1 and 8), ≥ 1.5× peft's at batch 8."""


# --- models ------------------------------------------------------------------------------------------
def routed_model(base: nn.Module, method: str, n: int, args: argparse.Namespace) -> nn.Module:
    """A deep copy of ``base`` with a task-routed adapter of ``n`` tasks, B random, in eval mode."""
    torch.manual_seed(0)
    cfg = asymlora.AsymLoraConfig(
        method=method, r=args.r, lora_alpha=2 * args.r, num_experts=n, router="task", target_modules=list(QV)
    )
    model = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "asymlora_B" in name:
                p.normal_(std=args.b_std)
    return model


def peft_multi_adapter(base: nn.Module, alora: nn.Module, n: int, tmp: Path) -> nn.Module:
    """N plain peft LoRA adapters ``task0``…, one per task of ``alora``, loaded the way a peft user does."""
    for t in range(n):
        asymlora.export_task_adapter(alora, t, tmp / f"task{t}", overwrite=True)
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp / "task0"), adapter_name="task0")
    for t in range(1, n):
        model.load_adapter(str(tmp / f"task{t}"), adapter_name=f"task{t}")
    return model.eval()


def routing_kwargs(name: str, b: int, n: int) -> dict[str, Any]:
    """The per-row task of a batch of ``b`` rows (row i: task i mod n), as each variant takes it."""
    tasks = [i % n for i in range(b)]
    if name == "base":
        return {}
    if name == "peft":
        return {"adapter_names": [f"task{t}" for t in tasks]}
    return {"task_ids": torch.tensor(tasks)}


def greedy(model: nn.Module, ids: torch.Tensor, new_tokens: int, **routing: Any) -> torch.Tensor:
    """Greedy decoding of exactly ``new_tokens`` tokens (EOS suppressed); returns the new tokens only."""
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            **routing,
        )
    return out[:, ids.shape[1] :]


# --- measuring ---------------------------------------------------------------------------------------
def alternate(
    models: dict[str, nn.Module], prompts: dict[int, torch.Tensor], n: int, args: argparse.Namespace
) -> tuple[dict[int, dict[str, float]], dict[int, dict[str, torch.Tensor]]]:
    """Tokens/s (median of ``args.reps`` alternating rounds after a warm-up) and warm-up outputs, by batch."""
    device = next(iter(prompts.values())).device
    outs = {b: {m: greedy(models[m], p, args.new_tokens, **routing_kwargs(m, b, n)) for m in models}
            for b, p in prompts.items()}  # fmt: skip
    times: dict[tuple[int, str], list[float]] = {(b, m): [] for b in prompts for m in models}
    names = list(models)
    for rnd in range(args.reps):
        order = names[rnd % len(names) :] + names[: rnd % len(names)]
        for b, p in prompts.items():
            for m in order:
                sync(device)
                t0 = time.perf_counter()
                greedy(models[m], p, args.new_tokens, **routing_kwargs(m, b, n))
                sync(device)
                times[(b, m)].append(time.perf_counter() - t0)
    tps = {b: {m: b * args.new_tokens / statistics.median(times[(b, m)]) for m in names} for b in prompts}
    return tps, outs


def merged_agreement(model: nn.Module, prompts: torch.Tensor, mixed: torch.Tensor, n: int, new: int) -> float:
    """Fraction of rows whose first ``new`` mixed-batch tokens equal their task's merged model's (the row
    alone, batch 1)."""
    equal, mixed = 0, mixed[:, :new]
    for t in range(n):
        rows = [i for i in range(prompts.shape[0]) if i % n == t]
        if not rows:
            continue
        merged = asymlora.merge_task(copy.deepcopy(model), t).eval()
        equal += sum(bool(torch.equal(greedy(merged, prompts[i : i + 1], new)[0], mixed[i])) for i in rows)
        del merged
    return equal / prompts.shape[0]


def profile_ops(models: dict[str, nn.Module], ids: torch.Tensor, n: int, new: int, top: int = 8) -> dict:
    """Self CPU time per op (ms, one generation each) and where ALoRA's extra time goes against base."""
    found = {}
    for name, model in models.items():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            greedy(model, ids, new, **routing_kwargs(name, ids.shape[0], n))
        found[name] = {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}
    extra = {op: found["alora"].get(op, 0.0) - found["base"].get(op, 0.0) for op in found["alora"]}
    ranked = sorted(extra.items(), key=lambda kv: -kv[1])[:top]
    return {
        "total_ms": {m: round(sum(v.values()), 1) for m, v in found.items()},
        "extra_ms_by_op": {op: round(ms, 2) for op, ms in ranked},
    }


def main_table(base: nn.Module, args: argparse.Namespace, prompts: dict[int, torch.Tensor]) -> dict[str, Any]:
    """Base, the four task-routed methods and peft's multi-adapter model at every batch size (N experts)."""
    n = args.experts
    models: dict[str, nn.Module] = {"base": base}
    models.update({m: routed_model(base, m, n, args) for m in METHODS})
    with tempfile.TemporaryDirectory() as tmp:
        models["peft"] = peft_multi_adapter(base, models["alora"], n, Path(tmp))
    tps, outs = alternate(models, prompts, n, args)
    rows: dict[str, Any] = {}
    for b, t in tps.items():
        rows[str(b)] = {
            "tokens_per_s": {m: round(v, 2) for m, v in t.items()},
            "vs_base": {m: round(t[m] / t["base"], 4) for m in [*METHODS, "peft"]},
            "vs_peft": {m: round(t[m] / t["peft"], 4) for m in METHODS},
            "equals_merged": {
                m: merged_agreement(models[m], prompts[b], outs[b][m], n, args.check_tokens) for m in METHODS
            },
            "peft_equals_alora": float((outs[b]["peft"] == outs[b]["alora"]).all(-1).float().mean()),
        }
    profile_batch = max(prompts)
    profile = {
        str(b): profile_ops({k: models[k] for k in ("base", "alora")}, prompts[b], n, args.new_tokens)
        for b in sorted({min(prompts), profile_batch})
    }
    return {"batches": rows, "profile": profile}


def scaling(base: nn.Module, args: argparse.Namespace, ids: torch.Tensor, row: dict | None) -> dict[str, Any]:
    """Tokens/s at one batch size for N tasks in ``args.scaling_n`` (base, ALoRA, peft side by side); the
    main table's ``row`` (same batch), when given, stands for N = ``args.experts``."""
    found: dict[str, Any] = {}
    if row is not None:
        t = row["tokens_per_s"]
        found[str(args.experts)] = {
            "tokens_per_s": {m: t[m] for m in ("base", "alora", "peft")},
            "vs_base": row["vs_base"]["alora"],
            "vs_peft": row["vs_peft"]["alora"],
        }
    for n in (n for n in args.scaling_n if str(n) not in found):
        models: dict[str, nn.Module] = {"base": base, "alora": routed_model(base, "alora", n, args)}
        with tempfile.TemporaryDirectory() as tmp:
            models["peft"] = peft_multi_adapter(base, models["alora"], n, Path(tmp))
        reps = argparse.Namespace(**{**vars(args), "reps": args.scaling_reps or args.reps})
        t = alternate(models, {ids.shape[0]: ids}, n, reps)[0][ids.shape[0]]
        found[str(n)] = {
            "tokens_per_s": {m: round(v, 2) for m, v in t.items()},
            "vs_base": round(t["alora"] / t["base"], 4),
            "vs_peft": round(t["alora"] / t["peft"], 4),
        }
        del models
    return dict(sorted(found.items(), key=lambda kv: int(kv[0])))


def report(result: dict[str, Any]) -> None:
    s = result["setting"]
    print(
        f"mixed-task greedy generation: {result['model']}, prompt {s['prompt']} + {s['new_tokens']} new tokens, "
        f"router=task, N={s['experts']}, r={s['r']}, q_proj,v_proj, row b = task b mod N, {result['device']}/"
        f"{result['dtype']}, median of {s['reps']} alternating runs (tokens/s)"
    )
    names = ["base", *METHODS, "peft"]
    print(f"{'batch':<7}" + "".join(f"{m:>11}" for m in names))
    for b, r in result["batches"].items():
        print(f"{b:<7}" + "".join(f"{r['tokens_per_s'][m]:>11.1f}" for m in names))
        print(f"{'  /base':<7}" + "".join(f"{r['vs_base'].get(m, 1.0):>11.3f}" for m in names))
        print(f"{'  /peft':<7}" + "".join(f"{r['vs_peft'].get(m, float('nan')):>11.3f}" for m in names))
        eq = ", ".join(f"{m} {v:.0%}" for m, v in r["equals_merged"].items())
        print(f"  rows equal to their merged model: {eq}; peft tokens = alora: {r['peft_equals_alora']:.0%}")
    print(f"N scaling at batch {s['scaling_batch']}:  N  base  alora  peft  alora/base  alora/peft")
    for n, r in result["scaling"].items():
        t = r["tokens_per_s"]
        print(f"  {n:>3} {t['base']:>7.1f} {t['alora']:>7.1f} {t['peft']:>7.1f} {r['vs_base']:>8.3f}"
              f" {r['vs_peft']:>8.3f}")  # fmt: skip
    for b, p in result["profile"].items():
        print(
            f"profile batch {b}: total self CPU ms {p['total_ms']}; ALoRA extra by op: {p['extra_ms_by_op']}"
        )
    print(f"targets met: {result['targets_met']}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = benchmark_parser(__doc__, "tiny random Llama, 4 new tokens, 1 rep, for CI")
    parser.add_argument("--new-tokens", type=positive_int, default=64)
    parser.add_argument("--prompt", type=positive_int, default=32, help="prompt length (random tokens)")
    parser.add_argument("--batches", type=positive_ints, default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--r", type=positive_int, default=8)
    parser.add_argument("--experts", type=positive_int, default=8, help="N = number of tasks (main table)")
    parser.add_argument(
        "--scaling-n", type=positive_ints, default="2,4,8,16", help="N values of the scaling rows"
    )
    parser.add_argument("--b-std", type=float, default=0.05, help="std of the random B (non-zero adapter)")
    parser.add_argument("--reps", type=positive_int, default=5)
    parser.add_argument(
        "--scaling-reps", type=positive_int, default=None, help="reps of the N-scaling rows (--reps)"
    )
    parser.add_argument(
        "--check-tokens", type=int, default=16, help="new tokens compared with each row's merged model"
    )
    parser.add_argument(
        "--only-scaling", action="store_true", help="skip the method table: the N-scaling rows alone"
    )
    args = parse(parser, argv)
    if args.smoke:
        args.new_tokens, args.prompt, args.reps, args.scaling_n = 4, 4, 1, [2, 4]
    args.check_tokens = min(args.check_tokens, args.new_tokens)
    return args


def targets_met(rows: dict[str, Any], big: str) -> dict[str, bool]:
    """Which of `TARGETS` task-routed ALoRA met, and whether every row equalled its merged model."""
    met = {f"vs_base_batch{b}": r["vs_base"]["alora"] >= TARGETS["vs_base"] for b, r in rows.items()}
    if rows:
        met[f"vs_peft_batch{big}"] = rows[big]["vs_peft"]["alora"] >= TARGETS["vs_peft_batch8"]
        met["rows_equal_merged"] = all(v == 1.0 for r in rows.values() for v in r["equals_merged"].values())
    return met


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started, t_start = utc_now(), time.perf_counter()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    base = load_base(args.smoke, device, dtype).eval()
    g = torch.Generator().manual_seed(0)
    vocab = base.config.vocab_size
    prompts = {b: torch.randint(3, vocab, (b, args.prompt), generator=g).to(device) for b in args.batches}
    table = {"batches": {}, "profile": {}} if args.only_scaling else main_table(base, args, prompts)
    rows, big = table["batches"], str(max(args.batches))
    result = {
        "benchmark": "serving",
        "command": " ".join(["python benchmarks/serving.py", *(argv if argv is not None else sys.argv[1:])]),
        "started": started,
        "model": "tiny random Llama" if args.smoke else "SmolLM2-135M",
        "setting": {
            "prompt": args.prompt,
            "new_tokens": args.new_tokens,
            "r": args.r,
            "experts": args.experts,
            "reps": args.reps,
            "scaling_reps": args.scaling_reps or args.reps,
            "check_tokens": args.check_tokens,
            "scaling_batch": max(args.batches),
            "threads": torch.get_num_threads(),
            "b_std": args.b_std,
        },
        "device": args.device,
        "dtype": args.dtype,
        **table,
        "scaling": scaling(base, args, prompts[max(args.batches)], rows.get(big)),
        "targets": TARGETS,
        "targets_met": targets_met(rows, big),
    }
    result.update(finished=utc_now(), wall_s=round(time.perf_counter() - t_start, 1))
    report(result)
    return finish(result, args)


if __name__ == "__main__":
    main()
