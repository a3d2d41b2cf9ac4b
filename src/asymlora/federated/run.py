"""``asymlora fed CONFIG.yaml [key=value ...] [--resume] [--overwrite]``: federated runs on Flower's
simulation engine, driven from Python (`flwr.simulation.run_simulation` with a Ray backend sized by
``simulation.*``), never through ``flwr run`` (which would build a per-run environment and pull a CUDA
torch, docs/design.md §10).

For every strategy of ``strategies`` (one after the other, same clients, data and seed) the run
directory gets ``<strategy>/`` (rounds.jsonl, checkpoint/, results.json, clients/); with
``eval.local_only`` each client also trains alone for the same number of steps (``local_only/``), the
reference of Δm%. ``results.json`` and ``results.md`` at the top compare the strategies.

Exit codes: 0 every strategy completed; 1 a strategy failed (its server raised, or no client returned
scores; the reason is printed and recorded); 2 a user error (bad config, empty client, ...); 3 the run
stopped early on purpose (``faults.stop_after``), continue with ``--resume``.
"""

from __future__ import annotations

import os

os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # no GPUs here; silences a Ray warning
# Ray starts its workers at niceness 15: on a machine shared with other jobs the clients would then get a
# fraction of a core each. Run them at the driver's priority (override by setting the variable).
os.environ.setdefault("RAY_worker_niceness", "0")

import argparse
import contextlib
import json
import logging
import multiprocessing
import shutil
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch

from asymlora.config import ConfigError
from asymlora.federated.accounting import adapted_meta_model, meta_model
from asymlora.federated.client import client_adapter_config, local_only_baseline
from asymlora.federated.config import FedConfig, dump_fed_config, load_fed_config
from asymlora.federated.partition import client_tasks, load_partition, summary_lines
from asymlora.federated.round_log import completed_rounds
from asymlora.federated.secagg import check_secagg_weights
from asymlora.io import atomic_write_text
from asymlora.progress import set_env

__all__ = ["EXIT_FAILED", "EXIT_STOPPED", "EXIT_USER_ERROR", "check_model", "main", "run", "simulate"]

EXIT_FAILED = 1
EXIT_USER_ERROR = 2
EXIT_STOPPED = 3
CONFIG_FILE = "config.yaml"
RESULTS_FILE = "results.json"
LOCAL_DIR = "local_only"
VOLATILE = (
    "rounds",
    "faults",
    "timeouts",
    "simulation",
    "eval",
    "strategies",
    "log_keys",
    "clients.max_failed_rounds",
    "run_dir",
)
"""Config keys (sections, or ``section.key``) that may change between a run and its ``--resume``: how long
and how it runs, not what its finished rounds computed (``clients.max_failed_rounds`` so that a run stopped
by rounds no client answered can be resumed with a higher limit; ``run_dir`` because a run directory may be
moved or copied, e.g. a campaign's ``out_dir`` to another machine: every path in it is relative to it)."""


def _stable(cfg: FedConfig) -> dict[str, Any]:
    out = {k: v for k, v in cfg.to_dict().items() if k not in VOLATILE}
    for section, _, key in (v.partition(".") for v in VOLATILE if "." in v):
        out[section] = {k: v for k, v in out[section].items() if k != key}
    return out


def prepare_run_dir(cfg: FedConfig, *, overwrite: bool, resume: bool) -> Path:
    """Create the run directory; refuse to mix two runs, or to resume with a different config."""
    if overwrite and resume:
        raise ValueError("--resume and --overwrite exclude each other")
    run_dir = Path(cfg.run_dir)
    for path in (run_dir, *run_dir.parents):  # else "[Errno 20] Not a directory", without the key or a fix
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(
                f"run_dir={cfg.run_dir}: {path} is a file, not a directory; choose another run_dir=..."
            )
    saved = run_dir / CONFIG_FILE
    if saved.is_file() and not overwrite:
        if not resume:
            raise FileExistsError(
                f"{run_dir} already holds a federated run; pass --resume to continue it or --overwrite to "
                "start over (or choose another run_dir=...)"
            )
        previous = load_fed_config(saved)
        if _stable(previous) != _stable(cfg):
            diff = sorted(k for k in _stable(cfg) if _stable(cfg)[k] != _stable(previous).get(k))
            raise ConfigError(
                f"{run_dir} holds a run with a different config ({', '.join(diff)} differ); --resume needs the "
                f"same config (only {', '.join(VOLATILE)} may change). Compare with {saved}, or use --overwrite."
            )
        for name in cfg.strategies:  # else it ran no round, scored the later model and recorded rounds=N
            done = completed_rounds(run_dir / name)
            if done > cfg.rounds:
                raise ConfigError(
                    f"rounds={cfg.rounds} is below the {done} rounds {run_dir / name} has already completed; "
                    f"--resume with rounds >= {done}, or start over with --overwrite"
                )
    elif run_dir.exists() and any(run_dir.iterdir()):
        if not saved.is_file():
            raise FileExistsError(
                f"{run_dir} exists and is not an asymlora federated run; choose another run_dir=..."
            )
        if overwrite:
            shutil.rmtree(run_dir)
    elif resume:
        raise FileNotFoundError(f"{run_dir} holds no federated run to resume; start it without --resume")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(saved, dump_fed_config(cfg))
    return run_dir


def check_model(cfg: FedConfig, ranks: list[int]) -> None:
    """Adapt ``model.name`` (its shapes on the meta device: no weights) as every strategy's server does, so that
    a model that cannot be read or ``adapter.target_modules`` that match none of its modules fail before the run
    directory is written (the server would fail only once the simulation had started: exit 1, a run directory
    left that needs --overwrite). Raises ValueError naming the value."""
    try:
        meta_model(cfg.model.name)
    except (OSError, ValueError) as e:
        raise ValueError(f"model.name={cfg.model.name!r} cannot be read: {e}") from None
    for name in cfg.strategies:
        strategy = cfg.strategy(name)
        rank = max(ranks) if strategy.heterogeneous else cfg.adapter.r  # as `server_app.server_roles`
        adapted_meta_model(cfg.model.name, client_adapter_config(cfg, strategy, rank))


RUN_SIMULATION_DEPRECATION = "The `run_simulation` function is deprecated"
"""Start of the one Flower log record that :func:`_no_run_simulation_banner` drops."""


class _DropRecord(logging.Filter):
    """Drops the log records whose first argument or message starts with ``text``."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        first = record.args[0] if isinstance(record.args, tuple) and record.args else record.msg
        return not str(first).startswith(self.text)


@contextlib.contextmanager
def _no_run_simulation_banner() -> Iterator[None]:
    """Flower 1.41 logs "DEPRECATED FEATURE: The `run_simulation` function is deprecated ..." on every call:
    it points to ``flwr run``, which asymlora does not use on purpose (docs/federated.md, "Why
    run_simulation"). Only that record is dropped, and only for the duration of the call."""
    from flwr.common.logger import FLOWER_LOGGER

    drop = _DropRecord(RUN_SIMULATION_DEPRECATION)
    FLOWER_LOGGER.addFilter(drop)
    try:
        yield
    finally:
        FLOWER_LOGGER.removeFilter(drop)


def simulate(cfg: FedConfig, runs: list[tuple[str, Path, bool]], *, say: Any = print) -> dict[str, Any]:
    """Strategies ``runs`` = [(strategy, out_dir, resume), ...] one after the other in one simulation
    (one Ray start; the clients keep their base model loaded); returns each strategy's `ServerOutcome`."""
    from flwr.simulation import run_simulation

    from asymlora.federated.client_app import app as client_app  # the apps import flwr (optional)
    from asymlora.federated.server_app import ServerOutcome, make_server_app

    s = cfg.simulation
    outcomes: dict[str, Any] = {}
    server = make_server_app(cfg, runs, outcomes, threads=s.threads_per_client, say=say)
    backend: dict[str, Any] = {
        "init_args": {
            "address": "local",  # never attach to another user's Ray cluster
            "num_cpus": s.num_cpus,
            "num_gpus": s.num_gpus,
            "object_store_memory": s.object_store_mb * 2**20,
            "include_dashboard": False,
        },
        "client_resources": {"num_cpus": s.cpus_per_client, "num_gpus": s.gpus_per_client},
    }
    error = ""
    try:
        # Ray's workers inherit the variable: each client actor's "Loading weights" bar says nothing of the run
        with _no_run_simulation_banner(), set_env(HF_HUB_DISABLE_PROGRESS_BARS="1"):
            run_simulation(
                server_app=server,
                client_app=client_app,
                num_supernodes=cfg.clients.num,
                backend_config=backend,
            )
    except Exception as e:
        error = f"simulation failed: {type(e).__name__}: {e}"
    for name, _, _ in runs:
        if name not in outcomes:
            outcomes[name] = ServerOutcome(
                "failed", message=f"{name}: {error or 'the server app did not run it'}"
            )
    return outcomes


def _client_basis(cfg: FedConfig) -> dict[str, Any]:
    """What a saved local-only client depends on beyond the run's stable config: its steps and the ``eval``
    section, which ``--resume`` may change."""
    return {"steps": cfg.rounds * cfg.train.local_steps, "eval": cfg.to_dict()["eval"]}


def _saved_client(cfg: FedConfig, out_dir: Path, k: int) -> dict[str, Any] | None:
    """Client ``k``'s local-only result as an earlier process saved it for this basis, else None."""
    part = out_dir / f"client-{k}.json"
    if not part.is_file():
        return None
    saved = json.loads(part.read_text())
    return saved["result"] if saved.get("basis") == _client_basis(cfg) else None


def _local_client(
    cfg: FedConfig, out_dir: Path, k: int, rank: int, tasks: list, threads: int = 0, workers: int = 1
) -> dict[str, Any]:
    """Train and score client ``k`` alone and save its result (``client-K.json``, atomically, with its basis)
    as soon as it is scored, so a run killed after some clients re-trains only the others (a cell of 8 clients
    takes hours). A client's training draws from a generator seeded by the run seed and ``k``
    (`asymlora.federated.client._train_client`), so at a given thread count it trains the same in one go,
    after a kill, or in a pool process beside others. ``threads`` > 0: this process's torch threads first (a
    pool process); ``workers``: how many clients train at the same time (the pool's size), kept in the result."""
    if threads > 0:
        torch.set_num_threads(threads)
    res = {**local_only_baseline(cfg, k, rank, tasks), "workers": workers}
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"basis": _client_basis(cfg), "result": res}, indent=2, default=float) + "\n"
    atomic_write_text(out_dir / f"client-{k}.json", text)
    return res


def _local_workers(cfg: FedConfig) -> int:
    """How many clients train alone at once: as many as the simulation runs (``simulation.num_cpus //
    cpus_per_client``) on a CPU; one with GPUs (``simulation.num_gpus`` > 0, or CUDA present: the model would
    load on it in every process)."""
    s = cfg.simulation
    return 1 if s.num_gpus > 0 or torch.cuda.is_available() else max(1, s.num_cpus // s.cpus_per_client)


def _die_with_parent() -> None:
    """Pool initializer: on Linux the kernel sends this worker SIGTERM when the process that started it dies
    (``prctl(PR_SET_PDEATHSIG)``), so a killed run leaves no worker training on or waiting on its queue. The
    standard library has no way to ask for this; elsewhere nothing is set."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def _train_local_clients(cfg: FedConfig, out_dir: Path, jobs: dict[int, tuple[int, list]]) -> Iterator[dict]:
    """Each job's (client: (rank, tasks)) result as it is scored. `_local_workers` == 1: one after another in
    this process with ``simulation.num_cpus`` torch threads. More: in a pool of that many spawned processes
    with ``threads_per_client`` threads each, however few clients are left (a client's thread count depends on
    the config alone, not on how many clients a resumed run has left). A pool, not Flower's Ray simulation:
    these clients exchange nothing. Spawned workers import the caller's ``__main__``: a script that calls this
    needs the ``if __name__ == "__main__":`` guard (the ``asymlora`` command has it).

    An error, Ctrl-C or a consumer that stops reading ends the pool at once (queued clients are cancelled,
    running ones terminated); the clients scored before are saved."""
    if (workers := _local_workers(cfg)) == 1:
        torch.set_num_threads(cfg.simulation.num_cpus)
        for k, (rank, tasks) in jobs.items():
            yield _local_client(cfg, out_dir, k, rank, tasks)
        return
    if not jobs:
        return
    context = multiprocessing.get_context("spawn")  # not fork: a child would inherit torch's threads mid-use
    pool = ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context, initializer=_die_with_parent)
    threads = cfg.simulation.threads_per_client
    try:
        futures = [
            pool.submit(_local_client, cfg, out_dir, k, *job, threads, workers) for k, job in jobs.items()
        ]
        for future in as_completed(futures):
            yield future.result()
    except BaseException:
        # shutdown() alone would train every queued client first: Ctrl-C also reaches the workers, which report
        # it and take the next client. Python 3.11 has no public way to stop them (terminate_workers(): 3.14).
        running = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for process in running:
            process.terminate()
        raise
    pool.shutdown()


def local_only(cfg: FedConfig, run_dir: Path, tasks: list, plan: list, ranks: list[int], say: Any) -> dict:
    """Each client trains alone (rounds × local_steps steps) and is scored on its test split; clients saved by
    an earlier process are read back (`_saved_client`), the others train `_local_workers` at a time."""
    from asymlora.federated.server_results import client_label, summarize_scores  # flwr: optional

    out = run_dir / LOCAL_DIR / RESULTS_FILE
    if out.is_file():
        return json.loads(out.read_text())
    t0 = time.perf_counter()
    results: dict[int, dict[str, Any]] = {}
    jobs: dict[int, tuple[int, list]] = {}
    for k, shards in enumerate(plan):
        if (saved := _saved_client(cfg, run_dir / LOCAL_DIR, k)) is not None:
            results[k] = saved
            say(
                f"local-only client {k}: score {saved['personalised']['score']:.4f} ({saved['seconds']:.0f} s, saved earlier)"
            )
        else:
            jobs[k] = (ranks[k], client_tasks(tasks, shards))
    for res in _train_local_clients(cfg, run_dir / LOCAL_DIR, jobs):
        results[res["client"]] = res
        say(
            f"local-only client {res['client']}: score {res['personalised']['score']:.4f} ({res['seconds']:.0f} s)"
        )
    clients = []
    scores: dict[str, float] = {}
    for k in sorted(results):
        label = client_label(k, list(results[k]["personalised"]["per_task"]))
        scores[label] = results[k]["personalised"]["score"]
        clients.append({"label": label, **results[k]})
    result = {
        "strategy": "local-only",
        "clients": clients,
        "personalised": summarize_scores(scores),
        "scores": {"personalised": scores},
        "seconds": round(time.perf_counter() - t0, 1),  # this process only: clients read back cost it nothing
        # No rounds here: the clients' training and scoring over every process that ran them (saved clients
        # keep their times), each divided by how many trained at once: about the wall time the cell cost, as
        # a federated cell's round_seconds + eval_seconds (the sweep's cost estimates)
        "round_seconds": round(sum(c["seconds"] / c.get("workers", 1) for c in clients), 1),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2, default=float) + "\n")
    return result


def _fmt(v: float | None, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


BYTE_ROWS = (
    ("MB up per client per round", "up"),
    ("MB down per client per round", "down"),
    ("MB up + down per client per round", "total"),
)
"""Rows of the byte table: title, key of ``results["bytes"]`` (summed over rounds and clients)."""
TABLE_NOTE = (
    "Scores: each client's personalised adapter on its own test split, the primary metric of its task "
    "(accuracy or exact match, a fraction 0–1); average / std (population) / worst over clients; "
    "Δm%: mean relative drop against local-only training, in percent, lower is better; global average: "
    "the aggregated adapter alone. MB = 10^6 bytes of Flower messages (ArrayRecord.count_bytes): up = "
    "client to server, down = server to client."
)


def _mb_per_client_round(r: dict[str, Any], key: str) -> float | None:
    """MB per client per round of ``r["bytes"][key]`` (``up``, ``down`` or ``total``), None without bytes."""
    b = r.get("bytes")
    if not b:
        return None
    per_round = b.get("per_round") or []
    rounds, clients = max(1, len(per_round)), max(1, len(r.get("ranks") or r.get("clients") or []))
    return b[key] / rounds / clients / 1e6


def _dp_cell(r: dict[str, Any]) -> str:
    """``(ε, δ)`` of a run's results (∞ without noise), or ``off``."""
    dp = r.get("dp")
    if not dp:
        return "off"
    eps = "∞" if dp["epsilon"] is None else f"{dp['epsilon']:.2f}"
    return f"({eps}, {dp['delta']:g}), z = {dp['noise_multiplier']:.3g}, C = {dp['clipping_norm']:g}"


def format_results(summary: dict[str, Any]) -> str:
    """The markdown comparison: personalised score per client and strategy, summaries, bytes."""
    runs: dict[str, dict] = dict(summary["strategies"])
    if summary.get("local_only"):
        runs["local-only"] = summary["local_only"]
    labels: list[str] = []
    for r in runs.values():
        for label in r.get("scores", {}).get("personalised", {}):
            if label not in labels:
                labels.append(label)
    names = list(runs)
    lines = [
        "| client | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for label in labels:
        lines.append(
            f"| {label} | "
            + " | ".join(_fmt(runs[n].get("scores", {}).get("personalised", {}).get(label)) for n in names)
            + " |"
        )

    def row(title: str, get: Any) -> str:
        return f"| **{title}** | " + " | ".join(get(runs[n]) for n in names) + " |"

    lines.append(row("average", lambda r: _fmt((r.get("personalised") or {}).get("average"))))
    lines.append(row("std", lambda r: _fmt((r.get("personalised") or {}).get("std"))))
    lines.append(
        row("worst", lambda r: _fmt(((r.get("personalised") or {}).get("worst") or {}).get("value")))
    )
    lines.append(row("Δm% vs local-only", lambda r: _fmt((r.get("personalised") or {}).get("delta_m"), 2)))
    lines.append(row("global average", lambda r: _fmt((r.get("global") or {}).get("average"))))
    if any("dp" in runs[n] for n in names):
        lines.append(row("DP (ε, δ) after all rounds", _dp_cell))
    for title, key in BYTE_ROWS:
        lines.append(row(title, lambda r, key=key: _fmt(_mb_per_client_round(r, key), 3)))
    lines.append(
        row(
            "MB up + down, all rounds and clients",
            lambda r: _fmt(r["bytes"]["total"] / 1e6, 2) if "bytes" in r else "–",
        )
    )
    lines.append("")
    lines.append(TABLE_NOTE)
    return "\n".join(lines)


def run(cfg: FedConfig, *, resume: bool = False, overwrite: bool = False, say: Any = print) -> int:
    """Run every configured strategy (and the local-only baseline); returns the exit code."""
    from asymlora.federated.server_results import RESULTS_FILE as STRATEGY_RESULTS  # flwr: optional
    from asymlora.federated.server_results import summarize_scores

    tasks, plan = load_partition(cfg)  # an empty client fails here, before anything is written
    if cfg.secagg.enabled and not cfg.dp.enabled:  # DP: every weight is 1
        check_secagg_weights(cfg.secagg, [sum(len(s.train) for s in shards) for shards in plan])
    ranks = [cfg.client_rank(k) for k in range(cfg.clients.num)]
    check_model(cfg, ranks)  # so does a model or target_modules that cannot be adapted
    run_dir = prepare_run_dir(cfg, overwrite=overwrite, resume=resume)
    for line in summary_lines(cfg, tasks, plan, ranks):
        say(line)
    t_all = time.perf_counter()
    summary: dict[str, Any] = {"run_dir": str(run_dir), "strategies": {}, "outcomes": {}}
    code = 0
    todo: list[tuple[str, Path, bool]] = []
    for name in cfg.strategies:
        out = run_dir / name
        done = out / STRATEGY_RESULTS
        if resume and done.is_file():
            say(f"{name}: already finished ({done}); skipping")
            summary["strategies"][name] = json.loads(done.read_text())
            summary["outcomes"][name] = {"status": "completed", "message": "finished before --resume"}
        else:
            todo.append((name, out, resume and (out / "checkpoint").exists()))
    outcomes = simulate(cfg, todo, say=say) if todo else {}
    for name, _, _ in todo:
        outcome = outcomes[name]
        summary["outcomes"][name] = {
            "status": outcome.status,
            "message": outcome.message,
            "rounds_completed": outcome.rounds_completed,
            "seconds": round(outcome.seconds, 1),
        }
        if outcome.results is not None:
            summary["strategies"][name] = outcome.results
        if outcome.status == "stopped":
            say(outcome.message)
            return EXIT_STOPPED
        if outcome.status != "completed":
            say(f"FAILED: {outcome.message}")
            code = EXIT_FAILED
    if cfg.eval.local_only:
        say("=== local-only baseline: every client trains alone ===")
        summary["local_only"] = local_only(cfg, run_dir, tasks, plan, ranks, say)
        baselines = summary["local_only"]["scores"]["personalised"]
        for res in summary["strategies"].values():
            res["personalised"] = summarize_scores(res["scores"]["personalised"], baselines)
            if res.get("global"):
                res["global"] = summarize_scores(res["scores"]["global"], baselines)
    summary["seconds"] = round(time.perf_counter() - t_all, 1)
    table = format_results(summary)
    summary["table"] = table
    atomic_write_text(run_dir / RESULTS_FILE, json.dumps(summary, indent=2, default=float) + "\n")
    atomic_write_text(run_dir / "results.md", table + "\n")
    say(table)
    say(f"results: {run_dir / RESULTS_FILE}")
    return code


def main(args: argparse.Namespace) -> int:
    """Entry point of ``asymlora fed`` (``args.config``, ``args.overrides``, ``args.resume``, ``args.overwrite``)."""
    try:
        cfg = load_fed_config(args.config, list(args.overrides or []))
        return run(cfg, resume=bool(args.resume), overwrite=bool(args.overwrite))
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as e:
        print(f"asymlora fed: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m asymlora.federated.run")
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--overwrite", action="store_true")
    sys.exit(main(parser.parse_args()))
