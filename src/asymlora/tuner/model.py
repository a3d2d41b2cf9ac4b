"""`AsymLoraModel`: the peft tuner (BaseTuner) that injects asymlora layers into a model."""

from __future__ import annotations

import copy
import warnings
import weakref
from collections.abc import Collection, Iterator
from contextlib import contextmanager

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, check_target_module_exists
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from peft.utils.constants import INCLUDE_LINEAR_LAYERS_SHORTHAND
from peft.utils.integrations import get_bnb_param_type
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from asymlora.methods.base import ATTR_PREFIX
from asymlora.routing import RoutingCall, RoutingState, bind_to_checkpoints, routing
from asymlora.tuner.config import AsymLoraConfig
from asymlora.tuner.layer import (
    SUPPORTED_BASE_LAYERS,
    SUPPORTED_NAMES,
    AsymLoraLayer,
    Linear,
    unpack_cpu_4bit,
)

WRAPPERS = ("base_layer", "original_module", "modules_to_save")
"""Module names that peft's wrappers insert (not names of the user's model)."""


def linear_module_names(model: nn.Module) -> list[str]:
    """Distinct leaf names of the nn.Linear / Conv1D modules of a model (what `target_modules` may name)."""
    return sorted(
        {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, SUPPORTED_BASE_LAYERS)}
    )


def adaptable_phrase(model: nn.Module) -> str:
    """'nn.Linear modules are [...]' (or 'nn.Linear and Conv1D modules are [...]' for GPT-2-like models)."""
    kinds = "nn.Linear and Conv1D" if any(isinstance(m, Conv1D) for m in model.modules()) else "nn.Linear"
    return f"{kinds} modules are {linear_module_names(model)}"


def module_leaf_names(model: nn.Module) -> list[str]:
    """Distinct last name parts of the other modules (e.g. embed_tokens, norm), adapter internals left out."""
    linear = set(linear_module_names(model))
    leaves = {k.rsplit(".", 1)[-1] for k, _ in model.named_modules() if k}
    return sorted(
        n for n in leaves - linear if not n.isdigit() and not n.startswith(ATTR_PREFIX) and n not in WRAPPERS
    )


def asymlora_config(config: PeftConfig) -> AsymLoraConfig:
    """``config`` narrowed to an AsymLoraConfig; TypeError for another peft config (peft types the tuner's
    hooks with the PeftConfig base class)."""
    if not isinstance(config, AsymLoraConfig):
        raise TypeError(f"AsymLoraModel takes an AsymLoraConfig, got a {type(config).__name__}")
    return config


def active_adapter_name(model: nn.Module) -> str:
    """The name of the adapter ``model`` runs: a PeftModel's ``active_adapter`` is one name, a peft tuner's
    (``PeftModel.base_model``, an `AsymLoraModel`) a list of them; "default" for a model without either.

    Raises ValueError when several adapters are active (which one to merge or export is then ambiguous)."""
    active = getattr(model, "active_adapter", "default")
    if isinstance(active, str):
        return active
    names = list(active)
    if len(names) != 1:
        raise ValueError(f"{len(names)} adapters are active ({names}); pass adapter_name= to choose one")
    return names[0]


def base_weight(module: nn.Module) -> nn.Parameter:
    """The ``weight`` parameter of a base layer (bitsandbytes' are Parameter subclasses); TypeError if none."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter):
        raise TypeError(
            f"{type(module).__name__} has no weight tensor; asymlora adapts {SUPPORTED_NAMES} only"
        )
    return weight


def _unmatched(names: Collection[str], keys: list[str]) -> list[str]:
    """Entries of a name list that equal no module key and are no dotted suffix of one (peft's list rule)."""
    return sorted(n for n in names if not any(k == n or k.endswith(f".{n}") for k in keys))


def check_config_names(model: nn.Module, config: AsymLoraConfig) -> None:
    """Raise ValueError naming every list entry of the config that selects nothing in `model`.

    peft ignores such entries as long as one entry matches, so a typo (``"v_prj"``) silently leaves a module
    unadapted. Checked: the lists ``target_modules``, ``exclude_modules`` and ``modules_to_save``, and the
    ``layers_to_transform`` indexes (each must hold a target module). Regex strings keep peft's semantics.
    """
    keys = [k for k, _ in model.named_modules() if k]
    problems = []
    for field_name in ("target_modules", "exclude_modules", "modules_to_save"):
        names = getattr(config, field_name)
        if isinstance(names, list | tuple | set) and (bad := _unmatched(names, keys)):
            problems.append(f"{field_name} entries {bad} match no module")
    layers = config.layers_to_transform
    if isinstance(config.target_modules, list | tuple | set) and layers is not None:
        one_layer = copy.copy(config)
        empty = []
        for index in [layers] if isinstance(layers, int) else layers:
            one_layer.layers_to_transform = [index]
            if not any(check_target_module_exists(one_layer, k) for k in keys):
                empty.append(index)
        if empty:
            problems.append(f"layers_to_transform indexes {empty} hold no target module")
    if problems:
        raise ValueError(
            f"{'; '.join(problems)} of {type(model).__name__}. Its {adaptable_phrase(model)}; its other "
            f"modules {module_leaf_names(model)}. Fix the names (a list "
            "entry matches a module whose name equals it or ends with '.<entry>')."
        )


def check_target_types(model: nn.Module, config: AsymLoraConfig) -> None:
    """Raise ValueError naming every module that the config targets but asymlora cannot adapt.

    Runs before any module is replaced, so a refused config leaves the model untouched (peft would raise
    half-way through the injection). Supported: `asymlora.tuner.layer.SUPPORTED_BASE_LAYERS`.
    """
    bad = []
    for key, module in model.named_modules():
        parts = key.split(".")
        if not key or any(p in WRAPPERS or p.startswith(ATTR_PREFIX) for p in parts):
            continue
        if not isinstance(module, (*SUPPORTED_BASE_LAYERS, AsymLoraLayer)) and check_target_module_exists(
            config, key
        ):
            bad.append(f"{key} ({type(module).__module__}.{type(module).__name__})")
    if bad:
        shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        raise ValueError(
            f"target_modules={config.target_modules!r} selects modules of {type(model).__name__} that asymlora "
            f"cannot adapt: {shown}. Supported base layers: {SUPPORTED_NAMES}. Fix: drop those names from "
            f"target_modules (or list them in exclude_modules); its {adaptable_phrase(model)}."
        )


def guard_4bit_state_dicts(model: nn.Module) -> None:
    """Make every bitsandbytes 4-bit layer of ``model`` undo its CPU repacking correctly before ``state_dict()``.

    bitsandbytes' own inverse, run by ``state_dict()`` (so by every ``save_pretrained`` of a training run that
    validated in eval mode), leaves the block scales transposed without double quantisation: the frozen base
    is silently corrupted from then on. A state-dict pre-hook (`unpack_cpu_4bit`) runs first, once per layer."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (
            isinstance(weight, nn.Parameter)
            and get_bnb_param_type(weight) == "4bit"
            and module not in _GUARDED
        ):
            module.register_state_dict_pre_hook(lambda m, prefix, keep_vars: unpack_cpu_4bit(m))
            _GUARDED.add(module)


_GUARDED: weakref.WeakSet[nn.Module] = weakref.WeakSet()
"""The 4-bit layers that already carry the hook of `guard_4bit_state_dicts`."""


class AsymLoraModel(BaseTuner):
    """Injects `asymlora.tuner.layer.Linear` into the target nn.Linear / Conv1D modules of a model.

    Holds the `RoutingState` shared by its layers: `routing(task_ids)` makes a batch's task ids visible to
    them for one forward/generate and collects their balance losses.
    """

    prefix: str = ATTR_PREFIX
    tuner_layer_cls = AsymLoraLayer
    # peft annotates the class attribute as dict[str, list[str]] and its own LoRA table with Sequence values
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING  # type: ignore[assignment]

    def _pre_injection_hook(self, model: nn.Module, config: PeftConfig, adapter_name: str) -> None:
        if not hasattr(self, "routing_state"):
            self.routing_state = RoutingState()
        guard_4bit_state_dicts(model)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        """peft's injection (get_peft_model, add_adapter, load_adapter), after checking the config's names."""
        config = asymlora_config(self.peft_config[adapter_name])
        shorthand = str(config.target_modules).lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND  # peft expands it
        if config.target_modules is not None:  # None: filled in from peft's per-architecture defaults
            check_config_names(model, config)
            if not shorthand and not any(
                check_target_module_exists(config, key) for key, _ in model.named_modules()
            ):
                raise ValueError(
                    f"target_modules={config.target_modules!r} match no module of {type(model).__name__}. "
                    f"Its {adaptable_phrase(model)}."
                )
        super().inject_adapter(model, adapter_name, *args, **kwargs)

    def _prepare_adapter_config(self, peft_config: PeftConfig, model_config: dict) -> PeftConfig:
        """target_modules=None: peft's LoRA defaults for the model type (``target_module_mapping``)."""
        if asymlora_config(peft_config).target_modules is not None:
            return super()._prepare_adapter_config(peft_config, model_config)
        # a dict from transformers' config.to_dict(); a model outside transformers may carry any object
        get = model_config.get if isinstance(model_config, dict) else lambda k: getattr(model_config, k, None)
        model_type = get("model_type")
        if model_type not in self.target_module_mapping:
            raise ValueError(
                f"target_modules=None, but peft has no default LoRA target modules for model_type "
                f"{model_type!r} ({type(self.model).__name__}). Pass target_modules (names, or 'all-linear' "
                f"for every projection); its {adaptable_phrase(self.model)}."
            )
        return super()._prepare_adapter_config(peft_config, model_config)

    def _prepare_model(self, peft_config: PeftConfig, model: nn.Module) -> None:
        """peft's hook after the defaults are filled in and before any module is replaced."""
        check_target_types(model, asymlora_config(peft_config))

    def _create_and_replace(
        self,
        peft_config: PeftConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: str | None = None,
    ) -> None:
        peft_config = asymlora_config(peft_config)
        if isinstance(target, AsymLoraLayer):
            target.update_layer(adapter_name, peft_config)  # keeps the layer's train/eval mode
            return
        if not isinstance(target, SUPPORTED_BASE_LAYERS):
            raise ValueError(
                f"target module {current_key!r} is a {type(target).__name__}; asymlora adapts {SUPPORTED_NAMES} "
                f"only. Choose target_modules among: {linear_module_names(self.model)}."
            )
        conv1d = isinstance(target, Conv1D)
        if peft_config.fan_in_fan_out != conv1d:  # peft's LoRA dispatch: warn and follow the module type
            kind = "Conv1D" if conv1d else "torch.nn.Linear"
            warnings.warn(
                f"fan_in_fan_out is set to {peft_config.fan_in_fan_out} but the target module is `{kind}`. "
                f"Setting fan_in_fan_out to {conv1d}.",
                stacklevel=2,
            )
            peft_config.fan_in_fan_out = conv1d
        new_module = Linear(target, adapter_name, peft_config, self.routing_state).train(target.training)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    # --- merging ---------------------------------------------------------------------------------
    def _check_merge_allowed(self) -> None:
        """peft calls this before merge_adapter / merge_and_unload write into base weights (peft only warns
        about tied weights there; we untie them). A quantised base weight is refused before any write."""
        for name, layer in self.adapter_layers():
            layer.refuse_quantized_merge(name)
        self.untie_adapted_weights()

    def untie_adapted_weights(self) -> list[str]:
        """Give each adapted layer whose base weight is shared (tied) with other parameters its own copy.

        Merging adds ΔW into the base weight; through a tied lm_head it would also change the input
        embedding. Warns naming the tied weights, sets the config's ``tie_word_embeddings`` to False (so a
        saved merged model is not re-tied on load) and returns the names of the layers untied.
        """
        owners: dict[int, list[str]] = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            if p.data_ptr():
                owners.setdefault(p.data_ptr(), []).append(name)
        untied = {}
        for name, layer in self.adapter_layers():
            base = layer.get_base_layer()
            weight = base_weight(base)
            others = [n for n in owners.get(weight.data_ptr(), []) if not n.startswith(f"{name}.")]
            if others:
                base.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
                untied[name] = others
        if untied:
            config = getattr(self.model, "config", None)
            for c in {
                id(c): c for c in (config, getattr(config, "get_text_config", lambda: None)())
            }.values():
                if c is not None and getattr(c, "tie_word_embeddings", False):
                    c.tie_word_embeddings = False
            detail = "; ".join(f"{k}.weight is tied to {v}" for k, v in untied.items())
            warnings.warn(
                f"Merging into tied weights would change them everywhere ({detail}). Untied them: the merged "
                "layers now own a copy of the weight, and tie_word_embeddings is set to False.",
                stacklevel=3,
            )
        return list(untied)

    # --- routing ---------------------------------------------------------------------------------
    def adapter_layers(self) -> Iterator[tuple[str, AsymLoraLayer]]:
        """(qualified name, layer) of every asymlora layer in the model."""
        for name, module in self.model.named_modules():
            if isinstance(module, AsymLoraLayer):
                yield name, module

    @contextmanager
    def routing(
        self,
        task_ids: Tensor | None,
        collect_aux: bool = False,
        batch: int | None = None,
        attention_mask: Tensor | None = None,
        generating: bool = False,
    ) -> Iterator[RoutingCall]:
        """Route the next forward/generate by `task_ids` (LongTensor[batch]) and collect balance losses.

        ``batch``: the number of examples of the call; a `task_ids` of another length raises ValueError (in
        generate each id also covers the beams / return sequences of its example). ``attention_mask``
        (batch, seq): balance losses count the real tokens only. Task ids are checked against every active
        adapter with ``router="task"`` before any layer runs. Checkpointed layers see the call when they are
        recomputed in backward.
        """
        task_ids = self._checked_task_ids(task_ids, batch)
        call = RoutingCall(task_ids, attention_mask, repeat_rows=generating, collect_aux=collect_aux)
        bind_to_checkpoints(self.model, self.routing_state)
        with routing(self.routing_state, call):
            yield call

    def _checked_task_ids(self, task_ids: Tensor | None, batch: int | None) -> Tensor | None:
        if task_ids is None:
            return None
        task_ids = torch.as_tensor(task_ids)
        if task_ids.dim() != 1 or task_ids.dtype.is_floating_point:
            raise ValueError(
                f"task_ids must be a 1-D integer tensor with one id per example, got shape "
                f"{tuple(task_ids.shape)} and dtype {task_ids.dtype}"
            )
        if batch is not None and task_ids.shape[0] != batch:
            raise ValueError(
                f"task_ids has {task_ids.shape[0]} entries but the batch has {batch} examples; "
                "pass one task id per example."
            )
        for name in self.active_adapters:
            cfg = self.peft_config.get(name)
            if isinstance(cfg, AsymLoraConfig) and cfg.router == "task" and task_ids.numel():
                lo, hi = int(task_ids.min()), int(task_ids.max())
                if lo < 0 or hi >= cfg.num_experts:
                    bad = lo if lo < 0 else hi
                    raise ValueError(
                        f"task id {bad} is outside [0, {cfg.num_experts}) for adapter {name!r} "
                        f"(num_experts={cfg.num_experts}); pass ids 0..{cfg.num_experts - 1}."
                    )
        return task_ids.long()
