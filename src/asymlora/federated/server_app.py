"""The Flower ``ServerApp``: the federated round loop over `asymlora.federated.strategies`.

Stock FedAvg does not fit: the server must send only the strategy's shared tensors (zero-padded for
``zeropad``, B0 for ``fedalora-het``), aggregate with validation (rejected updates are recorded, never
averaged in), count the bytes of every message per client, checkpoint every round and resume. So the
loop is written out here on Flower's Message API (`Grid.send_and_receive`), and every decision is a
call to a pure function of `strategies`.

One run of one strategy, in ``out_dir``::

    rounds.jsonl                       one line per completed round (keys below)
    checkpoint/server_state.safetensors  the shared tensors after the last completed round
    checkpoint/state.json              round number, strategy, client ranks, every round's record
    results.json                       personalised and global scores per client, summaries, bytes
    clients/client-K/round-R.safetensors  (simulation) each client's own adapter, kept by the client

A ``rounds.jsonl`` line: ``round``, ``strategy``, ``clients`` (one record per client: ``status`` ok /
rejected / failed / missing, ``bytes_up``, ``bytes_down`` — the ArrayRecord bytes actually put into the
messages —, ``payload_up``/``payload_down`` — tensor data only —, the tensor kinds sent each way,
``num_examples``, ``train_loss``, ``a_drift_start``/``a_drift_end``, ``reason``), ``bytes_up``,
``bytes_down``, ``train_loss`` (example-weighted over the accepted clients), ``accepted``, ``rejected``,
``failed``, ``kept_previous`` and ``seconds``.

Deployment (SuperLink + SuperNodes, see docs/deployment.md) loads ``app`` from this module; its run
config names the YAML config (``config``), ``overrides``, ``strategy``, ``run-dir`` and ``resume``.
"""

from __future__ import annotations

import os

os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json
import math
import shlex
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from torch import Tensor

from asymlora.federated.client import client_adapter_config, initial_state
from asymlora.federated.client_app import from_record, to_record
from asymlora.federated.config import FedConfig, load_fed_config
from asymlora.federated.privacy import (
    KEY_CLIPPING_NORM,
    PrivacyAccountant,
    add_noise,
    noise_multiplier_for,
    noise_std,
    privatize_updates,
)
from asymlora.federated.strategies import (
    Rejection,
    RoleMap,
    Strategy,
    aggregate,
    download_payload,
    init_server_state,
    payload_bytes,
    role_map,
)
from asymlora.io import atomic_dir, atomic_write_text

__all__ = [
    "CHECKPOINT_DIR",
    "ROUNDS_FILE",
    "ClientInfo",
    "ServerOutcome",
    "app",
    "load_checkpoint",
    "make_server_app",
    "run_server",
    "server_roles",
    "summarize_scores",
]

ROUNDS_FILE = "rounds.jsonl"
RESULTS_FILE = "results.json"
CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "server_state.safetensors"
META_FILE = "state.json"

Say = Callable[[str], None]


@dataclass(frozen=True)
class ClientInfo:
    """A connected client: its Flower node, its index (partition id), rank and own data (if any)."""

    node_id: int
    client: int
    rank: int
    data: str = ""


@dataclass
class ServerOutcome:
    """How a server run ended. ``status``: ``completed``, ``stopped`` (faults.stop_after) or ``failed``."""

    status: str = "failed"
    rounds_completed: int = 0
    message: str = ""
    results: dict[str, Any] | None = None
    seconds: float = 0.0
    """Wall time of the strategy's rounds and evaluation."""


# --- the server's model: shapes only --------------------------------------------------------------------
def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _meta_base(name: str) -> Any:
    """The base model ``name`` on the meta device (config only, no weights)."""
    from asymlora.federated.accounting import meta_model

    return meta_model(name)


def server_roles(
    cfg: FedConfig, strategy: Strategy, ranks: Sequence[int]
) -> tuple[RoleMap, dict[str, Tensor]]:
    """The server's role map (meta device; for heterogeneous strategies at the largest client rank) and
    its shared tensors at round 0 (the same seeded init as the clients')."""
    import warnings

    import peft

    rank = max(ranks) if strategy.heterogeneous else cfg.adapter.r
    acfg = client_adapter_config(cfg, strategy, rank)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(_meta_base(cfg.model.name), acfg)
    roles = role_map(model)
    return roles, init_server_state(strategy, initial_state(roles, acfg, cfg.seed), roles)


# --- checkpoints ----------------------------------------------------------------------------------------
def save_checkpoint(out_dir: Path, state: Mapping[str, Tensor], meta: dict[str, Any]) -> None:
    """Write the shared tensors and the round metadata atomically (a half-written checkpoint never shows)."""
    from safetensors.torch import save_file

    with atomic_dir(out_dir / CHECKPOINT_DIR, overwrite=True) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp / STATE_FILE))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1, default=float) + "\n")


def load_checkpoint(out_dir: Path) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
    """(shared tensors, metadata) of the last completed round, or None when there is no checkpoint."""
    from safetensors.torch import load_file

    ck = out_dir / CHECKPOINT_DIR
    if not (ck / META_FILE).is_file() or not (ck / STATE_FILE).is_file():
        return None
    return load_file(str(ck / STATE_FILE)), json.loads((ck / META_FILE).read_text())


def _write_rounds(out_dir: Path, history: Sequence[Mapping[str, Any]]) -> None:
    atomic_write_text(out_dir / ROUNDS_FILE, "".join(json.dumps(r, default=float) + "\n" for r in history))


# --- helpers ---------------------------------------------------------------------------------------------
def _kinds(keys: Sequence[str], roles: RoleMap) -> dict[str, int]:
    """How many tensors of each method tensor name (A, B, B0, ...) a message carries."""
    return dict(Counter(roles[k].tensor if k in roles else "?" for k in keys))


def _error_reason(msg: Message) -> str:
    """The useful part of a client error (Ray wraps it in a long traceback)."""
    reason = str(msg.error.reason)
    for marker in ("Message: ", "Exception occurred. "):
        if marker in reason:
            reason = reason.rsplit(marker, 1)[-1]
    return " ".join(reason.split())[:500].rstrip("'>")


def _summary(values: Mapping[str, float]) -> dict[str, Any]:
    if not values:
        return {"average": None, "std": None, "worst": None}
    avg = sum(values.values()) / len(values)
    std = math.sqrt(sum((v - avg) ** 2 for v in values.values()) / len(values))
    worst = min(values, key=values.__getitem__)
    return {"average": avg, "std": std, "worst": {"client": worst, "value": values[worst]}}


def summarize_scores(
    per_client: Mapping[str, float], baselines: Mapping[str, float] | None = None
) -> dict[str, Any]:
    """Average, population std, worst client and Δm% (against local-only baselines) of client scores."""
    from asymlora.eval import delta_m

    out = _summary(per_client)
    dm, notes = delta_m(per_client, baselines) if baselines else (None, [])
    out["delta_m"] = dm
    if notes:
        out["notes"] = notes
    return out


# --- the server loop ---------------------------------------------------------------------------------------
def discover(grid: Grid, cfg: FedConfig, say: Say) -> dict[int, ClientInfo]:
    """Wait for ``min_nodes`` SuperNodes, ask each who it is, and map node id -> `ClientInfo`."""
    need, deadline = cfg.required_nodes, time.monotonic() + cfg.timeouts.wait_nodes
    while len(list(grid.get_node_ids())) < need:
        if time.monotonic() > deadline:
            have = len(list(grid.get_node_ids()))
            raise RuntimeError(
                f"only {have} of {need} SuperNodes connected within timeouts.wait_nodes={cfg.timeouts.wait_nodes:g} s"
            )
        time.sleep(0.2)
    nodes = list(grid.get_node_ids())
    msgs = [Message(RecordDict(), dst_node_id=n, message_type="query", group_id="hello") for n in nodes]
    replies = list(grid.send_and_receive(msgs, timeout=max(1.0, deadline - time.monotonic())))
    infos: dict[int, ClientInfo] = {}
    seen: dict[int, int] = {}
    for r in replies:
        node = r.metadata.src_node_id
        if r.has_error():
            raise RuntimeError(f"node {node} failed to answer the hello query: {_error_reason(r)}")
        h = r.content["hello"]
        k = int(h["partition-id"])
        if not 0 <= k < cfg.clients.num:
            raise ValueError(f"node {node} has partition-id={k}, outside [0, clients.num={cfg.clients.num})")
        if k in seen:
            raise ValueError(f"nodes {seen[k]} and {node} both have partition-id={k}; give each node its own")
        seen[k] = node
        infos[node] = ClientInfo(node, k, int(h["rank"]) or cfg.client_rank(k), str(h["data"]))
    if len(infos) < need:
        raise RuntimeError(f"only {len(infos)} of {need} clients answered the hello query in time")
    say(
        "clients: "
        + ", ".join(
            f"{i.client} (node {i.node_id}, rank {i.rank})"
            for i in sorted(infos.values(), key=lambda i: i.client)
        )
    )
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


def _accountant(cfg: FedConfig, history: Sequence[Mapping[str, Any]]) -> PrivacyAccountant | None:
    """The run's privacy accountant (None without DP), with the releases of ``history`` (resume) composed."""
    if not cfg.dp.enabled:
        return None
    z = noise_multiplier_for(cfg.dp, cfg.rounds)
    return PrivacyAccountant(
        z, cfg.dp.delta, releases=sum(1 for r in history if r.get("dp", {}).get("released"))
    )


def _release(
    cfg: FedConfig,
    accountant: PrivacyAccountant,
    state: dict[str, Tensor],
    accepted: int,
    norms: Mapping[int, float],
    rnd: int,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Add the round's Gaussian noise (σ = z·C/m) to the aggregate and compose it in ``accountant``;
    (noisy state, the round's ``dp`` record). Nothing is released when no update was accepted."""
    dp, z = cfg.dp, accountant.noise_multiplier
    std = noise_std(z, dp.clipping_norm, accepted) if accepted else 0.0
    if accepted:
        if z > 0:
            state = add_noise(state, std, None if dp.noise_seed is None else dp.noise_seed + rnd)
        accountant.step()
    eps = accountant.epsilon()
    return state, {
        "clipping": dp.clipping,
        "noise_multiplier": z,
        "clipping_norm": dp.clipping_norm,
        "noise_std": std,
        "clients": accepted,
        "released": bool(accepted),
        "releases": accountant.releases,
        "epsilon": _finite_or_none(eps),
        "delta": dp.delta,
        "update_norms": {str(k): v for k, v in sorted(norms.items())},
        "clipped": sorted(k for k, v in norms.items() if v > dp.clipping_norm),
    }


def _dp_summary(cfg: FedConfig, accountant: PrivacyAccountant, history: Sequence[Mapping[str, Any]]) -> dict:
    """results.json's ``dp``: the settings, the final (ε, δ) and ε after each round."""
    return {
        "clipping": cfg.dp.clipping,
        "noise_multiplier": accountant.noise_multiplier,
        "target_epsilon": cfg.dp.target_epsilon,
        "clipping_norm": cfg.dp.clipping_norm,
        "delta": cfg.dp.delta,
        "epsilon": _finite_or_none(accountant.epsilon()),
        "releases": accountant.releases,
        "epsilon_per_round": [r.get("dp", {}).get("epsilon") for r in history],
        "accountant": "opacus RDPAccountant, sample rate 1 (every client every round)",
    }


def run_server(
    grid: Grid,
    cfg: FedConfig,
    strategy_name: str,
    out_dir: str | Path,
    *,
    resume: bool = False,
    client_state_dir: str | None = None,
    threads: int = 0,
    infos: Mapping[int, ClientInfo] | None = None,
    say: Say = print,
) -> ServerOutcome:
    """Run ``cfg.rounds`` rounds of ``strategy_name`` on the nodes of ``grid``, then evaluate every client.

    Args:
        out_dir: where rounds.jsonl, the checkpoint and results.json go.
        resume: continue from the checkpoint in ``out_dir`` (its last completed round).
        client_state_dir: a directory the clients may keep their adapters in (simulation: shared disk).
        threads: torch threads per client (simulation), 0 to leave the clients' default.
        infos: the connected clients (`discover`), when already known.
    """
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    strategy = cfg.strategy(strategy_name)
    outcome = ServerOutcome()
    say(f"=== {strategy_name}: {strategy.description}; {cfg.rounds} rounds, {cfg.clients.num} clients ===")
    ck = load_checkpoint(out_dir) if resume else None
    if ck is None and (out_dir / CHECKPOINT_DIR).exists() and not resume:
        raise FileExistsError(f"{out_dir} already holds a checkpoint; resume it or start in an empty run_dir")
    if infos is None:
        infos = discover(grid, cfg, say)
    check_ranks(infos, cfg, strategy)
    by_client = {i.client: i for i in infos.values()}
    ranks = [by_client[k].rank if k in by_client else cfg.client_rank(k) for k in range(cfg.clients.num)]
    roles, state = server_roles(cfg, strategy, ranks)
    history: list[dict[str, Any]] = []
    last_trained: dict[int, int] = {}
    start = 1
    if ck is not None:
        saved, meta = ck
        if meta.get("strategy") != strategy_name:
            raise ValueError(
                f"{out_dir} holds a checkpoint of strategy {meta.get('strategy')!r}, not {strategy_name!r}"
            )
        if meta.get("ranks") != ranks:
            raise ValueError(f"the client ranks {ranks} differ from the checkpoint's {meta.get('ranks')}")
        if set(saved) != set(state) or any(saved[k].shape != state[k].shape for k in state):
            raise ValueError(f"the checkpoint in {out_dir} does not fit this config's shared tensors")
        state, history = saved, list(meta["history"])
        last_trained = {int(k): int(v) for k, v in meta.get("last_trained", {}).items()}
        start = int(meta["round"]) + 1
        say(f"{strategy_name}: resuming after round {meta['round']} from {out_dir / CHECKPOINT_DIR}")
    _write_rounds(out_dir, history)
    fed_json = cfg.to_json()
    accountant = _accountant(cfg, history)

    def config_for(info: ClientInfo, rnd: int) -> ConfigRecord:
        return ConfigRecord(
            {
                "round": rnd,
                "strategy": strategy_name,
                "fed": fed_json,
                "client": info.client,
                "rank": info.rank,
                "state-dir": client_state_dir or "",
                "threads": threads,
                **({KEY_CLIPPING_NORM: cfg.dp.clipping_norm} if cfg.dp.clipping == "client" else {}),
            }
        )

    for rnd in range(start, cfg.rounds + 1):
        t0 = time.perf_counter()
        alive = set(grid.get_node_ids())
        down = download_payload(strategy, state)
        down_record = to_record(down)
        down_bytes, down_payload = down_record.count_bytes(), payload_bytes(down)
        records: dict[int, dict[str, Any]] = {}
        msgs = []
        for info in sorted(infos.values(), key=lambda i: i.client):
            rec: dict[str, Any] = {"client": info.client, "node_id": info.node_id, "rank": info.rank}
            records[info.client] = rec
            if info.node_id not in alive:
                rec.update(status="missing", reason="node disconnected", bytes_down=0, bytes_up=0)
                continue
            content = RecordDict({"arrays": down_record, "config": config_for(info, rnd)})
            msgs.append(
                Message(
                    content,
                    dst_node_id=info.node_id,
                    message_type="train",
                    group_id=str(rnd),
                    ttl=cfg.timeouts.round + 600,
                )
            )
            rec.update(
                bytes_down=down_bytes, payload_down=down_payload, tensors_down=_kinds(list(down), roles)
            )
            if cfg.log_keys:
                rec["keys_down"] = list(down)
        for k in range(cfg.clients.num):
            if k not in by_client:
                records[k] = {
                    "client": k,
                    "status": "missing",
                    "reason": "never connected",
                    "bytes_down": 0,
                    "bytes_up": 0,
                }
        replies = list(grid.send_and_receive(msgs, timeout=cfg.timeouts.round)) if msgs else []
        updates, ids = [], []
        replies.sort(
            key=lambda r: infos[r.metadata.src_node_id].client if r.metadata.src_node_id in infos else -1
        )
        for r in replies:
            info = infos.get(r.metadata.src_node_id)
            if info is None:
                continue
            rec = records[info.client]
            if r.has_error():
                rec.update(status="failed", reason=_error_reason(r), bytes_up=0)
                continue
            up_record: ArrayRecord = r.content["arrays"]
            m = r.content["metrics"]
            up = from_record(up_record)
            rec.update(
                status="ok",
                bytes_up=up_record.count_bytes(),
                payload_up=payload_bytes(up),
                tensors_up=_kinds(list(up), roles),
                num_examples=int(m["num-examples"]),
                train_loss=_finite_or_none(float(m["train-loss"])),  # None: no local step (local_steps=0)
                client_seconds=float(m["seconds"]),
                a_drift_start=float(m["a-drift-start"]),
                a_drift_end=float(m["a-drift-end"]),
            )
            if "notes" in r.content:
                rec["notes"] = list(r.content["notes"]["notes"])
            if cfg.log_keys:
                rec["keys_up"] = list(up)
            last_trained[info.client] = rnd
            updates.append((up, int(m["num-examples"])))
            ids.append(info.client)
        for rec in records.values():
            rec.setdefault("status", "missing")
            if rec["status"] == "missing":
                rec.setdefault("reason", f"no reply within timeouts.round={cfg.timeouts.round:g} s")
                rec.setdefault("bytes_up", 0)
        refused: dict[int, str] = {}
        if accountant is not None:
            clipped = privatize_updates(cfg.dp, strategy, state, updates, roles, ids)
            updates, ids, refused = clipped.updates, clipped.ids, clipped.refused
        res = aggregate(strategy, state, updates, roles, ids)
        for rej in res.rejected:
            records[rej.client].update(status="rejected", reason=rej.reason, rejected_key=rej.key)
        for k, why in refused.items():
            records[k].update(status="rejected", reason=why, rejected_key=None)
        res.rejected.extend(Rejection(k, why) for k, why in refused.items())
        state = res.state
        dp_record = None
        if accountant is not None:
            state, dp_record = _release(cfg, accountant, res.state, len(res.accepted), clipped.norms, rnd)
        accepted = [records[k] for k in res.accepted]
        with_loss = [r for r in accepted if r["train_loss"] is not None]
        n_acc = sum(r["num_examples"] for r in with_loss)
        note = ""
        if res.kept_previous:
            note = f"round {rnd}: no client update accepted; the shared tensors of round {rnd - 1} are kept"
            say(note)
        clients = [records[k] for k in sorted(records)]
        record = {
            "round": rnd,
            "strategy": strategy_name,
            "clients": clients,
            "bytes_up": sum(c.get("bytes_up", 0) for c in clients),
            "bytes_down": sum(c.get("bytes_down", 0) for c in clients),
            "payload_up": sum(c.get("payload_up", 0) for c in clients),
            "payload_down": sum(c.get("payload_down", 0) for c in clients),
            "train_loss": sum(r["train_loss"] * r["num_examples"] for r in with_loss) / n_acc
            if n_acc
            else None,
            "accepted": list(res.accepted),
            "rejected": [{"client": r.client, "reason": r.reason, "key": r.key} for r in res.rejected],
            "failed": [
                {"client": c["client"], "status": c["status"], "reason": c.get("reason", "")}
                for c in clients
                if c["status"] in ("failed", "missing")
            ],
            "kept_previous": res.kept_previous,
            "note": note,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        if dp_record is not None:
            record["dp"] = dp_record
        history.append(record)
        save_checkpoint(
            out_dir,
            state,
            {
                "round": rnd,
                "strategy": strategy_name,
                "ranks": ranks,
                "history": history,
                "last_trained": last_trained,
            },
        )
        _write_rounds(out_dir, history)
        loss = f"{record['train_loss']:.4f}" if record["train_loss"] is not None else "-"
        say(
            f"{strategy_name} round {rnd}/{cfg.rounds}: accepted {res.accepted}, "
            f"rejected {[r.client for r in res.rejected]}, failed {[f['client'] for f in record['failed']]}; "
            f"loss {loss}; up {record['bytes_up']} B, down {record['bytes_down']} B; {record['seconds']:.1f} s"
        )
        outcome.rounds_completed = rnd
        if cfg.faults.stop_after == rnd and rnd < cfg.rounds:
            outcome.status = "stopped"
            outcome.message = (
                f"stopped after round {rnd} of {cfg.rounds} (faults.stop_after); continue with --resume"
            )
            say(outcome.message)
            return outcome
    outcome.rounds_completed = cfg.rounds

    # --- evaluation: each client's own adapter (personalised) and the aggregated tensors (global) ---
    t0 = time.perf_counter()
    final = download_payload(strategy, state)
    final_record = to_record(final)
    alive = set(grid.get_node_ids())
    msgs = [
        Message(
            RecordDict({"arrays": final_record, "config": config_for(i, last_trained[i.client])}),
            dst_node_id=i.node_id,
            message_type="evaluate",
            group_id="evaluate",
            ttl=cfg.timeouts.evaluate + 600,
        )
        for i in sorted(infos.values(), key=lambda i: i.client)
        if i.node_id in alive and i.client in last_trained
    ]
    replies = list(grid.send_and_receive(msgs, timeout=cfg.timeouts.evaluate)) if msgs else []
    per_client: dict[int, dict[str, Any]] = {}
    eval_failures = []
    for r in replies:
        info = infos.get(r.metadata.src_node_id)
        if info is None:
            continue
        if r.has_error():
            eval_failures.append({"client": info.client, "reason": _error_reason(r)})
            continue
        per_client[info.client] = json.loads(str(r.content["results"]["json"]))
    for k in range(cfg.clients.num):
        if k not in per_client and not any(f["client"] == k for f in eval_failures):
            eval_failures.append({"client": k, "reason": "no evaluation reply"})
    results = assemble_results(cfg, strategy, history, per_client, eval_failures, ranks)
    results["bytes"]["eval_down"] = final_record.count_bytes() * len(msgs)
    if accountant is not None:
        results["dp"] = _dp_summary(cfg, accountant, history)
    results["eval_seconds"] = round(time.perf_counter() - t0, 2)
    atomic_write_text(out_dir / RESULTS_FILE, json.dumps(results, indent=2, default=float) + "\n")
    outcome.results = results
    if not per_client:
        outcome.status, outcome.message = "failed", f"{strategy_name}: no client returned evaluation scores"
    else:
        outcome.status = "completed"
        p = results["personalised"]
        outcome.message = (
            f"{strategy_name}: personalised average {p['average']:.4f} over {len(per_client)} client(s); "
            f"{results['bytes']['total']} bytes in {cfg.rounds} rounds"
        )
    outcome.seconds = time.perf_counter() - t_start
    say(outcome.message)
    return outcome


def client_label(k: int, names: Sequence[str]) -> str:
    """``client-K`` plus its task names (the key of a client in the results tables)."""
    return f"client-{k} ({', '.join(names)})" if names else f"client-{k}"


def assemble_results(
    cfg: FedConfig,
    strategy: Strategy,
    history: Sequence[Mapping[str, Any]],
    per_client: Mapping[int, Mapping[str, Any]],
    eval_failures: Sequence[Mapping[str, Any]],
    ranks: Sequence[int],
) -> dict[str, Any]:
    """results.json of one strategy: per-client scores, summaries, bytes per round and in total."""
    clients = []
    pers: dict[str, float] = {}
    glob: dict[str, float] = {}
    for k in sorted(per_client):
        c = per_client[k]
        label = client_label(k, list(c["personalised"]["per_task"]))
        pers[label] = c["personalised"]["score"]
        if "global" in c:
            glob[label] = c["global"]["score"]
        clients.append({"label": label, **c})
    up = sum(r["bytes_up"] for r in history)
    down = sum(r["bytes_down"] for r in history)
    n_rounds = max(1, len(history))
    return {
        "strategy": strategy.name,
        "description": strategy.description,
        "local_a": strategy.local_a,
        "rounds": len(history),
        "ranks": list(ranks),
        "clients": clients,
        "personalised": summarize_scores(pers),
        "global": summarize_scores(glob) if glob else None,
        "scores": {"personalised": pers, "global": glob},
        "eval_failures": list(eval_failures),
        "bytes": {
            "up": up,
            "down": down,
            "total": up + down,
            "per_round": [
                {"round": r["round"], "up": r["bytes_up"], "down": r["bytes_down"]} for r in history
            ],
            "per_client_per_round": (up + down) / n_rounds / max(1, cfg.clients.num),
            "payload_per_client_per_round": sum(r["payload_up"] + r["payload_down"] for r in history)
            / n_rounds
            / max(1, cfg.clients.num),
        },
        "rounds_with_failures": [r["round"] for r in history if r["failed"] or r["rejected"]],
        "rounds_kept_previous": [r["round"] for r in history if r["kept_previous"]],
        "train_loss": [r["train_loss"] for r in history],
    }


# --- the apps --------------------------------------------------------------------------------------------
def make_server_app(
    cfg: FedConfig,
    runs: Sequence[tuple[str, Path, bool]],
    outcomes: dict[str, ServerOutcome],
    *,
    threads: int = 0,
    say: Say = print,
) -> ServerApp:
    """A ServerApp for the simulation engine: `run_server` for each ``(strategy, out_dir, resume)`` of
    ``runs``, one after the other on the same clients; fills ``outcomes`` in place.

    A strategy whose server raises is recorded as failed and the next one still runs; a strategy that
    stops early on purpose (``faults.stop_after``) ends the simulation.
    """
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        try:
            infos = discover(grid, cfg, say)
        except Exception as e:
            for name, _, _ in runs:
                outcomes[name] = ServerOutcome(
                    "failed", message=f"{name}: no clients: {type(e).__name__}: {e}"
                )
            raise
        for name, out_dir, resume in runs:
            try:
                outcomes[name] = run_server(
                    grid, cfg, name, out_dir, resume=resume, client_state_dir=str(Path(out_dir) / "clients"),
                    threads=threads, infos=infos, say=say,
                )  # fmt: skip
            except Exception as e:
                outcomes[name] = ServerOutcome(
                    "failed", message=f"{name}: the server failed: {type(e).__name__}: {e}"
                )
                say(outcomes[name].message)
                continue
            if outcomes[name].status == "stopped":
                break

    return server


app = ServerApp()
"""The deployment ServerApp (``asymlora.federated.server_app:app``); configured by the run config."""


@app.main()
def _deployment_main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    path = str(rc.get("config", "") or "")
    if not path:
        raise ValueError(
            "the run config has no 'config' (path of the federated YAML config on the SuperLink host)"
        )
    overrides = shlex.split(str(rc.get("overrides", "") or ""))
    cfg = load_fed_config(path, overrides)
    strategy = str(rc.get("strategy", "") or "") or cfg.strategies[0]
    if strategy not in cfg.strategies:
        cfg.strategies.append(strategy)
        cfg.validate()
    run_dir = Path(str(rc.get("run-dir", "") or "") or cfg.run_dir)
    outcome = run_server(grid, cfg, strategy, run_dir / strategy, resume=bool(rc.get("resume", False)))
    if outcome.status == "failed":
        raise RuntimeError(outcome.message)
