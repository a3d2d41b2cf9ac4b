"""Router diagnostics against values worked out by hand (mutation tests of `analysis/router_stats.py`).

The main example, EXAMPLE_A: four real tokens and N = 3 experts, gates

    t1 (0.5, 0.3, 0.2)   top-1 expert 0   task 0
    t2 (0.2, 0.6, 0.2)   top-1 expert 1   task 1
    t3 (0.1, 0.1, 0.8)   top-1 expert 2   task 0
    t4 (0.6, 0.2, 0.2)   top-1 expert 0   task 2

plus a padding token (0.05, 0.05, 0.9) (top-1 expert 2, entropy > 0) that must count nowhere. By hand:

    load       = (2, 1, 1) / 4 = (0.5, 0.25, 0.25);            max_load 0.5
    mean_gate  = (0.5+0.2+0.1+0.6, 0.3+0.6+0.1+0.2, 0.2+0.2+0.8+0.2) / 4 = (1.4, 1.2, 1.4) / 4
               = (0.35, 0.3, 0.35);                             max_gate 0.35
    token_entropy = (H(t1) + H(t2) + H(t3) + H(t4)) / 4 / ln 3
               = (1.029653 + 0.950271 + 0.639032 + 0.950271) / 4 / 1.098612 = 0.812212
    load_entropy  = H(0.5, 0.25, 0.25) / ln 3 = 1.5 ln 2 / ln 3 = 0.946395
    gate_entropy  = H(0.35, 0.3, 0.35) / ln 3 = (0.7 ln(1/0.35) + 0.3 ln(1/0.3)) / ln 3 = 0.997683
    usage      = task 0: (t1 + t3) / 2 = (0.3, 0.2, 0.5); task 1: t2; task 2: t4
    task_tokens = (2, 1, 1)

Tokens (4) ≠ experts (3), so an axis mix-up changes a shape; tasks 1 and 2 have exactly one token.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import warnings

import peft
import pytest
import torch
from tests.test_router_stats import (
    Toy,
    _toy,
    h,  # entropy in nats by the formula (0 log 0 = 0)
)

import asymlora
from asymlora import distributed
from asymlora.analysis import router_stats
from asymlora.analysis.router_stats import (
    ROUTER_LOG,
    RouterLog,
    RouterStats,
    RoutingCollapseWarning,
    analyze_routing,
    append_jsonl,
    collapse_reasons,
    read_router_log,
    routing_statistics,
)

LN3 = math.log(3)


T1, T2, T3, T4 = (0.5, 0.3, 0.2), (0.2, 0.6, 0.2), (0.1, 0.1, 0.8), (0.6, 0.2, 0.2)
PAD = (0.05, 0.05, 0.9)
EXAMPLE_A = {
    "tokens": 4,
    "load": [0.5, 0.25, 0.25],
    "mean_gate": [0.35, 0.3, 0.35],
    "token_entropy": (h(*T1) + h(*T2) + h(*T3) + h(*T4)) / 4 / LN3,  # 0.812212
    "load_entropy": 1.5 * math.log(2) / LN3,  # 0.946395
    "max_load": 0.5,
    "max_gate": 0.35,
    "gate_entropy": (0.7 * math.log(1 / 0.35) + 0.3 * math.log(1 / 0.3)) / LN3,  # 0.997683
    "usage": [[0.3, 0.2, 0.5], [0.2, 0.6, 0.2], [0.6, 0.2, 0.2]],
    "task_tokens": [2, 1, 1],
}


def _check(stats: dict, hand: dict, abs_tol: float = 1e-6) -> None:
    for key, value in hand.items():
        if key == "usage":
            assert len(stats[key]) == len(value), key
            for row, ref in zip(stats[key], value, strict=True):
                assert (row is None) == (ref is None) and (
                    ref is None or row == pytest.approx(ref, abs=abs_tol)
                )
        elif key in ("tokens", "task_tokens"):
            assert stats[key] == value, key  # counts are exact ints
        else:
            assert stats[key] == pytest.approx(value, abs=abs_tol), key


def test_routing_statistics_on_example_a_with_padding() -> None:
    # (2, 3, 3): row 0 = t1, t3, padding; row 1 = t2, t4, padding
    gate = torch.tensor([[T1, T3, PAD], [T2, T4, PAD]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [True, True, False]])
    tasks = torch.tensor([[0, 0, 1], [1, 2, 2]])
    stats = routing_statistics(gate, mask, tasks, num_tasks=3)
    _check(stats, EXAMPLE_A)
    assert set(stats) == set(EXAMPLE_A)
    # every value is rounded to 6 significant digits and a plain float: 1.4 / 4 is 0.35000000000000003 in
    # float64, the record says 0.35; the counts are ints
    assert stats["load"] == [0.5, 0.25, 0.25] and stats["mean_gate"] == [0.35, 0.3, 0.35]
    assert stats["max_gate"] == 0.35 and stats["max_load"] == 0.5
    assert stats["token_entropy"] == 0.812212 and stats["load_entropy"] == 0.946395
    assert stats["gate_entropy"] == 0.997683
    assert type(stats["tokens"]) is int and all(type(c) is int for c in stats["task_tokens"])
    # a fourth task without tokens gets a null row (num_tasks above max id + 1)
    assert routing_statistics(gate, mask, tasks, num_tasks=4)["usage"][3] is None
    # num_tasks below max id + 1: the rows the ids need
    assert len(routing_statistics(gate, mask, tasks, num_tasks=1)["usage"]) == 3
    # any nonzero mask entry is one real token (bool), 0 is padding; small integer task ids are fine
    weights = torch.tensor([[2, 1, 0], [1, 3, 0]], dtype=torch.uint8)
    _check(routing_statistics(gate, weights, tasks.to(torch.uint8), num_tasks=3), EXAMPLE_A)


def test_routing_statistics_six_digits_and_one_expert() -> None:
    # three tokens of gate (2/3, 1/6, 1/6): mean gate (0.666667, 0.166667, 0.166667) to 6 digits exactly
    gate = torch.tensor([[2 / 3, 1 / 6, 1 / 6]] * 3, dtype=torch.float64)
    stats = routing_statistics(gate)
    assert stats["mean_gate"] == [0.666667, 0.166667, 0.166667] and stats["max_gate"] == 0.666667
    assert stats["load"] == [1.0, 0.0, 0.0] and stats["load_entropy"] == 0.0 and stats["tokens"] == 3
    # H(2/3, 1/6, 1/6) = (2/3) ln 1.5 + (1/3) ln 6 = 0.270310 + 0.597253 = 0.867563 nats, / ln 3 = 0.789690
    assert stats["token_entropy"] == pytest.approx(
        ((2 / 3) * math.log(1.5) + math.log(6) / 3) / LN3, abs=1e-6
    )
    assert stats["usage"] == [] and stats["task_tokens"] == []
    # N = 1: log N = 0, the entropies are null; the rest is defined
    one = routing_statistics(torch.ones(5, 1, dtype=torch.float64))
    assert one == {"tokens": 5, "load": [1.0], "mean_gate": [1.0], "token_entropy": None, "load_entropy": None,
                   "max_load": 1.0, "max_gate": 1.0, "gate_entropy": None, "usage": [], "task_tokens": []}  # fmt: skip


def test_routing_statistics_without_tokens() -> None:
    empty = {"tokens": 0, "load": None, "mean_gate": None, "token_entropy": None, "load_entropy": None,
             "max_load": None, "max_gate": None, "gate_entropy": None, "usage": None}  # fmt: skip
    # every token padding; two task rows asked for
    gate = torch.tensor([T1, T2], dtype=torch.float64)
    stats = routing_statistics(gate, torch.tensor([0, 0]), torch.tensor([0, 1]), num_tasks=2)
    assert stats == {**empty, "task_tokens": [0, 0]}
    # no tokens at all, empty task ids: num_tasks rows
    none = routing_statistics(torch.zeros(0, 3), None, torch.zeros(0, dtype=torch.long), num_tasks=2)
    assert none == {**empty, "task_tokens": [0, 0]}
    assert routing_statistics(torch.zeros(0, 3)) == {**empty, "task_tokens": []}


def test_routing_statistics_messages() -> None:
    gate = torch.tensor([[T1, T3, PAD], [T2, T4, PAD]], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"^mask has shape \(2, 2\); it must be the gate's \(2, 3\)$"):
        routing_statistics(gate, torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"^task_ids has shape \(6,\); it must be the gate's \(2, 3\)$"):
        routing_statistics(gate, None, torch.zeros(6, dtype=torch.long))
    ids = torch.tensor([[0, 0, 0], [1, -2, 0]])
    with pytest.raises(ValueError, match="^task id -2 is negative; task ids index the tasks from 0$"):
        routing_statistics(gate, None, ids)
    # id 0 is not negative
    assert routing_statistics(gate, None, torch.zeros(2, 3, dtype=torch.long))["task_tokens"] == [6]


def test_collapse_reasons_thresholds_and_messages() -> None:
    # strictly above 0.95: (0.95, 0.05) is not collapsed (its entropy H / ln 2 = 0.286 is well above 0.05)
    assert collapse_reasons({"mean_gate": [0.95, 0.05]}) == []
    assert collapse_reasons({"mean_gate": [0.01, 0.98, 0.01]}) == ["expert 1 gets 98.0 % of the gate weight"]
    # the shares are normalised first: (1.92, 0.08) is (0.96, 0.04)
    assert collapse_reasons({"mean_gate": [1.92, 0.08]}) == ["expert 0 gets 96.0 % of the gate weight"]
    # entropy alone: 100 experts, (0.95, 0.05, 0, ...): share not above 0.95, but
    # H = 0.95 ln(1/0.95) + 0.05 ln 20 = 0.048729 + 0.149787 = 0.198515 nats, / ln 100 = 0.0431 < 0.05
    assert collapse_reasons({"mean_gate": [0.95, 0.05] + [0.0] * 98}) == ["gate-weight entropy 0.043 < 0.05"]
    # nothing to judge: no tokens (null), a missing field, one expert
    assert collapse_reasons({"mean_gate": None}) == []
    assert collapse_reasons({}) == []
    assert collapse_reasons({"mean_gate": [1.0]}) == []


def _x(*gates: tuple[float, float, float]) -> torch.Tensor:
    """Layer inputs giving these soft gates under W_g = [[1, 0], [0, 1], [0, 0]]: logits (x0, x1, 0), so
    x = (ln(p0/p2), ln(p1/p2))."""
    return torch.tensor([[math.log(p0 / p2), math.log(p1 / p2)] for p0, p1, p2 in gates])


W3 = [[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]


def test_recorder_accumulates_forwards_and_grows_the_task_rows() -> None:
    pm = _toy("soft", W3)
    pad = torch.tensor([[1, 1, 0]])
    with RouterStats(pm) as stats:  # no task names: the usage rows grow with the ids seen
        with stats.task(0):
            pm(inputs_embeds=_x(T1, T3, PAD)[None], attention_mask=pad)  # one usage row so far
        with stats.task(2):
            pm(inputs_embeds=_x(T4, PAD)[None], attention_mask=torch.tensor([[1, 0]]))  # rows 1, 2 appended
        with stats.task(1):
            pm(inputs_embeds=_x(T2)[None])
        [layer] = stats.summary()
    _check(layer, EXAMPLE_A)
    assert layer["num_experts"] == 3 and "top_k" not in layer and layer["collapsed"] == []


def test_paused_disabled_merged_and_nested_labels_are_honoured() -> None:
    pm = _toy("soft", W3)
    proj = pm.base_model.model.proj
    with RouterStats(pm, task_names=["a", "b", "c"]) as stats:
        assert stats.task_label is None
        with stats.task(0):
            with stats.task(2):
                assert stats.task_label == 2
            assert stats.task_label == 0  # the outer label is back
            pm(inputs_embeds=_x(T1, T3)[None])
        assert stats.task_label is None
        stats.task_label = 1
        with stats.paused():
            with stats.paused():
                pm(inputs_embeds=_x(PAD)[None])
            pm(inputs_embeds=_x(PAD)[None])  # still inside the outer pause
        pm(inputs_embeds=_x(T2)[None])  # counted again
        stats.task_label = None
        with pm.disable_adapter():
            pm(inputs_embeds=_x(PAD)[None])
        proj.merged_adapters.append("default")  # as peft's merge would leave it
        pm(inputs_embeds=_x(PAD)[None])
        proj.merged_adapters.clear()
        with stats.task(2):
            pm(inputs_embeds=_x(T4)[None])
        _check(stats.summary()[0], EXAMPLE_A)
        for bad in (-1, 1.0, "1"):
            with pytest.raises(ValueError, match=re.escape(
                f"task label {bad!r}: give the task's index, an int >= 0, or None"
            ) + "$"):  # fmt: skip
                stats.task_label = bad


def test_write_record_fields_extra_keys_and_reset(tmp_path, monkeypatch) -> None:
    path = tmp_path / "sub" / ROUTER_LOG
    monkeypatch.setattr(router_stats.time, "time", lambda: 1234.56789)
    pm = _toy("soft", W3)
    with RouterStats(pm, task_names=["a", "b", "c"]) as stats:
        for task, gates in ((0, (T1, T3)), (1, (T2,)), (2, (T4,))):
            with stats.task(task):
                pm(inputs_embeds=_x(*gates)[None])
        record = stats.write(path, step=5.0, phase="eval", seed=3)
        # the sums start again: the next record has no layers
        second = stats.write(path, step=6)
        assert stats.summary() == [] and second["layers"] == [] and second["phase"] == "train"
        with pytest.raises(ValueError, match="^extra key 'layers' would replace a router record field$"):
            stats.write(path, step=7, layers=[])
    [layer] = record["layers"]
    assert list(record) == ["step", "phase", "time", "tasks", "layers", "collapsed", "seed"]
    assert record["step"] == 5 and type(record["step"]) is int and record["phase"] == "eval"
    assert record["time"] == 1234.568 and record["tasks"] == ["a", "b", "c"] and record["collapsed"] == []
    assert record["seed"] == 3
    assert {k: layer[k] for k in ("module", "adapter", "router", "num_experts", "collapsed")} == {
        "module": "proj", "adapter": "default", "router": "soft", "num_experts": 3, "collapsed": []
    }  # fmt: skip
    _check(layer, EXAMPLE_A)
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0]) == record and lines[0].startswith('{"step": 5, ')
    assert [r["step"] for r in read_router_log(path)] == [5, 6]


def test_collapse_warning_message_and_where_it_points(tmp_path) -> None:
    path = tmp_path / ROUTER_LOG
    collapsed = _toy("soft", [[5.0, 5.0], [-5.0, -5.0]])  # expert 0 takes every positive x
    with RouterStats(collapsed) as stats:
        collapsed(inputs_embeds=torch.ones(1, 3, 2))
        message = (
            "routing collapsed in 1 of 1 routed layers (e.g. proj (default)): one expert gets more than 95 % of "
            "the gate weight or the gate-weight entropy is below 0.05; the other experts get almost no training. "
            f"Details: {path}"
        )
        with pytest.warns(RoutingCollapseWarning, match="^" + re.escape(message) + "$") as caught:
            record = stats.write(path, step=1)
    assert record["collapsed"] == ["proj (default)"]
    # logits 10 and -10 on every token: g_0 = 1 / (1 + e^-20), the reasons in the layer entry
    assert record["layers"][0]["collapsed"] == [
        "expert 0 gets 100.0 % of the gate weight", "gate-weight entropy 0.000 < 0.05"
    ]  # fmt: skip
    # stacklevel: the warning points at the caller of write (under mutmut its trampoline adds one frame)
    assert len(caught) == 1 and caught[0].filename != router_stats.__file__
    if "mutmut" not in sys.modules:
        assert caught[0].filename == __file__


def test_all_processes_adds_parts_it_did_not_see(tmp_path, monkeypatch) -> None:
    """Three other processes' sums, by hand from EXAMPLE_A, with 1, 2 and 3 usage rows; this process saw no
    token. Sums: tokens, top-1 counts, Σ g, Σ H(g), task tokens, Σ g per task (rows zero-padded)."""
    parts = [
        {"proj\0default": [2.0, [1.0, 0.0, 1.0], [0.6, 0.4, 1.0], h(*T1) + h(*T3), [2.0], [[0.6, 0.4, 1.0]]]},
        {"proj\0default": [1.0, [0.0, 1.0, 0.0], list(T2), h(*T2), [0.0, 1.0], [[0.0] * 3, list(T2)]]},
        {
            "proj\0default": [
                1.0,
                [1.0, 0.0, 0.0],
                list(T4),
                h(*T4),
                [0.0, 0.0, 1.0],
                [[0.0] * 3] * 2 + [list(T4)],
            ]
        },
    ]
    sent: list = []

    def gather(obj):
        sent.append(obj)
        return [obj, *parts]

    monkeypatch.setattr(distributed, "splitting", lambda: True)
    monkeypatch.setattr(distributed, "all_gather_json", gather)
    pm = _toy("soft", W3)
    with RouterStats(pm, all_processes=True) as stats:
        [layer] = stats.summary()
    assert sent == [{}]
    _check(layer, EXAMPLE_A)
    assert layer["module"] == "proj" and layer["adapter"] == "default" and layer["num_experts"] == 3


def test_router_log_schedule_and_for_run(tmp_path) -> None:
    pm = _toy("soft", W3)
    log = RouterLog.for_run(pm, tmp_path, every=3, steps=7, task_names=["a"])
    assert (
        isinstance(log, RouterLog) and log.path == tmp_path / ROUTER_LOG and log.stats.all_processes is True
    )
    for step in range(1, 8):
        pm(inputs_embeds=_x(T1)[None])
        log(step)
    assert log.write(7, "eval")["phase"] == "eval"
    log.close()
    records = read_router_log(tmp_path / ROUTER_LOG)
    assert [(r["phase"], r["step"]) for r in records] == [
        ("train", 3),
        ("train", 6),
        ("train", 7),
        ("eval", 7),
    ]
    assert [r["layers"][0]["tokens"] if r["layers"] else 0 for r in records] == [3, 3, 1, 0]
    assert records[0]["tasks"] == ["a"]
    assert RouterLog.for_run(pm, tmp_path, every=0, steps=7, task_names=[]) is None
    plain = pm.get_base_model().proj.base_layer  # no routed layer
    assert RouterLog.for_run(plain, tmp_path, every=3, steps=7, task_names=[]) is None
    RouterLog(pm, tmp_path, every=1, steps=7, task_names=[]).close()  # every step: allowed
    for every in (0, -1):
        with pytest.raises(ValueError, match=re.escape(
            f"every={every}: log the routers every K >= 1 steps (0 turns the log off)"
        ) + "$"):  # fmt: skip
            RouterLog(pm, tmp_path, every=every, steps=7, task_names=[])


def _record(step: int, phase: str = "train", **extra) -> dict:
    return {"step": step, "phase": phase, "layers": [], **extra}


def test_read_router_log_order_blank_lines_and_messages(tmp_path) -> None:
    path = tmp_path / ROUTER_LOG
    lines = [_record(1), _record(2), _record(1, "eval"), _record(1, again=True)]
    path.write_text(json.dumps(lines[0]) + "\n\n" + json.dumps(lines[1]) + "\n  \n" + json.dumps(lines[2])
                    + "\n" + json.dumps(lines[3]) + "\n")  # fmt: skip
    # a re-logged (phase, step) replaces the earlier one and moves to its own place in the file
    assert read_router_log(path) == [lines[1], lines[2], lines[3]]
    path.write_text("")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_router_log(path) == []
    path.write_text(json.dumps(_record(1)) + "\n" + '{"step": 2')
    with pytest.warns(UserWarning, match="^" + re.escape(f"{path}: ignoring an unterminated last line "
                                                          "(an interrupted write)") + "$") as caught:  # fmt: skip
        assert read_router_log(path) == [_record(1)]
    assert len(caught) == 1 and caught[0].filename != router_stats.__file__  # the caller's line
    if "mutmut" not in sys.modules:
        assert caught[0].filename == __file__
    for bad, why in (
        ('{"step": 1}', "'phase'"),
        ('{"step": 1, "phase": "train", "layers": {}}', "'layers' is not a list"),
        ('{"step": "x", "phase": "train", "layers": []}', "invalid literal for int() with base 10: 'x'"),
        ("nope", "Expecting value: line 1 column 1 (char 0)"),
    ):
        path.write_text(json.dumps(_record(1)) + "\n\n" + bad + "\n")
        message = f"{path}:3 is not a router record ({why}); was it written by RouterStats?"
        with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
            read_router_log(path)


def test_append_jsonl_creates_folders_refuses_nan_and_keeps_modes(tmp_path) -> None:
    path = tmp_path / "a" / "b" / ROUTER_LOG
    append_jsonl(path, _record(1, x=0.5))
    append_jsonl(path, _record(2))
    assert path.read_text() == json.dumps(_record(1, x=0.5)) + "\n" + json.dumps(_record(2)) + "\n"
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    path.chmod(0o600)  # an existing file keeps its mode
    append_jsonl(path, _record(3))
    assert path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(ValueError, match="^Out of range float values are not JSON compliant"):
        append_jsonl(path, _record(4, x=math.nan))
    assert len(path.read_text().splitlines()) == 3


def _layer(module: str, **stats) -> dict:
    return {"module": module, "adapter": "default", **stats}


def test_analyze_routing_means_notes_and_final_record(tmp_path, monkeypatch) -> None:
    run, other, empty = tmp_path / "run", tmp_path / "other", tmp_path / "empty"
    for d in (run, other, empty):
        d.mkdir()
    (empty / ROUTER_LOG).write_text("")
    no_tokens = _layer("l3", load=None, max_load=None, token_entropy=None, load_entropy=None, mean_gate=None)
    final = _record(3, "eval", layers=[
        _layer("l1", load=[0.5, 0.5], max_load=0.5, token_entropy=0.2, load_entropy=0.9, mean_gate=[0.5, 0.5]),
        _layer("l2", load=[0.7, 0.3], max_load=0.7, token_entropy=0.4, load_entropy=0.5, mean_gate=[0.97, 0.03]),
        no_tokens,
    ])  # fmt: skip
    # two eval records: the last one is the final; a later training record does not replace it
    for rec in (_record(1, layers=[no_tokens]), _record(2, "eval", layers=[]), final, _record(4)):
        append_jsonl(run / ROUTER_LOG, rec)
    # one expert: the entropies are null, so their means are null and not in the note
    single = _layer("l1", load=[1.0], max_load=1.0, token_entropy=None, load_entropy=None, mean_gate=[1.0])
    append_jsonl(other / ROUTER_LOG, _record(5, layers=[single]))
    append_jsonl(other / ROUTER_LOG, _record(6, layers=[single]))
    adapters = [  # the two without records first: the loop goes on after them
        {"label": "none", "source": str(tmp_path / "missing")},
        {"label": "e", "source": str(empty)},
        {"label": "a/b c", "source": str(run)},
        {"label": "o", "path": str(other / "adapter_model.safetensors")},
    ]
    result = analyze_routing(adapters, tmp_path / "out", figures=False)
    # means over l1, l2 (l3 has no tokens): max_load (0.5 + 0.7) / 2, token_entropy (0.2 + 0.4) / 2,
    # load_entropy (0.9 + 0.5) / 2; l2's gate share 0.97 > 0.95: collapsed
    assert result["routing"] == {
        "a/b c": {"log": str(run / ROUTER_LOG), "step": 3, "phase": "eval",
                  "mean": {"max_load": 0.6, "token_entropy": 0.3, "load_entropy": 0.7},
                  "collapsed": ["l2 (default)"]},
        "o": {"log": str(other / ROUTER_LOG), "step": 6, "phase": "train",
              "mean": {"max_load": 1.0, "token_entropy": None, "load_entropy": None}, "collapsed": []},
    }  # fmt: skip
    assert result["figures"] == []
    assert result["notes"] == [
        f"e: {empty / ROUTER_LOG} holds no router records",
        f"a/b c: routing at eval step 3, mean over 2 layers: max_load 0.600, token_entropy 0.300, "
        f"load_entropy 0.700; collapsed in 1 layer(s) (see {run / ROUTER_LOG})",
        f"o: routing at train step 6, mean over 1 layers: max_load 1.000; collapsed in 0 layer(s) "
        f"(see {other / ROUTER_LOG})",
    ]
    # with figures: a log without task labels or training tokens gives notes naming each figure (no drawing)
    result = analyze_routing(adapters[2:3], tmp_path / "out")
    assert result["figures"] == [] and result["notes"][1:] == [
        "a/b c: no router_usage_a_b_c.png: the eval record of step 3 has no task-labelled tokens",
        "a/b c: no router_load_a_b_c.png: no training record with routed tokens to plot",
    ]
    # each figure gets the label as its title and the slug in its name
    drawn = []

    def fake(name):
        return lambda records, out_png, title="": drawn.append((name, out_png, title, records[-1]["step"]))

    monkeypatch.setattr(router_stats, "plot_router_usage", fake("usage"))
    monkeypatch.setattr(router_stats, "plot_router_load", fake("load"))
    result = analyze_routing(adapters[2:3], tmp_path / "out")
    assert result["figures"] == ["router_usage_a_b_c.png", "router_load_a_b_c.png"]
    out = tmp_path / "out"
    assert drawn == [
        ("usage", out / "router_usage_a_b_c.png", "a/b c", 4),
        ("load", out / "router_load_a_b_c.png", "a/b c", 4),
    ]
    # an entry without source or path does not pick up a router.jsonl in the working directory
    monkeypatch.chdir(run)
    assert analyze_routing([{"label": "cwd"}], tmp_path / "out", figures=False)["routing"] == {}
    assert analyze_routing([{"label": "cwd", "source": ""}], tmp_path / "out", figures=False)["routing"] == {}


class NestedToy(Toy):
    """A Toy whose forward first calls itself on ``inner`` (no mask of its own): a nested model forward."""

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, inner=None, **kwargs):
        if inner is not None:
            self(inputs_embeds=inner)
        return super().forward(input_ids, attention_mask, inputs_embeds, **kwargs)


def test_nested_forwards_keep_the_outer_mask() -> None:
    """The inner forward's layer calls use the outer call's mask, and the outer forward's calls after it are
    still counted with it: t2, t4 (inner) and t1, t3 (outer) count, both paddings do not (EXAMPLE_A without
    task labels)."""
    config = asymlora.AsymLoraConfig(
        method="alora", r=1, num_experts=3, router="soft", target_modules=["proj"]
    )
    pm = peft.get_peft_model(NestedToy(), config)
    with torch.no_grad():
        pm.base_model.model.proj.asymlora_router["default"].copy_(torch.tensor(W3))
    with RouterStats(pm) as stats:
        # the model inside the wrapper, called with its mask and no routing call: the mask comes from the
        # outer forward's arguments alone (a routing call's mask would hide a lost one)
        pm.get_base_model()(inputs_embeds=_x(T1, T3, PAD)[None], attention_mask=torch.tensor([[1, 1, 0]]),
                            inner=_x(T2, T4, PAD)[None])  # fmt: skip
        [layer] = stats.summary()
    _check(layer, {k: v for k, v in EXAMPLE_A.items() if k not in ("usage", "task_tokens")})
    assert layer["usage"] == []


def test_mask_and_task_ids_from_the_routing_call() -> None:
    pm = _toy("soft", W3)
    root = pm.get_base_model()
    pad = torch.tensor([[1, 1, 0]])
    with RouterStats(pm) as fresh:  # an empty batch: no task ids, no usage rows
        pm(inputs_embeds=torch.zeros(0, 3, 2), task_ids=torch.zeros(0, dtype=torch.long))
        assert fresh.summary()[0]["tokens"] == 0 and fresh.summary()[0]["task_tokens"] == []
    with RouterStats(pm) as stats:  # no task names: the rows come from the ids seen
        # training batches: task ids 0 and 2 of two rows (t4's row padded), then task 1
        pm(inputs_embeds=_x(T1, T3, T4, PAD).view(2, 2, 2), attention_mask=torch.tensor([[1, 1], [1, 0]]),
           task_ids=torch.tensor([0, 2]))  # fmt: skip
        pm(inputs_embeds=_x(T2)[None], task_ids=torch.tensor([1]))
        _check(stats.summary()[0], EXAMPLE_A)
        stats.reset()
        # the model called inside a routing call that holds the mask, the forward given none, or a 4-D one
        with pm.base_model.routing(None, attention_mask=pad):
            root(inputs_embeds=_x(T1, T3, PAD)[None])
            root(inputs_embeds=_x(T2, T4, PAD)[None], attention_mask=torch.ones(1, 1, 3, 3))
        _check(stats.summary()[0], {k: v for k, v in EXAMPLE_A.items() if k not in ("usage", "task_tokens")})
        stats.reset()
        # outside any routing call: every token counts, no task ids
        root(inputs_embeds=_x(T1, PAD)[None])
        assert stats.summary()[0]["tokens"] == 2 and stats.summary()[0]["task_tokens"] == [0, 0, 0]
        stats.reset()
        # a layer that sees the tokens flattened to (batch·seq, d) (OPT's MLP): each example's id repeated
        # over its tokens, ids (0, 2) over 2 tokens each: task 0 = t1, t3; task 2 = t4, t2 = (0.4, 0.4, 0.2)
        with pm.base_model.routing(torch.tensor([0, 2])):
            root(inputs_embeds=_x(T1, T3, T4, T2))
        flat = stats.summary()[0]
        _check(
            flat, {**EXAMPLE_A, "usage": [[0.3, 0.2, 0.5], None, [0.4, 0.4, 0.2]], "task_tokens": [2, 0, 2]}
        )
        stats.reset()


def test_only_the_soft_adapter_of_several_active_ones_is_recorded() -> None:
    pm = _toy("soft", W3)
    task = asymlora.AsymLoraConfig(method="alora", r=1, num_experts=2, router="task", target_modules=["proj"])
    pm.add_adapter("t", task)
    pm.base_model.set_adapter(["t", "default"])  # the task-routed adapter first
    with RouterStats(pm) as stats:
        pm(inputs_embeds=_x(T1, T2, T3, T4)[None], task_ids=torch.tensor([1]))
        layers = stats.summary()
    assert [(e["adapter"], e["router"]) for e in layers] == [("default", "soft")]
    _check(layers[0], {k: v for k, v in EXAMPLE_A.items() if k not in ("usage", "task_tokens")})


class FailingToy(Toy):
    """A Toy whose forward can raise after its layer ran."""

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, boom=False, **kwargs):
        out = super().forward(input_ids, attention_mask, inputs_embeds, **kwargs)
        if boom:
            raise RuntimeError("boom")
        return out


def test_hooks_messages_and_the_model_inside_the_wrapper() -> None:
    config = asymlora.AsymLoraConfig(
        method="alora", r=1, num_experts=3, router="soft", target_modules=["proj"]
    )
    pm = peft.get_peft_model(FailingToy(), config)
    with torch.no_grad():
        pm.base_model.model.proj.asymlora_router["default"].copy_(torch.tensor(W3))
    root, proj = pm.get_base_model(), pm.base_model.model.proj
    stats = RouterStats(root)  # the model inside the peft wrapper (no get_base_model) works the same
    with pytest.raises(RuntimeError, match="^boom$"):
        pm(inputs_embeds=_x(T1, T3)[None], boom=True)  # counted: the layer ran
    proj(_x(PAD)[None])  # after the failed forward: outside any model forward, not counted
    pm(inputs_embeds=_x(T2, T4, PAD)[None], attention_mask=torch.tensor([[1, 1, 0]]))
    _check(stats.summary()[0], {k: v for k, v in EXAMPLE_A.items() if k not in ("usage", "task_tokens")})
    stats.close()
    stats.close()  # closing twice is harmless
    assert not root._forward_pre_hooks and not root._forward_hooks and not proj._forward_hooks
    # a model whose only adapter is task-routed (alora, router="task") has nothing to record
    task = asymlora.AsymLoraConfig(method="alora", r=1, num_experts=2, router="task", target_modules=["proj"])
    message = (
        "the model has no asymlora layer with a soft or topk router: nothing to record "
        "(plain LoRA, fedhet and router='task' adapters have no learned routing)"
    )
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        RouterStats(peft.get_peft_model(Toy(), task))


def test_all_processes_counts_beyond_float32_and_without_task_ids(monkeypatch) -> None:
    """2^24 + 1 = 16777217 tokens (all top-1 expert 0, gate (1, 0, 0)) from one process and t1 from another:
    float32 would make the count 16777216; without task ids on any process there is no usage row."""
    big = 2**24 + 1
    parts = [
        {"proj\0default": [float(big), [float(big), 0.0, 0.0], [float(big), 0.0, 0.0], 0.0, [], []]},
        {"proj\0default": [1.0, [1.0, 0.0, 0.0], list(T1), h(*T1), [], []]},
    ]
    monkeypatch.setattr(distributed, "splitting", lambda: True)
    monkeypatch.setattr(distributed, "all_gather_json", lambda obj: [obj, *parts])
    with RouterStats(_toy("soft", W3), all_processes=True) as stats:
        [layer] = stats.summary()
    assert layer["tokens"] == big + 1 and layer["usage"] == [] and layer["task_tokens"] == []
    # mean gate of expert 1: 0.3 / (2^24 + 2) = 1.78814e-08 (6 digits)
    assert layer["mean_gate"][1] == pytest.approx(0.3 / (big + 1), rel=1e-5) and layer["load"] == [
        1.0,
        0.0,
        0.0,
    ]


def test_collapse_share_in_float64() -> None:
    # 0.95000001 > 0.95 in float64; in float32 it rounds to 0.949999988 and would not be
    assert collapse_reasons({"mean_gate": [0.95000001, 0.04999999]}) == [
        "expert 0 gets 95.0 % of the gate weight"
    ]
