"""Fed-ALoRA-het's ``het_local`` (fresh / persist) and the server's norm-outlier rejection, by hand.

Reference values are written out in the comments; shapes are tiny (d_in = 3, d_out = 2, d_m = 2, r = 1).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from tests.conftest import make_char_tokenizer, make_tiny_llama
from torch import Tensor, nn

from asymlora import AsymLoraConfig, Role
from asymlora.config import ConfigError
from asymlora.federated import TensorInfo, aggregate, client_round_start, client_upload, get_strategy
from asymlora.federated.client import het_seed
from asymlora.federated.config import FedConfig, RejectSettings
from asymlora.federated.server_round import _aggregate, round_record
from asymlora.federated.strategies import client_config, norm_outliers, update_norm
from asymlora.methods.fedhet import B0_NAME, B1_NAME, B2_NAME

ROLE = {"A": Role.A, "M": Role.A, B1_NAME: Role.B, B2_NAME: Role.B, B0_NAME: Role.B, "B": Role.B}


def hand_roles(method: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, TensorInfo]:
    """A one-layer role map written by hand (no model): name ``layer.<tensor>``."""
    return {
        f"layer.{t}": TensorInfo(f"layer.{t}", "layer", "default", method, t, ROLE[t], shape, t != B0_NAME)
        for t, shape in shapes.items()
    }


HET_SHAPES = {"A": (1, 3), "M": (2, 1), B1_NAME: (1, 2), B2_NAME: (2, 1), B0_NAME: (2, 2)}


def t(rows) -> Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def delta_w(state, s: float = 2.0) -> Tensor:
    """ΔW = s · (B0 + B2 B1) · M · A (docs/design.md §4), formed here for the check."""
    n = {k.removeprefix("layer."): v for k, v in state.items()}
    return s * (n[B0_NAME] + n[B2_NAME] @ n[B1_NAME]) @ n["M"] @ n["A"]


# --- het_local: what a client starts a round from -------------------------------------------------------------
def test_strategy_resets_b2_only_under_persist() -> None:
    roles = hand_roles("fedhet", HET_SHAPES)
    fresh, persist = get_strategy("fedalora-het"), get_strategy("fedalora-het", het_local="persist")
    assert fresh.het_local == "fresh" and persist.het_local == "persist"
    assert {roles[n].tensor for n in fresh.reset.names(roles)} == {"A", "M", B1_NAME, B2_NAME}
    assert persist.reset.names(roles) == ["layer.B2"]
    assert persist.local.names(roles) == fresh.local.names(roles)  # A, M, B1, B2 stay on the client
    assert persist.shared.names(roles) == ["layer.B0"]
    with pytest.raises(ValueError, match=r"het_local='keep' is invalid; choose 'fresh' or 'persist'"):
        get_strategy("fedalora-het", het_local="keep")  # type: ignore[arg-type]


def _trained_round_one():
    """Last round's trained client (r = 1) and the server's B0 after aggregating it alone (p = 1)."""
    roles = hand_roles("fedhet", HET_SHAPES)
    trained = {
        "layer.A": t([[1, 0, 2]]),
        "layer.M": t([[1], [3]]),
        "layer.B1": t([[1, -1]]),
        "layer.B2": t([[1], [2]]),
        "layer.B0": t([[1, 0], [0, 1]]),  # the B0 it trained against (frozen)
    }
    s = get_strategy("fedalora-het")
    server = {"layer.B0": t([[1, 0], [0, 1]])}
    # B2 B1 = [[1, -1], [2, -2]]: B0 <- [[1, 0], [0, 1]] + [[1, -1], [2, -2]] = [[2, -1], [2, -1]]
    received = aggregate(s, server, [(client_upload(s, trained, roles), 5)], roles).state
    assert torch.equal(received["layer.B0"], t([[2, -1], [2, -1]]))
    return roles, trained, received


def test_persist_starts_from_the_trained_a_m_b1_and_the_aggregated_b0() -> None:
    roles, trained, received = _trained_round_one()
    s = get_strategy("fedalora-het", het_local="persist")
    cfg = client_config(s, AsymLoraConfig(target_modules=["layer"], intermediate_rank=2), rank=1)
    start = client_round_start(s, trained, received, roles, cfg=cfg, seed=3)
    for n in ("layer.A", "layer.M", "layer.B1"):
        assert torch.equal(start[n], trained[n]), n
    assert torch.equal(start["layer.B2"], torch.zeros(2, 1))
    assert torch.equal(start["layer.B0"], t([[2, -1], [2, -1]]))
    # M A = [[1, 0, 2], [3, 0, 6]]; B0 M A = [[2-3, 0, 4-6]] twice = [[-1, 0, -2], [-1, 0, -2]]; s = 2
    torch.testing.assert_close(delta_w(start), t([[-2, 0, -4], [-2, 0, -4]]), rtol=0, atol=0)
    # one client at p = 1: the round starts from exactly the function the last round ended with
    torch.testing.assert_close(delta_w(trained), delta_w(start), rtol=0, atol=0)


def test_fresh_starts_from_the_seeded_draw_and_the_aggregated_b0() -> None:
    roles, trained, received = _trained_round_one()
    s = get_strategy("fedalora-het")
    cfg = client_config(s, AsymLoraConfig(target_modules=["layer"], intermediate_rank=2), rank=1)
    start = client_round_start(s, trained, received, roles, cfg=cfg, seed=3)
    # the reference draw: seed, then Kaiming-uniform (a = √5) on A, M, B1 in the layer's order
    torch.manual_seed(3)
    ref = {
        n: nn.init.kaiming_uniform_(torch.empty(HET_SHAPES[n]), a=math.sqrt(5)) for n in ("A", "M", B1_NAME)
    }
    for n, v in ref.items():
        assert torch.equal(start[f"layer.{n}"], v), n
        assert not torch.equal(start[f"layer.{n}"], trained[f"layer.{n}"]), n
    assert torch.equal(start["layer.B2"], torch.zeros(2, 1))
    b0 = t([[2, -1], [2, -1]])
    torch.testing.assert_close(delta_w(start), 2 * b0 @ ref["M"] @ ref["A"], rtol=0, atol=0)
    assert not torch.allclose(delta_w(start), delta_w(trained))  # the client's own M A is lost


# --- het_local through the client's round (tiny Llama, 2 rounds) -----------------------------------------------
@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    from asymlora.data.tasks import Example, Task

    root = tmp_path_factory.mktemp("het_local")
    tok = make_char_tokenizer()
    make_tiny_llama(vocab_size=len(tok), hidden=16, layers=1).save_pretrained(root)
    tok.save_pretrained(root)
    ex = [Example(f"{i} odd", a, options=["yes", "no"]) for i, a in enumerate(["no", "yes", "no", "yes"])]
    return root, [Task("parity", "choice", ex, ex[:2], ["accuracy"])]


def _two_rounds(root, tasks, het_local: str, monkeypatch):
    import asymlora.federated.client as fc
    from asymlora.federated.config import AdapterSettings, ModelSettings, TrainSettings
    from asymlora.federated.server_app import server_roles
    from asymlora.federated.strategies import download_payload

    cfg = FedConfig(
        model=ModelSettings(name=str(root)),
        het_local=het_local,  # type: ignore[arg-type]
        adapter=AdapterSettings(r=2, intermediate_rank=4, target_modules=["q_proj"]),
        train=TrainSettings(local_steps=3, batch_size=2, lr=0.05),
        seed=7,
    )
    s = cfg.strategy("fedalora-het")
    starts: list[dict[str, Tensor]] = []
    real = fc.client_round_start
    monkeypatch.setattr(fc, "client_round_start", lambda *a, **k: starts.append(real(*a, **k)) or starts[-1])
    roles, server = server_roles(cfg, s, [2])
    results, carried = [], None
    for rnd in (1, 2):
        res = fc.train_round(cfg, s, 0, 2, rnd, download_payload(s, server), carried, tasks)
        server = aggregate(s, server, [(res.upload, res.num_examples)], roles).state
        results.append(res)
        carried = res.trained
    return cfg, starts, results, server


def test_train_round_carries_a_m_b1_only_under_persist(tiny_setup, monkeypatch) -> None:
    from asymlora.federated.client import _fresh, adapted_model, client_adapter_config, role_map

    root, tasks = tiny_setup
    cfg, p_starts, p_res, _ = _two_rounds(root, tasks, "persist", monkeypatch)
    _, f_starts, f_res, _ = _two_rounds(root, tasks, "fresh", monkeypatch)
    roles = role_map(
        adapted_model(cfg.model.name, client_adapter_config(cfg, cfg.strategy("fedalora-het"), 2))[0]
    )
    local = [n for n, i in roles.items() if i.tensor in ("A", "M", B1_NAME)]
    (b2,) = [n for n, i in roles.items() if i.tensor == B2_NAME]
    # round 1: both variants start from the same seeded draw and train to the same adapter
    for n in p_starts[0]:
        assert torch.equal(p_starts[0][n], f_starts[0][n]), n
        assert torch.equal(p_res[0].trained[n], f_res[0].trained[n]), n
    # round 2: persist keeps last round's trained A, M, B1; fresh draws them from het_seed(seed, client, 2)
    draw = _fresh(
        roles,
        local,
        p_starts[1],
        client_adapter_config(cfg, cfg.strategy("fedalora-het"), 2),
        het_seed(7, 0, 2),
    )
    for n in local:
        assert torch.equal(p_starts[1][n], p_res[0].trained[n]), n
        assert torch.equal(f_starts[1][n], draw[n]), n
        assert not torch.equal(p_res[0].trained[n], draw[n]), n
    assert not p_starts[1][b2].any() and not f_starts[1][b2].any() and p_res[0].trained[b2].any()
    assert p_res[1].a_drift_start == pytest.approx(p_res[0].a_drift_end, rel=1e-12)
    # alone at p = 1 the persisted client starts round 2 at the function it ended round 1 with
    torch.testing.assert_close(delta_w(_layer(p_starts[1], roles)), delta_w(_layer(p_res[0].trained, roles)))
    assert not torch.allclose(delta_w(_layer(f_starts[1], roles)), delta_w(_layer(f_res[0].trained, roles)))


def _layer(state: dict[str, Tensor], roles) -> dict[str, Tensor]:
    """The tensors of the one adapted layer, keyed ``layer.<tensor>`` as `delta_w` expects."""
    return {f"layer.{roles[n].tensor}": v for n, v in state.items()}


# --- the server rejects an update whose norm is far above the round's median ------------------------------------
LORA_SHAPES = {"A": (2, 3), "B": (2, 2)}


def _three_clients():
    """fedalora (B is shared): server B = ones; Δ_0 = [[1, 0], [0, 0]] (‖Δ‖ = 1), Δ_1 = [[0, 2], [0, 0]]
    (2), Δ_2 = [[120, 160], [0, 0]] (200 = 100 × Δ_1's norm); example counts 1, 3, 4."""
    roles = hand_roles("lora", LORA_SHAPES)
    server = {"layer.B": torch.ones(2, 2)}
    deltas = (t([[1, 0], [0, 0]]), t([[0, 2], [0, 0]]), t([[120, 160], [0, 0]]))
    updates = [({"layer.B": server["layer.B"] + d}, n) for d, n in zip(deltas, (1, 3, 4), strict=True)]
    return roles, server, updates


def test_outlying_update_is_rejected_and_the_round_goes_on() -> None:
    roles, server, updates = _three_clients()
    s = get_strategy("fedalora")
    res = aggregate(s, server, updates, roles, norm_factor=10)
    assert res.norms == {0: 1.0, 1: 2.0, 2: 200.0}
    assert res.accepted == [0, 1] and [r.client for r in res.rejected] == [2]
    assert res.rejected[0].reason == "update norm 200 exceeds reject.norm_factor=10 × the round's median 2"
    # p = 1/4, 3/4 over the two accepted: B = 1 + [[1/4, 3/2], [0, 0]]
    torch.testing.assert_close(res.state["layer.B"], t([[1.25, 2.5], [1, 1]]), rtol=0, atol=0)
    off = aggregate(s, server, updates, roles)  # default: no norm check, the outlier is averaged in
    assert off.accepted == [0, 1, 2] and off.norms == {}
    # B = 1 + (1·Δ_0 + 3·Δ_1 + 4·Δ_2) / 8 = 1 + [[(1 + 480)/8, (6 + 640)/8], [0, 0]]
    torch.testing.assert_close(off.state["layer.B"], t([[1 + 481 / 8, 1 + 646 / 8], [1, 1]]))
    # strictly above: 200 = 100 × 2 is kept, 99.9 × 2 = 199.8 is not
    assert aggregate(s, server, updates, roles, norm_factor=100).accepted == [0, 1, 2]
    assert aggregate(s, server, updates, roles, norm_factor=99.9).accepted == [0, 1]


def test_norm_outliers_median_of_an_even_count_is_the_mean_of_the_middle_two() -> None:
    norms = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 10.0}  # median (2 + 3) / 2 = 2.5
    assert [r.client for r in norm_outliers(norms, 3.9)] == ["d"]  # 10 > 9.75
    assert norm_outliers(norms, 4.1) == []  # 10 < 10.25 (the lower median 2 would give 8.2)
    assert norm_outliers({"a": 1.0, "b": 1000.0}, 2) == []  # two clients: never with a factor >= 2
    for bad in (1, 0.5, float("inf"), float("nan"), True):
        with pytest.raises(ValueError, match="must be a finite number > 1"):
            norm_outliers(norms, bad)


def test_update_norm_per_aggregation_by_hand() -> None:
    # zeropad: the client's rank-1 A minus the server's rank-2 A truncated to its first row
    server = {"layer.A": t([[1, 1, 1], [5, 5, 5]])}
    assert update_norm("zeropad", {"layer.A": t([[4, 5, 1]])}, server) == 5.0  # (3, 4, 0)
    assert update_norm("mean", {"layer.A": t([[1, 1, 1], [5, 5, 6]])}, server) == 1.0
    # accumulate: the increment itself, B2 B1 = [[1], [2]] @ [[2, 0]] = [[2, 0], [4, 0]]: √20
    inc = {"layer.B0": t([[1], [2]]).double() @ t([[2, 0]]).double()}
    assert update_norm("accumulate", inc, {"layer.B0": torch.full((2, 2), 9.0)}) == pytest.approx(
        math.sqrt(20)
    )


def test_het_increment_outlier_is_rejected() -> None:
    roles = hand_roles("fedhet", HET_SHAPES)
    s = get_strategy("fedalora-het")
    server = {"layer.B0": torch.zeros(2, 2)}
    ups = [
        ({"layer.B0": t([[3, 4], [0, 0]])}, 1),  # 5
        ({"layer.B0": t([[0, 0], [6, 8]])}, 1),  # 10
        ({"layer.B0": t([[300, 400], [0, 0]])}, 1),  # 500
    ]
    res = aggregate(s, server, ups, roles, norm_factor=5)  # median 10: 500 > 50
    assert res.accepted == [0, 1] and res.norms == {0: 5.0, 1: 10.0, 2: 500.0}
    torch.testing.assert_close(res.state["layer.B0"], t([[1.5, 2], [3, 4]]), rtol=0, atol=0)


def test_rejection_is_recorded_in_the_round_record() -> None:
    roles, server, updates = _three_clients()
    cfg = FedConfig(reject=RejectSettings(norm_factor=10))
    fed = SimpleNamespace(cfg=cfg, strategy=get_strategy("fedalora"), roles=roles)
    records = {
        k: {"client": k, "status": "ok", "train_loss": 0.5, "num_examples": n}
        for k, (_, n) in enumerate(updates)
    }
    _, res, dp = _aggregate(fed, server, updates, [0, 1, 2], records, None, 1)  # type: ignore[arg-type]
    assert dp is None and records[2]["status"] == "rejected" and "median 2" in records[2]["reason"]
    line = round_record(1, "fedalora", records, res, "", 0.1)
    assert line["accepted"] == [0, 1] and line["rejected"][0]["client"] == 2
    assert line["update_norms"] == {"0": 1.0, "1": 2.0, "2": 200.0}
    assert "update_norms" not in round_record(
        1, "fedalora", records, aggregate(fed.strategy, server, updates, roles), "", 0.1
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["reject.norm_factor=1"], r"reject.norm_factor=1.0 must be a finite number > 1"),
        (["reject.norm_factor=-3"], r"reject.norm_factor=-3.0 must be"),
        (["het_local=keep"], "het_local"),
    ],
)
def test_bad_reject_and_het_local_config_is_refused(overrides, message) -> None:
    from asymlora.federated.config import load_fed_config

    with pytest.raises(ConfigError, match=message):
        load_fed_config("configs/fed_bigbench_het.yaml", overrides)


def test_defaults_keep_todays_behaviour() -> None:
    cfg = FedConfig()
    assert cfg.reject.norm_factor is None and cfg.het_local == "fresh"
    assert cfg.strategy("fedalora-het") == get_strategy("fedalora-het")


# --- through Flower: the carried A, M, B1 and the recorded norm rejection ------------------------------------------
from tests import test_fed_apps as fed_apps  # noqa: E402
from tests.test_fed_apps import fed, read_rounds, write_config  # noqa: E402

assets = fed_apps.assets  # the tiny Llama and tasks of the Flower app tests (a module-scoped fixture)


@pytest.mark.fed
def test_simulation_persists_a_m_b1_and_records_the_norm_rejection(assets, tmp_path) -> None:
    """3 clients, fedalora-het with het_local=persist: round 2 starts from round 1's trained A, M (its A drift
    at the start is the one round 1 ended with); reject.norm_factor just above 1 rejects the one client whose
    increment norm exceeds the median of three, recorded in rounds.jsonl, and the round goes on."""
    cfg = write_config(
        tmp_path / "fed.yaml", assets, tmp_path / "run", clients=3, strategies=["fedalora-het"],
        het_local="persist", reject={"norm_factor": 1.0001},
    )  # fmt: skip
    assert fed(cfg, "clients.ranks=[4, 2, 2]", "adapter.intermediate_rank=4") == 0
    r1, r2 = read_rounds(tmp_path / "run" / "fedalora-het" / "rounds.jsonl")
    for c1, c2 in zip(r1["clients"], r2["clients"], strict=True):
        assert c2["a_drift_start"] == pytest.approx(c1["a_drift_end"], rel=1e-6) and c1["a_drift_end"] > 0
    for r in (r1, r2):
        norms = {int(k): v for k, v in r["update_norms"].items()}
        top = max(norms, key=norms.__getitem__)
        assert sorted(norms) == [0, 1, 2] and [x["client"] for x in r["rejected"]] == [top]
        assert sorted(r["accepted"]) == sorted(set(norms) - {top})
        assert (
            r["clients"][top]["status"] == "rejected"
            and "reject.norm_factor=1.0001" in r["clients"][top]["reason"]
        )
