"""Tensor codecs for federated messages: sizes, NumPy arrays (Flower's ``ArrayRecord``) and safetensors bytes.

Pure functions over ``dict[str, Tensor]``; no Flower import (docs/design.md §4).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

__all__ = [
    "INT8_LEVELS",
    "SMALLEST_SCALE",
    "TRANSFER_DTYPES",
    "arrays_to_state",
    "bytes_to_state",
    "dequantize_int8_rows",
    "payload_bytes",
    "payload_params",
    "quantize_int8_rows",
    "rows_view",
    "state_to_arrays",
    "state_to_bytes",
    "transfer_payload_bytes",
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


# --- compressed transfers (docs/design.md §4, "Compressed transfers") ----------------------------------------
TRANSFER_DTYPES = ("float32", "bfloat16", "float16", "int8")
"""Wire dtypes of the shared tensors, per direction (``transfer.up`` / ``transfer.down``)."""
INT8_LEVELS = 127
"""Symmetric int8 grid: q ∈ [−127, 127] (−128 unused, so that q and −q are both representable)."""
SMALLEST_SCALE = torch.finfo(torch.float32).tiny
"""The smallest int8 row scale of a non-zero row: the smallest normal float32, 2^−126 ≈ 1.18e-38
(`quantize_int8_rows`)."""


def rows_view(t: Tensor) -> Tensor:
    """``t`` as a matrix of rows: (shape[0], numel / shape[0]) for ndim ≥ 2, one row for ndim ≤ 1."""
    return t.reshape(t.shape[0], math.prod(t.shape[1:])) if t.dim() >= 2 else t.reshape(1, t.numel())


def quantize_int8_rows(t: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-row absmax int8 quantisation: (q int8 of ``t``'s shape, scale float32 of shape (rows,)).

    Row i (`rows_view`) gets s_i = max(max_j |x_ij| / 127, `SMALLEST_SCALE`) and q_ij = round(x_ij / s_i) ∈
    [−127, 127] (round half to even), so |x_ij − s_i·q_ij| ≤ s_i / 2; an all-zero row has s_i = 0 and q = 0
    (decoded exactly). The arithmetic is float32 (the server's dtype). Raises ValueError for a non-finite or
    non-float tensor.

    Our own code: the scheme is the per-row ("per-channel") absmax of LLM.int8 (Dettmers et al. 2022,
    arXiv:2208.07339, §3.1), and neither torch's quantized tensors (per-channel affine, deprecated
    quantization API) nor bitsandbytes (CPU build) give an int8 + float32-scale pair to put on the wire.
    """
    if not t.dtype.is_floating_point:
        raise ValueError(f"int8 transfer quantises floating-point tensors, got {t.dtype}")
    x = rows_view(t.detach().to(torch.float32))
    if not bool(torch.isfinite(x).all()):
        raise ValueError("int8 transfer cannot quantise a tensor holding NaN or Inf")
    absmax = x.abs().amax(dim=1) if x.numel() else torch.zeros(x.shape[0])
    # a row of max |x| below 127 × the smallest normal float32 (1.5e-36) would get a subnormal scale, or 0 when
    # absmax / 127 underflows (the row then decoded to 0, its error above the s/2 bound); 1 / s overflows to
    # inf for a subnormal s, and flush-to-zero arithmetic (torch.set_flush_denormal, fast-math kernels) reads
    # it as 0. So the scale is held at the smallest normal, as maintained quantisers hold theirs away from 0
    # (torch.ao.quantization's observers: scale = max(scale, eps); fbgemm's ChooseQuantizationParams replaces
    # a scale whose reciprocal is inf); the tiny value of finfo.tiny leaves every other row's scale as it was.
    scale = torch.where(absmax > 0, torch.clamp_min(absmax / INT8_LEVELS, SMALLEST_SCALE), 0.0)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(x / safe[:, None]).clamp_(-INT8_LEVELS, INT8_LEVELS).to(torch.int8)
    return q.reshape(t.shape), scale.to(torch.float32)


def dequantize_int8_rows(q: Tensor, scale: Tensor) -> Tensor:
    """Inverse of `quantize_int8_rows` up to rounding: s_i · q_ij as float32, of ``q``'s shape."""
    rows = rows_view(q)
    if scale.shape != (rows.shape[0],):
        raise ValueError(
            f"int8 tensor of shape {tuple(q.shape)} needs {rows.shape[0]} row scales, got {tuple(scale.shape)}"
        )
    return (rows.to(torch.float32) * scale.to(torch.float32)[:, None]).reshape(q.shape)


def transfer_payload_bytes(tensors: Mapping[str, Tensor], transfer_dtype: str) -> int:
    """Bytes of tensor data ``tensors`` take on the wire at ``transfer_dtype`` (`TRANSFER_DTYPES`): numel × 4
    / 2 / 2 for float32 / bfloat16 / float16; numel + 4 × rows for int8 (one float32 scale per row).
    Non-floating tensors travel as they are. Works on meta tensors."""
    if transfer_dtype not in TRANSFER_DTYPES:
        raise ValueError(f"transfer dtype {transfer_dtype!r} is not one of {list(TRANSFER_DTYPES)}")
    total = 0
    for t in tensors.values():
        if not t.dtype.is_floating_point:
            total += t.numel() * t.element_size()
        elif transfer_dtype == "int8":
            total += t.numel() + 4 * rows_view(t).shape[0]
        else:
            total += t.numel() * getattr(torch, transfer_dtype).itemsize
    return total
