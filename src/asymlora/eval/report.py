"""Summaries over tasks (average, std, worst, Δm%, per-metric means), the per-task table and a bar chart.

Δm% (docs/design.md §6, the paper's "balance" metric) compares a multi-task model with one
single-task model per task, on each task's primary metric::

    Δm = (1/T) Σ_t (M_single,t − M_multi,t) / M_single,t × 100

Lower is better; negative means the multi-task model beats the single-task models on average.

Tasks may be scored by different primary metrics (accuracy, exact match, ROUGE-Lsum, BLEU, …).
The average over such tasks is then labelled :data:`MIXED` and the per-metric means (average
over the tasks of each metric) are given alongside it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from asymlora.eval.metrics import primary_metric
from asymlora.eval.stats import format_interval, std
from asymlora.io import atomic_file

__all__ = [
    "MIXED",
    "average_label",
    "delta_m",
    "format_table",
    "markdown_table",
    "per_metric_means",
    "plot_results",
    "primary_values",
    "summarize",
]

logger = logging.getLogger(__name__)

MISSING = "–"
MIXED = "mean of mixed metrics"
"""Label of an average over tasks whose primary metrics differ."""
STD_DDOF = 0
"""The std over the tasks of one run is the population std (every task is in the population)."""


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


def average_label(metrics: Iterable[str]) -> str:
    """``"mean <metric>"`` when every task uses ``metric``, else :data:`MIXED`."""
    names = list(dict.fromkeys(metrics))
    return f"mean {names[0]}" if len(names) == 1 else MIXED


def per_metric_means(values: Mapping[str, float], names: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """``{metric: {"average": mean value, "tasks": [task, ...]}}`` over the tasks scored by each metric.

    Args:
        values: ``{task: primary metric value}``.
        names: ``{task: primary metric name}`` (same tasks).
    """
    groups: dict[str, list[str]] = {}
    for task in values:
        groups.setdefault(names[task], []).append(task)
    return {
        metric: {"average": sum(values[t] for t in tasks) / len(tasks), "tasks": tasks}
        for metric, tasks in groups.items()
    }


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
    *,
    metric_notes: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Average, population std (``std_ddof`` = 0) and worst task of the primary metric, per-metric means, Δm%.

    Args:
        per_task: ``{task: {metric: value}}`` (as returned by :func:`~asymlora.eval.evaluate_tasks`).
        primary: ``{task: primary metric name}``; a task left out gets ``accuracy`` or
            ``exact_match``, whichever it reports.
        baselines: ``{task: primary metric of the single-task model}``, or None.
        metric_notes: ``{task: why its primary metric is not the declared one}``
            (:func:`~asymlora.eval.metrics.metric_notes`); recorded and added to ``notes``.

    Returns:
        ``{"average": float, "average_of": "mean <metric>" | "mean of mixed metrics",
        "per_metric": {metric: {"average": float, "tasks": [str]}}, "std": float, "std_ddof": 0,
        "worst": {"task": str, "value": float}, "delta_m": float | None,
        "primary": {task: metric}, "metric_notes": {task: str}, "notes": [str]}``.

    Raises:
        ValueError: no task, or a task without its primary metric.
    """
    if not per_task:
        raise ValueError("summarize needs at least one task result")
    names = {task: _primary_of(task, metrics, primary) for task, metrics in per_task.items()}
    values = {task: float(per_task[task][name]) for task, name in names.items()}
    average = sum(values.values()) / len(values)
    worst_task = min(values, key=values.__getitem__)
    dm, notes = delta_m(values, baselines)
    declared = {task: note for task, note in (metric_notes or {}).items() if task in per_task}
    return {
        "average": average,
        "average_of": average_label(names.values()),
        "per_metric": per_metric_means(values, names),
        "std": std(list(values.values()), STD_DDOF),
        "std_ddof": STD_DDOF,
        "worst": {"task": worst_task, "value": values[worst_task]},
        "delta_m": dm,
        "primary": names,
        "metric_notes": declared,
        "notes": [*declared.values(), *notes],
    }


def _fmt(value: float | None, digits: int = 3) -> str:
    return MISSING if value is None else f"{value:.{digits}f}"


def column_metrics(
    rows: Mapping[str, Mapping[str, Mapping[str, float]]], primary: Mapping[str, str], tasks: Sequence[str]
) -> dict[str, str]:
    """``{task: the primary metric shown in its column}``: from ``primary``, else from the first row with it."""
    names: dict[str, str] = {}
    for task in tasks:
        if task in primary:
            names[task] = primary_metric(primary[task])
            continue
        found = next((per_task[task] for per_task in rows.values() if per_task.get(task)), None)
        names[task] = _primary_of(task, found, primary) if found else "auto"
    return names


def _with_interval(value: float | None, interval: Mapping[str, Any] | None, digits: int = 3) -> str:
    """The value, with ``[low, high]`` when ``interval`` is for that same value."""
    if value is None or not interval or not math.isclose(interval["value"], value, abs_tol=1e-9):
        return _fmt(value, digits)
    return format_interval(value, interval.get("low"), interval.get("high"), digits)


def _row_cells(
    per_task: Mapping[str, Mapping[str, float]],
    primary: Mapping[str, str],
    tasks: Sequence[str],
    baselines: Mapping[str, float] | None,
    intervals: Mapping[str, Any] | None = None,
) -> tuple[list[str], dict[str, Any] | None]:
    present = {task: per_task[task] for task in tasks if task in per_task}
    ivs = intervals or {}
    cells = []
    for task in tasks:
        metrics = per_task.get(task)
        value = metrics[_primary_of(task, metrics, primary)] if metrics else None
        cells.append(_with_interval(value, (ivs.get("per_task") or {}).get(task)))
    if not present:
        return [*cells, *[MISSING] * 4], None
    summary = summarize(present, primary, baselines)
    worst = summary["worst"]
    whole = len(present) == len(per_task)  # run intervals cover all of the run's tasks
    cells += [
        _with_interval(summary["average"], ivs.get("average") if whole else None),
        _fmt(summary["std"]),
        f"{_fmt(worst['value'])} ({worst['task']})",
        _with_interval(summary["delta_m"], ivs.get("delta_m") if whole else None, 1),
    ]
    return cells, summary


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """The lines of a markdown table: the first column left-aligned (names), the others right-aligned (numbers).

    Raises:
        ValueError: a row whose number of cells differs from the header's.
    """
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"a table row has {len(row)} cells for {len(header)} columns: {list(row)}")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _per_metric_table(
    summaries: Mapping[str, dict[str, Any] | None], metrics: Mapping[str, str]
) -> list[str]:
    """The per-metric averages, one column per metric (for tables whose tasks mix metrics)."""
    order = [metric for metric in dict.fromkeys(metrics.values()) if metric != "auto"]
    counts = {metric: sum(name == metric for name in metrics.values()) for metric in order}
    header = ["method", *(f"{m} ({counts[m]} task{'s' * (counts[m] > 1)})" for m in order)]
    rows = []
    for method, summary in summaries.items():
        means = (summary or {}).get("per_metric", {})
        rows.append([method, *(_fmt(means[m]["average"]) if m in means else MISSING for m in order)])
    return [
        "Per-metric averages (mean over the tasks scored by each metric):",
        "",
        *markdown_table(header, rows),
    ]


def format_table(
    rows: Mapping[str, Mapping[str, Mapping[str, float]]],
    primary: Mapping[str, str],
    tasks: Sequence[str],
    baselines: Mapping[str, float] | None = None,
    *,
    metric_notes: Mapping[str, str] | None = None,
    intervals: Mapping[str, Mapping[str, Any]] | None = None,
) -> str:
    """A markdown table: one row per method/run, one column per task, then average/std/worst/Δm%.

    Each task column is headed ``task (metric)``. When the tasks' primary metrics differ, the
    average column is headed ``mean of mixed metrics`` and a second table gives the per-metric
    averages.

    Args:
        rows: ``{method: {task: {metric: value}}}`` (e.g. ``"base"``, ``"lora"``, ``"alora"``).
        primary: ``{task: primary metric}`` (the metric shown in each task column).
        tasks: the task columns, in order; a method missing a task shows ``–`` there and its
            summary runs over the tasks it has.
        baselines: single-task primary metrics for the Δm% column (``–`` without them).
        metric_notes: ``{task: note}`` printed under the table (declared metrics not computed).
        intervals: ``{method: {"per_task": {task: interval}, "average": interval, "delta_m": interval}}``
            (:func:`asymlora.eval.stats.run_intervals`); a cell with one reads ``0.625 [0.470, 0.760]``.

    Returns:
        The table(s) and notes (markdown; readable as plain text).
    """
    if not rows:
        raise ValueError("format_table needs at least one row")
    metrics = column_metrics(rows, primary, tasks)
    label = average_label(m for m in metrics.values() if m != "auto")
    mixed = label == MIXED
    average = MIXED if mixed else f"average ({label.removeprefix('mean ')})"
    header = ["method", *(f"{task} ({metrics[task]})" for task in tasks), average, "std", "worst", "Δm%"]
    summaries: dict[str, dict[str, Any] | None] = {}
    cells: list[list[str]] = []
    for method, per_task in rows.items():
        ivs = (intervals or {}).get(method)
        row, summaries[method] = _row_cells(per_task, primary, tasks, baselines, ivs)
        cells.append([method, *row])
    lines = [*markdown_table(header, cells), ""]
    if mixed:
        lines += [*_per_metric_table(summaries, metrics), ""]
    lines.append(
        "Each task column shows the task's primary metric (fractions 0–1). average / std (population) / "
        "worst: over the tasks. Δm%: mean relative drop against the single-task baselines, in percent; "
        "lower is better."
    )
    if intervals:
        lines.append(
            "[low, high]: 95 % interval (Wilson for accuracy / exact match, bootstrap over examples "
            "otherwise; stratified bootstrap for the average and Δm%)."
        )
    lines += [f"Note: {note}" for task, note in (metric_notes or {}).items() if task in tasks]
    return "\n".join(lines)


def _plot_groups(
    rows: Mapping[str, Mapping[str, Mapping[str, float]]], primary: Mapping[str, str], tasks: list[str]
) -> tuple[list[str], dict[str, list[float]]]:
    """The bar groups (tasks, average, per-metric means when mixed) and each method's heights."""
    metrics = column_metrics(rows, primary, tasks)
    order = list(dict.fromkeys(metrics.values()))
    mixed = len(order) > 1
    labels = [f"{task}\n({metrics[task]})" for task in tasks]
    labels.append("mean of\nmixed metrics" if mixed else f"average\n({order[0]})")
    if mixed:
        labels += [f"mean\n{metric}" for metric in order]
    heights: dict[str, list[float]] = {}
    for method, per_task in rows.items():
        values = primary_values(per_task, primary) if per_task else {}
        bars = [values.get(task, math.nan) for task in tasks]
        bars.append(sum(values.values()) / len(values) if values else math.nan)
        if mixed:
            means = per_metric_means(values, {t: metrics[t] for t in values})
            bars += [means[m]["average"] if m in means else math.nan for m in order]
        heights[method] = bars
    return labels, heights


def _error_bars(
    heights: Sequence[float], tasks: Sequence[str], intervals: Mapping[str, Any] | None
) -> list[list[float]]:
    """matplotlib ``yerr`` (below, above) for the task bars and the overall average; 0 elsewhere."""
    ivs = intervals or {}
    bounds = [(ivs.get("per_task") or {}).get(task) for task in tasks] + [ivs.get("average")]
    bounds += [None] * (len(heights) - len(bounds))
    below, above = [], []
    for height, bound in zip(heights, bounds, strict=True):
        if bound and bound.get("low") is not None and math.isclose(bound["value"], height, abs_tol=1e-9):
            below.append(max(0.0, height - bound["low"]))
            above.append(max(0.0, bound["high"] - height))
        else:
            below.append(0.0)
            above.append(0.0)
    return [below, above]


def plot_results(
    rows: Mapping[str, Mapping[str, Mapping[str, float]]],
    primary: Mapping[str, str],
    path: str | Path,
    *,
    title: str = "Per-task results",
    intervals: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """Write a grouped bar chart (PNG): one group per task (and the averages), one bar per method.

    Each task's label names its primary metric; when they differ, the overall average is labelled
    "mean of mixed metrics" and one group per metric gives the per-metric means. ``intervals``
    (as in :func:`format_table`) draw 95 % error bars on the task and average bars that have one.
    Uses matplotlib's Agg canvas directly, so the global matplotlib backend is not touched.

    Returns:
        The path written.
    """
    # matplotlib is loaded only when a chart is drawn (a run that writes no figure never imports it)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not rows:
        raise ValueError("plot_results needs at least one row")
    tasks: list[str] = []
    for per_task in rows.values():
        tasks += [task for task in per_task if task not in tasks]
    labels, heights = _plot_groups(rows, primary, tasks)
    methods = list(rows)
    width = 0.8 / len(methods)
    figure = Figure(figsize=(max(6.0, 1.1 * len(labels) * max(1, len(methods)) ** 0.5 + 2), 4.8))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for m, method in enumerate(methods):
        offsets = [g + (m - (len(methods) - 1) / 2) * width for g in range(len(labels))]
        yerr = _error_bars(heights[method], tasks, (intervals or {}).get(method)) if intervals else None
        axes.bar(offsets, heights[method], width=width, label=method, yerr=yerr, capsize=2)
    axes.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    axes.set_ylabel("score (each task's primary metric)" + (", 95 % interval" if intervals else ""))
    axes.set_xlabel("task (primary metric)")
    axes.set_title(title)
    axes.set_ylim(0, 1.05)
    axes.legend(title="method", fontsize=8)
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    path = Path(path)
    # whole or not at all: a killed report (or two sweep workers writing it) leaves no half-written chart
    return atomic_file(path, lambda tmp: figure.savefig(tmp, dpi=120, format=path.suffix[1:] or "png"))
