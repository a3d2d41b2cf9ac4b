"""``python -m asymlora.federated``: helpers for deployment with a SuperLink and SuperNodes.

    python -m asymlora.federated app DIR --config /srv/fed.yaml [--run-dir /srv/runs/fed]
        write a Flower app directory (pyproject.toml only) whose ServerApp and ClientApp are
        ``asymlora.federated.server_app:app`` and ``asymlora.federated.client_app:app``; submit it with
        ``flwr run DIR <connection>``.
    python -m asymlora.federated status <connection> [--run-id ID]
        the runs of a SuperLink and their outcome (``finished:completed`` / ``finished:failed``), exit 1
        when the run failed: ``flwr run`` itself exits 0 even when the ServerApp crashed.
    python -m asymlora.federated check-tls --ca ca.crt [--cert server.pem --key server.key --host H]
            [--public-key node_k.pub ...] [--private-key node_k ...]
        check a secured deployment's certificates and SuperNode keys before starting it (exit 2 and one
        "FILE: problem; fix: ..." line each when one is expired, for another host, missing or malformed).

The app's dependency list is empty on purpose: asymlora, torch and flwr are installed on every machine
beforehand, and the SuperLink runs with ``--disable-runtime-dependency-installation``, so Flower never
builds a per-run environment (which would pull a CUDA torch from the public index, docs/design.md §10).
"""

from __future__ import annotations

import os

os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

import argparse
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from asymlora.federated.config import load_fed_config
from asymlora.federated.deploy import cli_check_tls

APP_PYPROJECT = """\
# A Flower app whose code is the installed asymlora package (no files of its own).
# Written by `python -m asymlora.federated app`; submit with `flwr run {dir} <connection>`.
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "asymlora-fed"
version = "0.1.0"
description = "Federated fine-tuning with asymlora (Fed-ALoRA and its peers) on Flower"
# Empty on purpose: asymlora, torch and flwr are installed on every machine beforehand.
dependencies = []

[tool.flwr.app]
publisher = "asymlora"

[tool.flwr.app.components]
serverapp = "asymlora.federated.server_app:app"
clientapp = "asymlora.federated.client_app:app"

[tool.flwr.app.config]
# Path of the federated YAML config on the machine that runs the ServerApp (the SuperLink's).
config = {config}
# Space-separated key=value overrides of that config, e.g. "rounds=5 train.local_steps=20".
overrides = {overrides}
# Strategy of this run (default: the config's first); one strategy per `flwr run`.
strategy = {strategy}
# Where rounds.jsonl, checkpoints and results.json go (default: the config's run_dir).
run-dir = {run_dir}
# Continue from the last completed round of run-dir/<strategy>/checkpoint.
resume = false
"""


# Plain text for --help (the module docstring is reST).
DESCRIPTION = "Helpers for deploying federated runs with a Flower SuperLink and SuperNodes."
APP_DESCRIPTION = (
    "Write a Flower app directory (only a pyproject.toml) whose ServerApp and ClientApp are asymlora's; "
    "submit it with: flwr run DIR <connection>. The config is the path on the SuperLink host; when it "
    "exists on this machine too it is checked first, with --overrides (exit 2 on an error)."
)
STATUS_DESCRIPTION = (
    "List the runs of a SuperLink and their outcome (finished:completed, finished:failed, ...). Exits 1 "
    "when a run failed or was stopped: flwr run itself exits 0 even when the ServerApp crashed."
)

TLS_DESCRIPTION = (
    "Check a secured deployment's certificates and SuperNode keys before starting it: exit 2 with one "
    "'FILE: problem; fix: ...' line each when one is expired, for another host, missing or malformed."
)


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def write_app(
    directory: str | Path, config: str, *, overrides: str = "", strategy: str = "", run_dir: str = ""
) -> Path:
    """Write the Flower app directory (only ``pyproject.toml``); returns its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    text = APP_PYPROJECT.format(
        dir=directory,
        config=_toml_str(str(Path(config).expanduser().resolve())),
        overrides=_toml_str(overrides),
        strategy=_toml_str(strategy),
        run_dir=_toml_str(str(Path(run_dir).expanduser().resolve()) if run_dir else ""),
    )
    (directory / "pyproject.toml").write_text(text)
    return directory


def run_status(connection: str, run_id: int | None = None) -> list[dict]:
    """The runs of a SuperLink as ``flwr ls --format json`` reports them.

    Raises RuntimeError with flwr's own message when ``flwr ls`` fails (e.g. no connection of that name)."""
    flwr = shutil.which("flwr") or str(Path(sys.executable).with_name("flwr"))
    cmd = [flwr, "ls", connection, "--format", "json"]
    if run_id is not None:
        cmd += ["--run-id", str(run_id)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    try:
        data = json.loads(out.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"`{' '.join(cmd)}` failed: {out.stderr.strip() or out.stdout.strip()}") from None
    if not isinstance(data, dict) or not data.get("success", False):
        reason = data.get("error-message", data) if isinstance(data, dict) else data
        raise RuntimeError(f"`{' '.join(cmd)}` failed: {' '.join(str(reason).split())}")
    return list(data.get("runs", []))


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m asymlora.federated`` (subcommands app, status, check-tls)."""
    parser = argparse.ArgumentParser(prog="python -m asymlora.federated", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("app", help="write a Flower app directory for deployment", description=APP_DESCRIPTION)
    p.add_argument("dir", help="directory to write the app's pyproject.toml into (created if missing)")
    p.add_argument("--config", required=True, help="federated YAML config (path on the SuperLink host; "
                   "validated with --overrides when it exists on this machine too)")  # fmt: skip
    p.add_argument("--overrides", default="", help='e.g. "rounds=5 train.local_steps=20"')
    p.add_argument("--strategy", default="", help="strategy of this run (default: the config's first)")
    p.add_argument("--run-dir", default="", help="where the run writes (default: the config's run_dir)")
    p = sub.add_parser(
        "status",
        help="the outcome of runs on a SuperLink (exit 1 if the run failed)",
        description=STATUS_DESCRIPTION,
    )
    p.add_argument("connection", help="SuperLink connection name in flwr's config (~/.flwr/config.toml); required: "
                   "without one flwr would start a local SuperLink of its own and leave it running")  # fmt: skip
    p.add_argument("--run-id", type=int, default=None, help="only this run (default: every run)")
    p = sub.add_parser(
        "check-tls",
        help="check TLS certificates and SuperNode keys before deploying",
        description=TLS_DESCRIPTION,
    )
    p.add_argument("--ca", required=True, help="CA certificate (PEM) the SuperNodes and flwr trust")
    p.add_argument("--cert", help="the SuperLink's certificate (PEM)")
    p.add_argument("--key", help="the SuperLink's private key (PEM)")
    p.add_argument("--host", action="append", default=[], help="an address the SuperNodes dial (repeatable)")
    p.add_argument("--public-key", action="append", default=[], help="a SuperNode's OpenSSH public key")
    p.add_argument("--private-key", action="append", default=[], help="a SuperNode's OpenSSH private key")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check-tls":
        return cli_check_tls(args)
    if args.command == "app":
        if Path(args.config).is_file():  # else it exists on the SuperLink host only: checked there
            try:
                cfg = load_fed_config(args.config, shlex.split(args.overrides))
                if args.strategy and args.strategy not in cfg.strategies:  # as the ServerApp will
                    cfg.strategies.append(args.strategy)
                    cfg.validate()
            except ValueError as e:  # ConfigError, or unbalanced quotes in --overrides
                print(f"python -m asymlora.federated app: error: {e}", file=sys.stderr)
                return 2
        out = write_app(
            args.dir, args.config, overrides=args.overrides, strategy=args.strategy, run_dir=args.run_dir
        )
        print(f"wrote {out / 'pyproject.toml'}; submit with: flwr run {out} <connection>")
        return 0
    try:
        runs = run_status(args.connection, args.run_id)
    except RuntimeError as e:  # flwr's own message: no connection of that name, SuperLink unreachable, ...
        print(f"python -m asymlora.federated status: error: {e}", file=sys.stderr)
        return 2
    failed = False
    for r in runs:
        print(f"{r['run-id']}  {r['status']}  {r.get('status-details', '')}")
        failed |= str(r["status"]).endswith(":failed") or str(r["status"]).endswith(":stopped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
