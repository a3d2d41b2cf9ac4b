"""The peft tuner: config, layer, model (peft's tuners/<method>/{config,layer,model}.py layout)."""

from asymlora.tuner.config import PEFT_TYPE, TASK_TYPE, AsymLoraConfig
from asymlora.tuner.layer import AsymLoraLayer, Linear
from asymlora.tuner.model import AsymLoraModel
from asymlora.tuner.peft_model import AsymLoraModelForCausalLM

__all__ = [
    "PEFT_TYPE",
    "TASK_TYPE",
    "AsymLoraConfig",
    "AsymLoraLayer",
    "AsymLoraModel",
    "AsymLoraModelForCausalLM",
    "Linear",
]
