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
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from asymlora.analysis.factors import AdapterFactors, check_compatible, load_adapter, load_base_weights
from asymlora.analysis.figures import plot_traces, write_analysis_figures
from asymlora.analysis.metrics import (
    Side,
    cca_similarity,
    compare_subspaces,
    magnitude_direction_change,
    singular_spectrum,
)
from asymlora.analysis.names import layer_and_type, module_order
from asymlora.analysis.router_stats import analyze_routing
from asymlora.eval.stats import nan_mean, std
from asymlora.io import atomic_write_text, check_out_dir

__all__ = [
    "ACROSS",
    "Comparison",
    "analyze",
    "analyze_adapters",
    "build_comparisons",
    "format_summary",
    "module_order",
    "plot_traces",
]

ACROSS = "across adapters"
"""Default pairing kind of adapter-vs-adapter comparisons."""
ROLES: tuple[tuple[str, int, Side], ...] = (("A", 0, "row"), ("B", 1, "col"))
"""(role, index in the (A_i, B_i) pair, side of the subspace)."""
JSON_NAME = "analysis.json"
FORMAT = "asymlora-analysis/1"
SUMMARY_NAME = "summary.txt"
STD_DDOF = 1
"""The summary's std over the comparisons of one pairing kind is the sample std (stated in analysis.json)."""


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
def in_layer_order(adapter: AdapterFactors) -> AdapterFactors:
    """A copy of ``adapter`` whose ``modules`` (and so every table and figure made from it) are in
    :func:`~asymlora.analysis.names.module_order`; safetensors files store their keys in string order."""
    order = sorted(adapter.modules, key=module_order)
    return dataclasses.replace(adapter, modules={m: adapter.modules[m] for m in order})


def _num(x: float | Tensor | None, digits: int = 6) -> float | None:
    if x is None:
        return None
    v = float(x)
    return None if math.isnan(v) or math.isinf(v) else float(f"{v:.{digits}g}")


def _nanstd(values: Sequence[float | None]) -> float | None:
    """Sample std (`STD_DDOF`) of the values that are not None or NaN; 0 for one value, None for none."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if len(vals) < 2:
        return 0.0 if vals else None
    return std(vals, STD_DDOF)


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


def _mean_grids(grids: Sequence[Tensor]) -> Tensor:
    """Mean of (at least one) φ grids, cropped to the smallest shape (NaN entries ignored)."""
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
            "effective_rank_90_mean": nan_mean([float(v) for v in eff]),
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
            "mean": {"delta_M": _num(nan_mean(dms)), "delta_D": _num(nan_mean(dds))},
            "per_module": per_module,
        }
    return out


# --- figures ------------------------------------------------------------------------------------------------------
def _remove_old_figures(out: Path) -> None:
    """Delete the figures listed by a previous analysis.json in ``out``, so none is left stale."""
    try:
        previous = json.loads((out / JSON_NAME).read_text())
    except (OSError, ValueError):
        return
    if not isinstance(previous, dict) or previous.get("format") != FORMAT:  # not ours: its files neither
        return
    old = previous.get("figures") or []
    for name in old:
        if isinstance(name, str) and "/" not in name and name.endswith(".png"):
            (out / name).unlink(missing_ok=True)


def _write_text(path: Path, text: str) -> None:
    """Atomic write, then the usual permissions (the temporary file is created owner-only)."""
    atomic_write_text(path, text)
    path.chmod(0o644)


# --- main entry points -----------------------------------------------------------------------------------------
KindGrids = dict[str, dict[str, dict[str, list[Tensor]]]]
"""``{pairing kind: {role: {module type: [mean φ grid of one comparison, ...]}}}``."""


def _checked_comparisons(
    adapters: Sequence[AdapterFactors],
    pairs: Sequence[tuple[str, str] | tuple[str, str, str]] | None,
    expert_pairs: bool,
    base_model: object,
) -> list[Comparison]:
    """`build_comparisons`, after checking there is something to analyse and the labels are unique."""
    if not adapters:
        raise ValueError("give at least one adapter to analyse")
    labels = [ad.label for ad in adapters]
    if len(set(labels)) != len(labels):
        raise ValueError(f"adapter labels must be unique, got {labels}")
    comparisons = build_comparisons(adapters, pairs, expert_pairs)
    if not comparisons and base_model is None:
        raise ValueError(
            "nothing to compare: give at least two adapters, or one adapter with several experts (ALoRA, "
            "HydraLoRA, MoLoRA, MALoRA), or a base model for the magnitude/direction analysis"
        )
    return comparisons


def _measure(
    c: Comparison, adapters: Sequence[AdapterFactors], cca_keep: float | int, kind_grids: KindGrids
) -> dict[str, Any]:
    """The record of one comparison (analysis.json ``comparisons``); its mean grids go into ``kind_grids``."""
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
            by_type.setdefault(role, {}).setdefault(layer_and_type(m)[1], []).append(g)
        kg = kind_grids.setdefault(c.kind, {}).setdefault(role, {})
        for t, gs in by_type.get(role, {}).items():
            kg.setdefault(t, []).append(_mean_grids(gs))
    for role in shared:
        kind_grids.setdefault(c.kind, {}).setdefault(role, {})
    mean = {
        role: {
            metric: _num(nan_mean([per_module[m][role][metric] for m in per_module]))
            for metric in ("similarity", "cca")
        }
        for role, _, _ in ROLES
    }
    return {
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


def _zero_notes(adapters: Sequence[AdapterFactors]) -> list[str]:
    """A note per adapter and role with all-zero matrices (untrained B: no column space, null similarity)."""
    notes = []
    for ad in adapters:
        for role, idx, _ in ROLES:
            zero = [m for m, ex in ad.modules.items() if any(float(p[idx].abs().max()) == 0 for p in ex)]
            if zero:
                notes.append(
                    f"{ad.label}: {role} is all zero in {len(zero)} of {len(ad.modules)} modules (untrained?); "
                    f"its {role} similarities are null there"
                )
    return notes


def _kind_summary(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per pairing kind: mean and sample std over its comparisons of each role's mean φ and CCA."""
    summary: list[dict[str, Any]] = []
    for kind in dict.fromkeys(r["kind"] for r in records):
        rs = [r for r in records if r["kind"] == kind]
        entry: dict[str, Any] = {"kind": kind, "comparisons": len(rs)}
        for role, _, _ in ROLES:
            stats: dict[str, Any] = {}
            for metric in ("similarity", "cca"):
                vals = [r["mean"][role][metric] for r in rs]
                stats[f"{metric}_mean"] = _num(nan_mean(vals))
                stats[f"{metric}_std"] = _num(_nanstd(vals))
            stats["shared"] = all(role in r["shared_roles"] for r in rs)
            entry[role] = stats
        summary.append(entry)
    return summary


def _spectra(
    adapters: Sequence[AdapterFactors], comparisons: Sequence[Comparison], modules: list[str]
) -> list[dict[str, Any]]:
    """Spectra per multi-expert adapter, then per pairing kind across adapters (`_spectrum_entry`)."""
    spectra = [
        _spectrum_entry(
            ad.label, "experts of one adapter", [(ad, e) for e in range(ad.num_experts)], list(ad.modules)
        )
        for ad in adapters
        if ad.num_experts > 1
    ]
    for kind in dict.fromkeys(c.kind for c in comparisons):
        across = [c for c in comparisons if c.kind == kind and c.left != c.right]
        lefts = [(c.left, c.left_expert) for c in across]
        members = list(dict.fromkeys(lefts + [(c.right, c.right_expert) for c in across]))
        if members:
            spectra.append(
                _spectrum_entry(kind, "pairing kind", [(adapters[n], e) for n, e in members], modules)
            )
    return spectra


def _settings(cca_keep: float | int, expert_pairs: bool, base_model: object) -> dict[str, Any]:
    return {
        "similarity": "phi(X, Y, i, j) = ||U_X^T U_Y||_F^2 / min(i, j) at i = j = k (smaller rank); "
        "A: row space, B: column space",
        "summary_std": f"sample std over the comparisons of a pairing kind (ddof={STD_DDOF})",
        "cca_keep": cca_keep,
        "expert_pairs": expert_pairs,
        "base_model": None
        if base_model is None
        else str(getattr(base_model, "name_or_path", base_model))[:300],
    }


def _write_result(out: Path, result: Mapping[str, Any], verbose: bool) -> None:
    """analysis.json and summary.txt (atomic, 0644); the summary printed when ``verbose``."""
    text = format_summary(result)
    _write_text(out / JSON_NAME, json.dumps(result, indent=1, allow_nan=False))
    _write_text(out / SUMMARY_NAME, text + "\n")
    if verbose:
        print(text)


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
    out = check_out_dir(out_dir)
    adapters = [in_layer_order(ad) for ad in adapters]
    comparisons = _checked_comparisons(adapters, pairs, expert_pairs, base_model)
    # the base model first: a bad one must fail before a previous analysis in out_dir loses its figures
    magnitude_direction = _magnitude_direction(adapters, base_model) if base_model is not None else None
    kind_grids: KindGrids = {}
    records = [_measure(c, adapters, cca_keep, kind_grids) for c in comparisons]
    modules = list(adapters[0].modules)
    result: dict[str, Any] = {
        "format": FORMAT,
        "out_dir": str(out),
        "settings": _settings(cca_keep, expert_pairs, base_model),
        "adapters": [ad.metadata() for ad in adapters],
        "summary": _kind_summary(records),
        "comparisons": records,
        "spectra": _spectra(adapters, comparisons, modules),
        "magnitude_direction": magnitude_direction,
        "notes": _zero_notes(adapters),
        "figures": [],
    }
    out.mkdir(parents=True, exist_ok=True)
    _remove_old_figures(out)
    if figures:
        mean_grids = {
            kind: {role: {t: _mean_grids(gs) for t, gs in d.items()} for role, d in by_role.items()}
            for kind, by_role in kind_grids.items()
        }
        layer_modules = list(adapters[comparisons[0].left].modules) if comparisons else modules
        result["figures"] = write_analysis_figures(result, mean_grids, layer_modules, out)
    _write_result(out, result, verbose)
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
