"""Loading tasks from specs (``bigbench:…``, ``json:…``, ``jsonl:…``, ``hf:…``, ``llm-adapters:…``, ``feddpa:…``).

The one place that knows every source: it parses a spec and dispatches to the reader of its scheme
(:mod:`~asymlora.data.bigbench`, :mod:`~asymlora.data.files`, :mod:`~asymlora.data.paper_formats`), then
splits and caps the examples with :func:`asymlora.data.tasks.build_task`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asymlora.data.bigbench import load_bigbench, prefetch
from asymlora.data.files import list_task_names, load_file_splits, load_hf_splits
from asymlora.data.paper_formats import PAPER_SCHEMES, list_paper_task_names, load_paper_splits
from asymlora.data.tasks import DataError, Example, Task, build_task

__all__ = ["ALL_TASKS", "SPEC_SCHEMES", "TASK_SELECTOR", "TaskSpec", "load_task", "load_tasks", "parse_spec"]

SPEC_SCHEMES = ("bigbench", "json", "jsonl", "hf", *PAPER_SCHEMES)
TASK_SELECTOR = "#"
ALL_TASKS = "*"


@dataclass(frozen=True)
class TaskSpec:
    """A parsed task spec: ``scheme:location#selector``."""

    scheme: str
    location: str
    selector: str | None = None


def parse_spec(spec: str) -> TaskSpec:
    """Parse ``bigbench:<path>``, ``json:/file.json[#task]``, ``jsonl:/file.jsonl[#task]``, ``hf:<dir|id>[#task]``."""
    scheme, sep, rest = spec.partition(":")
    if not sep or scheme not in SPEC_SCHEMES:
        raise DataError(
            f"bad task spec {spec!r}: it must start with one of "
            f"{', '.join(s + ':' for s in SPEC_SCHEMES)} (e.g. bigbench:strategyqa, json:/data/train.jsonl#mytask)"
        )
    rest = rest.strip()
    if not rest:
        raise DataError(f"bad task spec {spec!r}: nothing after {scheme + ':'!r}")
    if scheme == "bigbench":
        return TaskSpec(scheme, rest.strip("/"))
    location, hash_sign, selector = rest.rpartition(TASK_SELECTOR)
    if not hash_sign or Path(rest).expanduser().exists():
        return TaskSpec(scheme, rest)
    # a task name holding '#' (a 'task' value such as 'c#'): split after the first part that exists
    cuts = [at for at, char in enumerate(rest) if char == TASK_SELECTOR]
    at = next((at for at in cuts if Path(rest[:at]).expanduser().exists()), None)
    if at is not None:
        location, selector = rest[:at], rest[at + 1 :]
    if not selector:
        raise DataError(f"bad task spec {spec!r}: empty task name after '#'")
    return TaskSpec(scheme, location, selector)


def _load_splits(
    spec: TaskSpec, cache_dir: str | Path | None, siblings: Sequence[str] = ()
) -> tuple[str, dict[str, list[Example]], dict[str, Any]]:
    """Read a spec's examples: ``(task name, splits, build_task keyword overrides)``."""
    if spec.scheme == "bigbench":
        loaded = load_bigbench(spec.location, cache_dir=cache_dir)
        overrides = {"kind": loaded.kind, "metrics": loaded.metrics, "metric_note": loaded.metric_note}
        return loaded.name, {"all": loaded.examples}, overrides
    if spec.selector == ALL_TASKS:
        raise DataError(f"'#{ALL_TASKS}' selects several tasks: use load_tasks([...]) instead of load_task")
    if spec.scheme in PAPER_SCHEMES:
        return load_paper_splits(spec.scheme, spec.location, spec.selector, siblings)
    if spec.scheme == "hf":
        name, splits = load_hf_splits(spec.location, spec.selector)
    else:
        name, splits = load_file_splits(spec.location, spec.selector)
    return name, splits, {}


def load_task(
    spec: str,
    *,
    seed: int = 0,
    max_train: int | None = None,
    max_test: int | None = None,
    test_fraction: float = 0.2,
    cache_dir: str | Path | None = None,
    siblings: Sequence[str] = (),
) -> Task:
    """Load one task from a spec.

    Specs:
        ``bigbench:<path>`` — a BIG-bench JSON task, path under ``bigbench/benchmark_tasks/``
        without ``task.json`` (``bigbench:strategyqa``, ``bigbench:multiemo/hotels_sentence_en``);
        fetched at first use into the cache (see :mod:`asymlora.data.bigbench`).
        ``json:/path/file.json`` / ``jsonl:/path/file.jsonl`` — rows with ``instruction``/``input``/
        ``output`` or ``input``/``options``/``target`` and an optional ``task`` column;
        ``#taskname`` selects one task's rows.
        ``hf:/path/dir`` (``datasets.load_from_disk``) or ``hf:<hub id>`` (needs the hub), same
        columns and selector; ``train``/``test`` splits are used as given when both exist.
        ``llm-adapters:<dir|file>#dataset`` / ``feddpa:<dir|file>#category`` — the ALoRA paper's
        benchmark data in its public formats (see :mod:`asymlora.data.paper_formats`).

    Args:
        seed: shuffling seed; the same seed always gives the same split, whatever the caps.
        max_train, max_test: caps applied after splitting (``None``: no cap).
        test_fraction: share of the examples held out for test (sources without a test split).
        cache_dir: cache root for BIG-bench (default ``$ASYMLORA_CACHE`` or ``~/.cache/asymlora``).
        siblings: the other task names loaded from the same source together (``load_tasks`` fills it).

    Raises:
        DataError: unknown task (with close matches), missing fields (file and line), a path
            that does not exist, or a task left empty by filtering/capping.
    """
    name, splits, overrides = _load_splits(parse_spec(spec), cache_dir, siblings)
    return build_task(
        name,
        splits,
        seed=seed,
        max_train=max_train,
        max_test=max_test,
        test_fraction=test_fraction,
        **overrides,
    )


def _expand_specs(specs: Sequence[str]) -> list[str]:
    """Replace every ``…#*`` spec by one spec per task name found in that source."""
    expanded: list[str] = []
    for spec in specs:
        parsed = parse_spec(spec)
        if parsed.selector != ALL_TASKS:
            expanded.append(spec)
            continue
        if parsed.scheme in PAPER_SCHEMES:
            names = list_paper_task_names(parsed.scheme, parsed.location)
        else:
            names = list_task_names(parsed.scheme, parsed.location)
        expanded.extend(f"{parsed.scheme}:{parsed.location}{TASK_SELECTOR}{name}" for name in names)
    return expanded


def load_tasks(
    specs: Sequence[str],
    *,
    seed: int = 0,
    max_train: int | None = None,
    max_test: int | None = None,
    test_fraction: float = 0.2,
    cache_dir: str | Path | None = None,
    only: int | None = None,
) -> list[Task]:
    """Load several tasks (same arguments as :func:`load_task`, caps per task).

    A ``json:``/``jsonl:``/``hf:`` spec ending in ``#*`` expands to one task per value of its
    ``task`` column. BIG-bench tasks not yet cached are read from the archive in one pass.
    ``only``: load just the task at that index of the expanded list (a federated client's own task under
    ``clients.partition: task``), exactly as it is loaded among all of them.

    Raises:
        DataError: a bad spec or file, two tasks of the same name, or ``only`` beyond the expanded list.
    """
    expanded = _expand_specs(specs)
    picked = range(len(expanded))
    if only is not None:
        if not 0 <= only < len(expanded):
            raise DataError(
                f"there is no task {only}: data.tasks expands to {len(expanded)} task(s) {expanded}"
            )
        picked = range(only, only + 1)
    bigbench_paths = [parse_spec(expanded[i]).location for i in picked if expanded[i].startswith("bigbench:")]
    if bigbench_paths:
        prefetch(bigbench_paths, cache_dir=cache_dir)
    parsed = [parse_spec(spec) for spec in expanded]
    tasks = [
        load_task(
            spec,
            seed=seed,
            max_train=max_train,
            max_test=max_test,
            test_fraction=test_fraction,
            cache_dir=cache_dir,
            siblings=[
                o.selector
                for o in parsed
                if o.selector and (o.scheme, o.location) == (p.scheme, p.location) and o != p
            ],
        )
        for i, (spec, p) in enumerate(zip(expanded, parsed, strict=True))
        if i in picked
    ]
    _check_unique_names(tasks)
    return tasks


def _check_unique_names(tasks: Sequence[Task]) -> None:
    """Raise `DataError` when two tasks have the same name (results, the task router, ``data.metric`` and
    the federated clients are keyed by it: the second would overwrite the first's scores)."""
    names = [task.name for task in tasks]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise DataError(
            f"data.tasks gives more than one task the name {', '.join(map(repr, twice))} (tasks: {names}); a task "
            "is named by its '#name' selector, else by its file or directory name: list each task once, and "
            "rename one of two files of the same name (or put their rows in one file with a 'task' column)"
        )
