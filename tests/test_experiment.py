"""The initialisation experiment end to end: same seed vs different seeds (the paper's Figure 1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.conftest import make_char_tokenizer, make_tiny_llama

from asymlora.cli import main as cli_main
from asymlora.config import ConfigError
from asymlora.recipes.init_similarity import DIFFERENT_SEEDS, SAME_SEED, run_init_similarity


def _tiny_env(root: Path) -> tuple[Path, list[str]]:
    make_tiny_llama(hidden=48, initializer_range=0.2).save_pretrained(root / "model")
    make_char_tokenizer().save_pretrained(root / "model")
    rows = [{"input": f"{i}", "output": str(i + k), "task": f"add{k}"} for k in (1, 2) for i in range(40)]
    data = root / "tasks.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "model", [f"jsonl:{data}#add1", f"jsonl:{data}#add2"]


def test_same_seed_a_is_similar_and_different_seeds_a_is_not(tmp_path) -> None:
    model, tasks = _tiny_env(tmp_path)
    overrides = [f"model={model}", f"tasks=[{tasks[0]}, {tasks[1]}]", "seeds=[0, 1]", "r=4",
                 "max_length=48", "train.steps=8", "train.batch_size=4", "train.lr=1e-2"]  # fmt: skip
    result = run_init_similarity(tmp_path / "exp", overrides)
    summary = {row["kind"]: row for row in result["summary"]}
    same_a = summary[SAME_SEED]["A"]["similarity_mean"]
    diff_a = summary[DIFFERENT_SEEDS]["A"]["similarity_mean"]
    assert same_a > 0.9 > 0.5 > diff_a  # a few steps barely move A away from its initialisation
    assert (tmp_path / "exp" / "analysis.json").is_file() and (tmp_path / "exp" / "summary.png").is_file()
    # a second run reuses the finished adapters
    again = run_init_similarity(tmp_path / "exp", overrides)
    assert again["summary"][0]["A"]["similarity_mean"] == pytest.approx(same_a)


def test_bad_experiment_sizes_are_refused(tmp_path, capsys) -> None:
    with pytest.raises(ConfigError, match="at least 2 different seeds"):
        run_init_similarity(tmp_path, ["seeds=[0]"])
    assert cli_main(["experiment", "init-similarity", "--out", str(tmp_path), "tasks=[x]"]) == 2
    assert "at least 2 tasks" in capsys.readouterr().err
