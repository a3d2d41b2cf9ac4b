"""The vocabulary projection on target positions only: the same causal-LM loss for less compute.

Prompt-masked training predicts a few answer tokens per example (in the default BIG-bench mixture about 35
target tokens in a batch of 8 padded to ~114 positions each), yet a plain forward projects every position
onto the vocabulary (49,152 rows for SmolLM2), and that projection and its backward are a large share of a
SmolLM2-135M training step (docs/performance.md, "Target-position logits and bf16 autocast").
transformers 5 computes logits only where a boolean
``(batch, seq)`` mask ``logits_to_keep`` is true (`transformers.modeling_utils.slice_logits_to_keep`:
logits ``(n_targets, vocab)``) and its causal-LM loss takes the matching ``shift_labels`` ``(n_targets,)``,
so the loss — mean over target tokens, or sum / ``num_items_in_batch`` — is the same number (the same
terms; up to float summation order), its gradient likewise, and the balance loss of the routers still
rides on ``labels`` (`asymlora.tuner.peft_model`). Models whose forward does not slice with
`slice_logits_to_keep` are given the batch unchanged.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
import torch.nn.functional as F

from asymlora.data.collate import IGNORE_INDEX


def base_model(model: Any) -> Any:
    """The transformers model inside DDP (``.module``) and peft (``get_base_model()``) wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


@functools.cache
def _class_slices_logits(cls: type) -> bool:
    forward = inspect.unwrap(getattr(cls, "forward", None) or (lambda: None))
    code = getattr(forward, "__code__", None)
    # both names called by the forward: the causal-LM classes of encoder-decoder families (Bart, Marian, ...)
    # and XLM / XLNet slice their logits but compute their own loss, which knows no shift_labels
    if code is None or not {"slice_logits_to_keep", "loss_function"} <= set(code.co_names):
        return False
    return "logits_to_keep" in inspect.signature(forward).parameters


def slices_logits(model: Any) -> bool:
    """Whether ``model`` (possibly peft- or DDP-wrapped) takes a boolean ``logits_to_keep`` mask and
    ``shift_labels``: its class's forward calls transformers' `slice_logits_to_keep` and its
    ``loss_function``."""
    return _class_slices_logits(type(base_model(model)))  # type: ignore[arg-type]  # a class is hashable


def target_mask(labels: torch.Tensor) -> torch.Tensor:
    """Bool ``(batch, seq)``: position t predicts a target (``labels[:, t + 1] != -100``); the last is false."""
    shift = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return shift != IGNORE_INDEX


def on_targets(model: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``batch`` (with ``labels`` (batch, seq)) plus ``logits_to_keep`` (the `target_mask`) and
    ``shift_labels`` (n_targets,) when ``model`` `slices_logits`; otherwise ``batch`` itself.

    ``model(**on_targets(model, batch)).loss`` equals ``model(**batch).loss``; its ``logits`` are
    ``(n_targets, vocab)`` instead of ``(batch, seq, vocab)``."""
    labels = batch.get("labels")
    if labels is None or not slices_logits(model):
        return batch
    keep = target_mask(labels)
    return {**batch, "logits_to_keep": keep, "shift_labels": labels[:, 1:][keep[:, :-1]]}
