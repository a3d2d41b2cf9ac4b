"""The one writer of stock peft LoRA adapters (what `asymlora.export_task_adapter` produces, exact or
calibrated): ``adapter_config.json`` of a plain ``LoraConfig`` + ``adapter_model.safetensors`` with
``lora_A`` / ``lora_B``, loadable by peft, vLLM or any LoRA server without asymlora (docs/design.md §3).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from peft import LoraConfig
from safetensors.torch import save_file
from torch import Tensor

from asymlora.io import atomic_dir
from asymlora.tuner.config import AsymLoraConfig

PEFT_KEY_PREFIX = "base_model.model."


def write_lora_adapter(
    out_dir: str | os.PathLike,
    cfg: AsymLoraConfig,
    factors: Mapping[str, tuple[Tensor, Tensor]],
    *,
    overwrite: bool = False,
    dropout: float = 0.0,
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Write ``{module name: (A (k × d_in), B (d_out × k))}`` as a stock LoRA with ΔW = s·B·A, s = cfg.scaling.

    The rank k is read from the factors (all equal); ``lora_alpha = s·k`` keeps the scaling. The targets,
    layer selection and Conv1D layout (``fan_in_fan_out``) are those of ``cfg``. ``extra_files`` (name →
    text) go into the same directory, which appears complete or not at all.

    Raises:
        ValueError: no factors, or factors of different ranks.
        FileExistsError: ``out_dir`` holds something and ``overwrite`` is False.
    """
    ranks = {a.shape[0] for a, _ in factors.values()}
    if len(ranks) != 1:
        raise ValueError(f"a LoRA adapter needs factors of one rank; got ranks {sorted(ranks) or 'none'}")
    (rank,) = ranks
    state = {}
    for name, (a, b) in factors.items():
        key = name if name.startswith(PEFT_KEY_PREFIX) else PEFT_KEY_PREFIX + name
        state[f"{key}.lora_A.weight"] = a.detach().contiguous().cpu().clone()
        state[f"{key}.lora_B.weight"] = b.detach().contiguous().cpu().clone()
    lora_cfg = LoraConfig(
        r=rank,
        lora_alpha=cfg.scaling * rank,  # type: ignore[arg-type]  # peft annotates int; it computes alpha / r
        lora_dropout=dropout,
        fan_in_fan_out=cfg.fan_in_fan_out,  # GPT-2's Conv1D: peft then merges ΔWᵀ, as asymlora does
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
        for file_name, text in (extra_files or {}).items():
            (tmp / file_name).write_text(text)
    return Path(out_dir)
