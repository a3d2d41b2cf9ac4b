"""`AsymLoraModel`: the peft tuner (BaseTuner) that injects asymlora layers into a model."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from peft.tuners.tuners_utils import BaseTuner, check_target_module_exists
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import Tensor, nn

from asymlora.methods.base import ATTR_PREFIX
from asymlora.routing import RoutingState, routing
from asymlora.tuner.config import AsymLoraConfig
from asymlora.tuner.layer import AsymLoraLayer, Linear


def linear_module_names(model: nn.Module) -> list[str]:
    """Distinct leaf names of the nn.Linear modules of a model (what `target_modules` may name)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})


class AsymLoraModel(BaseTuner):
    """Injects `asymlora.tuner.layer.Linear` into the target nn.Linear modules of a model.

    Holds the `RoutingState` shared by its layers: `routing(task_ids)` makes a batch's task ids visible to
    them for one forward/generate and collects their balance losses.
    """

    prefix: str = ATTR_PREFIX
    tuner_layer_cls = AsymLoraLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _pre_injection_hook(self, model: nn.Module, config: AsymLoraConfig, adapter_name: str) -> None:
        if not hasattr(self, "routing_state"):
            self.routing_state = RoutingState()
        if config.target_modules is None:
            return  # filled in from peft's per-architecture defaults by _prepare_adapter_config
        if not any(check_target_module_exists(config, key) for key, _ in model.named_modules()):
            raise ValueError(
                f"target_modules={config.target_modules!r} match no module of {type(model).__name__}. "
                f"Its nn.Linear modules are: {linear_module_names(model)}."
            )

    def _create_and_replace(
        self,
        peft_config: AsymLoraConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs,
    ) -> None:
        if isinstance(target, AsymLoraLayer):
            target.update_layer(adapter_name, peft_config)
            return
        if not isinstance(target, nn.Linear):
            raise ValueError(
                f"target module {current_key!r} is a {type(target).__name__}; asymlora adapts nn.Linear modules "
                f"only. Choose target_modules among: {linear_module_names(self.model)}."
            )
        new_module = Linear(target, adapter_name, peft_config, self.routing_state)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    # --- routing ---------------------------------------------------------------------------------
    def adapter_layers(self) -> Iterator[tuple[str, AsymLoraLayer]]:
        """(qualified name, layer) of every asymlora layer in the model."""
        for name, module in self.model.named_modules():
            if isinstance(module, AsymLoraLayer):
                yield name, module

    @contextmanager
    def routing(self, task_ids: Tensor | None, collect_aux: bool = False) -> Iterator[RoutingState]:
        """Route the next forward/generate by `task_ids` (LongTensor[batch]) and collect balance losses.

        Task ids are checked against every active adapter with ``router="task"`` before any layer runs.
        """
        if task_ids is not None:
            task_ids = torch.as_tensor(task_ids)
            if task_ids.dim() != 1 or task_ids.dtype.is_floating_point:
                raise ValueError(
                    f"task_ids must be a 1-D integer tensor with one id per example, got shape "
                    f"{tuple(task_ids.shape)} and dtype {task_ids.dtype}"
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
            task_ids = task_ids.long()
        with routing(self.routing_state, task_ids, collect_aux) as state:
            yield state
