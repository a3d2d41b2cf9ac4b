"""Mixed precision of the training forwards (``train.mixed_precision``): autocast to bfloat16.

asymlora autocasts itself rather than through accelerate's ``mixed_precision``: accelerate keeps one
process-wide state that refuses a second value in the same process (a library user training twice, the
federated client, tests), and the federated client does not use accelerate at all. Only bfloat16 is
offered: float16 needs loss scaling, which this loop does not do, and bfloat16 is what current GPUs and
CPUs with AVX512-BF16 or AMX run fast (docs/performance.md, "Target-position logits and bf16 autocast").
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16}
"""``train.mixed_precision`` value → autocast dtype."""

EMULATED_BF16 = (
    "train.mixed_precision=bf16 on a CPU without bfloat16 instructions (AVX512-BF16 or AMX; this one: {cpu}): "
    "autocast emulates bfloat16 there and runs slower than float32 (the campaign's training step measured "
    '13-26x slower on an AMD EPYC with AVX2; docs/sweep.md, "bf16 or float32"). Set '
    "train.mixed_precision=null to train in float32 on this machine (a campaign's cell id includes it)."
)
"""The warning of `emulated_bf16_message`; the figure is benchmarks/results/train_precision_avx2.json's."""


def autocast_dtype(mixed_precision: str | None) -> torch.dtype | None:
    """The autocast dtype of a ``train.mixed_precision`` value (None: off)."""
    return None if mixed_precision is None else DTYPES[mixed_precision]


def autocast(device: torch.device | str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` on ``device``'s type to ``dtype``; a null context when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    kind = torch.device(device).type
    if kind == "cpu" and dtype == torch.bfloat16:
        _warn_if_emulated()
    return torch.autocast(kind, dtype=dtype)


def cpu_has_bf16() -> bool | None:
    """Whether this CPU has bfloat16 dot-product instructions that oneDNN uses under autocast (AVX512-BF16 or
    AMX tiles); None when this torch cannot say. torch exposes the check only as private functions of
    ``torch.cpu`` (no public equivalent in torch 2.13), hence the guard."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:
        return None


@functools.cache
def _warn_if_emulated() -> None:
    """Warn once per process when bf16 autocast runs on a CPU without bfloat16 instructions."""
    if cpu_has_bf16() is False:
        logger.warning(emulated_bf16_message())


def emulated_bf16_message() -> str:
    """Why bf16 autocast is slow on this CPU, and the fix (`EMULATED_BF16`, naming the CPU's capability)."""
    return EMULATED_BF16.format(cpu=torch.backends.cpu.get_cpu_capability())
