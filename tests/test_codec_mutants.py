"""`asymlora.federated.codec` on hand-computed values (mutation tests, session 10): message sizes, the NumPy
and safetensors round trips, and the int8 quantiser's edge cases (float32 arithmetic, empty tensors,
subnormal rows). docs/testing.md, "Mutation results, session 10", lists what these tests kill."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch

from asymlora.federated import codec


def test_payload_params_and_bytes_count_values_at_their_dtype() -> None:
    state = {
        "a": torch.zeros(3, 4),  # 12 float32: 48 B
        "b": torch.zeros(5, dtype=torch.bfloat16),  # 5 × 2 = 10 B
        "c": torch.zeros(2, 2, dtype=torch.int64),  # 4 × 8 = 32 B
        "m": torch.empty(7, 3, device="meta"),  # 21 float32 on the meta device: 84 B
    }
    assert codec.payload_params(state) == 12 + 5 + 4 + 21
    assert codec.payload_bytes(state) == 48 + 10 + 32 + 84
    assert codec.payload_bytes({}) == 0 and codec.payload_params({}) == 0


def test_state_to_arrays_keeps_the_order_and_refuses_bfloat16_naming_the_fix() -> None:
    state = {"z": torch.tensor([[1.0, 2.0], [3.0, 4.0]]).T, "a": torch.tensor([5, 6])}  # a transposed view
    keys, arrays = codec.state_to_arrays(state)
    assert keys == ["z", "a"]
    assert arrays[0].tolist() == [[1.0, 3.0], [2.0, 4.0]] and arrays[0].flags["C_CONTIGUOUS"]
    assert arrays[1].tolist() == [5, 6] and arrays[1].dtype == np.int64
    with pytest.raises(TypeError) as info:
        codec.state_to_arrays({"w": torch.zeros(2, dtype=torch.bfloat16)})
    assert str(info.value).endswith(
        ": NumPy cannot hold these tensors; send them with asymlora.federated.client_app.to_record "
        "(bit-exact raw bytes) or state_to_bytes (safetensors)"
    )


def test_arrays_to_state_copies_each_array_and_checks_the_count() -> None:
    a, b = np.array([1.0, 2.0], dtype=np.float32), np.arange(6).reshape(2, 3)
    state = codec.arrays_to_state(["x", "y"], [a, b])
    assert list(state) == ["x", "y"] and state["x"].tolist() == [1.0, 2.0] and state["y"].shape == (2, 3)
    a[0] = 99.0  # a copy: the sender's buffer may be reused
    assert state["x"].tolist() == [1.0, 2.0]
    frozen = np.frombuffer(np.array([3.0, 4.0]).tobytes(), dtype=np.float64)  # read-only, as Flower's bytes
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns on a non-writable array
        thawed = codec.arrays_to_state(["w"], [frozen])["w"]
    thawed += 1.0
    assert thawed.tolist() == [4.0, 5.0]
    with pytest.raises(ValueError) as info:
        codec.arrays_to_state(["x", "y"], [a])
    assert str(info.value) == "2 keys for 1 arrays"


def test_safetensors_bytes_round_trip_from_bytes_bytearray_and_bytesio() -> None:
    state = {"w": torch.tensor([[1.5, -2.0], [0.25, 8.0]]).T, "n": torch.tensor([7], dtype=torch.int32)}
    data = codec.state_to_bytes(state)
    assert isinstance(data, bytes)
    for form in (data, bytearray(data), io.BytesIO(data)):
        back = codec.bytes_to_state(form)
        assert (
            set(back) == {"w", "n"} and torch.equal(back["w"], state["w"]) and back["n"].dtype == torch.int32
        )
    with pytest.raises(ValueError) as info:
        codec.bytes_to_state(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad}json")
    assert str(info.value).startswith("not a valid safetensors payload (") and str(info.value).endswith(")")


# --- int8 -------------------------------------------------------------------------------------------------
def test_int8_quantiser_works_in_float32_whatever_the_input_dtype() -> None:
    # row (127, 62.50000001) in float64: s = 1; in float32 the second value is 62.5, which rounds half to
    # even to 62 (float64 arithmetic would give 63)
    q, s = codec.quantize_int8_rows(torch.tensor([[127.0, 62.50000001]], dtype=torch.float64))
    assert q.tolist() == [[127, 62]] and s.dtype == torch.float32 and s.tolist() == [1.0]
    # bfloat16 input (3, 1.5): in float32 x / s = (127, 63.5) → (127, 64) (half to even); bfloat16 arithmetic
    # would round s to 0.0237 and give (126.5, 63.25) → (126, 63)
    q16, s16 = codec.quantize_int8_rows(torch.tensor([[3.0, 1.5]], dtype=torch.bfloat16))
    assert q16.tolist() == [[127, 64]] and s16.dtype == torch.float32


def test_int8_of_empty_tensors_has_one_zero_scale_per_row() -> None:
    for shape, rows in (((3, 0), 3), ((0, 4), 0), ((2, 0, 5), 2)):
        q, s = codec.quantize_int8_rows(torch.empty(shape))
        assert (
            q.shape == shape and q.dtype == torch.int8 and s.shape == (rows,) and s.tolist() == [0.0] * rows
        )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:  # the empty tensor's zero scales are float32 even under a float64 default dtype
        assert codec.quantize_int8_rows(torch.empty(3, 0))[1].dtype == torch.float32
    finally:
        torch.set_default_dtype(previous)


def test_int8_rows_of_subnormal_values_get_the_smallest_normal_scale() -> None:
    """A row whose absmax is 190 float32 ulps (2.66e-43): absmax / 127 rounded to 1 ulp (subnormal), and a
    row of 14 ulps: s = 14 ulps / 127 underflowed to 0, the row sent as zeros with an error (14 ulps) above its
    s/2 = 0 bound. Now both scales are the smallest normal float32 2^−126 (x / s < 1/2: q = 0), within the
    bound, and 1 / s is finite."""
    ulp = float(torch.tensor(1, dtype=torch.int32).view(torch.float32))
    tiny = 2.0**-126
    x = torch.tensor([[190 * ulp, -190 * ulp, 0.0], [14 * ulp, -14 * ulp, 7 * ulp]])
    q, s = codec.quantize_int8_rows(x)
    assert q.tolist() == [[0, 0, 0], [0, 0, 0]]
    assert s.tolist() == [tiny, tiny] and tiny == codec.SMALLEST_SCALE


def _bounded(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, s, decoded) of ``x``, checked: each scale 0 (an all-zero row) or a normal float32 with a finite
    reciprocal, and every value within s/2 of its decoded value."""
    q, s = codec.quantize_int8_rows(x)
    back = codec.dequantize_int8_rows(q, s)
    assert bool(((s == 0) | (s >= 2.0**-126)).all()) and bool(torch.isfinite(1 / s[s > 0]).all())
    x64, back64, s64 = x.double(), back.double(), s.double()
    assert bool(((x64 - back64).abs() <= s64[:, None] / 2).all()), (x, q, s, back)
    return q, s, back


def test_int8_zero_tiny_and_mixed_rows_round_trip_within_half_a_step() -> None:
    """A zero row: scale 0, decoded exactly. A row of 1e-40 (subnormal): its scale was 1e-40 / 127 = 7.9e-43,
    subnormal, whose reciprocal is inf (a decoder multiplying by 1 / s gets inf · 0 = NaN); now 2^−126, q = 0,
    decoded to 0 within 2^−127. A row mixing 1e-40 and 1.0: s = 1/127, 1.0 decoded exactly, 1e-40 to 0."""
    x = torch.tensor([[0.0, 0.0, 0.0], [1e-40, -1e-40, 1e-40], [1e-40, 1.0, -1e-40]])
    q, s, back = _bounded(x)
    assert q.tolist() == [[0, 0, 0], [0, 0, 0], [0, 127, 0]]
    assert s.tolist() == [0.0, 2.0**-126, pytest.approx(1 / 127)]
    assert back[0].tolist() == [0.0, 0.0, 0.0] and back[1].tolist() == [0.0, 0.0, 0.0]
    assert back[2].tolist() == [0.0, 1.0, 0.0]


def test_int8_small_normal_rows_survive_flush_to_zero_arithmetic() -> None:
    """A row of normal values (1e-37, −3e-38): absmax / 127 = 7.9e-40 is subnormal, which flush-to-zero
    arithmetic (torch.set_flush_denormal(True), as fast-math kernels) makes 0: the row was sent as zeros, an
    error of 1e-37. With s = 2^−126: q = round(1e-37 / 2^−126) = round(8.51) = 9, round(−2.55) = −3."""
    assert torch.set_flush_denormal(True), "this CPU has no flush-to-zero mode"
    try:
        q, s, _ = _bounded(torch.tensor([[1e-37, -3e-38, 0.0]]))
    finally:
        torch.set_flush_denormal(False)
    assert q.tolist() == [[9, -3, 0]] and s.tolist() == [2.0**-126]


def test_int8_messages_and_dequantised_dtype() -> None:
    with pytest.raises(ValueError) as info:
        codec.quantize_int8_rows(torch.tensor([1, 2]))
    assert str(info.value) == "int8 transfer quantises floating-point tensors, got torch.int64"
    with pytest.raises(ValueError) as info:
        codec.quantize_int8_rows(torch.tensor([[0.0], [float("inf")]]))
    assert str(info.value) == "int8 transfer cannot quantise a tensor holding NaN or Inf"
    with pytest.raises(ValueError) as info:
        codec.dequantize_int8_rows(torch.zeros(2, 3, dtype=torch.int8), torch.ones(3))
    assert str(info.value) == "int8 tensor of shape (2, 3) needs 2 row scales, got (3,)"
    # float64 scales still give float32 values: 3 · 0.5 and −2 · 0.25
    back = codec.dequantize_int8_rows(
        torch.tensor([[3], [-2]], dtype=torch.int8), torch.tensor([0.5, 0.25], dtype=torch.float64)
    )
    assert back.dtype == torch.float32 and back.tolist() == [[1.5], [-0.5]]
    with pytest.raises(ValueError) as info:
        codec.transfer_payload_bytes({}, "int4")
    assert str(info.value) == "transfer dtype 'int4' is not one of ['float32', 'bfloat16', 'float16', 'int8']"


def test_transfer_bytes_of_each_dtype_by_hand() -> None:
    state = {
        "m": torch.empty(4, 3, 2, device="meta"),  # 24 values in 4 rows
        "v": torch.zeros(5, dtype=torch.float64),  # 5 values, one row
        "s": torch.zeros((), dtype=torch.float16),  # a scalar: one value, one row
        "i": torch.zeros(3, dtype=torch.int16),  # not floating: 3 × 2 B whatever the transfer dtype
    }
    assert codec.transfer_payload_bytes(state, "float32") == 4 * 30 + 6
    assert codec.transfer_payload_bytes(state, "bfloat16") == 2 * 30 + 6
    assert codec.transfer_payload_bytes(state, "float16") == 2 * 30 + 6
    assert codec.transfer_payload_bytes(state, "int8") == (24 + 4 * 4) + (5 + 4) + (1 + 4) + 6
