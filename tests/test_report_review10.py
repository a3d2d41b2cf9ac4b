"""The multi-seed paths of the campaign reports on tiny ledgers computed by hand: several seeds, single-task
baselines, a task (or client) scored by corpus BLEU, a cell recorded twice, a resume killed while it set aside
the rounds no client answered. Each test of a fix failed before it; the others check by hand paths that had only
seen one seed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from asymlora.config import load_config


def _mt_record(method: str, seed: int, scores: dict[str, list[float] | float]) -> dict:
    """A multi-task ledger record as `sweep.make_record` writes it; a task given one number is scored by corpus
    BLEU (no per-example scores, no interval, no ``per_example`` entry)."""
    from asymlora.eval import stats
    from asymlora.recipes import sweep

    tasks = list(scores)
    specs = [f"jsonl:/data.jsonl#{t}" for t in tasks]
    cfg = load_config(
        None, [f"data.tasks={json.dumps(specs)}", f"train.seed={seed}", f"adapter.method={method}"]
    )
    primary = {t: "bleu" if isinstance(s, float) else "accuracy" for t, s in scores.items()}
    per_task = {t: {primary[t]: s if isinstance(s, float) else sum(s) / len(s)} for t, s in scores.items()}
    rows = {t: [{"key": f"{t}{i}", "scores": {"accuracy": v}} for i, v in enumerate(s)]
            for t, s in scores.items() if isinstance(s, list)}  # fmt: skip
    means = [per_task[t][primary[t]] for t in tasks]
    worst = min(tasks, key=lambda t: per_task[t][primary[t]])
    return {"id": sweep.cell_id(cfg), "params": {"adapter.method": method, "train.seed": seed,
            **({"data.tasks": specs} if len(tasks) == 1 else {})}, "seed": seed, "tasks": tasks, "method": method,
            "per_task": per_task, "primary": primary, "average": sum(means) / len(means), "std": 0.0,
            "worst": {"task": worst, "value": per_task[worst][primary[worst]]},
            "intervals": stats.run_intervals(rows, {t: primary[t] for t in rows}, n_resamples=50),
            "per_example": {t: {"keys": t, "scores": [r["scores"]["accuracy"] for r in rs]} for t, rs in rows.items()},
            "trainable_params": 100, "steps": 4, "config": cfg.to_dict()}  # fmt: skip


def _report(where: Path, records: list[dict], kind: str, reference: str | list[str]) -> tuple[str, dict]:
    from asymlora.recipes import sweep

    where.mkdir(parents=True, exist_ok=True)
    (where / "ledger.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    spec = {"kind": kind, "out_dir": ".", "grid": {"seed": [0]}, "report": {"reference": reference}}
    (where / "sweep.yaml").write_text(yaml.safe_dump(spec))
    page = sweep.write_report(sweep.load_sweep(where / "sweep.yaml"))
    return page.read_text(), json.loads((where / "results.json").read_text())


def _group(summary: dict, label: str) -> dict:
    return next(g for g in summary["groups"] if g["label"] == label)


# two seeds of ALoRA and LoRA on x, y (corpus BLEU) and z, and the single-task LoRA cells of each task and seed
A = {0: {"x": [1, 1, 0, 1], "y": 0.3, "z": [1, 0, 1, 1]}, 1: {"x": [0, 0, 0, 1], "y": 0.4, "z": [1, 1, 1, 1]}}
B = {0: {"x": [0, 1, 0, 1], "y": 0.2, "z": [1, 0, 0, 1]}, 1: {"x": [0, 0, 0, 1], "y": 0.3, "z": [1, 0, 1, 1]}}
SINGLE = {
    0: {"x": [1, 1, 1, 1], "y": 0.5, "z": [1, 1, 0, 1]},
    1: {"x": [1, 1, 0, 1], "y": 0.4, "z": [1, 1, 1, 1]},
}


def _bleu_campaign() -> list[dict]:
    records = []
    for seed in (0, 1):
        records += [_mt_record("alora", seed, A[seed]), _mt_record("lora", seed, B[seed])]
        records += [_mt_record("lora", seed, {t: s}) for t, s in SINGLE[seed].items()]
    return records


def test_a_task_scored_by_bleu_leaves_the_paired_test_of_the_other_tasks_and_their_average(
    tmp_path: Path,
) -> None:
    """A task scored by corpus BLEU has no per-example scores. `groups.paired_over_seeds` then returned None for
    the whole pair: no paired test of any task and none of the average (the multi-task campaign's two generative
    tasks would have hidden every comparison had one been scored by BLEU). Now BLEU's task is left out, named,
    and the average's test is over the other tasks. By hand, each example's score averaged over seeds 0 and 1:
    x: A [.5, .5, 0, 1], B [0, .5, 0, 1] (+.125; seed 0 alone: +.25); z: A [1, .5, 1, 1], B [1, 0, .5, 1] (+.25);
    the average +.1875. Its sign flips: three non-zero weighted differences (1/16 each) reach |3/16| only all of
    one sign: p = 2/8."""
    page, summary = _report(tmp_path, _bleu_campaign(), "multitask", "alora")
    (pair,) = summary["paired"]
    assert (pair["a"], pair["b"], pair["seeds"], pair["left_out"]) == (
        "method=alora",
        "method=lora",
        [0, 1],
        ["y"],
    )
    assert "y" not in pair["tests"]
    assert pair["tests"]["x"]["difference"] == pytest.approx(0.125)
    assert pair["tests"]["z"]["difference"] == pytest.approx(0.25)
    assert pair["tests"]["average"]["difference"] == pytest.approx(0.1875)
    assert pair["tests"]["average"]["p_value"] == pytest.approx(0.25)
    assert pair["tests"]["average"]["n"] == 8
    assert "- method=alora − method=lora: y" in page
    assert "the average's test is over the other tasks" in page


def test_several_seeds_mean_std_and_delta_m_by_hand(tmp_path: Path) -> None:
    """The multi-seed rows: mean ± sample std (ddof 1) of every task and of the average, and Δm% per seed against
    the single-task cells of the same seed (a BLEU task: its point value), then mean ± std over seeds.
    ALoRA's average: seed 0 (.75 + .3 + .75) / 3 = .6, seed 1 (.25 + .4 + 1) / 3 = .55.
    Δm% seed 0: x (1 − .75) / 1, y (.5 − .3) / .5, z (.75 − .75) / .75 → (25 + 40 + 0) / 3 = 21.667;
    seed 1: x (.75 − .25) / .75, y 0, z 0 → 22.222; positive: worse than the single-task cells."""
    _, summary = _report(tmp_path, _bleu_campaign(), "multitask", "alora")
    alora = _group(summary, "method=alora")
    assert alora["seeds"] == [0, 1]
    assert alora["average"]["values"] == pytest.approx([0.6, 0.55])
    assert alora["average"]["value"] == pytest.approx((0.6 + 0.55) / 2)
    assert alora["average"]["std"] == pytest.approx(abs(0.6 - 0.55) / math.sqrt(2))  # ddof 1
    assert alora["per_task"]["y"]["value"] == pytest.approx(0.35)
    assert alora["per_task"]["y"]["std"] == pytest.approx(0.1 / math.sqrt(2))
    seed0, seed1 = (25 + 40 + 0) / 3, (50 / 0.75 + 0 + 0) / 3
    assert alora["delta_m"]["values"] == pytest.approx([seed0, seed1])
    assert alora["delta_m"]["value"] == pytest.approx((seed0 + seed1) / 2)
    assert alora["delta_m"]["std"] == pytest.approx(abs(seed0 - seed1) / math.sqrt(2))


def test_a_cell_recorded_twice_is_one_run_with_its_last_record(tmp_path: Path) -> None:
    """A ledger line repeated (a cell recorded again after a kill, or shard ledgers concatenated with an
    overlap) and a cell recorded once under the id older code gave it: "N runs from ledger.jsonl" counted every
    line (6), and the re-recorded cell under its old id was a second seed 1 in its group (seeds [0, 1, 1]: its
    mean counted twice). Now a cell is one config and seed, its last record kept: 4 runs, seeds [0, 1]."""
    records = [_mt_record(m, s, {"x": [1, 0], "z": [1, 1]}) for m in ("alora", "lora") for s in (0, 1)]
    again = _mt_record("alora", 0, {"x": [1, 1], "z": [1, 1]})  # the same cell, recorded again, last
    old_id = {**_mt_record("lora", 1, {"x": [0, 0], "z": [0, 1]}), "id": "0123456789ab"}
    page, summary = _report(tmp_path, [*records, again, old_id], "multitask", "alora")
    assert summary["records"] == 4
    assert "4 runs from ledger.jsonl (6 records: 2 of a cell recorded before, the last kept)." in page
    alora, lora = _group(summary, "method=alora"), _group(summary, "method=lora")
    assert alora["seeds"] == lora["seeds"] == [0, 1]
    assert alora["average"]["values"] == pytest.approx([1.0, 0.75])  # seed 0: the later record
    assert lora["average"]["values"] == pytest.approx(
        [0.75, 0.25]
    )  # seed 1: the record under the old id, last


def _client(label: str, scores: list[int] | None, score: float | None = None) -> dict:
    """A client's evaluation as the federated results hold it; ``scores`` None: corpus BLEU (no examples)."""
    examples = (
        {"t": {"keys": [f"{label}-{i}" for i in range(len(scores))], "scores": scores}} if scores else {}
    )
    value = score if scores is None else sum(scores) / len(scores)
    return {"label": label, "personalised": {"score": value, "n": 4, "per_task": {"t": {}},
            "primary": {"t": "bleu" if scores is None else "accuracy"}, "examples": examples}}  # fmt: skip


def _fed_record(strategy: str, seed: int, clients: list[dict], record_id: str | None = None) -> dict:
    from asymlora.recipes import fed_sweep

    side = fed_sweep.side_record(clients, "personalised")
    return {"id": record_id or f"{strategy}-{seed}", "kind": "federated", "params": {"strategy": strategy, "seed": seed},
            "strategy": strategy, "seed": seed, "clients": list(side["per_client"]), "average": side["average"],
            "personalised": side, "global": None, "dp": None, "rounds": 2, "local_steps": 3,
            "bytes": {"up": 100, "down": 300, "total": 400, "per_round": [{}, {}]}, "wall_seconds": 1.0,
            "config": {"run_dir": "", "seed": seed, "strategies": [strategy], "rounds": 2}}  # fmt: skip


def test_a_federated_client_scored_by_bleu_leaves_the_others_paired(tmp_path: Path) -> None:
    """A client whose task is scored by corpus BLEU has no per-example scores in any seed: `fed_sweep.paired`
    kept only the seeds in which every client had them, none, so the report had no paired test at all. Now that
    client is left out and named; c0 over seeds 0 and 1: A [1, 1, .5, 0], B [.5, 0, 0, 0] → +.5; c1: A [1, 1, 1,
    1], B [1, 1, 0, 0] → +.5; the average over c0 and c1 +.5. A cell recorded twice counts once."""
    records = [
        _fed_record("fedalora", 0, [_client("c0", [1, 1, 1, 0]), _client("c1", [1, 1, 1, 1]), _client("c2", None, 0.3)]),
        _fed_record("fedalora", 1, [_client("c0", [1, 1, 0, 0]), _client("c1", [1, 1, 1, 1]), _client("c2", None, 0.4)]),
        _fed_record("fedit", 0, [_client("c0", [1, 0, 0, 0]), _client("c1", [1, 1, 0, 0]), _client("c2", None, 0.2)]),
        _fed_record("fedit", 1, [_client("c0", [0, 0, 0, 0]), _client("c1", [1, 1, 0, 0]), _client("c2", None, 0.2)]),
    ]  # fmt: skip
    page, summary = _report(tmp_path, [*records, records[0]], "federated", "fedalora")
    assert "4 runs from ledger.jsonl (5 records: 1 of a cell recorded before, the last kept)." in page
    (pair,) = summary["paired"]
    assert (pair["seeds"], pair["left_out"]) == ([0, 1], ["c2"])
    assert pair["tests"]["c0"]["difference"] == pytest.approx(0.5)
    assert pair["tests"]["c1"]["difference"] == pytest.approx(0.5)
    assert pair["tests"]["average"]["difference"] == pytest.approx(0.5)
    assert "- fedalora − fedit: c2" in page
    fedalora = _group(summary, "fedalora")
    assert fedalora["personalised"]["per_client"]["c2"]["value"] == pytest.approx(0.35)


class Killed(BaseException):
    pass


def test_a_resume_killed_while_it_sets_aside_failed_rounds_keeps_their_records_once(
    tmp_path: Path, monkeypatch
) -> None:
    """A resume drops the rounds no client answered (2 and 3) and writes their records to rounds_rerun.jsonl,
    then its checkpoint. Killed between the two, the next resume found them in the checkpoint again and appended
    them a second time: [2, 3, 2, 3]. Now a record already there is kept once."""
    from asymlora.federated import round_log
    from asymlora.federated.round_log import RERUN_FILE, RoundLog, save_checkpoint

    failed = [{"status": "failed", "node_id": 7}]
    history = [
        {"round": 1, "clients": [{"status": "ok", "node_id": 7}]},
        *({"round": r, "clients": failed} for r in (2, 3)),
    ]
    state = {"w": torch.zeros(2)}
    save_checkpoint(tmp_path, state, {"round": 3, "strategy": "fedit", "ranks": [2], "history": history,
                                      "last_trained": {"0": 1}})  # fmt: skip

    def killed(*args, **kwargs):
        raise Killed

    with monkeypatch.context() as m:
        m.setattr(round_log, "save_checkpoint", killed)
        with pytest.raises(Killed):
            RoundLog.open(tmp_path, "fedit", resume=True).start(dict(state), [2], say=lambda _: None)
    log = RoundLog.open(tmp_path, "fedit", resume=True)
    log.start(dict(state), [2], say=lambda _: None)
    assert log.next_round == 2
    lines = (tmp_path / RERUN_FILE).read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [2, 3]


def test_differences_that_cancel_to_rounding_noise_are_no_difference() -> None:
    """A better on x by 2/5 and z by 1/5, worse on y by 3/5: the average's difference is 0, computed as
    1.85e-17. `stats.examples_to_resolve` then asked statsmodels for the sample size at an effect of 1e-16, its
    root finder gave NaN, and `math.ceil(nan)` raised ValueError: no report (the federated DP grid's synthetic
    ledger hit it). Now a difference below 1e-12 is none: nothing to size, and the line says so."""
    from asymlora.recipes.groups import SeedGroup, paired_lines, paired_over_seeds

    a = {"x": [1, 0, 1, 0, 1], "y": [0, 0, 0, 0, 0], "z": [0, 1, 1, 0, 0]}
    b = {"x": [0, 1, 0, 0, 0], "y": [1, 1, 0, 1, 0], "z": [0, 1, 0, 0, 0]}

    def group(label: str, scores: dict) -> SeedGroup:
        return SeedGroup(label, [{"seed": s, "per_example": {t: {"keys": t, "scores": v} for t, v in scores.items()}}
                                 for s in (0, 1)])  # fmt: skip

    result = paired_over_seeds(group("A", a), group("B", b), list(a), lambda r, t: r["per_example"][t])
    assert result is not None
    assert abs(result["tests"]["average"]["difference"]) < 1e-12
    assert result["resolve"]["examples_per_unit"] is None and result["resolve"]["seeds"] is None
    lines = paired_lines([{"a": "A", "b": "B", **result}], list(a), "Paired:", "task")
    assert lines[-1].endswith(": no difference to resolve")


def test_a_tiny_but_real_difference_is_sized_not_a_crash() -> None:
    """Per-seed differences of mean 1e-10 (a seed ahead by 1, another behind by 1): above the rounding noise, so a
    difference, but statsmodels' root finder gives NaN below an effect of about 1e-9, and the report raised
    ValueError. There the t-test is the z-test: n = ((z_.975 + z_.8) / effect)², effect = 1e-10 / √2 here."""
    from asymlora.eval import stats

    values = [1.0 + 1e-10, -1.0 + 1e-10]
    mean = (values[0] + values[1]) / 2
    effect = abs(mean) / (abs(values[0] - values[1]) / math.sqrt(2))  # sample std of two values: |a − b| / √2
    assert stats.seeds_to_resolve(values) == math.ceil(
        ((1.959963984540054 + 0.8416212335729143) / effect) ** 2
    )


def test_two_groups_of_the_reference_are_tested_once_not_mirrored(tmp_path: Path) -> None:
    """The DP campaign has four Fed-ALoRA groups (no DP, ε 8, 3, 1), the multi-task campaign two ALoRA groups
    (soft and task routing): every reference group was tested against every other, so each pair of reference
    groups appeared twice, as A − B and as B − A (12 of the DP campaign's 24 rows were mirrors). Now once, in
    ledger order."""
    records = [
        _fed_record(s, seed, [_client("c0", [seed, 1, 0, 1])], f"{s}-{seed}")
        for s in ("fedalora", "fedit")
        for seed in (0, 1)
    ]
    for r in records[:2]:  # a second Fed-ALoRA setting: the same strategy with A reset
        records.append({**r, "id": r["id"] + "-reset", "params": {**r["params"], "local_a": "reset"},
                        "config": {**r["config"], "local_a": "reset"}})  # fmt: skip
    _, summary = _report(tmp_path, records, "federated", "fedalora")
    pairs = [(p["a"], p["b"]) for p in summary["paired"]]
    assert pairs == [
        ("fedalora", "fedit"),
        ("fedalora", "fedalora local_a=reset"),
        ("fedalora local_a=reset", "fedit"),  # no ("fedalora local_a=reset", "fedalora"): its mirror is above
    ]


def test_two_alora_groups_of_the_multitask_report_are_tested_once(tmp_path: Path) -> None:
    """The multi-task campaign's two ALoRA groups (soft and task routing) were tested both ways."""
    records = []
    for seed in (0, 1):
        soft = _mt_record("alora", seed, {"x": [1, 0], "z": [1, 1]})
        task = {**soft, "params": {**soft["params"], "adapter.router": "task"}, "id": f"task-{seed}",
                "config": {**soft["config"], "adapter": {**soft["config"]["adapter"], "router": "task"}}}  # fmt: skip
        records += [soft, task, _mt_record("lora", seed, {"x": [0, 0], "z": [1, 0]})]
    _, summary = _report(tmp_path, records, "multitask", "alora")
    pairs = [(p["a"], p["b"]) for p in summary["paired"]]
    assert pairs == [
        ("method=alora", "method=alora router=task"),
        ("method=alora", "method=lora"),
        ("method=alora router=task", "method=lora"),
    ]


def test_seeds_already_enough_is_not_offered_as_what_would_resolve() -> None:
    """Two seeds whose differences of the average agree closely (-0.0137, -0.0131: the synthetic BLEU campaign)
    make `stats.seeds_to_resolve` 2, and the line under an unresolved paired test read "or ≈ 2 seeds (now 2)":
    as if the seeds there are would resolve what the paired test does not. Now it says what that number means."""
    from asymlora.recipes.groups import paired_lines

    test = {"difference": -0.0134, "low": -0.029, "high": 0.003, "p_value": 0.0964}
    resolve = {"examples_per_unit": 578, "examples_now": 200, "seeds": 2, "seeds_now": 2}
    (line,) = paired_lines([{"a": "A", "b": "B", "seeds": [0, 1], "tests": {"average": test}, "resolve": resolve}],
                           [], "Paired:", "task")[-1:]  # fmt: skip
    assert "≈ 2 seeds (now 2)" not in line
    assert line.endswith(
        "≈ 578 test examples per task (now 200), or more seeds (the 2 per-seed differences agree so closely "
        "that, taken at face value, 2 seeds would do, but so few seeds size their spread only roughly)"
    )


def test_delta_m_says_which_baselines_are_missing(tmp_path: Path) -> None:
    """Before any single-task cell ran (the campaign now), or when a baseline cell failed, the Δm% column was "–"
    (or a seed's baseline silently its mean over the other seeds) with nothing saying why. Now a line per case.
    Seed 1 of ALoRA against x's single-task cell of seed 0 alone: x (1 − .5) / 1 = 50 %, z (1 − 1) / 1 = 0."""
    records = [_mt_record("alora", s, {"x": [1, 0], "z": [1, 1]}) for s in (0, 1)]
    records += [_mt_record("lora", 0, {"x": [1, 1]}), *(_mt_record("lora", s, {"z": [1, 1]}) for s in (0, 1))]
    page, summary = _report(tmp_path, records, "multitask", "alora")
    assert "- method=alora, seed(s) [1]: no single-task cell of x with that seed; its mean over seeds [0] is the " \
           "baseline" in page  # fmt: skip
    assert _group(summary, "method=alora")["delta_m"]["values"] == pytest.approx([25.0, 25.0])
    page, _ = _report(tmp_path, records[:2], "multitask", "alora")
    assert "- method=alora: no Δm%: no single-task lora cell of x, z in the ledger" in page


def test_a_reference_with_no_run_is_said_not_silently_untested(tmp_path: Path) -> None:
    """``report.reference`` misspelt (or not run yet): the page had no paired test and no word of why."""
    records = [_fed_record(s, 0, [_client("c0", [1, 0, 1, 1])]) for s in ("fedalora", "fedit")]
    page, summary = _report(tmp_path, records, "federated", "fedalorra")
    assert summary["paired"] == []
    assert "No paired tests of 'fedalorra': the ledger holds no run of it, a name of report.reference (yet: it " \
           "holds fedalora, fedit)." in page  # fmt: skip
    page, summary = _report(tmp_path, records, "federated", ["fedit", "local-only"])  # one of two is missing
    assert [(p["a"], p["b"]) for p in summary["paired"]] == [("fedit", "fedalora")]
    assert "No paired tests of 'local-only'" in page and "No paired tests of 'fedit'" not in page


def test_several_references_test_every_pair_of_theirs_once(tmp_path: Path) -> None:
    """``report.reference: [fedalora, local-only]``: Fed-ALoRA against every other strategy, then local-only
    against the rest (the question "does federating help at all"), without local-only − fedalora (the mirror of
    a row above). By hand, one client of 4 examples, seed 0: fedalora [1,1,1,0], fedit [1,0,0,0], local-only
    [1,1,0,0], fedsa [0,0,0,0]; fedalora − fedit +0.5, − local-only +0.25, − fedsa +0.75; local-only − fedit
    +0.25, − fedsa +0.5."""
    scores = {
        "fedalora": [1, 1, 1, 0],
        "fedit": [1, 0, 0, 0],
        "local-only": [1, 1, 0, 0],
        "fedsa": [0, 0, 0, 0],
    }
    records = [_fed_record(s, 0, [_client("c0", v)]) for s, v in scores.items()]
    _, summary = _report(tmp_path, records, "federated", ["fedalora", "local-only"])
    found = {(p["a"], p["b"]): p["tests"]["average"]["difference"] for p in summary["paired"]}
    assert list(found) == [("fedalora", "fedit"), ("fedalora", "local-only"), ("fedalora", "fedsa"),
                           ("local-only", "fedit"), ("local-only", "fedsa")]  # fmt: skip
    assert list(found.values()) == pytest.approx([0.5, 0.25, 0.75, 0.25, 0.5])
    _, summary = _report(tmp_path, records, "federated", ["local-only", "fedalora"])  # the order decides A
    assert [(p["a"], p["b"]) for p in summary["paired"]][:4] == [
        ("local-only", "fedalora"), ("local-only", "fedit"), ("local-only", "fedsa"), ("fedalora", "fedit"),
    ]  # fmt: skip


@pytest.mark.parametrize("reference", [[], [""], ["fedalora", 3], {"a": 1}, 7])
def test_a_reference_that_is_no_name_is_refused_with_the_value(tmp_path: Path, reference: object) -> None:
    from asymlora.config import ConfigError
    from asymlora.recipes import sweep

    spec = {"kind": "federated", "out_dir": ".", "grid": {"seed": [0]}, "report": {"reference": reference}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(
        ConfigError, match=r"report\.reference=.* must be a method \(strategy\) name or a non-empty"
    ):
        sweep.load_sweep(tmp_path / "sweep.yaml")


def _dp_record(strategy: str, seed: int, z: float | None, epsilon: float | None) -> dict:
    """A federated record of a DP setting: ``z`` None is DP off (``dp`` None, as `fed_sweep.make_record` writes
    it); else clipping at the server with noise multiplier ``z`` and the accountant's final ``epsilon`` (None:
    infinite, z = 0)."""
    record = _fed_record(strategy, seed, [_client("c0", [1, 0, 1, 1])], f"{strategy}-{z}-{seed}")
    if z is not None:
        record["params"]["dp.noise_multiplier"] = z
        record["config"]["dp"] = {"clipping": "server", "noise_multiplier": z}
        record["dp"] = {"epsilon": epsilon, "delta": 1e-5, "noise_multiplier": z, "clipping_norm": 1.0,
                        "clipping": "server", "target_epsilon": None}  # fmt: skip
    return record


def _row(page: str, label: str) -> list[str]:
    line = next(line for line in page.splitlines() if line.startswith(f"| {label} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_clipping_without_noise_shows_an_unbounded_epsilon_not_no_dp(tmp_path: Path) -> None:
    """ε of a DP cell with noise multiplier 0 (clipping only) is infinite, recorded as ``epsilon: null``; the
    report averaged it with `nan_mean` to None and showed "–", as for a cell without DP. Now: no DP "–", z = 0
    "∞", z = 1 the mean over seeds (5 + 7) / 2 = 6.00, and a group with one seed of infinite ε "∞" (a mean
    with ∞ is ∞; it was the other seed's 4.00)."""
    records = [
        *(_dp_record("fedalora", s, None, None) for s in (0, 1)),
        *(_dp_record("fedalora", s, 0.0, None) for s in (0, 1)),
        _dp_record("fedalora", 0, 1.0, 5.0), _dp_record("fedalora", 1, 1.0, 7.0),
        _dp_record("fedit", 0, 0.5, 4.0), _dp_record("fedit", 1, 0.5, None),
    ]  # fmt: skip
    page, summary = _report(tmp_path, records, "federated", "fedalora")
    header = _row(page, "strategy")
    column = header.index("ε")
    assert _row(page, "fedalora")[column] == "–"
    assert _row(page, "fedalora noise_multiplier=0")[column] == "∞"
    assert _row(page, "fedalora noise_multiplier=1")[column] == "6.00"
    assert _row(page, "fedit noise_multiplier=0.5")[column] == "∞"
    off, clip_only = _group(summary, "fedalora"), _group(summary, "fedalora noise_multiplier=0")
    assert (off["epsilon"], off["epsilon_infinite"]) == (None, False)
    assert (clip_only["epsilon"], clip_only["epsilon_infinite"]) == (None, True)
    assert _group(summary, "fedalora noise_multiplier=1")["epsilon"] == pytest.approx(6.0)
    assert "∞: clipping without noise, no guarantee; –: no DP" in page


def test_the_hardware_line_and_the_list_estimate_count_a_cell_once(tmp_path: Path) -> None:
    """Four cells (ALoRA and LoRA, seeds 0 and 1) costing 1000, 1000, 5000 and 6000 s, then ALoRA seed 0
    recorded again and LoRA seed 0 again under an old id (1000 s each). The report counted 4 runs, but the
    hardware line deduplicated by id only (5 runs) and the ``--list`` estimate not at all: the median of
    1000, 1000, 5000, 6000, 1000, 1000 s is 1000 s (0.3 h for the one cell left). Now both count each cell's last
    record, as the report: 4 runs, median of 1000, 1000, 5000, 6000 s = 3000 s, 0.8 h."""
    from asymlora.recipes import sweep

    def record(method: str, seed: int, seconds: float, record_id: str | None = None) -> dict:
        r = _mt_record(method, seed, {"x": [1, 0], "z": [1, 1]})
        return {**r, "id": record_id or r["id"], "train_seconds": seconds - 100, "eval_seconds": 100.0,
                "hardware": {"device": "cpu", "dtype": "float32", "device_name": "xeon"}}  # fmt: skip

    records = [record("alora", 0, 1000), record("lora", 0, 1000), record("alora", 1, 5000),
               record("lora", 1, 6000), record("alora", 0, 1000), record("lora", 0, 1000, "0123456789ab")]  # fmt: skip
    page, summary = _report(tmp_path, records, "multitask", "alora")
    assert summary["records"] == 4
    assert "Hardware: cpu float32 (xeon): 4 runs." in page
    spec = sweep.load_sweep(tmp_path / "sweep.yaml")
    cfg = load_config(None, ['data.tasks=["jsonl:/data.jsonl#x", "jsonl:/data.jsonl#z"]', "train.seed=2"])
    left = sweep.Cell({"train.seed": 2}, cfg, sweep.cell_id(cfg))
    assert sweep.estimate_line(spec, [(left, "todo")]) == (
        "0 done, 0 started, 1 to do; the 1 left of a kind already done: about 0.8 h on one worker"
    )


def _run_dir(where: Path, tasks: dict[str, tuple[str, list[float] | None]]) -> Path:
    """A run directory as training writes it: ``results.json``'s primary metric per task and
    ``per_example.jsonl`` (``scores`` None: a corpus-level metric, rows without a per-example score of it)."""
    where.mkdir(parents=True)
    rows = [{"task": t, "key": f"{t}{i}", "scores": {"chrf": 0.5} if s is None else {m: v}}
            for t, (m, s) in tasks.items() for i, v in enumerate(s or [0.0, 0.0])]  # fmt: skip
    (where / "per_example.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (where / "results.json").write_text(json.dumps({"primary": {t: m for t, (m, _) in tasks.items()}}))
    return where


def test_compare_names_why_each_task_has_no_paired_test(tmp_path: Path) -> None:
    """`asymlora compare`: a task scored by BLEU in A and accuracy in B crashed it (KeyError: A's scored tasks
    lacked it, B's had it, and B's means were looked up with A's metrics; had it got that far, the table would
    have said "only in run B"), a task scored by BLEU in both was left out without a word in the table (a
    note on stdout only), and a task scored by exact match in A and accuracy in B stopped the whole comparison
    (ValueError). Now each is left out of the tests with its reason, and x (A .75, B .5: +.25) is tested
    alone; only-in-one-run tasks are still said so."""
    from asymlora.recipes.evaluate import compare_runs

    a = _run_dir(tmp_path / "a", {"x": ("accuracy", [1, 0, 1, 1]), "m": ("bleu", None), "g": ("bleu", None),
                                  "e": ("exact_match", [1, 0]), "only_a": ("accuracy", [1, 1])})  # fmt: skip
    b = _run_dir(tmp_path / "b", {"x": ("accuracy", [0, 0, 1, 1]), "m": ("accuracy", [1, 0]), "g": ("bleu", None),
                                  "e": ("accuracy", [1, 1]), "only_b": ("accuracy", [0, 1])})  # fmt: skip
    tests, table = compare_runs(a, b)
    assert set(tests) == {"x", "average"}
    assert tests["x"]["difference"] == pytest.approx(0.25)
    assert "| x | accuracy | 4 | 0.750 | 0.500 |" in table
    assert table.split("Left out of the paired tests (and of the average):\n")[1].split("\n\n")[
        0
    ].splitlines() == [
        "- m: scored by different metrics in A and B: bleu in A, accuracy in B",
        "- g: bleu is a corpus-level score: no per-example scores to pair",
        "- e: scored by different metrics in A and B: exact_match in A, accuracy in B",
        "- only_a: only in run A",
        "- only_b: only in run B",
    ]
    with pytest.raises(ValueError, match="no task of .* has a paired test: g: bleu is a corpus-level score"):
        compare_runs(
            _run_dir(tmp_path / "c", {"g": ("bleu", None)}), _run_dir(tmp_path / "d", {"g": ("bleu", None)})
        )


def test_one_test_example_per_task_is_said_not_called_a_constant_difference() -> None:
    """One test example per task (a smoke campaign, ``eval.max_examples=1``): x differs by +1, y by 0, so not
    every example differs by the same amount, yet the line said so. A one-example task has no variance of its
    own (`stats.examples_to_resolve` pools the others', here none), and the line now says that."""
    from asymlora.recipes.groups import SeedGroup, paired_lines, paired_over_seeds

    def group(label: str, scores: dict) -> SeedGroup:
        return SeedGroup(
            label, [{"seed": 0, "per_example": {t: {"keys": t, "scores": v} for t, v in scores.items()}}]
        )

    result = paired_over_seeds(group("A", {"x": [1], "y": [1]}), group("B", {"x": [0], "y": [1]}), ["x", "y"],
                               lambda r, t: r["per_example"][t])  # fmt: skip
    assert result is not None and result["resolve"]["examples_per_unit"] is None
    lines = paired_lines([{"a": "A", "b": "B", **result}], ["x", "y"], "Paired:", "task")
    assert lines[-1] == (
        "- A − B: +0.5000 (p=1): too few test examples per task to estimate their spread (now 1 in the smallest), "
        "so there is none to size a study by: score more test examples per task"
    )


def test_two_single_task_configs_of_one_task_say_which_is_the_baseline(tmp_path: Path) -> None:
    """Two single-task lora groups of task x (4 steps and 9 steps, e.g. a re-run with another budget): the Δm%
    column silently used whichever came last in the ledger. The value stays the last one's (x: (1 − .5)/1 = 50 %
    against the 9-step cell scoring [1, 1]; z: 0), and the page now says which group that is."""
    records = [_mt_record("alora", 0, {"x": [1, 0], "z": [1, 1]}), _mt_record("lora", 0, {"z": [1, 1]})]
    short = _mt_record("lora", 0, {"x": [0, 0]})
    longer = _mt_record("lora", 0, {"x": [1, 1]})
    longer["config"] = {**longer["config"], "train": {**longer["config"]["train"], "steps": 9}}
    longer["id"] = "long-x"
    page, _ = _report(tmp_path, [*records, short, longer], "multitask", "alora")
    assert "| method=alora | 0 |" in page and "| 25.0 [0.0, 50.0] |" in page
    (note,) = [line for line in page.splitlines() if line.startswith("- x: 2 single-task groups")]
    assert note.endswith("the Δm% baseline is the last in the ledger, method=lora on x (config "
                         f"{note.split('(config ')[-1].split(')')[0]}) (cells long-x)")  # fmt: skip


def test_averages_are_also_corrected_over_the_pages_pairs() -> None:
    """A list of references puts 13 or more pairs on the federated page; each average was tested at 0.05 alone.
    Holm over three pairs by hand: p 0.01, 0.04, 0.03 sorted 0.01 · 3 = 0.03, 0.03 · 2 = 0.06, 0.04 · 1 = 0.04
    → max(0.06, 0.04) = 0.06: adjusted 0.03, 0.06, 0.06; only the first holds at 0.05."""
    from asymlora.recipes.groups import holm_over_pairs, paired_lines

    def pair(b: str, p: float) -> dict:
        test = {"difference": 0.1, "low": 0.01, "high": 0.2, "p_value": p}
        return {"a": "A", "b": b, "seeds": [0], "tests": {"average": test}}

    paired = holm_over_pairs([pair("B", 0.01), pair("C", 0.04), pair("D", 0.03)])
    assert [p["tests"]["average"]["p_holm_pairs"] for p in paired] == pytest.approx([0.03, 0.06, 0.06])
    assert [p["tests"]["average"]["p_value"] for p in paired] == [0.01, 0.04, 0.03]  # unchanged
    lines = paired_lines(paired, [], "Paired:", "client")
    at = lines.index("Averages that hold after Holm's correction over the page's 3 pairs (p_Holm < 0.05: at most a "
                     "5% chance of any false call among them):")  # fmt: skip
    assert lines[at + 2 :] == ["- A − B: +0.100 (p_Holm=0.03)"]  # C and D do not hold
    assert not any(
        "correction over the page" in line for line in paired_lines(paired[:1], [], "P:", "client")
    )
    assert holm_over_pairs([]) == []


def _holm_by_hand(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment written out: the i-th smallest p times (m − i), made monotone, capped at 1."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [0.0] * len(p_values), 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - k) * p_values[i]))
        adjusted[i] = running
    return adjusted


def test_federated_holm_over_pairs_is_over_the_paired_pairs_only(tmp_path: Path) -> None:
    """``reference: [fedalora, local-only]`` with FedSA-LoRA run at another seed only: its two pairs cannot be
    paired (no seed in common) and are no member of the family Holm corrects over, which is the three paired
    pairs; `fed_sweep.summarize` applies it (a summary without ``p_holm_pairs`` failed here)."""
    scores = {"fedalora": [1, 1, 1, 1, 1, 1, 1, 0], "fedit": [1, 0, 0, 0, 0, 0, 0, 0],
              "local-only": [1, 1, 1, 1, 0, 0, 0, 0]}  # fmt: skip
    records = [_fed_record(s, 0, [_client("c0", v)]) for s, v in scores.items()]
    records.append(_fed_record("fedsa", 1, [_client("c0", [0] * 8)]))
    page, summary = _report(tmp_path, records, "federated", ["fedalora", "local-only"])
    assert [(p["a"], p["b"]) for p in summary["unpaired"]] == [("fedalora", "fedsa"), ("local-only", "fedsa")]
    tests = [p["tests"]["average"] for p in summary["paired"]]
    assert [(p["a"], p["b"]) for p in summary["paired"]] == [
        ("fedalora", "fedit"), ("fedalora", "local-only"), ("local-only", "fedit")
    ]  # fmt: skip
    assert [t["p_holm_pairs"] for t in tests] == pytest.approx(_holm_by_hand([t["p_value"] for t in tests]))
    assert "Averages that hold after Holm's correction over the page's 3 pairs" in page


def test_holm_over_pairs_corrects_within_each_family() -> None:
    """Family x: p 0.01, 0.04 → 0.01 · 2 = 0.02, max(0.02, 0.04 · 1) = 0.04; family y alone: 0.03 stays 0.03
    (over all three it would be 0.06: `test_averages_are_also_corrected_over_the_pages_pairs`). A family of
    one pair gets no line of its own."""
    from asymlora.recipes.groups import holm_over_pairs, paired_lines

    def pair(b: str, p: float, family: str) -> dict:
        test = {"difference": 0.1, "low": 0.01, "high": 0.2, "p_value": p}
        return {"a": "A", "b": b, "seeds": [0], "tests": {"average": test}, "family": family}

    paired = holm_over_pairs([pair("B", 0.01, "x"), pair("C", 0.03, "y"), pair("D", 0.04, "x")])
    assert [p["tests"]["average"]["p_holm_pairs"] for p in paired] == pytest.approx([0.02, 0.03, 0.04])
    lines = paired_lines(paired, [], "Paired:", "client")
    at = lines.index("Averages that hold after Holm's correction over the page's 2 pairs of x (p_Holm < 0.05: at "
                     "most a 5% chance of any false call among them):")  # fmt: skip
    assert lines[at + 2 :] == ["- A − B: +0.100 (p_Holm=0.02)", "- A − D: +0.100 (p_Holm=0.04)"]
    assert not any(" of y " in line for line in lines)


def test_federated_bf16_and_float32_cells_are_labelled_paired_and_corrected_apart(tmp_path: Path) -> None:
    """The homogeneous campaign's four bf16 cells of seed 0 beside its float32 cells (2026-12-02): labels show the
    precision, no bf16 group is paired with a float32 group of another strategy, and Holm corrects within the
    families float32, bf16, and bf16 vs float32 (the precision checks), each by hand."""
    scores = {("fedalora", "bf16"): [1, 1, 1, 1, 1, 1, 0, 0], ("fedit", "bf16"): [1, 0, 0, 0, 0, 0, 0, 0],
              ("fedalora", None): [1, 1, 1, 1, 1, 1, 1, 0], ("fedit", None): [1, 1, 0, 0, 0, 0, 0, 0],
              ("fedsa", None): [1, 1, 1, 0, 0, 0, 0, 0]}  # fmt: skip
    records = []
    for (strategy, precision), values in scores.items():
        record = _fed_record(strategy, 0, [_client("c0", values)], f"{strategy}-{precision}")
        record["config"]["train"] = {"mixed_precision": precision}
        records.append(record)
    page, summary = _report(tmp_path, records, "federated", ["fedalora", "fedit"])
    bf = "mixed_precision=bf16"
    assert [g["label"] for g in summary["groups"]] == [
        f"fedalora {bf}",
        f"fedit {bf}",
        "fedalora",
        "fedit",
        "fedsa",
    ]
    families = {(p["a"], p["b"]): p["family"] for p in summary["paired"]}
    assert families == {
        (f"fedalora {bf}", f"fedit {bf}"): bf, (f"fedalora {bf}", "fedalora"): "mixed_precision=bf16 vs null",
        ("fedalora", "fedit"): "mixed_precision=null", ("fedalora", "fedsa"): "mixed_precision=null",
        (f"fedit {bf}", "fedit"): "mixed_precision=bf16 vs null", ("fedit", "fedsa"): "mixed_precision=null",
    }  # fmt: skip
    for family in set(families.values()):
        tests = [p["tests"]["average"] for p in summary["paired"] if p["family"] == family]
        assert [t["p_holm_pairs"] for t in tests] == pytest.approx(
            _holm_by_hand([t["p_value"] for t in tests])
        )
    assert (
        "Averages that hold after Holm's correction over the page's 3 pairs of mixed_precision=null" in page
    )
    assert "over the page's 2 pairs of mixed_precision=bf16 vs null" in page


def test_multitask_reference_list_pairs_multitask_groups_once_with_holm(tmp_path: Path) -> None:
    """The multi-task path (`sweep.summarize_ledger`) with ``reference: [alora, lora]``: ALoRA against LoRA and
    HydraLoRA, then LoRA against HydraLoRA; the single-task cells (LoRA, the Δm% baselines, and an ALoRA on x)
    are no rival, though their methods are references; Holm over the three pairs' averages."""
    x, z = [1, 1, 0, 1, 1, 1, 0, 1], [1, 0, 1, 1, 1, 1, 1, 1]
    records = [_mt_record("alora", 0, {"x": x, "z": z}), _mt_record("lora", 0, {"x": x[::-1], "z": [0] * 8}),
               _mt_record("hydralora", 0, {"x": [0] * 8, "z": [0, 0, 0, 0, 0, 0, 0, 1]}),
               _mt_record("lora", 0, {"x": x}), _mt_record("lora", 0, {"z": z}),
               _mt_record("alora", 0, {"x": [0, 1, 0, 1, 0, 1, 0, 1]})]  # fmt: skip
    page, summary = _report(tmp_path, records, "multitask", ["alora", "lora"])
    assert [(p["a"], p["b"]) for p in summary["paired"]] == [
        ("method=alora", "method=lora"), ("method=alora", "method=hydralora"), ("method=lora", "method=hydralora")
    ]  # fmt: skip
    assert summary["unpaired"] == []
    tests = [p["tests"]["average"] for p in summary["paired"]]
    assert [t["p_holm_pairs"] for t in tests] == pytest.approx(_holm_by_hand([t["p_value"] for t in tests]))
    assert "Averages that hold after Holm's correction over the page's 3 pairs" in page
    assert "No paired tests of" not in page


def test_a_reference_named_twice_is_refused(tmp_path: Path) -> None:
    """``reference: [fedalora, fedalora]`` was taken, and a misspelt name listed twice got its "no run" line
    twice; now it is refused, naming the duplicate. `groups.reference_names` keeps each name once for callers
    that bypass `load_sweep`."""
    from asymlora.config import ConfigError
    from asymlora.recipes import sweep
    from asymlora.recipes.groups import reference_names

    spec = {"kind": "federated", "out_dir": ".", "grid": {"seed": [0]},
            "report": {"reference": ["fedalora", "fedit", "fedalora"]}}  # fmt: skip
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=r"report\.reference=.* names fedalora more than once"):
        sweep.load_sweep(tmp_path / "sweep.yaml")
    assert reference_names(["b", "a", "b"]) == ["b", "a"]
    assert reference_names("a") == ["a"] and reference_names(None) == []
