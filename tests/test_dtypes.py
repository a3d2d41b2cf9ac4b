"""bf16 / fp16 bases: peft's ``autocast_adapter_dtype`` semantics, training with and without torch.autocast,
a float32 router and gate, and merged / exported tasks within half-precision tolerance of the routed model."""

from __future__ import annotations

import peft
import pytest
import torch
from safetensors.torch import load_file
from tests.conftest import make_tiny_llama

import asymlora
from asymlora import AsymLoraConfig

METHODS = ["lora", "alora", "hydralora", "molora", "malora"]
TARGETS = ["q_proj", "v_proj", "down_proj"]
HALF = [torch.bfloat16, torch.float16]


def half_model(dtype: torch.dtype):
    return make_tiny_llama().to(dtype)


def ids_batch(seed: int, shape=(4, 12)) -> torch.Tensor:
    return torch.randint(3, 128, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("autocast_adapter_dtype", [True, False])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_adapter_dtypes_follow_peft_and_the_router_stays_float32(
    tmp_path, dtype, autocast_adapter_dtype
) -> None:
    cfg = AsymLoraConfig(method="malora", router="topk", target_modules=TARGETS)
    pm = peft.get_peft_model(half_model(dtype), cfg, autocast_adapter_dtype=autocast_adapter_dtype)
    expected = torch.float32 if autocast_adapter_dtype else dtype  # peft: upcast unless told not to
    for name, p in pm.named_parameters():
        if ".asymlora_" in name:
            assert p.dtype == (torch.float32 if ".asymlora_router." in name else expected), name
        else:
            assert p.dtype == dtype and not p.requires_grad, name  # the base keeps its dtype, frozen
    pm.save_pretrained(tmp_path)
    stored = load_file(tmp_path / "adapter_model.safetensors")
    assert {k.split(".asymlora_")[1].split(".")[0] for k in stored} == {"S", "A", "B", "router"}
    for key, tensor in stored.items():
        assert tensor.dtype == (torch.float32 if ".asymlora_router" in key else expected), key
    loaded = peft.PeftModel.from_pretrained(half_model(dtype), tmp_path, autocast_adapter_dtype=False)
    ids = ids_batch(1, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, pm(input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("use_autocast", [False, True], ids=["no_autocast", "torch.autocast"])
@pytest.mark.parametrize("autocast_adapter_dtype", [True, False])
def test_bf16_base_trains_every_method(autocast_adapter_dtype: bool, use_autocast: bool) -> None:
    ids = ids_batch(2)
    for method in METHODS:
        torch.manual_seed(0)
        cfg = AsymLoraConfig(method=method, r=4, lora_alpha=8, target_modules=TARGETS)
        pm = peft.get_peft_model(
            half_model(torch.bfloat16), cfg, autocast_adapter_dtype=autocast_adapter_dtype
        )
        pm.train()
        opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=2e-2)
        losses = []
        for _ in range(6):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_autocast):
                loss = pm(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.1, (method, losses)


@pytest.mark.parametrize("fused", [True, False], ids=["eval_fused_router", "train_separate_router"])
@pytest.mark.parametrize("autocast_adapter_dtype", [True, False])
def test_the_layer_gate_is_float32_under_torch_autocast(autocast_adapter_dtype: bool, fused: bool) -> None:
    cfg = AsymLoraConfig(method="alora", num_experts=4, target_modules=["q_proj"])
    pm = peft.get_peft_model(half_model(torch.bfloat16), cfg, autocast_adapter_dtype=autocast_adapter_dtype)
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.asymlora_router["default"].normal_(std=2.0)  # spread logits: bf16 rounding would show
    seen = []
    gate = layer.gate

    def spy(name, x, logits=None):
        seen.append((x.detach(), gate(name, x, logits)))
        return seen[-1][1]

    layer.gate = spy
    pm.train(not fused)  # eval + no dropout: the router may be stacked under the A product (when safe)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        pm(input_ids=ids_batch(3, (2, 6)))
    (x, g), w = seen[0], layer.asymlora_router["default"].detach().double()
    assert g.dtype == torch.float32
    reference = (x.double() @ w.T).softmax(-1)  # by hand, in float64
    torch.testing.assert_close(g.double(), reference, rtol=1e-5, atol=1e-6)  # bf16 logits: ~1e-2 off


def random_task_model(dtype: torch.dtype, autocast_adapter_dtype: bool, method: str):
    torch.manual_seed(0)
    base = half_model(dtype)
    cfg = AsymLoraConfig(
        method=method, router="task", num_experts=2, task_names=["a", "b"], target_modules=TARGETS
    )
    pm = peft.get_peft_model(base, cfg, autocast_adapter_dtype=autocast_adapter_dtype)
    with torch.no_grad():
        for p in asymlora.parameters_by_role(pm, "B").values():
            p.normal_(std=0.3)
    return pm.eval()


@pytest.mark.parametrize("autocast_adapter_dtype", [True, False])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_merged_and_exported_tasks_match_the_routed_model(tmp_path, dtype, autocast_adapter_dtype) -> None:
    method = "alora" if autocast_adapter_dtype else "hydralora"
    pm = random_task_model(dtype, autocast_adapter_dtype, method)
    ids = ids_batch(4, (2, 9))
    with torch.no_grad():
        ref = pm(input_ids=ids, task_ids=torch.tensor([1, 1])).logits.float()
        other = pm(input_ids=ids, task_ids=torch.tensor([0, 0])).logits.float()
    between_tasks = (ref - other).abs().max()
    tol = 0.05 if dtype == torch.bfloat16 else 0.01  # a few ulps of the logits (|logits| ≲ 2; 8 / 11 bits)

    make_tiny_llama().to(dtype).save_pretrained(tmp_path / "base")
    asymlora.export_task_adapter(pm, "b", tmp_path / "b")
    base = type(pm.base_model.model).from_pretrained(tmp_path / "base", dtype=dtype).eval()
    stock = peft.PeftModel.from_pretrained(
        base, tmp_path / "b", autocast_adapter_dtype=autocast_adapter_dtype
    )
    assert type(stock).__name__ == "PeftModelForCausalLM"
    with torch.no_grad():
        exported = stock(input_ids=ids).logits.float()
    merged_model = asymlora.merge_task(pm, "b")
    assert merged_model.model.layers[0].self_attn.q_proj.weight.dtype == dtype
    with torch.no_grad():
        merged = merged_model(input_ids=ids).logits.float()
    for name, out in (("exported", exported), ("merged", merged)):
        gap = (out - ref).abs().max()
        assert gap < tol and between_tasks > 10 * gap, (name, gap, between_tasks)


@pytest.mark.parametrize(("has_bf16", "warned"), [(False, 1), (True, 0), (None, 0)])
def test_bf16_autocast_warns_once_on_a_cpu_that_emulates_it(monkeypatch, caplog, has_bf16, warned) -> None:
    """An AMD EPYC with AVX2 only ran the federated campaign's bf16 steps several times slower than float32
    (2026-12-02); the run gave no hint. Now one warning per process naming the fix; none on a CPU with
    AVX512-BF16 / AMX, none when torch cannot tell, none for float32 or a CUDA device."""
    from asymlora.train import precision

    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: has_bf16)
    precision._warn_if_emulated.cache_clear()
    with caplog.at_level("WARNING", logger="asymlora.train.precision"):
        for _ in range(3):
            with precision.autocast("cpu", torch.bfloat16):
                pass
        precision.autocast("cpu", None)
        precision.autocast("cuda", torch.bfloat16)  # a context manager, not entered: CUDA is not needed
    messages = [r.getMessage() for r in caplog.records if r.name == "asymlora.train.precision"]
    assert len(messages) == warned
    if warned:
        assert "train.mixed_precision=null" in messages[0] and "AVX512-BF16 or AMX" in messages[0]
    precision._warn_if_emulated.cache_clear()
