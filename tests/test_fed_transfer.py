"""Compressed transfers (``transfer.up`` / ``transfer.down``): the int8 per-row quantiser against hand-computed
values, the 16-bit casts, the wire format's byte counts, and a two-client round in process (the ServerApp loop
against the ClientApp) whose int8 upload is counted as sent and aggregated within the quantisation error."""

from __future__ import annotations

import os

os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

from pathlib import Path

import pytest
import torch
from tests import test_fed_apps as apps

from asymlora.config import ConfigError
from asymlora.federated.codec import dequantize_int8_rows, quantize_int8_rows, transfer_payload_bytes

pytest.importorskip("flwr")
# the app tests' fixtures: the tiny model and tasks on disk, the identity Flower gives the ServerApp
assets, task_identity = apps.assets, apps.task_identity


# --- the quantiser ---------------------------------------------------------------------------------------------
def test_int8_rows_match_hand_computed_values() -> None:
    """Row 0: absmax 2.54, s = 0.02, q = (50, −127, 25); row 1: absmax 0.3, s = 0.3/127,
    0.1/s = 42.33 → 42, −0.06/s = −25.4 → −25, 0.3/s = 127."""
    x = torch.tensor([[1.0, -2.54, 0.5], [0.3, 0.1, -0.06]])
    q, s = quantize_int8_rows(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert q.tolist() == [[50, -127, 25], [127, 42, -25]]
    assert s.tolist() == pytest.approx([0.02, 0.3 / 127], rel=1e-6)
    back = dequantize_int8_rows(q, s)
    want = [[1.0, -2.54, 0.5], [0.3, 42 * 0.3 / 127, -25 * 0.3 / 127]]
    assert back.tolist() == [pytest.approx(r, rel=1e-6) for r in want]


def test_int8_error_is_at_most_half_a_step_per_row_and_zero_rows_stay_zero() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 33, generator=g) * torch.logspace(-4, 2, 7)[:, None]
    x[3] = 0.0
    q, s = quantize_int8_rows(x)
    err = (x - dequantize_int8_rows(q, s)).abs().amax(dim=1)
    assert bool((err <= s / 2 * (1 + 1e-5) + 1e-12).all())
    assert s[3] == 0 and bool((q[3] == 0).all()) and bool((dequantize_int8_rows(q, s)[3] == 0).all())
    assert int(q.abs().amax(dim=1)[torch.arange(7) != 3].min()) == 127  # every non-zero row uses the range
    v = torch.tensor([0.5, -1.0, 0.25])  # a 1-D tensor is one row
    assert quantize_int8_rows(v)[0].tolist() == [64, -127, 32] and quantize_int8_rows(v)[1].shape == (1,)
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_int8_rows(torch.tensor([[1.0, float("nan")]]))


@pytest.mark.parametrize(
    ("dtype", "values"),
    [
        ("bfloat16", [1.5, -0.375, 2.0**-100, 3.0 * 2.0**100, 0.0, -0.0]),
        ("float16", [1.5, -0.375, 2.0**-24, 65504.0, 0.0, -0.0]),
    ],
)
def test_16_bit_transfers_are_exact_where_representable(dtype: str, values: list[float]) -> None:
    from asymlora.federated.messages import RAW_STYPE, from_record, to_record

    x = torch.tensor(values, dtype=torch.float32).reshape(2, 3)
    record = to_record({"w": x}, transfer_dtype=dtype)
    assert record["w"].stype == RAW_STYPE and record["w"].dtype == dtype
    assert record.count_bytes() == 6 * 2 + len("w")  # 2 B per value, no header
    back = from_record(record, float_dtype=torch.float32)["w"]
    assert back.dtype == torch.float32 and torch.equal(back, x)
    assert torch.equal(back.signbit(), x.signbit())
    assert not torch.equal(from_record(to_record({"w": x + 1e-3}, dtype))["w"].float(), x + 1e-3)


def test_int8_wire_format_counts_values_plus_row_scales() -> None:
    from asymlora.federated.messages import INT8_STYPE, from_record, to_record

    x = {"lora_B": torch.randn(32, 2), "bias": torch.randn(5), "steps": torch.arange(3)}
    record = to_record(x, transfer_dtype="int8")
    assert record["lora_B"].stype == record["bias"].stype == INT8_STYPE
    # 64 int8 + 32 float32 scales; 5 int8 + 1 scale; the int64 tensor as it is (NumPy, with its header)
    assert len(record["lora_B"].data) == 64 + 4 * 32 and len(record["bias"].data) == 5 + 4
    assert transfer_payload_bytes(x, "int8") == (64 + 128) + (5 + 4) + 3 * 8
    assert (
        transfer_payload_bytes(x, "bfloat16") == 2 * 69 + 24
        and transfer_payload_bytes(x, "float32") == 4 * 69 + 24
    )
    back = from_record(record)
    assert torch.equal(back["steps"], x["steps"]) and back["lora_B"].dtype == torch.float32
    q, s = quantize_int8_rows(x["lora_B"])
    assert torch.equal(back["lora_B"], dequantize_int8_rows(q, s))
    bad = type(record)({"w": type(record["bias"])("int8", (2, 3), INT8_STYPE, b"\0" * 7)})
    with pytest.raises(ValueError, match="not 6 int8 values \\+ 2 float32 scales"):
        from_record(bad)
    with pytest.raises(ValueError, match="'int4' is not one of"):
        to_record(x, transfer_dtype="int4")


# --- config -----------------------------------------------------------------------------------------------------
def test_a_transfer_dtype_the_run_cannot_use_is_refused_before_round_1(tmp_path: Path) -> None:
    from asymlora.federated.config import load_fed_config

    base = ["data.tasks=[parity]", "clients.num=1"]
    with pytest.raises(ConfigError, match=r"transfer.up='int4' is not allowed; choose one of \['float32'"):
        load_fed_config(None, [*base, "transfer.up=int4"]).validate()
    client_dp = [*base, "dp.clipping=client", "dp.noise_multiplier=1.0"]
    with pytest.raises(ConfigError, match=r"transfer.up='int8'.*dp.clipping=client.*use dp.clipping=server"):
        load_fed_config(None, [*client_dp, "transfer.up=int8"]).validate()
    with pytest.raises(ConfigError, match=r"transfer.down='bfloat16' with dp.clipping=client"):
        load_fed_config(None, [*client_dp, "transfer.down=bfloat16"]).validate()
    ok = load_fed_config(None, [*base, "dp.clipping=server", "dp.noise_multiplier=1.0", "transfer.up=int8"])
    assert ok.validate().transfer.up == "int8" and load_fed_config(None, base).transfer.lossy is False


# --- a round in process ------------------------------------------------------------------------------------------
class RecordingGrid(apps.InProcessGrid):
    """`apps.InProcessGrid` that also keeps every train reply's upload ArrayRecord, by client node."""

    def __init__(self, num: int) -> None:
        super().__init__(num)
        self.uploads: dict[int, object] = {}

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive(messages, timeout=timeout)
        for m, r in zip(messages, replies, strict=True):
            if m.metadata.message_type == "train" and not r.has_error():
                self.uploads[m.metadata.dst_node_id] = r.content.array_records["arrays"]
        return replies


def _run(root: Path, tmp_path: Path, name: str, **transfer: str) -> tuple[RecordingGrid, dict, dict]:
    from safetensors.torch import load_file

    from asymlora.federated.config import load_fed_config
    from asymlora.federated.server_app import run_server

    run = tmp_path / name
    path = apps.write_config(tmp_path / f"{name}.yaml", root, run, rounds=1, log_keys=True, transfer=transfer)
    grid = RecordingGrid(2)
    outcome = run_server(grid, load_fed_config(path), "fedalora", run / "fedalora", say=lambda _: None)
    assert outcome.status == "completed", outcome.message
    (record,) = apps.read_rounds(run / "fedalora" / "rounds.jsonl")
    return grid, record, load_file(str(run / "fedalora" / "checkpoint" / "server_state.safetensors"))


@pytest.mark.fed
def test_int8_upload_round_counts_the_bytes_sent_and_aggregates_within_the_error(
    assets: Path,
    tmp_path: Path,
    task_identity,
) -> None:
    """fedalora on the tiny model, 2 clients, 1 round, up = int8: each client sends its 4 B matrices (32 × 2)
    as 64 int8 values + 32 float32 scales + the key; the aggregate is the float32 run's within Σ_k p_k s_k / 2
    (the clients train identically in both runs: same seed, same float32 download)."""
    from asymlora.federated.messages import INT8_STYPE, from_record

    g32, r32, agg32 = _run(assets, tmp_path, "f32")
    g8, r8, agg8 = _run(assets, tmp_path, "i8", up="int8")
    for c in r8["clients"]:
        assert c["status"] == "ok" and len(c["keys_up"]) == 4
        assert c["bytes_up"] == sum(64 + 4 * 32 + len(k) for k in c["keys_up"])
        assert c["payload_up"] == 4 * (64 + 4 * 32)
    assert r8["bytes_up"] == sum(c["bytes_up"] for c in r8["clients"]) < r32["bytes_up"]
    assert r8["bytes_down"] == r32["bytes_down"]  # the download stays float32
    assert {a.stype for rec in g8.uploads.values() for a in rec.values()} == {INT8_STYPE}
    n = {c["client"]: c["num_examples"] for c in r32["clients"]}
    bound = {k: torch.zeros(t.shape[0]) for k, t in agg32.items()}
    for node, record in g32.uploads.items():
        p = n[node - 100] / sum(n.values())
        for k, t in from_record(record).items():
            bound[k] += p * t.abs().amax(dim=1) / 127 / 2
    assert set(agg8) == set(agg32)
    for k in agg32:
        err = (agg8[k] - agg32[k]).abs().amax(dim=1)
        assert bool((err <= bound[k] * (1 + 1e-4) + 1e-9).all()), k
    assert any(not torch.equal(agg8[k], agg32[k]) for k in agg32)  # the upload was really quantised


def test_the_accounting_table_counts_the_wire_bytes() -> None:
    """LLaMA-2-7B, r = 8, q_proj and v_proj in 32 layers: 64 matrices each way. fedalora moves B (4096 × 8):
    int8 = 32768 values + 4096 row scales × 4 B; fedsa moves A (8 × 4096): 32768 + 8 × 4 B."""
    from asymlora.federated.accounting import communication_table

    int8 = {row.strategy: row for row in communication_table("llama2-7b", transfer=("int8", "int8"))}
    assert int8["fedalora"].bytes == 2 * 64 * (32768 + 4 * 4096)
    assert int8["fedsa"].bytes == 2 * 64 * (32768 + 4 * 8)


def test_a_train_instruction_keeps_its_optional_fields_through_the_wire() -> None:
    """Every optional field of a train instruction (transfer dtype, carried round, client-side clipping norm)
    decodes to what was encoded: the client reads the instruction through `decode_instruction` only."""
    from types import SimpleNamespace

    from flwr.app import ConfigRecord, RecordDict

    from asymlora.federated import messages as m

    sent = m.TrainInstruction(
        round=2, strategy="fedalora", client=1, rank=8, config_hash="h",
        clipping_norm=0.5, carried_round=0, transfer_up="int8",
    )  # fmt: skip
    content = RecordDict({m.ARRAYS: sent.arrays, m.CONFIG: ConfigRecord(sent.config_fields())})
    got = m.decode_instruction(
        SimpleNamespace(content=content, metadata=SimpleNamespace(message_type=m.TRAIN))
    )
    assert (got.transfer_up, got.carried_round, got.clipping_norm) == ("int8", 0, 0.5)
    assert got == sent
