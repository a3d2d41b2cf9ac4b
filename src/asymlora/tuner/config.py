"""`AsymLoraConfig`: the peft config of every asymlora adapter method."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig
from peft.utils import TaskType

from asymlora.methods import METHODS
from asymlora.routing import ROUTERS

PEFT_TYPE = "ASYMLORA"
"""Our key in peft's peft-type mapping tables (a plain string: peft's enum is closed, docs/design.md §10)."""
TASK_TYPE = "ASYMLORA_CAUSAL_LM"
"""Our key in peft's task-type -> model mapping: a causal-LM wrapper that passes `task_ids` to the layers."""


@dataclass
class AsymLoraConfig(PeftConfig):
    """Configuration of an asymlora adapter (ALoRA, LoRA, HydraLoRA, MoLoRA or MALoRA).

    ``peft.get_peft_model(model, AsymLoraConfig(method="alora", target_modules=["q_proj", "o_proj"]))``
    after ``import asymlora``. Defaults follow the ALoRA paper: r = 8, alpha = 16, N = 3, soft routing.
    """

    method: str = field(default="alora", metadata={"help": "lora | alora | hydralora | molora | malora."})
    """Adapter method: ``lora``, ``alora`` (N A's, one B), ``hydralora`` (one A, N B's), ``molora``
    (N pairs) or ``malora`` (shared A subspace, higher-rank B experts)."""
    r: int = field(default=8, metadata={"help": "LoRA rank of each expert."})
    """Rank r of each expert (for MALoRA, the base rank from which d_sub and r̂ derive)."""
    lora_alpha: float = field(default=16, metadata={"help": "Scaling numerator: s = lora_alpha / r."})
    """Scaling numerator: the update is multiplied by s = lora_alpha / r."""
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input."})
    """Dropout probability on the adapter path's input (the router sees the input without dropout)."""
    fan_in_fan_out: bool = field(
        default=False,
        metadata={"help": "Base weights stored (fan_in, fan_out), as GPT-2's Conv1D (set automatically)."},
    )
    """True when the adapted layers store their weight as (d_in, d_out), like GPT-2's ``Conv1D`` (peft's
    ``LoraConfig.fan_in_fan_out``). As in peft it is set when the modules are injected: to True, with a warning,
    when a target is a ``Conv1D``, to False, with a warning, when it is an ``nn.Linear``. It only matters when
    an update is merged into the stored weight, or exported (the stock peft config carries it)."""
    num_experts: int = field(default=3, metadata={"help": "Number of experts N (ignored by lora)."})
    """Number of experts N (the paper's lora_num). With ``router="task"``, the number of tasks."""
    router: Literal["soft", "topk", "task"] = field(default="soft", metadata={"help": "soft | topk | task."})
    """``soft`` dense softmax (the paper's), ``topk`` k of N renormalised, ``task`` hard routing by the
    ``task_ids`` passed with the batch (mergeable and exportable per task)."""
    top_k: int = field(default=2, metadata={"help": "Experts kept per token by the topk router."})
    """Experts kept per token by the ``topk`` router (2 <= top_k <= num_experts: with one the renormalised
    gate is exactly 1 and the router learns nothing from the loss, so 1 is refused)."""
    balance_loss_weight: float = field(default=0.0, metadata={"help": "Weight of the load-balancing loss."})
    """Weight of the Switch-Transformer load-balancing loss added to the training loss (0 = off)."""
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Module names (suffixes) or a regex to adapt, e.g. ['q_proj','o_proj']."},
    )
    """Names (matched as suffixes) or one regex of the nn.Linear / Conv1D modules to adapt; None uses peft's
    per-architecture LoRA defaults (``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``: q_proj, v_proj for
    Llama, c_attn for GPT-2, query_key_value for GPT-NeoX; docs/architectures.md)."""
    subspace_rank: int | None = field(default=None, metadata={"help": "MALoRA d_sub (default λ·r·N, λ=0.5)."})
    """MALoRA: rank d_sub of the shared A subspace; default r·N/2 (λ = 0.5, the paper's setting)."""
    expert_rank: int | None = field(default=None, metadata={"help": "MALoRA r̂ (default r + (1-λ)·r)."})
    """MALoRA: rank r̂ of each B expert; default r + (1 − λ)·r with λ = d_sub / (r·N) (paper: 12)."""
    beta: float = field(default=1.0, metadata={"help": "MALoRA init: S_A = β·V, P_i = UΣ/β."})
    """MALoRA initialisation balance β (> 0): S_A = β·V, P_i = (UΣ)_i / β; paper best 1.25."""
    intermediate_rank: int = field(default=16, metadata={"help": "Fed-ALoRA-het shared rank d_m."})
    """Heterogeneous Fed-ALoRA (method ``fedhet``): the intermediate rank d_m shared by all clients (paper: 16)."""
    task_names: list[str] | None = field(
        default=None, metadata={"help": "Task name of each expert (task router)."}
    )
    """With ``router="task"``: the task name of expert i, so tasks can be merged/exported by name."""
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules not to adapt."})
    """Module names or regex that are never adapted."""
    layers_to_transform: list[int] | int | None = field(default=None, metadata={"help": "Layer indexes."})
    """Only adapt these layer indexes (peft semantics)."""
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Layer list name."})
    """Name of the layer list, used with layers_to_transform (peft semantics)."""
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Extra modules to train/save."})
    """Other modules trained fully and saved with the adapter (peft semantics)."""
    target_parameters: list[str] | None = field(default=None, metadata={"help": "Unsupported; keep None."})
    """Not supported by asymlora (peft field kept for its target matching); must stay None."""
    bias: str = field(default="none", metadata={"help": "Only 'none' is supported."})
    """Bias training; only ``"none"`` is supported."""

    def __post_init__(self) -> None:
        # peft validates task_type against its closed enum: check our own key as CAUSAL_LM, then set it back.
        wants_causal = self.task_type in (None, TaskType.CAUSAL_LM, "CAUSAL_LM", TASK_TYPE)
        if wants_causal:
            self.task_type = TaskType.CAUSAL_LM
        super().__post_init__()
        if wants_causal:
            self.task_type = TASK_TYPE
        self.peft_type = PEFT_TYPE
        self._validate()
        if isinstance(self.target_modules, list | tuple | set):
            names = [str(name).strip() for name in self.target_modules]
            if not names or not all(names):
                raise ValueError(
                    f"target_modules={list(self.target_modules)!r} names no module: give module names such as "
                    "['q_proj', 'o_proj'], 'all-linear', or None for peft's default of the architecture"
                )
            self.target_modules = sorted(set(self.target_modules))

    def _validate(self) -> None:
        def bad(name: str, value: object, fix: str) -> ValueError:
            return ValueError(f"AsymLoraConfig.{name}={value!r} is invalid: {fix}")

        if self.method not in METHODS:
            raise bad("method", self.method, f"choose one of {sorted(METHODS)}")
        if self.router not in ROUTERS:
            raise bad("router", self.router, f"choose one of {list(ROUTERS)}")
        if not isinstance(self.r, int) or self.r < 1:
            raise bad("r", self.r, "the rank must be an integer >= 1")
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise bad("num_experts", self.num_experts, "use an integer >= 1")
        if self.router == "topk" and not 1 <= self.top_k <= self.num_experts:
            raise bad("top_k", self.top_k, f"use 1 <= top_k <= num_experts ({self.num_experts})")
        if self.router == "topk" and self.top_k == 1 < self.experts:  # the one kept gate, renormalised, is 1
            raise bad(
                "top_k", 1, "top-1 renormalised leaves a gate of exactly 1, so the router gets no gradient from "
                "the training loss (only from balance_loss_weight); use top_k >= 2 (MoLoRA/MALoRA: 2), "
                "router='soft', or router='task' for hard routing by task",
            )  # fmt: skip
        if not 0.0 <= self.lora_dropout < 1.0:
            raise bad("lora_dropout", self.lora_dropout, "use a probability in [0, 1)")
        # NaN compares False both ways, and an infinite scale makes the output NaN: finite numbers only
        if not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise bad("lora_alpha", self.lora_alpha, "use a finite positive number")
        if not (math.isfinite(self.balance_loss_weight) and self.balance_loss_weight >= 0):
            raise bad("balance_loss_weight", self.balance_loss_weight, "use a finite weight >= 0")
        if self.balance_loss_weight > 0 and self.router == "task":
            raise bad(
                "balance_loss_weight", self.balance_loss_weight, "task routing has nothing to balance; use 0"
            )
        if self.intermediate_rank < 1:
            raise bad("intermediate_rank", self.intermediate_rank, "d_m must be an integer >= 1")
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise bad("beta", self.beta, "use a finite positive number")
        if self.subspace_rank is not None and self.subspace_rank < 1:
            raise bad("subspace_rank", self.subspace_rank, "use an integer >= 1 or None for the default")
        if self.expert_rank is not None and self.expert_rank < 1:
            raise bad("expert_rank", self.expert_rank, "use an integer >= 1 or None for the default")
        if self.method == "malora" and self.malora_subspace_rank > self.num_experts * self.malora_expert_rank:
            raise bad(
                "subspace_rank",
                self.subspace_rank,
                f"d_sub cannot exceed num_experts * expert_rank = {self.num_experts * self.malora_expert_rank}",
            )
        if self.task_names is not None and len(self.task_names) != self.num_experts:
            raise bad("task_names", self.task_names, f"give one name per expert ({self.num_experts})")
        if self.target_parameters:
            raise bad(
                "target_parameters", self.target_parameters, "asymlora adapts modules; use target_modules"
            )
        if self.bias != "none":
            raise bad("bias", self.bias, "only 'none' is supported")

    def task_index(self, task: int | str) -> int:
        """Expert index of a task given by index or by name (see `task_names`)."""
        if isinstance(task, str):
            if not self.task_names or task not in self.task_names:
                raise ValueError(f"unknown task {task!r}; this adapter's tasks are {self.task_names or []}")
            return self.task_names.index(task)
        if not 0 <= task < self.experts:
            raise ValueError(f"task {task} is outside [0, {self.experts}); pass 0..{self.experts - 1}")
        return task

    @property
    def scaling(self) -> float:
        """s = lora_alpha / r."""
        return self.lora_alpha / self.r

    @property
    def experts(self) -> int:
        """Number of experts the method really has (1 for plain LoRA)."""
        return self.num_experts if METHODS[self.method].uses_router else 1

    @property
    def malora_subspace_rank(self) -> int:
        """d_sub = λ·r·N, by default λ = 0.5."""
        return (
            self.subspace_rank if self.subspace_rank is not None else max(1, self.r * self.num_experts // 2)
        )

    @property
    def malora_expert_rank(self) -> int:
        """r̂ = r + (1 − λ)·r with λ = d_sub / (r·N)."""
        if self.expert_rank is not None:
            return self.expert_rank
        return max(1, round(2 * self.r - self.malora_subspace_rank / self.num_experts))
