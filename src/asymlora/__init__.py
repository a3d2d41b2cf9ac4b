"""asymlora: fine-tuning with several LoRA adapters that share parameters asymmetrically.

ALoRA (several A, one shared B, a router) and its peers LoRA, HydraLoRA, MoLoRA and MALoRA as one peft
tuner; Fed-ALoRA and its peers for federated fine-tuning; the analysis tools of arXiv 2509.25414.

    import asymlora, peft
    model = peft.get_peft_model(base, asymlora.AsymLoraConfig(method="alora", target_modules=["q_proj", "o_proj"]))
"""

from asymlora import _logging  # noqa: F401  (first: it filters a record logged while peft is imported)
from asymlora.export import export_task_adapter, merge_task
from asymlora.methods import METHODS, Role, get_method
from asymlora.peft_integration import register
from asymlora.roles import AdapterTensor, adapter_tensors, count_parameters, parameters_by_role
from asymlora.tuner import AsymLoraConfig, AsymLoraModel, AsymLoraModelForCausalLM

register()

__version__ = "0.1.0"
__all__ = [
    "METHODS",
    "AdapterTensor",
    "AsymLoraConfig",
    "AsymLoraModel",
    "AsymLoraModelForCausalLM",
    "Role",
    "adapter_tensors",
    "count_parameters",
    "export_task_adapter",
    "get_method",
    "merge_task",
    "parameters_by_role",
]
