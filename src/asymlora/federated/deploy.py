"""Pre-flight checks of a secured deployment's files, before any Flower process starts.

A SuperLink started with TLS and ``--enable-supernode-auth`` needs a CA certificate, its own certificate and
key, and the OpenSSH public key of every SuperNode; each SuperNode needs the CA certificate and its OpenSSH
private key. Flower reports a bad file late and vaguely (a SuperNode retrying forever after
``CERTIFICATE_VERIFY_FAILED``, an ``ApiError`` in the SuperLink's log), so :func:`check_tls_files` reads every
file first and names each problem with its file and the fix:

    python -m asymlora.federated check-tls --ca certs/ca.crt --cert certs/server.pem \\
        --key certs/server.key --host superlink.example.org --public-key node_0.pub --public-key node_1.pub
    python -m asymlora.federated check-tls --ca certs/ca.crt --private-key node_0     # on a SuperNode host

Source: docs/deployment.md §2-3. Key formats are those Flower 1.41 reads: PEM X.509 certificates and keys
for TLS; for SuperNode authentication, elliptic-curve keys on a NIST curve in OpenSSH format
(``ssh-keygen -t ecdsa -b 384``).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["DeployCheckError", "check_tls_files", "cli_check_tls"]

FIX_CERT = "issue a new one with the commands of docs/deployment.md §2"
FIX_NODE_KEY = 'create the pair with `ssh-keygen -t ecdsa -b 384 -N "" -f node_k` (docs/deployment.md §3)'


class DeployCheckError(ValueError):
    """One or more deployment files are unusable; ``problems`` holds one "FILE: what; fix: how" line each."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def _read(path: Path, what: str, problems: list[str]) -> bytes | None:
    if not path.is_file():
        problems.append(f"{path}: {what} not found; fix: give the path of the {what}")
        return None
    return path.read_bytes()


def _load_cert(path: Path, what: str, now: dt.datetime, problems: list[str]) -> Any:
    """The X.509 certificate in ``path`` if it is readable and valid at ``now``, else None (problem noted)."""
    from cryptography import x509

    data = _read(path, what, problems)
    if data is None:
        return None
    try:
        cert = x509.load_pem_x509_certificate(data)
    except ValueError:
        problems.append(
            f"{path}: not a PEM certificate ({what}); fix: give the file that starts with "
            "'-----BEGIN CERTIFICATE-----'"
        )
        return None
    if cert.not_valid_after_utc <= now:
        problems.append(
            f"{path}: the {what} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; fix: {FIX_CERT}"
        )
    elif cert.not_valid_before_utc > now:
        problems.append(
            f"{path}: the {what} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} "
            "UTC; fix: check the clock of this machine, or reissue it"
        )
    return cert


def _names(cert: Any) -> list[str]:
    """The subject alternative names of ``cert`` as "IP:…" / "DNS:…" strings."""
    from cryptography import x509

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [f"IP:{ip}" for ip in san.get_values_for_type(x509.IPAddress)] + [
        f"DNS:{name}" for name in san.get_values_for_type(x509.DNSName)
    ]


def _covers(names: Sequence[str], host: str) -> bool:
    """Whether a certificate with subject alternative ``names`` is valid for ``host`` (RFC 6125 matching:
    exact IP; DNS case-insensitive, a wildcard standing for the leftmost label only)."""
    try:
        return f"IP:{ipaddress.ip_address(host)}" in names
    except ValueError:
        pass
    host = host.lower().rstrip(".")
    for name in (n[4:].lower().rstrip(".") for n in names if n.startswith("DNS:")):
        if name == host or (name.startswith("*.") and host.partition(".")[2] == name[2:] and "." in name[2:]):
            return True
    return False


def _san_hint(host: str) -> str:
    try:
        return f"IP:{ipaddress.ip_address(host)}"
    except ValueError:
        return f"DNS:{host}"


def _check_server(
    ca: Any, cert_path: Path, key_path: Path, hosts: Sequence[str], now: dt.datetime, problems: list[str]
) -> None:
    """The SuperLink's certificate: valid now, issued by ``ca``, for every address in ``hosts``; its key
    unencrypted and matching."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization

    cert = _load_cert(cert_path, "SuperLink certificate", now, problems)
    if cert is not None and ca is not None:
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            problems.append(
                f"{cert_path}: not signed by the CA certificate given with --ca (issuer "
                f"{cert.issuer.rfc4514_string()}); fix: sign it with that CA's key, or give its CA"
            )
    if cert is not None:
        names = _names(cert)
        for host in hosts:
            if not _covers(names, host):
                problems.append(
                    f"{cert_path}: issued for {names or 'no subject alternative name'}, not for "
                    f"{host!r} (the address the SuperNodes dial); fix: reissue it with "
                    f"subjectAltName={_san_hint(host)}"
                )
    data = _read(key_path, "SuperLink private key", problems)
    if data is None:
        return
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        problems.append(
            f"{key_path}: the key is passphrase-protected and the SuperLink cannot prompt for it; "
            "fix: `openssl pkey -in KEY -out KEY.plain` and keep that file readable only by the "
            "SuperLink's user"
        )
        return
    except ValueError:
        problems.append(
            f"{key_path}: not a PEM private key; fix: give the file that starts with "
            "'-----BEGIN ... PRIVATE KEY-----'"
        )
        return
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if cert is not None and key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        problems.append(
            f"{key_path}: not the private key of {cert_path}; fix: give the key the "
            "certificate was issued for"
        )


def _ec_problem(path: Path, key: Any) -> str | None:
    from cryptography.hazmat.primitives.asymmetric import ec

    if not isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        kind = type(key).__name__.removeprefix("_").replace("PublicKey", "").replace("PrivateKey", "")
        why = "Flower authenticates SuperNodes with elliptic-curve keys"
        return f"{path}: a {kind} key; {why}; fix: {FIX_NODE_KEY}"
    return None  # OpenSSH knows only the NIST curves P-256/384/521, all of which Flower accepts


def _check_public_key(path: Path, problems: list[str]) -> bytes | None:
    """A SuperNode public key as `flwr supernode register` reads it (OpenSSH, EC, NIST curve)."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    data = _read(path, "SuperNode public key", problems)
    if data is None:
        return None
    try:
        key = serialization.load_ssh_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        if b"PRIVATE KEY" in data:
            why = "a private key; register the public key (node_k.pub), the private key never leaves its host"
        elif b"BEGIN PUBLIC KEY" in data:
            why = "a PEM public key, not OpenSSH format; fix: `ssh-keygen -i -m PKCS8 -f FILE > node_k.pub`"
        else:
            why = f"not an OpenSSH public key ('ecdsa-sha2-nistp384 AAAA...'); fix: {FIX_NODE_KEY}"
        problems.append(f"{path}: {why}")
        return None
    if problem := _ec_problem(path, key):
        problems.append(problem)
        return None
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


def _check_private_key(path: Path, problems: list[str]) -> None:
    """A SuperNode private key as `flower-supernode --auth-supernode-private-key` reads it."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    data = _read(path, "SuperNode private key", problems)
    if data is None:
        return
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except TypeError:
        problems.append(
            f"{path}: passphrase-protected; flower-supernode reads unencrypted keys only; "
            'fix: `ssh-keygen -p -N "" -f FILE`'
        )
        return
    except (ValueError, UnsupportedAlgorithm):
        if data.startswith((b"ecdsa-", b"ssh-")):
            problems.append(f"{path}: a public key; fix: give the private key (node_k, not node_k.pub)")
            return
        fix = (
            '`ssh-keygen -p -N "" -f FILE` rewrites it in OpenSSH format'
            if b"PRIVATE KEY" in data
            else FIX_NODE_KEY
        )
        problems.append(
            f"{path}: not an OpenSSH private key ('-----BEGIN OPENSSH PRIVATE KEY-----'); fix: {fix}"
        )
        return
    if problem := _ec_problem(path, key):
        problems.append(problem)


def _check_ca(path: Path, now: dt.datetime, problems: list[str]) -> Any:
    """The CA certificate in ``path`` if readable (problems noted: invalid now, not a CA)."""
    from cryptography import x509

    ca_cert = _load_cert(path, "CA certificate", now, problems)
    if ca_cert is not None:
        try:
            is_ca = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            problems.append(
                f"{path}: not a CA certificate (no basicConstraints CA:TRUE); fix: give the CA's "
                "certificate (ca.crt), not the SuperLink's"
            )
    return ca_cert


def _check_node_keys(
    public_keys: Sequence[str | Path], private_keys: Sequence[str | Path], problems: list[str]
) -> None:
    """Every SuperNode key readable, of the right kind, and no public key given twice."""
    seen: dict[bytes, Path] = {}
    for path in map(Path, public_keys):
        blob = _check_public_key(path, problems)  # the key without its comment
        if blob is not None and blob in seen:
            problems.append(
                f"{path}: the same key as {seen[blob]}; fix: give every SuperNode its own key pair"
            )
        elif blob is not None:
            seen[blob] = path
    for path in map(Path, private_keys):
        _check_private_key(path, problems)


def check_tls_files(
    *,
    ca: str | Path,
    cert: str | Path | None = None,
    key: str | Path | None = None,
    hosts: Sequence[str] = (),
    public_keys: Sequence[str | Path] = (),
    private_keys: Sequence[str | Path] = (),
    now: dt.datetime | None = None,
) -> list[str]:
    """Check the files of a secured deployment before starting it; returns what was checked, one line each.

    Args:
        ca: the CA certificate (PEM) the SuperNodes and the ``flwr`` CLI trust.
        cert, key: the SuperLink's certificate and private key (PEM); both or neither.
        hosts: the addresses the SuperNodes dial (IP or DNS name); the certificate must name each.
        public_keys: the SuperNodes' OpenSSH public keys the operator registers (each once).
        private_keys: SuperNode private keys (OpenSSH, unencrypted), on a SuperNode host.
        now: the time to check validity at (UTC; default: now).

    Raises:
        DeployCheckError: every problem found, as "FILE: what is wrong; fix: how" lines.
    """
    now = now or dt.datetime.now(dt.UTC)
    problems: list[str] = []
    ca_cert = _check_ca(Path(ca), now, problems)
    if (cert is None) != (key is None):
        problems.append("the SuperLink needs both --cert and --key (its certificate and private key)")
    elif cert is None and hosts:  # the names are in the SuperLink's certificate, not the CA's
        problems.append(
            f"--host {', '.join(hosts)} is checked against the SuperLink's certificate; fix: give its "
            "--cert and --key too (or drop --host on a SuperNode host)"
        )
    elif cert is not None and key is not None:
        _check_server(ca_cert, Path(cert), Path(key), hosts, now, problems)
    _check_node_keys(public_keys, private_keys, problems)
    if problems:
        raise DeployCheckError(problems)
    done = [f"{ca}: CA certificate valid until {ca_cert.not_valid_after_utc:%Y-%m-%d}"]
    if cert is not None:
        done.append(
            f"{cert}: signed by the CA, valid for {', '.join(hosts) or '(no host given)'}, key {key} matches"
        )
    done += [f"{p}: SuperNode public key (OpenSSH, EC)" for p in public_keys]
    done += [f"{p}: SuperNode private key (OpenSSH, EC)" for p in private_keys]
    return done


def cli_check_tls(args: Any) -> int:
    """``python -m asymlora.federated check-tls``: 0 and what was checked, or 2 and every problem (stderr)."""
    try:
        import cryptography  # noqa: F401  (installed with asymlora[fed])
    except ImportError:
        print(
            "check-tls: error: the `cryptography` package is missing; fix: pip install 'asymlora[fed]'",
            file=sys.stderr,
        )
        return 2
    try:
        lines = check_tls_files(
            ca=args.ca,
            cert=args.cert,
            key=args.key,
            hosts=args.host,
            public_keys=args.public_key,
            private_keys=args.private_key,
        )
    except DeployCheckError as err:
        for line in err.problems:
            print(f"check-tls: error: {line}", file=sys.stderr)
        return 2
    for line in lines:
        print(f"ok  {line}")
    return 0
