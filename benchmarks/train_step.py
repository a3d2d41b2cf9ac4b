"""One optimiser step of the whole model: asymlora's methods against peft's own LoRA, in one run.

Default setting: SmolLM2-135M-Instruct, batch 8 × 128 tokens, r = 8, N = 3, targets
q_proj + v_proj (``--all-projections``: q, k, v, o, gate, up, down). Variants: peft's own LoRA
(``peft.LoraConfig``, the baseline of every ratio), our ``lora``, ``alora``, ``hydralora`` (soft router, as
in their papers), ``molora`` and ``malora`` (top-2 router, as in theirs). A step is forward + backward +
AdamW step + zero_grad; the variants are stepped alternately, round after round (the order rotates each
round), and the median of ``--steps`` steps after one warm-up step is reported (shared, noisy machines).
On CPU the process's CPU time per step is reported too: it is less sensitive to other jobs on the machine.

Memory:

- **peak** per variant, in a fresh child process (``--memory-child VARIANT``): on CPU the peak RSS
  (VmHWM, reset through /proc/self/clear_refs after the model is built, so loading does not count) over
  ``--memory-steps`` steps, with glibc's mmap threshold fixed (`MMAP_THRESHOLD`) so that the RSS follows
  the live tensors; on CUDA ``torch.cuda.max_memory_allocated`` after a reset. The peak includes the
  frozen base model; the increment over the built model's footprint is reported beside it.
- **training state**, in-process and exact: bytes of the tensors saved for backward
  (``torch.autograd.graph.saved_tensors_hooks``, unique storages, parameters excluded) + trainable
  parameters + their gradients + AdamW state.

    python benchmarks/train_step.py                      # full (several minutes on 2 CPU cores)
    python benchmarks/train_step.py --all-projections    # the seven projections
    python benchmarks/train_step.py --profile            # + torch.profiler top ops, ALoRA vs peft LoRA
    python benchmarks/train_step.py --smoke              # tiny random Llama, seconds, for CI
    python benchmarks/train_step.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import peft
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import asymlora
from asymlora.models import load

try:  # imported as the package `benchmarks`
    from benchmarks.common import ROOT, MiB, benchmark_parser, finish, parse, positive_int, sync
except ImportError:  # run as a script: Python puts this folder first on sys.path
    from common import ROOT, MiB, benchmark_parser, finish, parse, positive_int, sync

VARIANTS: tuple[str, ...] = ("peft_lora", "lora", "alora", "hydralora", "molora", "malora")
ROUTER = {"alora": "soft", "hydralora": "soft", "molora": "topk", "malora": "topk"}
"""Each method's router as in its paper (MoLoRA/MALoRA: top-2)."""
QV: tuple[str, ...] = ("q_proj", "v_proj")
ALL_SEVEN: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGETS = {"step_time": 1.10, "peak_memory": 1.10}
"""ALoRA / peft LoRA upper bounds (docs/performance.md)."""
MMAP_THRESHOLD = 65536
"""glibc's MALLOC_MMAP_THRESHOLD_ in the memory children: every block of 64 KiB or more is its own mapping,
returned to the OS when freed. glibc's default threshold grows as blocks are freed, after which freed
tensors stay cached in the heap and the peak RSS depends on allocation history (a first run here saw the
same step peak at 2460 or 2935 MiB); with a fixed threshold the peak RSS follows the live tensors."""


# --- model and variants ------------------------------------------------------------------------------
def make_tiny_llama() -> nn.Module:
    """The tiny random Llama of ``tests/conftest.py`` (smoke runs; no download, no cache)."""
    spec = importlib.util.spec_from_file_location("_asymlora_test_conftest", ROOT / "tests" / "conftest.py")
    if spec is None or spec.loader is None:
        raise FileNotFoundError(ROOT / "tests" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_tiny_llama()


def load_base(smoke: bool, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """SmolLM2-135M-Instruct (or the tiny random Llama with ``smoke``) on ``device`` in ``dtype``."""
    if smoke:
        return make_tiny_llama().to(device=device, dtype=dtype)
    model, _ = load("smollm2-135m", device=str(device), dtype=dtype)
    return model


def adapter_config(variant: str, targets: list[str], r: int, experts: int) -> peft.PeftConfig:
    """The peft config of one variant: ``peft_lora`` is peft's own LoRA, the rest asymlora methods."""
    if variant == "peft_lora":
        return peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=list(targets))
    return asymlora.AsymLoraConfig(
        method=variant,
        r=r,
        lora_alpha=2 * r,
        num_experts=experts,
        router=ROUTER.get(variant, "soft"),
        target_modules=list(targets),
    )


def build_variant(
    base: nn.Module, variant: str, args: argparse.Namespace
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A deep copy of ``base`` with ``variant``'s adapter, in train mode, and its AdamW optimiser.

    peft's ``autocast_adapter_dtype`` is off so that, in bf16/fp16, peft's LoRA keeps its adapter in the
    model dtype like asymlora does (apples to apples; no effect in float32)."""
    torch.manual_seed(0)
    cfg = adapter_config(variant, args.targets, args.r, args.experts)
    model = peft.get_peft_model(copy.deepcopy(base), cfg, autocast_adapter_dtype=False)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    return model, opt


def make_batch(args: argparse.Namespace, vocab: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Random token ids (batch × seq) as inputs and labels; the values do not change the cost."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (args.batch, args.seq), generator=g).to(device)
    return {"input_ids": ids, "labels": ids}


def log(message: str) -> None:
    """Progress on stderr (stdout carries the table and the JSON line)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def step(model: nn.Module, opt: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> None:
    """forward + backward + AdamW step + zero_grad. ``use_cache=False``: a training forward needs no KV
    cache (with one, transformers builds a DynamicCache every step, and torch.compile recompiles each
    decoder layer on the cache's per-layer state until its recompile limit, then runs the rest eagerly)."""
    model(**batch, use_cache=False).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def timed_step(
    model: nn.Module, opt: torch.optim.Optimizer, batch: dict[str, torch.Tensor], device: torch.device
) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one step."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    step(model, opt, batch)
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


# --- memory accounting -----------------------------------------------------------------------------
def tensor_bytes(tensors: Iterator[torch.Tensor] | list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@contextmanager
def count_saved(exclude: list[torch.Tensor] | tuple[torch.Tensor, ...] = ()) -> Iterator[dict[str, int]]:
    """Count the bytes of the tensors autograd saves for backward inside the block.

    Unique storages only (views of one tensor count once); storages of ``exclude`` (parameters, inputs
    that live anyway) are not counted. Yields a dict whose ``"bytes"`` is filled when the block exits."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta" and t.layout == torch.strided:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in skip:
                seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
        return t

    out = {"bytes": 0, "tensors": 0}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield out
    out["bytes"], out["tensors"] = sum(seen.values()), len(seen)


def warmup_with_accounting(
    model: nn.Module, opt: torch.optim.Optimizer, batch: dict[str, torch.Tensor]
) -> dict[str, int]:
    """The warm-up step, measuring in-process: saved activations, trainable params, grads, AdamW state."""
    params = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    with count_saved(exclude=params + frozen + list(model.buffers())) as saved:
        loss = model(**batch, use_cache=False).loss
    loss.backward()
    grads = tensor_bytes(p.grad for p in params if p.grad is not None)
    opt.step()
    state = tensor_bytes(
        v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0
    )
    opt.zero_grad(set_to_none=True)
    p_bytes = tensor_bytes(params)
    return {
        "trainable_params": sum(p.numel() for p in params),
        "saved_activation_bytes": saved["bytes"],
        "param_bytes": p_bytes,
        "grad_bytes": grads,
        "adam_state_bytes": state,
        "training_state_bytes": saved["bytes"] + p_bytes + grads + state,
    }


def rss_bytes(field: str) -> int | None:
    """VmRSS / VmHWM of this process from /proc (None where /proc is absent)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def memory_child(args: argparse.Namespace) -> dict[str, Any]:
    """Run in a fresh process: build one variant, reset the peak, take steps, report the peak."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    base = load_base(args.smoke, device, dtype)
    model, opt = build_variant(base, args.memory_child, args)
    del base
    batch = make_batch(args, model.config.vocab_size, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        for _ in range(args.memory_steps):
            step(model, opt, batch)
        torch.cuda.synchronize()
        peak, how = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
    else:
        baseline = rss_bytes("VmRSS") or 0
        how = "VmHWM after clear_refs" if reset_peak_rss() else "ru_maxrss (includes loading)"
        for _ in range(args.memory_steps):
            step(model, opt, batch)
        peak = rss_bytes("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "memory_child": args.memory_child,
        "peak_bytes": peak,
        "baseline_bytes": baseline,
        "increment_bytes": peak - baseline,
        "how": how,
        "steps": args.memory_steps,
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
    }


def child_argv(args: argparse.Namespace, variant: str) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--memory-child", variant]
    argv += ["--batch", str(args.batch), "--seq", str(args.seq), "--r", str(args.r)]
    argv += ["--experts", str(args.experts), "--targets", ",".join(args.targets)]
    argv += ["--device", args.device, "--dtype", args.dtype, "--memory-steps", str(args.memory_steps)]
    argv += ["--threads", str(torch.get_num_threads())]
    return argv + (["--smoke"] if args.smoke else [])


def run_memory_children(args: argparse.Namespace, variants: list[str]) -> dict[str, dict[str, Any]]:
    """Peak memory of each variant, each in its own fresh process (peak RSS is per process).

    ``--memory-jobs`` children run at a time: a peak does not depend on timing, only the wall time does."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD))

    def one(variant: str) -> dict[str, Any]:
        proc = subprocess.run(child_argv(args, variant), capture_output=True, text=True, env=env, check=False)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(
                f"memory child for {variant} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
            )
        found = json.loads(lines[-1])
        log(f"memory child {variant}: peak {found['peak_bytes'] / MiB:.0f} MiB")
        return found

    with ThreadPoolExecutor(max_workers=max(1, args.memory_jobs)) as pool:
        return dict(zip(variants, pool.map(one, variants), strict=True))


# --- profiling -------------------------------------------------------------------------------------
def profile_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    device: torch.device,
    top: int,
) -> dict[str, Any]:
    """One step under torch.profiler: the ``top`` ops by self time (ms, share of the step, calls)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step(model, opt, batch)
        sync(device)
    on_gpu = device.type == "cuda"
    rows = []
    for ev in prof.key_averages():
        self_us = ev.self_device_time_total if on_gpu else ev.self_cpu_time_total
        rows.append((ev.key, self_us / 1e3, ev.count))
    total = sum(ms for _, ms, _ in rows) or 1.0
    rows.sort(key=lambda row: -row[1])
    return {
        "total_self_ms": round(total, 1),
        "clock": "device" if on_gpu else "cpu",
        "calls": {name: count for name, _, count in rows},
        "top": [
            {"op": name, "self_ms": round(ms, 2), "share": round(ms / total, 4), "calls": count}
            for name, ms, count in rows[:top]
        ],
    }


# --- torch.compile (explored, guarded) ---------------------------------------------------------------
def compile_layers(model: nn.Module) -> str:
    """Regional torch.compile of every decoder layer (same code, compiled once); returns what was done."""
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    for layer in layers:
        layer.compile()
    return f"{len(layers)} decoder layers compiled"


# --- main ----------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = benchmark_parser(__doc__, "tiny random Llama, batch 2 × 16, for CI")
    parser.add_argument("--batch", type=positive_int, default=8)
    parser.add_argument("--seq", type=positive_int, default=128, help="tokens per sequence")
    parser.add_argument("--r", type=positive_int, default=8)
    parser.add_argument("--experts", type=positive_int, default=3)
    parser.add_argument("--targets", default=",".join(QV), help="comma-separated target module names")
    parser.add_argument("--all-projections", action="store_true", help="target all seven projections")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of variants")
    parser.add_argument(
        "--steps", type=positive_int, default=5, help="timed steps per variant (after 1 warm-up)"
    )
    parser.add_argument("--memory-steps", type=positive_int, default=2, help="steps per memory child")
    parser.add_argument(
        "--memory-variants", default=None, help="variants measured in child processes ('none': skip)"
    )
    parser.add_argument("--memory-jobs", type=positive_int, default=2, help="memory children run at a time")
    parser.add_argument("--profile", action="store_true", help="torch.profiler: ALoRA vs peft LoRA")
    parser.add_argument("--profile-top", type=positive_int, default=12)
    parser.add_argument(
        "--compile", action="store_true", help="also time torch.compile'd ALoRA and peft LoRA (guarded)"
    )
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parse(parser, argv)
    args.targets = list(ALL_SEVEN) if args.all_projections else args.targets.split(",")
    args.variants = args.variants.split(",")
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown or "peft_lora" not in args.variants:
        parser.error(
            f"--variants must include peft_lora and only use {VARIANTS}; got {unknown or args.variants}"
        )
    if args.smoke:
        args.batch, args.seq = min(args.batch, 2), min(args.seq, 16)
        args.steps, args.memory_steps = min(args.steps, 2), 1
        if args.memory_variants is None:
            args.memory_variants = "peft_lora,alora"
    if args.memory_variants is None:
        args.memory_variants = ",".join(args.variants)
    args.memory_variants = [] if args.memory_variants == "none" else args.memory_variants.split(",")
    if set(args.memory_variants) - set(VARIANTS):
        parser.error(f"--memory-variants: unknown {sorted(set(args.memory_variants) - set(VARIANTS))}; "
                     f"choose from {VARIANTS} or 'none'")  # fmt: skip
    return args


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


Models = dict[str, tuple[nn.Module, torch.optim.Optimizer]]


def build_models(base: nn.Module, args: argparse.Namespace) -> tuple[Models, str | None]:
    """Every variant on a copy of ``base`` (with ``--compile`` also compiled ALoRA and peft LoRA, guarded)."""
    models: Models = {v: build_variant(base, v, args) for v in args.variants}
    note = None
    for v in ("peft_lora", "alora") if args.compile else ():
        if v not in models:
            continue
        m, _ = build_variant(base, v, args)
        try:
            note = compile_layers(m)
            models[f"{v}+compile"] = (
                m,
                torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4),
            )
        except Exception as e:  # guarded: compile is optional
            note = f"torch.compile unavailable: {type(e).__name__}: {e}"
    return models, note


def warm_up(
    models: Models, batch: dict[str, torch.Tensor], note: str | None
) -> tuple[dict, dict, str | None]:
    """One warm-up step per variant, which is also the in-process memory accounting; a compiled variant
    that fails is dropped from ``models``. Returns (accounting, warm-up seconds, compile note)."""
    accounting: dict[str, dict[str, int]] = {}
    warmup_s: dict[str, float] = {}
    for name, (model, opt) in models.items():
        t0 = time.perf_counter()
        try:
            if "+compile" in name:
                step(model, opt, batch)  # compiles (outside the saved-tensor hooks of the accounting)
            accounting[name] = warmup_with_accounting(model, opt, batch)
        except Exception as e:  # only a compiled variant may fail here
            if "+compile" not in name:
                raise
            note = f"torch.compile failed at the first step: {type(e).__name__}: {e}"
        warmup_s[name] = time.perf_counter() - t0
        log(f"warm-up {name}: {warmup_s[name]:.1f} s")
    for name in [n for n in models if n not in accounting]:
        del models[name]
    return accounting, warmup_s, note


def alternate(
    models: Models, batch: dict[str, torch.Tensor], device: torch.device, steps: int
) -> tuple[dict, dict]:
    """Wall and CPU seconds of ``steps`` steps per variant, alternating, the order rotating each round."""
    names = list(models)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for rnd in range(steps):
        for name in names[rnd % len(names) :] + names[: rnd % len(names)]:
            w, c = timed_step(*models[name], batch, device)
            wall[name].append(w)
            cpu[name].append(c)
        log(f"round {rnd + 1}/{steps}: " + ", ".join(f"{n} {1e3 * wall[n][-1]:.0f} ms" for n in names))
    return wall, cpu


def step_ratios(med_wall: dict, med_cpu: dict, accounting: dict, peaks: dict) -> dict[str, dict[str, float]]:
    """Every variant's figures over peft LoRA's: step and CPU time, training state, saved activations, peak."""
    ref, ratios = "peft_lora", {}
    for n in med_wall:
        acc, base = accounting[n], accounting[ref]
        r = {"step_time": ratio(med_wall[n], med_wall[ref]), "cpu_time": ratio(med_cpu[n], med_cpu[ref]),
             "training_state": ratio(acc["training_state_bytes"], base["training_state_bytes"]),
             "saved_activations": ratio(acc["saved_activation_bytes"], base["saved_activation_bytes"])}  # fmt: skip
        if n in peaks and ref in peaks:
            r["peak_memory"] = ratio(peaks[n]["peak_bytes"], peaks[ref]["peak_bytes"])
            r["peak_increment"] = ratio(peaks[n]["increment_bytes"], peaks[ref]["increment_bytes"])
        ratios[n] = r
    return ratios


def extra_calls(profiles: dict[str, Any], top: int = 12) -> list[tuple[str, int]]:
    """The ``aten::`` ops ALoRA calls more (or fewer) times than peft LoRA in one step, largest first."""
    if not {"peft_lora", "alora"} <= set(profiles):
        return []
    a, p = profiles["alora"]["calls"], profiles["peft_lora"]["calls"]
    diffs = sorted(((op, a.get(op, 0) - p.get(op, 0)) for op in set(a) | set(p)), key=lambda kv: -abs(kv[1]))
    return [(op, d) for op, d in diffs if d and op.startswith("aten::")][:top]


def print_table(res: dict[str, Any], args: argparse.Namespace) -> None:
    """The human table of one result (as `main` returns it)."""
    print(
        f"whole-model training step: {res['model']}, batch {args.batch} x {args.seq} tokens, r={args.r}, "
        f"N={args.experts}, targets {','.join(args.targets)}, {args.device}/{args.dtype}, "
        f"median of {args.steps} alternating steps after 1 warm-up"
    )
    print(f"{'variant':<18}{'step ms':>10}{'x peft':>8}{'cpu ms':>10}{'x peft':>8}{'spread':>8}{'peak MiB':>10}"
          f"{'x peft':>8}{'+step MiB':>10}{'x peft':>8}{'state MiB':>10}{'x peft':>8}{'params':>10}")  # fmt: skip
    for n, step_ms in res["step_ms"].items():
        r, a, pk = res["ratios"][n], res["memory"][n], res["peak"].get(n)
        peak_cols = (
            f"{pk['peak_bytes'] / MiB:>10.1f}{r['peak_memory']:>8.3f}{pk['increment_bytes'] / MiB:>10.1f}"
            f"{r['peak_increment']:>8.3f}"
            if pk and "peak_memory" in r
            else f"{'-':>10}{'-':>8}{'-':>10}{'-':>8}"
        )
        print(f"{n:<18}{step_ms:>10.1f}{r['step_time']:>8.3f}{res['cpu_ms'][n]:>10.1f}{r['cpu_time']:>8.3f}"
              f"{res['spread'][n]:>8.1%}{peak_cols}{a['training_state_bytes'] / MiB:>10.1f}"
              f"{r['training_state']:>8.3f}{a['trainable_params']:>10d}")  # fmt: skip
    if res["compile"]:
        print(f"torch.compile: {res['compile']}")
    for name, prof in res["profile"].items():
        print(f"profile of one {name} step ({prof['clock']} self time {prof['total_self_ms']:.0f} ms):")
        for row in prof["top"]:
            print(f"  {row['op']:<60}{row['self_ms']:>10.1f} ms{row['share']:>8.1%}{row['calls']:>7d} calls")


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Build, warm up, time (and profile) every variant in this process; the peaks in child processes."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    base = load_base(args.smoke, device, dtype)
    batch = make_batch(args, base.config.vocab_size, device)
    models, note = build_models(base, args)
    del base
    accounting, warmup_s, note = warm_up(models, batch, note)
    wall, cpu = alternate(models, batch, device, args.steps)
    profiles = {name: profile_step(*models[name], batch, device, args.profile_top)
                for name in ("peft_lora", "alora") if args.profile and name in models}  # fmt: skip
    del models
    peaks = run_memory_children(args, args.memory_variants) if args.memory_variants else {}
    med_wall = {n: statistics.median(v) for n, v in wall.items()}
    med_cpu = {n: statistics.median(v) for n, v in cpu.items()}
    return {
        "step_ms": {n: round(1e3 * v, 2) for n, v in med_wall.items()},
        "step_ms_all": {n: [round(1e3 * x, 1) for x in v] for n, v in wall.items()},
        "cpu_ms": {n: round(1e3 * v, 2) for n, v in med_cpu.items()},
        "spread": {
            n: round((max(v) - min(v)) / statistics.median(v) if len(v) > 1 else 0.0, 4)
            for n, v in wall.items()
        },
        "warmup_ms": {n: round(1e3 * v, 1) for n, v in warmup_s.items()},
        "memory": accounting,
        "peak": peaks,
        "ratios": {
            n: {k: round(v, 4) for k, v in r.items()}
            for n, r in step_ratios(med_wall, med_cpu, accounting, peaks).items()
        },
        "compile": note,
        "profile": profiles,
        "profile_extra_calls": extra_calls(profiles),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.memory_child:
        result = memory_child(args)
        print(json.dumps(result))
        return result
    t_start = time.perf_counter()
    found = measure(args)
    alora = found["ratios"].get("alora", {})
    result = {
        "benchmark": "train_step",
        "model": "tiny random Llama" if args.smoke else "SmolLM2-135M",
        "setting": {
            "batch": args.batch,
            "seq": args.seq,
            "r": args.r,
            "experts": args.experts,
            "targets": args.targets,
            "steps": args.steps,
            "routers": {v: ROUTER.get(v.removesuffix("+compile"), "-") for v in found["step_ms"]},
            "threads": torch.get_num_threads(),
        },
        "device": args.device,
        "dtype": args.dtype,
        **found,
        "targets": TARGETS,
        "targets_met": {k: alora[k] <= bound for k, bound in TARGETS.items() if k in alora},
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    print_table(result, args)
    return finish(result, args)


if __name__ == "__main__":
    main()
