"""A user's own data in `asymlora train`: mistakes found only once the tokenizer is loaded (no example of a
task fits in ``data.max_length``) and tasks of the same name fail before the run directory is written."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from tests.conftest import make_char_tokenizer, tiny_run_overrides, write_two_task_env

from asymlora.config import load_config
from asymlora.data.tasks import DataError, Example, Task
from asymlora.recipes.multitask import check_data_fits, load_split_tasks, run

SIZES = {"data.max_train": 8, "data.max_test": 2, "data.max_length": 32, "adapter.target_modules": "[q_proj]",
         "train.steps": 1, "train.batch_size": 2, "train.warmup_steps": 0, "train.save_every": 0,
         "eval.base_model": "false"}  # fmt: skip


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, Path]:
    return write_two_task_env(tmp_path_factory.mktemp("user_data"), hidden=16, layers=1, examples=12)


def test_a_task_with_no_example_that_fits_fails_before_the_run_dir_is_written(env, tmp_path) -> None:
    """Every answer of 'long' (40 characters) is longer than max_length=32 tokens: the error comes before
    config.yaml is written, so the corrected command runs without --overwrite."""
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"input": str(i), "output": "y" * 40}) + "\n" for i in range(6)))
    run_dir = tmp_path / "run"
    tasks = f"data.tasks=[jsonl:{env['data']}#add, jsonl:{data}]"
    with pytest.raises(DataError, match=r"task 'long' has no train example that fits in max_length=32"):
        run(load_config(None, tiny_run_overrides(env, run_dir, SIZES, tasks)), quiet=True)
    assert not run_dir.exists()
    cfg = load_config(None, tiny_run_overrides(env, run_dir, SIZES, tasks))
    short, long = Example("Q", "a"), Example("Q", "y" * 40)
    task = Task("long", "generate", [short], [short], ["exact_match"])
    with pytest.raises(DataError, match=r"task 'long' has no validation example that fits in max_length=32"):
        check_data_fits(cfg, make_char_tokenizer(), [task], [replace(task, train=[long], test=[])])


@pytest.mark.parametrize(
    "tasks",
    [
        "[jsonl:{data}#add, jsonl:{data}#add]",
        "[jsonl:{data}#*, jsonl:{data}#parity]",
        "[jsonl:{root}/a/train.jsonl, jsonl:{root}/b/train.jsonl]",  # two files of the same name
    ],
)
def test_two_tasks_of_the_same_name_are_refused(env, tmp_path, tasks) -> None:
    """Results, the task router and data.metric are keyed by the name: the second task's scores would
    silently replace the first's."""
    for part in ("a", "b"):
        (tmp_path / part).mkdir()
        (tmp_path / part / "train.jsonl").write_text(
            "".join(json.dumps({"input": f"{part}{i}", "output": part}) + "\n" for i in range(6))
        )
    spec = "data.tasks=" + tasks.format(data=env["data"], root=tmp_path)
    cfg = load_config(None, tiny_run_overrides(env, tmp_path / "run", SIZES, spec))
    with pytest.raises(DataError, match=r"data.tasks gives more than one task the name '(add|parity|train)'"):
        load_split_tasks(cfg)


def test_prompts_cut_to_fit_are_recorded_in_results_json(env, tmp_path) -> None:
    """Every prompt of 'cut' (50 characters) is longer than max_length=32: the run says how many it cut, in
    results.json's data_notes as well as on the console (was: truncated silently)."""
    data = tmp_path / "cut.jsonl"
    data.write_text("".join(json.dumps({"input": "x" * 50 + str(i), "output": "a"}) + "\n" for i in range(8)))
    run_dir = tmp_path / "run"
    tasks = f"data.tasks=[jsonl:{env['data']}#add, jsonl:{data}]"
    run(load_config(None, tiny_run_overrides(env, run_dir, SIZES, tasks)), quiet=True)
    notes = json.loads((run_dir / "results.json").read_text())["data_notes"]
    assert len(notes) == 1, notes
    n = len(load_split_tasks(load_config(None, tiny_run_overrides(env, run_dir, SIZES, tasks)))[0][1].train)
    assert (
        notes[0]
        == f"task 'cut', max_length=32: cut the prompt of {n} of {n} train examples from the left to fit"
    )
