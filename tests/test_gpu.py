"""CUDA checks (``make test-gpu``; skipped without a CUDA GPU): the default model (SmolLM2-135M) in bf16 with
gradient checkpointing on a 4-bit NF4 base trains with every method, exports and merges per task; a 2-GPU
``torchrun`` run of the training loop keeps the ranks' adapters equal; the benchmarks run with
``--device cuda``."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import peft
import pytest
import torch

import asymlora
from asymlora import AsymLoraConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,  # the real SmolLM2-135M (make test-fast leaves these out, GPU or not)
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make test-gpu)"),
]

METHODS = ["lora", "alora", "hydralora", "molora", "malora"]
TEXT = [
    "Question: Is the sky blue on a clear day? Answer: yes, because air scatters blue light the most.",
    "Question: Can a fish climb a tree? Answer: no, fish live in water and have no limbs to climb.",
    "Question: Does ice float on water? Answer: yes, ice is less dense than liquid water.",
    "Question: Is two plus two five? Answer: no, two plus two is four, not five.",
]


def default_model_4bit(device: str = "cuda"):
    pytest.importorskip("bitsandbytes")
    from asymlora.models import load

    model, tokenizer = load("smollm2-135m", device=device, dtype=torch.bfloat16, load_in_4bit=True)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    return model, tokenizer


def enable_checkpointing(model) -> None:
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def text_batch(tokenizer, device: str = "cuda") -> dict[str, torch.Tensor]:
    batch = tokenizer(TEXT, return_tensors="pt", padding=True).to(device)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return {**batch, "labels": labels}


def qlora_losses(method: str, router: str, device: str = "cuda", steps: int = 10) -> list[float]:
    """Losses of ``steps`` AdamW steps on one batch: NF4 base, bf16 compute, gradient checkpointing."""
    model, tokenizer = default_model_4bit(device)
    enable_checkpointing(model)
    cfg = AsymLoraConfig(method=method, router=router, num_experts=4, target_modules=["q_proj", "v_proj"])
    pm = peft.get_peft_model(model, cfg)
    trainable = [p for p in pm.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 and p.device.type == device for p in trainable)  # adapters fp32
    pm.train()
    batch, task_ids = text_batch(tokenizer, device), torch.tensor([0, 1, 2, 3], device=device)
    opt = torch.optim.AdamW(trainable, lr=2e-3)
    losses = []
    for _ in range(steps):
        loss = pm(**batch, task_ids=task_ids, use_cache=False).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("method", METHODS)
def test_default_model_bf16_checkpointing_4bit_trains_every_router(method: str) -> None:
    for router in ["soft"] if method == "lora" else ["soft", "topk", "task"]:
        losses = qlora_losses(method, router)
        assert losses[-1] < losses[0] - 0.05, (method, router, losses)
        torch.cuda.empty_cache()


def export_and_merge_gaps(out_dir: Path, device: str = "cuda") -> dict[str, float]:
    """Mean |logit| gaps to the routed NF4 model of task "b": exported (stock peft on a fresh NF4 base) and
    merged (merge_task), and between the two tasks' routed outputs (what a wrong task would cost)."""
    model, tokenizer = default_model_4bit(device)
    cfg = AsymLoraConfig(
        method="alora",
        router="task",
        num_experts=2,
        task_names=["a", "b"],
        target_modules=["q_proj", "v_proj"],
    )
    pm = peft.get_peft_model(model, cfg).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in asymlora.parameters_by_role(pm, "B").values():
            p.normal_(std=0.05)
    ids = tokenizer(TEXT[:2], return_tensors="pt", padding=True)["input_ids"].to(device)
    with torch.no_grad():
        ref = pm(input_ids=ids, task_ids=torch.tensor([1, 1], device=device)).logits.float()
        other = pm(input_ids=ids, task_ids=torch.tensor([0, 0], device=device)).logits.float()
    asymlora.export_task_adapter(pm, "b", out_dir / "b")
    stock = peft.PeftModel.from_pretrained(default_model_4bit(device)[0], out_dir / "b").eval()
    with torch.no_grad():
        exported = stock(input_ids=ids).logits.float()
    with pytest.warns(UserWarning, match="dequantised to torch.bfloat16"):
        merged = asymlora.merge_task(pm, "b")
    with torch.no_grad():
        merged_out = merged(input_ids=ids).logits.float()
    outs = {"exported": exported, "merged": merged_out, "between_tasks": other}
    return {k: (v - ref).abs().mean().item() for k, v in outs.items()}


def test_default_model_4bit_exports_and_merges_a_task(tmp_path) -> None:
    gaps = export_and_merge_gaps(tmp_path)
    assert gaps["exported"] < 0.1 * gaps["between_tasks"], gaps
    assert gaps["merged"] < 0.5 * gaps["between_tasks"], gaps  # bf16 layers vs the NF4 kernel's rounding


DDP_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    import peft, torch
    from safetensors.torch import save_file
    import asymlora
    from asymlora.config import TrainSettings
    from asymlora.models import load
    from asymlora.train import loop

    out, name = Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "smollm2-135m"
    rank = int(os.environ["LOCAL_RANK"])
    device = f"cuda:{rank}" if torch.cuda.is_available() else "cpu"  # (cpu: a gloo dry run of this script)
    model, tok = load(name, device=device, dtype=torch.bfloat16)
    pm = peft.get_peft_model(model, asymlora.AsymLoraConfig(method="alora", target_modules=["q_proj", "v_proj"]))
    text = [f"Question {i}: is {i} even? Answer: {'yes' if i % 2 == 0 else 'no'}." for i in range(16)]
    enc = tok(text, padding="max_length", max_length=24, truncation=True, return_tensors="pt")
    rows = [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i]} for i in range(16)]

    def collate(batch):
        ids = torch.stack([r["input_ids"] for r in batch])
        mask = torch.stack([r["attention_mask"] for r in batch])
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    settings = TrainSettings(steps=12, batch_size=2, lr=2e-3, warmup_steps=0, log_every=1, save_every=0)
    result = loop.train(pm, rows, collate, settings, out / "run")
    state = {n: p.detach().float().cpu().contiguous() for n, p in pm.named_parameters() if p.requires_grad}
    save_file(state, str(out / f"rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps({"losses": result.losses, "world": int(os.environ["WORLD_SIZE"])}))
    """
)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_torchrun_on_two_gpus_keeps_the_ranks_in_step(tmp_path) -> None:
    from safetensors.torch import load_file

    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    src = str(Path(asymlora.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*cmd, str(script), str(tmp_path)], capture_output=True, text=True, env=env, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    logs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert logs[0]["world"] == 2
    losses = [loss for _, loss in logs[0]["losses"]]  # one batch per step: compare 3-step means
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() and ranks[0]
    for name in ranks[0]:  # DDP averaged the gradients: both replicas took the same steps
        torch.testing.assert_close(ranks[0][name], ranks[1][name], rtol=0, atol=0)


def test_benchmarks_run_with_device_cuda(tmp_path) -> None:
    from benchmarks import run_all

    only = ",".join(b for b in run_all.BENCHMARKS if b != "federated")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        res = run_all.main(
            ["--smoke", "--device", "cuda", "--dtype", "bfloat16", "--only", only, "--out-dir", str(tmp_path)]
        )
    run = res["run_all"]
    assert run["args"]["device"] == "cuda" and run["failed"] == {}, run["failed"]
    assert "cuda/bfloat16" in (tmp_path / "performance.md").read_text()


@pytest.mark.fed
def test_federated_benchmark_with_device_cuda(tmp_path) -> None:
    from benchmarks import federated

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        res = federated.main(
            ["--smoke", "--device", "cuda", "--out-dir", str(tmp_path), "--strategies", "fedalora"]
        )
    assert res["bytes_match_accounting"], res
