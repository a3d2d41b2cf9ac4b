"""A campaign as a user meets it: run directories moved to another place, ledgers written by older code, reports
over partial ledgers (a seed in which a client has no score, a task scored by a corpus-level metric), and the
lines that say what would resolve an unresolved comparison. Each test failed before the fix it names."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml

from asymlora.config import ConfigError, load_config


def test_a_moved_run_directory_resumes(tmp_path: Path) -> None:
    """A run directory copied or moved elsewhere (a campaign's out_dir on another machine, a repository cloned
    to another path) keeps its config.yaml, whose run_dir names the old place: --resume (and the sweep, which
    finds the cell by its id, which leaves run_dir out) refused it as "a different config"; every path in a
    run directory is relative to it. Anything else still has to match."""
    from asymlora.federated import run as fed_run
    from asymlora.federated.config import load_fed_config
    from asymlora.recipes.multitask import prepare_run_dir

    def multitask(where: str, *extra: str):
        return load_config(None, ["data.tasks=[bigbench:strategyqa]", f"run_dir={tmp_path / where}", *extra])

    prepare_run_dir(multitask("a/run"), overwrite=False, resume=False)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    prepare_run_dir(multitask("b/run"), overwrite=False, resume=True)
    with pytest.raises(ConfigError, match="different config"):
        prepare_run_dir(multitask("b/run", "adapter.r=4"), overwrite=False, resume=True)

    def federated(where: str, *extra: str):
        return load_fed_config(None, ["data.tasks=[bigbench:strategyqa]", "clients.num=1",
                                      f"run_dir={tmp_path / where}", *extra])  # fmt: skip

    fed_run.prepare_run_dir(federated("c/fed"), overwrite=False, resume=False)
    shutil.copytree(tmp_path / "c", tmp_path / "d")
    fed_run.prepare_run_dir(federated("d/fed"), overwrite=False, resume=True)
    with pytest.raises(ConfigError, match=r"\(adapter differ\)"):
        fed_run.prepare_run_dir(federated("d/fed", "adapter.r=4"), overwrite=False, resume=True)
