"""Analysis toolkit: where does the knowledge of a LoRA adapter sit? (docs/design.md §5, arXiv 2509.25414 §3)

- `metrics`: pure tensor functions — subspace similarity φ and principal angles (A: row space, B: column
  space), the φ(i, j) grid, SVCCA similarity, DoRA-style magnitude/direction change, relative change and
  norms, singular spectra of concatenated experts.
- `factors`: read asymlora and plain peft LoRA adapters (or run directories) into per-module, per-expert
  (A_i, B_i) pairs.
- `report`: `analyze(paths, out_dir, labels, base_model)` pairs adapters and writes ``analysis.json``,
  ``summary.txt`` and PNG figures (what ``asymlora analyze`` runs).
- `figures`: the PNG figures of an analysis, `plot_traces(trace_path, out_png)` for a training trace.
- `traces`: `TraceRecorder(model, path).record(step)` for training-time traces.
- `router_stats`: `RouterStats(model)` hooks the soft/top-k routers: expert load, entropies, task × expert
  usage, collapse warnings; ``router.jsonl`` and its figures.
"""

from asymlora.analysis.factors import (
    AdapterFactors,
    check_compatible,
    find_adapter_dir,
    load_adapter,
    load_base_weights,
)
from asymlora.analysis.figures import plot_traces
from asymlora.analysis.metrics import (
    cca_similarity,
    compare_subspaces,
    frobenius_norm,
    magnitude_direction_change,
    numerical_rank,
    principal_angles,
    relative_change,
    singular_spectrum,
    subspace_basis,
    subspace_similarity,
    subspace_similarity_grid,
)
from asymlora.analysis.report import (
    Comparison,
    analyze,
    analyze_adapters,
    build_comparisons,
    format_summary,
)
from asymlora.analysis.router_stats import RouterStats, RoutingCollapseWarning, read_router_log
from asymlora.analysis.traces import TraceRecorder, read_traces, snapshot_a

__all__ = [
    "AdapterFactors",
    "Comparison",
    "RouterStats",
    "RoutingCollapseWarning",
    "TraceRecorder",
    "analyze",
    "analyze_adapters",
    "build_comparisons",
    "cca_similarity",
    "check_compatible",
    "compare_subspaces",
    "find_adapter_dir",
    "format_summary",
    "frobenius_norm",
    "load_adapter",
    "load_base_weights",
    "magnitude_direction_change",
    "numerical_rank",
    "plot_traces",
    "principal_angles",
    "read_router_log",
    "read_traces",
    "relative_change",
    "singular_spectrum",
    "snapshot_a",
    "subspace_basis",
    "subspace_similarity",
    "subspace_similarity_grid",
]
