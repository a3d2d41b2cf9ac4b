"""Router diagnostics: statistics against hand values, hooks, padding, collapse warning, router.jsonl, figures."""

from __future__ import annotations

import json
import math
import types
import warnings

import peft
import pytest
import torch
from tests.conftest import make_tiny_llama
from torch import nn

import asymlora
from asymlora.analysis.router_stats import (
    COLLAPSE_MAX_SHARE,
    ROUTER_LOG,
    RouterStats,
    RoutingCollapseWarning,
    append_jsonl,
    collapse_reasons,
    read_router_log,
    routing_statistics,
)

LN2 = math.log(2)


def h(*p: float) -> float:
    """Entropy in nats, by hand."""
    return -sum(v * math.log(v) for v in p if v > 0)


# Four real tokens and one padding token. Gates (N = 2), tasks 0, 0, 1, 1; the padding gate [1, 0] of task 1
# would change every statistic if it counted.
GATES = [[0.8, 0.2], [0.6, 0.4], [0.1, 0.9], [0.3, 0.7]]
HAND = {
    "tokens": 4,
    "load": [0.5, 0.5],  # argmax 0, 0, 1, 1
    "mean_gate": [(0.8 + 0.6 + 0.1 + 0.3) / 4, (0.2 + 0.4 + 0.9 + 0.7) / 4],  # 0.45, 0.55
    "token_entropy": (h(0.8, 0.2) + h(0.6, 0.4) + h(0.1, 0.9) + h(0.3, 0.7)) / 4 / LN2,  # 0.760791
    "load_entropy": 1.0,
    "max_load": 0.5,
    "max_gate": 0.55,
    "gate_entropy": h(0.45, 0.55) / LN2,  # 0.992774
    "usage": [[0.7, 0.3], [0.2, 0.8]],  # task 0: mean of tokens 1, 2; task 1: of tokens 3, 4
    "task_tokens": [2, 2],
}


def _check(stats: dict, hand: dict) -> None:
    for key, value in hand.items():
        if key == "usage":
            assert len(stats[key]) == len(value) and all(
                row == pytest.approx(ref, abs=1e-6) for row, ref in zip(stats[key], value, strict=True)
            )
        else:
            assert stats[key] == pytest.approx(value, abs=1e-6), key


def test_statistics_match_hand_values_and_skip_padding() -> None:
    pad = [1.0, 0.0]
    gate = torch.tensor([[*GATES[:2], pad], [*GATES[2:], pad]])  # (2, 3, 2), last position padding
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    tasks = torch.tensor([[0, 0, 0], [1, 1, 1]])
    _check(routing_statistics(gate, mask, tasks, num_tasks=2), HAND)
    with_padding = routing_statistics(gate, None, tasks)
    assert with_padding["tokens"] == 6 and with_padding["load"] == pytest.approx([4 / 6, 2 / 6])
    # a third task without tokens gets a null row; no task ids, no usage rows
    assert routing_statistics(gate, mask, tasks, num_tasks=3)["usage"][2] is None
    assert routing_statistics(gate, mask)["usage"] == []
    with pytest.raises(ValueError, match="mask has shape"):
        routing_statistics(gate, mask[:, :2])
    with pytest.raises(ValueError, match="task id -1 is negative"):
        routing_statistics(gate, mask, -tasks)


class Toy(nn.Module):
    """One nn.Linear ``proj`` that reads inputs_embeds (d_in = 2) directly, so x and W_g give known gates."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(2, 2)
        self.config = types.SimpleNamespace(model_type="toy", use_return_dict=True)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs):
        return {"out": self.proj(inputs_embeds)}

    def prepare_inputs_for_generation(self, *args, **kwargs):
        return kwargs


def _toy(router: str, router_weight: list[list[float]], **cfg):
    torch.manual_seed(0)
    config = asymlora.AsymLoraConfig(
        method="alora", r=1, num_experts=len(router_weight), router=router, target_modules=["proj"], **cfg
    )
    pm = peft.get_peft_model(Toy(), config)
    with torch.no_grad():
        pm.base_model.model.proj.asymlora_router["default"].copy_(torch.tensor(router_weight))
    return pm


# W_g = I: p_0 = sigmoid(x_0 − x_1), so x_0 − x_1 = ln(p_0 / p_1) gives GATES; the padding token gives [1, 0]
X = torch.tensor(
    [[math.log(4), 0], [math.log(1.5), 0], [0, math.log(9)], [0, math.log(7 / 3)], [10.0, -10.0]]
)


def test_hook_recomputes_the_soft_gate_and_reads_mask_and_task_ids() -> None:
    pm = _toy("soft", [[1.0, 0.0], [0.0, 1.0]])
    embeds, mask = X[torch.tensor([[0, 1, 4], [2, 3, 4]])], torch.tensor([[1, 1, 0], [1, 1, 0]])
    with RouterStats(pm, task_names=["a", "b"]) as stats:
        pm(inputs_embeds=embeds, attention_mask=mask, task_ids=torch.tensor([0, 1]))  # training: call's ids
        pm.base_model.model.proj(embeds)  # outside the model's forward (e.g. a recomputation): not counted
        [layer] = stats.summary()
        _check(layer, HAND)
        assert layer["module"] == "proj" and layer["router"] == "soft" and layer["collapsed"] == []
        stats.reset()
        for task, rows in ((0, [0, 1, 4]), (1, [2, 3, 4])):  # evaluation: one task at a time, no task ids
            with stats.task(task):
                pm(inputs_embeds=X[rows][None], attention_mask=torch.tensor([[1, 1, 0]]))
        _check(stats.summary()[0], HAND)
        with pytest.raises(ValueError, match="task label -1"):
            stats.task_label = -1
    stats.reset()
    pm(inputs_embeds=embeds)  # hooks removed on exit
    assert stats.summary() == []


def test_all_processes_sums_the_tokens_of_every_process(tmp_path, monkeypatch) -> None:
    """Two processes of a torchrun, simulated: process 0 scores task 0's tokens 1-2, process 1 task 1's
    tokens 3-4 (so it has one more usage row). With all_processes the record is the hand values of all four
    tokens; without it, or in lockstep (every process saw every token), this process's own."""
    from asymlora import distributed

    pm = _toy("soft", [[1.0, 0.0], [0.0, 1.0]])
    mask = torch.tensor([[1, 1, 0]])
    payload: dict = {}

    def capture(obj):
        payload.update(obj)
        return [obj]

    monkeypatch.setattr(distributed, "splitting", lambda: True)
    monkeypatch.setattr(distributed, "all_gather_json", capture)
    other = RouterStats(pm, all_processes=True)
    with other.task(1):
        pm(inputs_embeds=X[[2, 3, 4]][None], attention_mask=mask)
    other.summary()  # process 1's sums, as it sends them
    other.close()
    with RouterStats(pm, all_processes=True) as stats, RouterStats(pm) as alone:
        with stats.task(0), alone.task(0):
            pm(inputs_embeds=X[[0, 1, 4]][None], attention_mask=mask)
        monkeypatch.setattr(distributed, "all_gather_json", lambda obj: [obj, payload])
        monkeypatch.setattr(distributed, "is_main", lambda: True)
        record = stats.write(tmp_path / ROUTER_LOG, step=1)
        _check(record["layers"][0], HAND)
        assert alone.summary()[0]["tokens"] == 2 and alone.summary()[0]["task_tokens"] == [2]
        monkeypatch.setattr(distributed, "splitting", lambda: False)  # lockstep
        with stats.task(0):
            pm(inputs_embeds=X[[0, 1, 4]][None], attention_mask=mask)
        assert stats.summary()[0]["tokens"] == 2
        monkeypatch.setattr(distributed, "is_main", lambda: False)
        assert (
            stats.write(tmp_path / ROUTER_LOG, step=2) == {} and stats.summary() == []
        )  # reset, not written
    assert len(read_router_log(tmp_path / ROUTER_LOG)) == 1


def test_topk_statistics_use_the_renormalised_gate() -> None:
    # logits [ln 2.5, ln 1.5, 0] -> softmax [0.5, 0.3, 0.2] -> top-2 [0.625, 0.375, 0]
    pm = _toy("topk", [[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], top_k=2)
    x = torch.tensor([[[math.log(2.5), math.log(1.5)]]])
    with RouterStats(pm) as stats:
        pm(inputs_embeds=x)
        [layer] = stats.summary()
    assert layer["top_k"] == 2 and layer["load"] == [1.0, 0.0, 0.0]
    assert layer["mean_gate"] == pytest.approx([0.625, 0.375, 0.0])
    assert layer["token_entropy"] == pytest.approx(h(0.625, 0.375) / math.log(3), abs=1e-6)
    assert layer["load_entropy"] == 0.0 and layer["usage"] == []  # no task ids and no label


def test_collapse_warning_fires_on_a_collapsed_router_only(tmp_path) -> None:
    path = tmp_path / ROUTER_LOG
    collapsed = _toy("soft", [[5.0, 5.0], [-5.0, -5.0]])  # expert 0 wins for every positive x
    x = torch.rand(1, 6, 2) + 0.1
    with RouterStats(collapsed) as stats:
        collapsed(inputs_embeds=x)
        with pytest.warns(RoutingCollapseWarning, match="1 of 1 routed layers"):
            record = stats.write(path, step=3)
    assert record["collapsed"] == ["proj (default)"] and record["layers"][0]["max_load"] == 1.0
    balanced = _toy("soft", [[1.0, 0.0], [0.0, 1.0]])
    with RouterStats(balanced) as stats, warnings.catch_warnings():
        warnings.simplefilter("error", RoutingCollapseWarning)
        balanced(inputs_embeds=X[:4][None])  # load [0.5, 0.5]
        assert stats.write(path, step=4)["collapsed"] == []
    assert [r["step"] for r in read_router_log(path)] == [3, 4]
    # the thresholds, on the mean gate: strictly above 0.95 of the gate weight, or its entropy below 0.05
    assert collapse_reasons({"mean_gate": [0.96, 0.04]}) == ["expert 0 gets 96.0 % of the gate weight"]
    assert not collapse_reasons({"mean_gate": [0.94, 0.06]})
    # 100 experts, one with 0.945: below the share threshold; H = −0.945 log 0.945 + 0.055 log(99/0.055),
    # by hand 0.0535 + 0.4122 = 0.4657 nats, / log 100 = 0.101 > 0.05: not collapsed
    assert not collapse_reasons({"mean_gate": [0.945] + [0.055 / 99] * 99})
    assert collapse_reasons({"mean_gate": [0.999] + [0.001 / 99] * 99}) == [
        "expert 0 gets 99.9 % of the gate weight", "gate-weight entropy 0.003 < 0.05",
    ]  # fmt: skip
    # seen in the multi-task campaign (ALoRA, soft): one expert is the top-1 of 96 % of the tokens, yet the
    # gates are near uniform, so every expert trains: not collapsed
    campaign = {"load": [0.0213, 0.9623, 0.0163], "max_load": 0.9623, "mean_gate": [0.2966, 0.3943, 0.3091]}
    assert not collapse_reasons(campaign)
    assert COLLAPSE_MAX_SHARE == 0.95


def test_padding_and_checkpoint_recomputation_are_not_counted() -> None:
    model = make_tiny_llama(hidden=32, layers=2)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    cfg = asymlora.AsymLoraConfig(method="alora", r=2, num_experts=3, target_modules=["q_proj", "v_proj"])
    pm = peft.get_peft_model(model, cfg)
    pm.train()
    ids = torch.randint(3, 100, (2, 7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    with RouterStats(pm, task_names=["t0", "t1"]) as stats:
        out = pm(input_ids=ids, attention_mask=mask, labels=ids, task_ids=torch.tensor([1, 0]))
        out.loss.backward()  # recomputes each checkpointed decoder layer
        layers = stats.summary()
        assert len(layers) == 4 and {e["tokens"] for e in layers} == {11}
        assert {tuple(e["task_tokens"]) for e in layers} == {(4, 7)}
        stats.reset()
        pm.eval()
        prompts, prompt_mask = ids[:, :5], torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])  # left padding
        pm.generate(input_ids=prompts, attention_mask=prompt_mask, max_new_tokens=3, min_new_tokens=3,
                    do_sample=False, pad_token_id=0)  # fmt: skip
        # the prompts' 8 real tokens, then the first two generated tokens of each row are fed back
        assert {e["tokens"] for e in stats.summary()} == {8 + 2 * 2}


def test_router_jsonl_from_a_short_run_and_its_analyze_figures(tmp_path) -> None:
    from tests.conftest import make_char_tokenizer

    from asymlora.analysis import analyze
    from asymlora.config import load_config
    from asymlora.recipes.multitask import run

    model_dir, data = tmp_path / "model", tmp_path / "tasks.jsonl"
    make_tiny_llama(hidden=32, layers=2).save_pretrained(model_dir)
    make_char_tokenizer().save_pretrained(model_dir)
    rows = [{"input": f"{i}+1=", "target": str(i + 1), "task": "add"} for i in range(12)]
    rows += [
        {"input": f"Is {i} even?", "target": "yes" if i % 2 == 0 else "no", "task": "parity"}
        for i in range(12)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_dir = tmp_path / "run"
    cfg = load_config(None, [
        f"model.name={model_dir}", "model.device=cpu", f"data.tasks=[jsonl:{data}#add, jsonl:{data}#parity]",
        "data.max_train=8", "data.max_test=2", "data.max_length=32", "adapter.target_modules=[q_proj]",
        "adapter.r=2", "train.steps=3", "train.batch_size=4", "train.router_log_every=2", "train.save_every=0",
        "eval.batch_size=4", "eval.max_new_tokens=2", "eval.base_model=false", f"run_dir={run_dir}",
    ])  # fmt: skip
    run(cfg, quiet=True)
    records = read_router_log(run_dir / ROUTER_LOG)
    assert [(r["phase"], r["step"]) for r in records] == [("train", 2), ("train", 3), ("eval", 3)]
    assert all(r["tasks"] == ["add", "parity"] and len(r["layers"]) == 2 for r in records)
    for r in records:
        for layer in r["layers"]:
            assert layer["num_experts"] == 3 and sum(layer["load"]) == pytest.approx(1.0, abs=1e-5)
            assert sum(layer["task_tokens"]) == layer["tokens"] > 0
    # evaluation labels each task's tokens: both rows of the usage matrix are filled, each a distribution
    for layer in records[-1]["layers"]:
        assert all(t > 0 for t in layer["task_tokens"])
        assert all(sum(row) == pytest.approx(1.0, abs=1e-5) for row in layer["usage"])
    torn = tmp_path / "torn.jsonl"  # an interrupted append: the unterminated last line is skipped
    torn.write_text((run_dir / ROUTER_LOG).read_text() + '{"step": 9, "pha')
    with pytest.warns(UserWarning, match="unterminated"):
        assert read_router_log(torn) == records
    result = analyze([run_dir], tmp_path / "analysis", labels=["alora"])
    assert {"router_usage_alora.png", "router_load_alora.png"} <= set(result["figures"])
    for name in ("router_usage_alora.png", "router_load_alora.png"):
        assert (tmp_path / "analysis" / name).read_bytes()[:4] == b"\x89PNG"
    assert result["routing"]["alora"]["phase"] == "eval"
    saved = json.loads((tmp_path / "analysis" / "analysis.json").read_text())
    assert saved["routing"] == result["routing"]


def test_append_jsonl_and_bad_logs(tmp_path) -> None:
    path = tmp_path / "r.jsonl"
    append_jsonl(path, {"step": 1, "phase": "train", "layers": []})
    append_jsonl(path, {"step": 1, "phase": "train", "layers": [], "again": True})  # a resumed run re-logs
    assert read_router_log(path) == [{"step": 1, "phase": "train", "layers": [], "again": True}]
    assert path.stat().st_mode & 0o777 == 0o644 or path.stat().st_mode & 0o022 == 0
    path.write_text('{"step": 1}\n')
    with pytest.raises(ValueError, match="r.jsonl:1 is not a router record"):
        read_router_log(path)
    with pytest.raises(ValueError, match="no asymlora layer with a soft or topk router"):
        RouterStats(_toy("soft", [[1.0, 0.0], [0.0, 1.0]]).get_base_model().proj.base_layer)


def test_a_negative_log_interval_is_a_config_error() -> None:
    from asymlora.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="train.router_log_every=-1 must be >= 0"):
        load_config(None, ["data.tasks=[bigbench:strategyqa]", "train.router_log_every=-1"])
