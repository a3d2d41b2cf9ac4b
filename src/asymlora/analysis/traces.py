"""Training-time traces: how far A moved from its initialisation, how large B grew, and the DoRA-style
magnitude/direction change of the adapted weights, per adapted layer, every K steps (docs/design.md §5).

    recorder = TraceRecorder(model, run_dir / "traces.jsonl", every=10)   # snapshot A before training
    for step in range(1, steps + 1):
        ...optimizer.step()...
        recorder(step, loss=loss.item())            # records when step % every == 0

Each record is one JSON line:

    {"step": 10, "time": 1712.3, "adapter": "default",
     "mean": {"A_rel_change": …, "B_norm": …, "delta_M": …, "delta_D": …},
     "layers": [{"module": "model.layers.0.self_attn.q_proj", "method": "alora", "num_experts": 3,
                 "A_rel_change": …, "A_rel_change_experts": [...], "B_norm": …, "B_norm_experts": [...],
                 "delta_M": …, "delta_D": …, "delta_M_experts": [...], "delta_D_experts": [...]}, …],
     …extra keys given to record()}

with module names as in the base model (peft's ``base_model.model.`` prefix dropped) and, per layer (all
norms Frobenius):

    A_rel_change = ‖A − A_init‖ / ‖A_init‖          over all A-role tensors of the layer together
    A_rel_change_experts[i] = ‖A_i − A_i,init‖ / ‖A_i,init‖   of each expert's effective A_i
    B_norm = ‖B‖ over all B-role tensors;  B_norm_experts[i] = ‖B_i‖
    delta_M, delta_D = mean over experts i of ΔM, ΔD of W0 + s·B_i A_i against W0 (see
    `metrics.magnitude_direction_change`)

asymlora layers (roles from `asymlora.roles.adapter_tensors`, expert factors from the method) and plain
peft LoRA layers (``peft.tuners.lora.LoraLayer`` with linear factors) are both traced.
`asymlora.analysis.figures.plot_traces` draws a trace file.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from asymlora.analysis.factors import PEFT_KEY_PREFIX
from asymlora.analysis.metrics import magnitude_direction_change
from asymlora.methods import Role, get_method
from asymlora.roles import adapter_tensors
from asymlora.tuner.layer import dequantized_weight

TRACES_FILE = "traces.jsonl"
"""File name of the training traces in a run directory (``train.trace_every``)."""

__all__ = ["TraceRecorder", "read_traces", "snapshot_a"]


@dataclass
class _Layer:
    """One traced (layer, adapter): how to get its current tensors and expert factors."""

    module: str
    adapter: str
    method: str
    layer: Any  # an AsymLoraLayer or a peft LoraLayer: per-adapter attributes are set at run time
    a_names: dict[str, str]  # qualified parameter name -> method tensor name (A role)
    b_names: dict[str, str]  # qualified parameter name -> method tensor name (B role)
    params: dict[str, Tensor]  # qualified parameter name -> parameter
    peft_lora: bool

    def tensors(self) -> dict[str, Tensor]:
        if self.peft_lora:
            return {"A": self.layer.lora_A[self.adapter].weight, "B": self.layer.lora_B[self.adapter].weight}
        return self.layer.tensors(self.adapter)

    def factors(self, tensors: Mapping[str, Tensor]) -> list[tuple[Tensor, Tensor]]:
        if self.peft_lora:
            return [(tensors["A"], tensors["B"])]
        cfg = self.layer.asymlora_config[self.adapter]
        method = get_method(cfg.method)
        return method.expert_factors(dict(tensors), method.num_experts(cfg))

    def scaling(self) -> float:
        if self.peft_lora:
            return float(self.layer.scaling[self.adapter])
        return float(self.layer.asymlora_config[self.adapter].scaling)

    def base_weight(self) -> Tensor:
        w = dequantized_weight(self.layer.get_base_layer())  # a bitsandbytes W0 dequantised
        return w.T if getattr(self.layer, "fan_in_fan_out", False) else w  # Conv1D: stored (d_in, d_out)


def _traced_layers(model: nn.Module, adapter_name: str | None) -> list[_Layer]:
    layers: dict[tuple[str, str], _Layer] = {}
    for t in adapter_tensors(model, adapter_name):
        if t.role == Role.ROUTER:
            continue
        key = (t.module, t.adapter)
        if key not in layers:
            layer: Any = model.get_submodule(t.module)
            cfg = layer.asymlora_config[t.adapter]
            layers[key] = _Layer(t.module, t.adapter, cfg.method, layer, {}, {}, {}, peft_lora=False)
        entry = layers[key]
        (entry.a_names if t.role == Role.A else entry.b_names)[t.name] = t.tensor
        entry.params[t.name] = t.param
    for module_name, lora in model.named_modules():
        if not isinstance(lora, LoraLayer):
            continue
        for adapter in lora.lora_A:
            lora_a, lora_b = lora.lora_A[adapter], lora.lora_B[adapter]
            if adapter_name is not None and adapter != adapter_name:
                continue
            if not (isinstance(lora_a, nn.Linear) and isinstance(lora_b, nn.Linear)):
                continue
            a_name = f"{module_name}.lora_A.{adapter}.weight"
            b_name = f"{module_name}.lora_B.{adapter}.weight"
            layers[(module_name, adapter)] = _Layer(
                module_name,
                adapter,
                "lora (peft)",
                lora,
                {a_name: "A"},
                {b_name: "B"},
                {a_name: lora_a.weight, b_name: lora_b.weight},
                peft_lora=True,
            )
    return list(layers.values())


@torch.no_grad()
def snapshot_a(model: nn.Module, adapter_name: str | None = None) -> dict[str, Tensor]:
    """Copy of every A-role tensor of ``model`` (qualified parameter name -> float64 CPU tensor).

    Take it before training starts and pass it to `TraceRecorder` as ``init`` if the recorder is built later.
    """
    out: dict[str, Tensor] = {}
    for layer in _traced_layers(model, adapter_name):
        for name in layer.a_names:
            out[name] = layer.params[name].detach().to("cpu", torch.float64).clone()
    return out


def _norm(tensors: list[Tensor]) -> float:
    return math.sqrt(sum(float(t.square().sum()) for t in tensors))


def _f(x: float) -> float | None:
    return None if math.isnan(x) or math.isinf(x) else float(f"{x:.6g}")


class TraceRecorder:
    """Append per-layer training traces of a peft model to a JSON-lines file.

    Args:
        model: a peft model (asymlora or plain peft LoRA adapters), or the model inside it.
        path: the ``.jsonl`` file to append to (parent directories are created).
        init: the initial A snapshot from `snapshot_a`; default: taken now, so build the recorder before the
            first optimiser step.
        adapter_name: trace only this adapter (default: all).
        every: `__call__` records when ``step % every == 0`` (`record` always records).
        magnitude_direction: also compute ΔM/ΔD (costs one d_out × d_in product per expert and layer).
    """

    def __init__(
        self,
        model: nn.Module,
        path: str | os.PathLike,
        init: Mapping[str, Tensor] | None = None,
        *,
        adapter_name: str | None = None,
        every: int = 1,
        magnitude_direction: bool = True,
    ) -> None:
        if every < 1:
            raise ValueError(f"every={every}: record every K >= 1 steps")
        self.model = model
        self.path = Path(path)
        self.adapter_name = adapter_name
        self.every = every
        self.magnitude_direction = magnitude_direction
        self.layers = _traced_layers(model, adapter_name)
        if not self.layers:
            raise ValueError(
                "the model has no asymlora or peft LoRA layers to trace"
                + (f" for adapter {adapter_name!r}" if adapter_name else "")
            )
        self.init = dict(init) if init is not None else snapshot_a(model, adapter_name)
        missing = [n for layer in self.layers for n in layer.a_names if n not in self.init]
        if missing:
            raise ValueError(f"the initial A snapshot lacks {len(missing)} tensor(s), e.g. {missing[:2]}")
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def should_record(self, step: int) -> bool:
        return step % self.every == 0

    def __call__(self, step: int, **extra: Any) -> dict[str, Any] | None:
        """Record if ``step`` is a multiple of ``every``; return the record (or None)."""
        return self.record(step, **extra) if self.should_record(step) else None

    @torch.no_grad()
    def measure(self) -> list[dict[str, Any]]:
        """The per-layer measurements now (what `record` writes under ``"layers"``)."""
        out = []
        for layer in self.layers:
            cur = {name: t.detach().to("cpu", torch.float64) for name, t in layer.tensors().items()}
            a_now = [layer.params[q].detach().to("cpu", torch.float64) for q in layer.a_names]
            a_init = [self.init[q].to(torch.float64) for q in layer.a_names]
            init_norm = _norm(a_init)
            a_rel = (
                _norm([x - y for x, y in zip(a_now, a_init, strict=True)]) / init_norm
                if init_norm
                else math.nan
            )
            b_norm = _norm([layer.params[q].detach().to("cpu", torch.float64) for q in layer.b_names])
            init_tensors = dict(cur)
            for q, tname in layer.a_names.items():
                init_tensors[tname] = self.init[q].to(torch.float64)
            now_f = layer.factors(cur)
            init_f = layer.factors(init_tensors)
            a_rel_e = []
            for (a, _), (a0, _) in zip(now_f, init_f, strict=True):
                n0 = float(torch.linalg.vector_norm(a0))
                a_rel_e.append(_f(float(torch.linalg.vector_norm(a - a0)) / n0) if n0 else None)
            row: dict[str, Any] = {
                "module": layer.module.removeprefix(PEFT_KEY_PREFIX),
                "adapter": layer.adapter,
                "method": layer.method,
                "num_experts": len(now_f),
                "A_rel_change": _f(a_rel),
                "A_rel_change_experts": a_rel_e,
                "B_norm": _f(b_norm),
                "B_norm_experts": [_f(float(torch.linalg.vector_norm(b))) for _, b in now_f],
            }
            if self.magnitude_direction:
                w0 = layer.base_weight().detach().to("cpu", torch.float64)
                s = layer.scaling()
                deltas = torch.stack([s * (b @ a) for a, b in now_f])
                res = magnitude_direction_change(w0, deltas)
                row["delta_M"] = _f(float(res["delta_M"].mean()))
                row["delta_D"] = _f(float(res["delta_D"].mean()))
                row["delta_M_experts"] = [_f(v) for v in res["delta_M"].tolist()]
                row["delta_D_experts"] = [_f(v) for v in res["delta_D"].tolist()]
            out.append(row)
        return out

    def record(self, step: int, **extra: Any) -> dict[str, Any]:
        """Measure now and append one JSON line for ``step`` (plus any JSON-serialisable ``extra`` keys)."""
        layers = self.measure()
        keys = ["A_rel_change", "B_norm"] + (["delta_M", "delta_D"] if self.magnitude_direction else [])
        mean = {}
        for key in keys:
            vals = [row[key] for row in layers if row.get(key) is not None]
            mean[key] = _f(sum(vals) / len(vals)) if vals else None
        rec: dict[str, Any] = {
            "step": int(step),
            "time": round(time.time(), 3),
            "adapter": self.adapter_name,
            "mean": mean,
            "layers": layers,
        }
        for k, v in extra.items():
            if k in rec:
                raise ValueError(f"extra key {k!r} would overwrite a trace field")
            rec[k] = v
        with self.path.open("a") as fh:
            fh.write(json.dumps(rec, allow_nan=False) + "\n")
        return rec


def read_traces(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a trace file, in order (a truncated last line, from an interrupted run, is skipped)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p} is not a trace file")
    rows = []
    lines = p.read_text().splitlines()
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines) - 1:
                break
            raise ValueError(f"{p}:{n + 1} is not valid JSON") from None
    return rows
