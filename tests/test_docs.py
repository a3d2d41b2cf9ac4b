"""The code blocks of README.md and docs/*.md, tried as a new user would.

- Every ```python block runs as written (a block whose first line starts with ``# not run by the tests:``
  and says why is only parsed), on its own (a fresh namespace, in an empty working directory,
  offline), on the built-in model, and raises no warning (marked slow: it loads SmolLM2-135M).
- Shell blocks (```bash / sh / console) are not run (training takes minutes) but checked: every
  ``asymlora ...`` line parses with the CLI's own parser, a config path it names exists and loads with its
  overrides, ``make X`` names a Makefile target, ``python -m M`` an importable module and
  ``python path.py`` an existing file.

Any ``*.md`` added to docs/ is picked up. A small collector rather than a pytest plugin (pytest-markdown-docs,
phmdoctest): those collect from a root-level path and would also scan every test module's docstrings once
switched on for the suite, while the shell-line checks need our own code anyway.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import warnings
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
SHELL = {"bash", "sh", "shell", "console"}
NOT_RUN = "# not run by the tests:"
"""First line of a Python block that is only parsed: it needs outside data or takes minutes (say which)."""


def _blocks(languages: set[str]) -> list:
    params = []
    for path in DOCS:
        text = path.read_text()
        for match in FENCE.finditer(text):
            if match.group(1) in languages:
                line = text.count("\n", 0, match.start()) + 2  # first line of the block's code
                name = f"{path.relative_to(ROOT)}:{line}"
                params.append(pytest.param(match.group(2), name, id=name))
    return params


def _commands(code: str) -> list[list[str]]:
    """The block's command lines as argument lists (continuations joined, comments and prompts dropped)."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        line = line.strip().removeprefix("$ ")
        if not line or line.startswith("#"):
            continue
        for part in re.split(r"\s(?:&&|;)\s", line):
            words = shlex.split(part, comments=True)
            while words and (
                re.fullmatch(r"[A-Z_]+=\S*", words[0]) or words[0] in ("time", "/usr/bin/time", "-v", "nice")
            ):
                words = words[1:]  # env assignments and timing wrappers
            if words:
                commands.append(words)
    return commands


PYTHON_BLOCKS = _blocks({"python", "py"})
SHELL_BLOCKS = _blocks(SHELL)
YAML_BLOCKS = _blocks({"yaml", "yml"})


def test_the_collector_finds_the_readme_blocks():
    names = [p.values[1] for p in PYTHON_BLOCKS]
    assert sum(name.startswith("README.md:") for name in names) >= 2
    assert len(SHELL_BLOCKS) >= 5


@pytest.mark.slow
@pytest.mark.parametrize(("code", "where"), PYTHON_BLOCKS)
def test_python_block_runs_as_written(code: str, where: str, tmp_path, monkeypatch) -> None:
    compiled = compile(code, where, "exec")  # every block must at least parse
    if code.startswith(NOT_RUN):  # needs data from outside (e.g. an LLM-Adapters checkout) or minutes
        return
    monkeypatch.chdir(tmp_path)  # the blocks write adapters into the working directory
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compiled, {"__name__": "__main__"})  # our own docs
    shown = [f"{w.category.__name__}: {w.message}" for w in caught if w.category is not DeprecationWarning]
    assert shown == [], f"{where} warns"


def _check_asymlora(words: list[str], where: str) -> None:
    from asymlora.cli import build_parser

    parser = build_parser()
    if "--help" in words or "-h" in words:
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(words[1:])
        assert exit_info.value.code == 0, where
        return
    try:
        args, extra = parser.parse_known_args(words[1:])
    except SystemExit:
        pytest.fail(f"{where}: {shlex.join(words)!r} does not parse")
    assert all("=" in e and not e.startswith("-") for e in extra), f"{where}: unknown arguments {extra}"
    overrides = [*getattr(args, "overrides", []), *extra]
    config = getattr(args, "config", None)
    if config is None or not config.startswith("configs/"):
        return
    assert (ROOT / config).is_file(), f"{where}: {config} does not exist"
    if args.command == "fed":
        from asymlora.federated.config import load_fed_config

        load_fed_config(ROOT / config, overrides)
    elif args.command == "sweep":
        from asymlora.recipes.sweep import expand, load_sweep

        assert expand(load_sweep(ROOT / config)), f"{where}: {config} expands to no cell"
    else:
        from asymlora.config import load_config

        load_config(ROOT / config, overrides)


def _check_federated_helper(words: list[str], where: str) -> None:
    """``python -m asymlora.federated app|status|check-tls ...``: parses with its own parser (``<RUN_ID>``-style
    placeholders read as 1); ``app --config`` of a file named like one in configs/ (the docs write the path on
    the SuperLink host) loads with its ``--overrides`` and ``--strategy``, as ``app`` itself checks it."""
    from asymlora.federated.__main__ import build_parser as build_fed_parser
    from asymlora.federated.config import load_fed_config

    argv = [re.sub(r"^<[A-Z_]+>$", "1", w) for w in words[3:]]
    try:
        args = build_fed_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: {shlex.join(words)!r} does not parse")
    if args.command == "app" and (ROOT / "configs" / Path(args.config).name).is_file():
        cfg = load_fed_config(ROOT / "configs" / Path(args.config).name, shlex.split(args.overrides))
        if args.strategy and args.strategy not in cfg.strategies:
            cfg.strategies.append(args.strategy)
            cfg.validate()


def _check_command(words: list[str], where: str) -> None:
    program = words[0]
    if program == "asymlora":
        _check_asymlora(words, where)
    elif program == "python" and words[1:3] == ["-m", "asymlora.federated"]:
        _check_federated_helper(words, where)
    elif program == "make":
        targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.MULTILINE)
        assert words[1] in targets, f"{where}: no make target {words[1]!r}"
    elif program == "python" and words[1:2] == ["-m"]:
        if words[2] != "venv":
            assert importlib.util.find_spec(words[2]) is not None, f"{where}: no module {words[2]}"
    elif program == "python" and words[1].endswith(".py"):
        assert (ROOT / words[1]).is_file(), f"{where}: no file {words[1]}"


@pytest.mark.parametrize(("code", "where"), SHELL_BLOCKS)
def test_shell_block_commands_are_valid(code: str, where: str) -> None:
    for words in _commands(code):
        _check_command(words, where)


@pytest.mark.parametrize(
    "line",
    [
        "asymlora trian configs/multitask_bigbench.yaml",  # no such command
        "asymlora export runs/mt --out x",  # --task missing
        "asymlora train configs/multitask_bigbench.yaml adapter.rank=16",  # no such key
        "asymlora fed configs/no_such.yaml",
        "make dmeo",
        "python -m asymlora.no_such_module",
        "python -m asymlora.federated app fedapp --config /srv/fed_bigbench_homo.yaml --overrides 'secagg.enable=true'",
        "python -m asymlora.federated status prod --run-id <RUN_ID> --json",  # no such option
        "python -m asymlora.federated check-tls --cert certs/server.pem",  # --ca missing
    ],
)
def test_the_shell_check_rejects_a_wrong_line(line: str) -> None:
    with pytest.raises((AssertionError, pytest.fail.Exception, ValueError)):
        for words in _commands(line):
            _check_command(words, "planted")


def _cited_design_sections() -> list[tuple[str, str, str]]:
    """(file, cited file name, section number) of every ``design.md §N`` in the docs, code, configs and scripts."""
    files = [*DOCS, ROOT / "pyproject.toml", ROOT / "Makefile"]
    for folder, pattern in [("src", "*.py"), ("tests", "*.py"), ("benchmarks", "*.py"), ("benchmarks", "*.j2"),
                            ("configs", "*.yaml"), ("scripts", "*.sh"), ("examples", "*.py")]:  # fmt: skip
        files += sorted((ROOT / folder).rglob(pattern))
    cited = []
    for path in files:
        text = path.read_text().replace("\n", " ")
        for match in re.finditer(r"([\w/]*design(?:\.md)?)\s*§\s*(\d+)", text, re.IGNORECASE):
            cited.append((str(path.relative_to(ROOT)), match.group(1), match.group(2)))
    return cited


def test_design_section_citations_name_the_file_and_an_existing_section() -> None:
    """Code and docs cite ``docs/design.md §N``; they once also cited a ``DESIGN.md`` that no longer exists."""
    sections = set(re.findall(r"^## (\d+)\. ", (ROOT / "docs" / "design.md").read_text(), re.MULTILINE))
    cited = _cited_design_sections()
    assert len(cited) >= 50 and len(sections) >= 13
    right_file = {"docs/design.md", "design.md"}  # design.md: cited from inside docs/
    wrong = [f"{where}: {name} §{number}" for where, name, number in cited
             if name not in right_file or number not in sections]  # fmt: skip
    assert not wrong, wrong


def _dotted(mapping: dict, prefix: str = "") -> list[str]:
    """``{"stopping": {"every": 50}}`` as the overrides ``["stopping.every=50"]``."""
    out = []
    for key, value in mapping.items():
        if isinstance(value, dict):
            out += _dotted(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={json.dumps(value)}")
    return out


@pytest.mark.parametrize(("code", "where"), YAML_BLOCKS)
def test_yaml_block_loads(code: str, where: str, tmp_path) -> None:
    """A sweep file shown in the docs (it has a ``grid``) loads and expands with its ``base`` read from configs/
    (the docs write a path relative to the file, or one on another machine) and ``out_dir`` in a temporary
    folder; any other block is a run-config fragment that loads onto configs/multitask_bigbench.yaml."""
    from asymlora.config import load_config
    from asymlora.recipes.sweep import expand, load_sweep

    data = yaml.safe_load(code)  # a block that is not valid YAML fails here
    assert isinstance(data, dict), where
    if "grid" not in data:
        load_config(ROOT / "configs" / "multitask_bigbench.yaml", _dotted(data))
        return
    data["base"] = str(ROOT / "configs" / Path(data["base"]).name)
    data["out_dir"] = str(tmp_path / "out")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump(data))
    assert expand(load_sweep(sweep)), f"{where}: no cell"


@pytest.mark.parametrize("doc", ["docs/design.md", "docs/deployment.md"])
def test_the_client_run_identity_keys_are_those_of_the_code(doc: str) -> None:
    """The docs list the config keys of a client state file's run identity; they once lacked ``het_local``."""
    from asymlora.federated.client import IDENTITY_KEYS

    text = (ROOT / doc).read_text().replace("\n", " ")
    listed = re.search(
        r"config keys that decide (?:training|what a client trains)[^`]*((?:`[\w.]+`[^`;]*?)+)[;)]", text
    )
    assert listed, f"{doc}: no list of the identity keys"
    names = {name.split(".")[0] for name in re.findall(r"`([\w.]+)`", listed.group(1)) if "." not in name}
    assert names == set(IDENTITY_KEYS), f"{doc}: {sorted(names)} != {sorted(IDENTITY_KEYS)}"
