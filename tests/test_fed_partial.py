"""Partial participation (docs/federated.md, "Partial participation"): the seeded per-round sample, the
minimum to aggregate, FedAvg weights over the clients that answered, local tensors carried over the
rounds a client sits out (in memory and from the client's disk after --resume), and the byte accounting."""

from __future__ import annotations

import dataclasses
import json
import os
import re

os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

from pathlib import Path

import numpy as np
import pytest
import torch
from tests import test_fed_apps as apps
from tests.test_fed_apps import InProcessGrid, fed, read_rounds, write_config

from asymlora.config import ConfigError
from asymlora.federated.run import EXIT_USER_ERROR

pytestmark = pytest.mark.fed

assets, task_identity = apps.assets, apps.task_identity  # the fixtures of tests/test_fed_apps.py

SEED = 1
"""With this seed, 2 of 4 clients per round: rounds 1-3 sample [0, 2], [1, 3], [0, 3] (hand draw below):
client 0 trains in round 1, sits out round 2 and trains again in round 3; client 1 first trains in round 2."""


def partial_config(assets: Path, tmp_path: Path, *overrides: str):
    from asymlora.federated.config import load_fed_config

    path = write_config(tmp_path / "fed.yaml", assets, tmp_path / "run", clients=3, rounds=3)
    base = ["clients.num=4", "clients.partition=iid", "clients.fraction=0.5", f"seed={SEED}"]
    return load_fed_config(path, [*base, *overrides])


# --- the sample -------------------------------------------------------------------------------------------
def test_sampling_is_seeded_and_matches_a_hand_draw() -> None:
    from asymlora.federated.server_round import sample_clients

    # the draw by hand: a PCG64 Generator seeded with SeedSequence([seed, round]) permutes range(4); the first 2
    for rnd in (1, 2, 3):
        gen = np.random.Generator(np.random.PCG64(np.random.SeedSequence([SEED, rnd])))
        assert sample_clients(4, 2, SEED, rnd) == sorted(int(k) for k in gen.permutation(4)[:2])
    assert [sample_clients(4, 2, SEED, r) for r in (1, 2, 3)] == [[0, 2], [1, 3], [0, 3]]
    assert [sample_clients(8, 3, 0, r) for r in (1, 2)] == [[1, 3, 7], [2, 5, 6]]
    assert sample_clients(4, 2, SEED, 2) == sample_clients(4, 2, SEED, 2)  # the same on every call
    assert sample_clients(4, 4, SEED, 1) == sample_clients(4, 9, SEED, 1) == [0, 1, 2, 3]
    counts = np.bincount([k for r in range(1, 2001) for k in sample_clients(4, 1, 0, r)], minlength=4)
    assert counts.min() > 430  # uniform: 500 ± 3 sd (sd ≈ 19) per client


def test_clients_per_round_and_the_minimum(assets: Path, tmp_path: Path) -> None:
    cfg = partial_config(assets, tmp_path)
    assert cfg.clients_per_round == 2 and cfg.clients.min_per_round == 1
    cfg.clients.num, cfg.clients.fraction = 10, 0.7
    assert cfg.clients_per_round == 7  # ⌊0.7 · 10⌋ although 0.7 · 10 = 7.000000000000001 in floats
    cfg.clients.num, cfg.clients.fraction = 100, 0.29
    assert cfg.clients_per_round == 29  # 0.29 · 100 = 28.999999999999996 in floats
    cfg.clients.fraction, cfg.clients.per_round = 1.0, 3
    assert cfg.clients_per_round == 3
    for overrides, message in (
        (["clients.fraction=0.2"], "⌊0.2 × clients.num=4⌋ = 0 client(s) per round"),
        (["clients.min_per_round=3"], "clients.min_per_round=3 must lie in [1, 2]"),
        (["clients.fraction=1.5"], "clients.fraction=1.5 must lie in (0, 1]"),
        (["clients.per_round=2"], "set only one"),
        (
            ["clients.fraction=1.0", "clients.per_round=5"],
            "clients.per_round=5 must lie in [1, clients.num=4]",
        ),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            partial_config(assets, tmp_path, *overrides)


def test_too_few_sampled_fails_before_round_one(assets: Path, tmp_path: Path, capsys) -> None:
    """The CLI refuses a fraction that samples fewer clients than the minimum: exit 2, one line naming the
    values and the fix, no run directory."""
    path = write_config(tmp_path / "fed.yaml", assets, tmp_path / "run", clients=2)
    assert fed(path, "clients.fraction=0.5", "clients.min_per_round=2") == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "clients.fraction=0.5 samples ⌊0.5 × clients.num=2⌋ = 1 client(s) per round" in err
    assert "raise clients.fraction to >= 1" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "fedalora").exists()


# --- weights over the clients that answered ----------------------------------------------------------------
def test_fedavg_weights_are_renormalised_over_the_answering_clients() -> None:
    """Clients 1 and 3 of 4 answered with 10 and 30 examples: p = 10/40, 30/40 (not /Σ of all four)."""
    from asymlora.federated.strategies import combine, fedavg_weights

    weights = fedavg_weights([10, 30])
    assert weights == [0.25, 0.75]
    new = combine(
        "mean",
        {"B": torch.zeros(2)},
        [{"B": torch.tensor([2.0, 4.0])}, {"B": torch.tensor([6.0, 0.0])}],
        weights,
    )
    assert torch.equal(new["B"], torch.tensor([5.0, 1.0]))  # 0.25·2 + 0.75·6, 0.25·4 + 0.75·0


# --- end to end, in process ------------------------------------------------------------------------------------
class Spy:
    """Records what `client.train_round` was given (``carried``) and what it trained, per (client, round)."""

    def __init__(self, monkeypatch) -> None:
        from asymlora.federated import client as fc

        self.carried: dict[tuple[int, int], dict | None] = {}
        self.trained: dict[tuple[int, int], dict] = {}
        real = fc.train_round

        def spy(cfg, strategy, client, rank, rnd, received, carried, tasks, **kw):
            self.carried[(client, rnd)] = (
                None if carried is None else {k: v.clone() for k, v in carried.items()}
            )
            res = real(cfg, strategy, client, rank, rnd, received, carried, tasks, **kw)
            self.trained[(client, rnd)] = {k: v.clone() for k, v in res.trained.items()}
            return res

        monkeypatch.setattr(fc, "train_round", spy)


def _run(cfg, grid, out: Path, strategy: str = "fedalora", **kw):
    from asymlora.federated.server_app import run_server

    return run_server(grid, cfg, strategy, out, say=lambda _: None, **kw)


@pytest.mark.parametrize(
    ("strategy", "overrides"),
    [
        ("fedalora", []),
        ("fedsa", []),
        ("fedalora-het", ["clients.ranks=[2, 1, 2, 1]", "adapter.intermediate_rank=2"]),
    ],
)
def test_a_client_sitting_out_keeps_its_local_tensors(
    assets: Path, tmp_path: Path, task_identity, monkeypatch, strategy: str, overrides: list[str]
) -> None:
    """4 clients, fraction 0.5, 3 rounds: only the sampled nodes get an instruction; client 0 (rounds 1 and
    3) starts round 3 from exactly the adapter it trained in round 1 — its local tensors (Fed-ALoRA's A,
    FedSA-LoRA's B, Fed-ALoRA-het's A, M, B1) included; weights over the clients that answered."""
    spy, grid = Spy(monkeypatch), InProcessGrid(4)
    cfg = partial_config(assets, tmp_path, f"strategies=[{strategy}]", "log_keys=true", *overrides)
    outcome = _run(cfg, grid, tmp_path / "run" / strategy, strategy=strategy)
    assert outcome.status == "completed", outcome.message
    rounds = read_rounds(tmp_path / "run" / strategy / "rounds.jsonl")
    assert [r["sampled"] for r in rounds] == [[0, 2], [1, 3], [0, 3]]
    assert [r["accepted"] for r in rounds] == [[0, 2], [1, 3], [0, 3]]
    sent = [
        (node - 100, int(grp), c.get("carried-round")) for node, kind, grp, c in grid.sent if kind == "train"
    ]
    assert sent == [(0, 1, 0), (2, 1, 0), (1, 2, 0), (3, 2, 0), (0, 3, 1), (3, 3, 2)]
    # client 0 sat out round 2: round 3 starts from its round-1 adapter, bit for bit
    carried, trained1 = spy.carried[(0, 3)], spy.trained[(0, 1)]
    assert carried is not None and carried.keys() == trained1.keys()
    assert all(torch.equal(carried[k], trained1[k]) for k in trained1)
    local = set(carried) - set(rounds[0]["clients"][0]["keys_down"])  # what never left the client
    assert local and all(not torch.equal(trained1[k], spy.trained[(2, 1)][k]) for k in local)
    c0 = {r["round"]: next(c for c in r["clients"] if c["client"] == 0) for r in rounds}
    assert c0[2]["status"] == "not_sampled" and c0[2]["bytes_down"] == c0[2]["bytes_up"] == 0
    assert spy.carried[(1, 2)] is None  # client 1's first round: nothing carried (and no warning)
    assert not any("notes" in c for r in rounds for c in r["clients"])
    for r in rounds:  # p_k = n_k / Σ over the clients that answered
        n = {c["client"]: c["num_examples"] for c in r["clients"] if c["status"] == "ok"}
        assert r["weights"] == pytest.approx({str(k): v / sum(n.values()) for k, v in n.items()})


def test_bytes_are_counted_per_sampled_client(assets: Path, tmp_path: Path, task_identity) -> None:
    """Fed-ALoRA's B of q_proj and o_proj (32 × 2) in 2 layers: 4 · 64 values · 4 bytes = 1024 each way per
    sampled client; a round of 2 sampled clients of 4 moves 2 · 2048 bytes, as the accounting expects."""
    from asymlora.federated.accounting import expected_round_bytes

    cfg = partial_config(assets, tmp_path, "rounds=2", "train.local_steps=0")
    outcome = _run(cfg, InProcessGrid(4), tmp_path / "run" / "fedalora")
    for r in read_rounds(tmp_path / "run" / "fedalora" / "rounds.jsonl"):
        assert r["payload_up"] == r["payload_down"] == 2 * 1024
        sat_out = [c for c in r["clients"] if c["client"] not in r["sampled"]]
        assert len(sat_out) == 2 and all(c["bytes_up"] == c["bytes_down"] == 0 for c in sat_out)
    assert outcome.results["bytes"]["payload_per_sampled_client_per_round"] == 2048
    expected = expected_round_bytes(cfg, "fedalora")
    assert expected == {
        "clients_per_round": 2, "per_client": 2048, "per_round": 4096, "up_per_round": 2048, "down_per_round": 2048,
    }  # fmt: skip


def test_resume_draws_the_same_clients_and_reads_the_carried_a_from_disk(
    assets: Path, tmp_path: Path, task_identity, monkeypatch
) -> None:
    """Stopped after round 1, resumed by fresh nodes (their memory is gone): rounds 2 and 3 draw the same
    clients as before, and client 0 reads its round-1 adapter from its disk for round 3."""
    spy, out, state_dir = Spy(monkeypatch), tmp_path / "run" / "fedalora", str(tmp_path / "clients")
    cfg = partial_config(assets, tmp_path, "faults.stop_after=1")
    assert _run(cfg, InProcessGrid(4), out, client_state_dir=state_dir).status == "stopped"
    cfg.faults.stop_after = None
    outcome = _run(cfg, InProcessGrid(4), out, resume=True, client_state_dir=state_dir)
    assert outcome.status == "completed", outcome.message
    assert [r["sampled"] for r in read_rounds(out / "rounds.jsonl")] == [[0, 2], [1, 3], [0, 3]]
    carried, trained1 = spy.carried[(0, 3)], spy.trained[(0, 1)]
    assert carried is not None and all(torch.equal(carried[k], trained1[k]) for k in trained1)
    assert sorted(p.name for p in (tmp_path / "clients" / "client-0").iterdir()) == [
        "round-1.safetensors", "round-3.safetensors",
    ]  # fmt: skip


def test_fewer_answers_than_the_minimum_keep_the_shared_tensors(
    assets: Path, tmp_path: Path, task_identity
) -> None:
    """min_per_round=2 and one of the two sampled clients raises in round 1: the round is recorded, not
    aggregated (the shared B stay the initial ones), and the run goes on to aggregate round 2."""
    from asymlora.federated.round_log import load_checkpoint
    from asymlora.federated.server_app import server_roles

    cfg = partial_config(
        assets, tmp_path, "clients.min_per_round=2", "faults.raise_in=['0:1']", "faults.stop_after=1"
    )
    out = tmp_path / "run" / "fedalora"
    assert _run(cfg, InProcessGrid(4), out).status == "stopped"
    (r1,) = read_rounds(out / "rounds.jsonl")
    status = {c["client"]: c["status"] for c in r1["clients"]}
    assert status == {0: "failed", 1: "not_sampled", 2: "not_aggregated", 3: "not_sampled"}
    assert r1["kept_previous"] and r1["accepted"] == [] and r1["weights"] == {}
    assert "fewer than clients.min_per_round=2" in r1["note"]
    saved, meta = load_checkpoint(out)
    _, initial = server_roles(cfg, cfg.strategy("fedalora"), [2] * 4)
    assert saved.keys() == initial.keys() and all(torch.equal(saved[k], initial[k]) for k in initial)
    assert meta["last_trained"] == {"2": 1}  # client 2 trained: its A moved on, round 3 starts from it
    cfg.faults.stop_after = None
    assert _run(cfg, InProcessGrid(4), out, resume=True).status == "completed"
    r2 = read_rounds(out / "rounds.jsonl")[1]
    assert r2["accepted"] == [1, 3] and not r2["kept_previous"]


def test_the_client_keeps_its_last_trained_round_on_disk(tmp_path: Path) -> None:
    from asymlora.federated.client import load_client_state, save_client_state

    for rnd in (1, 3):
        save_client_state(tmp_path, 0, rnd, {"A": torch.full((2,), float(rnd))}, "fedalora")
    assert torch.equal(load_client_state(tmp_path, 0, 1, "fedalora")["A"], torch.ones(2))  # kept: 1 < 3 - 1
    save_client_state(tmp_path, 0, 6, {"A": torch.zeros(2)}, "fedalora")
    assert sorted(p.name for p in (tmp_path / "client-0").iterdir()) == [
        "round-3.safetensors",
        "round-6.safetensors",
    ]
    # round 7 started from round 3 (the server never got round 6's reply): 3 and 6 stay, 3 may be asked again
    save_client_state(tmp_path, 0, 7, {"A": torch.zeros(2)}, "fedalora", started_from=3)
    names = sorted(p.name for p in (tmp_path / "client-0").iterdir())
    assert names == ["round-3.safetensors", "round-6.safetensors", "round-7.safetensors"]
    save_client_state(tmp_path, 0, 8, {"A": torch.zeros(2)}, "fedalora", started_from=7)
    names = sorted(p.name for p in (tmp_path / "client-0").iterdir())
    assert names == ["round-7.safetensors", "round-8.safetensors"]


# --- rounds no client answered ------------------------------------------------------------------------------
def test_rounds_no_client_answered_stop_the_run_and_run_again_on_resume(
    assets: Path, tmp_path: Path, task_identity
) -> None:
    """Both sampled clients raise in rounds 2 and 3 of 4 (clients.max_failed_rounds=2): the server stops
    after round 3, failed, naming the reason, instead of spending round 4 on a run that trained nothing
    since round 1. --resume (fresh nodes, client state on disk) runs rounds 2 and 3 again from the round-1
    tensors, keeps the failed rounds' records aside, and ends with an uninterrupted run's tensors, bit for bit."""
    from asymlora.federated.round_log import RERUN_FILE, RoundLog, load_checkpoint

    faults = "faults.raise_in=['1:2', '3:2', '0:3', '3:3']"  # rounds 2, 3 sample [1, 3], [0, 3]
    cfg = partial_config(assets, tmp_path, faults, "clients.max_failed_rounds=2", "rounds=4")
    out, state_dir = tmp_path / "run" / "fedalora", str(tmp_path / "clients")
    outcome = _run(cfg, InProcessGrid(4), out, client_state_dir=state_dir)
    assert (outcome.status, outcome.rounds_completed) == ("failed", 3)
    assert "rounds 2-3 had no answer from any client" in outcome.message
    assert "injected fault" in outcome.message and "--resume" in outcome.message
    assert [r["round"] for r in read_rounds(out / "rounds.jsonl")] == [1, 2, 3]
    assert not (out / "results.json").exists()

    saved, _ = load_checkpoint(out)
    for _ in range(2):  # a resume killed before its first round drops the failed rounds once, not twice
        RoundLog.open(out, "fedalora", resume=True).start(dict(saved), [2] * 4, say=lambda _: None)
    assert load_checkpoint(out)[1]["round"] == 1
    assert [r["round"] for r in read_rounds(out / RERUN_FILE)] == [2, 3]

    cfg.faults.raise_in = []
    assert _run(cfg, InProcessGrid(4), out, resume=True, client_state_dir=state_dir).status == "completed"
    rounds = read_rounds(out / "rounds.jsonl")
    assert [r["round"] for r in rounds] == [1, 2, 3, 4] and all(r["accepted"] for r in rounds)
    straight = tmp_path / "straight" / "fedalora"
    outcome = _run(cfg, InProcessGrid(4), straight, client_state_dir=str(tmp_path / "straight-clients"))
    assert outcome.status == "completed"
    resumed, uninterrupted = load_checkpoint(out)[0], load_checkpoint(straight)[0]
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


def test_one_round_no_client_answered_is_survived_and_the_limit_is_validated(
    assets: Path, tmp_path: Path
) -> None:
    from asymlora.federated.round_log import no_client_answered, trailing_failed_rounds

    def rnd(*statuses: str) -> dict:
        return {"clients": [{"client": k, "node_id": 100 + k, "status": s} for k, s in enumerate(statuses)]}

    never = {"client": 9, "status": "missing", "reason": "never connected"}  # min_nodes < clients.num
    assert not no_client_answered({"clients": [never, *rnd("not_sampled", "not_sampled")["clients"]]})
    assert no_client_answered({"clients": [never, *rnd("not_sampled", "missing")["clients"]]})

    assert no_client_answered(rnd("failed", "not_sampled", "missing"))
    assert not no_client_answered(rnd("failed", "rejected"))  # a rejected update was sent: not re-run
    assert not no_client_answered(rnd("not_sampled", "not_sampled"))
    assert not no_client_answered(rnd("failed", "not_aggregated"))
    history = [rnd("ok"), rnd("failed"), rnd("ok"), rnd("missing"), rnd("failed", "not_sampled")]
    assert trailing_failed_rounds(history) == 2 and trailing_failed_rounds(history[:3]) == 0
    with pytest.raises(ConfigError, match=re.escape("clients.max_failed_rounds=0 must be >= 1")):
        partial_config(assets, tmp_path, "clients.max_failed_rounds=0")
    assert (
        partial_config(assets, tmp_path, "clients.max_failed_rounds=null").clients.max_failed_rounds is None
    )


class LosingGrid(InProcessGrid):
    """`InProcessGrid` whose train replies of the rounds in ``lose`` never come back (the clients trained
    and saved their adapters, but the server timed out: status ``missing``)."""

    def __init__(self, num: int, lose: set[str]) -> None:
        super().__init__(num)
        self.lose = lose

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        replies = super().send_and_receive(messages, timeout=timeout)
        lost = {m.metadata.message_id for m in messages if m.metadata.group_id in self.lose}
        return [r for r in replies if r.metadata.reply_to_message_id not in lost]


def test_a_rerun_round_finds_the_local_tensors_of_clients_whose_replies_were_lost(
    assets: Path, tmp_path: Path, task_identity
) -> None:
    """Every client trains and saves rounds 2 and 3, but no reply reaches the server (a timeout): the run
    stops after round 3. The resume runs round 2 again from each client's round-1 adapter, which its disk
    must still hold although the client has since saved two later rounds; it ends bit for bit as a run
    whose replies all arrived, and no client starts its local tensors afresh."""
    from asymlora.federated.round_log import load_checkpoint

    cfg = partial_config(assets, tmp_path, "clients.fraction=1.0", "rounds=4")
    out, state_dir = tmp_path / "run" / "fedalora", str(tmp_path / "clients")
    outcome = _run(cfg, LosingGrid(4, {"2", "3"}), out, client_state_dir=state_dir)
    assert (outcome.status, outcome.rounds_completed) == ("failed", 3)
    assert "no reply within timeouts.round" in outcome.message
    assert _run(cfg, InProcessGrid(4), out, resume=True, client_state_dir=state_dir).status == "completed"
    rounds = read_rounds(out / "rounds.jsonl")
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    assert not [
        n for r in rounds for c in r["clients"] for n in c.get("notes", []) if "no local tensors" in n
    ]
    straight = tmp_path / "straight" / "fedalora"
    assert _run(cfg, InProcessGrid(4), straight, client_state_dir=str(tmp_path / "s")).status == "completed"
    resumed, uninterrupted = load_checkpoint(out)[0], load_checkpoint(straight)[0]
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


def test_max_failed_rounds_leaves_the_client_state_identity_alone() -> None:
    """A client file written before clients.max_failed_rounds existed carries the SHA-256 of a config whose
    ``clients`` lacks the key (digest by hand below); the resumed run's clients must accept it, whatever the
    limit (a server-only setting), or every client of a resumed older run fails with "another run"."""
    import hashlib
    import json

    from asymlora.federated.client import IDENTITY_KEYS, state_identity
    from asymlora.federated.config import FedConfig

    cfg = FedConfig()
    d = cfg.to_dict()
    del d["clients"]["max_failed_rounds"]
    older = json.dumps({"strategy": "fedalora", **{k: d[k] for k in IDENTITY_KEYS}}, sort_keys=True)
    assert state_identity(cfg, "fedalora") == hashlib.sha256(older.encode()).hexdigest()
    cfg.clients.max_failed_rounds = None
    assert state_identity(cfg, "fedalora") == hashlib.sha256(older.encode()).hexdigest()


def test_one_round_of_lost_replies_is_survived_without_a_state_dir(
    assets: Path, tmp_path: Path, task_identity, monkeypatch
) -> None:
    """No client state dir (a SuperNode keeps its adapter in its Context only): every client trains round 2
    but no reply arrives; in round 3 each client starts from exactly the adapter it trained in round 1 (the
    last round the server saw it train), kept in memory, not from fresh local tensors."""
    spy = Spy(monkeypatch)
    cfg = partial_config(assets, tmp_path, "clients.fraction=1.0")
    assert _run(cfg, LosingGrid(4, {"2"}), tmp_path / "run" / "fedalora").status == "completed"
    rounds = read_rounds(tmp_path / "run" / "fedalora" / "rounds.jsonl")
    assert [r["accepted"] for r in rounds] == [[0, 1, 2, 3], [], [0, 1, 2, 3]]
    assert not [n for c in rounds[2]["clients"] for n in c.get("notes", []) if "no local tensors" in n]
    for k in range(4):
        carried, trained = spy.carried[(k, 3)], spy.trained[(k, 1)]
        assert carried is not None and all(torch.equal(carried[n], trained[n]) for n in trained)


def test_a_run_stopped_by_failed_rounds_resumes_with_another_limit(tmp_path: Path) -> None:
    """clients.max_failed_rounds may change on --resume (a run it stopped is resumed with a higher limit);
    any other clients key may not."""
    from asymlora.config import ConfigError
    from asymlora.federated.config import load_fed_config
    from asymlora.federated.run import prepare_run_dir

    def cfg(*extra: str):
        return load_fed_config(
            None, ["data.tasks=[bigbench:strategyqa]", "clients.num=1", f"run_dir={tmp_path / 'run'}", *extra]
        )

    prepare_run_dir(cfg(), overwrite=False, resume=False)
    prepare_run_dir(cfg("clients.max_failed_rounds=5"), overwrite=False, resume=True)
    prepare_run_dir(cfg("clients.max_failed_rounds=null"), overwrite=False, resume=True)
    with pytest.raises(ConfigError, match=r"\(clients differ\)"):
        prepare_run_dir(cfg("clients.alpha=0.7"), overwrite=False, resume=True)


def test_a_killed_local_only_baseline_retrains_only_the_clients_it_had_not_finished(
    assets: Path, tmp_path: Path, monkeypatch
) -> None:
    """4 clients, lora_dropout 0.5 (so training draws random numbers): the run is killed while client 1
    trains. The rerun reads client 0 back and trains clients 1 and 2 only; every client's result equals
    that of an uninterrupted run (a client's draws do not depend on the clients before it). Another
    ``rounds`` (which --resume may change) trains client 0 again."""
    from asymlora.federated import run as fed_run
    from asymlora.federated.partition import load_partition

    # one client at a time, in this process (the patched baseline below is not in a pool process)
    cfg = partial_config(assets, tmp_path, "adapter.lora_dropout=0.5", "simulation.num_cpus=1")
    tasks, plan = load_partition(cfg)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # local_only sets the process's threads
    real, trained = fed_run.local_only_baseline, []

    def baseline(c, k, rank, client_tasks, kill_at=None):
        if k == kill_at:
            raise KeyboardInterrupt
        trained.append(k)
        return real(c, k, rank, client_tasks)

    def local(run_dir: Path, kill_at=None, c=cfg) -> dict:
        monkeypatch.setattr(fed_run, "local_only_baseline", lambda *a: baseline(*a, kill_at=kill_at))
        return fed_run.local_only(c, run_dir, tasks, plan, [2] * len(plan), say=lambda _: None)

    straight = local(tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        local(tmp_path / "killed", kill_at=1)
    trained.clear()
    resumed = local(tmp_path / "killed")
    assert trained == [1, 2, 3]

    def timeless(x):  # as results.json holds it, without the timings (at any depth)
        if isinstance(x, dict):
            return {k: timeless(v) for k, v in x.items() if "seconds" not in k}
        return [timeless(v) for v in x] if isinstance(x, list) else x

    def same(a: dict, b: dict) -> bool:
        return timeless(json.loads(json.dumps(a, default=float))) == timeless(
            json.loads(json.dumps(b, default=float))
        )

    for a, b in zip(resumed["clients"], straight["clients"], strict=True):
        ta, tb = (timeless(json.loads(json.dumps(x, default=float))) for x in (a, b))
        assert same(a, b), [(k, ta[k], tb.get(k)) for k in ta if ta[k] != tb.get(k)]
    assert [c["train_loss"] for c in straight["clients"]] == [c["train_loss"] for c in resumed["clients"]]
    # the cell's time counts client 0, trained by the killed process, not only what the rerun trained
    assert resumed["round_seconds"] == pytest.approx(sum(c["seconds"] for c in resumed["clients"]), abs=0.1)
    (tmp_path / "killed" / "local_only" / "results.json").unlink()
    trained.clear()
    local(tmp_path / "killed", c=dataclasses.replace(cfg, rounds=cfg.rounds + 1))
    assert trained == [0, 1, 2, 3]


def test_local_only_clients_trained_two_at_a_time_in_a_pool_equal_those_trained_one_by_one(
    assets: Path, tmp_path: Path, monkeypatch
) -> None:
    """simulation.num_cpus=2: the three clients not saved train in a pool of two spawned processes, one torch
    thread each; each client's result (scores, per-example scores, training loss) is the one this process
    trains alone with one thread, and the clients come back in client order whatever order they finished in.
    Client 2, saved beforehand, is read back, not trained. The cell's time divides each client's by how many
    trained at once."""
    from concurrent.futures import ProcessPoolExecutor

    from asymlora.federated import run as fed_run
    from asymlora.federated.partition import load_partition

    if torch.cuda.is_available():
        pytest.skip("the pool trains on a CPU only (with CUDA the clients train one at a time)")
    one = partial_config(assets, tmp_path, "adapter.lora_dropout=0.5", "simulation.num_cpus=1")
    two = dataclasses.replace(one, simulation=dataclasses.replace(one.simulation, num_cpus=2))
    on_gpu = dataclasses.replace(two, simulation=dataclasses.replace(two.simulation, num_gpus=1.0))
    assert [fed_run._local_workers(c) for c in (one, two, on_gpu)] == [1, 2, 1]
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: True)
        assert fed_run._local_workers(two) == 1
    tasks, plan = load_partition(one)
    threads = torch.get_num_threads()
    try:  # in this process with num_cpus = 1 torch thread, as each pool worker below
        alone = fed_run.local_only(one, tmp_path / "alone", tasks, plan, [2] * len(plan), say=lambda _: None)
    finally:
        torch.set_num_threads(threads)  # the tests after this one
    submitted: list[int] = []

    class Pool(ProcessPoolExecutor):
        def submit(self, fn, /, *args, **kwargs):
            submitted.append(args[2])  # the client
            return super().submit(fn, *args, **kwargs)

    monkeypatch.setattr(fed_run, "ProcessPoolExecutor", Pool)
    saved = tmp_path / "pool" / fed_run.LOCAL_DIR
    saved.mkdir(parents=True)
    (saved / "client-2.json").write_text(
        (tmp_path / "alone" / fed_run.LOCAL_DIR / "client-2.json").read_text()
    )
    said: list[str] = []
    pooled = fed_run.local_only(two, tmp_path / "pool", tasks, plan, [2] * len(plan), say=said.append)
    assert submitted == [0, 1, 3]
    assert [c["client"] for c in pooled["clients"]] == [0, 1, 2, 3]
    assert [c["workers"] for c in pooled["clients"]] == [2, 2, 1, 2]
    for a, b in zip(alone["clients"], pooled["clients"], strict=True):
        same = {k: v for k, v in a.items() if k not in ("seconds", "workers")}
        assert same == {k: v for k, v in b.items() if k not in ("seconds", "workers")}
    assert pooled["clients"][2]["seconds"] == alone["clients"][2]["seconds"]
    assert pooled["personalised"] == alone["personalised"]
    seconds = [c["seconds"] for c in pooled["clients"]]
    assert pooled["round_seconds"] == pytest.approx(
        (seconds[0] + seconds[1] + seconds[3]) / 2 + seconds[2], abs=0.1
    )
    assert sum("saved earlier" in line for line in said) == 1 and len(said) == 4


def test_resume_with_nothing_to_resume_says_so(tmp_path: Path) -> None:
    """resume=true in a run_dir without this strategy's checkpoint (a first run, or a deployment's resume that
    named no strategy and so resumed the config's first one) started at round 1 without a word."""
    from asymlora.federated.round_log import CHECKPOINT_DIR, RoundLog

    said: list[str] = []
    log = RoundLog.open(tmp_path / "fedalora", "fedalora", resume=True)
    log.start({"w": torch.zeros(2)}, [2], say=said.append)
    assert log.next_round == 1
    assert said == [
        f"fedalora: nothing to resume in {tmp_path / 'fedalora' / CHECKPOINT_DIR}; starting at round 1"
    ]
    quiet: list[str] = []
    RoundLog.open(tmp_path / "fresh", "fedalora", resume=False).start(
        {"w": torch.zeros(2)}, [2], say=quiet.append
    )
    assert quiet == []
