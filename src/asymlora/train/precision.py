"""Mixed precision of the training forwards (``train.mixed_precision``): autocast to bfloat16.

asymlora autocasts itself rather than through accelerate's ``mixed_precision``: accelerate keeps one
process-wide state that refuses a second value in the same process (a library user training twice, the
federated client, tests), and the federated client does not use accelerate at all. Only bfloat16 is
offered: float16 needs loss scaling, which this loop does not do, and bfloat16 is what current GPUs and
CPUs with AVX512-BF16 or AMX run fast (docs/performance.md, "Target-position logits and bf16 autocast").
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

DTYPES = {"bf16": torch.bfloat16}
"""``train.mixed_precision`` value → autocast dtype."""


def autocast_dtype(mixed_precision: str | None) -> torch.dtype | None:
    """The autocast dtype of a ``train.mixed_precision`` value (None: off)."""
    return None if mixed_precision is None else DTYPES[mixed_precision]


def autocast(device: torch.device | str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` on ``device``'s type to ``dtype``; a null context when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)
