"""`asymlora.federated.accounting` on hand-worked values (mutation tests): the parameters and bytes each
strategy moves per client per round, the paper's formulas, the table, its text and its command line.
docs/testing.md, "Mutation results: federated/accounting.py", lists what these tests kill.

The worked example, used throughout: a LLaMA-style model on the meta device (no weights) with hidden size 8,
2 layers, 2 heads of 4 and 1 key-value head, so the adapted layers (q_proj, v_proj) have
(d_in, d_out) = (8, 8) and (8, 4) in each layer. Homogeneous rank r = 2 on 4 clients; heterogeneous client
ranks [4, 1, 2, 1] (r̄ = 2, r_max = 4); intermediate rank d_m = 3. Per client per round, in float32 values
(A is r × d_in, B is d_out × r, B0 d_out × d_m, B2 d_out × r_i, B1 r_i × d_m):

- fedit, A and B both ways: a layer is 2·8 + 8·2 + 2·8 + 4·2 = 56 values, 112 for 2 layers, each way;
- ffa and fedalora, B both ways: 8·2 + 4·2 = 24 → 48 each way; fedsa, A: 2·8 + 2·8 = 32 → 64 each way;
- zeropad: up at the client's own rank, (8 + 8)·r_i + (8 + 4)·r_i = 28·r_i a layer → 56·r_i = 224, 56, 112,
  56; down padded to r_max = 4: 224 for every client;
- fedalora-het: down B0: 8·3 + 4·3 = 36 → 72. Up, per module, the factors B2, B1 (r_i·(d_out + d_m) values)
  when r_i·(d_out + d_m) < d_out·d_m, else the product B2·B1 (d_out·d_m values): q_proj 11·r_i against 24
  (r_i = 1: 11, 2: 22, 4: the product 24), v_proj 7·r_i against 12 (r_i = 1: 7; 2 and 4: the product 12).
  A layer is 36 (r_i = 4), 34 (r_i = 2), 18 (r_i = 1): 72, 36, 68, 36 up for the four clients.

Bytes are 4 per value at float32; at int8 a tensor costs numel + 4·rows (one float32 scale per row of
shape[0]). The paper's formulas (docs/design.md §4) on the same shapes: fedit Σ 2·(d_in + d_out)·r =
2·(2·16·2 + 2·12·2) = 224; ffa, fedalora Σ 2·d_out·r = 96; fedsa Σ 2·d_in·r = 128; zeropad
Σ (d_in + d_out)·(r̄ + r_max) = 2·28·6 = 336; fedalora-het Σ d_out·r̄ + 2·d_m·r̄ + d_out·d_m =
2·[(16 + 12 + 24) + (8 + 12 + 12)] = 168, and without the 2·d_m·r̄ term 2·[(16 + 24) + (8 + 12)] = 120.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import pytest
import torch

from asymlora.federated import accounting
from asymlora.federated.accounting import (
    ClientCost,
    StrategyCost,
    _layer_dims,
    adapted_meta_model,
    communication_table,
    expected_round_bytes,
    format_table,
    main,
    meta_model,
    paper_params,
    round_cost,
    run_round_cost,
)
from asymlora.federated.state import adapter_state, role_map
from asymlora.federated.strategies import get_strategy
from asymlora.tuner.config import AsymLoraConfig

TINY = {
    "model_type": "llama",
    "hidden_size": 8,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "intermediate_size": 16,
    "vocab_size": 32,
}
RANKS = [4, 1, 2, 1]
DIMS = [(8, 8), (8, 4), (8, 8), (8, 4)]  # (d_in, d_out): q_proj, v_proj of layer 0, then of layer 1
HET_NOTE = (
    "ours: B2·B1 up for r_i in [4], factors B2, B1 for r_i in [1], per layer the smaller of the two for r_i "
    "in [2]; B0 down"
)
ZEROPAD_NOTE = "upload at own rank, download padded to the largest rank"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    """A local model directory holding only the tiny model's config.json."""
    path = tmp_path_factory.mktemp("tiny-llama")
    (path / "config.json").write_text(json.dumps(TINY))
    return str(path)


def costs(row: StrategyCost) -> list[tuple[int, int, int, int, int, int]]:
    return [(c.client, c.rank, c.params_up, c.params_down, c.bytes_up, c.bytes_down) for c in row.clients]


def per_client(n_up: list[int] | int, n_down: int, ranks: list[int], size: int = 4) -> list[tuple]:
    ups = n_up if isinstance(n_up, list) else [n_up] * len(ranks)
    return [
        (k, r, u, n_down, size * u, size * n_down) for k, (r, u) in enumerate(zip(ranks, ups, strict=True))
    ]


# --- the paper's formulas ----------------------------------------------------------------------------
def test_paper_params_by_hand() -> None:
    def p(name: str, **kw) -> float:
        return paper_params(name, DIMS, 2, RANKS, 3, **kw)

    assert (p("fedit"), p("ffa"), p("fedalora"), p("fedsa"), p("zeropad")) == (224, 96, 96, 128, 336)
    assert p("fedalora-het") == 168  # the default counts the factors: het_inner_factors=True
    assert p("fedalora-het", het_inner_factors=True) == 168
    assert p("fedalora-het", het_inner_factors=False) == 120
    # r̄ and r_max are the mean and the maximum whatever the order: [1, 1, 4, 2] and [2, 1, 1, 4]
    assert paper_params("zeropad", DIMS, 2, [1, 1, 4, 2], 3) == paper_params(
        "zeropad", DIMS, 2, [2, 1, 1, 4], 3
    )
    # r̄ = 7/3, r_max = 4: zeropad 56·(7/3 + 4) = 1064/3; het q (8 + 6 + 0)·7/3 + 24, v (4 + 6)·7/3 + 12
    assert paper_params("zeropad", DIMS, 2, [4, 2, 1], 3) == pytest.approx(1064 / 3, rel=1e-12)
    assert paper_params("fedalora-het", DIMS, 2, [4, 2, 1], 3) == pytest.approx(
        2 * (24 * 7 / 3 + 36), rel=1e-12
    )
    # homogeneous strategies ignore the heterogeneous ranks and d_m
    assert paper_params("fedit", DIMS, 3, [64], 99) == 2 * (2 * 16 * 3 + 2 * 12 * 3)
    with pytest.raises(ValueError) as err:
        paper_params("fedavg", DIMS, 2, RANKS, 3)
    assert str(err.value) == (
        "unknown strategy 'fedavg'; choose one of ['fedit', 'ffa', 'fedsa', 'fedalora', 'fedalora-het', 'zeropad']"
    )


def test_layer_dims_of_the_tiny_model(tiny: str) -> None:
    cfg = AsymLoraConfig(method="lora", r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    roles = role_map(adapted_meta_model(tiny, cfg))
    assert _layer_dims(roles) == DIMS


# --- the measured table ------------------------------------------------------------------------------
def test_communication_table_by_hand(tiny: str) -> None:
    rows = communication_table(tiny, 2, RANKS, 3)
    assert [row.strategy for row in rows] == ["fedit", "ffa", "fedsa", "fedalora", "fedalora-het", "zeropad"]
    by = {row.strategy: row for row in rows}
    homo = [2, 2, 2, 2]
    assert costs(by["fedit"]) == per_client(112, 112, homo)
    assert costs(by["ffa"]) == costs(by["fedalora"]) == per_client(48, 48, homo)
    assert costs(by["fedsa"]) == per_client(64, 64, homo)
    assert costs(by["zeropad"]) == per_client([224, 56, 112, 56], 224, RANKS)
    assert costs(by["fedalora-het"]) == per_client([72, 36, 68, 36], 72, RANKS)
    assert {n: r.ranks for n, r in by.items()} == {
        "fedit": (2, 2, 2, 2), "ffa": (2, 2, 2, 2), "fedsa": (2, 2, 2, 2), "fedalora": (2, 2, 2, 2),
        "fedalora-het": (4, 1, 2, 1), "zeropad": (4, 1, 2, 1),
    }  # fmt: skip
    assert {n: r.paper_params for n, r in by.items()} == {
        "fedit": 224, "ffa": 96, "fedsa": 128, "fedalora": 96, "fedalora-het": 168, "zeropad": 336,
    }  # fmt: skip
    assert all(r.published is None for r in rows)  # no published figure for this model
    assert {n: r.note for n, r in by.items()} == {
        "fedit": "", "ffa": "", "fedsa": "", "fedalora": "", "fedalora-het": HET_NOTE, "zeropad": ZEROPAD_NOTE,
    }  # fmt: skip
    # the means over clients: het up (72 + 36 + 68 + 36) / 4 = 53, down 72; zeropad up 448 / 4 = 112, down 224
    het, pad = by["fedalora-het"], by["zeropad"]
    assert (het.params_up, het.params_down, het.params, het.bytes) == (53, 72, 125, 500)
    assert (pad.params_up, pad.params_down, pad.params, pad.bytes) == (112, 224, 336, 1344)
    assert pad.params == pad.paper_params  # up at own rank, down at r_max: the formula exactly


def test_communication_table_at_bfloat16_counts_two_bytes_a_value(tiny: str) -> None:
    by = {row.strategy: row for row in communication_table(tiny, 2, RANKS, 3, dtype=torch.bfloat16)}
    assert costs(by["fedit"]) == per_client(112, 112, [2] * 4, size=2)
    assert costs(by["fedalora-het"]) == per_client([72, 36, 68, 36], 72, RANKS, size=2)
    assert costs(by["zeropad"]) == per_client([224, 56, 112, 56], 224, RANKS, size=2)


def test_communication_table_at_wire_dtypes_by_hand(tiny: str) -> None:
    """int8 up (numel + 4 B a row of shape[0]), float16 down (2 B a value); then the other way round.

    fedit up: A q 2×8 → 16 + 4·2 = 24, B q 8×2 → 16 + 4·8 = 48, A v 24, B v 4×2 → 8 + 16 = 24: 120 a layer;
    ffa / fedalora up: 48 + 24 = 72 a layer; fedsa up: 24 + 24 = 48 a layer.
    zeropad up: r_i = 4: A q 4×8 → 48, B q 8×4 → 64, A v 48, B v 4×4 → 32 (192 a layer); r_i = 2: 24 + 48 +
    24 + 24 = 120; r_i = 1: A 1×8 → 12, B q 8×1 → 40, A v 12, B v 4×1 → 20 (84).
    fedalora-het up: r_i = 4, the products q 8×3 → 24 + 32 = 56 and v 4×3 → 12 + 16 = 28 (84 a layer);
    r_i = 2: q's factors B2 8×2 → 48 and B1 2×3 → 6 + 8 = 14, v's product 28 (90); r_i = 1: q's B2 8×1 → 40
    and B1 1×3 → 7, v's B2 4×1 → 20 and B1 → 7 (74)."""
    by = {row.strategy: row for row in communication_table(tiny, 2, RANKS, 3, transfer=("int8", "float16"))}
    wire = {n: [(c.bytes_up, c.bytes_down) for c in r.clients] for n, r in by.items()}
    assert wire == {
        "fedit": [(240, 224)] * 4,
        "ffa": [(144, 96)] * 4,
        "fedsa": [(96, 128)] * 4,
        "fedalora": [(144, 96)] * 4,
        "fedalora-het": [(168, 144), (148, 144), (180, 144), (148, 144)],
        "zeropad": [(384, 448), (168, 448), (240, 448), (168, 448)],
    }
    assert costs(by["fedit"])[0][2:4] == (112, 112)  # the parameters do not depend on the wire
    back = {row.strategy: row for row in communication_table(tiny, 2, RANKS, 3, transfer=("float16", "int8"))}
    assert [(c.bytes_up, c.bytes_down) for c in back["fedit"].clients] == [(224, 240)] * 4
    assert [(c.bytes_up, c.bytes_down) for c in back["fedalora-het"].clients] == [
        (144, 168), (72, 168), (136, 168), (72, 168)
    ]  # fmt: skip  # down: B0 q 8×3 → 56, v 4×3 → 28, 84 a layer


def test_the_het_note_without_mixed_ranks(tiny: str) -> None:
    """d_m = 1: factors never beat the product (r_i·(d_out + 1) ≥ d_out). d_m = 20: r_i = 1 and 2 send factors
    on both modules (q: 28·r_i < 160, v: 24·r_i < 80); r_i = 4 sends factors on q (112 < 160) and the product
    on v (96 ≥ 80), so 4 is mixed: up 2·(4·28 + 80) = 384."""
    rows = {row.strategy: row for row in communication_table(tiny, 2, [3, 1], 1)}
    assert (
        rows["fedalora-het"].note == "ours: B2·B1 up for r_i in [1, 3], factors B2, B1 for r_i in []; B0 down"
    )
    rows = {row.strategy: row for row in communication_table(tiny, 2, [2, 4, 1, 2], 20)}
    assert rows["fedalora-het"].note == (
        "ours: B2·B1 up for r_i in [], factors B2, B1 for r_i in [1, 2], per layer the smaller of the two "
        "for r_i in [4]; B0 down"
    )
    assert [c.params_up for c in rows["fedalora-het"].clients] == [
        2 * (56 + 48),
        2 * (112 + 80),
        2 * (28 + 24),
        2 * (56 + 48),
    ]
    # d_m = 8, r_i = 4: q_proj's factors 4·(8 + 8) = 64 tie with the product 8·8 = 64: the product (strictly
    # fewer values needed for factors); v_proj 4·12 = 48 ≥ 32: the product. Up 2·(64 + 32) = 192
    rows = {row.strategy: row for row in communication_table(tiny, 2, [4], 8)}
    assert rows["fedalora-het"].note == "ours: B2·B1 up for r_i in [4], factors B2, B1 for r_i in []; B0 down"
    assert rows["fedalora-het"].clients[0].params_up == 192


def test_the_qwen2_table_and_its_published_figures() -> None:
    """Qwen2-7B: q_proj and o_proj (3584 → 3584) in 28 layers, 56 modules, r = 8, the paper's ranks, d_m = 16.
    fedalora: 2·56·3584·8 = 3 211 264; het up per module: the product 3584·16 = 57 344 for r_i ≥ 16 and the
    factors 8·3600 = 28 800 for r_i = 8, mean (6·57 344 + 2·28 800) / 8 = 50 208 → 2 811 648; down 3 211 264.
    The published 9.23 is 56·3584·(30 + 16) = 9 232 384 (no 2·d_m·r̄ term)."""
    by = {row.strategy: row for row in communication_table("qwen2-7b")}
    assert by["fedalora"].params == 3_211_264 and by["fedalora"].published == 3.21
    het = by["fedalora-het"]
    assert (het.params_up, het.params_down) == (2_811_648, 3_211_264)
    assert het.paper_params == pytest.approx(56 * (3584 * 30 + 2 * 16 * 30 + 3584 * 16), rel=1e-12)
    assert het.published == 9.23
    assert het.note == (
        "ours: B2·B1 up for r_i in [16, 32, 64], factors B2, B1 for r_i in [8]; B0 down; the published 9.23 "
        "is L·Σ d_out·(r̄ + d_m) = 9.23 M (no 2·d_m·r̄ term)"
    )
    assert by["zeropad"].published == 37.73 and by["zeropad"].note == ZEROPAD_NOTE


def test_the_default_table_is_llama2_7b() -> None:
    """LLaMA-2-7B, q_proj and v_proj (4096 → 4096) in 32 layers: 64 modules, r = 8, the paper's ranks,
    d_m = 16. fedit 2·64·(8·4096 + 4096·8) = 8 388 608; one side 4 194 304; zeropad up 64·8192·r̄ = 15 728 640,
    down 64·8192·64 = 33 554 432; het down 64·4096·16 = 4 194 304, up the product 65 536 for r_i ≥ 16 and the
    factors 8·4112 = 32 896 for r_i = 8: 64·(6·65 536 + 2·32 896) / 8 = 3 672 064."""
    by = {row.strategy: row for row in communication_table()}
    assert {n: (r.params_up, r.params_down) for n, r in by.items()} == {
        "fedit": (4_194_304, 4_194_304), "ffa": (2_097_152, 2_097_152), "fedsa": (2_097_152, 2_097_152),
        "fedalora": (2_097_152, 2_097_152), "fedalora-het": (3_672_064, 4_194_304),
        "zeropad": (15_728_640, 33_554_432),
    }  # fmt: skip
    assert by["fedalora-het"].published == 12.12 and by["fedit"].bytes == 4 * 8_388_608


def test_the_qwen2_note_prints_the_formula_in_millions(monkeypatch) -> None:
    """The Qwen2 note's figure on shapes where it sits on a rounding boundary: q_proj and o_proj (750 → 750) in
    1 layer, r_i = 2, d_m = 248: Σ d_out·(r̄ + d_m) = 1500·250 = 375 000 = 0.375 M, printed 0.38 (0.375 is
    exact in binary and rounds half to even)."""
    arch = {"family": "qwen2", "hidden_size": 750, "num_hidden_layers": 1, "num_attention_heads": 1,
            "num_key_value_heads": 1, "intermediate_size": 8, "vocab_size": 8, "targets": ("q_proj", "o_proj")}  # fmt: skip
    monkeypatch.setattr(accounting, "ARCHS", {"qwen2-7b": arch})
    rows = {row.strategy: row for row in communication_table("qwen2-7b", 2, [2], 248)}
    assert rows["fedalora-het"].note == (
        "ours: B2·B1 up for r_i in [], factors B2, B1 for r_i in [2]; B0 down; the published 9.23 is "
        "L·Σ d_out·(r̄ + d_m) = 0.38 M (no 2·d_m·r̄ term)"
    )


# --- round_cost and the run's reference --------------------------------------------------------------
def _state(tiny: str, method: str, r: int):
    cfg = AsymLoraConfig(
        method=method, r=r, lora_alpha=2 * r, intermediate_rank=3, target_modules=["q_proj", "v_proj"]
    )
    model = adapted_meta_model(tiny, cfg)
    return adapter_state(model), role_map(model)


def test_round_cost_het_upload_choices_and_refusals(tiny: str) -> None:
    het = get_strategy("fedalora-het")
    states = {r: _state(tiny, "fedhet", r) for r in (4, 2, 1)}
    clients = [states[r] for r in RANKS]

    def ups(how: Literal["auto", "product", "factors"]) -> list[int]:
        return [c.params_up for c in round_cost(het, states[4], clients, RANKS, het_upload=how)]

    assert ups("auto") == [72, 36, 68, 36]
    assert ups("factors") == [2 * 4 * (11 + 7), 2 * 18, 2 * 2 * 18, 2 * 18]  # r_i·(d_out + d_m), both modules
    assert ups("product") == [72] * 4  # 2·(8·3 + 4·3)
    out = round_cost(het, states[1], clients, RANKS)  # B0 has one shape whatever the server's rank
    assert [(c.client, c.rank, c.params_down, c.bytes_up) for c in out] == [
        (0, 4, 72, 288), (1, 1, 72, 144), (2, 2, 72, 272), (3, 1, 72, 144)
    ]  # fmt: skip
    with pytest.raises(ValueError):  # one rank per client
        round_cost(het, states[4], clients, RANKS[:3])


def _fed_config(tiny: str, name: str, **over):
    from asymlora.config import from_dict
    from asymlora.federated.config import FedConfig

    het = name in ("zeropad", "fedalora-het")
    raw = {
        "model": {"name": tiny},
        "strategies": [name],
        "adapter": {"r": 2, "lora_alpha": 4, "intermediate_rank": 3, "target_modules": ["q_proj", "v_proj"]},
        "clients": {"num": 4, "ranks": RANKS if het else None},
    }
    for key, value in over.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return from_dict(FedConfig, raw)


def test_run_round_cost_reads_the_run_config(tiny: str) -> None:
    pad = run_round_cost(_fed_config(tiny, "zeropad"), "zeropad")
    assert [
        (c.client, c.rank, c.params_up, c.params_down, c.bytes_up, c.bytes_down) for c in pad
    ] == per_client([224, 56, 112, 56], 224, RANKS)
    # the run's het_upload; the homogeneous rank adapter.r = 2 on all 4 clients
    het = run_round_cost(_fed_config(tiny, "fedalora-het", het_upload="factors"), "fedalora-het")
    assert [c.params_up for c in het] == [144, 36, 72, 36]
    fedit = run_round_cost(_fed_config(tiny, "fedit"), "fedit")
    assert [(c.rank, c.params_up, c.params_down) for c in fedit] == [(2, 112, 112)] * 4
    # a homogeneous strategy in a config that lists per-client ranks trains (and records) adapter.r
    listed = _fed_config(tiny, "fedit", clients={"ranks": RANKS})
    assert [(c.rank, c.params_up, c.params_down) for c in run_round_cost(listed, "fedit")] == [
        (2, 112, 112)
    ] * 4
    # the run's wire dtypes: B up at bfloat16 (48·2 = 96), down at int8 (B q 8×2 → 48, B v 4×2 → 24: 144)
    wire = _fed_config(tiny, "fedalora", transfer={"up": "bfloat16", "down": "int8"})
    assert [(c.bytes_up, c.bytes_down) for c in run_round_cost(wire, "fedalora")] == [(96, 144)] * 4


def test_expected_round_bytes_under_partial_participation(tiny: str) -> None:
    # zeropad at float32, 2 of 4 clients a round: up 4·(224 + 56 + 112 + 56) / 4 = 448, down 4·224 = 896
    cfg = _fed_config(tiny, "zeropad", clients={"per_round": 2})
    assert expected_round_bytes(cfg, "zeropad") == {
        "clients_per_round": 2, "per_client": 1344, "per_round": 2688, "up_per_round": 896, "down_per_round": 1792,
    }  # fmt: skip
    # het, products up at int8 (84 a layer, 168), B0 down at float32 (288); 3 of 4 clients
    cfg = _fed_config(
        tiny, "fedalora-het", het_upload="product", clients={"per_round": 3}, transfer={"up": "int8"}
    )
    assert expected_round_bytes(cfg, "fedalora-het") == {
        "clients_per_round": 3, "per_client": 456, "per_round": 1368, "up_per_round": 504, "down_per_round": 864,
    }  # fmt: skip


# --- the cost records ----------------------------------------------------------------------------------
def test_client_and_strategy_cost_means() -> None:
    a = ClientCost(0, 4, params_up=10, params_down=3, bytes_up=40, bytes_down=12)
    b = ClientCost(1, 1, params_up=2, params_down=3, bytes_up=7, bytes_down=12)
    assert (a.params, a.bytes, b.params, b.bytes) == (13, 52, 5, 19)
    row = StrategyCost("zeropad", (a, b), 1.5)
    assert (row.params_up, row.params_down, row.params, row.bytes) == (6, 3, 9, 35.5)
    assert (row.published, row.note, row.ranks) == (None, "", ())


# --- the text ------------------------------------------------------------------------------------------
HEADER = (
    "| strategy | client ranks | up (M) | down (M) | measured total (M) | MB | paper formula (M) | published (M) "
    "| note |\n|---|---|---:|---:|---:|---:|---:|---:|---|"
)


def _rows() -> list[StrategyCost]:
    # fedit: 2 clients of rank 8, 1.234 567 M up and 2.5 M down each (bytes 4.938 268 MB + 10 MB); zeropad:
    # ranks 4 and 1, ups 3 M and 1 M (mean 2 M), down 4 M, bytes 6 + 2 (mean 4) up and 8 down; ffa: one client
    fedit = ClientCost(0, 8, 1_234_567, 2_500_000, 4_938_268, 10_000_000)
    return [
        StrategyCost("fedit", (fedit, ClientCost(1, 8, 1_234_567, 2_500_000, 4_938_268, 10_000_000)), 3.7e6,
                     8.39, "", (8, 8)),
        StrategyCost("zeropad", (ClientCost(0, 4, 3_000_000, 4_000_000, 6_000_000, 8_000_000),
                                 ClientCost(1, 1, 1_000_000, 4_000_000, 2_000_000, 8_000_000)), 5.996e6,
                     None, "a note", (4, 1)),
        StrategyCost("ffa", (ClientCost(0, 2, 6_000, 14_000, 24_000, 56_000),), 20_000.0, 0.0, "", (2,)),
        StrategyCost("fedsa", (ClientCost(0, 2, 10**10, 2 * 10**10, 4 * 10**10, 8 * 10**10),), 3e10, None, "",
                     (2,)),
    ]  # fmt: skip


def test_format_table_by_hand() -> None:
    # fedit: 1.23 up, 2.50 down, 3.73 total, 14.9 MB (14 938 268 B), formula 3.70, published 8.39; zeropad:
    # 2.00, 4.00, 6.00, 12.0 MB ((14 + 10) / 2 M), formula 6.00 (5.996 rounded), no published figure "—";
    # ffa: 0.01 (0.006), 0.01 (0.014), 0.02, 0.1 MB (80 000 B), formula 0.02, published 0.00 (0.0 is a figure)
    # fedsa: 10¹⁰ values up is 10000.00 M (10¹⁰ / (10⁶ + 1) would print 9999.99)
    assert format_table("demo", _rows()) == (
        "demo: per client per round, mean over clients (bytes at float32, 4 B/value)\n\n" + HEADER + "\n"
        "| fedit | 8 on all 2 | 1.23 | 2.50 | 3.73 | 14.9 | 3.70 | 8.39 |  |\n"
        "| zeropad | 4,1 | 2.00 | 4.00 | 6.00 | 12.0 | 6.00 | — | a note |\n"
        "| ffa | 2 on all 1 | 0.01 | 0.01 | 0.02 | 0.1 | 0.02 | 0.00 |  |\n"
        "| fedsa | 2 on all 1 | 10000.00 | 20000.00 | 30000.00 | 120000.0 | 30000.00 | — |  |"
    )
    first = format_table("demo", _rows(), dtype=torch.bfloat16).splitlines()[0]
    assert first == "demo: per client per round, mean over clients (bytes at bfloat16, 2 B/value)"
    first = format_table("demo", _rows(), transfer=("int8", "float16")).splitlines()[0]
    assert first == (
        "demo: per client per round, mean over clients (bytes at up int8, down float16; int8: 1 B/value + a "
        "float32 scale per row)"
    )


# --- the models ----------------------------------------------------------------------------------------
TINY_ARCHS = {
    "tiny-llama": {**{k: v for k, v in TINY.items() if k != "model_type"}, "family": "llama",
                   "targets": ("q_proj", "v_proj")},
    "tiny-qwen": {**{k: v for k, v in TINY.items() if k != "model_type"}, "num_hidden_layers": 1,
                  "family": "qwen2", "targets": ("q_proj", "o_proj")},
}  # fmt: skip


def test_meta_model_of_an_arch_a_directory_and_a_builtin(tiny: str, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(accounting, "ARCHS", TINY_ARCHS)
    llama, qwen = meta_model("tiny-llama"), meta_model("tiny-qwen")
    assert (type(llama).__name__, type(qwen).__name__) == ("LlamaForCausalLM", "Qwen2ForCausalLM")
    for model in (llama, qwen):  # the table's keys are not config fields
        assert not hasattr(model.config, "family") and not hasattr(model.config, "targets")
        assert next(model.parameters()).device.type == "meta"
    assert llama.config.num_hidden_layers == 2 and qwen.config.num_hidden_layers == 1
    assert tuple(llama.model.layers[0].self_attn.v_proj.weight.shape) == (4, 8)
    local = meta_model(tiny)
    assert type(local).__name__ == "LlamaForCausalLM" and local.config.num_key_value_heads == 1
    assert next(local.parameters()).device.type == "meta"
    # a quantised checkpoint's config: the meta model is the plain architecture
    quant = tmp_path / "quantised"
    quant.mkdir()
    (quant / "config.json").write_text(
        json.dumps({**TINY, "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}})
    )
    model = meta_model(str(quant))
    assert not hasattr(model.config, "quantization_config")
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    # the table of a local directory or a built-in model counts q_proj and v_proj (DEFAULT_TARGETS)
    assert costs(communication_table(tiny, 2, [2], 3)[3]) == per_client(48, 48, [2])
    # the table of an arch counts its targets: tiny-qwen's o_proj (8 → 8) in 1 layer, fedalora B: 16 + 16
    rows = {r.strategy: r for r in communication_table("tiny-qwen", 2, [2], 3)}
    assert rows["fedalora"].params_up == 32 and rows["fedit"].params_up == 2 * (16 + 16)


def test_meta_model_of_the_builtin_model(monkeypatch) -> None:
    monkeypatch.setattr(accounting, "_CONFIGS", {})  # read the config, not an earlier test's cached copy
    model = meta_model("SmolLM2-135M")  # a built-in name, in any case
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert next(model.parameters()).device.type == "meta"


def test_meta_model_refusals(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as err:
        meta_model(str(tmp_path / "missing"))
    assert str(err.value) == (
        f"unknown architecture {str(tmp_path / 'missing')!r}: choose one of ['llama2-7b', 'qwen2-7b'], a "
        "built-in model (smollm2-135m) or a local model directory"
    )
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ValueError) as err:
        meta_model(str(bad))
    assert str(err.value) == (
        f"cannot read the model config of {str(bad)!r}: It looks like the config file at "
        f"'{bad / 'config.json'}' is not a valid JSON file."
    )


# --- the command line --------------------------------------------------------------------------------
def tiny_table(arch: str, rows: list[str]) -> str:
    return (
        f"{arch}: per client per round, mean over clients (bytes at float32, 4 B/value)\n\n{HEADER}\n"
        + "\n".join(rows)
    )


def test_main_prints_the_table_and_the_settings(tiny: str, capsys) -> None:
    assert main(["--arch", tiny, "--r", "2", "--ranks", "4,1,2,1", "--d-m", "3"]) == 0
    zero = "0.00 | 0.00 | 0.00 | 0.0 | 0.00 | —"
    assert capsys.readouterr().out == tiny_table(tiny, [
        f"| fedit | 2 on all 4 | {zero} |  |",
        f"| ffa | 2 on all 4 | {zero} |  |",
        f"| fedsa | 2 on all 4 | {zero} |  |",
        f"| fedalora | 2 on all 4 | {zero} |  |",
        f"| fedalora-het | 4,1,2,1 | {zero} | {HET_NOTE} |",
        f"| zeropad | 4,1,2,1 | {zero} | {ZEROPAD_NOTE} |",
    ]) + "\n\nr = 2; heterogeneous ranks [4, 1, 2, 1] (r̄ = 2), d_m = 3\n"  # fmt: skip


def test_main_defaults_and_its_edge_values(tiny: str, capsys) -> None:
    assert main(["--arch", tiny]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n\nr = 8; heterogeneous ranks [64, 64, 32, 32, 16, 16, 8, 8] (r̄ = 30), d_m = 16\n")
    assert "| fedalora | 8 on all 8 |" in out and "| zeropad | 64,64,32,32,16,16,8,8 |" in out
    assert "(bytes at float32, 4 B/value)" in out
    # 1 is a valid rank, r and d_m; blanks and empty entries of --ranks are skipped; r̄ = 7/3 printed with %g
    assert main(["--arch", tiny, "--r", "1", "--d-m", "1", "--ranks", " 4, 2,,1 ,"]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n\nr = 1; heterogeneous ranks [4, 2, 1] (r̄ = 2.33333), d_m = 1\n")
    assert "| fedit | 1 on all 3 |" in out
    # --transfer UP,DOWN (spaces allowed) and UP alone (DOWN = UP)
    assert main(["--arch", tiny, "--transfer", "int8, float16"]) == 0
    assert (
        "(bytes at up int8, down float16; int8: 1 B/value + a float32 scale per row)"
        in capsys.readouterr().out
    )
    assert main(["--arch", tiny, "--transfer", "bfloat16"]) == 0
    assert "(bytes at up bfloat16, down bfloat16; int8:" in capsys.readouterr().out


def test_main_counts_the_bytes_at_the_wire_dtypes(capsys) -> None:
    """SmolLM2-135M (built in): 30 layers, q_proj 576 → 576, v_proj 576 → 192, r = 8. fedit moves
    30·(8·576 + 576·8 + 8·576 + 192·8) = 460 800 values each way (0.92 M both); at int8 a layer's A q costs
    4608 + 4·8, B q 4608 + 4·576, A v 4608 + 4·8, B v 1536 + 4·192: 18 496 B, 1 109 760 B both ways
    (1.1 MB; 3.7 MB at float32). ffa: B only, 30·(4608 + 1536) = 184 320 each way; int8 30·(6912 + 2304)
    = 276 480 B each way (0.6 MB)."""
    assert main(["--arch", "smollm2-135m", "--transfer", "int8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "| fedit | 8 on all 8 | 0.46 | 0.46 | 0.92 | 1.1 | 0.92 | — |  |" in lines
    assert "| ffa | 8 on all 8 | 0.18 | 0.18 | 0.37 | 0.6 | 0.37 | — |  |" in lines


def test_main_all_prints_every_arch_separated_by_a_blank_line(monkeypatch, capsys) -> None:
    """--arch all (the default) prints every arch of `ARCHS`, sorted, a blank line between the tables. With
    r_i = 2 and d_m = 3, tiny-llama's q_proj sends factors (2·11 = 22 < 24) and its v_proj the product
    (2·7 = 14 ≥ 12); tiny-qwen's q_proj and o_proj (d_out 8) send factors."""
    monkeypatch.setattr(accounting, "ARCHS", TINY_ARCHS)
    assert main(["--ranks", "2", "--d-m", "3", "--r", "2"]) == 0
    zero = "0.00 | 0.00 | 0.00 | 0.0 | 0.00 | —"
    homo = [f"| {n} | 2 on all 1 | {zero} |  |" for n in ("fedit", "ffa", "fedsa", "fedalora")]
    pad = f"| zeropad | 2 on all 1 | {zero} | {ZEROPAD_NOTE} |"
    llama = tiny_table("tiny-llama", [
        *homo,
        f"| fedalora-het | 2 on all 1 | {zero} | ours: B2·B1 up for r_i in [], factors B2, B1 for r_i in [], "
        "per layer the smaller of the two for r_i in [2]; B0 down |",
        pad,
    ])  # fmt: skip
    qwen = tiny_table("tiny-qwen", [
        *homo,
        f"| fedalora-het | 2 on all 1 | {zero} | ours: B2·B1 up for r_i in [], factors B2, B1 for r_i in [2]; "
        "B0 down |",
        pad,
    ])  # fmt: skip
    assert capsys.readouterr().out == (
        llama + "\n\n" + qwen + "\n\nr = 2; heterogeneous ranks [2] (r̄ = 2), d_m = 3\n"
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--ranks", "4,x"], "--ranks must be comma-separated integers, got '4,x'"),
        (["--ranks", ","], "ranks, --r and --d-m must be integers >= 1"),
        (["--ranks", "2,0"], "ranks, --r and --d-m must be integers >= 1"),
        (["--r", "0"], "ranks, --r and --d-m must be integers >= 1"),
        (["--d-m", "0"], "ranks, --r and --d-m must be integers >= 1"),
        (["--transfer", "int4"],
         "--transfer 'int4': give UP or UP,DOWN, each one of ['float32', 'bfloat16', 'float16', 'int8']"),
        (["--transfer", "int8,int8,int8"],
         "--transfer 'int8,int8,int8': give UP or UP,DOWN, each one of ['float32', 'bfloat16', 'float16', 'int8']"),
        (["--arch", "nope"],
         "unknown architecture 'nope': choose one of ['llama2-7b', 'qwen2-7b'], a built-in model (smollm2-135m) "
         "or a local model directory"),
    ],
)  # fmt: skip
def test_main_refuses_bad_input_with_exit_2(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines()[-1] == f"python -m asymlora.federated.accounting: error: {message}"


def test_main_refuses_an_unreadable_model_config_with_exit_2(tmp_path: Path, capsys) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(SystemExit) as exc:
        main(["--arch", str(tmp_path)])
    assert exc.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"python -m asymlora.federated.accounting: error: cannot read the model config of {str(tmp_path)!r}: "
        f"It looks like the config file at '{tmp_path / 'config.json'}' is not a valid JSON file."
    )


def test_main_help(capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == (
        "usage: python -m asymlora.federated.accounting [-h] [--arch ARCH] [--r R] [--ranks RANKS] [--d-m D_M] "
        "[--transfer UP[,DOWN]]\n\n"
        "Parameters and bytes communicated per client per round, per federated strategy.\n\n"
        "options:\n"
        "  -h, --help            show this help message and exit\n"
        "  --arch ARCH           one of ['llama2-7b', 'qwen2-7b'], 'all' (both), a built-in model (smollm2-135m: "
        "q_proj, v_proj) or a local model directory\n"
        "  --r R                 homogeneous rank (default 8)\n"
        "  --ranks RANKS         heterogeneous client ranks, comma-separated\n"
        "  --d-m D_M             Fed-ALoRA-het intermediate rank d_m (default 16)\n"
        "  --transfer UP[,DOWN]  count bytes at these wire dtypes (one of ['float32', 'bfloat16', 'float16', "
        "'int8']; DOWN defaults to UP)\n"
    )
