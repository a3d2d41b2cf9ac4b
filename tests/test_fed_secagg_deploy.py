"""SecAgg+ in a real deployment on 127.0.0.1: a SuperLink, two SuperNodes (each message runs in a fresh
ClientApp process, so Flower's ``secaggplus_mod`` keeps its keys and shares in the node's ``context.state``
between the four stages), one round of fedalora submitted with ``flwr run``. Ports 19700-19799 only."""

from __future__ import annotations

import os

os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

import json
import subprocess
from pathlib import Path

import pytest
from tests import fed_deploy as fd
from tests import test_fed_apps as fed_apps

from asymlora.federated.secagg_server import STAGES

pytestmark = [pytest.mark.fed, pytest.mark.slow]
assets = fed_apps.assets
read_rounds, write_config = fed_apps.read_rounds, fed_apps.write_config


def test_secagg_deployment_superlink_and_two_supernodes(assets: Path, tmp_path: Path) -> None:
    from asymlora.federated.__main__ import write_app

    env = fd.flower_env(tmp_path / "flwr_home")
    port, p1, p2 = fd.free_port(19700, 19720), fd.free_port(19740, 19770), fd.free_port(19770, 19800)
    fd.write_connection(env, "local", port)
    cfg = write_config(
        tmp_path / "fed.yaml",
        assets,
        tmp_path / "run",
        rounds=1,
        secagg={"enabled": True, "max_weight": 100.0},
    )
    app = write_app(tmp_path / "app", str(cfg), run_dir=str(tmp_path / "run"))
    procs: list[subprocess.Popen] = []
    try:
        fd.start_local_federation(env, tmp_path, port, (p1, p2), procs)
        sub = fd.flwr(env, "run", str(app), "local", "--format", "json")
        assert sub.returncode == 0 and '"run-id"' in sub.stdout, sub.stdout + sub.stderr
        status = fd.wait_finished(env, "local", json.loads(sub.stdout)["run-id"], timeout=600)
        assert status["status"] == "finished:completed", status
    finally:
        fd.stop(procs)
    (r1,) = read_rounds(tmp_path / "run" / "fedalora" / "rounds.jsonl")
    assert r1["accepted"] == [0, 1] and r1["secagg"]["completed"] and r1["secagg"]["shares"] == 2
    assert [s["stage"] for s in r1["secagg"]["stages"]] == list(STAGES)
    for c in r1["clients"]:  # fedalora: B of q_proj and o_proj (32 × 2) in 2 layers = 256 values
        assert c["status"] == "ok" and c["payload_up"] == 8 * (256 + 1) and c["payload_down"] == 4 * 256
    res = json.loads((tmp_path / "run" / "fedalora" / "results.json").read_text())
    assert len(res["clients"]) == 2 and res["global"] is not None
