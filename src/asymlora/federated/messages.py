"""The federated protocol in one place: what the server and the clients say to each other, and how it is
laid out in Flower's records (docs/design.md §4, "The messages").

Three exchanges, each an instruction from `server_app` and a reply from `client_app`:

========== ============================================ ================================================
type       instruction (server → client)                reply (client → server)
========== ============================================ ================================================
query      `hello_message`: empty                       `Hello`: partition id, node-config rank and data
train      `TrainInstruction`: the shared tensors and   `TrainReply`: the strategy's upload and the
           the round's fields                           round's metrics (examples, loss, seconds, drift)
evaluate   `EvaluateInstruction`: the final shared      `EvaluateReply`: personalised and global scores
           tensors and the client's last trained round
========== ============================================ ================================================

Record layout of a train / evaluate instruction: ``arrays`` (ArrayRecord, the shared tensors) and
``config`` (one ConfigRecord: ``round``, ``strategy``, ``client``, ``rank``, ``state-dir``, ``threads``,
``config-hash``; ``fed`` only while the node does not hold the run's config; ``clipping_norm`` under
``dp.clipping: client``; a train instruction's ``carried-round``: the last round the client trained in;
``transfer-up`` when the upload's wire dtype is not float32). Exactly one ArrayRecord and one ConfigRecord:
Flower's ``fixedclipping_mod``
(`client_app.clipping_mod`) requires it. A train reply holds ``arrays`` (the upload), ``metrics`` (a
MetricRecord), when the client has something to say, ``notes``, and ``client-state``
(``local-sha256``: its local tensors at the round's start, `client.tensors_sha256`); an evaluate reply
``results`` (the scores as JSON: they nest deeper than a ConfigRecord can).

**The config travels once per run.** The whole `FedConfig` (`RunConfig`: its JSON and SHA-256) rides
in the ``fed`` field of the first instruction a strategy's run (`server_app.run_server`) sends each
node; every instruction carries ``config-hash``. The client keeps the JSON in ``context.state`` (which
Flower keeps per run and node, across messages — in deployment each message runs in a fresh ClientApp
process) and the parsed config in a per-process cache keyed by (run id, hash): parsed once per process
(simulation: once per client actor), not per message.
A client that holds no config of that hash — its SuperNode restarted and lost ``context.state``, or an
earlier reply failed before the config was stored — answers with the error `NEED_CONFIG` instead of
guessing; the server then sends the same instruction again with ``fed`` (`server_round.Federation.send`),
once, within the same timeout. A node counts as holding the config only after an ordinary reply, so a
failed first round just sends it again. The counted ``bytes_down`` stay the ArrayRecord bytes of every
instruction sent (two on a resend): the config's JSON (1.4 kB for ``configs/fed_bigbench_*.yaml``) was
never counted, it is only no longer sent after a node's first instruction.

Tensors go in ArrayRecords with `to_record` / `from_record` (every dtype bit for bit).

**Compressed transfers** (``transfer.up`` / ``transfer.down``, docs/design.md §4): the server encodes the
download at ``transfer.down`` (`to_record`'s ``transfer_dtype``; int8 as `INT8_STYPE`), the client
(`client_app.transfer_mod`, outside the clipping mod) encodes its upload at ``transfer-up``; decoding is
self-describing (`from_record`), and the server decodes uploads to float32, its state's dtype. The
counted bytes are those of the encoded ArrayRecords.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, cast

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common.recorddict_compat import fitres_to_recorddict, recorddict_to_fitins

from asymlora.federated.codec import TRANSFER_DTYPES, dequantize_int8_rows, quantize_int8_rows
from asymlora.federated.privacy import KEY_CLIPPING_NORM

if TYPE_CHECKING:
    from asymlora.federated.config import FedConfig

__all__ = [
    "EVALUATE",
    "INT8_STYPE",
    "NEED_CONFIG",
    "QUERY",
    "RAW_STYPE",
    "TRAIN",
    "EvaluateInstruction",
    "EvaluateReply",
    "Hello",
    "ReplyError",
    "RoundInstruction",
    "RunConfig",
    "SecAggFit",
    "TrainInstruction",
    "TrainReply",
    "decode_evaluate_reply",
    "decode_hello",
    "decode_instruction",
    "decode_secagg_fitins",
    "decode_secagg_metrics",
    "decode_train_reply",
    "encode_evaluate_reply",
    "encode_hello",
    "encode_secagg_fitres",
    "encode_train_reply",
    "from_record",
    "hello_message",
    "instruction_message",
    "is_need_config",
    "need_config_reply",
    "secagg_fitins",
    "to_record",
]

QUERY, TRAIN, EVALUATE = "query", "train", "evaluate"
"""Flower message types of the three exchanges."""
HELLO_GROUP, EVALUATE_GROUP = "hello", "evaluate"
"""``group_id`` of the hello and evaluate messages; a train message's is its round number."""

NEED_CONFIG = 1001
"""``Error.code`` of a client that holds no run config of the instruction's hash (Flower's own codes are
0-8); the server resends the instruction with the config."""

# record names in a message's RecordDict
ARRAYS, CONFIG, METRICS, NOTES, HELLO, RESULTS = "arrays", "config", "metrics", "notes", "hello", "results"
# keys of the instruction's ConfigRecord (``clipping_norm``: `privacy.KEY_CLIPPING_NORM`, Flower's name)
K_ROUND, K_STRATEGY, K_CLIENT, K_RANK = "round", "strategy", "client", "rank"
K_STATE_DIR, K_THREADS, K_HASH, K_FED = "state-dir", "threads", "config-hash", "fed"
K_CARRIED = "carried-round"
K_TRANSFER_UP = "transfer-up"
# keys of the train reply's MetricRecord
M_CLIENT, M_EXAMPLES, M_LOSS, M_SECONDS = "client", "num-examples", "train-loss", "seconds"
M_DRIFT_START, M_DRIFT_END = "a-drift-start", "a-drift-end"
# the train reply's ConfigRecord of the client's storage: SHA-256 of its local tensors at the round's start
STATE_RECORD, K_LOCAL_SHA256 = "client-state", "local-sha256"
# keys of the hello reply
H_PARTITION, H_RANK, H_DATA, H_PID = "partition-id", "rank", "data", "pid"
# SecAgg+ rounds (`asymlora.federated.secagg`): extra keys of the instruction's config (the legacy FitIns
# config), and of the train reply's MetricRecord
K_SECAGG_NAMES, K_SECAGG_BOUND = "secagg-names", "secagg-value-bound"
K_SECAGG_CLIPPING, K_SECAGG_MAX_WEIGHT = "secagg-clipping-range", "secagg-max-weight"
K_SECAGG_Q = "secagg-quantization-range"
M_SECAGG_CLIPPED, M_SECAGG_VALUES = "secagg-clipped", "secagg-values"


class ReplyError(ValueError):
    """A reply that does not follow the protocol (a missing record or key, a value of the wrong type)."""


# --- tensors --------------------------------------------------------------------------------------------
RAW_STYPE = "torch.raw"
"""Flower ``Array.stype`` of a tensor stored as its raw little-endian bytes: the dtypes NumPy lacks
(bfloat16, float8 variants), which Flower's own NumPy serialisation rejects."""
INT8_STYPE = "asymlora.int8-rowwise"
"""Flower ``Array.stype`` of an int8-quantised tensor (`codec.quantize_int8_rows`): ``dtype`` "int8",
``shape`` the tensor's, ``data`` its numel int8 values (row-major) followed by its rows' float32 scales
(little-endian), so ``ArrayRecord.count_bytes`` counts numel + 4 × rows (+ the key)."""


def to_record(state: Mapping[str, torch.Tensor], transfer_dtype: str | None = None) -> ArrayRecord:
    """A state dict as an ArrayRecord (what goes into a message or ``context.state``).

    ``transfer_dtype`` None: every dtype round-trips bit for bit — NumPy dtypes (float16/32/64, integers)
    use Flower's standard NumPy serialisation; bfloat16 and float8 go as raw bytes with ``stype``
    `RAW_STYPE` (exactly numel × element size, so ``ArrayRecord.count_bytes`` counts what is sent).
    Otherwise (`codec.TRANSFER_DTYPES`) floating tensors are first cast to it, or, for ``int8``, sent as
    `INT8_STYPE` arrays (`codec.quantize_int8_rows`); see docs/design.md §4, "Compressed transfers".
    Raises ValueError for an unknown ``transfer_dtype`` or an int8 tensor holding NaN/Inf.
    """
    if transfer_dtype is not None and transfer_dtype not in TRANSFER_DTYPES:
        raise ValueError(f"transfer dtype {transfer_dtype!r} is not one of {list(TRANSFER_DTYPES)}")
    arrays = {}
    for key, value in state.items():
        t = value.detach().cpu().contiguous()
        if transfer_dtype is not None and t.dtype.is_floating_point:
            if transfer_dtype == "int8":
                arrays[key] = _int8_array(t)
                continue
            t = t.to(getattr(torch, transfer_dtype))
        try:
            if transfer_dtype in ("bfloat16", "float16") and t.dtype.is_floating_point:  # no .npy header
                raise TypeError("16-bit floats go as raw bytes")
            arrays[key] = Array(t.numpy())
        except TypeError:  # "Got unsupported ScalarType BFloat16": NumPy has no such dtype
            raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
            arrays[key] = Array(str(t.dtype).removeprefix("torch."), tuple(t.shape), RAW_STYPE, raw)
    return ArrayRecord(arrays)


def from_record(record: ArrayRecord, float_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Inverse of `to_record` (fresh, writable tensors); `INT8_STYPE` arrays are dequantised to float32.
    ``float_dtype``: cast every floating tensor to it (the server decodes uploads to float32, its state's
    dtype). Raises ValueError on a malformed raw or int8 array."""
    out = {}
    for key, array in record.items():
        if array.stype == INT8_STYPE:
            out[key] = _from_int8_array(key, array)
        elif array.stype != RAW_STYPE:
            out[key] = torch.from_numpy(np.array(array.numpy(), copy=True))
        else:
            out[key] = _from_raw_array(key, array)
        if float_dtype is not None and out[key].dtype.is_floating_point:
            out[key] = out[key].to(float_dtype)
    return out


def _from_raw_array(key: str, array: Array) -> torch.Tensor:
    dtype = getattr(torch, array.dtype, None)
    shape = tuple(array.shape)
    if not isinstance(dtype, torch.dtype) or len(array.data) != dtype.itemsize * math.prod(shape):
        raise ValueError(
            f"array {key!r} (dtype {array.dtype!r}, shape {shape}) holds {len(array.data)} bytes: not a "
            "raw tensor written by asymlora's to_record"
        )
    flat = torch.frombuffer(bytearray(array.data), dtype=torch.uint8) if array.data else torch.empty(0)
    return flat.to(torch.uint8).view(dtype).reshape(shape)


def _int8_array(t: torch.Tensor) -> Array:
    """`INT8_STYPE` array of ``t``: its int8 values, then its float32 row scales (little-endian)."""
    q, scale = quantize_int8_rows(t)
    data = q.reshape(-1).numpy().tobytes() + scale.numpy().astype("<f4").tobytes()
    return Array("int8", tuple(t.shape), INT8_STYPE, data)


def _from_int8_array(key: str, array: Array) -> torch.Tensor:
    shape = tuple(array.shape)
    numel = math.prod(shape)
    rows = shape[0] if len(shape) >= 2 else 1
    if array.dtype != "int8" or len(array.data) != numel + 4 * rows:
        raise ValueError(
            f"array {key!r} (dtype {array.dtype!r}, shape {shape}) holds {len(array.data)} bytes, not "
            f"{numel} int8 values + {rows} float32 scales: not an int8 tensor written by asymlora's to_record"
        )
    data = bytearray(array.data)
    q = torch.frombuffer(data, dtype=torch.int8, count=numel) if numel else torch.empty(0, dtype=torch.int8)
    scale = torch.from_numpy(np.frombuffer(data, dtype="<f4", count=rows, offset=numel).astype(np.float32))
    return dequantize_int8_rows(q.reshape(shape), scale)


# --- the run's config -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunConfig:
    """The run's `FedConfig` as it travels: its compact JSON (`FedConfig.to_json`) and the JSON's SHA-256."""

    json: str
    hash: str

    @classmethod
    def of(cls, cfg: FedConfig) -> RunConfig:
        return cls.from_json(cfg.to_json())

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        return cls(text, hashlib.sha256(text.encode()).hexdigest())


# --- hello ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Hello:
    """A node's answer to the hello query: its client index and node-config overrides (0 / "": none)."""

    partition_id: int
    rank: int = 0
    data: str = ""
    pid: int = 0


def hello_message(node_id: int) -> Message:
    return Message(RecordDict(), dst_node_id=node_id, message_type=QUERY, group_id=HELLO_GROUP)


def encode_hello(hello: Hello) -> RecordDict:
    record = ConfigRecord(
        {H_PARTITION: hello.partition_id, H_RANK: hello.rank, H_DATA: hello.data, H_PID: hello.pid}
    )
    return RecordDict({HELLO: record})


def decode_hello(content: RecordDict) -> Hello:
    h = _record(content, HELLO)
    return Hello(_int(h, H_PARTITION), _int(h, H_RANK), str(h.get(H_DATA, "")), int(h.get(H_PID, 0)))


# --- train and evaluate instructions ------------------------------------------------------------------------
@dataclass(frozen=True)
class RoundInstruction:
    """What a train or evaluate instruction asks of client ``client``: the shared tensors ``arrays`` and
    the fields of round ``round`` of strategy ``strategy`` at adapter rank ``rank``."""

    message_type: ClassVar[str] = ""
    round: int
    strategy: str
    client: int
    rank: int
    config_hash: str
    arrays: ArrayRecord = field(default_factory=ArrayRecord, repr=False)
    state_dir: str = ""
    """Where the client may keep its adapter between rounds ("" : only in ``context.state``)."""
    threads: int = 0
    """torch threads of the client (0: its default)."""
    config_json: str | None = None
    """The run's config (`RunConfig.json`) while the node is not known to hold it; else None."""

    def config_fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {K_ROUND: self.round, K_STRATEGY: self.strategy, K_CLIENT: self.client}
        out |= {K_RANK: self.rank, K_STATE_DIR: self.state_dir, K_THREADS: self.threads}
        out[K_HASH] = self.config_hash
        if self.config_json is not None:
            out[K_FED] = self.config_json
        return out


@dataclass(frozen=True)
class TrainInstruction(RoundInstruction):
    """Train one round. ``arrays``: the strategy's download (`strategies.download_payload`)."""

    message_type: ClassVar[str] = TRAIN
    clipping_norm: float | None = None
    """C of ``dp.clipping: client`` (`client_app.clipping_mod` clips the upload to it); None otherwise."""
    carried_round: int | None = None
    """The last round the client trained in (its local tensors start from that round's adapter; 0: never,
    partial participation, docs/federated.md); None: round − 1."""
    transfer_up: str = "float32"
    """Wire dtype of the upload (``transfer.up``; `client_app.transfer_mod` encodes it, after clipping)."""

    def config_fields(self) -> dict[str, Any]:
        out = super().config_fields()
        if self.clipping_norm is not None:
            out[KEY_CLIPPING_NORM] = self.clipping_norm
        if self.carried_round is not None:
            out[K_CARRIED] = self.carried_round
        if self.transfer_up != "float32":
            out[K_TRANSFER_UP] = self.transfer_up
        return out


@dataclass(frozen=True)
class EvaluateInstruction(RoundInstruction):
    """Score the client's adapter of round ``round`` (its last trained one) alone and with ``arrays``,
    the final shared tensors."""

    message_type: ClassVar[str] = EVALUATE


def instruction_message(instruction: RoundInstruction, node_id: int, ttl: float) -> Message:
    """The Flower message of ``instruction`` to node ``node_id`` (``ttl`` in seconds)."""
    content = RecordDict({ARRAYS: instruction.arrays, CONFIG: ConfigRecord(instruction.config_fields())})
    group = str(instruction.round) if instruction.message_type == TRAIN else EVALUATE_GROUP
    return Message(
        content, dst_node_id=node_id, message_type=instruction.message_type, group_id=group, ttl=ttl
    )


def decode_instruction(message: Message) -> RoundInstruction:
    """The `TrainInstruction` or `EvaluateInstruction` of a received message (ReplyError when malformed)."""
    c = _record(message.content, CONFIG)
    fed = c.get(K_FED)
    common: dict[str, Any] = {
        "round": _int(c, K_ROUND),
        "strategy": _str(c, K_STRATEGY),
        "client": _int(c, K_CLIENT),
        "rank": _int(c, K_RANK),
        "config_hash": _str(c, K_HASH),
        "arrays": _array_record(message.content, ARRAYS),
        "state_dir": str(c.get(K_STATE_DIR, "") or ""),
        "threads": int(c.get(K_THREADS, 0) or 0),
        "config_json": None if fed is None else str(fed),
    }
    if message.metadata.message_type == TRAIN:
        norm, carried = c.get(KEY_CLIPPING_NORM), c.get(K_CARRIED)
        return TrainInstruction(
            **common,
            clipping_norm=None if norm is None else float(norm),
            carried_round=None if carried is None else _int(c, K_CARRIED),
            transfer_up=str(c.get(K_TRANSFER_UP, "float32")),
        )
    return EvaluateInstruction(**common)


def need_config_reply(message: Message, config_hash: str) -> Message:
    """The client's answer to an instruction whose config (hash ``config_hash``) it does not hold."""
    why = f"this node holds no run config of hash {config_hash[:12]}...; send the instruction with it"
    return Message(Error(NEED_CONFIG, why), reply_to=message)


def is_need_config(reply: Message) -> bool:
    return reply.has_error() and reply.error.code == NEED_CONFIG


# --- replies ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainReply:
    """A client's answer to a `TrainInstruction`: its upload and the round's metrics."""

    client: int
    upload: ArrayRecord = field(repr=False)
    """The strategy's upload (`strategies.client_upload`), after `client_app.clipping_mod` when it clips."""
    num_examples: int
    train_loss: float
    """Mean training loss of the round; NaN without a local step (``train.local_steps: 0``)."""
    seconds: float
    a_drift_start: float
    """‖A − A_init‖ / ‖A_init‖ at the start and end of the round (docs/design.md §4)."""
    a_drift_end: float
    notes: tuple[str, ...] = ()
    local_sha256: str = ""
    """SHA-256 of the client's local tensors when its training started (`client.tensors_sha256`), or ""."""


def encode_train_reply(reply: TrainReply) -> RecordDict:
    metrics = MetricRecord(
        {
            M_CLIENT: reply.client,
            M_EXAMPLES: reply.num_examples,
            M_LOSS: reply.train_loss,
            M_SECONDS: reply.seconds,
            M_DRIFT_START: reply.a_drift_start,
            M_DRIFT_END: reply.a_drift_end,
        }
    )
    content = RecordDict({ARRAYS: reply.upload, METRICS: metrics})
    if reply.notes:
        content[NOTES] = ConfigRecord({NOTES: list(reply.notes)})
    if reply.local_sha256:
        content[STATE_RECORD] = ConfigRecord({K_LOCAL_SHA256: reply.local_sha256})
    return content


def decode_train_reply(content: RecordDict) -> TrainReply:
    """The `TrainReply` in a reply's content; ReplyError names what is missing or malformed."""
    m = _record(content, METRICS, "metric_records")
    notes_record = content.config_records.get(NOTES)
    notes = notes_record.get(NOTES, []) if notes_record is not None else []
    if not isinstance(notes, list):
        raise ReplyError(f"the reply's notes are {notes!r}, not a list of strings")
    state = content.config_records.get(STATE_RECORD)
    return TrainReply(
        client=_int(m, M_CLIENT),
        upload=_array_record(content, ARRAYS),
        num_examples=_int(m, M_EXAMPLES),
        train_loss=_float(m, M_LOSS),
        seconds=_float(m, M_SECONDS),
        a_drift_start=_float(m, M_DRIFT_START),
        a_drift_end=_float(m, M_DRIFT_END),
        notes=tuple(str(n) for n in notes),
        local_sha256=str(state.get(K_LOCAL_SHA256, "")) if state is not None else "",
    )


@dataclass(frozen=True)
class EvaluateReply:
    """A client's scores: ``personalised`` (its own adapter) and, unless disabled, ``global`` (the
    aggregated tensors alone), each ``{"score", "n", "per_task"}`` (`client.evaluate_client`)."""

    scores: dict[str, Any]


def encode_evaluate_reply(reply: EvaluateReply) -> RecordDict:
    return RecordDict({RESULTS: ConfigRecord({"json": json.dumps(reply.scores)})})


def decode_evaluate_reply(content: RecordDict) -> EvaluateReply:
    text = _str(_record(content, RESULTS), "json")
    try:
        scores = json.loads(text)
    except json.JSONDecodeError as e:
        raise ReplyError(f"the evaluate reply's scores are not JSON: {e}") from None
    if not isinstance(scores, dict) or "personalised" not in scores:
        raise ReplyError("the evaluate reply holds no 'personalised' scores")
    return EvaluateReply(scores)


# --- SecAgg+ rounds: the legacy FitIns / FitRes layout Flower's workflow and mod use -------------------------
@dataclass(frozen=True)
class SecAggFit:
    """What a SecAgg+ train instruction adds to a `TrainInstruction`: the download's tensor names (the
    legacy layout has none), the value bound β, Flower's clipping range c, the weight bound W and the
    quantisation range Q (the client counts the values Flower clips with W and Q)."""

    names: tuple[str, ...]
    value_bound: float
    clipping_range: float
    max_weight: float
    quantization_range: int = 2**22


def secagg_fitins(
    instruction: TrainInstruction, download: Mapping[str, torch.Tensor], fit: SecAggFit
) -> FitIns:
    """The legacy ``FitIns`` of a SecAgg+ round (`secagg_server`): the download as float32 NumPy arrays
    in ``fit.names`` order, the instruction's config fields plus `SecAggFit`'s (all scalars)."""
    config = instruction.config_fields() | {
        K_SECAGG_NAMES: json.dumps(list(fit.names)),
        K_SECAGG_BOUND: fit.value_bound,
        K_SECAGG_CLIPPING: fit.clipping_range,
        K_SECAGG_MAX_WEIGHT: fit.max_weight,
        K_SECAGG_Q: fit.quantization_range,
    }
    arrays = [download[n].detach().cpu().float().numpy() for n in fit.names]
    return FitIns(ndarrays_to_parameters(arrays), config)


def decode_secagg_fitins(content: RecordDict) -> tuple[RecordDict, SecAggFit]:
    """A SecAgg+ train message's legacy FitIns content as an ordinary instruction's content (``arrays``:
    the named download, ``config``) and its `SecAggFit`; ReplyError when malformed."""
    try:
        fitins = recorddict_to_fitins(content, keep_input=True)
    except (KeyError, TypeError) as e:
        raise ReplyError(f"not a SecAgg+ train instruction: {e}") from None
    config = dict(fitins.config)
    names = json.loads(_str(config, K_SECAGG_NAMES))
    fit = SecAggFit(
        tuple(names), _float(config, K_SECAGG_BOUND), _float(config, K_SECAGG_CLIPPING),
        _float(config, K_SECAGG_MAX_WEIGHT), _int(config, K_SECAGG_Q),
    )  # fmt: skip
    for key in (K_SECAGG_NAMES, K_SECAGG_BOUND, K_SECAGG_CLIPPING, K_SECAGG_MAX_WEIGHT, K_SECAGG_Q):
        del config[key]
    arrays = parameters_to_ndarrays(fitins.parameters)
    if len(arrays) != len(names):
        raise ReplyError(f"SecAgg+ instruction: {len(arrays)} arrays for {len(names)} names")
    download = to_record(
        {n: torch.from_numpy(np.array(a, copy=True)) for n, a in zip(names, arrays, strict=True)}
    )
    return RecordDict({ARRAYS: download, CONFIG: ConfigRecord(cast(Any, config))}), fit


def encode_secagg_fitres(content: RecordDict, vector: list[np.ndarray], weight: int, clipped: int) -> None:
    """Turn a train reply's ``content`` into what Flower's ``secaggplus_mod`` reads (a legacy FitRes:
    ``vector`` as its parameters, ``weight`` as its num_examples), in place: the plaintext upload is
    emptied and the clip count joins the metrics."""
    legacy = fitres_to_recorddict(
        FitRes(Status(Code.OK, ""), ndarrays_to_parameters(vector), weight, {}), False
    )
    content[ARRAYS] = ArrayRecord()
    values = sum(int(a.size) for a in vector)
    content.metric_records[METRICS][M_SECAGG_CLIPPED] = clipped
    content.metric_records[METRICS][M_SECAGG_VALUES] = values
    for name, record in legacy.items():
        content[name] = record


def decode_secagg_metrics(content: RecordDict) -> tuple[int, int]:
    """(values clipped by SecAgg+, values sent) of a SecAgg+ train reply."""
    m = _record(content, METRICS, "metric_records")
    return _int(m, M_SECAGG_CLIPPED), _int(m, M_SECAGG_VALUES)


# --- field access with protocol errors ------------------------------------------------------------------------
def _record(content: RecordDict, name: str, kind: str = "config_records") -> Any:
    record = getattr(content, kind).get(name)
    if record is None:
        raise ReplyError(f"the message has no {name!r} record (it holds {sorted(content)})")
    return record


def _array_record(content: RecordDict, name: str) -> ArrayRecord:
    record: ArrayRecord | None = content.array_records.get(name)
    if record is None:
        raise ReplyError(f"the message has no {name!r} ArrayRecord (it holds {sorted(content)})")
    return record


def _get(record: Mapping[str, Any], key: str) -> Any:
    if key not in record:
        raise ReplyError(f"the message's record has no {key!r} (it holds {sorted(record)})")
    return record[key]


def _int(record: Mapping[str, Any], key: str) -> int:
    value = _get(record, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise ReplyError(f"{key!r} is {value!r}, not an integer")
    return int(value)


def _float(record: Mapping[str, Any], key: str) -> float:
    value = _get(record, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ReplyError(f"{key!r} is {value!r}, not a number")
    return float(value)


def _str(record: Mapping[str, Any], key: str) -> str:
    value = _get(record, key)
    if not isinstance(value, str):
        raise ReplyError(f"{key!r} is {value!r}, not a string")
    return value
