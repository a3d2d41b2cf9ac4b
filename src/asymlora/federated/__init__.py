"""Federated fine-tuning: strategies as pure functions over state dicts, and communication accounting.

`asymlora.federated.strategies` holds the six strategies of docs/design.md §4 (``fedit``, ``ffa``, ``fedsa``,
``fedalora``, ``fedalora-het``, ``zeropad``): what each shares, keeps, freezes and resets, and the
server-side aggregation with validation. `asymlora.federated.client` holds the client's side of a round
(what it loads, trains and uploads), `asymlora.federated.state` the model <-> state-dict copies,
`asymlora.federated.codec` the message codecs and `asymlora.federated.accounting` the bytes of the messages.
None of them imports Flower; the Flower apps call them.
"""

from typing import Any

from asymlora.federated.codec import (
    arrays_to_state,
    bytes_to_state,
    payload_bytes,
    payload_params,
    state_to_arrays,
    state_to_bytes,
)
from asymlora.federated.state import RoleMap, TensorInfo, adapter_state, load_adapter_state_, role_map
from asymlora.federated.strategies import (
    STRATEGY_NAMES,
    AggregateResult,
    Rejection,
    Select,
    Strategy,
    aggregate,
    check_het_setup,
    client_config,
    download_payload,
    get_strategy,
    het_alpha,
    init_server_state,
)

# The client side is imported on first use: asymlora.federated.client loads the data, evaluation and
# training stack (accelerate, transformers), which the server, the config and the accounting do not need.
_CLIENT_NAMES = ("client_round_start", "client_upload", "freeze_", "local_state")


def __getattr__(name: str) -> Any:
    if name in _CLIENT_NAMES:
        from asymlora.federated import client

        return getattr(client, name)
    raise AttributeError(f"module 'asymlora.federated' has no attribute {name!r}")


__all__ = [
    "STRATEGY_NAMES",
    "AggregateResult",
    "Rejection",
    "RoleMap",
    "Select",
    "Strategy",
    "TensorInfo",
    "adapter_state",
    "aggregate",
    "arrays_to_state",
    "bytes_to_state",
    "check_het_setup",
    "client_config",
    "client_round_start",
    "client_upload",
    "download_payload",
    "freeze_",
    "get_strategy",
    "het_alpha",
    "init_server_state",
    "load_adapter_state_",
    "local_state",
    "payload_bytes",
    "payload_params",
    "role_map",
    "state_to_arrays",
    "state_to_bytes",
]
