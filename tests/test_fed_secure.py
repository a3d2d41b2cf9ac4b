"""A secured deployment on 127.0.0.1: a SuperLink with TLS and SuperNode authentication, two SuperNodes
with registered keys, and everyone who must be refused (no CA, another CA, an unregistered key, no key, a
`flwr run` without TLS); a recording proxy shows what an eavesdropper sees with TLS and with --insecure;
and what is not protected (the Control API admits whoever reaches it). docs/deployment.md §9 tabulates it.

One insecure and one secured deployment run per module (module-scoped fixtures, about a minute of CPU
each); the refusal tests read what happened around the secured run. Ports 19100-19199 only."""

from __future__ import annotations

import os

os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

import json
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
from tests import fed_deploy as fd
from tests import test_fed_apps as fed_apps

from asymlora.federated.deploy import DeployCheckError, check_tls_files
from asymlora.methods.base import Role

pytestmark = pytest.mark.fed
assets = fed_apps.assets  # the tiny Llama and tasks of the insecure deployment test (a module-scoped fixture)
read_rounds, tiny_roles, write_config = fed_apps.read_rounds, fed_apps.tiny_roles, fed_apps.write_config

RUN_TIMEOUT = 420


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> SimpleNamespace:
    """Throw-away certificates and keys: a CA, the SuperLink's certificate for 127.0.0.1 (not localhost:
    the wrong-host case), two registered SuperNode key pairs, one never registered, and a second CA."""
    d = tmp_path_factory.mktemp("pki")
    ca = fd.make_ca(d)
    return SimpleNamespace(
        ca=ca,
        server=fd.make_server_cert(d, ca, hosts=("127.0.0.1",)),
        nodes=[fd.make_node_key(d, f"node{k}") for k in range(2)],
        rogue=fd.make_node_key(d, "rogue"),
        other_ca=fd.make_ca(d, "other-ca"),
    )


@dataclass
class Deployment:
    """What one deployment run left behind: its directory, outcome, the proxy capture of node 0's link."""

    root: Path
    status: dict
    capture: bytes
    logs: dict[str, str] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    @property
    def out(self) -> Path:
        return self.root / "run" / "fedalora"


def _deploy(root: Path, assets: Path, pki: SimpleNamespace | None, during=None, after=None) -> Deployment:
    """SuperLink (TLS + SuperNode auth when ``pki``, else --insecure) and two SuperNodes on 127.0.0.1, node 0
    dialing through a recording proxy; submit a 2-round fedalora run and wait for its outcome. ``during`` is
    called with (env, port, procs) after the submission (the refusal attempts), ``after`` with (port,) once
    the run has finished; both return a dict of what they saw."""
    from asymlora.federated.__main__ import write_app

    env = fd.flower_env(root / "flwr_home")
    port, proxy_port = fd.free_port(19100, 19150), fd.free_port(19150, 19160)
    ca = pki.ca[0] if pki else None
    fd.write_connection(env, "local", port, ca)
    app = write_app(
        root / "app", str(write_config(root / "fed.yaml", assets, root / "run")), run_dir=str(root / "run")
    )
    tls = (pki.ca[0], *pki.server) if pki else None
    procs: list[subprocess.Popen] = []
    extra: dict = {}
    try:
        with fd.RecordingProxy(proxy_port, port) as proxy:
            procs.append(
                fd.start(
                    fd.superlink_cmd(port, root / "state.db", tls, auth=pki is not None),
                    root / "superlink.log",
                    env,
                )
            )
            fd.wait_listening(env, "local")
            for k in range(2):
                if pki:  # the operator registers each SuperNode's public key before it connects
                    reg = fd.flwr(
                        env, "supernode", "register", str(pki.nodes[k][1]), "local", "--format", "json"
                    )
                    assert '"success": true' in reg.stdout, reg.stdout + reg.stderr
                cfg = f'partition-id={k} num-partitions=2 state-dir="{root / f"node{k}"}"'
                dial = proxy_port if k == 0 else port  # node 0's link passes the recording proxy
                key = pki.nodes[k][0] if pki else None
                cmd = fd.supernode_cmd(dial, fd.free_port(19160 + 10 * k, 19170 + 10 * k), cfg, ca, key)
                procs.append(fd.start(cmd, root / f"supernode{k}.log", env))
            sub = fd.flwr(env, "run", str(app), "local", "--format", "json")
            assert '"run-id"' in sub.stdout, sub.stdout + sub.stderr
            if during:
                extra = during(env, port, procs)
            status = fd.wait_finished(env, "local", str(json.loads(sub.stdout)["run-id"]), RUN_TIMEOUT)
            extra["nodes"] = fd.flwr(env, "supernode", "list", "local", "--format", "json").stdout
            if after:
                extra |= after(port)
            capture = proxy.data()
    finally:
        fd.stop(procs)
    (root / "node0-link.bin").write_bytes(capture)  # what an eavesdropper on node 0's link recorded
    logs = {p.stem: p.read_text(errors="replace") for p in root.glob("*.log")}
    return Deployment(root, status, capture, logs, extra)


@pytest.fixture(scope="module")
def insecure(tmp_path_factory, assets) -> Deployment:
    return _deploy(tmp_path_factory.mktemp("insecure"), assets, None)


def _intruders(pki: SimpleNamespace, root: Path):
    """Start, while the legitimate run is in progress, every SuperNode that must be refused, and submit the
    app once more without TLS; returns their exit codes and `flwr` outputs."""

    def attempt(env: dict, port: int, procs: list) -> dict:
        cases = {  # (CA the node trusts, its key, the name it dials)
            "no-ca": (None, pki.nodes[0][0], "127.0.0.1"),  # the system's CA bundle: does not know our CA
            "other-ca": (pki.other_ca[0], pki.nodes[0][0], "127.0.0.1"),
            "wrong-host": (pki.ca[0], pki.nodes[0][0], "localhost"),  # the certificate names 127.0.0.1 only
            "unregistered": (pki.ca[0], pki.rogue[0], "127.0.0.1"),
            "no-key": (pki.ca[0], None, "127.0.0.1"),
        }
        started = {}
        for i, (name, (ca, key, host)) in enumerate(cases.items()):
            cfg = f'partition-id=0 state-dir="{root / name}"'  # posing as client 0
            local = fd.free_port(19180 + 4 * i, 19184 + 4 * i)
            cmd = fd.supernode_cmd(port, local, cfg, ca, key, retries=1, insecure=False, host=host)
            started[name] = fd.start(cmd, root / f"{name}.log", env)
            procs.append(started[name])
        plain = fd.flower_env(root / "plain_home")
        fd.write_connection(plain, "plain", port)
        out = {"flwr-plain": fd.flwr(plain, "run", str(root / "app"), "plain")}
        out["flwr-plain-ls"] = fd.flwr(plain, "ls", "plain", "--format", "json")
        for name in ("flwr-plain", "flwr-plain-ls"):
            (root / f"{name}.out").write_text(out[name].stdout + out[name].stderr)
        deadline = time.monotonic() + 90
        for name, p in started.items():
            try:
                out[name] = p.wait(timeout=max(1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                out[name] = None  # still running: asserted below
        return out

    return attempt


@pytest.fixture(scope="module")
def secured(tmp_path_factory, assets, pki) -> Deployment:
    root = tmp_path_factory.mktemp("secured")
    check_tls_files(
        ca=pki.ca[0],
        cert=pki.server[0],
        key=pki.server[1],
        hosts=["127.0.0.1"],
        public_keys=[n[1] for n in pki.nodes],
        private_keys=[n[0] for n in pki.nodes],
    )
    return _deploy(root, assets, pki, during=_intruders(pki, root), after=_outsider(pki, root))


def _outsider(pki: SimpleNamespace, root: Path):
    """Someone holding only the (public) CA certificate registers a key of their own via the Control API."""

    def attempt(port: int) -> dict:
        env = fd.flower_env(root / "outsider_home")
        fd.write_connection(env, "link", port, pki.ca[0])
        key = fd.make_node_key(root, "outsider")
        reg = fd.flwr(env, "supernode", "register", str(key[1]), "link", "--format", "json")
        return {
            "outsider": reg,
            "outsider-nodes": fd.flwr(env, "supernode", "list", "link", "--format", "json"),
        }

    return attempt


# --- the legitimate run -------------------------------------------------------------------------------------
def test_secured_run_completes_with_the_insecure_result(secured: Deployment, insecure: Deployment) -> None:
    from safetensors.torch import load_file

    assert secured.status["status"] == "finished:completed", secured.status
    assert insecure.status["status"] == "finished:completed", insecure.status
    assert "Uvicorn running on https://127.0.0.1" in secured.logs["superlink"]
    assert "Uvicorn running on http://127.0.0.1" in insecure.logs["superlink"]
    hist_s, hist_i = read_rounds(secured.out / "rounds.jsonl"), read_rounds(insecure.out / "rounds.jsonl")
    assert [r["accepted"] for r in hist_s] == [[0, 1], [0, 1]]
    for k in range(2):  # both legitimate nodes trained and evaluated
        log = secured.logs[f"supernode{k}"]
        assert log.count("Receiving: train message") == 2 and "Receiving: evaluate message" in log
    assert [r["train_loss"] for r in hist_s] == [r["train_loss"] for r in hist_i]
    res_s = json.loads((secured.out / "results.json").read_text())
    res_i = json.loads((insecure.out / "results.json").read_text())
    for a, b in zip(res_s["clients"], res_i["clients"], strict=True):  # every score, not the timings
        assert {k: v for k, v in a.items() if k != "seconds"} == {
            k: v for k, v in b.items() if k != "seconds"
        }
    assert res_s["personalised"] == res_i["personalised"] and res_s["global"] == res_i["global"]
    b_s = load_file(str(secured.out / "checkpoint" / "server_state.safetensors"))
    b_i = load_file(str(insecure.out / "checkpoint" / "server_state.safetensors"))
    assert b_s.keys() == b_i.keys() and all((b_s[k] == b_i[k]).all() for k in b_s)  # bit-identical global B


# --- the refusals (SuperNodes started while the legitimate run was in progress) -----------------------------
def _never_served(d: Deployment, name: str) -> str:
    """The refused SuperNode's log, after checking it exited with an error and never received a message."""
    log = d.logs[name]
    assert d.extra[name] not in (0, None), log  # it exited (after one attempt), with an error
    assert "could not establish a connection to the SuperLink" in log, log
    assert "Receiving:" not in log and not (d.root / name).exists()  # no message, no global B, no state
    return log


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("no-ca", "unable to get local issuer certificate"),
        ("other-ca", "unable to get local issuer certificate"),
        ("wrong-host", "Hostname mismatch, certificate is not valid for 'localhost'"),
    ],
)
def test_supernode_that_cannot_verify_the_superlink_is_refused(
    secured: Deployment, pki: SimpleNamespace, name: str, reason: str
) -> None:
    """TLS: without our CA (system roots only, or another CA), or dialing a name the certificate does not
    carry, the SuperNode rejects the SuperLink's certificate; the SuperLink logs nothing (the handshake
    fails before any request). check-tls names the wrong host before anything starts."""
    log = _never_served(secured, name)
    assert f"[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: {reason}" in log
    if name == "wrong-host":
        with pytest.raises(DeployCheckError, match="not for 'localhost'.*subjectAltName=DNS:localhost"):
            check_tls_files(ca=pki.ca[0], cert=pki.server[0], key=pki.server[1], hosts=["localhost"])


@pytest.mark.parametrize(
    ("name", "client_line", "superlink_line"),
    [
        (
            "unregistered",
            "[code: 2004] Failed to activate SuperNode.",
            "[/v1/fleet/activate-node][ApiError:2004]",
        ),
        (
            "no-key",
            "[code: 2001] SuperNode authentication is enabled. All SuperNodes must be registered",
            "[/v1/fleet/register-node][ApiError:2001]",
        ),
    ],
)
def test_supernode_without_a_registered_key_is_refused(
    secured: Deployment, name: str, client_line: str, superlink_line: str
) -> None:
    """Node authentication: an unregistered key (or none: Flower then makes an ephemeral one and asks to
    register it) gets no node id, so no message is ever addressed to it."""
    assert client_line in _never_served(secured, name)
    superlink = secured.logs["superlink"]
    assert superlink.count(superlink_line) == 1
    if name == "unregistered":
        assert "No SuperNode found with the given public key" in superlink
    nodes = json.loads(secured.extra["nodes"])["nodes"]
    assert len(nodes) == 2  # only the two registered keys ever became nodes
    ids = {str(c["node_id"]) for r in read_rounds(secured.out / "rounds.jsonl") for c in r["clients"]}
    assert ids == {n["node-id"] for n in nodes}


def test_flwr_run_without_tls_is_refused(secured: Deployment) -> None:
    plain = secured.extra["flwr-plain"]
    assert plain.returncode != 0, plain.stdout
    assert "Connection to the SuperLink is unavailable" in plain.stdout + plain.stderr
    assert '"success": false' in secured.extra["flwr-plain-ls"].stdout
    # the plain-HTTP request never reached the Control API: one run was started, the legitimate one
    assert secured.logs["superlink"].count("/v1/control/start-run") == 1


# --- what an eavesdropper sees ------------------------------------------------------------------------------
def _b_chunks(d: Deployment, assets: Path) -> list[bytes]:
    """32 bytes from the middle of every global B tensor the SuperLink sent to the nodes at evaluation."""
    from safetensors.torch import load_file

    roles = tiny_roles(assets)
    state = load_file(str(d.out / "checkpoint" / "server_state.safetensors"))
    assert state and all(roles[k].role == Role.B for k in state)
    chunks = []
    for t in state.values():
        raw = t.contiguous().numpy().tobytes()
        assert len(raw) >= 64
        chunks.append(raw[len(raw) // 2 : len(raw) // 2 + 32])
    return chunks


def test_eavesdropper_sees_b_only_without_tls(secured: Deployment, insecure: Deployment, assets) -> None:
    plain, sealed = _b_chunks(insecure, assets), _b_chunks(secured, assets)
    assert len(insecure.capture) > 100_000 and len(secured.capture) > 100_000  # both links carried the run
    assert all(c in insecure.capture for c in plain)  # --insecure: every B readable on the wire
    assert not any(c in secured.capture for c in sealed)  # TLS: none
    assert secured.capture[:3] == b"\x16\x03\x01"  # a TLS handshake record opens the connection


# --- what the SuperLink does not protect --------------------------------------------------------------------
def test_control_api_admits_anyone_who_can_reach_it(secured: Deployment) -> None:
    """Flower 1.41's open-source Control API has no account authentication (NoOpControlAuthnPlugin): anyone
    who reaches the port and has the CA certificate (which is public) can register a SuperNode key (and
    submit runs). TLS and node authentication keep out who is not registered; only the firewall and the
    operator's network keep out who would register. docs/deployment.md says so; this test notices if a
    Flower upgrade changes it."""
    reg = secured.extra["outsider"]
    assert '"success": true' in reg.stdout and '"node-id"' in reg.stdout, reg.stdout + reg.stderr
    nodes = json.loads(secured.extra["outsider-nodes"].stdout)["nodes"]
    assert len(nodes) == 3 and sum(n["status"] == "registered" for n in nodes) >= 1
