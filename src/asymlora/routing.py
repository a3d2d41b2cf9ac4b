"""Routers: the per-token gate g(x) ∈ R^N that mixes an adapter's experts (DESIGN.md §3).

- ``soft``: g = softmax(W_g x), dense (ALoRA and HydraLoRA papers; no balance loss by default).
- ``topk``: keep the k largest of softmax(W_g x), renormalise to sum 1 (MoLoRA/MALoRA: top-2 of 8).
- ``task``: g = one_hot(task_id) of the example the token belongs to (N = number of tasks); each task's
  adapter is then an ordinary LoRA and can be merged or exported.

Logits and gates are computed in float32 (or float64 for a float64 model) whatever the model dtype.
Balance loss (Switch Transformer, Fedus et al. 2021): L = N · Σ_i f_i · P_i, f_i the fraction of tokens
whose top-1 expert is i and P_i the mean router probability of expert i; 1 when perfectly balanced.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

ROUTERS = ("soft", "topk", "task")


def router_probs(x: Tensor, weight: Tensor) -> Tensor:
    """softmax(W_g x) in float32 (float64 stays float64). x: (..., d_in), weight: (N, d_in) -> (..., N)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    return F.linear(x.to(dtype), weight.to(dtype)).softmax(-1)


def topk_gate(probs: Tensor, k: int) -> Tensor:
    """Zero all but the k largest probabilities per token and renormalise. (..., N) -> (..., N)."""
    top, idx = probs.topk(k, dim=-1)
    return torch.zeros_like(probs).scatter(-1, idx, top / top.sum(-1, keepdim=True))


def task_gate(task_ids: Tensor, num_experts: int, x: Tensor) -> Tensor:
    """One-hot gate per example, broadcast over the token axes of x.

    task_ids: (batch,); x: (batch', ..., d_in) where batch' is a multiple of batch (generation with several
    return sequences or beams repeats each example consecutively). Returns (batch', 1, ..., 1, N).
    """
    if x.dim() < 2:
        raise ValueError("task routing needs a batched input (batch, ..., features)")
    batch = x.shape[0]
    if batch != task_ids.shape[0]:
        if batch % task_ids.shape[0]:
            raise ValueError(
                f"task_ids has {task_ids.shape[0]} entries but the batch has {batch} rows; "
                "pass one task id per example."
            )
        task_ids = task_ids.repeat_interleave(batch // task_ids.shape[0])
    gate = F.one_hot(task_ids.to(x.device), num_experts).float()  # (batch, N)
    return gate.view(batch, *([1] * (x.dim() - 2)), num_experts)


def balance_loss(probs: Tensor) -> Tensor:
    """Switch-Transformer load-balancing loss N · Σ_i f_i P_i over all tokens. probs: (..., N)."""
    n = probs.shape[-1]
    flat = probs.reshape(-1, n)
    f = F.one_hot(flat.argmax(-1), n).float().mean(0)  # fraction of tokens routed (top-1) to each expert
    p = flat.mean(0)  # mean router probability per expert
    return n * (f * p).sum()


@dataclass
class RoutingState:
    """Per-forward routing inputs and outputs shared by all adapted layers of one model.

    Set by `routing` for the duration of a forward/generate call: `task_ids` for task routing; layers
    append their balance losses to `aux_losses` when `collect_aux` is on.
    """

    task_ids: Tensor | None = None
    collect_aux: bool = False
    aux_losses: list[Tensor] = field(default_factory=list)


@contextmanager
def routing(state: RoutingState, task_ids: Tensor | None, collect_aux: bool) -> Iterator[RoutingState]:
    """Make `task_ids` visible to the layers and collect balance losses during one call."""
    saved = (state.task_ids, state.collect_aux, state.aux_losses)
    state.task_ids, state.collect_aux, state.aux_losses = task_ids, collect_aux, []
    try:
        yield state
    finally:
        state.task_ids, state.collect_aux, state.aux_losses = saved
