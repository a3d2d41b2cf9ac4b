"""Calibrated export of soft/topk-routed adapters (asymlora.calibration): hand-computed factors, the gate
average over real tokens, stock-peft round trips, the fidelity report, bad input, the CLI."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors.torch import load_file
from tests.conftest import make_char_tokenizer, make_tiny_llama

import asymlora
from asymlora import AsymLoraConfig
from asymlora.calibration import average_gates, calibrated_factors, calibration_batches, truncate
from asymlora.cli import main as cli_main
from asymlora.data import Example, Task

TEXTS = ["hello world", "abc", "the quick brown fox jumps", "0123 + 45 = ?"]


def routed(method: str, router: str = "soft", seed: int = 0, zero_router: bool = False, **kw):
    """A tiny Llama with a routed adapter whose B's are random (so the adapter changes the output)."""
    cfg = AsymLoraConfig(
        method=method, router=router, r=2, num_experts=3, target_modules=["q_proj", "v_proj"], **kw
    )
    pm = peft.get_peft_model(make_tiny_llama(seed), cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "asymlora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            if "asymlora_router" in name:
                p.copy_(torch.zeros_like(p) if zero_router else torch.randn(p.shape, generator=gen))
    return pm


# --- factors, by hand -------------------------------------------------------------------------------------
def test_alora_export_is_shared_b_times_gate_weighted_a() -> None:
    cfg = AsymLoraConfig(method="alora", r=1, num_experts=2)
    t = {"A": torch.tensor([[[1.0, 0.0]], [[0.0, 2.0]]]), "B": torch.tensor([[1.0], [3.0]])}
    out = calibrated_factors(cfg, t, torch.tensor([0.25, 0.75]), d_in=2, d_out=2)
    torch.testing.assert_close(out.A, torch.tensor([[0.25, 1.5]]))  # 0.25·[1, 0] + 0.75·[0, 2]
    torch.testing.assert_close(out.B, torch.tensor([[1.0], [3.0]]))
    torch.testing.assert_close(out.B @ out.A, torch.tensor([[0.25, 1.5], [0.75, 4.5]]))


def test_hydralora_export_is_gate_weighted_b_times_shared_a() -> None:
    cfg = AsymLoraConfig(method="hydralora", r=1, num_experts=2)
    t = {"A": torch.tensor([[1.0, 2.0]]), "B": torch.tensor([[[1.0], [0.0]], [[0.0], [2.0]]])}
    out = calibrated_factors(cfg, t, torch.tensor([0.5, 0.5]), d_in=2, d_out=2)
    torch.testing.assert_close(out.A, torch.tensor([[1.0, 2.0]]))
    torch.testing.assert_close(out.B, torch.tensor([[0.5], [1.0]]))


def test_molora_export_concatenates_to_rank_n_r_and_equals_the_averaged_update() -> None:
    cfg = AsymLoraConfig(method="molora", r=1, num_experts=2)
    t = {"A": torch.tensor([[[1.0, 0.0]], [[1.0, 1.0]]]), "B": torch.tensor([[[2.0], [0.0]], [[0.0], [4.0]]])}
    out = calibrated_factors(cfg, t, torch.tensor([0.25, 0.75]), d_in=2, d_out=2)
    assert out.A.shape == (2, 2) and out.B.shape == (2, 2)
    # 0.25·[2,0]ᵀ[1,0] + 0.75·[0,4]ᵀ[1,1] = [[0.5, 0], [3, 3]]
    torch.testing.assert_close(out.B @ out.A, torch.tensor([[0.5, 0.0], [3.0, 3.0]]))


def test_truncated_svd_keeps_the_top_direction_and_reports_the_discarded_energy() -> None:
    a, b = torch.eye(3)[:2], torch.tensor([[0.0, 1.0], [3.0, 0.0], [0.0, 0.0]])  # B A has σ = 3, 1
    out = truncate(a, b, 1)
    torch.testing.assert_close(
        out.B @ out.A, torch.tensor([[0.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    )
    assert out.discarded_energy == pytest.approx(1 / 10)  # 1² / (3² + 1²)
    assert truncate(a, b, 2).discarded_energy == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match=r"rank=3 is out of range.*1\.\.2"):
        truncate(a, b, 3)


# --- the gate average -------------------------------------------------------------------------------------
def _gates_of_each_row_alone(pm, layer_suffix: str) -> tuple[str, torch.Tensor]:
    """(layer name, mean softmax gate by hand) of the layer named ``*layer_suffix`` over the 9 tokens of
    ``SEQUENCES``, each sequence run alone (no padding), in float64."""
    layer_name, layer = next((n, m) for n, m in pm.named_modules() if n.endswith(layer_suffix))
    seen = []
    hook = layer.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().reshape(-1, 32)))
    with torch.no_grad():
        for seq in SEQUENCES:
            pm(input_ids=torch.tensor([seq]))
    hook.remove()
    x = torch.cat(seen).double()
    return layer_name, torch.softmax(x @ layer.asymlora_router["default"].detach().double().T, -1).mean(0)


SEQUENCES = [[5, 9, 17, 33, 40, 41], [7, 8, 100]]


def test_average_gate_counts_real_tokens_only() -> None:
    pm = routed("alora")
    layer_name, hand = _gates_of_each_row_alone(pm, "layers.1.self_attn.v_proj")
    padded = {  # a right-padded row with junk ids in the padding
        "input_ids": torch.tensor([[5, 9, 17, 33, 40, 41], [7, 8, 100, 99, 98, 97]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]),
    }
    gates, tokens = average_gates(pm, [padded])
    assert tokens == 9
    torch.testing.assert_close(gates[layer_name], hand, rtol=0, atol=1e-6)
    all_tokens, _ = average_gates(pm, [{"input_ids": padded["input_ids"]}])
    assert (all_tokens[layer_name] - hand).abs().max() > 1e-4  # padding, if counted, would show


def test_average_gate_of_a_left_padded_batch_on_learned_positions_equals_each_row_alone() -> None:
    """GPT-2 adds a learned position embedding: without position ids counted over the real tokens, a
    left-padded row was read at positions shifted by its padding (the layer-1 gates moved by up to 0.11)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    cfg = AsymLoraConfig(method="alora", router="soft", r=2, num_experts=3, target_modules=["c_attn"])
    pm = peft.get_peft_model(base.eval(), cfg)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "asymlora_router" in name:
                p.normal_(std=3.0, generator=torch.Generator().manual_seed(1))
    layer_name, hand = _gates_of_each_row_alone(pm, "h.1.attn.c_attn")
    left = {  # the short row padded on the left, as a generation tokenizer pads
        "input_ids": torch.tensor([[5, 9, 17, 33, 40, 41], [0, 0, 0, 7, 8, 100]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]]),
    }
    gates, tokens = average_gates(pm, [left])
    assert tokens == 9
    torch.testing.assert_close(gates[layer_name], hand, rtol=0, atol=1e-6)


# --- round trips through stock peft ---------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["alora", "hydralora", "molora", "malora"])
def test_input_independent_gate_exports_exactly_and_loads_in_stock_peft(tmp_path, method: str) -> None:
    pm = routed(method, zero_router=True)  # W_g = 0: g = 1/N for every token, so the export is exact
    tok = make_char_tokenizer()
    asymlora.export_task_adapter(pm, "greet", tmp_path / "x", calibration=TEXTS, tokenizer=tok)
    batch = tok(["hello there", "abc"], return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = pm(**batch).logits
        lm = peft.PeftModel.from_pretrained(make_tiny_llama(), str(tmp_path / "x"))
        assert isinstance(lm.peft_config["default"], peft.LoraConfig)
        got = lm(**batch).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    report = json.loads((tmp_path / "x" / "calibration.json").read_text())
    assert report["fidelity"]["output"] < 1e-5 and report["fidelity"]["max_layer"] < 1e-5
    assert report["rank"] == (2 if method in ("alora", "hydralora") else 3 * pm.peft_config["default"].malora_expert_rank if method == "malora" else 6)  # fmt: skip
    for gate in report["mean_gate"].values():
        assert gate == pytest.approx([1 / 3] * 3)
    assert "approximation" in (tmp_path / "x" / "README.md").read_text()


@pytest.mark.parametrize(("method", "router"), [("alora", "soft"), ("hydralora", "soft"), ("molora", "topk")])
def test_input_dependent_gate_reports_a_nonzero_error_that_matches_the_loaded_export(
    tmp_path, method, router
):
    pm = routed(method, router=router, top_k=2)
    tok = make_char_tokenizer()
    asymlora.export_task_adapter(pm, "greet", tmp_path / "x", calibration=TEXTS, tokenizer=tok)
    report = json.loads((tmp_path / "x" / "calibration.json").read_text())
    assert 0.01 < report["fidelity"]["output"] < 10 and report["fidelity"]["pooled_layers"] > 0.01
    # the reported output error is the one of the adapter stock peft loads: recompute it independently
    batches = calibration_batches(TEXTS, "greet", tok)
    lm = peft.PeftModel.from_pretrained(make_tiny_llama(), str(tmp_path / "x"))
    num = den = 0.0
    with torch.no_grad():
        for b in batches:
            m = b["attention_mask"].bool().unsqueeze(-1)
            r, e = pm(**b).logits, lm(**b).logits
            with pm.disable_adapter():
                base = pm(**b).logits
            num += float(((e - r) * m).pow(2).sum())
            den += float(((r - base) * m).pow(2).sum())
    assert report["fidelity"]["output"] == pytest.approx((num / den) ** 0.5, rel=1e-4)


def test_rank_truncation_writes_rank_k_and_its_discarded_energy(tmp_path) -> None:
    pm = routed("molora")
    asymlora.export_task_adapter(
        pm, "t", tmp_path / "x", calibration=TEXTS, tokenizer=make_char_tokenizer(), rank=2
    )
    assert json.loads((tmp_path / "x" / "adapter_config.json").read_text())["r"] == 2
    state = load_file(tmp_path / "x" / "adapter_model.safetensors")
    assert all(v.shape[0] == 2 for k, v in state.items() if "lora_A" in k)
    energy = json.loads((tmp_path / "x" / "calibration.json").read_text())["discarded_energy"]
    assert 0 < energy["mean"] <= energy["max"] < 1
    assert "discarded energy" in (tmp_path / "x" / "README.md").read_text()


def test_task_routed_export_is_unchanged_and_ignores_calibration(tmp_path) -> None:
    pm = routed("alora", router="task", task_names=["a", "b", "c"])
    asymlora.export_task_adapter(pm, "b", tmp_path / "plain")
    with pytest.warns(UserWarning, match="exact"):
        asymlora.export_task_adapter(pm, "b", tmp_path / "cal", calibration=TEXTS)
    plain, cal = (
        load_file(tmp_path / "plain" / "adapter_model.safetensors"),
        load_file(tmp_path / "cal" / "adapter_model.safetensors"),
    )
    layer = next(m for n, m in pm.named_modules() if n.endswith("layers.0.self_attn.q_proj"))
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    torch.testing.assert_close(plain[f"{key}.lora_A.weight"], layer.asymlora_A["default"][1].detach())
    assert plain.keys() == cal.keys() and all(torch.equal(plain[k], cal[k]) for k in plain)
    assert not (tmp_path / "plain" / "calibration.json").exists()
    with pytest.raises(ValueError, match="rank=4 applies to the calibrated export"):
        asymlora.export_task_adapter(pm, "b", tmp_path / "r", rank=4)


# --- bad input --------------------------------------------------------------------------------------------
def small_task(name: str) -> Task:
    ex = [Example(prompt=f"Say {i}.", target=str(i)) for i in range(3)]
    return Task(name=name, kind="generate", train=ex, test=ex, metrics=["exact_match"])


@pytest.mark.parametrize(
    ("task", "calibration", "message"),
    [
        ("greet", None, r"router='soft'.*Pass calibration= the task's examples"),
        ("greet", [], r"calibration data for task 'greet' is empty"),
        ("greet", small_task("count"), r"calibration data is task 'count', but task 'greet' is being exported"),
        ("greet", [{"input_ids": [[5, 6]], "task_ids": [0]}, {"input_ids": [[5, 6]], "task_ids": [1]}],
         r"task_ids \[0, 1\].*only that task's examples"),
        ("greet", [3.5], r"holds a float.*calibration="),
        ("greet", {"input_ids": [[5, 6]], "attention_mask": [[0, 0]]}, "no real token"),
    ],
)  # fmt: skip
def test_bad_calibration_is_refused_before_anything_is_written(tmp_path, task, calibration, message) -> None:
    pm = routed("alora")
    with pytest.raises(ValueError, match=message):
        asymlora.export_task_adapter(
            pm, task, tmp_path / "x", calibration=calibration, tokenizer=make_char_tokenizer()
        )
    assert not (tmp_path / "x").exists()


def test_strings_without_a_tokenizer_and_unknown_task_names_are_refused(tmp_path) -> None:
    pm = routed("alora")
    with pytest.raises(ValueError, match="pass tokenizer="):
        asymlora.export_task_adapter(pm, "greet", tmp_path / "x", calibration=TEXTS)
    named = routed("alora", task_names=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"unknown task 'zz'; this adapter's tasks are \['a', 'b', 'c'\]"):
        asymlora.export_task_adapter(
            named, "zz", tmp_path / "x", calibration=TEXTS, tokenizer=make_char_tokenizer()
        )
    assert not (tmp_path / "x").exists()


# --- the CLI ----------------------------------------------------------------------------------------------
def test_cli_exports_a_soft_routed_run_with_calibration(tmp_path, capsys) -> None:
    model = make_tiny_llama(hidden=48, layers=2, initializer_range=0.2)
    model.save_pretrained(tmp_path / "model")
    make_char_tokenizer().save_pretrained(tmp_path / "model")
    rows = [{"input": f"Is {i} even?", "options": ["yes", "no"], "target": "yes" if i % 2 == 0 else "no",
             "task": "parity"} for i in range(30)] + [
            {"input": str(i), "output": str(i + 1), "task": "add"} for i in range(30)]  # fmt: skip
    data = tmp_path / "tasks.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_dir = tmp_path / "run"
    args = [f"model.name={tmp_path / 'model'}", "model.device=cpu", f"data.tasks=[jsonl:{data}#add, jsonl:{data}#parity]",
            "data.max_train=16", "data.max_test=4", "data.max_length=48", "adapter.r=2", "adapter.target_modules=[q_proj,v_proj]",
            "train.steps=2", "train.batch_size=8", "train.save_every=0", "eval.batch_size=8", "eval.max_new_tokens=2",
            "eval.base_model=false", f"run_dir={run_dir}"]  # fmt: skip
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("train:\n  steps: 2\n")
    assert cli_main(["train", "--quiet", str(cfg_file), *args]) == 0
    out = tmp_path / "parity"
    argv = ["export", str(run_dir), "--task", "parity", "--out", str(out)]
    assert cli_main([*argv, "--calibration", "train", "--rank", "1"]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 1
    assert "fidelity" in capsys.readouterr().out.lower() and (out / "README.md").is_file()
    for extra, message in [
        ([], "--calibration train"),
        (["--calibration", "train", "--task", "nope"], "unknown task 'nope'"),
    ]:
        assert cli_main([*argv, "--overwrite", *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
