"""Adapted-module names: layer number, module type and their natural order (layer 2 before layer 10)."""

from __future__ import annotations

import re
from typing import Any

__all__ = ["layer_and_type", "module_order", "short_name", "slug"]


def layer_and_type(module: str) -> tuple[int | None, str]:
    """``model.layers.12.self_attn.q_proj`` -> (12, "q_proj"); (None, name) when there is no layer number."""
    m = re.search(r"\.(\d+)\.", f".{module}.")
    return (int(m.group(1)) if m else None), module.rsplit(".", 1)[-1]


def module_order(module: str) -> tuple[Any, ...]:
    """Sort key putting module names in natural order: layer number, then module.

    ``model.layers.2.mlp.down_proj`` < ``model.layers.2.self_attn.q_proj`` < ``model.layers.10.self_attn.q_proj``
    (a plain string sort puts layer 10 before layer 2). Every digit run compares as a number.
    """
    parts = re.split(r"(\d+)", module)  # text at even positions, digit runs at odd positions
    return tuple(int(p) if n % 2 else p for n, p in enumerate(parts))


def short_name(module: str) -> str:
    """``model.layers.12.self_attn.q_proj`` -> ``12.q_proj`` (axis labels)."""
    layer, kind = layer_and_type(module)
    return f"{layer}.{kind}" if layer is not None else module


def slug(text: str) -> str:
    """A file-name-safe lowercase form of ``text`` (``"pairing"`` when nothing is left)."""
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower() or "pairing"
