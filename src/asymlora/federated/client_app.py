"""The Flower ``ClientApp``: decode the instruction (`messages`), run the client's round logic
(`asymlora.federated.client`), encode the reply. The protocol — message types, fields, the run config
sent once per run and the `messages.NEED_CONFIG` answer — is described in `asymlora.federated.messages`.

The client's trained adapter stays in ``context.state`` (and, when a state directory is known, on the
client's disk for ``--resume``); the run's config JSON stays in ``context.state`` too.

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

import logging
from typing import Any, cast

import torch
from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable

from asymlora.federated import client as fc
from asymlora.federated.config import FedConfig, fed_config_from_json
from asymlora.federated.messages import (
    ARRAYS,
    CONFIG,
    K_STRATEGY,
    K_TRANSFER_UP,
    RAW_STYPE,
    TRAIN,
    EvaluateReply,
    Hello,
    RoundInstruction,
    RunConfig,
    TrainInstruction,
    TrainReply,
    decode_instruction,
    encode_evaluate_reply,
    encode_hello,
    encode_train_reply,
    from_record,
    need_config_reply,
    to_record,
)
from asymlora.federated.partition import load_client_tasks
from asymlora.federated.privacy import KEY_CLIPPING_NORM, clip_upload_locally
from asymlora.federated.secagg_client import secagg_fit_mod, secaggplus_gate
from asymlora.federated.strategies import get_strategy

__all__ = [
    "RAW_STYPE",
    "STATE_CONFIG",
    "STATE_META",
    "STATE_STARTED",
    "STATE_TRAINED",
    "app",
    "from_record",
    "to_record",
]

logger = logging.getLogger(__name__)

STATE_TRAINED = "asymlora-trained"
"""``context.state`` key of the client's trained adapter (an ArrayRecord)."""
STATE_META = "asymlora-meta"
"""``context.state`` key of the round and strategy that adapter belongs to, and ``started_round`` (a
ConfigRecord)."""
STATE_STARTED = "asymlora-started"
"""``context.state`` key of the adapter the client started that round from (its trained adapter of
``started_round``, the last round the server saw it train): when the reply is lost, the server's next
instruction asks for that round again (docs/federated.md, "Rounds no client answered")."""
STATE_CONFIG = "asymlora-config"
"""``context.state`` key of the run's config: ``json`` and ``hash`` (a ConfigRecord, `messages.RunConfig`)."""

_CONFIGS: dict[tuple[int, str], FedConfig] = {}
"""Parsed run configs of this process by (run id, config hash): one parse per process, not per message."""
_MAX_CONFIGS = 8


def clipping_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """ClientApp mod of client-side clipping (docs/design.md §4), active on ``train`` messages whose config
    carries `privacy.KEY_CLIPPING_NORM` (the server adds it under ``dp.clipping: client``); other messages
    pass through.

    ``mean`` strategies (the upload has the keys and shapes of the download) go through Flower's own
    ``fixedclipping_mod``; ``zeropad`` (upload at the client's rank) and ``fedalora-het`` (upload =
    the increment B2·B1 or its factors) are clipped by `privacy.clip_upload_locally` with Flower's
    ``compute_clip_model_update``.
    """
    config = msg.content.config_records.get(CONFIG) if msg.metadata.message_type == TRAIN else None
    if config is None or KEY_CLIPPING_NORM not in config:
        return call_next(msg, ctxt)
    aggregation = get_strategy(str(config[K_STRATEGY])).aggregation
    if aggregation == "mean":
        return fixedclipping_mod(msg, ctxt, call_next)
    sent = from_record(msg.content.array_records[ARRAYS])
    out = call_next(msg, ctxt)
    if out.has_error():
        return out
    upload = from_record(out.content.array_records[ARRAYS])
    norm = float(cast(float, config[KEY_CLIPPING_NORM]))
    out.content[ARRAYS] = to_record(clip_upload_locally(aggregation, upload, sent, norm))
    return out


def transfer_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """ClientApp mod of compressed uploads (docs/design.md §4, "Compressed transfers"): on ``train``
    messages whose config carries `messages.K_TRANSFER_UP`, the reply's upload is re-encoded at that wire
    dtype (`messages.to_record`). It is the outermost mod, so it quantises what `clipping_mod` clipped
    (clip, then round). The download needs nothing here: `messages.from_record` decodes it by its stype.
    """
    config = msg.content.config_records.get(CONFIG) if msg.metadata.message_type == TRAIN else None
    if config is None or K_TRANSFER_UP not in config:
        return call_next(msg, ctxt)
    out = call_next(msg, ctxt)
    if out.has_error():
        return out
    upload = from_record(out.content.array_records[ARRAYS])
    out.content[ARRAYS] = to_record(upload, transfer_dtype=str(config[K_TRANSFER_UP]))
    return out


app = ClientApp(mods=[transfer_mod, secaggplus_gate, secagg_fit_mod, clipping_mod])
"""The ClientApp; `clipping_mod` clips the upload when the server asks (``dp.clipping: client``) and
`transfer_mod` (outermost: after the clip) encodes it at ``transfer.up``. In SecAgg+ rounds
(`secagg_client`), Flower's ``secaggplus_mod`` masks the clipped upload; other messages pass both mods."""


def _node(context: Context, key: str, default: Any = None) -> Any:
    return context.node_config.get(key, default)


def _partition_id(context: Context) -> int:
    pid = _node(context, "partition-id")
    if pid is None:
        raise ValueError(
            "this SuperNode has no partition-id: start it with --node-config 'partition-id=K num-partitions=N'"
        )
    return int(pid)


def _run_config(instruction: RoundInstruction, message: Message, context: Context) -> FedConfig | None:
    """The run's config: from the per-process cache, else the instruction's ``fed`` field or
    ``context.state`` (parsed and cached); None when neither holds the config of the instruction's hash."""
    key = (message.metadata.run_id, instruction.config_hash)
    if instruction.config_json is not None:
        sent = RunConfig.from_json(instruction.config_json)
        if sent.hash != instruction.config_hash:
            raise ValueError("the instruction's config does not match its config-hash (corrupted message)")
        context.state[STATE_CONFIG] = ConfigRecord({"json": sent.json, "hash": sent.hash})
    if key in _CONFIGS:
        return _CONFIGS[key]
    stored = context.state.config_records.get(STATE_CONFIG)
    if stored is None or stored.get("hash") != instruction.config_hash:
        return None
    if len(_CONFIGS) >= _MAX_CONFIGS:
        _CONFIGS.pop(next(iter(_CONFIGS)))
    _CONFIGS[key] = fed_config_from_json(str(stored["json"]))
    return _CONFIGS[key]


def _check(instruction: RoundInstruction, context: Context) -> None:
    """The instruction is for this node's client; set the torch threads it asks for."""
    if instruction.client != _partition_id(context):
        raise ValueError(
            f"message for client {instruction.client} reached the node with partition-id {_partition_id(context)}"
        )
    threads = int(_node(context, "threads", 0) or instruction.threads or 0)
    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def _state_dir(instruction: RoundInstruction, context: Context) -> str | None:
    return str(_node(context, "state-dir", "") or instruction.state_dir or "") or None


def _carried(
    context: Context, state_dir: str | None, client: int, rnd: int, strategy: str, identity: str = "",
    or_earlier: bool = False,
) -> dict | None:  # fmt: skip
    """The client's trained adapter of round ``rnd`` from ``context.state``, else from its disk (a
    restarted SuperNode; ``or_earlier``: its latest kept round before, when it missed rounds); a state
    dir of another run (``identity``) raises ValueError."""
    meta = context.state.config_records.get(STATE_META)
    if meta is not None and meta["strategy"] == strategy:
        if meta["round"] == rnd:
            return from_record(context.state.array_records[STATE_TRAINED])
        if meta.get("started_round") == rnd and STATE_STARTED in context.state.array_records:
            return from_record(context.state.array_records[STATE_STARTED])
    return fc.load_client_state(state_dir, client, rnd, strategy, identity=identity, or_earlier=or_earlier)


def _tasks(cfg: FedConfig, client: int, context: Context) -> list:
    """The client's data: its share of the config's tasks, or the node's own ``data``."""
    return load_client_tasks(cfg, client, str(_node(context, "data", "") or "") or None)


@app.query()
def hello(message: Message, context: Context) -> Message:
    """Tell the server who this node is (its partition id and node-config overrides)."""
    rank, data = int(_node(context, "rank", 0) or 0), str(_node(context, "data", "") or "")
    return Message(encode_hello(Hello(_partition_id(context), rank, data, os.getpid())), reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    """One round of local training; only the strategy's shared tensors go back."""
    ins = decode_instruction(message)
    _check(ins, context)
    cfg = _run_config(ins, message, context)
    if cfg is None:
        return need_config_reply(message, ins.config_hash)
    state_dir, identity = _state_dir(ins, context), fc.state_identity(cfg, ins.strategy)
    fc.check_client_state(state_dir, ins.client, identity)
    src = ins.round - 1
    if isinstance(ins, TrainInstruction) and ins.carried_round is not None:
        src = ins.carried_round  # the last round it trained in (partial participation: it may have sat out)
    # or_earlier: a node that was killed continues from its latest round kept on disk
    carried = (
        _carried(context, state_dir, ins.client, src, ins.strategy, identity, or_earlier=True)
        if src > 0
        else None
    )
    res = fc.train_round(
        cfg, cfg.strategy(ins.strategy), ins.client, ins.rank, ins.round, from_record(ins.arrays), carried,
        _tasks(cfg, ins.client, context), carried_round=src,
    )  # fmt: skip
    for note in res.notes:
        logger.warning(note)
    context.state[STATE_TRAINED] = to_record(res.trained)
    meta = ConfigRecord({"round": ins.round, "strategy": ins.strategy})
    if carried is not None:
        context.state[STATE_STARTED] = to_record(carried)
        meta["started_round"] = src
    elif STATE_STARTED in context.state.array_records:
        del context.state.array_records[STATE_STARTED]
    context.state[STATE_META] = meta
    if state_dir:
        fc.save_client_state(
            state_dir, ins.client, ins.round, res.trained, ins.strategy, identity=identity, started_from=src
        )
    reply = TrainReply(
        ins.client, to_record(res.upload), res.num_examples, res.train_loss, res.seconds,
        res.a_drift_start, res.a_drift_end, tuple(res.notes), res.local_sha256_start,
    )  # fmt: skip
    return Message(encode_train_reply(reply), reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Personalised and global scores of this client on its own test split."""
    ins = decode_instruction(message)
    _check(ins, context)
    cfg = _run_config(ins, message, context)
    if cfg is None:
        return need_config_reply(message, ins.config_hash)
    identity = fc.state_identity(cfg, ins.strategy)
    trained = _carried(context, _state_dir(ins, context), ins.client, ins.round, ins.strategy, identity)
    if trained is None:
        raise RuntimeError(
            f"client {ins.client} holds no trained adapter of round {ins.round} ({ins.strategy}); cannot evaluate"
        )
    scores = fc.evaluate_client(
        cfg, cfg.strategy(ins.strategy), ins.client, ins.rank, from_record(ins.arrays), trained,
        _tasks(cfg, ins.client, context),
    )  # fmt: skip
    return Message(encode_evaluate_reply(EvaluateReply(scores)), reply_to=message)
