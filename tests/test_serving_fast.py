"""Task-routed serving: only each row's own expert is computed (`AdapterMethod.routed_delta`, and
`task_delta` for a batch with one task), and it equals the one-hot gated path, a per-row loop over the raw
tensors and, for greedy generation, each task's merged model."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from tests.conftest import make_tiny_llama
from torch import nn

import asymlora
from asymlora import AsymLoraConfig
from asymlora.methods import get_method
from asymlora.methods.base import AdapterMethod
from asymlora.routing import RoutingCall, RoutingState, task_gate
from asymlora.tuner.layer import Linear

ROUTED = ["alora", "hydralora", "molora", "malora"]
D_IN, D_OUT, N = 24, 20, 3
MIXED, UNIFORM = [2, 0, 1, 2], [1, 1, 1, 1]
SHAPES = {"prefill": (4, 5, D_IN), "decode": (4, 1, D_IN), "2-d": (4, D_IN)}


def make_layer(method: str, dropout: float = 0.0) -> tuple[Linear, RoutingState]:
    torch.manual_seed(0)
    cfg = AsymLoraConfig(
        method=method, router="task", r=4, num_experts=N, lora_dropout=dropout, target_modules=["x"]
    )
    state = RoutingState()
    layer = Linear(nn.Linear(D_IN, D_OUT, dtype=torch.float64), "default", cfg, state).double()
    with torch.no_grad():  # random B too, so the adapter path is not zero
        for p in layer.tensors("default").values():
            p.normal_()
    return layer, state


def row_factors(method: str, t: dict[str, torch.Tensor], task: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_t, B_t) of one task, read from the raw tensors (written out here, not taken from the method)."""
    if method == "alora":
        return t["A"][task], t["B"]
    if method == "hydralora":
        return t["A"], t["B"][task]
    if method == "molora":
        return t["A"][task], t["B"][task]
    return t["A"][task] @ t["S"], t["B"][task]  # malora: P_t S_A


def per_row_reference(layer: Linear, method: str, x: torch.Tensor, task_ids: list[int]) -> torch.Tensor:
    """y_b = W0 x_b + b0 + s · x_b A_{t_b}ᵀ B_{t_b}ᵀ, one row at a time."""
    t = {k: v.detach() for k, v in layer.tensors("default").items()}
    s = layer.asymlora_config["default"].scaling
    rows = []
    for b, task in enumerate(task_ids):
        a, bb = row_factors(method, t, task)
        rows.append(x[b] @ layer.base_layer.weight.T + layer.base_layer.bias + s * (x[b] @ a.T @ bb.T))
    return torch.stack(rows)


def one_hot_path(layer: Linear, method: str, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
    """The gated path with g = one_hot(task): every expert computed, then mixed (the path before)."""
    t = layer.tensors("default")
    gate = task_gate(task_ids, N, x).to(x.dtype)
    delta = get_method(method).delta(layer.asymlora_dropout["default"](x), t, gate)
    return layer.base_layer(x) + layer.asymlora_config["default"].scaling * delta


@pytest.mark.parametrize("ids", [MIXED, UNIFORM], ids=["mixed", "uniform"])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("method", ROUTED)
def test_fast_path_equals_one_hot_and_per_row_loop(method: str, shape: str, ids: list[int]) -> None:
    layer, state = make_layer(method)
    x = torch.randn(*SHAPES[shape], dtype=torch.float64)
    task_ids = torch.tensor(ids)
    state.call = RoutingCall(task_ids=task_ids)
    with torch.no_grad():
        fast = layer(x)
        torch.testing.assert_close(fast, per_row_reference(layer, method, x, ids), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(fast, one_hot_path(layer, method, x, task_ids), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", ROUTED)
def test_default_routed_delta_from_task_factors_equals_the_override(method: str) -> None:
    layer, _ = make_layer(method)
    t, m = layer.tensors("default"), get_method(method)
    x, task_ids = torch.randn(4, 3, D_IN, dtype=torch.float64), torch.tensor(MIXED)
    with torch.no_grad():
        torch.testing.assert_close(
            m.routed_delta(x, t, task_ids),
            AdapterMethod.routed_delta(m, x, t, task_ids),
            rtol=1e-10,
            atol=1e-10,
        )
        torch.testing.assert_close(m.task_delta(x, t, 2), AdapterMethod.task_delta(m, x, t, 2))


@pytest.mark.parametrize("ids", [MIXED, UNIFORM], ids=["mixed", "uniform"])
@pytest.mark.parametrize("method", ROUTED)
def test_training_gradients_and_dropout_equal_the_one_hot_path(method: str, ids: list[int]) -> None:
    """Training mode with dropout: same mask (same seed), same values and gradients as the one-hot path."""
    layer, state = make_layer(method, dropout=0.3)
    layer.train()
    task_ids = torch.tensor(ids)
    state.call = RoutingCall(task_ids=task_ids)
    x = torch.randn(4, 5, D_IN, dtype=torch.float64)
    w_out = torch.randn(4, 5, D_OUT, dtype=torch.float64)
    grads = []
    for path in ("fast", "one-hot"):
        layer.zero_grad()
        xg = x.clone().requires_grad_(True)
        torch.manual_seed(7)
        y = layer(xg) if path == "fast" else one_hot_path(layer, method, xg, task_ids)
        (y * w_out).sum().backward()
        grads.append((y.detach(), xg.grad, {k: v.grad.clone() for k, v in layer.tensors("default").items()}))
    (y1, gx1, gt1), (y2, gx2, gt2) = grads
    torch.testing.assert_close(y1, y2, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gx1, gx2, rtol=1e-10, atol=1e-10)
    for k in gt1:
        torch.testing.assert_close(gt1[k], gt2[k], rtol=1e-10, atol=1e-10, msg=f"gradient of {k}")
    assert y1.ne(layer.base_layer(x)).any()  # dropout did not zero the adapter path away


def test_fast_path_never_computes_every_expert(monkeypatch: pytest.MonkeyPatch) -> None:
    layer, state = make_layer("alora")
    method = get_method("alora")

    def no_gated_path(*args, **kwargs):
        raise AssertionError("the task-routed layer ran the all-experts gated path")

    monkeypatch.setattr(method, "delta", no_gated_path)
    monkeypatch.setattr(method, "combine", no_gated_path)
    for ids in (MIXED, UNIFORM):
        state.call = RoutingCall(task_ids=torch.tensor(ids))
        layer(torch.randn(4, 2, D_IN, dtype=torch.float64))


@pytest.mark.parametrize("method", ROUTED)
def test_mixed_batch_generate_equals_each_tasks_merged_model(method: str) -> None:
    base = make_tiny_llama()
    cfg = AsymLoraConfig(
        method=method, router="task", r=4, num_experts=N, target_modules=["q_proj", "v_proj", "down_proj"]
    )
    torch.manual_seed(1)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "asymlora_B" in name:
                p.normal_(std=0.5)  # a trained-looking adapter: the tasks generate different tokens
    ids = torch.randint(3, 128, (5, 6), generator=torch.Generator().manual_seed(0))
    task_ids = [2, 0, 1, 2, 1]
    kwargs = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        mixed = pm.generate(input_ids=ids, task_ids=torch.tensor(task_ids), **kwargs)
        merged = {t: asymlora.merge_task(copy.deepcopy(pm), t).eval() for t in range(N)}
        for row, task in enumerate(task_ids):
            alone = merged[task].generate(input_ids=ids[row : row + 1], **kwargs)
            assert torch.equal(mixed[row], alone[0]), f"row {row} (task {task})"
        # the tasks really differ: the same prompt gives other tokens under another task's merged model
        others = [merged[t].generate(input_ids=ids[:1], **kwargs)[0] for t in range(N)]
        assert any(not torch.equal(others[0], o) for o in others[1:])
