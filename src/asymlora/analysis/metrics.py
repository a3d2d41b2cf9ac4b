"""Pure tensor metrics behind the paper's evidence (docs/design.md §5).

Every function takes torch tensors (any float dtype, any device), computes in float64 on the tensors'
device, and returns float64 tensors. Matrices may carry leading batch axes (typically one per layer):
``X`` of shape ``(..., m, n)``; results then have the same leading axes.

Conventions:

- ``side="row"`` is for A-side matrices (``A``: r × d_in): the subspace is the **row space** ⊂ R^{d_in},
  spanned by the right singular vectors (rows of ``Vᴴ`` in ``X = U Σ Vᴴ``).
- ``side="col"`` is for B-side matrices (``B``: d_out × r): the subspace is the **column space** ⊂ R^{d_out},
  spanned by the left singular vectors (columns of ``U``).

The row space of ``X`` is unchanged by ``X → Q X`` for any invertible r × r Q (LoRA's factors are only
defined up to it: B A = (B Q⁻¹)(Q A)) and by scaling, so similarities at full rank (i = rank X) are too;
an orthogonal Q also keeps each top-i subspace. The column space is likewise unchanged by ``X → X Q``.
A joint rotation of the ambient space (``X → X R`` and ``Y → Y R`` for row spaces, ``R`` orthogonal)
leaves every similarity unchanged.

Bad input raises ``ValueError``: a NaN or Inf entry (naming the matrix), a requested number of directions
larger than a matrix's numerical rank, or shapes that do not fit together.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

Side = Literal["row", "col"]

__all__ = [
    "Side",
    "cca_similarity",
    "compare_subspaces",
    "frobenius_norm",
    "magnitude_direction_change",
    "numerical_rank",
    "principal_angles",
    "relative_change",
    "singular_spectrum",
    "subspace_basis",
    "subspace_similarity",
    "subspace_similarity_grid",
]


# --- validation helpers --------------------------------------------------------------------------------
def _as_f64(x: Tensor, name: str, min_dim: int = 2) -> Tensor:
    """Check type, dimensions and finiteness; return a float64 copy/view on the same device."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < min_dim:
        raise ValueError(
            f"{name} must have at least {min_dim} dimensions (..., m, n); got shape {tuple(x.shape)}"
        )
    if x.is_complex():
        raise ValueError(f"{name} is complex; only real matrices are supported")
    y = x.detach().to(torch.float64)
    finite = torch.isfinite(y)
    if not bool(finite.all()):
        n_nan = int(torch.isnan(y).sum())
        n_inf = int(torch.isinf(y).sum())
        raise ValueError(
            f"{name} contains non-finite values ({n_nan} NaN, {n_inf} Inf of {y.numel()} entries, shape "
            f"{tuple(y.shape)}); check the adapter or the training run that produced it (diverged loss?)."
        )
    return y


def _check_side(side: str) -> Side:
    if side not in ("row", "col"):
        raise ValueError(
            f"side must be 'row' (A matrices: row space) or 'col' (B matrices: column space), got {side!r}"
        )
    return side  # type: ignore[return-value]


def _default_rtol(x: Tensor) -> float:
    """Relative singular-value threshold for the numerical rank: max(m, n) · eps of the input's precision
    (float32 eps for anything less precise than float64, since adapters are trained in float32 or less)."""
    eps = torch.finfo(torch.float64).eps if x.dtype == torch.float64 else torch.finfo(torch.float32).eps
    return max(x.shape[-2], x.shape[-1]) * eps


def _ranks(s: Tensor, rtol: float) -> Tensor:
    """Numerical rank from descending singular values s (..., k): #{σ_k > rtol · σ_1} (0 for a zero matrix)."""
    if s.shape[-1] == 0:
        return torch.zeros(s.shape[:-1], dtype=torch.long, device=s.device)
    tol = rtol * s[..., :1]
    return ((s > tol) & (s > 0)).sum(-1)


def _thin_svd(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD X = U Σ Vᴴ via a QR reduction of the long side first (LoRA factors are r × d with r ≪ d):
    for a wide X, Xᵀ = Q R and svd(Rᵀ) = U Σ Wᴴ give Vᴴ = Wᴴ Qᵀ; for a tall X, X = Q R and U = Q·U_R."""
    m, n = x.shape[-2:]
    if n > m:
        q, r = torch.linalg.qr(x.mT)
        u, s, wh = torch.linalg.svd(r.mT)
        return u, s, wh @ q.mT
    if m > n:
        q, r = torch.linalg.qr(x)
        u, s, vh = torch.linalg.svd(r)
        return q @ u, s, vh
    return torch.linalg.svd(x, full_matrices=False)


def _svd_side(x: Tensor, side: Side) -> tuple[Tensor, Tensor]:
    """(orthonormal basis as columns (..., dim, k) in singular-value order, singular values (..., k))."""
    u, s, vh = _thin_svd(x)
    return (vh.mT if side == "row" else u), s


def _where(batch_shape: torch.Size, flat_index: int) -> str:
    if len(batch_shape) == 0:
        return ""
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat_index), batch_shape))
    return f" at batch index {idx if len(idx) > 1 else idx[0]}"


def _check_k(ranks: Tensor, k: int, name: str, side: Side, strict: bool) -> Tensor:
    """Raise (strict) if any batch element has numerical rank < k; return the bool mask of bad elements."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"the number of directions for {name} must be an integer >= 1, got {k!r}")
    bad = ranks < k
    if strict and bool(bad.any()):
        flat = int(torch.nonzero(bad.reshape(-1))[0])
        rank = int(ranks.reshape(-1)[flat])
        space = "row" if side == "row" else "column"
        raise ValueError(
            f"asked for the top {k} {space}-space directions of {name}, but its numerical rank is {rank}"
            f"{_where(ranks.shape, flat)}; use at most {rank} (a zero matrix, e.g. an untrained B, has rank 0)."
        )
    return bad


def numerical_rank(x: Tensor, rtol: float | None = None) -> Tensor:
    """Numerical rank of each matrix of ``x`` (..., m, n): ``#{k : σ_k > rtol · σ_1}``.

    ``rtol`` defaults to ``max(m, n) · eps`` (float32 eps unless ``x`` is float64). Returns a long tensor (...).
    """
    y = _as_f64(x, "x")
    tol = _default_rtol(x) if rtol is None else rtol
    return _ranks(torch.linalg.svdvals(y), tol)


def subspace_basis(x: Tensor, k: int, side: Side = "row", name: str = "X") -> Tensor:
    """Orthonormal basis (..., dim, k) of the top-k singular subspace of ``x`` on ``side``.

    ``side="row"``: top-k right singular vectors (dim = n); ``side="col"``: top-k left singular vectors (dim = m).
    """
    side = _check_side(side)
    y = _as_f64(x, name)
    basis, s = _svd_side(y, side)
    _check_k(_ranks(s, _default_rtol(x)), k, name, side, strict=True)
    return basis[..., :k]


# --- subspace similarity -----------------------------------------------------------------------------------
def _bases(x: Tensor, y: Tensor, side: Side, rtol: float | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Full orthonormal singular bases of X and Y on ``side`` (columns, singular-value order) and their
    numerical ranks."""
    side = _check_side(side)
    xf, yf = _as_f64(x, "X"), _as_f64(y, "Y")
    dim = -1 if side == "row" else -2
    if xf.shape[dim] != yf.shape[dim]:
        space = "row spaces (number of columns)" if side == "row" else "column spaces (number of rows)"
        raise ValueError(
            f"X {tuple(x.shape)} and Y {tuple(y.shape)} do not live in the same space: their {space} differ"
        )
    ux, sx = _svd_side(xf, side)
    uy, sy = _svd_side(yf, side)
    rx = _ranks(sx, _default_rtol(x) if rtol is None else rtol)
    ry = _ranks(sy, _default_rtol(y) if rtol is None else rtol)
    return ux, rx, uy, ry


def _overlap(
    x: Tensor, y: Tensor, i: int, j: int, side: Side, strict: bool, rtol: float | None
) -> tuple[Tensor, Tensor]:
    """G = U_Xᵀ U_Y (..., i, j) with U the top-i / top-j orthonormal bases, and the mask of invalid elements."""
    ux, rx, uy, ry = _bases(x, y, side, rtol)
    bad_x = _check_k(rx, i, "X", side, strict)
    bad_y = _check_k(ry, j, "Y", side, strict)
    if i > ux.shape[-1] or j > uy.shape[-1]:  # non-strict: cannot even slice
        raise ValueError(
            f"i={i}, j={j} exceed the matrices' sizes ({ux.shape[-1]} and {uy.shape[-1]} singular directions)"
        )
    g = ux[..., :i].mT @ uy[..., :j]
    return g, torch.broadcast_to(bad_x, g.shape[:-2]) | torch.broadcast_to(bad_y, g.shape[:-2])


def _grid_from_overlap(g: Tensor) -> Tensor:
    """φ(i, j) = (Σ_{a ≤ i} Σ_{b ≤ j} G_ab²) / min(i, j) for the whole grid: two cumulative sums."""
    ii = torch.arange(1, g.shape[-2] + 1, device=g.device, dtype=torch.float64)
    jj = torch.arange(1, g.shape[-1] + 1, device=g.device, dtype=torch.float64)
    return g.square().cumsum(-2).cumsum(-1) / torch.minimum(ii[:, None], jj[None, :])


def _mask_beyond_rank(grid: Tensor, rx: Tensor, ry: Tensor) -> Tensor:
    ii = torch.arange(1, grid.shape[-2] + 1, device=grid.device)
    jj = torch.arange(1, grid.shape[-1] + 1, device=grid.device)
    rx_b = torch.broadcast_to(rx, grid.shape[:-2])[..., None, None]
    ry_b = torch.broadcast_to(ry, grid.shape[:-2])[..., None, None]
    return grid.masked_fill((ii[:, None] > rx_b) | (jj[None, :] > ry_b), math.nan)


def subspace_similarity(
    X: Tensor,
    Y: Tensor,
    i: int,
    j: int,
    side: Side = "row",
    *,
    strict: bool = True,
    rtol: float | None = None,
) -> Tensor:
    """Normalised subspace similarity of the LoRA paper (Hu et al. 2021, §7.2), in [0, 1]:

        φ(X, Y, i, j) = ‖U_Xᵢᵀ U_Yⱼ‖_F² / min(i, j)

    where U_Xᵢ holds the top-i singular vectors of X on ``side`` (right singular vectors — the row space —
    for ``side="row"``, used for A; left singular vectors — the column space — for ``side="col"``, used for
    B) and U_Yⱼ the top-j of Y. 1 when one subspace contains the other, 0 when they are orthogonal;
    invariant to rotation and scale (see the module docstring). Equals the mean of cos² of the min(i, j)
    principal angles (`principal_angles`).

    Args:
        X, Y: (..., m, n) matrices (leading axes broadcast, e.g. one per layer).
        i, j: number of top directions of X and of Y; each must be <= that matrix's numerical rank.
        side: ``"row"`` or ``"col"``.
        strict: if False, batch elements whose rank is below i (or j) give NaN instead of raising.
        rtol: relative singular-value threshold of the numerical rank (default ``max(m, n)·eps``).

    Returns:
        float64 tensor of shape (...).
    """
    g, bad = _overlap(X, Y, i, j, side, strict, rtol)
    phi = g.square().sum((-2, -1)) / min(i, j)
    return phi.masked_fill(bad, math.nan)


def principal_angles(
    X: Tensor,
    Y: Tensor,
    i: int,
    j: int,
    side: Side = "row",
    *,
    strict: bool = True,
    rtol: float | None = None,
) -> Tensor:
    """Principal angles (radians, ascending) between the top-i subspace of X and the top-j subspace of Y:

        cos θ_k = σ_k(U_Xᵢᵀ U_Yⱼ),   k = 1 … min(i, j),   θ ∈ [0, π/2]

    with U as in `subspace_similarity` (row space for ``side="row"``, column space for ``side="col"``), so
    φ(X, Y, i, j) = mean_k cos² θ_k. Returns (..., min(i, j)) float64; NaN rows where ``strict=False`` and a
    rank is too small.
    """
    g, bad = _overlap(X, Y, i, j, side, strict, rtol)
    cos = torch.linalg.svdvals(g).clamp(0.0, 1.0)
    return torch.arccos(cos).masked_fill(bad.unsqueeze(-1), math.nan)


def subspace_similarity_grid(
    X: Tensor,
    Y: Tensor,
    side: Side = "row",
    *,
    max_i: int | None = None,
    max_j: int | None = None,
    strict: bool = True,
    rtol: float | None = None,
) -> Tensor:
    """φ(X, Y, i, j) for every i = 1 … max_i and j = 1 … max_j (the LoRA paper's Figure 3 heatmap).

    With G = U_Xᵀ U_Y (top max_i × top max_j singular directions, see `subspace_similarity`):

        φ(i, j) = (Σ_{a ≤ i} Σ_{b ≤ j} G_ab²) / min(i, j)

    computed for the whole grid at once with two cumulative sums. ``max_i`` / ``max_j`` default to the
    numerical rank of X / Y (the smallest over the batch when batched); larger values raise. With
    ``strict=False`` they default to the full number of singular directions and grid entries beyond an
    element's rank are NaN.

    Returns:
        float64 tensor (..., max_i, max_j); entry [i-1, j-1] is φ(X, Y, i, j).
    """
    ux, rx, uy, ry = _bases(X, Y, side, rtol)
    if max_i is None:
        max_i = max(int(rx.min()), 1) if strict and rx.numel() else ux.shape[-1]
    if max_j is None:
        max_j = max(int(ry.min()), 1) if strict and ry.numel() else uy.shape[-1]
    _check_k(rx, max_i, "X", side, strict)
    _check_k(ry, max_j, "Y", side, strict)
    if max_i > ux.shape[-1] or max_j > uy.shape[-1]:
        raise ValueError(
            f"max_i={max_i}, max_j={max_j} exceed the matrices' sizes ({ux.shape[-1]}, {uy.shape[-1]})"
        )
    grid = _grid_from_overlap(ux[..., :max_i].mT @ uy[..., :max_j])
    return grid if strict else _mask_beyond_rank(grid, rx, ry)


def compare_subspaces(
    X: Tensor,
    Y: Tensor,
    side: Side = "row",
    i: int | None = None,
    j: int | None = None,
    *,
    strict: bool = False,
    rtol: float | None = None,
) -> dict[str, Tensor]:
    """`subspace_similarity`, `principal_angles` and `subspace_similarity_grid` from one decomposition.

    ``i`` and ``j`` default to min(number of singular directions of X, of Y) — for LoRA factors, the smaller
    rank r. The grid covers every i, j up to the full number of singular directions (NaN beyond a rank).
    With ``strict=False`` (the default here, for reports over many layers) an element whose rank is below i
    or j gives NaN similarity and angles instead of raising.

    Returns:
        {"similarity": (...), "principal_angles": (..., min(i, j)) radians, "grid": (..., kx, ky),
        "rank_x": (...), "rank_y": (...)}.
    """
    ux, rx, uy, ry = _bases(X, Y, side, rtol)
    k = min(ux.shape[-1], uy.shape[-1])
    i = k if i is None else i
    j = k if j is None else j
    bad = _check_k(rx, i, "X", side, strict) | _check_k(ry, j, "Y", side, strict)
    if i > ux.shape[-1] or j > uy.shape[-1]:
        raise ValueError(f"i={i}, j={j} exceed the matrices' sizes ({ux.shape[-1]}, {uy.shape[-1]})")
    g = ux.mT @ uy
    bad = torch.broadcast_to(bad, g.shape[:-2])
    sub = g[..., :i, :j]
    phi = (sub.square().sum((-2, -1)) / min(i, j)).masked_fill(bad, math.nan)
    angles = torch.arccos(torch.linalg.svdvals(sub).clamp(0.0, 1.0)).masked_fill(bad.unsqueeze(-1), math.nan)
    return {
        "similarity": phi,
        "principal_angles": angles,
        "grid": _mask_beyond_rank(_grid_from_overlap(g), rx, ry),
        "rank_x": torch.broadcast_to(rx, g.shape[:-2]),
        "rank_y": torch.broadcast_to(ry, g.shape[:-2]),
    }


# --- CCA -------------------------------------------------------------------------------------------------------
def _reduced_bases(
    x: Tensor, keep: float | int, name: str, strict: bool, rtol: float
) -> tuple[Tensor, Tensor]:
    """SVCCA step 1, batched: rows of x (B, n, D) are neurons, columns datapoints. Centre each neuron over
    the datapoints, SVD, keep the top-k directions per element (k from ``keep``).

    Returns (bases (B, D, n) with the columns beyond each element's k zeroed, k (B,); k = 0 marks an element
    with nothing to keep)."""
    xc = x - x.mean(-1, keepdim=True)
    _, s, vh = _thin_svd(xc)  # s (B, n'), vh (B, n', D), n' = min(n, D)
    rank = _ranks(s, rtol)
    if isinstance(keep, int):
        k = torch.full_like(rank, keep)
        too_few = rank < keep
    else:
        var = s.square() * (torch.arange(s.shape[-1], device=s.device) < rank.unsqueeze(-1))
        frac = var.cumsum(-1) / var.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
        k = (frac < keep - 1e-12).sum(-1) + 1
        k = torch.minimum(k, rank)
        too_few = rank == 0
    if strict and bool(too_few.any()):
        flat = int(torch.nonzero(too_few)[0])
        r = int(rank[flat])
        where = _where(torch.Size([x.shape[0]]), flat) if x.shape[0] > 1 else ""
        if r == 0:
            raise ValueError(
                f"{name}{where} has no variance to correlate (zero matrix, or every neuron constant)"
            )
        raise ValueError(
            f"keep={keep} directions requested but {name}{where} has numerical rank {r} after centring; "
            f"use keep <= {r}"
        )
    k = k.masked_fill(too_few, 0)
    keep_mask = torch.arange(vh.shape[-2], device=vh.device) < k.unsqueeze(-1)  # (B, n')
    return vh.mT * keep_mask.unsqueeze(-2), k


def _neurons_by_datapoints(X: Tensor, Y: Tensor, side: Side) -> tuple[Tensor, Tensor, torch.Size]:
    """X and Y as float64 (B, neurons, datapoints) stacks over their broadcast batch shape, and that shape."""
    xf, yf = _as_f64(X, "X"), _as_f64(Y, "Y")
    if side == "col":
        xf, yf = xf.mT, yf.mT
    if xf.shape[-1] != yf.shape[-1]:
        raise ValueError(
            f"X {tuple(X.shape)} and Y {tuple(Y.shape)} must share the datapoint axis "
            f"({'columns' if side == 'row' else 'rows'}) for CCA"
        )
    batch = torch.broadcast_shapes(xf.shape[:-2], yf.shape[:-2])
    xb = xf.expand(*batch, *xf.shape[-2:]).reshape(-1, *xf.shape[-2:])
    yb = yf.expand(*batch, *yf.shape[-2:]).reshape(-1, *yf.shape[-2:])
    return xb, yb, batch


def _check_keep(keep: object) -> None:
    """ValueError unless ``keep`` is a variance fraction in (0, 1] (float) or a count >= 1 (int)."""
    if isinstance(keep, bool) or not isinstance(keep, int | float):
        raise ValueError(f"keep must be a variance fraction in (0, 1] or an integer >= 1, got {keep!r}")
    if isinstance(keep, float) and not 0.0 < keep <= 1.0:
        raise ValueError(f"keep={keep} as a variance fraction must be in (0, 1]; pass an int for a count")
    if isinstance(keep, int) and keep < 1:
        raise ValueError(f"keep={keep} as a number of directions must be >= 1")


def cca_similarity(
    X: Tensor,
    Y: Tensor,
    side: Side = "row",
    keep: float | int = 0.99,
    *,
    strict: bool = True,
    rtol: float | None = None,
) -> Tensor:
    """SVCCA-style mean canonical correlation (Raghu et al. 2017; MALoRA's Figure 2), in [0, 1].

    **Neurons and datapoints.** CCA compares two sets of *neurons*, each neuron being a vector of values
    over shared *datapoints*. For ``side="row"`` (A: r × d_in) the r rows are the neurons and the d_in input
    coordinates are the datapoints; for ``side="col"`` (B: d_out × r) the r columns are the neurons and the
    d_out output coordinates are the datapoints. X and Y must share the datapoint axis; their neuron counts
    may differ.

    Steps, with X as neurons × datapoints (n_x × D):

    1. centre each neuron over the datapoints: X̃ = X − mean_D(X);
    2. SVD-reduce: X̃ = U Σ Vᵀ, keep the top k_x directions — the smallest k with
       Σ_{a ≤ k} σ_a² ≥ keep · Σ_a σ_a² when ``keep`` is a float in (0, 1], or exactly k = ``keep`` when it
       is an int (``keep=1`` is one direction; ``keep=1.0`` keeps all variance); likewise Y;
    3. CCA of the reduced sets: canonical correlations ρ_a = σ_a(V_{x,k}ᵀ V_{y,k}), a = 1 … min(k_x, k_y)
       (the cosines of the principal angles between the reduced neuron spans inside R^D);
    4. similarity = mean_a ρ_a.

    An invertible linear map of the neurons (X → M X) leaves the result at exactly 1 when all directions are
    kept (``keep`` = rank as an int, or 1.0); with ``keep < 1`` the dropped low-variance directions may differ.

    Args:
        X, Y: (..., n_x, D) and (..., n_y, D) for ``side="row"``; (..., D, n_x) and (..., D, n_y) for ``"col"``.
        side: which axis holds the neurons (see above).
        keep: variance fraction in (0, 1] (float) or number of directions (int >= 1).
        strict: if False, elements with too little rank give NaN instead of raising.
        rtol: relative singular-value threshold of the numerical rank.

    Returns:
        float64 tensor (...).
    """
    side = _check_side(side)
    _check_keep(keep)
    xb, yb, batch = _neurons_by_datapoints(X, Y, side)
    tol_x = _default_rtol(X) if rtol is None else rtol
    tol_y = _default_rtol(Y) if rtol is None else rtol
    bx, kx = _reduced_bases(xb, keep, "X", strict, tol_x)
    by, ky = _reduced_bases(yb, keep, "Y", strict, tol_y)
    # Zeroed columns add only zero singular values, so the min(k_x, k_y) canonical correlations are the
    # non-zero part: their mean is the sum over all singular values divided by min(k_x, k_y).
    rho = torch.linalg.svdvals(bx.mT @ by).clamp(0.0, 1.0)
    k = torch.minimum(kx, ky)
    out = rho.sum(-1) / k.clamp_min(1)
    return out.masked_fill(k == 0, math.nan).reshape(batch)


# --- magnitude and direction ---------------------------------------------------------------------------------
def magnitude_direction_change(
    W0: Tensor, delta_W: Tensor, *, per: str = "column", eps: float = 1e-30
) -> dict[str, Tensor]:
    """DoRA-style magnitude and direction change of W = W0 + ΔW against W0 (Liu et al. 2024, §3).

    Per column c (one per input feature; W is d_out × d_in), as the DoRA paper's ``‖·‖_c`` reads with
    y = W x and docs/design.md §5 states; ``per="row"`` takes one per output feature instead, as DoRA's
    released code and peft's DoRA do (their magnitude vector has d_out entries). The formulas:

        m_c = ‖W[:, c]‖₂,   m0_c = ‖W0[:, c]‖₂,   V = W / m,   V0 = W0 / m0
        ΔM = mean_c |m_c − m0_c|
        ΔD = mean_c (1 − cos(W[:, c], W0[:, c])) = mean_c ½‖V[:, c] − V0[:, c]‖²

    (the second form of ΔD keeps its precision when ΔW is tiny). A pure scaling W = a·W0 (a > 0) gives
    ΔD = 0; a pure rotation W = R W0 (R orthogonal) gives ΔM = 0. Columns of zero norm get direction 0.

    Args:
        W0: (..., d_out, d_in) frozen weight.
        delta_W: (..., d_out, d_in) update (for LoRA: s · B A), broadcastable against W0.
        per: ``"column"`` (the paper's notation, the default) or ``"row"`` (DoRA's code): the vectors whose
            norms are the magnitudes. ValueError for anything else.

    Returns:
        {"delta_M": (...), "delta_D": (...), "m0_mean": (...), "m_mean": (...)} float64 tensors
        (``m0_mean``/``m_mean`` are the mean column (row) norms, for relating ΔM to the weight's scale).
    """
    w0 = _as_f64(W0, "W0")
    dw = _as_f64(delta_W, "delta_W")
    try:
        w = w0 + dw
    except RuntimeError:
        raise ValueError(
            f"W0 {tuple(W0.shape)} and delta_W {tuple(delta_W.shape)} do not have the same shape"
        ) from None
    if per not in ("column", "row"):
        raise ValueError(
            f"per={per!r}: give 'column' (one magnitude per input feature) or 'row' (per output)"
        )
    if per == "row":  # the rows of W are the columns of Wᵀ
        w0, w = w0.transpose(-2, -1), w.transpose(-2, -1)
    m0 = torch.linalg.vector_norm(w0, dim=-2)
    m = torch.linalg.vector_norm(w, dim=-2)
    v0 = w0 / m0.clamp_min(eps).unsqueeze(-2)
    v = w / m.clamp_min(eps).unsqueeze(-2)
    one_minus_cos = 0.5 * (v - v0).square().sum(-2)
    return {
        "delta_M": (m - m0).abs().mean(-1),
        "delta_D": one_minus_cos.mean(-1),
        "m0_mean": torch.broadcast_to(m0.mean(-1), m.shape[:-1]),
        "m_mean": m.mean(-1),
    }


# --- norms ------------------------------------------------------------------------------------------------------
def frobenius_norm(X: Tensor) -> Tensor:
    """‖X‖_F = sqrt(Σ_ab X_ab²) over the last two axes, float64 (...)."""
    return torch.linalg.matrix_norm(_as_f64(X, "X"), ord="fro")


def relative_change(A: Tensor, A_init: Tensor) -> Tensor:
    """Relative distance from initialisation, over the last two axes:

        ‖A − A_init‖_F / ‖A_init‖_F

    (the paper's "A barely moves" measure). ``A_init`` must be non-zero. Returns float64 (...).
    """
    a, a0 = _as_f64(A, "A"), _as_f64(A_init, "A_init")
    if a.shape[-2:] != a0.shape[-2:]:
        raise ValueError(f"A {tuple(A.shape)} and A_init {tuple(A_init.shape)} must have the same shape")
    denom = torch.linalg.matrix_norm(a0, ord="fro")
    if bool((denom == 0).any()):
        raise ValueError("A_init is a zero matrix: the relative change is undefined (was the snapshot a B?)")
    return torch.linalg.matrix_norm(a - a0, ord="fro") / denom


# --- spectra ------------------------------------------------------------------------------------------------------
def singular_spectrum(matrices: Sequence[Tensor] | Tensor, side: Side = "row") -> Tensor:
    """Singular values (descending) of the concatenation of several experts' matrices:

        side="row" (A_i: r × d_in):   σ([A_1; A_2; …; A_N])   stacked along rows    → (N·r) × d_in
        side="col" (B_i: d_out × r):  σ([B_1, B_2, …, B_N])   stacked along columns → d_out × (N·r)

    If the experts' matrices span one shared subspace the spectrum drops to ~0 after r values; independent
    experts fill min(N·r, d) values. ``matrices`` is a sequence of (..., m, n) tensors (or one tensor with the
    expert axis at position -3). Returns float64 (..., min of the concatenated shape).
    """
    side = _check_side(side)
    if isinstance(matrices, Tensor):
        if matrices.dim() < 3:
            raise ValueError("a single tensor of experts must be (..., N, m, n)")
        mats = list(matrices.unbind(-3))
    else:
        mats = list(matrices)
    if not mats:
        raise ValueError("singular_spectrum needs at least one matrix")
    mats = [_as_f64(m, f"matrix {k}") for k, m in enumerate(mats)]
    dim = -2 if side == "row" else -1
    other = -1 if side == "row" else -2
    shapes = {m.shape[other] for m in mats}
    if len(shapes) != 1:
        axis = "columns" if side == "row" else "rows"
        raise ValueError(
            f"cannot concatenate along {'rows' if side == 'row' else 'columns'}: the matrices have different "
            f"numbers of {axis}: {[tuple(m.shape) for m in mats]}"
        )
    batch = torch.broadcast_shapes(*(m.shape[:-2] for m in mats))
    mats = [m.expand(*batch, *m.shape[-2:]) for m in mats]
    return torch.linalg.svdvals(torch.cat(mats, dim=dim))
