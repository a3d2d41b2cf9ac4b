"""Federated config checks before round 1 (docs/federated.md): partial participation's fixes are feasible,
a norm check that can never reject and ``het_local`` without fedalora-het are refused; and
``clients.min_per_round`` counts the accepted updates, not the answers."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tests import test_fed_apps
from tests.test_fed_het_local import _three_clients

from asymlora.config import ConfigError
from asymlora.federated import get_strategy
from asymlora.federated.config import FedConfig, fed_config_from_json, load_fed_config
from asymlora.federated.privacy import PrivacySettings
from asymlora.federated.server_round import _aggregate, make_accountant, round_record
from asymlora.federated.strategies import norm_outliers

assets, task_identity = test_fed_apps.assets, test_fed_apps.task_identity  # the Flower app tests' fixtures


def fed(num: int, *overrides: str) -> FedConfig:
    return load_fed_config(None, ["data.tasks=[bigbench:a]", "clients.partition=iid", f"clients.num={num}",
                                  *overrides])  # fmt: skip


# --- partial participation: every suggested fix loads --------------------------------------------------------
def _fix_overrides(fix: str, cfg: FedConfig) -> list[list[str]]:
    """The override sets one suggested fix stands for (a range: both of its ends)."""
    sets: list[list[str]] = [[]]
    for part in fix.split(" and "):
        if m := re.fullmatch(r"raise (clients\.\w+) to >= ([\d.]+)", part):
            sets = [[*s, f"{m[1]}={m[2]}"] for s in sets]
        elif m := re.fullmatch(r"set (clients\.\w+) to a value in \[(\d+), (\d+)\]", part):
            sets = [[*s, f"{m[1]}={v}"] for s in sets for v in (m[2], m[3])]
        elif m := re.fullmatch(r"set (clients\.\w+=\d+)", part):
            sets = [[*s, m[1]] for s in sets]
        else:
            raise AssertionError(f"unparsed fix {part!r}")
    return sets


# (clients.num, clients.fraction, clients.per_round, clients.min_per_round, the fixes expected)
CASES = [
    (
        8,
        0.25,
        None,
        3,
        ["raise clients.fraction to >= 0.375", "set clients.min_per_round to a value in [1, 2]"],
    ),
    (
        3,
        0.5,
        None,
        2,
        ["raise clients.fraction to >= 0.667", "set clients.min_per_round to a value in [1, 1]"],
    ),
    (
        7,
        0.3,
        None,
        3,
        ["raise clients.fraction to >= 0.429", "set clients.min_per_round to a value in [1, 2]"],
    ),
    (
        10,
        0.7,
        None,
        9,
        ["raise clients.fraction to >= 0.9", "set clients.min_per_round to a value in [1, 7]"],
    ),
    (3, 0.2, None, 1, ["raise clients.fraction to >= 0.334"]),  # ⌊0.333 × 3⌋ = 0: not enough
    (4, 0.2, None, 0, ["set clients.min_per_round=1 and raise clients.fraction to >= 0.25"]),
    (4, 0.2, None, 7, ["set clients.min_per_round=1 and raise clients.fraction to >= 0.25"]),
    (5, 1.0, None, 6, ["set clients.min_per_round to a value in [1, 5]"]),  # not fraction 1.2
    (5, 1.0, 3, 4, ["raise clients.per_round to >= 4", "set clients.min_per_round to a value in [1, 3]"]),
    (5, 1.0, 2, 9, ["set clients.min_per_round to a value in [1, 2]"]),  # not per_round 9 > 5 clients
    (5, 1.0, 2, 0, ["set clients.min_per_round to a value in [1, 2]"]),
]


@pytest.mark.parametrize(("num", "fraction", "per_round", "minimum", "fixes"), CASES)
def test_every_suggested_participation_fix_is_feasible(num, fraction, per_round, minimum, fixes) -> None:
    given = [f"clients.fraction={fraction}", f"clients.min_per_round={minimum}"]
    given += [] if per_round is None else [f"clients.per_round={per_round}"]
    with pytest.raises(ConfigError) as info:
        fed(num, *given)
    message = str(info.value)
    assert message.rsplit("; fix: ", 1)[1].split("; or ") == fixes, message
    for fix in fixes:
        for extra in _fix_overrides(fix, fed(num)):
            cfg = fed(num, *given, *extra)  # loads: the fix is feasible
            assert 1 <= cfg.clients.min_per_round <= cfg.clients_per_round
    for fix in fixes:  # and the suggested fraction is the smallest with three decimals
        if m := re.search(r"clients\.fraction to >= ([\d.]+)", fix):
            lower = round(float(m[1]) - 0.001, 3)
            target = int(re.search(r"min_per_round=(\d+)", fix)[1]) if "min_per_round=" in fix else minimum
            assert int(lower * num + 1e-9) < target


def test_the_sampled_count_is_named() -> None:
    with pytest.raises(ConfigError, match=re.escape(
        "clients.fraction=0.2 samples ⌊0.2 × clients.num=4⌋ = 0 client(s) per round, so no client would ever "
        "train (clients.min_per_round=7 (it cannot exceed clients.num=4)); fix: "
    )):  # fmt: skip
        fed(4, "clients.fraction=0.2", "clients.min_per_round=7")


# --- a norm check that cannot reject, het_local that changes nothing -------------------------------------------
def test_the_norm_check_needs_peers_it_can_reject_against() -> None:
    # by hand: with two norms a <= b the median is (a + b) / 2, and b > f (a + b) / 2 iff b > a f / (2 - f)
    assert norm_outliers({0: 1.0, 1: 1e9}, 2.0) == []  # f >= 2 never rejects one of two
    assert [r.client for r in norm_outliers({0: 1.0, 1: 3.0001}, 1.5)] == [1]  # f = 1.5: above 3 ×
    assert norm_outliers({0: 1.0, 1: 2.9999}, 1.5) == [] and norm_outliers({0: 5.0}, 1.0001) == []
    for num, extra, m in (
        (1, [], 1),
        (2, [], 2),
        (4, ["clients.per_round=2"], 2),
        (4, ["clients.fraction=0.25"], 1),
    ):
        with pytest.raises(
            ConfigError,
            match=rf"reject.norm_factor=10 with {m} client\(s\) per round can never "
            r"reject an update .*; set reject.norm_factor=null, or sample >= 3 clients per round",
        ):
            fed(num, *extra, "reject.norm_factor=10")  # fmt: skip
    with pytest.raises(ConfigError, match="or use a factor below 2"):
        fed(2, "reject.norm_factor=2")
    assert fed(2, "reject.norm_factor=1.5").reject.norm_factor == 1.5  # two clients, f < 2: it can bite
    assert fed(3, "reject.norm_factor=10").reject.norm_factor == 10
    assert fed(1).reject.norm_factor is None  # off: no constraint


def test_one_rank_for_every_client_must_be_adapter_r_under_a_homogeneous_strategy() -> None:
    """clients.ranks=[4, 4] with adapter.r=2 passed the config and failed on the server, once the simulation
    had started ("node ... asks for rank 4, but strategy 'fedalora' needs adapter.r=2")."""
    with pytest.raises(ConfigError, match=re.escape(
        "strategies ['fedalora'] train every client at adapter.r=2, but clients.ranks=[4, 4]; set adapter.r=4 "
        "or drop clients.ranks"
    )):  # fmt: skip
        fed(2, "adapter.r=2", "clients.ranks=[4, 4]")
    assert fed(2, "adapter.r=4", "clients.ranks=[4, 4]").clients.ranks == [4, 4]
    assert fed(2, "adapter.r=2", "clients.ranks=[4, 4]", "strategies=[zeropad]").client_rank(1) == 4


@pytest.mark.parametrize(
    ("strategies", "option", "default", "strategy"),
    [
        ("[fedit, fedalora]", "het_local=persist", "fresh", "fedalora-het"),
        ("[fedit, ffa]", "local_a=reset", "persist", "fedalora"),
        ("[fedalora]", "het_upload=factors", "auto", "fedalora-het"),
    ],
)
def test_a_strategys_option_needs_that_strategy(
    strategies: str, option: str, default: str, strategy: str
) -> None:
    """het_local, local_a and het_upload set without their strategy ran and changed nothing."""
    key = option.split("=")[0]
    names = [s.strip() for s in strategies.strip("[]").split(",")]
    with pytest.raises(ConfigError, match=re.escape(
        f"{option} applies to {strategy} only, but strategies={names} has none: it would change nothing; drop "
        f"{key} (or set {key}={default}), or add {strategy}"
    )):  # fmt: skip
        fed(2, f"strategies={strategies}", option)
    assert getattr(fed(2, f"strategies=[fedit, {strategy}]", option), key) == option.split("=")[1]
    assert getattr(fed(2, "strategies=[fedit]", f"{key}={default}"), key) == default


def test_secagg_sets_het_upload_for_any_strategies() -> None:
    """SecAgg+ turns het_upload into product for any strategies, and the clients validate that config again."""
    cfg = fed(2, "strategies=[fedalora]", "secagg.enabled=true")
    assert cfg.het_upload == "product" and fed_config_from_json(cfg.to_json()) == cfg


# --- values that used to pass and fail only once Flower ran --------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "message"),
    [
        # every client trained all rounds, then each failed to score (exit 1)
        ("eval.max_examples=0", "eval.max_examples=0 must be >= 1, or null for the whole test split"),
        ("eval.max_examples=-3", "eval.max_examples=-3 must be >= 1"),
        ("eval.max_new_tokens=0", "eval.max_new_tokens=0 must be >= 1"),
        # round 1's sample (NumPy's SeedSequence([seed, 1])) crashed the server after the run dir was written
        ("seed=-1", "seed=-1 must be an integer >= 0"),
        # the IID split (NumPy's default_rng) said only "expected non-negative integer"
        ("data.seed=-1", "data.seed=-1 must be an integer >= 0: it seeds the clients.partition=iid split"),
        # Flower refused every message with a NaN time-to-live: the server failed in round 1
        ("timeouts.round=nan", "timeouts.round=nan must be a positive number of seconds"),
        ("timeouts.evaluate=0", "timeouts.evaluate=0.0 must be a positive number of seconds"),
        # Ray refused to start and the simulation hung
        (
            "simulation.object_store_mb=0",
            "simulation.object_store_mb=0 is below Ray's minimum object store of 75 MB; set "
            "simulation.object_store_mb >= 75 (default 512)",
        ),
    ],
)
def test_values_that_fail_inside_flower_are_refused_before_it_starts(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        fed(2, "clients.fraction=0.5", override)


def test_the_object_store_minimum_is_rays() -> None:
    from ray._private.ray_constants import OBJECT_STORE_MINIMUM_MEMORY_BYTES

    assert (
        OBJECT_STORE_MINIMUM_MEMORY_BYTES == 75 * 2**20
    )  # what run.simulate passes: object_store_mb * 2**20
    assert fed(2, "simulation.object_store_mb=75").simulation.object_store_mb == 75
    with pytest.raises(ConfigError, match="simulation.object_store_mb=74 is below"):
        fed(2, "simulation.object_store_mb=74")
    assert fed(2, "seed=0", "eval.max_examples=1", "eval.max_new_tokens=1", "timeouts.round=inf").seed == 0


# --- clients.min_per_round counts the accepted updates -----------------------------------------------------------
def _round(min_per_round: int, dp: PrivacySettings | None = None, nan_client: int | None = None):
    """fedalora, three clients (tests/test_fed_het_local.py: ‖Δ‖ = 1, 2, 200, n = 1, 3, 4), reject.norm_factor=10
    (rejects client 2 unless client 1 sends NaN: the median of 1 and 200 is 100.5): the new B, the aggregation,
    the DP record, the client records and the accountant."""
    roles, server, updates = _three_clients()
    if nan_client is not None:
        updates[nan_client] = ({"layer.B": torch.full((2, 2), float("nan"))}, 1)
    cfg = load_fed_config(None, ["data.tasks=[x:a, x:b, x:c]", "clients.num=3", "reject.norm_factor=10",
                                 f"clients.min_per_round={min_per_round}"])  # fmt: skip
    cfg.dp = dp or cfg.dp
    federation = SimpleNamespace(cfg=cfg, strategy=get_strategy("fedalora"), roles=roles)
    records = {k: {"client": k, "status": "ok", "train_loss": 0.5, "num_examples": n}
               for k, (_, n) in enumerate(updates)}  # fmt: skip
    accountant = make_accountant(cfg, [])
    state, res, dp_record = _aggregate(federation, server, updates, [0, 1, 2], records, accountant, 1)  # type: ignore[arg-type]
    return server, state, res, dp_record, records, accountant


def test_a_round_with_fewer_accepted_updates_than_the_minimum_keeps_the_shared_tensors() -> None:
    server, state, res, _, records, _ = _round(min_per_round=3)  # 3 answered, 2 accepted
    assert res.accepted == [] and res.kept_previous and res.weights == {}
    assert torch.equal(state["layer.B"], server["layer.B"])
    assert [r.client for r in res.rejected] == [2] and records[2]["status"] == "rejected"
    for k in (0, 1):
        assert records[k]["status"] == "not_aggregated"
        assert records[k]["reason"] == "2 update(s) accepted, fewer than clients.min_per_round=3"
    assert round_record(1, "fedalora", records, res, "", 0.1)["accepted"] == []
    _, state, res, _, records, _ = _round(min_per_round=2)  # 2 accepted: averaged with p = 1/4, 3/4
    assert res.accepted == [0, 1] and records[0]["status"] == "ok"
    torch.testing.assert_close(state["layer.B"], torch.tensor([[1.25, 2.5], [1, 1]]), rtol=0, atol=0)


def test_under_dp_a_withheld_round_releases_nothing() -> None:
    dp = PrivacySettings(clipping="server", noise_multiplier=1.0, clipping_norm=1000.0, noise_seed=0)
    server, state, res, dp_record, records, accountant = _round(
        3, dp, nan_client=1
    )  # NaN refused: 2 accepted
    assert res.accepted == [] and torch.equal(state["layer.B"], server["layer.B"])  # no noise added
    assert dp_record is not None and not dp_record["released"] and accountant is not None
    assert accountant.releases == 0 and records[0]["status"] == "not_aggregated"
    _, state, res, dp_record, _, accountant = _round(1, dp, nan_client=1)
    assert res.accepted == [0, 2] and dp_record["released"] and accountant.releases == 1


@pytest.mark.fed
def test_the_round_record_says_why_a_round_with_a_rejected_update_was_not_aggregated(
    assets: Path, tmp_path: Path, task_identity
) -> None:
    """Through the server (tests/test_fed_partial.py's 4 clients, 2 sampled, round 1: [0, 2]): client 0 sends
    NaN, client 2's update is accepted, clients.min_per_round=2: both answered, one update accepted — the round
    is recorded, not aggregated, and the shared tensors stay the initial ones."""
    from tests.test_fed_apps import InProcessGrid, read_rounds
    from tests.test_fed_partial import _run, partial_config

    from asymlora.federated.round_log import load_checkpoint
    from asymlora.federated.server_app import server_roles

    cfg = partial_config(
        assets, tmp_path, "clients.min_per_round=2", "faults.nan_in=['0:1']", "faults.stop_after=1"
    )
    out = tmp_path / "run" / "fedalora"
    assert _run(cfg, InProcessGrid(4), out).status == "stopped"
    (r1,) = read_rounds(out / "rounds.jsonl")
    status = {c["client"]: c["status"] for c in r1["clients"]}
    assert status == {0: "rejected", 1: "not_sampled", 2: "not_aggregated", 3: "not_sampled"}
    assert r1["kept_previous"] and r1["accepted"] == [] and r1["weights"] == {}
    assert r1["note"] == (
        "round 1: 1 update(s) accepted, 1 rejected: fewer than clients.min_per_round=2; not aggregated, the "
        "shared tensors of round 0 are kept"
    )
    saved, _ = load_checkpoint(out)
    _, initial = server_roles(cfg, cfg.strategy("fedalora"), [2] * 4)
    assert saved.keys() == initial.keys() and all(torch.equal(saved[k], initial[k]) for k in initial)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "model.name=MISSING",
            "model.name='MISSING' cannot be read: unknown architecture 'MISSING': choose one of",
        ),
        ("model.name=EMPTY", "model.name='EMPTY' cannot be read: "),
        (
            "adapter.target_modules=[x_proj]",
            "target_modules entries ['x_proj'] match no module of LlamaForCausalLM",
        ),
    ],
)
def test_a_model_that_cannot_be_adapted_fails_before_the_run_directory(
    assets: Path, tmp_path: Path, monkeypatch, capsys, override: str, message: str
) -> None:
    """These failed on the server once the simulation had started: exit 1 and a run directory left behind that
    only --overwrite clears. Now: exit 2 with one line naming the value, nothing written, no simulation."""
    from asymlora.federated import run as fed_run

    def started(*args, **kwargs):
        raise AssertionError("the simulation started")

    monkeypatch.setattr(fed_run, "simulate", started)
    (tmp_path / "empty").mkdir()
    override = override.replace("MISSING", str(tmp_path / "nope")).replace("EMPTY", str(tmp_path / "empty"))
    message = message.replace("MISSING", str(tmp_path / "nope")).replace("EMPTY", str(tmp_path / "empty"))
    path = test_fed_apps.write_config(tmp_path / "fed.yaml", assets, tmp_path / "run")
    assert test_fed_apps.fed(path, override) == fed_run.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("asymlora fed: error: ") and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


@pytest.mark.parametrize("under", ["", "sub"])
def test_a_run_dir_that_is_a_file_is_named(assets: Path, tmp_path: Path, capsys, under: str) -> None:
    """run_dir on a file (or under one) said only "[Errno 20] Not a directory: '...'"."""
    (tmp_path / "afile").write_text("x")
    run_dir = tmp_path / "afile" / under if under else tmp_path / "afile"
    path = test_fed_apps.write_config(tmp_path / "fed.yaml", assets, run_dir)
    assert test_fed_apps.fed(path) == 2
    err = capsys.readouterr().err
    assert err == (
        f"asymlora fed: error: run_dir={run_dir}: {tmp_path / 'afile'} is a file, not a directory; choose another "
        "run_dir=...\n"
    )
    assert (tmp_path / "afile").read_text() == "x"


def test_resuming_with_fewer_rounds_than_completed_is_refused(
    assets: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """A run stopped after round 2 of 3, resumed with rounds=1, ran no round, scored the round-2 model, exited 0
    and rewrote config.yaml with rounds=1. Now: exit 2, config.yaml untouched, no simulation; a resume that keeps
    the completed rounds (or that runs a round no client answered again) passes."""
    import torch

    from asymlora.federated import run as fed_run
    from asymlora.federated.round_log import save_checkpoint

    started: list[int] = []

    class Started(Exception):
        pass

    def simulate(cfg, runs, say=print):
        started.append(cfg.rounds)
        raise Started

    monkeypatch.setattr(fed_run, "simulate", simulate)
    path = test_fed_apps.write_config(tmp_path / "fed.yaml", assets, tmp_path / "run", rounds=3)
    cfg = load_fed_config(path)
    fed_run.prepare_run_dir(cfg, overwrite=False, resume=False)
    ok = {"clients": [{"client": 0, "status": "accepted", "node_id": 1}]}
    failed = {"clients": [{"client": 0, "status": "failed", "node_id": 1}]}
    out = tmp_path / "run" / "fedalora"
    save_checkpoint(out, {"w": torch.zeros(1)}, {"round": 2, "strategy": "fedalora", "history": [ok, ok]})
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert test_fed_apps.fed(path, "rounds=1", resume=True) == 2
    assert capsys.readouterr().err == (
        f"asymlora fed: error: rounds=1 is below the 2 rounds {out} has already completed; --resume with "
        "rounds >= 2, or start over with --overwrite\n"
    )
    assert (tmp_path / "run" / "config.yaml").read_text() == saved and not started
    with pytest.raises(Started):  # past the check
        test_fed_apps.fed(path, "rounds=2", resume=True)
    save_checkpoint(out, {"w": torch.zeros(1)}, {"round": 2, "strategy": "fedalora", "history": [ok, failed]})
    with pytest.raises(Started):  # round 2 runs again: 1 round kept
        test_fed_apps.fed(path, "rounds=1", resume=True)
    assert started == [2, 1]


def test_a_strategy_no_client_scored_says_why() -> None:
    """A client state directory of another run fails every client's training and evaluation (a recorded
    failure): the strategy's FAILED line now gives the clients' reasons, not only "no client returned
    evaluation scores" (they were in results.json alone)."""
    from asymlora.federated.server_app import ServerOutcome, _finish

    theirs = (
        "state-dir /s: round-1.safetensors of client {} belongs to another run (...); give this node an empty"
    )
    failures = [{"client": k, "reason": theirs.format(k)} for k in (1, 0)] + [
        {"client": 2, "reason": "no reply"}
    ]
    fed = SimpleNamespace(strategy=SimpleNamespace(name="fedalora"))
    outcome = ServerOutcome()
    _finish(outcome, fed, {"eval_failures": failures}, 0)  # type: ignore[arg-type]
    assert outcome.status == "failed"
    assert outcome.message == (
        f"fedalora: no client returned evaluation scores (no reply; {theirs.format(0)}; {theirs.format(1)})"
    )
    _finish(outcome := ServerOutcome(), fed, {"eval_failures": []}, 0)  # type: ignore[arg-type]
    assert outcome.message == "fedalora: no client returned evaluation scores"


def test_the_app_command_checks_a_config_it_can_read_before_writing(tmp_path: Path, capsys) -> None:
    from asymlora.federated.__main__ import main

    config = Path(__file__).resolve().parents[1] / "configs" / "fed_bigbench_homo.yaml"
    app = tmp_path / "app"
    for overrides, message in (
        ("clients=3", "clients is a section (keys: num, "),
        ("rounds=2 het_local=persist", "het_local=persist applies to fedalora-het only"),
    ):
        assert main(["app", str(app), "--config", str(config), "--overrides", overrides]) == 2
        err = capsys.readouterr().err
        assert err.startswith("python -m asymlora.federated app: error: ") and message in err
        assert "Traceback" not in err and not app.exists()
    assert main(["app", str(app), "--config", str(config), "--strategy", "fedavg"]) == 2
    assert "unknown federated strategy 'fedavg'" in capsys.readouterr().err and not app.exists()
    assert main(["app", str(app), "--config", str(config), "--overrides", "rounds=2"]) == 0
    assert (app / "pyproject.toml").is_file()
    elsewhere = str(tmp_path / "on_the_superlink_only.yaml")  # not on this machine: written unchecked
    assert main(["app", str(tmp_path / "app2"), "--config", elsewhere, "--overrides", "clients=3"]) == 0


@pytest.mark.parametrize("command", [[], ["app"], ["status"], ["check-tls"]])
def test_the_federated_help_is_plain_text_with_a_description_per_command(command: list[str], capsys) -> None:
    from asymlora.federated.__main__ import main

    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    description = out.split("\n\n")[1]  # argparse: usage, a blank line, the description
    assert "``" not in out and not description.startswith(("positional arguments", "options"))
    assert len(description.split()) >= 8, description


def test_status_when_flwr_ls_fails_is_an_error_line_and_exit_2(tmp_path, monkeypatch, capsys) -> None:
    import asymlora.federated.__main__ as fed_main

    flwr = tmp_path / "flwr"  # stands in for flwr: prints what `flwr ls` prints for an unknown connection
    reply = {
        "success": False,
        "error-message": "\\nSuperLink connection 'nosuch' not found in the Flower configuration file.",
    }
    (tmp_path / "reply.json").write_text(json.dumps(reply))
    flwr.write_text(f"#!/bin/sh\ncat {tmp_path / 'reply.json'}\n")
    flwr.chmod(0o755)
    monkeypatch.setattr(fed_main.shutil, "which", lambda name: str(flwr))
    assert fed_main.main(["status", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert (
        "status: error:" in err
        and "SuperLink connection 'nosuch' not found" in err
        and "Traceback" not in err
    )


# --- one task per client from a file with a 'task' column ('jsonl:FILE#*') ------------------------------------
def test_a_spec_that_expands_to_one_task_per_client(tmp_path: Path) -> None:
    """``clients.partition: task`` with ``jsonl:FILE#*`` (one task per value of its ``task`` column, as the data
    docs say): the config counted the one spec and refused every clients.num (1 said "expands to 2 task(s)",
    2 said "data.tasks has 1 task(s)"), and a client indexed data.tasks by its number (client 1: IndexError).
    Now each client gets its task of the expanded list, the one the server's partition gives it."""
    from asymlora.federated.partition import client_tasks, load_client_tasks, load_partition

    rows = [{"input": str(i), "output": str(i + 1), "task": "add"} for i in range(10)]
    rows += [
        {"input": f"is {i} even", "options": ["yes", "no"], "target": "no", "task": "even"} for i in range(10)
    ]
    path = tmp_path / "my data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = f"data.tasks=[jsonl:{path}#*]"
    cfg = load_fed_config(None, [spec, "clients.num=2", "data.metric={add: rougeL}"])
    tasks, plan = load_partition(cfg)
    for k, name in enumerate(["add", "even"]):
        mine = load_client_tasks(cfg, k)
        assert [t.name for t in mine] == [name] and mine == client_tasks(tasks, plan[k])
    assert load_client_tasks(cfg, 0)[0].metrics[0] == "rougeL"  # data.metric keyed by an expanded task's name
    cfg = load_fed_config(None, [spec, "clients.num=3"])  # too many clients: refused once the tasks are read
    with pytest.raises(
        ValueError,
        match=re.escape("expands to 2 task(s) ['add', 'even'] for clients.num=3; set clients.num=2"),
    ):
        load_partition(cfg)
