"""The pre-flight check of a secured deployment's files (`python -m asymlora.federated check-tls`): every
bad certificate or key is named with its file and the fix before any Flower process starts. No Flower."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from tests import fed_deploy as fd

from asymlora.federated.__main__ import main as fed_tool
from asymlora.federated.deploy import DeployCheckError, check_tls_files


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> SimpleNamespace:
    d = tmp_path_factory.mktemp("pki")
    ca = fd.make_ca(d)
    return SimpleNamespace(
        dir=d,
        ca=ca,
        server=fd.make_server_cert(d, ca),
        nodes=[fd.make_node_key(d, f"node{k}") for k in range(2)],
        other_ca=fd.make_ca(d, "other-ca"),
    )


def problems(**kwargs) -> list[str]:
    with pytest.raises(DeployCheckError) as err:
        check_tls_files(**kwargs)
    return err.value.problems


def test_good_files_pass(pki) -> None:
    lines = check_tls_files(
        ca=pki.ca[0],
        cert=pki.server[0],
        key=pki.server[1],
        hosts=["127.0.0.1", "localhost"],
        public_keys=[n[1] for n in pki.nodes],
        private_keys=[n[0] for n in pki.nodes],
    )
    assert len(lines) == 1 + 1 + 2 + 2 and "valid for 127.0.0.1, localhost" in lines[1]


def test_expired_and_not_yet_valid_certificates(pki, tmp_path: Path) -> None:
    old = fd.make_server_cert(tmp_path, pki.ca, days=-1, name="old")
    (p,) = problems(ca=pki.ca[0], cert=old[0], key=old[1], hosts=["127.0.0.1"])
    assert p.startswith(f"{old[0]}: the SuperLink certificate expired on ") and "fix: issue a new one" in p
    before = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)  # a clock one hour behind: neither is valid yet
    found = problems(ca=pki.ca[0], cert=pki.server[0], key=pki.server[1], now=before)
    assert [p.split(":")[0] for p in found] == [str(pki.ca[0]), str(pki.server[0])]
    assert all("is not valid before" in p and "check the clock" in p for p in found)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=2)  # the one-day CA has expired by then
    assert "the CA certificate expired" in problems(ca=pki.ca[0], now=later)[0]


def test_wrong_host_names_the_address_and_the_san_to_add(pki, tmp_path: Path) -> None:
    (p,) = problems(ca=pki.ca[0], cert=pki.server[0], key=pki.server[1], hosts=["127.0.0.1", "10.0.0.5"])
    assert p == (
        f"{pki.server[0]}: issued for ['IP:127.0.0.1', 'DNS:localhost'], not for '10.0.0.5' (the "
        "address the SuperNodes dial); fix: reissue it with subjectAltName=IP:10.0.0.5"
    )
    wild = fd.make_server_cert(tmp_path, pki.ca, hosts=("*.example.org",), name="wild")
    check_tls_files(ca=pki.ca[0], cert=wild[0], key=wild[1], hosts=["link.example.org", "LINK.Example.org."])
    for host in ("example.org", "a.link.example.org", "link.example.com"):  # a wildcard spans one label only
        assert (
            "subjectAltName=DNS:" + host in problems(ca=pki.ca[0], cert=wild[0], key=wild[1], hosts=[host])[0]
        )


def test_wrong_ca_wrong_key_and_missing_files(pki, tmp_path: Path) -> None:
    foreign = fd.make_server_cert(tmp_path, pki.other_ca, name="foreign")
    (p,) = problems(ca=pki.ca[0], cert=foreign[0], key=foreign[1])
    assert p.startswith(f"{foreign[0]}: not signed by the CA certificate given with --ca")
    (p,) = problems(ca=pki.ca[0], cert=pki.server[0], key=foreign[1])
    assert (
        p
        == f"{foreign[1]}: not the private key of {pki.server[0]}; fix: give the key the certificate was issued "
        "for"
    )
    (p,) = problems(ca=pki.server[0])
    assert "not a CA certificate" in p and "give the CA's certificate (ca.crt)" in p
    missing = tmp_path / "nope" / "server.key"
    (p,) = problems(ca=pki.ca[0], cert=pki.server[0], key=missing)
    assert p == f"{missing}: SuperLink private key not found; fix: give the path of the SuperLink private key"
    assert "needs both --cert and --key" in problems(ca=pki.ca[0], cert=pki.server[0])[0]
    (p,) = problems(ca=pki.ca[0], hosts=["10.0.0.5"])  # a host with no certificate to check it against
    assert p.startswith("--host 10.0.0.5 is checked against the SuperLink's certificate") and "--cert" in p
    (p,) = problems(ca=pki.ca[0], cert=pki.server[1], key=pki.server[1])  # the key given as certificate
    assert "not a PEM certificate (SuperLink certificate)" in p
    missing_pub = tmp_path / "node9.pub"
    assert problems(ca=pki.ca[0], public_keys=[missing_pub])[0].startswith(
        f"{missing_pub}: SuperNode public key not found"
    )


def _ssh_public(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


def test_public_keys_in_the_wrong_format(pki, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    ec_key = ec.generate_private_key(ec.SECP384R1())
    files = {
        "pem.pub": ec_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        "rsa.pub": _ssh_public(rsa.generate_private_key(65537, 2048)),
        "ed.pub": _ssh_public(ed25519.Ed25519PrivateKey.generate()),
        "garbage.pub": b"hello\n",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    keys = [tmp_path / n for n in files] + [pki.nodes[0][0], pki.nodes[1][1], pki.nodes[1][1]]
    found = problems(ca=pki.ca[0], public_keys=keys)
    expect = [
        "a PEM public key, not OpenSSH format; fix: `ssh-keygen -i -m PKCS8 -f FILE > node_k.pub`",
        "a RSA key; Flower authenticates SuperNodes with elliptic-curve keys; fix: create the pair with",
        "a Ed25519 key; Flower authenticates SuperNodes with elliptic-curve keys",
        "not an OpenSSH public key ('ecdsa-sha2-nistp384 AAAA...')",
        "a private key; register the public key (node_k.pub), the private key never leaves its host",
        f"the same key as {pki.nodes[1][1]}; fix: give every SuperNode its own key pair",
    ]
    assert len(found) == len(expect)
    for p, path, e in zip(found, [*keys[:5], keys[6]], expect, strict=True):
        assert p.startswith(f"{path}: ") and e in p, p


def test_private_keys_in_the_wrong_format(pki, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    pem = tmp_path / "pem_key"
    pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    found = problems(ca=pki.ca[0], private_keys=[pem, pki.nodes[0][1]])
    assert (
        found[0].startswith(f"{pem}: not an OpenSSH private key")
        and 'ssh-keygen -p -N "" -f FILE' in found[0]
    )
    assert found[1] == f"{pki.nodes[0][1]}: a public key; fix: give the private key (node_k, not node_k.pub)"
    # a passphrase-protected SuperLink key (PEM; an encrypted OpenSSH key needs bcrypt, not installed)
    locked = tmp_path / "locked.key"
    locked.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    (p,) = problems(ca=pki.ca[0], cert=pki.server[0], key=locked)
    assert p.startswith(f"{locked}: the key is passphrase-protected and the SuperLink cannot prompt")


@pytest.mark.skipif(not shutil.which("ssh-keygen"), reason="ssh-keygen writes the passphrase-protected key")
def test_passphrase_protected_supernode_key(pki, tmp_path: Path) -> None:
    locked = tmp_path / "node_locked"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "secret", "-C", "", "-f", str(locked)],
        check=True,
    )
    (p,) = problems(ca=pki.ca[0], private_keys=[locked], public_keys=[locked.with_suffix(".pub")])
    assert p == (
        f"{locked}: passphrase-protected; flower-supernode reads unencrypted keys only; "
        'fix: `ssh-keygen -p -N "" -f FILE`'
    )


def test_cli_exit_codes_and_messages(pki, tmp_path: Path, capsys) -> None:
    base = ["check-tls", "--ca", str(pki.ca[0]), "--cert", str(pki.server[0]), "--key", str(pki.server[1])]
    assert fed_tool([*base, "--host", "127.0.0.1", "--public-key", str(pki.nodes[0][1])]) == 0
    out = capsys.readouterr().out
    assert out.count("ok  ") == 3 and f"{pki.nodes[0][1]}: SuperNode public key" in out
    assert fed_tool([*base, "--host", "example.org", "--public-key", str(tmp_path / "x.pub")]) == 2
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    assert len(err) == 2 and all(line.startswith("check-tls: error: ") for line in err)
    assert "subjectAltName=DNS:example.org" in err[0] and "x.pub: SuperNode public key not found" in err[1]
    assert "Traceback" not in captured.err and captured.out == ""
