"""What a new user meets first: layers in natural order, no warnings they can do nothing about, progress
bars that ``--quiet`` turns off, byte rows that say what they count."""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from peft.tuners.lora import LoraLayer
from tests.conftest import make_tiny_llama

from asymlora.analysis import analyze


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- natural layer order -----------------------------------------------------------------------------------
def test_module_order_is_layer_number_then_module():
    from asymlora.analysis.report import module_order

    names = [
        "model.layers.10.self_attn.q_proj",
        "model.layers.2.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.2.mlp.down_proj",
        "model.layers.2.self_attn.q_proj",
        "model.layers.11.self_attn.q_proj",
    ]
    assert sorted(names, key=module_order) == [
        "model.layers.1.self_attn.q_proj",
        "model.layers.2.mlp.down_proj",
        "model.layers.2.self_attn.q_proj",
        "model.layers.2.self_attn.v_proj",
        "model.layers.10.self_attn.q_proj",
        "model.layers.11.self_attn.q_proj",
    ]


def test_analysis_tables_and_figures_list_layers_in_natural_order(tmp_path, monkeypatch):
    """12 layers: the adapter file stores 0, 1, 10, 11, 2, ... (string order); every per-module table and
    the per-layer figure must read 0, 1, 2, ..., 11."""
    from asymlora.analysis import figures

    for seed in (1, 2):
        model = make_tiny_llama(seed=0, hidden=16, layers=12)
        torch.manual_seed(seed)
        pm = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
        with torch.no_grad():
            for layer in pm.modules():
                if isinstance(layer, LoraLayer):
                    layer.lora_B["default"].weight.normal_(generator=gen(seed))
        pm.save_pretrained(tmp_path / f"lora{seed}")
    expected = [f"model.layers.{n}.self_attn.q_proj" for n in range(12)]
    assert sorted(expected) != expected  # the string order differs: the test can fail
    ticks: dict[str, list[str]] = {}
    real_save = figures._save

    def save(fig, out_dir, name, figures):
        ticks[name] = [t.get_text() for t in fig.axes[0].get_xticklabels()]
        real_save(fig, out_dir, name, figures)

    monkeypatch.setattr(figures, "_save", save)
    res = analyze([tmp_path / "lora1", tmp_path / "lora2"], tmp_path / "out", labels=["a", "b"])
    assert list(res["comparisons"][0]["modules"]) == expected
    data = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert list(data["comparisons"][0]["modules"]) == expected
    assert ticks["similarity_layers_A.png"] == [f"{n}.q_proj" for n in range(12)]
    assert ticks["similarity_layers_B.png"] == [f"{n}.q_proj" for n in range(12)]


# --- the demo: no warnings, progress that --quiet turns off ---------------------------------------------------
TINY_BUILTIN = "tiny-builtin"


@pytest.fixture
def tiny_builtin(tmp_path, monkeypatch):
    """A built-in model entry whose converted cache holds a tiny Llama (what `load("smollm2-135m")` reads
    after its first conversion), and two tiny choice / generative tasks in one JSONL file."""
    from tests.conftest import make_char_tokenizer

    from asymlora import models

    monkeypatch.setenv(models.CACHE_ENV_VAR, str(tmp_path / "cache"))
    spec = models.BuiltinModel(TINY_BUILTIN, "tiny", "no_such_package", "none==0", "tiny.gguf", "tiny/tiny")
    monkeypatch.setitem(models.BUILTIN_MODELS, TINY_BUILTIN, spec)
    cache = models.builtin_cache_dir(TINY_BUILTIN)
    tok = make_char_tokenizer()
    make_tiny_llama(vocab_size=len(tok), hidden=16).save_pretrained(cache)
    tok.save_pretrained(cache)
    (cache / models.COMPLETE_MARKER).write_text("{}")
    rows = [{"input": f"{a} {b}", "options": ["odd", "even"], "target": ["even", "odd"][(a + b) % 2],
             "task": "parity"} for a in range(6) for b in range(3)]  # fmt: skip
    rows += [{"instruction": "add", "input": f"{a}+{b}", "output": str(a + b), "task": "add"}
             for a in range(6) for b in range(3)]  # fmt: skip
    data = tmp_path / "tasks.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def _demo(tmp_path, data, *extra: str, before: tuple[str, ...] = ()) -> int:
    from asymlora.cli import main

    return main([
        *before, "demo", "--run-dir", str(tmp_path / "demo"), *extra, f"model.name={TINY_BUILTIN}",
        f"data.tasks=[jsonl:{data}#parity, jsonl:{data}#add]", "data.max_train=8", "data.max_test=4",
        "data.max_length=32", "train.steps=2", "train.batch_size=2", "train.warmup_steps=0",
        "eval.max_new_tokens=3", "compare.methods=[lora, alora]",
    ])  # fmt: skip


def test_demo_prints_no_warning_and_shows_every_phase(tmp_path, tiny_builtin, capsys):
    """The demo's path (built-in model from the cache, get_peft_model, training, evaluation): no Python
    warning at all (peft's base_model_name_or_path rename, transformers' is_gradient_checkpointing, ...),
    and a progress bar for the training and the evaluation of every method that says what it does."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _demo(tmp_path, tiny_builtin) == 0
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []
    err = capsys.readouterr().err
    assert "Warning" not in err and "warn" not in err.lower()
    for phase in ("evaluating the base model on parity (1/2)", "evaluating lora on add (2/2)",
                  "evaluating alora on parity (1/2)", "lora (2 tasks)", "alora (2 tasks)"):  # fmt: skip
        assert phase in err, phase
    from asymlora.models import builtin_cache_dir

    config = json.loads((tmp_path / "demo" / "alora" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(builtin_cache_dir(TINY_BUILTIN))  # what was read


@pytest.mark.parametrize("where", ["after the command", "before the command"])
def test_quiet_demo_shows_no_progress_bar(tmp_path, tiny_builtin, capsys, where):
    from asymlora import progress

    quiet = {"after the command": {"extra": ("--quiet",)}, "before the command": {"before": ("--quiet",)}}
    assert (
        _demo(tmp_path, tiny_builtin, *quiet[where].get("extra", ()), before=quiet[where].get("before", ()))
        == 0
    )
    captured = capsys.readouterr()
    assert "it/s" not in captured.err and "%|" not in captured.err and "evaluating" not in captured.err
    assert "step 2/2 loss" not in captured.out + captured.err  # the per-step log lines are progress too
    assert "| lora |" in captured.out  # the results are still printed
    assert progress.enabled()  # --quiet ends with the command


def test_peft_entry_points_raise_no_warning(tmp_path):
    """get_peft_model, save_pretrained and PeftModel.from_pretrained on a fresh base: nothing to warn about."""
    from asymlora import AsymLoraConfig

    cfg = AsymLoraConfig(method="alora", r=2, num_experts=2, target_modules=["q_proj"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.get_peft_model(make_tiny_llama(), cfg)
        pm.save_pretrained(tmp_path / "adapter")
        peft.PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "adapter")
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []


def test_bigbench_download_shows_the_bytes_received(tmp_path, monkeypatch, capsys):
    """The download bar follows the archive pip writes into its TMPDIR; a fake pip writes it in 3 steps."""
    from asymlora import progress
    from asymlora.data import bigbench

    fake_pip = (
        "import os, sys, time, pathlib\n"
        "dest = pathlib.Path(sys.argv[sys.argv.index('-d') + 1])\n"
        "part = pathlib.Path(os.environ['TMPDIR']) / 'pip-unpack-x' / 'bigbench-1.0.0.tar.gz'\n"
        "part.parent.mkdir()\n"
        "for _ in range(3):\n"
        "    with part.open('ab') as f: f.write(b'x' * 1000)\n"
        "    time.sleep(0.6)\n"
        "part.rename(dest / part.name)\n"
    )
    monkeypatch.setattr(bigbench, "PIP_DOWNLOAD_SHIM", fake_pip)
    monkeypatch.setattr(bigbench, "ARCHIVE_BYTES", 3000)
    bigbench.ensure_archive(tmp_path)
    assert bigbench.archive_path(tmp_path).stat().st_size == 3000
    err = capsys.readouterr().err
    assert "downloading BIG-bench 1.0.0 from PyPI (once)" in err and "3.00k/3.00k" in err
    assert "2.00k/3.00k" in err or "1.00k/3.00k" in err  # seen while it grew
    with progress.quiet():
        bigbench.ensure_archive(tmp_path / "again")
    assert "downloading" not in capsys.readouterr().err


# --- the federated table -------------------------------------------------------------------------------------
def test_federated_byte_rows_say_up_and_down_per_client_per_round():
    from asymlora.federated.run import format_results

    per_round = [
        {"round": 1, "up": 3_000_000, "down": 1_000_000},
        {"round": 2, "up": 3_000_000, "down": 1_000_000},
    ]
    res = {"ranks": [8, 8], "scores": {"personalised": {"c0": 0.5, "c1": 0.25}}, "personalised": {"average": 0.375},
           "bytes": {"up": 6_000_000, "down": 2_000_000, "total": 8_000_000, "per_round": per_round}}  # fmt: skip
    table = format_results({"strategies": {"fedalora": res}})
    rows = {
        line.split("|")[1].strip(" *"): line.split("|")[2].strip()
        for line in table.splitlines()
        if "|" in line
    }
    # 6 MB up in 2 rounds by 2 clients: 1.5 MB up per client per round; 0.5 down; 2.0 both ways
    assert rows["MB up per client per round"] == "1.500"
    assert rows["MB down per client per round"] == "0.500"
    assert rows["MB up + down per client per round"] == "2.000"
    assert rows["MB up + down, all rounds and clients"] == "8.00"
    assert "MB = 10^6 bytes" in table and "fraction 0–1" in table


@pytest.mark.fed
def test_federated_run_prints_no_flower_banner_or_warning(tmp_path, capfd):
    """A tiny simulation: Flower's run_simulation deprecation banner, peft's and transformers' warnings and
    the client actors' weight-loading bars stay out of the output; asymlora's own lines are there."""
    from tests.test_fed_apps import TASKS, fed, write_config

    from asymlora.models import load

    model_dir = tmp_path / "model"
    from tests.conftest import make_char_tokenizer

    tok = make_char_tokenizer()
    make_tiny_llama(vocab_size=len(tok), hidden=16).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    load(str(model_dir))  # the driver's own load is not part of the check
    rows = [{"input": f"{a} {b}", "options": ["odd", "even"], "target": ["even", "odd"][(a + b) % 2],
             "task": t} for t in TASKS for a in range(6) for b in range(4)]  # fmt: skip
    (tmp_path / "tasks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = write_config(tmp_path / "fed.yaml", tmp_path, tmp_path / "run", rounds=1)
    capfd.readouterr()
    assert fed(cfg) == 0
    out, err = capfd.readouterr()
    assert "fedalora round 1/1" in out and "MB up per client per round" in out
    for noise in ("DEPRECATED", "Warning", "warnings.warn", "Loading weights"):
        assert noise not in out + err, noise
