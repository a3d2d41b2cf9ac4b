"""Helpers for the deployment tests: throw-away certificates and SuperNode keys, Flower processes started
in their own process groups (torn down by their id), and a recording TCP proxy on 127.0.0.1."""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

BINDIR = Path(sys.executable).parent


# --- certificates and keys (generated at test time with `cryptography`; nothing is committed) -------------
def _name(cn: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_ca(out: Path, name: str = "ca") -> tuple[Path, Path]:
    """A self-signed CA (EC P-256, valid one day): (name.crt, name.key) in ``out``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(f"asymlora-test-{name}"))
        .issuer_name(_name(f"asymlora-test-{name}"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    from cryptography.hazmat.primitives import serialization

    crt = _write(out / f"{name}.crt", cert.public_bytes(serialization.Encoding.PEM))
    return crt, _write(out / f"{name}.key", _pem_key(key))


def make_server_cert(
    out: Path,
    ca: tuple[Path, Path],
    hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
    name: str = "server",
    days: float = 1.0,
) -> tuple[Path, Path]:
    """A server certificate signed by ``ca`` whose subject alternative names are ``hosts`` (IP addresses or
    DNS names); ``days < 0`` makes one that has already expired. Returns (name.pem, name.key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    ca_cert = x509.load_pem_x509_certificate(ca[0].read_bytes())
    ca_key = serialization.load_pem_private_key(ca[1].read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    start, end = (
        (now - dt.timedelta(days=2), now + dt.timedelta(days=days))
        if days < 0
        else (now - dt.timedelta(minutes=5), now + dt.timedelta(days=days))
    )
    sans = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = _write(out / f"{name}.pem", cert.public_bytes(serialization.Encoding.PEM))
    return pem, _write(out / f"{name}.key", _pem_key(key))


def make_node_key(out: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode key pair as Flower 1.41 reads it: an EC P-384 private key in OpenSSH format (`name`) and
    its OpenSSH public key (`name.pub`), as `ssh-keygen -t ecdsa -b 384` writes them."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    priv = _write(out / name, private)
    priv.chmod(0o600)
    return priv, _write(out / f"{name}.pub", public + b"\n")


# --- processes ----------------------------------------------------------------------------------------------
def free_port(lo: int | None = None, hi: int | None = None) -> int:
    """A free TCP port on 127.0.0.1: the first in [lo, hi) (tests running side by side keep to their own
    range), or one the kernel picks when ``lo`` is None."""
    if lo is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    for port in range(lo, hi or lo + 100):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {lo}..{(hi or lo + 100) - 1}")


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The environment of every Flower process: no telemetry, no runtime installs, the venv's bin on PATH
    (the SuperLink and SuperNodes start `flower-superexec` by name, also when the venv is not activated)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    return {
        **os.environ,
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PATH": os.pathsep.join([str(BINDIR), os.environ.get("PATH", "")]),
    }


def write_connection(env: dict[str, str], name: str, port: int, ca: Path | None = None) -> None:
    """Add the SuperLink connection `name` (127.0.0.1:port; TLS with root CA ``ca``, or insecure) to
    $FLWR_HOME/config.toml; the first one written is the default."""
    path = Path(env["FLWR_HOME"]) / "config.toml"
    text = path.read_text() if path.exists() else f'[superlink]\ndefault = "{name}"\n'
    trust = f'root-certificates = "{ca}"' if ca else "insecure = true"
    path.write_text(text + f'\n[superlink.{name}]\naddress = "127.0.0.1:{port}"\n{trust}\n')


def start(cmd: list[str], log: Path, env: dict) -> subprocess.Popen:
    """Start a process in its own process group (so the whole group can be torn down by its id)."""
    return subprocess.Popen(
        cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True
    )


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each started process group, then SIGKILL what is left (only groups this test created)."""
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
    for p in procs:
        # SIGKILL the group: also ends children still alive (flwr-serverapp, flwr-clientapp)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=10)


def start_local_federation(
    env: dict, root: Path, port: int, node_ports: Sequence[int], procs: list[subprocess.Popen]
) -> None:
    """A SuperLink on 127.0.0.1:``port`` (state in ``root/db``, no TLS) and one SuperNode per ``node_ports``
    (partition k of len(node_ports), state dir ``root/node<k>``), each appended to ``procs`` as it starts (the
    caller stops them, `stop`, even when a later start fails); returns once the SuperLink answers ``flwr``."""
    (root / "db").mkdir(exist_ok=True)
    procs.append(start(superlink_cmd(port, root / "db" / "state.db", tls=None), root / "superlink.log", env))
    for k, p in enumerate(node_ports):
        node_config = f'partition-id={k} num-partitions={len(node_ports)} state-dir="{root / f"node{k}"}"'
        procs.append(start(supernode_cmd(port, p, node_config, ca=None), root / f"supernode{k}.log", env))
    wait_listening(env, "local")


def superlink_cmd(port: int, db: Path, tls: tuple[Path, Path, Path] | None, auth: bool = False) -> list[str]:
    """flower-superlink on 127.0.0.1:port; ``tls`` = (ca.crt, server.pem, server.key), or None: --insecure."""
    cmd = [
        str(BINDIR / "flower-superlink"),
        "--database",
        str(db),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--disable-runtime-dependency-installation",
    ]
    if tls is None:
        return [*cmd, "--insecure"]
    cmd += ["--ssl-ca-certfile", str(tls[0]), "--ssl-certfile", str(tls[1]), "--ssl-keyfile", str(tls[2])]
    return [*cmd, "--enable-supernode-auth"] if auth else cmd


def supernode_cmd(
    superlink: int,
    port: int,
    node_config: str,
    ca: Path | None,
    key: Path | None = None,
    retries: int | None = None,
    insecure: bool | None = None,
    host: str = "127.0.0.1",
) -> list[str]:
    """flower-supernode dialing host:superlink, serving its ClientApps on 127.0.0.1:port. TLS verified
    against ``ca`` (None and ``insecure=False``: the system's CA bundle; ``insecure`` defaults to ``ca is
    None``); ``key``: its private key for SuperNode authentication; ``retries``: connection attempts."""
    cmd = [
        str(BINDIR / "flower-supernode"),
        "--superlink",
        f"{host}:{superlink}",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--node-config",
        node_config,
    ]
    if ca is not None:
        cmd += ["--root-certificates", str(ca)]
    elif insecure is None or insecure:
        cmd.append("--insecure")
    if key is not None:
        cmd += ["--auth-supernode-private-key", str(key)]
    if retries is not None:
        cmd += ["--max-retries", str(retries)]
    return cmd


def flwr(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the `flwr` CLI with ``args`` (text output captured)."""
    return subprocess.run(
        [str(BINDIR / "flwr"), *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def wait_listening(env: dict, connection: str, timeout: float = 180) -> None:
    """Wait until the SuperLink of ``connection`` answers `flwr ls` (it takes a few seconds to listen)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if '"success": true' in flwr(env, "ls", connection, "--format", "json").stdout:
            return
        time.sleep(1)
    raise AssertionError(f"the SuperLink of {connection!r} did not answer within {timeout} s")


def wait_finished(env: dict, connection: str, run_id: str, timeout: float) -> dict:
    """The run's entry in the SuperLink's state once its status is finished:* (its real outcome)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = flwr(env, "ls", connection, "--run-id", run_id, "--format", "json")
        runs = json.loads(out.stdout).get("runs", []) if out.stdout.strip().startswith("{") else []
        if runs and str(runs[0]["status"]).startswith("finished"):
            return runs[0]
        time.sleep(2)
    raise AssertionError(f"run {run_id} did not finish within {timeout} s")


# --- a recording TCP proxy (what an eavesdropper on the wire would see) -------------------------------------
@dataclass
class RecordingProxy:
    """Forward 127.0.0.1:listen ⇄ 127.0.0.1:target and keep every byte in both directions.

    Written here (a few lines of sockets and threads) because the point is to see the raw bytes on the
    wire; a packet capture tool would need privileges the test does not have."""

    listen: int
    target: int
    captured: bytearray = field(default_factory=bytearray)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: socket.socket | None = None
    _socks: list[socket.socket] = field(default_factory=list)

    def __enter__(self) -> RecordingProxy:
        self._server = socket.create_server(("127.0.0.1", self.listen))
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        for s in [self._server, *self._socks]:
            with contextlib.suppress(OSError):
                s.close()

    def data(self) -> bytes:
        with self._lock:
            return bytes(self.captured)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                return
            self._socks += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(65536):
                with self._lock:
                    self.captured += chunk
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
