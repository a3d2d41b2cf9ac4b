"""Mutation tests of `asymlora.recipes.fed_sweep`: the code that turns federated ledger records into the published
answer (cell identity, records, groups over seeds, the personalised / global tables, the costs, the paired tests of
the reference strategy against its peers). Each expected value is worked out by hand in the comments, on records
built by hand in the shape `fed_sweep.make_record` writes (no model, no federated run)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from asymlora.config import ConfigError, config_dict
from asymlora.recipes import fed_sweep
from asymlora.recipes.fed_sweep import FedGroup

BASE = Path(__file__).resolve().parents[1] / "configs" / "fed_bigbench_homo.yaml"


# --------------------------------------------------------------------------- cells and identity


def test_is_federated_reads_the_top_level_keys(tmp_path: Path) -> None:
    fed = tmp_path / "fed.yaml"
    fed.write_text("rounds: 3\n")
    plain = tmp_path / "plain.yaml"
    plain.write_text("train:\n  rounds: 3\n")  # `rounds` under a section is not a federated key
    assert fed_sweep.is_federated(fed) is True
    assert fed_sweep.is_federated(plain) is False
    assert fed_sweep.is_federated(None) is False


def test_identity_blanks_the_run_dir_sets_one_strategy_and_drops_the_pace_keys() -> None:
    data = {"run_dir": "/somewhere", "strategies": ["fedit", "ffa"], "seed": 3,
            "simulation": {"num_cpus": 2, "cpus_per_client": 1, "threads_per_client": 1, "object_store_mb": 512,
                           "num_gpus": 0.0},
            "clients": {"num": 8, "max_failed_rounds": 2},
            "train": {"mixed_precision": None, "lr": 0.1}}  # fmt: skip
    before = json.loads(json.dumps(data))
    assert fed_sweep.identity(data, "fedalora") == {
        "run_dir": "", "strategies": ["fedalora"], "seed": 3, "simulation": {"num_gpus": 0.0},
        "clients": {"num": 8}, "train": {"lr": 0.1},
    }  # fmt: skip
    assert data == before  # a copy: the record's config is left as it was
    # a config without the pace sections (an old ledger) is read, not refused
    assert fed_sweep.identity({"run_dir": "x", "seed": 1}, "fedit") == {
        "run_dir": "",
        "seed": 1,
        "strategies": ["fedit"],
    }
    # a later key away from its neutral value stays in
    assert fed_sweep.identity({"train": {"mixed_precision": "bf16"}}, "fedit")["train"] == {
        "mixed_precision": "bf16"
    }


def _cell(*overrides: str, **params: Any) -> fed_sweep.FedCell:
    return fed_sweep.make_cell(BASE, ["eval.local_only=false", *overrides], params, Path("/out"))


def test_the_cell_id_is_the_sha256_of_the_yaml_of_its_identity() -> None:
    cell = _cell(strategy="fedit", seed=3)
    assert cell.strategy == "fedit" and cell.params == {"strategy": "fedit", "seed": 3}
    assert cell.config.strategies == ["fedit"] and cell.config.seed == 3
    assert cell.run_dir == Path("/out/runs") / cell.id
    # the identity by hand: run_dir blank, the pace keys out, train.mixed_precision (null) out
    data = config_dict(cell.config)
    data["run_dir"] = ""
    for key in ("num_cpus", "cpus_per_client", "threads_per_client", "object_store_mb"):
        del data["simulation"][key]
    del data["clients"]["max_failed_rounds"], data["train"]["mixed_precision"]
    text = yaml.safe_dump(data, sort_keys=False)
    assert cell.id == hashlib.sha256(text.encode()).hexdigest()[:12]
    assert fed_sweep.fed_cell_id(cell.config, "fedit") == cell.id
    assert _cell("simulation.num_cpus=1", strategy="fedit", seed=3).id == cell.id
    assert _cell(strategy="ffa", seed=3).id != cell.id
    local = _cell(
        strategy="local-only", seed=3
    )  # every strategy of the base stays; the identity names local-only
    assert local.strategy == "local-only" and local.config.strategies == ["fedit", "ffa", "fedsa", "fedalora"]


def test_make_cell_refuses_with_the_cell_named() -> None:
    with pytest.raises(ConfigError) as e:
        _cell(strategy="nope", seed=0)
    assert str(e.value) == (
        "grid cell {'strategy': 'nope', 'seed': 0}: strategy 'nope' is unknown; use one of "
        f"{[*fed_sweep.STRATEGY_NAMES, 'local-only']}"
    )
    with pytest.raises(ConfigError) as e:
        _cell(seed=0)  # the base has four strategies and the grid names none
    assert str(e.value) == (
        "grid cell {'seed': 0}: a sweep cell runs one strategy, the config has ['fedit', 'ffa', 'fedsa', "
        "'fedalora']; put them in the grid (strategy: [fedit, ffa, fedsa, fedalora, local-only])"
    )
    one = _cell("strategies=[ffa]", seed=1)  # no grid strategy: the config's one
    assert one.strategy == "ffa"
    with pytest.raises(ConfigError) as e:
        fed_sweep.make_cell(BASE, ["eval.local_only=true"], {"strategy": "fedit"}, Path("/out"))
    assert str(e.value) == (
        "grid cell {'strategy': 'fedit'}: eval.local_only=true would train the local-only baseline inside every "
        "cell; add eval.local_only=false to the overrides and 'local-only' to the grid's strategies"
    )
    with pytest.raises(ConfigError, match=r"^grid cell \{'strategy': 'fedit', 'rounds': 'x'\}: "):
        _cell(strategy="fedit", rounds="x")


# --------------------------------------------------------------------------- the ledger record


def _task(metric: str, scores: list[int], keys: list[str]) -> tuple[str, list[int], list[str]]:
    return metric, scores, keys


def _scores(tasks: dict[str, tuple[str, list[int], list[str]]], examples: bool = True) -> dict[str, Any]:
    """A client's evaluation as `federated.client.score_tasks` returns it (test-size-weighted score)."""
    n = sum(len(s) for _, s, _ in tasks.values())
    return {"score": sum(sum(s) for _, s, _ in tasks.values()) / n, "n": n,
            "per_task": {t: {m: sum(s) / len(s), "n": len(s)} for t, (m, s, _) in tasks.items()},
            "primary": {t: m for t, (m, _, _) in tasks.items()},
            "examples": {t: {"keys": k, "scores": s} for t, (_, s, k) in tasks.items()} if examples else {}}  # fmt: skip


def _clients() -> list[dict[str, Any]]:
    return [
        {"label": "a", "personalised": _scores({"t1": _task("accuracy", [1, 1, 0, 0], ["a1", "a2", "a3", "a4"])}),
         "global": _scores({"t1": _task("accuracy", [1, 0, 0, 0], ["a1", "a2", "a3", "a4"])})},
        {"label": "b", "personalised": _scores({"t1": _task("accuracy", [1, 1], ["b1", "b2"]),
                                                "t2": _task("exact_match", [1, 0], ["b3", "b4"])}), "global": None},
        {"label": "c", "personalised": None},  # not evaluated
        {"label": "d", "personalised": _scores({"t1": _task("accuracy", [0, 0, 0, 1], ["d1", "d2", "d3", "d4"])})},
    ]  # fmt: skip


def test_side_record_by_hand() -> None:
    side = fed_sweep.side_record(_clients(), "personalised")
    assert side is not None
    # a 2/4 = .5, b (1 + 1 + 1 + 0)/4 = .75, d 1/4 = .25; c has no scores
    assert side["per_client"] == {"a": 0.5, "b": 0.75, "d": 0.25}
    assert side["metric"] == {"a": "accuracy", "b": "primary", "d": "accuracy"}  # b: two metrics
    assert side["average"] == pytest.approx(0.5)
    assert side["std"] == pytest.approx(math.sqrt((0 + 0.25**2 + 0.25**2) / 3))  # population std 0.2041
    assert side["worst"] == {"client": "d", "value": 0.25}
    assert (
        side["per_example"]
        == {
            "a": {"keys": hashlib.sha1(b"a1a2a3a4").hexdigest()[:16], "scores": [1.0, 1.0, 0.0, 0.0]},
            "b": {
                "keys": hashlib.sha1(b"b1b2b3b4").hexdigest()[:16],
                "scores": [1.0, 1.0, 1.0, 0.0],
            },  # task order
            "d": {"keys": hashlib.sha1(b"d1d2d3d4").hexdigest()[:16], "scores": [0.0, 0.0, 0.0, 1.0]},
        }
    )
    assert all(type(v) is float for e in side["per_example"].values() for v in e["scores"])
    iv = side["intervals"]
    assert set(iv["per_client"]) == {"a", "b", "d"}
    assert [iv["per_client"][c]["method"] for c in "abd"] == [
        "wilson",
        "bootstrap",
        "wilson",
    ]  # "primary": bootstrap
    assert [iv["per_client"][c]["value"] for c in "abd"] == pytest.approx([0.5, 0.75, 0.25])
    # Wilson 2 of 4 at 95 %: 0.5 ± z·√(p(1−p)/n + z²/4n²)/(1 + z²/n) = 0.5 ± 0.34996
    assert (iv["per_client"]["a"]["low"], iv["per_client"]["a"]["high"]) == pytest.approx(
        (0.15004, 0.84996), abs=1e-4
    )
    assert iv["average"]["method"] == "stratified bootstrap" and iv["average"]["n"] == 12
    assert iv["average"]["value"] == pytest.approx(0.5)
    glob = fed_sweep.side_record(_clients(), "global")
    assert (
        glob is not None
        and glob["per_client"] == {"a": 0.25}
        and glob["worst"] == {"client": "a", "value": 0.25}
    )
    assert glob["std"] == 0.0 and glob["average"] == 0.25


def test_side_record_without_examples_of_a_client_has_no_average_interval() -> None:
    clients = _clients()
    clients[3]["personalised"]["examples"] = {}  # d: a corpus-level metric, no per-example scores
    clients[1]["personalised"]["examples"].pop("t2")  # b: one of its tasks without them
    side = fed_sweep.side_record(clients, "personalised")
    assert side is not None and side["per_client"] == {"a": 0.5, "b": 0.75, "d": 0.25}
    assert list(side["per_example"]) == ["a"] and list(side["intervals"]["per_client"]) == ["a"]
    assert side["intervals"]["average"] is None
    assert fed_sweep.side_record([{"label": "x", "personalised": {}}, {"label": "y"}], "personalised") is None
    no_task = {
        "score": 0.5,
        "per_task": {},
        "primary": {"t": "accuracy"},
        "examples": None,
    }  # no task evaluated
    side = fed_sweep.side_record([{"label": "x", "personalised": no_task}], "personalised")
    assert side is not None and side["per_example"] == {} and side["intervals"]["average"] is None


def test_make_record_by_hand() -> None:
    cell = _cell("simulation.num_gpus=1", "simulation.threads_per_client=2", strategy="fedit", seed=3)
    dp = {"epsilon": 7.5, "delta": 1e-5, "noise_multiplier": 0.8, "clipping_norm": 1.0, "clipping": "flat",
          "target_epsilon": 8.0, "other": 1}  # fmt: skip
    results = {"clients": _clients(), "rounds": 4, "bytes": {"up": 10, "down": 30, "total": 40, "eval_down": 5,
               "per_round": [20, 20], "extra": 1}, "dp": dp, "train_loss": [1.5, 1.0], "eval_failures": ["x"],
               "round_seconds": 12.5, "eval_seconds": 2.5}  # fmt: skip
    record = fed_sweep.make_record(
        cell, results, started="then", wall_seconds=3.14159, commit="abc", host="h"
    )
    personalised = fed_sweep.side_record(_clients(), "personalised")
    assert record == {
        "id": cell.id, "kind": "federated", "params": {"strategy": "fedit", "seed": 3}, "strategy": "fedit",
        "seed": 3, "clients": ["a", "b", "d"], "commit": "abc", "host": "h", "average": pytest.approx(0.5),
        "personalised": personalised, "global": fed_sweep.side_record(_clients(), "global"),
        "bytes": {"up": 10, "down": 30, "total": 40, "eval_down": 5, "per_round": [20, 20], "transfer": None},
        "dp": {k: dp[k] for k in ("epsilon", "delta", "noise_multiplier", "clipping_norm", "clipping", "target_epsilon")},
        "rounds": 4, "local_steps": 30, "steps": 120,  # 4 rounds × 30 local steps (the base's)
        "train_loss": [1.5, 1.0], "eval_failures": ["x"], "round_seconds": 12.5, "eval_seconds": 2.5,
        "started": "then", "wall_seconds": 3.14, "config": cell.config.to_dict(),
        "hardware": record["hardware"],
    }  # fmt: skip
    if not torch.cuda.is_available():  # num_gpus = 1 without CUDA: the clients computed on the CPU
        assert record["hardware"] == {"device": "cpu", "device_name": record["hardware"]["device_name"],
                                      "dtype": "float32", "torch_threads": 2}  # fmt: skip
        assert isinstance(record["hardware"]["device_name"], str) and record["hardware"]["device_name"]
    # no rounds in the results: the config's (3); no bytes, DP, losses or failures
    bare = fed_sweep.make_record(cell, {"clients": _clients(), "bytes": {}, "dp": {}}, started="", wall_seconds=0,
                                 commit=None, host="")  # fmt: skip
    assert (bare["rounds"], bare["steps"]) == (cell.config.rounds, cell.config.rounds * 30)
    assert (bare["bytes"], bare["dp"], bare["train_loss"], bare["eval_failures"], bare["round_seconds"],
            bare["eval_seconds"]) == (None, None, None, [], None, None)  # fmt: skip
    with pytest.raises(RuntimeError) as e:
        fed_sweep.make_record(
            cell, {"clients": [{"label": "a"}]}, started="", wall_seconds=0, commit=None, host=""
        )
    assert str(e.value) == f"{cell.run_dir}: no client returned personalised scores"


# --------------------------------------------------------------------------- groups over seeds


def _side(per_client: dict[str, float], examples: dict[str, list[float]] | None = None,
          intervals: dict[str, Any] | None = None, metric: str = "accuracy") -> dict[str, Any]:  # fmt: skip
    """A record's ``personalised`` / ``global`` side as `side_record` writes it, by hand."""
    values = list(per_client.values())
    return {"per_client": per_client, "metric": {c: metric for c in per_client},
            "average": sum(values) / len(values), "intervals": intervals or {"per_client": {}, "average": None},
            "per_example": {c: {"keys": f"k-{c}", "scores": s} for c, s in (examples or {}).items()}}  # fmt: skip


def _record(strategy: str, seed: int, side: dict[str, Any], *, params: dict[str, Any] | None = None,
            config: dict[str, Any] | None = None, glob: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:  # fmt: skip
    params = {"strategy": strategy, "seed": seed, **(params or {})}
    record = {"id": f"{strategy}-{seed}", "kind": "federated", "params": params, "strategy": strategy, "seed": seed,
              "clients": list(side["per_client"]), "average": side["average"], "personalised": side, "global": glob,
              "dp": None, "rounds": 2, "local_steps": 3, "wall_seconds": 1.0,
              "bytes": {"up": 100, "down": 300, "total": 400, "per_round": [{}, {}]},
              "config": {"run_dir": f"/r/{strategy}-{seed}", "seed": seed, "strategies": [strategy], "rounds": 2,
                         **(config or {})}}  # fmt: skip
    return record | extra


def _key(config: dict[str, Any]) -> str:
    """`groups.config_key` by hand: 8 hex digits of the sha256 of the sorted-key JSON."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]


def test_cell_key_and_labels_and_group_order() -> None:
    r = _record(
        "fedalora", 2, _side({"c0": 0.5}), params={"dp.target_epsilon": 8.0, "local_a": "reset", "rounds": 4}
    )
    # the key: the identity (run_dir blank, strategies [fedalora]) at seed 0
    assert fed_sweep.cell_key(r) == (
        _key({"run_dir": "", "seed": 0, "strategies": ["fedalora"], "rounds": 2}),
        2,
    )
    assert fed_sweep._label(r) == "fedalora target_epsilon=8 local_a=reset rounds=4"  # 8.0 as 8 (:g)
    assert fed_sweep._label(_record("ffa", 0, _side({"c0": 0.5}), params={"x.lr": 0.25})) == "ffa lr=0.25"
    records = [
        _record("fedit", 1, _side({"c0": 0.1, "c1": 0.2})),
        _record("fedalora", 0, _side({"c1": 0.3})),  # seed 0 of fedalora: no score of c0
        _record("fedit", 0, _side({"c0": 0.4, "c1": 0.5})),
        _record("fedalora", 1, _side({"c0": 0.6, "c1": 0.7})),
        _record(
            "fedit", 1, _side({"c0": 0.8, "c1": 0.9}), id="again"
        ),  # the cell recorded again: the last wins
        _record(
            "fedit", 2, _side({"c0": 0.0, "c1": 0.0}), config={"rounds": 5}
        ),  # another config, same label
    ]
    groups = fed_sweep.group_records(records)
    k2, k5 = (_key({"run_dir": "", "seed": 0, "strategies": ["fedit"], "rounds": n}) for n in (2, 5))
    assert [g.label for g in groups] == [f"fedit (config {k2})", "fedalora", f"fedit (config {k5})"]
    assert [g.seeds for g in groups] == [[0, 1], [0, 1], [2]]  # sorted by seed
    assert [r["id"] for r in groups[0].records] == ["fedit-0", "again"]
    assert [g.strategy for g in groups] == ["fedit", "fedalora", "fedit"]
    assert groups[1].clients == ["c1", "c0"]  # first seen in seed order
    assert fed_sweep.missing_clients(groups[1]) == {"c0": [0]}
    assert fed_sweep.missing_clients(groups[0]) == {}


def _group(label: str, records: list[dict[str, Any]]) -> FedGroup:
    clients = list(dict.fromkeys(c for r in records for c in r["clients"]))
    return FedGroup(label, records, strategy=records[0]["strategy"], clients=clients)


def test_side_summary_over_seeds_and_of_one_seed() -> None:
    seeds = [_record("fedit", s, _side({"a": a, "b": b}, metric="rougeL"), glob=_side({"a": g}))
             for s, (a, b, g) in enumerate([(0.5, 0.25, 0.1), (0.75, 0.25, 0.2), (1.0, 0.25, 0.6)])]  # fmt: skip
    seeds[1]["personalised"] = _side({"a": 0.75}, metric="rougeL")  # seed 1 without b
    s = fed_sweep._side_summary(_group("fedit", seeds), "personalised")
    # a: 0.5, 0.75, 1.0 → mean 0.75, sample std √((.25² + 0 + .25²)/2) = 0.25; b over seeds 0 and 2: 0.25, std 0
    assert s["per_client"]["a"] == {
        "value": pytest.approx(0.75),
        "std": pytest.approx(0.25),
        "values": [0.5, 0.75, 1.0],
    }
    assert s["per_client"]["b"] == {"value": 0.25, "std": 0.0, "values": [0.25, 0.25]}
    # the averages per seed: .375, .75, .625 → mean 0.5833, std √((.2083² + .1667² + .0417²)/2) = 0.1909
    assert s["average"]["values"] == pytest.approx([0.375, 0.75, 0.625])
    assert s["average"]["value"] == pytest.approx(1.75 / 3)
    assert s["average"]["std"] == pytest.approx(math.sqrt(((0.375 - 1.75 / 3) ** 2 + (0.75 - 1.75 / 3) ** 2
                                                           + (0.625 - 1.75 / 3) ** 2) / 2))  # fmt: skip
    assert s["metric"] == {"a": "rougeL", "b": "rougeL"}
    g = fed_sweep._side_summary(_group("fedit", seeds), "global")  # 0.1, 0.2, 0.6: mean 0.3
    assert g["average"]["value"] == pytest.approx(0.3) and list(g["per_client"]) == ["a"]
    seeds[2]["global"] = None  # a seed without global scores: no global column
    assert fed_sweep._side_summary(_group("fedit", seeds), "global") is None
    # one seed: the value with its 95 % interval (per client and for the average); none for a client without one
    iv = {"per_client": {"a": {"low": 0.25, "high": 0.75}}, "average": {"low": 0.3, "high": 0.4}}
    one = fed_sweep._side_summary(_group("fedit", [_record("fedit", 0, _side({"a": 0.5, "b": 0.25}, intervals=iv))]),
                                  "personalised")  # fmt: skip
    assert one["per_client"] == {"a": {"value": 0.5, "low": 0.25, "high": 0.75, "values": [0.5]},
                                 "b": {"value": 0.25, "low": None, "high": None, "values": [0.25]}}  # fmt: skip
    assert one["average"] == {"value": 0.375, "low": 0.3, "high": 0.4, "values": [0.375]}


def test_cost_and_epsilon_by_hand() -> None:
    r0 = _record("fedit", 0, _side({"a": 0.5, "b": 0.5}), bytes={"up": 1e6, "down": 3e6, "total": 4e6,
                 "per_round": [{}, {}]}, dp={"epsilon": 2.0, "delta": 1e-5}, wall_seconds=10.0, round_seconds=None)  # fmt: skip
    r1 = _record("fedit", 1, _side({"a": 0.5, "b": 0.5}), bytes={"up": 2e6, "down": 6e6, "total": 8e6, "per_round": []},
                 dp={"epsilon": 4.0, "delta": 2e-5}, wall_seconds=20.0, round_seconds=30.0, rounds=7, local_steps=9)  # fmt: skip
    r2 = _record("fedit", 2, _side({"a": 0.5, "b": 0.5}), bytes=None, wall_seconds=30.0, round_seconds=50.0)
    cost = fed_sweep._cost(_group("fedit", [r0, r1, r2]))
    # bytes over the seeds that have them (0 and 1); MB per client per round: 4e6/2 rounds/2 clients = 1.0 and
    # 8e6/max(1, 0 rounds)/2 clients = 4.0 → 2.5; ε (2 + 4)/2 = 3 (seed 2: no DP); δ, rounds, steps of seed 0
    assert cost == {"bytes_up": 1.5e6, "bytes_down": 4.5e6, "bytes_total": 6e6, "mb_per_client_per_round": 2.5,
                    "epsilon": 3.0, "epsilon_infinite": False, "delta": 1e-5, "rounds": 2, "local_steps": 3,
                    "wall_seconds": 20.0, "round_seconds": 40.0}  # fmt: skip
    one = _record(
        "fedit", 0, _side({"a": 0.5}), bytes={"up": 1, "down": 1, "total": 3e6, "per_round": [{}, {}, {}]}
    )
    assert fed_sweep._cost(_group("fedit", [one]))["mb_per_client_per_round"] == 1.0  # 3e6/3 rounds/1 client
    empty = FedGroup("x", [one], strategy="fedit", clients=[])  # no client: divided by 1, not 0
    assert fed_sweep._cost(empty)["mb_per_client_per_round"] == 1.0
    assert fed_sweep._epsilon([r0, r1, r2]) == (3.0, False)
    assert fed_sweep._epsilon([r2]) == (None, False)  # DP off
    unbounded = dict(r1, dp={"epsilon": None, "delta": 1e-5})  # clipping without noise in one seed
    assert fed_sweep._epsilon([r0, unbounded]) == (None, True)
    c = fed_sweep._cost(_group("fedit", [unbounded, r0]))
    assert (c["epsilon"], c["epsilon_infinite"], c["delta"]) == (None, True, 1e-5)
    assert fed_sweep._cost(_group("fedit", [r2]))["delta"] is None


# --------------------------------------------------------------------------- paired tests


def _pair_records(
    strategy: str, scores: dict[int, dict[str, list[float]]], **kw: Any
) -> list[dict[str, Any]]:
    return [_record(strategy, seed, _side({c: sum(s) / len(s) for c, s in per.items()}, per), **kw)
            for seed, per in scores.items()]  # fmt: skip


def test_paired_by_hand() -> None:
    # c0, seed 0: A [1, 1, 1, 1], B [0, 0, 0, 0]; seed 1: A [1, 1, 1, 0], B [0, 0, 0, 0]
    # over the seeds: A [1, 1, 1, .5], B 0 → differences (1, 1, 1, .5), mean 0.875; all positive: p = 2/2⁴ = 0.125
    # c1: A = B → difference 0, p = 1
    a = _group("fedalora", _pair_records("fedalora", {0: {"c0": [1, 1, 1, 1], "c1": [1, 0, 1, 0]},
                                                      1: {"c0": [1, 1, 1, 0], "c1": [1, 0, 1, 0]}}))  # fmt: skip
    b = _group("fedit", _pair_records("fedit", {0: {"c0": [0, 0, 0, 0], "c1": [1, 0, 1, 0]},
                                               1: {"c0": [0, 0, 0, 0], "c1": [1, 0, 1, 0]}}))  # fmt: skip
    result = fed_sweep.paired(a, b)
    assert (result["a"], result["b"], result["seeds"], result["left_out"]) == (
        "fedalora",
        "fedit",
        [0, 1],
        [],
    )
    assert result["tests"]["c0"]["difference"] == pytest.approx(0.875)
    assert result["tests"]["c0"]["p_value"] == pytest.approx(2 / 2**4)
    assert result["tests"]["c1"]["difference"] == 0 and result["tests"]["c1"]["p_value"] == pytest.approx(1.0)
    assert result["tests"]["average"]["difference"] == pytest.approx(0.875 / 2)  # each client weighted 1/2
    # the other way round: the sign flips, the p-value stays
    back = fed_sweep.paired(b, a)
    assert back["tests"]["c0"]["difference"] == pytest.approx(-0.875) and (back["a"], back["b"]) == (
        "fedit",
        "fedalora",
    )
    # the global scores: a side of its own (here: A's global c0 = B's, difference 0)
    for g in (a, b):
        for r in g.records:
            r["global"] = _side({"c0": 0.5, "c1": 0.5}, {"c0": [1, 0, 1, 0], "c1": [1, 0, 1, 0]})
    glob = fed_sweep.paired(a, b, "global")
    assert glob["tests"]["c0"]["difference"] == 0 and glob["tests"]["average"]["difference"] == 0
    # other clients: not compared, and the page says which clients only one group has
    c = _group("ffa", _pair_records("ffa", {0: {"c0": [0, 0, 0, 0]}}))
    assert fed_sweep.paired(a, c) == {
        "a": "fedalora",
        "b": "ffa",
        "why": "other clients (fedalora alone has c1)",
    }
    assert fed_sweep.paired(c, a)["why"] == "other clients (fedalora alone has c1)"
    # no seed in common: why
    d = _group("ffa", _pair_records("ffa", {5: {"c0": [0, 0, 0, 0], "c1": [0, 0, 0, 0]}}))
    assert fed_sweep.paired(a, d) == {
        "a": "fedalora",
        "b": "ffa",
        "why": "no seed in common (seeds [0, 1] and [5])",
    }


def test_paired_leaves_out_a_seed_without_examples_and_a_corpus_level_client() -> None:
    a_scores = {0: {"c0": [1, 1, 0, 0]}, 1: {"c0": [1, 1, 1, 1]}, 2: {"c0": [1, 1, 1, 0]}}
    b_scores = {0: {"c0": [0, 0, 0, 0]}, 1: {"c0": [0, 0, 0, 0]}, 2: {"c0": [0, 0, 0, 0]}}
    a = _pair_records("fedalora", a_scores)
    b = _pair_records("fedit", b_scores)
    for r in (*a, *b):  # c1: scored by BLEU, no per-example scores anywhere
        r["personalised"]["per_client"]["c1"] = 0.3
        r["clients"].append("c1")
    a[1]["personalised"]["per_example"] = {}  # seed 1 of A lost c0's per-example scores: left out of the test
    result = fed_sweep.paired(_group("fedalora", a), _group("fedit", b))
    # seeds 0 and 2: A [1, 1, .5, 0], B 0 → mean difference 2.5/4 = 0.625; three positive, one zero:
    # the sign flips of the three non-zero differences: p = 2/2³ = 0.25
    assert result["seeds"] == [0, 2] and result["left_out"] == ["c1"]
    assert result["tests"]["c0"]["difference"] == pytest.approx(0.625)
    assert result["tests"]["c0"]["p_value"] == pytest.approx(0.25)
    assert set(result["tests"]) == {"c0", "average"}


def test_paired_pairs_the_same_clients_in_another_order() -> None:
    """The same clients, first seen in another order (A's seed 0 has no score of c0, so A's clients are
    [c1, c0], B's [c0, c1]): `paired` compared the lists and returned None, so the report silently had no test
    of the pair at all. Seed 1: c0 A [1, 1, 1, 0] B [0, 0, 0, 0] → 0.75, p = 2/2³ = 0.25; c1 A [1, 1, 0, 0], B
    [1, 0, 0, 0] → 0.25, p = 2/2 = 1."""
    a = _pair_records("fedalora", {0: {"c1": [1, 1, 0, 0]}, 1: {"c0": [1, 1, 1, 0], "c1": [1, 1, 0, 0]}})
    b = _pair_records(
        "fedit", {0: {"c0": [0, 1, 0, 0], "c1": [1, 0, 0, 0]}, 1: {"c0": [0, 0, 0, 0], "c1": [1, 0, 0, 0]}}
    )
    ga, gb = fed_sweep.group_records(a)[0], fed_sweep.group_records(b)[0]
    assert (ga.clients, gb.clients) == (["c1", "c0"], ["c0", "c1"])
    result = fed_sweep.paired(ga, gb)
    assert result is not None and result["seeds"] == [1]
    assert result["tests"]["c0"]["difference"] == pytest.approx(0.75)
    assert result["tests"]["c0"]["p_value"] == pytest.approx(0.25)
    assert result["tests"]["c1"]["difference"] == pytest.approx(0.25)
    summary = fed_sweep.summarize([*a, *b], "fedalora")
    assert [(p["a"], p["b"]) for p in summary["paired"]] == [("fedalora", "fedit")]


def test_summarize_tests_each_reference_against_its_comparable_peers_once() -> None:
    one = {0: {"c0": [1, 1, 0, 0]}}
    groups = [
        _pair_records("fedalora", one),
        _pair_records("fedalora", one, params={"dp.target_epsilon": 8.0}, config={"dp": 8}),
        _pair_records("fedit", one),
        _pair_records("fedit", one, params={"dp.target_epsilon": 8.0}, config={"dp": 8}),
        _pair_records("local-only", one),
        _pair_records(
            "fedalora", one, params={"local_a": "reset", "het_local": 1, "het_upload": 2}, config={"a": 1}
        ),
        _pair_records("ffa", {0: {"c9": [1, 1, 0, 0]}}),  # other clients: not compared, the page says why
        _pair_records("fedsa", {3: {"c0": [1, 1, 0, 0]}}),  # no seed in common with the references
    ]
    summary = fed_sweep.summarize([r for g in groups for r in g], "fedalora")
    la = "fedalora local_a=reset het_local=1 het_upload=2"
    # fedalora: its ε = 8 variant (same strategy), fedit, local-only and fedsa (same setting: the grid values
    # other than the strategy's options), its local_a variant; fedalora ε=8: fedit ε=8 and the local_a variant
    # (same strategy); the local_a variant (the setting of fedalora: local_a is a strategy option): fedit and
    # local-only (the other two references were already tested against it; ffa: other clients, unpaired)
    assert [(p["a"], p["b"]) for p in summary["paired"]] == [
        ("fedalora", "fedalora target_epsilon=8"), ("fedalora", "fedit"), ("fedalora", "local-only"),
        ("fedalora", la), ("fedalora target_epsilon=8", "fedit target_epsilon=8"), ("fedalora target_epsilon=8", la),
        (la, "fedit"), (la, "local-only"),
    ]  # fmt: skip
    other = "other clients ({} alone has c0; ffa alone has c9)"
    assert summary["unpaired"] == [
        {"a": "fedalora", "b": "ffa", "why": other.format("fedalora")},
        {"a": "fedalora", "b": "fedsa", "why": "no seed in common (seeds [0] and [3])"},
        {"a": la, "b": "ffa", "why": other.format(la)},
        {"a": la, "b": "fedsa", "why": "no seed in common (seeds [0] and [3])"},
    ]
    assert (summary["kind"], summary["records"], summary["reference"], summary["std_ddof"]) == (
        "federated",
        8,
        "fedalora",
        1,
    )
    g = summary["groups"][0]
    assert (g["label"], g["strategy"], g["clients"], g["seeds"], g["ids"]) == (
        "fedalora",
        "fedalora",
        ["c0"],
        [0],
        ["fedalora-0"],
    )
    assert g["personalised"]["average"]["value"] == 0.5 and g["global"] is None and g["missing_clients"] == {}
    assert (g["bytes_total"], g["mb_per_client_per_round"], g["rounds"]) == (400, 400 / 2 / 1 / 1e6, 2)
    assert fed_sweep.summarize([r for g in groups for r in g], None)["paired"] == []


def test_comparable_and_setting() -> None:
    ref = _group("a", _pair_records("fedalora", {0: {"c0": [1]}}, params={"rounds": 4, "local_a": "x"}))
    same_setting = _group(
        "b", _pair_records("fedit", {0: {"c0": [1]}}, params={"rounds": 4, "het_upload": 1})
    )
    other_setting = _group("c", _pair_records("fedit", {0: {"c0": [1]}}, params={"rounds": 5}))
    same_strategy = _group("d", _pair_records("fedalora", {1: {"c0": [1]}}, params={"rounds": 5}))
    assert fed_sweep._setting(ref) == {"rounds": 4}
    assert fed_sweep.comparable(ref, same_setting) and fed_sweep.comparable(ref, same_strategy)
    assert not fed_sweep.comparable(ref, other_setting)


def test_precision_set_in_the_config_is_part_of_the_setting() -> None:
    """A bf16 cell (``train.mixed_precision`` in the config, no grid key: a campaign's override) is labelled
    apart and compared with float32 cells of its own strategy only."""
    bf16 = {"train": {"mixed_precision": "bf16"}}
    fedit_bf16 = _record("fedit", 0, _side({"c0": 0.5}), config=bf16)
    assert fed_sweep._label(fedit_bf16) == "fedit mixed_precision=bf16"
    assert (
        fed_sweep._label(_record("fedit", 0, _side({"c0": 0.5}), config={"train": {"mixed_precision": None}}))
        == "fedit"
    )
    as_grid_key = _record(
        "fedit", 0, _side({"c0": 0.5}), params={"train.mixed_precision": "bf16"}, config=bf16
    )
    assert fed_sweep._label(as_grid_key) == "fedit mixed_precision=bf16"  # not twice
    groups = {label: _group(label, [_record(s, 0, _side({"c0": 0.5}), config=c)])
              for label, s, c in [("a", "fedit", bf16), ("b", "fedsa", bf16), ("c", "fedsa", {}), ("d", "fedit", {})]}  # fmt: skip
    assert (
        fed_sweep._setting(groups["a"]) == {"train.mixed_precision": "bf16"}
        and fed_sweep._setting(groups["c"]) == {}
    )
    assert fed_sweep.comparable(groups["a"], groups["b"]) and fed_sweep.comparable(groups["c"], groups["d"])
    assert fed_sweep.comparable(groups["a"], groups["d"])  # the same strategy at the other precision
    assert not fed_sweep.comparable(groups["a"], groups["c"]) and not fed_sweep.comparable(
        groups["b"], groups["d"]
    )
    # on a page: the precision in the labels only where the records differ in it
    fedsa = _record("fedsa", 0, _side({"c0": 1.0}))
    assert [g.label for g in fed_sweep.group_records([fedit_bf16, fedsa])] == [
        "fedit mixed_precision=bf16",
        "fedsa",
    ]
    fedsa_bf16 = _record("fedsa", 0, _side({"c0": 1.0}), config=bf16)
    assert [g.label for g in fed_sweep.group_records([fedit_bf16, fedsa_bf16])] == [
        "fedit",
        "fedsa",
    ]  # all bf16


# --------------------------------------------------------------------------- the page


def _summary() -> dict[str, Any]:
    several = {
        "label": "fedalora",
        "strategy": "fedalora",
        "clients": ["c0", "c1"],
        "seeds": [0, 1],
        "personalised": {
            "per_client": {
                "c0": {"value": 0.5, "std": 0.125, "values": [0.375, 0.625]},
                "c1": {"value": 0.75, "std": 0.0, "values": [0.75, 0.75]},
            },
            "average": {"value": 0.625, "std": 0.0625, "values": [0.56251, 0.68749]},
            "metric": {"c0": "accuracy", "c1": "rougeL"},
        },
        "global": {"per_client": {}, "average": {"value": 0.25, "std": 0.05, "values": [0.2, 0.3]}},
        "missing_clients": {},
        "rounds": 10,
        "local_steps": 5,
        "mb_per_client_per_round": 1.23456,
        "bytes_total": 98765432.0,
        "epsilon": 7.891,
        "epsilon_infinite": False,
        "round_seconds": 123.6,
    }
    one = {
        "label": "fedit",
        "strategy": "fedit",
        "clients": ["c1", "c2"],
        "seeds": [3],
        "personalised": {
            "per_client": {
                "c1": {"value": 0.5, "low": 0.25, "high": 0.75, "values": [0.5]},
                "c2": {"value": 0.125, "low": None, "high": None, "values": [0.125]},
            },
            "average": {"value": 0.3125, "low": 0.2, "high": 0.4, "values": [0.3125]},
            "metric": {"c1": "rougeL", "c2": "accuracy"},
        },
        "global": None,
        "missing_clients": {"c2": [4, 5]},
        "rounds": 1,
        "local_steps": 2,
        "mb_per_client_per_round": None,
        "bytes_total": None,
        "epsilon": None,
        "epsilon_infinite": True,
    }
    empty = {
        "label": "ffa",
        "strategy": "ffa",
        "clients": [],
        "seeds": [0],
        "personalised": None,
        "global": None,
        "rounds": 1,
        "local_steps": 1,
        "mb_per_client_per_round": None,
        "bytes_total": None,
        "epsilon": 2.0,
    }
    return {"groups": [several, one, empty], "paired": [], "unpaired": [{"a": "x", "b": "y", "why": "because"}]}  # fmt: skip


def test_tables_by_hand() -> None:
    lines = fed_sweep.tables(_summary())
    head = (
        "| strategy | seeds | c0 | c1 | c2 | average | global average | rounds × local steps | MB / client / round "
        "| MB total | ε | rounds s |"
    )
    assert lines == [
        head,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        "| fedalora | 0,1 | 0.500 ± 0.125 | 0.750 ± 0.000 | – | 0.625 ± 0.062 | 0.250 ± 0.050 | 10 × 5 | 1.235 "
        "| 98.77 | 7.89 | 124 |",
        "| fedit | 3 | – | 0.500 [0.250, 0.750] | 0.125 | 0.312 [0.200, 0.400] | – | 1 × 2 | – | – | ∞ | – |",
        "| ffa | 0 | – | – | – | – | – | 1 × 1 | – | – | 2.00 | – |",
        "",
        "Per-seed personalised averages:",
        "",
        "- fedalora (seeds [0, 1]): [0.5625, 0.6875]",
        "- fedit (seeds [3]): [0.3125]",
        "- ffa (seeds [0]): []",
        "",
        "Clients without a score in some seeds (their evaluation failed, or they never trained): their value is "
        "over the other seeds, that seed's average is over fewer clients, and the paired tests leave that seed out:",
        "",
        "- fedit: no score of c2 in seed(s) [4, 5]",
        "",
        "No paired test of:",
        "",
        "- x − y: because",
    ]  # fmt: skip
    summary = _summary()
    summary["groups"][1]["missing_clients"] = {}
    del summary["unpaired"]
    lines = fed_sweep.tables(summary)
    assert lines[-1] == "- ffa (seeds [0]): []" and not any("without a score" in line for line in lines)


def test_tables_with_a_paired_test_use_the_clients_as_units() -> None:
    a = _pair_records("fedalora", {0: {"c0": [1, 1, 1, 1]}})
    b = _pair_records("fedit", {0: {"c0": [0, 0, 0, 0]}})
    lines = fed_sweep.tables(fed_sweep.summarize([*a, *b], "fedalora"))
    i = lines.index("Paired tests of the personalised scores (A − B on the same test examples, per-example scores "
                    "averaged over the shared seeds):")  # fmt: skip
    assert lines[i + 2] == "| A | B | seeds | c0 | average |"
    assert lines[i + 4].startswith(
        "| fedalora | fedit | 0 | 1.000 [1.000, 1.000] (p=0.125) | 1.000"
    )  # p = 2/2⁴


def test_text_and_number() -> None:
    assert fed_sweep._text(None) == "–"
    assert fed_sweep._text({"value": 0.123456, "std": 0.011}, 2) == "0.12 ± 0.01"
    assert fed_sweep._text({"value": 0.5, "low": 0.25, "high": 0.75}, 1) == "0.5 [0.2, 0.8]"
    assert fed_sweep._text({"value": 0.5}) == "0.500"
    assert fed_sweep._number(None, 2) == "–" and fed_sweep._number(1.23456, 2) == "1.23"


def test_plot_rows_by_hand() -> None:
    rows, primary, intervals = fed_sweep.plot_rows(_summary())
    assert rows == {"fedalora": {"c0": {"accuracy": 0.5}, "c1": {"rougeL": 0.75}},
                    "fedit": {"c1": {"rougeL": 0.5}, "c2": {"accuracy": 0.125}}}  # fmt: skip
    assert primary == {"c0": "accuracy", "c1": "rougeL", "c2": "accuracy"}
    s = _summary()["groups"]
    assert intervals == {
        "fedalora": {
            "per_task": s[0]["personalised"]["per_client"],
            "average": s[0]["personalised"]["average"],
        },
        "fedit": {"per_task": s[1]["personalised"]["per_client"], "average": s[1]["personalised"]["average"]},
    }


# --------------------------------------------------------------------------- survivors of the first mutmut run


def test_client_hardware_with_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """With CUDA (faked: this machine has none) and GPUs given to the simulation, the clients load in bfloat16
    on device 0; with num_gpus = 0 they stay on the CPU in float32 even where CUDA is available."""
    asked: list[Any] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: asked.append(i) or "Fake GPU")
    one = _cell("simulation.num_gpus=1", "simulation.threads_per_client=3", strategy="fedit", seed=0)
    assert fed_sweep.client_hardware(one.config) == {
        "device": "cuda", "device_name": "Fake GPU", "dtype": "bfloat16", "torch_threads": 3}  # fmt: skip
    assert asked == [0]
    none = _cell("simulation.num_gpus=0", strategy="fedit", seed=0)
    cpu = fed_sweep.client_hardware(none.config)
    assert (cpu["device"], cpu["dtype"]) == ("cpu", "float32") and asked == [0]
    half = _cell("simulation.num_gpus=0.5", strategy="fedit", seed=0)  # a fraction of a GPU is a GPU
    assert fed_sweep.client_hardware(half.config)["device"] == "cuda"


def test_labels_name_the_last_part_of_a_dotted_key() -> None:
    r = _record("fedit", 0, _side({"c0": 0.5}), params={"a.b.c": 0.5, "train.lr_sched": "cos", "x.y.z": 2})
    assert fed_sweep._label(r) == "fedit c=0.5 lr_sched=cos z=2"


def test_a_client_in_one_of_several_seeds_is_shown_without_an_interval() -> None:
    """b has a score in seed 0 only of seeds 0 and 1: its value is that seed's, shown bare like the other values
    over seeds (no interval of one seed in a column of means over seeds)."""
    iv = {"per_client": {"a": {"low": 0.1, "high": 0.9}, "b": {"low": 0.2, "high": 0.3}}, "average": None}
    records = [
        _record("fedit", 0, _side({"a": 0.5, "b": 0.25}, intervals=iv)),
        _record("fedit", 1, _side({"a": 0.75})),
    ]
    s = fed_sweep._side_summary(_group("fedit", records), "personalised")
    assert s["per_client"]["b"] == {"value": 0.25, "low": None, "high": None, "values": [0.25]}


def test_paired_reads_a_record_without_per_example_scores_as_none() -> None:
    a = _pair_records("fedalora", {0: {"c0": [1, 0]}})
    b = _pair_records("fedit", {0: {"c0": [0, 0]}})
    for r in (*a, *b):
        del r["personalised"]["per_example"]  # a record from before per-example scores were kept
    assert fed_sweep.paired(_group("fedalora", a), _group("fedit", b)) == {
        "a": "fedalora", "b": "fedit",
        "why": "no per-example scores to pair (c0: corpus-level metrics such as BLEU)"}  # fmt: skip


def test_summarize_reports_the_global_scores() -> None:
    a = _pair_records("fedalora", {0: {"c0": [1, 0]}, 1: {"c0": [1, 1]}})
    for r, g in zip(a, (0.25, 0.75), strict=True):
        r["global"] = _side({"c0": g})
    group = fed_sweep.summarize(a, "fedalora")["groups"][0]
    assert group["global"]["average"]["value"] == pytest.approx(0.5)  # (0.25 + 0.75)/2
    assert group["global"]["average"]["values"] == [0.25, 0.75]


def test_megabytes_are_10_to_the_6_bytes() -> None:
    summary = _summary()
    summary["groups"][0]["bytes_total"] = (
        1_115_001  # 1.115001 MB → 1.12 (÷ 1 000 001 would give 1.11499 → 1.11)
    )
    assert fed_sweep.tables(summary)[2].split(" | ")[9] == "1.12"


def test_the_paired_lines_name_the_clients() -> None:
    a = _pair_records("fedalora", {0: {"c0": [1, 1, 1, 1]}})
    b = _pair_records("fedit", {0: {"c0": [0, 0, 0, 0]}})
    lines = fed_sweep.tables(fed_sweep.summarize([*a, *b], "fedalora"))
    # c0: every difference is 1 (p = 2/2⁴ = 0.125, not resolved), so the resolve line sizes a study per client
    assert lines[-1] == (
        "- fedalora − fedit: +1.0000 (p=0.125): every test example differs by the same amount (now 4 per client), "
        "so there is no spread to size a study by: score more test examples per client"
    )
    assert any(line.startswith("Per-client differences that hold after Holm's correction over each pair's clients")
               for line in lines)  # fmt: skip


def test_plot_rows_skip_a_group_without_scores_in_the_middle() -> None:
    summary = _summary()
    summary["groups"] = [summary["groups"][2], *summary["groups"][:2]]  # the empty group first
    rows, _, intervals = fed_sweep.plot_rows(summary)
    assert list(rows) == ["fedalora", "fedit"] and list(intervals) == ["fedalora", "fedit"]
