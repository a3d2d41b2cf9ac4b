"""Shared fixtures: a tiny randomly initialised Llama with the real module names, a character tokenizer,
and the model, tasks and overrides of tiny multi-task runs."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def make_tiny_llama(seed: int = 0, vocab_size: int = 128, hidden: int = 32, layers: int = 2, **config):
    """A randomly initialised LlamaForCausalLM small enough for unit tests (float32, CPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **config,
    )
    model = LlamaForCausalLM(config)
    model.eval()
    return model


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


def make_char_tokenizer(pad_token: str | None = "<pad>"):
    """A character-level fast tokenizer (one token per character; pad 0, bos 1, eos 2), for tiny models."""
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = [chr(code) for code in range(32, 127)] + ["\n"]
    backend = Tokenizer(WordLevel({tok: i for i, tok in enumerate(specials + chars)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token=pad_token
    )


# --- tiny multi-task runs (tests/test_train.py, tests/test_stopping.py) ------------------------------------------
def write_two_task_env(
    root: Path, *, hidden: int = 48, layers: int = 2, examples: int = 60, instruction: str | None = None
) -> dict[str, Path]:
    """A tiny Llama (`make_tiny_llama`, initializer_range 0.2) and the character tokenizer saved in
    ``root/model``, and two synthetic tasks of ``examples`` examples each in ``root/tasks.jsonl``: ``add``
    (generative, i -> i + 1, with ``instruction`` when given) and ``parity`` (choice, "Is i even?" yes / no).
    Returns ``{"model": dir, "data": file}``."""
    make_tiny_llama(hidden=hidden, layers=layers, initializer_range=0.2).save_pretrained(root / "model")
    make_char_tokenizer().save_pretrained(root / "model")
    head = {"instruction": instruction} if instruction is not None else {}
    add = [head | {"input": str(i), "output": str(i + 1), "task": "add"} for i in range(examples)]
    parity = [{"input": f"Is {i} even?", "options": ["yes", "no"], "target": "yes" if i % 2 == 0 else "no",
               "task": "parity"} for i in range(examples)]  # fmt: skip
    data = root / "tasks.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in add + parity))
    return {"model": root / "model", "data": data}


def tiny_run_overrides(
    env: Mapping[str, Path], run_dir: Path, settings: Mapping[str, object], *extra: str
) -> list[str]:
    """The overrides of a tiny multi-task run on `write_two_task_env`'s model (on the CPU) and both tasks:
    ``settings`` (``{key: value}``, the sizes of one test file), ``run_dir``, then ``extra`` (last: they win)."""
    tasks = f"data.tasks=[jsonl:{env['data']}#add, jsonl:{env['data']}#parity]"
    values = [f"{key}={value}" for key, value in settings.items()]
    return [f"model.name={env['model']}", "model.device=cpu", tasks, *values, f"run_dir={run_dir}", *extra]


def tiny_alora(model_dir: Path):
    """(peft model, tokenizer): ALoRA (r 4, N 2 experts, soft router, q_proj) on the model saved in
    ``model_dir``, the adapter initialised under torch seed 0."""
    import peft

    from asymlora import AsymLoraConfig
    from asymlora.models import load

    model, tok = load(str(model_dir))
    torch.manual_seed(0)
    cfg = AsymLoraConfig(method="alora", r=4, num_experts=2, target_modules=["q_proj"])
    return peft.get_peft_model(model, cfg), tok
