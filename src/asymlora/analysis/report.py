"""Pair adapters, measure where they agree, and write ``analysis.json``, PNG figures and a summary.

`analyze` is what ``asymlora analyze PATH ...`` runs: it reads the adapters (`factors.load_adapter`), forms
the comparisons, and for every adapted module measures

- A similarity (row space) and B similarity (column space): φ at i = j = r (the smaller rank of the two),
  principal angles, the full φ(i, j) grid (LoRA paper Figure 3) and SVCCA similarity;
- singular-value spectra of the concatenated experts (per multi-expert adapter and per pairing kind);
- with a base model: DoRA-style magnitude/direction change ΔM, ΔD of every expert's W0 + s·B_i A_i.

Comparisons (``kind`` names the pairing in the summary and figures):

- across adapters: by default every pair of adapters (kind ``"across adapters"``); or exactly the
  ``pairs`` given as ``(label_a, label_b, kind)`` — e.g. kind ``"same seed, different tasks"`` for the
  paper's Figure 1. Two adapters with the same number of experts compare expert i with expert i; otherwise
  every expert of one with every expert of the other.
- inside one multi-expert adapter (``expert_pairs=True``): expert i vs expert j, kind
  ``"experts within <label>"``. A role whose tensor is shared by all experts (ALoRA's B, HydraLoRA's A) is
  identical across experts, so it is reported as ``null`` with ``shared_roles`` naming it.

Untrained (zero) B matrices have no column space: their similarities are ``null`` and a note says so.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from asymlora.analysis.factors import AdapterFactors, check_compatible, load_adapter, load_base_weights
from asymlora.analysis.metrics import (
    cca_similarity,
    compare_subspaces,
    magnitude_direction_change,
    singular_spectrum,
)
from asymlora.io import atomic_write_text

__all__ = [
    "ACROSS",
    "Comparison",
    "analyze",
    "analyze_adapters",
    "build_comparisons",
    "format_summary",
    "plot_traces",
]

ACROSS = "across adapters"
"""Default pairing kind of adapter-vs-adapter comparisons."""
ROLES = (("A", 0, "row"), ("B", 1, "col"))
"""(role, index in the (A_i, B_i) pair, side of the subspace)."""
JSON_NAME = "analysis.json"
SUMMARY_NAME = "summary.txt"


@dataclass(frozen=True)
class Comparison:
    """One comparison: expert ``left_expert`` of adapter ``left`` against expert ``right_expert`` of ``right``
    (adapter indexes into the analysed list)."""

    kind: str
    left: int
    left_expert: int
    right: int
    right_expert: int


# --- helpers -----------------------------------------------------------------------------------------------
def _layer_and_type(module: str) -> tuple[int | None, str]:
    """``model.layers.12.self_attn.q_proj`` -> (12, "q_proj")."""
    m = re.search(r"\.(\d+)\.", f".{module}.")
    return (int(m.group(1)) if m else None), module.rsplit(".", 1)[-1]


def module_order(module: str) -> tuple[Any, ...]:
    """Sort key putting module names in natural order: layer number, then module.

    ``model.layers.2.mlp.down_proj`` < ``model.layers.2.self_attn.q_proj`` < ``model.layers.10.self_attn.q_proj``
    (a plain string sort puts layer 10 before layer 2). Every digit run compares as a number.
    """
    parts = re.split(r"(\d+)", module)  # text at even positions, digit runs at odd positions
    return tuple(int(p) if n % 2 else p for n, p in enumerate(parts))


def in_layer_order(adapter: AdapterFactors) -> AdapterFactors:
    """A copy of ``adapter`` whose ``modules`` (and so every table and figure made from it) are in
    :func:`module_order`; safetensors files store their keys in string order."""
    order = sorted(adapter.modules, key=module_order)
    return dataclasses.replace(adapter, modules={m: adapter.modules[m] for m in order})


def _short(module: str) -> str:
    layer, kind = _layer_and_type(module)
    return f"{layer}.{kind}" if layer is not None else module


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower() or "pairing"


def _num(x: float | Tensor | None, digits: int = 6) -> float | None:
    if x is None:
        return None
    v = float(x)
    return None if math.isnan(v) or math.isinf(v) else float(f"{v:.{digits}g}")


def _nanmean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else None


def _nanstd(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if len(vals) < 2:
        return 0.0 if vals else None
    mu = sum(vals) / len(vals)
    return math.sqrt(sum((v - mu) ** 2 for v in vals) / (len(vals) - 1))


def _member_name(ad: AdapterFactors, expert: int) -> str:
    return f"{ad.label}[e{expert}]" if ad.num_experts > 1 else ad.label


def _unique_labels(adapters: Sequence[AdapterFactors]) -> None:
    seen: dict[str, int] = {}
    for ad in adapters:
        base = ad.label
        if base in seen:
            seen[base] += 1
            ad.label = f"{base}-{seen[base]}"
        else:
            seen[base] = 1


# --- pairing -----------------------------------------------------------------------------------------------------
def _expert_matches(a: AdapterFactors, b: AdapterFactors) -> list[tuple[int, int]]:
    if a.num_experts == b.num_experts:
        return [(i, i) for i in range(a.num_experts)]
    return [(i, j) for i in range(a.num_experts) for j in range(b.num_experts)]


def build_comparisons(
    adapters: Sequence[AdapterFactors],
    pairs: Sequence[tuple[str, str] | tuple[str, str, str]] | None = None,
    expert_pairs: bool = True,
) -> list[Comparison]:
    """The comparisons `analyze` makes (see the module docstring). ``pairs`` name adapters by label.

    Raises ``ValueError`` for unknown labels, an adapter paired with itself, or paired adapters that are not
    compatible (`factors.check_compatible`).
    """
    index = {ad.label: n for n, ad in enumerate(adapters)}
    if pairs is None:
        chosen = [(x, y, ACROSS) for x in range(len(adapters)) for y in range(x + 1, len(adapters))]
    else:
        chosen = []
        for p in pairs:
            if len(p) not in (2, 3):
                raise ValueError(f"a pair is (label_a, label_b) or (label_a, label_b, kind); got {p!r}")
            la, lb = p[0], p[1]
            kind = p[2] if len(p) == 3 else ACROSS
            for lab in (la, lb):
                if lab not in index:
                    raise ValueError(f"pair {p!r} names unknown adapter {lab!r}; labels are {sorted(index)}")
            if la == lb:
                raise ValueError(
                    f"pair {p!r} compares {la!r} with itself; experts inside one adapter are compared by "
                    "expert_pairs=True"
                )
            chosen.append((index[la], index[lb], str(kind)))
    out: list[Comparison] = []
    for x, y, kind in chosen:
        check_compatible(adapters[x], adapters[y])
        for i, j in _expert_matches(adapters[x], adapters[y]):
            out.append(Comparison(kind, x, i, y, j))
    if expert_pairs:
        for n, ad in enumerate(adapters):
            kind = f"experts within {ad.label}"
            for i in range(ad.num_experts):
                for j in range(i + 1, ad.num_experts):
                    out.append(Comparison(kind, n, i, n, j))
    return out


# --- measuring ---------------------------------------------------------------------------------------------------
def _compare(
    a: AdapterFactors, ea: int, b: AdapterFactors, eb: int, roles: Sequence[str], keep: float | int
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Tensor]], dict[str, int]]:
    """Per-module metrics of one comparison, batched over modules of equal shapes.

    Returns (per-module results, per-role per-module φ grids, per-role k used)."""
    modules = list(a.modules)
    per_module: dict[str, dict[str, Any]] = {m: {} for m in modules}
    grids: dict[str, dict[str, Tensor]] = {"A": {}, "B": {}}
    ks: dict[str, int] = {}
    for role, idx, side in ROLES:
        if role not in roles:
            continue
        groups: dict[tuple[tuple[int, ...], tuple[int, ...]], list[str]] = defaultdict(list)
        for m in modules:
            groups[(tuple(a.modules[m][ea][idx].shape), tuple(b.modules[m][eb][idx].shape))].append(m)
        for (shape_x, shape_y), ms in groups.items():
            xs = torch.stack([a.modules[m][ea][idx] for m in ms])
            ys = torch.stack([b.modules[m][eb][idx] for m in ms])
            k = min(min(shape_x), min(shape_y))
            ks[role] = min(ks.get(role, k), k)
            sub = compare_subspaces(xs, ys, side, k, k, strict=False)
            phi, grid = sub["similarity"], sub["grid"]
            angles = torch.rad2deg(sub["principal_angles"])
            cca = cca_similarity(xs, ys, side, keep, strict=False)
            for n, m in enumerate(ms):
                per_module[m][role] = {
                    "similarity": _num(phi[n]),
                    "cca": _num(cca[n]),
                    "principal_angles_deg": [_num(v, 5) for v in angles[n].tolist()],
                }
                grids[role][m] = grid[n]
    return per_module, grids, ks


def _mean_grids(grids: Sequence[Tensor]) -> Tensor | None:
    """Mean of φ grids, cropped to the smallest shape (NaN entries ignored)."""
    if not grids:
        return None
    rows = min(g.shape[0] for g in grids)
    cols = min(g.shape[1] for g in grids)
    stack = torch.stack([g[:rows, :cols] for g in grids])
    return stack.nanmean(0)


def _grid_json(grid: Tensor | None) -> list[list[float | None]] | None:
    return None if grid is None else [[_num(v, 4) for v in row] for row in grid.tolist()]


def _effective_rank(s: Tensor, energy: float = 0.9) -> int:
    """Smallest k with Σ_{a≤k} σ_a² ≥ energy · Σ σ² (0 for a zero matrix)."""
    e = s.square()
    total = float(e.sum())
    if total == 0:
        return 0
    return int(torch.searchsorted(e.cumsum(0) / total, torch.tensor(energy, dtype=e.dtype) - 1e-12)) + 1


def _spectrum_entry(
    name: str, scope: str, members: list[tuple[AdapterFactors, int]], modules: list[str]
) -> dict[str, Any]:
    """Spectra of the concatenated A's (rows) and B's (columns) of ``members``; a tensor shared by the experts
    of one adapter enters once."""
    entry: dict[str, Any] = {
        "name": name,
        "scope": scope,
        "members": [_member_name(ad, e) for ad, e in members],
    }
    for role, idx, side in ROLES:
        chosen: list[tuple[AdapterFactors, int]] = []  # a tensor shared by one adapter's experts enters once
        for ad, e in members:
            if not (ad.shared.get(role) and any(c[0] is ad for c in chosen)):
                chosen.append((ad, e))
        groups: dict[tuple[tuple[int, ...], ...], list[str]] = defaultdict(list)
        for m in modules:
            groups[tuple(tuple(ad.modules[m][e][idx].shape) for ad, e in chosen)].append(m)
        per_module: dict[str, list[float | None]] = {}
        normalized: list[Tensor] = []
        eff: list[int] = []
        for ms in groups.values():  # one batched SVD per group of equally shaped modules
            stacked = [torch.stack([ad.modules[m][e][idx] for m in ms]) for ad, e in chosen]
            spectra = singular_spectrum(stacked, side)
            for m, sv in zip(ms, spectra, strict=True):
                per_module[m] = [_num(v) for v in sv.tolist()]
                eff.append(_effective_rank(sv))
                if float(sv[0]) > 0:
                    normalized.append(sv / sv[0])
        entry[role] = {
            "matrices": len(chosen),
            "effective_rank_90_mean": _nanmean([float(v) for v in eff]),
            "mean_normalized": (
                [_num(v) for v in torch.stack(_crop(normalized)).mean(0).tolist()] if normalized else None
            ),
            "per_module": {m: per_module[m] for m in modules},
        }
    return entry


def _crop(vectors: list[Tensor]) -> list[Tensor]:
    n = min(v.shape[0] for v in vectors)
    return [v[:n] for v in vectors]


def _magnitude_direction(adapters: Sequence[AdapterFactors], base_model: Any) -> dict[str, dict[str, Any]]:
    modules = sorted({m for ad in adapters for m in ad.modules}, key=module_order)
    weights = load_base_weights(base_model, modules)
    out: dict[str, dict[str, Any]] = {}
    for ad in adapters:
        per_module: dict[str, dict[str, list[float | None]]] = {}
        dms: list[float] = []
        dds: list[float] = []
        for m in ad.modules:
            w0 = weights[m].to(torch.float64)
            if ad.fan_in_fan_out:
                w0 = w0.T
            if tuple(w0.shape) != ad.shapes[m]:
                raise ValueError(
                    f"base model weight of {m} is {tuple(w0.shape)} but adapter {ad.label!r} expects "
                    f"{ad.shapes[m]} (d_out, d_in): not the base model it was trained on"
                )
            deltas = torch.stack([ad.delta_weight(m, e) for e in range(ad.num_experts)])
            res = magnitude_direction_change(w0, deltas)
            per_module[m] = {
                "delta_M": [_num(v) for v in res["delta_M"].tolist()],
                "delta_D": [_num(v) for v in res["delta_D"].tolist()],
                "m0_mean": [_num(res["m0_mean"][0])],
            }
            dms.append(float(res["delta_M"].mean()))
            dds.append(float(res["delta_D"].mean()))
        out[ad.label] = {
            "mean": {"delta_M": _num(_nanmean(dms)), "delta_D": _num(_nanmean(dds))},
            "per_module": per_module,
        }
    return out


# --- figures ------------------------------------------------------------------------------------------------------
def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(fig: Any, out_dir: Path, name: str, figures: list[str]) -> None:
    fig.savefig(out_dir / name, dpi=110)
    figures.append(name)


def _plot_summary(summary: list[dict[str, Any]], out_dir: Path, figures: list[str]) -> None:
    import numpy as np

    fig = _figure(max(6.0, 1.6 * len(summary) + 3), 4.2)
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
    import numpy as np

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
        fig = _figure(min(24.0, 7 + 0.28 * len(modules)), min(30.0, 2.6 + 0.32 * len(rows)))
        ax = fig.subplots()
        im = ax.imshow(data, vmin=0, vmax=1, cmap="viridis", aspect="auto", interpolation="nearest")
        ax.set_xticks(range(len(modules)), [_short(m) for m in modules], rotation=90, fontsize=7)
        ax.set_yticks(range(len(rows)), [f"{r['name']}  ({r['kind']})" for r in rows], fontsize=7)
        ax.set_xlabel("adapted module (layer.module)")
        ax.set_ylabel("compared pair")
        space = "row space" if role == "A" else "column space"
        ax.set_title(f"{role} similarity per layer: φ(i = j = r) of the {space}")
        fig.colorbar(im, ax=ax, label="φ (0 orthogonal, 1 identical)")
        _save(fig, out_dir, f"similarity_layers_{role}.png", figures)


def _plot_matrix(
    records: list[dict[str, Any]], adapters: Sequence[AdapterFactors], out_dir: Path, figures: list[str]
) -> None:
    import numpy as np

    across = [r for r in records if r["left"]["adapter"] != r["right"]["adapter"]]
    labels = [ad.label for ad in adapters]
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
        fig = _figure(2.5 + 0.6 * len(used), 2.0 + 0.5 * len(used))
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
    kind_grids: dict[str, dict[str, dict[str, Tensor]]], out_dir: Path, figures: list[str]
) -> None:
    for kind, by_role in kind_grids.items():
        types = sorted({t for role in by_role.values() for t in role})
        if not types:
            continue
        fig = _figure(1.2 + 3.2 * len(types), 6.2)
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
        _save(fig, out_dir, f"grid_{_slug(kind)}.png", figures)


def _plot_spectra(spectra: list[dict[str, Any]], out_dir: Path, figures: list[str]) -> None:
    if not spectra:
        return
    fig = _figure(10, 4.2)
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
    fig = _figure(14, 4.2)
    ax_m, ax_d, ax_s = fig.subplots(1, 3)
    for label, res in magdir.items():
        by_type: dict[str, list[tuple[int, float, float]]] = defaultdict(list)
        for m, vals in res["per_module"].items():
            layer, t = _layer_and_type(m)
            dm = _nanmean(vals["delta_M"])
            dd = _nanmean(vals["delta_D"])
            if dm is None or dd is None:
                continue
            by_type[t].append((layer if layer is not None else len(by_type[t]), dm, dd))
        for t, pts in sorted(by_type.items()):
            pts.sort()
            xs = [p[0] for p in pts]
            ax_m.plot(xs, [p[1] for p in pts], marker="o", ms=3, label=f"{label} {t}")
            ax_d.plot(xs, [p[2] for p in pts], marker="o", ms=3, label=f"{label} {t}")
            ax_s.scatter([p[2] for p in pts], [p[1] for p in pts], s=12, label=f"{label} {t}")
    from matplotlib.ticker import MaxNLocator

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


def _remove_old_figures(out: Path) -> None:
    """Delete the figures listed by a previous analysis.json in ``out``, so none is left stale."""
    try:
        old = json.loads((out / JSON_NAME).read_text()).get("figures") or []
    except (OSError, ValueError, AttributeError):
        return
    for name in old:
        if isinstance(name, str) and "/" not in name and name.endswith(".png"):
            (out / name).unlink(missing_ok=True)


def _write_text(path: Path, text: str) -> None:
    """Atomic write, then the usual permissions (the temporary file is created owner-only)."""
    atomic_write_text(path, text)
    path.chmod(0o644)


# --- main entry points -----------------------------------------------------------------------------------------
def analyze_adapters(
    adapters: Sequence[AdapterFactors],
    out_dir: str | os.PathLike,
    base_model: str | os.PathLike | nn.Module | Mapping[str, Tensor] | None = None,
    *,
    pairs: Sequence[tuple[str, str] | tuple[str, str, str]] | None = None,
    expert_pairs: bool = True,
    cca_keep: float | int = 0.99,
    figures: bool = True,
    verbose: bool = False,
) -> dict[str, Any]:
    """`analyze` on adapters already loaded with `factors.load_adapter` (labels must be unique)."""
    if not adapters:
        raise ValueError("give at least one adapter to analyse")
    labels = [ad.label for ad in adapters]
    if len(set(labels)) != len(labels):
        raise ValueError(f"adapter labels must be unique, got {labels}")
    adapters = [in_layer_order(ad) for ad in adapters]
    comparisons = build_comparisons(adapters, pairs, expert_pairs)
    if not comparisons and base_model is None:
        raise ValueError(
            "nothing to compare: give at least two adapters, or one adapter with several experts (ALoRA, "
            "HydraLoRA, MoLoRA, MALoRA), or a base model for the magnitude/direction analysis"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _remove_old_figures(out)
    notes: list[str] = []

    records: list[dict[str, Any]] = []
    kind_grids: dict[str, dict[str, dict[str, list[Tensor]]]] = {}
    for c in comparisons:
        a, b = adapters[c.left], adapters[c.right]
        shared = [role for role, _, _ in ROLES if c.left == c.right and a.shared.get(role)]
        roles = [role for role, _, _ in ROLES if role not in shared]
        per_module, grids, ks = _compare(a, c.left_expert, b, c.right_expert, roles, cca_keep)
        for m in per_module:
            for role in shared:
                per_module[m][role] = {"similarity": None, "cca": None, "principal_angles_deg": None}
        by_type: dict[str, dict[str, list[Tensor]]] = {}
        for role in roles:
            for m, g in grids[role].items():
                by_type.setdefault(role, {}).setdefault(_layer_and_type(m)[1], []).append(g)
            kg = kind_grids.setdefault(c.kind, {}).setdefault(role, {})
            for t, gs in by_type.get(role, {}).items():
                kg.setdefault(t, []).append(_mean_grids(gs))
        for role in shared:
            kind_grids.setdefault(c.kind, {}).setdefault(role, {})
        mean = {
            role: {
                metric: _num(_nanmean([per_module[m][role][metric] for m in per_module]))
                for metric in ("similarity", "cca")
            }
            for role, _, _ in ROLES
        }
        records.append(
            {
                "kind": c.kind,
                "name": f"{_member_name(a, c.left_expert)} vs {_member_name(b, c.right_expert)}",
                "left": {"adapter": a.label, "expert": c.left_expert},
                "right": {"adapter": b.label, "expert": c.right_expert},
                "k": ks,
                "shared_roles": shared,
                "mean": mean,
                "grid": {
                    role: {t: _grid_json(_mean_grids(gs)) for t, gs in by_type.get(role, {}).items()}
                    for role in roles
                },
                "modules": per_module,
            }
        )

    # degenerate inputs worth a note
    for ad in adapters:
        for role, idx, _ in ROLES:
            zero = [m for m, ex in ad.modules.items() if any(float(p[idx].abs().max()) == 0 for p in ex)]
            if zero:
                notes.append(
                    f"{ad.label}: {role} is all zero in {len(zero)} of {len(ad.modules)} modules (untrained?); "
                    f"its {role} similarities are null there"
                )

    summary: list[dict[str, Any]] = []
    for kind in dict.fromkeys(r["kind"] for r in records):
        rs = [r for r in records if r["kind"] == kind]
        entry: dict[str, Any] = {"kind": kind, "comparisons": len(rs)}
        for role, _, _ in ROLES:
            stats: dict[str, Any] = {}
            for metric in ("similarity", "cca"):
                vals = [r["mean"][role][metric] for r in rs]
                stats[f"{metric}_mean"] = _num(_nanmean(vals))
                stats[f"{metric}_std"] = _num(_nanstd(vals))
            stats["shared"] = all(role in r["shared_roles"] for r in rs)
            entry[role] = stats
        summary.append(entry)

    # spectra: per multi-expert adapter, and per across-adapter pairing kind
    modules = list(adapters[0].modules)
    spectra: list[dict[str, Any]] = []
    for ad in adapters:
        if ad.num_experts > 1:
            spectra.append(
                _spectrum_entry(
                    ad.label,
                    "experts of one adapter",
                    [(ad, e) for e in range(ad.num_experts)],
                    list(ad.modules),
                )
            )
    for kind in dict.fromkeys(r["kind"] for r in records):
        rs = [c for c in comparisons if c.kind == kind and c.left != c.right]
        members = list(
            dict.fromkeys([(c.left, c.left_expert) for c in rs] + [(c.right, c.right_expert) for c in rs])
        )
        if members:
            spectra.append(
                _spectrum_entry(kind, "pairing kind", [(adapters[n], e) for n, e in members], modules)
            )

    magdir = _magnitude_direction(adapters, base_model) if base_model is not None else None

    result: dict[str, Any] = {
        "format": "asymlora-analysis/1",
        "out_dir": str(out),
        "settings": {
            "similarity": "phi(X, Y, i, j) = ||U_X^T U_Y||_F^2 / min(i, j) at i = j = k (smaller rank); "
            "A: row space, B: column space",
            "cca_keep": cca_keep,
            "expert_pairs": expert_pairs,
            "base_model": None
            if base_model is None
            else str(getattr(base_model, "name_or_path", base_model))[:300],
        },
        "adapters": [ad.metadata() for ad in adapters],
        "summary": summary,
        "comparisons": records,
        "spectra": spectra,
        "magnitude_direction": magdir,
        "notes": notes,
        "figures": [],
    }
    if figures:
        figs: list[str] = []
        all_modules = list(adapters[comparisons[0].left].modules) if comparisons else modules
        if records:
            _plot_summary(summary, out, figs)
            _plot_layers(records, all_modules, out, figs)
            _plot_matrix(records, adapters, out, figs)
            _plot_grids(
                {
                    k: {role: {t: _mean_grids(gs) for t, gs in d.items()} for role, d in v.items()}
                    for k, v in kind_grids.items()
                },
                out,
                figs,
            )
        _plot_spectra(spectra, out, figs)
        if magdir:
            _plot_magdir(magdir, out, figs)
        result["figures"] = figs
    text = format_summary(result)
    _write_text(out / JSON_NAME, json.dumps(result, indent=1, allow_nan=False))
    _write_text(out / SUMMARY_NAME, text + "\n")
    if verbose:
        print(text)
    return result


def analyze(
    paths: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    labels: Sequence[str] | None = None,
    base_model: str | os.PathLike | nn.Module | Mapping[str, Tensor] | None = None,
    *,
    pairs: Sequence[tuple[str, str] | tuple[str, str, str]] | None = None,
    expert_pairs: bool = True,
    cca_keep: float | int = 0.99,
    figures: bool = True,
    verbose: bool = False,
) -> dict[str, Any]:
    """Analyse adapters and write ``<out_dir>/analysis.json``, ``summary.txt`` and PNG figures.

    Args:
        paths: adapter directories or run directories holding one (asymlora or plain peft LoRA).
        out_dir: where to write (created if missing; existing files of the same names are replaced).
        labels: one name per path (default: the directory names, made unique).
        base_model: the base model (directory, loaded module or state dict) for the magnitude/direction
            analysis; None skips it.
        pairs: which adapters to compare, as ``(label_a, label_b[, kind])``; default every pair, kind
            ``"across adapters"``. ``kind`` groups comparisons in the summary and figures.
        expert_pairs: also compare the experts inside each multi-expert adapter.
        cca_keep: SVCCA variance fraction (float) or number of directions (int).
        figures: write the PNGs.
        verbose: print the summary table.

    Returns:
        the content of analysis.json: ``adapters`` (metadata), ``summary`` (per pairing kind: mean/std of A
        and B similarity and CCA), ``comparisons`` (per pair, per module: φ, CCA, principal angles, mean φ
        grids per module type), ``spectra``, ``magnitude_direction`` (or None), ``notes``, ``figures``;
        ``routing`` for adapters whose run directory holds a router.jsonl (`router_stats.analyze_routing`).

    Raises:
        ValueError: a path that is not an adapter, labels that do not fit, incompatible adapters paired
            (different base models, modules or layer shapes), NaN/Inf in a matrix, nothing to compare.
    """
    if not paths:
        raise ValueError("give at least one adapter path")
    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"got {len(labels)} labels for {len(paths)} paths; give one label per path or none")
    adapters = [load_adapter(p, None if labels is None else labels[n]) for n, p in enumerate(paths)]
    if labels is None:
        _unique_labels(adapters)
    result = analyze_adapters(
        adapters,
        out_dir,
        base_model,
        pairs=pairs,
        expert_pairs=expert_pairs,
        cca_keep=cca_keep,
        figures=figures,
        verbose=verbose,
    )
    return _add_routing(result, Path(out_dir), figures, verbose)


def _add_routing(result: dict[str, Any], out: Path, figures: bool, verbose: bool) -> dict[str, Any]:
    """Router diagnostics of analysed run directories holding a router.jsonl (`router_stats.analyze_routing`)."""
    from asymlora.analysis.router_stats import analyze_routing

    routing = analyze_routing(result["adapters"], out, figures=figures)
    if not routing["routing"]:
        return result
    result["routing"] = routing["routing"]
    result["figures"] += routing["figures"]
    result["notes"] += routing["notes"]
    _write_text(out / JSON_NAME, json.dumps(result, indent=1, allow_nan=False))
    _write_text(out / SUMMARY_NAME, format_summary(result) + "\n")
    if verbose:
        print("\n".join(f"note: {n}" for n in routing["notes"]))
    return result


def format_summary(result: Mapping[str, Any]) -> str:
    """A short table: per pairing kind, mean (± std) A similarity vs B similarity, and SVCCA."""

    def cell(stats: Mapping[str, Any], metric: str) -> str:
        if stats.get("shared"):
            return "shared"
        mu, sd = stats[f"{metric}_mean"], stats[f"{metric}_std"]
        return "n/a" if mu is None else f"{mu:.3f}±{(sd or 0):.3f}"

    lines = []
    summary = result.get("summary") or []
    if summary:
        width = max(len("pairing"), *(len(s["kind"]) for s in summary))
        lines.append(
            f"{'pairing':<{width}}  {'n':>3}  {'A φ':>13}  {'B φ':>13}  {'A CCA':>13}  {'B CCA':>13}"
        )
        for s in summary:
            lines.append(
                f"{s['kind']:<{width}}  {s['comparisons']:>3}  {cell(s['A'], 'similarity'):>13}  "
                f"{cell(s['B'], 'similarity'):>13}  {cell(s['A'], 'cca'):>13}  {cell(s['B'], 'cca'):>13}"
            )
        lines.append(
            "φ: subspace similarity at i = j = r (1 identical, 0 orthogonal); A row space, B column space."
        )
    magdir = result.get("magnitude_direction")
    if magdir:
        for label, res in magdir.items():
            lines.append(
                f"{label}: ΔM = {res['mean']['delta_M']}, ΔD = {res['mean']['delta_D']} (mean over modules)"
            )
    for note in result.get("notes") or []:
        lines.append(f"note: {note}")
    if result.get("out_dir"):
        lines.append(
            f"written to {result['out_dir']}/{JSON_NAME} (+ {len(result.get('figures') or [])} figures)"
        )
    return "\n".join(lines)


def plot_traces(trace_path: str | os.PathLike, out_png: str | os.PathLike) -> Path:
    """Plot a training trace written by `asymlora.analysis.traces.TraceRecorder`: mean ‖A − A_init‖/‖A_init‖,
    mean ‖B‖, ΔM and ΔD over steps, one line per module type. Returns the PNG path."""
    from asymlora.analysis.traces import read_traces

    rows = read_traces(trace_path)
    if not rows:
        raise ValueError(f"{trace_path} holds no trace records")
    series: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        by_type: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for layer in row["layers"]:
            t = _layer_and_type(layer["module"])[1]
            for key in ("A_rel_change", "B_norm", "delta_M", "delta_D"):
                v = layer.get(key)
                if v is not None:
                    by_type[t][key].append(v)
        for t, d in by_type.items():
            for key, vals in d.items():
                series[key][t].append((row["step"], sum(vals) / len(vals)))
    fig = _figure(11, 7)
    axes = fig.subplots(2, 2)
    titles = {
        "A_rel_change": ("‖A − A_init‖ / ‖A_init‖", "A: relative change from its initialisation"),
        "B_norm": ("‖B‖_F", "B: norm (starts at 0)"),
        "delta_M": ("ΔM", "Magnitude change of W0 + ΔW"),
        "delta_D": ("ΔD", "Direction change of W0 + ΔW"),
    }
    for ax, key in zip(axes.flat, titles, strict=True):
        for t, pts in sorted(series[key].items()):
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=2, label=t)
        ax.set(xlabel="training step", ylabel=titles[key][0], title=titles[key][1])
        ax.grid(alpha=0.3)
        if series[key]:
            ax.legend(fontsize=7, title="mean over layers", title_fontsize=7)
    fig.suptitle(f"Training trace: {Path(trace_path).name}")
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out
