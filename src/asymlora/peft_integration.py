"""Registration of asymlora with peft: the only place that touches peft's mapping tables.

peft 0.21's `register_peft_method` accepts only names of its closed `PeftType` enum, so we add our plain
string key to the same four tables it fills (docs/design.md §10), plus our causal-LM wrapper to the task-type
table consulted by `get_peft_model` and `PeftModel.from_pretrained`. Pinned to peft's 0.21 minor version.
"""

from __future__ import annotations

import warnings
from typing import cast

import peft
from peft.auto import MODEL_TYPE_TO_PEFT_MODEL_MAPPING
from peft.mapping import (
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_PREFIX_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
)
from peft.utils import PeftType

from asymlora.tuner.config import PEFT_TYPE, TASK_TYPE, AsymLoraConfig
from asymlora.tuner.model import AsymLoraModel
from asymlora.tuner.peft_model import AsymLoraModelForCausalLM

SUPPORTED_PEFT = "0.21."
# peft annotates its tables' keys as its closed PeftType enum; at runtime they are str keys (PeftType is a
# str enum), and ours is the plain string PEFT_TYPE (see the module docstring).
_KEY = cast(PeftType, PEFT_TYPE)


def register() -> None:
    """Make `AsymLoraConfig` known to peft (idempotent)."""
    if not peft.__version__.startswith(SUPPORTED_PEFT):
        warnings.warn(
            f"asymlora is tested with peft {SUPPORTED_PEFT}x, found {peft.__version__}; "
            "install peft>=0.21,<0.22 if registration or loading misbehaves.",
            stacklevel=2,
        )
    PEFT_TYPE_TO_CONFIG_MAPPING[_KEY] = AsymLoraConfig
    PEFT_TYPE_TO_TUNER_MAPPING[_KEY] = AsymLoraModel
    PEFT_TYPE_TO_PREFIX_MAPPING[_KEY] = AsymLoraModel.prefix
    MODEL_TYPE_TO_PEFT_MODEL_MAPPING[TASK_TYPE] = AsymLoraModelForCausalLM


def is_registered() -> bool:
    return (
        PEFT_TYPE_TO_TUNER_MAPPING.get(_KEY) is AsymLoraModel
        and MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(TASK_TYPE) is AsymLoraModelForCausalLM
    )
