"""Exported task adapters served by vLLM give the same greedy tokens as asymlora's task-routed model.

A task-routed ALoRA on the default model (SmolLM2-135M, all seven Llama projections, random B so every
task changes the output) exports each task as a stock peft LoRA; vLLM's offline engine serves all of
them, several tasks in ONE ``generate`` call (``LoRARequest`` per prompt), and its greedy tokens must
equal those of asymlora's routed model, both in float32 (bf16 departs at near-tie logits).

vLLM lives in its own virtual environment (it pins transformers < 5.20): ``make test-vllm`` creates it
with scripts/setup_vllm.sh (about 5 minutes once) and runs this file. Without that environment the test
is skipped (it is not part of CI; run it before every release, docs/testing.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["sst", "qa", "summary"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK = 8
MAX_TOKENS = 12
PROMPTS = [
    "The capital of France is",
    "Q: What is two plus three?\nA:",
    "Write one word that rhymes with cat:",
    "Once upon a time",
]


def vllm_python() -> Path | None:
    """The vLLM environment's python: $VLLM_PYTHON, else .venv-vllm/bin/python of the repository."""
    path = Path(os.environ.get("VLLM_PYTHON") or ROOT / ".venv-vllm" / "bin" / "python")
    return path if path.is_file() else None


def _routed_model():
    import peft

    import asymlora
    from asymlora.models import load

    base, tokenizer = load("smollm2-135m")
    cfg = asymlora.AsymLoraConfig(
        method="alora", router="task", r=RANK, lora_alpha=16, num_experts=len(TASKS), task_names=TASKS,
        target_modules=TARGETS,
    )  # fmt: skip
    model = peft.get_peft_model(base, cfg)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in asymlora.parameters_by_role(model, "B").values():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return model.eval(), tokenizer


def _asymlora_tokens(model, tokenizer, ids: list[int], task: int | None) -> list[int]:
    """Greedy new tokens of one prompt under one task (None: the base model), EOS excluded."""
    x = torch.tensor([ids])
    kwargs = {"task_ids": torch.tensor([task])} if task is not None else {}
    context = model.disable_adapter() if task is None else torch.no_grad()
    with torch.no_grad(), context:
        out = model.generate(
            input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=MAX_TOKENS, do_sample=False,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **kwargs,
        )  # fmt: skip
    return _strip_eos(out[0, len(ids) :].tolist(), tokenizer.eos_token_id)


def _strip_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


def test_vllm_serves_exported_task_adapters_with_asymlora_greedy_tokens(tmp_path) -> None:
    python = vllm_python()
    if python is None:
        pytest.skip("no vLLM environment: run `make test-vllm` (scripts/setup_vllm.sh creates .venv-vllm)")
    import asymlora
    from asymlora.models import ensure_builtin_cached

    model, tokenizer = _routed_model()
    adapters = {t: str(asymlora.export_task_adapter(model, t, tmp_path / t)) for t in TASKS}
    requests = [(t, p) for p in PROMPTS for t in TASKS]  # every prompt under every task, interleaved
    ids = {p: tokenizer(p)["input_ids"] for p in PROMPTS}
    expected = [_asymlora_tokens(model, tokenizer, ids[p], TASKS.index(t)) for t, p in requests]
    base = {p: _asymlora_tokens(model, tokenizer, ids[p], None) for p in PROMPTS}
    # the adapters matter: each task departs from the base model and from the other tasks somewhere
    for k, task in enumerate(TASKS):
        mine = expected[k :: len(TASKS)]
        assert mine != [base[p] for p in PROMPTS], f"task {task} generates what the base model does"
    assert len({tuple(map(tuple, expected[k :: len(TASKS)])) for k in range(len(TASKS))}) == len(TASKS)

    spec = {
        "model": str(ensure_builtin_cached()),
        "adapters": adapters,
        "max_lora_rank": RANK,
        "max_tokens": MAX_TOKENS,
        "requests": [{"adapter": t, "prompt_token_ids": ids[p]} for t, p in requests],
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    env.pop("PYTHONPATH", None)  # vLLM's environment has its own transformers; keep asymlora's out of it
    t0 = time.perf_counter()
    proc = subprocess.run(
        [str(python), str(ROOT / "tests" / "vllm_generate.py"), str(tmp_path / "spec.json"),
         str(tmp_path / "out.json")],
        capture_output=True, text=True, timeout=1200, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads((tmp_path / "out.json").read_text())
    got = [_strip_eos(tokens, tokenizer.eos_token_id) for tokens in out["token_ids"]]
    differ = [(t, p, g, e) for (t, p), g, e in zip(requests, got, expected, strict=True) if g != e]
    print(
        f"vLLM {out['vllm']}: {len(requests) - len(differ)}/{len(requests)} requests equal "
        f"({len(PROMPTS)} prompts x {len(TASKS)} tasks, one batch); load {out['load_s']:.1f} s, "
        f"generate {out['generate_s']:.1f} s, subprocess {time.perf_counter() - t0:.1f} s",
        file=sys.stderr,
    )
    assert not differ, f"vLLM's greedy tokens differ from asymlora's: {differ}"
