"""The federated campaign runner (asymlora sweep on a federated base config): a tiny grid of strategies ×
seeds run, killed in the middle of a round, run again; the records, the report's paired tests checked by
hand, and the real campaign configs expanded.

The cells run through `asymlora.federated.run.run` (the code of ``asymlora fed``) with its simulation step
replaced by the ServerApp's own loop (`server_app._run_all`) against the ClientApp in this process: the
same messages, checkpoints and results, without starting Ray (a minute per cell on this machine).
"""

from __future__ import annotations

import os

os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

import itertools
import json
import math
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from tests.conftest import make_char_tokenizer, make_tiny_llama

from asymlora.cli import main as cli_main
from asymlora.config import ConfigError
from asymlora.federated import run as fed_run
from asymlora.recipes import fed_sweep, sweep

pytestmark = pytest.mark.fed

ROOT = Path(__file__).resolve().parent.parent


class Killed(BaseException):
    """A kill in the middle of a round (not an Exception: nothing on the way records it as a failure)."""


class InProcessGrid:
    """A Flower ``Grid`` handing every instruction to ``client_app.app`` with one ``Context`` per node (as a
    SuperNode keeps it); ``on_send(message)`` sees every instruction first."""

    def __init__(self, num: int, on_send) -> None:
        from flwr.app import Context, RecordDict

        self.contexts = {
            100 + k: Context(7, 100 + k, {"partition-id": k, "num-partitions": num}, RecordDict(), {})
            for k in range(num)
        }
        self.on_send = on_send

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        from asymlora.federated import client_app

        out = []
        for m in messages:
            self.on_send(m)
            out.append(client_app.app(m, self.contexts[m.metadata.dst_node_id]))
        return out


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama + character tokenizer, two tiny choice tasks (one per client), a sweep file of
    FedIT and Fed-ALoRA × seeds 0, 1 and a local-only cell of seed 0."""
    root = tmp_path_factory.mktemp("fed_sweep")
    tok = make_char_tokenizer()
    model = make_tiny_llama(vocab_size=len(tok), hidden=32, layers=1, initializer_range=0.2)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    rng, rows = random.Random(0), []
    for _ in range(40):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        rows.append({"input": f"{a} {b}", "options": ["odd", "even"], "target": ["even", "odd"][(a + b) % 2],
                     "task": "parity"})  # fmt: skip
        rows.append({"input": f"{a} vs {b}", "options": ["left", "right"],
                     "target": "left" if a >= b else "right", "task": "bigger"})  # fmt: skip
    (root / "tasks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = {
        "model": {"name": str(root / "model")},
        "strategies": ["fedit", "fedalora"],
        "adapter": {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "o_proj"]},
        "clients": {"num": 2},
        "data": {
            "tasks": [f"jsonl:{root / 'tasks.jsonl'}#{t}" for t in ("parity", "bigger")],
            "max_train": 16,
            "max_test": 8,
            "max_length": 32,
        },
        "rounds": 2,
        "train": {"local_steps": 2, "batch_size": 4, "lr": 0.3},
        "eval": {"batch_size": 8, "local_only": True},
        "timeouts": {"wait_nodes": 60, "round": 60, "evaluate": 60},
    }
    (root / "fed.yaml").write_text(yaml.safe_dump(base))
    spec = {
        "base": "fed.yaml",
        "out_dir": "campaign",
        "overrides": ["eval.local_only=false"],
        "grid": [
            {"strategy": ["fedit", "fedalora"], "seed": [0, 1]},
            {"strategy": ["local-only"], "seed": [0]},
        ],
        "order_by": ["seed"],
        "report": {"reference": "fedalora"},
    }
    (root / "sweep.yaml").write_text(yaml.safe_dump(spec))
    return {"root": root, "sweep": root / "sweep.yaml"}


@pytest.fixture(scope="module")
def campaign(env) -> dict:
    """Run the sweep with the 3rd simulation killed in round 2, run it again; record what each pass did."""
    from flwr.supercore.task_identity import TaskIdentity

    from asymlora.federated.server_app import _run_all

    spec = sweep.load_sweep(env["sweep"])
    sims: list[list[tuple[str, str]]] = []  # per simulation: (message type, group) of every instruction

    def on_send(message) -> None:
        sims[-1].append((message.metadata.message_type, message.metadata.group_id))
        if len(sims) == 3 and message.metadata.group_id == "2" and not killed:
            killed.append(True)
            raise Killed

    def in_process(cfg, runs, *, say=print):
        sims.append([])
        outcomes: dict = {}
        _run_all(InProcessGrid(cfg.clients.num, on_send), cfg, runs, outcomes, 1, say)
        return outcomes

    killed: list[bool] = []
    with pytest.MonkeyPatch.context() as mp:
        for name, value in (("_task_id", 1), ("_run_id", 7), ("_node_id", 1)):
            mp.setattr(TaskIdentity, name, value)
        mp.setattr(fed_run, "simulate", in_process)
        with pytest.raises(Killed):
            sweep.run_sweep(spec, say=lambda *a: None)
        after_kill = [r["id"] for r in sweep.read_ledger(spec.ledger)]
        first = len(sims)
        counts = sweep.run_sweep(spec, say=lambda *a: None)
        page = sweep.write_report(spec)
    return {"spec": spec, "cells": sweep.expand(spec), "after_kill": after_kill, "sims": sims, "first": first,
            "counts": counts, "page": page}  # fmt: skip


def records_by(spec) -> dict[tuple[str, int], dict]:
    return {(r["strategy"], r["seed"]): r for r in sweep.read_ledger(spec.ledger)}


def test_cells_are_strategy_by_seed_seed_0_first(campaign) -> None:
    cells = campaign["cells"]
    assert [(c.strategy, c.config.seed) for c in cells] == [
        ("fedit", 0), ("fedalora", 0), ("local-only", 0), ("fedit", 1), ("fedalora", 1)
    ]  # fmt: skip
    assert all(isinstance(c, fed_sweep.FedCell) and c.config.strategies in (["fedit"], ["fedalora"],
               ["fedit", "fedalora"]) for c in cells)  # fmt: skip
    assert len({c.id for c in cells}) == 5 and campaign["spec"].kind == "federated"


def test_killed_sweep_reruns_only_the_missing_cells_and_resumes_the_killed_one(campaign) -> None:
    ids = [c.id for c in campaign["cells"]]
    assert campaign["after_kill"] == ids[:3]  # fedit-0, fedalora-0, local-only-0 (no simulation)
    assert campaign["counts"] == {"cells": 5, "done": 3, "ran": 2, "taken": 0, "failed": 0, "deferred": 0}
    assert campaign["first"] == 3 and len(campaign["sims"]) == 5  # the 2nd pass: 2 simulations only
    trains = [[g for kind, g in sim if kind == "train"] for sim in campaign["sims"]]
    assert trains[0] == trains[1] == ["1", "1", "2", "2"]
    assert trains[3] == ["2", "2"]  # the killed cell resumed from its round-1 checkpoint
    assert trains[4] == ["1", "1", "2", "2"]
    assert sorted(r["id"] for r in sweep.read_ledger(campaign["spec"].ledger)) == sorted(ids)


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def test_records_hold_per_client_per_example_scores_bytes_and_steps(campaign) -> None:
    records = records_by(campaign["spec"])
    assert set(records) == {("fedit", 0), ("fedit", 1), ("fedalora", 0), ("fedalora", 1), ("local-only", 0)}
    for (strategy, _), r in records.items():
        p = r["personalised"]
        assert r["clients"] == ["client-0 (parity)", "client-1 (bigger)"] and r["steps"] == 4
        assert r["rounds"] == 2 and r["local_steps"] == 2 and r["wall_seconds"] > 0 and "commit" in r
        for client, score in p["per_client"].items():
            scores = p["per_example"][client]["scores"]
            assert len(scores) == 8 and set(scores) <= {0.0, 1.0} and sum(scores) / 8 == pytest.approx(score)
            iv = p["intervals"]["per_client"][client]
            assert (iv["low"], iv["high"]) == pytest.approx(wilson(int(sum(scores)), 8))
        assert r["average"] == pytest.approx(sum(p["per_client"].values()) / 2)
        assert (r["global"] is None) == (strategy == "local-only") and r["dp"] is None
        assert (r["hardware"]["device"], r["hardware"]["dtype"]) == ("cpu", "float32")
    fedit, fedalora = records[("fedit", 0)]["bytes"], records[("fedalora", 0)]["bytes"]
    for b in (fedit, fedalora):
        assert [x["round"] for x in b["per_round"]] == [1, 2]
        assert b["up"] == sum(x["up"] for x in b["per_round"]) and b["total"] == b["up"] + b["down"]
    assert fedalora["up"] < fedit["up"]  # Fed-ALoRA uploads B only, FedIT A and B
    assert records[("local-only", 0)]["bytes"] is None


def exact_sign_flip_p(weighted_diffs: np.ndarray) -> float:
    """Two-sided p of Σ w·d under all 2^n sign flips, enumerated (the null is symmetric: P(|T| >= |t|))."""
    observed = abs(weighted_diffs.sum())
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=weighted_diffs.size)))
    null = np.abs(signs @ weighted_diffs)
    return float(np.mean(null >= observed - 1e-12))


def test_report_paired_tests_of_the_run_match_the_records(campaign) -> None:
    """On the real records (the tiny model's scores may tie; the fixed-input test below is the sharp one)."""
    spec = campaign["spec"]
    records = records_by(spec)
    summary = json.loads((spec.out_dir / "results.json").read_text())
    pairs = {(p["a"], p["b"]): p for p in summary["paired"]}
    assert set(pairs) == {("fedalora", "fedit"), ("fedalora", "local-only")}
    test = pairs[("fedalora", "fedit")]
    assert test["seeds"] == [0, 1]
    clients = records[("fedit", 0)]["clients"]

    def averaged(strategy: str) -> dict[str, np.ndarray]:  # each example's score averaged over seeds 0, 1
        return {c: np.mean([records[(strategy, s)]["personalised"]["per_example"][c]["scores"] for s in (0, 1)],
                           axis=0) for c in clients}  # fmt: skip

    a, b = averaged("fedalora"), averaged("fedit")
    diffs = {c: a[c] - b[c] for c in clients}
    assert any(d.any() for d in diffs.values()), (
        "the strategies scored identically: the test would be vacuous"
    )
    for c in clients:
        t = test["tests"][c]
        assert t["difference"] == pytest.approx(diffs[c].mean(), abs=1e-12)
        assert t["p_value"] == pytest.approx(exact_sign_flip_p(diffs[c] / diffs[c].size))
        assert t["low"] is None or t["low"] <= t["difference"] <= t["high"]
    avg = test["tests"]["average"]
    assert avg["difference"] == pytest.approx(np.mean([diffs[c].mean() for c in clients]), abs=1e-12)
    weighted = np.concatenate([diffs[c] / (len(clients) * diffs[c].size) for c in clients])  # 16 flips: exact
    assert avg["p_value"] == pytest.approx(exact_sign_flip_p(weighted))
    # one seed against one seed (local-only has seed 0 only): the seed-0 scores alone
    lo = pairs[("fedalora", "local-only")]
    assert lo["seeds"] == [0]
    d0 = np.subtract(records[("fedalora", 0)]["personalised"]["per_example"][clients[0]]["scores"],
                     records[("local-only", 0)]["personalised"]["per_example"][clients[0]]["scores"])  # fmt: skip
    assert lo["tests"][clients[0]]["difference"] == pytest.approx(d0.mean(), abs=1e-12)


def test_report_groups_over_seeds_and_the_page(campaign) -> None:
    spec = campaign["spec"]
    records = records_by(spec)
    summary = json.loads((spec.out_dir / "results.json").read_text())
    groups = {g["label"]: g for g in summary["groups"]}
    assert set(groups) == {"fedit", "fedalora", "local-only"}
    g = groups["fedalora"]
    averages = [records[("fedalora", s)]["average"] for s in (0, 1)]
    assert g["personalised"]["average"]["value"] == pytest.approx(sum(averages) / 2)
    assert g["personalised"]["average"]["std"] == pytest.approx(abs(averages[0] - averages[1]) / math.sqrt(2))
    assert g["bytes_total"] == pytest.approx(
        sum(records[("fedalora", s)]["bytes"]["total"] for s in (0, 1)) / 2
    )
    one = groups["local-only"]["personalised"]["average"]  # one seed: its stratified bootstrap interval
    assert one["low"] <= one["value"] <= one["high"] and "std" not in one
    page = campaign["page"].read_text()
    assert "| fedalora | 0,1 |" in page and "Paired tests" in page and "client-1 (bigger)" in page
    assert "Hardware: cpu float32 (" in page and ": 5 runs." in page
    assert (spec.out_dir / "results.png").stat().st_size > 0


def test_report_regenerates_from_the_ledger_alone(campaign, env, tmp_path) -> None:
    spec = yaml.safe_load(env["sweep"].read_text())
    spec["base"] = str(env["root"] / "fed.yaml")
    spec["out_dir"] = str(tmp_path)
    (tmp_path / "ledger.jsonl").write_text(campaign["spec"].ledger.read_text())  # no run directory
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(spec))
    assert cli_main(["sweep", str(tmp_path / "sweep.yaml"), "--report"]) == 0
    before = json.loads((campaign["spec"].out_dir / "results.json").read_text())
    assert json.loads((tmp_path / "results.json").read_text()) == before


@pytest.mark.parametrize(
    ("grid", "overrides", "message"),
    [
        ({"strategy": ["fedavg"]}, [], "strategy 'fedavg' is unknown"),
        ({"seed": [0]}, [], "a sweep cell runs one strategy"),
        ({"strategy": ["fedit"]}, ["eval.local_only=true"], "eval.local_only=true would train"),
        ({"strategy": ["fedit"], "rounds": [0]}, [], "rounds=0 must be >= 1"),
    ],
)
def test_bad_federated_cells_are_refused_with_the_cell_named(env, tmp_path, grid, overrides, message) -> None:
    spec = {"base": str(env["root"] / "fed.yaml"), "out_dir": str(tmp_path), "grid": grid,
            "overrides": overrides}  # fmt: skip
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=message):
        sweep.expand(sweep.load_sweep(tmp_path / "s.yaml"))


@pytest.fixture(scope="module")
def campaigns() -> dict[str, tuple]:
    """The real campaign files, read and expanded once (every cell's config validated; no data, no model)."""
    out = {}
    for name in CAMPAIGNS:
        spec = sweep.load_sweep(ROOT / "configs" / name)
        out[name] = (spec, sweep.expand(spec))
    return out


CAMPAIGNS = {
    "campaign_federated.yaml": (37, {"fedit", "ffa", "fedsa", "fedalora", "local-only"}),
    "campaign_federated_het.yaml": (12, {"zeropad", "fedalora-het", "local-only"}),
    "campaign_federated_rouge.yaml": (12, {"fedsa", "fedalora", "fedit", "local-only"}),
    "campaign_dp.yaml": (36, {"fedit", "ffa", "fedalora"}),
}


@pytest.mark.parametrize("name", list(CAMPAIGNS))
def test_campaign_configs_expand_validate_and_list(campaigns, name, capsys) -> None:
    spec, expanded = campaigns[name]
    cells, strategies = CAMPAIGNS[name]
    assert (
        spec.kind == "federated" and len(expanded) == cells and {c.strategy for c in expanded} == strategies
    )
    seeds = [c.config.seed for c in expanded]
    assert seeds == sorted(seeds) and set(seeds) == {0, 1, 2}  # order_by seed: seed 0 of every group first
    assert all(not c.config.eval.local_only and c.config.model.name == "smollm2-135m" for c in expanded)
    if name == "campaign_federated.yaml":  # the CLI's --list (the same expansion again)
        assert cli_main(["sweep", str(ROOT / "configs" / name), "--list"]) == 0
        out = capsys.readouterr().out.splitlines()
        listed = [line for line in out if re.match(r"[0-9a-f]{12}  ", line)]
        (counts,) = [m for line in out if (m := re.match(r"(\d+) done, (\d+) started, (\d+) to do", line))]
        assert len(listed) == cells and sum(map(int, counts.groups())) == cells, out
        # the four bf16 cells of seed 0 (before 2026-12-02, configs/campaign_federated.yaml) are of no cell of it
        assert any(line.startswith("4 record(s) of ") for line in out), out


def test_dp_campaign_cells_share_delta_and_set_epsilon_or_no_noise(campaigns) -> None:
    _, cells = campaigns["campaign_dp.yaml"]
    settings = {(c.config.dp.target_epsilon, c.config.dp.noise_multiplier, c.config.dp.clipping_norm)
                for c in cells}  # fmt: skip
    assert settings == {(None, 0.0, 1e9), (8.0, None, 0.5), (3.0, None, 0.5), (1.0, None, 0.5)}
    budget = {
        (c.config.dp.clipping, c.config.dp.delta, c.config.rounds, c.config.train.local_steps) for c in cells
    }
    assert budget == {("server", 1e-5, 5, 20)}  # the budget of campaign_federated.yaml


def client_scores(label: str, scores: list[float]) -> dict:
    """One client's evaluation as `client.score_tasks` returns it (one task, accuracy, 0/1 per example)."""
    examples = {"t": {"keys": [f"{label}-{i}" for i in range(len(scores))], "scores": scores}}
    return {"label": label, "personalised": {"score": sum(scores) / len(scores), "n": len(scores),
            "per_task": {"t": {}}, "primary": {"t": "accuracy"}, "examples": examples}}  # fmt: skip


def fixed_record(strategy: str, seed: int, c0: list[float], c1: list[float]) -> dict:
    personalised = fed_sweep.side_record([client_scores("c0", c0), client_scores("c1", c1)], "personalised")
    return {"id": f"{strategy}-{seed}", "kind": "federated", "params": {"strategy": strategy, "seed": seed},
            "strategy": strategy, "seed": seed, "clients": ["c0", "c1"], "average": personalised["average"],
            "personalised": personalised, "global": None, "dp": None, "rounds": 2, "local_steps": 3,
            "bytes": {"up": 100, "down": 300, "total": 400, "per_round": [{}, {}]}, "wall_seconds": 1.0,
            "config": {"run_dir": "", "seed": seed, "strategies": [strategy], "rounds": 2}}  # fmt: skip


def test_report_paired_tests_on_fixed_scores_equal_a_hand_computation(tmp_path) -> None:
    """Per-example scores fixed by hand; the expected differences and exact sign-flip p-values worked out
    on paper (below), not by the code under test."""
    records = [
        fixed_record("fedalora", 0, [1, 1, 1, 0, 1, 0], [1, 1, 1, 0]),
        fixed_record("fedalora", 1, [1, 0, 1, 1, 0, 0], [1, 1, 1, 0]),
        fixed_record("fedit", 0, [0, 1, 0, 0, 1, 0], [1, 0, 0, 0]),
        fixed_record("fedit", 1, [0, 0, 1, 0, 1, 0], [1, 0, 0, 0]),
        fixed_record("local-only", 0, [0, 0, 0, 0, 0, 0], [0, 0, 0, 0]),
    ]
    (tmp_path / "ledger.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"kind": "federated", "out_dir": ".", "grid": {"seed": [0]},
                                                     "report": {"reference": "fedalora"}}))  # fmt: skip
    spec = sweep.load_sweep(tmp_path / "s.yaml")
    assert spec.kind == "federated"
    sweep.write_report(spec)
    summary = json.loads((tmp_path / "results.json").read_text())
    pairs = {(p["a"], p["b"]): p for p in summary["paired"]}
    # fedalora vs fedit, each example averaged over seeds 0 and 1:
    #   c0: A = [1, .5, 1, .5, .5, 0], B = [0, .5, .5, 0, 1, 0], A − B = [1, 0, .5, .5, −.5, 0]: mean 1.5/6 = 0.25;
    #       sign flips of (1, .5, .5, .5) in halves (2, 1, 1, 1), observed 3: |sum| >= 3 in 8 of 16: p = 0.5
    #   c1: A = [1, 1, 1, 0], B = [1, 0, 0, 0], A − B = [0, 1, 1, 0]: mean 0.5; |sum| >= 2 in 2 of 4: p = 0.5
    #   average over clients, each 1/2: (0.25 + 0.5) / 2 = 0.375 (pooling the 10 examples would give 0.35);
    #       weights 1/12 (c0), 1/8 (c1): in 24ths the non-zero terms are 2, 1, 1, −1 (c0) and 3, 3 (c1),
    #       observed 9; |sum| >= 9 in 8 of 64 sign flips: p = 0.125
    t = pairs[("fedalora", "fedit")]["tests"]
    assert pairs[("fedalora", "fedit")]["seeds"] == [0, 1]
    assert (t["c0"]["difference"], t["c0"]["p_value"]) == pytest.approx((0.25, 0.5))
    assert (t["c1"]["difference"], t["c1"]["p_value"]) == pytest.approx((0.5, 0.5))
    assert (t["average"]["difference"], t["average"]["p_value"]) == pytest.approx((0.375, 0.125))
    # fedalora vs local-only: seed 0 only (local-only has no seed 1): c0 A − B = [1, 1, 1, 0, 1, 0]: 4/6,
    #   four non-zero pairs of 1: |sum| >= 4 only for all signs alike, 2 of 16: p = 0.125
    lo = pairs[("fedalora", "local-only")]
    assert lo["seeds"] == [0]
    assert (lo["tests"]["c0"]["difference"], lo["tests"]["c0"]["p_value"]) == pytest.approx((4 / 6, 0.125))
    # the group over seeds: client c0 of fedalora scored 4/6 and 3/6: mean 7/12, sample std (1/6)/sqrt(2)
    g = next(g for g in summary["groups"] if g["label"] == "fedalora")
    assert g["personalised"]["per_client"]["c0"]["value"] == pytest.approx(7 / 12)
    assert g["personalised"]["per_client"]["c0"]["std"] == pytest.approx((1 / 6) / math.sqrt(2))
    assert g["bytes_total"] == 400 and g["mb_per_client_per_round"] == pytest.approx(400 / 2 / 2 / 1e6)


@pytest.mark.parametrize(
    ("flag", "key"),
    [("--list", "strategy"), ("--list", "seed"),
     *(("--report", key) for key in ("strategy", "seed", "personalised", "rounds", "clients", "wall_seconds"))],
)  # fmt: skip
def test_a_federated_record_without_a_key_the_report_reads_exits_2(tmp_path, capsys, key, flag) -> None:
    """--report (and --list, for the keys of a cell's identity) exit 2 naming the cell and the key, not a KeyError."""
    record = fixed_record("fedit", 0, [1, 0], [0, 1])
    del record[key]
    (tmp_path / "ledger.jsonl").write_text(json.dumps(fixed_record("fedit", 1, [1, 1], [0, 1])) + "\n"
                                           + json.dumps(record) + "\n")  # fmt: skip
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({
        "base": str(ROOT / "configs" / "fed_bigbench_homo.yaml"), "out_dir": str(tmp_path),
        "overrides": ["eval.local_only=false"], "grid": {"strategy": ["fedit"], "seed": [0]}}))  # fmt: skip
    assert cli_main(["sweep", str(tmp_path / "s.yaml"), flag]) == 2
    err = capsys.readouterr().err
    assert f"the record of cell 'fedit-0' lacks [{key!r}]" in err and "Traceback" not in err


def test_cell_ids_ignore_how_fast_a_cell_runs_but_not_what_it_computes() -> None:
    import dataclasses

    from asymlora.federated.config import FedConfig

    cfg = FedConfig()
    base = fed_sweep.fed_cell_id(cfg, "fedalora")
    slower = dataclasses.replace(
        cfg, simulation=dataclasses.replace(cfg.simulation, num_cpus=1, object_store_mb=256)
    )
    assert fed_sweep.fed_cell_id(slower, "fedalora") == base
    shorter = dataclasses.replace(cfg, timeouts=dataclasses.replace(cfg.timeouts, round=60.0))
    assert fed_sweep.fed_cell_id(shorter, "fedalora") != base  # a timeout can leave a client out of a round
    on_gpu = dataclasses.replace(cfg, simulation=dataclasses.replace(cfg.simulation, num_gpus=1.0))
    assert fed_sweep.fed_cell_id(on_gpu, "fedalora") != base
    assert fed_sweep.fed_cell_id(dataclasses.replace(cfg, rounds=cfg.rounds + 1), "fedalora") != base
    assert fed_sweep.fed_cell_id(cfg, "fedit") != base


def test_seeds_run_with_other_cpu_settings_stay_one_report_group() -> None:
    base = Path(__file__).resolve().parents[1] / "configs" / "fed_bigbench_het.yaml"

    def record(seed: int, cpus: int) -> dict:
        cell = fed_sweep.make_cell(base, ["eval.local_only=false", f"simulation.num_cpus={cpus}"],
                                   {"strategy": "zeropad", "seed": seed}, Path("/nonexistent"))  # fmt: skip
        return {"id": cell.id, "params": cell.params, "strategy": cell.strategy, "seed": seed, "clients": ["c0"],
                "config": cell.config.to_dict()}  # fmt: skip

    groups = fed_sweep.group_records([record(0, 2), record(1, 1), record(2, 1)])
    assert [g.seeds for g in groups] == [[0, 1, 2]]
    longer = record(1, 1)
    longer["config"]["timeouts"]["round"] = 60.0  # a timeout can drop a client: another config
    assert [g.seeds for g in fed_sweep.group_records([record(0, 2), longer])] == [[0], [1]]


def test_a_cell_started_before_a_new_stop_key_keeps_its_id() -> None:
    """``clients.max_failed_rounds`` only says when a run whose rounds no client answered gives up (``--resume``
    re-runs them bit for bit): a cell's id must not depend on it, or every campaign cell started before the key
    existed would start again from round 0 in a new directory (it did once: 7 rounds of a heterogeneous-rank
    cell, about 2 hours). ``0fe747593e37`` is the id that campaign's first cell had before the key."""
    base = Path(__file__).resolve().parents[1] / "configs" / "fed_bigbench_het.yaml"
    overrides = ["train.mixed_precision=bf16", "eval.local_only=false", "simulation.num_cpus=1"]
    for extra in ([], ["clients.max_failed_rounds=null"], ["clients.max_failed_rounds=7"]):
        cell = fed_sweep.make_cell(base, [*overrides, *extra], {"strategy": "zeropad", "seed": 0}, Path("/x"))
        assert cell.id == "0fe747593e37", extra


def test_list_shows_the_rounds_a_started_cell_recorded(tmp_path: Path) -> None:
    base = Path(__file__).resolve().parents[1] / "configs" / "fed_bigbench_het.yaml"
    cell = fed_sweep.make_cell(
        base, ["rounds=10", "eval.local_only=false"], {"strategy": "zeropad", "seed": 0}, tmp_path
    )
    rounds = cell.run_dir / "zeropad" / "rounds.jsonl"
    rounds.parent.mkdir(parents=True)
    rounds.write_text('{"round": 1}\n{"round": 2}\n\n{"round": 3}\n')
    assert sweep.cell_progress(cell) == "round 3 of 10 recorded"
    alone = fed_sweep.make_cell(
        base, ["eval.local_only=false"], {"strategy": "local-only", "seed": 0}, tmp_path
    )
    assert sweep.cell_progress(alone) == ""


def test_list_estimate_counts_federated_cells_of_the_same_budget_only(tmp_path: Path) -> None:
    """A federated cell's cost scales with clients × rounds × local steps: the ``--list`` estimate of a
    5-round Fed-ALoRA cell comes from the done 5-round cells (1000 s, 3000 s: median 2000 s), not from a
    10-round cell of the same strategy (36,000 s), and a 2-client cell has no estimate from 8-client ones."""
    base = Path(__file__).resolve().parents[1] / "configs" / "fed_bigbench_homo.yaml"

    def record(rounds: int, seconds: float, seed: int) -> dict:  # one cell each: a seed of its own
        return {"kind": "federated", "strategy": "fedalora", "seed": seed, "id": f"{rounds}-{seconds}",
                "rounds": rounds, "local_steps": 20, "config": {"clients": {"num": 8}},
                "round_seconds": seconds, "wall_seconds": seconds - 1}  # fmt: skip

    spec = sweep.Sweep(tmp_path / "s.yaml", base, tmp_path, [], [], {}, kind="federated")
    spec.ledger.write_text(
        "".join(json.dumps(r) + "\n" for r in [record(5, 1000, 0), record(10, 36000, 1), record(5, 3000, 2)])
    )

    def cell(*overrides: str) -> fed_sweep.FedCell:
        extra = ["eval.local_only=false", "train.local_steps=20", *overrides]
        return fed_sweep.make_cell(base, extra, {"strategy": "fedalora", "seed": 1}, tmp_path)

    assert sweep.estimate_line(spec, [(cell("rounds=5"), "todo")]) == (
        "0 done, 0 started, 1 to do; the 1 left of a kind already done: about 0.6 h on one worker"
    )
    two = cell("rounds=5", "clients.num=2", "data.tasks=[bigbench:strategyqa, bigbench:winowhy]")
    assert sweep.estimate_line(spec, [(two, "todo")]).endswith(
        "(1 of kinds none of which is done: no estimate)"
    )


def test_time_limit_prices_a_federated_cell_of_a_new_kind_by_its_client_steps(tmp_path: Path) -> None:
    """No FedSA-LoRA cell is done, but a Fed-ALoRA one is: 8 clients × 5 rounds × 20 steps = 800 client-steps
    in 4000 s, 5 s each. A 2-client FedSA-LoRA cell at 5 × 20 (200 client-steps) should take 1000 s: it is
    deferred with 900 s left and starts with 1100 s left. A done cell of its own kind wins over the rate."""
    import time

    base = Path(__file__).resolve().parents[1] / "configs" / "fed_bigbench_homo.yaml"
    config = {"clients": {"num": 8}, "rounds": 5, "train": {"local_steps": 20}}
    record = {"kind": "federated", "strategy": "fedalora", "seed": 0, "id": "a", "rounds": 5, "local_steps": 20,
              "config": config, "round_seconds": 4000.0, "wall_seconds": 100.0}  # fmt: skip
    spec = sweep.Sweep(tmp_path / "s.yaml", base, tmp_path, [], [], {}, kind="federated")
    no_budget = [{**record, "id": "b", "config": {"clients": {"num": 8}, "rounds": 5}},  # hand-made: skipped
                 {**record, "id": "c", "config": {**config, "train": {"local_steps": 0}}, "round_seconds": 1.0},
                 {**record, "id": "e", "seed": 1, "round_seconds": "9", "wall_seconds": None}]  # fmt: skip
    earlier = {**record, "round_seconds": 4e6}  # the same cell recorded before: its last record counts
    others = [{**record, "id": "f", "seed": 2}, {**record, "id": "g", "seed": 3, "round_seconds": 40000.0}]
    ledger = [*no_budget, earlier, record, *others]  # rates 5, 5, 50 s per client-step: the median is 5
    spec.ledger.write_text("".join(json.dumps(r) + "\n" for r in ledger))
    two = ["eval.local_only=false", "train.local_steps=20", "rounds=5", "clients.num=2",
           "data.tasks=[bigbench:strategyqa, bigbench:winowhy]"]  # fmt: skip
    fedsa = fed_sweep.make_cell(base, two, {"strategy": "fedsa", "seed": 0}, tmp_path)
    assert sweep.cell_cost(spec, fedsa) == (1000.0, "its client-steps at the ledger's rate take")
    assert re.fullmatch(
        r"its client-steps at the ledger's rate take about 1,000 s, (900|899) s of the time limit is left",
        sweep.too_late(spec, fedsa, time.monotonic() + 900) or "",
    )
    assert sweep.too_late(spec, fedsa, time.monotonic() + 1100) is None
    assert sweep.estimate_line(spec, [(fedsa, "todo")]) == (  # --list prices it the same way
        "0 done, 0 started, 1 to do; the 1 left with an estimate: about 0.3 h on one worker (1 of kinds none of "
        "which is done, priced by their client-steps at the ledger's seconds per client-step)"
    )
    eight = ["eval.local_only=false", "train.local_steps=20", "rounds=5"]
    fedalora = fed_sweep.make_cell(base, eight, {"strategy": "fedalora", "seed": 1}, tmp_path)
    assert sweep.cell_cost(spec, fedalora) == (
        4000.0,
        "cells of its kind took",
    )  # median of 4000, 4000, 40000
    empty = sweep.Sweep(tmp_path / "m.yaml", base, tmp_path / "none", [], [], {}, kind="federated")
    assert sweep.cell_cost(empty, fedsa) is None  # nothing done: unknown, it starts while time is left


def test_a_sweep_of_bf16_cells_warns_on_a_cpu_that_emulates_bf16(campaigns, monkeypatch) -> None:
    """The homogeneous campaign's bf16 cells ran several times slower than float32 on an AVX2-only CPU
    (2026-12-02) and the sweep's log said nothing: the clients train in Ray workers, whose warnings it does not
    show. Now the sweep says so when it starts (the ROUGE campaign: bf16); the float32 campaigns and a CPU with
    AVX512-BF16 get nothing."""
    from asymlora.train import precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    rouge = campaigns["campaign_federated_rouge.yaml"][1]
    warning = sweep.emulated_bf16_warning(rouge)
    assert warning is not None and warning.startswith(
        "warning: 12 of 12 cells: train.mixed_precision=bf16 on a CPU"
    )
    assert "train.mixed_precision=null" in warning
    for float32 in ("campaign_federated.yaml", "campaign_federated_het.yaml", "campaign_dp.yaml"):
        assert sweep.emulated_bf16_warning(campaigns[float32][1]) is None, float32
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    assert sweep.emulated_bf16_warning(rouge) is None


def test_list_estimate_survives_a_federated_record_without_its_config(tmp_path: Path) -> None:
    """A hand-made federated record with no config (or not a dict there) has no budget: it prices no cell by
    client-steps. `Costs.read` asked `_client_steps` for one and raised AttributeError, so ``--list`` failed on
    a ledger it had read before (and ``--time-limit`` on every cell)."""
    base = Path(__file__).resolve().parents[1] / "configs" / "fed_bigbench_homo.yaml"
    config = {"clients": {"num": 8}, "rounds": 5, "train": {"local_steps": 20}}
    record = {"kind": "federated", "strategy": "fedalora", "seed": 0, "id": "a", "rounds": 5, "local_steps": 20,
              "config": config, "round_seconds": 4000.0, "wall_seconds": 100.0}  # fmt: skip
    odd = [{**record, "id": "b", "seed": 1, "config": None}, {**record, "id": "c", "seed": 2, "config": [1]},
           {**record, "id": "d", "seed": 3, "config": {"rounds": 5}}]  # fmt: skip
    spec = sweep.Sweep(tmp_path / "s.yaml", base, tmp_path, [], [], {}, kind="federated")
    spec.ledger.write_text("".join(json.dumps(r) + "\n" for r in [record, *odd]))
    costs = sweep.Costs.read(spec)
    assert costs.per_client_step == {
        "float32": 5.0
    }  # 4000 s over 8 × 5 × 20 client-steps: the odd records add no rate
    two = ["eval.local_only=false", "train.local_steps=20", "rounds=5", "clients.num=2",
           "data.tasks=[bigbench:strategyqa, bigbench:winowhy]"]  # fmt: skip
    fedsa = fed_sweep.make_cell(base, two, {"strategy": "fedsa", "seed": 0}, tmp_path)
    assert sweep.estimate_line(spec, [(fedsa, "todo")]).startswith(
        "0 done, 0 started, 1 to do; the 1 left with an estimate: about 0.3 h on one worker"
    )


def test_cost_estimates_keep_bf16_and_float32_cells_apart(tmp_path: Path) -> None:
    """The homogeneous campaign's float32 cells were priced from its four bf16 cells (10 s per client-step on
    an AVX512-BF16 CPU), though bf16 is 13-26× slower than float32 on an AVX2 CPU and 1.4× faster on one with
    AVX512-BF16: a kind is one precision. Ledger: a bf16 Fed-ALoRA cell (8 × 5 × 20 = 800 client-steps in
    8000 s: 10 s each) and a float32 FedIT cell (800 client-steps in 4000 s: 5 s each). A float32 Fed-ALoRA
    cell is priced at the float32 rate (4000 s), not from the bf16 cell of its strategy; a bf16 one takes what
    the bf16 cell took (8000 s); a bf16 FedSA-LoRA cell at the bf16 rate (8000 s), a float32 one at 5 s
    (4000 s). With the float32 record gone, a float32 cell has no estimate."""
    base = Path(__file__).resolve().parents[1] / "configs" / "fed_bigbench_homo.yaml"

    def record(strategy: str, precision: str | None, seconds: float, seed: int) -> dict:
        config = {
            "clients": {"num": 8},
            "rounds": 5,
            "train": {"local_steps": 20, "mixed_precision": precision},
        }
        return {"kind": "federated", "strategy": strategy, "seed": seed, "id": f"{strategy}-{seed}",
                "rounds": 5, "local_steps": 20, "config": config, "round_seconds": seconds}  # fmt: skip

    spec = sweep.Sweep(tmp_path / "s.yaml", base, tmp_path, [], [], {}, kind="federated")
    both = [record("fedalora", "bf16", 8000.0, 0), record("fedit", None, 4000.0, 1)]
    spec.ledger.write_text("".join(json.dumps(r) + "\n" for r in both))

    def cost(strategy: str, *precision: str) -> tuple[float, str] | None:
        extra = ["eval.local_only=false", "train.local_steps=20", "rounds=5", *precision]
        return sweep.cell_cost(
            spec, fed_sweep.make_cell(base, extra, {"strategy": strategy, "seed": 2}, tmp_path)
        )

    bf16 = "train.mixed_precision=bf16"
    assert cost("fedalora") == (4000.0, sweep.RATE_SOURCE)
    assert cost("fedalora", bf16) == (8000.0, "cells of its kind took")
    assert cost("fedsa", bf16) == (8000.0, sweep.RATE_SOURCE)
    assert cost("fedsa") == (4000.0, sweep.RATE_SOURCE)
    assert cost("fedit") == (4000.0, "cells of its kind took")
    assert cost("fedit", bf16) == (8000.0, sweep.RATE_SOURCE)
    spec.ledger.write_text(json.dumps(both[0]) + "\n")
    assert cost("fedalora") is None and cost("fedsa") is None


def test_a_record_whose_config_sections_are_not_mappings_is_read_not_raised():
    # A hand-edited ledger line: sections that are a string, null or a list are kept as they are, not indexed.
    fed = {"id": "aaa", "kind": "federated", "strategy": "fedit",
           "config": {"simulation": "4 cpus", "clients": None, "run_dir": "x"}}  # fmt: skip
    multitask = {"id": "bbb", "kind": "multitask", "config": {"train": ["save_every"], "run_dir": "y"}}
    assert fed_sweep.identity(fed["config"], "fedit") == {
        "simulation": "4 cpus", "clients": None, "run_dir": "", "strategies": ["fedit"]
    }  # fmt: skip
    assert sweep.identity(multitask["config"]) == {"train": ["save_every"], "run_dir": ""}
    ids = sweep.done_ids([fed, multitask])
    assert {"aaa", "bbb"} <= ids and len(ids) == 4
