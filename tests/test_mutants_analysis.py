"""Hand-computed reference values for ``asymlora.analysis.metrics`` (the mutation run's survivors, docs/testing.md).

Every expected number below is worked out in the comments on small inputs whose singular vectors are known by
construction (orthogonal rows with distinct norms); none is the code compared with itself. Error messages are
matched whole, so a mutated word or value in them is seen.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

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

F64 = torch.float64
NAN = math.nan


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=F64)


def close(got: torch.Tensor, want, atol: float = 1e-12) -> None:
    want_t = want if isinstance(want, torch.Tensor) else torch.tensor(want, dtype=F64)
    assert got.dtype == F64
    torch.testing.assert_close(got, want_t.to(F64), atol=atol, rtol=0, equal_nan=True)


def whole(message: str) -> str:
    """A regex matching exactly ``message``."""
    return "^" + re.escape(message) + "$"


# --- φ on a 3 × 2 overlap --------------------------------------------------------------------------------------
# e1..e5 unit vectors of R^5.
#   X = rows 3·e1, 2·e2, 1·e4: orthogonal rows with distinct norms, so the top-1/2/3 row spaces are
#       {e1}, {e1, e2}, {e1, e2, e4}.
#   Y = rows 2·y1, 1·y2 with y1 = 0.6·e1 + 0.8·e3 and y2 = 0.8·e2 + 0.6·e4 (orthonormal), top-1 = {y1}.
#   G = U_Xᵀ U_Y = [[0.6, 0], [0, 0.8], [0, 0.6]];  G² = [[.36, 0], [0, .64], [0, .36]].
#   Cumulative sums over a ≤ i, b ≤ j: [[.36, .36], [.36, 1.0], [.36, 1.36]]; min(i, j) = [[1, 1], [1, 2], [1, 2]]
#   φ grid = [[.36, .36], [.36, .50], [.36, .68]].
#   Principal angles (i, j) = (3, 2): the columns of G are orthogonal with norms 0.6 and 1 → cos = (1, 0.6);
#   (2, 2): G = diag(0.6, 0.8) → cos = (0.8, 0.6).
X3 = t([[3, 0, 0, 0, 0], [0, 2, 0, 0, 0], [0, 0, 0, 1, 0]])
Y2 = t([[1.2, 0, 1.6, 0, 0], [0, 0.8, 0, 0.6, 0]])
GRID = [[0.36, 0.36], [0.36, 0.50], [0.36, 0.68]]


def test_phi_grid_by_hand_on_both_sides():
    close(subspace_similarity_grid(X3, Y2), GRID)
    close(subspace_similarity_grid(X3.T, Y2.T, "col"), GRID)
    close(subspace_similarity_grid(X3, Y2, max_i=2, max_j=1), [[0.36], [0.36]])
    for i, j, want in [(1, 1, 0.36), (2, 1, 0.36), (2, 2, 0.5), (3, 2, 0.68), (3, 1, 0.36)]:
        close(subspace_similarity(X3, Y2, i, j), want)
        close(subspace_similarity(X3.T, Y2.T, i, j, "col"), want)
    close(principal_angles(X3, Y2, 3, 2), [0.0, math.acos(0.6)], atol=1e-7)
    close(principal_angles(X3, Y2, 2, 2), [math.acos(0.8), math.acos(0.6)], atol=1e-7)
    close(principal_angles(X3.T, Y2.T, 2, 2, "col"), [math.acos(0.8), math.acos(0.6)], atol=1e-7)


def test_square_matrices_take_the_plain_svd_branch():
    # X, Y 2 × 2 (neither wide nor tall): X = diag(3, 1) has top-1 = e1; Y's top-1 is (0.6, 0.8) (norm 2 row)
    x, y = t([[3, 0], [0, 1]]), t([[1.2, 1.6], [-0.8, 0.6]])
    close(subspace_similarity(x, y, 1, 1), 0.36)
    # Y's rows are orthogonal with norms 2 and 1, so Y Yᵀ = diag(4, 1): its column space's top-1 is e1
    close(subspace_similarity(x, y, 1, 1, "col"), 1.0)
    close(subspace_basis(x, 1).abs(), [[1.0], [0.0]])
    # a tall X (4 × 2) for the row side: the QR of X itself
    tall = t([[0, 0], [3, 0], [0, 0], [0, 1]])
    close(subspace_basis(tall, 2, "row").abs(), [[1.0, 0.0], [0.0, 1.0]])
    close(subspace_basis(tall, 1, "col").abs(), [[0.0], [1.0], [0.0], [0.0]])


def test_subspace_basis_by_hand_and_its_errors():
    # X3: right singular vectors in order e1, e2, e4
    want = torch.zeros(5, 3, dtype=F64)
    want[0, 0] = want[1, 1] = want[3, 2] = 1
    close(subspace_basis(X3, 3).abs(), want)
    close(subspace_basis(X3, 2, "row").abs(), want[:, :2])
    close(subspace_basis(X3.T, 1, "col", name="B").abs(), want[:, :1])
    # orthonormal columns, an orthogonal projector's trace = k
    assert subspace_basis(torch.randn(3, 7, generator=torch.Generator().manual_seed(0)), 2).shape == (7, 2)
    msg = (
        "asked for the top 4 row-space directions of A, but its numerical rank is 3; "
        "use at most 3 (a zero matrix, e.g. an untrained B, has rank 0)."
    )
    with pytest.raises(ValueError, match=whole(msg)):
        subspace_basis(X3, 4, name="A")
    with pytest.raises(
        ValueError, match=whole(msg.replace("row-space", "column-space").replace(" A,", " B,"))
    ):
        subspace_basis(X3.T, 4, "col", name="B")


def test_number_of_directions_must_be_a_positive_int():
    for k in (0, -1, True, 1.0, "2"):
        msg = f"the number of directions for X must be an integer >= 1, got {k!r}"
        with pytest.raises(ValueError, match=whole(msg)):
            subspace_basis(X3, k)  # type: ignore[arg-type]
    close(subspace_basis(X3, 1).abs(), [[1.0], [0], [0], [0], [0]])


# --- numerical rank and its threshold ----------------------------------------------------------------------------
def test_rank_threshold_is_strictly_greater_and_relative():
    d = t([[1.0, 0], [0, 0.5]])
    assert numerical_rank(d, rtol=0.5).item() == 1  # σ2 = 0.5·σ1 is not > 0.5·σ1
    assert numerical_rank(d, rtol=0.49).item() == 2
    assert numerical_rank(4 * d, rtol=0.5).item() == 1  # relative to σ1, not absolute
    assert numerical_rank(4 * d, rtol=0.13).item() == 2  # σ2 = 2 > 0.13·4
    assert numerical_rank(d).dtype == torch.long
    assert numerical_rank(torch.zeros(3, 4)).item() == 0
    assert numerical_rank(torch.zeros(3, 4, dtype=F64), rtol=0.0).item() == 0
    assert numerical_rank(t([[1.0, 0], [0, 0]]), rtol=0.0).item() == 1
    assert numerical_rank(t([[1.0, 0], [0, 0]]), rtol=-1.0).item() == 1  # a zero σ is never counted


def test_default_threshold_is_max_dim_times_the_inputs_eps():
    # 2 × 100 with σ = (1, 1e-5): float32 tolerance 100 · 1.19e-7 = 1.19e-5 > 1e-5 → rank 1;
    # min(m, n) · eps32 = 2.4e-7 would count it; float64's 100 · 2.2e-16 counts it too.
    x = torch.zeros(2, 100, dtype=F64)
    x[0, 0], x[1, 1] = 1.0, 1e-5
    assert numerical_rank(x).item() == 2
    assert numerical_rank(x.float()).item() == 1
    assert numerical_rank(x.T.float()).item() == 1  # tall: max(m, n) again
    # σ2 = 1e-6 · σ1: above 100 · eps32, kept in both precisions
    x[1, 1] = 1e-3
    assert numerical_rank(x.float()).item() == 2
    # float64 threshold: 100 · 2.2e-16 = 2.2e-14; σ2 = 1e-13 kept, 1e-15 dropped
    x[1, 1] = 1e-13
    assert numerical_rank(x).item() == 2
    x[1, 1] = 1e-15
    assert numerical_rank(x).item() == 1


def test_empty_matrices_have_rank_zero():
    r = numerical_rank(torch.zeros(2, 0, 3))
    assert r.dtype == torch.long and r.tolist() == [0, 0]


# --- input checks ---------------------------------------------------------------------------------------------------
def test_input_errors_are_named_and_whole():
    with pytest.raises(TypeError, match=whole("x must be a torch.Tensor, got ndarray")):
        numerical_rank(np.eye(2))  # type: ignore[arg-type]
    msg = "x must have at least 2 dimensions (..., m, n); got shape (3,)"
    with pytest.raises(ValueError, match=whole(msg)):
        numerical_rank(torch.ones(3))
    with pytest.raises(ValueError, match=whole("x is complex; only real matrices are supported")):
        numerical_rank(torch.eye(2, dtype=torch.complex64))
    bad = torch.zeros(2, 4)
    bad[0, 1], bad[1, 0], bad[1, 3] = float("nan"), float("inf"), -float("inf")
    msg = (
        "Y contains non-finite values (1 NaN, 2 Inf of 8 entries, shape (2, 4)); check the adapter or the "
        "training run that produced it (diverged loss?)."
    )
    with pytest.raises(ValueError, match=whole(msg)):
        subspace_similarity(torch.eye(2, 4), bad, 1, 1)
    side = "side must be 'row' (A matrices: row space) or 'col' (B matrices: column space), got 'rows'"
    with pytest.raises(ValueError, match=whole(side)):
        subspace_basis(X3, 1, "rows")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=whole(side)):
        cca_similarity(X3, X3, "rows")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=whole(side.replace("'rows'", "'column'"))):
        singular_spectrum([X3], "column")  # type: ignore[arg-type]


def test_results_are_detached_float64():
    x = X3.clone().float().requires_grad_(True)
    for out in (
        subspace_similarity(x, Y2, 2, 2),
        subspace_similarity_grid(x, Y2),
        cca_similarity(x, x, keep=2),
        frobenius_norm(x),
        relative_change(x, x.detach() + 1),
        singular_spectrum([x, x]),
        magnitude_direction_change(x, x)["delta_M"],
    ):
        assert out.dtype == F64 and not out.requires_grad


def test_mismatched_spaces_name_the_axis():
    row = "X (2, 4) and Y (2, 5) do not live in the same space: their row spaces (number of columns) differ"
    with pytest.raises(ValueError, match=whole(row)):
        subspace_similarity(torch.eye(2, 4), torch.eye(2, 5), 1, 1)
    col = "X (4, 2) and Y (5, 2) do not live in the same space: their column spaces (number of rows) differ"
    with pytest.raises(ValueError, match=whole(col)):
        subspace_similarity(torch.eye(4, 2), torch.eye(5, 2), 1, 1, "col")
    # col side compares rows, so a different number of columns is fine: (4, 2) vs (4, 3)
    y = torch.zeros(4, 3)
    y[0, 0], y[1, 1], y[2, 2] = 3, 2, 1  # top-2 column space {e1, e2}
    close(subspace_similarity(torch.eye(4, 2), y, 2, 2, "col"), 1.0)
    with pytest.raises(ValueError, match="same space"):
        compare_subspaces(torch.eye(2, 4), torch.eye(2, 5))
    with pytest.raises(ValueError, match="same space"):
        subspace_similarity_grid(torch.eye(4, 2), torch.eye(5, 2), "col")


# --- batches, strictness, NaN masking ------------------------------------------------------------------------------
def _batch_with_low_ranks() -> tuple[torch.Tensor, torch.Tensor]:
    """Element 0: X rank 2 (third row zero), Y rank 2; element 1: X rank 3, Y rank 1 (second row zero)."""
    x = torch.stack([X3.clone(), X3.clone()])
    x[0, 2] = 0
    y = torch.stack([Y2.clone(), Y2.clone()])
    y[1, 1] = 0
    return x, y


def test_rank_errors_name_the_batch_element():
    x, y = _batch_with_low_ranks()
    msg = (
        "asked for the top 3 row-space directions of X, but its numerical rank is 2 at batch index 0; "
        "use at most 2 (a zero matrix, e.g. an untrained B, has rank 0)."
    )
    with pytest.raises(ValueError, match=whole(msg)):
        subspace_similarity(x, y, 3, 1)
    msg = (
        "asked for the top 2 row-space directions of Y, but its numerical rank is 1 at batch index 1; "
        "use at most 1 (a zero matrix, e.g. an untrained B, has rank 0)."
    )
    with pytest.raises(ValueError, match=whole(msg)):
        subspace_similarity(x, y, 2, 2)
    # two batch axes: the index is a tuple
    x4 = torch.stack([torch.stack([X3, X3]), torch.stack([X3, x[0]])])  # (2, 2, 3, 5), element (1, 1) rank 2
    with pytest.raises(ValueError, match=re.escape("rank is 2 at batch index (1, 1); use at most 2")):
        subspace_similarity(x4, Y2, 3, 1)


def test_non_strict_gives_nan_only_where_a_rank_is_short():
    x, y = _batch_with_low_ranks()
    # (i, j) = (3, 1): X short in element 0 only
    close(subspace_similarity(x, y, 3, 1, strict=False), [NAN, 0.36])
    # (2, 2): Y short in element 1 only
    close(subspace_similarity(x, y, 2, 2, strict=False), [0.5, NAN])
    # (3, 2): X short in 0, Y short in 1
    close(subspace_similarity(x, y, 3, 2, strict=False), [NAN, NAN])
    close(subspace_similarity(x, y, 2, 1, strict=False), [0.36, 0.36])
    close(principal_angles(x, y, 3, 1, strict=False), [[NAN], [math.acos(0.6)]], atol=1e-7)
    close(
        principal_angles(x, y, 2, 2, strict=False), [[math.acos(0.8), math.acos(0.6)], [NAN, NAN]], atol=1e-7
    )
    with pytest.raises(
        ValueError, match=whole("i=4, j=1 exceed the matrices' sizes (3 and 2 singular directions)")
    ):
        subspace_similarity(x, y, 4, 1, strict=False)
    with pytest.raises(
        ValueError, match=whole("i=1, j=3 exceed the matrices' sizes (3 and 2 singular directions)")
    ):
        principal_angles(x, y, 1, 3, strict=False)


def test_grid_defaults_and_masking_in_a_batch():
    x, y = _batch_with_low_ranks()
    # strict: the smallest rank over the batch (X: min(2, 3) = 2; Y: min(2, 1) = 1)
    close(subspace_similarity_grid(x, y), [[[0.36], [0.36]], [[0.36], [0.36]]])
    # non-strict: the full grid, NaN beyond each element's ranks
    lenient = subspace_similarity_grid(x, y, strict=False)
    close(lenient, [[[0.36, 0.36], [0.36, 0.5], [NAN, NAN]], [[0.36, NAN], [0.36, NAN], [0.36, NAN]]])
    close(subspace_similarity_grid(x, y, strict=False, max_i=1, max_j=2), [[[0.36, 0.36]], [[0.36, NAN]]])
    with pytest.raises(ValueError, match=whole("max_i=4, max_j=2 exceed the matrices' sizes (3, 2)")):
        subspace_similarity_grid(x, y, strict=False, max_i=4)
    with pytest.raises(ValueError, match=whole("max_i=1, max_j=3 exceed the matrices' sizes (3, 2)")):
        subspace_similarity_grid(x, y, strict=False, max_i=1, max_j=3)
    with pytest.raises(ValueError, match="top 2 row-space directions of Y, but its numerical rank is 1"):
        subspace_similarity_grid(x, y, max_j=2)
    # a zero X asks for one direction (not zero, not two) and names rank 0
    msg = "asked for the top 1 row-space directions of X, but its numerical rank is 0; use at most 0"
    with pytest.raises(ValueError, match="^" + re.escape(msg)):
        subspace_similarity_grid(torch.zeros(3, 5), Y2)
    msg = "asked for the top 1 row-space directions of Y, but its numerical rank is 0; use at most 0"
    with pytest.raises(ValueError, match="^" + re.escape(msg)):
        subspace_similarity_grid(X3, torch.zeros(2, 5))


def test_grid_of_an_empty_batch():
    g = subspace_similarity_grid(torch.zeros(0, 3, 5), torch.zeros(0, 2, 5))
    assert g.shape == (0, 3, 2)


def test_explicit_rtol_reaches_both_matrices():
    # X3 has σ = (3, 2, 1): rtol 0.5 keeps 3 and 2 (2 > 1.5), drops 1; Y2's σ = (2, 1): rtol 0.5 drops 1 (1 = 0.5·2)
    close(subspace_similarity(X3, Y2, 2, 1, rtol=0.5), 0.36)
    with pytest.raises(ValueError, match="directions of X, but its numerical rank is 2"):
        subspace_similarity(X3, Y2, 3, 1, rtol=0.5)
    with pytest.raises(ValueError, match="directions of Y, but its numerical rank is 1"):
        subspace_similarity(X3, Y2, 1, 2, rtol=0.5)
    both = compare_subspaces(X3, Y2, rtol=0.5)
    assert both["rank_x"].item() == 2 and both["rank_y"].item() == 1
    grid = subspace_similarity_grid(X3, Y2, rtol=0.5)
    close(grid, [[0.36], [0.36]])


def test_each_matrix_gets_its_own_default_threshold():
    # Y float64 with σ = (1, 1e-9): rank 2 at float64 precision, rank 1 if judged with float32 X's eps
    y = torch.zeros(2, 5, dtype=F64)
    y[0, 0], y[1, 1] = 1.0, 1e-9
    x = X3.float()
    both = compare_subspaces(x, y)
    assert both["rank_x"].item() == 3 and both["rank_y"].item() == 2
    both = compare_subspaces(y, x)
    assert both["rank_x"].item() == 2 and both["rank_y"].item() == 3
    close(subspace_similarity(x, y, 2, 2), 1.0)  # {e1, e2} both
    close(subspace_similarity(y, x, 2, 2), 1.0)
    close(subspace_similarity_grid(y, x)[-1, -1], 2 / 2)  # max_i = rank 2 of y (float64), not 1
    assert subspace_similarity_grid(x, y).shape == (3, 2)
    assert subspace_basis(y, 2).shape == (5, 2)
    with pytest.raises(ValueError, match="rank is 1"):
        subspace_basis(y.float(), 2)


# --- compare_subspaces ----------------------------------------------------------------------------------------------
def test_compare_subspaces_by_hand():
    both = compare_subspaces(X3, Y2)  # i = j = min(3, 2) = 2
    close(both["similarity"], 0.5)
    close(both["principal_angles"], [math.acos(0.8), math.acos(0.6)], atol=1e-7)
    close(both["grid"], GRID)
    assert both["rank_x"].item() == 3 and both["rank_y"].item() == 2
    assert both["rank_x"].dtype == torch.long
    close(compare_subspaces(X3, Y2, i=3)["similarity"], 0.68)
    close(compare_subspaces(X3, Y2, i=3)["principal_angles"], [0.0, math.acos(0.6)], atol=1e-7)
    close(compare_subspaces(X3, Y2, i=1, j=2)["similarity"], 0.36)
    close(compare_subspaces(X3, Y2, j=1)["similarity"], 0.36)
    close(compare_subspaces(X3.T, Y2.T, "col", i=3)["similarity"], 0.68)
    with pytest.raises(ValueError, match=whole("i=4, j=2 exceed the matrices' sizes (3, 2)")):
        compare_subspaces(X3, Y2, i=4)
    with pytest.raises(ValueError, match=whole("i=2, j=3 exceed the matrices' sizes (3, 2)")):
        compare_subspaces(X3, Y2, j=3)


def test_compare_subspaces_is_lenient_by_default_and_batched():
    x, y = _batch_with_low_ranks()
    both = compare_subspaces(x, y)  # i = j = 2: Y short in element 1
    close(both["similarity"], [0.5, NAN])
    close(both["principal_angles"], [[math.acos(0.8), math.acos(0.6)], [NAN, NAN]], atol=1e-7)
    close(both["grid"], [[[0.36, 0.36], [0.36, 0.5], [NAN, NAN]], [[0.36, NAN], [0.36, NAN], [0.36, NAN]]])
    assert both["rank_x"].tolist() == [2, 3] and both["rank_y"].tolist() == [2, 1]
    close(compare_subspaces(x, y, i=3, j=1)["similarity"], [NAN, 0.36])
    with pytest.raises(ValueError, match="top 2 row-space directions of Y, but its numerical rank is 1"):
        compare_subspaces(x, y, strict=True)
    # one X against a batch of Y: ranks broadcast to the batch
    both = compare_subspaces(X3, y)
    assert both["rank_x"].tolist() == [3, 3] and both["rank_y"].tolist() == [2, 1]
    assert both["similarity"].shape == (2,)


# --- SVCCA with a variance cut ---------------------------------------------------------------------------------------
# Rows of the 8 × 8 Hadamard matrix (divided by √8) other than the all-ones row are orthonormal and centred.
#   X = neurons 3·h1, 2·h2, 1·h3              → centred singular values (3, 2, 1), variance (9, 4, 1) / 14
#   Y = neurons 3·h1, 2·(0.6·h2 + 0.8·h4), 1·h5 → the same singular values
#   cumulative variance fraction: 9/14 = 0.643, 13/14 = 0.929, 1
#   k = 1: spans {h1} vs {h1}                           → ρ = (1)          → 1
#   k = 2: {h1, h2} vs {h1, 0.6·h2 + 0.8·h4}            → ρ = (1, 0.6)     → 0.8
#   k = 3: {h1, h2, h3} vs {h1, 0.6·h2 + 0.8·h4, h5}    → ρ = (1, 0.6, 0)  → 1.6/3
def _hadamard8() -> torch.Tensor:
    h = t([[1.0]])
    for _ in range(3):
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(8)


H = _hadamard8()
XC = torch.stack([3 * H[1], 2 * H[2], H[3]])
YC = torch.stack([3 * H[1], 2 * (0.6 * H[2] + 0.8 * H[4]), H[5]])


@pytest.mark.parametrize(
    ("keep", "want"),
    [
        *[(1, 1.0), (2, 0.8), (3, 1.6 / 3)],  # int keep: exactly k directions
        *[(0.5, 1.0), (9 / 14, 1.0), (0.65, 0.8), (0.9, 0.8), (13 / 14, 0.8)],  # boundaries at 9/14, 13/14
        *[(0.93, 1.6 / 3), (0.99, 1.6 / 3), (1.0, 1.6 / 3)],
    ],
)
def test_svcca_variance_cut_by_hand(keep, want):
    close(cca_similarity(XC, YC, keep=keep), want, atol=1e-10)
    close(cca_similarity(XC.T + 7.0, YC.T, "col", keep=keep), want, atol=1e-10)


def test_svcca_takes_the_smaller_count_and_batches():
    # Y with only two neurons: k_y = 2, so k = min(3, 2) and ρ = (1, 0.6) → 0.8
    close(cca_similarity(XC, YC[:2], keep=1.0), 0.8, atol=1e-10)
    close(cca_similarity(XC[:2], YC, keep=0.99), 0.8, atol=1e-10)
    # one X against a batch of Y (and back): broadcast over the leading axis
    yb = torch.stack([YC, XC, YC[[0, 2, 1]]])  # the last one: neurons 3·h1, 1·h5, 2·(...): same span as YC
    close(cca_similarity(XC, yb, keep=3), [1.6 / 3, 1.0, 1.6 / 3], atol=1e-10)
    close(cca_similarity(yb, XC, keep=2), [0.8, 1.0, 0.8], atol=1e-10)
    close(cca_similarity(torch.stack([XC, XC]).unsqueeze(0), yb[:2], keep=1), [[1.0, 1.0]], atol=1e-10)


def test_svcca_rank_checks_and_nan():
    zero = torch.zeros(3, 8, dtype=F64)
    with pytest.raises(
        ValueError, match=whole("Y has no variance to correlate (zero matrix, or every neuron constant)")
    ):
        cca_similarity(XC, zero + 4.0)
    msg = "Y at batch index 1 has no variance to correlate (zero matrix, or every neuron constant)"
    with pytest.raises(ValueError, match=whole(msg)):
        cca_similarity(XC, torch.stack([YC, zero]))
    msg = "keep=3 directions requested but X has numerical rank 2 after centring; use keep <= 2"
    with pytest.raises(ValueError, match=whole(msg)):
        cca_similarity(XC[:2], YC, keep=3)
    msg = "keep=3 directions requested but Y at batch index 1 has numerical rank 2 after centring; use keep <= 2"
    with pytest.raises(ValueError, match=whole(msg)):
        cca_similarity(XC, torch.stack([YC, YC[:2].repeat(2, 1)[:3]]), keep=3)
    close(cca_similarity(XC, torch.stack([YC, zero]), keep=2, strict=False), [0.8, NAN], atol=1e-10)
    close(cca_similarity(torch.stack([zero, XC]), YC, keep=0.9, strict=False), [NAN, 0.8], atol=1e-10)
    # non-strict with too few directions for an int keep: NaN, not a mean over fewer directions
    close(
        cca_similarity(torch.stack([XC, XC[:2].repeat(2, 1)[:3]]), YC, keep=3, strict=False), [1.6 / 3, NAN]
    )
    # a rank-1 X with an int keep of 1: mean over one direction (not divided by 2)
    close(cca_similarity(XC[:1], YC, keep=1), 1.0, atol=1e-10)
    close(cca_similarity(XC[:1], YC[1:2], keep=1.0), 0.0, atol=1e-10)  # h1 vs 0.6·h2 + 0.8·h4: orthogonal


def test_svcca_rtol_and_default_threshold_per_matrix():
    # X with a third neuron at 1e-9 of the first: a direction at float64 precision (tolerance 8 · 2.2e-16 · 3),
    # noise at float32's (8 · 1.2e-7 · 3 = 2.9e-6), each matrix judged by its own dtype
    x = torch.stack([3 * H[1], 2 * H[2], 3e-9 * H[3]])
    close(cca_similarity(x, YC, keep=3), 1.6 / 3, atol=1e-8)
    close(cca_similarity(YC, x, keep=3), 1.6 / 3, atol=1e-8)
    with pytest.raises(ValueError, match="but X has numerical rank 2 after centring"):
        cca_similarity(x.float(), YC, keep=3)
    with pytest.raises(ValueError, match="but Y has numerical rank 2 after centring"):
        cca_similarity(YC, x.float(), keep=3)
    close(cca_similarity(XC, YC, keep=1.0, rtol=0.5), 0.8, atol=1e-10)  # σ3 = 1 is not > 0.5·3; σ2 = 2 is
    close(cca_similarity(XC, YC, keep=1.0, rtol=0.7), 1.0, atol=1e-10)


def test_svcca_argument_errors():
    for keep in (True, "0.5", None):
        msg = f"keep must be a variance fraction in (0, 1] or an integer >= 1, got {keep!r}"
        with pytest.raises(ValueError, match=whole(msg)):
            cca_similarity(XC, YC, keep=keep)  # type: ignore[arg-type]
    for keep in (0.0, 1.5, -0.2):
        msg = f"keep={keep} as a variance fraction must be in (0, 1]; pass an int for a count"
        with pytest.raises(ValueError, match=whole(msg)):
            cca_similarity(XC, YC, keep=keep)
    for keep in (0, -2):
        with pytest.raises(ValueError, match=whole(f"keep={keep} as a number of directions must be >= 1")):
            cca_similarity(XC, YC, keep=keep)
    msg = "X (3, 8) and Y (3, 7) must share the datapoint axis (columns) for CCA"
    with pytest.raises(ValueError, match=whole(msg)):
        cca_similarity(XC, YC[:, :7])
    msg = "X (8, 3) and Y (7, 3) must share the datapoint axis (rows) for CCA"
    with pytest.raises(ValueError, match=whole(msg)):
        cca_similarity(XC.T, YC[:, :7].T, "col")


# --- magnitude and direction --------------------------------------------------------------------------------------
# W0 = [[3, 0], [4, 1]]: column norms m0 = (5, 1).  ΔW = [[0, 1], [0, 0]] → W = [[3, 1], [4, 1]]: m = (5, √2).
#   ΔM = mean(|5 − 5|, |√2 − 1|) = (√2 − 1)/2
#   ΔD = mean(1 − cos) = mean(0, 1 − (0·1 + 1·1)/(1·√2)) = (1 − 1/√2)/2
#   m0_mean = 3, m_mean = (5 + √2)/2
def test_magnitude_direction_by_hand():
    w0, dw = t([[3, 0], [4, 1]]), t([[0, 1], [0, 0]])
    out = magnitude_direction_change(w0, dw)
    close(out["delta_M"], (math.sqrt(2) - 1) / 2)
    close(out["delta_D"], (1 - 1 / math.sqrt(2)) / 2)
    close(out["m0_mean"], 3.0)
    close(out["m_mean"], (5 + math.sqrt(2)) / 2)
    # a shrinking column counts |m − m0|, not m − m0: W = [[3, 0], [4, 0.5]] → m = (5, 0.5)
    shrink = magnitude_direction_change(w0, t([[0, 0], [0, -0.5]]))
    close(shrink["delta_M"], 0.25)
    close(shrink["delta_D"], 0.0)
    # a flipped column: cos = −1, 1 − cos = 2
    close(magnitude_direction_change(w0, t([[0, 0], [0, -2]]))["delta_D"], 1.0)


# per="row" (DoRA's released code, peft): the same W0, ΔW; row norms m0 = (3, √17), m = (√10, √17).
#   ΔM = (√10 − 3)/2;  row 0: cos = (3·3 + 0·1)/(3·√10) = 3/√10, row 1 unchanged → ΔD = (1 − 3/√10)/2
def test_magnitude_direction_per_row_by_hand():
    out = magnitude_direction_change(t([[3, 0], [4, 1]]), t([[0, 1], [0, 0]]), per="row")
    close(out["delta_M"], (math.sqrt(10) - 3) / 2)
    close(out["delta_D"], (1 - 3 / math.sqrt(10)) / 2)
    close(out["m0_mean"], (3 + math.sqrt(17)) / 2)
    close(out["m_mean"], (math.sqrt(10) + math.sqrt(17)) / 2)
    with pytest.raises(ValueError, match="per='rows': give 'column'"):
        magnitude_direction_change(t([[3, 0], [4, 1]]), t([[0, 1], [0, 0]]), per="rows")


def test_magnitude_direction_batches_and_zero_columns():
    w0 = t([[3, 0], [4, 1]])
    out = magnitude_direction_change(w0, torch.stack([t([[0, 1], [0, 0]]), t([[0, 0], [0, -0.5]])]))
    close(out["delta_M"], [(math.sqrt(2) - 1) / 2, 0.25])
    close(out["m0_mean"], [3.0, 3.0])
    close(out["m_mean"], [(5 + math.sqrt(2)) / 2, 2.75])
    # a zero column stays zero: direction change 0 there, not NaN; a column that leaves zero counts ½
    z = t([[3, 0], [4, 0]])
    close(magnitude_direction_change(z, torch.zeros(2, 2))["delta_D"], 0.0)
    grow = magnitude_direction_change(z, t([[0, 0], [0, 2]]))
    close(grow["delta_D"], 0.25)
    close(grow["delta_M"], 1.0)
    msg = "W0 (2, 2) and delta_W (3, 3) do not have the same shape"
    with pytest.raises(ValueError, match=whole(msg)):
        magnitude_direction_change(w0, torch.zeros(3, 3))


# --- norms, relative change, spectra --------------------------------------------------------------------------------
def test_norms_and_relative_change_by_hand():
    close(frobenius_norm(t([[3, 0], [0, 4]])), 5.0)
    a0 = t([[3, 0], [0, 4]])
    close(relative_change(t([[3, 1], [0, 4]]), a0), 0.2)  # ‖[[0, 1], [0, 0]]‖ / 5
    close(relative_change(t([[[3, 1], [0, 4]], [[0, 0], [0, 0]]]), a0), [0.2, 1.0])
    with pytest.raises(ValueError, match=whole("A (2, 3) and A_init (2, 2) must have the same shape")):
        relative_change(torch.zeros(2, 3), a0)
    msg = "A_init is a zero matrix: the relative change is undefined (was the snapshot a B?)"
    with pytest.raises(ValueError, match=whole(msg)):
        relative_change(torch.ones(2, 2, 2), torch.stack([a0, torch.zeros(2, 2, dtype=F64)]))


def test_singular_spectrum_by_hand():
    # rows: [[1, 0, 0]; [0, 2, 0]] → σ = (2, 1)
    close(singular_spectrum([t([[1, 0, 0]]), t([[0, 2, 0]])]), [2.0, 1.0])
    close(singular_spectrum(torch.stack([t([[1, 0, 0]]), t([[0, 2, 0]])])), [2.0, 1.0])
    # columns: [[1, 1], [0, 0], [0, 0]] → σ = (√2, 0); stacking along rows instead would give (1, 1)
    cols = [t([[1], [0], [0]]), t([[1], [0], [0]])]
    close(singular_spectrum(cols, "col"), [math.sqrt(2), 0.0])
    close(singular_spectrum(torch.stack(cols), "col"), [math.sqrt(2), 0.0])
    # expert axis at -3 with a leading layer axis: (layers=2, N=2, 1, 3)
    layers = torch.stack([torch.stack([t([[1, 0, 0]]), t([[0, 2, 0]])]), torch.stack([t([[1, 0, 0]])] * 2)])
    close(singular_spectrum(layers), [[2.0, 1.0], [math.sqrt(2), 0.0]])
    # broadcasting a batched matrix against a single one
    close(
        singular_spectrum([torch.stack([t([[1, 0, 0]]), t([[0, 0, 5]])]), t([[0, 2, 0]])]),
        [[2.0, 1.0], [5.0, 2.0]],
    )


def test_singular_spectrum_errors():
    with pytest.raises(ValueError, match=whole("a single tensor of experts must be (..., N, m, n)")):
        singular_spectrum(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=whole("singular_spectrum needs at least one matrix")):
        singular_spectrum([])
    msg = "cannot concatenate along rows: the matrices have different numbers of columns: [(1, 3), (1, 4)]"
    with pytest.raises(ValueError, match=whole(msg)):
        singular_spectrum([torch.zeros(1, 3), torch.zeros(1, 4)])
    msg = "cannot concatenate along columns: the matrices have different numbers of rows: [(3, 1), (4, 1)]"
    with pytest.raises(ValueError, match=whole(msg)):
        singular_spectrum([torch.zeros(3, 1), torch.zeros(4, 1)], "col")
    # same rows, different columns is fine for the col side: (3, 1) and (3, 2) → 3 × 3
    close(singular_spectrum([torch.eye(3)[:, :1], torch.eye(3)[:, 1:]], "col"), [1.0, 1.0, 1.0])
    with pytest.raises(
        ValueError, match=whole("matrix 0 must have at least 2 dimensions (..., m, n); got shape (3,)")
    ):
        singular_spectrum([torch.zeros(3)])


def test_every_input_is_named_in_its_error():
    nan = torch.full((2, 2), float("nan"))
    cases = [
        ("X", lambda: frobenius_norm(nan)),
        ("A", lambda: relative_change(nan, torch.eye(2))),
        ("A_init", lambda: relative_change(torch.eye(2), nan)),
        ("W0", lambda: magnitude_direction_change(nan, torch.eye(2))),
        ("X", lambda: compare_subspaces(nan, torch.eye(2))),
        ("Y", lambda: subspace_similarity_grid(torch.eye(2), nan)),
        ("Y", lambda: cca_similarity(torch.eye(2), nan)),
        ("x", lambda: numerical_rank(nan)),
        ("X", lambda: subspace_basis(nan, 1)),
        ("B", lambda: subspace_basis(nan, 1, name="B")),
    ]
    for name, call in cases:
        with pytest.raises(
            ValueError, match=f"^{name} contains non-finite values \\(4 NaN, 0 Inf of 4 entries"
        ):
            call()


def test_size_errors_count_directions_in_a_batch():
    # batched (2, 3, 5) X: 3 singular directions per element (not the 5 of the ambient axis)
    x, y = _batch_with_low_ranks()
    with pytest.raises(ValueError, match=whole("i=4, j=2 exceed the matrices' sizes (3, 2)")):
        compare_subspaces(x, y, i=4)
    with pytest.raises(ValueError, match=whole("i=1, j=3 exceed the matrices' sizes (3, 2)")):
        compare_subspaces(x, y, i=1, j=3)
    cols = compare_subspaces(x.mT, y.mT, "col", i=3, j=1)  # col side: (2, 5, 3) → 3 directions
    close(cols["similarity"], [NAN, 0.36])
    with pytest.raises(ValueError, match=whole("max_i=2, max_j=3 exceed the matrices' sizes (3, 2)")):
        subspace_similarity_grid(x.mT, y.mT, "col", strict=False, max_i=2, max_j=3)


def test_compare_subspaces_strict_names_x_and_counts_directions_per_element():
    x, y = _batch_with_low_ranks()
    msg = (
        "asked for the top 3 row-space directions of X, but its numerical rank is 2 at batch index 0; "
        "use at most 2 (a zero matrix, e.g. an untrained B, has rank 0)."
    )
    with pytest.raises(ValueError, match=whole(msg)):
        compare_subspaces(x, y, i=3, j=1, strict=True)
    # X (2, 3, 5): 3 directions each; Y rows 4·e1, 3·e2, 2·e3, 1·e5 (2, 4, 5): 4 directions. i = j = min(3, 4) = 3:
    # top-3 {e1, e2, e4} vs {e1, e2, e3}: G = diag(1, 1, 0) → φ = 2/3, angles (0, 0, π/2)
    y4 = torch.zeros(4, 5, dtype=F64)
    y4[0, 0], y4[1, 1], y4[2, 2], y4[3, 4] = 4, 3, 2, 1
    both = compare_subspaces(torch.stack([X3, X3]), torch.stack([y4, y4]))
    close(both["similarity"], [2 / 3, 2 / 3])
    close(both["principal_angles"], [[0.0, 0.0, math.pi / 2]] * 2, atol=1e-7)
    assert both["grid"].shape == (2, 3, 4)


def test_principal_angles_is_strict_by_default_and_takes_rtol():
    x, y = _batch_with_low_ranks()
    with pytest.raises(
        ValueError, match=re.escape("top 3 row-space directions of X, but its numerical rank is 2")
    ):
        principal_angles(x, y, 3, 1)
    with pytest.raises(
        ValueError, match=re.escape("top 3 row-space directions of X, but its numerical rank is 2;")
    ):
        principal_angles(X3, Y2, 3, 1, rtol=0.5)  # σ = (3, 2, 1): 1 is not > 0.5·3


def test_angles_of_one_subspace_are_zero_not_nan():
    # Y = M X spans X's row space; the singular values of G come out at 1 + 2.2e-16 for this draw, where
    # arccos alone gives NaN: the clamp to [0, 1] keeps the angle at 0.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 12, generator=g, dtype=F64)
    y = torch.randn(4, 4, generator=g, dtype=F64) @ x
    close(compare_subspaces(x, y)["principal_angles"], [0.0] * 4, atol=1e-7)
    close(principal_angles(x, y, 4, 4), [0.0] * 4, atol=1e-7)
    close(compare_subspaces(x, y)["similarity"], 1.0, atol=1e-12)


def test_svcca_variance_counts_only_directions_within_the_rank():
    # rtol = 0.5 drops σ3 = 1 of XC (σ = 3, 2, 1): variance (9, 4) → fractions (0.692, 1); keep 0.68 → k = 1.
    # Counting the dropped σ3 too would give 9/14 = 0.643 < 0.68 → k = 2 → 0.8.
    close(cca_similarity(XC, YC, keep=0.68, rtol=0.5), 1.0, atol=1e-10)
    # a zero neuron: rank 2 of 3; fractions (9/13, 1): keep 0.5 → k = 1 → 1.0; keep 0.9 → k = 2 → 0.8
    z = torch.stack([3 * H[1], 2 * H[2], 0 * H[3]])
    close(cca_similarity(z, YC, keep=0.5), 1.0, atol=1e-10)
    close(cca_similarity(z, YC, keep=0.9), 0.8, atol=1e-10)
    # fractions per batch element (not of the whole batch's variance): 10·XC has the same fractions as XC
    close(cca_similarity(torch.stack([XC, 10 * XC]), YC, keep=0.9), [0.8, 0.8], atol=1e-10)


def test_batched_wide_matrices_and_empty_batches():
    # the float32 threshold takes max(m, n) of each (m, n) matrix, also behind a batch axis:
    # (1, 2, 100) with σ = (1, 1e-5): 100 · 1.19e-7 = 1.19e-5 → rank 1 (2 · eps32 would count σ2)
    x = torch.zeros(1, 2, 100)
    x[0, 0, 0], x[0, 1, 1] = 1.0, 1e-5
    assert numerical_rank(x).tolist() == [1]
    r = numerical_rank(torch.zeros(2, 3, 0, 4))
    assert r.shape == (2, 3) and r.dtype == torch.long


def test_svcca_stays_within_one_and_rtol_applies_to_each_matrix():
    # Y = M X: every canonical correlation is 1; for this draw the singular values come out up to 1 + 4.4e-16,
    # whose mean exceeds 1 without the clamp. SVCCA is a mean of cosines: at most 1.
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 12, generator=g, dtype=F64)
    y = torch.randn(4, 4, generator=g, dtype=F64) @ x
    c = cca_similarity(x, y, keep=4).item()
    assert 1.0 - 1e-12 < c <= 1.0
    # Y's neurons 3·h1, 2·h3, 1·h2 (σ order h1, h3, h2); rtol 0.5 keeps two directions of each:
    # {h1, h2} vs {h1, h3} → ρ = (1, 0) → 0.5 (all three of either side would give 1)
    y2 = torch.stack([3 * H[1], 2 * H[3], H[2]])
    close(cca_similarity(XC, y2, keep=1.0, rtol=0.5), 0.5, atol=1e-10)
    close(cca_similarity(y2, XC, keep=1.0, rtol=0.5), 0.5, atol=1e-10)
    close(cca_similarity(XC, y2, keep=1.0), 1.0, atol=1e-10)


def test_svcca_names_the_batch_element_of_x():
    # 3 batch elements of one neuron each: the third constant; the index counts batch elements, not neurons
    x = torch.stack([H[1:2], H[2:3], torch.ones(1, 8, dtype=F64)])
    msg = "X at batch index 2 has no variance to correlate (zero matrix, or every neuron constant)"
    with pytest.raises(ValueError, match=whole(msg)):
        cca_similarity(x, H[1:2])
    msg = "X at batch index 1 has no variance to correlate (zero matrix, or every neuron constant)"
    with pytest.raises(ValueError, match=whole(msg)):
        cca_similarity(torch.stack([XC, torch.zeros(3, 8, dtype=F64)]), YC)
    close(cca_similarity(x, H[1:2], strict=False), [1.0, 0.0, NAN], atol=1e-10)


def test_mean_column_norm_of_a_batch_of_w0():
    w0 = t([[3, 0], [4, 1]])  # column norms (5, 1): mean 3; 2·W0: mean 6
    out = magnitude_direction_change(torch.stack([w0, 2 * w0]), torch.zeros(2, 2, dtype=F64))
    close(out["m0_mean"], [3.0, 6.0])
    close(out["m_mean"], [3.0, 6.0])
    close(out["delta_M"], [0.0, 0.0])
