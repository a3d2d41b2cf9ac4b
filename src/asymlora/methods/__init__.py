"""Adapter methods: one short module each, registered by name. See `base.AdapterMethod`."""

from asymlora.methods import alora, fedhet, hydralora, lora, malora, molora  # noqa: F401  (registration)
from asymlora.methods.base import (
    METHODS,
    AdapterMethod,
    MethodConfig,
    Role,
    TensorSpec,
    get_method,
    register_method,
)

__all__ = ["METHODS", "AdapterMethod", "MethodConfig", "Role", "TensorSpec", "get_method", "register_method"]
