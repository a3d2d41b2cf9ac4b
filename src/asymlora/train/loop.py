"""The training loop: mixed-task batches, AdamW, warm-up schedule, atomic checkpoints, resume.

Built on accelerate, so ``accelerate launch`` or ``torchrun`` runs it data-parallel on several GPUs with
no code change (each process takes its slice of every global batch; only the main process writes).
The data order is a function of (seed, step), so a resumed run sees exactly the batches it would have.
"""

from __future__ import annotations

import json
import math
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import get_scheduler

from asymlora import progress
from asymlora.config import TrainSettings
from asymlora.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint


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
    """The dataset indices of global step ``step`` for process ``rank``: epochs are seeded permutations."""
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
    """Train the trainable parameters of ``model`` (a peft model) on ``dataset`` for ``settings.steps``."""
    accelerator = Accelerator(gradient_accumulation_steps=settings.grad_accum)
    torch.manual_seed(settings.seed)
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
    model, optimizer = accelerator.prepare(model, optimizer)
    start, resumed_from, losses = 0, None, []
    ckpt = latest_checkpoint(run_dir) if resume else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, accelerator.unwrap_model(model), optimizer, scheduler)
        start = resumed_from = state["step"]
        losses = [tuple(x) for x in state.get("losses", [])]
        accelerator.print(f"resuming from {ckpt} (step {start})")

    model.train()
    device = accelerator.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    n, world, rank = len(dataset), accelerator.num_processes, accelerator.process_index
    show = accelerator.is_main_process and progress.enabled()  # off under asymlora --quiet
    bar = tqdm(total=settings.steps, initial=start, desc=desc, disable=not show)
    t0, seen, last_loss = time.perf_counter(), 0, math.nan
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "train_log.jsonl"
    for step in range(start, settings.steps):
        step_loss = 0.0
        for micro in range(settings.grad_accum):
            idx = batch_indices(
                step * settings.grad_accum + micro, n, settings.batch_size, settings.seed, rank, world
            )
            batch = {k: v.to(device) for k, v in collate([dataset[i] for i in idx]).items()}
            with accelerator.accumulate(model):
                out = model(**batch, use_cache=False)  # a training forward needs no KV cache
                loss = out.loss
                if not torch.isfinite(loss):
                    last = latest_checkpoint(run_dir)
                    raise TrainingError(
                        f"the loss became {loss.item()} at step {step + 1}; stopped. Last good checkpoint: "
                        f"{last or 'none'}. Lower train.lr or check the data, then resume with --resume."
                    )
                accelerator.backward(loss)
                if accelerator.sync_gradients and settings.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, settings.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad()
            step_loss += loss.item() / settings.grad_accum
            seen += len(idx) * world
        last_loss = step_loss
        done = step + 1
        rate = seen / (time.perf_counter() - t0)
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}", ex_s=f"{rate:.1f}")
        if done % settings.log_every == 0 or done == settings.steps:
            losses.append((done, step_loss))
            if accelerator.is_main_process:
                record = {
                    "step": done,
                    "loss": step_loss,
                    "lr": scheduler.get_last_lr()[0],
                    "examples_per_s": rate,
                }
                with log_path.open("a") as fh:
                    fh.write(json.dumps(record) + "\n")
                if progress.enabled() and (bar.disable or not bar.fp.isatty()):
                    tqdm.write(f"{desc} step {done}/{settings.steps} loss {step_loss:.4f} ({rate:.1f} ex/s)")
        if on_step is not None and accelerator.is_main_process:
            on_step(done)
        if accelerator.is_main_process and (
            (settings.save_every and done % settings.save_every == 0) or done == settings.steps
        ):
            save_checkpoint(
                run_dir, done, accelerator.unwrap_model(model), optimizer, scheduler,
                {"losses": losses}, settings.keep_checkpoints,
            )  # fmt: skip
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
