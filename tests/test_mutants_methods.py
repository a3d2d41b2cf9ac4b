"""Hand values for the task-routed fast path (mutation survivors, docs/testing.md): the default
`AdapterMethod.routed_delta` / `task_delta` that a method without its own gather inherits, and
`RoutingCall.task_rows`, the per-call cache of each row's task id."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from asymlora.methods.base import AdapterMethod
from asymlora.routing import RoutingCall


class PerTaskPairs(AdapterMethod):
    """A method with only the required hooks: expert t is the plain LoRA (A[t], B[t])."""

    name = "per_task_pairs_test"

    def specs(self, cfg, d_in, d_out):
        raise NotImplementedError

    def init_(self, t, cfg):
        raise NotImplementedError

    def task_factors(self, t: dict[str, Tensor], task: int) -> tuple[Tensor, Tensor]:
        return t["A"][task], t["B"][task]


# d_in = 2, r = 1, d_out = 2:  A_0 = [1, 0], B_0 = [1, 2]ᵀ;  A_1 = [0, 1], B_1 = [3, −1]ᵀ.
#   row (2, 5) with task 0: A_0 x = 2 → B_0 · 2 = (2, 4)
#   row (2, 5) with task 1: A_1 x = 5 → B_1 · 5 = (15, −5)
#   row (−1, 4) with task 1: A_1 x = 4 → (12, −4)
T = {
    "A": torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]]),  # (N, r, d_in)
    "B": torch.tensor([[[1.0], [2.0]], [[3.0], [-1.0]]]),  # (N, d_out, r)
}
X = torch.tensor([[2.0, 5.0], [2.0, 5.0], [-1.0, 4.0]])


def test_default_routed_delta_uses_each_rows_own_pair():
    method = PerTaskPairs()
    want = torch.tensor([[2.0, 4.0], [15.0, -5.0], [12.0, -4.0]])
    ids = torch.tensor([0, 1, 1])
    torch.testing.assert_close(method.routed_delta(X, T, ids), want, rtol=0, atol=0)
    # with a token axis (batch, seq = 2, d_in): every token of a row through that row's pair
    x3 = torch.stack([X, 2 * X], dim=1)  # (3, 2, 2)
    out = method.routed_delta(x3, T, ids)
    assert out.shape == (3, 2, 2)
    torch.testing.assert_close(out, torch.stack([want, 2 * want], dim=1), rtol=0, atol=0)
    # the other assignment of tasks: row 0 with task 1 → (15, −5), rows 1, 2 with task 0 → (2, 4), (−1, −2)
    want_swapped = torch.tensor([[15.0, -5.0], [2.0, 4.0], [-1.0, -2.0]])
    torch.testing.assert_close(
        method.routed_delta(X, T, torch.tensor([1, 0, 0])), want_swapped, rtol=0, atol=0
    )


def test_default_task_delta_is_one_pair_for_the_whole_batch():
    method = PerTaskPairs()
    torch.testing.assert_close(
        method.task_delta(X, T, 1), torch.tensor([[15.0, -5.0], [15.0, -5.0], [12.0, -4.0]]), rtol=0, atol=0
    )
    torch.testing.assert_close(
        method.task_delta(X, T, 0), torch.tensor([[2.0, 4.0], [2.0, 4.0], [-1.0, -2.0]]), rtol=0, atol=0
    )


def test_task_rows_gives_ids_and_the_uniform_task():
    cpu = torch.device("cpu")
    ids, uniform = RoutingCall(task_ids=torch.tensor([2, 2, 2])).task_rows(3, cpu)
    assert ids.tolist() == [2, 2, 2] and uniform == 2 and isinstance(uniform, int)
    ids, uniform = RoutingCall(task_ids=torch.tensor([0, 1])).task_rows(2, cpu)
    assert ids.tolist() == [0, 1] and uniform is None
    ids, uniform = RoutingCall(task_ids=torch.tensor([1, 1, 0])).task_rows(3, cpu)  # only the first two agree
    assert uniform is None
    assert RoutingCall().task_rows(4, cpu) is None
    assert RoutingCall(task_ids=torch.tensor([4])).task_rows(1, cpu)[1] == 4  # one row is uniform
    # no rows: nothing is uniform (and no ids[0] to read)
    ids, uniform = RoutingCall(task_ids=torch.zeros(0, dtype=torch.long)).task_rows(0, cpu)
    assert ids.numel() == 0 and uniform is None


def test_task_rows_caches_per_batch_size_and_layout():
    cpu = torch.device("cpu")
    call = RoutingCall(task_ids=torch.tensor([1, 0]), repeat_rows=False)
    first = call.task_rows(2, cpu)
    assert call.task_rows(2, cpu) is first  # computed once per call
    # OPT's flattened MLP rows: 2 examples × 3 tokens, each example's id repeated over its tokens
    flat_ids, flat_uniform = call.task_rows(6, cpu, flat_tokens=True)
    assert flat_ids.tolist() == [1, 1, 1, 0, 0, 0] and flat_uniform is None
    assert call.task_rows(2, cpu)[0].tolist() == [1, 0]  # the flattened layout did not replace it
    assert call.task_rows(6, cpu, True)[0].tolist() == [1, 1, 1, 0, 0, 0]
    # the same 6 rows without the flattened layout (and without repeat_rows) do not fit 2 task ids
    with pytest.raises(ValueError, match="task_ids has 2 entries but the batch has 6 rows"):
        call.task_rows(6, cpu)
    # a uniform call keeps its task id for every layout
    same = RoutingCall(task_ids=torch.tensor([3, 3]))
    assert same.task_rows(2, cpu)[1] == 3
    assert same.task_rows(4, cpu, flat_tokens=True)[1] == 3
    assert same.task_rows(4, cpu, flat_tokens=True)[0].tolist() == [3, 3, 3, 3]


def test_default_delta_and_required_gate_messages():
    # PerTaskPairs has no x_side matrix and does not override delta
    with pytest.raises(NotImplementedError) as err:
        PerTaskPairs().delta(X, T, torch.ones(3, 2))
    assert str(err.value) == "method 'per_task_pairs_test' has no x_side matrix, so it must override delta"
    gate = torch.ones(3, 2)
    assert PerTaskPairs().required_gate(gate) is gate
    with pytest.raises(ValueError) as err:
        PerTaskPairs().required_gate(None)
    assert str(err.value) == (
        "method 'per_task_pairs_test' mixes its experts with the router's gate (..., N), but the gate is None; "
        "pass the gate, or use task_delta / routed_delta for task routing"
    )
