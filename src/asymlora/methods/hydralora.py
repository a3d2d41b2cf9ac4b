"""HydraLoRA: one shared A, several B heads, a router (Tian et al., NeurIPS 2024, arXiv 2404.19245).

    y = W0 x + s · Σ_i g_i(x) B_i A x

    A: r × d_in (Kaiming),  B_i: d_out × r (zero),  W_g: N × d_in

Fused: the gated rank-r projections of all heads form one (…, N·r) vector, multiplied once by the
concatenated [B_1 … B_N] (d_out × N·r).
Task routing: one product with the shared A for the whole batch, then each row's own head,
B[task_ids] (batch, d_out, r), in one batched product.
Parameters per layer: r·d_in + N·r·d_out (+ N·d_in for a learned router).
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


def concat_experts(b: Tensor) -> Tensor:
    """(N, d_out, r) -> [B_1 … B_N] as (d_out, N·r), matching a (…, N, r) input flattened on its last 2 axes."""
    return b.transpose(0, 1).flatten(1)


class HydraLoRA(AdapterMethod):
    name = "hydralora"

    def specs(self, cfg: MethodConfig, d_in: int, d_out: int) -> dict[str, TensorSpec]:
        n, r = cfg.num_experts, cfg.r
        return {"A": TensorSpec((r, d_in), Role.A), "B": TensorSpec((n, d_out, r), Role.B, expert_dim=0)}

    def init_(self, t: dict[str, Tensor], cfg: MethodConfig) -> None:
        kaiming_(t["A"])
        t["B"].zero_()

    def x_side(self, t):
        return t["A"]  # (r, d_in)

    def combine(self, h: Tensor, t: dict[str, Tensor], gate: Tensor | None) -> Tensor:
        u = self.required_gate(gate).unsqueeze(-1) * h.unsqueeze(-2)  # (..., N, r): g_i A x
        return F.linear(u.flatten(-2), concat_experts(t["B"]))  # (..., d_out)

    def task_factors(self, t, task):
        return t["A"], t["B"][task]

    def routed_delta(self, x: Tensor, t: dict[str, Tensor], task_ids: Tensor) -> Tensor:
        h = F.linear(x, t["A"])  # (batch, ..., r): the shared A x
        return rowwise_linear(h, t["B"][task_ids])  # (batch, ..., d_out): B_{t_b} h_b


register_method(HydraLoRA())
