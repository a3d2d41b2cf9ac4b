"""`AsymLoraModelForCausalLM`: peft's causal-LM wrapper, plus task ids and the balance loss.

peft's stock `PeftModelForCausalLM.forward` drops ``task_ids`` for every adapter type but Poly
(docs/design.md §10), so the layers of a task-routed adapter would never see them. This subclass hands them to
the layers for the duration of `forward`/`generate`, adds the weighted load-balancing loss to the training
loss, and checks an adapter file before any weight is touched when loading. It is registered for our own
task-type key, so `get_peft_model` and `PeftModel.from_pretrained` pick it.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

import torch
from peft import PeftModelForCausalLM
from peft.tuners.tuners_utils import check_target_module_exists
from safetensors import SafetensorError, safe_open
from torch import Tensor

from asymlora.methods import get_method
from asymlora.methods.base import ATTR_PREFIX
from asymlora.routing import add_balance_loss
from asymlora.tuner.config import AsymLoraConfig
from asymlora.tuner.layer import AsymLoraLayer, in_out_features
from asymlora.tuner.model import AsymLoraModel

ADAPTER_FILE = "adapter_model.safetensors"
PEFT_KEY_PREFIX = "base_model.model."


def _tuner(model: PeftModelForCausalLM) -> AsymLoraModel:
    """The asymlora tuner a peft model wraps (its ``base_model``); TypeError for another tuner."""
    tuner = model.base_model
    if not isinstance(tuner, AsymLoraModel):
        raise TypeError(
            f"the peft model wraps a {type(tuner).__name__}, not an asymlora adapter (AsymLoraModel)"
        )
    return tuner


class AsymLoraModelForCausalLM(PeftModelForCausalLM):
    """A peft causal-LM model whose forward and generate accept ``task_ids`` (LongTensor[batch])."""

    def __init__(self, model: Any, peft_config: Any, adapter_name: str = "default", **kwargs: Any) -> None:
        training = model.training
        # peft 0.21's PeftModel.__init__ reads `model.is_gradient_checkpointing`, which transformers 5
        # deprecated in favour of `is_activation_checkpointing` (same value): its FutureWarning names
        # nothing the user can change, so exactly that message is ignored, for this call only.
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning
            )
            super().__init__(model, peft_config, adapter_name, **kwargs)
        self.train(training)  # a new nn.Module starts in train mode; keep the base model's mode

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        task_ids: Tensor | None = None,
        **kwargs: Any,
    ):
        collect = labels is not None
        batch = _batch_size(input_ids, inputs_embeds)
        with _tuner(self).routing(task_ids, collect, batch, attention_mask) as call:
            out = super().forward(
                input_ids=input_ids,
                attention_mask=attention_mask,
                inputs_embeds=inputs_embeds,
                labels=labels,
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
                return_dict=return_dict,
                **kwargs,
            )
        if collect and call.aux_losses and getattr(out, "loss", None) is not None:
            out["loss"], aux = add_balance_loss(out.loss, call)
            out["balance_loss"] = aux.detach()
        return out

    def generate(self, *args: Any, task_ids: Tensor | None = None, **kwargs: Any):
        """peft's `generate` with one task id per prompt (each also covers its beams / return sequences)."""
        prompts = args[0] if args and torch.is_tensor(args[0]) else kwargs.get("input_ids")
        batch = _batch_size(prompts, kwargs.get("inputs_embeds"))
        with _tuner(self).routing(task_ids, batch=batch, generating=True):
            return super().generate(*args, **kwargs)

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, *args: Any, **kwargs: Any):
        """peft's `load_adapter`, after checking the file is readable and its shapes fit this model."""
        check_adapter_file(self, model_id, adapter_name)
        return super().load_adapter(model_id, adapter_name, *args, **kwargs)


def _batch_size(input_ids: Tensor | None, inputs_embeds: Tensor | None) -> int | None:
    """Rows of the batch (examples), from input_ids (batch, seq) or inputs_embeds (batch, seq, d)."""
    for t in (input_ids, inputs_embeds):
        if torch.is_tensor(t) and t.dim() >= 2:
            return t.shape[0]
    return None


def expected_shapes(model: AsymLoraModelForCausalLM, cfg: AsymLoraConfig) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> shape that `cfg` gives on `model`'s target modules (without injecting anything)."""
    method = get_method(cfg.method)
    base = _tuner(model).model
    shapes: dict[str, tuple[int, ...]] = {}
    for name, module in base.named_modules():
        if isinstance(module, AsymLoraLayer):
            module = module.get_base_layer()
        elif ".base_layer" in f".{name}":
            continue
        features = in_out_features(module)
        if features is None or not check_target_module_exists(cfg, name.removesuffix(".base_layer")):
            continue
        d_in, d_out = features
        specs = method.specs(cfg, d_in, d_out)
        for tensor, spec in specs.items():
            shapes[f"{PEFT_KEY_PREFIX}{name}.{ATTR_PREFIX}{tensor}"] = spec.shape
        if method.uses_router and cfg.router != "task":
            shapes[f"{PEFT_KEY_PREFIX}{name}.{ATTR_PREFIX}router"] = (cfg.num_experts, d_in)
    shapes.update(modules_to_save_shapes(base, cfg))
    return shapes


def modules_to_save_shapes(base: torch.nn.Module, cfg: AsymLoraConfig) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> shape of the full copies of ``cfg.modules_to_save`` (peft stores the module's own
    parameters under its name, ``base_model.model.<module>.<param>``)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, module in base.named_modules():
        if not any(name == m or name.endswith(f".{m}") for m in cfg.modules_to_save or ()):
            continue
        module = getattr(module, "original_module", module)  # already wrapped by peft's ModulesToSaveWrapper
        for param, value in module.named_parameters():
            shapes[f"{PEFT_KEY_PREFIX}{name}.{param}"] = tuple(value.shape)
    return shapes


def check_adapter_file(
    model: AsymLoraModelForCausalLM, model_id: str | os.PathLike, adapter_name: str
) -> None:
    """Raise a clear ValueError if a local adapter file is corrupted, truncated or shaped for another model."""
    path = os.path.join(os.fspath(model_id), ADAPTER_FILE)
    if not os.path.isfile(path):
        return  # hub ids and legacy .bin files: peft reports those itself
    try:
        with safe_open(path, framework="pt") as f:
            stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(
            f"{path} is not a readable safetensors file ({e}); it is corrupted or truncated. "
            "Save the adapter again (or restore it from a good copy)."
        ) from None
    cfg_path = os.path.join(os.fspath(model_id), "adapter_config.json")
    with open(cfg_path) as fh:
        raw = json.load(fh)
    if raw.get("peft_type") != "ASYMLORA":
        return
    cfg = AsymLoraConfig.from_pretrained(os.fspath(model_id))
    expected = expected_shapes(model, cfg)
    wrong = [(k, s, expected[k]) for k, s in stored.items() if k in expected and expected[k] != s]
    missing = sorted(set(stored) - set(expected))
    if wrong or missing:
        detail = "; ".join(f"{k}: file {s}, model {e}" for k, s, e in wrong[:3]) or (
            f"no module of this model for {missing[:3]}"
        )
        raise ValueError(
            f"adapter {os.fspath(model_id)!r} does not fit this model ({detail}). It was trained on a base "
            "model with other layer shapes or names; load it onto the base model it was trained with."
        )
