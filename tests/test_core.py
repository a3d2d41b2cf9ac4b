"""Core adapters: fused math vs a loop over experts, peft integration, routing, merge and export."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from tests.conftest import make_tiny_llama
from torch import nn

import asymlora
from asymlora import AsymLoraConfig
from asymlora.routing import RoutingCall, RoutingState
from asymlora.tuner.layer import Linear

METHODS = ["lora", "alora", "hydralora", "molora", "malora"]
ROUTERS = ["soft", "topk", "task"]
D_IN, D_OUT = 24, 20


# --- the reference: a plain loop over experts, the released code's algorithm -------------------------
def reference_gate(x: torch.Tensor, w: torch.Tensor | None, cfg: AsymLoraConfig, task_ids) -> torch.Tensor:
    if cfg.router == "task":
        gate = torch.zeros(*x.shape[:-1], cfg.num_experts, dtype=x.dtype)
        for row, t in enumerate(task_ids.tolist()):
            gate[row, ..., t] = 1.0
        return gate
    probs = torch.softmax(x @ w.T, dim=-1)
    if cfg.router == "soft":
        return probs
    kth = probs.sort(dim=-1, descending=True).values[..., cfg.top_k - 1 : cfg.top_k]
    kept = torch.where(probs >= kth, probs, torch.zeros_like(probs))
    return kept / kept.sum(-1, keepdim=True)


def reference_delta(method: str, t: dict[str, torch.Tensor], x: torch.Tensor, gate) -> torch.Tensor:
    if method == "lora":
        return x @ t["A"].T @ t["B"].T
    out = 0
    for i in range(gate.shape[-1]):
        g = gate[..., i : i + 1]
        if method == "alora":
            out = out + g * (x @ t["A"][i].T @ t["B"].T)
        elif method == "hydralora":
            out = out + g * (x @ t["A"].T @ t["B"][i].T)
        elif method == "molora":
            out = out + g * (x @ t["A"][i].T @ t["B"][i].T)
        elif method == "malora":
            out = out + g * (x @ t["S"].T @ t["A"][i].T @ t["B"][i].T)
    return out


def make_layer(method: str, router: str, **kw) -> tuple[Linear, RoutingState]:
    torch.manual_seed(0)
    cfg = AsymLoraConfig(
        method=method, router=router, r=4, num_experts=3, top_k=2, target_modules=["x"], **kw
    )
    state = RoutingState()
    layer = Linear(nn.Linear(D_IN, D_OUT, dtype=torch.float64), "default", cfg, state).double()
    with torch.no_grad():  # random B too, so the test is not trivially zero
        for p in layer.tensors("default").values():
            p.normal_()
    return layer, state


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("method", METHODS)
def test_fused_matches_loop_values_and_gradients(method: str, router: str) -> None:
    layer, state = make_layer(method, router)
    cfg = layer.asymlora_config["default"]
    x = torch.randn(3, 5, D_IN, dtype=torch.float64, requires_grad=True)
    task_ids = torch.tensor([2, 0, 1])
    state.call = RoutingCall(task_ids=task_ids)
    w_out = torch.randn(3, 5, D_OUT, dtype=torch.float64)

    y = layer(x)
    (y * w_out).sum().backward()
    fused_grads = {k: v.grad.clone() for k, v in layer.tensors("default").items()}
    fused_x_grad = x.grad.clone()

    t = {k: v.detach().clone().requires_grad_(True) for k, v in layer.tensors("default").items()}
    x2 = x.detach().clone().requires_grad_(True)
    gate = None if method == "lora" else reference_gate(x2, t.get("router"), cfg, task_ids)
    y_ref = (
        x2 @ layer.base_layer.weight.T
        + layer.base_layer.bias
        + cfg.scaling * reference_delta(method, t, x2, gate)
    )
    (y_ref * w_out).sum().backward()

    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fused_x_grad, x2.grad, rtol=1e-10, atol=1e-10)
    for k, g in fused_grads.items():
        torch.testing.assert_close(g, t[k].grad, rtol=1e-10, atol=1e-10, msg=f"gradient of {k}")


def test_topk_keeps_k_experts_and_sums_to_one() -> None:
    from asymlora.routing import topk_gate

    probs = torch.softmax(torch.randn(4, 7, 5), -1)
    gate = topk_gate(probs, 2)
    assert ((gate > 0).sum(-1) == 2).all()
    torch.testing.assert_close(gate.sum(-1), torch.ones(4, 7))


def test_alora_experts_have_independent_inits() -> None:
    layer, _ = make_layer("alora", "soft")
    cfg = layer.asymlora_config["default"]
    fresh = Linear(nn.Linear(D_IN, D_OUT), "default", cfg, RoutingState())
    a = fresh.asymlora_A["default"]
    assert not torch.allclose(a[0], a[1])
    bound = 1 / D_IN**0.5  # Kaiming-uniform a=√5 with the fan-in of one expert
    assert a.abs().max() <= bound and a.abs().max() > 0.5 * bound
    assert torch.count_nonzero(fresh.asymlora_B["default"]) == 0


def test_malora_init_is_cropped_svd_with_beta() -> None:
    torch.manual_seed(0)
    cfg = AsymLoraConfig(method="malora", r=8, num_experts=8, beta=1.25, target_modules=["x"])
    assert (cfg.malora_subspace_rank, cfg.malora_expert_rank) == (32, 12)  # the paper's d_sub, r̂
    layer = Linear(nn.Linear(64, 48), "default", cfg, RoutingState())
    s, p = layer.asymlora_S["default"], layer.asymlora_A["default"]
    assert s.shape == (32, 64) and p.shape == (8, 12, 32)
    # S_A = β·V: its rows are orthogonal with norm β
    torch.testing.assert_close(s @ s.T, 1.25**2 * torch.eye(32), atol=1e-5, rtol=1e-5)


# --- parameter counts (docs/design.md §3) ---------------------------------------------------------------
def expected_params(method: str, r: int, n: int, d_in: int, d_out: int, d_sub: int, r_hat: int) -> int:
    return {
        "lora": r * (d_in + d_out),
        "alora": n * r * d_in + r * d_out + n * d_in,
        "hydralora": r * d_in + n * r * d_out + n * d_in,
        "molora": n * r * (d_in + d_out) + n * d_in,
        "malora": d_sub * d_in + n * (r_hat * d_sub + d_out * r_hat) + n * d_in,
    }[method]


@pytest.mark.parametrize("method", METHODS)
def test_parameter_counts_match_design(method: str) -> None:
    model = make_tiny_llama()
    cfg = AsymLoraConfig(method=method, r=4, num_experts=3, target_modules=["q_proj", "o_proj"])
    pm = peft.get_peft_model(model, cfg)
    hidden, layers = 32, 2
    per_layer = expected_params(
        method, 4, 3, hidden, hidden, cfg.malora_subspace_rank, cfg.malora_expert_rank
    )
    assert asymlora.count_parameters(pm)["total"] == 2 * layers * per_layer
    trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert trainable == 2 * layers * per_layer


def test_roles_are_declared_by_methods() -> None:
    pm = peft.get_peft_model(make_tiny_llama(), AsymLoraConfig(method="alora", target_modules=["q_proj"]))
    a = asymlora.parameters_by_role(pm, "A")
    b = asymlora.parameters_by_role(pm, asymlora.Role.B)
    router = asymlora.parameters_by_role(pm, "router")
    assert len(a) == len(b) == len(router) == 2
    assert all(p.shape[0] == 3 for p in a.values())  # N stacked A's
    named = dict(pm.named_parameters())
    assert all(named[k] is p for k, p in {**a, **b, **router}.items())


# --- the model-level behaviour -----------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("router", ["soft", "task"])
def test_adapted_model_starts_equal_to_base(method: str, router: str) -> None:
    base = make_tiny_llama()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = base(input_ids=ids).logits
    pm = peft.get_peft_model(
        base, AsymLoraConfig(method=method, router=router, target_modules=["q_proj", "v_proj"])
    )
    with torch.no_grad():
        out = pm(input_ids=ids, task_ids=torch.tensor([0, 1])).logits
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("method", METHODS)
def test_few_steps_lower_the_loss(method: str) -> None:
    torch.manual_seed(0)
    pm = peft.get_peft_model(
        make_tiny_llama(),
        AsymLoraConfig(method=method, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]),
    )
    pm.train()
    ids = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(2))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = pm(input_ids=ids, labels=ids, task_ids=torch.tensor([0, 1, 2, 0])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


def test_task_routing_sends_each_example_to_its_expert() -> None:
    torch.manual_seed(0)
    cfg = AsymLoraConfig(method="alora", router="task", num_experts=3, target_modules=["q_proj", "v_proj"])
    pm = peft.get_peft_model(make_tiny_llama(), cfg)
    with torch.no_grad():
        for p in asymlora.parameters_by_role(pm, "B").values():
            p.normal_(std=0.5)
    ids = torch.randint(0, 128, (3, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        mixed = pm(input_ids=ids, task_ids=torch.tensor([2, 0, 1])).logits
        for row, task in enumerate([2, 0, 1]):
            alone = pm(input_ids=ids[row : row + 1], task_ids=torch.tensor([task])).logits
            torch.testing.assert_close(mixed[row : row + 1], alone, rtol=1e-4, atol=1e-5)
        other = pm(input_ids=ids[:1], task_ids=torch.tensor([1])).logits
    assert not torch.allclose(other, mixed[:1])


def test_generate_with_task_ids_and_several_sequences() -> None:
    cfg = AsymLoraConfig(method="alora", router="task", num_experts=2, target_modules=["q_proj"])
    pm = peft.get_peft_model(make_tiny_llama(), cfg)
    ids = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(4))
    out = pm.generate(input_ids=ids, task_ids=torch.tensor([0, 1]), max_new_tokens=4, do_sample=False)
    assert out.shape == (2, 9)
    out = pm.generate(
        input_ids=ids, task_ids=torch.tensor([0, 1]), max_new_tokens=3, num_beams=2, num_return_sequences=2
    )
    assert out.shape[0] == 4
    with pytest.raises(ValueError, match="no task_ids"):
        pm.generate(input_ids=ids, max_new_tokens=2)


def test_balance_loss_reaches_the_training_loss() -> None:
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(5))
    losses = {}
    for weight in (0.0, 0.5):
        torch.manual_seed(0)
        cfg = AsymLoraConfig(method="molora", balance_loss_weight=weight, target_modules=["q_proj"])
        out = peft.get_peft_model(make_tiny_llama(), cfg)(input_ids=ids, labels=ids)
        losses[weight] = out
    assert "balance_loss" not in losses[0.0]
    aux = losses[0.5]["balance_loss"]
    assert 0.5 * 1.0 <= aux <= 0.5 * 3.0  # N·Σ f_i P_i lies in [1, N], times the weight
    torch.testing.assert_close(losses[0.5].loss, losses[0.0].loss + aux)


def test_disable_and_switch_adapters() -> None:
    torch.manual_seed(0)
    base = make_tiny_llama()
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = base(input_ids=ids).logits
    pm = peft.get_peft_model(base, AsymLoraConfig(method="alora", target_modules=["q_proj"]))
    pm.add_adapter("hydra", AsymLoraConfig(method="hydralora", target_modules=["q_proj"]))
    for name in ("default", "hydra"):
        pm.set_adapter(name)
        with torch.no_grad():
            for p in asymlora.parameters_by_role(pm, "B", adapter_name=name).values():
                p.normal_()
    with torch.no_grad():
        pm.set_adapter("default")
        out_default = pm(input_ids=ids).logits
        pm.set_adapter("hydra")
        out_hydra = pm(input_ids=ids).logits
        with pm.disable_adapter():
            torch.testing.assert_close(pm(input_ids=ids).logits, ref)
    assert not torch.allclose(out_default, out_hydra)
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(".hydra" in n for n in trainable)


def test_save_and_reload_gives_identical_logits(tmp_path) -> None:
    torch.manual_seed(0)
    cfg = AsymLoraConfig(method="malora", router="topk", num_experts=4, target_modules=["q_proj", "o_proj"])
    pm = peft.get_peft_model(make_tiny_llama(), cfg)
    with torch.no_grad():
        for p in asymlora.parameters_by_role(pm, "B").values():
            p.normal_()
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = pm(input_ids=ids).logits
    pm.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ASYMLORA" and saved["method"] == "malora"
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert all(".asymlora_" in k and ".default" not in k for k in keys)

    loaded = peft.PeftModel.from_pretrained(make_tiny_llama(), tmp_path)
    assert isinstance(loaded, asymlora.AsymLoraModelForCausalLM)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, ref)


# --- merge and export ----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["alora", "hydralora", "molora", "malora"])
def test_merge_task_equals_routed_model(method: str) -> None:
    torch.manual_seed(0)
    cfg = AsymLoraConfig(method=method, router="task", num_experts=3, target_modules=["q_proj", "v_proj"])
    pm = peft.get_peft_model(make_tiny_llama(), cfg)
    with torch.no_grad():
        for p in asymlora.parameters_by_role(pm, "B").values():
            p.normal_(std=0.3)
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        ref = pm(input_ids=ids, task_ids=torch.tensor([1, 1])).logits
    merged = asymlora.merge_task(pm, 1)
    assert not any(isinstance(m, asymlora.tuner.AsymLoraLayer) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, ref, rtol=1e-4, atol=1e-4)


EXPORT_CHECK = textwrap.dedent(
    """
    import sys
    import peft, torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(sys.argv[1])
    model = peft.PeftModel.from_pretrained(base, sys.argv[2])
    assert type(model).__name__ == "PeftModelForCausalLM", type(model)
    ids = load_file(sys.argv[3])["ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert not any(m.startswith("asymlora") for m in sys.modules), "asymlora was imported"
    save_file({"logits": logits.contiguous()}, sys.argv[4])
    """
)


@pytest.mark.parametrize("method", ["alora", "malora"])
def test_export_loads_in_stock_peft_without_asymlora(tmp_path, method: str) -> None:
    torch.manual_seed(0)
    base = make_tiny_llama()
    base.save_pretrained(tmp_path / "base")
    cfg = AsymLoraConfig(
        method=method,
        router="task",
        num_experts=2,
        task_names=["sst", "qa"],
        target_modules=["q_proj", "v_proj"],
    )
    pm = peft.get_peft_model(base, cfg)
    with torch.no_grad():
        for p in asymlora.parameters_by_role(pm, "B").values():
            p.normal_(std=0.3)
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref = pm(input_ids=ids, task_ids=torch.tensor([1, 1])).logits
    asymlora.export_task_adapter(pm, "qa", tmp_path / "qa")
    exported = json.loads((tmp_path / "qa" / "adapter_config.json").read_text())
    assert exported["peft_type"] == "LORA"
    save_file({"ids": ids}, tmp_path / "ids.safetensors")
    proc = subprocess.run(
        [sys.executable, "-c", EXPORT_CHECK, str(tmp_path / "base"), str(tmp_path / "qa"),
         str(tmp_path / "ids.safetensors"), str(tmp_path / "out.safetensors")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.testing.assert_close(load_file(tmp_path / "out.safetensors")["logits"], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("router", ["soft", "topk"])
def test_merge_and_export_refuse_learned_routing(tmp_path, router: str) -> None:
    pm = peft.get_peft_model(
        make_tiny_llama(), AsymLoraConfig(method="alora", router=router, target_modules=["q_proj"])
    )
    with pytest.raises(ValueError, match="mixed per token"):
        asymlora.merge_task(pm, 0)
    with pytest.raises(ValueError, match="mixed per token"):
        asymlora.export_task_adapter(pm, 0, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="merge_task"):
        pm.merge_and_unload()


def test_plain_lora_merges_through_peft() -> None:
    torch.manual_seed(0)
    pm = peft.get_peft_model(make_tiny_llama(), AsymLoraConfig(method="lora", target_modules=["q_proj"]))
    with torch.no_grad():
        for p in asymlora.parameters_by_role(pm, "B").values():
            p.normal_(std=0.3)
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        ref = pm(input_ids=ids).logits
        merged = pm.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, ref, rtol=1e-4, atol=1e-4)


# --- bad input --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "alora2"}, "method='alora2'.*choose one of"),
        ({"router": "hash"}, "router='hash'"),
        ({"r": 0}, "r=0"),
        ({"num_experts": 0}, "num_experts=0"),
        ({"router": "topk", "top_k": 4, "num_experts": 3}, "top_k=4"),
        ({"router": "topk", "top_k": 1, "num_experts": 3}, "top_k=1.*no gradient.*top_k >= 2"),
        ({"lora_dropout": 1.5}, "lora_dropout"),
        # NaN passed the `<= 0` test: a federated run's clients all failed with a NaN loss in round 1
        ({"lora_alpha": math.nan}, r"lora_alpha=nan is invalid: use a finite positive number"),
        ({"lora_alpha": math.inf}, r"lora_alpha=inf is invalid"),
        ({"lora_alpha": 0.0}, r"lora_alpha=0.0 is invalid"),
        ({"balance_loss_weight": math.nan}, r"balance_loss_weight=nan is invalid: use a finite weight >= 0"),
        ({"method": "malora", "beta": math.nan}, r"beta=nan is invalid: use a finite positive number"),
        ({"router": "task", "balance_loss_weight": 0.1}, "nothing to balance"),
        ({"method": "malora", "subspace_rank": 100, "r": 2, "num_experts": 2}, "subspace_rank"),
    ],
)
def test_bad_config_values_are_named(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        AsymLoraConfig(target_modules=["q_proj"], **kwargs)


def test_top1_renormalised_gate_is_constant_which_is_why_top_k_1_is_refused() -> None:
    """top_k=1 is refused because the router would learn nothing from the loss: d gate / d logits = 0."""
    from asymlora.routing import topk_gate

    logits = torch.tensor([[0.3, -1.2, 2.0]], requires_grad=True)
    for k, dead in ((1, True), (2, False)):
        (grad,) = torch.autograd.grad(
            (topk_gate(logits.softmax(-1), k) * torch.tensor([1.0, 2.0, 3.0])).sum(), logits
        )
        assert bool(grad.abs().max() == 0) is dead, (k, grad)
    AsymLoraConfig(
        target_modules=["q_proj"], router="topk", top_k=1, num_experts=1
    )  # one expert: nothing to route
    AsymLoraConfig(
        target_modules=["q_proj"], method="lora", router="topk", top_k=1
    )  # lora ignores the router


def test_target_modules_that_match_nothing_list_the_model_linears() -> None:
    model = make_tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"match no module.*q_proj"):
        peft.get_peft_model(model, AsymLoraConfig(target_modules=["query"]))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_task_ids_out_of_range_and_missing() -> None:
    pm = peft.get_peft_model(
        make_tiny_llama(),
        AsymLoraConfig(method="alora", router="task", num_experts=2, target_modules=["q_proj"]),
    )
    ids = torch.randint(0, 128, (2, 5))
    with pytest.raises(ValueError, match=r"task id 2 is outside \[0, 2\)"):
        pm(input_ids=ids, task_ids=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="no task_ids"):
        pm(input_ids=ids)
    with pytest.raises(ValueError, match="one task id per example"):
        pm(input_ids=ids, task_ids=torch.tensor([0, 1, 1]))


def test_loading_onto_a_model_of_other_shapes_is_refused(tmp_path) -> None:
    pm = peft.get_peft_model(make_tiny_llama(), AsymLoraConfig(method="alora", target_modules=["q_proj"]))
    pm.save_pretrained(tmp_path)
    other = make_tiny_llama(hidden=48)
    with pytest.raises(ValueError, match="does not fit this model"):
        peft.PeftModel.from_pretrained(other, tmp_path)


def test_corrupted_adapter_file_is_refused(tmp_path) -> None:
    pm = peft.get_peft_model(make_tiny_llama(), AsymLoraConfig(method="alora", target_modules=["q_proj"]))
    pm.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupted or truncated"):
        peft.PeftModel.from_pretrained(make_tiny_llama(), tmp_path)


def test_registration_is_in_place() -> None:
    from asymlora.peft_integration import is_registered

    assert is_registered()
    assert peft.__version__.startswith("0.21.")
    cfg = peft.PeftConfig.from_peft_type(**AsymLoraConfig(target_modules=["q_proj"]).to_dict())
    assert isinstance(cfg, AsymLoraConfig) and cfg.task_type == asymlora.tuner.TASK_TYPE


def test_float32_gate_under_bfloat16() -> None:
    from asymlora.routing import router_probs

    layer, _ = make_layer("alora", "soft")
    layer = layer.to(torch.bfloat16)
    x = torch.randn(2, 3, D_IN, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    probs = router_probs(x, layer.asymlora_router["default"])
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3))


@pytest.mark.parametrize("method", ["alora", "hydralora", "molora", "malora"])
def test_router_fused_into_first_product_equals_separate_router(method: str) -> None:
    layer, _ = make_layer(method, "topk", lora_dropout=0.5)
    x = torch.randn(2, 4, D_IN, dtype=torch.float64)
    layer.eval()  # dropout inactive: the router's product is stacked under the A product
    fused = layer(x)
    layer.train()
    layer.asymlora_dropout["default"].p = 0.0  # dropout module active but the identity: separate products
    separate = layer(x)
    torch.testing.assert_close(fused, separate, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["alora", "hydralora", "molora", "malora"])
def test_mixing_methods_refuse_a_missing_gate(method: str) -> None:
    """A method that mixes experts needs the router's gate: None is refused by name, not a TypeError deep inside."""
    cfg = AsymLoraConfig(method=method, r=2, num_experts=2, target_modules=["q_proj"])
    m = asymlora.get_method(method)
    t = {name: torch.randn(spec.shape) for name, spec in m.specs(cfg, 8, 6).items()}
    m.init_(t, cfg)
    with pytest.raises(ValueError, match=f"method '{method}' mixes its experts"):
        m.delta(torch.randn(3, 8), t, None)


def test_method_config_protocol_is_all_methods_read() -> None:
    """Methods depend on MethodConfig only: a plain object with its six fields lays out every method."""
    cfg = AsymLoraConfig(method="malora", r=4, num_experts=2, target_modules=["q_proj"])
    plain = SimpleNamespace(r=4, num_experts=2, intermediate_rank=16, beta=1.0,
                            malora_subspace_rank=cfg.malora_subspace_rank, malora_expert_rank=cfg.malora_expert_rank)  # fmt: skip
    for name, method in asymlora.METHODS.items():
        shapes = {k: s.shape for k, s in method.specs(plain, 8, 6).items()}
        assert shapes == {k: s.shape for k, s in method.specs(cfg, 8, 6).items()}, name


@pytest.mark.parametrize("modules", [[], [""], ["q_proj", " "]])
def test_target_modules_that_name_no_module_are_refused(modules: list[str]) -> None:
    """An empty list or an empty name (``adapter.target_modules=`` on the command line) adapts nothing: refused
    with the value and the fix, before a model is touched."""
    with pytest.raises(ValueError, match=r"names no module: give module names such as"):
        AsymLoraConfig(method="alora", target_modules=modules)
