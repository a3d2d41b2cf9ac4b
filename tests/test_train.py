"""Training and the multi-task recipe end to end on a tiny model with synthetic tasks."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.conftest import tiny_alora, tiny_run_overrides, write_two_task_env

from asymlora.cli import main as cli_main
from asymlora.config import ConfigError, load_config
from asymlora.recipes import multitask
from asymlora.recipes.multitask import run
from asymlora.train import TrainingError, batch_indices, train

RESULT_KEYS = {"per_task", "average", "std", "worst", "delta_m", "method", "trainable_params", "train_seconds",
               "peak_memory_mb"}  # fmt: skip


SIZES = {
    "data.max_train": 40, "data.max_test": 10, "data.max_length": 64,
    "adapter.target_modules": "[q_proj,v_proj,o_proj,up_proj,down_proj]", "adapter.r": 4, "train.steps": 30,
    "train.batch_size": 8, "train.lr": "1e-2", "train.warmup_steps": 2, "train.log_every": 1,
    "train.save_every": 10, "eval.batch_size": 8, "eval.max_new_tokens": 4,
}  # fmt: skip


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, Path]:
    return write_two_task_env(tmp_path_factory.mktemp("env"), instruction="Add one.")


def overrides(env: dict[str, Path], run_dir: Path, *extra: str) -> list[str]:
    return tiny_run_overrides(env, run_dir, SIZES, *extra)


def test_batch_order_is_a_function_of_seed_and_step() -> None:
    first = [batch_indices(s, 10, 4, seed=3) for s in range(5)]
    assert first == [batch_indices(s, 10, 4, seed=3) for s in range(5)]
    assert sorted(i for batch in first for i in batch) == sorted(list(range(10)) * 2)  # two full epochs
    assert batch_indices(0, 10, 4, seed=4) != first[0]
    ranks = [batch_indices(2, 10, 2, seed=3, rank=r, world=2) for r in range(2)]
    # world 2 × batch 2 reads the same global step as world 1 × batch 4, rank 0 first: step 2 covers positions
    # 8…11 of the epoch stream, i.e. the last two of epoch 0's permutation and the first two of epoch 1's
    assert ranks[0] + ranks[1] == batch_indices(2, 10, 4, seed=3) == first[2]
    perms = [
        torch.randperm(10, generator=torch.Generator().manual_seed(3 * 100_003 + e)).tolist() for e in (0, 1)
    ]
    assert first[2] == perms[0][8:] + perms[1][:2] and first[0] == perms[0][:4]


def test_short_run_lowers_the_loss_and_writes_results(env, tmp_path) -> None:
    cfg = load_config(None, overrides(env, tmp_path / "run"))
    results = run(cfg, quiet=True)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(saved) >= RESULT_KEYS and saved == results
    assert set(saved["per_task"]) == {"add", "parity"}
    acc, em = saved["per_task"]["parity"]["accuracy"], saved["per_task"]["add"]["exact_match"]
    assert all(10 * v == pytest.approx(round(10 * v)) and 0 <= v <= 1 for v in (acc, em))  # 10 test examples
    # the summary of two primary metrics: mean, population std |a − b| / 2, worst = the smaller
    assert saved["average"] == pytest.approx((acc + em) / 2) and saved["std"] == pytest.approx(
        abs(acc - em) / 2
    )
    assert saved["worst"]["value"] == min(acc, em)
    losses = [loss for _, loss in saved["losses"]]
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5, losses
    assert saved["delta_m"] is None and saved["base"]["per_task"].keys() == saved["per_task"].keys()
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "run" / "results.png").is_file() and (tmp_path / "run" / "config.yaml").is_file()
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step-000020", "step-000030"]  # keep_checkpoints=2, no temporary leftovers


def _dataset(env, tok):
    from asymlora.data import MultiTaskCollator, MultiTaskDataset, load_tasks

    tasks = load_tasks([f"jsonl:{env['data']}#add", f"jsonl:{env['data']}#parity"], max_train=40, max_test=5)
    return MultiTaskDataset(tasks, tok, max_length=64), MultiTaskCollator(tok)


def test_kill_and_resume_reaches_the_same_final_step_and_weights(env, tmp_path) -> None:
    settings = load_config(None, overrides(env, tmp_path / "x", "train.steps=12", "train.save_every=4")).train

    pm, tok = tiny_alora(env["model"])
    ds, collate = _dataset(env, tok)
    full = train(pm, ds, collate, settings, tmp_path / "full")
    reference = load_file(tmp_path / "full" / "checkpoints" / "step-000012" / "adapter_model.safetensors")

    class Killed(Exception):
        pass

    def kill_at_6(step: int) -> None:
        if step == 6:
            raise Killed

    pm, tok = tiny_alora(env["model"])
    with pytest.raises(Killed):
        train(pm, ds, collate, settings, tmp_path / "killed", on_step=kill_at_6)
    assert sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir()) == ["step-000004"]
    pm, tok = tiny_alora(env["model"])
    resumed = train(pm, ds, collate, settings, tmp_path / "killed", resume=True)
    assert resumed.resumed_from == 4 and resumed.steps == full.steps == 12
    final = load_file(tmp_path / "killed" / "checkpoints" / "step-000012" / "adapter_model.safetensors")
    assert final.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(final[key], reference[key], rtol=1e-5, atol=1e-6)


def test_training_time_and_step_time_add_up_over_a_resume(env, tmp_path) -> None:
    """A run killed after step 3 (checkpoint at 2) and resumed: train_seconds counts the killed process's
    time up to its checkpoint too (each step's bookkeeping sleeps 0.2 s, so 4 steps take >= 0.8 s), while
    step_seconds, the median of the 4 timed steps (2 before the checkpoint, 2 after the resume), leaves the
    bookkeeping out. A checkpoint written before train_seconds was recorded gives None, not the resumed
    process's time alone."""
    import json
    import statistics
    import time

    settings = load_config(None, overrides(env, tmp_path / "x", "train.steps=4", "train.save_every=2")).train
    pm, tok = tiny_alora(env["model"])
    ds, collate = _dataset(env, tok)

    class Killed(Exception):
        pass

    def slow_then_kill_at_3(step: int) -> None:
        time.sleep(0.2)
        if step == 3:
            raise Killed

    with pytest.raises(Killed):
        train(pm, ds, collate, settings, tmp_path / "run", on_step=slow_then_kill_at_3)
    state_file = tmp_path / "run" / "checkpoints" / "step-000002" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["train_seconds"] >= 0.4 and len(state["step_seconds"]) == 2
    pm, tok = tiny_alora(env["model"])
    resumed = train(
        pm, ds, collate, settings, tmp_path / "run", resume=True, on_step=lambda _: time.sleep(0.2)
    )
    assert resumed.resumed_from == 2 and resumed.train_seconds is not None and resumed.train_seconds >= 0.8
    final = json.loads((tmp_path / "run" / "checkpoints" / "step-000004" / "trainer_state.json").read_text())
    assert final["step_seconds"][:2] == state["step_seconds"] and len(final["step_seconds"]) == 4
    assert resumed.step_seconds == statistics.median(final["step_seconds"]) and resumed.step_seconds < 0.2
    # the killed process had logged step 3 after its step-2 checkpoint: dropped on resume, logged once again
    logged = [json.loads(line)["step"] for line in (tmp_path / "run" / "train_log.jsonl").open()]
    assert logged == sorted(set(logged)) and logged[-2:] == [3, 4]
    del state["train_seconds"]  # a checkpoint from before the field
    state_file.write_text(json.dumps(state))
    pm, tok = tiny_alora(env["model"])
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-000004")
    assert train(pm, ds, collate, settings, tmp_path / "run", resume=True).train_seconds is None


def test_resume_keeps_one_record_per_step_in_the_step_logs(env, tmp_path, monkeypatch) -> None:
    """A run killed after step 3, once before its first checkpoint (save_every=4: the resumed run starts over
    at step 0) and once after checkpoint 2: the resumed run's train_log.jsonl and traces.jsonl hold each step
    once. Before the fix the first kept the killed process's steps 1-3 (the log was purged only when a
    checkpoint was found) and traces.jsonl was never purged."""
    hooks = multitask._step_hooks

    class Killed(Exception):
        pass

    def killed_after_3(*args, **kwargs):
        on_step, router_log = hooks(*args, **kwargs)

        def step(done: int) -> None:
            on_step(done)
            if done == 3:
                raise Killed

        return step, router_log

    for save_every in (4, 2):
        run_dir = tmp_path / f"every{save_every}"
        args = overrides(env, run_dir, "train.steps=5", f"train.save_every={save_every}", "train.trace_every=1",
                         "eval.base_model=false")  # fmt: skip
        with monkeypatch.context() as patch:
            patch.setattr(multitask, "_step_hooks", killed_after_3)
            with pytest.raises(Killed):
                run(load_config(None, args), quiet=True)
        assert len((run_dir / "traces.jsonl").read_text().splitlines()) == 3
        run(load_config(None, args), resume=True, quiet=True)
        for name in ("train_log.jsonl", "traces.jsonl"):
            steps = [json.loads(line)["step"] for line in (run_dir / name).open()]
            assert steps == [1, 2, 3, 4, 5], (save_every, name, steps)


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(env, tmp_path) -> None:
    settings = load_config(None, overrides(env, tmp_path / "x", "train.steps=10", "train.save_every=2")).train
    pm, tok = tiny_alora(env["model"])
    ds, collate = _dataset(env, tok)
    calls = {"n": 0}

    def poison(module, inputs, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] > 5 else output

    pm.get_base_model().lm_head.register_forward_hook(poison)
    with pytest.raises(TrainingError, match=r"loss became nan at step 6.*step-000004"):
        train(pm, ds, collate, settings, tmp_path / "nan")
    assert (tmp_path / "nan" / "checkpoints" / "step-000004" / "adapter_model.safetensors").is_file()


def test_a_run_dir_holding_another_run_is_refused(env, tmp_path) -> None:
    args = overrides(env, tmp_path / "run", "train.steps=2", "eval.base_model=false")
    run(load_config(None, args), quiet=True)
    with pytest.raises(FileExistsError, match="already holds a run"):
        run(load_config(None, args), quiet=True)
    with pytest.raises(ConfigError, match="different config"):
        run(load_config(None, [*args, "adapter.r=2"]), resume=True, quiet=True)
    run(load_config(None, [*args, "adapter.r=2"]), overwrite=True, quiet=True)
    # ALoRA, N = 3, r = 2 on hidden 48 (kv 24, mlp 96): N·r·d_in + r·d_out + N·d_in per layer
    # q 528 + v 480 + o 528 + up 624 + down 960 = 3120 per block, 2 blocks
    assert json.loads((tmp_path / "run" / "results.json").read_text())["trainable_params"] == 6240


def test_cli_train_export_and_eval_of_a_task_routed_run(env, tmp_path, capsys) -> None:
    run_dir = tmp_path / "routed"
    args = overrides(env, run_dir, "train.steps=6", "adapter.router=task", "eval.base_model=false")
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("train:\n  steps: 6\n")
    assert cli_main(["train", str(cfg_file), *args]) == 0
    assert cli_main(["export", str(run_dir), "--task", "parity", "--out", str(tmp_path / "parity")]) == 0
    exported = json.loads((tmp_path / "parity" / "adapter_config.json").read_text())
    assert exported["peft_type"] == "LORA" and exported["r"] == 4
    capsys.readouterr()
    export = ["export", str(run_dir), "--task", "parity", "--out"]
    # --rank truncates calibrated exports only: refused here (it was ignored, rc 0, at rank 4)
    assert cli_main([*export, str(tmp_path / "r2"), "--rank", "2"]) == 2
    err = capsys.readouterr().err
    assert "--rank 2" in err and "drop --rank" in err and "Traceback" not in err
    assert not (tmp_path / "r2").exists()
    # --out naming a file (was "[Errno 20] Not a directory", after loading the model)
    assert cli_main([*export, str(tmp_path / "parity" / "adapter_config.json")]) == 2
    assert "adapter_config.json is a file, not a directory" in capsys.readouterr().err
    # --calibration on a task-routed run: the exact export, said so (it printed "an approximation ... its
    # fidelity is in .../README.md", a file it did not write)
    with pytest.warns(UserWarning, match="--calibration train is not used.*exported exactly"):
        assert cli_main([*export, str(tmp_path / "cal"), "--calibration", "train"]) == 0
    assert "approximation" not in capsys.readouterr().out
    assert not (tmp_path / "cal" / "README.md").exists()
    assert cli_main(["eval", str(run_dir)]) == 0
    assert "parity" in capsys.readouterr().out


def test_gradient_checkpointing_with_task_routing_trains_the_adapter_of_a_run_without(
    env, tmp_path, monkeypatch
) -> None:
    """model.gradient_checkpointing=true with adapter.router=task: the layers run twice per step (forward and
    recomputation) and the adapter equals that of the same run without checkpointing (was refused by the config
    check, although the recomputed layers see the batch's task ids)."""
    calls: list[bool] = []
    load_model = multitask.load_model

    def counting_load_model(cfg):
        model, tokenizer = load_model(cfg)
        model.model.layers[0].self_attn.register_forward_hook(
            lambda module, a, o: calls.append(module.training)
        )
        return model, tokenizer

    monkeypatch.setattr(multitask, "load_model", counting_load_model)
    adapters, forwards = {}, {}
    for checkpointing in ("false", "true"):
        run_dir = tmp_path / f"checkpointing-{checkpointing}"
        extra = ["train.steps=3", "train.save_every=0", "adapter.router=task", "eval.base_model=false",
                 "data.max_test=2", f"model.gradient_checkpointing={checkpointing}"]  # fmt: skip
        calls.clear()
        run(load_config(None, overrides(env, run_dir, *extra)), quiet=True)
        adapters[checkpointing] = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
        forwards[checkpointing] = sum(calls)  # attention calls in training mode
    # one forward per step; with checkpointing also its recomputation in backward
    assert forwards == {"false": 3, "true": 6}
    assert adapters["true"].keys() == adapters["false"].keys()
    for name, tensor in adapters["false"].items():
        assert tensor.abs().max() > 0
        torch.testing.assert_close(adapters["true"][name], tensor, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "missing.yaml"], "does not exist"),
        (["train", "CFG", "train.stepz=3"], "unknown config key 'train.stepz'"),
        (["train", "CFG", "train.steps=abc"], "expected int"),
        (["train", "CFG", "data.tasks=[jsonl:/nope/file.jsonl]"], "/nope/file.jsonl"),
        (["train", "CFG", "model.name=/nope/model"], "/nope/model"),
        (["eval", "/nope/run"], "not an asymlora run directory"),
    ],
)
def test_cli_user_errors_exit_2_without_traceback(env, tmp_path, capsys, argv, message) -> None:
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("train:\n  steps: 1\n")
    argv = [str(cfg_file) if a == "CFG" else a for a in argv]
    if argv[0] == "train" and argv[1] != "missing.yaml":
        base = overrides(env, tmp_path / "r")
        keys = {a.split("=", 1)[0] for a in argv[2:]}
        argv = argv[:2] + [o for o in base if o.split("=", 1)[0] not in keys] + argv[2:]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bf16_mixed_precision_autocasts_training_and_validation(env, tmp_path) -> None:
    """train.mixed_precision=bf16: the training and validation forwards run in bfloat16 (the losses move off
    the float32 run's by more than float rounding, less than a bf16 mantissa allows), the adapter stays
    float32."""
    from asymlora.train.stopping import Validation

    runs = {}
    for precision in ("null", "bf16"):
        cfg = load_config(None, overrides(env, tmp_path / "x", "train.steps=6", "train.save_every=0",
                                          "stopping.every=3", f"train.mixed_precision={precision}"))  # fmt: skip
        pm, tok = tiny_alora(env["model"])
        ds, collate = _dataset(env, tok)
        seen: list[tuple[bool, torch.dtype]] = []
        pm.get_base_model().lm_head.register_forward_hook(
            lambda m, i, o, seen=seen: seen.append((m.training, o.dtype))
        )
        val = Validation(ds, collate, cfg.stopping, batch_size=8)
        result = train(pm, ds, collate, cfg.train, tmp_path / precision, validation=val)
        runs[precision] = (result, set(seen), {p.dtype for p in pm.parameters() if p.requires_grad})
    (fp32, fp32_seen, _), (bf16, bf16_seen, trainable) = runs["null"], runs["bf16"]
    assert fp32_seen == {(True, torch.float32), (False, torch.float32)}
    assert bf16_seen == {(True, torch.bfloat16), (False, torch.bfloat16)}  # training and validation
    assert trainable == {torch.float32}
    first32, first16 = fp32.losses[0][1], bf16.losses[0][1]
    assert first16 != first32 and first16 == pytest.approx(first32, rel=2e-2)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["train.mixed_precision=fp16"],
            "train.mixed_precision='fp16' is not allowed; choose one of ['bf16'] or null",
        ),
        (
            ["train.mixed_precision=no"],
            "=False is not allowed; choose one of ['bf16'] or null (YAML reads no / off as false: write null",
        ),
    ],
)
def test_mixed_precision_values_other_than_bf16_are_refused(env, tmp_path, extra, message) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides(env, tmp_path / "r", *extra))
    assert message in str(e.value)


def test_mixed_precision_with_fsdp_is_refused_before_loading(env, tmp_path) -> None:
    from asymlora.recipes.multitask import check_launch

    cfg = load_config(None, overrides(env, tmp_path / "r", "train.mixed_precision=bf16", "train.fsdp=true"))
    with pytest.raises(ConfigError, match="with train.fsdp=true is not supported"):
        check_launch(cfg)


def test_accelerate_launch_mixed_precision_must_agree_with_the_config(env, tmp_path, monkeypatch) -> None:
    """`accelerate launch --mixed_precision bf16` sets ACCELERATE_MIXED_PRECISION: refused unless the config
    says the same (asymlora autocasts from its config alone; accelerate's own autocast stays off)."""
    from asymlora.recipes.multitask import check_launch

    bf16 = load_config(None, overrides(env, tmp_path / "r", "train.mixed_precision=bf16"))
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    check_launch(bf16)  # a plain `python` / `asymlora sweep` process: the config alone decides
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    check_launch(bf16)  # `accelerate launch` without --mixed_precision sets "no": not a request for float32
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(ConfigError, match=r"'bf16' \(ACCELERATE_MIXED_PRECISION.*train.mixed_precision=null"):
        check_launch(load_config(None, overrides(env, tmp_path / "r")))
    check_launch(load_config(None, overrides(env, tmp_path / "r", "train.mixed_precision=bf16")))
    pm, tok = tiny_alora(env["model"])
    ds, collate = _dataset(env, tok)
    seen: set[torch.dtype] = set()
    pm.get_base_model().lm_head.register_forward_hook(lambda m, i, o: seen.add(o.dtype))
    settings = load_config(None, overrides(env, tmp_path / "r", "train.steps=1", "train.save_every=0")).train
    train(pm, ds, collate, settings, tmp_path / "run")  # the env's bf16 does not reach a null-precision run
    assert seen == {torch.float32}


def test_the_federated_client_autocasts_its_local_steps(env, tmp_path) -> None:
    from asymlora.data import load_tasks
    from asymlora.federated.client import train_local

    tasks = load_tasks([f"jsonl:{env['data']}#add", f"jsonl:{env['data']}#parity"], max_train=16, max_test=2)
    losses = {}
    for dtype in (None, torch.bfloat16):
        pm, tok = tiny_alora(env["model"])
        seen: set[torch.dtype] = set()
        pm.get_base_model().lm_head.register_forward_hook(lambda m, i, o, seen=seen: seen.add(o.dtype))
        losses[dtype], _ = train_local(pm, tok, tasks, steps=2, batch_size=4, lr=1e-2, seed=0, autocast=dtype)
        assert seen == {dtype or torch.float32}
        assert {p.dtype for p in pm.parameters() if p.requires_grad} == {torch.float32}
    assert losses[torch.bfloat16] != losses[None] and losses[torch.bfloat16] == pytest.approx(
        losses[None], rel=2e-2
    )


def test_purge_after_step_keeps_what_a_resumed_run_stands_on(tmp_path) -> None:
    from asymlora.io import purge_after_step

    log = tmp_path / "router.jsonl"
    lines = ['{"step": 10, "phase": "train"}', '{"step": 20}', "not json", '{"step": 30}', '{"step": 20.5}',
             '{"other": 1}', '{"step": true}', "[1, 2]"]  # fmt: skip
    log.write_text("\n".join(lines) + "\n")
    assert purge_after_step(log, 20) == 2  # steps 30 and 20.5
    assert log.read_text().splitlines() == [
        lines[0],
        lines[1],
        "not json",
        '{"other": 1}',
        '{"step": true}',
        "[1, 2]",
    ]
    before = log.stat().st_mtime_ns
    assert (
        purge_after_step(log, 20) == 0 and log.stat().st_mtime_ns == before
    )  # nothing to drop: not rewritten
    assert purge_after_step(tmp_path / "missing.jsonl", 0) == 0 and not (tmp_path / "missing.jsonl").exists()


def test_the_federated_client_warns_of_cut_prompts_once(env, caplog, monkeypatch) -> None:
    """A client's data is the same every round, and each round's dataset re-logged "cut the prompt of N of M
    train examples" for every client (80 copies of 8 lines in a 10-round campaign cell's log): now once per
    process and note, whichever round a client first trains in (partial participation)."""
    from asymlora.data import load_tasks
    from asymlora.federated import client

    monkeypatch.setattr(client, "_DATA_NOTES_LOGGED", set())
    tasks = load_tasks([f"jsonl:{env['data']}#add"], max_train=4, max_test=1)
    for offset, max_length, warned in ((4, 6, True), (6, 6, False), (0, 6, False), (0, 7, True)):
        pm, tok = tiny_alora(env["model"])
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            client.train_local(pm, tok, tasks, steps=1, batch_size=2, lr=1e-2, seed=0, step_offset=offset,
                               max_length=max_length)  # fmt: skip
        assert any("from the left to fit" in r.getMessage() for r in caplog.records) is warned
