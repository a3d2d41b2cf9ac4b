"""Client-level DP of the uploads (`asymlora.federated.privacy`): Flower's clipping against hand values,
the noise std of the aggregate against σ = z·C/m, ε against Opacus's RDP analysis and a published value,
config errors, and a 2-client simulation (server- and client-side clipping) that records ε."""

from __future__ import annotations

import os

os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from asymlora.config import ConfigError
from asymlora.federated.config import load_fed_config
from asymlora.federated.privacy import (
    PrivacyAccountant,
    PrivacySettings,
    add_noise,
    clip_update,
    noise_multiplier_for,
    noise_std,
)


# --- clipping ---------------------------------------------------------------------------------------------
def test_clipping_scales_the_update_to_the_norm_by_hand() -> None:
    """Update (3, 4) + (0, 0, 12) from a reference: norm 13; clipped to C = 6.5 it is halved."""
    ref = [np.array([1.0, 1.0]), np.array([2.0, 2.0, 2.0])]
    upd = [np.array([4.0, 5.0]), np.array([2.0, 2.0, 14.0])]
    norm = clip_update(upd, ref, 6.5)
    assert norm == pytest.approx(13.0)
    np.testing.assert_allclose(upd[0], [2.5, 3.0])  # 1 + 3/2, 1 + 4/2
    np.testing.assert_allclose(upd[1], [2.0, 2.0, 8.0])  # 2 + 12/2
    small = [np.array([1.5, 1.0]), np.array([2.0, 2.0, 2.0])]  # norm 0.5 < C: unchanged
    assert clip_update(small, ref, 6.5) == pytest.approx(0.5)
    np.testing.assert_array_equal(small[0], [1.5, 1.0])


def _unit(shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g)


def test_server_clipping_of_each_aggregation() -> None:
    """mean: Δ = upload − server; zeropad: Δ against the server truncated to the client's rank (rank 2 of
    4); fedalora-het: the increment B2·B1 itself (factors are multiplied first). Each Δ of norm 10 is
    scaled to C = 2 along its own direction; the example count becomes 1 (equal weights)."""
    from tests.test_fed_strategies import adapted, by_tensor

    from asymlora.federated.privacy import privatize_updates
    from asymlora.federated.strategies import get_strategy

    dp = PrivacySettings(clipping="server", noise_multiplier=1.0, clipping_norm=2.0)
    for name, method, r in (("fedit", "lora", 2), ("zeropad", "lora", 4), ("fedalora-het", "fedhet", 2)):
        strategy = get_strategy(name)
        _, roles, state = adapted(method, r=r, d_m=4)
        server = {n: state[n].clone() for n in strategy.shared.names(roles)}
        if name == "fedalora-het":
            b2, b1 = by_tensor(roles, "B2"), by_tensor(roles, "B1")
            f2, f1 = _unit(state[b2].shape, 1), _unit(state[b1].shape, 2)
            prod = f2 @ f1
            f2 *= 10 / prod.norm().item()
            upload, delta = {b2: f2, b1: f1}, {by_tensor(roles, "B0"): f2 @ f1}
        else:
            delta = {}
            for k, v in server.items():
                shape = (*v.shape[:-1], 2) if name == "zeropad" and roles[k].tensor == "B" else v.shape
                shape = (2, *v.shape[1:]) if name == "zeropad" and roles[k].tensor == "A" else shape
                delta[k] = _unit(shape, len(delta))
            scale = 10 / math.sqrt(sum(float((d**2).sum()) for d in delta.values()))
            delta = {k: d * scale for k, d in delta.items()}
            upload = {k: v[tuple(slice(0, s) for s in delta[k].shape)] + delta[k] for k, v in server.items()}
        out = privatize_updates(dp, strategy, server, [(upload, 300)], roles, ["c0"])
        ((got, n),) = out.updates
        assert n == 1 and out.norms["c0"] == pytest.approx(10.0, rel=1e-5), name
        for k, d in delta.items():
            base = (
                torch.zeros_like(d)
                if name == "fedalora-het"
                else server[k][tuple(slice(0, s) for s in d.shape)]
            )
            torch.testing.assert_close(got[k] - base, d * 0.2, rtol=1e-4, atol=1e-6)


def test_client_side_het_factors_are_scaled_by_the_square_root() -> None:
    """Client-side clipping of the factors B2, B1: each is scaled by √s so that B2·B1 is scaled by s."""
    from asymlora.federated.privacy import clip_upload_locally

    b2n, b1n = "m.asymlora_B2.default", "m.asymlora_B1.default"
    f2, f1 = _unit((6, 2), 1), _unit((2, 4), 2)
    norm = float((f2 @ f1).norm())
    out = clip_upload_locally("accumulate", {b2n: f2, b1n: f1}, {}, norm / 4)
    torch.testing.assert_close(out[b2n], f2 / 2) and torch.testing.assert_close(out[b1n], f1 / 2)
    torch.testing.assert_close(float((out[b2n] @ out[b1n]).norm()), norm / 4, rtol=1e-5, atol=0)


# --- noise ---------------------------------------------------------------------------------------------------
def test_noise_std_of_the_aggregate_matches_z_c_over_m() -> None:
    """σ = z·C/m (Flower's formula; by hand 1.5 · 2 / 4 = 0.75). The sample std of 2·10⁵ draws lies within
    5 standard errors of σ: (n−1)s²/σ² ~ χ²(n−1), so s/σ ≈ 1 ± 1/√(2n) (0.0016 here)."""
    assert noise_std(1.5, 2.0, 4) == 0.75
    state = {"a": torch.zeros(400, 300), "b": torch.zeros(200, 400)}
    noisy = add_noise(state, 0.75, seed=11)
    values = torch.cat([v.flatten() for v in noisy.values()]).double()
    n = values.numel()
    assert abs(values.std().item() / 0.75 - 1) < 5 / math.sqrt(2 * n)
    assert abs(values.mean().item()) < 5 * 0.75 / math.sqrt(n)
    torch.testing.assert_close(add_noise(state, 0.75, seed=11)["a"], noisy["a"])  # seeded: reproducible
    before = np.random.get_state()[1].copy()
    add_noise(state, 0.75, seed=5)
    np.testing.assert_array_equal(np.random.get_state()[1], before)  # NumPy's global generator restored


# --- accounting ---------------------------------------------------------------------------------------------
def _rdp_epsilon_by_hand(z: float, rounds: int, delta: float) -> float:
    """RDP of T Gaussian mechanisms (sample rate 1): T·α/(2z²) (Mironov 2017, Prop. 7), converted with
    Balle et al. 2020 Thm 21, minimised over Opacus's default orders."""
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    return min(
        rounds * a / (2 * z * z) - (math.log(delta) + math.log(a)) / (a - 1) + math.log((a - 1) / a)
        for a in orders
    )


def _exact_gaussian_epsilon(z: float, rounds: int, delta: float) -> float:
    """The exact ε of T Gaussian mechanisms = one of multiplier z/√T (Balle & Wang 2018, Thm 8), by bisection."""
    from scipy.stats import norm

    mu = math.sqrt(rounds) / z

    def delta_of(eps: float) -> float:
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)

    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_of(mid) > delta else (lo, mid)
    return hi


@pytest.mark.parametrize(("z", "rounds"), [(1.0, 3), (1.1, 10), (0.5, 2), (4.0, 50)])
def test_accountant_epsilon_against_rdp_by_hand_and_the_exact_gaussian(z: float, rounds: int) -> None:
    acc = PrivacyAccountant(z, 1e-5)
    assert acc.epsilon() == 0.0
    for _ in range(rounds):
        acc.step()
    eps = acc.epsilon()
    assert eps == pytest.approx(_rdp_epsilon_by_hand(z, rounds, 1e-5), rel=1e-9)
    exact = _exact_gaussian_epsilon(z, rounds, 1e-5)
    assert exact <= eps <= 1.35 * exact  # RDP is an upper bound, and not a loose one here
    assert PrivacyAccountant(z, 1e-5, releases=rounds).epsilon() == eps  # resume: same ε
    assert PrivacyAccountant(0.0, 1e-5, releases=1).epsilon() == math.inf


def test_target_epsilon_gives_the_smallest_noise_that_reaches_it() -> None:
    dp = PrivacySettings(clipping="server", target_epsilon=8.0, delta=1e-5)
    z = noise_multiplier_for(dp, 3)
    assert PrivacyAccountant(z, 1e-5, releases=3).epsilon() <= 8.0
    assert PrivacyAccountant(z * 0.98, 1e-5, releases=3).epsilon() > 8.0 - 0.01
    assert 1.0 < z < 1.2  # exact Gaussian at z = 1.1, T = 3: ε ≈ 7.2; RDP's bound is a bit above


# --- configuration ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["dp.clipping=server", "dp.noise_multiplier=1", "dp.clipping_norm=0"],
            r"dp.clipping_norm=0.0 must be",
        ),
        (
            ["dp.clipping=client", "dp.noise_multiplier=1", "dp.clipping_norm=-1"],
            r"dp.clipping_norm=-1.0 must",
        ),
        (
            ["dp.clipping=server", "dp.target_epsilon=1e-6"],
            r"dp.target_epsilon=1e-06 is out of reach.*rounds=3",
        ),
        (["dp.clipping=server"], "give exactly one of dp.noise_multiplier"),
        (["dp.clipping=server", "dp.noise_multiplier=1", "dp.target_epsilon=8"], "give exactly one"),
        (["dp.clipping=server", "dp.noise_multiplier=-0.5"], r"dp.noise_multiplier=-0.5 must be >= 0"),
        (["dp.clipping=server", "dp.noise_multiplier=1", "dp.delta=1"], r"dp.delta=1.0 must lie in \(0, 1\)"),
        (["dp.clipping=always"], "dp.clipping"),
        (["dp.target_epsilon=8"], "dp.clipping='off' but dp.noise_multiplier / dp.target_epsilon is set"),
        # infinite noise made every client's loss NaN from round 2 on, and the run still exited 0
        (["dp.clipping=server", "dp.noise_multiplier=inf"], r"dp.noise_multiplier=inf must be finite"),
        # Opacus answers ε = ∞ with its starting z = 10: heavy noise for a user who asked for none
        (
            ["dp.clipping=server", "dp.target_epsilon=inf"],
            r"dp.target_epsilon=inf must be finite.*noise_multiplier=0",
        ),
        # the server seeds round r's noise with noise_seed + r: NumPy refused it after round 1 had trained
        (
            ["dp.clipping=server", "dp.noise_multiplier=1", "dp.noise_seed=-5"],
            r"dp.noise_seed=-5 must lie in \[0, 4294967292\]",
        ),
        (
            ["dp.clipping=server", "dp.noise_multiplier=1", "dp.noise_seed=4294967293"],
            r"dp.noise_seed=4294967293 must lie",
        ),
        # z² underflows / overflows in Opacus: the server failed after round 1 (ZeroDivisionError, OverflowError)
        (
            ["dp.clipping=server", "dp.noise_multiplier=1e-300"],
            r"dp.noise_multiplier=1e-300 .* is out of range",
        ),
        (
            ["dp.clipping=client", "dp.noise_multiplier=1e200"],
            r"dp.noise_multiplier=1e\+200 .* is out of range",
        ),
        # σ = z·C overflows float32: inf in the shared tensors, every later round failed, and the run exited 0
        (
            ["dp.clipping=server", "dp.noise_multiplier=1e30", "dp.clipping_norm=1e9"],
            r"dp.noise_multiplier=1e\+30 with dp.clipping_norm=1e\+09 is out of range",
        ),
    ],
)
def test_bad_dp_config_is_named_before_round_one(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_fed_config("configs/fed_bigbench_homo.yaml", ["rounds=3", *overrides])


def test_out_of_range_noise_multipliers_are_what_the_server_failed_on() -> None:
    """The z refused above: Opacus cannot compute their ε, or float32 cannot hold their noise; the nearest
    accepted ones work."""
    for z, error in ((1e-300, ZeroDivisionError), (1e200, OverflowError)):
        with pytest.raises(error):
            PrivacyAccountant(z, 1e-5, releases=3).epsilon()
    assert not torch.isfinite(add_noise({"w": torch.zeros(4)}, 1e39, seed=0)["w"]).any()
    assert noise_multiplier_for(PrivacySettings(clipping="server", noise_multiplier=1e-100), 3) == 1e-100
    assert noise_multiplier_for(PrivacySettings(clipping="server", noise_multiplier=1e20), 3) == 1e20


@pytest.mark.parametrize("target", [1e14, 1e300])
def test_a_huge_target_epsilon_resolves_instead_of_hanging(target: float) -> None:
    """Opacus bisects until ε is within an absolute 0.01 of the target, which floats cannot resolve at
    ε ≳ 10^14: `asymlora fed` hung before round 1. The z found is checked against RDP by hand."""
    import signal

    def timeout(*_):
        raise TimeoutError(f"dp.target_epsilon={target:g} did not resolve in 30 s")

    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(30)
    try:
        z = noise_multiplier_for(PrivacySettings(clipping="server", target_epsilon=target), 3)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert _rdp_epsilon_by_hand(z, 3, 1e-5) <= target < _rdp_epsilon_by_hand(z * 0.999, 3, 1e-5)


def test_the_noise_seed_range_is_numpys() -> None:
    """The largest accepted dp.noise_seed, plus the last round, is the largest seed NumPy's legacy generator takes
    (`add_noise` seeds it with noise_seed + round); one more is what the server crashed on."""
    top = 2**32 - 1 - 3  # rounds=3
    cfg = load_fed_config(
        "configs/fed_bigbench_homo.yaml",
        ["rounds=3", "dp.clipping=server", "dp.noise_multiplier=1", f"dp.noise_seed={top}"],
    )
    state = {"w": torch.zeros(2)}
    add_noise(state, 1.0, seed=cfg.dp.noise_seed + 3)  # the last round: accepted by NumPy
    for seed in (top + 4, -5 + 1):
        with pytest.raises(ValueError, match="Seed must be between 0 and 2\\*\\*32 - 1"):
            add_noise(state, 1.0, seed=seed)


def test_dp_off_by_default_and_target_resolves() -> None:
    assert not load_fed_config("configs/fed_bigbench_homo.yaml").dp.enabled
    cfg = load_fed_config("configs/fed_bigbench_homo.yaml", ["dp.clipping=client", "dp.target_epsilon=8"])
    assert cfg.dp.enabled and noise_multiplier_for(cfg.dp, cfg.rounds) > 1


# --- simulations --------------------------------------------------------------------------------------------
from tests import test_fed_apps as fed_apps  # noqa: E402
from tests.test_fed_apps import fed, read_rounds, write_config  # noqa: E402

assets = fed_apps.assets  # the tiny Llama and tasks of the Flower app tests (a module-scoped fixture)


@pytest.mark.fed
@pytest.mark.parametrize("clipping", ["server", "client"])
def test_two_client_simulation_records_epsilon(assets: Path, tmp_path: Path, clipping: str) -> None:
    """Every aggregation under DP (fedit, fedalora: mean; zeropad; fedalora-het with rank 2 < d_m, so the
    clients upload the factors B2, B1): every round records z, σ = z·C/2, the update norms and ε after the
    round (Opacus on the same inputs); results.json has the final ε; client-side clipped uploads (Flower's
    fixedclipping_mod for mean, asymlora's for the others) reach the server with norm ≤ C."""
    from opacus.accountants import RDPAccountant

    names = ["fedit", "fedalora", "zeropad", "fedalora-het"]
    cfg = write_config(tmp_path / "fed.yaml", assets, tmp_path / "run", strategies=names)
    z, c = 1.1, 0.05
    over = [f"dp.clipping={clipping}", f"dp.noise_multiplier={z}", f"dp.clipping_norm={c}", "dp.noise_seed=3"]
    het = ["clients.ranks=[2, 2]", "adapter.intermediate_rank=4", "train.local_steps=1"]
    assert fed(cfg, *over, *het) == 0
    for name in names:
        history = read_rounds(tmp_path / "run" / name / "rounds.jsonl")
        assert [r["round"] for r in history] == [1, 2]
        for r in history:
            assert r["accepted"] == [0, 1] and not r["rejected"]
            dp = r["dp"]
            assert dp["clipping"] == clipping and dp["noise_std"] == pytest.approx(z * c / 2)
            acc = RDPAccountant()
            acc.history = [(z, 1.0, r["round"])]
            assert dp["epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
            norms = list(dp["update_norms"].values())
            assert len(norms) == 2 and all(n > 0 for n in norms)
            if clipping == "client":
                assert all(n <= c * (1 + 1e-4) for n in norms)
        res = json.loads((tmp_path / "run" / name / "results.json").read_text())
        assert res["dp"]["epsilon"] == history[-1]["dp"]["epsilon"] and res["dp"]["releases"] == 2
        assert res["dp"]["epsilon_per_round"] == [r["dp"]["epsilon"] for r in history]
    assert "| **DP (ε, δ) after all rounds** |" in (tmp_path / "run" / "results.md").read_text()
