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


# --- simulations --------------------------------------------------------------------------------------------
from tests.test_fed_apps import assets, fed, read_rounds, write_config  # noqa: E402, F401  (fixture)


@pytest.mark.fed
@pytest.mark.parametrize("clipping", ["server", "client"])
def test_two_client_simulation_records_epsilon(assets: Path, tmp_path: Path, clipping: str) -> None:
    """fedit + fedalora under DP: every round records z, σ = z·C/2, the update norms and ε after the round
    (Opacus on the same inputs); results.json has the final ε; client-side clipped uploads reach the server
    with norm ≤ C (else it would refuse them)."""
    from opacus.accountants import RDPAccountant

    cfg = write_config(tmp_path / "fed.yaml", assets, tmp_path / "run", strategies=["fedit", "fedalora"])
    z, c = 1.1, 0.05
    over = [f"dp.clipping={clipping}", f"dp.noise_multiplier={z}", f"dp.clipping_norm={c}", "dp.noise_seed=3"]
    assert fed(cfg, *over) == 0
    for name in ("fedit", "fedalora"):
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
