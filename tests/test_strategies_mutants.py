"""`asymlora.federated.strategies` and the round functions of `asymlora.federated.client` on hand-computed
values (mutation tests): the server's norm check (`update_norm`, `norm_outliers`, `aggregate(norm_factor=…)`),
Fed-ALoRA-het's ``het_local="persist"`` (only B2 is reset; round 1 draws A, M, B1 from the seed), and the
fresh draw of `client._fresh` (float32 whatever torch's default dtype; the client's cfg reaches the
method's init). docs/testing.md, "Mutation results: federated/strategies.py", lists what these tests kill.

No model is built: role maps are made by hand, so every test runs in milliseconds.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from asymlora import AsymLoraConfig, Role
from asymlora.federated import (
    Rejection,
    Select,
    Strategy,
    TensorInfo,
    aggregate,
    client_round_start,
    get_strategy,
)
from asymlora.federated.client import _local_start
from asymlora.federated.strategies import norm_outliers, update_norm
from asymlora.methods.fedhet import B0_NAME, B1_NAME, B2_NAME, M_NAME


def info(
    name: str, tensor: str, role: Role, shape, trainable: bool = True, method: str = "lora"
) -> TensorInfo:
    return TensorInfo(name, "layer", "default", method, tensor, role, tuple(shape), trainable)


def t(rows) -> Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# --- the server's norm check ----------------------------------------------------------------------------
def test_update_norm_by_hand_for_each_aggregation() -> None:
    # mean: Δ = upload − server over all tensors together. x: (0, 0, 0, −3), y: (4, 0) → √(9 + 16) = 5
    # (wrong variants: Σ Δ³ = −27 + 64 = 37; only the last tensor: 4; the server added: (2, 2, 2, −1), …)
    server = {"x": t([[1, 1], [1, 1]]), "y": t([[0, 0]])}
    assert update_norm("mean", {"x": t([[1, 1], [1, -2]]), "y": t([[4, 0]])}, server) == 5.0
    # zeropad: a rank-1 A minus the server's rank-2 A truncated to its first row: (4, 5, 1) − (1, 1, 1) = (3, 4, 0)
    server_a = {"a": t([[1, 1, 1], [5, 5, 5]])}
    assert update_norm("zeropad", {"a": t([[4, 5, 1]])}, server_a) == 5.0
    # accumulate: the increment B2·B1 is already the change of B0; the server's B0 (all 7) does not enter
    assert update_norm("accumulate", {"b0": t([[3, 0], [0, -4]])}, {"b0": torch.full((2, 2), 7.0)}) == 5.0
    assert update_norm("mean", {}, {}) == 0.0


def test_norm_outliers_by_hand_and_its_refusals() -> None:
    norms = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 10.0}  # median (2 + 3) / 2 = 2.5
    # 3.9 × 2.5 = 9.75 < 10: d is refused; 4 × 2.5 = 10 is not exceeded (strictly greater)
    assert norm_outliers(norms, 3.9) == [
        Rejection("d", "update norm 10 exceeds reject.norm_factor=3.9 × the round's median 2.5")
    ]
    assert norm_outliers(norms, 4) == []
    # a factor between 1 and 2 is valid: median of (1, 1, 2) is 1, 1.5 × 1 < 2
    assert norm_outliers({"x": 1.0, "y": 1.0, "z": 2.0}, 1.5) == [
        Rejection("z", "update norm 2 exceeds reject.norm_factor=1.5 × the round's median 1")
    ]
    assert norm_outliers({}, 10) == []
    for bad in (1, 0.5, 0, -3, math.inf, math.nan, True, "10", None):
        with pytest.raises(ValueError) as refused:
            norm_outliers(norms, bad)  # type: ignore[arg-type]
        assert str(refused.value) == f"norm factor {bad!r} must be a finite number > 1 (e.g. 10)"


def test_aggregate_with_a_norm_factor_rejects_the_outlier_among_the_valid_updates() -> None:
    """fedit, one tensor b = [[1, 1]] on the server. Valid updates p, q, r with Δ = (0, 1), (2, 0), (0, 200)
    (norms 1, 2, 200), n = 1, 3, 4; s sends NaN (refused before the norm check, so not in the median).
    Median of (1, 2, 200) = 2; 200 > 10 × 2: r is refused. p, q remain with p_k = 1/4, 3/4:
    b = 1/4 · (1, 2) + 3/4 · (3, 1) = (2.5, 1.25)."""
    roles = {"b": info("b", "B", Role.B, (1, 2))}
    server = {"b": t([[1, 1]])}
    updates = [
        ({"b": t([[1, 2]])}, 1),
        ({"b": t([[3, 1]])}, 3),
        ({"b": t([[1, 201]])}, 4),
        ({"b": t([[math.nan, 1]])}, 1),
    ]
    res = aggregate(get_strategy("fedit"), server, updates, roles, list("pqrs"), norm_factor=10)
    assert res.norms == {"p": 1.0, "q": 2.0, "r": 200.0}
    assert res.rejected == [
        Rejection("s", "b contains NaN or Inf", "b"),
        Rejection("r", "update norm 200 exceeds reject.norm_factor=10 × the round's median 2"),
    ]
    assert res.accepted == ["p", "q"] and res.weights == {"p": 0.25, "q": 0.75}
    assert torch.equal(res.state["b"], t([[2.5, 1.25]]))
    # without the check all three valid updates count: b = (1·(1, 2) + 3·(3, 1) + 4·(1, 201)) / 8 = (14, 809) / 8
    off = aggregate(get_strategy("fedit"), server, updates, roles, list("pqrs"))
    assert off.norms == {} and off.accepted == ["p", "q", "r"]
    assert torch.equal(off.state["b"], t([[14 / 8, 809 / 8]]))


def het_roles(r: int = 1, d_out: int = 1, d_m: int = 2, d_in: int = 3) -> dict[str, TensorInfo]:
    """One fedhet layer: A (r, d_in), M (d_m, r), B1 (r, d_m), B2 (d_out, r), frozen B0 (d_out, d_m)."""
    return {
        "A": info("A", "A", Role.A, (r, d_in), method="fedhet"),
        "M": info("M", M_NAME, Role.A, (d_m, r), method="fedhet"),
        "B1": info("B1", B1_NAME, Role.B, (r, d_m), method="fedhet"),
        "B2": info("B2", B2_NAME, Role.B, (d_out, r), method="fedhet"),
        "B0": info("B0", B0_NAME, Role.B, (d_out, d_m), trainable=False, method="fedhet"),
    }


def test_aggregate_with_a_norm_factor_under_accumulate_measures_the_increment() -> None:
    """fedalora-het, B0 = [[1, 1]]. Increments (products under B0's name) (3, 4), (0, 6), (0, 700): norms
    5, 6, 700 (the server's B0 is not subtracted), median 6, 700 > 10 × 6 → the third is refused.
    B0 ← B0 + (1/2)(3, 4) + (1/2)(0, 6) = (2.5, 6)."""
    roles = het_roles()
    server = {"B0": t([[1, 1]])}
    updates = [({"B0": t([[3, 4]])}, 1), ({"B0": t([[0, 6]])}, 1), ({"B0": t([[0, 700]])}, 1)]
    res = aggregate(get_strategy("fedalora-het"), server, updates, roles, norm_factor=10)
    assert res.norms == {0: 5.0, 1: 6.0, 2: 700.0}
    assert res.rejected == [
        Rejection(2, "update norm 700 exceeds reject.norm_factor=10 × the round's median 6")
    ]
    assert res.accepted == [0, 1] and torch.equal(res.state["B0"], t([[2.5, 6]]))


# --- Fed-ALoRA-het: het_local="persist" -----------------------------------------------------------------
def test_fedalora_het_persist_resets_only_b2() -> None:
    roles = het_roles()
    fresh, persist = get_strategy("fedalora-het"), get_strategy("fedalora-het", het_local="persist")
    assert (fresh.het_local, persist.het_local) == ("fresh", "persist")
    assert fresh.reset.names(roles) == ["A", "M", "B1", "B2"]
    assert persist.reset.names(roles) == ["B2"]  # only the outer factor: B2·B1 = 0 at the round's start
    assert persist.reset == Select(frozenset({Role.B}), True, frozenset({B2_NAME}))
    for s in (fresh, persist):
        assert s.shared.names(roles) == ["B0"] and s.local.names(roles) == ["A", "M", "B1", "B2"]
        assert (s.reset_to, s.aggregation, s.method, s.heterogeneous) == (
            "fresh",
            "accumulate",
            "fedhet",
            True,
        )
    assert (
        persist.description == "Fed-ALoRA (heterogeneous ranks): B0 <- B0 + sum p_k B2_k B1_k (A, M, B1 kept)"
    )
    with pytest.raises(ValueError) as refused:
        get_strategy("fedalora-het", het_local="keep")  # type: ignore[arg-type]
    assert str(refused.value) == "het_local='keep' is invalid; choose 'fresh' or 'persist'"


def het_cfg(**kw) -> AsymLoraConfig:
    return AsymLoraConfig(
        method="fedhet", r=1, lora_alpha=2, intermediate_rank=2, target_modules=["q_proj"], **kw
    )


def kaiming_draws(seed: int, *shapes: tuple[int, int]) -> list[Tensor]:
    """Kaiming-uniform with a = √5 by hand: gain √(2 / (1 + 5)) = 1/√3, bound √3 · gain / √fan_in = 1/√fan_in
    (fan_in = the number of columns), drawn one after the other in float32 from a generator seeded ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return [
        torch.empty(s, dtype=torch.float32).uniform_(-(s[1] ** -0.5), s[1] ** -0.5, generator=g)
        for s in shapes
    ]


def het_state() -> dict[str, Tensor]:
    return {
        "A": t([[1, 1, 1]]),
        "M": t([[2], [2]]),
        "B1": t([[3, 3]]),
        "B2": t([[4]]),
        "B0": t([[5, 5]]),
    }


def test_client_round_start_under_persist_zeroes_b2_and_keeps_a_m_b1() -> None:
    roles, state = het_roles(), het_state()
    received = {"B0": t([[7, 8]])}
    new = client_round_start(
        get_strategy("fedalora-het", het_local="persist"), state, received, roles, cfg=het_cfg(), seed=3
    )
    assert {n: v.tolist() for n, v in new.items()} == {
        "A": [[1, 1, 1]],
        "M": [[2], [2]],
        "B1": [[3, 3]],
        "B2": [[0]],  # fedhet's init zeroes B2
        "B0": [[7, 8]],  # the server's
    }
    # fresh: A (1 × 3, bound 1/√3), M (2 × 1, bound 1), B1 (1 × 2, bound 1/√2) drawn in this order from seed 3
    new = client_round_start(get_strategy("fedalora-het"), state, received, roles, cfg=het_cfg(), seed=3)
    a, m, b1 = kaiming_draws(3, (1, 3), (2, 1), (1, 2))
    assert torch.equal(new["A"], a) and torch.equal(new["M"], m) and torch.equal(new["B1"], b1)
    assert new["B2"].tolist() == [[0]] and new["B0"].tolist() == [[7, 8]]


def test_local_start_of_round_one_under_persist_draws_a_m_b1_from_the_seed() -> None:
    roles, init = het_roles(), het_state()
    persist = get_strategy("fedalora-het", het_local="persist")
    torch.manual_seed(123)  # the global generator does not enter
    start = _local_start(persist, None, init, roles, het_cfg(), seed=11)
    a, m, b1 = kaiming_draws(11, (1, 3), (2, 1), (1, 2))
    assert torch.equal(start["A"], a) and torch.equal(start["M"], m) and torch.equal(start["B1"], b1)
    assert start["B2"].tolist() == [[0]] and start["B0"].tolist() == [[5, 5]]  # B0: the shared init's
    double = _local_start(persist, None, {n: v.double() for n, v in init.items()}, roles, het_cfg(), seed=11)
    assert double["A"].dtype == torch.float64 and torch.equal(double["A"], a.double())
    # carried local tensors win over the draw (B0 is not local: it stays the init's)
    carried = {n: v + 10 for n, v in init.items()}
    kept = _local_start(persist, carried, init, roles, het_cfg(), seed=11)
    assert {n: v.tolist() for n, v in kept.items()} == {
        "A": [[11, 11, 11]],
        "M": [[12], [12]],
        "B1": [[13, 13]],
        "B2": [[14]],
        "B0": [[5, 5]],
    }
    # fresh: nothing drawn here (client_round_start draws every round)
    same = _local_start(get_strategy("fedalora-het"), None, init, roles, het_cfg(), seed=11)
    assert {n: v.tolist() for n, v in same.items()} == {n: v.tolist() for n, v in init.items()}


# --- the fresh draw ------------------------------------------------------------------------------------------
def test_fresh_draw_is_float32_whatever_the_default_dtype() -> None:
    """The draw is made in float32 (the bits every client and the server agree on) and only then cast to the
    client's dtype, also when torch's default dtype is float64 (a float64 draw gives other numbers)."""
    roles, state = het_roles(), het_state()
    a, m, b1 = kaiming_draws(3, (1, 3), (2, 1), (1, 2))
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        new = client_round_start(
            get_strategy("fedalora-het"), state, {"B0": t([[7, 8]])}, roles, cfg=het_cfg(), seed=3
        )
        start = _local_start(
            get_strategy("fedalora-het", het_local="persist"), None, state, roles, het_cfg(), 3
        )
    finally:
        torch.set_default_dtype(old)
    for got in (new, start):
        assert got["A"].dtype == torch.float32
        assert torch.equal(got["A"], a) and torch.equal(got["M"], m) and torch.equal(got["B1"], b1)


def test_fresh_reset_of_malora_reads_beta_from_the_client_cfg() -> None:
    """A strategy that redraws MALoRA's A side (S, P) every round. With d_sub = d_in = 4 the cropped SVD keeps
    every direction: S = β·Vᵀ with V orthogonal, so S·Sᵀ = β²·I = 1.5625·I at β = 1.25, and P_i·S = K_i, the
    experts' Kaiming draws (2 × 4 each, bound 1/√4 = 1/2, expert 0 then expert 1, from the seed)."""
    roles = {
        "S": info("S", "S", Role.A, (4, 4), method="malora"),
        "P": info("P", "A", Role.A, (2, 2, 4), method="malora"),
        "B": info("B", "B", Role.B, (2, 3, 2), method="malora"),
    }
    cfg = AsymLoraConfig(
        method="malora",
        r=2,
        num_experts=2,
        subspace_rank=4,
        expert_rank=2,
        beta=1.25,
        target_modules=["q_proj"],
    )
    a_side = Select(frozenset({Role.A}))
    s = Strategy("redraw-a", shared=Select(frozenset({Role.B})), local=a_side, reset=a_side, reset_to="fresh")
    state = {"S": torch.zeros(4, 4), "P": torch.zeros(2, 2, 4), "B": torch.zeros(2, 3, 2)}
    new = client_round_start(s, state, {"B": torch.ones(2, 3, 2)}, roles, cfg=cfg, seed=7)
    torch.testing.assert_close(new["S"] @ new["S"].T, 1.5625 * torch.eye(4), rtol=0, atol=1e-5)
    k = kaiming_draws(7, (2, 4), (2, 4))
    for i in range(2):
        torch.testing.assert_close(new["P"][i] @ new["S"], k[i], rtol=0, atol=1e-5)
    assert torch.equal(new["B"], torch.ones(2, 3, 2))
