"""The peft tuner layer: stores an adapter method's tensors beside a frozen nn.Linear and runs its math.

    y = W0 x + s · delta_method(dropout(x), tensors, g(x))

The tensors of adapter ``name`` live in ParameterDicts ``asymlora_<tensor>[name]`` (peft's layout, so
saving, loading, switching, disabling and deleting adapters work through peft's own code paths). Which
tensors exist, their shapes and roles come from the method (`asymlora.methods`).
"""

from __future__ import annotations

import warnings
from typing import Any, cast

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from peft.utils.integrations import dequantize_bnb_weight, get_bnb_param_type
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from asymlora.methods import get_method
from asymlora.methods.base import ATTR_PREFIX, TENSOR_NAMES, Role, TensorSpec, kaiming_
from asymlora.routing import (
    RoutingCall,
    RoutingState,
    attach_balance_loss,
    balance_loss,
    router_probs,
    task_gate,
    topk_gate,
)
from asymlora.tuner.config import AsymLoraConfig

SUPPORTED_BASE_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)
"""Base layer types asymlora adapts: ``nn.Linear`` (weight d_out × d_in) and transformers' ``Conv1D`` (GPT-2
family, weight stored transposed, d_in × d_out; peft's ``fan_in_fan_out``)."""
SUPPORTED_NAMES = "torch.nn.Linear, transformers.pytorch_utils.Conv1D"


def in_out_features(module: nn.Module) -> tuple[int, int] | None:
    """(d_in, d_out) of a supported base layer, or None for any other module type.

    ``Conv1D`` computes ``x @ W + b`` with W of shape (d_in, d_out), so d_in = W.shape[0] (as in peft)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        d_in, d_out = module.weight.shape
        return d_in, d_out
    return None


def unpack_cpu_4bit(module: nn.Module) -> None:
    """Undo, in place, bitsandbytes' CPU repacking of a ``Linear4bit`` weight (a no-op for any other layer).

    bitsandbytes repacks a 4-bit weight on its first CPU eval forward and stores the block scales transposed,
    (d_in / blocksize, d_out) in bf16. Its own inverse (run by ``state_dict()``, hence by ``save_pretrained``)
    restores the scales only for double quantisation: without it they stay transposed, and every later
    dequantisation or forward of a layer with d_in > blocksize reads the wrong scale for most blocks
    (bitsandbytes 0.50.2). Here the scales are put back in their (d_out · d_in / blocksize,) order."""
    weight = getattr(module, "weight", None)
    state = getattr(weight, "quant_state", None)
    if weight is None or state is None or not getattr(state, "packing_format_for_cpu", False):
        return
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse  # optional dependency

    scales, nested = state.absmax, state.original_nested
    weight.data, state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
    if not nested:  # the inverse re-quantises the scales of a nested state only
        state.absmax = scales.T.reshape(-1).float()
    weight.quant_state = state


def dequantized_weight(module: nn.Module) -> Tensor:
    """The base layer's weight as stored, in floating point: a bitsandbytes 4-bit/8-bit weight dequantised
    (d_out × d_in; a CPU-repacked 4-bit weight is unpacked first, `unpack_cpu_4bit`), any other one as is."""
    weight = cast(nn.Parameter, module.weight)
    if not get_bnb_param_type(weight):
        return weight
    unpack_cpu_4bit(module)
    return dequantize_bnb_weight(cast(nn.Parameter, module.weight), state=getattr(module, "state", None))


def no_task_ids_error(adapter_name: str) -> ValueError:
    """The error of a task-routed forward that was given no task ids (what to pass, and where)."""
    return ValueError(
        f"adapter {adapter_name!r} uses router='task' but no task_ids were given: call "
        "model(..., task_ids=LongTensor[batch]) (or model.generate(..., task_ids=...)); with transformers' "
        "Trainer or TRL's SFTTrainer use asymlora.hf.AsymLoraTrainer / AsymLoraSFTTrainer and a task column."
    )


class AsymLoraLayer(BaseTunerLayer):
    """Mixin holding asymlora adapters on a base layer (peft's BaseTunerLayer contract)."""

    adapter_layer_names: tuple[str, ...] = tuple(ATTR_PREFIX + n for n in TENSOR_NAMES)
    other_param_names: tuple[str, ...] = ("asymlora_config", "asymlora_dropout")
    # set by nn.Module (the concrete layers derive from it) and by __init__ (one ParameterDict per tensor name)
    training: bool
    _modules: dict[str, nn.Module | None]
    asymlora_router: nn.ParameterDict

    def __init__(self, base_layer: nn.Module, routing_state: RoutingState, **kwargs: Any) -> None:
        self.base_layer = base_layer
        for attr in self.adapter_layer_names:
            setattr(self, attr, nn.ParameterDict())
        self.asymlora_config: dict[str, AsymLoraConfig] = {}
        self.asymlora_dropout = nn.ModuleDict()
        self.routing_state = routing_state
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.frozen_peft_weight_names = {}
        base = self.get_base_layer()
        features = in_out_features(base)
        if features is None:
            raise TypeError(
                f"asymlora cannot adapt a {type(base).__module__}.{type(base).__name__}; supported base layers: "
                f"{SUPPORTED_NAMES}. Choose target_modules among the model's modules of those types."
            )
        self.in_features, self.out_features = features
        # peft's name: W0 is stored (d_in × d_out), so a merge adds ΔWᵀ
        self.fan_in_fan_out = isinstance(base, Conv1D)

    def base_weight(self) -> nn.Parameter:
        """W0, the base layer's weight (nn.Linear: d_out × d_in; Conv1D: d_in × d_out; bitsandbytes' quantised
        parameters are ``nn.Parameter`` subclasses)."""
        return cast(nn.Parameter, self.get_base_layer().weight)

    # --- construction --------------------------------------------------------------------------
    def specs(self, adapter_name: str) -> dict[str, TensorSpec]:
        """Every tensor of this adapter on this layer (router included when routing is learned)."""
        cfg = self.asymlora_config[adapter_name]
        method = get_method(cfg.method)
        specs = method.specs(cfg, self.in_features, self.out_features)
        if method.uses_router and cfg.router != "task":
            specs["router"] = TensorSpec((cfg.num_experts, self.in_features), Role.ROUTER)
        return specs

    def update_layer(self, adapter_name: str, cfg: AsymLoraConfig) -> None:
        """Create and initialise adapter ``adapter_name``'s tensors on this layer."""
        self.asymlora_config[adapter_name] = cfg
        weight = self.base_weight()
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        device = weight.device if weight.device.type != "meta" else torch.device("cpu")
        specs = self.specs(adapter_name)
        tensors = {name: torch.empty(spec.shape, dtype=torch.float32) for name, spec in specs.items()}
        with torch.no_grad():
            get_method(cfg.method).init_(tensors, cfg)
            if "router" in tensors:
                kaiming_(tensors["router"])
        for name, value in tensors.items():
            getattr(self, ATTR_PREFIX + name)[adapter_name] = nn.Parameter(
                value.to(device=device, dtype=dtype), requires_grad=specs[name].trainable
            )
        frozen = tuple(ATTR_PREFIX + n for n, s in specs.items() if not s.trainable)
        if frozen:
            self.frozen_peft_weight_names[adapter_name] = frozen
        dropout = nn.Dropout(cfg.lora_dropout) if cfg.lora_dropout > 0 else nn.Identity()
        self.asymlora_dropout[adapter_name] = dropout.train(self.training)  # the layer's train/eval mode
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self._keep_router_float32(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=cfg.inference_mode)

    def _keep_router_float32(self, adapter_name: str) -> None:
        """W_g stays float32 (float64 stays float64) on a bf16/fp16 base, even with peft's
        ``autocast_adapter_dtype=False``: the other tensors follow the base dtype, the router's small
        logit differences and updates would round away in 16 bits (Switch Transformer's selective precision)."""
        router = self.asymlora_router.get(adapter_name)
        if router is not None and router.dtype.is_floating_point and router.dtype.itemsize < 4:
            self.asymlora_router[adapter_name] = nn.Parameter(
                router.detach().float(), requires_grad=router.requires_grad
            )

    def tensors(self, adapter_name: str) -> dict[str, Tensor]:
        """The adapter's tensors on this layer, by method tensor name (``A``, ``B``, ``S``, ``router``)."""
        out: dict[str, Tensor] = {}
        # read directly: this runs in every forward, nn.Module.__getattr__ is slow; every entry is a ParameterDict
        modules = cast(dict[str, nn.ParameterDict], self._modules)
        for name in TENSOR_NAMES:
            value = modules[ATTR_PREFIX + name]._parameters.get(adapter_name)  # = ParameterDict[adapter_name]
            if value is not None:
                out[name] = value
        return out

    # --- routing ---------------------------------------------------------------------------------
    def gate(self, adapter_name: str, x: Tensor, logits: Tensor | None = None) -> Tensor | None:
        """g(x) for this adapter: (..., N) in float32 (or wider), or None for plain LoRA.

        ``logits`` = W_g x when the caller already computed them (fused with the A product)."""
        cfg = self.asymlora_config[adapter_name]
        if not get_method(cfg.method).uses_router:
            return None
        call = self.routing_state.call or RoutingCall(open=False)
        if cfg.router == "task":
            task_ids = call.task_ids_for(x.shape[0], flat_tokens=x.dim() == 2)  # OPT flattens its MLP input
            if task_ids is None:
                raise no_task_ids_error(adapter_name)
            return task_gate(task_ids, cfg.num_experts, x)
        if logits is None:
            with torch.autocast(x.device.type, enabled=False):  # float32 under torch.autocast too
                probs = router_probs(x, self.asymlora_router[adapter_name])  # (..., N)
        else:
            probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(-1)
        if call.collect_aux and cfg.balance_loss_weight > 0:
            aux = cfg.balance_loss_weight * balance_loss(probs, call.token_mask(x))
            probs = attach_balance_loss(probs, aux, call)
        return topk_gate(probs, cfg.top_k) if cfg.router == "topk" else probs

    def task_rows(self, adapter_name: str, x: Tensor) -> tuple[Tensor, int | None]:
        """(task id per row of x (batch, ..., d_in), the one task of a uniform batch or None) for router="task".

        Raises ValueError when the call has no task ids or their number does not fit the batch."""
        call = self.routing_state.call
        rows = None if call is None or x.dim() < 2 else call.task_rows(x.shape[0], x.device, x.dim() == 2)
        if rows is None:  # the errors
            if x.dim() < 2:
                raise ValueError("task routing needs a batched input (batch, ..., features)")
            raise no_task_ids_error(adapter_name)
        return rows

    # --- merging -----------------------------------------------------------------------------------
    def refuse_quantized_merge(self, layer_name: str = "") -> None:
        """Raise ValueError when the base weight is bitsandbytes-quantised (4-bit or 8-bit): W0 + ΔW
        re-quantised would round most of the update away (peft only warns). Nothing is written."""
        kind = get_bnb_param_type(self.base_weight())
        if kind:
            raise ValueError(
                f"cannot merge into the {kind} bitsandbytes weight of layer {layer_name or type(self).__name__!r}: "
                "re-quantising W0 + ΔW rounds most of the update away. Use asymlora.merge_task(model, task) "
                "(task 0 for plain LoRA), which merges into a dequantised copy of the adapted layers, or load the "
                "base unquantised, load the adapter on it and merge there."
            )

    def task_delta_weight(self, adapter_name: str, task: int) -> Tensor:
        """ΔW_t = s · B_t A_t (d_out × d_in) of expert/task ``task``, in float32 (float64 for a float64 adapter:
        a float64 model merges in float64, not through float32)."""
        cfg = self.asymlora_config[adapter_name]
        a, b = get_method(cfg.method).task_factors(self.tensors(adapter_name), task)
        dtype = torch.promote_types(b.dtype, torch.float32)
        return cfg.scaling * (b.to(dtype) @ a.to(dtype))

    def in_weight_layout(self, delta: Tensor) -> Tensor:
        """A (d_out × d_in) update in the base weight's layout: transposed for Conv1D (peft's `transpose`)."""
        return delta.T if self.fan_in_fan_out else delta


class Linear(nn.Module, AsymLoraLayer):
    """An nn.Linear (or transformers Conv1D, see `SUPPORTED_BASE_LAYERS`) with asymlora adapters."""

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, cfg: AsymLoraConfig, routing_state: RoutingState
    ) -> None:
        super().__init__()
        AsymLoraLayer.__init__(self, base_layer, routing_state)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, cfg)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self._disable_adapters or self.merged_adapters:  # peft's disable_adapters / merged, sans property
            return result
        for name in self.active_adapters:
            cfg = self.asymlora_config.get(name)
            if cfg is not None:
                t = self.tensors(name)
                delta = self.adapter_path(name, self._cast_input_dtype(x, t["A"].dtype), t)
                if delta.dtype == result.dtype:
                    result = torch.add(result, delta, alpha=cfg.scaling)  # W0 x + s · delta, one kernel
                else:
                    result = result + (cfg.scaling * delta).to(result.dtype)
        return result

    def adapter_path(self, name: str, x: Tensor, t: dict[str, Tensor]) -> Tensor:
        """delta(x) before scaling. With router="task" only each row's own expert is computed
        (`AdapterMethod.routed_delta`; `task_delta` when the whole batch has one task). Otherwise, when the
        router reads the same x as the first adapter product (no dropout, float32 or wider, no torch.autocast),
        W_g is stacked under that product's matrix: one pass over x for both."""
        cfg = self.asymlora_config[name]
        method, dropout = get_method(cfg.method), self.asymlora_dropout[name]
        no_dropout = isinstance(dropout, nn.Identity) or not dropout.training
        if cfg.router == "task" and method.uses_router:
            ids, task = self.task_rows(name, x)
            x = x if no_dropout else dropout(x)
            return method.routed_delta(x, t, ids) if task is None else method.task_delta(x, t, task)
        x_side, router = method.x_side(t), t.get("router")
        full = x.dtype.itemsize >= 4 and not torch.is_autocast_enabled(x.device.type)
        if x_side is not None and router is not None and no_dropout and full:
            h, logits = F.linear(x, torch.cat([x_side, router])).split([x_side.shape[0], router.shape[0]], -1)
            gate = self.gate(name, x, logits)
        else:
            h, gate = None, self.gate(name, x)
        gate = None if gate is None else gate.to(x.dtype)
        return method.delta(dropout(x), t, gate) if h is None else method.combine(h, t, gate)

    def get_delta_weight(self, adapter_name: str) -> Tensor:
        """ΔW (d_out × d_in) of a plain-LoRA adapter; routed adapters have no single ΔW (use
        `asymlora.merge_task`). A Conv1D stores its weight transposed: see `in_weight_layout`."""
        cfg = self.asymlora_config[adapter_name]
        if get_method(cfg.method).uses_router:
            raise ValueError(
                f"adapter {adapter_name!r} ({cfg.method}, router={cfg.router!r}) has no single weight update: "
                "its experts are mixed per token. With router='task' merge one task with "
                "asymlora.merge_task(model, task); soft/topk routing cannot be merged."
            )
        return self.task_delta_weight(adapter_name, 0)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add s·B A into W0 for plain-LoRA adapters (peft's merge API); ValueError on a quantised base."""
        self.refuse_quantized_merge()
        for name in check_adapters_to_merge(self, adapter_names):
            delta = self.in_weight_layout(self.get_delta_weight(name))
            weight = self.base_weight()
            merged = weight.data + delta.to(weight.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights of adapter {name!r}")
            weight.data = merged
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            weight = self.base_weight()
            weight.data -= self.in_weight_layout(self.get_delta_weight(name)).to(weight.dtype)

    def __repr__(self) -> str:
        return "asymlora." + super().__repr__()
