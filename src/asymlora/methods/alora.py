"""ALoRA: several A matrices, one shared B, a router (arXiv 2509.25414, §4.1).

The paper finds that the similarity of A matrices across tasks comes from their shared initialisation,
while B carries the task knowledge; so ALoRA gives each expert its own, independently initialised A and
shares a single B:

    y = W0 x + s · B Σ_i g_i(x) A_i x,      g(x) = router(x) ∈ R^N

    A_i: r × d_in (each its own Kaiming draw),  B: d_out × r (zero),  W_g: N × d_in

Fused: the N A's are one (N·r) × d_in matrix; one product gives every expert's projection, the gate mixes
them on the rank axis, and a single product with B follows (the released code does N products with B).
Task routing (g = one_hot(t_b) for row b) computes only each row's own A:
A_sel = A[task_ids] (batch, r, d_in), one batched product, then one product with the shared B for the whole
batch.
Parameters per layer: N·r·d_in + r·d_out (+ N·d_in for a learned router).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from asymlora.methods.base import (
    AdapterMethod,
    MethodConfig,
    Role,
    TensorSpec,
    kaiming_,
    register_method,
    rowwise_linear,
)


class ALoRA(AdapterMethod):
    name = "alora"

    def specs(self, cfg: MethodConfig, d_in: int, d_out: int) -> dict[str, TensorSpec]:
        n, r = cfg.num_experts, cfg.r
        return {"A": TensorSpec((n, r, d_in), Role.A, expert_dim=0), "B": TensorSpec((d_out, r), Role.B)}

    def init_(self, t: dict[str, Tensor], cfg: MethodConfig) -> None:
        kaiming_(t["A"])  # one independent draw per expert
        t["B"].zero_()

    def x_side(self, t):
        return t["A"].flatten(0, 1)  # (N·r, d_in): all experts' A in one matrix

    def combine(self, h: Tensor, t: dict[str, Tensor], gate: Tensor | None) -> Tensor:
        h = h.unflatten(-1, t["A"].shape[:2])  # (..., N, r): A_i x for every i
        z = (self.required_gate(gate).unsqueeze(-1) * h).sum(-2)  # (..., r): Σ_i g_i A_i x
        return F.linear(z, t["B"])  # (..., d_out): one product with the shared B

    def task_factors(self, t, task):
        return t["A"][task], t["B"]

    def routed_delta(self, x: Tensor, t: dict[str, Tensor], task_ids: Tensor) -> Tensor:
        z = rowwise_linear(x, t["A"][task_ids])  # (batch, ..., r): A_{t_b} x_b, A gathered (batch, r, d_in)
        return F.linear(z, t["B"])  # (batch, ..., d_out): one product with the shared B


register_method(ALoRA())
