"""Training asymlora adapters with `transformers.Trainer` and TRL's `SFTTrainer` (docs/trainer.md).

Drop-in subclasses, `AsymLoraTrainer` and `AsymLoraSFTTrainer` (the latter needs ``pip install asymlora[trl]``),
add what the stock trainers lack for an asymlora adapter:

- Task ids (``router="task"``): each example's task, a name from ``task_names`` or an id, is read from a dataset
  column (``task_column``, default ``"task"``). The stock trainers drop columns that the *base* model's forward
  does not accept (SFTTrainer keeps only input_ids / labels), and their collators know nothing of tasks: the
  column is kept and `TaskIdsCollator` turns it into ``task_ids`` (LongTensor[batch]) beside the collated batch,
  so mixed-task batches are routed per example (docs/design.md §3).
- The load-balancing loss of soft / top-k routers (docs/design.md §3): SFTTrainer computes its loss from the
  fused LM head's log-probabilities and ignores the model's ``loss`` that holds it, and with gradient
  accumulation `Trainer` leaves a token-normalised loss unscaled. The trainer adds the balance term itself:
  loss = LM loss + mean over micro-batches of the balance loss, as the project's own training loop does.
- Checks before any weight is touched: a missing task column, an unknown task name or id, and packing /
  padding-free batches (which merge examples of different tasks into one row) raise a ValueError naming the
  value and the fix, when the trainer is built (on a `datasets.Dataset`) or when a batch is collated.
"""

from __future__ import annotations

import functools
import inspect
import numbers
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn
from transformers import Trainer

from asymlora.routing import RoutingCall, add_balance_loss
from asymlora.train.targets import on_targets
from asymlora.tuner.config import AsymLoraConfig
from asymlora.tuner.model import active_adapter_name

__all__ = [  # noqa: F822 (AsymLoraSFTTrainer is built on first access, see __getattr__)
    "TASK_COLUMN",
    "AsymLoraSFTTrainer",
    "AsymLoraTrainer",
    "TaskIdsCollator",
    "task_id",
]

TASK_COLUMN = "task"
"""Default name of the dataset column holding each example's task (a name of ``task_names`` or an id)."""


def adapter_config(model: Any) -> AsymLoraConfig | None:
    """The `AsymLoraConfig` of a peft model's (or peft tuner's) active adapter, or None (not a peft model /
    another tuner).

    Raises ValueError when a tuner has several active adapters (whose routing to follow is then ambiguous)."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        return None
    try:
        name = active_adapter_name(model)  # a tuner's active_adapter is a list of names
    except ValueError:
        names = list(model.active_adapter)
        raise ValueError(
            f"{len(names)} adapters are active ({names}); the trainer trains one asymlora adapter: call "
            f"model.set_adapter({names[0]!r}) (or the name of the one to train) first."
        ) from None
    config = configs.get(name)
    return config if isinstance(config, AsymLoraConfig) else None


def task_id(config: AsymLoraConfig, value: Any, column: str = TASK_COLUMN) -> int:
    """Expert index of one example's task: a name of ``config.task_names`` or an integer id in [0, N).

    Raises ValueError (unknown name, id out of range, names without ``task_names``) or TypeError (another type),
    naming the value, the column and the fix."""
    names = config.task_names or []
    if isinstance(value, str):
        if value in names:
            return names.index(value)
        fix = (
            f"this adapter's task_names are {names}: fix the column, or list the task in "
            "AsymLoraConfig(task_names=[...]) (one name per expert, num_experts = len(task_names))"
            if names
            else "the adapter has no task_names: set AsymLoraConfig(task_names=[...]) or store ids 0..N-1"
        )
        raise ValueError(f"unknown task {value!r} in column {column!r}; {fix}.")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"task {value!r} in column {column!r} is a {type(value).__name__}; store a task name of "
            f"{names} or an integer id 0..{config.num_experts - 1}."
        )
    if not 0 <= int(value) < config.num_experts:
        raise ValueError(
            f"task id {value} in column {column!r} is outside [0, {config.num_experts}); store ids "
            f"0..{config.num_experts - 1}" + (f" or the names {names}." if names else ".")
        )
    return int(value)


def _missing_column(column: str, found: Any, where: str) -> ValueError:
    return ValueError(
        f"{where} has no {column!r} column (it has {found}), but the adapter routes by task (router='task'): "
        f"add a {column!r} column with each example's task name or id, or name your column with "
        "task_column='...'."
    )


class TaskIdsCollator:
    """Wrap a data collator so each batch also carries ``task_ids`` (LongTensor[batch]).

    Each example's ``column`` entry (a task name or id, see `task_id`) is taken out, the inner ``collator``
    collates the remaining fields, and ``task_ids[i]`` is example i's expert index. Raises ValueError when an
    example lacks the column or names an unknown task (before the batch reaches the model)."""

    def __init__(
        self, collator: Callable[[list[dict]], dict], config: AsymLoraConfig, column: str = TASK_COLUMN
    ):
        self.collator, self.config, self.column = collator, config, column

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        for f in features:
            if self.column not in f:
                raise _missing_column(self.column, sorted(f), "an example of the batch")
        ids = [task_id(self.config, f[self.column], self.column) for f in features]
        batch = self.collator([{k: v for k, v in f.items() if k != self.column} for f in features])
        batch["task_ids"] = torch.tensor(ids, dtype=torch.long)
        return batch


def check_dataset(dataset: Any, config: AsymLoraConfig, column: str, name: str) -> None:
    """Check a `datasets` dataset for a task-routed adapter: the column exists and holds known tasks only."""
    names = getattr(dataset, "column_names", None)
    if isinstance(names, dict):  # DatasetDict
        for split, ds in dataset.items():
            check_dataset(ds, config, column, f"{name} dataset {split!r}")
        return
    if not isinstance(names, list):
        return  # a torch Dataset or an unresolved IterableDataset: the collator checks each batch
    if column not in names:
        raise _missing_column(column, names, f"the {name} dataset")
    if hasattr(dataset, "unique"):
        for value in dataset.unique(column):
            task_id(config, value, column)


if TYPE_CHECKING:
    _TrainerBase = Trainer  # the mixin's methods run on a Trainer (or SFTTrainer): typed as one
else:
    _TrainerBase = object


class AsymLoraTrainerMixin(_TrainerBase):
    """Task ids from a dataset column and the balance loss for the trainer it is mixed into (module doc).

    Extra keyword argument: ``task_column`` (default ``"task"``), used when the adapter routes by task."""

    def __init__(self, *args: Any, task_column: str = TASK_COLUMN, **kwargs: Any) -> None:
        given = inspect.signature(super().__init__).bind_partial(*args, **kwargs).arguments
        config = given.get("peft_config") or adapter_config(given.get("model"))
        if not isinstance(config, AsymLoraConfig):
            raise TypeError(
                f"{type(self).__name__} trains an asymlora adapter: pass model=peft.get_peft_model(base, "
                "AsymLoraConfig(...)) (or, to AsymLoraSFTTrainer, the base model and peft_config=AsymLoraConfig(...))."
            )
        self.task_column = task_column if config.router == "task" else None
        if self.task_column:
            _check_task_inputs(config, given, task_column)
        super().__init__(*args, **kwargs)
        self._balance_calls: list[tuple[RoutingCall, list[Tensor]]] | None = None
        self._balance_log: list[Tensor] = []  # balance loss of each training micro-batch since the last log
        if self.task_column:
            model_config = adapter_config(self.model) or config  # SFTTrainer builds the peft model itself
            self.data_collator = TaskIdsCollator(self.data_collator, model_config, task_column)
        tuner = getattr(self.model, "base_model", None)
        if not isinstance(tuner, nn.Module):
            raise TypeError(f"{type(self).__name__} needs a peft model, got a {type(self.model).__name__}")
        tuner.register_forward_hook(self._take_balance_terms)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        columns = cast("list[str] | None", self._signature_columns)  # transformers annotates it as None
        if self.task_column and columns is not None and self.task_column not in columns:
            self._signature_columns = [*columns, self.task_column]  # type: ignore[assignment]  # (same gap)

    def _take_balance_terms(self, tuner: Any, args: Any, output: Any) -> None:
        """Forward hook of the tuner: while `compute_loss` runs, move the call's balance terms here, so the
        model's own forward does not add them to its ``loss`` and `compute_loss` adds them exactly once."""
        call = tuner.routing_state.call
        if self._balance_calls is not None and call is not None and call.aux_losses:
            self._balance_calls.append((call, list(call.aux_losses)))
            call.aux_losses.clear()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The trainer's loss plus the balance loss (1/accumulation steps of it when the trainer does not
        divide the loss by the accumulation steps itself, as with a token count ``num_items_in_batch``)."""
        self._balance_calls = []
        try:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            calls, self._balance_calls = self._balance_calls, None
        loss, outputs = result if return_outputs else (result, None)
        steps = self._ga_steps(num_items_in_batch)
        for call, terms in calls:
            call.aux_losses[:] = terms
            total, aux = add_balance_loss(loss * steps, call)  # d(total)/d(aux) reaches the routers
            loss = total / steps
            if model.training:
                self._balance_log.append(aux.detach())
        return (loss, outputs) if return_outputs else loss

    def _ga_steps(self, num_items_in_batch: Any) -> int:
        """Accumulation steps to divide the balance term by: those of the step when `training_step` leaves
        the loss undivided (Trainer's rule: a loss normalised by ``num_items_in_batch``), else 1."""
        if self.model is None or not self.model.training:
            return 1
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:
            accepts = self.model_accepts_loss_kwargs and num_items_in_batch is not None
            scaled = accepts or self.compute_loss_func is not None
        steps = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        return steps if scaled else 1

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Trainer's log, with ``balance_loss``: the mean balance loss since the last log."""
        if self._balance_log and "loss" in logs:
            logs["balance_loss"] = torch.stack(self._balance_log).float().mean().item()
            self._balance_log.clear()
        super().log(logs, *args, **kwargs)


def _check_task_inputs(config: AsymLoraConfig, given: dict[str, Any], column: str) -> None:
    """Before the trainer is built: task datasets and batch layout fit a task-routed adapter."""
    args = given.get("args")
    for flag in ("packing", "padding_free"):
        if getattr(args, flag, False):
            raise ValueError(
                f"{flag}=True puts several examples into one row, but the adapter routes each example by its "
                f"task (router='task'); set {flag}=False in the trainer's config."
            )
    check_dataset(given.get("train_dataset"), config, column, "train")
    check_dataset(given.get("eval_dataset"), config, column, "eval")


class AsymLoraTrainer(AsymLoraTrainerMixin, Trainer):
    """`transformers.Trainer` for a peft model with an asymlora adapter (task ids, balance loss; module doc).

    ``AsymLoraTrainer(model=get_peft_model(base, AsymLoraConfig(...)), args=..., train_dataset=...,
    task_column="task")``; everything else is Trainer's, checkpoints and ``resume_from_checkpoint`` included.

    Training steps project only the target positions onto the vocabulary (`asymlora.train.targets`: the same
    loss and gradient, less compute when prompts are masked with -100), where the model's forward supports
    it and Trainer uses the model's own loss (no ``label_smoothing_factor``, no ``compute_loss_func``);
    evaluation and prediction keep the full ``(batch, seq, vocab)`` logits."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Trainer's loss (with the balance term, `AsymLoraTrainerMixin.compute_loss`), on target-position
        logits during training (class docstring)."""
        own_loss = self.label_smoother is None and self.compute_loss_func is None
        if model.training and not return_outputs and own_loss:
            inputs = on_targets(model, inputs)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


@functools.cache
def _sft_trainer_class() -> type:
    try:
        from trl import SFTTrainer
    except ImportError as e:
        raise ImportError("AsymLoraSFTTrainer needs TRL: pip install 'asymlora[trl]'") from e

    class AsymLoraSFTTrainer(AsymLoraTrainerMixin, SFTTrainer):
        """TRL's `SFTTrainer` for an asymlora adapter (task ids, balance loss; see `asymlora.hf`).

        ``AsymLoraSFTTrainer(model=base, peft_config=AsymLoraConfig(...), train_dataset=...,
        processing_class=tokenizer, task_column="task")``; everything else is SFTTrainer's."""

    AsymLoraSFTTrainer.__module__ = __name__
    return AsymLoraSFTTrainer


def __getattr__(name: str) -> Any:
    if name == "AsymLoraSFTTrainer":  # built on first use: TRL is an optional dependency
        return _sft_trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
