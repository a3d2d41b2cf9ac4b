"""FSDP (PyTorch FSDP2, ``torch.distributed.fsdp.fully_shard``): shard a peft model across processes.

Each transformer block (the Hugging Face model's ``_no_split_modules``) is one FSDP unit and the Hugging Face
model is the root, so ``generate`` (which peft runs on that model, bypassing the peft wrapper) gathers the
embeddings too. Frozen base weights and trainable adapter tensors are sharded alike; gradients are
reduce-scattered and averaged over the processes, as DDP averages them, so the loss normalisation of
`asymlora.train.loop` holds unchanged. Checkpoints hold full (gathered) tensors in the DDP format, so a
sharded run resumes an unsharded one and vice versa (docs/distributed.md).

torch.distributed.checkpoint.state_dict does the gathering (maintained code for DTensor state dicts);
the index-keyed optimiser format is the one ``optimizer.state_dict()`` gives an unsharded run.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard

__all__ = ["full_adapter_state", "gathered_state", "is_sharded", "load_optimizer_state", "shard_model"]

_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


def shard_model(model: Any) -> None:
    """Shard ``model`` (a peft model) in place: one FSDP2 unit per transformer block, the HF model as root.

    Raises ValueError when the model names no transformer block class (``_no_split_modules``)."""
    base = model.get_base_model()
    blocks = set(getattr(base, "_no_split_modules", None) or [])
    units = [m for m in base.modules() if type(m).__name__ in blocks]
    if not units:
        raise ValueError(
            f"train.fsdp=true: {type(base).__name__} names no transformer block class (_no_split_modules) "
            "to shard by; use train.fsdp=false (DDP)"
        )
    for unit in units:
        fully_shard(unit)
    fully_shard(base)


def is_sharded(model: Any) -> bool:
    get_base = getattr(model, "get_base_model", None)
    return get_base is not None and isinstance(get_base(), FSDPModule)


def _names(model: Any, params: list[torch.nn.Parameter]) -> list[str]:
    """The fully qualified name of each of ``params``, in their order."""
    by_id = {id(p): name for name, p in model.named_parameters()}
    return [by_id[id(p)] for p in params]


def full_adapter_state(model: Any) -> dict[str, torch.Tensor] | None:
    """The trainable tensors of a sharded ``model``, gathered in full on rank 0 (None elsewhere, and for an
    unsharded model). A collective: every process calls it."""
    if not is_sharded(model):
        return None
    return cast(dict[str, torch.Tensor], get_model_state_dict(model, options=_GATHER)) or None


def gathered_state(
    model: Any, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(adapter state dict, optimiser state dict keyed by position in ``params``) of a sharded model, full on
    rank 0 (empty elsewhere). A collective: every process calls it."""
    adapter = cast(dict[str, torch.Tensor], get_model_state_dict(model, options=_GATHER))
    optim = cast(dict[str, Any], get_optimizer_state_dict(model, optimizer, options=_GATHER))
    if not optim:
        return adapter, {}
    index = {name: i for i, name in enumerate(_names(model, params))}
    return adapter, {
        "state": {index[name]: entry for name, entry in optim["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in optim["param_groups"]],
    }


def load_optimizer_state(
    model: Any, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], state: dict[str, Any]
) -> None:
    """Load an index-keyed full optimiser state dict (a checkpoint's) into the optimiser of a sharded model."""
    names = _names(model, params)
    by_name: Any = {
        "state": {names[int(i)]: entry for i, entry in state["state"].items()},
        "param_groups": [
            {**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]
        ],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
