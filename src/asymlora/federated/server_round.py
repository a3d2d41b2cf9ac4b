"""One federated round on the server, and the exchanges it is made of (the protocol: `messages`).

`discover` asks every node who it is (the hello query); `Federation.send` sends instructions and
collects the replies (resending the run config to a node that asks for it); `run_round` is one round:
download → train replies validated into per-client records (`collect_train_replies`) → client-level DP
(`privacy`) → validated aggregation (`strategies.aggregate`) → the round's ``rounds.jsonl`` record
(`round_record`). Every decision about tensors is a call to a pure function of `strategies`.

A ``rounds.jsonl`` line: ``round``, ``strategy``, ``clients`` (one record per client: ``status`` ok /
rejected / failed / missing, ``bytes_up``, ``bytes_down`` — the ArrayRecord bytes actually put into the
messages —, ``payload_up``/``payload_down`` — tensor data only, at the ``transfer`` wire dtypes —, the
tensor kinds sent each way, ``num_examples``, ``train_loss``, ``a_drift_start``/``a_drift_end``,
``reason``; ``config_resent`` when the node had to be sent the run config again), ``bytes_up``, ``bytes_down``, ``train_loss``
(example-weighted over the accepted clients), ``accepted``, ``rejected``, ``failed``, ``kept_previous``,
``note``, ``seconds``, with DP ``dp`` and, with ``reject.norm_factor``, ``update_norms`` (client -> ‖Δ_k‖).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from flwr.app import ArrayRecord, Message
from flwr.serverapp import Grid
from torch import Tensor

from asymlora.federated.codec import transfer_payload_bytes
from asymlora.federated.config import FedConfig
from asymlora.federated.messages import (
    RoundInstruction,
    RunConfig,
    TrainInstruction,
    TrainReply,
    decode_hello,
    decode_train_reply,
    from_record,
    hello_message,
    instruction_message,
    is_need_config,
    to_record,
)
from asymlora.federated.privacy import (
    PrivacyAccountant,
    add_noise,
    noise_multiplier_for,
    noise_std,
    privatize_updates,
)
from asymlora.federated.strategies import (
    AggregateResult,
    Rejection,
    RoleMap,
    Strategy,
    aggregate,
    download_payload,
    payload_bytes,
)

__all__ = [
    "ClientInfo",
    "Federation",
    "check_ranks",
    "collect_train_replies",
    "discover",
    "error_reason",
    "finite_or_none",
    "make_accountant",
    "round_record",
    "run_round",
    "sample_clients",
    "sit_out",
    "too_few_answered",
]

Say = Callable[[str], None]
TTL_MARGIN = 600
"""Seconds a message may wait in the SuperLink beyond its exchange's timeout."""


@dataclass(frozen=True)
class ClientInfo:
    """A connected client: its Flower node, its index (partition id), rank and own data (if any)."""

    node_id: int
    client: int
    rank: int
    data: str = ""


def finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def error_reason(msg: Message) -> str:
    """The useful part of a client error (Ray wraps it in a long traceback)."""
    reason = str(msg.error.reason)
    for marker in ("Message: ", "Exception occurred. "):
        if marker in reason:
            reason = reason.rsplit(marker, 1)[-1]
    return " ".join(reason.split())[:500].rstrip("'>")


def _kinds(keys: Sequence[str], roles: RoleMap) -> dict[str, int]:
    """How many tensors of each method tensor name (A, B, B0, ...) a message carries."""
    return dict(Counter(roles[k].tensor if k in roles else "?" for k in keys))


def _wire_bytes(fed: Federation, tensors: Mapping[str, Tensor], way: str) -> int:
    """Tensor data of ``tensors`` at the run's wire dtype of direction ``way`` (``transfer.up/down``)."""
    dtype = getattr(fed.cfg.transfer, way)
    return payload_bytes(tensors) if dtype == "float32" else transfer_payload_bytes(tensors, dtype)


# --- who is there ----------------------------------------------------------------------------------------
def _wait_for_nodes(grid: Grid, cfg: FedConfig, deadline: float) -> list[int]:
    need = cfg.required_nodes
    while len(list(grid.get_node_ids())) < need:
        if time.monotonic() > deadline:
            have = len(list(grid.get_node_ids()))
            raise RuntimeError(
                f"only {have} of {need} SuperNodes connected within timeouts.wait_nodes={cfg.timeouts.wait_nodes:g} s"
            )
        time.sleep(0.2)
    return list(grid.get_node_ids())


def discover(grid: Grid, cfg: FedConfig, say: Say) -> dict[int, ClientInfo]:
    """Wait for ``min_nodes`` SuperNodes, ask each who it is, and map node id -> `ClientInfo`."""
    deadline = time.monotonic() + cfg.timeouts.wait_nodes
    nodes = _wait_for_nodes(grid, cfg, deadline)
    replies = grid.send_and_receive(
        [hello_message(n) for n in nodes], timeout=max(1.0, deadline - time.monotonic())
    )
    infos: dict[int, ClientInfo] = {}
    seen: dict[int, int] = {}
    for r in replies:
        node = r.metadata.src_node_id
        if r.has_error():
            raise RuntimeError(f"node {node} failed to answer the hello query: {error_reason(r)}")
        h = decode_hello(r.content)
        k = h.partition_id
        if not 0 <= k < cfg.clients.num:
            raise ValueError(f"node {node} has partition-id={k}, outside [0, clients.num={cfg.clients.num})")
        if k in seen:
            raise ValueError(f"nodes {seen[k]} and {node} both have partition-id={k}; give each node its own")
        seen[k] = node
        infos[node] = ClientInfo(node, k, h.rank or cfg.client_rank(k), h.data)
    if len(infos) < cfg.required_nodes:
        raise RuntimeError(
            f"only {len(infos)} of {cfg.required_nodes} clients answered the hello query in time"
        )
    listed = sorted(infos.values(), key=lambda i: i.client)
    say("clients: " + ", ".join(f"{i.client} (node {i.node_id}, rank {i.rank})" for i in listed))
    return infos


def check_ranks(infos: Mapping[int, ClientInfo], cfg: FedConfig, strategy: Strategy) -> None:
    """A homogeneous strategy needs adapter.r on every client (a node's ``rank`` must not differ)."""
    if strategy.heterogeneous:
        return
    for i in infos.values():
        if i.rank != cfg.adapter.r:
            raise ValueError(
                f"node {i.node_id} (client {i.client}) asks for rank {i.rank}, but strategy {strategy.name!r} "
                f"needs adapter.r={cfg.adapter.r} on every client"
            )


# --- the exchanges ---------------------------------------------------------------------------------------
class Federation:
    """The server's side of the protocol for one strategy's run on the nodes ``infos`` of ``grid``.

    Tracks which nodes hold the run config (`messages` module docstring): an instruction carries it
    until the node has answered one ordinarily.
    """

    def __init__(
        self, grid: Grid, cfg: FedConfig, strategy: Strategy, infos: Mapping[int, ClientInfo], roles: RoleMap,
        *, state_dir: str = "", threads: int = 0, say: Say = print,
    ) -> None:  # fmt: skip
        self.grid, self.cfg, self.strategy, self.roles, self.say = grid, cfg, strategy, roles, say
        self.infos = dict(infos)
        self.by_client = {i.client: i for i in infos.values()}
        self.state_dir, self.threads = state_dir, threads
        self.run_config = RunConfig.of(cfg)
        self.holds_config: set[int] = set()
        self.failed: set[int] = set()
        """Nodes whose last exchange ended in an error or no reply (their client may move to a new node)."""
        self.ignored: set[int] = set()
        """Nodes that connected later and were left out by `rejoin`."""

    def sorted_infos(self) -> list[ClientInfo]:
        return sorted(self.infos.values(), key=lambda i: i.client)

    def rejoin(self, timeout: float) -> list[ClientInfo]:
        """Take in nodes that connected after `discover` — a restarted SuperNode registers under a new
        node id — by asking them the hello query (up to ``timeout`` s). A node's client replaces the
        client's old node when that one is gone from the grid or failed its last exchange
        (``self.failed``); a client never seen before joins. Its rank must be the one the run's tensors
        were built for (`ClientInfo.rank`, else ``clients.ranks``); a node that does not fit is named
        (``say``) and left out.
        Returns the clients that (re)joined."""
        alive = set(self.grid.get_node_ids())
        new = sorted(alive - set(self.infos) - self.ignored)
        if not new:
            return []
        hellos = [hello_message(n) for n in new]
        joined = []
        for r in self.grid.send_and_receive(hellos, timeout=timeout):
            node, why = _replying_node(r, hellos), ""
            if r.has_error():
                why = f"no hello reply: {error_reason(r)}"
            else:
                h = decode_hello(r.content)
                k, old = h.partition_id, self.by_client.get(h.partition_id)
                rank = h.rank or self.cfg.client_rank(k)
                if not 0 <= k < self.cfg.clients.num or rank != (
                    old.rank if old else self.cfg.client_rank(k)
                ):
                    why = f"partition-id={k}, rank {rank} do not fit this run"
                elif old is not None and old.node_id in alive and old.node_id not in self.failed:
                    why = f"client {k} is still served by node {old.node_id}"
            if why:
                self.ignored.add(node)
                self.say(f"node {node} left out: {why}")
                continue
            info = ClientInfo(node, k, rank, h.data)
            if old is not None:
                del self.infos[old.node_id]
            self.infos[node], self.by_client[k] = info, info
            joined.append(info)
            self.say(f"client {k} (re)joined on node {node}" + (f" (was node {old.node_id})" if old else ""))
        return joined

    def instruction(
        self, kind: type[RoundInstruction], info: ClientInfo, rnd: int, arrays: ArrayRecord
    ) -> RoundInstruction:
        """``kind`` (`TrainInstruction` / `EvaluateInstruction`) for client ``info`` in round ``rnd``."""
        common: dict[str, Any] = {
            "round": rnd, "strategy": self.strategy.name, "client": info.client, "rank": info.rank,
            "config_hash": self.run_config.hash, "arrays": arrays, "state_dir": self.state_dir,
            "threads": self.threads,
            "config_json": None if info.node_id in self.holds_config else self.run_config.json,
        }  # fmt: skip
        if kind is TrainInstruction:
            common["transfer_up"] = self.cfg.transfer.up
        if kind is TrainInstruction and self.cfg.dp.clipping == "client":
            return TrainInstruction(**common, clipping_norm=self.cfg.dp.clipping_norm)
        return kind(**common)

    def send(
        self, instructions: Mapping[int, RoundInstruction], timeout: float
    ) -> tuple[dict[int, Message], Counter[int]]:
        """Send each node (key) its instruction and wait up to ``timeout`` s: (replies by node, number of
        instructions each node was sent — 2 when it answered `messages.NEED_CONFIG` and got the config)."""
        deadline, sent = time.monotonic() + timeout, Counter[int]()
        replies = self._exchange(instructions, timeout, sent)
        again = {
            n: dataclasses.replace(instructions[n], config_json=self.run_config.json)
            for n, r in replies.items()
            if is_need_config(r)
        }
        if again:
            self.say(f"node(s) {sorted(again)} hold no run config (restarted?); sending it again")
            replies.update(self._exchange(again, max(1.0, deadline - time.monotonic()), sent))
        self.holds_config.update(n for n, r in replies.items() if not r.has_error())
        self.failed = (self.failed - set(replies)) | {n for n, r in replies.items() if r.has_error()}
        self.failed |= set(instructions) - set(replies)
        return replies, sent

    def _exchange(
        self, instructions: Mapping[int, RoundInstruction], timeout: float, sent: Counter[int]
    ) -> dict[int, Message]:
        if not instructions:
            return {}
        msgs = [instruction_message(ins, node, timeout + TTL_MARGIN) for node, ins in instructions.items()]
        sent.update(instructions.keys())
        replies = self.grid.send_and_receive(msgs, timeout=timeout)
        return {n: r for r in replies if (n := _replying_node(r, msgs)) in instructions}


def _replying_node(reply: Message, sent: Sequence[Message]) -> int:
    """The node a reply answers for: its source, or — for the error the SuperLink itself writes when a
    node went silent (Flower's "Node Unavailable", sent from the SuperLink's own node id) — the
    destination of the instruction it replies to."""
    by_id = {m.metadata.message_id: m.metadata.dst_node_id for m in sent if m.metadata.message_id}
    return by_id.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)


# --- one round --------------------------------------------------------------------------------------------
def _round_start(
    fed: Federation, rnd: int, down: Mapping[str, Tensor], down_record: Any
) -> tuple[dict[int, dict[str, Any]], dict[int, RoundInstruction]]:
    """Every client's record (missing when its node is gone) and the instruction of every live node;
    nodes that connected since the last round (a restarted SuperNode) are taken in first (`Federation.rejoin`)."""
    fed.rejoin(fed.cfg.timeouts.wait_nodes)
    alive = set(fed.grid.get_node_ids())
    records: dict[int, dict[str, Any]] = {}
    instructions: dict[int, RoundInstruction] = {}
    down_bytes = _wire_bytes(fed, down, "down")
    for info in fed.sorted_infos():
        rec: dict[str, Any] = {"client": info.client, "node_id": info.node_id, "rank": info.rank}
        records[info.client] = rec
        if info.node_id not in alive:
            rec.update(status="missing", reason="node disconnected", bytes_down=0, bytes_up=0)
            continue
        instructions[info.node_id] = fed.instruction(TrainInstruction, info, rnd, down_record)
        rec.update(bytes_down=0, payload_down=down_bytes, tensors_down=_kinds(list(down), fed.roles))
        if fed.cfg.log_keys:
            rec["keys_down"] = list(down)
    for k in range(fed.cfg.clients.num):
        if k not in fed.by_client:
            records[k] = {
                "client": k,
                "status": "missing",
                "reason": "never connected",
                "bytes_down": 0,
                "bytes_up": 0,
            }
    return records, instructions


def _validated(
    fed: Federation, info: ClientInfo, reply: Message
) -> tuple[TrainReply, dict[str, Tensor]] | str:
    """The decoded train reply and upload, or why it is refused (a client error, a malformed reply)."""
    if reply.has_error():
        return error_reason(reply)
    try:
        train = decode_train_reply(reply.content)
        upload = from_record(train.upload, float_dtype=torch.float32)  # the server's state stays float32
    except ValueError as e:
        return f"malformed reply: {e}"
    if train.client != info.client:
        return f"the reply names client {train.client}, but node {info.node_id} is client {info.client}"
    return train, upload


def collect_train_replies(
    fed: Federation, records: dict[int, dict[str, Any]], replies: Mapping[int, Message]
) -> tuple[list[tuple[dict[str, Tensor], int]], list[int]]:
    """Fill the client records from the replies; (updates with their example counts, their clients)."""
    updates, ids = [], []
    for info in fed.sorted_infos():
        if info.node_id not in replies:
            continue
        rec, got = records[info.client], _validated(fed, info, replies[info.node_id])
        if isinstance(got, str):
            rec.update(status="failed", reason=got, bytes_up=0)
            continue
        train, up = got
        rec.update(
            status="ok", bytes_up=train.upload.count_bytes(), payload_up=_wire_bytes(fed, up, "up"),
            tensors_up=_kinds(list(up), fed.roles), num_examples=train.num_examples,
            train_loss=finite_or_none(train.train_loss),  # None: no local step (local_steps=0)
            client_seconds=train.seconds, a_drift_start=train.a_drift_start, a_drift_end=train.a_drift_end,
        )  # fmt: skip
        if train.notes:
            rec["notes"] = list(train.notes)
        if train.local_sha256:
            rec["local_sha256_start"] = train.local_sha256
        if fed.cfg.log_keys:
            rec["keys_up"] = list(up)
        updates.append((up, train.num_examples))
        ids.append(info.client)
    for rec in records.values():
        rec.setdefault("status", "missing")
        if rec["status"] == "missing":
            rec.setdefault("reason", f"no reply within timeouts.round={fed.cfg.timeouts.round:g} s")
            rec.setdefault("bytes_up", 0)
    return updates, ids


# --- DP and aggregation --------------------------------------------------------------------------------------
def make_accountant(cfg: FedConfig, history: Sequence[Mapping[str, Any]]) -> PrivacyAccountant | None:
    """The run's privacy accountant (None without DP), with the releases of ``history`` (resume) composed."""
    if not cfg.dp.enabled:
        return None
    z = noise_multiplier_for(cfg.dp, cfg.rounds)
    return PrivacyAccountant(
        z, cfg.dp.delta, releases=sum(1 for r in history if r.get("dp", {}).get("released"))
    )


def _release(
    cfg: FedConfig, accountant: PrivacyAccountant, state: dict[str, Tensor], accepted: int,
    norms: Mapping[int, float], rnd: int,
) -> tuple[dict[str, Tensor], dict[str, Any]]:  # fmt: skip
    """Add the round's Gaussian noise (σ = z·C/m) to the aggregate and compose it in ``accountant``;
    (noisy state, the round's ``dp`` record). Nothing is released when no update was accepted."""
    dp, z = cfg.dp, accountant.noise_multiplier
    std = noise_std(z, dp.clipping_norm, accepted) if accepted else 0.0
    if accepted:
        if z > 0:
            state = add_noise(state, std, None if dp.noise_seed is None else dp.noise_seed + rnd)
        accountant.step()
    return state, {
        "clipping": dp.clipping,
        "noise_multiplier": z,
        "clipping_norm": dp.clipping_norm,
        "noise_std": std,
        "clients": accepted,
        "released": bool(accepted),
        "releases": accountant.releases,
        "epsilon": finite_or_none(accountant.epsilon()),
        "delta": dp.delta,
        "update_norms": {str(k): v for k, v in sorted(norms.items())},
        "clipped": sorted(k for k, v in norms.items() if v > dp.clipping_norm),
    }


def _aggregate(
    fed: Federation, state: dict[str, Tensor], updates: list, ids: list[int],
    records: dict[int, dict[str, Any]], accountant: PrivacyAccountant | None, rnd: int,
) -> tuple[dict[str, Tensor], AggregateResult, dict[str, Any] | None]:  # fmt: skip
    """Clip (DP), aggregate with validation, add the noise (DP); rejected clients marked in ``records``."""
    refused: dict[int, str] = {}
    if accountant is not None:
        clipped = privatize_updates(fed.cfg.dp, fed.strategy, state, updates, fed.roles, ids)
        updates, ids, refused = clipped.updates, clipped.ids, clipped.refused
    res = aggregate(fed.strategy, state, updates, fed.roles, ids, norm_factor=fed.cfg.reject.norm_factor)
    for rej in res.rejected:
        records[cast(int, rej.client)].update(status="rejected", reason=rej.reason, rejected_key=rej.key)
    for k, why in refused.items():
        records[k].update(status="rejected", reason=why, rejected_key=None)
    res.rejected.extend(Rejection(k, why) for k, why in refused.items())
    res = too_few_accepted(fed.cfg, res, state, records)
    if accountant is None:
        return res.state, res, None
    noisy, dp_record = _release(fed.cfg, accountant, res.state, len(res.accepted), clipped.norms, rnd)
    return noisy, res, dp_record


def round_record(
    rnd: int,
    strategy: str,
    records: Mapping[int, dict[str, Any]],
    res: AggregateResult,
    note: str,
    seconds: float,
) -> dict[str, Any]:
    """The round's ``rounds.jsonl`` line (module docstring) from the client records and the aggregation."""
    clients = [records[k] for k in sorted(records)]
    accepted = [cast(int, k) for k in res.accepted]  # the server's client ids are the client indexes
    with_loss = [records[k] for k in accepted if records[k]["train_loss"] is not None]
    n_acc = sum(r["num_examples"] for r in with_loss)
    norms = {"update_norms": {str(k): v for k, v in sorted(res.norms.items())}} if res.norms else {}
    return {
        "round": rnd,
        "strategy": strategy,
        "clients": clients,
        "bytes_up": sum(c.get("bytes_up", 0) for c in clients),
        "bytes_down": sum(c.get("bytes_down", 0) for c in clients),
        "payload_up": sum(c.get("payload_up", 0) for c in clients),
        "payload_down": sum(c.get("payload_down", 0) for c in clients),
        "train_loss": sum(r["train_loss"] * r["num_examples"] for r in with_loss) / n_acc if n_acc else None,
        "accepted": accepted,
        "rejected": [{"client": r.client, "reason": r.reason, "key": r.key} for r in res.rejected],
        "failed": [
            {"client": c["client"], "status": c["status"], "reason": c.get("reason", "")}
            for c in clients
            if c["status"] in ("failed", "missing")
        ],
        "kept_previous": res.kept_previous,
        "note": note,
        "seconds": seconds,
        **norms,  # reject.norm_factor is set: the norms it compared
    }


# --- partial participation (docs/federated.md, "Partial participation") -------------------------------------
def sample_clients(num: int, per_round: int, seed: int, rnd: int) -> list[int]:
    """The clients of round ``rnd`` (sorted): the first ``per_round`` of a permutation of ``range(num)`` drawn by
    a NumPy Generator seeded with ``(seed, rnd)`` — uniform without replacement, the same draw on every run
    and after ``--resume``; every client when ``per_round >= num``."""
    if per_round >= num:
        return list(range(num))
    perm = np.random.default_rng([seed, rnd]).permutation(num)
    return sorted(int(k) for k in perm[:per_round])


def sit_out(
    fed: Federation, rnd: int, records: dict[int, dict[str, Any]],
    instructions: dict[int, RoundInstruction], last_trained: Mapping[int, int],
) -> list[int]:  # fmt: skip
    """Drop the instructions of the clients not sampled in round ``rnd`` (their records: ``not_sampled``)
    and tell every sampled client the last round it trained in (0: never), whose local tensors it starts
    from; the sampled clients."""
    sampled = sample_clients(fed.cfg.clients.num, fed.cfg.clients_per_round, fed.cfg.seed, rnd)
    for node in list(instructions):
        k = fed.infos[node].client
        if k in sampled:
            train = cast(TrainInstruction, instructions[node])
            instructions[node] = dataclasses.replace(train, carried_round=last_trained.get(k, 0))
        else:
            del instructions[node]
    for k, rec in records.items():
        if k not in sampled:
            keep = {f: rec[f] for f in ("client", "node_id", "rank") if f in rec}
            records[k] = keep | {"status": "not_sampled", "bytes_down": 0, "bytes_up": 0}
    return sampled


def too_few_answered(cfg: FedConfig, rnd: int, records: dict[int, dict[str, Any]], ids: Sequence[int]) -> str:
    """The round's note when fewer than ``clients.min_per_round`` (but some) clients answered — the round is
    then not aggregated and their records say ``not_aggregated`` —, else ""."""
    need = cfg.clients.min_per_round
    if not 0 < len(ids) < need:
        return ""
    for k in ids:
        records[k].update(status="not_aggregated", reason=f"fewer than clients.min_per_round={need} answered")
    return (
        f"round {rnd}: {len(ids)} client(s) answered, fewer than clients.min_per_round={need}; not aggregated, "
        f"the shared tensors of round {rnd - 1} are kept"
    )


def too_few_accepted(
    cfg: FedConfig, res: AggregateResult, state: Mapping[str, Tensor], records: dict[int, dict[str, Any]]
) -> AggregateResult:
    """``res`` itself, or — when fewer than ``clients.min_per_round`` updates were accepted (the others
    rejected: shape, NaN/Inf, norm, DP bound) — the previous ``state`` with no client accepted, the accepted
    ones' records then ``not_aggregated``: the minimum counts the updates averaged, not the answers."""
    need = cfg.clients.min_per_round
    if not 0 < len(res.accepted) < need:
        return res
    for k in res.accepted:
        reason = f"{len(res.accepted)} update(s) accepted, fewer than clients.min_per_round={need}"
        records[cast(int, k)].update(status="not_aggregated", reason=reason)
    kept = {n: t.detach().clone() for n, t in state.items()}
    return dataclasses.replace(res, state=kept, accepted=[], weights={})


def run_round(
    fed: Federation, state: dict[str, Tensor], rnd: int, accountant: PrivacyAccountant | None,
    *, last_trained: Mapping[int, int] | None = None,
) -> tuple[dict[str, Tensor], dict[str, Any], list[int]]:  # fmt: skip
    """One round: (the new shared tensors, the round's record, the clients that trained).

    ``last_trained`` (the last round each client trained in, `round_log.RoundLog`): when given, only the
    round's sampled clients (`sit_out`) get an instruction, each told its last trained round."""
    t0 = time.perf_counter()
    down = download_payload(fed.strategy, state)
    down_record = to_record(down, transfer_dtype=fed.cfg.transfer.down)
    records, instructions = _round_start(fed, rnd, down, down_record)
    sampled = (
        sorted(records) if last_trained is None else sit_out(fed, rnd, records, instructions, last_trained)
    )
    replies, sent = fed.send(instructions, fed.cfg.timeouts.round)
    for node, n in sent.items():
        records[fed.infos[node].client]["bytes_down"] = n * down_record.count_bytes()
        if n > 1:
            records[fed.infos[node].client]["config_resent"] = True
    updates, ids = collect_train_replies(fed, records, replies)
    trained = list(ids)
    note = too_few_answered(fed.cfg, rnd, records, ids)
    if note:
        updates, ids = [], []  # recorded, not aggregated: the shared tensors stay
        fed.say(note)
    state, res, dp_record = _aggregate(fed, state, updates, ids, records, accountant, rnd)
    withheld = [k for k in ids if records[k]["status"] == "not_aggregated"]
    if withheld and not note:
        note = (
            f"round {rnd}: {len(withheld)} update(s) accepted, {len(res.rejected)} rejected: fewer than "
            f"clients.min_per_round={fed.cfg.clients.min_per_round}; not aggregated, the shared tensors of "
            f"round {rnd - 1} are kept"
        )
        fed.say(note)
    elif res.kept_previous and not note:
        note = f"round {rnd}: no client update accepted; the shared tensors of round {rnd - 1} are kept"
        fed.say(note)
    record = round_record(rnd, fed.strategy.name, records, res, note, round(time.perf_counter() - t0, 3))
    record.update(sampled=sampled, weights={str(k): p for k, p in res.weights.items()})
    if dp_record is not None:
        record["dp"] = dp_record
    return state, record, trained
