"""The papers' equations written again in plain numpy, from the equations, never from the library code, and
compared with the library on tiny random inputs (d_in = 6, d_out = 5, r = 2, N = 3, batch 2, seq 3).

The scaling is s = alpha / r = 7 / 2 = 3.5 written here as a number, so a dropped or changed alpha / r is
seen (the fused-vs-loop test in test_core.py reads ``cfg.scaling`` from the library). d_in ≠ d_out, so a
shape or a parameter count with the two sides swapped is seen too.

- LoRA (Hu et al. 2021, eq. 3):          y = W0 x + b + s · B A x
- ALoRA (arXiv 2509.25414, §4.1):         y = W0 x + b + s · Σ_i g_i(x) B A_i x        (N A's, one B)
- HydraLoRA (arXiv 2404.19245, eq. 4):    y = W0 x + b + s · Σ_i g_i(x) B_i A x        (one A, N B's)
- MoLoRA (arXiv 2309.05444, §3):          y = W0 x + b + s · Σ_i g_i(x) B_i A_i x
- MALoRA (arXiv 2410.22782):              y = W0 x + b + s · Σ_i g_i(x) B_i P_i S_A x
- Fed-ALoRA-het (arXiv 2509.25414, §4.2): y = W0 x + b + s · (B0 + B2 B1) M A x
- gates: soft g = softmax(W_g x); top-k: the k largest of it, divided by their sum; task: one-hot(t_b).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from asymlora import AsymLoraConfig
from asymlora.analysis.metrics import (
    cca_similarity,
    magnitude_direction_change,
    principal_angles,
    singular_spectrum,
    subspace_similarity,
)
from asymlora.routing import RoutingCall, RoutingState
from asymlora.tuner.layer import Linear

D_IN, D_OUT, R, N, BATCH, SEQ = 6, 5, 2, 3, 2, 3
ALPHA, S = 7.0, 3.5  # s = alpha / r, by hand
D_SUB, R_HAT = 4, 3  # MALoRA with subspace_rank = 4: r̂ = r + (1 − λ) r, λ = 4 / (2·3) -> 2.67 -> 3
D_M = 4  # Fed-ALoRA-het's intermediate rank
TASK_IDS = np.array([2, 0])


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def paper_gate(router: str, x: np.ndarray, w_g: np.ndarray | None, k: int = 2) -> np.ndarray:
    if router == "task":
        g = np.zeros((*x.shape[:-1], N))
        for b, t in enumerate(TASK_IDS):
            g[b, :, t] = 1.0
        return g
    p = softmax(x @ w_g.T)
    if router == "soft":
        return p
    g = np.zeros_like(p)
    for idx in np.ndindex(p.shape[:-1]):
        top = np.argsort(-p[idx])[:k]
        g[idx][top] = p[idx][top] / p[idx][top].sum()
    return g


def expert_update(method: str, t: dict[str, np.ndarray], i: int) -> np.ndarray:
    """Expert i's B_i A_i (d_out × d_in), before s, from the paper's factors."""
    if method == "alora":
        return t["B"] @ t["A"][i]  # the one shared B with A_i
    if method == "hydralora":
        return t["B"][i] @ t["A"]  # B_i with the one shared A
    if method == "molora":
        return t["B"][i] @ t["A"][i]
    if method == "malora":
        return t["B"][i] @ t["A"][i] @ t["S"]  # B_i P_i S_A
    raise ValueError(method)


def paper_delta(method: str, t: dict[str, np.ndarray], x: np.ndarray, g: np.ndarray | None) -> np.ndarray:
    """The adapter term before s, expert by expert."""
    if method == "lora":
        return x @ (t["B"] @ t["A"]).T
    if method == "fedhet":
        return x @ ((t["B0"] + t["B2"] @ t["B1"]) @ t["M"] @ t["A"]).T
    out = np.zeros((*x.shape[:-1], D_OUT))
    for i in range(N):
        out += g[..., i : i + 1] * (x @ expert_update(method, t, i).T)
    return out


def random_layer(method: str, router: str = "soft", seed: int = 0) -> tuple[Linear, dict[str, np.ndarray]]:
    """A float64 layer whose every tensor (base, router, A-side and B-side) is random, and those values."""
    rng = np.random.default_rng(seed)
    cfg = AsymLoraConfig(
        method=method,
        router=router,
        r=R,
        lora_alpha=ALPHA,
        num_experts=N,
        top_k=2,
        subspace_rank=D_SUB,
        intermediate_rank=D_M,
        target_modules=["x"],
    )
    state = RoutingState()
    state.call = RoutingCall(task_ids=torch.from_numpy(TASK_IDS))
    layer = Linear(nn.Linear(D_IN, D_OUT, dtype=torch.float64), "default", cfg, state).double()
    values: dict[str, np.ndarray] = {}
    with torch.no_grad():
        base = layer.get_base_layer()
        for name, p in [("W0", base.weight), ("b", base.bias), *layer.tensors("default").items()]:
            values[name] = rng.standard_normal(tuple(p.shape))
            p.copy_(torch.from_numpy(values[name]))
    return layer, values


CASES = [("lora", "soft"), ("fedhet", "soft")] + [
    (m, r) for m in ("alora", "hydralora", "molora", "malora") for r in ("soft", "topk", "task")
]


@pytest.mark.parametrize(("method", "router"), CASES)
def test_forward_is_the_papers_equation(method: str, router: str) -> None:
    layer, t = random_layer(method, router)
    x = np.random.default_rng(1).standard_normal((BATCH, SEQ, D_IN))
    g = None if method in ("lora", "fedhet") else paper_gate(router, x, t.get("router"))
    want = x @ t["W0"].T + t["b"] + S * paper_delta(method, t, x, g)
    got = layer(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


# Shapes of each tensor and the trainable-parameter count per layer, by hand (docs/design.md §3, §4), with
# d_in = 6 ≠ d_out = 5. Router W_g: N × d_in = 18.
SHAPES = {
    "lora": ({"A": (2, 6), "B": (5, 2)}, 2 * (6 + 5)),  # 22
    "alora": ({"A": (3, 2, 6), "B": (5, 2), "router": (3, 6)}, 3 * 2 * 6 + 2 * 5 + 18),  # 36 + 10 + 18
    "hydralora": ({"A": (2, 6), "B": (3, 5, 2), "router": (3, 6)}, 2 * 6 + 3 * 2 * 5 + 18),  # 12 + 30 + 18
    "molora": ({"A": (3, 2, 6), "B": (3, 5, 2), "router": (3, 6)}, 3 * 2 * (6 + 5) + 18),  # 66 + 18
    # d_sub·d_in + N(r̂·d_sub + d_out·r̂) + N·d_in = 24 + 3·(12 + 15) + 18
    "malora": ({"S": (4, 6), "A": (3, 3, 4), "B": (3, 5, 3), "router": (3, 6)}, 24 + 81 + 18),
    # r·d_in + d_m·r + r·d_m + d_out·r trainable = 12 + 8 + 8 + 10; B0 (d_out × d_m = 20) frozen
    "fedhet": ({"A": (2, 6), "M": (4, 2), "B1": (2, 4), "B2": (5, 2), "B0": (5, 4)}, 12 + 8 + 8 + 10),
}


@pytest.mark.parametrize("method", sorted(SHAPES))
def test_shapes_and_trainable_counts_by_hand(method: str) -> None:
    layer, _ = random_layer(method)
    shapes, trainable = SHAPES[method]
    assert {k: tuple(v.shape) for k, v in layer.tensors("default").items()} == shapes
    got = sum(p.numel() for n, p in layer.named_parameters() if p.requires_grad and "asymlora_" in n)
    assert got == trainable
    frozen = sum(p.numel() for n, p in layer.named_parameters() if not p.requires_grad and "asymlora_" in n)
    assert frozen == (20 if method == "fedhet" else 0)


@pytest.mark.parametrize("method", ["alora", "hydralora", "molora", "malora"])
def test_task_update_is_s_times_b_a_of_that_expert(method: str) -> None:
    layer, t = random_layer(method, "task")
    for task in range(N):
        want = expert_update(method, t, task)
        got = layer.task_delta_weight("default", task).detach().numpy()
        np.testing.assert_allclose(got, S * want, rtol=0, atol=1e-12)


def test_plain_lora_merge_and_unmerge_in_float64() -> None:
    # W ← W0 + s·B A exactly (a float64 model merges in float64, not through float32), and back
    layer, t = random_layer("lora")
    x = torch.from_numpy(np.random.default_rng(2).standard_normal((BATCH, SEQ, D_IN)))
    before = layer(x).detach().numpy()
    layer.merge()
    np.testing.assert_allclose(
        layer.get_base_layer().weight.detach().numpy(), t["W0"] + S * t["B"] @ t["A"], rtol=0, atol=1e-12
    )
    np.testing.assert_allclose(layer(x).detach().numpy(), before, rtol=0, atol=1e-12)
    layer.unmerge()
    np.testing.assert_allclose(layer.get_base_layer().weight.detach().numpy(), t["W0"], rtol=0, atol=1e-12)


# --- analysis metrics against scipy / numpy --------------------------------------------------------------------
def test_subspace_similarity_and_angles_against_scipy() -> None:
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((3, 7)), rng.standard_normal((4, 7))  # A-side: row spaces in R^7
    vx, vy = np.linalg.svd(x)[2], np.linalg.svd(y)[2]
    for i, j in [(1, 1), (2, 3), (3, 4), (3, 2)]:
        ux, uy = vx[:i].T, vy[:j].T  # top-i / top-j right singular vectors
        theta = np.sort(scipy.linalg.subspace_angles(ux, uy))  # min(i, j) angles
        phi = np.linalg.norm(ux.T @ uy) ** 2 / min(i, j)  # Hu et al. §7.2
        assert float(subspace_similarity(torch.from_numpy(x), torch.from_numpy(y), i, j)) == pytest.approx(
            phi
        )
        assert phi == pytest.approx(np.mean(np.cos(theta) ** 2))
        got = principal_angles(torch.from_numpy(x), torch.from_numpy(y), i, j).numpy()
        np.testing.assert_allclose(got, theta, rtol=0, atol=1e-7)
    # B-side: column spaces in R^7 (left singular vectors)
    bx, by = rng.standard_normal((7, 3)), rng.standard_normal((7, 2))
    phi = np.linalg.norm(np.linalg.svd(bx)[0][:, :2].T @ np.linalg.svd(by)[0][:, :2]) ** 2 / 2
    got = float(subspace_similarity(torch.from_numpy(bx), torch.from_numpy(by), 2, 2, side="col"))
    assert got == pytest.approx(phi)


def svcca(x: np.ndarray, y: np.ndarray, keep: float | int) -> float:
    """Raghu et al. 2017: centre each neuron (row) over the datapoints, keep the top directions of its SVD,
    then the mean canonical correlation of the reduced sets (cosines of their principal angles)."""

    def reduce(z: np.ndarray) -> np.ndarray:
        z = z - z.mean(1, keepdims=True)
        _, s, vt = np.linalg.svd(z, full_matrices=False)
        k = keep if isinstance(keep, int) else int(np.searchsorted(np.cumsum(s**2) / np.sum(s**2), keep) + 1)
        return s[:k, None] * vt[:k]

    return float(np.mean(np.cos(scipy.linalg.subspace_angles(reduce(x).T, reduce(y).T))))


@pytest.mark.parametrize("keep", [0.9, 1.0, 2, 3])
def test_cca_similarity_against_numpy_svcca(keep: float | int) -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((5, 30))
    y = 0.5 * x[:3] + rng.standard_normal((3, 30))  # related but not equal
    got = float(cca_similarity(torch.from_numpy(x), torch.from_numpy(y), keep=keep))
    assert got == pytest.approx(svcca(x, y, keep), abs=1e-10)


def test_magnitude_direction_change_per_column_against_numpy() -> None:
    # DoRA §3 with W ∈ R^{d_out × d_in}: one magnitude and one direction per column (input feature)
    rng = np.random.default_rng(5)
    w0, dw = rng.standard_normal((5, 4)), 0.3 * rng.standard_normal((5, 4))
    w = w0 + dw
    m0, m = np.linalg.norm(w0, axis=0), np.linalg.norm(w, axis=0)
    res = magnitude_direction_change(torch.from_numpy(w0), torch.from_numpy(dw))
    assert float(res["delta_M"]) == pytest.approx(np.mean(np.abs(m - m0)))
    assert float(res["delta_D"]) == pytest.approx(np.mean(1 - (w * w0).sum(0) / (m * m0)))


def test_singular_spectrum_of_the_concatenated_experts() -> None:
    rng = np.random.default_rng(6)
    a, b = rng.standard_normal((3, 2, 6)), rng.standard_normal((3, 5, 2))
    want_a = np.linalg.svd(np.concatenate(list(a), 0), compute_uv=False)  # [A_1; A_2; A_3]: 6 × 6
    want_b = np.linalg.svd(np.concatenate(list(b), 1), compute_uv=False)  # [B_1, B_2, B_3]: 5 × 6
    np.testing.assert_allclose(singular_spectrum(torch.from_numpy(a)).numpy(), want_a, atol=1e-12)
    np.testing.assert_allclose(singular_spectrum(torch.from_numpy(b), side="col").numpy(), want_b, atol=1e-12)
