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
from peft import LoraConfig
from safetensors.torch import save_file
from torch import nn

from asymlora.calibration import export_calibrated_adapter
from asymlora.io import atomic_dir
from asymlora.methods import get_method
from asymlora.tuner.config import AsymLoraConfig
from asymlora.tuner.layer import AsymLoraLayer

PEFT_KEY_PREFIX = "base_model.model."


def _mergeable_config(model: nn.Module, adapter_name: str | None) -> tuple[str, AsymLoraConfig]:
    configs = getattr(model, "peft_config", {})
    if adapter_name is None:
        adapter_name = getattr(model, "active_adapter", "default")
    cfg = configs.get(adapter_name)
    if not isinstance(cfg, AsymLoraConfig):
        raise ValueError(f"model has no asymlora adapter named {adapter_name!r} (adapters: {list(configs)})")
    if get_method(cfg.method).uses_router and cfg.router != "task":
        raise ValueError(
            f"adapter {adapter_name!r} uses router={cfg.router!r}: its experts are mixed per token, so no single "
            "weight update exists to merge or export. Train with router='task' to get one mergeable LoRA per task."
        )
    return adapter_name, cfg


def _layers(model: nn.Module) -> list[tuple[str, AsymLoraLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AsymLoraLayer)]


@torch.no_grad()
def merge_task(model: nn.Module, task: int | str, adapter_name: str | None = None) -> nn.Module:
    """Return the base model with task ``task``'s update merged into its weights.

    Like peft's ``merge_and_unload`` this consumes ``model`` (its layers are unwrapped in place); deep-copy
    it first if you still need the adapter. ``task`` is an expert index or a name from ``task_names``.
    A tied base weight (lm_head tied to the input embedding) is untied first, with a warning naming it.
    """
    adapter_name, cfg = _mergeable_config(model, adapter_name)
    index = cfg.task_index(task)
    getattr(model, "base_model", model).untie_adapted_weights()  # never write through a tied lm_head
    for _, layer in _layers(model):
        if adapter_name in layer.asymlora_config:
            weight = layer.get_base_layer().weight
            weight += layer.task_delta_weight(adapter_name, index).to(weight.dtype)
    return model.unload()


def _calibrated(model: nn.Module, adapter_name: str | None, calibration: Any, rank: int | None) -> bool:
    """True for a soft/topk-routed adapter; raises when it has no calibration data, and warns when a
    task-routed one gets some (its export is exact and ignores it)."""
    name = adapter_name if adapter_name is not None else getattr(model, "active_adapter", "default")
    cfg = getattr(model, "peft_config", {}).get(name)
    routed = isinstance(cfg, AsymLoraConfig) and get_method(cfg.method).uses_router and cfg.router != "task"
    if routed and calibration is None:
        raise ValueError(
            f"adapter {name!r} uses router={cfg.router!r}: its experts are mixed per token, so exporting one "
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


@torch.no_grad()
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
    state: dict[str, torch.Tensor] = {}
    rank = None
    for name, layer in _layers(model):
        if adapter_name not in layer.asymlora_config:
            continue
        a, b = method.task_factors(layer.tensors(adapter_name), index)
        rank = a.shape[0]
        key = name if name.startswith(PEFT_KEY_PREFIX) else PEFT_KEY_PREFIX + name
        state[f"{key}.lora_A.weight"] = a.detach().contiguous().cpu().clone()
        state[f"{key}.lora_B.weight"] = b.detach().contiguous().cpu().clone()
    if rank is None:
        raise ValueError(f"adapter {adapter_name!r} has no adapted layers to export")
    lora_cfg = LoraConfig(
        r=rank,
        lora_alpha=cfg.scaling * rank,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,
        exclude_modules=cfg.exclude_modules,
        layers_to_transform=cfg.layers_to_transform,
        layers_pattern=cfg.layers_pattern,
        task_type="CAUSAL_LM",
        base_model_name_or_path=cfg.base_model_name_or_path,
    )
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        lora_cfg.save_pretrained(str(tmp))
        save_file(state, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    return Path(out_dir)
