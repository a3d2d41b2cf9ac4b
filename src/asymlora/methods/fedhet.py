"""Heterogeneous-rank Fed-ALoRA: a frozen shared B0 plus a per-client low-rank correction
(arXiv 2509.25414, §4.2 "Fed-ALoRA with heterogeneous ranks"; docs/design.md §4).

Client i has its own rank r_i; all clients share an intermediate rank d_m (paper: 16):

    y = W0 x + s_i · (B0 + B2_i B1_i) · M_i A_i x

    A_i:  r_i × d_in   (Kaiming)        M_i:  d_m × r_i  (Kaiming)
    B1_i: r_i × d_m    (Kaiming)        B2_i: d_out × r_i (zero)
    B0:   d_out × d_m  (zero at round 0, frozen while training; the server accumulates into it)

``M_i A_i`` (d_m × d_in) is the client's input side, ``B0 + B2_i B1_i`` (d_out × d_m) its output side: an
ordinary LoRA of rank d_m whose B has one shape for every client whatever its rank. Only B2_i B1_i leaves
the client; the server folds it into B0 (``B0 <- B0 + Σ_k p_k B2_k B1_k``) and every round starts again
from a zero B2 — with a fresh A, M, B1 (the federation's ``het_local="fresh"``) or the client's trained
ones (``"persist"``) — so the adapted model starts each round at the aggregated B0: ΔW = s_i · B0 M_i A_i.
The paper uses alpha_i = 2·r_i, i.e. s_i = 2.

Fused: ``z = M (A x)`` (…, d_m), then ``y = B0 z + B2 (B1 z)``: four thin products, never a d_out × d_in
matrix. Parameters per layer: r·d_in + d_m·r + r·d_m + d_out·r trainable, d_out·d_m frozen.

Tensor names follow the paper: ``A``, ``M``, ``B1``, ``B2`` and the frozen ``B0``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from asymlora.methods.base import AdapterMethod, MethodConfig, Role, TensorSpec, kaiming_, register_method

B0_NAME = "B0"
"""The frozen shared output factor B0 (d_out × d_m), the only tensor the server sends."""
B1_NAME = "B1"
"""The client's inner output factor B1_i (r_i × d_m)."""
B2_NAME = "B2"
"""The client's outer output factor B2_i (d_out × r_i), stored under the method tensor name ``B``."""
M_NAME = "M"
"""The client's intermediate projection M_i (d_m × r_i)."""


class FedHet(AdapterMethod):
    name = "fedhet"
    uses_router = False

    def specs(self, cfg: MethodConfig, d_in: int, d_out: int) -> dict[str, TensorSpec]:
        r, d_m = cfg.r, cfg.intermediate_rank
        if d_m < 1:
            raise ValueError(f"intermediate_rank (d_m) must be >= 1, got {d_m}")
        return {
            "A": TensorSpec((r, d_in), Role.A),
            M_NAME: TensorSpec((d_m, r), Role.A),
            B1_NAME: TensorSpec((r, d_m), Role.B),
            B2_NAME: TensorSpec((d_out, r), Role.B),
            B0_NAME: TensorSpec((d_out, d_m), Role.B, trainable=False),
        }

    def init_(self, t: dict[str, Tensor], cfg: MethodConfig) -> None:
        kaiming_(t["A"])
        kaiming_(t[M_NAME])
        kaiming_(t[B1_NAME])
        t[B2_NAME].zero_()
        t[B0_NAME].zero_()

    def x_side(self, t):
        return t["A"]  # (r, d_in)

    def combine(self, h: Tensor, t: dict[str, Tensor], gate: Tensor | None) -> Tensor:
        z = F.linear(h, t[M_NAME])  # (..., r) -> (..., d_m): M A x
        inner = F.linear(F.linear(z, t[B1_NAME]), t[B2_NAME])  # (..., r) -> (..., d_out): B2 B1 z
        return F.linear(z, t[B0_NAME]) + inner  # (..., d_out): (B0 + B2 B1) z

    def task_factors(self, t, task):
        # The equivalent plain LoRA of rank d_m: A' = M A (d_m × d_in), B' = B0 + B2 B1 (d_out × d_m).
        return t[M_NAME] @ t["A"], t[B0_NAME] + t[B2_NAME] @ t[B1_NAME]


register_method(FedHet())
