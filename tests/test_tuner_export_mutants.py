"""The peft tuner layer (`asymlora.tuner.layer`) and the export to plain LoRA (`asymlora.export`) on hand values.

Mutation tests (docs/testing.md, "Mutation results: `tuner/layer.py` and `export.py`"): tiny hand-built layers
(d_in = 3, d_out = 2) with chosen weights; every expected value is worked out in the comments, never computed by
the code under test. The shared example:

    W0 = [[1, 0, 2], [0, 1, -1]]   b = (0.5, -0.5)          (nn.Linear: d_out × d_in; Conv1D stores W0ᵀ)

plain LoRA, r = 2, alpha = 6, so s = alpha / r = 3 (r / alpha = 1/3 and alpha · r = 18 would differ):

    A = [[1, 2, 0], [0, 1, 1]]     B = [[1, 0], [2, -1]]
    B A = [[1, 2, 0], [2, 3, -1]]  ΔW = s · B A = [[3, 6, 0], [6, 9, -3]]

    x1 = (1, 1, 1):   W0 x1 + b = (3.5, -0.5),  ΔW x1 = (9, 12)  ->  y = (12.5, 11.5)
    x2 = (1, 0, -1):  W0 x2 + b = (-0.5, 0.5),  ΔW x2 = (3, 9)   ->  y = (2.5, 9.5)

ALoRA with N = 2 experts, r = 1, alpha = 2 (s = 2), one shared B:

    A_0 = [[1, 0, 0]]   A_1 = [[0, 1, 0]]   B = [[1], [2]]
    ΔW_0 = s · B A_0 = [[2, 0, 0], [4, 0, 0]]     ΔW_1 = s · B A_1 = [[0, 2, 0], [0, 4, 0]]

    xa = (1, 2, 3):   W0 xa + b = (7.5, -1.5);  task 0: + (2, 4) = (9.5, 2.5);   task 1: + (4, 8) = (11.5, 6.5)
    xb = (2, -1, 0):  W0 xb + b = (2.5, -1.5);  task 0: + (4, 8) = (6.5, 6.5);   task 1: + (-2, -4) = (0.5, -5.5)
"""

from __future__ import annotations

import json
import math
import os
import types
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import asymlora
from asymlora import AsymLoraConfig
from asymlora.export import _dequantized_linear, _float_dtype
from asymlora.routing import RoutingCall, RoutingState, routing
from asymlora.tuner.layer import Linear, in_out_features

W0 = [[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]]
BIAS = [0.5, -0.5]
LORA_A = [[1.0, 2.0, 0.0], [0.0, 1.0, 1.0]]
LORA_B = [[1.0, 0.0], [2.0, -1.0]]
DELTA = [[3.0, 6.0, 0.0], [6.0, 9.0, -3.0]]  # s · B A, s = 3
X12 = [[1.0, 1.0, 1.0], [1.0, 0.0, -1.0]]
Y12 = [[12.5, 11.5], [2.5, 9.5]]  # W0 x + b + ΔW x
BASE12 = [[3.5, -0.5], [-0.5, 0.5]]  # W0 x + b
ALORA_A = [[[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]]]
ALORA_B = [[1.0], [2.0]]
XA, XB = [1.0, 2.0, 3.0], [2.0, -1.0, 0.0]
TASKS = {  # (x, task) -> y, from the module docstring
    (0, 0): [9.5, 2.5],
    (0, 1): [11.5, 6.5],
    (1, 0): [6.5, 6.5],
    (1, 1): [0.5, -5.5],
}
NO_TASK_IDS = (
    "adapter 'default' uses router='task' but no task_ids were given: call model(..., task_ids=LongTensor[batch]) "
    "(or model.generate(..., task_ids=...)); with transformers' Trainer or TRL's SFTTrainer use "
    "asymlora.hf.AsymLoraTrainer / AsymLoraSFTTrainer and a task column."
)


def assert_reported_at_the_call(w: warnings.WarningMessage) -> None:
    """The warning names the caller's line (here), not a frame inside asymlora or torch's ``no_grad`` wrapper.

    Not checked under mutmut (``MUTANT_UNDER_TEST`` set), whose trampoline adds a frame to every mutated call."""
    if "MUTANT_UNDER_TEST" not in os.environ:
        assert w.filename == __file__


def t(values, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def base_linear(dtype=torch.float32, conv1d: bool = False, bias: bool = True) -> nn.Module:
    """W0 and b above as an nn.Linear(3, 2), or as GPT-2's Conv1D(nf=2, nx=3) holding W0ᵀ."""
    if conv1d:
        base = Conv1D(2, 3)
        with torch.no_grad():
            base.weight.copy_(t(W0).T)
            base.bias.copy_(t(BIAS))
        return base.to(dtype)
    base = nn.Linear(3, 2, bias=bias)
    with torch.no_grad():
        base.weight.copy_(t(W0))
        if bias:
            base.bias.copy_(t(BIAS))
    return base.to(dtype)


def set_tensors(layer: Linear, name: str = "default", **values) -> None:
    with torch.no_grad():
        for key, value in values.items():
            param = getattr(layer, "asymlora_" + key)[name]
            param.copy_(t(value, param.dtype))


def lora_layer(dtype=torch.float32, conv1d: bool = False, **cfg) -> Linear:
    """Plain LoRA with r = 2, alpha = 6 (s = 3) and the A, B of the module docstring."""
    config = AsymLoraConfig(method="lora", r=2, lora_alpha=6, **cfg)
    layer = Linear(base_linear(dtype, conv1d), "default", config, RoutingState())
    set_tensors(layer, A=LORA_A, B=LORA_B)
    return layer


def alora_layer(router: str = "task", num_experts: int = 2, dtype=torch.float32, **cfg) -> Linear:
    """ALoRA with r = 1, alpha = 2 (s = 2), A_0, A_1 (and A_2 = [[0, 0, 1]] for N = 3), B = [[1], [2]]."""
    config = AsymLoraConfig(method="alora", r=1, lora_alpha=2, num_experts=num_experts, router=router, **cfg)
    layer = Linear(base_linear(dtype), "default", config, RoutingState())
    a = [*ALORA_A, [[0.0, 0.0, 1.0]]][:num_experts]
    set_tensors(layer, A=a, B=ALORA_B)
    return layer


# --- the forward ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("conv1d", [False, True])
def test_lora_forward_is_w0x_plus_b_plus_alpha_over_r_times_bax(conv1d: bool) -> None:
    layer = lora_layer(conv1d=conv1d)
    assert layer.fan_in_fan_out is conv1d and (layer.in_features, layer.out_features) == (3, 2)
    assert layer(t(X12)).tolist() == Y12
    assert layer(t([X12])).tolist() == [Y12]  # (batch, seq, d_in)
    layer.enable_adapters(False)  # peft's disable_adapters: the base layer alone
    assert layer(t(X12)).tolist() == BASE12
    layer.enable_adapters(True)
    assert layer(t(X12)).tolist() == Y12


def test_float64_adapter_on_a_float32_base_adds_s_delta_cast_back_to_float32() -> None:
    # peft's autocast_adapter_dtype keeps adapters wider than a 16-bit base: the update is computed in the
    # adapter's dtype, scaled by s = 3 and cast to the base output's dtype (the branch without torch.add)
    layer = lora_layer()
    for key, value in (("A", LORA_A), ("B", LORA_B)):
        getattr(layer, "asymlora_" + key)["default"] = nn.Parameter(t(value, torch.float64))
    y = layer(t(X12))
    assert y.dtype == torch.float32 and y.tolist() == Y12


def test_two_active_adapters_add_both_updates_and_merge_by_name() -> None:
    # second adapter: r = 1, alpha = 1 (s = 1), A = [[0, 0, 1]], B = [[1], [1]] -> ΔW_o = [[0, 0, 1], [0, 0, 1]]
    layer = lora_layer()
    layer.update_layer("other", AsymLoraConfig(method="lora", r=1, lora_alpha=1))
    set_tensors(layer, "other", A=[[0.0, 0.0, 1.0]], B=[[1.0], [1.0]])
    assert layer.active_adapters == ["default"]
    layer.set_adapter(["default", "other"])
    # ΔW_o x1 = (1, 1), ΔW_o x2 = (-1, -1)
    assert layer(t(X12)).tolist() == [[13.5, 12.5], [1.5, 8.5]]
    layer.merge(adapter_names=["other"])  # only the named adapter: W0 + ΔW_o = [[1, 0, 3], [0, 1, 0]]
    assert layer.base_layer.weight.tolist() == [[1.0, 0.0, 3.0], [0.0, 1.0, 0.0]]
    assert layer.merged_adapters == ["other"]
    layer.unmerge()
    layer.merge(adapter_names=["default", "other"])  # W0 + ΔW + ΔW_o
    assert layer.base_layer.weight.tolist() == [[4.0, 6.0, 3.0], [6.0, 10.0, -3.0]]
    assert layer.merged_adapters == ["default", "other"]
    layer.unmerge()  # both popped
    assert layer.base_layer.weight.tolist() == W0 and layer.merged_adapters == []


@pytest.mark.parametrize("conv1d", [False, True])
def test_merge_adds_s_ba_in_the_weight_layout_and_unmerge_restores_w0(conv1d: bool) -> None:
    layer = lora_layer(conv1d=conv1d)
    assert layer.get_delta_weight("default").tolist() == DELTA  # d_out × d_in whatever the layout
    layer.merge()
    merged = [[4.0, 6.0, 2.0], [6.0, 10.0, -4.0]]  # W0 + ΔW
    weight = layer.base_layer.weight
    assert weight.tolist() == (t(merged).T.tolist() if conv1d else merged)
    assert layer.merged_adapters == ["default"] and layer.merged
    assert layer(t(X12)).tolist() == Y12  # (W0 + ΔW) x + b: the update is not added a second time
    layer.unmerge()
    assert weight.tolist() == (t(W0).T.tolist() if conv1d else W0) and layer.merged_adapters == []
    assert layer(t(X12)).tolist() == Y12
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer.unmerge()
    [w] = caught
    assert str(w.message) == "Already unmerged. Nothing to do."
    assert_reported_at_the_call(w)


def test_merge_into_a_bfloat16_base_keeps_its_dtype() -> None:
    layer = lora_layer(torch.bfloat16)
    layer.merge()
    weight = layer.base_layer.weight
    assert weight.dtype == torch.bfloat16 and weight.float().tolist() == [[4.0, 6.0, 2.0], [6.0, 10.0, -4.0]]
    layer.unmerge()
    assert weight.dtype == torch.bfloat16 and weight.float().tolist() == W0


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_safe_merge_refuses_a_non_finite_update_and_writes_nothing(bad: float) -> None:
    layer = lora_layer()
    set_tensors(layer, B=[[bad, 0.0], [2.0, -1.0]])
    with pytest.raises(ValueError) as err:
        layer.merge(safe_merge=True)
    assert str(err.value) == "NaNs detected in the merged weights of adapter 'default'"
    assert layer.base_layer.weight.tolist() == W0 and layer.merged_adapters == []
    set_tensors(layer, B=LORA_B)
    layer.merge(safe_merge=True)
    assert layer.base_layer.weight.tolist() == [[4.0, 6.0, 2.0], [6.0, 10.0, -4.0]]


def test_routed_adapter_has_no_single_delta_weight() -> None:
    layer = alora_layer()
    message = (
        "adapter 'default' (alora, router='task') has no single weight update: its experts are mixed per token. "
        "With router='task' merge one task with asymlora.merge_task(model, task); soft/topk routing cannot be "
        "merged."
    )
    for call in (lambda: layer.get_delta_weight("default"), layer.merge):
        with pytest.raises(ValueError) as err:
            call()
        assert str(err.value) == message
    assert layer.base_layer.weight.tolist() == W0


def test_task_delta_weight_is_s_b_a_of_each_task_in_float32_or_float64() -> None:
    layer = alora_layer()
    assert layer.task_delta_weight("default", 0).tolist() == [[2.0, 0.0, 0.0], [4.0, 0.0, 0.0]]
    assert layer.task_delta_weight("default", 1).tolist() == [[0.0, 2.0, 0.0], [0.0, 4.0, 0.0]]
    assert alora_layer(dtype=torch.float64).task_delta_weight("default", 1).dtype == torch.float64
    # bf16 LoRA, s = 3, A = [[1, 0, 0], [2^-8, 0, 0]], B = [[1, 1], [0, 0]]: (B A)[0, 0] = 1 + 2^-8, exact in
    # float32; in bfloat16 (8 significant bits) it is a tie that rounds to 1. So ΔW[0, 0] = 3.01171875, not 3.
    layer = lora_layer(torch.bfloat16)
    set_tensors(layer, A=[[1.0, 0.0, 0.0], [2.0**-8, 0.0, 0.0]], B=[[1.0, 1.0], [0.0, 0.0]])
    delta = layer.task_delta_weight("default", 0)
    assert delta.dtype == torch.float32 and delta.tolist() == [[3.01171875, 0.0, 0.0], [0.0, 0.0, 0.0]]


# --- per-row task routing -----------------------------------------------------------------------------------


def run(layer: Linear, x: torch.Tensor, **call) -> torch.Tensor:
    with routing(layer.routing_state, RoutingCall(**call)):
        return layer(x)


def test_task_routing_sends_each_row_through_its_own_expert() -> None:
    layer = alora_layer()
    x = t([[XA], [XB], [XA]])  # (batch 3, seq 1, d_in)
    mixed = run(layer, x, task_ids=torch.tensor([0, 1, 1]))
    assert mixed.tolist() == [[TASKS[0, 0]], [TASKS[1, 1]], [TASKS[0, 1]]]
    uniform = run(layer, x, task_ids=torch.tensor([1, 1, 1]))  # one task: the task_delta path
    assert uniform.tolist() == [[TASKS[0, 1]], [TASKS[1, 1]], [TASKS[0, 1]]]
    # OPT's MLP sees (batch · seq, d_in): one id per example repeated over its rows
    flat = run(layer, t([XA, XB, XB, XA]), task_ids=torch.tensor([0, 1]))
    assert flat.tolist() == [TASKS[0, 0], TASKS[1, 0], TASKS[1, 1], TASKS[0, 1]]


def test_task_routing_without_task_ids_or_batch_axis_is_refused_with_whole_messages() -> None:
    layer = alora_layer()
    with pytest.raises(ValueError) as err:
        layer(t([[XA]]))
    assert str(err.value) == NO_TASK_IDS
    with pytest.raises(ValueError) as err:
        run(layer, t([[XA]]), task_ids=None)
    assert str(err.value) == NO_TASK_IDS
    for call in ({}, {"task_ids": torch.tensor([0])}):
        with pytest.raises(ValueError) as err:
            run(layer, t(XA), **call)
        assert str(err.value) == "task routing needs a batched input (batch, ..., features)"


def test_task_gate_is_one_hot_per_row_and_needs_task_ids() -> None:
    layer = alora_layer()
    with routing(layer.routing_state, RoutingCall(task_ids=torch.tensor([0, 1, 1]))):
        assert layer.gate("default", torch.ones(3, 1, 3)).tolist() == [
            [[1.0, 0.0]],
            [[0.0, 1.0]],
            [[0.0, 1.0]],
        ]
    with routing(layer.routing_state, RoutingCall(task_ids=torch.tensor([1, 0]))):  # flat (batch · seq, d)
        assert layer.gate("default", torch.ones(4, 3)).tolist() == [[0, 1], [0, 1], [1, 0], [1, 0]]
    with pytest.raises(ValueError) as err:
        layer.gate("default", torch.ones(3, 1, 3))
    assert str(err.value) == NO_TASK_IDS
    assert lora_layer().gate("default", torch.ones(1, 3)) is None


def dropout_mask(seed: int, shape: tuple[int, ...], p: float = 0.5) -> list:
    """The values torch's dropout draws from ``seed`` for a tensor of ones (0 or 1 / (1 − p))."""
    torch.manual_seed(seed)
    return nn.Dropout(p)(torch.ones(shape)).tolist()


def test_task_routing_applies_dropout_to_the_adapter_input_only_in_training() -> None:
    layer = alora_layer(lora_dropout=0.5)
    x = t([[XA], [XB]])
    layer.eval()
    assert run(layer, x, task_ids=torch.tensor([0, 1])).tolist() == [[TASKS[0, 0]], [TASKS[1, 1]]]
    layer.train()
    m = dropout_mask(3, (2, 1, 3))
    torch.manual_seed(3)
    y = run(layer, x, task_ids=torch.tensor([0, 1]))
    # row 0, task 0: W0 xa + b + s B (A_0 (m ⊙ xa)) = (7.5, -1.5) + 2 · m_00 · 1 · (1, 2)
    # row 1, task 1: W0 xb + b + s B (A_1 (m ⊙ xb)) = (2.5, -1.5) + 2 · m_11 · (-1) · (1, 2)
    a, b = m[0][0][0], m[1][0][1]
    assert y.tolist() == [[[7.5 + 2 * a, -1.5 + 4 * a]], [[2.5 - 2 * b, -1.5 - 4 * b]]]


# --- soft and top-k routing ------------------------------------------------------------------------------------
#
# W_g = [[0, 0, 0], [ln 3, 0, 0]] (N = 2), so the logits are (0, ±ln 3 · x_0):
#   xa = (1, 2, 3):  g = (1/4, 3/4); A_0 xa = 1, A_1 xa = 2: z = 1/4 + 3/2 = 7/4, s B z = 2 · (7/4, 7/2) = (3.5, 7)
#                    y = (7.5, -1.5) + (3.5, 7) = (11, 5.5)
#   xc = (-1, 1, 1): g = (3/4, 1/4); A_0 xc = -1, A_1 xc = 1: z = -1/2, s B z = (-1, -2); W0 xc + b = (1.5, -0.5)
#                    y = (0.5, -2.5)
XC = [-1.0, 1.0, 1.0]
SOFT = [[11.0, 5.5], [0.5, -2.5]]
LN3, LN2 = math.log(3.0), math.log(2.0)


def soft_layer(dtype=torch.float32, **cfg) -> Linear:
    layer = alora_layer("soft", dtype=dtype, **cfg)
    set_tensors(layer, router=[[0.0, 0.0, 0.0], [LN3, 0.0, 0.0]])
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_soft_routing_mixes_the_experts_with_the_softmax_gate(dtype) -> None:
    # float32 / float64: the fused product [A; W_g] x; float16: the router apart, in float32
    layer = soft_layer(dtype)
    assert layer.asymlora_router["default"].dtype == (
        torch.float64 if dtype == torch.float64 else torch.float32
    )
    y = layer(t([[XA, XC]], dtype))
    assert y.dtype == dtype
    torch.testing.assert_close(y, t([SOFT], dtype), atol=1e-5, rtol=1e-5)


def test_topk_routing_renormalises_the_k_largest_probabilities() -> None:
    # N = 3, top_k = 2, A_2 = [[0, 0, 1]], W_g = [[0, 0, 0], [ln 3, 0, 0], [ln 2, 0, 0]]
    # xa: p ∝ (1, 3, 2) -> experts 1, 2 with (3/5, 2/5); z = 3/5 · 2 + 2/5 · 3 = 2.4; s B z = (4.8, 9.6)
    #     y = (7.5 + 4.8, -1.5 + 9.6) = (12.3, 8.1)        (soft: z = 1/6 + 1 + 1 = 13/6)
    # xc: p ∝ (1, 1/3, 1/2) -> experts 0, 2 with (2/3, 1/3); z = -2/3 + 1/3 = -1/3; s B z = (-2/3, -4/3)
    #     y = (1.5 - 2/3, -0.5 - 4/3) = (5/6, -11/6)
    layer = alora_layer("topk", num_experts=3, top_k=2)
    set_tensors(layer, router=[[0.0, 0.0, 0.0], [LN3, 0.0, 0.0], [LN2, 0.0, 0.0]])
    torch.testing.assert_close(layer(t([[XA, XC]])), t([[[12.3, 8.1], [5 / 6, -11 / 6]]]))


def test_soft_routing_reads_x_without_dropout_and_the_adapter_reads_dropout_x() -> None:
    layer = soft_layer(lora_dropout=0.5)
    layer.eval()
    torch.testing.assert_close(layer(t([[XA, XC]])), t([SOFT]))
    layer.train()
    m = dropout_mask(5, (1, 2, 3))[0]
    torch.manual_seed(5)
    y = layer(t([[XA, XC]]))
    # the gates stay those of x (1/4, 3/4) and (3/4, 1/4); A_0 (m ⊙ x) = m_0 x_0, A_1 (m ⊙ x) = m_1 x_1
    za = 0.25 * m[0][0] * 1 + 0.75 * m[0][1] * 2
    zc = 0.75 * m[1][0] * -1 + 0.25 * m[1][1] * 1
    expected = [[7.5 + 2 * za, -1.5 + 4 * za], [1.5 + 2 * zc, -0.5 + 4 * zc]]
    torch.testing.assert_close(y, t([expected]))


def test_balance_loss_is_weighted_masked_and_collected_only_when_asked() -> None:
    # xa -> expert 1 (3/4), xc -> expert 0 (3/4): f = (1/2, 1/2), P = (1/2, 1/2), L = N Σ f P = 2 · 1/2 = 1
    # with the mask (1, 0) only xa counts: f = (0, 1), P = (1/4, 3/4), L = 2 · 3/4 = 1.5
    layer = soft_layer(balance_loss_weight=0.1)
    x = t([[XA, XC]])
    with routing(layer.routing_state, RoutingCall(collect_aux=True)) as call:
        torch.testing.assert_close(layer(x), t([SOFT]))
    [aux] = call.aux_losses
    assert aux.item() == pytest.approx(0.1)
    with routing(
        layer.routing_state, RoutingCall(collect_aux=True, attention_mask=torch.tensor([[1, 0]]))
    ) as call:
        layer(x)
    [aux] = call.aux_losses
    assert aux.item() == pytest.approx(0.15)
    with routing(layer.routing_state, RoutingCall(collect_aux=False)) as call:
        layer(x)
    assert call.aux_losses == []
    no_weight = soft_layer()  # balance_loss_weight = 0: nothing collected
    with routing(no_weight.routing_state, RoutingCall(collect_aux=True)) as call:
        no_weight(x)
    assert call.aux_losses == []


# --- construction ---------------------------------------------------------------------------------------------


def test_in_out_features_of_linear_conv1d_and_anything_else() -> None:
    assert in_out_features(nn.Linear(3, 2)) == (3, 2)
    assert in_out_features(Conv1D(2, 3)) == (3, 2)  # weight (nx = d_in, nf = d_out)
    assert in_out_features(nn.Conv1d(3, 2, 1)) is None


def test_unsupported_base_layer_message_whole() -> None:
    with pytest.raises(TypeError) as err:
        Linear(nn.Conv1d(3, 2, 1), "default", AsymLoraConfig(method="lora"), RoutingState())
    assert str(err.value) == (
        "asymlora cannot adapt a torch.nn.modules.conv.Conv1d; supported base layers: torch.nn.Linear, "
        "transformers.pytorch_utils.Conv1D. Choose target_modules among the model's modules of those types."
    )


def test_update_layer_dtypes_router_dropout_and_frozen_tensors() -> None:
    soft = soft_layer()
    assert set(soft.tensors("default")) == {"A", "B", "router"}
    assert soft.asymlora_router["default"].shape == (2, 3) and soft.asymlora_router["default"].requires_grad
    assert (
        set(alora_layer().tensors("default")) == {"A", "B"} and "default" not in alora_layer().asymlora_router
    )
    half = soft_layer(torch.bfloat16)  # A, B follow the base; W_g stays float32 and trainable
    assert half.asymlora_A["default"].dtype == torch.bfloat16
    assert (
        half.asymlora_router["default"].dtype == torch.float32
        and half.asymlora_router["default"].requires_grad
    )
    base = nn.Linear(3, 2)
    base.weight = nn.Parameter(torch.ones(2, 3, dtype=torch.int8), requires_grad=False)
    assert Linear(base, "default", AsymLoraConfig(method="lora"), RoutingState()).asymlora_A[
        "default"
    ].dtype == (torch.float32)
    assert isinstance(lora_layer().asymlora_dropout["default"], nn.Identity)
    layer = lora_layer(lora_dropout=0.3)
    assert (
        isinstance(layer.asymlora_dropout["default"], nn.Dropout)
        and layer.asymlora_dropout["default"].p == 0.3
    )
    layer.eval()
    layer.update_layer("other", AsymLoraConfig(method="lora", lora_dropout=0.2))
    assert not layer.asymlora_dropout["other"].training  # the layer's eval mode
    assert layer.asymlora_dropout["default"].training is False
    het = Linear(
        base_linear(), "default", AsymLoraConfig(method="fedhet", r=1, num_experts=2, intermediate_rank=2),
        RoutingState(),
    )  # fmt: skip
    assert het.frozen_peft_weight_names == {"default": ("asymlora_B0",)}
    assert not het.asymlora_B0["default"].requires_grad and het.asymlora_B1["default"].requires_grad
    assert lora_layer().frozen_peft_weight_names == {}
    frozen = lora_layer(inference_mode=True)
    assert not frozen.asymlora_A["default"].requires_grad and not frozen.asymlora_B["default"].requires_grad
    assert repr(lora_layer()).startswith("asymlora.Linear(\n  (base_layer): Linear(in_features=3")


# --- merge_task and export_task_adapter ---------------------------------------------------------------------


HEAD = [[1.0, 2.0], [3.0, 4.0]]


class Toy(nn.Module):
    """``proj`` (W0, b above; an nn.Linear or a Conv1D) feeding an unadapted ``head``."""

    def __init__(self, conv1d: bool = False, dtype=torch.float32) -> None:
        super().__init__()
        self.proj = base_linear(dtype, conv1d)
        self.head = nn.Linear(2, 2, bias=False).to(dtype)
        with torch.no_grad():
            self.head.weight.copy_(t(HEAD))
        self.config = types.SimpleNamespace(model_type="toy", use_return_dict=True)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs):
        return {"out": self.head(self.proj(inputs_embeds))}

    def prepare_inputs_for_generation(self, *args, **kwargs):
        return kwargs


def toy_alora(conv1d: bool = False, router: str = "task", **cfg) -> peft.PeftModel:
    """Toy with the ALoRA of the module docstring on ``proj`` (tasks "a", "b")."""
    config = AsymLoraConfig(
        method="alora", r=1, lora_alpha=2, num_experts=2, router=router, task_names=["a", "b"],
        target_modules=["proj"], **cfg,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's fan_in_fan_out notice for Conv1D
        pm = peft.get_peft_model(Toy(conv1d), config)
    set_tensors(pm.base_model.model.proj, A=ALORA_A, B=ALORA_B)
    return pm


@pytest.mark.parametrize("conv1d", [False, True])
def test_merge_task_adds_s_b_a_t_in_the_weight_layout_and_unwraps(conv1d: bool) -> None:
    for task, merged_w in (
        ("b", [[1.0, 2.0, 2.0], [0.0, 5.0, -1.0]]),
        (0, [[3.0, 0.0, 2.0], [4.0, 1.0, -1.0]]),
    ):
        # W0 + ΔW_1 = [[1, 0, 2], [0, 1, -1]] + [[0, 2, 0], [0, 4, 0]];  W0 + ΔW_0 = ... + [[2, 0, 0], [4, 0, 0]]
        merged = asymlora.merge_task(toy_alora(conv1d), task)
        assert type(merged) is Toy and type(merged.proj) is (Conv1D if conv1d else nn.Linear)
        assert merged.proj.weight.tolist() == (t(merged_w).T.tolist() if conv1d else merged_w)
        assert merged.proj.bias.tolist() == BIAS and merged.head.weight.tolist() == HEAD
        k = 1 if task == "b" else 0
        assert merged.proj(t([XA, XB])).tolist() == [TASKS[0, k], TASKS[1, k]]


def test_merge_task_picks_the_active_or_the_named_adapter_and_only_its_layers() -> None:
    # "second": plain LoRA on head, r = 1, alpha = 1, A = [[0, 1]], B = [[1], [1]]: ΔW = [[0, 1], [0, 1]]
    pm = toy_alora()
    pm.add_adapter("second", AsymLoraConfig(method="lora", r=1, lora_alpha=1, target_modules=["head"]))
    set_tensors(pm.base_model.model.head, "second", A=[[0.0, 1.0]], B=[[1.0], [1.0]])
    merged = asymlora.merge_task(pm, 1, adapter_name="default")  # named; "second" untouched
    assert (
        merged.proj.weight.tolist() == [[1.0, 2.0, 2.0], [0.0, 5.0, -1.0]]
        and merged.head.weight.tolist() == HEAD
    )
    pm = toy_alora()
    pm.add_adapter("second", AsymLoraConfig(method="lora", r=1, lora_alpha=1, target_modules=["head"]))
    set_tensors(pm.base_model.model.head, "second", A=[[0.0, 1.0]], B=[[1.0], [1.0]])
    pm.set_adapter("second")
    merged = asymlora.merge_task(pm, 0)  # the active adapter, a LoRA (router "soft" by default, no router)
    assert merged.proj.weight.tolist() == W0
    assert merged.head.weight.tolist() == [[1.0, 3.0], [3.0, 5.0]]  # HEAD + ΔW


def test_merge_and_export_refuse_with_whole_messages() -> None:
    soft = toy_alora(router="soft")
    mixed = (
        "adapter 'default' uses router='soft': its experts are mixed per token, so no single weight update exists "
        "to merge or export. Train with router='task' to get one mergeable LoRA per task."
    )
    with pytest.raises(ValueError) as err:
        asymlora.merge_task(soft, 0)
    assert str(err.value) == mixed
    with pytest.raises(ValueError) as err:
        asymlora.merge_task(toy_alora(), 0, adapter_name="other")
    assert str(err.value) == "model has no asymlora adapter named 'other' (adapters: ['default'])"
    lora_cfg = peft.LoraConfig(target_modules=["proj"])
    with pytest.raises(ValueError) as err:
        asymlora.merge_task(peft.get_peft_model(Toy(), lora_cfg), 0)
    assert str(err.value) == "model has no asymlora adapter named 'default' (adapters: ['default'])"
    plain = Toy()
    plain.peft_config = {"default": AsymLoraConfig(method="lora")}  # a config but no asymlora tuner
    with pytest.raises(TypeError) as err:
        asymlora.merge_task(plain, 0)
    assert str(err.value) == "Toy holds no asymlora adapter (no AsymLoraModel inside it)"


def test_export_task_adapter_writes_a_t_b_and_alpha_equal_to_s_times_rank(tmp_path) -> None:
    pm = toy_alora(lora_dropout=0.1)
    out = asymlora.export_task_adapter(pm, "b", tmp_path / "b")
    assert out == tmp_path / "b"
    config = json.loads((out / "adapter_config.json").read_text())
    # rank 1, s = 2: lora_alpha = s · 1 = 2, so peft's alpha / r is our s
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (1, 2.0, 0.1)
    assert config["target_modules"] == ["proj"] and config["fan_in_fan_out"] is False
    state = load_file(out / "adapter_model.safetensors")
    assert state.keys() == {"base_model.model.proj.lora_A.weight", "base_model.model.proj.lora_B.weight"}
    assert state["base_model.model.proj.lora_A.weight"].tolist() == ALORA_A[1]  # A_1
    assert state["base_model.model.proj.lora_B.weight"].tolist() == ALORA_B
    stock = peft.PeftModel.from_pretrained(Toy(), str(out)).eval()  # plain peft, no asymlora
    assert stock.base_model.model.proj(t([XA, XB])).tolist() == [TASKS[0, 1], TASKS[1, 1]]
    with pytest.raises(FileExistsError):
        asymlora.export_task_adapter(pm, 0, out)
    asymlora.export_task_adapter(pm, 0, out, overwrite=True)  # task 0 replaces it
    assert (
        load_file(out / "adapter_model.safetensors")["base_model.model.proj.lora_A.weight"].tolist()
        == (ALORA_A[0])
    )


def test_export_of_a_conv1d_layer_keeps_its_layout(tmp_path) -> None:
    out = asymlora.export_task_adapter(toy_alora(conv1d=True), "a", tmp_path / "a")
    assert json.loads((out / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stock = peft.PeftModel.from_pretrained(Toy(conv1d=True), str(out)).eval()
    assert stock.base_model.model.proj(t([XA, XB])).tolist() == [TASKS[0, 0], TASKS[1, 0]]


def test_export_refusals_and_the_exact_export_warning(tmp_path) -> None:
    soft = toy_alora(router="soft")
    with pytest.raises(ValueError) as err:
        asymlora.export_task_adapter(soft, 0, tmp_path / "x")
    assert str(err.value) == (
        "adapter 'default' uses router='soft': its experts are mixed per token, so exporting one LoRA averages "
        "each layer's gate over the task's tokens. Pass calibration= the task's examples, e.g. "
        "export_task_adapter(model, task.name, out_dir, calibration=task, tokenizer=tokenizer) with task an "
        "asymlora.data.Task (or a list of strings / tokenized batches)."
    )
    pm = toy_alora()
    with pytest.raises(ValueError) as err:
        asymlora.export_task_adapter(pm, 0, tmp_path / "x", rank=4)
    assert str(err.value) == "rank=4 applies to the calibrated export of soft/topk adapters only; drop it"
    with pytest.raises(ValueError) as err:
        asymlora.export_task_adapter(pm, 0, tmp_path / "x", adapter_name="nope")
    assert str(err.value) == "model has no asymlora adapter named 'nope' (adapters: ['default'])"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        asymlora.export_task_adapter(pm, 0, tmp_path / "plain")  # no calibration: no warning
        assert caught == []
        asymlora.export_task_adapter(pm, 0, tmp_path / "cal", calibration=["some text"])
    [w] = caught
    assert str(w.message) == "this adapter's export is exact; the calibration data is not used"
    assert_reported_at_the_call(w)
    with_modules = toy_alora(modules_to_save=["head"])
    with pytest.raises(ValueError) as err:
        asymlora.export_task_adapter(with_modules, 0, tmp_path / "y")
    assert str(err.value) == (
        "adapter 'default' also trains whole modules (modules_to_save=['head']); a LoRA export would drop them "
        "and not reproduce the model. Merge the task instead (asymlora.merge_task(model, task), then "
        "save_pretrained), or train without modules_to_save."
    )
    pm.base_model.model.proj.asymlora_config.pop("default")  # no layer holds the adapter any more
    with pytest.raises(ValueError) as err:
        asymlora.export_task_adapter(pm, 0, tmp_path / "z")
    assert str(err.value) == "adapter 'default' has no adapted layers to export"


def test_float_dtype_skips_adapter_and_integer_parameters() -> None:
    model = nn.Module()
    model.inner = nn.Module()
    model.inner.asymlora_A = nn.Parameter(torch.zeros(1, dtype=torch.float16))  # "inner.asymlora_A": skipped
    model.steps = nn.Parameter(torch.zeros(1, dtype=torch.int64), requires_grad=False)
    assert _float_dtype(model) == torch.float32  # nothing else: the default
    model.w = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    assert _float_dtype(model) == torch.float64


@pytest.mark.parametrize("bias", [True, False])
def test_dequantized_linear_holds_w0_plus_delta_and_the_bias(bias: bool) -> None:
    # a plain nn.Linear stands in for a bitsandbytes one (its weight is returned as is): W0 + ΔW above
    with torch.no_grad():  # as in merge_task
        linear = _dequantized_linear(base_linear(bias=bias), t(DELTA), torch.float64)
    assert type(linear) is nn.Linear and linear.weight.dtype == torch.float64
    assert linear.weight.tolist() == [[4.0, 6.0, 2.0], [6.0, 10.0, -4.0]]
    assert (linear.bias.tolist() == BIAS) if bias else linear.bias is None
    assert not any(p.requires_grad for p in linear.parameters())
    with pytest.raises(TypeError) as err:
        _dequantized_linear(Conv1D(2, 3), t(DELTA), torch.float32)
    assert str(err.value) == "cannot dequantise a Conv1D; expected a bitsandbytes linear layer"


# --- bitsandbytes bases ---------------------------------------------------------------------------------------
#
# W (32 × 128, seeded normal) quantised to nf4 in blocks of 64 (two blocks per row, so the order of the block
# scales matters) or to int8 per row. The reference for the 4-bit dequantisation is peft's
# dequantize_bnb_weight read *before* bitsandbytes repacks the weight on its first CPU eval forward.


def nf4_linear(double: bool = False) -> nn.Module:
    bnb = pytest.importorskip("bitsandbytes")
    weight = torch.randn(32, 128, generator=torch.Generator().manual_seed(0))
    layer = bnb.nn.Linear4bit(
        128, 32, bias=False, quant_type="nf4", compute_dtype=torch.float32, compress_statistics=double
    )
    layer.weight = bnb.nn.Params4bit(
        weight, requires_grad=False, quant_type="nf4", compress_statistics=double
    )
    return layer.to("cpu")


@pytest.mark.parametrize("double", [False, True])
def test_dequantized_weight_of_a_4bit_base_after_its_cpu_repacking(double: bool) -> None:
    from peft.utils.integrations import dequantize_bnb_weight

    from asymlora.tuner.layer import dequantized_weight

    layer = nf4_linear(double)
    ref = dequantize_bnb_weight(layer.weight, state=None).clone()  # before any forward
    layer.eval()
    with torch.no_grad():
        layer(torch.ones(1, 128))  # bitsandbytes repacks the weight, block scales transposed, in bf16
    got = dequantized_weight(layer)
    assert got.shape == (32, 128) and got.dtype == torch.float32
    # the scales went through bf16 (8 significant bits): |ΔW| <= 2^-8 · absmax of a block (< 5) < 0.02; read
    # in the repacked order the scales of other blocks give errors of about 7
    torch.testing.assert_close(got, ref, atol=0.02, rtol=0)
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    assert dequantized_weight(nn.Linear(3, 2)) is not None  # an unquantised weight comes back as is
    plain = nn.Linear(3, 2)
    assert dequantized_weight(plain) is plain.weight


def test_int8_weight_is_dequantized_per_row() -> None:
    bnb = pytest.importorskip("bitsandbytes")
    from asymlora.tuner.layer import dequantized_weight

    weight = torch.randn(32, 128, generator=torch.Generator().manual_seed(0))
    layer = bnb.nn.Linear8bitLt(128, 32, bias=False, has_fp16_weights=False)
    layer.weight = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False)
    layer = layer.to("cpu")
    # q = round(w · 127 / absmax_row), w ≈ q · absmax_row / 127: within one step absmax_row / 127 of w (half a
    # step plus bitsandbytes' 16-bit rounding of the product)
    bound = weight.abs().amax(1, keepdim=True) / 127
    assert ((dequantized_weight(layer) - weight).abs() <= bound).all()


def test_quantized_base_refuses_merge_and_merge_task_dequantizes_with_a_warning() -> None:
    layer = Linear(nf4_linear(), "default", AsymLoraConfig(method="lora"), RoutingState())
    with pytest.raises(ValueError) as err:
        layer.merge()
    assert str(err.value) == (
        "cannot merge into the 4bit bitsandbytes weight of layer 'Linear': re-quantising W0 + ΔW rounds most of "
        "the update away. Use asymlora.merge_task(model, task) (task 0 for plain LoRA), which merges into a "
        "dequantised copy of the adapted layers, or load the base unquantised, load the adapter on it and merge "
        "there."
    )
    with pytest.raises(ValueError, match="of layer 'model.proj': "):
        layer.refuse_quantized_merge("model.proj")
    # merge_task: ALoRA r = 1, alpha = 2 (s = 2), A_1 = e_0 (d_in 128), B = ones (d_out 32): ΔW_1 = 2 in column 0
    toy = Toy()
    toy.proj, toy.head = nf4_linear(), nn.Linear(32, 2, dtype=torch.bfloat16)  # the model's float dtype: bf16
    ref = __import__("peft").utils.integrations.dequantize_bnb_weight(toy.proj.weight, state=None).clone()
    config = AsymLoraConfig(
        method="alora", r=1, lora_alpha=2, num_experts=2, router="task", target_modules=["proj"]
    )
    pm = peft.get_peft_model(toy, config)
    a = torch.zeros(2, 1, 128)
    a[1, 0, 0] = 1.0
    set_tensors(pm.base_model.model.proj, A=a.tolist(), B=torch.ones(32, 1).tolist())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = asymlora.merge_task(pm, 1)
    [w] = [w for w in caught if "merge_task" in str(w.message)]
    assert str(w.message) == (
        "merge_task on a quantised base: the 1 adapted bitsandbytes layers are dequantised to torch.bfloat16 and "
        "the task merged there (the other layers stay quantised). Re-quantising W0 + ΔW would round most of the "
        "update away, so they keep their full size; to serve a small model keep the adapter (or "
        "export_task_adapter) on the quantised base instead."
    )
    assert_reported_at_the_call(w)
    assert type(merged.proj) is nn.Linear and merged.proj.weight.dtype == torch.bfloat16
    expected = ref.clone()
    expected[:, 0] += 2.0  # dequant(W0) + ΔW_1 in float32, then stored in bf16
    torch.testing.assert_close(merged.proj.weight, expected.to(torch.bfloat16), atol=0.0, rtol=0.0)


# --- second round: what the first mutation run left ---------------------------------------------------------


def test_soft_routing_with_three_experts_keeps_every_expert() -> None:
    # W_g as in the top-k test, router "soft" (top_k = 2 is ignored): xa: p = (1/6, 1/2, 1/3),
    # z = 1/6 · 1 + 1/2 · 2 + 1/3 · 3 = 13/6, s B z = (13/3, 26/3), y = (7.5 + 13/3, -1.5 + 26/3) = (71/6, 43/6)
    # xc: p = (6/11, 2/11, 3/11), z = -6/11 + 2/11 + 3/11 = -1/11, s B z = (-2/11, -4/11), y = (33/22 − 4/22, -19/22) = (29/22, -19/22)
    layer = alora_layer("soft", num_experts=3, top_k=2)
    set_tensors(layer, router=[[0.0, 0.0, 0.0], [LN3, 0.0, 0.0], [LN2, 0.0, 0.0]])
    torch.testing.assert_close(layer(t([[XA, XC]])), t([[[71 / 6, 43 / 6], [29 / 22, -19 / 22]]]))


def test_two_dimensional_input_without_task_ids_names_the_missing_ids() -> None:
    with pytest.raises(ValueError) as err:
        alora_layer()(t([XA, XB]))  # (tokens, d_in) is batched: the ids are what is missing
    assert str(err.value) == NO_TASK_IDS


class Spy:
    """Records which of the layer's routes a forward takes (the values are the same on every route)."""

    def __init__(self, monkeypatch, layer: Linear) -> None:
        self.calls: list[str] = []
        method = asymlora.methods.get_method(layer.asymlora_config["default"].method)
        for name in ("delta", "combine", "routed_delta", "task_delta"):
            original = getattr(method, name)
            monkeypatch.setattr(method, name, self._wrap(name, original))
        gate = layer.gate
        monkeypatch.setattr(layer, "gate", lambda name, x, logits=None: self._gate(gate, name, x, logits))

    def _wrap(self, name, original):
        def call(*args, **kwargs):
            self.calls.append(name)
            return original(*args, **kwargs)

        return call

    def _gate(self, gate, name, x, logits):
        self.calls.append("gate(logits)" if logits is not None else "gate(x)")
        return gate(name, x, logits)


def test_fused_router_product_only_without_dropout_in_32_bits_or_wider(monkeypatch) -> None:
    """The docstring of `adapter_path`: W_g is stacked under the first adapter matrix (one pass over x) when
    the router reads the same x as that product: no active dropout, float32 or wider, no torch.autocast."""
    cases = [  # (layer, input dtype, autocast, expected route)
        (
            soft_layer(),
            torch.float32,
            False,
            ["gate(logits)", "combine"],
        ),  # a training-mode layer, no dropout
        (soft_layer(torch.float64), torch.float64, False, ["gate(logits)", "combine"]),
        (
            soft_layer(torch.float16),
            torch.float16,
            False,
            ["gate(x)", "delta", "combine"],
        ),  # delta: A x, combine
        (soft_layer(), torch.float32, True, ["gate(x)", "delta", "combine"]),
        (soft_layer(lora_dropout=0.5), torch.float32, False, ["gate(x)", "delta", "combine"]),
        (soft_layer(lora_dropout=0.5).eval(), torch.float32, False, ["gate(logits)", "combine"]),
    ]
    for layer, dtype, autocast, route in cases:
        spy = Spy(monkeypatch, layer)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            layer(t([[XA, XC]], dtype))
        assert spy.calls == route, (dtype, autocast, layer.training)
        monkeypatch.undo()


def test_task_routing_takes_the_one_task_path_for_a_uniform_batch(monkeypatch) -> None:
    layer = alora_layer()
    spy = Spy(monkeypatch, layer)
    run(layer, t([[XA], [XB]]), task_ids=torch.tensor([1, 1]))
    run(layer, t([[XA], [XB]]), task_ids=torch.tensor([0, 1]))
    assert spy.calls == ["task_delta", "routed_delta"]


def test_merge_without_safe_merge_writes_a_non_finite_update_as_peft_does() -> None:
    layer = lora_layer()
    set_tensors(layer, B=[[math.inf, 0.0], [2.0, -1.0]])
    layer.merge()  # peft's default safe_merge=False: no check
    # row 0 of B A = ∞ · (1, 2, 0) = (∞, ∞, ∞ · 0 = NaN): W0 row 0 becomes (∞, ∞, NaN)
    row = layer.base_layer.weight[0].tolist()
    assert row[:2] == [math.inf, math.inf] and math.isnan(row[2]) and layer.merged_adapters == ["default"]


def bf16_lora(w00: float, alpha: float) -> Linear:
    """bf16 LoRA, r = 2, A = [[1, 0, 0], [2^-8, 0, 0]], B = [[1, 1], [0, 0]]: ΔW[0, 0] = s (1 + 2^-8), the rest 0
    (task_delta_weight computes it in float32); W0[0, 0] = w00."""
    layer = lora_layer(torch.bfloat16)
    layer.asymlora_config["default"].lora_alpha = alpha
    set_tensors(layer, A=[[1.0, 0.0, 0.0], [2.0**-8, 0.0, 0.0]], B=[[1.0, 1.0], [0.0, 0.0]])
    with torch.no_grad():
        layer.base_layer.weight[0, 0] = w00
    return layer


def test_bfloat16_merge_and_unmerge_add_and_subtract_the_same_rounded_update() -> None:
    # s = 6 / 2 = 3: ΔW[0, 0] = 3.01171875, rounded to bf16 (spacing 2^-6 in [2, 4)) 3.015625.
    # W0[0, 0] = 63/64 = 0.984375: merge 0.984375 + 3.015625 = 4.0 exactly; unmerge 4.0 − 3.015625 = 0.984375,
    # W0 again. Subtracting the float32 update instead: 4.0 − 3.01171875 = 0.98828125 (a bf16 number) ≠ W0.
    layer = bf16_lora(0.984375, 6.0)
    layer.merge()
    assert layer.base_layer.weight[0, 0].item() == 4.0
    layer.unmerge()
    assert layer.base_layer.weight[0, 0].item() == 0.984375


def test_merge_task_adds_the_update_rounded_to_the_base_dtype() -> None:
    # bf16 Toy, ALoRA r = 2, alpha = 2 (s = 1), task 1: A_1 = [[1, 0, 0], [2^-8, 0, 0]], B = [[1, 1], [0, 0]]:
    # ΔW_1[0, 0] = 1 + 2^-8 in float32, 1.0 in bf16 (a tie, to even). W0[0, 0] = 2^-8:
    # 2^-8 + 1.0 = 1 + 2^-8, a tie again -> 1.0; adding the float32 update would give 1 + 2^-7 = 1.0078125.
    config = AsymLoraConfig(
        method="alora", r=2, lora_alpha=2, num_experts=2, router="task", target_modules=["proj"]
    )
    toy = Toy(dtype=torch.bfloat16)
    with torch.no_grad():
        toy.proj.weight[0, 0] = 2.0**-8
    pm = peft.get_peft_model(toy, config, autocast_adapter_dtype=False)
    proj = pm.base_model.model.proj
    a = [[[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], [[1.0, 0.0, 0.0], [2.0**-8, 0.0, 0.0]]]
    set_tensors(proj, A=a, B=[[1.0, 1.0], [0.0, 0.0]])
    assert proj.task_delta_weight("default", 1)[0, 0].item() == 1 + 2**-8
    merged = asymlora.merge_task(pm, 1)
    assert merged.proj.weight.dtype == torch.bfloat16 and merged.proj.weight[0, 0].item() == 1.0


def test_merge_task_and_export_accept_the_tuner_itself(tmp_path) -> None:
    """`_tuner_of` takes "the model itself when it is the tuner" (PeftModel.base_model, an AsymLoraModel), whose
    ``active_adapter`` is a list of names (peft's BaseTuner), not one name as on a PeftModel. Both used to
    raise TypeError: unhashable type: 'list'; the export named its modules 'model.proj' (keys
    base_model.model.model.proj..., which stock peft does not load)."""
    tuner = toy_alora().base_model
    assert tuner.active_adapter == ["default"]
    out = asymlora.export_task_adapter(tuner, "b", tmp_path / "b")
    state = load_file(out / "adapter_model.safetensors")  # the keys a PeftModel's export has
    assert state.keys() == {"base_model.model.proj.lora_A.weight", "base_model.model.proj.lora_B.weight"}
    assert state["base_model.model.proj.lora_A.weight"].tolist() == ALORA_A[1]
    stock = peft.PeftModel.from_pretrained(Toy(), str(out)).eval()
    assert stock.base_model.model.proj(t([XA, XB])).tolist() == [TASKS[0, 1], TASKS[1, 1]]
    merged = asymlora.merge_task(tuner, "b")
    assert type(merged) is Toy and merged.proj.weight.tolist() == [[1.0, 2.0, 2.0], [0.0, 5.0, -1.0]]
    soft = toy_alora(router="soft")
    soft.add_adapter("second", AsymLoraConfig(method="lora", target_modules=["proj"]))
    soft.base_model.set_adapter(["default", "second"])  # two active adapters: which one is ambiguous
    for call in (
        lambda: asymlora.merge_task(soft.base_model, 0),
        lambda: asymlora.export_task_adapter(soft.base_model, 0, tmp_path / "c"),
    ):
        with pytest.raises(ValueError) as err:
            call()
        assert str(err.value) == (
            "2 adapters are active (['default', 'second']); pass adapter_name= to choose one"
        )


def test_a_model_without_peft_config_has_no_adapter_to_merge_or_export(tmp_path) -> None:
    message = "model has no asymlora adapter named 'default' (adapters: [])"
    for call in (
        lambda: asymlora.merge_task(Toy(), 0),
        lambda: asymlora.export_task_adapter(Toy(), 0, tmp_path),
    ):
        with pytest.raises(ValueError) as err:
            call()
        assert str(err.value) == message


def test_export_checks_the_calibration_need_of_the_adapter_it_exports(tmp_path) -> None:
    soft_message = (
        "adapter {!r} uses router='soft': its experts are mixed per token, so exporting one LoRA averages each "
        "layer's gate over the task's tokens. Pass calibration= the task's examples, e.g. "
        "export_task_adapter(model, task.name, out_dir, calibration=task, tokenizer=tokenizer) with task an "
        "asymlora.data.Task (or a list of strings / tokenized batches)."
    )
    pm = toy_alora()  # "default": task-routed
    pm.add_adapter(
        "second", AsymLoraConfig(method="alora", r=1, num_experts=2, target_modules=["proj"])
    )  # soft
    pm.set_adapter("second")
    with pytest.raises(ValueError) as err:
        asymlora.export_task_adapter(pm, 0, tmp_path / "x")  # the active adapter, "second"
    assert str(err.value) == soft_message.format("second")
    out = asymlora.export_task_adapter(pm, "b", tmp_path / "b", adapter_name="default")  # named: exact export
    assert (
        load_file(out / "adapter_model.safetensors")["base_model.model.proj.lora_A.weight"].tolist()
        == (ALORA_A[1])
    )
    plain = Toy()  # no active_adapter attribute: "default" is read
    plain.peft_config = {"default": AsymLoraConfig(method="alora", num_experts=2)}
    with pytest.raises(ValueError) as err:
        asymlora.export_task_adapter(plain, 0, tmp_path / "y")
    assert str(err.value) == soft_message.format("default")


def test_layer_flags_specs_and_initialisation() -> None:
    from asymlora.methods.base import Role

    layer = soft_layer()
    assert layer.disable_adapters is False
    router = layer.specs("default")["router"]
    assert router.shape == (2, 3) and router.role is Role.ROUTER and router.trainable
    assert "router" not in alora_layer().specs("default")
    # W_g: Kaiming-uniform with a = √5, bound 1/√d_in = 1/8 for d_in = 64 (std bound/√3 = 0.0722), not left as
    # torch.empty's memory
    torch.manual_seed(0)
    wide = Linear(nn.Linear(64, 2), "default", AsymLoraConfig(method="alora", num_experts=4), RoutingState())
    w = wide.asymlora_router["default"].detach()
    assert w.abs().max().item() <= 0.125 and 0.06 < w.std().item() < 0.085


def test_adapter_draws_are_float32_whatever_the_default_dtype() -> None:
    """The same seed gives the same float32 adapter under torch.set_default_dtype(torch.float64) (a float64 draw
    gives other numbers)."""

    def draw() -> torch.Tensor:
        base = nn.Linear(3, 2, dtype=torch.float32)
        torch.manual_seed(0)
        layer = Linear(base, "default", AsymLoraConfig(method="alora", r=1, num_experts=2), RoutingState())
        return layer.asymlora_A["default"].detach()

    expected = draw()
    torch.set_default_dtype(torch.float64)
    try:
        got = draw()
    finally:
        torch.set_default_dtype(torch.float32)
    assert got.dtype == torch.float32 and torch.equal(got, expected)


def test_malora_init_reads_beta_from_the_config() -> None:
    # d_sub = d_in = 4: S = β · V with V orthogonal (4 × 4), so S Sᵀ = β² I = 1.5625 I for β = 1.25
    cfg = AsymLoraConfig(method="malora", r=2, num_experts=2, subspace_rank=4, beta=1.25)
    layer = Linear(nn.Linear(4, 2), "default", cfg, RoutingState())
    s = layer.asymlora_S["default"].detach()
    torch.testing.assert_close(s @ s.T, 1.5625 * torch.eye(4), atol=1e-6, rtol=0)


def test_forward_hands_extra_arguments_to_the_base_layer() -> None:
    layer = lora_layer()
    for args, kwargs in (
        ((1,), {}),
        ((), {"scale": 2}),
    ):  # nn.Linear.forward(x) takes neither: it refuses them
        with pytest.raises(TypeError):
            layer(t(X12), *args, **kwargs)


def test_soft_adapter_export_hands_every_argument_to_the_calibrated_export(monkeypatch, tmp_path) -> None:
    pm = toy_alora(router="soft")
    seen = []
    monkeypatch.setattr(
        asymlora.export, "export_calibrated_adapter", lambda *a, **k: seen.append((a, k)) or "out"
    )
    data, tok = ["some text"], object()
    got = asymlora.export_task_adapter(
        pm,
        "b",
        tmp_path / "x",
        adapter_name="default",
        overwrite=True,
        calibration=data,
        tokenizer=tok,
        rank=3,
    )
    assert got == "out"
    [(args, kwargs)] = seen
    assert args == (pm, "b", tmp_path / "x", data)
    assert kwargs == {"tokenizer": tok, "rank": 3, "adapter_name": "default", "overwrite": True}


def test_calibrated_export_refuses_the_tuner_alone(tmp_path) -> None:
    """Run alone, ``PeftModel.base_model`` sets no routing call, so the layers never see the attention mask:
    exported from it, a padded calibration batch averaged the gates over padding too (other factors than the
    PeftModel's export) and the keys had one ``model.`` too many. It is refused, and nothing is written."""
    from tests.conftest import make_char_tokenizer, make_tiny_llama

    cfg = AsymLoraConfig(method="alora", r=2, num_experts=3, target_modules=["q_proj"])
    pm = peft.get_peft_model(make_tiny_llama(layers=1), cfg)
    tok, texts = make_char_tokenizer(), ["hello world", "abc"]  # "abc" is padded
    with pytest.raises(ValueError) as err:
        asymlora.export_task_adapter(pm.base_model, 0, tmp_path / "x", calibration=texts, tokenizer=tok)
    assert str(err.value) == (
        "export the calibrated adapter from the PeftModel, not from its base_model (the AsymLoraModel): run "
        "alone, the tuner does not hand the attention mask to its layers, so padding would count in the "
        "averaged gates"
    )
    assert not (tmp_path / "x").exists()
    out = asymlora.export_task_adapter(
        pm, 0, tmp_path / "y", calibration=texts, tokenizer=tok
    )  # the PeftModel
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    assert load_file(out / "adapter_model.safetensors").keys() == {
        key + ".lora_A.weight",
        key + ".lora_B.weight",
    }
