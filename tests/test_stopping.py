"""The stopping rule (asymlora.train.stopping): the validation split, the validation loss, early stopping,
the best adapter restored, and a killed run resuming to the same decision. Tiny model, synthetic tasks."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import peft
import pytest
import torch
from safetensors.torch import load_file
from tests.conftest import tiny_alora, tiny_run_overrides, write_two_task_env

from asymlora.config import ConfigError, load_config
from asymlora.data import MultiTaskCollator, MultiTaskDataset
from asymlora.data.tasks import DataError
from asymlora.recipes.multitask import load_split_tasks, run
from asymlora.train import stopping, train
from asymlora.train.stopping import BEST_FILE, VAL_LOG, EarlyStopping, Validation, validation_losses

SIZES = {
    "data.max_train": 30, "data.max_test": 8, "data.max_length": 48, "adapter.target_modules": "[q_proj]",
    "adapter.r": 4, "adapter.num_experts": 2, "train.steps": 12, "train.batch_size": 4, "train.lr": "1e-2",
    "train.warmup_steps": 1, "train.log_every": 1, "eval.batch_size": 8, "eval.max_new_tokens": 3,
}  # fmt: skip


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, Path]:
    return write_two_task_env(tmp_path_factory.mktemp("env"))


def overrides(env: dict[str, Path], run_dir: Path, *extra: str) -> list[str]:
    return tiny_run_overrides(env, run_dir, SIZES, *extra)


# --- the validation split ----------------------------------------------------------------------------------
def _keys(examples) -> list[tuple[str, str]]:
    return [(e.prompt, e.target) for e in examples]


def test_the_validation_split_comes_from_the_training_split_and_is_deterministic(env, tmp_path) -> None:
    cfg = load_config(None, overrides(env, tmp_path, "stopping.val_examples=5"))
    tasks, val = load_split_tasks(cfg)
    again_tasks, again_val = load_split_tasks(cfg)
    plain, none = load_split_tasks(load_config(None, overrides(env, tmp_path)))
    assert none == [] and [v.name for v in val] == ["add", "parity"]
    for task, v, p, t2, v2 in zip(tasks, val, plain, again_tasks, again_val, strict=True):
        assert len(v.train) == 5 and v.test == []
        assert len(task.train) == 30  # data.max_train, as without validation
        assert not set(_keys(v.train)) & set(_keys(task.train))  # disjoint from training
        assert not set(_keys(v.train)) & set(_keys(task.test))  # and from the test split
        assert _keys(task.train) == _keys(p.train) and _keys(task.test) == _keys(p.test)  # same as without
        assert _keys(v.train) == _keys(v2.train) and _keys(task.train) == _keys(t2.train)  # deterministic
    other = load_split_tasks(
        load_config(None, overrides(env, tmp_path, "stopping.val_examples=5", "data.seed=1"))
    )
    assert _keys(other[1][0].train) != _keys(val[0].train)  # the data seed chooses them


def test_too_few_training_examples_for_the_validation_split_is_refused(env, tmp_path) -> None:
    cfg = load_config(None, overrides(env, tmp_path, "stopping.val_examples=48", "data.max_train=null"))
    with pytest.raises(DataError, match=r"48 training example\(s\).*stopping.val_examples=48"):
        load_split_tasks(cfg)


@pytest.mark.parametrize(("override", "message"), [
    ("stopping.every=0", "stopping.every=0 must be >= 1"),
    ("stopping.val_examples=-1", "stopping.val_examples=-1 must be >= 0"),
    ("stopping.patience=3", "stopping.patience=3 needs a validation split"),
    ("stopping.min_delta=-0.1", "stopping.min_delta=-0.1 must be >= 0"),
])  # fmt: skip
def test_bad_stopping_values_are_refused(env, tmp_path, override, message) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides(env, tmp_path, override))


# --- the validation loss ------------------------------------------------------------------------------------
class _SameTokenModel(torch.nn.Module):
    """Logits a · one_hot(current token) over V = 4 tokens, a = ln 3: the next token is predicted to repeat
    the current one with p = 3/6 = 1/2 (loss ln 2), any other token with p = 1/6 (loss ln 6)."""

    def forward(self, input_ids, attention_mask=None, task_ids=None, use_cache=None):
        return SimpleNamespace(logits=math.log(3) * torch.nn.functional.one_hot(input_ids, 4).float())


class _Dataset(list):
    """Encoded examples with the `MultiTaskDataset` attributes the validation loss reads."""

    task_indices: ClassVar = [[0, 1], [2]]
    task_names: ClassVar = ["a", "b"]


def _dataset() -> _Dataset:
    rows = [  # (task, input_ids, labels)
        (0, [1, 1, 2], [-100, 1, 2]),  # targets 1 after 1 (ln 2), 2 after 1 (ln 6)
        (0, [3, 3], [-100, 3]),  # 3 after 3 (ln 2)
        (1, [0, 2], [-100, 2]),  # 2 after 0 (ln 6)
    ]
    return _Dataset({"input_ids": i, "attention_mask": [1] * len(i), "labels": lab, "task_id": t}
                    for t, i, lab in rows)  # fmt: skip


@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_the_validation_loss_is_the_token_weighted_mean_per_task_then_the_mean_over_tasks(batch_size) -> None:
    dataset = _dataset()
    collate = MultiTaskCollator(SimpleNamespace(pad_token_id=0, eos_token_id=2))
    per_task = validation_losses(_SameTokenModel(), dataset, collate, batch_size)
    task_a = (2 * math.log(2) + math.log(6)) / 3  # three tokens; per example it would be (ln12/2 + ln2)/2
    assert per_task == pytest.approx([task_a, math.log(6)], rel=1e-6)
    assert sum(per_task) / 2 == pytest.approx((task_a + math.log(6)) / 2, rel=1e-6)


# --- early stopping -----------------------------------------------------------------------------------------
def test_early_stopping_follows_patience_and_min_delta() -> None:
    rule = EarlyStopping(patience=2, min_delta=0.1)
    # step: loss -> 10: 1.0 best; 20: 0.95 not by > 0.1 (1 bad); 30: 0.85 best; 40: 0.80 (1 bad); 50: 0.9 stop
    improved = [
        rule.update(step, loss) for step, loss in [(10, 1.0), (20, 0.95), (30, 0.85), (40, 0.8), (50, 0.9)]
    ]
    assert improved == [True, False, True, False, False]
    assert (rule.best_step, rule.best, rule.stopped_at) == (30, 0.85, 50)
    never = EarlyStopping(patience=0)
    for step in range(1, 20):
        never.update(step, float(step))
    assert not never.stopped and never.best_step == 1


# --- in the training loop -----------------------------------------------------------------------------------
def _run(env, run_dir: Path, *extra: str, resume=False, on_step=None):
    cfg = load_config(None, overrides(env, run_dir, "stopping.val_examples=4", *extra))
    pm, tok = tiny_alora(env["model"])
    tasks, val = load_split_tasks(cfg)
    ds, collate = MultiTaskDataset(tasks, tok, max_length=48), MultiTaskCollator(tok)
    validation = Validation(MultiTaskDataset(val, tok, max_length=48), collate, cfg.stopping, 4)
    result = train(pm, ds, collate, cfg.train, run_dir, resume=resume, on_step=on_step, validation=validation)
    return result, pm


def _adapter(pm) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in peft.get_peft_model_state_dict(pm).items()}


SEQUENCE = {2: 1.0, 4: 0.9, 6: 0.95, 8: 0.97, 10: 0.5, 12: 0.4}  # patience 2: stop at 8, best 4


@pytest.fixture
def scripted(monkeypatch):
    """validation_losses replaced by the hand-made sequence above (both tasks the same loss)."""
    calls: list[int] = []

    def fake(model, dataset, collate, batch_size, **kw):
        step = len(calls) * 2 + 2
        calls.append(step)
        return [SEQUENCE[step]] * 2

    monkeypatch.setattr(stopping, "validation_losses", fake)
    return calls


def test_early_stopping_stops_at_the_step_the_losses_dictate_and_restores_the_best_adapter(
    env, tmp_path, scripted
):
    run_dir = tmp_path / "run"
    result, pm = _run(env, run_dir, "stopping.every=2", "stopping.patience=2", "train.save_every=2",
                      "train.keep_checkpoints=10")  # fmt: skip
    assert scripted == [2, 4, 6, 8] and result.steps == 8
    assert result.stopping is not None
    assert {k: result.stopping[k] for k in ("stopped_at", "best_step", "best_val_loss")} == {
        "stopped_at": 8, "best_step": 4, "best_val_loss": 0.9}  # fmt: skip
    assert result.stopping["rule"]["patience"] == 2 and result.stopping["restored_best"]
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts[-1] == "step-000008"  # the stop is checkpointed, no step after it
    best = load_file(run_dir / "checkpoints" / "step-000004" / "adapter_model.safetensors")
    now = _adapter(pm)
    assert now.keys() == best.keys()
    for key in best:
        torch.testing.assert_close(now[key], best[key], rtol=0, atol=0)
    last = load_file(run_dir / "checkpoints" / "step-000008" / "adapter_model.safetensors")
    assert any(not torch.equal(last[k], best[k]) for k in best)  # it did train past the best step
    lines = [json.loads(line) for line in (run_dir / VAL_LOG).read_text().splitlines()]
    assert [(r["step"], r["mean"]) for r in lines] == [(s, SEQUENCE[s]) for s in (2, 4, 6, 8)]
    assert set(lines[0]["per_task"]) == {"add", "parity"}


def test_a_killed_run_resumes_to_the_same_stop_and_weights(env, tmp_path, scripted) -> None:
    args = ("stopping.every=2", "stopping.patience=2", "train.save_every=2", "train.keep_checkpoints=1")
    full, pm = _run(env, tmp_path / "full", *args)
    reference = _adapter(pm)
    scripted.clear()

    class Killed(Exception):
        pass

    def kill_at_7(step: int) -> None:
        if step == 7:
            raise Killed

    with pytest.raises(Killed):  # after the checkpoint of step 6 (best 4, one validation without progress)
        _run(env, tmp_path / "killed", *args, on_step=kill_at_7)
    assert [p.name for p in (tmp_path / "killed" / "checkpoints").iterdir()] == ["step-000006"]
    assert load_file(tmp_path / "killed" / "checkpoints" / "step-000006" / BEST_FILE)  # step 4's, kept here
    del scripted[3:]  # the resumed run validates step 8 next
    resumed, pm = _run(env, tmp_path / "killed", *args, resume=True)
    assert (
        resumed.resumed_from == 6 and resumed.stopping == full.stopping and resumed.steps == full.steps == 8
    )
    final = _adapter(pm)
    for key in reference:
        torch.testing.assert_close(final[key], reference[key], rtol=1e-5, atol=1e-6)
    log = [json.loads(line)["step"] for line in (tmp_path / "killed" / VAL_LOG).read_text().splitlines()]
    assert log == [2, 4, 6, 8]
    again, _ = _run(env, tmp_path / "killed", *args, resume=True)  # a finished run stays finished
    assert again.stopping == full.stopping and again.resumed_from == 8


def test_the_recipe_applies_the_same_rule_to_the_single_task_baselines(env, tmp_path) -> None:
    run_dir = tmp_path / "mt"
    cfg = load_config(None, overrides(env, run_dir, "stopping.val_examples=4", "stopping.every=3", "train.steps=6",
                                      "compare.methods=[alora]", "compare.single_task=true", "eval.base_model=false",
                                      "eval.max_examples=2"))  # fmt: skip
    results = run(cfg, quiet=True)
    method = json.loads((run_dir / "alora" / "results.json").read_text())
    assert method["stopping"]["rule"] == {"val_examples": 4, "every": 3, "patience": 0, "min_delta": 0.0,
                                          "restore_best": True}  # fmt: skip
    assert (
        method["stopping"]["best_step"] in (3, 6)
        and results["methods"]["alora"]["stopping"] == method["stopping"]
    )
    for task in ("add", "parity"):  # steps / T = 3 each: one validation, at the end
        single = json.loads((run_dir / "single" / task / "results.json").read_text())
        assert (
            single["stopping"]["rule"] == method["stopping"]["rule"] and single["stopping"]["best_step"] == 3
        )
        lines = (run_dir / "single" / task / VAL_LOG).read_text().splitlines()
        assert [set(json.loads(line)["per_task"]) for line in lines] == [{task}]
    mean = [json.loads(line)["mean"] for line in (run_dir / "alora" / VAL_LOG).read_text().splitlines()]
    assert len(mean) == 2 and method["stopping"]["best_val_loss"] == min(mean)


def test_the_campaign_states_one_stopping_rule_for_every_cell() -> None:
    from asymlora.recipes.sweep import cell_id, expand, load_sweep

    root = Path(__file__).resolve().parent.parent
    cells = expand(load_sweep(root / "configs" / "campaign_multitask.yaml"))
    assert len(cells) == 45 and all(c.config.stopping == cells[0].config.stopping for c in cells)
    rule = cells[0].config.stopping
    assert (rule.val_examples, rule.every, rule.patience, rule.min_delta, rule.restore_best) == (
        40,
        50,
        3,
        0.001,
        True,
    )
    assert sum(len(c.config.data.tasks) == 1 for c in cells) == 24 and cells[0].config.train.epochs == 3
    assert all(c.config.data.max_test == 200 and c.config.adapter.r == 8 for c in cells)
    plain = load_config(None, ["data.tasks=[bigbench:strategyqa]"])  # a stopping rule is part of the cell id
    assert cell_id(plain) == "2f07f08ee83a" != cell_id(load_config(None, ["data.tasks=[bigbench:strategyqa]",
                                                                          "stopping.val_examples=4"]))  # fmt: skip
