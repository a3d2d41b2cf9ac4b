"""Progress of the long phases (download, model conversion, training, evaluation), and ``--quiet``.

Every phase that can last more than a few seconds shows a tqdm bar on stderr that says what it is doing.
``asymlora COMMAND --quiet`` (or ``ASYMLORA_QUIET=1`` in the environment) turns them all off, in this
process and in the processes it starts (pip, Ray actors): the switch is an environment variable so that
it reaches them. :func:`quiet` also switches off the bars of transformers and huggingface_hub
("Loading weights", downloads).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

__all__ = ["QUIET_ENV", "bar", "enabled", "quiet", "set_env"]

QUIET_ENV = "ASYMLORA_QUIET"
"""Environment variable: any value but ``""``/``"0"`` switches progress output off."""


def enabled() -> bool:
    """Whether progress bars are shown (False under ``--quiet`` / ``ASYMLORA_QUIET=1``)."""
    return os.environ.get(QUIET_ENV, "") in ("", "0")


def _hf_bars(on: bool) -> None:
    """Switch the bars of transformers and huggingface_hub on or off (transformers tells huggingface_hub)."""
    (hf_logging.enable_progress_bar if on else hf_logging.disable_progress_bar)()


@contextlib.contextmanager
def set_env(**values: str) -> Iterator[None]:
    """Environment variables set for the block (processes started meanwhile inherit them), then restored."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No progress bar in the block, in this process and in the processes it starts meanwhile.

    Sets :data:`QUIET_ENV` and ``HF_HUB_DISABLE_PROGRESS_BARS`` (read by huggingface_hub and, at import,
    by transformers), tells transformers / huggingface_hub directly, and restores
    all of it afterwards.
    """
    was_enabled = enabled()
    hf_bars_were_on = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") is None
    _hf_bars(False)
    try:
        with set_env(**{QUIET_ENV: "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}):
            yield
    finally:
        if was_enabled and hf_bars_were_on:
            _hf_bars(True)


def bar(iterable: Iterable[Any] | None = None, *, desc: str, **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr named ``desc`` (what the phase is doing), off when :func:`enabled` is False.

    ``kwargs`` go to tqdm (``total``, ``unit``, ``unit_scale``, ``leave``, ...).
    """
    kwargs.setdefault("disable", not enabled())
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, desc=desc, **kwargs)
