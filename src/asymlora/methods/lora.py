"""Plain LoRA (Hu et al., 2021, arXiv 2106.09685), the single-expert baseline.

    y = W0 x + s · B A x,        A: r × d_in (Kaiming),  B: d_out × r (zero),  s = alpha / r

Parameters per layer: r · (d_in + d_out).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from asymlora.methods.base import AdapterMethod, MethodConfig, Role, TensorSpec, kaiming_, register_method


class LoRA(AdapterMethod):
    name = "lora"
    uses_router = False

    def specs(self, cfg: MethodConfig, d_in: int, d_out: int) -> dict[str, TensorSpec]:
        return {"A": TensorSpec((cfg.r, d_in), Role.A), "B": TensorSpec((d_out, cfg.r), Role.B)}

    def init_(self, t: dict[str, Tensor], cfg: MethodConfig) -> None:
        kaiming_(t["A"])
        t["B"].zero_()

    def x_side(self, t):
        return t["A"]  # (r, d_in)

    def combine(self, h: Tensor, t: dict[str, Tensor], gate: Tensor | None) -> Tensor:
        return F.linear(h, t["B"])  # (..., r) -> (..., d_out)

    def task_factors(self, t, task):
        return t["A"], t["B"]


register_method(LoRA())
