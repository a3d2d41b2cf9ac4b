"""The contract every adapter method fulfils, and the parameter roles it declares.

A *method* is the math of one adapter family (LoRA, ALoRA, HydraLoRA, MoLoRA, MALoRA): which tensors it
owns (with shapes and roles), how they are initialised, and the fused forward of the adapter path
``delta(x) = Σ_i g_i(x) · B_i A_i x`` (before the scaling ``s = alpha / r``). The peft layer in
``asymlora.tuner.layer`` stores the tensors and calls the method; nothing else knows a method's layout.

Roles are declared here once (``TensorSpec.role``) and read by training, federation, saving and analysis
through ``asymlora.roles``; nobody matches parameter names by substring.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import StrEnum
from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Role(StrEnum):
    """What part of the low-rank update a tensor is."""

    A = "A"
    """Input side: reads the layer input (LoRA's A, MALoRA's shared subspace S_A and its P_i)."""
    B = "B"
    """Output side: writes the layer output (LoRA's B; Fed-ALoRA shares exactly these)."""
    ROUTER = "router"
    """The gate W_g (N × d_in) that mixes the experts per token."""


# Every tensor name any method may use, in one place. The layer keeps one ParameterDict per name,
# ``asymlora_<name>``, keyed by adapter name (peft's convention).
TENSOR_NAMES: tuple[str, ...] = ("S", "A", "M", "B", "B0", "B1", "B2", "router")
ATTR_PREFIX = "asymlora_"


@dataclass(frozen=True)
class TensorSpec:
    """Shape and role of one adapter tensor of one layer.

    Attributes:
        shape: the stored shape.
        role: which side of the update it is (see `Role`).
        expert_dim: the axis that indexes experts (0 for stacked tensors), or None for a tensor shared by
            all experts.
        trainable: False for tensors that stay frozen while training.
    """

    shape: tuple[int, ...]
    role: Role
    expert_dim: int | None = None
    trainable: bool = True


def kaiming_(t: Tensor) -> Tensor:
    """LoRA's A init, Kaiming-uniform with a = √5, applied per 2-D slice so each expert gets its own draw
    with the fan-in of one expert (torch would count the stacked dimensions into the fan-in)."""
    if t.dim() == 2:
        return nn.init.kaiming_uniform_(t, a=math.sqrt(5))
    for piece in t.view(-1, *t.shape[-2:]):
        nn.init.kaiming_uniform_(piece, a=math.sqrt(5))
    return t


def rowwise_linear(x: Tensor, w: Tensor) -> Tensor:
    """Each row through its own matrix: y_b = x_b W_bᵀ. x: (batch, ..., k), w: (batch, m, k) -> (batch, ..., m).

    One batched matmul (torch.bmm) over the rows, the token axes flattened in between."""
    y = torch.bmm(x.reshape(x.shape[0], -1, x.shape[-1]), w.transpose(1, 2))  # (batch, tokens, m)
    return y.view(*x.shape[:-1], w.shape[1])


class MethodConfig(Protocol):
    """The hyper-parameters a method reads to lay out and initialise its tensors (docs/design.md §3).

    :class:`asymlora.tuner.config.AsymLoraConfig` satisfies it; methods depend on this protocol only, so
    the method layer imports nothing from the tuner or from peft.
    """

    @property
    def r(self) -> int:
        """LoRA rank of each expert."""
        ...

    @property
    def num_experts(self) -> int:
        """Number of experts N."""
        ...

    @property
    def intermediate_rank(self) -> int:
        """Fed-ALoRA-het's shared rank d_m."""
        ...

    @property
    def malora_subspace_rank(self) -> int:
        """MALoRA's shared subspace rank d_sub."""
        ...

    @property
    def malora_expert_rank(self) -> int:
        """MALoRA's per-expert rank r̂."""
        ...

    @property
    def beta(self) -> float:
        """MALoRA's init scale β (S_A = β·V, P_i = UΣ/β)."""
        ...


class AdapterMethod(ABC):
    """One adapter family. Subclasses are stateless; tensors live in the peft layer."""

    name: ClassVar[str]
    uses_router: ClassVar[bool] = True
    """False for plain LoRA (one expert, nothing to route)."""

    @abstractmethod
    def specs(self, cfg: MethodConfig, d_in: int, d_out: int) -> dict[str, TensorSpec]:
        """The tensors of one adapted layer, router excluded (the layer adds it when routing is learned)."""

    @abstractmethod
    def init_(self, t: dict[str, Tensor], cfg: MethodConfig) -> None:
        """Initialise the tensors in place (A-side random, B-side zero: the model starts as the base)."""

    def x_side(self, t: dict[str, Tensor]) -> Tensor | None:
        """The matrix (k × d_in) that multiplies the layer input first, or None if the method has none.

        Methods that have one implement `combine`; the layer may then fuse the router's product with it
        (one pass over x for both, docs/design.md §3 "fused computation")."""
        return None

    def combine(self, h: Tensor, t: dict[str, Tensor], gate: Tensor | None) -> Tensor:
        """The rest of the adapter path, from h = x · x_sideᵀ (..., k) to (..., d_out)."""
        raise NotImplementedError

    def delta(self, x: Tensor, t: dict[str, Tensor], gate: Tensor | None) -> Tensor:
        """Fused adapter path before scaling. x: (..., d_in); gate: (..., N) broadcastable, or None."""
        side = self.x_side(t)
        if side is None:
            raise NotImplementedError(f"method {self.name!r} has no x_side matrix, so it must override delta")
        return self.combine(F.linear(x, side), t, gate)

    def required_gate(self, gate: Tensor | None) -> Tensor:
        """``gate`` itself; ValueError when a method that mixes experts is called without one."""
        if gate is None:
            raise ValueError(
                f"method {self.name!r} mixes its experts with the router's gate (..., N), but the gate is None; "
                "pass the gate, or use task_delta / routed_delta for task routing"
            )
        return gate

    @abstractmethod
    def task_factors(self, t: dict[str, Tensor], task: int) -> tuple[Tensor, Tensor]:
        """(A_t, B_t) with ΔW_t = s · B_t A_t: the plain LoRA that expert/task ``task`` amounts to."""

    def task_delta(self, x: Tensor, t: dict[str, Tensor], task: int) -> Tensor:
        """Adapter path of one task for the whole batch: delta(x) = B_t A_t x (before scaling).

        x: (..., d_in) -> (..., d_out). Equals `delta` with the one-hot gate of ``task`` (router="task",
        docs/design.md §3), computing only that expert: two thin products."""
        a, b = self.task_factors(t, task)  # (r, d_in), (d_out, r)
        return F.linear(F.linear(x, a), b)

    def routed_delta(self, x: Tensor, t: dict[str, Tensor], task_ids: Tensor) -> Tensor:
        """Adapter path with a task per row: delta(x)_b = B_{t_b} A_{t_b} x_b (before scaling).

        x: (batch, ..., d_in); task_ids: (batch,) long, on x's device -> (batch, ..., d_out). Equals `delta`
        with the one-hot gate of task_ids (router="task") without computing the other N − 1 experts.
        This default gathers each row's `task_factors`; the methods override it with a gather of their
        stacked expert tensors (`tensor[task_ids]`) and batched products."""
        pairs = [self.task_factors(t, i) for i in task_ids.tolist()]
        a = torch.stack([p[0] for p in pairs])  # (batch, r, d_in)
        b = torch.stack([p[1] for p in pairs])  # (batch, d_out, r)
        return rowwise_linear(rowwise_linear(x, a), b)

    def num_experts(self, cfg: MethodConfig) -> int:
        return cfg.num_experts if self.uses_router else 1

    def expert_factors(self, t: dict[str, Tensor], num_experts: int) -> list[tuple[Tensor, Tensor]]:
        """[(A_i, B_i)] for every expert i, each an ordinary LoRA pair (for analysis and export)."""
        return [self.task_factors(t, i) for i in range(num_experts)]


METHODS: dict[str, AdapterMethod] = {}


def register_method(method: AdapterMethod) -> AdapterMethod:
    """Make a method available to `AsymLoraConfig(method=...)`."""
    METHODS[method.name] = method
    return method


def get_method(name: str) -> AdapterMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(
            f"Unknown adapter method {name!r}; choose one of {sorted(METHODS)} (AsymLoraConfig.method)."
        ) from None
