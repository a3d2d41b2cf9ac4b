"""The Flower apps end to end: simulation with a tiny model, faults, kill/resume, bad input, a deployment
with a SuperLink and two SuperNodes on 127.0.0.1, and SmolLM2-135M on real BIG-bench tasks."""

from __future__ import annotations

import os

os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import json
import random
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from tests import fed_deploy as fd
from tests.conftest import make_char_tokenizer, make_tiny_llama

from asymlora.federated.partition import (
    check_plan,
    dirichlet_partition,
    iid_partition,
    summary_lines,
    task_partition,
)
from asymlora.federated.run import EXIT_FAILED, EXIT_STOPPED, EXIT_USER_ERROR, main
from asymlora.methods.base import Role

pytestmark = pytest.mark.fed

TASKS = ("parity", "bigger", "small")


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """A tiny Llama with a character tokenizer saved to disk, and three tiny choice tasks in one JSONL file."""
    root = tmp_path_factory.mktemp("fed_assets")
    tok = make_char_tokenizer()
    model = make_tiny_llama(vocab_size=len(tok), hidden=32, layers=2)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    rng = random.Random(0)
    rows = []

    def row(task: str, text: str, options: list[str], target: str) -> None:
        rows.append({"input": text, "options": options, "target": target, "task": task})

    for _ in range(50):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        row("parity", f"{a} {b}", ["odd", "even"], ["even", "odd"][(a + b) % 2])
        row("bigger", f"{a} vs {b}", ["left", "right"], "left" if a >= b else "right")
        row("small", f"is {a} small", ["yes", "no"], "yes" if a < 5 else "no")
    (root / "tasks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def write_config(path: Path, assets: Path, run_dir: Path, clients: int = 2, **top) -> Path:
    """A small federated YAML config over the tiny assets."""
    cfg = {
        "model": {"name": str(assets / "model")},
        "strategies": ["fedalora"],
        "adapter": {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "o_proj"]},  # square: |A| = |B|
        "clients": {"num": clients},
        "data": {
            "tasks": [f"jsonl:{assets / 'tasks.jsonl'}#{t}" for t in TASKS[:clients]],
            "max_train": 24,
            "max_test": 6,
            "max_length": 48,
        },
        "rounds": 2,
        "train": {"local_steps": 2, "batch_size": 4, "lr": 0.01},
        "eval": {"batch_size": 8},
        "timeouts": {"wait_nodes": 180, "round": 180, "evaluate": 180},
        "run_dir": str(run_dir),
        **top,
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def fed(config: Path, *overrides: str, resume: bool = False, overwrite: bool = False) -> int:
    return main(
        argparse.Namespace(config=str(config), overrides=list(overrides), resume=resume, overwrite=overwrite)
    )


def read_rounds(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def tiny_roles(assets: Path):
    """The role map of the tiny model as the clients adapt it (to classify the keys seen in messages)."""
    import peft

    from asymlora import AsymLoraConfig
    from asymlora.federated import role_map
    from asymlora.models import load

    model, _ = load(str(assets / "model"))
    cfg = AsymLoraConfig(method="lora", r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"])
    return role_map(peft.get_peft_model(model, cfg))


# --- pure partition functions (no Flower) ---------------------------------------------------------------
@pytest.mark.parametrize("alpha", [0.1, 1.0, 100.0])
def test_dirichlet_partition_is_a_deterministic_split(alpha: float) -> None:
    labels_tr = [[i % 3 for i in range(60)], [5] * 30]
    labels_te = [[i % 3 for i in range(15)], [5] * 9]
    a = dirichlet_partition(labels_tr, labels_te, 4, alpha, seed=7)
    assert a == dirichlet_partition(labels_tr, labels_te, 4, alpha, seed=7)
    for t, (n_tr, n_te) in enumerate([(60, 15), (30, 9)]):  # every example exactly once
        got_tr = sorted(i for client in a for s in client if s.task == t for i in s.train)
        got_te = sorted(i for client in a for s in client if s.task == t for i in s.test)
        assert got_tr == list(range(n_tr)) and got_te == list(range(n_te))
    if alpha == 100.0:  # near-equal shares
        sizes = [sum(len(s.train) for s in c) for c in a]
        assert max(sizes) - min(sizes) <= 10
    assert dirichlet_partition(labels_tr, labels_te, 4, alpha, seed=8) != a


def test_iid_and_task_partitions_and_empty_client() -> None:
    plan = iid_partition([(10, 4), (7, 3)], 3, seed=0)
    assert sorted(sum(len(s.train) for s in c) for c in plan) == [5, 6, 6]
    assert task_partition([(10, 4), (7, 3)], 2)[1][0].train == tuple(range(7))
    with pytest.raises(ValueError, match="as many tasks as clients"):
        task_partition([(10, 4)], 2)
    empty = iid_partition([(1, 1)], 2, seed=0)
    with pytest.raises(ValueError, match="leaves client 1 with no training example") as err:
        check_plan(empty, ["t"], "IID")
    assert "clients.alpha" not in str(err.value)  # only a Dirichlet split reads it
    with pytest.raises(ValueError, match=r"\); raise clients.alpha, lower clients.num"):
        check_plan(empty, ["t"], "Dirichlet α=0.1 over tasks")


# --- the protocol in process: the ServerApp loop against the ClientApp, no Flower engine ------------------------
class InProcessGrid:
    """A Flower ``Grid`` that hands every instruction straight to ``client_app.app`` with one ``Context`` per
    node (as a SuperNode keeps it), recording each instruction's config fields. ``restart`` (node ids) makes
    those nodes lose their context and the process's config cache before round 2, as a restarted SuperNode."""

    def __init__(self, num: int, restart: tuple[int, ...] = ()) -> None:
        from flwr.app import Context, RecordDict

        self.contexts = {
            100 + k: Context(7, 100 + k, {"partition-id": k, "num-partitions": num}, RecordDict(), {})
            for k in range(num)
        }
        self.restart, self.sent = set(restart), []

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import Context, Error, Message, RecordDict

        from asymlora.federated import client_app

        out = []
        for m in messages:
            node = m.metadata.dst_node_id
            if m.metadata.group_id == "2" and node in self.restart:
                self.restart.discard(node)
                old = self.contexts[node]
                self.contexts[node] = Context(7, node, old.node_config, RecordDict(), {})
                client_app._CONFIGS.clear()
            config = m.content.config_records.get("config")
            self.sent.append((node, m.metadata.message_type, m.metadata.group_id, dict(config or {})))
            try:
                out.append(client_app.app(m, self.contexts[node]))
            except Exception as e:  # what Flower does with a raising ClientApp
                out.append(Message(Error(2, f"Exception occurred. Message: {e}"), reply_to=m))
        return out


@pytest.fixture
def task_identity(monkeypatch):
    """The identity Flower gives the ServerApp process (messages are stamped with it)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 7), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _in_process_run(
    assets: Path, tmp_path: Path, restart: tuple[int, ...] = ()
) -> tuple[InProcessGrid, dict]:
    from asymlora.federated.config import load_fed_config
    from asymlora.federated.server_app import run_server

    cfg = load_fed_config(write_config(tmp_path / "fed.yaml", assets, tmp_path / "run"))
    grid = InProcessGrid(2, restart)
    outcome = run_server(grid, cfg, "fedalora", tmp_path / "run" / "fedalora", say=lambda _: None)
    assert outcome.status == "completed", outcome.message
    return grid, {
        "rounds": read_rounds(tmp_path / "run" / "fedalora" / "rounds.jsonl"),
        "results": outcome.results,
    }


def test_the_config_travels_once_per_run(assets: Path, tmp_path: Path, task_identity) -> None:
    """Only each node's first instruction carries the config (``fed``); every one carries its hash; the
    rounds after the first are the same size (ArrayRecord bytes) as the first."""
    import hashlib

    grid, run = _in_process_run(assets, tmp_path)
    kinds = [(node, kind, group, "fed" in c) for node, kind, group, c in grid.sent]
    assert kinds == [
        (100, "query", "hello", False), (101, "query", "hello", False),
        (100, "train", "1", True), (101, "train", "1", True),
        (100, "train", "2", False), (101, "train", "2", False),
        (100, "evaluate", "evaluate", False), (101, "evaluate", "evaluate", False),
    ]  # fmt: skip
    fed_json = grid.sent[2][3]["fed"]
    assert {c["config-hash"] for *_, c in grid.sent[2:]} == {hashlib.sha256(fed_json.encode()).hexdigest()}
    r1, r2 = run["rounds"]
    assert r1["accepted"] == r2["accepted"] == [0, 1] and r1["bytes_down"] == r2["bytes_down"]
    assert all("config_resent" not in c for r in run["rounds"] for c in r["clients"])
    # fedalora sends B of q_proj and o_proj (32 × 2) in 2 layers: 4 · 64 values · 4 bytes each way
    assert run["results"]["bytes"]["payload_per_client_per_round"] == 2 * 1024


def test_a_restarted_node_asks_for_the_config_and_gets_it(
    assets: Path, tmp_path: Path, task_identity
) -> None:
    """Node 101 loses its context before round 2 (a restarted SuperNode): it answers NEED_CONFIG, the server
    sends the instruction again with the config, and the round completes; its download is counted twice."""
    grid, run = _in_process_run(assets, tmp_path, restart=(101,))
    round2 = [(node, "fed" in c) for node, kind, group, c in grid.sent if group == "2"]
    assert round2 == [(100, False), (101, False), (101, True)]
    _, r2 = run["rounds"]
    assert r2["accepted"] == [0, 1] and not r2["failed"]
    kept, restarted = r2["clients"]
    assert "config_resent" not in kept and restarted["config_resent"] is True
    assert restarted["bytes_down"] == 2 * kept["bytes_down"] > 0
    assert r2["bytes_down"] == 3 * kept["bytes_down"]
    # the restarted node lost its A with its context: it starts round 2 from the initial A again
    assert restarted["a_drift_start"] == 0.0 and kept["a_drift_start"] > 0
    assert len(run["results"]["clients"]) == 2


def test_malformed_replies_are_refused_with_the_missing_field() -> None:
    """Reply validation names what is missing; the protocol's decoders refuse a wrong type."""
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    from asymlora.federated.messages import (
        ReplyError,
        TrainReply,
        decode_evaluate_reply,
        decode_train_reply,
        encode_train_reply,
    )

    reply = TrainReply(1, ArrayRecord(), 24, float("nan"), 0.5, 0.0, 0.25, ("a note",))
    back = decode_train_reply(encode_train_reply(reply))
    assert (back.client, back.num_examples, back.seconds, back.a_drift_end, back.notes) == (
        1,
        24,
        0.5,
        0.25,
        ("a note",),
    )
    with pytest.raises(ReplyError, match="no 'metrics' record"):
        decode_train_reply(RecordDict({"arrays": ArrayRecord()}))
    bad = RecordDict({"arrays": ArrayRecord(), "metrics": MetricRecord({"client": 1, "num-examples": 2.5})})
    with pytest.raises(ReplyError, match="'num-examples' is 2.5, not an integer"):
        decode_train_reply(bad)
    with pytest.raises(ReplyError, match="no 'personalised' scores"):
        decode_evaluate_reply(RecordDict({"results": ConfigRecord({"json": "{}"})}))


# --- simulations -----------------------------------------------------------------------------------------
def test_messages_carry_only_the_shared_tensors(assets: Path, tmp_path: Path, capsys) -> None:
    """fedit / fedsa / fedalora in one run: A never leaves the client under fedalora, B never under fedsa,
    fedalora moves half of fedit's bytes, and local_a=persist keeps each client's A across rounds."""
    cfg = write_config(
        tmp_path / "fed.yaml",
        assets,
        tmp_path / "run",
        strategies=["fedit", "fedsa", "fedalora"],
        log_keys=True,
    )
    assert fed(cfg) == 0
    out = capsys.readouterr().out
    assert "client 0: rank   2,    24 train /    6 test  [parity 24/6]" in out  # the per-client summary
    roles = tiny_roles(assets)
    runs = {s: read_rounds(tmp_path / "run" / s / "rounds.jsonl") for s in ("fedit", "fedsa", "fedalora")}
    expect = {"fedit": {Role.A, Role.B}, "fedsa": {Role.A}, "fedalora": {Role.B}}
    for name, history in runs.items():
        assert [r["round"] for r in history] == [1, 2]
        for r in history:
            assert r["accepted"] == [0, 1] and not r["failed"] and not r["rejected"]
            for c in r["clients"]:
                assert c["status"] == "ok"
                for way in ("keys_up", "keys_down"):
                    assert {roles[k].role for k in c[way]} == expect[name], (name, way)
                    assert len(c[way]) == len({k for k in roles if roles[k].role in expect[name]})
    for r_fedalora, r_fedit in zip(runs["fedalora"], runs["fedit"], strict=True):
        for a, b in zip(r_fedalora["clients"], r_fedit["clients"], strict=True):
            assert 2 * a["payload_up"] == b["payload_up"] and 2 * a["payload_down"] == b["payload_down"]
            assert (
                2 * a["bytes_up"] == b["bytes_up"] and 2 * a["bytes_down"] == b["bytes_down"]
            )  # same headers
    # persist: round 2 starts from the A each client trained in round 1 (never sent anywhere)
    r1, r2 = runs["fedalora"]
    for c1, c2 in zip(r1["clients"], r2["clients"], strict=True):
        assert c1["a_drift_start"] == 0.0 and c1["a_drift_end"] > 0
        assert c2["a_drift_start"] == pytest.approx(c1["a_drift_end"], rel=1e-6)
    from safetensors.torch import load_file

    kept = load_file(str(tmp_path / "run" / "fedalora" / "clients" / "client-0" / "round-2.safetensors"))
    assert any(roles[k].role == Role.A for k in kept)  # the client keeps its A on its own disk
    summary = json.loads((tmp_path / "run" / "results.json").read_text())
    for name in ("fedit", "fedsa", "fedalora"):
        res = summary["strategies"][name]
        scores = [c["personalised"]["score"] for c in res["clients"]]
        assert len(scores) == 2 and all(c["personalised"]["n"] == 6 for c in res["clients"])
        assert all(6 * s == pytest.approx(round(6 * s)) for s in scores)  # accuracy on 6 test examples
        pers = res["personalised"]  # mean, population std |a − b| / 2, worst = the smaller
        assert pers["average"] == pytest.approx(sum(scores) / 2) and pers["std"] == pytest.approx(
            abs(scores[0] - scores[1]) / 2
        )
        assert pers["worst"]["value"] == min(scores)
        assert res["global"] is not None and res["bytes"]["total"] == sum(
            r["bytes_up"] + r["bytes_down"] for r in runs[name]
        )
    assert "| **average** |" in (tmp_path / "run" / "results.md").read_text()


def test_heterogeneous_ranks_messages(assets: Path, tmp_path: Path) -> None:
    """zeropad downloads at the largest rank and uploads at the client's own; fedalora-het downloads B0 only
    and uploads B2·B1 (rank 4: 4·(32+4) > 32·4) or the factors B2, B1 (rank 2: 2·(32+4) < 32·4)."""
    cfg = write_config(
        tmp_path / "fed.yaml", assets, tmp_path / "run", strategies=["zeropad", "fedalora-het"], log_keys=True
    )
    assert fed(cfg, "clients.ranks=[4, 2]", "adapter.intermediate_rank=4", "rounds=1") == 0
    (zp,) = read_rounds(tmp_path / "run" / "zeropad" / "rounds.jsonl")
    big, small = zp["clients"]
    assert big["payload_down"] == small["payload_down"] == 4 * 4 * (2 * 32 * 4)  # A and B at rank 4, 4 layers
    assert big["payload_up"] == 2 * small["payload_up"] and big["tensors_up"] == {"A": 4, "B": 4}
    (het,) = read_rounds(tmp_path / "run" / "fedalora-het" / "rounds.jsonl")
    big, small = het["clients"]
    b0 = 4 * 4 * 32 * 4  # bytes of B0 (32 × d_m) in 4 layers
    for c in het["clients"]:
        assert c["tensors_down"] == {"B0": 4} and c["payload_down"] == b0
        assert all(".asymlora_A." not in k and ".asymlora_M." not in k for k in c["keys_up"])
    assert big["tensors_up"] == {"B0": 4} and big["payload_up"] == b0  # the product, under B0's name
    assert small["tensors_up"] == {"B2": 4, "B1": 4} and small["payload_up"] == 4 * 4 * (32 * 2 + 2 * 4)
    for name in ("zeropad", "fedalora-het"):
        res = json.loads((tmp_path / "run" / name / "results.json").read_text())
        assert res["ranks"] == [4, 2] and len(res["clients"]) == 2 and res["global"] is not None


def test_bad_clients_are_recorded_and_the_run_goes_on(assets: Path, tmp_path: Path, capsys) -> None:
    """NaN and wrong shapes are rejected, a raising client is recorded, a round without survivors keeps the
    old tensors; local_a=reset starts every round from the shared initial A."""
    cfg = write_config(
        tmp_path / "fed.yaml", assets, tmp_path / "run", clients=3, rounds=3, local_a="reset",
        faults={"nan_in": ["0:1"], "bad_shape_in": ["2:1"], "raise_in": ["1:2", "0:3", "1:3", "2:3"]},
    )  # fmt: skip
    assert fed(cfg) == 0
    r1, r2, r3 = read_rounds(tmp_path / "run" / "fedalora" / "rounds.jsonl")
    assert r1["accepted"] == [1]
    rejected = {r["client"]: r["reason"] for r in r1["rejected"]}
    assert "NaN" in rejected[0] and "shape" in rejected[2]
    assert [c["status"] for c in r1["clients"]] == ["rejected", "ok", "rejected"]
    assert r2["accepted"] == [0, 2] and r2["failed"][0]["client"] == 1
    assert "injected fault" in r2["failed"][0]["reason"] and r2["clients"][1]["bytes_up"] == 0
    for c in r2["clients"]:
        if c["status"] == "ok":
            assert c["a_drift_start"] == 0.0 < c["a_drift_end"]  # reset: A back at its initial value
    assert r3["kept_previous"] and r3["accepted"] == [] and "kept" in r3["note"]
    assert "no client update accepted" in capsys.readouterr().out
    res = json.loads((tmp_path / "run" / "fedalora" / "results.json").read_text())
    assert res["rounds_kept_previous"] == [3] and res["rounds_with_failures"] == [1, 2, 3]
    assert len(res["clients"]) == 3  # every client is still evaluated (on its last trained adapter)


def test_a_simulation_no_client_answers_stops_and_resumes(assets: Path, tmp_path: Path, capsys) -> None:
    """In Flower's simulation (Ray), both clients raise in rounds 1 and 2 of 3: the run stops after round 2
    with exit 1 and one line naming the rounds and the reason; fixed and resumed, it runs rounds 1-3."""
    cfg = write_config(
        tmp_path / "fed.yaml",
        assets,
        tmp_path / "run",
        rounds=3,
        faults={"raise_in": ["0:1", "1:1", "0:2", "1:2"]},
    )
    run = tmp_path / "run" / "fedalora"
    assert fed(cfg) == EXIT_FAILED
    out = capsys.readouterr()
    assert (
        "rounds 1-2 had no answer from any client" in out.out + out.err
    )  # (Flower logs the clients' errors)
    assert len(read_rounds(run / "rounds.jsonl")) == 2 and not (run / "results.json").exists()
    assert fed(cfg, "faults.raise_in=[]", resume=True) == 0
    assert "round(s) 1-2 had no answer from any client; they run again" in capsys.readouterr().out
    assert [r["accepted"] for r in read_rounds(run / "rounds.jsonl")] == [[0, 1]] * 3
    assert [r["round"] for r in read_rounds(run / "rounds_rerun.jsonl")] == [1, 2]


def test_stop_and_resume(assets: Path, tmp_path: Path, capsys) -> None:
    """A run stopped after round 1 (as if killed) finishes round 2 from its checkpoint with --resume; the
    clients get their own A back from their storage."""
    cfg = write_config(tmp_path / "fed.yaml", assets, tmp_path / "run", faults={"stop_after": 1})
    run = tmp_path / "run" / "fedalora"
    assert fed(cfg) == EXIT_STOPPED
    assert len(read_rounds(run / "rounds.jsonl")) == 1 and not (run / "results.json").exists()
    assert json.loads((run / "checkpoint" / "state.json").read_text())["round"] == 1
    assert fed(cfg) == EXIT_USER_ERROR  # neither --resume nor --overwrite: refused
    assert "--resume" in capsys.readouterr().err
    assert fed(cfg, "adapter.r=4", resume=True) == EXIT_USER_ERROR  # a different run: refused
    assert "adapter differ" in capsys.readouterr().err
    assert fed(cfg, "faults.stop_after=null", resume=True) == 0
    assert "resuming after round 1" in capsys.readouterr().out
    r1, r2 = read_rounds(run / "rounds.jsonl")
    assert r2["accepted"] == [0, 1]
    for c1, c2 in zip(r1["clients"], r2["clients"], strict=True):
        assert c2["a_drift_start"] == pytest.approx(c1["a_drift_end"], rel=1e-6)
    results = json.loads((run / "results.json").read_text())
    assert results["rounds"] == 2
    # the rounds' time counts the stopped process's round 1 too (each round's own "seconds", as recorded)
    assert results["round_seconds"] == pytest.approx(r1["seconds"] + r2["seconds"], abs=0.01)
    assert r1["seconds"] > 0 and r2["seconds"] > 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["strategies=[fedalora-het]", "clients.ranks=[4, 2, 2]"], "3 client ranks"),
        (["strategies=[zeropad]", "clients.ranks=[4, 0]"], "rank 0 is invalid"),
        (["strategies=[fedalora-het]", "adapter.intermediate_rank=0"], "d_m"),
        (["strategies=[fedavg]"], "unknown federated strategy 'fedavg'"),
        (["strategies=[fedit]", "clients.ranks=[4, 2]"], "need one rank for every client"),
        (
            ["clients.partition=iid", "data.tasks=[jsonl:TASKS#parity]", "data.max_train=1"],
            "leaves client 1 with no training",
        ),
        (["clients.num=3"], "data.tasks has 2 task(s) for clients.num=3"),
        (["faults.raise_in=[x]"], "client:round"),
        (
            ["dp.clipping=server", "dp.noise_multiplier=1", "dp.clipping_norm=0"],
            "dp.clipping_norm=0.0 must be",
        ),
        (["dp.clipping=server", "dp.target_epsilon=1e-6"], "dp.target_epsilon=1e-06 is out of reach"),
        (["reject.norm_factor=0.5"], "reject.norm_factor=0.5 must be a finite number > 1"),
    ],
)
def test_bad_input_fails_fast_with_a_clear_message(assets, tmp_path, capsys, overrides, message) -> None:
    cfg = write_config(tmp_path / "fed.yaml", assets, tmp_path / "run")
    overrides = [o.replace("TASKS", str(assets / "tasks.jsonl")) for o in overrides]
    assert fed(cfg, *overrides) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert message in err and err.startswith("asymlora fed: error:")


def test_summary_lines_name_rank_and_tasks(assets: Path, tmp_path: Path) -> None:
    from asymlora.federated.config import load_fed_config
    from asymlora.federated.partition import load_partition

    cfg = load_fed_config(
        write_config(tmp_path / "f.yaml", assets, tmp_path / "r"), ["clients.partition=iid"]
    )
    tasks, plan = load_partition(cfg)
    lines = summary_lines(cfg, tasks, plan, [2, 2])
    assert (
        lines[0].startswith("partition: iid over 2 task(s), 2 clients") and "client 1: rank   2" in lines[2]
    )


# --- deployment: SuperLink + 2 SuperNodes on 127.0.0.1 (process helpers shared with test_fed_secure) ---------
def test_deployment_superlink_and_two_supernodes(assets: Path, tmp_path: Path) -> None:
    """A real deployment on 127.0.0.1: the run is submitted with `flwr run` (no per-run environment: the
    app's dependency list is empty and the SuperLink never installs anything), finishes 2 rounds, and its
    outcome is read from the SuperLink's state, which also reports a crashed ServerApp as failed."""
    from asymlora.federated.__main__ import write_app

    env = fd.flower_env(tmp_path / "flwr_home")
    port, p1, p2 = fd.free_port(), fd.free_port(), fd.free_port()
    fd.write_connection(env, "local", port)
    cfg = write_config(tmp_path / "fed.yaml", assets, tmp_path / "run")
    app = write_app(tmp_path / "app", str(cfg), run_dir=str(tmp_path / "run"))
    procs: list[subprocess.Popen] = []
    try:
        fd.start_local_federation(env, tmp_path, port, (p1, p2), procs)
        sub = fd.flwr(env, "run", str(app), "local", "--format", "json")
        assert sub.returncode == 0 and '"run-id"' in sub.stdout, sub.stdout + sub.stderr
        run_id = json.loads(sub.stdout)["run-id"]
        bad = fd.flwr(env, "run", str(app), "local", "--format", "json", "--run-config", 'strategy="fedavg"')
        assert bad.returncode == 0  # flwr run says nothing about the outcome ...
        status = fd.wait_finished(env, "local", run_id, timeout=420)
        assert status["status"] == "finished:completed", status
        failed = fd.wait_finished(env, "local", json.loads(bad.stdout)["run-id"], timeout=120)
        assert (
            failed["status"] == "finished:failed" and "fedavg" in failed["status-details"]
        )  # ... its state does
    finally:
        fd.stop(procs)
    history = read_rounds(tmp_path / "run" / "fedalora" / "rounds.jsonl")
    assert [r["round"] for r in history] == [1, 2] and all(r["accepted"] == [0, 1] for r in history)
    assert history[1]["clients"][0]["a_drift_start"] == pytest.approx(history[0]["clients"][0]["a_drift_end"])
    assert (tmp_path / "node0" / "client-0" / "round-2.safetensors").is_file()  # the node's own storage
    res = json.loads((tmp_path / "run" / "fedalora" / "results.json").read_text())
    # fedalora sends B of q_proj and o_proj (32 × 2) in 2 layers: 4 · 64 values · 4 bytes each way
    assert len(res["clients"]) == 2 and res["bytes"]["payload_per_client_per_round"] == 2 * 1024
    assert res["bytes"]["total"] == sum(r["bytes_up"] + r["bytes_down"] for r in history)


# --- the real model on real data --------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_on_two_bigbench_tasks(tmp_path: Path) -> None:
    """SmolLM2-135M, 2 clients with one BIG-bench task each, 2 local steps, 1 round, fedalora."""
    cfg = tmp_path / "fed.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": {"name": "smollm2-135m"},
                "strategies": ["fedalora"],
                "clients": {"num": 2},
                "data": {
                    "tasks": ["bigbench:strategyqa", "bigbench:formal_fallacies_syllogisms_negation"],
                    "max_train": 16,
                    "max_test": 8,
                    "max_length": 128,
                },
                "rounds": 1,
                "train": {"local_steps": 2, "batch_size": 2},
                "eval": {"batch_size": 8, "max_examples": 8, "global_scores": False},
                "run_dir": str(tmp_path / "run"),
            }
        )
    )
    assert fed(cfg) == 0
    (r,) = read_rounds(tmp_path / "run" / "fedalora" / "rounds.jsonl")
    assert r["accepted"] == [0, 1] and r["train_loss"] > 0
    b_values = 30 * 8 * (576 + 192)  # B of q_proj (576 × 8) and v_proj (192 × 8) in 30 layers
    assert all(c["payload_up"] == 4 * b_values == c["payload_down"] for c in r["clients"])
    assert all(c["tensors_up"] == {"B": 60} for c in r["clients"])
    res = json.loads((tmp_path / "run" / "fedalora" / "results.json").read_text())
    assert [c["personalised"]["n"] for c in res["clients"]] == [8, 8]
    scores = [c["personalised"]["score"] for c in res["clients"]]
    assert all(8 * s == pytest.approx(round(8 * s)) and 0 <= s <= 1 for s in scores)  # accuracy on 8 examples
    assert res["personalised"]["average"] == pytest.approx(sum(scores) / 2)
    assert torch.isfinite(torch.tensor(res["train_loss"])).all()
