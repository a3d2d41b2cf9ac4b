"""Parameter roles, declared once by each method (`TensorSpec.role`) and read from here by everyone.

Training, federation, saving and analysis ask this module which tensors are A-side, B-side or router,
which are frozen, and which axis indexes experts, instead of matching parameter names.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from asymlora.methods.base import ATTR_PREFIX, Role
from asymlora.tuner.layer import AsymLoraLayer


@dataclass(frozen=True)
class AdapterTensor:
    """One adapter tensor of one layer, with its declared role.

    Attributes:
        name: qualified name, as in ``model.named_parameters()``.
        module: qualified name of the adapted layer.
        adapter: peft adapter name (``"default"`` unless you added more).
        tensor: the method's name for it (``A``, ``B``, ``S``, ``router``).
        role: `Role.A`, `Role.B` or `Role.ROUTER`.
        expert_dim: axis indexing experts, or None if shared by all experts.
        trainable: False for tensors that the method keeps frozen.
        param: the parameter itself.
    """

    name: str
    module: str
    adapter: str
    tensor: str
    role: Role
    expert_dim: int | None
    trainable: bool
    param: nn.Parameter


def _parameter(tensor: Tensor, name: str) -> nn.Parameter:
    if not isinstance(tensor, nn.Parameter):  # the layer stores each tensor in a ParameterDict
        raise TypeError(f"{name} is a {type(tensor).__name__}, not an nn.Parameter of its layer")
    return tensor


def adapter_tensors(model: nn.Module, adapter_name: str | None = None) -> list[AdapterTensor]:
    """Every asymlora tensor of ``model`` (a PeftModel or the model inside it), in module order."""
    out: list[AdapterTensor] = []
    for module_name, layer in model.named_modules():
        if not isinstance(layer, AsymLoraLayer):
            continue
        for adapter in layer.asymlora_config:
            if adapter_name is not None and adapter != adapter_name:
                continue
            tensors = layer.tensors(adapter)
            for tensor, spec in layer.specs(adapter).items():
                name = f"{module_name}.{ATTR_PREFIX}{tensor}.{adapter}"
                out.append(
                    AdapterTensor(
                        name,
                        module_name,
                        adapter,
                        tensor,
                        spec.role,
                        spec.expert_dim,
                        spec.trainable,
                        _parameter(tensors[tensor], name),
                    )
                )
    return out


def parameters_by_role(
    model: nn.Module, role: Role | str, adapter_name: str | None = None
) -> dict[str, nn.Parameter]:
    """Qualified name -> parameter for every asymlora tensor of the given role (``"A"``, ``"B"``, ``"router"``)."""
    role = Role(role)
    return {t.name: t.param for t in adapter_tensors(model, adapter_name) if t.role == role}


def count_parameters(model: nn.Module, adapter_name: str | None = None) -> dict[str, int]:
    """Number of adapter parameters per role and in total (``{"A": …, "B": …, "router": …, "total": …}``)."""
    counts = {str(r): 0 for r in Role}
    for t in adapter_tensors(model, adapter_name):
        counts[str(t.role)] += t.param.numel()
    counts["total"] = sum(counts.values())
    return counts
