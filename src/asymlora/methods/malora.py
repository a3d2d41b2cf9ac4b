"""MALoRA: experts share a low-rank subspace of A and spend the saving on a higher B rank
(Wang et al., 2024, arXiv 2410.22782; `docs/design.md §3`).

    y = W0 x + s · Σ_i g_i(x) B_i P_i S_A x

    S_A: d_sub × d_in (shared),  P_i: r̂ × d_sub,  B_i: d_out × r̂ (zero),  W_g: N × d_in

    d_sub = λ·r·N (paper: 32 for N = 8, r = 8),   r̂ = r + (1 − λ)·r (paper: 12)

Initialisation (the paper's method section, "cropped SVD"): the N experts' down-projections are drawn as in
LoRA (Kaiming-uniform K_i, r̂ × d_in each) and decomposed *together*, since one S_A is shared by all experts:
the stack K = [K_1; …; K_N] (N·r̂ × d_in) = U Σ Vᵀ is cropped to its top d_sub singular directions,

    S_A = β · V_dᵀ                      (d_sub × d_in, orthogonal rows of norm β)
    P_i = (U Σ)[rows of block i, :d_sub] / β      (r̂ × d_sub)

so P_i S_A = K_i V_d V_dᵀ: block i of the best rank-d_sub approximation of the *stack* K (Eckart–Young),
i.e. K_i projected onto the shared subspace — not the best rank-d_sub approximation of K_i alone (which would
need a different subspace per expert). β trades the learning speed of S_A (∝ 1/β) against that of the P_i
(∝ β); paper default 1, best 1.25.
Task routing: one product with the shared S_A for the whole batch, then each row's own P_t and B_t
gathered, two batched products (a uniform batch: three plain products, P_t S_A never formed).
Parameters per layer: d_sub·d_in + N·(r̂·d_sub + d_out·r̂) (+ N·d_in for a learned router).
The scaling is alpha / r like the other methods (the paper's alpha = 2·r̂ at r̂ = 12 gives the same s = 2).
"""

from __future__ import annotations

import torch
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


class MALoRA(AdapterMethod):
    name = "malora"

    def specs(self, cfg: MethodConfig, d_in: int, d_out: int) -> dict[str, TensorSpec]:
        n, d_sub, r_hat = cfg.num_experts, cfg.malora_subspace_rank, cfg.malora_expert_rank
        if d_sub > d_in:
            raise ValueError(
                f"subspace_rank={d_sub} exceeds the layer's input size {d_in}; choose subspace_rank <= {d_in}."
            )
        return {
            "S": TensorSpec((d_sub, d_in), Role.A),
            "A": TensorSpec((n, r_hat, d_sub), Role.A, expert_dim=0),  # the P_i
            "B": TensorSpec((n, d_out, r_hat), Role.B, expert_dim=0),
        }

    @torch.no_grad()
    def init_(self, t: dict[str, Tensor], cfg: MethodConfig) -> None:
        n, r_hat, d_sub = t["A"].shape
        d_in = t["S"].shape[1]
        k = kaiming_(torch.empty(n, r_hat, d_in, dtype=torch.float32))  # the N experts' K_i
        s_a, p = cropped_svd_init(k, d_sub, cfg.beta)
        t["S"].copy_(s_a)
        t["A"].copy_(p)
        t["B"].zero_()

    def x_side(self, t):
        return t["S"]  # (d_sub, d_in): the shared subspace

    def combine(self, h: Tensor, t: dict[str, Tensor], gate: Tensor | None) -> Tensor:
        p = t["A"]  # (N, r̂, d_sub)
        h = F.linear(h, p.flatten(0, 1)).unflatten(-1, p.shape[:2])  # (..., N, r̂): P_i S_A x
        u = self.required_gate(gate).unsqueeze(-1) * h
        return F.linear(u.flatten(-2), concat_experts(t["B"]))  # (..., d_out)

    def task_factors(self, t, task):
        return t["A"][task] @ t["S"], t["B"][task]  # (r̂, d_in), (d_out, r̂)

    def task_delta(self, x: Tensor, t: dict[str, Tensor], task: int) -> Tensor:
        h = F.linear(F.linear(x, t["S"]), t["A"][task])  # (..., r̂): P_t S_A x
        return F.linear(h, t["B"][task])  # (..., d_out)

    def routed_delta(self, x: Tensor, t: dict[str, Tensor], task_ids: Tensor) -> Tensor:
        h = rowwise_linear(F.linear(x, t["S"]), t["A"][task_ids])  # (batch, ..., r̂): P_{t_b} S_A x_b
        return rowwise_linear(h, t["B"][task_ids])  # (batch, ..., d_out): B_{t_b} h_b


def cropped_svd_init(k: Tensor, d_sub: int, beta: float) -> tuple[Tensor, Tensor]:
    """MALoRA's shared subspace and coefficients from the experts' initial down-projections.

    Args:
        k: (N, r̂, d_in) the experts' K_i.
        d_sub: rank of the shared subspace, 1 <= d_sub <= min(N·r̂, d_in).
        beta: β > 0; S_A is scaled by β and the P_i by 1/β.

    Returns:
        (S_A (d_sub, d_in), P (N, r̂, d_sub)) with P_i S_A = K_i V_d V_dᵀ, V_d the top-d_sub right singular
        vectors of the stack of all K_i (see the module docstring). Raises ValueError for a bad d_sub.
    """
    n, r_hat, d_in = k.shape
    if not 1 <= d_sub <= min(n * r_hat, d_in):
        raise ValueError(
            f"subspace_rank={d_sub} must be between 1 and min(N·r̂, d_in) = {min(n * r_hat, d_in)}"
        )
    u, sigma, vh = torch.linalg.svd(k.flatten(0, 1), full_matrices=False)  # stack: (N·r̂, d_in)
    s_a = beta * vh[:d_sub]
    p = (u[:, :d_sub] * sigma[:d_sub] / beta).view(n, r_hat, d_sub)
    return s_a, p


register_method(MALoRA())
