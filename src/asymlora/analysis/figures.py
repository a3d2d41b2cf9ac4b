"""The figures of an analysis (``asymlora analyze``) and of a training trace, as PNG files.

Every function draws on its own matplotlib ``Figure`` (the global pyplot state and backend are not touched).
matplotlib is imported when the first figure is made: ``import asymlora.analysis`` stays free of it, and an
analysis with ``figures=False`` never loads it.

- `write_analysis_figures`: the figures of one ``analysis.json`` (summary bars, per-layer similarity, the
  adapter × adapter matrix, φ(i, j) grids per pairing kind, spectra, magnitude/direction change);
- `plot_traces`: a ``traces.jsonl`` written by `asymlora.analysis.traces.TraceRecorder`;
- `new_figure`: the figure every plot starts from, `save_figure`: its atomic write (both also used by
  `asymlora.analysis.router_stats`).
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from asymlora.analysis.names import layer_and_type, short_name, slug
from asymlora.analysis.traces import read_traces
from asymlora.eval.stats import nan_mean
from asymlora.io import atomic_file

__all__ = ["new_figure", "plot_traces", "save_figure", "write_analysis_figures"]


def new_figure(width: float, height: float) -> Any:
    """A ``matplotlib.figure.Figure`` of ``width`` × ``height`` inches with the constrained layout."""
    from matplotlib.figure import Figure  # optional at import time: only figure-making calls load matplotlib

    return Figure(figsize=(width, height), layout="constrained")


def save_figure(fig: Any, path: str | os.PathLike) -> Path:
    """Write ``fig`` to ``path`` (format from its suffix, PNG without one) whole or not at all: a temporary
    file, then one rename, so an interrupted run leaves no half-written image over a previous one."""
    path = Path(path)
    return atomic_file(path, lambda tmp: fig.savefig(tmp, dpi=110, format=path.suffix[1:] or "png"))


def _save(fig: Any, out_dir: Path, name: str, figures: list[str]) -> None:
    save_figure(fig, out_dir / name)
    figures.append(name)


def _plot_summary(summary: list[dict[str, Any]], out_dir: Path, figures: list[str]) -> None:
    fig = new_figure(max(6.0, 1.6 * len(summary) + 3), 4.2)
    axes = fig.subplots(1, 2)
    x = np.arange(len(summary))
    for ax, metric, title in (
        (axes[0], "similarity", "Subspace similarity φ(i = j = r)"),
        (axes[1], "cca", "SVCCA similarity"),
    ):
        for off, role, color in ((-0.2, "A", "tab:blue"), (0.2, "B", "tab:orange")):
            means = [s[role][f"{metric}_mean"] for s in summary]
            stds = [s[role][f"{metric}_std"] for s in summary]
            ax.bar(
                x + off,
                [np.nan if v is None else v for v in means],
                0.4,
                yerr=[0 if v is None else v for v in stds],
                color=color,
                label=f"{role} ({'row' if role == 'A' else 'column'} space)",
                capsize=3,
            )
        ax.set_xticks(x, [s["kind"] for s in summary], rotation=20, ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("mean over modules and pairs")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.suptitle("Where do adapters agree? A vs B similarity per pairing")
    _save(fig, out_dir, "summary.png", figures)


def _plot_layers(
    records: list[dict[str, Any]], modules: list[str], out_dir: Path, figures: list[str]
) -> None:
    for role in ("A", "B"):
        rows = [
            r
            for r in records
            if role not in r["shared_roles"]
            and any(r["modules"][m][role]["similarity"] is not None for m in modules)
        ]
        if not rows:
            continue
        data = np.array(
            [
                [np.nan if (v := r["modules"][m][role]["similarity"]) is None else v for m in modules]
                for r in rows
            ]
        )
        fig = new_figure(min(24.0, 7 + 0.28 * len(modules)), min(30.0, 2.6 + 0.32 * len(rows)))
        ax = fig.subplots()
        im = ax.imshow(data, vmin=0, vmax=1, cmap="viridis", aspect="auto", interpolation="nearest")
        ax.set_xticks(range(len(modules)), [short_name(m) for m in modules], rotation=90, fontsize=7)
        ax.set_yticks(range(len(rows)), [f"{r['name']}  ({r['kind']})" for r in rows], fontsize=7)
        ax.set_xlabel("adapted module (layer.module)")
        ax.set_ylabel("compared pair")
        space = "row space" if role == "A" else "column space"
        ax.set_title(f"{role} similarity per layer: φ(i = j = r) of the {space}")
        fig.colorbar(im, ax=ax, label="φ (0 orthogonal, 1 identical)")
        _save(fig, out_dir, f"similarity_layers_{role}.png", figures)


def _plot_matrix(
    records: list[dict[str, Any]], labels: Sequence[str], out_dir: Path, figures: list[str]
) -> None:
    """Mean φ of every adapter pair (one matrix per role), adapters in the order of ``labels``."""
    across = [r for r in records if r["left"]["adapter"] != r["right"]["adapter"]]
    used = sorted(
        {r["left"]["adapter"] for r in across} | {r["right"]["adapter"] for r in across}, key=labels.index
    )
    if len(used) < 2:
        return
    pos = {lab: n for n, lab in enumerate(used)}
    for role in ("A", "B"):
        acc: dict[tuple[int, int], list[float]] = defaultdict(list)
        for r in across:
            v = r["mean"][role]["similarity"]
            if v is not None:
                x, y = pos[r["left"]["adapter"]], pos[r["right"]["adapter"]]
                acc[(x, y)].append(v)
                acc[(y, x)].append(v)
        if not acc:
            continue
        data = np.full((len(used), len(used)), np.nan)
        for (x, y), vals in acc.items():
            data[x, y] = sum(vals) / len(vals)
        fig = new_figure(2.5 + 0.6 * len(used), 2.0 + 0.5 * len(used))
        ax = fig.subplots()
        im = ax.imshow(data, vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
        ax.set_xticks(range(len(used)), used, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(used)), used, fontsize=8)
        if len(used) <= 12:
            for (x, y), _ in acc.items():
                ax.text(
                    y,
                    x,
                    f"{data[x, y]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="k" if data[x, y] > 0.6 else "w",
                )
        ax.set_xlabel("adapter")
        ax.set_ylabel("adapter")
        ax.set_title(f"{role} similarity between adapters (mean φ over modules)")
        fig.colorbar(im, ax=ax, label="φ")
        _save(fig, out_dir, f"similarity_matrix_{role}.png", figures)


def _plot_grids(
    kind_grids: Mapping[str, Mapping[str, Mapping[str, Tensor]]], out_dir: Path, figures: list[str]
) -> None:
    """One figure per pairing kind: the mean φ(i, j) grid of A (top row) and B (bottom row) per module type."""
    for kind, by_role in kind_grids.items():
        types = sorted({t for role in by_role.values() for t in role})
        if not types:
            continue
        fig = new_figure(1.2 + 3.2 * len(types), 6.2)
        axes = fig.subplots(2, len(types), squeeze=False)
        im = None
        for row, role in enumerate(("A", "B")):
            for col, t in enumerate(types):
                ax = axes[row][col]
                grid = by_role.get(role, {}).get(t)
                if grid is not None and bool(torch.isnan(grid).all()):
                    ax.set_axis_off()
                    ax.set_title(f"{role}, {t}: no data (zero matrices?)", fontsize=8)
                    continue
                if grid is None:
                    ax.set_axis_off()
                    ax.set_title(
                        f"{role}, {t}: shared by experts" if role in by_role else f"{role}, {t}: —",
                        fontsize=8,
                    )
                    continue
                n_i, n_j = grid.shape
                im = ax.imshow(
                    grid.numpy(),
                    vmin=0,
                    vmax=1,
                    cmap="viridis",
                    origin="lower",
                    extent=(0.5, n_j + 0.5, 0.5, n_i + 0.5),
                    interpolation="nearest",
                    aspect="auto",
                )
                ax.set_xlabel("j (top-j directions, right)")
                ax.set_ylabel("i (top-i directions, left)")
                ax.set_title(f"{role} ({'row' if role == 'A' else 'column'} space), {t}", fontsize=9)
        if im is not None:
            fig.colorbar(im, ax=axes, label="φ(i, j), mean over layers and pairs")
        fig.suptitle(f"Subspace similarity grid — {kind}")
        _save(fig, out_dir, f"grid_{slug(kind)}.png", figures)


def _plot_spectra(spectra: list[dict[str, Any]], out_dir: Path, figures: list[str]) -> None:
    if not spectra:
        return
    fig = new_figure(10, 4.2)
    axes = fig.subplots(1, 2)
    for ax, role in zip(axes, ("A", "B"), strict=True):
        for entry in spectra:
            vals = entry[role]["mean_normalized"]
            if not vals:
                continue
            ys = [v if v and v > 0 else math.nan for v in vals]  # zeros would break the log axis
            ax.plot(
                range(1, len(ys) + 1),
                ys,
                marker="o",
                ms=3,
                label=f"{entry['name']} ({len(entry['members'])})",
            )
        ax.set_yscale("log")
        ax.set_xlabel("singular value index k")
        ax.set_ylabel("σ_k / σ_1 (mean over modules)")
        how = "stacked along rows" if role == "A" else "side by side (columns)"
        ax.set_title(f"Spectrum of concatenated {role} matrices ({how})", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, out_dir, "spectra.png", figures)


def _plot_magdir(magdir: dict[str, dict[str, Any]], out_dir: Path, figures: list[str]) -> None:
    fig = new_figure(14, 4.2)
    ax_m, ax_d, ax_s = fig.subplots(1, 3)
    for label, res in magdir.items():
        by_type: dict[str, list[tuple[int, float, float]]] = defaultdict(list)
        for m, vals in res["per_module"].items():
            layer, t = layer_and_type(m)
            dm = nan_mean(vals["delta_M"])
            dd = nan_mean(vals["delta_D"])
            if dm is None or dd is None:
                continue
            by_type[t].append((layer if layer is not None else len(by_type[t]), dm, dd))
        for t, pts in sorted(by_type.items()):
            pts.sort()
            xs = [p[0] for p in pts]
            ax_m.plot(xs, [p[1] for p in pts], marker="o", ms=3, label=f"{label} {t}")
            ax_d.plot(xs, [p[2] for p in pts], marker="o", ms=3, label=f"{label} {t}")
            ax_s.scatter([p[2] for p in pts], [p[1] for p in pts], s=12, label=f"{label} {t}")
    from matplotlib.ticker import MaxNLocator  # optional at import time (see new_figure)

    ax_m.set(xlabel="layer", ylabel="ΔM = mean |m − m0|", title="Magnitude change per layer")
    ax_d.set(xlabel="layer", ylabel="ΔD = mean (1 − cos)", title="Direction change per layer")
    ax_s.set(xlabel="ΔD", ylabel="ΔM", title="ΔM vs ΔD (one point per module)")
    for ax in (ax_m, ax_d):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (ax_m, ax_d, ax_s):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("DoRA-style magnitude and direction change of W0 + s·B_i A_i (mean over experts)")
    _save(fig, out_dir, "magnitude_direction.png", figures)


def write_analysis_figures(
    result: Mapping[str, Any],
    kind_grids: Mapping[str, Mapping[str, Mapping[str, Tensor]]],
    modules: list[str],
    out_dir: Path,
) -> list[str]:
    """Draw the figures of an analysis into ``out_dir``; returns the PNG file names written.

    Args:
        result: the content of analysis.json (``summary``, ``comparisons``, ``adapters``, ``spectra``,
            ``magnitude_direction``).
        kind_grids: ``{pairing kind: {role: {module type: mean φ(i, j) grid (i, j)}}}``; a role with no
            module type is shared by the experts.
        modules: the module names of the per-layer figure, in order.
    """
    figures: list[str] = []
    records = result["comparisons"]
    if records:
        _plot_summary(result["summary"], out_dir, figures)
        _plot_layers(records, modules, out_dir, figures)
        _plot_matrix(records, [ad["label"] for ad in result["adapters"]], out_dir, figures)
        _plot_grids(kind_grids, out_dir, figures)
    _plot_spectra(result["spectra"], out_dir, figures)
    if result["magnitude_direction"]:
        _plot_magdir(result["magnitude_direction"], out_dir, figures)
    return figures


TRACE_KEYS = {
    "A_rel_change": ("‖A − A_init‖ / ‖A_init‖", "A: relative change from its initialisation"),
    "B_norm": ("‖B‖_F", "B: norm (starts at 0)"),
    "delta_M": ("ΔM", "Magnitude change of W0 + ΔW"),
    "delta_D": ("ΔD", "Direction change of W0 + ΔW"),
}
"""Per-layer trace values drawn by `plot_traces`: (y label, panel title)."""


def _trace_series(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """``{trace key: {module type: [(step, mean over the layers of that type), ...]}}``."""
    series: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        by_type: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for layer in row["layers"]:
            t = layer_and_type(layer["module"])[1]
            for key in TRACE_KEYS:
                v = layer.get(key)
                if v is not None:
                    by_type[t][key].append(v)
        for t, d in by_type.items():
            for key, vals in d.items():
                series[key][t].append((row["step"], sum(vals) / len(vals)))
    return series


def plot_traces(trace_path: str | os.PathLike, out_png: str | os.PathLike) -> Path:
    """Plot a training trace written by `asymlora.analysis.traces.TraceRecorder`: mean ‖A − A_init‖/‖A_init‖,
    mean ‖B‖, ΔM and ΔD over steps, one line per module type. Returns the PNG path.

    Raises:
        ValueError: the file holds no record.
    """
    rows = read_traces(trace_path)
    if not rows:
        raise ValueError(f"{trace_path} holds no trace records")
    series = _trace_series(rows)
    fig = new_figure(11, 7)
    axes = fig.subplots(2, 2)
    for ax, key in zip(axes.flat, TRACE_KEYS, strict=True):
        for t, pts in sorted(series[key].items()):
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=2, label=t)
        ax.set(xlabel="training step", ylabel=TRACE_KEYS[key][0], title=TRACE_KEYS[key][1])
        ax.grid(alpha=0.3)
        if series[key]:
            ax.legend(fontsize=7, title="mean over layers", title_fontsize=7)
    fig.suptitle(f"Training trace: {Path(trace_path).name}")
    return save_figure(fig, out_png)
