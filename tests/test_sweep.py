"""The campaign runner (asymlora sweep) and asymlora compare, on a tiny grid with a tiny model."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
import yaml
from filelock import FileLock
from tests.conftest import make_char_tokenizer, make_tiny_llama

import asymlora.train
from asymlora.cli import main as cli_main
from asymlora.eval import stats
from asymlora.recipes import multitask, sweep


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sweep")
    model = make_tiny_llama(hidden=32, layers=1, initializer_range=0.2)
    model.save_pretrained(root / "model")
    make_char_tokenizer().save_pretrained(root / "model")
    add = [{"input": str(i), "output": str(i + 1), "task": "add"} for i in range(30)]
    parity = [{"input": f"Is {i} even?", "options": ["yes", "no"], "target": "yes" if i % 2 == 0 else "no",
               "task": "parity"} for i in range(30)]  # fmt: skip
    data = root / "tasks.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in add + parity))
    tasks = [f"jsonl:{data}#add", f"jsonl:{data}#parity"]
    spec = {
        "out_dir": "campaign",
        "overrides": [
            f"model.name={root / 'model'}",
            "model.device=cpu",
            f"data.tasks={json.dumps(tasks)}",
            "data.max_train=20",
            "data.max_test=6",
            "data.max_length=48",
            "adapter.r=2",
            "adapter.target_modules=[q_proj]",
            "train.steps=4",
            "train.save_every=2",
            "train.batch_size=4",
            "train.warmup_steps=1",
            "eval.batch_size=8",
            "eval.max_new_tokens=3",
            "eval.base_model=false",
            "train.mixed_precision=bf16",  # as every campaign file: a sweep process runs bf16 cells
        ],
        "grid": [
            {"adapter.method": ["lora", "alora"], "train.seed": [0, 1]},
            {"data.tasks": [[tasks[0]], [tasks[1]]], "adapter.method": ["lora"], "train.seed": [0]},
        ],
        "report": {"reference": "alora"},
    }
    (root / "sweep.yaml").write_text(yaml.safe_dump(spec))
    return {"root": root, "sweep": root / "sweep.yaml"}


@pytest.fixture(scope="module")
def campaign(env) -> dict:
    """Run the sweep, kill it in the middle of the 2nd cell, run it again; record what each run did."""
    spec = sweep.load_sweep(env["sweep"])
    cells = sweep.expand(spec)
    real_train, real_run = asymlora.train.train, multitask.run
    calls = {"train": 0, "runs": [], "resumed_from": []}

    def die_at_step_3(step: int) -> None:
        if step == 3:
            raise Killed

    def killing_train(*args, **kwargs):
        calls["train"] += 1
        if calls["train"] == 2:  # the 2nd cell dies after its step-2 checkpoint
            kwargs["on_step"] = die_at_step_3
        result = real_train(*args, **kwargs)
        calls["resumed_from"].append(result.resumed_from)
        return result

    def counting_run(cfg, **kwargs):
        calls["runs"].append(Path(cfg.run_dir).name)
        return real_run(cfg, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(asymlora.train, "train", killing_train)
        mp.setattr(multitask, "run", counting_run)
        with pytest.raises(Killed):
            sweep.run_sweep(spec, say=lambda *a: None)
        after_kill = [r["id"] for r in sweep.read_ledger(spec.ledger)]
        first_runs = list(calls["runs"])
        calls["runs"].clear()
        counts = sweep.run_sweep(spec, say=lambda *a: None)
    return {"spec": spec, "cells": cells, "after_kill": after_kill, "first_runs": first_runs,
            "second_runs": calls["runs"], "counts": counts, "resumed_from": calls["resumed_from"]}  # fmt: skip


def test_grid_expands_to_distinct_cells_with_stable_ids(env, campaign) -> None:
    cells = campaign["cells"]
    assert len(cells) == 6 and len({c.id for c in cells}) == 6
    assert [c.id for c in sweep.expand(sweep.load_sweep(env["sweep"]))] == [c.id for c in cells]
    assert cells[0].params == {"adapter.method": "lora", "train.seed": 0}
    assert cells[0].config.train.steps == 4 and cells[4].config.data.tasks[0].endswith("#add")
    assert all(c.run_dir.parent == campaign["spec"].out_dir / "runs" for c in cells)


def test_order_by_sorts_cells_stably_without_changing_their_ids(env, tmp_path) -> None:
    spec = yaml.safe_load(env["sweep"].read_text())
    spec["grid"][0]["train.seed"] = [10, 2, 0]  # numbers sort by value: 0, 2, 10 (not "10" < "2")
    spec["grid"][1]["train.seed"] = [2]
    spec["out_dir"] = str(env["root"] / "campaign")
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump(spec))
    spec["order_by"] = ["train.seed"]
    ordered = tmp_path / "ordered.yaml"
    ordered.write_text(yaml.safe_dump(spec))
    grid_order = sweep.expand(sweep.load_sweep(plain))
    by_seed = sweep.expand(sweep.load_sweep(ordered))
    assert sorted(c.id for c in by_seed) == sorted(c.id for c in grid_order)
    got = [(c.config.train.seed, c.config.adapter.method, len(c.config.data.tasks)) for c in by_seed]
    assert got == [(0, "lora", 2), (0, "alora", 2), (2, "lora", 2), (2, "alora", 2), (2, "lora", 1),
                   (2, "lora", 1), (10, "lora", 2), (10, "alora", 2)]  # fmt: skip


def test_killed_sweep_reruns_only_what_is_missing(campaign) -> None:
    ids = [c.id for c in campaign["cells"]]
    assert campaign["after_kill"] == ids[:1] and campaign["first_runs"] == ids[:2]
    assert campaign["second_runs"] == ids[1:]  # the done cell is skipped
    assert campaign["counts"] == {"cells": 6, "done": 1, "ran": 5, "taken": 0, "failed": 0, "deferred": 0}
    assert campaign["resumed_from"][1] == 2  # the killed cell continued from its step-2 checkpoint
    records = sweep.read_ledger(campaign["spec"].ledger)
    assert sorted(r["id"] for r in records) == sorted(ids)  # exactly one record per cell


def test_records_hold_scores_intervals_and_per_example_scores(campaign) -> None:
    records = {r["id"]: r for r in sweep.read_ledger(campaign["spec"].ledger)}
    cell = campaign["cells"][2]  # alora, seed 0
    record = records[cell.id]
    assert record["params"] == {"adapter.method": "alora", "train.seed": 0} and record["method"] == "alora"
    assert record["tasks"] == ["add", "parity"] and record["primary"] == {
        "add": "exact_match",
        "parity": "accuracy",
    }
    assert record["config"]["train"]["seed"] == 0 and record["wall_seconds"] > 0
    results = json.loads((cell.run_dir / "results.json").read_text())
    for task in record["tasks"]:
        scores = record["per_example"][task]["scores"]
        assert len(scores) == 6 and set(scores) <= {0.0, 1.0}
        metric = record["primary"][task]
        assert sum(scores) / len(scores) == pytest.approx(results["per_task"][task][metric])
        interval = results["intervals"]["per_task"][task]
        assert interval["method"] == "wilson" and interval["low"] <= interval["value"] <= interval["high"]
    assert results["intervals"]["average"]["value"] == pytest.approx(results["average"])


def test_shards_are_disjoint_and_complete_and_locked_cells_are_left_alone(env, campaign, tmp_path) -> None:
    cells = campaign["cells"]
    parts = [sweep.shard(cells, i, 4) for i in range(4)]
    ids = [c.id for part in parts for c in part]
    assert sorted(ids) == sorted(c.id for c in cells) and len(ids) == len(set(ids))
    with pytest.raises(ValueError, match="need 0 <= i < n"):
        sweep.parse_shard("2/2")
    # another process holds the first cell of a fresh campaign: this one skips it
    spec = sweep.load_sweep(env["sweep"])
    spec.out_dir = tmp_path / "fresh"
    spec.grid = [{"adapter.method": ["lora"], "train.seed": [0]}]
    (spec.out_dir / "locks").mkdir(parents=True)
    held = FileLock(str(spec.out_dir / "locks" / f"{sweep.expand(spec)[0].id}.lock"))
    with held:
        counts = sweep.run_sweep(spec, say=lambda *a: None)
    assert (
        counts == {"cells": 1, "done": 0, "ran": 0, "taken": 1, "failed": 0, "deferred": 0}
        and not spec.ledger.exists()
    )


def test_report_is_regenerated_from_the_ledger_alone(env, campaign, capsys) -> None:
    out = campaign["spec"].out_dir
    shutil.rmtree(out / "runs")  # the run directories are not needed
    assert cli_main(["sweep", str(env["sweep"]), "--report"]) == 0
    page = (out / "results.md").read_text()
    assert "| method=alora | 0,1 |" in page and " ± " in page  # two seeds: mean ± std
    assert "method=lora on add" in page and "ddof=1" in page
    summary = json.loads((out / "results.json").read_text())
    alora = next(g for g in summary["groups"] if g["label"] == "method=alora")
    records = [
        r for r in sweep.read_ledger(out / "ledger.jsonl") if r["method"] == "alora" and len(r["tasks"]) == 2
    ]
    averages = sorted(r["average"] for r in records)
    assert sorted(alora["average"]["values"]) == averages
    assert alora["average"]["std"] == pytest.approx(abs(averages[0] - averages[1]) / 2**0.5)  # ddof=1, n=2
    assert alora["delta_m"] is not None and len(alora["delta_m"]["values"]) == 2
    (paired,) = summary["paired"]
    assert (paired["a"], paired["b"], paired["seeds"]) == ("method=alora", "method=lora", [0, 1])
    assert 0 <= paired["tests"]["average"]["p_value"] <= 1
    # what would resolve the average's difference: from the per-seed differences of the records' averages
    lora = {r["seed"]: r["average"] for r in sweep.read_ledger(out / "ledger.jsonl")
            if r["method"] == "lora" and len(r["tasks"]) == 2}  # fmt: skip
    by_seed = {r["seed"]: r["average"] for r in records}
    resolve = paired["resolve"]
    assert resolve["per_seed_differences"] == pytest.approx([by_seed[s] - lora[s] for s in (0, 1)], abs=1e-12)
    assert resolve["seeds"] == stats.seeds_to_resolve(resolve["per_seed_differences"])
    assert resolve["examples_now"] == 6 and resolve["seeds_now"] == 2
    assert "method=alora − method=lora: " in page  # p = 1 here (equal scores): "no difference to resolve"
    assert (out / "results.png").stat().st_size > 0
    assert cli_main(["sweep", str(env["sweep"]), "--list"]) == 0
    listed = capsys.readouterr().out
    assert listed.count("done") >= 6
    # --list shows only the shard's cells, and a bad --shard is refused there too
    halves = []
    for part in ("0/2", "1/2"):
        assert cli_main(["sweep", str(env["sweep"]), "--list", "--shard", part]) == 0
        *lines, estimate = capsys.readouterr().out.splitlines()
        assert estimate.endswith(" to do") or "h on one worker" in estimate, estimate
        halves.append(lines)
    cells = [line for line in listed.splitlines() if "{" in line]
    assert sorted(halves[0] + halves[1]) == sorted(cells) and not set(halves[0]) & set(halves[1])
    assert abs(len(halves[0]) - len(halves[1])) <= 1
    for bad in ("1/0", "abc"):
        assert cli_main(["sweep", str(env["sweep"]), "--list", "--shard", bad]) == 2
    assert "--shard" in capsys.readouterr().err


def test_list_estimates_the_hours_left_from_the_done_cells_of_each_kind(env, tmp_path: Path) -> None:
    """6 cells: 4 of two tasks (lora/alora x seeds 0, 1), 2 single-task. The ledger holds two of the 2-task
    cells (train + eval: 3000 + 600 s, 5000 + 1000 s), a 2-task record of a cell no longer in the grid
    (10000 + 2000 s: it still tells the cost of its kind) and one whose training time is unknown (resumed
    from an older checkpoint: no cost). Median of 3600, 6000, 12000 s: 6000 s. One 2-task cell has a
    checkpoint at step 2. A float32 2-task cell (500 + 100 s) is of another kind: the grid trains in bf16.
    Left: 2 two-task cells x 6000 s = 3.3 h; the 2 single-task cells: no estimate."""
    spec = sweep.load_sweep(env["sweep"])
    spec = dataclasses.replace(spec, out_dir=tmp_path)
    cells = sweep.expand(spec)
    two = [c for c in cells if len(c.config.data.tasks) == 2]
    assert len(two) == 4 and len(cells) == 6
    bf16 = {"train": {"mixed_precision": "bf16"}}  # as the grid's cells: a kind is one precision
    records = [
        {"id": two[0].id, "tasks": ["add", "parity"], "train_seconds": 3000.0, "eval_seconds": 600.0},
        {"id": two[1].id, "tasks": ["add", "parity"], "train_seconds": 5000.0, "eval_seconds": 1000.0,
         "wall_seconds": 10.0},
        {"id": "0123456789ab", "tasks": ["add", "parity"], "train_seconds": 10000.0, "eval_seconds": 2000.0},
        {"id": "ba9876543210", "tasks": ["add", "parity"], "train_seconds": None, "eval_seconds": 900.0,
         "wall_seconds": 950.0},
        {"id": "fedcba987654", "tasks": ["add", "parity"], "train_seconds": 500.0, "eval_seconds": 100.0,
         "config": {"train": {"mixed_precision": None}}},  # float32: not this grid's kind
    ]  # fmt: skip
    records = [{"config": bf16, "seed": seed, **r} for seed, r in enumerate(records)]  # a cell each
    (tmp_path / "ledger.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (two[2].run_dir / "checkpoints" / "step-000002").mkdir(parents=True)
    statuses = sweep.cell_status(spec)
    assert [s for _, s in statuses].count("done") == 2 and [s for _, s in statuses].count("partial") == 1
    assert sweep.cell_progress(two[2]) == "checkpoint at step 2"
    assert sweep.estimate_line(spec, statuses) == (
        "2 done, 1 started, 3 to do; the 2 left of a kind already done: about 3.3 h on one worker "
        "(2 of kinds none of which is done: no estimate)"
    )
    assert sweep.cell_seconds({"kind": "federated", "round_seconds": 700.0, "wall_seconds": 900.0}) == 900.0
    assert sweep.cell_seconds({"kind": "federated", "round_seconds": 700.0, "wall_seconds": 90.0}) == 700.0
    # resumed after its rounds: 2,219 s of rounds in earlier processes, the last one's 490 s is the evaluation
    resumed = {"kind": "federated", "round_seconds": 2219.0, "eval_seconds": 400.0, "wall_seconds": 490.0}
    assert sweep.cell_seconds(resumed) == 2619.0
    assert (
        sweep.cell_seconds({**resumed, "wall_seconds": 2700.0}) == 2700.0
    )  # one process: loading counts too
    assert sweep.cell_seconds({**resumed, "eval_seconds": float("nan")}) == 2219.0  # hand-edited: unread


def test_ledger_values_are_strict_json() -> None:
    # a cell resumed after its training finished reports a NaN loss: the ledger stores null
    assert sweep._finite(float("nan")) is None and sweep._finite(float("inf")) is None
    assert sweep._finite([1.5, float("nan")]) == [1.5, None] and sweep._finite(0.25) == 0.25


def test_compare_runs_and_its_user_errors(env, campaign, tmp_path, capsys) -> None:
    spec = sweep.load_sweep(env["sweep"])
    spec.out_dir = tmp_path / "two"
    spec.grid = [{"adapter.method": ["lora", "alora"], "train.seed": [0], "train.steps": [2]}]
    sweep.run_sweep(spec, say=lambda *a: None)
    lora, alora = (c.run_dir for c in sweep.expand(spec))
    assert cli_main(["compare", str(alora), str(lora), "--json", str(tmp_path / "cmp.json")]) == 0
    table = capsys.readouterr().out
    assert "| parity | accuracy | 6 |" in table and "| average | primary | 12 |" in table
    tests = json.loads((tmp_path / "cmp.json").read_text())
    assert set(tests) == {"add", "parity", "average"}

    short = tmp_path / "short"
    shutil.copytree(lora, short)
    rows = (short / "per_example.jsonl").read_text().splitlines()
    (short / "per_example.jsonl").write_text("\n".join(r for r in rows if '"index": 5' not in r) + "\n")
    (bare := tmp_path / "bare").mkdir()
    damaged = tmp_path / "damaged"
    shutil.copytree(lora, damaged)
    (damaged / "per_example.jsonl").write_text("\n".join([*rows[:3], rows[3][:20], *rows[4:]]) + "\n")
    for argv, message in [
        ([str(alora), str(short)], "run A was scored on 6 examples and run B on 5"),
        ([str(alora), str(damaged)], "per_example.jsonl line 4 is not a per-example record"),
        ([str(alora), str(bare)], "asymlora eval"),
        ([str(alora), str(tmp_path / "nope")], "is not a directory"),
        ([str(alora), str(lora), "--json", str(tmp_path)], "is a folder; give a file name"),
    ]:
        assert cli_main(["compare", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err

    # a plain-LoRA run has one adapter shared by its tasks: exported as --task 0, not by a task's name
    for task, extra in (("parity", []), ("1", []), ("parity", ["--calibration", "train"])):
        assert cli_main(["export", str(lora), "--task", task, "--out", str(tmp_path / task), *extra]) == 2
        err = capsys.readouterr().err
        assert "all its tasks share" in err and "pass --task 0" in err and "Traceback" not in err
        assert not (tmp_path / task).exists()
    assert cli_main(["export", str(lora), "--task", "0", "--out", str(tmp_path / "all")]) == 0
    assert (tmp_path / "all" / "adapter_config.json").is_file()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("out_dir: x\ngrid: {adapter.method: alora}\n", "must be a non-empty list"),
        ("out_dir: x\ngrid: {adapter.methd: [alora]}\n", "adapter.methd"),
        ("grid: {adapter.method: [alora]}\n", "set out_dir"),
        ("out_dir: x\ngrids: {}\n", "unknown keys ['grids']"),
        ("out_dir: x\noverrides: ['compare.methods=[lora,alora]', 'data.tasks=[a]']\ngrid: {train.seed: [0]}\n",
         "a sweep cell is one run"),
        ("out_dir: x\norder_by: [train.sed]\ngrid: {train.seed: [0], data.tasks: [[bigbench:strategyqa]]}\n", "'train.sed' is not a config key"),
        ("out_dir: x\norder_by: train.seed\ngrid: {train.seed: [0]}\n", "order_by must be a list"),
        ("- out_dir\n- grid\n", "a sweep file is a mapping of ['base', 'grid'"),
        ("hello\n", "not a str"),
        ("out_dir:\ngrid: {train.seed: [0]}\n", "out_dir=None must be a folder path"),
        ("out_dir: [a, b]\ngrid: {train.seed: [0]}\n", "out_dir=['a', 'b'] must be a folder path"),
        ("out_dir: a_file\ngrid: {train.seed: [0], data.tasks: [[bigbench:strategyqa]]}\n", "a_file' is a file; give a folder"),
    ],
)  # fmt: skip
def test_sweep_user_errors_exit_2(tmp_path, capsys, text, message) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    (tmp_path / "a_file").write_text("")
    assert cli_main(["sweep", str(path), "--list"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_report_of_a_record_without_its_scores_exits_2(tmp_path, capsys) -> None:
    path = tmp_path / "sweep.yaml"
    path.write_text("out_dir: out\ngrid: {train.seed: [0], data.tasks: [[bigbench:strategyqa]]}\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "ledger.jsonl").write_text(
        '{"id": "abc", "params": {}, "seed": 0, "method": "lora"}\n'
    )
    assert cli_main(["sweep", str(path), "--report"]) == 2
    err = capsys.readouterr().err
    assert "the record of cell 'abc' lacks ['tasks', 'per_task', 'primary'" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("flag", "key"),
    [("--report", "per_example"), ("--report", "steps"), ("--report", "trainable_params"),
     ("--report", "intervals"), ("--report", "tasks"), ("--list", "tasks")],
)  # fmt: skip
def test_a_record_without_a_key_the_report_reads_exits_2(env, campaign, tmp_path, capsys, flag, key) -> None:
    """A record of the tiny campaign with one key the report reads removed: --report exits 2 naming the cell and
    the key, not a KeyError; --list (whose estimate read the record's tasks) lists the cells."""
    record = sweep.read_ledger(campaign["spec"].ledger)[0]
    record["train_seconds"] = 10.0  # --list's estimate reads the tasks of a record with a cost
    del record[key]
    spec = yaml.safe_load(env["sweep"].read_text())
    spec["out_dir"] = str(tmp_path / "out")
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(spec))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "ledger.jsonl").write_text(json.dumps(record) + "\n")
    if flag == "--list":
        assert cli_main(["sweep", str(tmp_path / "sweep.yaml"), flag]) == 0
        assert f"{record['id']}  done" in capsys.readouterr().out
        return
    assert cli_main(["sweep", str(tmp_path / "sweep.yaml"), flag]) == 2
    err = capsys.readouterr().err
    assert f"the record of cell {record['id']!r} lacks [{key!r}]" in err and "Traceback" not in err


@pytest.mark.parametrize("line", ["[1, 2]", "42", '{"params": {"train.seed": 1}}'])
@pytest.mark.parametrize("flag", ["--list", "--report"])
def test_ledger_line_that_is_not_a_record_exits_2(tmp_path, capsys, line, flag) -> None:
    path = tmp_path / "sweep.yaml"
    path.write_text("out_dir: out\ngrid: {train.seed: [0], data.tasks: [[bigbench:strategyqa]]}\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "ledger.jsonl").write_text('{"id": "abc", "params": {}}\n' + line + "\n")
    assert cli_main(["sweep", str(path), flag]) == 2
    err = capsys.readouterr().err
    assert "ledger.jsonl, line 2: not a record" in err and "remove or fix the line" in err


def test_list_and_report_together_are_refused(tmp_path, capsys) -> None:
    path = tmp_path / "sweep.yaml"
    path.write_text("out_dir: out\ngrid: {train.seed: [0], data.tasks: [[bigbench:strategyqa]]}\n")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["sweep", str(path), "--list", "--report"])
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_keep_going_logs_a_failing_cell_and_runs_the_others(env, tmp_path, monkeypatch) -> None:
    spec = sweep.load_sweep(env["sweep"])
    spec.out_dir = tmp_path / "failing"
    spec.grid = [{"adapter.method": ["lora"], "train.seed": [0, 1], "train.steps": [1]}]
    real_run = multitask.run

    def failing_run(cfg, **kwargs):
        if cfg.train.seed == 0:
            raise ValueError("planted failure")
        return real_run(cfg, **kwargs)

    monkeypatch.setattr(multitask, "run", failing_run)
    counts = sweep.run_sweep(spec, keep_going=True, say=lambda *a: None)
    assert counts == {"cells": 2, "done": 0, "ran": 1, "taken": 0, "failed": 1, "deferred": 0}
    (failure,) = sweep.read_ledger(spec.out_dir / "failures.jsonl")
    assert failure["params"]["train.seed"] == 0 and "planted failure" in failure["error"]
    assert [r["seed"] for r in sweep.read_ledger(spec.ledger)] == [1]
    with pytest.raises(ValueError, match="planted failure"):
        sweep.run_sweep(spec, say=lambda *a: None)


def test_a_cell_killed_after_its_results_but_before_its_record_is_recorded_once(
    env, tmp_path, monkeypatch
) -> None:
    spec = sweep.load_sweep(env["sweep"])
    spec.out_dir = tmp_path / "late"
    spec.grid = [{"adapter.method": ["lora"], "train.seed": [3], "train.steps": [2]}]
    real_append, real_train = sweep.append_record, asymlora.train.train
    resumed: list = []

    def dying_append(path, record):
        raise Killed

    def watching_train(*args, **kwargs):
        result = real_train(*args, **kwargs)
        resumed.append(result.resumed_from)
        return result

    monkeypatch.setattr(asymlora.train, "train", watching_train)
    monkeypatch.setattr(sweep, "append_record", dying_append)
    with pytest.raises(Killed):
        sweep.run_sweep(spec, say=lambda *a: None)
    (cell,) = sweep.expand(spec)
    assert (cell.run_dir / "results.json").is_file() and not spec.ledger.exists()
    monkeypatch.setattr(sweep, "append_record", real_append)
    assert sweep.run_sweep(spec, say=lambda *a: None)["ran"] == 1
    assert resumed == [None, 2]  # the second pass trains no step: it resumes from the final checkpoint
    assert [r["id"] for r in sweep.read_ledger(spec.ledger)] == [cell.id]


def test_a_compare_run_with_single_task_baselines_gets_intervals_and_a_paired_delta_m(env, tmp_path) -> None:
    from asymlora.config import load_config

    spec = sweep.load_sweep(env["sweep"])
    overrides = [*spec.overrides, "train.steps=2", "train.lr=0.05", "compare.methods=[lora,alora]",
                 "compare.single_task=true", f"run_dir={tmp_path / 'cmp'}"]  # fmt: skip
    combined = multitask.run(load_config(None, overrides), quiet=True)
    results = json.loads((tmp_path / "cmp" / "alora" / "results.json").read_text())
    intervals = results["intervals"]
    single = {
        t: multitask.read_examples(tmp_path / "cmp" / "single" / t / "per_example.jsonl")[t]
        for t in ("add", "parity")
    }
    usable = [t for t in single if sum(r["scores"][results["primary"][t]] for r in single[t]) > 0]
    assert usable  # Δm% runs over the tasks whose baseline is not 0, from the same per-example scores
    assert intervals["delta_m"]["tasks"] == usable
    assert intervals["delta_m"]["value"] == pytest.approx(results["delta_m"])
    assert intervals["average"]["value"] == pytest.approx(results["average"])
    assert set(combined["methods"]["lora"]["intervals"]["per_task"]) == {"add", "parity"}
    table = (tmp_path / "cmp" / "results.md").read_text()
    assert "95 % interval" in table and table.count("[") >= 8
    # `asymlora eval` re-scores the methods and keeps Δm% against the run's own single-task baselines
    from asymlora.recipes.evaluate import evaluate_run

    evaluate_run(tmp_path / "cmp")
    again = json.loads((tmp_path / "cmp" / "alora" / "results.json").read_text())
    assert again["delta_m"] is not None and again["delta_m"] == pytest.approx(results["delta_m"])
    assert again["intervals"]["delta_m"]["value"] == pytest.approx(results["delta_m"])


def test_list_into_a_closed_pipe_ends_quietly(env) -> None:
    """`asymlora sweep --list | head -1`: the reader goes away before the listing is written; the command
    ends with the shell's SIGPIPE status and no traceback."""
    import os
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "asymlora.cli", "sweep", str(env["sweep"]), "--list"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    proc.stdout.close()  # the reader is gone before anything is printed
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err


def test_records_name_their_hardware_and_the_report_warns_when_it_differs(tiny_llama) -> None:
    from asymlora.models import hardware
    from asymlora.recipes.sweep import hardware_line

    hw = hardware(tiny_llama)
    assert (hw["device"], hw["dtype"], hw["torch_threads"]) == ("cpu", "float32", torch.get_num_threads())
    cpu = {"device": "cpu", "dtype": "float32", "device_name": "AMD EPYC", "torch_threads": 2}
    gpu = {"device": "cuda", "dtype": "bfloat16", "device_name": "NVIDIA H200", "torch_threads": 8}
    same = [{"id": "a", "hardware": cpu}, {"id": "b", "hardware": cpu}, {"id": "a", "hardware": cpu}]
    assert (
        hardware_line(same) == "Hardware: cpu float32 (AMD EPYC): 2 runs."
    )  # the last record of an id counts
    mixed = hardware_line([{"id": "a", "hardware": cpu}, {"id": "b", "hardware": gpu}, {"id": "c"}])
    assert mixed.startswith(
        "Hardware: cpu float32 (AMD EPYC): 1 run, cuda bfloat16 (NVIDIA H200): 1 run, not recorded: 1 run. "
        "**The runs did not all compute on the same kind"
    )
    bf16 = {"id": "d", "hardware": cpu, "config": {"train": {"mixed_precision": "bf16"}}}
    assert hardware_line([bf16]) == "Hardware: cpu float32, bf16 autocast in training (AMD EPYC): 1 run."
    assert "**The runs did not all" in hardware_line([same[0], bf16])  # float32 and bf16 training mixed


def test_records_from_before_mixed_precision_group_with_new_ones() -> None:
    from asymlora.config import load_config
    from asymlora.recipes.sweep import cell_id, group_records

    def record(seed: int, legacy: bool) -> dict:
        cfg = load_config(None, ["data.tasks=[bigbench:strategyqa]", f"train.seed={seed}"])
        config = cfg.to_dict()
        if legacy:  # a ledger record written before train.mixed_precision existed
            del config["train"]["mixed_precision"]
        return {"id": cell_id(cfg), "params": {"train.seed": seed}, "seed": seed, "method": "alora",
                "tasks": ["strategyqa"], "primary": {"strategyqa": "accuracy"}, "config": config}  # fmt: skip

    assert [g.seeds for g in group_records([record(0, True), record(1, False)])] == [[0, 1]]
    bf16 = record(2, False)
    bf16["config"]["train"]["mixed_precision"] = "bf16"
    assert [g.seeds for g in group_records([record(0, True), bf16])] == [[0], [2]]


def test_paired_report_says_what_would_resolve_an_unresolved_average() -> None:
    """Two groups over seeds 0 and 1, two tasks of 4 examples. Seed 0: A − B = +0.25 on x, 0 on y (average
    +0.125); seed 1: +0.5 on x, −0.25 on y (average +0.125)... (by hand below). The report line names the
    per-seed spread's answer and the examples' answer, each what `stats` gives for the hand-made inputs."""
    from asymlora.recipes.groups import SeedGroup, paired_lines, paired_over_seeds

    def record(seed: int, x: list[int], y: list[int]) -> dict:
        rows = {t: {"keys": t, "scores": v} for t, v in (("x", x), ("y", y))}
        return {"seed": seed, "per_example": rows}

    a = SeedGroup("A", [record(0, [1, 1, 0, 0], [1, 0, 1, 0]), record(1, [1, 1, 1, 0], [0, 0, 1, 0])])
    b = SeedGroup("B", [record(0, [1, 0, 0, 0], [1, 0, 1, 0]), record(1, [0, 1, 0, 0], [1, 0, 1, 0])])
    result = paired_over_seeds(a, b, ["x", "y"], lambda rec, t: rec["per_example"].get(t))
    assert result is not None
    resolve = result["resolve"]
    # seed 0: x 0.50 − 0.25 = 0.25, y 0 → 0.125; seed 1: x 0.75 − 0.25 = 0.5, y 0.25 − 0.5 = −0.25 → 0.125
    assert resolve["per_seed_differences"] == pytest.approx([0.125, 0.125])
    assert resolve["seeds"] is None  # the same difference on both seeds: no spread to size a study by
    # the seed-averaged per-example differences: x [0.5, 0.5, 0.5, 0] (A seeds avg [1, 1, .5, 0] − B [.5, .5, 0, 0]),
    # y [-0.5, 0, 0, 0] (A [.5, 0, 1, 0] − B [1, 0, 1, 0])
    assert resolve["examples_per_unit"] == stats.examples_to_resolve(
        {"x": [0.5, 0.5, 0.5, 0.0], "y": [-0.5, 0.0, 0.0, 0.0]}, {"x": [0.0] * 4, "y": [0.0] * 4}
    )
    # by hand: both tasks' differences have sample variance 0.0625, so s = sqrt(0.125) / 2 and the effect
    # 0.125 / s = 0.707: a t-test needs 17.7 → 18 observations for 80 % power
    assert resolve["examples_per_unit"] == 18
    assert resolve["examples_now"] == 4 and resolve["seeds_now"] == 2
    lines = "\n".join(paired_lines([{"a": "A", "b": "B", **result}], ["x", "y"], "Paired:", "task"))
    assert result["tests"]["average"]["p_value"] >= 0.05  # 4 examples: unresolved
    assert "- A − B: +0.1250 (p=" in lines and "≈ 18 test examples per task (now 4)" in lines
    assert "the 2 seeds gave the same difference" in lines


def test_paired_report_tests_the_average_over_three_seeds() -> None:
    """One task of 4 examples, three seeds. A − B per seed: seed 0 (A [1, 1, 1, 0], B [0, 0, 0, 0]) +0.75,
    seed 1 (A [1, 1, 0, 0], B [1, 0, 0, 0]) +0.25, seed 2 (A [1, 0, 0, 0], B [1, 0, 0, 0]) 0. Their mean 1/3,
    sample variance ((5/12)² + (1/12)² + (4/12)²)/2 = 42/288, t = (1/3) / sqrt(42/864) and, at 2 degrees of
    freedom, p = 1 − t / sqrt(2 + t²) (by hand); two seeds get no such line."""
    from asymlora.recipes.groups import SeedGroup, paired_lines, paired_over_seeds

    def record(seed: int, x: list[int]) -> dict:
        return {"seed": seed, "per_example": {"x": {"keys": "x", "scores": x}}}

    a_rows = [[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]]
    b_rows = [[0, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0]]
    a = SeedGroup("A", [record(s, x) for s, x in enumerate(a_rows)])
    b = SeedGroup("B", [record(s, x) for s, x in enumerate(b_rows)])
    result = paired_over_seeds(a, b, ["x"], lambda rec, t: rec["per_example"].get(t))
    assert isinstance(result, dict)
    t = (1 / 3) / math.sqrt(42 / 864)
    test = result["resolve"]["seed_test"]
    assert result["resolve"]["per_seed_differences"] == pytest.approx([0.75, 0.25, 0.0])
    assert test["t"] == pytest.approx(t) and test["p_value"] == pytest.approx(1 - t / math.sqrt(2 + t**2))
    lines = paired_lines([{"a": "A", "b": "B", **result}], ["x"], "Paired:", "task")
    line = next(x for x in lines if x.startswith("- A − B: 0.333 ["))
    assert line.endswith(
        f"(p={test['p_value']:.3g}, t = {t:.2f}, 3 seeds); per seed +0.7500, +0.2500, +0.0000"
    )
    assert any("one-sample t-test of the per-seed differences" in x for x in lines)
    two = paired_over_seeds(SeedGroup("A", a.records[:2]), SeedGroup("B", b.records[:2]), ["x"],
                            lambda rec, t: rec["per_example"].get(t))  # fmt: skip
    assert isinstance(two, dict) and two["resolve"]["seed_test"] is None
    assert not any(
        "t-test of the per-seed" in x
        for x in paired_lines([{"a": "A", "b": "B", **two}], ["x"], "P:", "task")
    )


def test_a_record_names_the_commit_its_process_started_on_and_only_source_changes_make_it_dirty(
    tmp_path: Path,
) -> None:
    """A cell's record named the commit at the END of the cell (`git describe` run then), so a commit made
    while it trained was recorded as the code that ran; and ``--dirty`` looked at the whole repository, so
    once the campaign had appended to its own tracked ledger every later record said "-dirty". Reference:
    the sha git itself gives for the commit (``git rev-parse``)."""
    import subprocess

    def git(*args: str) -> str:
        out = subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                             capture_output=True, text=True, check=True)  # fmt: skip
        return out.stdout.strip()

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "code.py").write_text("x = 1\n")
    (tmp_path / "ledger.jsonl").write_text("")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "one")
    first = git("rev-parse", "--short=12", "HEAD")
    sweep.git_commit.cache_clear()
    (tmp_path / "ledger.jsonl").write_text("{}\n")  # the campaign's own tracked output changed
    assert sweep.git_commit(tmp_path / "src") == first
    (tmp_path / "src" / "code.py").write_text("x = 2\n")
    git("commit", "-qam", "two")  # a commit made while the process runs
    assert sweep.git_commit(tmp_path / "src") == first  # still the code the process started on
    sweep.git_commit.cache_clear()
    (tmp_path / "src" / "code.py").write_text("x = 3\n")
    assert sweep.git_commit(tmp_path / "src") == git("rev-parse", "--short=12", "HEAD") + "-dirty"
    sweep.git_commit.cache_clear()


def test_report_gives_each_seeds_steps_and_says_when_a_time_is_of_fewer_seeds(
    env, campaign, tmp_path
) -> None:
    """The stopping rule stops each seed on its own (the campaign's LoRA: 500 and 550 steps) and a cell
    resumed after training records no training time: the table showed the first seed's steps and the timed
    seeds' mean as if it were every seed's."""
    spec = yaml.safe_load(env["sweep"].read_text())
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(spec))
    (tmp_path / "campaign").mkdir()
    records = sweep.read_ledger(campaign["spec"].ledger)
    alora = sorted((r for r in records if r["method"] == "alora"), key=lambda r: r["seed"])
    alora[0]["train_seconds"], alora[0]["step_seconds"] = 30.0, 7.5
    alora[1]["train_seconds"], alora[1]["step_seconds"] = None, None  # resumed after training
    alora[0]["steps"], alora[1]["steps"] = 4, 5
    (tmp_path / "campaign" / "ledger.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert cli_main(["sweep", str(tmp_path / "sweep.yaml"), "--report"]) == 0
    row = next(line for line in (tmp_path / "campaign" / "results.md").read_text().splitlines()
               if line.startswith("| method=alora | 0,1 |"))  # fmt: skip
    assert row.endswith("| 30.0 (1 of 2 seeds) | 7.50 (1 of 2 seeds) | 4 / 5 |"), row
    lora = next(line for line in (tmp_path / "campaign" / "results.md").read_text().splitlines()
                if line.startswith("| method=lora | 0,1 |"))  # fmt: skip
    assert "seeds)" not in lora and lora.endswith("| 4 / 4 |"), lora


def test_paired_report_names_the_per_task_differences_that_survive_holm() -> None:
    """Task x: A right and B wrong on all 20 examples, sign test p = 2/2²⁰; task y: 3 examples for A, 1 for
    B, 2 ties, p = (1 + 4 + 4 + 1)/16 = 0.625 (by hand). Holm over the two tasks: x 2·2/2²⁰ = 3.81e-06,
    y max(3.81e-06, 0.625) = 0.625: only x is called different."""
    from asymlora.recipes.groups import SeedGroup, paired_lines, paired_over_seeds

    scores = {"A": {"x": [1] * 20, "y": [1, 1, 1, 0, 0, 0]}, "B": {"x": [0] * 20, "y": [0, 0, 0, 1, 0, 0]}}
    a, b = (SeedGroup(k, [{"seed": 0, "per_example": {t: {"keys": t, "scores": v} for t, v in scores[k].items()}}])
            for k in "AB")  # fmt: skip
    result = paired_over_seeds(a, b, ["x", "y"], lambda r, t: r["per_example"][t])
    assert result is not None
    assert result["tests"]["x"]["p_value"] == pytest.approx(2 / 2**20)
    assert result["tests"]["y"]["p_value"] == pytest.approx(0.625)
    assert result["tests"]["x"]["p_holm"] == pytest.approx(4 / 2**20)
    assert result["tests"]["y"]["p_holm"] == pytest.approx(0.625)
    lines = paired_lines([{"a": "A", "b": "B", **result}], ["x", "y"], "Paired:", "task")
    assert "- A − B: x +1.000 (p_Holm=3.81e-06)" in lines


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("2h30m", 9000.0), ("90m", 5400.0), ("1.5h", 5400.0), ("5400s", 5400.0), ("5400", 5400.0), ("1h1m1s", 3661.0),
     (" 45m ", 2700.0), (None, None)],
)  # fmt: skip
def test_time_limit_durations(text, seconds) -> None:
    assert sweep.parse_time_limit(text) == seconds


@pytest.mark.parametrize(
    "text", ["", "0", "0h0m", "2 hours", "h", "5x", "1d", "30m2h", "1h30", "inf", "nan", "1e3"]
)
def test_a_bad_time_limit_exits_2_naming_it_and_the_forms(env, text, capsys) -> None:
    assert cli_main(["sweep", str(env["sweep"]), "--time-limit", text]) == 2
    err = capsys.readouterr().err
    assert f"--time-limit {text!r}" in err and "2h30m" in err and "Traceback" not in err


@pytest.mark.parametrize("flag", ["--list", "--report"])
def test_time_limit_with_list_or_report_exits_2(env, flag, capsys) -> None:
    assert cli_main(["sweep", str(env["sweep"]), "--time-limit", "1h", flag]) == 2
    err = capsys.readouterr().err
    assert "--time-limit limits a run; --list and --report run no cell" in err and "Traceback" not in err


def test_time_limit_starts_no_cell_that_the_done_cells_of_its_kind_say_would_not_finish(
    env, tmp_path, monkeypatch, capsys
) -> None:
    """The ledger holds one done 2-task cell of another grid (3000 + 600 s: the cost of its kind) and records
    whose times or tasks are not numbers / a list (hand-edited: skipped, not a crash, not a cost). With 3599 s
    left the four 2-task cells (3600 s each) are deferred, and told that no run of this limit will start them;
    the two single-task cells (a kind none of which is done: cost unknown) start. Once the time limit has
    passed no cell starts; a cell another process holds counts as held, not deferred; the CLI says how many
    were left for next time."""
    spec = dataclasses.replace(sweep.load_sweep(env["sweep"]), out_dir=tmp_path)
    record = {
        "id": "0123456789ab",
        "tasks": ["add", "parity"],
        "train_seconds": 3000.0,
        "eval_seconds": 600.0,
        "config": {"train": {"mixed_precision": "bf16"}},  # as the grid's cells
    }
    bad = [{**record, "id": "a", "train_seconds": "5", "eval_seconds": 0}, {**record, "id": "b", "tasks": 3},
           {**record, "id": "c", "train_seconds": float("nan")}, {**record, "id": "d", "train_seconds": -9000.0},
           {**record, "id": "e", "train_seconds": True}]  # fmt: skip
    bad = [{**r, "seed": seed} for seed, r in enumerate(bad, start=1)]  # a cell each (`cell_key`)
    earlier = {**record, "train_seconds": 1e6}  # the same cell recorded before: its last record counts
    spec.ledger.write_text("".join(json.dumps(r) + "\n" for r in [*bad, earlier, record]))
    ran: list[str] = []
    fake = lambda cell, ledger: ran.append(cell.id) or {"average": 0.5, "wall_seconds": 1.0}  # noqa: E731
    monkeypatch.setattr(sweep, "run_cell", fake)
    said: list[str] = []
    counts = sweep.run_sweep(spec, deadline=time.monotonic() + 3599, say=said.append)
    single = [c.id for c in sweep.expand(spec) if len(c.config.data.tasks) == 1]
    assert (
        counts == {"cells": 6, "done": 0, "ran": 2, "taken": 0, "failed": 0, "deferred": 4} and ran == single
    )
    why = (r"not started: cells of its kind took about 3,600 s \(1\.0 h\), 3,59\d s of the time limit is left; "
           r"more than the whole --time-limit \(3,59\d s\): give a longer one, or none, to run it$")  # fmt: skip
    assert sum(bool(re.search(why, line)) for line in said) == 4, said
    two = next(c for c in sweep.expand(spec) if len(c.config.data.tasks) == 2)
    assert sweep.too_late(spec, two, time.monotonic() + 3000, limit=7200.0) == (
        "cells of its kind took about 3,600 s (1.0 h), 3,000 s of the time limit is left"
    )  # a later run of this 2 h limit can start it: no advice
    # 1 h fits (a minute to spare: the time left shrinks while the sweep reads the ledger for each cell, and a
    # loaded machine took more than 1 s to reach the last cell)
    assert sweep.run_sweep(spec, deadline=time.monotonic() + 3660, say=said.append)["ran"] == 6
    said.clear()
    with FileLock(str(spec.out_dir / "locks" / f"{two.id}.lock")):  # another process runs it
        counts = sweep.run_sweep(spec, deadline=time.monotonic() - 1, say=said.append)
    assert (counts["deferred"], counts["taken"]) == (5, 1)
    # (on a CPU without bfloat16 instructions the sweep first warns that these bf16 cells would be slow)
    said = [line for line in said if "another process" not in line and not line.startswith("warning: ")]
    assert all(line.endswith("not started: the time limit is reached") for line in said)
    # the CLI: the limit counts from its start; 1 h is less than the 3600 s a 2-task cell takes by now
    text = yaml.safe_load(env["sweep"].read_text())
    (tmp_path / "cli").mkdir()
    (tmp_path / "cli" / "ledger.jsonl").write_text(json.dumps(record) + "\n")
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({**text, "out_dir": str(tmp_path / "cli")}))
    monkeypatch.setattr(sweep, "write_report", lambda s: "results.md")
    assert cli_main(["sweep", str(tmp_path / "sweep.yaml"), "--time-limit", "1h"]) == 0
    assert (
        "2 run now, 0 held by another process, 0 failed, 4 not started (--time-limit)"
        in capsys.readouterr().out
    )
