"""The asymlora cache directory and the cross-process lock its writers hold.

Shared by the model loader (:mod:`asymlora.models`) and the BIG-bench fetcher (:mod:`asymlora.data.bigbench`),
which both build entries under one root once and reuse them (docs/design.md §7).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock

__all__ = ["CACHE_ENV_VAR", "DEFAULT_CACHE_ROOT", "cache_root", "file_lock"]

CACHE_ENV_VAR = "ASYMLORA_CACHE"
"""Environment variable that overrides the cache root (default ``~/.cache/asymlora``)."""

DEFAULT_CACHE_ROOT = "~/.cache/asymlora"


def cache_root() -> Path:
    """The asymlora cache root: ``$ASYMLORA_CACHE`` if set, else ``~/.cache/asymlora``."""
    return Path(os.environ.get(CACHE_ENV_VAR) or DEFAULT_CACHE_ROOT).expanduser()


@contextlib.contextmanager
def file_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` (created if needed) for the block, across processes.

    Uses the maintained ``filelock`` package (the lock ``asymlora sweep`` uses for its ledger too).
    """
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock_path)):
        yield
