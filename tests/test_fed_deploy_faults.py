"""A deployment that survives faults: a SuperLink and two SuperNodes on 127.0.0.1 (real processes), one
SuperNode killed in the middle of a round and restarted, the ServerApp killed between rounds and the run
resumed (docs/deployment.md, "Faults")."""

from __future__ import annotations

import os

os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import contextlib
import hashlib
import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tests import fed_deploy as fd
from tests.test_fed_apps import assets, read_rounds, write_config  # noqa: F401  (assets: a fixture)

pytestmark = [pytest.mark.fed, pytest.mark.slow]

PORTS = (19500, 19700)  # this file's port range
ROUND_TIMEOUT = 300.0  # s, generous for a loaded machine; Flower reports a killed node after ≤ 60 s


class Federation:
    """A SuperLink and ``n`` SuperNodes (node k: partition-id k, its own state dir), started and torn
    down by their process ids; a SuperNode can be killed (SIGKILL) and started again."""

    def __init__(self, root: Path, n: int) -> None:
        self.root, self.n = root, n
        self.env = fd.flower_env(root / "flwr_home")
        self.port = fd.free_port(*PORTS)
        fd.write_connection(self.env, "local", self.port)
        (root / "db").mkdir()
        self.link = fd.start(
            fd.superlink_cmd(self.port, root / "db" / "state.db", tls=None), root / "superlink.log", self.env
        )
        self.nodes: dict[int, subprocess.Popen] = {}
        self.starts = dict.fromkeys(range(n), 0)
        for k in range(n):
            self.start_node(k)
        fd.wait_listening(self.env, "local")

    def state_dir(self, k: int) -> Path:
        return self.root / f"node{k}"

    def start_node(self, k: int) -> None:
        port = fd.free_port(self.port + 1 + 10 * k + self.starts[k], PORTS[1])
        cfg = f'partition-id={k} num-partitions={self.n} state-dir="{self.state_dir(k)}"'
        log = self.root / f"supernode{k}.{self.starts[k]}.log"
        self.nodes[k] = fd.start(fd.supernode_cmd(self.port, port, cfg, ca=None), log, self.env)
        self.starts[k] += 1

    def kill_node(self, k: int) -> None:
        """SIGKILL node k's process group (the SuperNode and the ClientApp it runs)."""
        os.killpg(self.nodes[k].pid, signal.SIGKILL)
        self.nodes[k].wait(timeout=10)

    def submit(self, app: Path, *run_config: str) -> str:
        extra = ["--run-config", " ".join(run_config)] if run_config else []
        sub = fd.flwr(self.env, "run", str(app), "local", "--format", "json", *extra)
        assert sub.returncode == 0 and '"run-id"' in sub.stdout, sub.stdout + sub.stderr
        return str(json.loads(sub.stdout)["run-id"])

    def wait(self, run_id: str, timeout: float = 900) -> dict:
        return fd.wait_finished(self.env, "local", run_id, timeout=timeout)

    def serverapps(self) -> list[int]:
        """PIDs of the live flwr-serverapp processes under this SuperLink (its SuperExec's children)."""
        return [p for p in _descendants(self.link.pid) if b"flwr-serverapp" in _cmdline(p)]

    def close(self) -> None:
        for pid in self.serverapps():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        fd.stop([self.link, *self.nodes.values()])


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _started(pid: int) -> int:
    """A process's start time (clock ticks after boot, /proc/PID/stat field 22)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])


def _descendants(root: int) -> list[int]:
    """Every live process below ``root`` (from /proc; zombies have an empty cmdline and are skipped)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    out, frontier = [], {root}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier}
        out += [p for p in frontier if _cmdline(p)]
    return out


def wait_rounds(path: Path, n: int, timeout: float = 300) -> list[dict]:
    """Poll ``rounds.jsonl`` (every 20 ms) until it holds ``n`` rounds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and len(rows := read_rounds(path)) >= n:
            return rows
        time.sleep(0.02)
    raise AssertionError(f"{path} did not reach {n} rounds within {timeout} s")


def sha256_of(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors in name order: name bytes, then the raw row-major bytes (numpy's view)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> Iterator[Federation]:
    fed = Federation(tmp_path_factory.mktemp("fed_faults"), 2)
    try:
        yield fed
    finally:
        fed.close()


def _config(model_assets: Path, root: Path, name: str, rounds: int) -> tuple[Path, Path]:
    """(app dir, run dir) of a 2-client fedalora run over the tiny assets."""
    from asymlora.federated.__main__ import write_app

    run = root / f"{name}_run"
    timeouts = {"wait_nodes": 120, "round": ROUND_TIMEOUT, "evaluate": ROUND_TIMEOUT}
    cfg = write_config(root / f"{name}.yaml", model_assets, run, rounds=rounds, timeouts=timeouts)
    return write_app(root / f"{name}_app", str(cfg), run_dir=str(run)), run / "fedalora"


def test_killed_supernode_is_recorded_and_rejoins_with_its_local_a(
    federation: Federation,
    assets: Path,  # noqa: F811
) -> None:
    """Node 1 is killed (SIGKILL) as round 2 starts and started again at once: round 2 completes with
    client 0 and records client 1's failure with Flower's reason; in round 3 client 1 is back (a new node
    id) and its A at the start of the round is bit for bit the A its killed node had persisted."""
    app, out = _config(assets, federation.root, "kill", rounds=3)
    run_id = federation.submit(app)
    wait_rounds(out / "rounds.jsonl", 1)
    federation.kill_node(1)
    files = sorted(federation.state_dir(1).glob("client-1/round-*.safetensors"))
    persisted = load_file(str(files[-1]))
    with safe_open(str(files[-1]), framework="pt") as fh:
        assert fh.metadata()["round"] == "1"  # killed before it could finish round 2
    federation.start_node(1)
    assert federation.wait(run_id)["status"] == "finished:completed"

    r1, r2, r3 = read_rounds(out / "rounds.jsonl")
    assert r2["accepted"] == [0] and [f["client"] for f in r2["failed"]] == [1]
    assert r2["failed"][0]["status"] == "failed"
    assert "Node Unavailable" in r2["failed"][0]["reason"]  # what the SuperLink says of a node gone silent
    assert r2["seconds"] < ROUND_TIMEOUT
    assert r3["accepted"] == [0, 1]
    c1 = r3["clients"][1]
    assert c1["node_id"] != r1["clients"][1]["node_id"]  # the restarted SuperNode is a new node
    local_a = {k: v for k, v in persisted.items() if ".asymlora_A." in k}
    assert len(local_a) == 4 and c1["local_sha256_start"] == sha256_of(local_a)
    assert c1["a_drift_start"] == r1["clients"][1]["a_drift_end"] > 0  # not a fresh A
    assert "notes" not in c1
    res = json.loads((out / "results.json").read_text())
    assert [c["client"] for c in res["clients"]] == [0, 1]


def test_killed_serverapp_resumes_bit_for_bit(federation: Federation, assets: Path) -> None:  # noqa: F811
    """The ServerApp is killed (SIGKILL) once round 1 is recorded; the run is stopped and submitted again
    with ``resume=true``: it continues after round 1, and its final shared tensors equal those of an
    uninterrupted run of the same config, bit for bit."""
    app, out = _config(assets, federation.root, "resumed", rounds=2)
    run_id = federation.submit(app)
    wait_rounds(out / "rounds.jsonl", 1)
    os.kill(max(federation.serverapps(), key=_started), signal.SIGKILL)  # the newest: this run's
    assert not (out / "results.json").exists()
    assert json.loads((out / "checkpoint" / "state.json").read_text())["round"] == 1
    fd.flwr(federation.env, "stop", run_id, "local")
    assert federation.wait(federation.submit(app, "resume=true"))["status"] == "finished:completed"

    ref_app, ref = _config(assets, federation.root, "reference", rounds=2)
    assert federation.wait(federation.submit(ref_app))["status"] == "finished:completed"
    resumed, uninterrupted = (
        load_file(str(d / "checkpoint" / "server_state.safetensors")) for d in (out, ref)
    )
    assert resumed.keys() == uninterrupted.keys() and len(resumed) == 4
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
    assert all(resumed[k].view(torch.int32).equal(uninterrupted[k].view(torch.int32)) for k in resumed)
    rounds, ref_rounds = read_rounds(out / "rounds.jsonl"), read_rounds(ref / "rounds.jsonl")
    assert [r["round"] for r in rounds] == [1, 2]
    assert [r["train_loss"] for r in rounds] == [r["train_loss"] for r in ref_rounds]


def test_a_state_dir_of_another_run_is_refused(tmp_path: Path) -> None:
    """A client's state dir written under another config (here: another seed) is refused with an error
    that names the file; a resume that only changes rounds, timeouts or faults is the same run."""
    from asymlora.federated.client import check_client_state, load_client_state, state_identity
    from asymlora.federated.config import FedConfig

    cfg = FedConfig()
    mine = state_identity(cfg, "fedalora")
    other = state_identity(FedConfig(seed=1), "fedalora")
    same = FedConfig(rounds=9)
    same.timeouts.round = 5.0
    same.faults.stop_after = 2
    assert state_identity(same, "fedalora") == mine != state_identity(cfg, "fedsa")
    assert len(mine) == 64 and set(mine) <= set("0123456789abcdef")
    path = tmp_path / "client-3" / "round-1.safetensors"
    path.parent.mkdir()
    a = {"a": torch.arange(4.0)}
    save_file(a, str(path), metadata={"round": "1", "strategy": "fedalora", "identity": other})
    with pytest.raises(ValueError, match=r"round-1\.safetensors of client 3 belongs to another run"):
        check_client_state(tmp_path, 3, mine)
    with pytest.raises(ValueError, match="empty state-dir"):
        load_client_state(tmp_path, 3, 2, "fedalora", identity=mine, or_earlier=True)
    check_client_state(tmp_path, 3, other)  # its own run: accepted
    got = load_client_state(tmp_path, 3, 2, "fedalora", identity=other, or_earlier=True)
    assert got is not None and torch.equal(got["a"], a["a"])  # missed round 2: continues from round 1
    assert load_client_state(tmp_path, 3, 2, "fedalora", identity=other) is None  # exactly round 2: none
