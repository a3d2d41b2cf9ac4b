"""The training loop: mixed-task batches, AdamW, warm-up schedule, atomic checkpoints, resume.

Built on accelerate, so ``torchrun`` or ``accelerate launch`` runs it data-parallel (DDP; gloo on CPU, NCCL
on GPUs) with no code change: ``train.batch_size`` is the global batch, each process takes its slice of it,
the loss is the token-weighted mean over the whole global batch, and only the main process writes.
The data order is a function of (seed, step), so a resumed run sees exactly the batches it would have.
docs/distributed.md.
"""

from __future__ import annotations

import json
import math
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DistributedType
from tqdm.auto import tqdm
from transformers import get_scheduler

from asymlora import distributed, progress
from asymlora.config import TrainSettings
from asymlora.train import sharding
from asymlora.train.checkpoint import (
    latest_checkpoint,
    load_adapter_weights,
    load_checkpoint,
    save_checkpoint,
)


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message names the step and the last checkpoint."""


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    train_seconds: float
    peak_memory_mb: float
    losses: list[tuple[int, float]] = field(default_factory=list)
    resumed_from: int | None = None


def batch_indices(step: int, n: int, batch: int, seed: int, rank: int = 0, world: int = 1) -> list[int]:
    """The dataset indices of global step ``step`` for process ``rank`` of ``world``: ``batch`` per process.

    The global batch of a step is positions ``step · batch · world`` … of a stream of seeded permutations of
    range(n) (one per epoch); rank r takes its r-th slice of ``batch`` indices.
    """
    per_step = batch * world
    start = step * per_step
    out: list[int] = []
    while len(out) < per_step:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.extend(perm[offset : offset + per_step - len(out)].tolist())
    return out[rank * batch : (rank + 1) * batch]


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, max resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _step_batches(
    dataset: Any,
    collate: Callable,
    settings: TrainSettings,
    step: int,
    per_process: int,
    rank: int,
    world: int,
    device: torch.device,
) -> list[dict[str, torch.Tensor]]:
    """This process's ``grad_accum`` micro-batches of optimiser step ``step``, on ``device``."""
    out = []
    for micro in range(settings.grad_accum):
        global_micro = step * settings.grad_accum + micro
        idx = batch_indices(global_micro, len(dataset), per_process, settings.seed, rank, world)
        out.append({k: v.to(device) for k, v in collate([dataset[i] for i in idx]).items()})
    return out


def target_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Predicted tokens of a causal-LM batch: labels (batch, seq) other than -100 after the one-token shift."""
    return (labels[:, 1:] != -100).sum()


def _optimizer_step(
    model, batches, accelerator, optimizer, scheduler, params, settings, run_dir, step
) -> float:
    """One optimiser step over this process's micro-batches; returns the global loss of the step.

    The loss is the token-weighted mean over the whole global batch (all micro-batches of all processes),
    exactly as one process holding that batch computes it: each micro-batch's summed token losses are divided
    by the mean token count per (process, micro-batch), N_global / (world · grad_accum), with N_global
    all-reduced; accelerate divides by grad_accum and DDP averages over processes (docs/distributed.md).
    """
    slots = accelerator.num_processes * settings.grad_accum
    local = torch.stack([target_tokens(b["labels"]) for b in batches]).sum().to(torch.float64)
    per_slot = (distributed.all_reduce_sum(local) / slots).clamp_min(1.0).to(torch.float32)
    total = 0.0
    for batch in batches:
        with accelerator.accumulate(model):
            # a training forward needs no KV cache; transformers' loss sums token losses / num_items_in_batch
            out = model(**batch, use_cache=False, num_items_in_batch=per_slot.to(batch["labels"].device))
            loss = out.loss
            value = distributed.all_reduce_sum(loss.detach().to(torch.float64)).item() / slots
            if not math.isfinite(value):
                last = latest_checkpoint(run_dir)
                raise TrainingError(
                    f"the loss became {value} at step {step + 1}; stopped. Last good checkpoint: "
                    f"{last or 'none'}. Lower train.lr or check the data, then resume with --resume."
                )
            accelerator.backward(loss)
            if accelerator.sync_gradients and settings.max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, settings.max_grad_norm)
            optimizer.step()
            if accelerator.sync_gradients:
                scheduler.step()
            optimizer.zero_grad()
        total += value
    return total


def _rng_states(device: torch.device) -> dict[str, torch.Tensor]:
    """Every process's RNG states, a collective: ``torch`` / ``torch.rankR`` (CPU; rank 0 without suffix) and,
    on CUDA, ``cuda.rankR`` (the process's own device)."""
    own = {"torch": torch.get_rng_state().tolist()}
    if device.type == "cuda":
        own["cuda"] = torch.cuda.get_rng_state(device).tolist()
    out = {}
    for r, states in enumerate(distributed.all_gather_json(own)):
        out["torch" if r == 0 else f"torch.rank{r}"] = torch.tensor(states["torch"], dtype=torch.uint8)
        if "cuda" in states:
            out[f"cuda.rank{r}"] = torch.tensor(states["cuda"], dtype=torch.uint8)
    return out


def _prepare(model: Any, settings: TrainSettings, accelerator: Accelerator, ckpt: Path | None):
    """(model, trainable params, optimizer, scheduler) ready to train: DDP-wrapped by accelerate, or with
    ``settings.fsdp`` in a multi-process run sharded by FSDP2 (after loading ``ckpt``'s adapter weights)."""
    if settings.fsdp and accelerator.num_processes > 1:
        if ckpt is not None:
            load_adapter_weights(ckpt, model)
        sharding.shard_model(model)  # replaces the parameters by sharded ones: collect them after this
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    # One scheduler step per optimiser step, stepped here (accelerate would step it once per process).
    scheduler = get_scheduler(
        settings.scheduler,
        optimizer,
        num_warmup_steps=settings.warmup_steps,
        num_training_steps=settings.steps,
    )
    if sharding.is_sharded(model):
        return model, params, accelerator.prepare(optimizer), scheduler
    model, optimizer = accelerator.prepare(model, optimizer)
    return model, params, optimizer, scheduler


def train(
    model: Any,
    dataset: Any,
    collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
    settings: TrainSettings,
    run_dir: Path,
    *,
    resume: bool = False,
    on_step: Callable[[int], None] | None = None,
    desc: str = "train",
) -> TrainResult:
    """Train the trainable parameters of ``model`` (a peft model) on ``dataset`` for ``settings.steps``.

    Under ``torchrun`` / ``accelerate launch`` each of the W processes takes ``settings.batch_size / W``
    examples of every global batch and DDP averages the gradients (with ``settings.fsdp``: FSDP2 shards the
    model and reduce-scatters them); the result equals a one-process run with the same ``batch_size`` (to
    float rounding, dropout aside). Only rank 0 writes into ``run_dir``.
    Raises ValueError when W does not divide ``batch_size`` (before any weight changes), TrainingError on a
    non-finite loss.
    """
    cpu = next(model.parameters()).device.type == "cpu"
    distributed.init("cpu" if cpu else "cuda")
    accelerator = Accelerator(gradient_accumulation_steps=settings.grad_accum, cpu=cpu)
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise ValueError(
            f"asymlora train does not use accelerate's {accelerator.distributed_type.value}: launch without "
            "--use_fsdp / --use_deepspeed, and set train.fsdp=true to shard the model (docs/distributed.md)"
        )
    world, rank = accelerator.num_processes, accelerator.process_index
    per_process = distributed.per_process_batch(settings.batch_size, world)
    torch.manual_seed(settings.seed + rank)  # dropout differs across processes, as across examples
    ckpt = latest_checkpoint(run_dir) if resume else None
    model, params, optimizer, scheduler = _prepare(model, settings, accelerator, ckpt)
    start, resumed_from, losses = 0, None, []
    if ckpt is not None:
        load_optimizer = None
        if sharding.is_sharded(model):
            load_optimizer = partial(sharding.load_optimizer_state, model, optimizer.optimizer, params)
        state = load_checkpoint(ckpt, accelerator.unwrap_model(model), optimizer, scheduler, rank=rank,
                                load_optimizer=load_optimizer)  # fmt: skip
        start = resumed_from = state["step"]
        losses = [tuple(x) for x in state.get("losses", [])]
        accelerator.print(f"resuming from {ckpt} (step {start})")
    model.train()
    device = accelerator.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    show = accelerator.is_main_process and progress.enabled()  # off under asymlora --quiet
    bar = tqdm(total=settings.steps, initial=start, desc=desc, disable=not show)
    t0, seen, last_loss = time.perf_counter(), 0, math.nan
    run_dir.mkdir(parents=True, exist_ok=True)
    for step in range(start, settings.steps):
        batches = _step_batches(dataset, collate, settings, step, per_process, rank, world, device)
        last_loss = _optimizer_step(
            model, batches, accelerator, optimizer, scheduler, params, settings, run_dir, step
        )
        seen += settings.batch_size * settings.grad_accum
        done, rate = step + 1, seen / (time.perf_counter() - t0)
        bar.update(1)
        bar.set_postfix(loss=f"{last_loss:.4f}", ex_s=f"{rate:.1f}")
        if done % settings.log_every == 0 or done == settings.steps:
            losses.append((done, last_loss))
            if accelerator.is_main_process:
                _log(run_dir, desc, done, last_loss, scheduler.get_last_lr()[0], rate, settings.steps, bar)
        if on_step is not None and accelerator.is_main_process:
            on_step(done)
        if (settings.save_every and done % settings.save_every == 0) or done == settings.steps:
            rng = _rng_states(device)  # collectives: every process takes part
            full = (
                sharding.gathered_state(model, optimizer.optimizer, params)
                if sharding.is_sharded(model)
                else None
            )
            if accelerator.is_main_process:
                save_checkpoint(run_dir, done, accelerator.unwrap_model(model), optimizer, scheduler,
                                {"losses": losses}, settings.keep_checkpoints, rng=rng, sharded=full)  # fmt: skip
        accelerator.wait_for_everyone()
    bar.close()
    model.eval()
    return TrainResult(
        steps=settings.steps,
        final_loss=last_loss,
        train_seconds=time.perf_counter() - t0,
        peak_memory_mb=peak_memory_mb(device),
        losses=losses,
        resumed_from=resumed_from,
    )


def _log(
    run_dir: Path, desc: str, done: int, loss: float, lr: float, rate: float, steps: int, bar: Any
) -> None:
    """Append one record to ``train_log.jsonl`` (and a line when no live bar shows it)."""
    record = {"step": done, "loss": loss, "lr": lr, "examples_per_s": rate}
    with (run_dir / "train_log.jsonl").open("a") as fh:
        fh.write(json.dumps(record) + "\n")
    if progress.enabled() and (bar.disable or not bar.fp.isatty()):
        tqdm.write(f"{desc} step {done}/{steps} loss {loss:.4f} ({rate:.1f} ex/s)")
