"""The Flower ``ClientApp``: a thin layer over `asymlora.federated.client`.

Message types (all sent by `asymlora.federated.server_app`):

- ``query``: hello. Replies with the node's ``partition-id`` (its client index) and any per-node
  overrides from its node config (``rank``, ``data``).
- ``train``: ``arrays`` (the server's shared tensors) and ``config`` (round, strategy, the whole
  `FedConfig` as JSON, the client index and rank the server assigned). Trains one round and replies
  with ``arrays`` (only the strategy's upload) and ``metrics``. The client's trained adapter stays in
  ``context.state`` (and, when a state directory is known, on the client's disk for ``--resume``).
- ``evaluate``: the final shared tensors; replies with personalised and global scores as JSON.

Node config (``flower-supernode --node-config '...'``): ``partition-id`` (required, 0-based client
index), ``num-partitions``; optional ``rank`` (this client's adapter rank, heterogeneous strategies),
``data`` (comma-separated task specs of this node's own data, instead of its share of the config's
tasks), ``state-dir`` (where the client keeps its adapter between rounds for ``--resume``),
``threads`` (torch threads).
"""

from __future__ import annotations

import os

os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json
import logging
import math
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from asymlora.federated.privacy import clipping_mod

if TYPE_CHECKING:
    import torch

    from asymlora.federated.config import FedConfig

# torch and asymlora are imported inside the handlers: in deployment every message starts a fresh
# process, and the hello query then answers in a second instead of after importing torch.

__all__ = ["RAW_STYPE", "STATE_META", "STATE_TRAINED", "app", "from_record", "to_record"]

logger = logging.getLogger(__name__)

STATE_TRAINED = "asymlora-trained"
"""``context.state`` key of the client's trained adapter (an ArrayRecord)."""
STATE_META = "asymlora-meta"
"""``context.state`` key of the round and strategy that adapter belongs to (a ConfigRecord)."""

app = ClientApp(mods=[clipping_mod])
"""The ClientApp; `privacy.clipping_mod` clips the upload when the server asks (``dp.clipping: client``)."""


RAW_STYPE = "torch.raw"
"""Flower ``Array.stype`` of a tensor stored as its raw little-endian bytes: the dtypes NumPy lacks
(bfloat16, float8 variants), which Flower's own NumPy serialisation rejects."""


def to_record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    """A state dict as an ArrayRecord (what goes into a message or ``context.state``).

    Every dtype round-trips bit for bit: NumPy dtypes (float16/32/64, integers) use Flower's standard
    NumPy serialisation; bfloat16 and float8 go as raw bytes with ``stype`` `RAW_STYPE` (exactly
    numel × element size, so ``ArrayRecord.count_bytes`` counts what is sent).
    """
    import torch
    from flwr.app import Array

    arrays = {}
    for key, value in state.items():
        t = value.detach().cpu().contiguous()
        try:
            arrays[key] = Array(t.numpy())
        except TypeError:  # "Got unsupported ScalarType BFloat16": NumPy has no such dtype
            raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
            arrays[key] = Array(str(t.dtype).removeprefix("torch."), tuple(t.shape), RAW_STYPE, raw)
    return ArrayRecord(arrays)


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Inverse of `to_record` (fresh, writable tensors). Raises ValueError on a malformed raw array."""
    import numpy as np
    import torch

    out = {}
    for key, array in record.items():
        if array.stype != RAW_STYPE:
            out[key] = torch.from_numpy(np.array(array.numpy(), copy=True))
            continue
        dtype = getattr(torch, array.dtype, None)
        shape = tuple(array.shape)
        if not isinstance(dtype, torch.dtype) or len(array.data) != dtype.itemsize * math.prod(shape):
            raise ValueError(
                f"array {key!r} (dtype {array.dtype!r}, shape {shape}) holds {len(array.data)} bytes: not a "
                "raw tensor written by asymlora's to_record"
            )
        flat = torch.frombuffer(bytearray(array.data), dtype=torch.uint8) if array.data else torch.empty(0)
        out[key] = flat.to(torch.uint8).view(dtype).reshape(shape)
    return out


def _node(context: Context, key: str, default: Any = None) -> Any:
    return context.node_config.get(key, default)


def _partition_id(context: Context) -> int:
    pid = _node(context, "partition-id")
    if pid is None:
        raise ValueError(
            "this SuperNode has no partition-id: start it with --node-config 'partition-id=K num-partitions=N'"
        )
    return int(pid)


def _setup(message: Message, context: Context) -> tuple[FedConfig, str, int, int, int]:
    """(config, strategy name, client, rank, round) of a train/evaluate message; checks the client index."""
    import torch

    from asymlora.federated.config import fed_config_from_json

    c = message.content["config"]
    cfg = fed_config_from_json(str(c["fed"]))
    client, rank, rnd = int(c["client"]), int(c["rank"]), int(c["round"])
    if client != _partition_id(context):
        raise ValueError(
            f"message for client {client} reached the node with partition-id {_partition_id(context)}"
        )
    threads = int(_node(context, "threads", 0) or c.get("threads", 0) or 0)
    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return cfg, str(c["strategy"]), client, rank, rnd


def _state_dir(message: Message, context: Context) -> str | None:
    return (
        str(_node(context, "state-dir", "") or message.content["config"].get("state-dir", "") or "") or None
    )


def _carried(context: Context, state_dir: str | None, client: int, rnd: int, strategy: str) -> dict | None:
    """The client's trained adapter of round ``rnd`` from ``context.state``, else from its disk."""
    from asymlora.federated import client as fc

    if STATE_META in context.state:
        meta = context.state[STATE_META]
        if int(meta["round"]) == rnd and str(meta["strategy"]) == strategy:
            return from_record(context.state[STATE_TRAINED])
    return fc.load_client_state(state_dir, client, rnd, strategy)


def _tasks(cfg: FedConfig, client: int, context: Context) -> list:
    """The client's data: its share of the config's tasks, or the node's own ``data``."""
    from asymlora.federated.partition import load_client_tasks

    return load_client_tasks(cfg, client, str(_node(context, "data", "") or "") or None)


@app.query()
def hello(message: Message, context: Context) -> Message:
    """Tell the server who this node is (its partition id and node-config overrides)."""
    reply = ConfigRecord(
        {
            "partition-id": _partition_id(context),
            "rank": int(_node(context, "rank", 0) or 0),
            "data": str(_node(context, "data", "") or ""),
            "pid": os.getpid(),
        }
    )
    return Message(RecordDict({"hello": reply}), reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    """One round of local training; only the strategy's shared tensors go back."""
    from asymlora.federated import client as fc

    cfg, name, client, rank, rnd = _setup(message, context)
    strategy = cfg.strategy(name)
    state_dir = _state_dir(message, context)
    carried = _carried(context, state_dir, client, rnd - 1, name) if rnd > 1 else None
    received = from_record(message.content["arrays"])
    res = fc.train_round(cfg, strategy, client, rank, rnd, received, carried, _tasks(cfg, client, context))
    for note in res.notes:
        logger.warning(note)
    context.state[STATE_TRAINED] = to_record(res.trained)
    context.state[STATE_META] = ConfigRecord({"round": rnd, "strategy": name})
    if state_dir:
        fc.save_client_state(state_dir, client, rnd, res.trained, name)
    metrics = MetricRecord(
        {
            "client": client,
            "num-examples": res.num_examples,
            "train-loss": res.train_loss,
            "seconds": res.seconds,
            "a-drift-start": res.a_drift_start,
            "a-drift-end": res.a_drift_end,
        }
    )
    content = RecordDict({"arrays": to_record(res.upload), "metrics": metrics})
    if res.notes:
        content["notes"] = ConfigRecord({"notes": res.notes})
    return Message(content, reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Personalised and global scores of this client on its own test split."""
    from asymlora.federated import client as fc

    cfg, name, client, rank, rnd = _setup(message, context)
    trained = _carried(context, _state_dir(message, context), client, rnd, name)
    if trained is None:
        raise RuntimeError(
            f"client {client} holds no trained adapter of round {rnd} ({name}); cannot evaluate"
        )
    received = from_record(message.content["arrays"])
    out = fc.evaluate_client(
        cfg, cfg.strategy(name), client, rank, received, trained, _tasks(cfg, client, context)
    )
    return Message(RecordDict({"results": ConfigRecord({"json": json.dumps(out)})}), reply_to=message)
