"""Defects found by the audit of `asymlora sweep`, `asymlora compare` and the report's statistics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from asymlora.cli import main as cli_main
from asymlora.eval import stats
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


def _list_sweep(tmp_path: Path, steps: int) -> Path:
    """A sweep of two cells (LoRA, ALoRA) whose data is never read: only `--list` runs."""
    spec = {"out_dir": "campaign", "overrides": ['data.tasks=["jsonl:/data.jsonl#x", "jsonl:/data.jsonl#z"]',
            f"train.steps={steps}"], "grid": {"adapter.method": ["lora", "alora"]}}  # fmt: skip
    path = tmp_path / f"sweep{steps}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _record(cell: sweep.Cell) -> dict:
    return {"id": cell.id, "params": cell.params, "seed": 0, "config": cell.config.to_dict()}


def test_list_names_the_ledger_records_of_no_cell_of_the_grid(tmp_path, capsys) -> None:
    """The sweep file changed after its cells were done (train.steps 4 -> 5): every cell got a new id and `--list`
    showed them all `todo`, without a word that the ledger holds records of cells no longer in the grid (which
    `--report` goes on showing beside the new ones)."""
    old = sweep.load_sweep(_list_sweep(tmp_path, 4))
    old.out_dir.mkdir()
    old.ledger.write_text("".join(json.dumps(_record(c)) + "\n" for c in sweep.expand(old)))
    new = _list_sweep(tmp_path, 5)
    assert cli_main(["sweep", str(new), "--list"]) == 0
    out = capsys.readouterr().out
    assert "0 done, 0 started, 2 to do" in out
    ids = [c.id for c in sweep.expand(old)]
    assert f"2 record(s) of {old.ledger} are of no cell of this grid (cells {', '.join(ids)})" in out
    assert cli_main(["sweep", str(_list_sweep(tmp_path, 4)), "--list"]) == 0
    assert "no cell of this grid" not in capsys.readouterr().out  # the grid of the records: nothing to say


def test_list_shows_a_failed_cell_as_failed_with_its_error(tmp_path, capsys) -> None:
    """A cell whose run raised (--keep-going logs it to failures.jsonl) was listed as `partial` ("started"), as
    a cell in progress or killed is: nothing said that it failed, or why."""
    spec = sweep.load_sweep(_list_sweep(tmp_path, 4))
    lora, alora = sweep.expand(spec)
    lora.run_dir.mkdir(parents=True)
    alora.run_dir.mkdir(parents=True)
    error = "TrainingError: the loss became nan at step 4"
    (spec.out_dir / sweep.FAILURES_FILE).write_text(json.dumps({"id": alora.id, "error": error}) + "\n")
    assert cli_main(["sweep", str(spec.path), "--list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{lora.id}  partial")
    assert out[1].startswith(f"{alora.id}  failed") and out[1].endswith(f"({error})")
    assert out[2].startswith("0 done, 1 started, 0 to do, 1 failed")


def test_report_refuses_a_bad_shard(tmp_path, capsys) -> None:
    """`--report --shard 3/2` wrote the report and exited 0 (the shard was parsed after --report returned)."""
    assert cli_main(["sweep", str(_list_sweep(tmp_path, 4)), "--report", "--shard", "3/2"]) == 2
    assert "--shard '3/2': need 0 <= i < n" in capsys.readouterr().err


def test_compare_names_the_task_and_example_of_a_non_finite_score() -> None:
    """A NaN score in run B's task "z" (a hand-edited or damaged per_example.jsonl) was reported as "task 'task':
    per-example scores must be finite numbers": the placeholder name of `stats.paired_test`, not the task."""

    def rows(task: str, values: list[float]) -> list[dict]:
        return [{"key": f"{task}{i}", "scores": {"accuracy": v}} for i, v in enumerate(values)]

    a = {"x": rows("x", [1, 0, 1]), "z": rows("z", [1, 1, 0])}
    b = {"x": rows("x", [0, 0, 1]), "z": rows("z", [1, float("nan"), 0])}
    with pytest.raises(ValueError, match=r"\(run B\): task 'z': .* finite numbers, example 1 is nan"):
        stats.compare_examples(a, b, {"x": "accuracy", "z": "accuracy"})


@pytest.mark.parametrize("key", [None, 7])
def test_compare_of_a_per_example_row_without_its_key_exits_2(tmp_path, capsys, key) -> None:
    """A per_example.jsonl row without its example key (hand-written, or damaged) ended `asymlora compare` in a
    KeyError traceback: the key is what tells two runs were scored on the same examples."""
    from tests.test_report_review10 import _run_dir

    a = _run_dir(tmp_path / "a", {"x": ("accuracy", [1.0, 0.0])})
    b = _run_dir(tmp_path / "b", {"x": ("accuracy", [1.0, 1.0])})
    rows = [json.loads(line) for line in (b / "per_example.jsonl").read_text().splitlines()]
    rows[1]["key"] = key
    rows[1] = {k: v for k, v in rows[1].items() if v is not None}
    (b / "per_example.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli_main(["compare", str(a), str(b)]) == 2
    err = capsys.readouterr().err
    assert "per_example.jsonl line 2 is not a per-example record" in err and "Traceback" not in err


def test_a_pair_of_groups_scored_on_other_examples_is_named_not_dropped(tmp_path) -> None:
    """ALoRA seed 0 scored on other test examples of z than LoRA seed 0 (another eval.max_examples, say): the
    report's paired tests of the two groups vanished from the page and from results.json without a word (the
    reader could not tell a pair not tested from a pair not run). Now the pair is named with the reason."""
    from tests.test_report_review10 import _mt_record, _report

    a, b = (
        _mt_record("alora", 0, {"x": [1, 0, 1], "z": [1, 1, 0]}),
        _mt_record("lora", 0, {"x": [0, 0, 1], "z": [1, 0]}),
    )
    b["per_example"]["z"]["keys"] = "other"
    page, summary = _report(tmp_path, [a, b], "multitask", "alora")
    assert summary["paired"] == []
    why = "z: scored on other test examples in method=lora seed 0 than in method=alora seed 0 (their example keys"
    ((pair, reason),) = [((p["a"], p["b"]), p["why"]) for p in summary["unpaired"]]
    assert pair == ("method=alora", "method=lora") and reason.startswith(why)
    assert f"No paired test of:\n\n- method=alora − method=lora: {why}" in page


def test_a_federated_pair_without_a_shared_seed_is_named_not_dropped(tmp_path) -> None:
    """The same for federated groups: Fed-ALoRA seed 0 and FedIT seed 1 share no seed, and their pair left the
    page without a word."""
    from tests.test_report_review10 import _client, _fed_record, _report

    records = [
        _fed_record("fedalora", 0, [_client("c0", [1, 1, 0, 0])]),
        _fed_record("fedit", 1, [_client("c0", [1, 0, 0, 0])]),
    ]
    page, summary = _report(tmp_path, records, "federated", "fedalora")
    assert summary["paired"] == []
    assert [(p["a"], p["b"], p["why"]) for p in summary["unpaired"]] == [
        ("fedalora", "fedit", "no seed in common (seeds [0] and [1])")
    ]
    assert "- fedalora − fedit: no seed in common (seeds [0] and [1])" in page


def test_report_refuses_a_record_without_its_config(tmp_path, capsys) -> None:
    """A hand-edited ledger line without ``config`` ended `--report` in a KeyError traceback (exit 1): the groups
    are keyed by the config. Now it is refused as the records lacking another key the report reads (exit 2)."""
    from tests.test_report_review10 import _mt_record

    record = _mt_record("alora", 0, {"x": [1, 0, 1], "z": [1, 1, 0]})
    del record["config"]
    (tmp_path / "ledger.jsonl").write_text(json.dumps(record) + "\n")
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({"out_dir": ".", "grid": {"train.seed": [0]}}))
    assert cli_main(["sweep", str(tmp_path / "sweep.yaml"), "--report"]) == 2
    assert f"the record of cell {record['id']!r} lacks ['config']" in capsys.readouterr().err


def test_the_report_reads_the_ledger_under_the_report_lock(tmp_path, monkeypatch) -> None:
    """Two workers finishing cells together: the report that read the ledger first could be written last
    (a full campaign's report takes about a minute) and leave the pages without the other worker's cell. The
    report now reads the ledger and writes its pages under one lock, so reports are written in the order they
    read."""
    from filelock import FileLock, Timeout

    spec = sweep.load_sweep(_list_sweep(tmp_path, 4))
    held = []

    def summarize(_):
        try:
            with FileLock(str(sweep.report_lock(spec)), timeout=0):
                held.append(False)
        except Timeout:
            held.append(True)
        raise RuntimeError("stop after the check")

    monkeypatch.setattr(sweep, "summarize_ledger", summarize)
    with pytest.raises(RuntimeError, match="stop after the check"):
        sweep.write_report(spec)
    assert held == [True]
    with FileLock(str(sweep.report_lock(spec)), timeout=0):  # and released after a failed report
        pass


def test_delta_m_notes_name_a_task_left_out_for_a_zero_baseline() -> None:
    """A task whose single-task baseline scores 0 at a seed is left out of that seed's Δm% (the relative change
    is undefined); with several seeds the page said nothing, so the column silently averaged fewer tasks."""

    def rec(seed: int, scores: dict[str, float]) -> dict:
        return {"seed": seed, "per_task": {t: {"accuracy": v} for t, v in scores.items()}}

    primary = {"x": "accuracy", "y": "accuracy"}
    multi = sweep.Group("multi", [rec(0, {"x": 0.5, "y": 0.5}), rec(1, {"x": 0.5, "y": 0.5})], "alora",
                        ["x", "y"], primary)  # fmt: skip
    # x's baseline is 0 at seed 1 only; y's seed-1 cell is missing, so seed 1 uses its mean over seeds, 0.2
    x = sweep.Group("lora on x", [rec(0, {"x": 0.4}), rec(1, {"x": 0.0})], "lora", ["x"], primary)
    y = sweep.Group("lora on y", [rec(0, {"y": 0.2})], "lora", ["y"], primary)
    notes = sweep.delta_m_notes([multi, x, y], {"x": x, "y": y}, "lora")
    assert notes == [
        "- multi, seed(s) [1]: x left out of Δm% (its single-task baseline scores 0: the relative change is undefined)",
        "- multi, seed(s) [1]: no single-task cell of y with that seed; its mean over seeds [0] is the baseline",
    ]
    y0 = sweep.Group(
        "lora on y", [rec(0, {"y": 0.0})], "lora", ["y"], primary
    )  # its mean over seeds is 0 too
    assert sweep.delta_m_notes([multi, x, y0], {"x": x, "y": y0}, "lora")[2:] == [
        "- multi, seed(s) [0, 1]: y left out of Δm% (its single-task baseline scores 0: the relative change is "
        "undefined)"
    ]


def test_compare_pairs_the_same_examples_in_another_order_by_key() -> None:
    """Two runs scored on the same test examples listed in another order (another eval.batch_size, a resumed
    evaluation) were refused: "run A was scored on 3 examples and run B on 3 (3 in common)". They are the same
    examples: paired by key."""

    def rows(pairs):
        return [{"key": k, "scores": {"accuracy": v}} for k, v in pairs]

    a = {"t": rows([("p", 1.0), ("q", 0.0), ("r", 1.0), ("s", 0.0)])}
    b = {"t": rows([("q", 1.0), ("p", 0.0), ("s", 1.0), ("r", 0.0)])}  # by key: p 0, q 1, r 0, s 1
    out = stats.compare_examples(a, b, {"t": "accuracy"})["t"]
    # A − B by key: p +1, q −1, r +1, s −1: mean 0, but every example differs, so the paired bootstrap's
    # interval is wide (low < 0 < high) and the sign-flip p is 1 (half the 2^4 flips are as far from 0 or
    # farther, and the observed mean is 0); paired by position (B's order) every difference would be 0 and
    # the interval [0, 0]
    assert out["difference"] == 0.0 and out["n"] == 4
    assert out["low"] < -0.2 and out["high"] > 0.2
    assert out["p_value"] == pytest.approx(1.0)
    dup = {"t": rows([("p", 1.0), ("p", 0.0), ("r", 1.0)])}  # duplicate keys: no pairing by key
    with pytest.raises(stats.ExampleMismatchError, match=r"\(2 in common\)"):
        stats.compare_examples(dup, {"t": rows([("r", 1.0), ("p", 0.0), ("p", 1.0)])}, {"t": "accuracy"})
