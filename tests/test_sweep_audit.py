"""Defects found by the audit of `asymlora sweep`, `asymlora compare` and the report's statistics."""

from __future__ import annotations

import pytest

from asymlora.cli import main as cli_main
from asymlora.recipes import sweep


@pytest.mark.parametrize(
    ("command", "hint"), [("sweep", "run the same command again"), ("train", "--resume")]
)
def test_ctrl_c_says_how_to_go_on_for_the_command(command, hint, monkeypatch, capsys, tmp_path) -> None:
    """Ctrl-C told every command to "resume with --resume"; `asymlora sweep` has no such flag (argparse refuses
    it): a sweep goes on by running the same command again."""

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep, "main", interrupted)
    monkeypatch.setattr("asymlora.cli.load_config", interrupted)
    assert cli_main([command, str(tmp_path / "x.yaml")]) == 130
    err = capsys.readouterr().err
    assert hint in err
    assert command != "sweep" or "--resume" not in err
