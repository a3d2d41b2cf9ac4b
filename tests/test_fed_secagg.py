"""Secure aggregation with Flower's SecAgg+ (`asymlora.federated.secagg`): the aggregate equals the plain
FedAvg of the same uploads (computed here by hand with torch) within the analytic quantisation bound, for
fedalora, zeropad and fedalora-het, weighted by examples; a client that drops out after training is
recovered from the shares; too few clients halt the round; bad configs fail before round 1.

Most tests drive the real ServerApp round loop against the real ClientApp (Flower's SecAggPlusWorkflow and
secaggplus_mod, four stages per round) in process (`tests.test_fed_apps.InProcessGrid`); one runs the Flower
simulation engine with SecAgg+ on and off."""

from __future__ import annotations

import os

os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

import json
import math
from pathlib import Path

import pytest
import torch
from tests import test_fed_apps as fed_apps

from asymlora.config import ConfigError
from asymlora.federated import secagg_client
from asymlora.federated.config import FedConfig, load_fed_config
from asymlora.federated.messages import decode_train_reply
from asymlora.federated.round_log import load_checkpoint
from asymlora.federated.secagg import SecAggSettings, error_bound, secagg_vector, weight_factor
from asymlora.federated.secagg_server import STAGES
from asymlora.federated.server_app import run_server

pytestmark = pytest.mark.fed
assets, task_identity = fed_apps.assets, fed_apps.task_identity
fed, read_rounds, write_config = fed_apps.fed, fed_apps.read_rounds, fed_apps.write_config

SECAGG = {"enabled": True, "max_weight": 100.0}
DIRICHLET = ("clients.partition=dirichlet", "clients.alpha=1.0")  # unequal example counts


class CopyingGrid(fed_apps.InProcessGrid):
    """`InProcessGrid` that gives every node its own copy of a message's content, as Flower's wire does
    (Flower's workflow sends one RecordDict object to all nodes, and ``secaggplus_mod`` edits it)."""

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

        messages = list(messages)
        for m in messages:
            m.content = recorddict_from_proto(recorddict_to_proto(m.content))
        return super().send_and_receive(messages, timeout=timeout)


@pytest.fixture
def captured(monkeypatch) -> list[dict]:
    """Every client's plaintext input to SecAgg+, recorded on the client: its upload and the download, its
    id and num_examples as its train reply says (``weight``: the reference's n_k, not what the mod chose)."""
    seen: list[dict] = []
    replies: list = []

    def reply_spy(content):
        replies.append(decode_train_reply(content))
        return replies[-1]

    def spy(aggregation, upload, download, settings, weight):
        last = replies[-1]  # in process, each client's reply is decoded right before its vector is built
        seen.append({"upload": dict(upload), "download": dict(download), "weight": last.num_examples})
        seen[-1].update(client=last.client, settings=settings)
        return secagg_vector(aggregation, upload, download, settings, weight)

    monkeypatch.setattr(secagg_client, "decode_train_reply", reply_spy)
    monkeypatch.setattr(secagg_client, "secagg_vector", spy)
    return seen


def _run(assets: Path, tmp_path: Path, strategy: str, *overrides: str, **top) -> tuple[dict, list[dict]]:
    """One in-process run of ``strategy`` over 3 clients; (round-1 state from the checkpoint, rounds)."""
    top.setdefault("secagg", SECAGG)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = write_config(
        tmp_path / "fed.yaml", assets, tmp_path / "run", 3, strategies=[strategy], rounds=1, **top
    )
    cfg = load_fed_config(path, [*DIRICHLET, *overrides])
    out = tmp_path / "run" / strategy
    outcome = run_server(CopyingGrid(3), cfg, strategy, out, say=lambda _: None)
    assert outcome.status == "completed", outcome.message
    state, _ = load_checkpoint(out)
    return state, read_rounds(out / "rounds.jsonl")


def _plain_fedavg(seen: list[dict], accumulate: bool = False) -> dict[str, torch.Tensor]:
    """Σ n_k U_k / Σ n_k by hand (zero-padded to the download's shape; + B0 for Fed-ALoRA-het)."""
    total = sum(s["weight"] for s in seen)
    out = {}
    for name, ref in seen[0]["download"].items():
        acc = ref.double().clone() if accumulate else torch.zeros(ref.shape, dtype=torch.float64)
        for s in seen:
            u = s["upload"][name].double()
            padded = torch.zeros(ref.shape, dtype=torch.float64)
            padded[tuple(slice(n) for n in u.shape)] = u
            acc += s["weight"] / total * padded
        out[name] = acc
    return out


def _max_error(state: dict, reference: dict, label: str = "") -> float:
    """Largest |state − reference| over all coordinates; with ``label``, print max and mean (``pytest -s``:
    the figures of docs/federated.md, "Secure aggregation")."""
    diff = torch.cat([(state[n].double() - reference[n]).abs().flatten() for n in reference])
    if label:
        print(f"{label}: SecAgg+ vs plain FedAvg over {diff.numel()} values: max {float(diff.max()):.3g}, "
              f"mean {float(diff.mean()):.3g}")  # fmt: skip
    return float(diff.max())


def _bound(seen: list[dict], reference: dict) -> float:
    """The analytic bound 3βN/(QΣd_k) plus the float32 rounding of the stored state (half an ulp)."""
    largest = max(float(r.abs().max()) for r in reference.values())
    return error_bound(SecAggSettings(**SECAGG), [s["weight"] for s in seen]) + largest * 2.0**-24


def test_fedalora_aggregate_is_the_weighted_mean_within_the_bound(
    assets: Path, tmp_path: Path, task_identity, captured
) -> None:
    """fedalora, 3 clients with unequal example counts: the SecAgg+ aggregate of B is the example-weighted
    mean of the captured uploads within the analytic bound, and visibly not the unweighted mean."""
    state, (r1,) = _run(assets, tmp_path, "fedalora")
    assert len(captured) == 3 and r1["accepted"] == [0, 1, 2] and r1["secagg"]["completed"]
    captured.sort(key=lambda s: s["client"])
    weights = [s["weight"] for s in captured]
    assert weights == [c["num_examples"] for c in r1["clients"]] and len(set(weights)) > 1, weights
    reference = _plain_fedavg(captured)
    err, bound = _max_error(state, reference, "fedalora"), _bound(captured, reference)
    print(f"bound {bound:.3g}; example counts {weights}; largest |value| "
          f"{max(float(r.abs().max()) for r in reference.values()):.3g}")  # fmt: skip
    assert 0 < err <= bound, (err, bound)
    assert r1["secagg"]["error_bound"] == pytest.approx(error_bound(SecAggSettings(**SECAGG), weights))
    unweighted = _plain_fedavg([dict(s, weight=1) for s in captured])
    assert _max_error(state, unweighted) > 100 * bound
    assert sum(r1["secagg"]["clipped"].values()) == 0
    total = sum(weights)
    assert r1["weights"] == {str(k): pytest.approx(w / total) for k, w in enumerate(weights)}


def test_zeropad_and_fedalora_het_through_secagg(
    assets: Path, tmp_path: Path, task_identity, captured
) -> None:
    """Ranks [4, 2, 2]: zeropad pads every client's A and B to rank 4 before masking; fedalora-het sends the
    product B2·B1 under B0's name and the server adds the mean to B0. Both within the bound."""
    ranks = ("clients.ranks=[4, 2, 2]", "adapter.intermediate_rank=4")
    state, (r1,) = _run(assets, tmp_path / "zp", "zeropad", *ranks)
    assert r1["accepted"] == [0, 1, 2]
    assert {
        tuple(s["upload"][n].shape) for s in captured for n in s["upload"] if n.endswith("A.default")
    } == {
        (4, 32),
        (2, 32),
    }
    reference = _plain_fedavg(captured)
    assert _max_error(state, reference, "zeropad") <= _bound(captured, reference)
    captured.clear()
    state, (r1,) = _run(assets, tmp_path / "het", "fedalora-het", *ranks)
    assert r1["accepted"] == [0, 1, 2] and all(set(s["upload"]) == set(s["download"]) for s in captured)
    reference = _plain_fedavg(captured, accumulate=True)
    assert _max_error(state, reference, "fedalora-het") <= _bound(captured, reference)
    assert {c["tensors_up"]["B0"] for c in r1["clients"]} == {4}


def test_a_dropout_after_training_is_unmasked_from_the_shares(
    assets: Path, tmp_path: Path, task_identity, captured
) -> None:
    """Client 1 raises in training (reconstruction_threshold 2 of 3): the others' masks are removed with
    the shares and the aggregate is the weighted mean of the two uploads that went in."""
    state, (r1,) = _run(assets, tmp_path, "fedalora", faults={"raise_in": ["1:1"]})
    assert r1["accepted"] == [0, 2] and len(captured) == 2
    assert r1["clients"][1]["status"] == "failed" and "injected fault" in r1["clients"][1]["reason"]
    reference = _plain_fedavg(captured)
    assert _max_error(state, reference) <= _bound(captured, reference)


def test_too_few_live_clients_halt_the_round(assets: Path, tmp_path: Path, task_identity, captured) -> None:
    """Threshold 3 of 3 and one client failing: SecAgg+ cannot unmask, the round keeps the old tensors
    and says why."""
    secagg = dict(SECAGG, reconstruction_threshold=3)
    state, (r1,) = _run(assets, tmp_path, "fedalora", faults={"raise_in": ["1:1"]}, secagg=secagg)
    assert r1["kept_previous"] and not r1["accepted"] and not r1["secagg"]["completed"]
    assert "SecAgg+ halted" in r1["note"] and "reconstruction_threshold=3" in r1["note"]
    assert all(float(t.abs().max()) == 0.0 for t in state.values())  # B starts at zero and stays


class SetupLostGrid(CopyingGrid):
    """`CopyingGrid` whose node 101 (client 1) never answers SecAgg+'s first exchange (setup), as a SuperNode
    that died before it: the others answer it and then wait for a stage that never comes."""

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        stages = {str(m.content.config_records.get("secaggplus_configs", {}).get("stage")) for m in messages}
        replies = super().send_and_receive(messages, timeout=timeout)
        return [r for r in replies if not (stages == {"setup"} and r.metadata.src_node_id == 101)]


def test_clients_never_asked_to_train_are_not_said_to_have_missed_a_reply(
    assets: Path, tmp_path: Path, task_identity
) -> None:
    """Threshold 3 of 3 and client 1 silent in setup: SecAgg+ halts before it sends the training stage. Client
    1's record says it did not reply; clients 0 and 2, which answered every message they were sent, say the
    workflow halted before asking them to train (not "no reply within timeouts.round")."""
    secagg = dict(SECAGG, reconstruction_threshold=3)
    path = write_config(tmp_path / "fed.yaml", assets, tmp_path / "run", 3, strategies=["fedalora"], rounds=1,
                        secagg=secagg)  # fmt: skip
    out = tmp_path / "run" / "fedalora"
    run_server(SetupLostGrid(3), load_fed_config(path, list(DIRICHLET)), "fedalora", out, say=lambda _: None)
    (r1,) = read_rounds(out / "rounds.jsonl")
    assert r1["kept_previous"] and not r1["secagg"]["completed"] and len(r1["secagg"]["stages"]) < 3
    lost, *waiting = [r1["clients"][k] for k in (1, 0, 2)]
    assert lost["status"] == "missing" and "no reply within timeouts.round" in lost["reason"]
    for rec in waiting:
        assert rec["status"] == "missing" and "no reply" not in rec["reason"], rec
        assert "SecAgg+ halted in its setup stage before asking this client to train" in rec["reason"]


def test_clipped_values_void_the_bound_and_warn(
    assets: Path, tmp_path: Path, task_identity, captured, caplog
) -> None:
    """value_bound 1e-12, far below the trained B: Flower clips values, so the round's record holds the
    clients' own clip counts (recounted here from the captured uploads, with the run's Q = 2^20), a null
    error bound, a warning naming the round and the fix, and results.json the count."""
    secagg = dict(SECAGG, value_bound=1e-12, quantization_range=2**20)
    with caplog.at_level("WARNING", logger="asymlora.federated.secagg_server"):
        _, (r1,) = _run(assets, tmp_path, "fedalora", secagg=secagg)
    expected = 0
    for c in captured:  # |d_k · U| > β, d_k = round(n_k / W · Q) / Q: Flower's weight (W = 100, Q = 2^20)
        assert c["settings"].quantization_range == 2**20  # the client counts with the run's Q
        d_k = round(c["weight"] / 100.0 * 2**20) / 2**20
        expected += sum(int((u.double().abs() * d_k > 1e-12).sum()) for u in c["upload"].values())
    assert expected > 0 and r1["secagg"]["clipped_total"] == expected
    assert sum(r1["secagg"]["clipped"].values()) == expected and r1["secagg"]["error_bound"] is None
    (warning,) = [r.getMessage() for r in caplog.records if "clipped" in r.getMessage()]
    assert (
        f"round 1: SecAgg+ clipped {expected} value(s)" in warning and "raise secagg.value_bound" in warning
    )
    res = json.loads((tmp_path / "run" / "fedalora" / "results.json").read_text())
    assert res["secagg_clipped"] == expected and res["secagg_rounds_clipped"] == [1]


def test_quantisation_arithmetic_against_flower() -> None:
    """The client's input and the server's unscaling around Flower's own quantiser: two clients, known
    values, weights 30 and 10 of W = 100; the dequantised weighted mean / scale is the hand-computed mean
    within the bound, a value above β is counted as clipped."""
    from flwr.common.secure_aggregation.quantization import dequantize, quantize

    from asymlora.federated.secagg import secagg_state

    s = SecAggSettings(enabled=True, value_bound=0.5, max_weight=100.0)
    down = {"b": torch.zeros(2, 3)}
    ups = [{"b": torch.tensor([[0.1, -0.2, 0.3], [0.4, -0.5, 0.0]])}, {"b": torch.full((2, 3), -0.25)}]
    weights = [30, 10]
    q, c, total, d_sum = s.quantization_range, s.clipping_range, 0.0, 0.0
    summed = torch.zeros(2, 3, dtype=torch.float64)
    for up, n in zip(ups, weights, strict=True):
        (x,), clipped = secagg_vector("mean", up, down, s, n)
        assert clipped == 0
        d = weight_factor(n, s.max_weight, q)
        (z,) = quantize([x * d], c, q)  # what secaggplus_mod does with x_k
        summed += torch.from_numpy(dequantize([z], c, q)[0])
        d_sum, total = d_sum + d, total + n
    mean = (summed / d_sum).numpy()  # Flower's unmasked result: Σ d_k x_k / Σ d_k
    new = secagg_state("mean", {"b": torch.zeros(2, 3)}, [mean], s.scale)["b"].double()
    reference = (30 * ups[0]["b"].double() + 10 * ups[1]["b"].double()) / 40
    assert float((new - reference).abs().max()) <= error_bound(s, weights)
    _, clipped = secagg_vector("mean", {"b": torch.full((2, 3), 0.6)}, down, s, 100)
    assert clipped == 6  # |0.6 · d| > β = 0.5 at full weight
    with pytest.raises(ValueError, match="NaN"):
        secagg_vector("mean", {"b": torch.full((2, 3), math.nan)}, down, s, 10)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["secagg.reconstruction_threshold=4"],
            "secagg.reconstruction_threshold=4 needs that many live neighbours per client, but a round may "
            "have 3 clients",
        ),
        (
            ["min_nodes=2", "secagg.reconstruction_threshold=3"],
            "secagg.reconstruction_threshold=3 needs that many live neighbours per client, but a round may "
            "have 2 clients",
        ),
        (["clients.per_round=1"], "secagg.enabled with 1 client per round"),
        (["clients.per_round=1"], "set clients.per_round=2 or more"),
        (["clients.fraction=0.5"], "set clients.fraction=0.667 (2 of clients.num=3) or more"),
        (["min_nodes=1"], "secagg.enabled with min_nodes=1: round 1 may start with 1 client"),
        # the overflow check counts the largest round: 3 × 1431655765 = 2^32 − 1 < 2^32 would pass, 3 ×
        # 1431655766 = 2^32 + 2 overflows, even with min_nodes=2 (2 × 1431655766 < 2^32)
        (
            ["min_nodes=2", "secagg.quantization_range=1431655766"],
            "3 clients × secagg.quantization_range=1431655766 reach secagg.modulus_range=4294967296: the "
            "masked sum of the largest round would overflow; lower secagg.quantization_range to at most "
            "1431655765",
        ),
        (
            ["clients.num=5", "data.tasks=[a, b, c, d, e]", "secagg.num_shares=4"],
            "secagg.num_shares=4 is even and below the 5 clients a round may have: Flower's SecAgg+ would "
            "raise it to 5 on the server only and every client would fail; set secagg.num_shares=5",
        ),
        (
            ["secagg.reconstruction_threshold=4", "secagg.num_shares=5"],
            "(secagg.num_shares=5)",
        ),
        (["secagg.reconstruction_threshold=4"], "(secagg.num_shares=null)"),
        (
            ["secagg.enabled=false", "secagg.max_weight=10"],
            "secagg.enabled is false but secagg.max_weight is set: it would change nothing; set "
            "secagg.enabled=true or remove secagg.max_weight",
        ),
        (["secagg.num_shares=2"], "secagg.num_shares=2: Flower's SecAgg+ needs at least 3 shares"),
        (["reject.norm_factor=10"], "cannot compare norms; set reject.norm_factor=null"),
        (["dp.clipping=server", "dp.noise_multiplier=1.0"], "use dp.clipping=client"),
        (["transfer.up=int8"], "set both to float32"),
        (["het_upload=factors", "strategies=[fedalora-het]"], "set het_upload=product"),
        (["secagg.value_bound=0"], "secagg.value_bound=0.0 must be a finite number > 0"),
    ],
)
def test_bad_secagg_configs_fail_before_round_1(overrides: list[str], message: str) -> None:
    base = ["clients.num=3", "secagg.enabled=true", "data.tasks=[a, b, c]"]
    with pytest.raises(ConfigError) as err:
        load_fed_config(None, base + overrides)
    assert message in str(err.value)


def test_the_largest_round_and_flowers_share_rule_pass() -> None:
    """The boundary values the checks above refuse one step further: 3 × (2^32 − 1) // 3 < 2^32; an even
    num_shares at (or above) the largest round is left alone by Flower; an odd one below it too."""
    base = ["clients.num=3", "secagg.enabled=true", "data.tasks=[a, b, c]"]
    load_fed_config(None, [*base, "min_nodes=2", "secagg.quantization_range=1431655765"])
    load_fed_config(None, [*base, "secagg.num_shares=4"])
    five = ["clients.num=5", "data.tasks=[a, b, c, d, e]"]
    load_fed_config(None, [*base, *five, "secagg.num_shares=3"])
    load_fed_config(None, [*base, *five, "secagg.num_shares=6"])


def test_max_weight_below_a_client_fails_before_round_1(assets: Path, tmp_path: Path, capsys) -> None:
    """The Dirichlet partition of the tests gives the clients 36, 29 and 7 training examples (the table of
    docs/federated.md): max_weight 35 is refused before anything runs, naming client 0 and the value 36;
    under DP (every weight 1) it is not a limit."""
    cfg = write_config(
        tmp_path / "fed.yaml", assets, tmp_path / "run", 3, strategies=["fedalora"], secagg=SECAGG, rounds=1
    )
    assert fed(cfg, *DIRICHLET, "secagg.max_weight=35") == 2
    err = capsys.readouterr().err
    assert "secagg.max_weight=35 is below client 0's 36 training examples" in err
    assert "set secagg.max_weight=36 (the largest client)" in err and not (tmp_path / "run").exists()


def test_secagg_is_off_by_default_and_auto_becomes_product() -> None:
    base = ["clients.num=3", "data.tasks=[a, b, c]"]
    assert FedConfig().secagg.enabled is False and load_fed_config(None, base).het_upload == "auto"
    assert load_fed_config(None, [*base, "secagg.enabled=true"]).het_upload == "product"


def test_flower_simulation_engine(assets: Path, tmp_path: Path) -> None:
    """Flower's simulation engine (Ray), 3 clients of ranks [2, 2, 1], zeropad, 1 round: the round completes
    with all clients, nothing is clipped, the download is float32 at the largest rank, the upload is the
    masked int64 vector (8 B per value + the weight) and the messages carry the protocol's keys and shares
    on top; the evaluation runs on the aggregate."""
    cfg = write_config(
        tmp_path / "fed.yaml", assets, tmp_path / "run", 3, strategies=["zeropad"], secagg=SECAGG
    )
    assert fed(cfg, "clients.ranks=[2, 2, 1]", "rounds=1") == 0
    (r1,) = read_rounds(tmp_path / "run" / "zeropad" / "rounds.jsonl")
    assert r1["accepted"] == [0, 1, 2] and r1["secagg"]["completed"] and r1["secagg"]["shares"] == 3
    assert sum(r1["secagg"]["clipped"].values()) == 0
    assert [s["stage"] for s in r1["secagg"]["stages"]] == list(STAGES)
    values = 4 * (2 * 32 + 32 * 2)  # A (2 × 32) and B (32 × 2) of q_proj and o_proj in 2 layers, at rank 2
    for c in r1["clients"]:
        assert c["payload_down"] == 4 * values and c["payload_up"] == 8 * (values + 1)
        assert c["bytes_up"] > c["payload_up"] and c["bytes_down"] > c["payload_down"]
    res = json.loads((tmp_path / "run" / "zeropad" / "results.json").read_text())
    assert res["global"] is not None and len(res["clients"]) == 3


def test_client_side_dp_through_secagg(assets: Path, tmp_path: Path, task_identity, captured) -> None:
    """dp.clipping=client (clip only, z = 0): the clients clip before masking, every weight is 1 (W = 1),
    so the aggregate is the plain mean of the clipped uploads; the round's DP record is written."""
    dp = ("dp.clipping=client", "dp.noise_multiplier=0.0", "dp.clipping_norm=0.01")
    state, (r1,) = _run(assets, tmp_path, "fedalora", *dp)
    assert r1["accepted"] == [0, 1, 2] and r1["secagg"]["max_weight"] == 1.0
    assert r1["weights"] == {str(k): pytest.approx(1 / 3) for k in range(3)}
    assert r1["dp"]["released"] and r1["dp"]["clients"] == 3
    equal = [dict(s, weight=1) for s in captured]
    for s in equal:  # each client's update (B − B_sent) was clipped to C before it left the client
        norm = math.sqrt(
            sum(float((s["upload"][n] - s["download"][n]).double().pow(2).sum()) for n in s["upload"])
        )
        assert norm <= 0.01 * (1 + 1e-5)
    reference = _plain_fedavg(equal)
    bound = error_bound(SecAggSettings(**SECAGG), [1, 1, 1], max_weight=1.0) + 2.0**-24 * 0.01
    assert _max_error(state, reference) <= bound
