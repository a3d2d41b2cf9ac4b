"""The multi-task campaign's training step: logits on the target positions only, and bfloat16 autocast.

Default setting: the model, tasks and adapter of configs/multitask_bigbench.yaml (SmolLM2-135M; the 8
BIG-bench tasks, max_train 400 each, max_length 192; ALoRA r = 8, alpha 16, N = 3, soft router, q_proj +
o_proj) and REAL batches of ``train.batch_size`` = 8 examples, drawn as the training loop draws them
(`asymlora.train.step_batches` over a `asymlora.data.MultiTaskDataset`, with ``num_items_in_batch``).
Four variants of one step (forward + backward + gradient clipping + AdamW step + zero_grad):

- ``fp32_full``: float32, the vocabulary projected at every position (``model(**batch).loss``; the
  baseline of every ratio);
- ``fp32_targets``: float32, logits only where a label is predicted
  (``model(**asymlora.train.targets.on_targets(model, batch)).loss``: what `asymlora.train.StepLoop` runs);
- ``bf16_full``, ``bf16_targets``: the same two forwards under ``torch.autocast`` to bfloat16
  (`asymlora.train.precision.autocast`, ``train.mixed_precision: bf16``); adapter and AdamW stay float32.

The base model is shared; each variant has its own copy of the adapter's weights and its own AdamW, swapped
into the model's trainable parameters before its step (outside the timing), so the variants do not
interfere. Each variant runs one warm-up step on the first batch (its loss there is the *first-batch loss*:
every variant starts from the same adapter, so the float32 target-logits loss must equal the full one; the
benchmark raises if they differ by more than `LOSS_RTOL`), then ``--steps`` rounds on the next batches, the
variants alternating and their order rotating each round; medians of wall and CPU seconds per step.

    python benchmarks/train_precision.py --save benchmarks/results/train_precision.json   # full (minutes)
    python benchmarks/train_precision.py --smoke     # tiny random Llama, character tokenizer, seconds
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import peft
import torch
from torch import nn

from asymlora.config import ConfigError, RunConfig, load_config
from asymlora.data import Example, MultiTaskCollator, MultiTaskDataset, Task, build_task, load_tasks
from asymlora.models import load
from asymlora.train import step_batches
from asymlora.train.loop import target_tokens
from asymlora.train.precision import autocast
from asymlora.train.targets import on_targets, slices_logits, target_mask

try:  # imported as the package `benchmarks`
    from benchmarks.common import ROOT, benchmark_parser, finish, machine, parse, positive_int, sync, utc_now
except ImportError:  # run as a script: Python puts this folder first on sys.path
    from common import ROOT, benchmark_parser, finish, machine, parse, positive_int, sync, utc_now

CONFIG = ROOT / "configs" / "multitask_bigbench.yaml"
"""The campaign's model, tasks, adapter and batch size (configs/campaign_multitask.yaml is based on it)."""
VARIANTS: dict[str, tuple[torch.dtype | None, bool]] = {
    "fp32_full": (None, False),
    "fp32_targets": (None, True),
    "bf16_full": (torch.bfloat16, False),
    "bf16_targets": (torch.bfloat16, True),
}
"""Variant → (autocast dtype or None, logits on the target positions only)."""
BASELINE = "fp32_full"
LOSS_RTOL = 1e-5
"""Largest relative difference allowed between the float32 target-logits and full-logits first-batch losses."""


# --- setting -------------------------------------------------------------------------------------------
def _conftest() -> ModuleType:
    """tests/conftest.py as a module: its tiny random Llama and character tokenizer (smoke runs)."""
    spec = importlib.util.spec_from_file_location("_asymlora_test_conftest", ROOT / "tests" / "conftest.py")
    if spec is None or spec.loader is None:
        raise FileNotFoundError(ROOT / "tests" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def smoke_tasks(examples: int = 40) -> list[Task]:
    """Two tiny synthetic generative tasks (``add``: i → i + 1, ``echo``: a word → the word twice)."""
    add = [Example(prompt=f"Add one to {i}.", target=str(i + 1)) for i in range(examples)]
    echo = [Example(prompt=f"Repeat: w{i}", target=f"w{i} w{i}") for i in range(examples)]
    return [build_task("add", {"all": add}), build_task("echo", {"all": echo})]


def load_setting(args: argparse.Namespace, cfg: RunConfig) -> tuple[nn.Module, Any, list[Task]]:
    """(base model, tokenizer, tasks): the config's (or, with ``--smoke``, the tiny random Llama, the
    character tokenizer and `smoke_tasks`), the model in float32 on ``--device``."""
    if args.smoke:
        helpers = _conftest()
        model = helpers.make_tiny_llama().to(args.device)
        return model, helpers.make_char_tokenizer(), smoke_tasks()
    model, tokenizer = load(cfg.model.name, device=args.device, dtype=torch.float32)
    d = cfg.data
    tasks = load_tasks(
        d.tasks, seed=d.seed, max_train=d.max_train, max_test=d.max_test, test_fraction=d.test_fraction
    )
    return model, tokenizer, tasks


def make_batches(
    cfg: RunConfig, tokenizer: Any, tasks: list[Task], n: int, device: torch.device
) -> list[dict[str, torch.Tensor]]:
    """The batches of training steps 0 … n − 1, as the training loop draws and completes them (one process:
    ``num_items_in_batch`` is the batch's target-token count)."""
    dataset = MultiTaskDataset(tasks, tokenizer, max_length=cfg.data.max_length)
    collate = MultiTaskCollator(tokenizer)
    batches = []
    for s in range(n):
        (batch,) = step_batches(dataset, collate, s, cfg.train.batch_size, cfg.train.seed, device=device)
        batches.append({**batch, "num_items_in_batch": target_tokens(batch["labels"]).float()})
    return batches


def token_counts(batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Mean per batch: target tokens (the logits rows `on_targets` keeps), positions (batch × padded
    length: the rows a full forward projects), real tokens (attention mask); and targets / positions."""
    targets = statistics.mean(int(target_mask(b["labels"]).sum()) for b in batches)
    positions = statistics.mean(b["labels"].numel() for b in batches)
    real = statistics.mean(int(b["attention_mask"].sum()) for b in batches)
    return {
        "target_per_batch": round(targets, 2),
        "positions_per_batch": round(positions, 2),
        "real_per_batch": round(real, 2),
        "target_fraction": round(targets / positions, 5),
        "batches": len(batches),
    }


# --- variants --------------------------------------------------------------------------------------------
@dataclass
class Variant:
    """One variant's autocast dtype, forward, own adapter weights (by parameter name) and AdamW."""

    name: str
    dtype: torch.dtype | None
    targets: bool
    weights: dict[str, torch.Tensor]
    opt: torch.optim.Optimizer
    max_grad_norm: float


def make_variants(model: nn.Module, cfg: RunConfig) -> list[Variant]:
    """Every variant of `VARIANTS`, each with a copy of ``model``'s initial adapter and its own AdamW (the
    loop's: ``train.lr``, ``train.weight_decay``; gradients clipped to ``train.max_grad_norm``) over the model's
    trainable parameters."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    return [
        Variant(
            name,
            dtype,
            targets,
            {n: p.detach().clone() for n, p in named},
            torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay),
            cfg.train.max_grad_norm,
        )
        for name, (dtype, targets) in VARIANTS.items()
    ]


def activate(model: nn.Module, variant: Variant) -> None:
    """Point the model's trainable parameters at ``variant``'s adapter weights (no copy): its AdamW then
    updates them in place. Gradients are None between steps (``zero_grad(set_to_none=True)``)."""
    for n, p in model.named_parameters():
        if p.requires_grad:
            p.data = variant.weights[n]


def timed_step(
    model: nn.Module, variant: Variant, batch: dict[str, torch.Tensor], device: torch.device
) -> tuple[float, float, float]:
    """(loss, wall seconds, process CPU seconds) of one step of ``variant`` on ``batch``."""
    activate(model, variant)
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    inputs = on_targets(model, batch) if variant.targets else batch  # in the step, as in StepLoop.step
    with autocast(device, variant.dtype):
        loss = model(**inputs, use_cache=False).loss
    loss.backward()
    if variant.max_grad_norm > 0:  # StepLoop's clipping (train.max_grad_norm)
        torch.nn.utils.clip_grad_norm_(variant.opt.param_groups[0]["params"], variant.max_grad_norm)
    variant.opt.step()
    variant.opt.zero_grad(set_to_none=True)
    sync(device)
    return float(loss.detach()), time.perf_counter() - t0, time.process_time() - c0


def log(message: str) -> None:
    """Progress on stderr (stdout carries the table and the JSON line)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def alternate(
    model: nn.Module, variants: list[Variant], batches: list[dict[str, torch.Tensor]], device: torch.device
) -> dict[str, dict[str, list[float]]]:
    """Per variant: ``loss``, ``wall``, ``cpu`` of each step: the warm-up on ``batches[0]`` (every variant
    in turn), then one round per further batch, the order rotating each round."""
    runs = {v.name: {"loss": [], "wall": [], "cpu": []} for v in variants}
    for rnd, batch in enumerate(batches):
        k = (rnd - 1) % len(variants) if rnd else 0
        for variant in variants[k:] + variants[:k]:
            for key, value in zip(
                ("loss", "wall", "cpu"), timed_step(model, variant, batch, device), strict=True
            ):
                runs[variant.name][key].append(value)
        what = "warm-up" if rnd == 0 else f"round {rnd}/{len(batches) - 1}"
        log(f"{what}: " + ", ".join(f"{v.name} {1e3 * runs[v.name]['wall'][-1]:.0f} ms" for v in variants))
    return runs


# --- summary ---------------------------------------------------------------------------------------------
def rel_diff(a: float, b: float) -> float:
    """|a − b| / |b| (0 when both are 0)."""
    return abs(a - b) / abs(b) if b else float(a != b)


def ratios(
    run: dict[str, list[float]], base: dict[str, list[float]], step: float, cpu: float
) -> dict[str, float]:
    """``step_time`` and ``cpu_time``: the ratio of the medians to the baseline's; ``step_time_paired``: the
    median over the rounds of the ratio of the two steps of one round (same batch, moments apart)."""
    paired = statistics.median(a / b for a, b in zip(run["wall"][1:], base["wall"][1:], strict=True))
    return {"step_time": round(step, 4), "cpu_time": round(cpu, 4), "step_time_paired": round(paired, 4)}


def summarize(runs: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    """Medians of the timed steps (the warm-up left out), ratios to `BASELINE`, the first-batch losses and
    their relative differences to the baseline's (also the largest over every step: the trajectories)."""
    wall = {n: r["wall"][1:] for n, r in runs.items()}
    med = {n: statistics.median(v) for n, v in wall.items()}
    cpu = {n: statistics.median(r["cpu"][1:]) for n, r in runs.items()}
    base = runs[BASELINE]["loss"]
    return {
        "step_s": {n: round(v, 4) for n, v in med.items()},
        "cpu_s": {n: round(v, 4) for n, v in cpu.items()},
        "spread": {n: round((max(v) - min(v)) / med[n], 4) if len(v) > 1 else 0.0 for n, v in wall.items()},
        "step_s_all": {n: [round(x, 3) for x in v] for n, v in wall.items()},
        "warmup_s": {n: round(r["wall"][0], 3) for n, r in runs.items()},
        "ratios": {
            n: ratios(runs[n], runs[BASELINE], med[n] / med[BASELINE], cpu[n] / cpu[BASELINE]) for n in runs
        },
        "first_batch_loss": {n: r["loss"][0] for n, r in runs.items()},
        "loss_rel_diff": {n: rel_diff(r["loss"][0], base[0]) for n, r in runs.items()},
        "loss_rel_diff_max_over_steps": {
            n: max(rel_diff(a, b) for a, b in zip(r["loss"], base, strict=True)) for n, r in runs.items()
        },
    }


def check_losses(found: dict[str, Any]) -> None:
    """Raise AssertionError when the float32 target-logits first-batch loss is not the full one (`LOSS_RTOL`)."""
    diff = found["loss_rel_diff"]["fp32_targets"]
    if not diff <= LOSS_RTOL:
        loss = found["first_batch_loss"]
        raise AssertionError(
            f"float32 first-batch loss on the target positions {loss['fp32_targets']!r} differs from the "
            f"full-logits loss {loss[BASELINE]!r} by {diff:.3g} relative (> {LOSS_RTOL:g}): "
            "asymlora.train.targets.on_targets no longer computes the same loss"
        )


def cpu_flags() -> dict[str, bool]:
    """Whether this CPU has the bfloat16 instructions autocast uses (AVX512-BF16, AMX-BF16; Linux only)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    return {"avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags}


def print_table(res: dict[str, Any]) -> None:
    """The human table of one result (as `main` returns it)."""
    s, tok = res["setting"], res["tokens"]
    print(f"the campaign's training step: {res['model']}, batch {s['batch']} (max_length {s['max_length']}), "
          f"{s['method']} r={s['r']} N={s['experts']} {s['router']} on {','.join(s['targets'])}, {res['device']}; "
          f"median of {s['steps']} alternating steps after 1 warm-up")  # fmt: skip
    print(f"tokens per batch: {tok['target_per_batch']:.1f} targets of {tok['positions_per_batch']:.1f} positions "
          f"({tok['target_fraction']:.2%}); {tok['real_per_batch']:.1f} real tokens")  # fmt: skip
    print(f"{'variant':<14}{'step s':>9}{'x base':>8}{'paired':>8}{'cpu s':>9}{'x base':>8}{'spread':>8}"
          f"{'1st loss':>12}{'rel diff':>11}{'max diff':>11}")  # fmt: skip
    for n, step_s in res["step_s"].items():
        r = res["ratios"][n]
        print(f"{n:<14}{step_s:>9.3f}{r['step_time']:>8.3f}{r['step_time_paired']:>8.3f}{res['cpu_s'][n]:>9.3f}"
              f"{r['cpu_time']:>8.3f}"
              f"{res['spread'][n]:>8.1%}{res['first_batch_loss'][n]:>12.6f}{res['loss_rel_diff'][n]:>11.2e}"
              f"{res['loss_rel_diff_max_over_steps'][n]:>11.2e}")  # fmt: skip


# --- main ----------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = benchmark_parser(
        __doc__, "tiny random Llama, character tokenizer, two synthetic tasks, 2 steps, for CI", dtype=False
    )
    parser.add_argument("--config", default=str(CONFIG), help="run config of the model, tasks and adapter")
    parser.add_argument("--steps", type=positive_int, default=10, help="timed rounds (after 1 warm-up round)")
    args = parse(parser, argv)
    if args.smoke:
        args.steps = min(args.steps, 2)
    return args


def measure(args: argparse.Namespace, cfg: RunConfig) -> dict[str, Any]:
    """Load, build the adapter and the batches, step every variant; the figures of the result."""
    device = torch.device(args.device)
    base, tokenizer, tasks = load_setting(args, cfg)
    torch.manual_seed(cfg.train.seed)
    model = peft.get_peft_model(base, cfg.adapter.to_peft([t.name for t in tasks]))
    model.train()
    batches = make_batches(cfg, tokenizer, tasks, args.steps + 1, device)
    variants = make_variants(model, cfg)
    found = summarize(alternate(model, variants, batches, device))
    check_losses(found)
    return {
        "tasks": [t.name for t in tasks],
        "slices_logits": slices_logits(model),
        "vocab_size": base.config.vocab_size,
        "hidden_size": base.config.hidden_size,
        "tokens": token_counts(batches),
        **found,
    }


def read_config(args: argparse.Namespace) -> RunConfig:
    """``--config`` (exit 2, naming the file and the error, when it does not load)."""
    try:
        return load_config(args.config)
    except ConfigError as e:
        print(f"benchmarks/train_precision.py: --config {args.config}: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def setting(args: argparse.Namespace, cfg: RunConfig) -> dict[str, Any]:
    """The run's setting: config file, batch, data and adapter sizes, learning rate, steps, threads."""
    a = cfg.adapter
    return {
        "config": os.path.relpath(args.config, ROOT),
        "batch": cfg.train.batch_size,
        "max_length": cfg.data.max_length,
        "max_train": cfg.data.max_train,
        "method": a.method,
        "r": a.r,
        "lora_alpha": a.lora_alpha,
        "experts": a.num_experts,
        "router": a.router,
        "targets": list(a.target_modules),
        "lr": cfg.train.lr,
        "steps": args.steps,
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    cfg = read_config(args)
    t_start, load0 = time.perf_counter(), os.getloadavg()[0]
    found = measure(args, cfg)
    command = ["python benchmarks/train_precision.py", *(argv if argv is not None else sys.argv[1:])]
    result = {
        "benchmark": "train_precision",
        "command": " ".join(command),
        "date": utc_now(),
        "model": "tiny random Llama" if args.smoke else cfg.model.name,
        "smoke": args.smoke,
        "setting": setting(args, cfg),
        "device": args.device,
        "variants": {
            n: {"autocast": str(d).removeprefix("torch.") if d else None, "target_logits": t}
            for n, (d, t) in VARIANTS.items()
        },
        "baseline": BASELINE,
        "loss_rtol": LOSS_RTOL,
        **found,
        "cpu_bf16": cpu_flags(),
        "machine": machine(),
        "load_avg_1min": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    print_table(result)
    return finish(result, args)


if __name__ == "__main__":
    main()
