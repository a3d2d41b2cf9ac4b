"""`asymlora.federated.privacy` on hand-computed values (mutation tests, session 10): the config checks
with whole messages, the accountant's release count, clipping at the edges (zero update, norm between 0
and 1, the client-side tolerance C·(1 + 1e-4)), the seeded noise against NumPy's global generator written
out, which updates pass through unclipped, and the client-side clipping of zero-padded and accumulated
uploads. docs/testing.md, "Mutation results, session 10", lists what these tests kill."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from asymlora.federated.privacy import (
    PrivacyAccountant,
    PrivacySettings,
    add_noise,
    clip_update,
    clip_upload_locally,
    noise_multiplier_for,
    privatize_updates,
)

pytest.importorskip("flwr")
pytest.importorskip("opacus")


def _raises(call, message: str) -> None:
    with pytest.raises(ValueError) as info:
        call()
    assert str(info.value) == message


# --- configuration --------------------------------------------------------------------------------------------
def test_noise_multiplier_for_refuses_each_bad_setting_whole() -> None:
    on = {"clipping": "server", "noise_multiplier": 1.0}
    _raises(
        lambda: noise_multiplier_for(PrivacySettings(clipping="always"), 3),  # type: ignore[arg-type]
        "dp.clipping='always' is invalid: choose one of ['off', 'server', 'client']",
    )
    _raises(
        lambda: noise_multiplier_for(PrivacySettings(**on, clipping_norm="1.0"), 3),  # type: ignore[arg-type]
        "dp.clipping_norm='1.0' must be a finite number > 0 (the L2 bound on each client's update), e.g. "
        "dp.clipping_norm=1.0",
    )
    _raises(
        lambda: noise_multiplier_for(PrivacySettings(**on, delta=0.0), 3),
        "dp.delta=0.0 must lie in (0, 1), e.g. dp.delta=1e-5",
    )
    _raises(
        lambda: noise_multiplier_for(PrivacySettings(clipping="client"), 3),
        "with dp.clipping on, give exactly one of dp.noise_multiplier (e.g. 1.0) and dp.target_epsilon (e.g. 8); "
        "got noise_multiplier=None, target_epsilon=None",
    )
    _raises(
        lambda: noise_multiplier_for(PrivacySettings(clipping="server", noise_multiplier=math.nan), 3),
        "dp.noise_multiplier=nan must be >= 0 (0: clipping only)",
    )
    _raises(
        lambda: noise_multiplier_for(PrivacySettings(clipping="server", target_epsilon=0.0), 3),
        "dp.target_epsilon=0.0 must be > 0, e.g. dp.target_epsilon=8",
    )


@pytest.mark.parametrize("z", [0, 0.5, 2])
def test_a_given_noise_multiplier_is_returned_as_a_float(z) -> None:
    out = noise_multiplier_for(PrivacySettings(clipping="server", noise_multiplier=z), 3)
    assert out == z and type(out) is float


def test_the_accountant_counts_releases() -> None:
    assert PrivacyAccountant(1.0, 1e-5).releases == 0
    assert PrivacyAccountant(1.0, 1e-5, releases=3).releases == 3
    acc = PrivacyAccountant(0.0, 1e-5)
    acc.step()
    acc.step()
    assert acc.releases == 2 and acc.epsilon() == math.inf


# --- clipping and noise ----------------------------------------------------------------------------------------
def test_clip_update_at_the_edges() -> None:
    ref = [np.array([1.0, 2.0]), np.array([3.0])]
    same = [a.copy() for a in ref]
    assert clip_update(same, ref, 1.0) == 0.0 and all((s == r).all() for s, r in zip(same, ref, strict=True))
    # update (0.3, 0.4): norm 0.5 < 1 but above C = 0.1 → scaled by 0.2 to (0.06, 0.08)
    small = [np.array([1.3, 2.4]), np.array([3.0])]
    assert clip_update(small, ref, 0.1) == pytest.approx(0.5)
    np.testing.assert_allclose(small[0], [1.06, 2.08]) and np.testing.assert_allclose(small[1], [3.0])
    with pytest.raises(ValueError):  # one array short: refused, even when the arrays compared agree
        clip_update([ref[0].copy()], ref, 1.0)


def test_add_noise_with_a_seed_is_numpys_seeded_global_normal_draws() -> None:
    state = {"a": torch.zeros(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}
    rng = np.random.RandomState(7)  # the legacy global generator as np.random.seed(7) leaves it
    want_a = rng.normal(0, 0.5, (2, 3))
    want_b = 1.0 + rng.normal(0, 0.5, (4,))
    out = add_noise(state, 0.5, seed=7)
    assert out["a"].dtype == torch.float32 and out["b"].dtype == torch.bfloat16
    torch.testing.assert_close(out["a"], torch.from_numpy(want_a).float())
    torch.testing.assert_close(out["b"], torch.from_numpy(want_b).to(torch.bfloat16))
    assert not torch.equal(add_noise(state, 0.5, seed=8)["a"], out["a"])


def test_add_noise_without_a_seed_draws_fresh_noise_from_the_global_generator() -> None:
    state = {"a": torch.zeros(50)}
    np.random.seed(3)
    first = add_noise(state, 1.0)["a"]
    second = add_noise(state, 1.0)["a"]
    assert not torch.equal(first, second)  # the generator moved on
    np.random.seed(3)
    torch.testing.assert_close(first, torch.from_numpy(np.random.normal(0, 1.0, 50)).float())


# --- the server's side -----------------------------------------------------------------------------------------
def _setup(strategy_name: str = "fedit", r: int = 2):
    from tests.test_fed_strategies import adapted

    from asymlora.federated.strategies import get_strategy

    strategy = get_strategy(strategy_name)
    _, roles, state = adapted("lora", r=r, d_m=4)
    server = {n: state[n].clone() + 0.5 for n in strategy.shared.names(roles)}  # non-zero reference
    return strategy, roles, server


def _plus(server: dict, amount: float) -> dict:
    """``server`` with ``amount`` added to its first value only: an update of norm |amount|."""
    out = {k: v.clone() for k, v in server.items()}
    first = next(iter(out))
    out[first].view(-1)[0] += amount
    return out


def test_client_side_norms_and_the_tolerance() -> None:
    strategy, roles, server = _setup()
    dp = PrivacySettings(clipping="client", noise_multiplier=1.0, clipping_norm=2.0)
    ups = [(_plus(server, 3.0), 5), (_plus(server, 2.0), 5), (_plus(server, -1.0), 5)]
    out = privatize_updates(dp, strategy, server, ups, roles, ["big", "edge", "ok"])
    # "big": norm 3 > 2 · (1 + 1e-4) refused (and the loop goes on); "edge": norm 2 = C kept
    assert out.refused == {
        "big": "update norm 3 exceeds dp.clipping_norm=2: the client did not clip (client-side DP needs "
        "asymlora's ClientApp, whose clipping_mod clips)"
    }
    assert out.ids == ["edge", "ok"] and out.norms == pytest.approx({"big": 3.0, "edge": 2.0, "ok": 1.0})
    assert [n for _, n in out.updates] == [1, 1]
    # within the tolerance: norm 2 · (1 + 0.5e-4) is kept
    out = privatize_updates(dp, strategy, server, [(_plus(server, 2.0001), 5)], roles, ["near"])
    assert out.ids == ["near"] and not out.refused


def test_updates_that_cannot_be_clipped_pass_unchanged_and_the_loop_goes_on() -> None:
    strategy, roles, server = _setup()
    dp = PrivacySettings(clipping="server", noise_multiplier=1.0, clipping_norm=1.0)
    first = next(iter(server))
    nan = _plus(server, math.nan)
    small = {k: (v[:1] if k == first else v) for k, v in server.items()}  # fedit needs the server's shapes
    good = _plus(server, 4.0)
    out = privatize_updates(dp, strategy, server, [(nan, 7), (small, 7), (good, 7)], roles, ["n", "s", "g"])
    assert out.ids == ["n", "s", "g"] and set(out.norms) == {"g"} and out.norms["g"] == pytest.approx(4.0)
    assert out.updates[0] == (nan, 7) and out.updates[1][1] == 7 and out.updates[1][0][first].shape[0] == 1
    assert out.updates[2][1] == 1
    torch.testing.assert_close(out.updates[2][0][first].view(-1)[0], server[first].view(-1)[0] + 1.0)
    with pytest.raises(ValueError):
        privatize_updates(dp, strategy, server, [(good, 7)], roles, ["a", "b"])


@pytest.mark.parametrize(("n_k", "kept"), [(1, 1), (np.int64(9), 1), (0, 0), (True, True), (2.0, 2.0)])
def test_only_a_valid_example_count_becomes_one(n_k, kept) -> None:
    strategy, roles, server = _setup()
    dp = PrivacySettings(clipping="server", noise_multiplier=1.0, clipping_norm=1.0)
    ((_, n),) = privatize_updates(dp, strategy, server, [(_plus(server, 0.5), n_k)], roles, ["c"]).updates
    assert n == kept and type(n) is type(kept)


def test_zeropad_upload_above_the_server_rank_passes_unchanged() -> None:
    strategy, roles, _ = _setup("zeropad", r=2)
    _, _, big_server = _setup("zeropad", r=4)
    server = {
        k: v[tuple(slice(0, 2) if s == 4 else slice(None) for s in v.shape)] for k, v in big_server.items()
    }
    dp = PrivacySettings(clipping="server", noise_multiplier=1.0, clipping_norm=1.0)
    out = privatize_updates(dp, strategy, server, [(big_server, 3)], roles, ["c"])
    assert out.updates == [(big_server, 3)] and out.norms == {}


# --- the client's side -----------------------------------------------------------------------------------------
def test_client_clipping_of_a_zero_padded_upload_against_the_truncated_download() -> None:
    # the client holds rank 1 of the server's 2: the reference is the download's first column / row
    sent = {"m.B": torch.tensor([[1.0, 9.0], [2.0, 9.0]]), "m.A": torch.tensor([[1.0, 1.0], [9.0, 9.0]])}
    upload = {"m.B": torch.tensor([[4.0], [6.0]], dtype=torch.float64), "m.A": torch.tensor([[1.0, 1.0]])}
    # Δ = ((3, 4), (0, 0)): norm 5, C = 1 → B = (1 + 0.6, 2 + 0.8)
    out = clip_upload_locally("zeropad", upload, sent, 1.0)
    assert out["m.B"].dtype == torch.float64 and out["m.A"].dtype == torch.float32
    torch.testing.assert_close(out["m.B"], torch.tensor([[1.6], [2.8]], dtype=torch.float64))
    torch.testing.assert_close(out["m.A"], upload["m.A"])


def test_client_clipping_of_accumulated_products_and_factors() -> None:
    b2, b1, b0 = "m.asymlora_B2.default", "m.asymlora_B1.default", "m.asymlora_B0.default"
    # a product upload (0.3, 0.4) of norm 0.5 at C = 0.1: s = 0.2, the product itself scaled by s
    out = clip_upload_locally("accumulate", {b0: torch.tensor([[0.3, 0.4]])}, {}, 0.1)
    torch.testing.assert_close(out[b0], torch.tensor([[0.06, 0.08]]))
    # below the norm: unchanged (s = 1, not C / norm)
    out = clip_upload_locally("accumulate", {b0: torch.tensor([[0.3, 0.4]])}, {}, 2.0)
    torch.testing.assert_close(out[b0], torch.tensor([[0.3, 0.4]]))
    # factors whose product is 0 (B2 = (1, 0), B1 = ((0, 0), (1, 1))): norm 0, left as they are
    f2, f1 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    out = clip_upload_locally("accumulate", {b2: f2, b1: f1}, {}, 1.0)
    assert torch.equal(out[b2], f2) and torch.equal(out[b1], f1)
    out = clip_upload_locally("accumulate", {b0: torch.zeros(1, 2)}, {}, 1.0)
    assert torch.equal(out[b0], torch.zeros(1, 2))
