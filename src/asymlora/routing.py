"""Routers: the per-token gate g(x) ∈ R^N that mixes an adapter's experts (docs/design.md §3).

- ``soft``: g = softmax(W_g x), dense (ALoRA and HydraLoRA papers; no balance loss by default).
- ``topk``: keep the k largest of softmax(W_g x), renormalise to sum 1 (MoLoRA/MALoRA: top-2 of 8).
- ``task``: g = one_hot(task_id) of the example the token belongs to (N = number of tasks); each task's
  adapter is then an ordinary LoRA and can be merged or exported.

Logits and gates are computed in float32 (or float64 for a float64 model) whatever the model dtype.
Balance loss (Switch Transformer, Fedus et al. 2021): L = N · Σ_i f_i · P_i, f_i the fraction of tokens
whose top-1 expert is i and P_i the mean router probability of expert i, both over the real tokens of
the batch (attention mask); 1 when perfectly balanced.

Per-call inputs (task ids, attention mask) reach the layers through a `RoutingCall`; `bind_to_checkpoints`
keeps it visible to checkpointed layers recomputed in backward, and the balance terms reach their routers
through the layers' own outputs (`attach_balance_loss`), so gradient checkpointing changes no value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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

    task_ids: (batch,); x: (batch, ..., d_in). Returns (batch, 1, ..., 1, N).
    Raises ValueError when the two batch sizes differ.
    """
    if x.dim() < 2:
        raise ValueError("task routing needs a batched input (batch, ..., features)")
    batch = x.shape[0]
    if batch != task_ids.shape[0]:
        raise ValueError(
            f"task_ids has {task_ids.shape[0]} entries but the batch has {batch} rows; "
            "pass one task id per example."
        )
    gate = F.one_hot(task_ids.to(x.device), num_experts).float()  # (batch, N)
    return gate.view(batch, *([1] * (x.dim() - 2)), num_experts)


def balance_loss(probs: Tensor, mask: Tensor | None = None) -> Tensor:
    """Switch-Transformer load-balancing loss N · Σ_i f_i P_i over the real tokens.

    probs: (..., N) router probabilities; mask: bool/0-1 tensor of probs' shape without the last axis
    (True = real token, False = padding), or None for all tokens. f_i is the fraction of real tokens whose
    top-1 expert is i, P_i the mean probability of expert i over the real tokens. 0 when no token is real.
    """
    n = probs.shape[-1]
    flat = probs.reshape(-1, n)
    w = flat.new_ones(flat.shape[0]) if mask is None else mask.reshape(-1).to(flat.dtype)  # (tokens,)
    count = w.sum().clamp_min(1.0)
    f = (F.one_hot(flat.argmax(-1), n).to(flat.dtype) * w[:, None]).sum(0) / count  # top-1 fractions
    p = (flat * w[:, None]).sum(0) / count  # mean router probability per expert
    return n * (f * p).sum()


@dataclass(eq=False)
class RoutingCall:
    """Routing inputs and outputs of one forward or generate call of the whole model.

    task_ids: LongTensor[batch] for task routing. attention_mask: (batch, seq) with 1 on real tokens, so the
    balance loss skips padding. repeat_rows: generate only, where each example is repeated consecutively for
    beams / return sequences (the layers then see k·batch rows). collect_aux: layers compute balance losses;
    while the call is `open` (its forward is running) they append them to `aux_losses`. A checkpointed layer
    recomputed during backward runs after the call has closed: it sees the same inputs and computes the same
    tensors, but adds nothing to `aux_losses`. aux_grad: d(loss)/d(each balance term), set in backward
    by `add_balance_loss` and read by `attach_balance_loss`.
    """

    task_ids: Tensor | None = None
    attention_mask: Tensor | None = None
    repeat_rows: bool = False
    collect_aux: bool = False
    open: bool = True
    aux_losses: list[Tensor] = field(default_factory=list)
    aux_grad: Tensor | None = None
    _rows: dict[tuple[int, torch.device, bool], tuple[Tensor, int | None]] = field(
        default_factory=dict, repr=False
    )

    def task_rows(
        self, batch: int, device: torch.device, flat_tokens: bool = False
    ) -> tuple[Tensor, int | None] | None:
        """(task id of each of `batch` rows on `device`, the one task when every row has it, else None), or
        None without task ids. Computed once per call, batch size, device and layout (every adapted layer
        asks). Raises ValueError on a size mismatch (see `task_ids_for`, also for ``flat_tokens``)."""
        key = (batch, device, flat_tokens)
        if key not in self._rows:
            ids = self.task_ids_for(batch, flat_tokens)
            if ids is None:
                return None
            ids = ids.to(device)
            uniform = ids.numel() > 0 and bool((ids == ids[0]).all())
            self._rows[key] = ids, int(ids[0]) if uniform else None
        return self._rows[key]

    def task_ids_for(self, batch: int, flat_tokens: bool = False) -> Tensor | None:
        """Task id of each of `batch` rows. Raises on a size mismatch.

        Each example's id is repeated over consecutive rows in generate (beams / return sequences) and, with
        ``flat_tokens``, in a layer that sees the tokens flattened to (batch·seq, d) (OPT's MLP)."""
        ids = self.task_ids
        if ids is None or ids.shape[0] == batch:
            return ids
        if (self.repeat_rows or flat_tokens) and ids.shape[0] and batch % ids.shape[0] == 0:
            return ids.repeat_interleave(batch // ids.shape[0])
        raise ValueError(
            f"task_ids has {ids.shape[0]} entries but the batch has {batch} rows; pass one task id per example."
        )

    def token_mask(self, x: Tensor) -> Tensor | None:
        """Real-token mask (batch, seq) for hidden states x (batch, seq, d), or None (all tokens count).

        With a KV cache the mask covers past and new tokens: its last `seq` columns belong to x. A layer that
        sees the tokens flattened to (batch·seq, d) (OPT's MLP) gets the mask flattened the same way,
        (batch·seq,); flattened rows that are no whole number of tokens per example get None."""
        mask = self.attention_mask
        if mask is None or mask.dim() != 2 or x.dim() not in (2, 3):
            return None
        if x.dim() == 2:
            rows, batch = x.shape[0], mask.shape[0]
            if batch == 0 or rows % batch or rows // batch > mask.shape[1]:
                return None
            return mask[:, mask.shape[1] - rows // batch :].reshape(-1).to(device=x.device, dtype=torch.bool)
        if mask.shape[0] != x.shape[0] or mask.shape[1] < x.shape[1]:
            raise ValueError(
                f"attention_mask of shape {tuple(mask.shape)} does not fit hidden states of shape "
                f"{tuple(x.shape)}; pass one mask row per example covering every token."
            )
        return mask[:, mask.shape[1] - x.shape[1] :].to(device=x.device, dtype=torch.bool)


@dataclass
class RoutingState:
    """The routing call in progress, shared by all adapted layers of one model (None outside any call)."""

    call: RoutingCall | None = None


@contextmanager
def routing(state: RoutingState, call: RoutingCall) -> Iterator[RoutingCall]:
    """Make `call` visible to the layers for one forward/generate; closes it on exit."""
    saved, state.call = state.call, call
    try:
        yield call
    finally:
        call.open = False
        state.call = saved


@contextmanager
def bound(state: RoutingState, call: RoutingCall | None) -> Iterator[None]:
    """Make `call` visible again, without closing it (checkpoint recomputation of one of its layers)."""
    saved, state.call = state.call, call
    try:
        yield
    finally:
        state.call = saved


def _run_bound(state: RoutingState, call: RoutingCall | None, function: Callable, *args, **kwargs):
    with bound(state, call):
        return function(*args, **kwargs)


def bind_to_checkpoints(model: nn.Module, state: RoutingState) -> None:
    """Bind each checkpointed layer call to the routing call in progress (transformers' checkpointing).

    transformers runs a checkpointed layer as ``module._gradient_checkpointing_func(forward, *args)``, and
    runs ``forward`` again during backward, after the model's forward has returned. The wrapper installed
    here captures the routing call when the layer is entered and makes it visible whenever ``forward`` runs,
    first time or recomputation, reentrant or not. Idempotent; re-wraps after checkpointing is re-enabled.
    """
    for module in model.modules():
        inner = getattr(module, "_gradient_checkpointing_func", None)
        if inner is None or getattr(inner, "_asymlora_state", None) is state:
            continue

        def checkpointed(function: Callable, *args, _inner=inner, **kwargs):
            return _inner(partial(_run_bound, state, state.call, function), *args, **kwargs)

        checkpointed._asymlora_state = state  # type: ignore[attr-defined]
        # setattr: nn.Module's stub types attributes as Tensor | Module, this one is a function.
        setattr(module, "_gradient_checkpointing_func", checkpointed)  # noqa: B010


class _AttachBalanceLoss(torch.autograd.Function):
    """Identity on the gate; in backward, also sends d(loss)/d(aux) into the balance term ``aux``.

    The balance loss thus reaches its router through the layer's own output, so it is differentiated inside
    a checkpointed layer like everything else (Megatron-LM's MoEAuxLossAutoScaler does the same for MoE)."""

    @staticmethod
    def forward(ctx, gate: Tensor, aux: Tensor, call: RoutingCall) -> Tensor:
        ctx.call, ctx.aux_dtype = call, aux.dtype
        return gate.view_as(gate)

    @staticmethod
    def backward(ctx, grad: Tensor):
        g = ctx.call.aux_grad  # None when the loss being differentiated does not hold the balance loss
        return grad, None if g is None else g.detach().to(ctx.aux_dtype), None


def attach_balance_loss(gate: Tensor, aux: Tensor, call: RoutingCall) -> Tensor:
    """Record balance term ``aux`` (a scalar) for `call` and return the gate carrying its gradient path."""
    if call.open:
        call.aux_losses.append(aux.detach())
    return _AttachBalanceLoss.apply(gate, aux, call)


class _AddBalanceLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, loss: Tensor, aux: Tensor, call: RoutingCall, terms: int) -> Tensor:
        ctx.call, ctx.terms = call, terms
        return loss + aux

    @staticmethod
    def backward(ctx, grad: Tensor):
        ctx.call.aux_grad = grad / ctx.terms  # the loss holds the mean of `terms` balance terms
        return grad, None, None, None


def add_balance_loss(loss: Tensor, call: RoutingCall) -> tuple[Tensor, Tensor]:
    """(loss + mean balance term, that mean) for a call that collected balance terms.

    The sum's backward hands d(loss)/d(term) to the layers' `attach_balance_loss` nodes, which run later in
    the same backward (they lie upstream of the loss), so gradient checkpointing and loss scaling (e.g.
    loss / accumulation_steps) give the router the same gradient as ``loss + mean(terms)`` would."""
    aux = torch.stack([a.to(loss.device, loss.dtype) for a in call.aux_losses]).mean()
    return _AddBalanceLoss.apply(loss, aux, call, len(call.aux_losses)), aux
