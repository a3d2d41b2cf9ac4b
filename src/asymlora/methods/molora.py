"""MoLoRA: a mixture of N full LoRA experts (Zadouri et al., 2023, arXiv 2309.05444).

    y = W0 x + s · Σ_i g_i(x) B_i A_i x

    A_i: r × d_in (Kaiming),  B_i: d_out × r (zero),  W_g: N × d_in   (top-2 routing in the paper)

Fused: one product with the stacked A's (N·r × d_in), the gate on the rank axis, one product with the
concatenated B's (d_out × N·r).
Task routing: each row's own A_t and B_t gathered ((batch, r, d_in), (batch, d_out, r)), two batched
products.
Parameters per layer: N·r·(d_in + d_out) (+ N·d_in for a learned router).
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
from asymlora.methods.hydralora import concat_experts


class MoLoRA(AdapterMethod):
    name = "molora"

    def specs(self, cfg: MethodConfig, d_in: int, d_out: int) -> dict[str, TensorSpec]:
        n, r = cfg.num_experts, cfg.r
        return {
            "A": TensorSpec((n, r, d_in), Role.A, expert_dim=0),
            "B": TensorSpec((n, d_out, r), Role.B, expert_dim=0),
        }

    def init_(self, t: dict[str, Tensor], cfg: MethodConfig) -> None:
        kaiming_(t["A"])
        t["B"].zero_()

    def x_side(self, t):
        return t["A"].flatten(0, 1)  # (N·r, d_in)

    def combine(self, h: Tensor, t: dict[str, Tensor], gate: Tensor | None) -> Tensor:
        u = self.required_gate(gate).unsqueeze(-1) * h.unflatten(
            -1, t["A"].shape[:2]
        )  # (..., N, r): g_i A_i x
        return F.linear(u.flatten(-2), concat_experts(t["B"]))  # (..., d_out)

    def task_factors(self, t, task):
        return t["A"][task], t["B"][task]

    def routed_delta(self, x: Tensor, t: dict[str, Tensor], task_ids: Tensor) -> Tensor:
        h = rowwise_linear(x, t["A"][task_ids])  # (batch, ..., r): A_{t_b} x_b
        return rowwise_linear(h, t["B"][task_ids])  # (batch, ..., d_out): B_{t_b} h_b


register_method(MoLoRA())
