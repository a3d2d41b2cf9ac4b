"""A resumable campaign: a grid of run configs, trained and evaluated cell by cell into one results ledger.

A sweep file (YAML)::

    base: ../configs/multitask_bigbench.yaml    # the run config every cell starts from (optional)
    out_dir: ../runs/campaign                   # relative paths are relative to the sweep file
    overrides: [train.steps=200, eval.base_model=false]
    grid:                                       # one mapping, or a list of them (their cells are united)
      - adapter.method: [lora, alora, hydralora]
        train.seed: [0, 1, 2]
      - data.tasks: [[bigbench:a], [bigbench:b]]   # single-task baselines: cells with one task
        adapter.method: [lora]
        train.seed: [0, 1, 2]
    report:
      reference: alora        # paired tests of this method against every other multi-task group
      baseline_method: lora   # single-task cells of this method are the Δm% baselines
    order_by: [train.seed]    # optional: run the cells sorted by these config keys (stable, grid order
                              # within), e.g. seed 0 of every group first, so a partial ledger compares

Each cell is ``base + overrides + its grid values``; its id is the first 12 hex digits of the sha256
of the resolved config (``run_dir`` left out), and it runs in ``out_dir/runs/<id>/`` with the
ordinary multi-task recipe (:func:`asymlora.recipes.multitask.run`, ``resume=True``: a cell killed
mid-way continues from its last checkpoint). A cell is done only when its record is in
``out_dir/ledger.jsonl`` (JSON lines; one record per run with its id, grid values, git commit,
scores, 95 % intervals, per-example primary scores and times), so a killed sweep re-run skips
exactly the finished cells.

Sharing the work: every process holds a lock ``out_dir/locks/<id>.lock`` (``filelock``) while it
runs a cell and skips cells locked by another, and the ledger is rewritten under its own lock, so
any number of processes or machines pointed at one shared ``out_dir`` take disjoint cells;
``--shard i/n`` also splits the grid statically (cells i, i+n, ...). ``--report`` regenerates
``results.md``, ``results.json`` and ``results.png`` from the ledger alone.

A sweep whose base is a federated config (``kind: federated``, detected from the base file) runs each
cell as one federated simulation of one strategy into the same kind of ledger, with the same locks,
shards and ``order_by``: `asymlora.recipes.fed_sweep`.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import itertools
import json
import math
import re
import socket
import statistics
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from filelock import FileLock, Timeout

from asymlora.config import (
    ConfigError,
    RunConfig,
    TrainSettings,
    config_dict,
    load_config,
    without_later_keys,
)
from asymlora.eval import plot_results, stats
from asymlora.eval.report import delta_m
from asymlora.federated.config import FedConfig
from asymlora.federated.round_log import ROUNDS_FILE
from asymlora.io import atomic_write_text
from asymlora.recipes import fed_sweep, multitask
from asymlora.recipes.groups import (
    SeedGroup,
    config_key,
    holm_over_pairs,
    latest_per_cell,
    paired_lines,
    paired_over_seeds,
    rank,
    reference_names,
    reference_pairs,
)
from asymlora.recipes.multitask import PER_EXAMPLE_FILE, read_examples
from asymlora.train import precision

LEDGER_FILE = "ledger.jsonl"
FAILURES_FILE = "failures.jsonl"
SWEEP_KEYS = {"base", "out_dir", "overrides", "grid", "report", "order_by", "kind"}
KINDS = ("multitask", "federated")
"""``kind`` of a sweep: cells of the multi-task recipe, or federated simulations (`fed_sweep`)."""
REPORT_KEYS = {"reference", "baseline_method"}
REPORT_RECORD_KEYS = (
    "params",
    "seed",
    "tasks",
    "method",
    "per_task",
    "primary",
    "average",
    "std",
    "worst",
    "config",
    "intervals",
    "per_example",
    "trainable_params",
    "steps",
)
"""The keys of a multi-task ledger record (`make_record`) the report reads; a record without one is refused."""
FED_REPORT_RECORD_KEYS = (
    "params",
    "strategy",
    "seed",
    "clients",
    "personalised",
    "rounds",
    "local_steps",
    "wall_seconds",
    "config",
)
"""The keys of a federated ledger record (`fed_sweep.make_record`) the report reads."""
LIST_RECORD_KEYS = {"multitask": (), "federated": ("strategy", "seed")}
"""The keys ``--list`` and a run read from every record of a ledger of each kind (a cell's identity)."""


@dataclasses.dataclass(frozen=True)
class Cell:
    """One grid point: its grid values, resolved config and id."""

    params: dict[str, Any]
    config: RunConfig
    id: str

    @property
    def run_dir(self) -> Path:
        return Path(self.config.run_dir)


@dataclasses.dataclass
class Sweep:
    """A parsed sweep file (see the module docstring)."""

    path: Path
    base: Path | None
    out_dir: Path
    overrides: list[str]
    grid: list[dict[str, list[Any]]]
    report: dict[str, Any]
    order_by: list[str] = dataclasses.field(default_factory=list)
    kind: str = "multitask"
    """``multitask`` or ``federated`` (`KINDS`)."""

    @property
    def ledger(self) -> Path:
        return self.out_dir / LEDGER_FILE


def _resolve(path: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (path.parent / p).resolve()


def load_sweep(path: str | Path) -> Sweep:
    """Read and check a sweep file.

    Raises:
        ConfigError: missing file, unknown key, an empty grid or a grid value that is not a list.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: a sweep file is a mapping of {sorted(SWEEP_KEYS)}, not a {type(data).__name__} "
            "(see docs/sweep.md, e.g. out_dir: runs/campaign and grid: {adapter.method: [lora, alora]})"
        )
    if set(data) - SWEEP_KEYS:
        raise ConfigError(
            f"{path}: unknown keys {sorted(set(data) - SWEEP_KEYS)}; a sweep has {sorted(SWEEP_KEYS)}"
        )
    if "out_dir" not in data:
        raise ConfigError(f"{path}: set out_dir (where the runs and the ledger go)")
    if not isinstance(data["out_dir"], str) or not data["out_dir"].strip():
        raise ConfigError(
            f"{path}: out_dir={data['out_dir']!r} must be a folder path, e.g. out_dir: runs/campaign"
        )
    grid = data.get("grid")
    grids = [grid] if isinstance(grid, dict) else grid
    if not grids or not isinstance(grids, list) or not all(isinstance(g, dict) and g for g in grids):
        raise ConfigError(f"{path}: grid must be a mapping (or a list of mappings) of key: [values, ...]")
    for g in grids:
        for key, values in g.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{path}: grid value of {key!r} must be a non-empty list, got {values!r}")
    report = data.get("report") or {}
    if not isinstance(report, dict) or set(report) - REPORT_KEYS:
        raise ConfigError(f"{path}: report takes only {sorted(REPORT_KEYS)}")
    reference = report.get("reference")
    names = [reference] if isinstance(reference, str) else reference
    if reference is not None and (
        not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names)
    ):
        raise ConfigError(
            f"{path}: report.reference={reference!r} must be a method (strategy) name or a non-empty list of them, "
            "e.g. reference: alora, or reference: [fedalora, local-only]"
        )
    if isinstance(names, list) and (twice := sorted({n for n in names if names.count(n) > 1})):
        raise ConfigError(f"{path}: report.reference={reference!r} names {', '.join(twice)} more than once")
    overrides = data.get("overrides") or []
    if not isinstance(overrides, list):
        raise ConfigError(f"{path}: overrides must be a list of key=value strings")
    order_by = data.get("order_by") or []
    if not isinstance(order_by, list) or not all(isinstance(k, str) for k in order_by):
        raise ConfigError(f"{path}: order_by must be a list of config keys, e.g. order_by: [train.seed]")
    base = _resolve(path, data["base"]) if data.get("base") else None
    kind = data.get("kind") or ("federated" if fed_sweep.is_federated(base) else "multitask")
    if kind not in KINDS:
        raise ConfigError(
            f"{path}: kind={kind!r} is not one of {list(KINDS)} (omit it: the base config decides)"
        )
    out_dir = _resolve(path, data["out_dir"])
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{path}: out_dir {str(out_dir)!r} is a file; give a folder (new or a campaign's)")
    return Sweep(
        path=path,
        base=base,
        out_dir=out_dir,
        overrides=[str(o) for o in overrides],
        grid=grids,
        report=report,
        order_by=order_by,
        kind=kind,
    )


BOOKKEEPING_KEYS = {
    "train": ("save_every", "keep_checkpoints", "log_every", "trace_every", "router_log_every")
}
"""Keys that set only how a multi-task run is saved and logged, not what it computes: how often it checkpoints
(a resume continues bit for bit from any checkpoint, and the stopping rule validates on its own
``stopping.every``), how many checkpoints it keeps, how often it logs the loss, and how often it writes the
A/B traces and the router statistics (both read the model under no_grad and draw no random numbers). A
cell's `identity` holds them at the `TrainSettings` defaults whatever the config says, so a campaign may
checkpoint more or less often and keep its ledger, its run directories and its report groups. Held at the
defaults rather than left out (as `fed_sweep.PACE_KEYS` are): the campaign's cells had them at the
defaults, so their ids did not change; cells of configs with other values (multitask_bigbench.yaml saves
every 100 steps) got new ids, and `done_ids` keeps such cells of an older ledger done."""


def identity(data: dict[str, Any]) -> dict[str, Any]:
    """A copy of a multi-task config dict (`asymlora.config.config_dict`, or a ledger record's ``config``) as a
    cell's identity: ``run_dir`` blank, the `BOOKKEEPING_KEYS` at their defaults, and the keys added since the
    first ledgers left out at their neutral values (`asymlora.config.LATER_KEYS`: a ``stopping`` section at its
    defaults, ``train.mixed_precision: null``), so the cells of configs without them keep the ids they had
    before those keys existed (and their records group with the new ones)."""
    data = json.loads(json.dumps(data))
    data["run_dir"] = ""
    for section, keys in BOOKKEEPING_KEYS.items():
        values = data.get(section)
        for key in keys:
            if isinstance(values, dict) and key in values:  # a hand-edited record may hold any value here
                values[key] = _BOOKKEEPING_DEFAULTS[f"{section}.{key}"]
    return without_later_keys(data)


_BOOKKEEPING_DEFAULTS = {f"train.{key}": getattr(TrainSettings(), key) for key in BOOKKEEPING_KEYS["train"]}


def cell_id(cfg: RunConfig) -> str:
    """12 hex digits of the sha256 of the YAML dump of the cell's `identity` (keys in the order
    `asymlora.config.config_dict` keeps; the ledger's records are keyed by it)."""
    return _hash_id(identity(config_dict(cfg)))


def _hash_id(identity_dict: dict[str, Any]) -> str:
    text = yaml.safe_dump(identity_dict, sort_keys=False)  # = dump_config's text
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def done_ids(records: Sequence[dict[str, Any]]) -> set[str]:
    """The ids of the cells a ledger holds: each record's ``id`` and the id its ``config`` has under this code
    (`identity`; `fed_sweep.identity` for federated records), so a finished cell stays done when an upgrade
    changes how ids are computed (the federated ids did once, when the pace keys were left out)."""
    out = set()
    for record in records:
        out.add(record["id"])
        if isinstance(record.get("config"), dict):
            config = record["config"]
            out.add(_hash_id(fed_sweep.identity(config, record["strategy"]) if record.get("kind") == "federated"
                             else identity(config)))  # fmt: skip
    return out


def _points(grid: dict[str, list[Any]]) -> Iterator[dict[str, Any]]:
    keys = list(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
        yield dict(zip(keys, values, strict=True))


def _config_value(cfg: Any, key: str) -> Any:
    """The value of a dotted key (``train.seed``) in a resolved config; ConfigError names an unknown key."""
    value: Any = config_dict(cfg)
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ConfigError(
                f"order_by: {key!r} is not a config key (e.g. train.seed, adapter.method; federated: seed)"
            )
        value = value[part]
    return value


def _sort_key(value: Any) -> tuple[int, float, str]:
    """Numbers by value (2 before 10), anything else by its JSON text after them."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, json.dumps(value, sort_keys=True))


AnyCell = Cell | fed_sweep.FedCell
"""A multi-task cell or a federated one (`fed_sweep.FedCell`): both have ``params``, ``config``, ``id``, ``run_dir``."""


def _multitask_cell(sweep: Sweep, params: dict[str, Any]) -> Cell:
    extra = [f"{key}={json.dumps(value)}" for key, value in params.items()]
    try:
        cfg = load_config(sweep.base, [*sweep.overrides, *extra])
    except ConfigError as e:
        raise ConfigError(f"grid cell {params}: {e}") from None
    if cfg.compare.methods or cfg.compare.single_task:
        raise ConfigError(
            f"grid cell {params}: a sweep cell is one run; put methods in the grid (adapter.method: "
            "[...]) and single-task baselines as cells with one task, not compare.*"
        )
    cid = cell_id(cfg)
    return Cell(params, dataclasses.replace(cfg, run_dir=str(sweep.out_dir / "runs" / cid)), cid)


def expand(sweep: Sweep) -> list[AnyCell]:
    """The cells of the grid without duplicates, in grid order, or stably sorted by ``sweep.order_by``.

    Raises:
        ConfigError: a cell whose config is invalid (the message names the cell), a cell that
            asks for several methods (``compare.*``: put methods in the grid instead) or several
            federated strategies, or an ``order_by`` key that is not in the config.
    """
    cells: dict[str, AnyCell] = {}
    for grid in sweep.grid:
        for params in _points(grid):
            cell: AnyCell = (
                fed_sweep.make_cell(sweep.base, sweep.overrides, params, sweep.out_dir)
                if sweep.kind == "federated"
                else _multitask_cell(sweep, params)
            )
            cells.setdefault(cell.id, cell)
    keys = {
        cid: tuple(_sort_key(_config_value(c.config, k)) for k in sweep.order_by) for cid, c in cells.items()
    }
    return sorted(cells.values(), key=lambda cell: keys[cell.id])  # stable: grid order among equal keys


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"i/n"`` -> (i, n) with 0 <= i < n; None -> (0, 1)."""
    if text is None:
        return 0, 1
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: expected i/n, e.g. --shard 0/2 and --shard 1/2") from None
    if not 0 <= index < count:
        raise ValueError(f"--shard {text!r}: need 0 <= i < n")
    return index, count


_NUMBER = r"(\d+(?:\.\d*)?)"
_DURATION = re.compile(rf"{_NUMBER}|(?:{_NUMBER}h)?(?:{_NUMBER}m)?(?:{_NUMBER}s)?")
"""Seconds alone (``5400``), or units in the order h, m, s, each with its letter (``1h30`` is refused: 1 h 30 s
or 1 h 30 min? say ``1h30m``)."""


def parse_time_limit(text: str | None) -> float | None:
    """``--time-limit``: ``"2h30m"``, ``"90m"``, ``"1.5h"``, ``"5400s"`` or ``"5400"`` (seconds) -> seconds
    (> 0, finite); None -> None. (Three units of one regex: not worth a dependency.) Raises ValueError naming
    the value and the forms."""
    if text is None:
        return None
    match = _DURATION.fullmatch(text.strip())
    seconds = None
    if match and any(match.groups()):
        alone, hours, minutes, secs = (float(g) if g else 0.0 for g in match.groups())
        seconds = alone + hours * 3600 + minutes * 60 + secs
    if not seconds or not math.isfinite(seconds):
        raise ValueError(
            f"--time-limit {text!r}: expected a duration above 0 with its units in the order h, m, s, "
            "e.g. 2h30m, 90m, 1.5h, 5400s or 5400 (seconds)"
        )
    return seconds


def shard(cells: list[AnyCell], index: int, count: int) -> list[AnyCell]:
    """Cells ``index, index + count, ...``: the shards of ``count`` processes are disjoint and complete."""
    return cells[index::count]


# --------------------------------------------------------------------------- ledger


def read_ledger(path: Path) -> list[dict[str, Any]]:
    """The records of a ledger (empty when it does not exist yet)."""
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}, line {number}: not a JSON record ({e}); remove or fix the line"
                ) from None
            if not isinstance(records[-1], dict) or "id" not in records[-1]:
                raise ValueError(
                    f'{path}, line {number}: not a record (a JSON object with an "id", got '
                    f"{line.strip()[:60]!r}); remove or fix the line"
                )
    return records


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Add one record (JSON line) under the file's lock; the file is replaced atomically (never half-written)."""
    with FileLock(str(path) + ".lock"):
        text = path.read_text() if path.is_file() else ""
        if text and not text.endswith("\n"):
            text += "\n"
        atomic_write_text(path, text + json.dumps(record, default=float) + "\n")


PACKAGE_ROOT = Path(__file__).resolve().parent.parent
"""The asymlora package's source folder (src/asymlora): what `git_commit` describes."""


@functools.cache
def git_commit(root: Path = PACKAGE_ROOT) -> str | None:
    """The commit of the asymlora source tree this process runs (``git describe --always --abbrev=12``),
    with ``-dirty`` when a tracked file under ``root`` differs from it; None outside a git checkout.

    Read once per process (`run_sweep` reads it before its first cell): the code a process runs is the code
    it imported when it started, so a commit made while a cell trains must not be what its record names.
    Only the source tree counts as dirty, not the repository: a campaign's own ledger and results pages are
    tracked files it rewrites, so ``git describe --dirty`` said "dirty" for every record after the first.
    """

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True)
        return out.stdout.strip()

    try:
        commit = git("describe", "--always", "--abbrev=12")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".")
    except (OSError, subprocess.SubprocessError):
        return None
    if not commit:
        return None
    return f"{commit}-dirty" if changed else commit


def make_record(cell: Cell, results: dict[str, Any], started: float, finished: float) -> dict[str, Any]:
    """The ledger record of a finished cell (``results``: what its ``results.json`` holds)."""
    examples = read_examples(cell.run_dir / PER_EXAMPLE_FILE)
    primary = results["primary"]
    per_example = {
        task: {
            "keys": hashlib.sha1("".join(r["key"] for r in rows).encode()).hexdigest()[:16],
            "scores": [r["scores"][primary[task]] for r in rows],
        }
        for task, rows in stats.with_example_scores(examples, primary).items()
    }
    keep: tuple[str, ...] = ("method", "per_task", "primary", "average", "std", "worst", "delta_m", "intervals",
            "trainable_params", "train_seconds", "step_seconds", "eval_seconds", "peak_memory_mb", "steps",
            "final_loss",
            "router", "num_experts", "hardware")  # fmt: skip
    if results.get("stopping") is not None:  # the stopping rule's outcome (stopped_at, best_step, ...)
        keep += ("stopping",)
    return {
        "id": cell.id,
        "params": cell.params,
        "seed": cell.config.train.seed,
        "tasks": list(results["per_task"]),
        "commit": git_commit(),
        "host": socket.gethostname(),
        **{key: _finite(results.get(key)) for key in keep},
        "per_example": per_example,
        "started": datetime.datetime.fromtimestamp(started, datetime.UTC).isoformat(timespec="seconds"),
        "wall_seconds": round(finished - started, 2),
        "config": cell.config.to_dict(),
    }


def _finite(value: Any) -> Any:
    """``value`` with NaN / inf floats (e.g. the loss of a cell resumed after training) as None: strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


# --------------------------------------------------------------------------- running


def _fed_record(cell: fed_sweep.FedCell) -> dict[str, Any]:
    started = time.time()
    results = fed_sweep.run_cell(cell)
    when = datetime.datetime.fromtimestamp(started, datetime.UTC).isoformat(timespec="seconds")
    return fed_sweep.make_record(cell, results, started=when, wall_seconds=time.time() - started,
                                 commit=git_commit(), host=socket.gethostname())  # fmt: skip


def run_cell(cell: AnyCell, ledger: Path) -> dict[str, Any]:
    """Train and evaluate one cell (resuming what it left) with the multi-task recipe, or run its federated
    simulation (`fed_sweep.run_cell`); append its record."""
    if isinstance(cell, fed_sweep.FedCell):
        record = _fed_record(cell)
    else:
        started = time.time()
        results = multitask.run(cell.config, resume=True, quiet=True)
        record = make_record(cell, results, started, time.time())
    append_record(ledger, record)
    return record


def run_sweep(
    sweep: Sweep,
    *,
    shard_index: int = 0,
    shard_count: int = 1,
    keep_going: bool = False,
    deadline: float | None = None,
    say: Any = print,
) -> dict[str, int]:
    """Run this shard's cells that are not in the ledger, skipping cells another process holds.

    Args:
        keep_going: a cell that raises (e.g. a non-finite loss) is written to ``failures.jsonl``
            and the sweep goes on with the next cell; otherwise the error stops the sweep.
        deadline: ``time.monotonic()`` after which no cell starts, nor one expected to take longer than the
            time left (`too_late`): a machine lent for some hours, a batch job's time limit.

    Returns:
        ``{"cells", "done" (already in the ledger), "ran", "taken" (held by another process),
        "failed", "deferred" (not started: the deadline)}``.
    """
    cells = shard(expand(sweep), shard_index, shard_count)
    if warning := emulated_bf16_warning(cells):
        say(warning)
    limit = None if deadline is None else deadline - time.monotonic()  # the whole limit, for the messages
    git_commit()  # the code this process imported, before any cell runs (a later commit is not what ran)
    (sweep.out_dir / "locks").mkdir(parents=True, exist_ok=True)
    done = done_ids(read_ledger(sweep.ledger))
    counts = {"cells": len(cells), "done": 0, "ran": 0, "taken": 0, "failed": 0, "deferred": 0}
    for n, cell in enumerate(cells, 1):
        where = f"[{n}/{len(cells)}] {cell.id} {cell.params}"
        if cell.id in done:
            counts["done"] += 1
            continue
        lock = FileLock(str(sweep.out_dir / "locks" / f"{cell.id}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            say(f"{where}: being run by another process; skipped")
            counts["taken"] += 1
            continue
        try:
            if cell.id in done_ids(read_ledger(sweep.ledger)):
                counts["done"] += 1  # finished by another process since this one started
                continue
            if deadline is not None and (why := too_late(sweep, cell, deadline, limit)):
                say(f"{where}: not started: {why}")
                counts["deferred"] += 1
                continue
            say(f"{where}: running in {cell.run_dir}")
            record = run_cell(cell, sweep.ledger)
            say(f"{where}: average {record['average']:.4f} in {record['wall_seconds']:.0f} s")
            counts["ran"] += 1
        except Exception as e:
            if not keep_going:
                raise
            say(f"{where}: failed ({type(e).__name__}: {e}); see {sweep.out_dir / FAILURES_FILE}")
            failure = {"id": cell.id, "params": cell.params, "error": f"{type(e).__name__}: {e}",
                       "commit": git_commit(), "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}  # fmt: skip
            append_record(sweep.out_dir / FAILURES_FILE, failure)
            counts["failed"] += 1
        finally:
            lock.release()
    return counts


def emulated_bf16_warning(cells: Sequence[AnyCell]) -> str | None:
    """A warning when cells train with bf16 autocast on this machine's CPU and it has no bfloat16 instructions
    (`precision.cpu_has_bf16`; no CUDA): the clients of a federated cell train in Ray workers, whose own warning
    (`precision.autocast`) no sweep log shows."""
    bf16 = [c for c in cells if c.config.train.mixed_precision == "bf16"]
    if not bf16 or torch.cuda.is_available() or precision.cpu_has_bf16() is not False:
        return None
    return f"warning: {len(bf16)} of {len(cells)} cells: {precision.emulated_bf16_message()}"


def cell_status(sweep: Sweep, cells: list[AnyCell] | None = None) -> list[tuple[AnyCell, str]]:
    """Each cell (of ``cells``, default: the whole grid) with ``done`` (in the ledger), ``failed`` (not done, and
    in ``failures.jsonl``: its last attempt raised), ``partial`` (its run directory exists) or ``todo``."""
    done = done_ids(read_ledger(sweep.ledger))
    failed = {r["id"] for r in read_ledger(sweep.out_dir / FAILURES_FILE)}
    return [
        (cell, "done" if cell.id in done else "failed" if cell.id in failed
               else "partial" if cell.run_dir.is_dir() else "todo")
        for cell in (expand(sweep) if cells is None else cells)
    ]  # fmt: skip


def last_failure(sweep: Sweep, cell_id: str) -> str:
    """The error of a cell's last failed attempt (``failures.jsonl``), for ``--list``."""
    return [r for r in read_ledger(sweep.out_dir / FAILURES_FILE) if r["id"] == cell_id][-1]["error"]


def foreign_records(sweep: Sweep) -> list[dict[str, Any]]:
    """The ledger's records (the last of each cell, `latest_records`) of no cell of the whole grid: cells of an
    earlier version of the sweep file or its base config (a changed key gives every cell a new id), or records
    brought in from another campaign's ledger. ``--report`` still shows them; ``--list`` names them."""
    ids = {cell.id for cell in expand(sweep)}
    return [r for r in latest_records(read_ledger(sweep.ledger)) if not done_ids([r]) & ids]


def cell_progress(cell: AnyCell) -> str:
    """Where a started cell stands, from its run directory: the step of a multi-task cell's last checkpoint
    (where ``--resume`` continues), or the rounds each strategy of a federated cell has recorded."""
    if isinstance(cell, fed_sweep.FedCell):
        rounds = cell.run_dir / cell.strategy / ROUNDS_FILE
        done = sum(1 for line in rounds.read_text().splitlines() if line.strip()) if rounds.is_file() else 0
        return f"round {done} of {cell.config.rounds} recorded" if cell.strategy != "local-only" else ""
    steps = [int(p.name[5:]) for p in (cell.run_dir / "checkpoints").glob("step-*") if p.name[5:].isdigit()]
    return f"checkpoint at step {max(steps)}" if steps else "no checkpoint yet"


def cell_seconds(record: dict[str, Any]) -> float | None:
    """What a finished cell cost on its machine, in seconds: a multi-task cell's training (over its resumes)
    plus evaluation (None when its record lacks the training time: its wall time would count only what its
    last process did); a federated cell's rounds (over its resumes) plus its final evaluation, or its wall
    time, the larger (a cell resumed after its last round: the wall time is the evaluation alone; a record
    without ``eval_seconds``, older than it: its rounds)."""
    train, evaluation = _seconds(record.get("train_seconds")), _seconds(record.get("eval_seconds"))
    if record.get("kind") != "federated":
        return None if train is None or evaluation is None else train + evaluation
    rounds, wall = _seconds(record.get("round_seconds")), _seconds(record.get("wall_seconds"))
    if rounds is not None and evaluation is not None:
        rounds += evaluation
    known = [v for v in (rounds, wall) if v is not None]
    return max(known) if known else None


def _seconds(value: Any) -> float | None:
    """A ledger's time in seconds when it is one (a finite number >= 0; a hand-edited ``"5"``, NaN or -1 is
    not), else None: the estimates skip what they cannot read rather than fail a run over it."""
    ok = (
        isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    )
    return float(value) if ok else None


def _precision(item: AnyCell | dict[str, Any]) -> str:
    """The precision a cell trains in, or a record's cell trained in: ``bf16`` (``train.mixed_precision``) or
    ``float32`` (null, or a record without it)."""
    if isinstance(item, fed_sweep.FedCell | Cell):
        value = item.config.train.mixed_precision
    else:
        config = item.get("config")
        train = config.get("train") if isinstance(config, dict) else None
        value = train.get("mixed_precision") if isinstance(train, dict) else None
    return "float32" if value is None else str(value)


def _cost_kind(item: AnyCell | dict[str, Any]) -> str:
    """Cells of one kind cost about the same: a federated strategy at one budget (clients × rounds × local
    steps: a cell at half the rounds costs about half), or a multi-task cell's number of tasks (a single-task
    baseline trains a fraction of the steps); each in one precision (`_precision`: bf16 autocast is 1.4×
    faster than float32 on a CPU with AVX512-BF16 and 13-26× slower on one without, docs/performance.md)."""
    return f"{_budget_kind(item)}, {_precision(item)}"


def _budget_kind(item: AnyCell | dict[str, Any]) -> str:
    if isinstance(item, fed_sweep.FedCell):
        c = item.config
        return f"{item.strategy}, {c.clients.num} clients × {c.rounds} rounds × {c.train.local_steps} steps"
    if isinstance(item, Cell):
        return f"{len(item.config.data.tasks)} task(s)"
    # a federated record without its budget (hand-made) matches no cell: no estimate
    if item.get("kind") == "federated":
        config = item.get("config")
        clients = config.get("clients") if isinstance(config, dict) else None
        clients = clients.get("num") if isinstance(clients, dict) else None
        budget = f"{clients} clients × {item.get('rounds')} rounds × {item.get('local_steps')} steps"
        return f"{item['strategy']}, {budget}"
    tasks = item.get("tasks")
    return f"{len(tasks)} task(s)" if isinstance(tasks, list) else "unknown"


@dataclasses.dataclass(frozen=True)
class Costs:
    """What cells cost on a ledger's machine, in seconds (`cell_seconds` of each done cell's last record,
    `latest_records`): ``by_kind`` the median over the done cells of each kind (`_cost_kind`), and
    ``per_client_step`` per precision (`_precision`) the median over the done federated cells in it of their
    seconds per client-step (clients × rounds × local steps; no entry when none is done). Read once from the
    ledger (`Costs.read`) and asked per cell (`Costs.of`)."""

    by_kind: dict[str, float]
    per_client_step: dict[str, float]

    @classmethod
    def read(cls, sweep: Sweep) -> Costs:
        """The costs of ``sweep``'s ledger as it is now (another worker may add cells later)."""
        costs: dict[str, list[float]] = {}
        rates: dict[str, list[float]] = {}
        for record in latest_records(read_ledger(sweep.ledger)):  # a cell recorded twice counts once
            if (
                record.get("kind") != "federated" and "tasks" not in record
            ):  # not a record `make_record` wrote
                continue
            if (seconds := cell_seconds(record)) is None:
                continue
            costs.setdefault(_cost_kind(record), []).append(seconds)
            steps = _client_steps(record.get("config")) if record.get("kind") == "federated" else None
            if steps is not None:  # a hand-made record without its budget: skipped
                rates.setdefault(_precision(record), []).append(seconds / steps)
        by_kind = {kind: statistics.median(values) for kind, values in costs.items()}
        return cls(by_kind, {precision: statistics.median(values) for precision, values in rates.items()})

    def of(self, cell: AnyCell) -> tuple[float, str] | None:
        """What ``cell`` will take, in seconds, and where the figure comes from: the done cells of its kind; for
        a federated cell of a kind none of which is done, its client-steps at the ledger's median seconds per
        client-step in its precision (a new strategy or budget costs about what its steps cost the others; a
        bf16 cell is not priced from float32 ones, nor the reverse); else None."""
        if (cost := self.by_kind.get(_cost_kind(cell))) is not None:
            return cost, "cells of its kind took"
        rate = self.per_client_step.get(_precision(cell))
        if not isinstance(cell, fed_sweep.FedCell) or rate is None:
            return None
        steps = _client_steps(cell.config)
        assert steps is not None  # a FedConfig always has its budget
        return rate * steps, RATE_SOURCE


RATE_SOURCE = "its client-steps at the ledger's rate take"
"""`Costs.of`'s source of a cost priced by the ledger's seconds per client-step."""


def _client_steps(config: Any) -> int | None:
    """Clients × rounds × local steps of a federated config (a `FedConfig`, or a record's ``config`` dict: None
    when it lacks one of them or one is not a positive integer, or when the record has no config dict)."""
    if isinstance(config, FedConfig):
        return int(config.clients.num * config.rounds * config.train.local_steps)
    if not isinstance(config, dict):  # a hand-made record without its config (or another value there)
        return None
    clients, train = config.get("clients"), config.get("train")
    factors = [
        (clients if isinstance(clients, dict) else {}).get("num"),
        config.get("rounds"),
        (train if isinstance(train, dict) else {}).get("local_steps"),
    ]
    counts = [f for f in factors if isinstance(f, int) and not isinstance(f, bool) and f > 0]
    return math.prod(counts) if len(counts) == len(factors) else None


def cell_cost(sweep: Sweep, cell: AnyCell) -> tuple[float, str] | None:
    """`Costs.of` ``cell`` on ``sweep``'s ledger as it is now."""
    return Costs.read(sweep).of(cell)


def _duration(seconds: float) -> str:
    return f"{seconds:,.0f} s" + (f" ({seconds / 3600:.1f} h)" if seconds >= 3600 else "")


def too_late(sweep: Sweep, cell: AnyCell, deadline: float, limit: float | None = None) -> str | None:
    """Why ``cell`` must not start before ``deadline`` (a ``time.monotonic()``), or None: the deadline has
    passed, or its expected cost (`cell_cost`) is longer than the time left (and, when it is longer than the
    whole ``limit`` in seconds, that no run of this limit will start it). A cell of unknown cost starts while
    time is left."""
    left = deadline - time.monotonic()
    if left <= 0:
        return "the time limit is reached"
    known = cell_cost(sweep, cell)
    if known is None or known[0] <= left:
        return None
    why = f"{known[1]} about {_duration(known[0])}, {_duration(left)} of the time limit is left"
    if limit is not None and known[0] > limit:
        why += (
            f"; more than the whole --time-limit ({_duration(limit)}): give a longer one, or none, to run it"
        )
    return why


def estimate_line(sweep: Sweep, statuses: list[tuple[AnyCell, str]]) -> str:
    """One line under ``--list``: how many cells are done / started / to do, and the hours the rest would take
    on one worker (`Costs.of`: the median cost of the done cells of the same kind, or a federated cell's
    client-steps at the ledger's rate); a started cell counts whole. An estimate from this ledger's machine,
    not a promise."""
    costs = Costs.read(sweep)
    left = [cell for cell, status in statuses if status != "done"]
    known = [cost for c in left if (cost := costs.of(c)) is not None]
    counts = {
        s: sum(1 for _, status in statuses if status == s) for s in ("done", "partial", "todo", "failed")
    }
    line = f"{counts['done']} done, {counts['partial']} started, {counts['todo']} to do"
    if counts["failed"]:
        line += f", {counts['failed']} failed (the errors in {FAILURES_FILE}; a re-run tries them again)"
    hours = sum(seconds for seconds, _ in known) / 3600
    if by_rate := sum(1 for _, source in known if source == RATE_SOURCE):
        line += (
            f"; the {len(known)} left with an estimate: about {hours:.1f} h on one worker ({by_rate} of kinds none "
            "of which is done, priced by their client-steps at the ledger's seconds per client-step)"
        )
    elif known:
        line += f"; the {len(known)} left of a kind already done: about {hours:.1f} h on one worker"
    if len(known) < len(left):
        line += f" ({len(left) - len(known)} of kinds none of which is done: no estimate)"
    return line


def main(args: Any) -> int:
    """``asymlora sweep CONFIG [--shard i/n] [--time-limit DURATION] [--report] [--list] [--keep-going]``."""
    sweep = load_sweep(args.config)
    # a bad --shard is refused before anything, --list and --report too
    index, count = parse_shard(args.shard)
    limit = parse_time_limit(getattr(args, "time_limit", None))
    if limit is not None and (args.list or args.report):
        raise ValueError("--time-limit limits a run; --list and --report run no cell: give it without them")
    deadline = None if limit is None else time.monotonic() + limit
    if not args.report:  # --report checks every key it reads (`summarize_ledger`)
        check_records(sweep, read_ledger(sweep.ledger), LIST_RECORD_KEYS[sweep.kind])
    if args.report:
        page = write_report(sweep)
        print(f"report: {page}")
        return 0
    if args.list:
        statuses = cell_status(sweep, shard(expand(sweep), index, count))
        for cell, status in statuses:
            where = f"  ({progress})" if status == "partial" and (progress := cell_progress(cell)) else ""
            if status == "failed":
                where = f"  ({last_failure(sweep, cell.id)})"
            print(f"{cell.id}  {status:7s}  {cell.params}{where}")
        print(estimate_line(sweep, statuses))
        if foreign := foreign_records(sweep):
            print(f"{len(foreign)} record(s) of {sweep.ledger} are of no cell of this grid (cells "
                  f"{', '.join(r['id'] for r in foreign)}): the sweep file or its base config changed since they "
                  "ran (a changed key gives every cell a new id), or they came from another campaign's ledger; "
                  "--report still shows them, as groups of their own")  # fmt: skip
        return 0
    counts = run_sweep(
        sweep, shard_index=index, shard_count=count, keep_going=args.keep_going, deadline=deadline
    )
    later = f", {counts['deferred']} not started (--time-limit)" if counts["deferred"] else ""
    print(
        f"sweep: {counts['cells']} cells in this shard, {counts['done']} already done, {counts['ran']} run now, "
        f"{counts['taken']} held by another process, {counts['failed']} failed{later}; ledger {sweep.ledger}"
    )
    if counts["ran"] or counts["done"]:
        print(f"report: {write_report(sweep)}")
    return 1 if counts["failed"] else 0


# --------------------------------------------------------------------------- report (from the ledger alone)


@dataclasses.dataclass
class Group(SeedGroup):
    """The records of one multi-task config over seeds."""

    method: str
    tasks: list[str]
    primary: dict[str, str]


def _group_key(record: dict[str, Any]) -> str:
    config = identity(record["config"])
    config["train"]["seed"] = 0
    return config_key(config)


def cell_key(record: dict[str, Any]) -> tuple[str, Any]:
    """A record's cell, as the report's groups tell cells apart (`group_records`, `fed_sweep.group_records`): its
    config without the seed and its seed, whatever id it was recorded under; a record without a config (not
    one this code writes) is its id."""
    if not isinstance(record.get("config"), dict):
        return "id", record["id"]
    if record.get("kind") == "federated":
        return fed_sweep.cell_key(record)
    return _group_key(record), record.get("seed")


def latest_records(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ledger's last record of each cell (`cell_key`, `groups.latest_per_cell`): what the report, the hardware
    line and the ``--list`` estimate count, so a cell recorded twice or under an old id counts once."""
    return latest_per_cell(list(records), cell_key)


def _label(record: dict[str, Any]) -> str:
    parts = [f"{key.split('.')[-1]}={value}" for key, value in record["params"].items()
             if key not in ("train.seed", "data.tasks")]  # fmt: skip
    if "data.tasks" in record["params"]:
        parts.append(f"on {'+'.join(record['tasks'])}")
    return " ".join(parts) or record.get("method") or "run"


def group_records(records: list[dict[str, Any]]) -> list[Group]:
    """Records grouped by config (all but ``train.seed``), in ledger order; of the records of one cell (one config
    and seed: a cell recorded twice, or under the id older code gave it) the last wins."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for record in latest_per_cell(records, cell_key):
        groups.setdefault(_group_key(record), []).append(record)
    out: list[Group] = []
    labels = [_label(rs[0]) for rs in groups.values()]
    for (key, rs), label in zip(groups.items(), labels, strict=True):
        if labels.count(label) > 1:
            label = f"{label} (config {key})"
        rs = sorted(rs, key=lambda r: r["seed"])
        out.append(Group(label, rs, method=rs[0]["method"], tasks=rs[0]["tasks"], primary=rs[0]["primary"]))
    return out


def _value(group: Group, task: str | None, key: str = "average") -> dict[str, Any]:
    """Mean over seeds (with std and per-seed values) or the one seed's value with its interval.

    ``task`` None: the run-level statistic ``key`` (``average``, ``worst`` or ``std_over_tasks``).
    """

    def of(record: dict[str, Any]) -> float:
        if task is not None:
            return record["per_task"][task][group.primary[task]]
        return {
            "average": record["average"],
            "worst": record["worst"]["value"],
            "std_over_tasks": record["std"],
        }[key]

    values = [of(r) for r in group.records]
    if len(values) > 1:
        summary = stats.seed_summary(values)
        return {"value": summary["mean"], "std": summary["std"], "values": summary["values"]}
    iv = group.records[0]["intervals"]
    iv = (iv["per_task"].get(task) if task is not None else iv.get(key)) or {}  # none: a corpus-level metric
    return {"value": values[0], "low": iv.get("low"), "high": iv.get("high"), "values": values}


def _cell_text(v: dict[str, Any] | None, digits: int = 3) -> str:
    if v is None:
        return "–"
    if "std" in v:
        return f"{v['value']:.{digits}f} ± {v['std']:.{digits}f}"
    return stats.format_interval(v["value"], v.get("low"), v.get("high"), digits)


def _examples(record: dict[str, Any], task: str) -> dict[str, Any]:
    return record["per_example"][task]


def _delta_m(group: Group, baselines: dict[str, Group]) -> dict[str, Any] | None:
    """Δm% per seed against the single-task baseline groups (per-example and paired when they align)."""
    if len(group.tasks) < 2 or not all(t in baselines for t in group.tasks):
        return None
    per_seed = []
    for record in group.records:
        if not all(t in record["per_example"] for t in group.tasks):  # a corpus-level metric (BLEU)
            per_seed.append(_delta_m_value(group, record, baselines))
            continue
        scores = {t: _examples(record, t)["scores"] for t in group.tasks}
        base: dict[str, Any] = {}
        for t in group.tasks:
            b = baselines[t]
            same = [r for r in b.records if r["seed"] == record["seed"] and t in r["per_example"]]
            if same and _examples(same[0], t)["keys"] == _examples(record, t)["keys"]:
                base[t] = _examples(same[0], t)["scores"]
            else:
                base[t] = sum(r["per_task"][t][b.primary[t]] for r in b.records) / len(b.records)
        per_seed.append(stats.delta_m_interval(scores, base))
    found = [d for d in per_seed if d]
    if len(found) > 1:
        summary = stats.seed_summary([d["value"] for d in found])
        return {"value": summary["mean"], "std": summary["std"], "values": summary["values"]}
    return found[0] if found else None


def _delta_m_value(
    group: Group, record: dict[str, Any], baselines: dict[str, Group]
) -> dict[str, Any] | None:
    """Δm% of one record without an interval (`asymlora.eval.report.delta_m`), for a run with a task scored by a
    corpus-level metric (no per-example scores to resample): against each baseline's score of the same seed,
    else its mean over seeds."""
    values = {t: record["per_task"][t][group.primary[t]] for t in group.tasks}
    base = {t: _baseline_score(baselines[t], t, record["seed"]) for t in group.tasks}
    value, _ = delta_m(values, base)
    return None if value is None else {"value": value}


def _baseline_score(baseline: Group, task: str, seed: int) -> float:
    """The single-task ``baseline``'s primary score of ``task`` at ``seed``, else its mean over its seeds."""
    scores = [r["per_task"][task][baseline.primary[task]] for r in baseline.records]
    same = [v for r, v in zip(baseline.records, scores, strict=True) if r["seed"] == seed]
    return same[0] if same else sum(scores) / len(scores)


def delta_m_notes(groups: Sequence[Group], baselines: dict[str, Group], method: str) -> list[str]:
    """What the Δm% column rests on where it is not every seed against its own single-task cells: the tasks of a
    multi-task group with no single-task ``method`` cell in the ledger (then no Δm%), and the seeds whose
    baseline of a task is its mean over the baseline's seeds (that seed's single-task cell is missing), and the
    tasks left out of a seed's Δm% because their baseline scores 0 (`asymlora.eval.report.delta_m`)."""
    notes: list[str] = []
    without: dict[str, list[str]] = {}  # the tasks without a baseline -> the groups they leave without Δm%
    for g in (g for g in groups if len(g.tasks) > 1):
        if missing := [t for t in g.tasks if t not in baselines]:
            without.setdefault(", ".join(missing), []).append(g.label)
            continue
        for t in g.tasks:
            if lacking := [s for s in g.seeds if s not in baselines[t].seeds]:
                notes.append(f"- {g.label}, seed(s) {lacking}: no single-task cell of {t} with that seed; "
                             f"its mean over seeds {baselines[t].seeds} is the baseline")  # fmt: skip
            if zero := [s for s in g.seeds if _baseline_score(baselines[t], t, s) == 0.0]:
                notes.append(f"- {g.label}, seed(s) {zero}: {t} left out of Δm% (its single-task baseline "
                             "scores 0: the relative change is undefined)")  # fmt: skip
    return [f"- {'; '.join(labels)}: no Δm%: no single-task {method} cell of {tasks} in the ledger"
            for tasks, labels in without.items()] + notes  # fmt: skip


def _baseline_choice_notes(candidates: Sequence[Group]) -> list[str]:
    """A note for each task that has single-task groups of more than one config (e.g. two step counts): which
    one the Δm% column uses (the last in ledger order), so the choice is on the page, not silent."""
    by_task: dict[str, list[Group]] = {}
    for g in candidates:
        by_task.setdefault(g.tasks[0], []).append(g)
    return [f"- {t}: {len(gs)} single-task groups of different configs ({'; '.join(g.label for g in gs)}); "
            f"the Δm% baseline is the last in the ledger, {gs[-1].label} (cells {', '.join(r['id'] for r in gs[-1].records)})"
            for t, gs in by_task.items() if len(gs) > 1]  # fmt: skip


def _paired(ref: Group, peer: Group) -> dict[str, Any] | str | None:
    """Paired tests of ``ref`` against ``peer`` per task and on the average (`groups.paired_over_seeds`: why not,
    in words, when they cannot be paired); None for groups of other tasks (not compared)."""
    if ref.tasks != peer.tasks:
        return None
    return paired_over_seeds(ref, peer, ref.tasks, lambda record, task: record["per_example"].get(task))


def check_records(sweep: Sweep, records: Sequence[dict[str, Any]], keys: Sequence[str] | None = None) -> None:
    """ValueError naming the first record of the ledger that lacks one of ``keys``, by default the keys the report
    reads: `REPORT_RECORD_KEYS`, or `FED_REPORT_RECORD_KEYS` in a federated sweep."""
    if keys is None:
        keys = FED_REPORT_RECORD_KEYS if sweep.kind == "federated" else REPORT_RECORD_KEYS
    for record in records:
        if missing := [key for key in keys if key not in record]:
            raise ValueError(
                f"{sweep.ledger}: the record of cell {record['id']!r} lacks {missing} (not written by "
                f"`asymlora sweep`); remove its line (the cell is then run again) or fix it"
            )


def summarize_ledger(sweep: Sweep) -> dict[str, Any]:
    """Everything the results page shows, computed from the ledger: groups, Δm%, paired tests."""
    records = read_ledger(sweep.ledger)
    if not records:
        raise FileNotFoundError(
            f"{sweep.ledger} holds no record yet; run `asymlora sweep {sweep.path}` first"
        )
    check_records(sweep, records)
    if sweep.kind == "federated":
        return fed_sweep.summarize(records, sweep.report.get("reference"))
    groups = group_records(records)
    baseline_method = sweep.report.get("baseline_method", "lora")
    candidates = [g for g in groups if len(g.tasks) == 1 and g.method == baseline_method]
    # the last group of a task (in ledger order) is its baseline; _baseline_choice_notes says so on the page
    baselines = {g.tasks[0]: g for g in candidates}
    summary: dict[str, Any] = {
        "groups": [],
        "paired": [],
        "unpaired": [],  # groups compared but not paired, and why
        "std_ddof": stats.STD_DDOF,
        "records": sum(len(g.records) for g in groups),  # cells: a cell recorded twice counts once
        "delta_m_notes": delta_m_notes(groups, baselines, baseline_method)
        + _baseline_choice_notes(candidates),
    }
    for g in groups:
        summary["groups"].append({
            "label": g.label, "method": g.method, "tasks": g.tasks, "primary": g.primary, "seeds": g.seeds,
            "per_task": {t: _value(g, t) for t in g.tasks}, "average": _value(g, None),
            "worst": _value(g, None, "worst"), "std_over_tasks": _value(g, None, "std_over_tasks"),
            "delta_m": _delta_m(g, baselines), "ids": [r["id"] for r in g.records],
            "trainable_params": g.records[0]["trainable_params"],
            "train_seconds": stats.nan_mean([r.get("train_seconds") for r in g.records]),
            "step_seconds": stats.nan_mean([r.get("step_seconds") for r in g.records]),
            # seeds whose training time is recorded (a cell resumed after training has none): the mean is theirs
            "timed_seeds": sum(_is_number(r.get("train_seconds")) for r in g.records),
            "steps": [r["steps"] for r in g.records],  # per seed: the stopping rule stops each seed on its own
        })  # fmt: skip
    names = reference_names(sweep.report.get("reference"))
    # multi-task groups only: a single-task baseline is the Δm% reference, not a rival on one task
    pairs = reference_pairs(
        groups, lambda g: rank(names, g.method), lambda a, b: len(a.tasks) > 1 and len(b.tasks) > 1
    )
    for ref, peer in pairs:
        result = _paired(ref, peer)
        if isinstance(result, str):
            summary["unpaired"].append({"a": ref.label, "b": peer.label, "why": result})
        elif result:
            summary["paired"].append({"a": ref.label, "b": peer.label, **result})
    summary["paired"] = holm_over_pairs(summary["paired"])
    return summary


def _is_number(value: Any) -> bool:
    return value is not None and not math.isnan(value)


def _seconds_text(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _tables(summary: dict[str, Any]) -> list[str]:
    tasks: list[str] = []
    for g in summary["groups"]:
        tasks += [t for t in g["tasks"] if t not in tasks]
    header = [
        "run",
        "seeds",
        *tasks,
        "average",
        "worst",
        "std over tasks",
        "Δm%",
        "params",
        "train s",
        "s/step",
        "steps",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for g in summary["groups"]:
        cells = [g["label"], ",".join(map(str, g["seeds"]))]
        cells += [_cell_text(g["per_task"].get(t)) for t in tasks]
        cells += [_cell_text(g[k]) for k in ("average", "worst", "std_over_tasks")]
        n_seeds, n_timed = len(g["seeds"]), g["timed_seeds"]
        timed = "" if n_timed in (0, n_seeds) else f" ({n_timed} of {n_seeds} seeds)"
        cells += [_cell_text(g["delta_m"], 1), f"{g['trainable_params']:,}",
                  _seconds_text(g["train_seconds"], 1) + timed, _seconds_text(g.get("step_seconds"), 2) + timed,
                  " / ".join(map(str, g["steps"]))]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Per-seed values:", ""]
    for g in summary["groups"]:
        per = "; ".join(f"{t} {[round(v, 4) for v in g['per_task'][t]['values']]}" for t in g["tasks"])
        lines.append(
            f"- {g['label']} (seeds {g['seeds']}): {per}; average {[round(v, 4) for v in g['average']['values']]}"
        )
    if summary.get("delta_m_notes"):
        lines += ["", "Δm%:", "", *summary["delta_m_notes"]]
    intro = "Paired tests (A − B on the same test examples, per-example scores averaged over shared seeds):"
    lines += paired_lines(summary["paired"], tasks, intro, "task", summary["unpaired"])
    return lines


MULTITASK_NOTE = (
    "One seed: value [95 % interval] (Wilson for accuracy / exact match, bootstrap over examples otherwise; "
    "stratified bootstrap for the average and Δm%). Several seeds: mean ± std over seeds (sample std, "
    f"ddof={stats.STD_DDOF}). Paired tests: two-sided sign-flip permutation p-value ({stats.PERMUTATION_NOTE}) "
    "and paired bootstrap interval. Δm% (lower is better) against the single-task {baseline} cells."
)


def _plot_rows(summary: dict[str, Any]) -> tuple[dict, dict, dict]:
    """(rows, primary, intervals) of `plot_results`: a bar per group, a group of bars per task (client)."""
    if summary.get("kind") == "federated":
        rows, primary, intervals = fed_sweep.plot_rows(summary)
    else:
        rows, intervals, primary = {}, {}, {}
        for g in summary["groups"]:
            primary.update(g["primary"])
            rows[g["label"]] = {t: {g["primary"][t]: v["value"]} for t, v in g["per_task"].items()}
            intervals[g["label"]] = {"per_task": g["per_task"], "average": g["average"]}
    bars = {label: {"per_task": {t: _bar(v) for t, v in iv["per_task"].items()}, "average": _bar(iv["average"])}
            for label, iv in intervals.items()}  # fmt: skip
    return rows, primary, bars


def hardware_line(records: Sequence[dict[str, Any]]) -> str:
    """One line naming where the records ran (device, weight dtype, the autocast dtype of training when the
    config's ``train.mixed_precision`` set one, device name, with counts of cells: `latest_records`); a warning when they ran on more
    than one kind: a CUDA cell computes in bfloat16 weights, a CPU cell in float32, a bf16-autocast cell
    trains in other arithmetic than a float32 one, so their differences are not only the methods'."""
    kinds: dict[str, int] = {}
    for r in latest_records(records):
        hw, autocast = r.get("hardware"), ((r.get("config") or {}).get("train") or {}).get("mixed_precision")
        during = f", {autocast} autocast in training" if autocast else ""
        kind = (
            f"{hw['device']} {hw['dtype']}{during} ({hw.get('device_name') or 'unnamed'})"
            if hw
            else "not recorded"
        )
        kinds[kind] = kinds.get(kind, 0) + 1
    text = ", ".join(f"{kind}: {n} run{'s' if n > 1 else ''}" for kind, n in kinds.items())
    if len(kinds) > 1:
        return (f"Hardware: {text}. **The runs did not all compute on the same kind of hardware and dtype**: "
                "compare cells of one kind (`hardware` in each ledger record), or re-run the others there.")  # fmt: skip
    return f"Hardware: {text}."


def report_lock(sweep: Sweep) -> Path:
    """The file lock `write_report` holds (``out_dir/locks/report.lock``, git-ignored with the cell locks)."""
    return sweep.out_dir / "locks" / "report.lock"


def write_report(sweep: Sweep) -> Path:
    """Regenerate ``results.md``, ``results.json`` and ``results.png`` in ``out_dir`` from the ledger alone.

    Holds `report_lock` from reading the ledger to the last file written: two workers that finish cells at
    about the same time write their reports one after the other, the second from a ledger read after the first
    report was written, so the pages always end up with every record appended before the last report began
    (without it, the report that read the ledger first could be written last, about a minute later on a
    full campaign, and leave the pages without the other worker's cell)."""
    report_lock(sweep).parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(report_lock(sweep))):
        return _write_report(sweep)


def _write_report(sweep: Sweep) -> Path:
    summary = summarize_ledger(sweep)
    lines_read = len(read_ledger(sweep.ledger))
    repeats = (f" ({lines_read} records: {lines_read - summary['records']} of a cell recorded before, the last "
               "kept)") if lines_read > summary["records"] else ""  # fmt: skip
    lines = [
        f"# Results of {sweep.path.name}",
        "",
        f"{summary['records']} runs from {sweep.ledger.name}{repeats}.",
        "",
    ]
    if sweep.kind == "federated":
        lines += [
            *fed_sweep.tables(summary),
            "",
            fed_sweep.NOTE,
            "",
            hardware_line(read_ledger(sweep.ledger)),
        ]
    else:
        lines += [
            *_tables(summary),
            "",
            MULTITASK_NOTE.format(baseline=sweep.report.get("baseline_method", "lora")),
            "",
            hardware_line(read_ledger(sweep.ledger)),
        ]
    lines += _reference_line(sweep.report.get("reference"), summary["groups"])
    page = sweep.out_dir / "results.md"
    atomic_write_text(page, "\n".join(lines) + "\n")
    atomic_write_text(sweep.out_dir / "results.json", json.dumps(summary, indent=2) + "\n")
    rows, primary, bars = _plot_rows(summary)
    plot_results(rows, primary, sweep.out_dir / "results.png", title=f"{sweep.path.stem}: 95 % interval or ± std over seeds",
                 intervals=bars)  # fmt: skip
    return page


def _reference_line(reference: str | list[str] | None, groups: Sequence[dict[str, Any]]) -> list[str]:
    """A line for each name of ``report.reference`` that is no method (strategy) of the ledger: no paired test
    of it, and why (not run yet, or misspelt)."""
    names = sorted({str(g.get("method") or g.get("strategy")) for g in groups})
    return [f"\nNo paired tests of {name!r}: the ledger holds no run of it, a name of report.reference (yet: it "
            f"holds {', '.join(names)})." for name in reference_names(reference) if name not in names]  # fmt: skip


def _bar(v: dict[str, Any]) -> dict[str, Any]:
    """Error-bar bounds: the interval (one seed) or mean ± std (several seeds)."""
    if "std" in v:
        return {"value": v["value"], "low": v["value"] - v["std"], "high": v["value"] + v["std"]}
    return v
