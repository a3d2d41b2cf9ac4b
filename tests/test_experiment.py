"""The initialisation experiment end to end: same seed vs different seeds (the paper's Figure 1)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from tests.conftest import make_char_tokenizer, make_tiny_llama

from asymlora.cli import main as cli_main
from asymlora.config import ConfigError
from asymlora.recipes import init_similarity
from asymlora.recipes.init_similarity import (
    DIFFERENT_BOTH,
    DIFFERENT_SEEDS,
    SAME_SEED,
    InitSimilaritySettings,
    run_init_similarity,
)


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
    assert summary[DIFFERENT_BOTH]["A"]["similarity_mean"] < 0.5  # the paper's third panel
    assert (tmp_path / "exp" / "analysis.json").is_file() and (tmp_path / "exp" / "summary.png").is_file()
    # a second run reuses the finished adapters
    again = run_init_similarity(tmp_path / "exp", overrides)
    assert again["summary"][0]["A"]["similarity_mean"] == pytest.approx(same_a)


def test_bad_experiment_sizes_are_refused(tmp_path, capsys) -> None:
    with pytest.raises(ConfigError, match="at least 2 different seeds"):
        run_init_similarity(tmp_path, ["seeds=[0]"])
    assert cli_main(["experiment", "init-similarity", "--out", str(tmp_path), "tasks=[x]"]) == 2
    assert "at least 2 tasks" in capsys.readouterr().err


def test_the_pairs_are_the_papers_three_panels() -> None:
    settings = InitSimilaritySettings(tasks=["a", "b", "c"], seeds=[0, 1, 2])
    labels = [f"{'abc'[t]}@{s}" for t, s in init_similarity.plan(settings)]
    assert labels == ["a@0", "b@0", "c@0", "a@1", "a@2"]
    kinds: dict[str, list[tuple[str, str]]] = {}
    for a, b, kind in init_similarity._pairs(settings, labels):
        kinds.setdefault(kind, []).append((a, b))
    assert kinds == {
        SAME_SEED: [("a@0", "b@0"), ("a@0", "c@0"), ("b@0", "c@0")],
        DIFFERENT_SEEDS: [("a@0", "a@1"), ("a@0", "a@2"), ("a@1", "a@2")],
        DIFFERENT_BOTH: [("b@0", "a@1"), ("b@0", "a@2"), ("c@0", "a@1"), ("c@0", "a@2")],
    }


def test_adapters_trained_with_other_settings_are_not_mixed_in(tmp_path) -> None:
    model, tasks = _tiny_env(tmp_path)
    out = tmp_path / "exp"
    before = InitSimilaritySettings(model=str(model), tasks=tasks, seeds=[0, 1], r=4)
    (out / "adapters" / "add1_seed0").mkdir(parents=True)
    (out / "adapters" / "add1_seed0" / "adapter_config.json").write_text("{}")
    (out / "settings.json").write_text(json.dumps(dataclasses.asdict(before)))
    base = [f"model={model}", f"tasks=[{tasks[0]}, {tasks[1]}]"]
    with pytest.raises(ValueError, match=r"trained with other settings \(r: 4 -> 2\).*delete .*exp/adapters"):
        run_init_similarity(out, [*base, "seeds=[0, 1]", "r=2"])
    assert (
        json.loads((out / "settings.json").read_text())["r"] == 4
    )  # still what the adapters were trained with
    # more seeds or tasks extend the experiment; train.seed is replaced by each run's seed anyway
    more = InitSimilaritySettings(model=str(model), tasks=tasks[::-1], seeds=[0, 1, 2], r=4)
    more.train.seed = 7
    init_similarity._check_previous(out, more)


@pytest.mark.parametrize(
    "bad", ["r=0", "lora_alpha=-1", "train.batch_size=0", "train.steps=0", "model=/nonexistent/model", "task"]
)
def test_a_bad_setting_writes_nothing(tmp_path, bad: str) -> None:
    model, tasks = _tiny_env(tmp_path)
    out = tmp_path / "exp"
    task_list = (
        f"tasks=[{tasks[0]}, jsonl:{tmp_path}/missing.jsonl#x]"
        if bad == "task"
        else f"tasks=[{tasks[0]}, {tasks[1]}]"
    )
    overrides = [f"model={model}", task_list, "seeds=[0, 1]"] + ([] if bad == "task" else [bad])
    assert cli_main(["--quiet", "experiment", "init-similarity", "--out", str(out), *overrides]) == 2
    assert not out.exists()


def test_out_that_is_a_file_and_a_repeated_seed_are_named(tmp_path, capsys) -> None:
    afile = tmp_path / "results.txt"
    afile.write_text("mine")
    assert cli_main(["experiment", "init-similarity", "--out", str(afile)]) == 2
    assert f"--out {afile} is not a directory" in capsys.readouterr().err
    assert afile.read_text() == "mine"
    with pytest.raises(ConfigError, match=r"seeds=\[0, 0, 1\] repeats a seed"):
        run_init_similarity(tmp_path / "x", ["seeds=[0, 0, 1]"])


def test_train_epochs_sets_the_steps(tmp_path, monkeypatch) -> None:
    model, tasks = _tiny_env(tmp_path)
    steps = []
    monkeypatch.setattr(
        init_similarity, "train", lambda pm, data, collate, settings, *a, **k: steps.append(settings.steps)
    )
    overrides = [f"model={model}", f"tasks=[{tasks[0]}, {tasks[1]}]", "seeds=[0, 1]", "r=2",
                 "train.epochs=1", "train.batch_size=4"]  # fmt: skip
    run_init_similarity(tmp_path / "exp", overrides)
    assert steps == [8, 8, 8]  # ceil(32 training examples of each task / 4), not train.steps=100
