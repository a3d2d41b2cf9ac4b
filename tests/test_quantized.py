"""Quantised bases (bitsandbytes 4-bit NF4 and 8-bit LLM.int8(), on the CPU here): training with every method
and router, save/load, per-task export to stock peft, merge_task into a dequantised copy, and refusals."""

from __future__ import annotations

import peft
import pytest
import torch
from tests.conftest import make_char_tokenizer, make_tiny_llama
from torch import nn

import asymlora
from asymlora import AsymLoraConfig
from asymlora.config import ConfigError, load_config

bnb = pytest.importorskip("bitsandbytes")
from peft.utils.integrations import dequantize_bnb_weight  # noqa: E402  (after the skip)
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:MatMul8bitLt"),  # bnb's note that int8 matmuls take fp16 inputs
    # peft's prepare_model_for_kbit_training calls transformers' deprecated name and torch's default checkpoint
    pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:torch.utils.checkpoint. the use_reentrant parameter:UserWarning"),
]

HIDDEN = 64
"""bitsandbytes' CPU 4-bit inference kernel needs in_features >= its blocksize 64 (hidden 32 fails in eval)."""
KINDS = ["nf4", "int8"]
LAYER_TYPES = {"nf4": bnb.nn.Linear4bit, "int8": bnb.nn.Linear8bitLt}
COMBOS = [("lora", "soft")] + [
    (m, r) for m in ("alora", "hydralora", "molora", "malora") for r in ("soft", "topk", "task")
]
TARGETS = ["q_proj", "v_proj", "down_proj"]


def quantization(kind: str, compute_dtype: torch.dtype | None = None) -> BitsAndBytesConfig:
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype
    )


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = make_char_tokenizer()
    make_tiny_llama(vocab_size=len(tokenizer), hidden=HIDDEN).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def load_quantized(base_dir, kind: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(
        base_dir, quantization_config=quantization(kind, dtype), device_map="cpu", dtype=dtype
    ).eval()


def ids_batch(seed: int, shape=(4, 12)) -> torch.Tensor:
    return torch.randint(3, 100, shape, generator=torch.Generator().manual_seed(seed))


def train_losses(pm: nn.Module, steps: int = 6, lr: float = 2e-2) -> list[float]:
    pm.train()
    ids = ids_batch(2)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = pm(input_ids=ids, labels=ids, task_ids=torch.tensor([0, 1, 2, 0])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("kbit", [False, True], ids=["plain", "prepare_model_for_kbit_training"])
@pytest.mark.parametrize("kind", KINDS)
def test_every_method_and_router_trains_on_a_quantized_base(base_dir, kind: str, kbit: bool) -> None:
    for method, router in COMBOS:
        model = load_quantized(base_dir, kind)
        if kbit:  # peft's QLoRA preparation: fp32 norms, input grads, gradient checkpointing
            model = peft.prepare_model_for_kbit_training(model)
        q_proj = model.model.layers[0].self_attn.q_proj
        assert isinstance(q_proj, LAYER_TYPES[kind])
        frozen = q_proj.weight.data.clone()
        cfg = AsymLoraConfig(method=method, router=router, r=4, lora_alpha=8, target_modules=TARGETS)
        pm = peft.get_peft_model(model, cfg)
        losses = train_losses(pm)
        assert losses[-1] < losses[0] - 0.1, (kind, method, router, losses)
        trainable = [p for p in pm.parameters() if p.requires_grad]
        assert trainable and all(p.dtype == torch.float32 for p in trainable)  # adapters in full precision
        layer = pm.base_model.model.model.layers[0].self_attn.q_proj
        assert isinstance(layer.get_base_layer(), LAYER_TYPES[kind])
        assert torch.equal(layer.get_base_layer().weight.data, frozen)  # the quantised base never moves


def randomized_task_model(base_dir, kind: str, method: str) -> nn.Module:
    torch.manual_seed(0)
    cfg = AsymLoraConfig(
        method=method, router="task", num_experts=2, task_names=["a", "b"], target_modules=TARGETS
    )
    pm = peft.get_peft_model(load_quantized(base_dir, kind), cfg)
    with torch.no_grad():
        for p in asymlora.parameters_by_role(pm, "B").values():
            p.normal_(std=0.3)
    return pm.eval()


@pytest.mark.parametrize(("kind", "method"), [("nf4", "alora"), ("int8", "malora"), ("nf4", "hydralora")])
def test_save_load_and_export_on_a_quantized_base(base_dir, tmp_path, kind: str, method: str) -> None:
    pm = randomized_task_model(base_dir, kind, method)
    ids = ids_batch(3, (2, 9))
    with torch.no_grad():
        ref = pm(input_ids=ids, task_ids=torch.tensor([1, 1])).logits
        other = pm(input_ids=ids, task_ids=torch.tensor([0, 0])).logits
    assert (ref - other).abs().max() > 0.3  # the two tasks differ: the checks below can tell them apart

    pm.save_pretrained(tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(load_quantized(base_dir, kind), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, task_ids=torch.tensor([1, 1])).logits, ref)

    asymlora.export_task_adapter(pm, "b", tmp_path / "b")
    stock = peft.PeftModel.from_pretrained(load_quantized(base_dir, kind), tmp_path / "b")
    stock_layer = stock.base_model.model.model.layers[0].self_attn.q_proj
    assert type(stock_layer).__module__ == "peft.tuners.lora.bnb"  # peft's own LoRA-on-bitsandbytes layer
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids=ids).logits, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_task_dequantizes_the_adapted_layers_with_a_warning(base_dir, kind: str) -> None:
    pm = randomized_task_model(base_dir, kind, "alora")
    layer = pm.base_model.model.model.layers[1].self_attn.v_proj
    base = layer.get_base_layer()
    w0 = dequantize_bnb_weight(base.weight, getattr(base, "state", None)).float()  # before any forward
    ids = ids_batch(4, (2, 9))
    with torch.no_grad():  # (bitsandbytes' CPU kernel repacks the 4-bit weights on this first eval forward)
        ref = pm(input_ids=ids, task_ids=torch.tensor([1, 1])).logits
        other = pm(input_ids=ids, task_ids=torch.tensor([0, 0])).logits
    a, b = layer.asymlora_A["default"].detach().clone(), layer.asymlora_B["default"].detach().clone()
    with pytest.warns(UserWarning, match=r"6 adapted bitsandbytes layers are dequantised to torch.float32"):
        merged = asymlora.merge_task(pm, "b")
    v_proj = merged.model.layers[1].self_attn.v_proj
    assert type(v_proj) is nn.Linear and v_proj.weight.dtype == torch.float32
    assert isinstance(
        merged.model.layers[1].self_attn.k_proj, LAYER_TYPES[kind]
    )  # not adapted: still quantised
    # ALoRA task 1 = expert 1: ΔW = (alpha / r) · B A_1 with the shared B (docs/design.md §3)
    # atol: the CPU kernel's repacking stores the NF4 block scales in bf16 (|W0| < 0.1 here: ≤ 4e-4 off)
    torch.testing.assert_close(v_proj.weight, w0 + (16 / 8) * b @ a[1], rtol=0, atol=5e-4)
    with torch.no_grad():
        out = merged(input_ids=ids).logits
    # The bnb kernels round their inputs (int8: fp16 activations), the merged float layer does not: a few 1e-3.
    gap, between_tasks = (out - ref).abs().max(), (other - ref).abs().max()
    assert gap < 0.03 and between_tasks > 10 * gap, (gap, between_tasks)


def test_merging_into_quantized_weights_is_refused_before_any_write(base_dir) -> None:
    cfg = AsymLoraConfig(method="lora", target_modules=["lm_head", "q_proj"])
    pm = peft.get_peft_model(load_quantized(base_dir, "nf4"), cfg)
    with torch.no_grad():
        for p in asymlora.parameters_by_role(pm, "B").values():
            p.normal_(std=0.3)
    model = pm.base_model.model
    head, q = model.lm_head.get_base_layer().weight, model.model.layers[0].self_attn.q_proj.get_base_layer()
    head_before, q_before = head.detach().clone(), q.weight.data.clone()
    for merge in (pm.merge_and_unload, pm.merge_adapter, model.model.layers[0].self_attn.q_proj.merge):
        with pytest.raises(ValueError, match=r"4bit bitsandbytes weight .*asymlora.merge_task"):
            merge()
    # lm_head (unquantised, tied to the embedding) comes first in no loop: nothing was merged or untied
    assert torch.equal(model.lm_head.get_base_layer().weight, head_before) and torch.equal(
        q.weight.data, q_before
    )
    assert model.lm_head.get_base_layer().weight is model.model.embed_tokens.weight
    with pytest.warns(UserWarning, match="dequantised"):
        merged = asymlora.merge_task(pm, 0)  # plain LoRA: its one "task"
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear


@pytest.mark.parametrize("autocast_adapter_dtype", [True, False])
def test_qlora_bf16_compute_keeps_the_router_in_float32(base_dir, autocast_adapter_dtype: bool) -> None:
    model = load_quantized(base_dir, "nf4", dtype=torch.bfloat16)  # QLoRA: NF4 storage, bf16 compute
    cfg = AsymLoraConfig(method="alora", r=4, lora_alpha=8, target_modules=TARGETS)
    pm = peft.get_peft_model(model, cfg, autocast_adapter_dtype=autocast_adapter_dtype)
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    expected = torch.float32 if autocast_adapter_dtype else torch.bfloat16  # peft's semantics
    assert layer.asymlora_A["default"].dtype == layer.asymlora_B["default"].dtype == expected
    assert layer.asymlora_router["default"].dtype == torch.float32
    x = torch.randn(2, 5, HIDDEN, dtype=torch.bfloat16)
    gate = layer.gate("default", x)
    assert gate.dtype == torch.float32
    w = layer.asymlora_router["default"].detach().double()
    torch.testing.assert_close(gate.double(), (x.double() @ w.T).softmax(-1), rtol=1e-5, atol=1e-6)
    losses = train_losses(pm)
    assert losses[-1] < losses[0] - 0.1, losses


def test_load_in_8bit_through_asymlora_models_and_the_config(base_dir) -> None:
    from asymlora.models import load

    model, _ = load(str(base_dir), device="cpu", load_in_8bit=True)
    assert isinstance(model.model.layers[0].mlp.down_proj, bnb.nn.Linear8bitLt)
    assert model.lm_head.weight.dtype == torch.float32  # kept in full precision by transformers
    with pytest.raises(ValueError, match=r"load_in_4bit=True and load_in_8bit=True were both given"):
        load(str(base_dir), device="cpu", load_in_4bit=True, load_in_8bit=True)
    with pytest.raises(
        ValueError, match=r"dtype=torch.float64 cannot be used with load_in_4bit.*torch.bfloat16"
    ):
        load(str(base_dir), device="cpu", dtype=torch.float64, load_in_4bit=True)
    cfg = load_config(None, ["data.tasks=[bigbench:strategyqa]", "model.load_in_8bit=true"])
    assert cfg.model.load_in_8bit and not cfg.model.load_in_4bit
    with pytest.raises(ConfigError, match=r"model.load_in_4bit=true and model.load_in_8bit=true: choose one"):
        load_config(
            None, ["data.tasks=[bigbench:strategyqa]", "model.load_in_4bit=true", "model.load_in_8bit=true"]
        )


def dequantized_by_hand(layer: nn.Module) -> torch.Tensor:
    """W0 of a bitsandbytes layer that has run no eval forward yet, from bitsandbytes' own decoders: 4-bit
    ``dequantize_4bit``, 8-bit the row-wise int8 codes times their absmax / 127 (LLM.int8())."""
    weight = layer.weight
    if isinstance(layer, bnb.nn.Linear4bit):
        assert not getattr(weight.quant_state, "packing_format_for_cpu", False)
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).double()
    return weight.data.double() * weight.SCB.double()[:, None] / 127


def test_4bit_base_survives_eval_forward_then_save_and_merge_task_reads_it(base_dir, tmp_path) -> None:
    """bitsandbytes repacks a 4-bit weight on its first CPU eval forward and its own inverse (run by
    state_dict(), so by save_pretrained) left the block scales transposed without double quantisation:
    down_proj (d_in = 2·HIDDEN, two blocks per row) then computed with the wrong scales (0.29 off on outputs
    of 0.7), and merge_task dequantised the same wrong W0."""
    model = AutoModelForCausalLM.from_pretrained(
        base_dir, quantization_config=BitsAndBytesConfig(load_in_4bit=True), device_map="cpu"
    ).eval()
    base = model.model.layers[0].mlp.down_proj
    assert base.in_features > base.weight.quant_state.blocksize  # more than one scale per row
    w0 = dequantized_by_hand(base)
    cfg = AsymLoraConfig(method="alora", router="task", num_experts=2, target_modules=["down_proj"])
    pm = peft.get_peft_model(model, cfg)
    with torch.no_grad():
        for p in asymlora.parameters_by_role(pm, "B").values():
            p.normal_(std=0.3)
    layer = pm.base_model.model.model.layers[0].mlp.down_proj
    x = torch.randn(3, base.in_features, generator=torch.Generator().manual_seed(0))
    ids = ids_batch(5, (2, 9))
    with torch.no_grad():
        pm(input_ids=ids, task_ids=torch.tensor([1, 0]))  # eval forward: bitsandbytes repacks (if it can)
        pm.save_pretrained(tmp_path / "adapter")
        for training in (False, True):
            base.train(training)
            # atol: the repacked block scales are bf16 (|y| < 1 here: ≤ 3e-3 off)
            torch.testing.assert_close(base(x).double(), x.double() @ w0.T, rtol=0, atol=1e-2)
        base.eval()
        pm(input_ids=ids, task_ids=torch.tensor([1, 0]))
    a, b = layer.asymlora_A["default"].detach().double(), layer.asymlora_B["default"].detach().double()
    with pytest.warns(UserWarning, match="dequantised"):
        merged = asymlora.merge_task(pm, 1)
    expected = w0 + (16 / 8) * b @ a[1]  # ALoRA task 1: s · B A_1 (docs/design.md §3)
    torch.testing.assert_close(
        merged.model.layers[0].mlp.down_proj.weight.double(), expected, rtol=0, atol=5e-4
    )


@pytest.mark.parametrize("kind", KINDS)
def test_traces_measure_magnitude_and_direction_against_the_dequantised_base(
    base_dir, tmp_path, kind
) -> None:
    """TraceRecorder's ΔM/ΔD read W0 of a quantised layer: the packed 4-bit bytes gave a shape error, the int8
    codes (|W| up to 127) silently wrong numbers."""
    from asymlora.analysis import TraceRecorder

    pm = peft.get_peft_model(
        load_quantized(base_dir, kind), AsymLoraConfig(method="lora", target_modules=["down_proj"])
    )
    layer = pm.base_model.model.model.layers[0].mlp.down_proj
    w0 = dequantized_by_hand(layer.get_base_layer())
    with torch.no_grad():
        layer.asymlora_B["default"].normal_(std=0.3)
        pm(input_ids=ids_batch(6, (2, 9)))  # 4-bit: the CPU eval forward repacks the weight
    record = TraceRecorder(pm, tmp_path / "traces.jsonl").record(1)
    row = next(r for r in record["layers"] if r["module"] == "model.layers.0.mlp.down_proj")
    t = {k: v.detach().double() for k, v in layer.tensors("default").items()}
    w = w0 + (16 / 8) * t["B"] @ t["A"]
    m0, m = w0.norm(dim=0), w.norm(dim=0)  # per input column (docs/design.md §5)
    delta_m = (m - m0).abs().mean().item()
    delta_d = (1 - (w * w0).sum(0) / (m * m0)).mean().item()
    assert row["delta_M"] == pytest.approx(delta_m, rel=2e-2) and row["delta_D"] == pytest.approx(
        delta_d, rel=2e-2
    )
