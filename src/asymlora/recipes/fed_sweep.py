"""The federated cells of a sweep: ``asymlora sweep`` on a federated base config (configs/fed_*.yaml).

A sweep whose ``base`` is a federated config (`asymlora.federated.config.FedConfig`; recognised by its
top-level ``strategies`` / ``clients`` / ``rounds`` keys, or by ``kind: federated`` in the sweep file) runs
each cell as one federated simulation of ONE strategy, with the code of ``asymlora fed``
(`asymlora.federated.run.run`, resumable from its per-round checkpoint), into the sweep's one ledger::

    base: fed_bigbench_homo.yaml
    out_dir: ../results/campaign_federated
    overrides: [eval.local_only=false]          # the local-only baseline is a cell of its own (below)
    grid:
      - strategy: [fedit, ffa, fedsa, fedalora, local-only]
        seed: [0, 1, 2]
    order_by: [seed]
    report: {reference: fedalora}

The grid key ``strategy`` names the cell's strategy (`asymlora.federated.strategies.STRATEGY_NAMES`) or
``local-only`` (every client trains alone for rounds × local_steps steps: `asymlora.federated.run.local_only`;
it trains each client to the end in one go, so a killed local-only cell starts over). Any other grid key
is a key of the federated config (``seed``, ``local_a``, ``dp.target_epsilon`` ...).

A cell's record (`make_record`) holds the strategy, the seed, each client's personalised score (and
global score) with its 95 % interval, the average over clients with its stratified-bootstrap interval,
each client's per-example primary scores (concatenated over its tasks, with a hash of the example
keys) so strategies can be compared by paired tests on the same test examples, the bytes of every
round, ε when DP is on, rounds × local steps, the wall time and the commit. `summarize` and `tables`
build the report (docs/sweep.md, "The federated campaign").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from asymlora.config import ConfigError, config_dict, load_config, read_config_file, without_later_keys
from asymlora.eval import stats
from asymlora.federated import run as fed_run
from asymlora.federated.config import FedConfig
from asymlora.federated.partition import load_partition
from asymlora.federated.strategies import STRATEGY_NAMES
from asymlora.models import cpu_name
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

__all__ = ["FED_KEYS", "LOCAL_ONLY", "FedCell", "is_federated", "make_cell", "make_record", "run_cell",
           "summarize", "tables"]  # fmt: skip

LOCAL_ONLY = "local-only"
"""The grid's ``strategy`` value of the local-only baseline (every client trains alone)."""
STRATEGY_KEY = "strategy"
"""The grid key naming a cell's strategy."""
FED_KEYS = frozenset({"strategies", "strategy", "clients", "rounds", "local_a", "het_local", "het_upload"})
"""Top-level keys only a federated config has: a base file with one of them makes a federated sweep."""
LOG_FILE = "sweep.log"
"""The federated run's own messages (rounds, scores) in the cell's run directory."""


def is_federated(base: Path | None) -> bool:
    """True when the sweep's base config file is a federated config (it has one of `FED_KEYS`)."""
    return base is not None and bool(set(read_config_file(base)) & FED_KEYS)


@dataclasses.dataclass(frozen=True)
class FedCell:
    """One federated grid point: its grid values, resolved config, strategy (or ``local-only``) and id."""

    params: dict[str, Any]
    config: FedConfig
    id: str
    strategy: str

    @property
    def run_dir(self) -> Path:
        return Path(self.config.run_dir)


PACE_KEYS = {
    "simulation": ("num_cpus", "cpus_per_client", "threads_per_client", "object_store_mb"),
    "clients": ("max_failed_rounds",),
}
"""Keys that set how fast a cell runs on a machine, or when it gives up, not what it computes: left out of its
identity (a campaign can run with fewer CPUs beside another job, or more on a bigger machine, and keep its
ledger and its report groups; ``clients.max_failed_rounds`` only stops a run whose rounds no client answered,
and ``--resume`` re-runs those rounds bit for bit, so a finished cell is the same whatever it says, and cells
started before the key existed keep their directories). The GPU keys stay in (with a GPU the clients load the
model in bfloat16), and so do the timeouts (a client that misses one is left out of its round)."""


def identity(data: Mapping[str, Any], strategy: str) -> dict[str, Any]:
    """A copy of a federated config dict (``FedConfig.to_dict()``, or a ledger record's ``config``) as a cell's
    identity: ``run_dir`` blank, ``strategies`` = [``strategy``], the `PACE_KEYS` left out, and the keys added
    since the first ledgers at their neutral values (`asymlora.config.LATER_KEYS`, e.g.
    ``train.mixed_precision: null``)."""
    out = json.loads(json.dumps(data))
    out["run_dir"], out["strategies"] = "", [strategy]
    for section, keys in PACE_KEYS.items():
        values = out.get(section)
        for key in keys:
            if isinstance(values, dict):  # a hand-edited record may hold any value here
                values.pop(key, None)
    return without_later_keys(out)


def fed_cell_id(cfg: FedConfig, strategy: str) -> str:
    """12 hex digits of the sha256 of the YAML dump of the cell's `identity` (``strategy``: the cell's one
    strategy or ``local-only``), as `asymlora.recipes.sweep.cell_id` for multi-task cells."""
    text = yaml.safe_dump(identity(config_dict(cfg), strategy), sort_keys=False)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def make_cell(
    base: Path | None, overrides: Sequence[str], params: Mapping[str, Any], out_dir: Path
) -> FedCell:
    """The cell of grid values ``params``: ``base + overrides + params`` read as a `FedConfig`.

    Raises:
        ConfigError: an invalid config (the message names the cell), an unknown ``strategy``, a cell with
            several strategies, or ``eval.local_only=true`` (the baseline is a ``local-only`` cell).
    """
    values = dict(params)
    strategy = values.pop(STRATEGY_KEY, None)
    if strategy is not None and strategy != LOCAL_ONLY and strategy not in STRATEGY_NAMES:
        raise ConfigError(
            f"grid cell {dict(params)}: strategy {strategy!r} is unknown; use one of "
            f"{[*STRATEGY_NAMES, LOCAL_ONLY]}"
        )
    extra = [f"{key}={json.dumps(value)}" for key, value in values.items()]
    if strategy not in (None, LOCAL_ONLY):
        extra.append(f"strategies={json.dumps([strategy])}")
    try:
        cfg = load_config(base, [*overrides, *extra], schema=FedConfig)
    except ConfigError as e:
        raise ConfigError(f"grid cell {dict(params)}: {e}") from None
    if strategy is None:
        if len(cfg.strategies) != 1:
            raise ConfigError(
                f"grid cell {dict(params)}: a sweep cell runs one strategy, the config has {cfg.strategies}; "
                f"put them in the grid (strategy: [{', '.join(cfg.strategies)}, {LOCAL_ONLY}])"
            )
        strategy = cfg.strategies[0]
    if cfg.eval.local_only:
        raise ConfigError(
            f"grid cell {dict(params)}: eval.local_only=true would train the local-only baseline inside "
            f"every cell; add eval.local_only=false to the overrides and {LOCAL_ONLY!r} to the grid's strategies"
        )
    cid = fed_cell_id(cfg, strategy)
    return FedCell(dict(params), dataclasses.replace(cfg, run_dir=str(out_dir / "runs" / cid)), cid, strategy)


# --------------------------------------------------------------------------- running


def _logger(cell: FedCell) -> Callable[[str], None]:
    log = cell.run_dir / LOG_FILE

    def say(line: Any = "") -> None:
        with log.open("a", encoding="utf-8") as f:
            f.write(f"{line}\n")

    return say


def run_cell(cell: FedCell) -> dict[str, Any]:
    """Run the cell (resuming its checkpoint when its run directory holds one) and return its strategy's
    ``results.json`` (`asymlora.federated.server_results.assemble_results`; local-only:
    `asymlora.federated.run.local_only`). The run's messages go to ``run_dir/sweep.log``.

    Raises:
        RuntimeError: the federated run did not complete (exit code and the log named).
    """
    cfg = cell.config
    cell.run_dir.mkdir(parents=True, exist_ok=True)
    say = _logger(cell)
    if cell.strategy == LOCAL_ONLY:
        tasks, plan = load_partition(cfg)
        ranks = [cfg.client_rank(k) for k in range(cfg.clients.num)]
        return fed_run.local_only(cfg, cell.run_dir, tasks, plan, ranks, say)
    resume = (cell.run_dir / fed_run.CONFIG_FILE).is_file()
    code = fed_run.run(cfg, resume=resume, say=say)
    results = cell.run_dir / cell.strategy / fed_run.RESULTS_FILE
    if code != 0 or not results.is_file():
        raise RuntimeError(
            f"the federated run of {cell.strategy} in {cell.run_dir} ended with exit code {code}; "
            f"see {cell.run_dir / LOG_FILE}"
        )
    return dict(json.loads(results.read_text()))


# --------------------------------------------------------------------------- the ledger record


def _client_metric(scores: Mapping[str, Any]) -> str:
    """The metric of a client's score: its tasks' primary metric, or ``primary`` when they differ."""
    metrics = set(scores["primary"].values())
    return metrics.pop() if len(metrics) == 1 else "primary"


def _client_examples(scores: Mapping[str, Any]) -> dict[str, Any] | None:
    """A client's per-example primary scores over its tasks (in task order; their mean is its score) and
    the hash of their example keys; None when a task has none (a corpus-level metric, an old client)."""
    examples = scores.get("examples") or {}
    tasks = list(scores["per_task"])
    if not tasks or any(task not in examples for task in tasks):
        return None
    keys = "".join(key for task in tasks for key in examples[task]["keys"])
    return {
        "keys": hashlib.sha1(keys.encode()).hexdigest()[:16],
        "scores": [float(v) for task in tasks for v in examples[task]["scores"]],
    }


def side_record(clients: Sequence[Mapping[str, Any]], which: str) -> dict[str, Any] | None:
    """The ``personalised`` (or ``global``) scores of every client: per client, their average, population
    std and worst client over clients, intervals (Wilson or bootstrap per client, stratified bootstrap
    over clients for the average: `asymlora.eval.stats`) and per-example scores; None when no client has them."""
    per_client: dict[str, float] = {}
    metric: dict[str, str] = {}
    per_example: dict[str, dict[str, Any]] = {}
    for client in clients:
        scores = client.get(which)
        if not scores:
            continue
        label = client["label"]
        per_client[label], metric[label] = float(scores["score"]), _client_metric(scores)
        examples = _client_examples(scores)
        if examples is not None:
            per_example[label] = examples
    if not per_client:
        return None
    values = list(per_client.values())
    average = sum(values) / len(values)
    worst = min(per_client, key=per_client.__getitem__)
    whole = len(per_example) == len(per_client)
    intervals = {
        "per_client": {c: stats.metric_interval(e["scores"], metric[c]) for c, e in per_example.items()},
        "average": stats.average_interval({c: e["scores"] for c, e in per_example.items()})
        if whole
        else None,
    }
    return {"per_client": per_client, "metric": metric, "average": average,
            "std": math.sqrt(sum((v - average) ** 2 for v in values) / len(values)),
            "worst": {"client": worst, "value": per_client[worst]}, "intervals": intervals,
            "per_example": per_example}  # fmt: skip


def _bytes(results: Mapping[str, Any]) -> dict[str, Any] | None:
    b = results.get("bytes")
    if not b:
        return None
    return {key: b.get(key) for key in ("up", "down", "total", "eval_down", "per_round", "transfer")}


def _dp(results: Mapping[str, Any]) -> dict[str, Any] | None:
    dp = results.get("dp")
    if not dp:
        return None
    keys = ("epsilon", "delta", "noise_multiplier", "clipping_norm", "clipping", "target_epsilon")
    return {key: dp.get(key) for key in keys}


def make_record(
    cell: FedCell, results: Mapping[str, Any], *, started: str, wall_seconds: float, commit: str | None,
    host: str,
) -> dict[str, Any]:  # fmt: skip
    """The ledger record of a finished federated cell (``results``: `run_cell`'s)."""
    cfg = cell.config
    personalised = side_record(results["clients"], "personalised")
    if personalised is None:
        raise RuntimeError(f"{cell.run_dir}: no client returned personalised scores")
    rounds = int(results.get("rounds", cfg.rounds))
    return {
        "id": cell.id, "kind": "federated", "params": cell.params, "strategy": cell.strategy, "seed": cfg.seed,
        "clients": list(personalised["per_client"]), "commit": commit, "host": host,
        "average": personalised["average"], "personalised": personalised,
        "global": side_record(results["clients"], "global"),
        "bytes": _bytes(results), "dp": _dp(results),
        "rounds": rounds, "local_steps": cfg.train.local_steps, "steps": rounds * cfg.train.local_steps,
        "train_loss": results.get("train_loss"), "eval_failures": results.get("eval_failures", []),
        "round_seconds": results.get("round_seconds"), "eval_seconds": results.get("eval_seconds"),
        "started": started, "wall_seconds": round(wall_seconds, 2), "config": cfg.to_dict(),
        "hardware": client_hardware(cfg),
    }  # fmt: skip


def client_hardware(cfg: FedConfig) -> dict[str, Any]:
    """Where the simulated clients computed, as `asymlora.models.hardware` names it: CUDA with bfloat16 weights
    when the simulation gave them GPUs on a machine with CUDA (the clients load with ``device="auto"``), else
    the CPU in float32 with ``simulation.threads_per_client`` threads."""
    cuda = cfg.simulation.num_gpus > 0 and torch.cuda.is_available()
    return {"device": "cuda" if cuda else "cpu", "device_name": torch.cuda.get_device_name(0) if cuda else cpu_name(),
            "dtype": "bfloat16" if cuda else "float32", "torch_threads": cfg.simulation.threads_per_client}  # fmt: skip


# --------------------------------------------------------------------------- the report


@dataclasses.dataclass
class FedGroup(SeedGroup):
    """The records of one federated config over seeds."""

    strategy: str
    clients: list[str]


def _group_key(record: Mapping[str, Any]) -> str:
    config = identity(record["config"], record["strategy"])
    config["seed"] = 0
    return config_key(config)


def cell_key(record: Mapping[str, Any]) -> tuple[str, int]:
    """A federated record's cell: its config without the seed (`identity`) and its seed, whatever id it was
    recorded under (`groups.latest_per_cell`)."""
    return _group_key(record), record["seed"]


SETTING_KEYS = ("train.mixed_precision",)
"""Config keys (``section.key``) that a record's setting includes when they are set (not null) though no grid
key names them (a campaign's overrides): a cell trained with bf16 autocast and one trained in float32 are
labelled apart and never tested as two strategies in one setting (`comparable`), whatever the grid says."""


def _config_value(record: Mapping[str, Any], key: str) -> Any:
    section, name = key.split(".")
    return ((record.get("config") or {}).get(section) or {}).get(name)


def _params(record: Mapping[str, Any], setting_keys: Sequence[str] = SETTING_KEYS) -> dict[str, Any]:
    """``record``'s grid values, then each of ``setting_keys`` (`SETTING_KEYS`) whose value in its config is set
    and that is not a grid key; a `SETTING_KEYS` grid key at null is left out (the config without it)."""
    params = {k: v for k, v in record["params"].items() if not (k in SETTING_KEYS and v is None)}
    for key in setting_keys:
        if (value := _config_value(record, key)) is not None and key not in params:
            params[key] = value
    return params


def _varying(records: Iterable[Mapping[str, Any]]) -> list[str]:
    """The `SETTING_KEYS` whose config values differ among ``records``."""
    records = list(records)
    return [k for k in SETTING_KEYS if len({json.dumps(_config_value(r, k)) for r in records}) > 1]


def _family(ref: FedGroup, peer: FedGroup, varying: Sequence[str]) -> str:
    """A pair's Holm family (`groups.holm_over_pairs`): its groups' values of the ``varying`` `SETTING_KEYS`, e.g.
    ``mixed_precision=null`` (two float32 groups), ``mixed_precision=bf16 vs null`` (a precision check); ``""``
    when none varies (the whole page one family)."""
    parts = []
    for key in varying:
        shown = {json.dumps(_config_value(g.records[0], key)).strip('"') for g in (ref, peer)}  # None as null
        parts.append(f"{key.split('.')[-1]}={' vs '.join(sorted(shown))}")
    return ", ".join(parts)


def _label(record: Mapping[str, Any], setting_keys: Sequence[str] = SETTING_KEYS) -> str:
    """The strategy and the grid values but the seed, then ``setting_keys`` (`_params`): ``key=value`` with the
    key's last part."""
    extra = [f"{key.split('.')[-1]}={value:g}" if isinstance(value, float) else f"{key.split('.')[-1]}={value}"
             for key, value in _params(record, setting_keys).items() if key not in (STRATEGY_KEY, "seed")]  # fmt: skip
    return " ".join([record["strategy"], *extra])


def group_records(records: Sequence[Mapping[str, Any]]) -> list[FedGroup]:
    """Records grouped by config (all but ``seed``), in ledger order; of the records of one cell (one config and
    seed: a cell recorded twice, or under the id older code gave it) the last wins. A label shows a `SETTING_KEYS`
    value only when the records differ in it."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for record in latest_per_cell([dict(r) for r in records], cell_key):
        groups.setdefault(_group_key(record), []).append(record)
    varying = _varying(r for rs in groups.values() for r in rs)  # a campaign's override is not news
    labels = [_label(rs[0], varying) for rs in groups.values()]
    out = []
    for (key, rs), label in zip(groups.items(), labels, strict=True):
        label = f"{label} (config {key})" if labels.count(label) > 1 else label
        rs = sorted(rs, key=lambda r: r["seed"])
        clients = list(dict.fromkeys(c for r in rs for c in r["clients"]))  # a seed may lack a client
        out.append(FedGroup(label, rs, strategy=rs[0]["strategy"], clients=clients))
    return out


def missing_clients(group: FedGroup) -> dict[str, list[int]]:
    """``{client: [seeds whose record has no personalised score of it]}``: a client whose evaluation failed, or
    that never trained (partial participation), is absent from that seed's record (`side_record`)."""
    out = {
        c: [r["seed"] for r in group.records if c not in r["personalised"]["per_client"]]
        for c in group.clients
    }
    return {c: seeds for c, seeds in out.items() if seeds}


def _over_seeds(values: list[float], interval: Mapping[str, Any] | None) -> dict[str, Any]:
    """Mean ± std over seeds (several), or the one value with its 95 % interval."""
    if len(values) > 1:
        summary = stats.seed_summary(values)
        return {"value": summary["mean"], "std": summary["std"], "values": summary["values"]}
    iv = interval or {}
    return {"value": values[0], "low": iv.get("low"), "high": iv.get("high"), "values": values}


def _side_summary(group: FedGroup, which: str) -> dict[str, Any] | None:
    if any(r.get(which) is None for r in group.records):
        return None
    sides: list[dict[str, Any]] = [r[which] for r in group.records]
    one = sides[0]["intervals"] if len(sides) == 1 else {"per_client": {}, "average": None}
    # a client missing from a seed's record (`missing_clients`): its value over the seeds that have it
    values = {c: [s["per_client"][c] for s in sides if c in s["per_client"]] for c in group.clients}
    return {
        "per_client": {c: _over_seeds(v, one["per_client"].get(c)) for c, v in values.items() if v},
        "average": _over_seeds([s["average"] for s in sides], one["average"]),
        "metric": sides[0]["metric"],
    }  # fmt: skip


def _epsilon(records: Sequence[Mapping[str, Any]]) -> tuple[float | None, bool]:
    """(ε: mean over the seeds, None without DP or when unbounded; whether DP is on with no finite ε).

    A record's ``dp`` is None when DP is off; with clipping on it holds ``epsilon``, None when the accountant's
    ε is infinite (noise multiplier z = 0: clipping only, no privacy guarantee; `PrivacyAccountant.epsilon`).
    One seed without a finite ε makes the group's unbounded (a mean with ∞ is ∞)."""
    dps = [r["dp"] for r in records if r.get("dp")]
    if any(dp.get("epsilon") is None for dp in dps):
        return None, True
    return stats.nan_mean([dp["epsilon"] for dp in dps]), False


def _cost(group: FedGroup) -> dict[str, Any]:
    """Bytes (mean over seeds), ε (`_epsilon`), rounds × local steps, wall time (of the last invocation) and
    the rounds' seconds (summed over resumes; None in records from before it was kept)."""
    records = group.records
    epsilon, unbounded = _epsilon(records)
    b = [r["bytes"] for r in records if r.get("bytes")]
    clients = max(1, len(group.clients))
    return {
        "bytes_up": stats.nan_mean([x["up"] for x in b]), "bytes_down": stats.nan_mean([x["down"] for x in b]),
        "bytes_total": stats.nan_mean([x["total"] for x in b]),
        "mb_per_client_per_round": stats.nan_mean([x["total"] / max(1, len(x["per_round"])) / clients / 1e6 for x in b]),
        "epsilon": epsilon, "epsilon_infinite": unbounded,
        "delta": (records[0].get("dp") or {}).get("delta"),
        "rounds": records[0]["rounds"], "local_steps": records[0]["local_steps"],
        "wall_seconds": stats.nan_mean([r["wall_seconds"] for r in records]),
        "round_seconds": stats.nan_mean([r.get("round_seconds") for r in records]),
    }  # fmt: skip


def paired(ref: FedGroup, peer: FedGroup, which: str = "personalised") -> dict[str, Any]:
    """Paired tests of ``ref`` against ``peer`` per client and on the average over clients
    (`groups.paired_over_seeds`) on the ``which`` scores; ``{"a", "b", "why"}`` when the groups cannot be
    paired (other clients: the ones only one group has; other examples; no shared seed). The same clients
    first seen in another order (a client without a score in one group's first seed) are the same clients."""
    if set(ref.clients) != set(peer.clients):
        only = [f"{g.label} alone has {', '.join(sorted(set(g.clients) - set(h.clients)))}"
                for g, h in ((ref, peer), (peer, ref)) if set(g.clients) - set(h.clients)]  # fmt: skip
        return {"a": ref.label, "b": peer.label, "why": f"other clients ({'; '.join(only)})"}

    def examples(record: dict[str, Any], client: str) -> Any:
        return (record.get(which) or {}).get("per_example", {}).get(client)

    # a client scored by a corpus-level metric (BLEU) has per-example scores in no record: left out of the tests
    scored = [c for c in ref.clients if any(examples(r, c) is not None for r in ref.records + peer.records)]

    def whole(group: FedGroup) -> SeedGroup:  # the seeds with every scored client's per-example scores
        return SeedGroup(
            group.label, [r for r in group.records if all(examples(r, c) is not None for c in scored)]
        )

    result = paired_over_seeds(whole(ref), whole(peer), ref.clients, examples)
    if isinstance(result, str):  # why they cannot be paired: the report says so (`groups.paired_lines`)
        return {"a": ref.label, "b": peer.label, "why": result}
    return {"a": ref.label, "b": peer.label, **result}


STRATEGY_OPTIONS = frozenset({STRATEGY_KEY, "seed", "local_a", "het_local", "het_upload"})
"""Grid keys that belong to a strategy (its variant) rather than to the setting it runs in."""


def _setting(group: FedGroup) -> dict[str, Any]:
    return {k: v for k, v in _params(group.records[0]).items() if k not in STRATEGY_OPTIONS}


def comparable(ref: FedGroup, peer: FedGroup) -> bool:
    """Whether the report tests ``ref`` against ``peer``: the same strategy in another setting (e.g. more
    rounds, another ε, A reset, another precision) or another strategy in the same setting (the grid values
    other than the strategy, its options and the seed, with the `SETTING_KEYS` of the config), so that one test
    answers one question."""
    return peer.strategy == ref.strategy or _setting(peer) == _setting(ref)


def summarize(records: Sequence[Mapping[str, Any]], reference: str | Sequence[str] | None) -> dict[str, Any]:
    """Everything the federated results page shows: per-group scores over seeds, costs, paired tests of
    every group of strategy ``reference`` (a name or a list of names: `groups.reference_pairs`) against every
    `comparable` group (same clients and examples), Holm-corrected over the pairs of one `_family` (the whole
    page unless its records differ in a `SETTING_KEYS` value)."""
    groups = group_records(records)
    summary: dict[str, Any] = {"kind": "federated", "groups": [], "paired": [], "unpaired": [], "std_ddof": stats.STD_DDOF,
                               "records": sum(len(g.records) for g in groups), "reference": reference}  # fmt: skip
    for g in groups:
        summary["groups"].append({
            "label": g.label, "strategy": g.strategy, "clients": g.clients, "seeds": g.seeds,
            "ids": [r["id"] for r in g.records], "personalised": _side_summary(g, "personalised"),
            "global": _side_summary(g, "global"), "missing_clients": missing_clients(g), **_cost(g),
        })  # fmt: skip
    names, varying = reference_names(reference), _varying(r for g in groups for r in g.records)
    for ref, peer in reference_pairs(groups, lambda g: rank(names, g.strategy), comparable):
        result = paired(ref, peer)
        if "why" not in result and varying:
            result["family"] = _family(ref, peer, varying)
        summary["unpaired" if "why" in result else "paired"].append(result)
    summary["paired"] = holm_over_pairs(summary["paired"])
    return summary


def _text(v: Mapping[str, Any] | None, digits: int = 3) -> str:
    if v is None:
        return "–"
    if "std" in v:
        return f"{v['value']:.{digits}f} ± {v['std']:.{digits}f}"
    return stats.format_interval(v["value"], v.get("low"), v.get("high"), digits)


def _number(v: float | None, digits: int) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _score_table(summary: Mapping[str, Any], clients: list[str]) -> list[str]:
    header = ["strategy", "seeds", *clients, "average", "global average", "rounds × local steps",
              "MB / client / round", "MB total", "ε", "rounds s"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for g in summary["groups"]:
        p, gl = g["personalised"] or {}, g["global"] or {}
        cells = [g["label"], ",".join(map(str, g["seeds"]))]
        cells += [_text((p.get("per_client") or {}).get(c)) for c in clients]
        cells += [_text(p.get("average")), _text(gl.get("average")), f"{g['rounds']} × {g['local_steps']}",
                  _number(g["mb_per_client_per_round"], 3),
                  _number(None if g["bytes_total"] is None else g["bytes_total"] / 1e6, 2),
                  "∞" if g.get("epsilon_infinite") else _number(g["epsilon"], 2),
                  _number(g.get("round_seconds"), 0)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def tables(summary: Mapping[str, Any]) -> list[str]:
    """The markdown of the federated report: scores and costs per group, per-seed values, paired tests."""
    clients: list[str] = []
    for g in summary["groups"]:
        clients += [c for c in g["clients"] if c not in clients]
    lines = _score_table(summary, clients)
    lines += ["", "Per-seed personalised averages:", ""]
    for g in summary["groups"]:
        values = (g["personalised"] or {}).get("average", {}).get("values", [])
        lines.append(f"- {g['label']} (seeds {g['seeds']}): {[round(v, 4) for v in values]}")
    missing = [f"- {g['label']}: no score of {client} in seed(s) {seeds}" for g in summary["groups"]
               for client, seeds in (g.get("missing_clients") or {}).items()]  # fmt: skip
    if missing:
        lines += ["", "Clients without a score in some seeds (their evaluation failed, or they never trained): "
                  "their value is over the other seeds, that seed's average is over fewer clients, and the "
                  "paired tests leave that seed out:", "", *missing]  # fmt: skip
    intro = (
        "Paired tests of the personalised scores (A − B on the same test examples, per-example scores "
        "averaged over the shared seeds):"
    )
    lines += paired_lines(summary["paired"], clients, intro, "client", summary.get("unpaired", ()))
    return lines


NOTE = (
    "Scores: each client's personalised adapter (global average: the aggregated adapter alone) on its own "
    "test split, the primary metric of its tasks. One seed: value [95 % interval] (Wilson for accuracy / "
    "exact match, bootstrap otherwise; stratified bootstrap over clients for the average). Several seeds: "
    f"mean ± std over seeds (sample std, ddof={stats.STD_DDOF}). Paired tests: two-sided sign-flip "
    f"permutation p-value ({stats.PERMUTATION_NOTE}) and paired bootstrap interval; the average weights every client 1/K. MB = 10^6 "
    "bytes of Flower messages, up + down, mean over seeds; ε: (ε, δ)-DP of the uploads after all rounds (∞: "
    "clipping without noise, no guarantee; –: no DP)."
)


def plot_rows(summary: Mapping[str, Any]) -> tuple[dict, dict, dict]:
    """(rows, primary, intervals) of `asymlora.eval.plot_results`: one bar per group, one group per client."""
    rows: dict[str, Any] = {}
    intervals: dict[str, Any] = {}
    primary: dict[str, str] = {}
    for g in summary["groups"]:
        p = g["personalised"]
        if p is None:
            continue
        primary.update(p["metric"])
        rows[g["label"]] = {c: {p["metric"][c]: v["value"]} for c, v in p["per_client"].items()}
        intervals[g["label"]] = {"per_task": dict(p["per_client"]), "average": p["average"]}
    return rows, primary, intervals
