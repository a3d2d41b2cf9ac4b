"""The Flower ``ServerApp``: the federated round loop over `asymlora.federated.strategies`.

Stock FedAvg does not fit: the server must send only the strategy's shared tensors (zero-padded for
``zeropad``, B0 for ``fedalora-het``), aggregate with validation (rejected updates are recorded, never
averaged in), count the bytes of every message per client, checkpoint every round and resume. So the
loop is written out on Flower's Message API (`Grid.send_and_receive`), in four parts:

- `asymlora.federated.messages`: the protocol (instructions, replies, their record layout);
- `asymlora.federated.server_round`: who is there (`discover`), the exchanges (`Federation`), one
  round (`run_round`: replies validated, DP, aggregation, the ``rounds.jsonl`` record);
- `asymlora.federated.round_log`: ``rounds.jsonl``, the checkpoint after every round, ``--resume``;
- `asymlora.federated.server_results`: the evaluation phase and ``results.json``;

and this module: `run_server` (one strategy's run) and the two ServerApps (simulation, deployment).

One run of one strategy, in ``out_dir``::

    rounds.jsonl                       one line per completed round (keys: `server_round`)
    checkpoint/                        the shared tensors and every round's record (`round_log`)
    results.json                       personalised and global scores per client, summaries, bytes
    clients/client-K/round-R.safetensors  (simulation) each client's own adapter, kept by the client

Deployment (SuperLink + SuperNodes, see docs/deployment.md) loads ``app`` from this module; its run
config names the YAML config (``config``), ``overrides``, ``strategy``, ``run-dir`` and ``resume``.
"""

from __future__ import annotations

import os

os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import shlex
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from torch import Tensor

from asymlora.federated.accounting import meta_model
from asymlora.federated.client import client_adapter_config, initial_state
from asymlora.federated.config import FedConfig, load_fed_config
from asymlora.federated.round_log import (
    CHECKPOINT_DIR,
    ROUNDS_FILE,
    RoundLog,
    load_checkpoint,
    trailing_failed_rounds,
)
from asymlora.federated.secagg_server import run_secagg_round
from asymlora.federated.server_results import (
    RESULTS_FILE,
    assemble_results,
    client_label,
    evaluate_and_write,
    summarize_scores,
)
from asymlora.federated.server_round import (
    ClientInfo,
    Federation,
    check_ranks,
    discover,
    make_accountant,
    run_round,
)
from asymlora.federated.strategies import RoleMap, Strategy, init_server_state, role_map

__all__ = [
    "CHECKPOINT_DIR",
    "RESULTS_FILE",
    "ROUNDS_FILE",
    "ClientInfo",
    "ServerOutcome",
    "app",
    "assemble_results",
    "client_label",
    "discover",
    "load_checkpoint",
    "make_server_app",
    "run_server",
    "server_roles",
    "summarize_scores",
]

Say = Callable[[str], None]


@dataclass
class ServerOutcome:
    """How a server run ended. ``status``: ``completed``, ``stopped`` (faults.stop_after) or ``failed``."""

    status: str = "failed"
    rounds_completed: int = 0
    message: str = ""
    results: dict[str, Any] | None = None
    seconds: float = 0.0
    """Wall time of the strategy's rounds and evaluation."""


def server_roles(
    cfg: FedConfig, strategy: Strategy, ranks: Sequence[int]
) -> tuple[RoleMap, dict[str, Tensor]]:
    """The server's role map (meta device; for heterogeneous strategies at the largest client rank) and
    its shared tensors at round 0 (the same seeded init as the clients')."""
    rank = max(ranks) if strategy.heterogeneous else cfg.adapter.r
    acfg = client_adapter_config(cfg, strategy, rank)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(meta_model(cfg.model.name), acfg)
    roles = role_map(model)
    return roles, init_server_state(strategy, initial_state(roles, acfg, cfg.seed), roles)


def _say_round(fed: Federation, record: dict[str, Any]) -> None:
    loss = f"{record['train_loss']:.4f}" if record["train_loss"] is not None else "-"
    fed.say(
        f"{fed.strategy.name} round {record['round']}/{fed.cfg.rounds}: accepted {record['accepted']}, "
        f"rejected {[r['client'] for r in record['rejected']]}, failed {[f['client'] for f in record['failed']]}; "
        f"loss {loss}; up {record['bytes_up']} B, down {record['bytes_down']} B; {record['seconds']:.1f} s"
    )


def _finish(outcome: ServerOutcome, fed: Federation, results: dict[str, Any], scored: int) -> None:
    outcome.results = results
    name = fed.strategy.name
    if not scored:  # say why, as _too_many_failed_rounds does: the reasons are otherwise only in results.json
        reasons = sorted({str(f["reason"]) for f in results.get("eval_failures", [])})
        why = f" ({'; '.join(reasons)[:500]})" if reasons else ""
        outcome.status, outcome.message = "failed", f"{name}: no client returned evaluation scores{why}"
        return
    outcome.status = "completed"
    outcome.message = (
        f"{name}: personalised average {results['personalised']['average']:.4f} over {scored} client(s); "
        f"{results['bytes']['total']} bytes in {fed.cfg.rounds} rounds"
    )


def _too_many_failed_rounds(
    outcome: ServerOutcome, cfg: FedConfig, history: Sequence[Mapping[str, Any]], say: Say
) -> bool:
    """True (and ``outcome`` failed, with the reasons) when the last ``clients.max_failed_rounds`` rounds
    had no answer from any client: the run stops rather than spend its remaining rounds training nothing."""
    limit, n = cfg.clients.max_failed_rounds, trailing_failed_rounds(history)
    if limit is None or n < limit:
        return False
    last = history[-1]
    reasons = sorted({f"{f['status']}: {f['reason']}" for f in last["failed"]})
    outcome.status = "failed"
    outcome.message = (
        f"{last['strategy']}: rounds {last['round'] - n + 1}-{last['round']} had no answer from any client "
        f"(clients.max_failed_rounds={limit}; round {last['round']}: {'; '.join(reasons)[:500]}); stopped. "
        "Fix the clients and continue with --resume: those rounds run again from the shared tensors before them"
    )
    say(outcome.message)
    return True


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

    Raises:
        FileExistsError: ``out_dir`` holds a checkpoint and ``resume`` is off.
        ValueError: bad node ranks, or a checkpoint that does not fit this run.
    """
    t_start = time.perf_counter()
    strategy = cfg.strategy(strategy_name)
    say(f"=== {strategy_name}: {strategy.description}; {cfg.rounds} rounds, {cfg.clients.num} clients ===")
    log = RoundLog.open(out_dir, strategy_name, resume)
    infos = infos if infos is not None else discover(grid, cfg, say)
    check_ranks(infos, cfg, strategy)
    by_client = {i.client: i for i in infos.values()}
    ranks = [by_client[k].rank if k in by_client else cfg.client_rank(k) for k in range(cfg.clients.num)]
    roles, state = server_roles(cfg, strategy, ranks)
    state = log.start(state, ranks, say)
    fed = Federation(
        grid, cfg, strategy, infos, roles, state_dir=client_state_dir or "", threads=threads, say=say
    )
    accountant = make_accountant(cfg, log.history)
    outcome = ServerOutcome()
    one_round = run_secagg_round if cfg.secagg.enabled else run_round  # Flower's SecAgg+ as the exchange
    for rnd in range(log.next_round, cfg.rounds + 1):
        state, record, trained = one_round(fed, state, rnd, accountant, last_trained=log.last_trained)
        log.append(record, state, trained)
        _say_round(fed, record)
        outcome.rounds_completed = rnd
        if _too_many_failed_rounds(outcome, cfg, log.history, say):
            return outcome
        if cfg.faults.stop_after == rnd and rnd < cfg.rounds:
            outcome.status = "stopped"
            outcome.message = (
                f"stopped after round {rnd} of {cfg.rounds} (faults.stop_after); continue with --resume"
            )
            say(outcome.message)
            return outcome
    outcome.rounds_completed = cfg.rounds
    _finish(outcome, fed, *evaluate_and_write(fed, state, log, accountant))
    outcome.seconds = time.perf_counter() - t_start
    say(outcome.message)
    return outcome


# --- the apps --------------------------------------------------------------------------------------------
def _run_all(
    grid: Grid, cfg: FedConfig, runs: Sequence[tuple[str, Path, bool]], outcomes: dict[str, ServerOutcome],
    threads: int, say: Say,
) -> None:  # fmt: skip
    try:
        infos = discover(grid, cfg, say)
    except Exception as e:
        for name, _, _ in runs:
            outcomes[name] = ServerOutcome("failed", message=f"{name}: no clients: {type(e).__name__}: {e}")
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
        _run_all(grid, cfg, runs, outcomes, threads, say)

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
    cfg = load_fed_config(path, shlex.split(str(rc.get("overrides", "") or "")))
    strategy = str(rc.get("strategy", "") or "") or cfg.strategies[0]
    if strategy not in cfg.strategies:
        cfg.strategies.append(strategy)
        cfg.validate()
    run_dir = Path(str(rc.get("run-dir", "") or "") or cfg.run_dir)
    outcome = run_server(grid, cfg, strategy, run_dir / strategy, resume=bool(rc.get("resume", False)))
    if outcome.status == "failed":
        raise RuntimeError(outcome.message)
