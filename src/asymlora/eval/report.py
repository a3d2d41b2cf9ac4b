"""Summaries over tasks (average, std, worst, Δm%), the per-task table and a bar chart.

Δm% (DESIGN.md §6, the paper's "balance" metric) compares a multi-task model with one
single-task model per task, on each task's primary metric::

    Δm = (1/T) Σ_t (M_single,t − M_multi,t) / M_single,t × 100

Lower is better; negative means the multi-task model beats the single-task models on average.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from asymlora.eval.metrics import primary_metric

__all__ = ["delta_m", "format_table", "plot_results", "primary_values", "summarize"]

logger = logging.getLogger(__name__)

MISSING = "–"


def _primary_of(task: str, metrics: Mapping[str, float], primary: Mapping[str, str]) -> str:
    """The primary metric name of ``task``: from ``primary``, else inferred from the metrics present."""
    if task in primary:
        name = primary[task]
    elif "accuracy" in metrics:
        name = "accuracy"
    elif "exact_match" in metrics:
        name = "exact_match"
    else:
        raise ValueError(f"no primary metric given for task {task!r} (metrics: {sorted(metrics)})")
    name = primary_metric(name)
    if name not in metrics:
        raise ValueError(f"task {task!r}: primary metric {name!r} is not among its results {sorted(metrics)}")
    return name


def primary_values(
    per_task: Mapping[str, Mapping[str, float]], primary: Mapping[str, str]
) -> dict[str, float]:
    """``{task: value of its primary metric}``, in the order of ``per_task``."""
    return {task: float(metrics[_primary_of(task, metrics, primary)]) for task, metrics in per_task.items()}


def delta_m(
    values: Mapping[str, float], baselines: Mapping[str, float] | None
) -> tuple[float | None, list[str]]:
    """Δm% of ``values`` (task → primary metric) against single-task ``baselines``, and notes.

    Tasks with no baseline, or a baseline of 0 (the relative change is undefined), are left out
    with a note; the mean runs over the remaining tasks. None when no task has a usable baseline.
    """
    if not baselines:
        return None, []
    notes: list[str] = []
    terms: list[float] = []
    for task, value in values.items():
        if task not in baselines or baselines[task] is None:
            notes.append(f"Δm%: no single-task baseline for task {task!r}; left out")
            continue
        single = float(baselines[task])
        if single == 0.0 or not math.isfinite(single):
            notes.append(f"Δm%: single-task baseline of task {task!r} is {single}; left out")
            continue
        terms.append((single - value) / single * 100.0)
    for note in notes:
        logger.warning(note)
    return (sum(terms) / len(terms) if terms else None), notes


def summarize(
    per_task: Mapping[str, Mapping[str, float]],
    primary: Mapping[str, str],
    baselines: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Average, population std and worst task of the primary metric, and Δm% against baselines.

    Args:
        per_task: ``{task: {metric: value}}`` (as returned by :func:`~asymlora.eval.evaluate_tasks`).
        primary: ``{task: primary metric name}``; a task left out gets ``accuracy`` or
            ``exact_match``, whichever it reports.
        baselines: ``{task: primary metric of the single-task model}``, or None.

    Returns:
        ``{"average": float, "std": float, "worst": {"task": str, "value": float},
        "delta_m": float | None, "primary": {task: metric}, "notes": [str]}``.

    Raises:
        ValueError: no task, or a task without its primary metric.
    """
    if not per_task:
        raise ValueError("summarize needs at least one task result")
    names = {task: _primary_of(task, metrics, primary) for task, metrics in per_task.items()}
    values = {task: float(per_task[task][name]) for task, name in names.items()}
    average = sum(values.values()) / len(values)
    std = math.sqrt(sum((v - average) ** 2 for v in values.values()) / len(values))
    worst_task = min(values, key=values.__getitem__)
    dm, notes = delta_m(values, baselines)
    return {
        "average": average,
        "std": std,
        "worst": {"task": worst_task, "value": values[worst_task]},
        "delta_m": dm,
        "primary": names,
        "notes": notes,
    }


def _fmt(value: float | None, digits: int = 3) -> str:
    return MISSING if value is None else f"{value:.{digits}f}"


def format_table(
    rows: Mapping[str, Mapping[str, Mapping[str, float]]],
    primary: Mapping[str, str],
    tasks: Sequence[str],
    baselines: Mapping[str, float] | None = None,
) -> str:
    """A markdown table: one row per method/run, one column per task, then average/std/worst/Δm%.

    Args:
        rows: ``{method: {task: {metric: value}}}`` (e.g. ``"base"``, ``"lora"``, ``"alora"``).
        primary: ``{task: primary metric}`` (the metric shown in each task column).
        tasks: the task columns, in order; a method missing a task shows ``–`` there and its
            summary runs over the tasks it has.
        baselines: single-task primary metrics for the Δm% column (``–`` without them).

    Returns:
        The table, with a header line naming each task's metric (markdown; readable as plain text).
    """
    if not rows:
        raise ValueError("format_table needs at least one row")
    header = ["method", *tasks, "average", "std", "worst", "Δm%"]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    for method, per_task in rows.items():
        present = {task: per_task[task] for task in tasks if task in per_task}
        cells = [method]
        for task in tasks:
            metrics = per_task.get(task)
            cells.append(_fmt(metrics[_primary_of(task, metrics, primary)]) if metrics else MISSING)
        if present:
            summary = summarize(present, primary, baselines)
            worst = summary["worst"]
            cells += [
                _fmt(summary["average"]),
                _fmt(summary["std"]),
                f"{_fmt(worst['value'])} ({worst['task']})",
                _fmt(summary["delta_m"], 1),
            ]
        else:
            cells += [MISSING] * 4
        lines.append("| " + " | ".join(cells) + " |")
    metric_names = ", ".join(
        f"{task}: {primary_metric(primary[task]) if task in primary else 'auto'}" for task in tasks
    )
    lines.append("")
    lines.append(
        f"Metrics per task: {metric_names} (fractions 0–1). average / std (population) / worst: over the "
        "tasks. Δm%: mean relative drop against the single-task baselines, in percent; lower is better."
    )
    return "\n".join(lines)


def plot_results(
    rows: Mapping[str, Mapping[str, Mapping[str, float]]],
    primary: Mapping[str, str],
    path: str | Path,
    *,
    title: str = "Per-task results",
) -> Path:
    """Write a grouped bar chart (PNG): one group per task (and the average), one bar per method.

    Uses matplotlib's Agg canvas directly, so the global matplotlib backend is not touched.

    Returns:
        The path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not rows:
        raise ValueError("plot_results needs at least one row")
    tasks: list[str] = []
    for per_task in rows.values():
        tasks += [task for task in per_task if task not in tasks]
    groups = [*tasks, "average"]
    methods = list(rows)
    width = 0.8 / len(methods)
    figure = Figure(figsize=(max(6.0, 1.1 * len(groups) * max(1, len(methods)) ** 0.5 + 2), 4.8))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for m, method in enumerate(methods):
        per_task = rows[method]
        values = primary_values(per_task, primary) if per_task else {}
        heights = [values.get(task, math.nan) for task in tasks]
        heights.append(sum(values.values()) / len(values) if values else math.nan)
        offsets = [g + (m - (len(methods) - 1) / 2) * width for g in range(len(groups))]
        axes.bar(offsets, heights, width=width, label=method)
    labels = [f"{task}\n({primary_metric(primary[task]) if task in primary else 'auto'})" for task in tasks]
    axes.set_xticks(range(len(groups)), [*labels, "average"], rotation=30, ha="right", fontsize=8)
    axes.set_ylabel("score (primary metric)")
    axes.set_xlabel("task")
    axes.set_title(title)
    axes.set_ylim(0, 1.05)
    axes.legend(title="method", fontsize=8)
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path
