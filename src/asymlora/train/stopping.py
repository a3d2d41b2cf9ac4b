"""The stopping rule of a training run: validation loss every K steps, early stopping, the best adapter back.

Every ``stopping.every`` optimiser steps (and at the last one) the validation loss of each task is computed on
its validation examples (carved from the task's training split, `asymlora.data.tasks.split_validation`), in
eval mode without gradients:

    L_τ = Σ_{examples, predicted tokens} −log p(y_t | y_<t) / #predicted tokens      (token-weighted, task τ)
    L   = (1/T) Σ_τ L_τ                                                              (every task weighs 1/T)

with the predicted tokens those the training loss counts (labels other than −100 after the one-token shift).
One line ``{"step", "per_task": {task: L_τ}, "mean": L, "seconds"}`` goes to ``val_log.jsonl`` (the validation
curves; ``seconds``: the wall time of that validation).

Early stopping (`EarlyStopping`, the rule of Keras' and transformers' ``EarlyStoppingCallback``): a validation
improves when L < best − ``min_delta``; after ``patience`` validations in a row without an improvement the run
stops (``patience`` 0: never, the curves only). At the stop, or at the end, the adapter of the best validation
step is put back (``restore_best``), so the saved and evaluated adapter is the best one. The history, the
counters and the best adapter go into every checkpoint, so a killed run resumes to the same decision.

Several processes (torchrun): each computes the loss sums of its share of the validation examples, the sums
are all-reduced, so every process sees the same L and takes the same decision. docs/sweep.md.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from asymlora import distributed
from asymlora.config import StoppingSettings
from asymlora.io import atomic_write_text
from asymlora.train.precision import autocast
from asymlora.train.targets import IGNORE_INDEX, slices_logits, target_mask

VAL_LOG = "val_log.jsonl"
"""The validation curves in a run directory: one JSON line per validation."""
BEST_FILE = "best_adapter.safetensors"
"""The best adapter's trainable tensors inside a checkpoint directory."""


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(Σ −log p of the predicted tokens, their number), float64, shape (2,).

    ``logits`` (batch, seq, vocab) of a causal LM, ``labels`` (batch, seq) with −100 where nothing is
    predicted; position t predicts label t + 1 (the shift transformers' loss applies). Or, from a model
    given ``logits_to_keep=target_mask(labels)`` (`asymlora.train.targets`), ``logits`` (n_targets, vocab)
    of the target positions only, in row-major order, with the same ``labels``."""
    targets = labels[:, 1:]
    if logits.dim() == 2:  # target positions only: their targets, in the mask's row-major order
        targets = targets[target_mask(labels)[:, :-1]]
    else:
        logits = logits[:, :-1]
    nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                          ignore_index=IGNORE_INDEX, reduction="sum")  # fmt: skip
    count = (targets != IGNORE_INDEX).sum()
    return torch.stack([nll.to(torch.float64), count.to(torch.float64)])


def validation_losses(
    model: Any,
    dataset: Any,
    collate: Callable[[list[Any]], dict[str, torch.Tensor]],
    batch_size: int,
    *,
    rank: int = 0,
    world: int = 1,
    device: torch.device | None = None,
    autocast_to: torch.dtype | None = None,
) -> list[float]:
    """L_τ of every task of ``dataset`` (a `MultiTaskDataset`: ``task_indices`` per task), in task order;
    the forwards autocast to ``autocast_to`` when set (``train.mixed_precision``).

    Process ``rank`` of ``world`` scores examples rank, rank + world, … of each task; the (loss, token) sums
    are all-reduced. Runs under no_grad; the caller sets eval mode. Raises ValueError for a task with no
    predicted token."""
    sums = torch.zeros(len(dataset.task_indices), 2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for t, indices in enumerate(dataset.task_indices):
            mine = indices[rank::world]
            for start in range(0, len(mine), batch_size):
                batch = collate([dataset[i] for i in mine[start : start + batch_size]])
                batch = {k: v.to(device) if device is not None else v for k, v in batch.items()}
                labels = batch.pop("labels")
                if slices_logits(model):  # the vocabulary projection on target positions only
                    batch["logits_to_keep"] = target_mask(labels)
                with autocast(batch["input_ids"].device, autocast_to):
                    logits = model(**batch, use_cache=False).logits
                sums[t] += token_loss_sum(logits, labels).to(sums.device)
    sums = distributed.all_reduce_sum(sums)
    if bool((sums[:, 1] == 0).any()):
        raise ValueError("a validation task has no predicted token; raise stopping.val_examples")
    return (sums[:, 0] / sums[:, 1]).tolist()


@dataclass
class EarlyStopping:
    """Patience counting on a loss sequence (lower is better); state in plain fields (checkpointed as JSON)."""

    patience: int
    min_delta: float = 0.0
    best: float = math.inf
    best_step: int | None = None
    bad: int = 0
    stopped_at: int | None = None

    def update(self, step: int, loss: float) -> bool:
        """Record the validation of ``step``; True when it is an improvement (the new best).

        Sets ``stopped_at = step`` when this is the ``patience``-th validation in a row without one."""
        if loss < self.best - self.min_delta:
            self.best, self.best_step, self.bad = loss, step, 0
            return True
        self.bad += 1
        if self.patience and self.bad >= self.patience:
            self.stopped_at = step
        return False

    @property
    def stopped(self) -> bool:
        return self.stopped_at is not None


@dataclass
class Validation:
    """What `asymlora.train.train` needs to apply the stopping rule.

    ``dataset``: the validation examples (a `MultiTaskDataset`, tasks in the training order), ``collate``
    its collator, ``rule`` the config's stopping section, ``batch_size`` sequences per forward, ``pause``
    a context manager factory wrapped around each validation (e.g. pausing router statistics)."""

    dataset: Any
    collate: Callable[[list[Any]], dict[str, torch.Tensor]]
    rule: StoppingSettings
    batch_size: int = 16
    pause: Callable[[], AbstractContextManager[Any]] | None = None


@dataclass
class Monitor:
    """The training loop's side of the rule: validates when due, logs, keeps the best adapter, stops.

    ``model``: the unwrapped peft model (the forward runs on it: no DDP collective inside), ``steps`` the
    run's step budget, ``rank``/``world``/``main`` the process, ``device`` where batches go."""

    validation: Validation
    model: Any
    steps: int
    run_dir: Path
    device: torch.device | None = None
    rank: int = 0
    world: int = 1
    main: bool = True
    autocast: torch.dtype | None = None
    """The training forwards' autocast dtype; validation uses it too."""
    history: list[dict[str, Any]] = field(default_factory=list)
    best_weights: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        rule = self.validation.rule
        self.early = EarlyStopping(rule.patience, rule.min_delta)

    def due(self, done: int) -> bool:
        return done % self.validation.rule.every == 0 or done == self.steps

    @property
    def stopped(self) -> bool:
        return self.early.stopped

    def __call__(self, done: int) -> None:
        """Validate after step ``done`` when due (a collective in a multi-process run)."""
        if not self.due(done):
            return
        v, training, t0 = self.validation, self.model.training, time.perf_counter()
        self.model.eval()
        try:
            with v.pause() if v.pause is not None else contextlib.nullcontext():
                per_task = validation_losses(self.model, v.dataset, v.collate, v.batch_size,
                                             rank=self.rank, world=self.world, device=self.device,
                                             autocast_to=self.autocast)  # fmt: skip
        finally:
            self.model.train(training)
        mean = sum(per_task) / len(per_task)
        names = v.dataset.task_names
        record = {"step": done, "per_task": dict(zip(names, per_task, strict=True)), "mean": mean,
                  "seconds": round(time.perf_counter() - t0, 3)}  # fmt: skip
        self.history.append(record)
        if self.early.update(done, mean) and v.rule.restore_best:
            self.best_weights = {n: p.detach().clone() for n, p in self._trainable()}
        if self.main:
            with (self.run_dir / VAL_LOG).open("a") as fh:
                fh.write(json.dumps(record) + "\n")

    def _trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def state(self) -> dict[str, Any]:
        """The JSON part of the checkpoint: history and counters."""
        return {"history": self.history, **asdict(self.early)}

    def tensors(self) -> dict[str, torch.Tensor]:
        """The best adapter's trainable tensors (CPU, contiguous) for the checkpoint."""
        return {n: t.detach().cpu().contiguous() for n, t in self.best_weights.items()}

    def load(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Take back a checkpoint's `state` and `tensors`; rewrite ``val_log.jsonl`` from its history (the
        lines a killed run wrote after that checkpoint go)."""
        self.history = list(state["history"])
        for key in ("best", "best_step", "bad", "stopped_at"):
            setattr(self.early, key, state[key])
        device = next(p.device for _, p in self._trainable())
        self.best_weights = {n: t.to(device) for n, t in tensors.items()}
        if self.main:
            lines = "".join(json.dumps(r) + "\n" for r in self.history)
            atomic_write_text(self.run_dir / VAL_LOG, lines)

    def finish(self) -> dict[str, Any]:
        """Put the best adapter back (``restore_best``); the record for results.json."""
        rule = self.validation.rule
        restored = rule.restore_best and self.early.best_step is not None
        if restored:
            params = dict(self._trainable())
            with torch.no_grad():
                for name, tensor in self.best_weights.items():
                    params[name].copy_(tensor)
        return {
            "rule": asdict(rule),
            "stopped_at": self.early.stopped_at,
            "best_step": self.early.best_step,
            "best_val_loss": None if self.early.best_step is None else self.early.best,
            "restored_best": restored,
            "validations": len(self.history),
        }
