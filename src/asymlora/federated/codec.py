"""Tensor codecs for federated messages: sizes, NumPy arrays (Flower's ``ArrayRecord``) and safetensors bytes.

Pure functions over ``dict[str, Tensor]``; no Flower import (docs/design.md §4).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

__all__ = [
    "arrays_to_state",
    "bytes_to_state",
    "payload_bytes",
    "payload_params",
    "state_to_arrays",
    "state_to_bytes",
]


def payload_params(tensors: Mapping[str, Tensor]) -> int:
    """Number of values in a message (works on meta tensors)."""
    return sum(t.numel() for t in tensors.values())


def payload_bytes(tensors: Mapping[str, Tensor]) -> int:
    """Bytes of tensor data a message carries: Σ numel × element size, at the tensors' dtype.

    This is what a Flower ``ArrayRecord`` holds as array data; keys and array headers add a few dozen
    bytes per tensor (see `state_to_bytes` for an exact serialised size).
    """
    return sum(t.numel() * t.element_size() for t in tensors.values())


def state_to_arrays(tensors: Mapping[str, Tensor]) -> tuple[list[str], list[np.ndarray]]:
    """(keys, numpy arrays) in the given order: what Flower's ``ArrayRecord`` takes as a list."""
    keys = list(tensors)
    try:
        return keys, [tensors[k].detach().cpu().contiguous().numpy() for k in keys]
    except TypeError as e:  # bfloat16 / float8: NumPy has no such dtype
        raise TypeError(
            f"{e}: NumPy cannot hold these tensors; send them with asymlora.federated.client_app.to_record "
            "(bit-exact raw bytes) or state_to_bytes (safetensors)"
        ) from None


def arrays_to_state(keys: Sequence[str], arrays: Sequence[np.ndarray]) -> dict[str, Tensor]:
    """Inverse of `state_to_arrays`."""
    if len(keys) != len(arrays):
        raise ValueError(f"{len(keys)} keys for {len(arrays)} arrays")
    return {k: torch.from_numpy(np.array(a, copy=True)) for k, a in zip(keys, arrays, strict=True)}


def state_to_bytes(tensors: Mapping[str, Tensor]) -> bytes:
    """A state dict as safetensors bytes (exact, self-describing; len() is the real message size)."""
    return st_save({k: t.detach().cpu().contiguous() for k, t in tensors.items()})


def bytes_to_state(data: bytes | bytearray | io.BytesIO) -> dict[str, Tensor]:
    """Inverse of `state_to_bytes`; raises ValueError on corrupted bytes."""
    raw = data.getvalue() if isinstance(data, io.BytesIO) else bytes(data)
    try:
        return st_load(raw)
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"not a valid safetensors payload ({e})") from None
