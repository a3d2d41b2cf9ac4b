"""Merge one task into the base model, or export it as a standard peft LoRA adapter (docs/design.md §3).

With ``router="task"`` task t's update is an ordinary LoRA: ΔW_t = s · B_t A_t (ALoRA: A_t with the shared
B). `merge_task` folds it into W0; `export_task_adapter` writes it as ``lora_A``/``lora_B`` with a stock
`peft.LoraConfig` (lora_alpha = s · rank, so peft's scaling equals ours), loadable by peft, vLLM or any
LoRA server with no trace of asymlora. Soft/topk routing mixes experts per token: nothing to merge, and
`export_task_adapter` with ``calibration=`` writes an approximation (gate averaged over the task's tokens,
`asymlora.calibration`).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from peft.utils.integrations import get_bnb_param_type
from torch import nn

from asymlora.calibration import export_calibrated_adapter
from asymlora.lora_files import write_lora_adapter
from asymlora.methods import get_method
from asymlora.tuner.config import AsymLoraConfig
from asymlora.tuner.layer import AsymLoraLayer, dequantized_weight
from asymlora.tuner.model import AsymLoraModel, active_adapter_name, base_weight


def _mergeable_config(model: nn.Module, adapter_name: str | None) -> tuple[str, AsymLoraConfig]:
    configs = getattr(model, "peft_config", {})
    if adapter_name is None:
        adapter_name = active_adapter_name(model)
    cfg = configs.get(adapter_name)
    if not isinstance(cfg, AsymLoraConfig):
        raise ValueError(f"model has no asymlora adapter named {adapter_name!r} (adapters: {list(configs)})")
    if get_method(cfg.method).uses_router and cfg.router != "task":
        raise ValueError(
            f"adapter {adapter_name!r} uses router={cfg.router!r}: its experts are mixed per token, so no single "
            "weight update exists to merge or export. Train with router='task' to get one mergeable LoRA per task."
        )
    return adapter_name, cfg


def _tuner_of(model: nn.Module) -> AsymLoraModel:
    """The asymlora tuner of a peft model (its ``base_model``), or ``model`` itself when it is the tuner."""
    tuner = getattr(model, "base_model", model)
    if not isinstance(tuner, AsymLoraModel):
        raise TypeError(f"{type(model).__name__} holds no asymlora adapter (no AsymLoraModel inside it)")
    return tuner


def _layers(model: nn.Module) -> list[tuple[str, AsymLoraLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AsymLoraLayer)]


def merge_task(model: nn.Module, task: int | str, adapter_name: str | None = None) -> nn.Module:
    """Return the base model with task ``task``'s update merged into its weights.

    Like peft's ``merge_and_unload`` this consumes ``model`` (its layers are unwrapped in place); deep-copy
    it first if you still need the adapter. ``task`` is an expert index or a name from ``task_names``.
    A tied base weight (lm_head tied to the input embedding) is untied first, with a warning naming it.

    On a bitsandbytes 4-bit/8-bit base each adapted layer becomes a plain nn.Linear holding the dequantised
    W0 + ΔW_t in the model's float dtype (other layers stay quantised), with a warning: re-quantising the
    sum would round most of ΔW_t away, so the merged layers keep their full size (docs/quantization.md).
    """
    with torch.no_grad():  # not a decorator: mutmut (docs/testing.md) skips decorated functions
        adapter_name, cfg = _mergeable_config(model, adapter_name)
        index = cfg.task_index(task)
        tuner = _tuner_of(model)
        tuner.untie_adapted_weights()  # never write through a tied lm_head
        layers = [layer for _, layer in _layers(model) if adapter_name in layer.asymlora_config]
        quantized = [layer for layer in layers if get_bnb_param_type(base_weight(layer.get_base_layer()))]
        if quantized:
            dtype = _float_dtype(model)
            warnings.warn(
                f"merge_task on a quantised base: the {len(quantized)} adapted bitsandbytes layers are dequantised "
                f"to {dtype} and the task merged there (the other layers stay quantised). Re-quantising W0 + ΔW "
                "would round most of the update away, so they keep their full size; to serve a small model keep "
                "the adapter (or export_task_adapter) on the quantised base instead.",
                stacklevel=2,
            )
        for layer in layers:
            delta = layer.task_delta_weight(adapter_name, index)
            if layer in quantized:
                layer.base_layer = _dequantized_linear(layer.get_base_layer(), delta, dtype)
            else:
                weight = base_weight(layer.get_base_layer())
                weight.add_(layer.in_weight_layout(delta).to(weight.dtype))
        return tuner.unload()  # what PeftModel.unload forwards to


def _float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's unquantised base parameters (embeddings, norms): the merged layers' dtype."""
    for name, p in model.named_parameters():
        if p.dtype.is_floating_point and ".asymlora_" not in name:
            return p.dtype
    return torch.float32


def _dequantized_linear(base: nn.Module, delta: torch.Tensor, dtype: torch.dtype) -> nn.Linear:
    """nn.Linear with weight dequant(W0) + ΔW (`asymlora.tuner.layer.dequantized_weight`) and the same bias."""
    if not isinstance(base, nn.Linear):  # bitsandbytes' Linear4bit / Linear8bitLt are nn.Linear subclasses
        raise TypeError(f"cannot dequantise a {type(base).__name__}; expected a bitsandbytes linear layer")
    weight = dequantized_weight(base)  # a CPU-repacked 4-bit weight unpacked first
    linear = nn.Linear(base.in_features, base.out_features, base.bias is not None, weight.device, dtype)
    linear.requires_grad_(False)
    linear.weight.copy_(weight.float() + delta.to(weight.device))
    if base.bias is not None:
        linear.bias.copy_(base.bias)
    return linear


def _calibrated(model: nn.Module, adapter_name: str | None, calibration: Any, rank: int | None) -> bool:
    """True for a soft/topk-routed adapter; raises when it has no calibration data, and warns when a
    task-routed one gets some (its export is exact and ignores it)."""
    name = adapter_name if adapter_name is not None else active_adapter_name(model)
    cfg = getattr(model, "peft_config", {}).get(name)
    routed = isinstance(cfg, AsymLoraConfig) and get_method(cfg.method).uses_router and cfg.router != "task"
    if routed and calibration is None:
        raise ValueError(
            f"adapter {name!r} uses router={getattr(cfg, 'router', None)!r}: its experts are mixed per token, so exporting one "
            "LoRA averages each layer's gate over the task's tokens. Pass calibration= the task's examples, "
            "e.g. export_task_adapter(model, task.name, out_dir, calibration=task, tokenizer=tokenizer) "
            "with task an asymlora.data.Task (or a list of strings / tokenized batches)."
        )
    if not routed and (calibration is not None or rank is not None):
        if rank is not None:
            raise ValueError(
                f"rank={rank!r} applies to the calibrated export of soft/topk adapters only; drop it"
            )
        warnings.warn("this adapter's export is exact; the calibration data is not used", stacklevel=3)
    return routed


def export_task_adapter(
    model: nn.Module,
    task: int | str,
    out_dir: str | os.PathLike,
    adapter_name: str | None = None,
    overwrite: bool = False,
    calibration: Any = None,
    tokenizer: Any = None,
    rank: int | None = None,
) -> Path:
    """Write task ``task`` as a standard peft LoRA adapter (adapter_config.json + adapter_model.safetensors).

    The directory appears complete or not at all. Returns its path. A task-routed adapter is exported
    exactly. A soft/topk-routed one needs ``calibration`` (the task's examples: an `asymlora.data.Task`,
    Examples or strings with ``tokenizer``, or batches of input_ids + attention_mask): each layer's gate is
    averaged over its real tokens and the export, an approximation, carries its measured fidelity in
    README.md and calibration.json; ``rank=k`` truncates it by SVD (`asymlora.calibration`, docs/design.md §3).

    Raises:
        ValueError: a soft/topk adapter without calibration data, or it trains whole modules
            (``modules_to_save``): a LoRA export carries only the low-rank factors and would not reproduce
            the model, so use :func:`merge_task` (which keeps them) instead. Bad calibration data.
    """
    with torch.no_grad():  # not a decorator: mutmut (docs/testing.md) skips decorated functions
        if _calibrated(model, adapter_name, calibration, rank):
            return export_calibrated_adapter(model, task, out_dir, calibration, tokenizer=tokenizer, rank=rank,
                                             adapter_name=adapter_name, overwrite=overwrite)  # fmt: skip
        adapter_name, cfg = _mergeable_config(model, adapter_name)
        if cfg.modules_to_save:
            raise ValueError(
                f"adapter {adapter_name!r} also trains whole modules (modules_to_save={list(cfg.modules_to_save)}); "
                "a LoRA export would drop them and not reproduce the model. Merge the task instead "
                "(asymlora.merge_task(model, task), then save_pretrained), or train without modules_to_save."
            )
        index = cfg.task_index(task)
        method = get_method(cfg.method)
        prefix = (
            "base_model." if isinstance(model, AsymLoraModel) else ""
        )  # the tuner: names as in its PeftModel
        factors = {
            prefix + name: method.task_factors(layer.tensors(adapter_name), index)
            for name, layer in _layers(model)
            if adapter_name in layer.asymlora_config
        }
        if not factors:
            raise ValueError(f"adapter {adapter_name!r} has no adapted layers to export")
        return write_lora_adapter(out_dir, cfg, factors, overwrite=overwrite, dropout=cfg.lora_dropout)
