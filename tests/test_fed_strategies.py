"""Federated strategies (pure functions), the heterogeneous Fed-ALoRA layer, and the byte accounting."""

from __future__ import annotations

import math
import re

import numpy as np
import peft
import pytest
import torch
from tests.conftest import make_tiny_llama
from torch import nn

import asymlora
from asymlora import AsymLoraConfig, Role
from asymlora.federated import (
    STRATEGY_NAMES,
    Rejection,
    Select,
    Strategy,
    TensorInfo,
    adapter_state,
    aggregate,
    arrays_to_state,
    bytes_to_state,
    check_het_setup,
    client_config,
    client_round_start,
    client_upload,
    download_payload,
    freeze_,
    get_strategy,
    init_server_state,
    load_adapter_state_,
    local_state,
    payload_bytes,
    payload_params,
    role_map,
    state_to_arrays,
    state_to_bytes,
)
from asymlora.federated.accounting import communication_table, paper_params, run_round_cost
from asymlora.federated.strategies import (
    combine,
    fedavg_weights,
    het_alpha,
    het_increments,
    rank_axis,
    truncate,
    zero_pad,
)
from asymlora.methods.fedhet import B0_NAME, B1_NAME, B2_NAME
from asymlora.tuner.layer import Linear

HIDDEN = 8  # tiny Llama: q_proj is 8 × 8


def adapted(method: str = "lora", r: int = 2, d_m: int = 4, targets=("q_proj",), seed: int = 0, **kw):
    """A one-layer tiny Llama with an asymlora adapter: (peft model, role map, adapter state)."""
    torch.manual_seed(seed)
    cfg = AsymLoraConfig(
        method=method, r=r, lora_alpha=2 * r, intermediate_rank=d_m, target_modules=list(targets), **kw
    )
    pm = peft.get_peft_model(make_tiny_llama(hidden=HIDDEN, layers=1), cfg)
    return pm, role_map(pm), adapter_state(pm)


def by_tensor(roles, tensor: str) -> str:
    (name,) = [n for n, i in roles.items() if i.tensor == tensor]
    return name


# --- what each strategy shares -------------------------------------------------------------------------
def test_strategy_objects_select_by_declared_role() -> None:
    _, roles, _ = adapted()
    a, b = by_tensor(roles, "A"), by_tensor(roles, "B")
    expect = {  # name: (shared, local, frozen)
        "fedit": ({a, b}, set(), set()),
        "ffa": ({b}, {a}, {a}),
        "fedsa": ({a}, {b}, set()),
        "fedalora": ({b}, {a}, set()),
        "zeropad": ({a, b}, set(), set()),
    }
    for name, (shared, local, frozen) in expect.items():
        s = get_strategy(name)
        assert set(s.shared.names(roles)) == shared, name
        assert set(s.local.names(roles)) == local, name
        assert set(s.frozen.names(roles)) == frozen, name
    assert get_strategy("fedalora").reset.names(roles) == []
    assert get_strategy("fedalora", local_a="reset").reset.names(roles) == [a]
    _, het_roles, _ = adapted("fedhet")
    het = get_strategy("fedalora-het")
    assert [het_roles[n].tensor for n in het.shared.names(het_roles)] == [B0_NAME]
    assert {het_roles[n].tensor for n in het.reset.names(het_roles)} == {"A", "M", B1_NAME, B2_NAME}


def test_a_never_leaves_the_client_under_fedalora_and_b_never_under_fedsa() -> None:
    _, roles, state = adapted(targets=("q_proj", "o_proj"))  # square layers: B and A the same size
    up = client_upload(get_strategy("fedalora"), state, roles)
    assert up and all(roles[n].role == Role.B for n in up)
    up = client_upload(get_strategy("fedsa"), state, roles)
    assert up and all(roles[n].role == Role.A for n in up)
    fedit = payload_bytes(client_upload(get_strategy("fedit"), state, roles))
    assert payload_bytes(client_upload(get_strategy("fedalora"), state, roles)) * 2 == fedit


# --- homogeneous aggregation by hand ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["fedit", "ffa", "fedsa", "fedalora"])
def test_weighted_mean_by_hand(name: str) -> None:
    strategy = get_strategy(name)
    _, roles, state = adapted()
    server = init_server_state(strategy, state, roles)
    base = {n: torch.arange(t.numel(), dtype=torch.float32).view(t.shape) for n, t in server.items()}
    c0 = {n: v.clone() for n, v in base.items()}  # n = 10
    c1 = {n: 2 * v + 1 for n, v in base.items()}  # n = 30  -> p = 1/4, 3/4
    res = aggregate(strategy, server, [(c0, 10), (c1, 30)], roles, client_ids=["a", "b"])
    assert res.accepted == ["a", "b"] and not res.rejected and res.weights == {"a": 0.25, "b": 0.75}
    for n, v in base.items():  # 0.25·v + 0.75·(2v + 1) = 1.75·v + 0.75
        torch.testing.assert_close(res.state[n], 1.75 * v + 0.75, rtol=0, atol=0)
    assert set(res.state) == set(server)


def test_fedalora_local_a_persist_and_reset() -> None:
    _, roles, initial = adapted()
    a, b = by_tensor(roles, "A"), by_tensor(roles, "B")
    trained = {**initial, a: initial[a] + 1.0, b: initial[b] + 2.0}
    received = {b: torch.full_like(initial[b], 7.0)}
    for local_a, expect_a in (("persist", trained[a]), ("reset", initial[a])):
        s = get_strategy("fedalora", local_a=local_a)
        kept = local_state(s, trained, roles)
        assert set(kept) == {a}
        start = client_round_start(s, {**trained, **kept}, received, roles, initial=initial)
        torch.testing.assert_close(start[a], expect_a)
        torch.testing.assert_close(start[b], received[b])
    with pytest.raises(ValueError, match="initial state"):
        client_round_start(get_strategy("fedalora", local_a="reset"), trained, received, roles)


def test_ffa_freezes_a() -> None:
    pm, _, _ = adapted()
    frozen = freeze_(pm, get_strategy("ffa"))
    assert frozen and all(not p.requires_grad for p in asymlora.parameters_by_role(pm, "A").values())
    assert all(p.requires_grad for p in asymlora.parameters_by_role(pm, "B").values())


# --- zero padding by hand --------------------------------------------------------------------------------
def test_zeropad_pad_average_truncate_by_hand() -> None:
    s = get_strategy("zeropad")
    _, roles3, state3 = adapted("lora", r=3)
    _, roles1, state1 = adapted("lora", r=1)
    a, b = by_tensor(roles3, "A"), by_tensor(roles3, "B")
    server = init_server_state(s, state3, roles3)
    up1 = {a: torch.ones(1, HIDDEN), b: torch.ones(HIDDEN, 1)}  # rank 1, n = 1
    up3 = {a: torch.full((3, HIDDEN), 2.0), b: torch.full((HIDDEN, 3), 2.0)}  # rank 3, n = 3
    assert client_upload(s, {**state1, **up1}, roles1).keys() == up1.keys()
    res = aggregate(s, server, [(up1, 1), (up3, 3)], roles3)
    # row 0: 0.25·1 + 0.75·2; rows 1, 2: 0.25·0 (padding) + 0.75·2
    want_a = torch.tensor([1.75, 1.5, 1.5]).unsqueeze(1).expand(3, HIDDEN)
    torch.testing.assert_close(res.state[a], want_a, rtol=0, atol=0)
    torch.testing.assert_close(res.state[b], want_a.T, rtol=0, atol=0)
    down = download_payload(s, res.state)
    assert down[a].shape == (3, HIDDEN)  # sent padded, truncated by the client
    start1 = client_round_start(s, state1, down, roles1)
    torch.testing.assert_close(start1[a], torch.full((1, HIDDEN), 1.75))
    torch.testing.assert_close(start1[b], torch.full((HIDDEN, 1), 1.75))
    # a rank above the server's is rejected
    bad = {a: torch.ones(4, HIDDEN), b: torch.ones(HIDDEN, 4)}
    res = aggregate(s, server, [(bad, 1), (up1, 1)], roles3)
    assert res.accepted == [1] and res.rejected[0].client == 0 and "rank" in res.rejected[0].reason


# --- Fed-ALoRA with heterogeneous ranks ------------------------------------------------------------------
def het_client(r: int, b2: torch.Tensor, b1: torch.Tensor):
    _, roles, state = adapted("fedhet", r=r, d_m=4)
    state = {**state, by_tensor(roles, B2_NAME): b2, by_tensor(roles, B1_NAME): b1}
    return roles, state


def test_fedalora_het_accumulates_exactly_over_two_rounds() -> None:
    s = get_strategy("fedalora-het")
    g = torch.Generator().manual_seed(0)

    def ints(*shape):
        return torch.randint(-3, 4, shape, generator=g).float()

    ranks, weights = (2, 3), (1, 3)  # p = 1/4, 3/4
    roles0, fresh = het_client(2, ints(HIDDEN, 2), ints(2, 4))
    b0 = by_tensor(roles0, B0_NAME)
    server = init_server_state(s, fresh, roles0)
    assert torch.equal(server[b0], torch.zeros(HIDDEN, 4))
    hand = torch.zeros(HIDDEN, 4)
    for _ in range(2):
        factors = [(ints(HIDDEN, r), ints(r, 4)) for r in ranks]
        ups = []
        for (b2, b1), r in zip(factors, ranks, strict=True):
            roles, state = het_client(r, b2, b1)
            ups.append(client_upload(s, state, roles))
        res = aggregate(s, server, list(zip(ups, weights, strict=True)), roles0)
        hand = hand + 0.25 * factors[0][0] @ factors[0][1] + 0.75 * factors[1][0] @ factors[1][1]
        torch.testing.assert_close(res.state[b0], hand, rtol=0, atol=0)
        server = res.state
    # the client starts its next round from B0 with fresh A, M, B1 and zero B2
    roles, state = het_client(3, ints(HIDDEN, 3), ints(3, 4))
    cfg = client_config(s, AsymLoraConfig(target_modules=["q_proj"], intermediate_rank=4), rank=3)
    start = client_round_start(s, state, download_payload(s, server), roles, cfg=cfg, seed=5)
    again = client_round_start(s, state, download_payload(s, server), roles, cfg=cfg, seed=5)
    assert torch.equal(start[b0], hand) and torch.equal(
        start[by_tensor(roles, B2_NAME)], torch.zeros(HIDDEN, 3)
    )
    for t in ("A", "M", B1_NAME):
        n = by_tensor(roles, t)
        assert not torch.equal(start[n], state[n]) and start[n].abs().sum() > 0
        assert torch.equal(start[n], again[n])  # deterministic by seed
    assert local_state(s, start, roles).keys() == {by_tensor(roles, t) for t in ("A", "M", B1_NAME, B2_NAME)}


def test_fedalora_het_uploads_factors_when_smaller() -> None:
    # d_out = 8, d_m = 4: the product has 32 values; factors r·(8 + 4) are smaller for r <= 2 only.
    s = get_strategy("fedalora-het")
    for r, want, params in ((1, {B1_NAME, B2_NAME}, 12), (2, {B1_NAME, B2_NAME}, 24), (3, {B0_NAME}, 32)):
        _, roles, state = adapted("fedhet", r=r, d_m=4)
        up = client_upload(s, state, roles)
        assert {roles[n].tensor for n in up} == want, r
        assert payload_params(up) == params and payload_bytes(up) == 4 * params
    # the server multiplies factors: same B0 either way
    roles, state = het_client(2, torch.randn(HIDDEN, 2), torch.randn(2, 4))
    server = init_server_state(s, state, roles)
    via_factors = aggregate(s, server, [(client_upload(s, state, roles, het_upload="factors"), 1)], roles)
    via_product = aggregate(s, server, [(client_upload(s, state, roles, het_upload="product"), 1)], roles)
    torch.testing.assert_close(via_factors.state, via_product.state)


def test_fedhet_forward_equals_naive_formula() -> None:
    torch.manual_seed(0)
    d_in, d_out, r, d_m = 12, 10, 3, 4
    cfg = AsymLoraConfig(method="fedhet", r=r, lora_alpha=2 * r, intermediate_rank=d_m, target_modules=["x"])
    layer = Linear(
        nn.Linear(d_in, d_out, dtype=torch.float64), "default", cfg, asymlora.routing.RoutingState()
    )
    layer = layer.double()
    t = layer.tensors("default")
    assert {k: tuple(v.shape) for k, v in t.items()} == {
        "A": (r, d_in),
        "M": (d_m, r),
        B1_NAME: (r, d_m),
        B2_NAME: (d_out, r),
        B0_NAME: (d_out, d_m),
    }
    assert torch.equal(t[B2_NAME], torch.zeros(d_out, r)) and torch.equal(t[B0_NAME], torch.zeros(d_out, d_m))
    with torch.no_grad():
        for p in t.values():
            p.normal_()
    x = torch.randn(2, 5, d_in, dtype=torch.float64)
    w0, bias = layer.base_layer.weight, layer.base_layer.bias
    s = cfg.lora_alpha / r
    # d_out × d_in, formed here for the check only
    delta_w = (t[B0_NAME] + t[B2_NAME] @ t[B1_NAME]) @ t["M"] @ t["A"]
    naive = x @ w0.T + bias + s * x @ delta_w.T
    torch.testing.assert_close(layer(x), naive)
    a_eq, b_eq = asymlora.get_method("fedhet").task_factors(t, 0)
    torch.testing.assert_close(s * b_eq @ a_eq, delta_w * s)
    torch.testing.assert_close(layer.get_delta_weight("default").double(), s * delta_w, rtol=1e-5, atol=1e-5)


def test_fedhet_model_starts_equal_to_base_and_b0_stays_frozen() -> None:
    base = make_tiny_llama(hidden=HIDDEN, layers=1)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = base(input_ids=ids).logits
    cfg = AsymLoraConfig(
        method="fedhet", r=3, lora_alpha=6, intermediate_rank=4, target_modules=["q_proj", "v_proj"]
    )
    pm = peft.get_peft_model(base, cfg)
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids).logits, ref)
    roles = role_map(pm)
    b0 = {n for n, i in roles.items() if i.tensor == B0_NAME}
    layer = pm.get_submodule(next(iter(roles.values())).module)
    assert layer.frozen_peft_weight_names["default"] == ("asymlora_B0",)
    pm.set_adapter("default")  # peft re-marks adapters trainable here; B0 must stay frozen
    pm.train()
    params = dict(pm.named_parameters())
    assert all(not params[n].requires_grad for n in b0)
    assert {n for n, p in params.items() if p.requires_grad} == set(roles) - b0
    # a non-zero B0, as after a federated round, then one optimizer step over every adapter tensor
    load_adapter_state_(pm, {n: torch.randn(roles[n].shape) for n in b0})
    before = adapter_state(pm)
    opt = torch.optim.AdamW([params[n] for n in roles], lr=1e-2)
    loss = pm(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    after = adapter_state(pm)
    assert all(torch.equal(before[n], after[n]) for n in b0)
    b2 = {n for n, i in roles.items() if i.tensor == B2_NAME}
    assert all(not torch.equal(before[n], after[n]) for n in b2)


def test_fedhet_save_and_reload_keeps_b0(tmp_path) -> None:
    pm, roles, _ = adapted("fedhet", r=2, d_m=4)
    load_adapter_state_(pm, {n: torch.randn(i.shape) for n, i in roles.items()})
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = pm(input_ids=ids).logits
    pm.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(make_tiny_llama(hidden=HIDDEN, layers=1), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, ref)


# --- bad input -----------------------------------------------------------------------------------------
def test_bad_updates_are_rejected_and_recorded() -> None:
    s = get_strategy("fedalora")
    _, roles, state = adapted()
    a, b = by_tensor(roles, "A"), by_tensor(roles, "B")
    server = init_server_state(s, state, roles)
    good = {b: torch.ones_like(server[b])}
    nan = {b: torch.full_like(server[b], math.nan)}
    inf = {b: torch.full_like(server[b], math.inf)}
    wrong_shape = {b: torch.ones(HIDDEN, 5)}
    leaks_a = {**good, a: state[a]}
    missing: dict[str, torch.Tensor] = {}
    updates = [(good, 2), (nan, 1), (inf, 1), (wrong_shape, 1), (leaks_a, 1), (missing, 1), (good, 0)]
    res = aggregate(s, server, updates, roles)
    assert res.accepted == [0] and res.weights == {0: 1.0}
    reasons = {r.client: r.reason for r in res.rejected}
    assert set(reasons) == {1, 2, 3, 4, 5, 6}
    assert "NaN" in reasons[1] and "NaN or Inf" in reasons[2] and "shape" in reasons[3]
    assert "not shared" in reasons[4] and "missing" in reasons[5] and "num_examples" in reasons[6]
    torch.testing.assert_close(res.state[b], torch.ones_like(server[b]))
    # nobody survives: the previous state is kept
    res = aggregate(s, server, [(nan, 1)], roles)
    assert res.kept_previous and torch.equal(res.state[b], server[b])
    # het: a product of the wrong shape
    het = get_strategy("fedalora-het")
    _, hroles, hstate = adapted("fedhet", r=3, d_m=4)
    hserver = init_server_state(het, hstate, hroles)
    res = aggregate(het, hserver, [({by_tensor(hroles, B0_NAME): torch.ones(HIDDEN, 5)}, 1)], hroles)
    assert res.kept_previous and "product shape" in res.rejected[0].reason


def test_bad_configuration_is_named() -> None:
    with pytest.raises(ValueError, match="fedit.*ffa.*fedsa.*fedalora.*fedalora-het.*zeropad"):
        get_strategy("fedavg")
    with pytest.raises(ValueError, match="3 client ranks .* for 2 clients"):
        check_het_setup([8, 8, 8], 2, 16)
    with pytest.raises(ValueError, match="client 1: rank 0"):
        check_het_setup([8, 0], 2, 16)
    with pytest.raises(ValueError, match="d_m=0"):
        check_het_setup([8, 8], 2, 0)
    with pytest.raises(ValueError, match="local_a"):
        get_strategy("fedalora", local_a="keep")
    _, roles, state = adapted("lora")
    with pytest.raises(ValueError, match="needs adapter method 'fedhet'"):
        init_server_state(get_strategy("fedalora-het"), state, roles)
    _, hroles, hstate = adapted("fedhet")
    with pytest.raises(ValueError, match="frozen"):
        init_server_state(get_strategy("fedit"), hstate, hroles)
    cfg = client_config(get_strategy("fedalora-het"), AsymLoraConfig(target_modules=["q_proj"]), rank=32)
    assert (cfg.method, cfg.r, cfg.lora_alpha, cfg.scaling) == ("fedhet", 32, 64, 2.0)
    with pytest.raises(ValueError, match="rank"):
        client_config(get_strategy("zeropad"), AsymLoraConfig(target_modules=["q_proj"]), rank=0)
    assert set(STRATEGY_NAMES) == {"fedit", "ffa", "fedsa", "fedalora", "fedalora-het", "zeropad"}


def test_serialisation_round_trips_and_counts_bytes() -> None:
    _, _, state = adapted("fedhet", r=2, d_m=4)
    keys, arrays = state_to_arrays(state)
    back = arrays_to_state(keys, arrays)
    assert list(back) == list(state) and all(torch.equal(back[k], state[k]) for k in state)
    blob = state_to_bytes(state)
    again = bytes_to_state(blob)
    assert all(torch.equal(again[k], state[k]) for k in state)
    assert payload_bytes(state) == 4 * sum(t.numel() for t in state.values()) == sum(a.nbytes for a in arrays)
    assert payload_bytes(state) < len(blob) < payload_bytes(state) + 200 * len(state)
    assert payload_bytes({k: v.half() for k, v in state.items()}) * 2 == payload_bytes(state)
    with pytest.raises(ValueError, match="safetensors"):
        bytes_to_state(blob[:-7])


# --- the LLaMA-2-7B table ------------------------------------------------------------------------------
def test_llama2_7b_table_reproduces_the_published_figures() -> None:
    rows = {row.strategy: row for row in communication_table("llama2-7b")}
    measured = {k: round(v.params / 1e6, 2) for k, v in rows.items()}
    paper = {k: round(v.paper_params / 1e6, 2) for k, v in rows.items()}
    assert measured == {
        "fedit": 8.39,
        "ffa": 4.19,
        "fedsa": 4.19,
        "fedalora": 4.19,
        "zeropad": 49.28,
        "fedalora-het": 7.87,
    }
    assert paper == {**measured, "fedalora-het": 12.12}
    for name, row in rows.items():
        if row.published is not None:
            assert paper[name] == row.published, name
        assert row.bytes == 4 * row.params  # float32 payloads
    assert rows["fedalora-het"].params_down == 32 * 2 * 4096 * 16  # B0 only
    assert [c.params_up for c in rows["zeropad"].clients][:2] == [32 * 2 * 8192 * 64] * 2  # own rank up


def test_run_round_cost_is_the_table_for_a_run_of_that_setting() -> None:
    """What a run of the paper's setting must move (`run_round_cost`, the benchmark's reference) is the
    table's row, client by client: one accounting for the docs and for the runs."""
    from asymlora.config import from_dict
    from asymlora.federated.config import FedConfig

    ranks = [64, 64, 32, 32, 16, 16, 8, 8]
    table = {row.strategy: row for row in communication_table("llama2-7b", 8, ranks, 16)}
    for name in ("fedalora", "fedit", "zeropad", "fedalora-het"):
        het = name in ("zeropad", "fedalora-het")
        cfg = from_dict(
            FedConfig,
            {
                "model": {"name": "llama2-7b"},  # the paper's shapes, on the meta device
                "strategies": [name],
                "adapter": {"r": 8, "lora_alpha": 16, "intermediate_rank": 16},
                "clients": {"num": 8, "ranks": ranks if het else None},
            },
        )
        got = run_round_cost(cfg, name)
        want = table[name].clients
        assert [(c.params_up, c.params_down, c.bytes_up) for c in got] == [
            (c.params_up, c.params_down, c.bytes_up) for c in want
        ], name


def test_local_steps_zero_is_a_run_without_training() -> None:
    from asymlora.config import ConfigError
    from asymlora.federated.config import load_fed_config

    tasks = "data.tasks=[bigbench:strategyqa, bigbench:winowhy]"
    assert load_fed_config(None, [tasks, "clients.num=2", "train.local_steps=0"]).train.local_steps == 0
    with pytest.raises(ConfigError, match=r"train.local_steps=-1 must be an integer >= 0"):
        load_fed_config(None, [tasks, "clients.num=2", "train.local_steps=-1"])


def test_qwen2_7b_formulas() -> None:
    dims = [(3584, 3584)] * (28 * 2)
    ranks = (64, 64, 32, 32, 16, 16, 8, 8)

    def m(name: str, **kw) -> float:
        return round(paper_params(name, dims, 8, ranks, 16, **kw) / 1e6, 2)

    assert (m("fedit"), m("fedsa"), m("fedalora"), m("zeropad")) == (6.42, 3.21, 3.21, 37.73)
    assert m("fedalora-het") == 9.29  # docs/design.md §4's (LLaMA) formula on Qwen2 shapes
    assert m("fedalora-het", het_inner_factors=False) == 9.23  # what the paper's Qwen2 figure works out to


# --- the pure aggregation functions, by hand (no model: hand-made role maps) -----------------------------
def tinfo(name: str, tensor: str, role: Role, shape, trainable: bool = True, method: str = "lora"):
    return TensorInfo(name, "layer", "default", method, tensor, role, tuple(shape), trainable)


def test_fedavg_weights_zero_pad_truncate_and_rank_axis_by_hand() -> None:
    assert fedavg_weights([1, 3]) == [0.25, 0.75]
    assert fedavg_weights([2, 2, 4]) == [0.25, 0.25, 0.5]
    assert fedavg_weights([5]) == [1.0]
    padded = zero_pad(torch.tensor([[1.0, 2.0]]), (2, 3))
    assert padded.dtype == torch.float64
    assert torch.equal(padded, torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64))
    full = torch.arange(12.0).view(3, 4)
    assert torch.equal(truncate(full, (2, 3)), torch.tensor([[0.0, 1.0, 2.0], [4.0, 5.0, 6.0]]))
    assert rank_axis(tinfo("a", "A", Role.A, (2, 8))) == -2  # A: (r, d_in)
    assert rank_axis(tinfo("b", "B", Role.B, (8, 2))) == -1  # B: (d_out, r)
    assert rank_axis(tinfo("g", "router", Role.ROUTER, (3, 8))) is None


def test_combine_by_hand_for_every_aggregation() -> None:
    server = {"x": torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=torch.float16)}
    u0 = {"x": torch.tensor([[2.0, 4.0], [6.0, 8.0]], dtype=torch.float64)}
    u1 = {"x": torch.tensor([[4.0, 0.0], [0.0, 4.0]], dtype=torch.float64)}
    # mean: 0.25·u0 + 0.75·u1 (the server's values do not enter)
    mean = combine("mean", server, [u0, u1], [0.25, 0.75])
    assert mean["x"].dtype == torch.float16
    assert torch.equal(mean["x"], torch.tensor([[3.5, 1.0], [1.5, 5.0]], dtype=torch.float16))
    # accumulate: B0 + 0.25·Δ0 + 0.75·Δ1
    acc = combine("accumulate", server, [u0, u1], [0.25, 0.75])
    assert torch.equal(acc["x"], torch.tensor([[4.5, 2.0], [2.5, 6.0]], dtype=torch.float16))
    # zeropad: a rank-1 update [[2], [6]] padded with zeros to (2, 2)
    small = {"x": torch.tensor([[2.0], [6.0]], dtype=torch.float64)}
    pad = combine("zeropad", server, [small, u1], [0.5, 0.5])
    assert torch.equal(pad["x"], torch.tensor([[3.0, 0.0], [3.0, 2.0]], dtype=torch.float16))


def test_client_config_is_the_one_builder_with_alpha_twice_the_rank() -> None:
    assert [het_alpha(r) for r in (1, 3, 64)] == [2, 6, 128]
    base = AsymLoraConfig(method="alora", r=8, lora_alpha=16, target_modules=["q_proj"])
    fedhet_base = AsymLoraConfig(method="fedhet", r=8, lora_alpha=16, target_modules=["q_proj"])
    # a homogeneous strategy keeps alpha; its method (None: any) is taken over
    fedit = client_config(get_strategy("fedit"), base, rank=4)
    assert (fedit.method, fedit.r, fedit.lora_alpha) == ("alora", 4, 16)
    assert client_config(get_strategy("fedit"), base) is base
    zp = client_config(get_strategy("zeropad"), base, rank=3)
    assert (zp.method, zp.r, zp.lora_alpha) == ("lora", 3, 6)
    zp8 = client_config(get_strategy("zeropad"), base)
    assert (zp8.method, zp8.r, zp8.lora_alpha) == ("lora", 8, 16)
    # the local-only baseline (strategy None): plain LoRA, alpha_i = 2·r_i at a given rank
    local = client_config(None, base, rank=5)
    assert (local.method, local.r, local.lora_alpha) == ("lora", 5, 10)
    assert (client_config(None, base).method, client_config(None, base).lora_alpha) == ("alora", 16)
    assert client_config(None, fedhet_base).method == "lora"
    with pytest.raises(ValueError, match=r"client 0: rank True is invalid"):
        client_config(None, base, rank=True)


def test_select_and_the_strategy_table() -> None:
    a = tinfo("a", "A", Role.A, (2, 8))
    b0 = tinfo("b0", B0_NAME, Role.B, (8, 4), trainable=False, method="fedhet")
    assert Select(frozenset({Role.A}))(a) and not Select(frozenset({Role.B}))(a)
    assert Select(frozenset({Role.B}), trainable=False)(b0) and not Select(frozenset({Role.B}), True)(b0)
    assert Select(frozenset({Role.B}))(b0)

    def sel(*roles, trainable=None):
        return Select(frozenset(roles), trainable)

    A, B, R = Role.A, Role.B, Role.ROUTER
    none = Select()
    table = {  # name: shared, local, frozen, seeded, reset, reset_to, aggregation, method, het, local_a
        "fedit": (sel(A, B, R), none, none, none, none, None, "mean", None, False, None),
        "ffa": (sel(B), sel(A, R), sel(A), sel(A), none, None, "mean", None, False, None),
        "fedsa": (sel(A), sel(B, R), none, none, none, None, "mean", None, False, None),
        "fedalora": (sel(B), sel(A, R), none, none, none, None, "mean", None, False, "persist"),
        "fedalora-het": (
            sel(B, trainable=False),
            sel(A, B, trainable=True),
            none,
            none,
            sel(A, B, trainable=True),
            "fresh",
            "accumulate",
            "fedhet",
            True,
            None,
        ),
        "zeropad": (sel(A, B), none, none, none, none, None, "zeropad", "lora", True, None),
    }
    for name, row in table.items():
        s = get_strategy(name)
        got = (s.shared, s.local, s.frozen, s.seeded, s.reset, s.reset_to, s.aggregation, s.method)
        assert (*got, s.heterogeneous, s.local_a) == row, name
        assert s.name == name and s.description
    reset = get_strategy("fedalora", local_a="reset")
    assert (reset.seeded, reset.reset, reset.reset_to, reset.local_a) == (sel(A), sel(A), "initial", "reset")
    assert (
        "(reset)" in reset.description
        and "B0 <- B0 + sum p_k B2_k B1_k" in get_strategy("fedalora-het").description
    )
    with pytest.raises(ValueError, match=r"^local_a='keep' is invalid; choose 'persist' or 'reset'$"):
        get_strategy("fedit", local_a="keep")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^unknown federated strategy 'fedavg'; choose one of \['fedit'"):
        get_strategy("fedavg")
    assert STRATEGY_NAMES == ("fedit", "ffa", "fedsa", "fedalora", "fedalora-het", "zeropad")


def het_roles(r: int = 2):
    return {
        "a": tinfo("a", "A", Role.A, (r, 8), method="fedhet"),
        "b0": tinfo("b0", B0_NAME, Role.B, (8, 4), trainable=False, method="fedhet"),
        "b1": tinfo("b1", B1_NAME, Role.B, (r, 4), method="fedhet"),
        "b2": tinfo("b2", B2_NAME, Role.B, (8, r), method="fedhet"),
    }


def test_upload_names_and_check_roles() -> None:
    roles = het_roles()
    assert get_strategy("fedalora-het").upload_names(roles) == ["b0", "b1", "b2"]
    lora = {"a": tinfo("a", "A", Role.A, (2, 8)), "b": tinfo("b", "B", Role.B, (8, 2))}
    assert get_strategy("fedalora").upload_names(lora) == ["b"]
    assert get_strategy("fedit").upload_names(lora) == ["a", "b"]
    get_strategy("zeropad").check_roles(lora)  # fits: no error
    with pytest.raises(
        ValueError, match=r"^strategy 'zeropad' needs adapter method 'lora' .*uses \['fedhet'\]$"
    ):
        get_strategy("zeropad").check_roles(roles)
    with pytest.raises(
        ValueError, match=r"^strategy 'fedit' averages trainable tensors only; .*\['fedhet'\]"
    ):
        get_strategy("fedit").check_roles(roles)
    only_a = {"a": tinfo("a", "A", Role.A, (2, 8))}
    with pytest.raises(
        ValueError, match=r"^strategy 'fedalora' shares no tensor of this model \(methods \['lora'\]\)$"
    ):
        get_strategy("fedalora").check_roles(only_a)
    server = init_server_state(get_strategy("fedalora"), {"a": torch.ones(2, 8), "b": torch.ones(8, 2)}, lora)
    assert list(server) == ["b"]


def test_check_het_setup_refuses_each_bad_value_by_name() -> None:
    check_het_setup([1, 2], 2, 1)  # smallest valid values
    check_het_setup([3], 1, None)
    with pytest.raises(
        ValueError, match=r"^got 1 client ranks \[4\] for 2 clients; give exactly one rank per client$"
    ):
        check_het_setup([4], 2)
    with pytest.raises(
        ValueError, match=r"^client 1: rank True is invalid; every rank must be an integer >= 1$"
    ):
        check_het_setup([2, True], 2)
    with pytest.raises(ValueError, match=r"^client 0: rank 2.0 is invalid"):
        check_het_setup([2.0], 1)  # type: ignore[list-item]
    for bad in (0, True, 1.5):
        with pytest.raises(
            ValueError, match=rf"^intermediate rank d_m={bad!r} is invalid; use an integer >= 1$"
        ):
            check_het_setup([2], 1, bad)  # type: ignore[arg-type]


def test_every_rejection_names_the_client_the_tensor_and_the_reason() -> None:
    s = get_strategy("fedit")
    roles = {"a": tinfo("a", "A", Role.A, (2, 3)), "b": tinfo("b", "B", Role.B, (3, 2))}
    server = {"a": torch.zeros(2, 3), "b": torch.zeros(3, 2)}
    ok = {"a": torch.ones(2, 3), "b": torch.ones(3, 2)}
    cases = [
        ({**ok, "a": torch.ones(2, 3, dtype=torch.int64)}, 1, "a", "a is not a floating-point tensor"),
        ({**ok, "b": torch.tensor([[0.0, math.inf]] * 3)}, 1, "b", "b contains NaN or Inf"),
        (
            {**ok, "z": torch.ones(1), "y": torch.ones(1)},
            1,
            "y",
            "sent tensors that are not shared under this strategy: ['y', 'z']",
        ),
        ({"b": ok["b"]}, 1, "a", "missing shared tensors: ['a']"),
        ({**ok, "b": torch.ones(2, 3)}, 1, "b", "shape (2, 3) does not match the server's (3, 2)"),
        (ok, 0, None, "num_examples=0: must be an integer >= 1"),
        (ok, True, None, "num_examples=True: must be an integer >= 1"),
        (ok, 2.0, None, "num_examples=2.0: must be an integer >= 1"),
    ]
    res = aggregate(s, server, [(u, n) for u, n, _, _ in cases], roles, client_ids=list("cdefghij"))
    assert res.kept_previous and res.accepted == [] and res.weights == {}
    got = [(r.client, r.key, r.reason) for r in res.rejected]
    assert got == [(cid, key, why) for cid, (_, _, key, why) in zip("cdefghij", cases, strict=True)]
    assert all(torch.equal(res.state[n], server[n]) and res.state[n] is not server[n] for n in server)
    res = aggregate(s, server, [(ok, np.int64(3))], roles)  # NumPy integers count as integers
    assert res.accepted == [0] and res.weights == {0: 1.0} and torch.equal(res.state["a"], ok["a"])
    with pytest.raises(ValueError, match=r"^1 client ids for 2 updates$"):
        aggregate(s, server, [(ok, 1), (ok, 1)], roles, client_ids=["x"])


def test_zeropad_accepts_only_a_smaller_rank_on_the_rank_axis() -> None:
    s = get_strategy("zeropad")
    roles = {
        "a": tinfo("a", "A", Role.A, (3, 4)),
        "b": tinfo("b", "B", Role.B, (5, 3)),
        "g": tinfo("g", "router", Role.ROUTER, (2, 4)),
    }
    server = {"a": torch.zeros(3, 4), "b": torch.zeros(5, 3), "g": torch.zeros(2, 4)}

    def upd(a=(3, 4), b=(5, 3), g=(2, 4)):
        return {"a": torch.ones(a), "b": torch.ones(b), "g": torch.ones(g)}

    good = [upd(), upd(a=(1, 4)), upd(b=(5, 1)), upd(a=(2, 4), b=(5, 2))]
    bad = [
        (upd(a=(0, 4)), "a", (0, 4), (3, 4)),  # rank 0
        (upd(a=(4, 4)), "a", (4, 4), (3, 4)),  # rank above the server's
        (upd(a=(3, 3)), "a", (3, 3), (3, 4)),  # d_in is not the rank axis
        (upd(b=(4, 3)), "b", (4, 3), (5, 3)),  # d_out is not the rank axis
        (upd(g=(1, 4)), "g", (1, 4), (2, 4)),  # a router has no rank axis
        (upd(a=(3, 4, 1)), "a", (3, 4, 1), (3, 4)),  # another number of dimensions
    ]
    res = aggregate(s, server, [(u, 1) for u in good] + [(u, 1) for u, *_ in bad], roles)
    assert res.accepted == [0, 1, 2, 3]
    assert [(r.client, r.key, r.reason) for r in res.rejected] == [
        (4 + i, key, f"shape {got} does not fit the server's {want} (only the rank may be smaller)")
        for i, (_, key, got, want) in enumerate(bad)
    ]
    # p_k = 1/4 each. A's row 0 comes from all 4 clients -> 1; row 1 from clients 0, 2, 3 -> 0.75; row 2 from
    # clients 0, 2 -> 0.5 (zero padding elsewhere). B's columns likewise (client 1 full, client 2 rank 1).
    want = torch.tensor([1.0, 0.75, 0.5])
    assert torch.equal(res.state["a"], want.unsqueeze(1).expand(3, 4))
    assert torch.equal(res.state["b"], want.unsqueeze(0).expand(5, 3))
    assert torch.equal(res.state["g"], torch.ones(2, 4))


def test_het_increments_from_products_and_factors_and_their_rejections() -> None:
    roles = het_roles(r=2)
    server = {"b0": torch.zeros(8, 4)}
    b2, b1 = torch.ones(8, 2), torch.full((2, 4), 0.5)
    inc = het_increments("c", {"b2": b2, "b1": b1}, server, roles)
    assert isinstance(inc, dict) and inc["b0"].dtype == torch.float64
    assert torch.equal(inc["b0"], torch.ones(8, 4, dtype=torch.float64))  # each entry: 1·0.5 + 1·0.5
    prod = het_increments("c", {"b0": torch.full((8, 4), 3.0)}, server, roles)
    assert isinstance(prod, dict) and torch.equal(prod["b0"], torch.full((8, 4), 3.0, dtype=torch.float64))
    both = "send either the product B2·B1 (under B0's name) or both factors B2 and B1"
    cases = [
        ({"b0": torch.ones(8, 5)}, "b0", "product shape (8, 5) does not match B0's (8, 4)"),
        ({"b0": torch.ones(8, 4), "b1": b1, "b2": b2}, "b0", both),
        ({"b0": torch.ones(8, 4), "b2": b2}, "b0", both),
        ({"b2": b2}, "b0", both),
        ({"b1": b1}, "b0", both),
        ({}, "b0", both),
        ({"a": torch.ones(2, 8)}, "a", "sent tensors that are not shared under this strategy: ['a']"),
    ]
    factor_shapes = [
        ((8, 2, 1), (2, 4)),
        ((8, 2), (2, 4, 1)),
        ((7, 2), (2, 4)),
        ((8, 2), (2, 3)),
        ((8, 2), (3, 4)),
    ]
    for s2, s1 in factor_shapes:
        why = f"factor shapes B2 {s2}, B1 {s1} do not multiply to B0's (8, 4)"
        cases.append(({"b2": torch.ones(s2), "b1": torch.ones(s1)}, "b2", why))
    for upd, key, why in cases:
        assert het_increments("c", upd, server, roles) == Rejection("c", why, key), why
    # accumulate through aggregate: B0 + Σ p_k Δ_k with p = 1/4, 3/4
    res = aggregate(
        get_strategy("fedalora-het"),
        {"b0": torch.ones(8, 4)},
        [({"b2": b2, "b1": b1}, 1), ({"b0": torch.full((8, 4), 3.0)}, 3)],
        roles,
    )
    assert torch.equal(res.state["b0"], torch.full((8, 4), 1 + 0.25 * 1 + 0.75 * 3))


def test_combine_refuses_what_it_cannot_average_and_keeps_the_server_device() -> None:
    server = {"x": torch.zeros(2, 2)}
    with pytest.raises(ValueError, match="zip"):  # one weight per update
        combine("mean", server, [{"x": torch.ones(2, 2)}], [0.5, 0.5])
    for aggregation in ("mean", "accumulate"):
        with pytest.raises(
            ValueError, match=rf"^x: update of shape \(2, 1\) for the server's \(2, 2\) under '{aggregation}'"
        ):
            combine(aggregation, server, [{"x": torch.ones(2, 1)}], [1.0])  # type: ignore[arg-type]
    meta = combine("mean", {"x": torch.empty(2, 2, device="meta")}, [{"x": torch.ones(2, 2)}], [1.0])
    assert meta["x"].device.type == "meta"  # the accounting's server lives on the meta device


def test_long_key_lists_are_cut_to_three_in_messages() -> None:
    roles = {n: tinfo(n, "B", Role.B, (2, 1)) for n in "abcd"}
    server = {n: torch.zeros(2, 1) for n in "abcd"}
    four = {n: torch.zeros(2, 1) for n in "wxyz"}
    res = aggregate(get_strategy("fedit"), server, [({**server, **four}, 1), ({}, 1)], roles)
    assert [(r.key, r.reason) for r in res.rejected] == [
        ("w", "sent tensors that are not shared under this strategy: ['w', 'x', 'y']"),
        ("a", "missing shared tensors: ['a', 'b', 'c']"),
    ]
    zeropad = aggregate(get_strategy("zeropad"), server, [({"a": server["a"]}, 1)], roles, client_ids=["z"])
    assert zeropad.rejected == [Rejection("z", "missing shared tensors: ['b', 'c', 'd']", "b")]
    extra = het_increments("c", four, {"b0": torch.zeros(8, 4)}, het_roles())
    assert extra == Rejection(
        "c", "sent tensors that are not shared under this strategy: ['w', 'x', 'y']", "w"
    )


def test_strategy_descriptions_and_role_hints() -> None:
    assert {n: get_strategy(n).description for n in STRATEGY_NAMES} == {
        "fedit": "FedIT: average A and B",
        "ffa": "FFA-LoRA: average B; A frozen at a shared seed",
        "fedsa": "FedSA-LoRA: average A; B local",
        "fedalora": "Fed-ALoRA: average B; A local (persist)",
        "fedalora-het": "Fed-ALoRA (heterogeneous ranks): B0 <- B0 + sum p_k B2_k B1_k",
        "zeropad": "Zero padding (HetLoRA-style): pad A, B to the largest rank, average, truncate",
    }
    with pytest.raises(
        ValueError, match=r"frozen tensors \(use strategy 'fedalora-het' with method 'fedhet'\)$"
    ):
        get_strategy("ffa").check_roles(het_roles())


# --- the client's side of a round: what it loads ----------------------------------------------------------
FOUR = ("q_proj", "k_proj", "v_proj", "o_proj")


def test_client_round_start_names_what_does_not_fit() -> None:
    _, roles, state = adapted(targets=FOUR)
    s = get_strategy("fedalora")
    bs = [n for n, i in roles.items() if i.role == Role.B]
    as_ = [n for n, i in roles.items() if i.role == Role.A]
    down = {n: state[n] for n in bs}
    with pytest.raises(ValueError) as missing:
        client_round_start(s, state, {}, roles)
    assert (
        str(missing.value)
        == f"server payload does not fit strategy 'fedalora': missing {bs[:3]}, unexpected []"
    )
    with pytest.raises(ValueError) as extra:
        client_round_start(s, state, {**down, **{n: state[n] for n in as_}}, roles)
    assert (
        str(extra.value)
        == f"server payload does not fit strategy 'fedalora': missing [], unexpected {as_[:3]}"
    )
    b = bs[0]
    with pytest.raises(
        ValueError, match=rf"^{b}: server tensor \(8, 3\) does not match the client's \(8, 2\)$"
    ):
        client_round_start(s, state, {**down, b: torch.ones(8, 3)}, roles)
    with pytest.raises(ValueError, match=r"resets \[.*, .*\]…: pass the client's initial state$") as reset:
        client_round_start(get_strategy("fedalora", local_a="reset"), state, down, roles)
    assert str(reset.value).count("lora_A") == 2  # the first two reset tensors are named
    # zeropad: a server tensor smaller than the client's rank, or of another number of dimensions
    z = get_strategy("zeropad")
    _, zroles, zstate = adapted(r=3)
    a = by_tensor(zroles, "A")
    zdown = {n: torch.ones(8, 8)[: t.shape[0], : t.shape[1]].clone() for n, t in zstate.items()}
    for bad in (torch.ones(2, 8), torch.ones(3, 8, 1)):
        want = rf"^{a}: server tensor {re.escape(str(tuple(bad.shape)))} cannot be truncated to \(3, 8\)$"
        with pytest.raises(ValueError, match=want):
            client_round_start(z, zstate, {**zdown, a: bad}, zroles)


def test_client_round_start_keeps_the_clients_dtype_and_device() -> None:
    _, roles, state = adapted()
    s = get_strategy("fedalora")
    b = by_tensor(roles, "B")
    down = {b: torch.full(tuple(state[b].shape), 0.5)}
    double = client_round_start(s, {n: t.double() for n, t in state.items()}, down, roles)
    assert double[b].dtype == torch.float64 and torch.equal(double[b], down[b].double())
    meta = client_round_start(s, {n: t.to("meta") for n, t in state.items()}, down, roles)
    assert meta[b].device.type == "meta"
    # nothing to reset: no fresh draw, no config needed
    keep = Strategy("keep", shared=s.shared, local=s.local, reset_to="fresh")
    assert torch.equal(
        client_round_start(keep, state, down, roles)[by_tensor(roles, "A")], state[by_tensor(roles, "A")]
    )


def test_fresh_draw_depends_on_the_seed_only_and_keeps_dtype_and_device() -> None:
    s = get_strategy("fedalora-het")
    _, roles, state = adapted("fedhet", r=2, d_m=4)
    cfg = client_config(s, AsymLoraConfig(target_modules=["q_proj"], intermediate_rank=4), rank=2)
    down = {by_tensor(roles, B0_NAME): torch.zeros(HIDDEN, 4)}
    with pytest.raises(
        ValueError, match=r"^strategy 'fedalora-het' re-initialises tensors each round: pass the client cfg$"
    ):
        client_round_start(s, state, down, roles)
    a = by_tensor(roles, "A")
    torch.manual_seed(0)
    first = client_round_start(s, state, down, roles, cfg=cfg, seed=5)
    torch.manual_seed(1)  # the global generator does not enter
    again = client_round_start(s, state, down, roles, cfg=cfg, seed=5)
    other = client_round_start(s, state, down, roles, cfg=cfg, seed=6)
    assert torch.equal(first[a], again[a]) and not torch.equal(first[a], other[a])
    double = client_round_start(s, {n: t.double() for n, t in state.items()}, down, roles, cfg=cfg, seed=5)
    assert double[a].dtype == torch.float64 and torch.equal(double[a], first[a].double())
    meta = client_round_start(s, {n: t.to("meta") for n, t in state.items()}, down, roles, cfg=cfg, seed=5)
    assert meta[a].device.type == "meta"


def test_freeze_returns_the_frozen_names() -> None:
    pm, roles, _ = adapted(targets=("q_proj", "v_proj"))
    assert freeze_(pm, get_strategy("ffa")) == [n for n, i in roles.items() if i.role == Role.A]
    assert freeze_(pm, get_strategy("fedit")) == []
