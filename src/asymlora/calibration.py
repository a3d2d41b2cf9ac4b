"""Calibrated export of a soft- or top-k-routed adapter as one standard peft LoRA (docs/design.md §3).

A learned router mixes the experts per token, so the adapter has no single ΔW. For serving one task with
a stock LoRA server, the gate of each layer is replaced by its average over the task's real tokens
(attention mask 1) on calibration examples, ḡ = Σ_t m_t g(x_t) / Σ_t m_t, which gives one update per layer:

- experts share B (ALoRA):   ΔW = s · B (Σ_i ḡ_i A_i)          rank r
- experts share A (HydraLoRA): ΔW = s · (Σ_i ḡ_i B_i) A        rank r
- otherwise (MoLoRA, MALoRA): ΔW = s · Σ_i ḡ_i B_i A_i, written as the rank-N·r concatenation
  [√ḡ_1 B_1 … √ḡ_N B_N] [√ḡ_1 A_1; …; √ḡ_N A_N] (exact), or with ``rank=k`` its best rank-k
  approximation (truncated SVD), the discarded energy Σ_{j>k} σ_j² / Σ_j σ_j² reported per layer.

This is an approximation of the routed model (exact only when the gate does not depend on the input);
its fidelity on the calibration set is measured and written beside the adapter (``calibration.json``
and ``README.md``): per layer e_l = ‖Y_export − Y_routed‖_F / ‖Y_routed − Y_base‖_F over the real tokens,
with every layer fed the routed model's inputs, and end to end the same ratio on the model's logits.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from asymlora.lora_files import write_lora_adapter
from asymlora.methods import get_method
from asymlora.methods.base import Role
from asymlora.tuner.config import AsymLoraConfig
from asymlora.tuner.layer import AsymLoraLayer
from asymlora.tuner.model import AsymLoraModel, active_adapter_name

REPORT_FILE = "calibration.json"
CALIBRATION_HELP = (
    "pass calibration= the task's examples: an asymlora.data.Task (its train split), a list of "
    "asymlora.data.Example or of strings (with tokenizer=), or tokenized batches (a dict of input_ids + "
    "attention_mask, a list of them or a DataLoader)"
)


def _layers(model: nn.Module, adapter_name: str) -> list[tuple[str, AsymLoraLayer]]:
    return [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, AsymLoraLayer) and adapter_name in m.asymlora_config
    ]


def routed_config(model: nn.Module, adapter_name: str | None) -> tuple[str, AsymLoraConfig]:
    """(adapter name, config) of an asymlora adapter with a learned router (soft or topk).

    Raises ValueError naming the adapter when there is none, it is not the only active adapter (the forwards
    that calibrate it would run another), or it is task-routed / unrouted."""
    configs = getattr(model, "peft_config", {})
    name = adapter_name if adapter_name is not None else active_adapter_name(model)
    cfg = configs.get(name)
    if not isinstance(cfg, AsymLoraConfig):
        raise ValueError(f"model has no asymlora adapter named {name!r} (adapters: {list(configs)})")
    active = list(getattr(model, "active_adapters", [name]))
    if active != [name]:  # the calibration forwards run the active adapter(s), not the named one
        raise ValueError(
            f"adapter {name!r} is not the model's only active adapter (active: {active}): the calibration runs "
            f"the model, so activate it first with model.set_adapter({name!r})"
        )
    if not get_method(cfg.method).uses_router or cfg.router == "task":
        raise ValueError(
            f"adapter {name!r} ({cfg.method}, router={cfg.router!r}) needs no calibration: its export is "
            "exact. Call asymlora.export_task_adapter(model, task, out_dir) without calibration."
        )
    return name, cfg


# --- calibration data ----------------------------------------------------------------------------------
def _is_batch(item: Any) -> bool:
    return isinstance(item, Mapping) and "input_ids" in item


def _encode_texts(items: Sequence[Any], tokenizer: Any, max_length: int) -> list[dict[str, list[int]]]:
    """Strings -> token ids (no special tokens added); Examples -> prompt + answer as in training."""
    # asymlora.data is imported here, not at module level: it costs ~1 s (scipy, through asymlora.eval)
    # and this module is part of `import asymlora`.
    from asymlora.data import DataError, Example, encode_example

    features = []
    for item in items:
        if isinstance(item, Example):
            try:
                features.append(encode_example(tokenizer, item, max_length))
            except DataError:
                continue  # its answer does not fit max_length: training skipped it too
        elif isinstance(item, str):
            ids = list(tokenizer(item, add_special_tokens=False)["input_ids"])[-max_length:]
            if ids:
                features.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
        else:
            raise ValueError(
                f"calibration holds a {type(item).__name__}, which is not a string, an Example or a batch; "
                + CALIBRATION_HELP
            )
    return features


def _check_task_ids(batches: list[Mapping[str, Any]], task: int | str) -> None:
    """Batches that carry ``task_ids`` (e.g. from MultiTaskCollator) must all hold one task's examples."""
    found = sorted(
        {
            int(i)
            for b in batches
            if b.get("task_ids") is not None
            for i in torch.as_tensor(b["task_ids"]).reshape(-1)
        }
    )
    if len(found) > 1 or (isinstance(task, int) and found and found[0] != task):
        raise ValueError(
            f"the calibration batches carry task_ids {found}, but task {task!r} is being exported; "
            "pass only that task's examples (e.g. MultiTaskDataset([task], tokenizer))."
        )


def calibration_batches(
    calibration: Any,
    task: int | str,
    tokenizer: Any = None,
    batch_size: int = 8,
    max_length: int = 512,
) -> list[dict[str, Tensor]]:
    """The calibration data as batches ``{"input_ids", "attention_mask"}`` (LongTensor (batch, seq)).

    ``calibration``: an `asymlora.data.Task` (its train split; its name must equal ``task``), a sequence of
    `asymlora.data.Example` (prompt + answer, as trained) or of strings (both need ``tokenizer``), one batch
    (a mapping with ``input_ids`` and optionally ``attention_mask``), or an iterable of batches (a DataLoader).
    Batches that carry ``task_ids`` must all belong to one task (``task`` when it is an index).

    Raises:
        ValueError: no data, data of another task, a missing tokenizer, an item of an unknown type.
    """
    from asymlora.data import MultiTaskCollator, Task  # ~1 s import, see _encode_texts

    if calibration is None:
        raise ValueError(f"no calibration data given; {CALIBRATION_HELP}")
    if isinstance(calibration, Task):
        if isinstance(task, str) and calibration.name != task:
            raise ValueError(
                f"the calibration data is task {calibration.name!r}, but task {task!r} is being exported; "
                f"pass task {task!r}'s examples (or export {calibration.name!r})."
            )
        calibration = calibration.train
    if isinstance(calibration, str) or _is_batch(calibration):
        calibration = [calibration]
    items = list(calibration)
    if not items:
        raise ValueError(f"the calibration data for task {task!r} is empty; {CALIBRATION_HELP}")
    if all(_is_batch(b) for b in items):
        _check_task_ids(items, task)
        return [_as_batch(b) for b in items]
    if tokenizer is None:
        raise ValueError(
            f"calibration holds {type(items[0]).__name__} items: pass tokenizer= (the base model's) to "
            "tokenize them, or pass tokenized batches (input_ids + attention_mask)."
        )
    features = _encode_texts(items, tokenizer, max_length)
    if not features:
        raise ValueError(
            f"no calibration example of task {task!r} has a token that fits max_length={max_length}"
        )
    collate = MultiTaskCollator(tokenizer)
    return [_as_batch(collate(features[i : i + batch_size])) for i in range(0, len(features), batch_size)]


def _as_batch(batch: Mapping[str, Any]) -> dict[str, Tensor]:
    ids = torch.as_tensor(batch["input_ids"])
    if ids.dim() == 1:
        ids = ids[None]
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask).reshape(ids.shape)
    return {"input_ids": ids.long(), "attention_mask": mask.long()}


# --- gate averaging -------------------------------------------------------------------------------------
def _module(layer: AsymLoraLayer) -> nn.Module:
    # peft's tuner-layer mixin is no nn.Module for the type checker; every concrete asymlora layer is one
    if not isinstance(layer, nn.Module):
        raise TypeError(f"{type(layer).__name__} is not an nn.Module")
    return layer


def _gate(layer: AsymLoraLayer, name: str, x: Tensor) -> Tensor:
    """The router's gate g(x), (..., N), of a soft/top-k routed layer (routed_config checked the router)."""
    gate = layer.gate(name, x)
    if gate is None:
        raise ValueError(
            f"adapter {name!r} has no learned router on this layer, so there is no gate to calibrate"
        )
    return gate


@contextmanager
def _hooks(layers: list[tuple[str, AsymLoraLayer]], make_hook) -> Iterator[None]:
    handles = [_module(layer).register_forward_hook(make_hook(name, layer)) for name, layer in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _run(model: nn.Module, batches: list[dict[str, Tensor]]) -> Iterator[tuple[Tensor, Tensor]]:
    """Forward each batch (eval mode, no cache); yields (logits, real-token mask).

    Positions are counted over the real tokens, as ``generate`` does, where the model takes ``position_ids``:
    a left-padded batch then sees each row as it is alone (learned positions, GPT-2, shifted every row by its
    padding and changed the averaged gates)."""
    device = next(model.parameters()).device
    lm = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), model)
    positions = "position_ids" in inspect.signature(lm.forward).parameters
    for batch in map(_as_batch, batches):
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        extra = {"position_ids": (mask.cumsum(-1) - 1).clamp(min=0)} if positions else {}
        yield model(input_ids=ids, attention_mask=mask, use_cache=False, **extra).logits, mask.bool()


def _token_mask(layer: AsymLoraLayer, x: Tensor) -> Tensor:
    call = layer.routing_state.call
    mask = call.token_mask(x) if call is not None else None
    return torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device) if mask is None else mask


def average_gates(
    model: nn.Module, batches: list[dict[str, Tensor]], adapter_name: str | None = None
) -> tuple[dict[str, Tensor], int]:
    """ḡ per adapted layer: the router's gate averaged over the real tokens of ``batches``.

    Returns ({layer name: ḡ (N,) float64, sums to 1}, number of real tokens). Forward hooks on the asymlora
    layers recompute g(x) from each layer's input (the layer code is not touched); tokens with
    attention_mask 0 are left out.
    """
    with torch.no_grad():  # a block, not a decorator: mutmut skips decorated functions
        name, _ = routed_config(model, adapter_name)
        layers = _layers(model, name)
        sums: dict[str, Tensor] = {}
        tokens = 0

        def make_hook(lname: str, layer: AsymLoraLayer):
            def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
                x = args[0]
                t = layer.tensors(name)
                gate = _gate(layer, name, layer._cast_input_dtype(x, next(iter(t.values())).dtype))
                m = _token_mask(layer, x).to(torch.float64)
                total = (gate.double() * m.unsqueeze(-1)).reshape(-1, gate.shape[-1]).sum(0)
                sums[lname] = sums[lname] + total if lname in sums else total

            return hook

        with _eval_mode(model), _hooks(layers, make_hook):
            for _, mask in _run(model, batches):
                tokens += int(mask.sum())
        if tokens == 0:
            raise ValueError("the calibration data has no real token (its attention_mask is all 0)")
        if unseen := [n for n, _ in layers if n not in sums]:
            raise RuntimeError(f"the calibration forwards never reached the adapted layers {unseen}")
        return {n: (sums[n] / tokens).cpu() for n, _ in layers}, tokens


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)


# --- the exported factors ------------------------------------------------------------------------------
@dataclass
class LayerExport:
    """The exported LoRA pair of one layer: ΔW = s · B A; ``discarded_energy`` when truncated by SVD."""

    A: Tensor
    B: Tensor
    discarded_energy: float | None = None


def _shared_side(cfg: AsymLoraConfig, d_in: int, d_out: int) -> Role | None:
    """The side all experts share (every tensor of that role has no expert axis), or None."""
    specs = get_method(cfg.method).specs(cfg, d_in, d_out).values()
    for role in (Role.B, Role.A):
        if all(s.expert_dim is None for s in specs if s.role == role):
            return role
    return None


def calibrated_factors(
    cfg: AsymLoraConfig, tensors: Mapping[str, Tensor], gate: Tensor, d_in: int, d_out: int,
    rank: int | None = None,
) -> LayerExport:  # fmt: skip
    """The LoRA pair (A (k, d_in), B (d_out, k)) of Σ_i ḡ_i B_i A_i for one layer, in float32.

    Shared B (ALoRA): (Σ ḡ_i A_i, B), k = r. Shared A (HydraLoRA): (A, Σ ḡ_i B_i), k = r. Otherwise the
    concatenation of (√ḡ_i A_i, √ḡ_i B_i), k = N·r. With ``rank``: the truncated SVD of that product.
    Raises ValueError when ``rank`` is not in [1, the product's rank bound].
    """
    with torch.no_grad():  # the adapter's parameters require grad; the exported factors need no graph
        pairs = [
            (a.float(), b.float()) for a, b in get_method(cfg.method).expert_factors(dict(tensors), len(gate))
        ]
        g = gate.float().to(pairs[0][0].device)
        shared = _shared_side(cfg, d_in, d_out)
        if shared is Role.B:
            a, b = sum(gi * ai for gi, (ai, _) in zip(g, pairs, strict=True)), pairs[0][1]
        elif shared is Role.A:
            a, b = pairs[0][0], sum(gi * bi for gi, (_, bi) in zip(g, pairs, strict=True))
        else:
            root = g.clamp_min(0).sqrt()
            a = torch.cat([ri * ai for ri, (ai, _) in zip(root, pairs, strict=True)])
            b = torch.cat([ri * bi for ri, (_, bi) in zip(root, pairs, strict=True)], dim=1)
        if rank is None:
            return LayerExport(a, b)
        return truncate(a, b, rank)


def truncate(a: Tensor, b: Tensor, rank: int) -> LayerExport:
    """Best rank-``rank`` pair of ΔW = B A (Eckart–Young), via QR of both factors and an SVD of the small
    core (never forming the d_out × d_in matrix). discarded_energy = Σ_{j>k} σ_j² / Σ_j σ_j² (0 when ΔW = 0).

    a: (k0, d_in), b: (d_out, k0). Raises ValueError unless 1 <= rank <= k0."""
    k0 = a.shape[0]
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= k0:
        raise ValueError(f"rank={rank!r} is out of range: the averaged update has rank <= {k0}; pass 1..{k0}")
    q_b, r_b = torch.linalg.qr(b.double())  # b = Q_b R_b
    q_a, r_a = torch.linalg.qr(a.double().T)  # aᵀ = Q_a R_a
    u, sigma, vh = torch.linalg.svd(r_b @ r_a.T)  # B A = Q_b (R_b R_aᵀ) Q_aᵀ
    energy = float((sigma**2).sum())
    discarded = float((sigma[rank:] ** 2).sum()) / energy if energy > 0 else 0.0
    root = sigma[:rank].sqrt()
    new_b = (q_b @ u[:, :rank]) * root
    new_a = root[:, None] * (vh[:rank] @ q_a.T)
    return LayerExport(new_a.float(), new_b.float(), discarded)


# --- fidelity -------------------------------------------------------------------------------------------
def _ratio(num: float, den: float) -> float | None:
    """sqrt(num / den); 0 when both are 0; None (undefined) when only the denominator is 0."""
    if den > 0:
        return math.sqrt(num / den)
    return 0.0 if num == 0 else None


@dataclass
class Fidelity:
    """Relative errors of the export on the calibration set (docs/design.md §3, calibrated export).

    ``output``: ‖logits_export − logits_routed‖_F / ‖logits_routed − logits_base‖_F over real tokens.
    ``layers``: per layer, the same ratio of the layer outputs, each layer fed the routed model's inputs.
    ``pooled``: the layer ratio with numerators and denominators summed over all layers.
    """

    output: float | None
    pooled: float | None
    layers: dict[str, float | None] = field(default_factory=dict)


def measure_fidelity(
    model: nn.Module, batches: list[dict[str, Tensor]], exports: Mapping[str, LayerExport],
    adapter_name: str | None = None,
) -> Fidelity:  # fmt: skip
    """Compare the routed adapter with the exported pairs ``exports`` ({layer name: LayerExport}) on
    ``batches``: three forwards per batch (routed, base, export), swapped in by forward hooks."""
    with torch.no_grad():
        name, cfg = routed_config(model, adapter_name)
        layers = _layers(model, name)
        method, s = get_method(cfg.method), cfg.scaling
        num = dict.fromkeys(exports, 0.0)
        den = dict.fromkeys(exports, 0.0)
        mode = ["routed"]

        def make_hook(lname: str, layer: AsymLoraLayer):
            def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
                t = layer.tensors(name)
                x = layer._cast_input_dtype(args[0], next(iter(t.values())).dtype)
                routed = s * method.delta(x, t, _gate(layer, name, x).to(x.dtype))
                pair = exports[lname]
                exported = s * ((x.float() @ pair.A.to(x.device).T) @ pair.B.to(x.device).T)
                if mode[0] == "routed":
                    m = _token_mask(layer, x).unsqueeze(-1)
                    num[lname] += float(((exported - routed.float()) * m).pow(2).sum())
                    den[lname] += float((routed.float() * m).pow(2).sum())
                    return output
                swapped = exported if mode[0] == "export" else torch.zeros_like(exported)
                return output - routed.to(output.dtype) + swapped.to(output.dtype)

            return hook

        out_num = out_den = 0.0
        with _eval_mode(model), _hooks(layers, make_hook):
            for batch in batches:
                logits = {}
                for which in ("routed", "base", "export"):
                    mode[0] = which
                    ((logits[which], mask),) = _run(model, [batch])
                m = mask.unsqueeze(-1)
                out_num += float(((logits["export"] - logits["routed"]).float() * m).pow(2).sum())
                out_den += float(((logits["routed"] - logits["base"]).float() * m).pow(2).sum())
        return Fidelity(
            output=_ratio(out_num, out_den),
            pooled=_ratio(sum(num.values()), sum(den.values())),
            layers={n: _ratio(num[n], den[n]) for n in exports},
        )


# --- the export -----------------------------------------------------------------------------------------
def export_calibrated_adapter(
    model: nn.Module,
    task: int | str,
    out_dir: str | os.PathLike,
    calibration: Any,
    *,
    tokenizer: Any = None,
    rank: int | None = None,
    adapter_name: str | None = None,
    overwrite: bool = False,
    batch_size: int = 8,
    max_length: int = 512,
) -> Path:
    """Write task ``task`` of a soft/topk-routed adapter as a stock peft LoRA adapter, gate averaged over
    ``calibration`` (see :func:`calibration_batches` for the accepted forms; module docstring for the math).

    The directory (adapter_config.json, adapter_model.safetensors, README.md, calibration.json) appears
    complete or not at all. Returns its path.

    Raises:
        ValueError: not a soft/topk asymlora adapter, ``modules_to_save`` set, task name unknown to the
            adapter, empty or wrong-task calibration data, ``rank`` out of range.
        FileExistsError: ``out_dir`` is not empty and ``overwrite`` is False.
    """
    if isinstance(model, AsymLoraModel):  # PeftModel.base_model: its forward sets no routing call
        raise ValueError(
            "export the calibrated adapter from the PeftModel, not from its base_model (the AsymLoraModel): "
            "run alone, the tuner does not hand the attention mask to its layers, so padding would count in "
            "the averaged gates"
        )
    name, cfg = routed_config(model, adapter_name)
    if cfg.task_names and task not in cfg.task_names:
        raise ValueError(f"unknown task {task!r}; this adapter's tasks are {cfg.task_names}")
    if cfg.modules_to_save:
        raise ValueError(
            f"adapter {name!r} also trains whole modules (modules_to_save={list(cfg.modules_to_save)}); a LoRA "
            "export would drop them. Train without modules_to_save to export it."
        )
    batches = calibration_batches(calibration, task, tokenizer, batch_size, max_length)
    gates, tokens = average_gates(model, batches, name)
    exports = {
        lname: calibrated_factors(cfg, layer.tensors(name), gates[lname], layer.in_features,
                                  layer.out_features, rank)
        for lname, layer in _layers(model, name)
    }  # fmt: skip
    fidelity = measure_fidelity(model, batches, exports, name)
    report = _report(cfg, task, rank, tokens, len(batches), gates, exports, fidelity)
    factors = {lname: (pair.A, pair.B) for lname, pair in exports.items()}
    files = {REPORT_FILE: json.dumps(report, indent=2) + "\n", "README.md": _readme(report)}
    return write_lora_adapter(out_dir, cfg, factors, overwrite=overwrite, extra_files=files)


def _report(cfg, task, rank, tokens, n_batches, gates, exports, fidelity: Fidelity) -> dict[str, Any]:
    energies = {n: e.discarded_energy for n, e in exports.items() if e.discarded_energy is not None}
    return {
        "task": task,
        "source": {"method": cfg.method, "router": cfg.router, "num_experts": cfg.num_experts, "r": cfg.r},
        "rank": next(iter(exports.values())).A.shape[0],
        "truncated_to_rank": rank,
        "calibration": {"tokens": tokens, "batches": n_batches},
        "fidelity": {
            "definition": "relative error ||y_export - y_routed||_F / ||y_routed - y_base||_F over the real "
            "tokens of the calibration set: 'output' on the model's logits, 'layers' on each adapted "
            "layer's output (inputs from the routed model), 'pooled' over all layers",
            "output": fidelity.output,
            "pooled_layers": fidelity.pooled,
            "max_layer": max((v for v in fidelity.layers.values() if v is not None), default=None),
            "layers": fidelity.layers,
        },
        "discarded_energy": {
            "max": max(energies.values()) if energies else None,
            "mean": sum(energies.values()) / len(energies) if energies else None,
            "layers": energies or None,
        },
        "mean_gate": {n: [round(float(v), 6) for v in g] for n, g in gates.items()},
    }


def _fmt(value: float | None) -> str:
    return "undefined (the routed adapter changes nothing)" if value is None else f"{value:.4f}"


def _readme(report: dict[str, Any]) -> str:
    src, fid, cal = report["source"], report["fidelity"], report["calibration"]
    lines = [
        f"# LoRA adapter: task `{report['task']}` (calibrated export of an asymlora adapter)",
        "",
        f"A standard peft LoRA adapter (rank {report['rank']}) exported from an asymlora `{src['method']}` "
        f"adapter with `{src['router']}` routing over {src['num_experts']} experts. The router's per-token "
        "gate is replaced by its average over the real tokens of the calibration data, so this adapter is "
        "an **approximation** of the routed model.",
        "",
        f"Calibration: {cal['tokens']} real tokens in {cal['batches']} batches.",
        "",
        "Fidelity on the calibration set (relative error ‖y_export − y_routed‖ / ‖y_routed − y_base‖ over "
        "real tokens; 0 = exact):",
        "",
        f"- model output (logits): {_fmt(fid['output'])}",
        f"- adapted layers, pooled: {_fmt(fid['pooled_layers'])}; worst layer: {_fmt(fid['max_layer'])}",
    ]
    if report["truncated_to_rank"] is not None:
        energy = report["discarded_energy"]
        lines.append(
            f"- truncated SVD to rank {report['truncated_to_rank']}: discarded energy (Σ_(j>k) σ_j² / Σ σ_j²) "
            f"mean {energy['mean']:.4f}, max {energy['max']:.4f}"
        )
    lines += ["", f"Per-layer numbers and mean gates: `{REPORT_FILE}`.", ""]
    return "\n".join(lines)
