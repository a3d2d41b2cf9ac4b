"""Training checkpoints: adapter, optimiser, scheduler and RNG state, written atomically, no pickles.

A checkpoint is a directory ``checkpoints/step-000050`` that appears complete or not at all (written in a
temporary directory, then renamed). Tensors go to safetensors files, everything else to JSON.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from asymlora.io import atomic_dir

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
ADAPTER_FILE = "adapter_model.safetensors"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:06d}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return None
    done = sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file())
    return done[-1] if done else None


def _optimizer_to_files(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, plain = {}, {"param_groups": state["param_groups"], "state": {}}
    for idx, entry in state["state"].items():
        plain["state"][str(idx)] = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                plain["state"][str(idx)][key] = value
    return tensors, plain


def _optimizer_from_files(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in plain["state"].items()}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": plain["param_groups"]}


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    extra: dict[str, Any],
    keep: int,
    rng: dict[str, torch.Tensor] | None = None,
    sharded: tuple[dict[str, Any], dict[str, Any]] | None = None,
    files: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically and prune all but the newest ``keep``.

    ``rng``: CPU RNG states to store (``torch`` for rank 0, ``torch.rankR`` for the other processes of a
    multi-process run); default: this process's state as ``torch``. ``sharded``: for an FSDP-sharded model,
    its gathered (adapter state dict, index-keyed optimizer state dict), saved in place of the model's own.
    ``files``: more safetensors files to write, ``{file name: tensors}`` (e.g. the stopping rule's best
    adapter), read back with :func:`load_tensors`.
    """
    target = checkpoint_dir(run_dir, step)
    adapter_state, optimizer_state = sharded if sharded is not None else (None, optimizer.state_dict())
    opt_tensors, opt_plain = _optimizer_to_files(optimizer_state)
    rng = dict(rng) if rng is not None else {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and not any(k.startswith("cuda.") for k in rng):
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    with atomic_dir(target, overwrite=True) as tmp:
        model.save_pretrained(
            str(tmp), **({"state_dict": adapter_state} if adapter_state is not None else {})
        )
        save_file(opt_tensors, str(tmp / OPTIMIZER_FILE))
        save_file(rng, str(tmp / RNG_FILE))
        for name, tensors in (files or {}).items():
            save_file(tensors, str(tmp / name))
        state = {
            "step": step,
            "optimizer": opt_plain,
            "scheduler": scheduler.state_dict(),
            **extra,
        }
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1, default=str))
    older = sorted((run_dir / "checkpoints").glob("step-*"))[:-keep] if keep > 0 else []
    for path in older:
        shutil.rmtree(path, ignore_errors=True)
    return target


def load_tensors(path: Path, name: str) -> dict[str, torch.Tensor]:
    """The tensors of file ``name`` of checkpoint ``path`` (written by ``save_checkpoint(files=...)``; CPU);
    empty when the checkpoint has no such file."""
    file = path / name
    return load_file(str(file)) if file.is_file() else {}


def load_adapter_weights(path: Path, model: Any, adapter_name: str = "default") -> None:
    """Load a checkpoint's adapter weights into ``model`` (a peft model); raises ValueError on a mismatch."""
    weights = load_file(str(path / ADAPTER_FILE))
    result = set_peft_model_state_dict(model, weights, adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"checkpoint {path} does not match this model (unexpected keys {unexpected[:3]})")


def load_checkpoint(
    path: Path,
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    adapter_name: str = "default",
    rank: int = 0,
    load_optimizer: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Restore a checkpoint into the given objects; returns its JSON state (step, extra fields).

    Process ``rank`` gets its own CPU RNG state back (``torch.rankR``; rank 0's when the checkpoint has none).
    ``load_optimizer``: called with the optimiser state dict (CPU tensors) instead of
    ``optimizer.load_state_dict`` (an FSDP-sharded model, whose adapter weights :func:`load_adapter_weights`
    restored before sharding; ``model`` is then ignored).
    """
    state = json.loads((path / STATE_FILE).read_text())
    if load_optimizer is None:
        load_adapter_weights(path, model, adapter_name)
    opt_state = _optimizer_from_files(load_file(str(path / OPTIMIZER_FILE)), state["optimizer"])
    if load_optimizer is not None:
        load_optimizer(opt_state)
    else:
        device = next(p.device for p in model.parameters() if p.requires_grad)
        for entry in opt_state["state"].values():
            entry.update({k: v.to(device) for k, v in entry.items() if torch.is_tensor(v) and v.dim() > 0})
        optimizer.load_state_dict(opt_state)
    scheduler.load_state_dict(state["scheduler"])
    rng = load_file(str(path / RNG_FILE))
    torch.set_rng_state(rng.get(f"torch.rank{rank}", rng["torch"]))
    if f"cuda.rank{rank}" in rng and torch.cuda.is_available():  # this process's own GPU
        torch.cuda.set_rng_state(rng[f"cuda.rank{rank}"], torch.cuda.current_device())
    elif (
        cuda := [rng[k] for k in sorted(rng) if k.startswith("cuda") and "." not in k]
    ) and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    return state
