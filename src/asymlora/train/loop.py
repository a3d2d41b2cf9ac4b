"""The training loop: mixed-task batches, AdamW, warm-up schedule, atomic checkpoints, resume.

Built on accelerate, so ``torchrun`` or ``accelerate launch`` runs it data-parallel (DDP; gloo on CPU, NCCL
on GPUs) with no code change: ``train.batch_size`` is the global batch, each process takes its slice of it,
the loss is the token-weighted mean over the whole global batch, and only the main process writes.
The data order is a function of (seed, step), so a resumed run sees exactly the batches it would have.
docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import statistics
import time
from collections.abc import Callable, Sequence
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
from asymlora.io import purge_after_step
from asymlora.train import sharding
from asymlora.train.checkpoint import (
    latest_checkpoint,
    load_adapter_weights,
    load_checkpoint,
    load_tensors,
    save_checkpoint,
)
from asymlora.train.precision import autocast, autocast_dtype
from asymlora.train.stopping import BEST_FILE, VAL_LOG, Monitor, Validation
from asymlora.train.targets import on_targets

TRAIN_LOG = "train_log.jsonl"
"""One JSON line per ``log_every`` steps: ``{"step", "loss", "lr", "examples_per_s"}``."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message names the step and the last checkpoint."""


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    train_seconds: float | None
    """Wall seconds of training (validation and checkpoints included), summed over resumes; None when the run
    resumed from a checkpoint written before asymlora recorded it."""
    peak_memory_mb: float
    losses: list[tuple[int, float]] = field(default_factory=list)
    resumed_from: int | None = None
    stopping: dict[str, Any] | None = None
    """The stopping rule's record (`asymlora.train.stopping.Monitor.finish`); None without validation."""
    step_seconds: float | None = None
    """Median wall seconds of one optimiser step (batch, forward, backward, update; not validation or
    checkpoints) over the steps trained, resumes included; None when no step was timed."""


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


def step_batches(
    dataset: Any,
    collate: Callable[[list[Any]], dict[str, torch.Tensor]],
    step: int,
    batch_size: int,
    seed: int,
    *,
    grad_accum: int = 1,
    rank: int = 0,
    world: int = 1,
    device: torch.device | None = None,
    keys: Sequence[str] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """This process's ``grad_accum`` micro-batches of optimiser step ``step`` (`batch_indices` at global
    micro-steps ``step · grad_accum + m``), moved to ``device`` (None: left where ``collate`` put them) and
    restricted to ``keys`` (None: every key the collator returns)."""
    out = []
    for micro in range(grad_accum):
        idx = batch_indices(step * grad_accum + micro, len(dataset), batch_size, seed, rank, world)
        batch = collate([dataset[i] for i in idx])
        if keys is not None:
            batch = {k: batch[k] for k in keys}
        out.append({k: v.to(device) for k, v in batch.items()} if device is not None else batch)
    return out


def target_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Predicted tokens of a causal-LM batch: labels (batch, seq) other than -100 after the one-token shift."""
    return (labels[:, 1:] != -100).sum()


def local_loss_value(loss: torch.Tensor) -> float:
    """The reported value of a one-process loss: the loss itself as a Python float."""
    return float(loss.detach())


@dataclass
class StepLoop:
    """The optimisation loop of asymlora, shared by `train` (multi-task, accelerate) and the federated client
    (`asymlora.federated.client.train_local`).

    One optimiser step runs, per micro-batch: forward (``model(**batch, use_cache=False).loss``, the
    vocabulary projected on the target positions only: `asymlora.train.targets`; autocast to ``autocast``
    when set: `asymlora.train.precision`), the
    finite-loss check (`TrainingError` with ``failure(value, step)``), backward, gradient clipping to
    ``max_grad_norm`` (when > 0; on the micro-batch that syncs gradients), the optimiser step, the scheduler
    step (likewise), zero_grad. The step's reported loss is the sum of ``loss_value`` over its micro-batches.
    With an ``accelerator`` the model and optimiser must be prepared by it (gradient accumulation, DDP).
    """

    model: Any
    optimizer: Any
    params: list[torch.nn.Parameter]
    max_grad_norm: float
    scheduler: Any = None
    accelerator: Accelerator | None = None
    loss_value: Callable[[torch.Tensor], float] = local_loss_value
    failure: Callable[[float, int], str] = lambda value, step: (
        f"non-finite training loss {value} at step {step}"
    )
    autocast: torch.dtype | None = None
    """Autocast the forwards to this dtype (``train.mixed_precision``, `asymlora.train.precision`); None: off."""

    def step(self, batches: Sequence[dict[str, torch.Tensor]], step: int) -> float:
        """One optimiser step over ``batches`` (the micro-batches of step ``step``, 0-based); its loss."""
        acc = self.accelerator
        total = 0.0
        for batch in batches:
            with acc.accumulate(self.model) if acc is not None else contextlib.nullcontext():
                with autocast(
                    batch["input_ids"].device, self.autocast
                ):  # no KV cache in training; logits on the target positions only
                    loss = self.model(**on_targets(self.model, batch), use_cache=False).loss
                value = self.loss_value(loss)
                if not math.isfinite(value):
                    raise TrainingError(self.failure(value, step))
                if acc is not None:
                    acc.backward(loss)
                else:
                    loss.backward()
                sync = acc is None or acc.sync_gradients
                if sync and self.max_grad_norm > 0:
                    clip = acc.clip_grad_norm_ if acc is not None else torch.nn.utils.clip_grad_norm_
                    clip(self.params, self.max_grad_norm)
                self.optimizer.step()
                if sync and self.scheduler is not None:
                    self.scheduler.step()
                self.optimizer.zero_grad()
            total += value
        return total

    def run(
        self,
        batches_of: Callable[[int], Sequence[dict[str, torch.Tensor]]],
        start: int,
        stop: int,
        after_step: Callable[[int, float], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[float]:
        """Optimiser steps ``start`` … ``stop - 1`` on ``batches_of(step)``; the loss of each step, in order.
        ``after_step(done, loss)`` runs after each, with ``done = step + 1``; the loop ends early when
        ``should_stop()`` is true after a step (the stopping rule, `asymlora.train.stopping`)."""
        losses = []
        for step in range(start, stop):
            loss = self.step(batches_of(step), step)
            losses.append(loss)
            if after_step is not None:
                after_step(step + 1, loss)
            if should_stop is not None and should_stop():
                break
        return losses


def _global_batches(
    dataset: Any, collate: Callable, settings: TrainSettings, accelerator: Accelerator, step: int
) -> list[dict[str, torch.Tensor]]:
    """This process's micro-batches of ``step``, each with ``num_items_in_batch``: the mean token count per
    (process, micro-batch), N_global / (world · grad_accum), N_global all-reduced.

    With it transformers' loss (summed token losses / num_items_in_batch), divided by grad_accum by accelerate
    and averaged over processes by DDP, is the token-weighted mean over the whole global batch, exactly as one
    process holding that batch computes it (docs/distributed.md).
    """
    world, rank = accelerator.num_processes, accelerator.process_index
    per_process = distributed.per_process_batch(settings.batch_size, world)
    batches = step_batches(dataset, collate, step, per_process, settings.seed, grad_accum=settings.grad_accum,
                           rank=rank, world=world, device=accelerator.device)  # fmt: skip
    slots = world * settings.grad_accum
    local = torch.stack([target_tokens(b["labels"]) for b in batches]).sum().to(torch.float64)
    per_slot = (distributed.all_reduce_sum(local) / slots).clamp_min(1.0).to(torch.float32)
    return [{**b, "num_items_in_batch": per_slot.to(b["labels"].device)} for b in batches]


def _global_loss_value(slots: int) -> Callable[[torch.Tensor], float]:
    """A micro-batch's share of the global loss: its loss summed over processes / (world · grad_accum)."""

    def value(loss: torch.Tensor) -> float:
        return distributed.all_reduce_sum(loss.detach().to(torch.float64)).item() / slots

    return value


def _failure_message(run_dir: Path, value: float, step: int) -> str:
    last = latest_checkpoint(run_dir)
    return (
        f"the loss became {value} at step {step + 1}; stopped. Last good checkpoint: "
        f"{last or 'none'}. Lower train.lr or check the data, then resume with --resume."
    )


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
    validation: Validation | None = None,
    step_logs: Sequence[str] = (),
) -> TrainResult:
    """Train the trainable parameters of ``model`` (a peft model) on ``dataset`` for ``settings.steps``.

    Under ``torchrun`` / ``accelerate launch`` each of the W processes takes ``settings.batch_size / W``
    examples of every global batch and DDP averages the gradients (with ``settings.fsdp``: FSDP2 shards the
    model and reduce-scatters them); the result equals a one-process run with the same ``batch_size`` (to
    float rounding, dropout aside). Only rank 0 writes into ``run_dir``. ``on_step(done)`` runs after each
    step on every process (it may hold a collective; it writes files on rank 0 only).
    ``validation``: the stopping rule (`asymlora.train.stopping`; val_log.jsonl, early stopping, the best
    adapter restored). On resume from step S (0 when the killed process wrote no checkpoint), the records
    above S that it left in ``train_log.jsonl``, ``val_log.jsonl`` and the ``step_logs`` (more JSON-lines
    files in ``run_dir`` with a ``step``, e.g. ``router.jsonl``) are dropped (`asymlora.io.purge_after_step`).
    Raises ValueError when W does not divide ``batch_size`` (before any weight changes)
    or for validation with an FSDP-sharded model, TrainingError on a non-finite loss.
    """
    accelerator = _accelerator(model, settings)
    # ValueError before training
    distributed.per_process_batch(settings.batch_size, accelerator.num_processes)
    torch.manual_seed(settings.seed + accelerator.process_index)  # dropout differs across processes
    ckpt = latest_checkpoint(run_dir) if resume else None
    model, params, optimizer, scheduler = _prepare(model, settings, accelerator, ckpt)
    start, losses, state = 0, list[tuple[int, float]](), dict[str, Any]()
    if ckpt is not None:
        start, losses, state = _resume(ckpt, model, params, optimizer, scheduler, accelerator)
    if resume and accelerator.is_main_process:  # without a checkpoint the run starts over: every record goes
        for name in (TRAIN_LOG, VAL_LOG, *step_logs):
            purge_after_step(run_dir / name, start)
    model.train()
    device = accelerator.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    run_dir.mkdir(parents=True, exist_ok=True)
    monitor = _monitor(validation, model, settings, run_dir, accelerator, ckpt, state)
    loop = StepLoop(model, optimizer, params, settings.max_grad_norm, scheduler, accelerator,
                    loss_value=_global_loss_value(accelerator.num_processes * settings.grad_accum),
                    failure=partial(_failure_message, run_dir),
                    autocast=autocast_dtype(settings.mixed_precision))  # fmt: skip
    book = _Bookkeeping(loop, settings, run_dir, desc, on_step, losses, start, monitor, state)
    stop = start if monitor is not None and monitor.stopped else settings.steps
    try:
        loop.run(partial(_global_batches, dataset, collate, settings, accelerator), start, stop, book,
                 should_stop=(lambda: monitor.stopped) if monitor is not None else None)  # fmt: skip
    finally:
        book.bar.close()
    record = monitor.finish() if monitor is not None else None  # the best adapter back (restore_best)
    model.eval()
    return TrainResult(
        steps=(record or {}).get("stopped_at") or settings.steps,
        final_loss=book.last_loss,
        train_seconds=book.train_seconds(),
        step_seconds=statistics.median(book.step_times) if book.step_times else None,
        peak_memory_mb=peak_memory_mb(device),
        losses=losses,
        resumed_from=start if ckpt is not None else None,
        stopping=record,
    )


def _monitor(
    validation: Validation | None,
    model: Any,
    settings: TrainSettings,
    run_dir: Path,
    accelerator: Accelerator,
    ckpt: Path | None,
    state: dict[str, Any],
) -> Monitor | None:
    """The stopping rule's monitor of this run (None without ``validation``), with a resumed checkpoint's
    validation history, counters and best adapter."""
    if validation is None:
        return None
    if sharding.is_sharded(model):
        raise ValueError(
            "the stopping rule (stopping.val_examples > 0) does not run with an FSDP-sharded model; "
            "use train.fsdp=false (DDP) or stopping.val_examples=0"
        )
    monitor = Monitor(validation, accelerator.unwrap_model(model), settings.steps, run_dir,
                      device=accelerator.device, rank=accelerator.process_index,
                      world=accelerator.num_processes, main=accelerator.is_main_process,
                      autocast=autocast_dtype(settings.mixed_precision))  # fmt: skip
    if ckpt is not None and "stopping" in state:
        monitor.load(state["stopping"], load_tensors(ckpt, BEST_FILE))
    return monitor


def _accelerator(model: Any, settings: TrainSettings) -> Accelerator:
    """The run's Accelerator (CPU when the model is on the CPU); refuses accelerate's FSDP / DeepSpeed."""
    cpu = next(model.parameters()).device.type == "cpu"
    distributed.init("cpu" if cpu else "cuda")
    # mixed_precision="no": asymlora autocasts itself (train.mixed_precision, asymlora.train.precision), and an
    # ACCELERATE_MIXED_PRECISION from `accelerate launch --mixed_precision` must not change the run behind the
    # config's back (check_launch refuses the mismatch before loading)
    accelerator = Accelerator(gradient_accumulation_steps=settings.grad_accum, cpu=cpu, mixed_precision="no")
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise ValueError(
            f"asymlora train does not use accelerate's {accelerator.distributed_type.value}: launch without "
            "--use_fsdp / --use_deepspeed, and set train.fsdp=true to shard the model (docs/distributed.md)"
        )
    return accelerator


def _resume(
    ckpt: Path, model: Any, params: list, optimizer: Any, scheduler: Any, accelerator: Accelerator
) -> tuple[int, list[tuple[int, float]], dict[str, Any]]:
    """Load checkpoint ``ckpt`` into the prepared model, optimiser and scheduler; (its step, its losses, its
    JSON state)."""
    load_optimizer = None
    if sharding.is_sharded(model):
        load_optimizer = partial(sharding.load_optimizer_state, model, optimizer.optimizer, params)
    state = load_checkpoint(ckpt, accelerator.unwrap_model(model), optimizer, scheduler,
                            rank=accelerator.process_index, load_optimizer=load_optimizer)  # fmt: skip
    accelerator.print(f"resuming from {ckpt} (step {state['step']})")
    return state["step"], [(x[0], x[1]) for x in state.get("losses", [])], state


class _Bookkeeping:
    """What `train` does after every optimiser step: progress bar, ``train_log.jsonl``, ``on_step``,
    checkpoints (every ``save_every`` steps and at the end); the losses every ``log_every`` steps."""

    def __init__(
        self,
        loop: StepLoop,
        settings: TrainSettings,
        run_dir: Path,
        desc: str,
        on_step: Callable[[int], None] | None,
        losses: list[tuple[int, float]],
        start: int,
        monitor: Monitor | None = None,
        resumed: dict[str, Any] | None = None,
    ) -> None:
        assert loop.accelerator is not None
        self.loop, self.acc, self.settings, self.run_dir, self.desc = (
            loop,
            loop.accelerator,
            settings,
            run_dir,
            desc,
        )
        self.on_step, self.losses, self.monitor = on_step, losses, monitor
        show = self.acc.is_main_process and progress.enabled()  # off under asymlora --quiet
        self.bar = tqdm(total=settings.steps, initial=start, desc=desc, disable=not show)
        self.t0, self.seen, self.last_loss = time.perf_counter(), 0, math.nan
        self.t_mark = self.t0  # the end of the last step's bookkeeping: the next step starts here
        resumed = resumed or {}
        # the time of the processes before a resume (None: a checkpoint from before it was recorded)
        self.prior_seconds: float | None = resumed.get("train_seconds", None if start else 0.0)
        self.step_times: list[float] = list(resumed.get("step_seconds", []))

    def train_seconds(self) -> float | None:
        """Wall seconds of training so far, the processes before a resume included (None: unknown)."""
        return None if self.prior_seconds is None else self.prior_seconds + time.perf_counter() - self.t0

    def __call__(self, done: int, loss: float) -> None:
        self.step_times.append(round(time.perf_counter() - self.t_mark, 4))
        self._after_step(done, loss)
        self.t_mark = time.perf_counter()

    def _after_step(self, done: int, loss: float) -> None:
        s, acc = self.settings, self.acc
        self.last_loss = loss
        self.seen += s.batch_size * s.grad_accum
        rate = self.seen / (time.perf_counter() - self.t0)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", ex_s=f"{rate:.1f}")
        if done % s.log_every == 0 or done == s.steps:
            self.losses.append((done, loss))
            if acc.is_main_process:
                lr = self.loop.scheduler.get_last_lr()[0]
                _log(self.run_dir, self.desc, done, loss, lr, rate, s.steps, self.bar)
        if self.on_step is not None:  # on every process: it may hold a collective (the router log)
            self.on_step(done)
        stopped = False
        if self.monitor is not None:  # validation before the checkpoint, which holds its outcome
            self.monitor(done)
            stopped = self.monitor.stopped
        if (s.save_every and done % s.save_every == 0) or done == s.steps or stopped:
            self._save(done)
        acc.wait_for_everyone()

    def _save(self, done: int) -> None:
        """Checkpoint ``done`` (a collective: every process takes part; rank 0 writes)."""
        loop, acc = self.loop, self.acc
        rng = _rng_states(acc.device)
        full = None
        if sharding.is_sharded(loop.model):
            full = sharding.gathered_state(loop.model, loop.optimizer.optimizer, loop.params)
        extra: dict[str, Any] = {"losses": self.losses, "step_seconds": self.step_times}
        if (seconds := self.train_seconds()) is not None:
            extra["train_seconds"] = round(seconds, 3)
        files = None
        if self.monitor is not None:
            extra["stopping"] = self.monitor.state()
            files = {BEST_FILE: self.monitor.tensors()}
        if acc.is_main_process:
            save_checkpoint(self.run_dir, done, acc.unwrap_model(loop.model), loop.optimizer, loop.scheduler,
                            extra, self.settings.keep_checkpoints, rng=rng, sharded=full, files=files)  # fmt: skip


def _log(
    run_dir: Path, desc: str, done: int, loss: float, lr: float, rate: float, steps: int, bar: Any
) -> None:
    """Append one record to ``train_log.jsonl`` (and a line when no live bar shows it)."""
    record = {"step": done, "loss": loss, "lr": lr, "examples_per_s": rate}
    with (run_dir / TRAIN_LOG).open("a") as fh:
        fh.write(json.dumps(record) + "\n")
    if progress.enabled() and (bar.disable or not bar.fp.isatty()):
        tqdm.write(f"{desc} step {done}/{steps} loss {loss:.4f} ({rate:.1f} ex/s)")
