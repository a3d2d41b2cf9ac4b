"""Adapter tensors of a model as ``dict[str, Tensor]``: the role map and the model <-> state-dict copies.

Keys everywhere are the qualified parameter names of `asymlora.adapter_tensors` (the same on every client,
whatever its rank); roles are the ones each method declares (docs/design.md §4), never parameter-name matches.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from asymlora.methods.base import Role
from asymlora.methods.fedhet import B0_NAME, B1_NAME, B2_NAME
from asymlora.roles import adapter_tensors

__all__ = [
    "RoleMap",
    "TensorInfo",
    "adapter_state",
    "het_groups",
    "layer_groups",
    "load_adapter_state_",
    "role_map",
]


@dataclass(frozen=True)
class TensorInfo:
    """What the federation needs to know about one adapter tensor (no data).

    Attributes:
        name: qualified parameter name: the key in every state dict and message.
        module: qualified name of the adapted layer.
        adapter: peft adapter name.
        method: the adapter method (``lora``, ``fedhet``, ...).
        tensor: the method's name for the tensor (``A``, ``B``, ``M``, ``B0``, ``B1``, ...).
        role: `Role.A`, `Role.B` or `Role.ROUTER`, as declared by the method.
        shape: the tensor's shape on this model (client ranks differ, names do not).
        trainable: False for tensors the method keeps frozen (Fed-ALoRA-het's B0).
    """

    name: str
    module: str
    adapter: str
    method: str
    tensor: str
    role: Role
    shape: tuple[int, ...]
    trainable: bool


RoleMap = dict[str, TensorInfo]
"""Qualified tensor name -> `TensorInfo`, in module order."""


def role_map(model: nn.Module, adapter_name: str | None = None) -> RoleMap:
    """The role map of a model's asymlora tensors (works on meta-device models: only shapes are read)."""
    out: RoleMap = {}
    for t in adapter_tensors(model, adapter_name):
        layer: Any = model.get_submodule(t.module)  # an asymlora tuner layer
        method = layer.asymlora_config[t.adapter].method
        out[t.name] = TensorInfo(
            t.name, t.module, t.adapter, method, t.tensor, t.role, tuple(t.param.shape), t.trainable
        )
    if not out:
        raise ValueError("the model has no asymlora adapter tensors; wrap it with peft.get_peft_model first")
    return out


def layer_groups(roles: RoleMap) -> dict[tuple[str, str], dict[str, str]]:
    """(module, adapter) -> {method's tensor name -> qualified name}, per adapted layer in module order."""
    groups: dict[tuple[str, str], dict[str, str]] = {}
    for n, info in roles.items():
        groups.setdefault((info.module, info.adapter), {})[info.tensor] = n
    return groups


def het_groups(roles: RoleMap) -> dict[tuple[str, str], dict[str, str]]:
    """(module, adapter) -> {B0/B1/B2 tensor name -> qualified name} for every fedhet layer."""
    groups: dict[tuple[str, str], dict[str, str]] = {}
    for n, info in roles.items():
        if info.tensor in (B0_NAME, B1_NAME, B2_NAME):
            groups.setdefault((info.module, info.adapter), {})[info.tensor] = n
    return groups


def adapter_state(model: nn.Module, adapter_name: str | None = None) -> dict[str, Tensor]:
    """Detached copies of every adapter tensor of ``model``, keyed by qualified name."""
    return {t.name: t.param.detach().clone() for t in adapter_tensors(model, adapter_name)}


@torch.no_grad()
def load_adapter_state_(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Copy ``state`` into the model's adapter tensors in place (every key must exist with its shape)."""
    params = {t.name: t.param for t in adapter_tensors(model)}
    for name, value in state.items():
        if name not in params:
            raise KeyError(f"{name!r} is not an adapter tensor of this model")
        if tuple(value.shape) != tuple(params[name].shape):
            raise ValueError(
                f"{name}: shape {tuple(value.shape)} does not match the model's {tuple(params[name].shape)}"
            )
        params[name].copy_(value)
