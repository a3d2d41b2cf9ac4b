"""Hand-valued tests of routing.py's per-call plumbing, small enough for mutation testing (docs/testing.md):
the real-token mask, the balance loss over real tokens only, the checkpoint binding and the balance loss's
gradient path (docs/design.md §3)."""

from __future__ import annotations

import pytest
import torch

from asymlora.routing import (
    RoutingCall,
    RoutingState,
    add_balance_loss,
    attach_balance_loss,
    balance_loss,
    bind_to_checkpoints,
    routing,
    task_gate,
)
from conftest import make_tiny_llama

# transformers 5 deprecates the name gradient_checkpointing_enable; users and the Trainer still call it
pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")

# --------------------------------------------------------------------------- token_mask


def test_token_mask_keeps_the_last_seq_columns_as_bool() -> None:
    # a KV cache: 5 mask columns (3 past + 2 new tokens); x holds the 2 new ones
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 1, 1]])
    # (the feature size, 16, exceeds every sequence length, so the axes cannot be confused)
    got = RoutingCall(attention_mask=mask).token_mask(torch.zeros(2, 2, 16))
    assert got is not None
    assert got.dtype == torch.bool
    assert got.tolist() == [[True, False], [True, True]]
    # mask as long as the sequence: the whole mask
    full = RoutingCall(attention_mask=mask).token_mask(torch.zeros(2, 5, 16))
    assert full is not None and full.tolist() == mask.bool().tolist()


def test_token_mask_of_a_layer_that_sees_the_tokens_flattened() -> None:
    # OPT's fc1/fc2 see (batch·seq, d): rows 0-2 are example 0's tokens, rows 3-5 example 1's
    mask = torch.tensor([[0, 1, 1], [1, 1, 0]])
    got = RoutingCall(attention_mask=mask).token_mask(torch.zeros(6, 16))
    assert got is not None and got.dtype == torch.bool
    assert got.tolist() == [False, True, True, True, True, False]
    # KV cache: mask (2, 5) over past and new tokens, 2 new tokens per example → rows (2·2, d) are the last
    # two columns of each row, example by example
    cached = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 1, 1]])
    got = RoutingCall(attention_mask=cached).token_mask(torch.zeros(4, 16))
    assert got is not None and got.tolist() == [True, False, True, True]
    # one new token per example (a generation step): the last column
    got = RoutingCall(attention_mask=cached).token_mask(torch.zeros(2, 16))
    assert got is not None and got.tolist() == [False, True]


@pytest.mark.parametrize(
    ("mask", "x"),
    [
        (None, torch.zeros(2, 3, 4)),
        (torch.ones(2, 3, 1), torch.zeros(2, 3, 4)),  # not (batch, seq)
        (torch.ones(6), torch.zeros(2, 3, 4)),
        (torch.ones(2, 3), torch.zeros(5, 4)),  # flattened rows: not a whole number per example
        (torch.ones(2, 3), torch.zeros(8, 4)),  # flattened rows: more per example than the mask has
        (torch.ones(0, 3), torch.zeros(0, 4)),  # no example
        (torch.ones(2, 3), torch.zeros(2, 3, 4, 1)),
    ],
)
def test_token_mask_is_none_where_it_cannot_apply(mask, x) -> None:
    assert RoutingCall(attention_mask=mask).token_mask(x) is None


@pytest.mark.parametrize(
    ("mask_shape", "x_shape"), [((3, 4), (2, 4, 8)), ((2, 3), (2, 4, 8)), ((2, 3), (2, 4, 2))]
)
def test_token_mask_refuses_a_mask_that_does_not_fit(mask_shape, x_shape) -> None:
    call = RoutingCall(attention_mask=torch.ones(mask_shape))
    expected = (
        f"attention_mask of shape {mask_shape} does not fit hidden states of shape {x_shape}; "
        "pass one mask row per example covering every token."
    )
    with pytest.raises(ValueError) as err:
        call.token_mask(torch.zeros(x_shape))
    assert str(err.value) == expected


# --------------------------------------------------------------------------- masked balance loss
#
# batch 2 × seq 3 tokens, N = 2 experts; probabilities per token and the attention mask
#   row 0: (0.9, 0.1) (0.6, 0.4) (0.2, 0.8)   mask 1 1 0
#   row 1: (0.3, 0.7) (0.4, 0.6) (0.7, 0.3)   mask 0 1 1
# real tokens: (0.9, 0.1) (0.6, 0.4) (0.4, 0.6) (0.7, 0.3); top-1 experts 0, 0, 1, 0
#   f = (3/4, 1/4), P = (2.6/4, 1.4/4) = (0.65, 0.35)
#   L = N · Σ f_i P_i = 2 · (0.75 · 0.65 + 0.25 · 0.35) = 2 · 0.575 = 1.15
# all six tokens (no mask): top-1 0, 0, 1, 1, 1, 0 → f = (1/2, 1/2); L = 2 · (3.1 + 2.9) / 12 = 1.0
# dividing by all six tokens instead of the four real ones: 2 · (3 · 2.6 + 1 · 1.4) / 36 = 0.5111

PROBS = torch.tensor(
    [[[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]], [[0.3, 0.7], [0.4, 0.6], [0.7, 0.3]]], dtype=torch.float64
)
MASK = torch.tensor([[1, 1, 0], [0, 1, 1]])


@pytest.mark.parametrize("mask", [MASK, MASK.bool(), MASK.float()])
def test_balance_loss_counts_only_real_tokens(mask) -> None:
    assert balance_loss(PROBS, mask).item() == pytest.approx(1.15, abs=1e-12)


def test_balance_loss_without_mask_counts_every_token() -> None:
    assert balance_loss(PROBS).item() == pytest.approx(1.0, abs=1e-12)
    assert balance_loss(PROBS, torch.ones(2, 3)).item() == pytest.approx(1.0, abs=1e-12)


def test_balance_loss_keeps_the_router_dtype_whatever_the_mask_dtype() -> None:
    probs = PROBS.float()
    for mask in (MASK.double(), MASK, MASK.bool()):
        loss = balance_loss(probs, mask)
        assert loss.dtype == torch.float32
        assert loss.item() == pytest.approx(1.15, abs=1e-6)


def test_balance_loss_single_real_token_and_none() -> None:
    # only (0.9, 0.1) is real: f = (1, 0), P = (0.9, 0.1), L = 2 · 0.9 = 1.8
    one = torch.tensor([[1, 0, 0], [0, 0, 0]])
    assert balance_loss(PROBS, one).item() == pytest.approx(1.8, abs=1e-12)
    # no real token: 0, not NaN
    assert balance_loss(PROBS, torch.zeros(2, 3)).item() == 0.0


def test_balance_loss_masked_gradient_reaches_real_tokens_only() -> None:
    probs = PROBS.clone().requires_grad_(True)
    balance_loss(probs, MASK).backward()
    # dL/dP_i = N · f_i / count: (2 · 0.75 / 4, 2 · 0.25 / 4) = (0.375, 0.125) on real tokens, 0 on padding
    expected = torch.tensor([0.375, 0.125], dtype=torch.float64) * MASK[..., None]
    torch.testing.assert_close(probs.grad, expected)


# --------------------------------------------------------------------------- checkpoint binding


def _record_calls(model, state: RoutingState) -> list:
    seen: list = []
    # the MLP runs inside the checkpointed layer forward (the layer's own hooks run outside it); a pre-hook,
    # since non-reentrant recomputation stops as soon as the saved tensors are recomputed
    model.model.layers[0].mlp.register_forward_pre_hook(lambda *_: seen.append(state.call))
    return seen


@pytest.mark.parametrize("reentrant", [False, True])
def test_bind_to_checkpoints_shows_the_call_to_recomputed_layers(reentrant) -> None:
    model = make_tiny_llama(layers=1)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    state = RoutingState()
    bind_to_checkpoints(model, state)
    seen = _record_calls(model, state)
    call = RoutingCall()
    ids = torch.tensor([[3, 4, 5]])
    model.get_input_embeddings().weight.requires_grad_(True)
    with routing(state, call):
        loss = model(input_ids=ids, labels=ids).loss
    assert state.call is None
    loss.backward()  # recomputes layer 0 after the call has closed
    assert len(seen) == 2
    assert seen[0] is call and seen[1] is call
    assert state.call is None  # restored after the recomputation


def test_bind_to_checkpoints_without_binding_the_recomputation_sees_no_call() -> None:
    # the failure bind_to_checkpoints exists for: without it the recomputed layer sees no call
    model = make_tiny_llama(layers=1)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    state = RoutingState()
    seen = _record_calls(model, state)
    call = RoutingCall()
    ids = torch.tensor([[3, 4, 5]])
    with routing(state, call):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert seen == [call, None]


class _Holder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self._gradient_checkpointing_func = lambda function, *a, **kw: function(*a, **kw)


def test_bind_to_checkpoints_is_idempotent_per_state_and_passes_arguments() -> None:
    outer = torch.nn.Sequential(_Holder(), torch.nn.Linear(1, 1))
    holder = outer[0]
    state, other = RoutingState(), RoutingState()
    bind_to_checkpoints(outer, state)
    wrapped = holder._gradient_checkpointing_func
    assert wrapped._asymlora_state is state
    assert not hasattr(outer[1], "_gradient_checkpointing_func")
    bind_to_checkpoints(outer, state)
    assert holder._gradient_checkpointing_func is wrapped  # not wrapped twice
    call = RoutingCall()
    seen: list = []

    def function(a, b, *, scale):
        seen.append(state.call)
        return (a - b) * scale

    with routing(state, call):
        assert wrapped(function, 7, 2, scale=3) == 15
    assert seen == [call]
    bind_to_checkpoints(outer, other)  # another state: wrapped again, around the first wrapper
    assert holder._gradient_checkpointing_func is not wrapped
    assert holder._gradient_checkpointing_func._asymlora_state is other


# --------------------------------------------------------------------------- the balance loss's gradient path
#
# One router weight w (N = 2, d = 1) on two tokens x = (1, 2); the layer's output uses the gate as
# out = Σ gate · c. With the balance terms attached to the gate, add_balance_loss must give w the gradient
# of out + mean(terms), as if the terms had been added to the loss directly.


def _layer(w: torch.Tensor, call: RoutingCall, scale: float) -> torch.Tensor:
    x = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    probs = (x @ w.T).softmax(-1)
    aux = scale * balance_loss(probs)
    gate = attach_balance_loss(probs, aux, call)
    return (gate * torch.tensor([1.0, -3.0], dtype=torch.float64)).sum()


def _reference_grad(w0: torch.Tensor, scales: tuple[float, ...], factor: float) -> torch.Tensor:
    w = w0.clone().requires_grad_(True)
    x = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    c = torch.tensor([1.0, -3.0], dtype=torch.float64)
    total = torch.zeros((), dtype=torch.float64)
    terms = []
    for s in scales:
        probs = (x @ w.T).softmax(-1)
        total = total + (probs * c).sum()
        terms.append(s * balance_loss(probs))
    (factor * (total + torch.stack(terms).mean())).backward()
    assert w.grad is not None
    return w.grad


@pytest.mark.parametrize("factor", [1.0, 0.25])
def test_add_balance_loss_gives_the_router_the_gradient_of_the_mean_term(factor) -> None:
    w0 = torch.tensor([[0.3], [-0.5]], dtype=torch.float64)
    w = w0.clone().requires_grad_(True)
    call = RoutingCall(collect_aux=True)
    out = _layer(w, call, 1.0) + _layer(w, call, 3.0)  # two layers, terms L and 3L
    assert len(call.aux_losses) == 2
    assert not call.aux_losses[0].requires_grad
    total, mean = add_balance_loss(out, call)
    assert mean.item() == pytest.approx((1.0 + 3.0) / 2 * call.aux_losses[0].item(), rel=1e-12)
    assert total.item() == pytest.approx(out.item() + mean.item(), rel=1e-12)
    (factor * total).backward()
    assert call.aux_grad is not None and call.aux_grad.item() == pytest.approx(factor / 2)
    torch.testing.assert_close(w.grad, _reference_grad(w0, (1.0, 3.0), factor))


def test_a_loss_without_the_balance_term_leaves_the_router_its_task_gradient_only() -> None:
    w0 = torch.tensor([[0.3], [-0.5]], dtype=torch.float64)
    w = w0.clone().requires_grad_(True)
    call = RoutingCall(collect_aux=True)
    _layer(w, call, 1.0).backward()  # aux_grad is None: the gate's own gradient only
    ref = w0.clone().requires_grad_(True)
    x = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    ((x @ ref.T).softmax(-1) * torch.tensor([1.0, -3.0], dtype=torch.float64)).sum().backward()
    torch.testing.assert_close(w.grad, ref.grad)


def test_add_balance_loss_averages_in_the_loss_dtype() -> None:
    # float32 terms 0.1, 0.2, 0.4 averaged in float64 (the loss dtype): float64(0.1f + 0.2f + 0.4f) / 3,
    # which the float32 mean 0.23333334f misses by about 1e-8
    call = RoutingCall(collect_aux=True)
    call.aux_losses = [torch.tensor(v, dtype=torch.float32) for v in (0.1, 0.2, 0.4)]
    loss = torch.tensor(1.0, dtype=torch.float64)
    total, mean = add_balance_loss(loss, call)
    exact = sum(float(torch.tensor(v, dtype=torch.float32)) for v in (0.1, 0.2, 0.4)) / 3
    assert mean.dtype == torch.float64 and total.dtype == torch.float64
    assert mean.item() == pytest.approx(exact, abs=1e-15)
    assert total.item() == pytest.approx(1.0 + exact, abs=1e-15)


def test_task_gate_has_one_column_per_expert() -> None:
    # task ids 0 and 1 of N = 3 experts: the third column exists and is zero
    gate = task_gate(torch.tensor([1, 0]), 3, torch.zeros(2, 4, 5))
    assert gate.shape == (2, 1, 3)
    assert gate[:, 0].tolist() == [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]


def test_closed_call_records_no_term() -> None:
    call = RoutingCall(collect_aux=True, open=False)
    gate = torch.ones(2)
    out = attach_balance_loss(gate, torch.tensor(0.5), call)
    assert call.aux_losses == []
    assert out.tolist() == [1.0, 1.0]
