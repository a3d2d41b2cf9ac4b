"""Splitting tasks among federated clients: one task per client, Dirichlet, or IID; deterministic by seed.

- ``task`` (the paper's protocol, docs/design.md §8): client k gets all of ``data.tasks[k]``, train and test.
- ``dirichlet``: every *class* — a task (``dirichlet_over: tasks``) or a (task, answer) label of a choice
  task (``dirichlet_over: labels``; a generative task is one class) — is spread over the K clients with
  proportions p ~ Dir(α·1_K), drawn once per class and applied to its train and its test examples alike,
  so each client's test split follows its own training distribution (personalised evaluation).
- ``iid``: all examples pooled, shuffled and cut into K near-equal parts (train and test separately).

The split functions are pure: they take sizes or labels and a seed and return, per client, the example
indices of each task (`Shard`). A client left without training or test examples is an error that says
how to fix it. `summary_lines` gives the per-client table printed at the start of a run.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from asymlora.data import Task, load_tasks
from asymlora.eval.metrics import apply_metric_choices

if TYPE_CHECKING:
    from asymlora.federated.config import FedConfig

__all__ = [
    "Plan",
    "Shard",
    "check_plan",
    "client_tasks",
    "dirichlet_partition",
    "iid_partition",
    "load_client_tasks",
    "load_partition",
    "plan_partition",
    "summary_lines",
    "task_labels",
    "task_partition",
]


@dataclass(frozen=True)
class Shard:
    """One client's share of one task: indices into the task's train and test lists."""

    task: int
    train: tuple[int, ...]
    test: tuple[int, ...]


Plan = list[list[Shard]]
"""Per client, its shards (only tasks it has at least one example of)."""


# --- pure splits -------------------------------------------------------------------------------------
def task_partition(sizes: Sequence[tuple[int, int]], num_clients: int) -> Plan:
    """One task per client: client k gets every example of task k. ``sizes``: (n_train, n_test) per task."""
    if len(sizes) != num_clients:
        raise ValueError(
            f"one task per client needs as many tasks as clients: {len(sizes)} task(s) for {num_clients} clients"
        )
    return [[Shard(k, tuple(range(n_tr)), tuple(range(n_te)))] for k, (n_tr, n_te) in enumerate(sizes)]


def iid_partition(sizes: Sequence[tuple[int, int]], num_clients: int, seed: int) -> Plan:
    """Pool the examples of all tasks, shuffle with ``seed`` and cut into ``num_clients`` near-equal parts."""
    rng = np.random.default_rng(seed)
    parts: list[dict[int, tuple[list[int], list[int]]]] = [{} for _ in range(num_clients)]
    for split in (0, 1):
        pool = [(t, i) for t, n in enumerate(sizes) for i in range(n[split])]
        order = rng.permutation(len(pool))
        for k, chunk in enumerate(np.array_split(order, num_clients)):
            for j in chunk.tolist():
                t, i = pool[j]
                parts[k].setdefault(t, ([], []))[split].append(i)
    return _to_plan(parts)


def dirichlet_partition(
    train_labels: Sequence[Sequence[Hashable]],
    test_labels: Sequence[Sequence[Hashable]],
    num_clients: int,
    alpha: float,
    seed: int,
) -> Plan:
    """Spread each class over the clients with proportions p_c ~ Dir(α·1_K) (one draw per class).

    Args:
        train_labels, test_labels: per task, the class of each example (classes may span tasks).
        alpha: concentration; α → 0 puts each class on one client, α → ∞ gives equal shares.
    """
    if not alpha > 0:
        raise ValueError(f"Dirichlet concentration alpha={alpha!r} must be > 0")
    if len(train_labels) != len(test_labels):
        raise ValueError(f"{len(train_labels)} train label lists for {len(test_labels)} test label lists")
    rng = np.random.default_rng(seed)
    classes: dict[Hashable, None] = {}
    for labels in (*train_labels, *test_labels):
        classes.update(dict.fromkeys(labels))
    parts: list[dict[int, tuple[list[int], list[int]]]] = [{} for _ in range(num_clients)]
    for c in classes:
        p = rng.dirichlet([alpha] * num_clients)
        for split, per_task in ((0, train_labels), (1, test_labels)):
            members = [
                (t, i) for t, labels in enumerate(per_task) for i, lab in enumerate(labels) if lab == c
            ]
            order = rng.permutation(len(members))
            cuts = np.floor(np.cumsum(p)[:-1] * len(members)).astype(int)
            for k, chunk in enumerate(np.split(order, cuts)):
                for j in chunk.tolist():
                    t, i = members[j]
                    parts[k].setdefault(t, ([], []))[split].append(i)
    return _to_plan(parts)


def _to_plan(parts: list[dict[int, tuple[list[int], list[int]]]]) -> Plan:
    return [
        [Shard(t, tuple(sorted(tr)), tuple(sorted(te))) for t, (tr, te) in sorted(client.items())]
        for client in parts
    ]


def task_labels(task: Task, task_index: int, over: str) -> tuple[list[Hashable], list[Hashable]]:
    """(train, test) class of every example: the task, or (task, correct option) for choice tasks."""

    def label(example) -> Hashable:
        if over == "labels" and example.options is not None:
            return (task_index, example.target)
        return (task_index, None)

    return [label(e) for e in task.train], [label(e) for e in task.test]


def check_plan(plan: Plan, task_names: Sequence[str], how: str) -> None:
    """Raise ValueError naming the first client left without training or test examples."""
    for k, shards in enumerate(plan):
        n_train = sum(len(s.train) for s in shards)
        n_test = sum(len(s.test) for s in shards)
        if n_train == 0 or n_test == 0:
            which = "training" if n_train == 0 else "test"
            alpha = "raise clients.alpha, " if how.startswith("Dirichlet") else ""  # only Dirichlet reads it
            raise ValueError(
                f"the partition leaves client {k} with no {which} example ({how}, "
                f"{len(plan)} clients, tasks {list(task_names)}); {alpha}lower clients.num, "
                "raise data.max_train / data.max_test, or change data.seed"
            )


def plan_partition(cfg: FedConfig, tasks: Sequence[Task]) -> Plan:
    """The partition ``cfg.clients`` asks for, over ``tasks`` (all of ``cfg.data.tasks``, loaded)."""
    c = cfg.clients
    sizes = [(len(t.train), len(t.test)) for t in tasks]
    if c.partition == "task":
        plan, how = task_partition(sizes, c.num), "one task per client"
    elif c.partition == "iid":
        plan, how = iid_partition(sizes, c.num, cfg.data.seed), "IID"
    else:
        labels = [task_labels(t, i, c.dirichlet_over) for i, t in enumerate(tasks)]
        plan = dirichlet_partition(
            [tr for tr, _ in labels], [te for _, te in labels], c.num, c.alpha, cfg.data.seed
        )
        how = f"Dirichlet α={c.alpha:g} over {c.dirichlet_over}"
    check_plan(plan, [t.name for t in tasks], how)
    return plan


def client_tasks(tasks: Sequence[Task], shards: Sequence[Shard]) -> list[Task]:
    """One client's data: a `Task` per shard holding only the client's examples (same name, kind, metrics)."""
    out = []
    for s in shards:
        t = tasks[s.task]
        out.append(
            dataclasses.replace(t, train=[t.train[i] for i in s.train], test=[t.test[i] for i in s.test])
        )
    return out


def summary_lines(
    cfg: FedConfig, tasks: Sequence[Task], plan: Plan, ranks: Sequence[int] | None = None
) -> list[str]:
    """A per-client table: rank, train/test examples, and the tasks each client holds."""
    lines = [f"partition: {cfg.clients.partition} over {len(tasks)} task(s), {len(plan)} clients"]
    for k, shards in enumerate(plan):
        n_tr = sum(len(s.train) for s in shards)
        n_te = sum(len(s.test) for s in shards)
        held = ", ".join(f"{tasks[s.task].name} {len(s.train)}/{len(s.test)}" for s in shards)
        rank = f"rank {ranks[k]:>3}, " if ranks is not None else ""
        lines.append(f"  client {k}: {rank}{n_tr:>5} train / {n_te:>4} test  [{held}]")
    return lines


# --- loading -----------------------------------------------------------------------------------------
def load_partition(cfg: FedConfig) -> tuple[list[Task], Plan]:
    """Load every task of ``cfg.data.tasks`` and partition them (raises on an empty client)."""
    d = cfg.data
    tasks = load_tasks(
        d.tasks, seed=d.seed, max_train=d.max_train, max_test=d.max_test, test_fraction=d.test_fraction
    )
    tasks = apply_metric_choices(tasks, d.metric, d.tasks)
    if cfg.clients.partition == "task" and len(tasks) != cfg.clients.num:  # a '#*' spec: counted once loaded
        raise ValueError(
            f"clients.partition=task gives one task to each client: data.tasks expands to {len(tasks)} task(s) "
            f"{[t.name for t in tasks]} for clients.num={cfg.clients.num}; set clients.num={len(tasks)}, list "
            "exactly one task per client, or use partition dirichlet/iid"
        )
    return tasks, plan_partition(cfg, tasks)


_CACHE: dict[tuple[str, int, str | None], list[Task]] = {}


def load_client_tasks(cfg: FedConfig, client: int, data_override: str | None = None) -> list[Task]:
    """Client ``client``'s tasks (cached per process).

    With ``data_override`` (a SuperNode's ``data`` node config: comma-separated task specs) the client
    uses all of that data instead of its share of ``cfg.data.tasks``.
    """
    key = (
        json.dumps([cfg.to_dict()["data"], cfg.to_dict()["clients"]], sort_keys=True),
        client,
        data_override,
    )
    if key in _CACHE:
        return _CACHE[key]
    d = cfg.data
    caps: dict[str, Any] = {
        "seed": d.seed,
        "max_train": d.max_train,
        "max_test": d.max_test,
        "test_fraction": d.test_fraction,
    }
    if data_override:
        specs = [s.strip() for s in data_override.split(",") if s.strip()]
        tasks = apply_metric_choices(load_tasks(specs, **caps), d.metric, specs, strict=False)
    elif cfg.clients.partition == "task":
        # task `client` of the expanded list ('#*': one per task name), as the server's; after a '#*' expanded,
        # data.metric keys are matched by task name
        spec = [d.tasks[client]] if len(d.tasks) == cfg.clients.num else []
        tasks = apply_metric_choices(load_tasks(d.tasks, only=client, **caps), d.metric, spec, strict=False)
    else:
        all_tasks, plan = load_partition(cfg)
        tasks = client_tasks(all_tasks, plan[client])
    _CACHE[key] = tasks
    return tasks
