"""Multi-process (DDP, gloo on CPU) training: real `torchrun` / `accelerate launch` subprocesses on a tiny model.

The adapter of a 2-process run must equal a 1-process run's with the same global batch, although the two
ranks see different numbers of target tokens (the loss is token-weighted over the global batch), and a
2-process run killed after a checkpoint and resumed must end where an uninterrupted one does.

Run as a script (``python tests/test_distributed.py train CONFIG ...``) this file is the worker the tests
launch: `asymlora train`, killed by SIGKILL right after checkpoint ``ASYMLORA_TEST_KILL_AFTER`` when set,
and failing (exit status 70) when threads of the process group are still running after it returned: those
threads can abort the interpreter at exit (-6, "terminate called without an active exception") now and then,
so the tests check for them, which fails every time, instead of for the abort itself.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
STEPS = 6


def _worker_main(argv: list[str]) -> int:
    from asymlora.cli import main
    from asymlora.train import loop

    kill_after = int(os.environ.get("ASYMLORA_TEST_KILL_AFTER", "0"))
    if kill_after:
        save = loop.save_checkpoint

        def save_then_die(run_dir, step, *args, **kwargs):
            path = save(run_dir, step, *args, **kwargs)
            if step == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)  # a hard kill: no cleanup, like a lost node
            return path

        loop.save_checkpoint = save_then_die
    if log_dir := os.environ.get("ASYMLORA_TEST_EVAL_LOG"):
        _count_scored_examples(Path(log_dir))
    status = main(argv)
    if left := process_group_threads():
        print(f"threads of the process group still running after asymlora returned: {left}", file=sys.stderr)
        return status or 70
    return status


# names the C++ threads of torch.distributed take (gloo's workers and transport loop, NCCL's watchdog,
# the TCPStore server); each stops only when the last reference to its process group or store is gone
PROCESS_GROUP_THREADS = ("pt_gloo", "gloo_", "pt_nccl", "pt_tcpstore")


def process_group_threads() -> list[str]:
    """Names of this process's threads that belong to a process group (Linux's /proc; [] elsewhere)."""
    names = []
    for comm in Path("/proc/self/task").glob("*/comm"):
        try:
            names.append(comm.read_text().strip())
        except OSError:  # the thread ended meanwhile
            continue
    return sorted(n for n in names if n.startswith(PROCESS_GROUP_THREADS))


def _count_scored_examples(log_dir: Path) -> None:
    """Record how many examples this rank scores per call (to show evaluation is split, not repeated)."""
    from asymlora.eval import scoring

    log = log_dir / f"rank{os.environ['RANK']}.jsonl"
    for name, inner in [(n, getattr(scoring, n)) for n in ("option_loglikelihoods", "greedy_generate")]:

        def counted(model, tokenizer, examples, *args, _inner=inner, _name=name, **kwargs):
            with log.open("a") as fh:
                fh.write(json.dumps({"fn": _name, "n": len(examples)}) + "\n")
            return _inner(model, tokenizer, examples, *args, **kwargs)

        setattr(scoring, name, counted)


if __name__ == "__main__":  # run by torchrun with PYTHONPATH = src + the repository (see _launch)
    sys.exit(_worker_main(sys.argv[1:]))


from tests.conftest import make_char_tokenizer, make_tiny_llama  # noqa: E402

from asymlora.cli import main as cli_main  # noqa: E402
from asymlora.distributed import per_process_batch  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama, a character tokenizer, and two tasks whose examples have different lengths."""
    root = tmp_path_factory.mktemp("ddp")
    make_tiny_llama(hidden=32, layers=2, initializer_range=0.2).save_pretrained(root / "model")
    make_char_tokenizer().save_pretrained(root / "model")
    add = [{"instruction": "Add one.", "input": str(i * 37), "output": str(i * 37 + 1), "task": "add"}
           for i in range(40)]  # fmt: skip
    parity = [{"input": f"Is {i} even?", "options": ["yes", "no"], "target": "yes" if i % 2 == 0 else "no",
               "task": "parity"} for i in range(40)]  # fmt: skip
    data = root / "tasks.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in add + parity))
    (root / "cfg.yaml").write_text("train:\n  seed: 0\n")
    return {"model": root / "model", "data": data, "config": root / "cfg.yaml"}


def overrides(env: dict[str, Path], run_dir: Path, *extra: str) -> list[str]:
    return [
        f"model.name={env['model']}", "model.device=cpu",
        f"data.tasks=[jsonl:{env['data']}#add, jsonl:{env['data']}#parity]",
        "data.max_train=24", "data.max_test=5", "data.max_length=48",
        "adapter.method=alora", "adapter.router=task", "adapter.target_modules=[q_proj,v_proj,down_proj]",
        "adapter.r=4", f"train.steps={STEPS}", "train.batch_size=4", "train.grad_accum=2", "train.lr=1e-2",
        "train.warmup_steps=1", "train.log_every=1", "train.save_every=2", "eval.base_model=false",
        "eval.batch_size=4", "eval.max_new_tokens=3", f"run_dir={run_dir}", *extra,
    ]  # fmt: skip


def free_port() -> int:
    """A port in 29600-29699 nothing listens on (the range this suite's launches use)."""
    for port in range(29600, 29700):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 29600-29699")


def launch(launcher: list[str], config: Path, args: list[str], **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
               **env}  # fmt: skip
    cmd = [*launcher, str(Path(__file__)), "train", "--quiet", str(config), *args]
    return subprocess.run(cmd, env=environ, capture_output=True, text=True, timeout=300, cwd=ROOT)


def torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            "--master_addr", "127.0.0.1", f"--master_port={free_port()}"]  # fmt: skip


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol=1e-4, atol=2e-5) -> None:
    """Equal adapters to float32 rounding (tensors of magnitude up to ~0.2 after a few AdamW steps)."""
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol, msg=key)


@pytest.fixture(scope="module")
def one_process(env, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("one") / "run"
    assert cli_main(["train", "--quiet", str(env["config"]), *overrides(env, run_dir)]) == 0
    return run_dir


@pytest.fixture(scope="module")
def two_processes(env, tmp_path_factory) -> Path:
    """An uninterrupted `torchrun --nproc_per_node=2` run; each rank logs the examples it scores."""
    run_dir = tmp_path_factory.mktemp("two") / "run"
    (logs := run_dir.parent / "eval_log").mkdir()
    done = launch(torchrun(2), env["config"], overrides(env, run_dir), ASYMLORA_TEST_EVAL_LOG=str(logs))
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir.parent / "stderr.txt").write_text(done.stderr)
    return run_dir


def test_two_processes_train_the_adapter_of_one_process_with_the_same_global_batch(
    one_process, two_processes
) -> None:
    # the two ranks see different numbers of target tokens ("Add one." answers of 2-4 digits, yes/no), so a
    # per-rank mean loss averaged by DDP would give another gradient; the all-reduced token count gives this one
    assert_same(adapter(two_processes), adapter(one_process))
    logs = [[json.loads(line) for line in (d / "train_log.jsonl").read_text().splitlines()]
            for d in (one_process, two_processes)]  # fmt: skip
    assert [r["step"] for r in logs[1]] == list(range(1, STEPS + 1))  # written once (rank 0), not per rank
    for a, b in zip(*logs, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    one, two = (json.loads((d / "results.json").read_text()) for d in (one_process, two_processes))
    assert two["per_task"] == one["per_task"]
    assert (two_processes / "per_example.jsonl").read_text() == (
        one_process / "per_example.jsonl"
    ).read_text()
    assert sorted(p.name for p in (two_processes / "checkpoints").iterdir()) == ["step-000004", "step-000006"]
    # the data warnings (prompts cut to fit data.max_length) are printed once, not once per process
    warned = [
        line
        for line in (two_processes.parent / "stderr.txt").read_text().splitlines()
        if "cut the prompt" in line
    ]
    assert len(warned) == len(set(warned)) >= 1, warned


def test_evaluation_is_split_across_ranks_and_gathered(two_processes) -> None:
    logs = two_processes.parent / "eval_log"
    calls = {
        r: [json.loads(line) for line in (logs / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)
    }
    # 5 test examples per task: rank 0 scores examples 0, 2, 4 and rank 1 examples 1, 3 of each task
    assert [c["n"] for c in calls[0]] == [3, 3] and [c["n"] for c in calls[1]] == [2, 2]
    assert {c["fn"] for c in calls[0]} == {"option_loglikelihoods", "greedy_generate"}
    rows = [json.loads(line) for line in (two_processes / "per_example.jsonl").read_text().splitlines()]
    assert [(r["task"], r["index"]) for r in rows] == [(t, i) for t in ("add", "parity") for i in range(5)]


def test_a_killed_run_resumes_exactly_under_accelerate_launch_and_fsdp(env, tmp_path) -> None:
    """A DDP run killed after checkpoint 4, resumed sharded (train.fsdp=true) under accelerate launch.

    Dropout on, so each rank's RNG stream must come back too: rank 1 restored with rank 0's state draws
    other masks and the adapters differ (planted once: red)."""
    args = [*overrides(env, tmp_path / "full"), "adapter.lora_dropout=0.2"]
    full = launch(torchrun(2), env["config"], args)
    assert full.returncode == 0, full.stderr[-3000:]
    run_dir = tmp_path / "run"
    args = [*overrides(env, run_dir), "adapter.lora_dropout=0.2"]
    killed = launch(torchrun(2), env["config"], args, ASYMLORA_TEST_KILL_AFTER="4")
    assert killed.returncode != 0
    assert (run_dir / "checkpoints" / "step-000004").is_dir() and not (run_dir / "adapter").exists()
    again = launch(torchrun(2), env["config"], args)  # without --resume: rank 0 refuses, rank 1 stops with it
    assert again.returncode != 0 and again.stderr.count("already holds a run; pass --resume") == 2
    assert f"{ROOT / 'src'}" not in again.stderr  # no traceback through our code (torchrun prints its own)
    # `--multi_gpu` is accelerate's torchrun-style launcher, CPU processes included; with `--cpu` accelerate
    # starts ONE process on a single machine (multi-CPU needs mpirun there): this test caught that once
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2",
                  "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", "--main_process_ip=127.0.0.1",
                  f"--main_process_port={free_port()}"]  # fmt: skip
    resumed = launch(accelerate, env["config"], [*args, "train.fsdp=true", "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (
        "resuming from" in resumed.stdout + resumed.stderr and "(step 4)" in resumed.stdout + resumed.stderr
    )
    # DDP steps 1-4, then FSDP steps 5-6, against DDP throughout: measured 1.5e-8 (one process resuming: 7e-3)
    assert_same(adapter(run_dir), adapter(tmp_path / "full"), rtol=1e-5, atol=1e-6)
    # the sharded model's checkpoint 6 holds full tensors in the unsharded format (it resumes either way), and
    # its lockstep evaluation (every rank scores every example) gives the same scores
    for name in ("adapter_model.safetensors", "optimizer.safetensors"):
        sharded, plain = (
            load_file(str(d / "checkpoints" / "step-000006" / name)) for d in (run_dir, tmp_path / "full")
        )
        assert_same(
            {k: v.double() for k, v in sharded.items()}, {k: v.double() for k, v in plain.items()}, 1e-5, 1e-6
        )
    states = [json.loads((d / "checkpoints" / "step-000006" / "trainer_state.json").read_text())
              for d in (run_dir, tmp_path / "full")]  # fmt: skip
    assert (
        states[0]["optimizer"] == states[1]["optimizer"] and states[0]["scheduler"] == states[1]["scheduler"]
    )
    assert (run_dir / "per_example.jsonl").read_text() == (
        tmp_path / "full" / "per_example.jsonl"
    ).read_text()


def _real_tokens_of_steps(run_dir: Path, steps: range) -> int:
    """Real (unpadded) tokens of the global batches of optimiser steps ``steps`` (1-based), from the data
    order written out by hand: global micro-step m takes positions m·batch … of seeded permutations of
    range(n), one per epoch (docs/distributed.md)."""
    from transformers import AutoTokenizer

    from asymlora.config import load_config
    from asymlora.data import MultiTaskDataset
    from asymlora.recipes.multitask import load_split_tasks

    cfg = load_config(run_dir / "config.yaml", [])
    tok = AutoTokenizer.from_pretrained(cfg.model.name)
    data = MultiTaskDataset(load_split_tasks(cfg)[0], tok, max_length=cfg.data.max_length, warn=False)
    n, batch, accum = len(data), cfg.train.batch_size, cfg.train.grad_accum
    total = 0
    for micro in range((steps.start - 1) * accum, steps.stop * accum - accum):
        for position in range(micro * batch, (micro + 1) * batch):
            epoch, offset = divmod(position, n)
            order = torch.randperm(
                n, generator=torch.Generator().manual_seed(cfg.train.seed * 100_003 + epoch)
            )
            total += len(data[int(order[offset])]["input_ids"])
    return total


def test_the_router_log_of_two_processes_covers_the_whole_global_batch(env, tmp_path) -> None:
    """Soft router, router.jsonl every 3 steps: each training record counts the real tokens of both
    processes' slices (by hand from the data order), and every record (evaluation, split across the ranks,
    included) equals the one-process run's. Before the fix only rank 0 recorded: about half the tokens."""
    soft = ["adapter.router=soft", "train.router_log_every=3"]
    runs = {1: tmp_path / "one", 2: tmp_path / "two"}
    assert cli_main(["train", "--quiet", str(env["config"]), *overrides(env, runs[1], *soft)]) == 0
    done = launch(torchrun(2), env["config"], overrides(env, runs[2], *soft))
    assert done.returncode == 0, done.stderr[-3000:]
    logs = {
        w: [json.loads(line) for line in (d / "router.jsonl").read_text().splitlines()]
        for w, d in runs.items()
    }
    assert [(r["step"], r["phase"]) for r in logs[2]] == [(3, "train"), (6, "train"), (6, "eval")]
    for record, steps in zip(logs[2][:2], (range(1, 4), range(4, 7)), strict=True):
        assert {layer["tokens"] for layer in record["layers"]} == {_real_tokens_of_steps(runs[2], steps)}
    for one, two in zip(logs[1], logs[2], strict=True):
        assert [layer["module"] for layer in one["layers"]] == [layer["module"] for layer in two["layers"]]
        for a, b in zip(one["layers"], two["layers"], strict=True):
            assert (a["tokens"], a["task_tokens"]) == (b["tokens"], b["task_tokens"])
            for key in ("mean_gate", "load", "usage", "token_entropy"):
                torch.testing.assert_close(
                    torch.tensor(b[key]), torch.tensor(a[key]), rtol=0, atol=1e-5, msg=key
                )


_FSDP_THEN_SHUTDOWN = """
import gc, sys, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from asymlora import distributed
from tests.test_distributed import process_group_threads

def train():  # what a train.fsdp=true run does with DTensors: sharded forward/backward, a gathered state dict
    dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    fully_shard(model[0])
    fully_shard(model)
    model(torch.randn(3, 4)).sum().backward()
    get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

gc.disable()  # only shutdown's own collection frees reference cycles (as when no automatic one falls in between)
train()
print("running:", process_group_threads())
distributed.shutdown()
print("after shutdown:", process_group_threads())
"""


def test_leaving_the_group_stops_its_threads_after_fsdp(tmp_path) -> None:
    """destroy_process_group alone leaves gloo's threads running after an FSDP2 run (DTensor's caches hold
    the DeviceMesh, which holds the group); `distributed.shutdown` must stop them. Planted once: without
    emptying the caches (or without the collection after) the three threads remain."""
    environ = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
    }
    done = subprocess.run([sys.executable, "-c", _FSDP_THEN_SHUTDOWN, str(tmp_path / "store")], env=environ,
                          capture_output=True, text=True, timeout=120, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    running, after = done.stdout.splitlines()[-2:]
    if sys.platform == "linux":  # the thread names come from /proc
        assert "pt_gloo_runloop" in running and "gloo_tcp_loop" in running
    assert after == "after shutdown: []"


def test_a_world_size_not_dividing_the_global_batch_is_refused_before_anything_is_loaded(
    env, tmp_path, monkeypatch, capsys
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "3")  # what torchrun --nproc_per_node=3 sets
    run_dir = tmp_path / "run"
    assert cli_main(["train", str(env["config"]), *overrides(env, run_dir)]) == 2
    err = capsys.readouterr().err
    assert "train.batch_size=4" in err and "3 processes" in err and "multiple of 3 (e.g. 6, 9)" in err
    assert "Traceback" not in err and not run_dir.exists()
    assert per_process_batch(8, 2) == 4 and per_process_batch(3, 1) == 3
    with pytest.raises(ValueError, match=r"train.batch_size=5 .* multiple of 4 \(e.g. 8, 12\)"):
        per_process_batch(5, 4)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("fsdp", ["false", "true"])
def test_two_gpus_over_nccl_train_the_adapter_of_one_gpu(env, tmp_path, fsdp) -> None:
    """The same comparison on CUDA (NCCL, one GPU per process, bfloat16 base), DDP and FSDP: equal up to
    bf16 rounding."""
    runs = {}
    for nproc in (1, 2):
        runs[nproc] = tmp_path / f"gpu{nproc}"
        args = [*overrides(env, runs[nproc]), "model.device=cuda", f"train.fsdp={fsdp}"]
        done = launch(torchrun(nproc), env["config"], args)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = adapter(runs[1]), adapter(runs[2])
    for key in one:
        a, b = one[key].double(), two[key].double()
        assert (a - b).norm() <= 0.05 * a.norm(), key
    losses = [
        [json.loads(x)["loss"] for x in (d / "train_log.jsonl").read_text().splitlines()]
        for d in runs.values()
    ]
    assert losses[1] == pytest.approx(losses[0], rel=2e-2)
