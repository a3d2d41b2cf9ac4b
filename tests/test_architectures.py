"""Every adapter method on tiny random configs of the supported architectures (docs/architectures.md).

Per architecture: the fused forward of every adapted layer equals a per-expert loop computed here from the
layer's own input (with the base product written out for nn.Linear, x Wᵀ + b, and for GPT-2's Conv1D,
x W + b); save/load, `merge_task` and the export to stock peft reproduce the routed model's logits; with
``target_modules=None`` the adapted modules are peft's per-architecture LoRA defaults; unsupported module
types are refused before any weight is touched.
"""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch
import transformers
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from tests.conftest import make_tiny_llama
from tests.test_core import reference_delta, reference_gate
from torch import nn

import asymlora
from asymlora import AsymLoraConfig
from asymlora.tuner import AsymLoraLayer
from asymlora.tuner.layer import Linear

H = 32
LLAMA_LIKE = dict(
    vocab_size=128, hidden_size=H, intermediate_size=2 * H, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)  # fmt: skip
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# name -> (config class, model class, config kwargs, every adaptable projection of a decoder block)
ARCHS: dict[str, tuple[str, str, dict, list[str]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", LLAMA_LIKE, LLAMA_TARGETS),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", LLAMA_LIKE, LLAMA_TARGETS),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**LLAMA_LIKE, "head_dim": 8}, LLAMA_TARGETS),
    "mistral": ("MistralConfig", "MistralForCausalLM", LLAMA_LIKE, LLAMA_TARGETS),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {**LLAMA_LIKE, "head_dim": 8}, LLAMA_TARGETS),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {**LLAMA_LIKE, "head_dim": 8}, LLAMA_TARGETS),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", LLAMA_LIKE, ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
    "gpt2": (
        "GPT2Config", "GPT2LMHeadModel",
        dict(vocab_size=128, n_embd=H, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2),
        ["c_attn", "c_proj", "c_fc"],
    ),
    "gpt_neox": (
        "GPTNeoXConfig", "GPTNeoXForCausalLM",
        dict(vocab_size=128, hidden_size=H, intermediate_size=2 * H, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, bos_token_id=1, eos_token_id=2),
        ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    ),
    "opt": (
        "OPTConfig", "OPTForCausalLM",
        dict(vocab_size=128, hidden_size=H, ffn_dim=2 * H, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, word_embed_proj_dim=H, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    ),
}  # fmt: skip

# What target_modules=None adapts (peft's LoRA mapping, written out so a change in peft shows up here and in
# docs/architectures.md); None: peft has no default for the model type.
DEFAULT_TARGETS = {
    "llama": {"q_proj", "v_proj"}, "qwen2": {"q_proj", "v_proj"}, "qwen3": {"q_proj", "v_proj"},
    "mistral": {"q_proj", "v_proj"}, "gemma2": {"q_proj", "v_proj"}, "gemma3": {"q_proj", "v_proj"},
    "phi3": None, "gpt2": {"c_attn"}, "gpt_neox": {"query_key_value"}, "opt": {"q_proj", "v_proj"},
}  # fmt: skip

ROUTED = ["alora", "hydralora", "molora", "malora"]
METHODS = ["lora", "fedhet", *ROUTED]
CASES = [("lora", "soft"), ("fedhet", "soft")] + [(m, r) for m in ROUTED for r in ("soft", "topk", "task")]
IDS = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(5))


def make_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    config_cls, model_cls, kwargs, _ = ARCHS[arch]
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs))
    return model.to(dtype).eval()


def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def randomise(pm: nn.Module, std: float = 0.2) -> None:
    """Every adapter tensor random (B too, which starts at zero), so each path contributes."""
    torch.manual_seed(1)
    with torch.no_grad():
        for _, layer in pm.base_model.adapter_layers():
            for p in layer.tensors("default").values():
                p.normal_(std=std)


def reference_path(method: str, t: dict[str, torch.Tensor], x: torch.Tensor, gate) -> torch.Tensor:
    """The adapter path as a plain loop over experts (tests/test_core.py), plus Fed-ALoRA-het's product."""
    if method == "fedhet":  # (B0 + B2 B1) M A x, docs/design.md §4
        return x @ t["A"].T @ t["M"].T @ (t["B0"] + t["B2"] @ t["B1"]).T
    return reference_delta(method, t, x, gate)


# --- fused forward == per-expert loop, in place in every architecture -------------------------------------
@pytest.mark.parametrize(("method", "router"), CASES)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_fused_matches_loop_in_every_adapted_layer(arch: str, method: str, router: str) -> None:
    targets = ARCHS[arch][3]
    cfg = AsymLoraConfig(method=method, router=router, r=4, num_experts=3, top_k=2, target_modules=targets)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GPT-2: peft's "Setting fan_in_fan_out to True"
        pm = peft.get_peft_model(make_model(arch, dtype=torch.float64), cfg)
    randomise(pm)
    n_targets = sum(n.rsplit(".", 1)[-1] in targets for n, _ in make_model(arch).named_modules())
    seen: list[tuple[AsymLoraLayer, torch.Tensor, torch.Tensor]] = []
    hooks = [
        layer.register_forward_hook(lambda m, args, out: seen.append((m, args[0], out)))
        for _, layer in pm.base_model.adapter_layers()
    ]
    task_ids = torch.tensor([2, 0])
    with torch.no_grad():
        logits = pm(input_ids=IDS, task_ids=task_ids if router == "task" else None).logits
        for h in hooks:
            h.remove()
        with pm.disable_adapter():
            base_logits = pm(input_ids=IDS).logits
    assert len(seen) == n_targets >= 2 * len(targets) and not torch.allclose(logits, base_logits, atol=1e-3)
    for layer, x, y in seen:
        base, t = layer.base_layer, {k: v.detach() for k, v in layer.tensors("default").items()}
        w = base.weight if is_conv1d(base) else base.weight.T  # Conv1D stores W as (d_in, d_out)
        y_base = x @ w + (0 if base.bias is None else base.bias)
        # OPT's MLP sees the tokens flattened to (batch·seq, d): each example's id covers its seq rows
        ids = task_ids.repeat_interleave(x.shape[0] // len(task_ids)) if x.dim() == 2 else task_ids
        gate = None if method in ("lora", "fedhet") else reference_gate(x, t.get("router"), cfg, ids)
        y_ref = y_base + cfg.scaling * reference_path(method, t, x, gate)
        assert (y - y_base).abs().max() > 1e-3  # the adapter path is not trivially zero
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)


# --- save/load, merge_task and the export to stock peft reproduce the routed model ------------------------
def task_config(arch: str, method: str) -> tuple[AsymLoraConfig, int]:
    routed = method in ROUTED
    cfg = AsymLoraConfig(
        method=method,
        router="task",
        r=4,
        num_experts=2,
        task_names=["sst", "qa"] if routed else None,
        target_modules=ARCHS[arch][3],
    )
    return cfg, 1 if routed else 0


def load_stock_lora(base: nn.Module, path) -> tuple[nn.Module, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(base, path)
    return model, [str(w.message) for w in caught]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_save_load_export_and_merge_equal_the_routed_model(tmp_path, arch: str, method: str) -> None:
    cfg, task = task_config(arch, method)
    base = make_model(arch)
    fresh = [copy.deepcopy(base) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(base, cfg)
    assert pm.peft_config["default"].fan_in_fan_out == (arch == "gpt2")
    randomise(pm)
    task_ids = torch.tensor([task, task])
    with torch.no_grad():
        ref = pm(input_ids=IDS, task_ids=task_ids).logits
        assert not torch.allclose(ref, fresh[0](input_ids=IDS).logits, atol=1e-3)

    pm.save_pretrained(tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(fresh[0]), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS, task_ids=task_ids).logits, ref)

    asymlora.export_task_adapter(pm, task, tmp_path / "lora")
    exported = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert exported["peft_type"] == "LORA" and exported["fan_in_fan_out"] == (arch == "gpt2")
    stock, messages = load_stock_lora(fresh[1], tmp_path / "lora")
    assert type(stock.base_model).__name__ == "LoraModel"
    assert not [m for m in messages if "fan_in_fan_out" in m], messages  # peft had nothing to correct
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids=IDS).logits, ref, rtol=1e-4, atol=1e-4)

    if method == "lora":  # peft's own merge API goes through the layer's merge/unmerge
        with torch.no_grad():
            pm.merge_adapter()
            torch.testing.assert_close(pm(input_ids=IDS).logits, ref, rtol=1e-4, atol=1e-4)
            pm.unmerge_adapter()
            torch.testing.assert_close(pm(input_ids=IDS).logits, ref, rtol=1e-5, atol=1e-5)
    merged = asymlora.merge_task(pm, task)
    assert not any(isinstance(m, AsymLoraLayer) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=IDS).logits, ref, rtol=1e-4, atol=1e-4)


# --- target_modules=None: peft's per-architecture LoRA defaults ---------------------------------------------
@pytest.mark.parametrize("arch", list(ARCHS))
def test_default_targets_follow_peft_lora_mapping(arch: str) -> None:
    model = make_model(arch)
    model_type = model.config.model_type
    assert DEFAULT_TARGETS[arch] == (
        None
        if model_type not in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
        else set(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[model_type])
    )
    if DEFAULT_TARGETS[arch] is None:
        with pytest.raises(
            ValueError, match=rf"target_modules=None.*model_type '{model_type}'.*Pass target_modules"
        ):
            peft.get_peft_model(model, AsymLoraConfig(method="alora"))
        assert not any(isinstance(m, AsymLoraLayer) for m in model.modules())
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.get_peft_model(model, AsymLoraConfig(method="alora"))
    adapted = {name for name, _ in pm.base_model.adapter_layers()}
    assert {n.rsplit(".", 1)[-1] for n in adapted} == DEFAULT_TARGETS[arch]
    stock = peft.get_peft_model(make_model(arch), peft.LoraConfig())  # peft's own LoRA picks the same modules
    assert adapted == {n for n, m in stock.base_model.model.named_modules() if hasattr(m, "lora_A")}
    fixed = [str(w.message) for w in caught if "fan_in_fan_out" in str(w.message)]
    assert pm.peft_config["default"].fan_in_fan_out == (arch == "gpt2") == bool(fixed)
    if fixed:
        assert "Setting fan_in_fan_out to True" in fixed[0]


def test_fan_in_fan_out_on_linear_is_reset_with_peft_warning() -> None:
    cfg = AsymLoraConfig(method="lora", fan_in_fan_out=True, target_modules=["q_proj"])
    with pytest.warns(
        UserWarning, match="target module is `torch.nn.Linear`. Setting fan_in_fan_out to False"
    ):
        pm = peft.get_peft_model(make_tiny_llama(), cfg)
    assert pm.peft_config["default"].fan_in_fan_out is False


# --- unsupported module types: refused before any weight is touched ----------------------------------------
def assert_untouched(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    assert not any(isinstance(m, AsymLoraLayer) for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")
def test_unsupported_target_type_is_named_before_any_injection() -> None:
    model = make_tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = AsymLoraConfig(method="alora", target_modules=["q_proj", "embed_tokens"])
    with pytest.raises(
        ValueError, match=r"model\.embed_tokens \(torch\.nn\.modules\.sparse\.Embedding\)"
    ) as e:
        peft.get_peft_model(model, cfg)
    message = str(e.value)
    assert "torch.nn.Linear, transformers.pytorch_utils.Conv1D" in message and "exclude_modules" in message
    assert "'q_proj'" in message  # the fix: what can be targeted
    assert_untouched(model, before)


def test_architecture_whose_default_targets_are_unsupported_is_refused() -> None:
    model = make_tiny_llama()  # a Llama whose first q_proj is a torch Conv1d: peft's defaults hit it
    model.model.layers[0].self_attn.q_proj = nn.Conv1d(H, H, kernel_size=1, bias=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"layers\.0\.self_attn\.q_proj \(torch\.nn\.modules\.conv\.Conv1d\)"
    ):
        peft.get_peft_model(model, AsymLoraConfig(method="alora"))
    assert_untouched(model, before)  # layer 1's q_proj/v_proj, which come later, were not wrapped either


def test_layer_refuses_an_unsupported_base_layer_by_type() -> None:
    cfg = AsymLoraConfig(method="lora", target_modules=["x"])
    with pytest.raises(TypeError, match=r"torch\.nn\.modules\.sparse\.Embedding.*torch\.nn\.Linear.*Conv1D"):
        Linear(nn.Embedding(10, 4), "default", cfg, asymlora.routing.RoutingState())


def test_names_that_match_nothing_list_conv1d_modules() -> None:
    from asymlora.models import find_linear_module_names

    assert find_linear_module_names(make_model("gpt2")) == ["c_attn", "c_proj", "c_fc", "lm_head"]
    with pytest.raises(ValueError, match=r"nn\.Linear and Conv1D modules are \['c_attn', 'c_fc', 'c_proj'"):
        peft.get_peft_model(make_model("gpt2"), AsymLoraConfig(method="alora", target_modules=["q_proj"]))


@pytest.mark.parametrize("method", ["lora", "alora"])
def test_conv1d_merge_writes_the_transposed_update_into_a_square_weight(method: str) -> None:
    """GPT-2's attn.c_proj is (d, d): a merge that forgot Conv1D's transposed storage would fit the shape and
    silently give other logits."""
    cfg = AsymLoraConfig(method=method, router="task", num_experts=2, target_modules=["attn.c_proj"])
    with pytest.warns(UserWarning, match="Setting fan_in_fan_out to True"):
        pm = peft.get_peft_model(make_model("gpt2"), cfg)
    assert {tuple(layer.base_layer.weight.shape) for _, layer in pm.base_model.adapter_layers()} == {(H, H)}
    randomise(pm, std=0.5)
    with torch.no_grad():
        ref = pm(input_ids=IDS, task_ids=torch.tensor([1, 1]) if method == "alora" else None).logits
        merged = pm.merge_and_unload() if method == "lora" else asymlora.merge_task(pm, 1)
        torch.testing.assert_close(merged(input_ids=IDS).logits, ref, rtol=1e-4, atol=1e-4)


def test_analysis_reads_a_conv1d_base_weight_as_d_out_by_d_in(tmp_path) -> None:
    from asymlora.analysis import TraceRecorder, load_adapter

    cfg = AsymLoraConfig(method="alora", target_modules=["c_attn"], fan_in_fan_out=True)
    pm = peft.get_peft_model(make_model("gpt2"), cfg)
    randomise(pm)
    rows = TraceRecorder(pm, tmp_path / "traces.jsonl").measure()  # ΔM/ΔD compare ΔW with W0 (d_out × d_in)
    assert len(rows) == 2 and all(row["delta_M"] is not None and row["delta_M"] > 0 for row in rows)
    pm.save_pretrained(tmp_path / "adapter")
    assert load_adapter(tmp_path / "adapter").fan_in_fan_out is True


@pytest.mark.parametrize("arch", ["phi3", "gpt2", "opt"])
def test_all_linear_shorthand_adapts_what_peft_lora_adapts(tmp_path, arch: str) -> None:
    """peft's ``target_modules="all-linear"``: every nn.Linear / Conv1D but the output head (phi3 has no
    per-architecture default, so this is its short way to adapt every projection)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(
            make_model(arch), AsymLoraConfig(method="molora", target_modules="all-linear")
        )
        stock = peft.get_peft_model(make_model(arch), peft.LoraConfig(target_modules="all-linear"))
    adapted = {name for name, _ in pm.base_model.adapter_layers()}
    assert adapted == {n for n, m in stock.base_model.model.named_modules() if hasattr(m, "lora_A")}
    assert {n.rsplit(".", 1)[-1] for n in adapted} == set(ARCHS[arch][3])
    randomise(pm)
    pm.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(make_model(arch), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, pm(input_ids=IDS).logits)


@pytest.mark.parametrize("arch", ["gpt2", "opt", "phi3"])
def test_only_adapter_tensors_train_and_the_loss_falls(arch: str) -> None:
    cfg = AsymLoraConfig(method="alora", router="task", num_experts=2, target_modules=ARCHS[arch][3])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(make_model(arch), cfg)
    trainable = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(".asymlora_" in n for n in trainable)
    opt = torch.optim.Adam(trainable.values(), lr=1e-2)
    task_ids = torch.tensor([0, 1])
    losses = []
    for _ in range(6):
        loss = pm(input_ids=IDS, labels=IDS, task_ids=task_ids).loss
        opt.zero_grad()
        loss.backward()
        if not losses:  # B starts at zero: at the first step the gradient reaches B (A's is zero then)
            assert all(p.grad is not None for n, p in trainable.items() if "asymlora_B" in n)
            assert all(float(p.grad.abs().sum()) > 0 for n, p in trainable.items() if "asymlora_B" in n)
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 1e-3


def test_calibrated_export_of_gpt2_keeps_the_conv1d_layout(tmp_path) -> None:
    """A soft-routed ALoRA on GPT-2 whose router is zero (g = 1/N on every token, so the calibrated export is
    exact): stock peft loads the export with fan_in_fan_out and reproduces the routed logits."""
    pm = peft.get_peft_model(make_model("gpt2"), AsymLoraConfig(method="alora", r=2, num_experts=3,
                                                                target_modules=["c_attn", "c_proj"]))  # fmt: skip
    randomise(pm)
    with torch.no_grad():
        for _, layer in pm.base_model.adapter_layers():
            layer.asymlora_router["default"].zero_()
    batch = {"input_ids": IDS, "attention_mask": torch.ones_like(IDS)}
    asymlora.export_task_adapter(pm, "t0", tmp_path / "x", calibration=[batch])
    config = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
    with torch.no_grad():
        ref = pm(**batch).logits
        got = peft.PeftModel.from_pretrained(make_model("gpt2"), str(tmp_path / "x"))(**batch).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


# --- padding in layers that see the tokens flattened (OPT's fc1 / fc2 get (batch·seq, d)) ---------------------
def test_padding_never_reaches_the_balance_loss_or_router_stats_of_flattened_layers() -> None:
    from asymlora.analysis.router_stats import RouterStats

    cfg = AsymLoraConfig(method="alora", router="soft", r=4, num_experts=3, balance_loss_weight=1.0,
                         target_modules=["q_proj", "fc1", "fc2"])  # fmt: skip
    pm = peft.get_peft_model(make_model("opt"), cfg)
    randomise(pm)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]])  # 12 real tokens of 14
    other = IDS.clone()
    other[0, 5:] = torch.tensor([7, 9])  # different token ids under the padding only

    def aux(ids: torch.Tensor) -> float:
        out = pm(input_ids=ids, attention_mask=mask, labels=ids)
        return float(out.balance_loss)

    # Under the causal mask the real tokens never see the padding after them, so their router inputs, and a
    # balance loss over the real tokens alone, cannot depend on what the padding holds.
    assert aux(other) == pytest.approx(aux(IDS), abs=1e-7)
    with RouterStats(pm) as stats:
        pm(input_ids=IDS, attention_mask=mask)
    counts = {e["module"].rsplit(".", 1)[-1]: e["tokens"] for e in stats.summary()}
    assert counts == {"q_proj": 12, "fc1": 12, "fc2": 12}
