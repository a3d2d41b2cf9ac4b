"""`asymlora.federated.secagg`'s own arithmetic and checks, fast tier, no Flower round (mutation tests,
session 10): the weight d_k = round(n_k / W · Q) / Q, the scaling x = U · c / β and back, the clipped-value
count, the error bound 3βN / (Q Σ d_k), Flower's share rule and every refusal, each on values worked out
in the comments. The protocol itself runs in `tests/test_fed_secagg.py` (``fed`` tier)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from asymlora.federated import secagg
from asymlora.federated.secagg import SecAggSettings


def _raises(call, message: str) -> None:
    with pytest.raises(ValueError) as info:
        call()
    assert str(info.value) == message


# --- weights, scale, bound --------------------------------------------------------------------------------
def test_weight_factor_rounds_n_over_w_to_the_quantisation_grid() -> None:
    # Q = 4: 1/3 · 4 = 1.33 → 1 → 0.25; 2/3 · 4 = 2.67 → 3 → 0.75; 1/8 · 4 = 0.5 → 0 (half to even);
    # 3/8 · 4 = 1.5 → 2 → 0.5; n = W → 1
    assert secagg.weight_factor(1, 3.0, 4) == 0.25 and secagg.weight_factor(2, 3.0, 4) == 0.75
    assert secagg.weight_factor(1, 8.0, 4) == 0.0 and secagg.weight_factor(3, 8.0, 4) == 0.5
    assert secagg.weight_factor(7, 7.0, 2**22) == 1.0


def test_scale_is_clipping_range_over_value_bound() -> None:
    assert SecAggSettings(value_bound=0.5, clipping_range=8.0).scale == 16.0
    assert SecAggSettings().scale == 8.0


def test_error_bound_by_hand() -> None:
    s = SecAggSettings(value_bound=0.5, quantization_range=4, max_weight=8.0)
    # weights n = (3, 8): d = (0.5, 1) → 3 · 0.5 · 2 / (4 · 1.5) = 0.5
    assert secagg.error_bound(s, [3, 8]) == 0.5
    # max_weight 16 instead: d = (round(0.75) = 1 → 0.25, 0.5) → 3 · 0.5 · 2 / (4 · 0.75) = 1.0
    assert secagg.error_bound(s, [3, 8], max_weight=16.0) == 1.0
    # every d_k rounds to 0: no bound
    assert secagg.error_bound(s, [1, 1]) == math.inf
    assert secagg.error_bound(s, []) == math.inf


# --- the client's vector and the server's state ---------------------------------------------------------------
def test_secagg_vector_scales_in_download_order_and_counts_clipped_values() -> None:
    s = SecAggSettings(value_bound=0.5, clipping_range=8.0, max_weight=100.0)  # scale 16
    down = {"b": torch.zeros(2, 2), "a": torch.zeros(3)}
    up = {"a": torch.tensor([0.25, -0.5, 0.125]), "b": torch.tensor([[0.625, -0.5625], [0.5, 0.0]])}
    arrays, clipped = secagg.secagg_vector("mean", up, down, s, 100)
    assert [a.dtype for a in arrays] == [np.float64, np.float64]
    assert arrays[0].tolist() == [[10.0, -9.0], [8.0, 0.0]] and arrays[1].tolist() == [4.0, -8.0, 2.0]
    # d = 1: |0.625| and |−0.5625| exceed β = 0.5; 0.5 and −0.5 do not (strictly greater)
    assert clipped == 2
    # n = 50: d = 0.5, so only values above 1.0 would be clipped
    assert secagg.secagg_vector("mean", up, down, s, 50)[1] == 0
    # n = 85: d = 0.85: 0.625 · 0.85 = 0.53 is clipped, 0.5625 · 0.85 = 0.478 is not
    assert secagg.secagg_vector("mean", up, down, s, 85)[1] == 1


def test_secagg_vector_zero_pads_only_under_zeropad_and_only_the_same_rank() -> None:
    s = SecAggSettings()
    down = {"B": torch.zeros(2, 3)}
    small = {"B": torch.tensor([[1.0], [2.0]])}
    (x,), _ = secagg.secagg_vector("zeropad", small, down, s, 10)
    assert x.tolist() == [[8.0, 0.0, 0.0], [16.0, 0.0, 0.0]]  # padded at the end, then × c / β = 8
    _raises(
        lambda: secagg.secagg_vector("mean", small, down, s, 10),
        "B: upload shape (2, 1) does not fit the server's (2, 3)",
    )
    _raises(
        lambda: secagg.secagg_vector("zeropad", {"B": torch.zeros(6)}, down, s, 10),
        "B: upload shape (6,) does not fit the server's (2, 3)",
    )
    _raises(
        lambda: secagg.secagg_vector("mean", {"B": torch.zeros(2, 3), "C": torch.zeros(1)}, down, s, 10),
        "upload has tensors the server does not hold: ['C']",
    )
    _raises(lambda: secagg.secagg_vector("mean", {}, down, s, 10), "upload lacks the shared tensor B")
    _raises(
        lambda: secagg.secagg_vector("mean", {"B": torch.full((2, 3), math.inf)}, down, s, 10),
        "B contains NaN or Inf: refused before masking",
    )


def test_secagg_state_unscales_and_accumulates_in_the_server_dtype() -> None:
    server = {"w": torch.tensor([[1.0, 2.0]], dtype=torch.bfloat16), "v": torch.tensor([0.5, 0.25])}
    mean = [np.array([4.0, -8.0]), np.array([[2.0, 6.0]])]  # flat for w: reshaped to (1, 2)
    out = secagg.secagg_state("mean", server, mean, 8.0)
    assert out["w"].dtype == torch.bfloat16 and out["w"].tolist() == [[0.5, -1.0]]
    assert out["v"].dtype == torch.float32 and out["v"].tolist() == [0.25, 0.75]
    acc = secagg.secagg_state("accumulate", server, mean, 8.0)
    assert acc["w"].tolist() == [[1.5, 1.0]] and acc["v"].tolist() == [0.75, 1.0]  # B0 + mean / scale
    _raises(
        lambda: secagg.secagg_state("mean", server, mean[:1], 8.0),
        "SecAgg+ returned 1 arrays for 2 shared tensors",
    )


# --- Flower's share rule and the checks -----------------------------------------------------------------------
def test_round_shares_follow_flowers_rule() -> None:
    assert secagg.round_shares(SecAggSettings(), 5) == 5  # None: every client
    assert secagg.round_shares(SecAggSettings(num_shares=4), 4) == 4  # all clients: left alone
    assert secagg.round_shares(SecAggSettings(num_shares=4), 6) == 5  # even and not all: made odd
    assert secagg.round_shares(SecAggSettings(num_shares=3), 6) == 3  # odd: left alone


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (SecAggSettings(num_shares=2), "secagg.num_shares=2: Flower's SecAgg+ needs at least 3 shares, or null "
         "(every client)"),
        (SecAggSettings(reconstruction_threshold=1), "secagg.reconstruction_threshold=1 must be >= 2"),
        (SecAggSettings(num_shares=3, reconstruction_threshold=3), "secagg.reconstruction_threshold=3 must be "
         "below secagg.num_shares=3 (Flower's rule); lower the threshold or raise num_shares"),
        (SecAggSettings(value_bound=0.0), "secagg.value_bound=0.0 must be a finite number > 0"),
        (SecAggSettings(clipping_range=-1.0), "secagg.clipping_range=-1.0 must be a finite number > 0"),
        (SecAggSettings(max_weight=math.inf), "secagg.max_weight=inf must be a finite number > 0"),
        (SecAggSettings(value_bound=math.nan), "secagg.value_bound=nan must be a finite number > 0"),
        (SecAggSettings(quantization_range=1), "secagg.quantization_range=1 must be an integer >= 2"),
        (SecAggSettings(modulus_range=2**33), "secagg.modulus_range=8589934592 must be a power of 2, at most "
         "2^32"),
        (SecAggSettings(modulus_range=3 * 2**20), "secagg.modulus_range=3145728 must be a power of 2, at "
         "most 2^32"),
        (SecAggSettings(num_shares=5, quantization_range=2**10, modulus_range=4 * 2**10),
         "secagg.num_shares=5 exceeds secagg.modulus_range / secagg.quantization_range = 4 (Flower's rule); "
         "lower num_shares or quantization_range"),
    ],
)  # fmt: skip
def test_bad_numbers_are_refused_whole(settings: SecAggSettings, message: str) -> None:
    _raises(lambda: secagg.check_secagg(settings, 3), message)


def test_the_numbers_at_each_boundary_pass() -> None:
    ok = [
        SecAggSettings(num_shares=3, reconstruction_threshold=2),
        SecAggSettings(quantization_range=2, modulus_range=8),
        SecAggSettings(modulus_range=2**32, quantization_range=2**10),
        SecAggSettings(
            num_shares=4, reconstruction_threshold=2, quantization_range=2**10, modulus_range=2**12
        ),
        SecAggSettings(value_bound=1e-300, clipping_range=1e-300, max_weight=1e-300),
    ]
    for s in ok:
        secagg.check_secagg(s, 3)


def test_check_secagg_against_the_smallest_and_the_largest_round() -> None:
    s = SecAggSettings(quantization_range=2**30)  # 3 · 2^30 < 2^32 <= 4 · 2^30
    secagg.check_secagg(s, 3)
    secagg.check_secagg(s, 3, largest=2)  # the largest round is never below the smallest
    _raises(
        lambda: secagg.check_secagg(s, 3, largest=4),
        "4 clients × secagg.quantization_range=1073741824 reach secagg.modulus_range=4294967296: the masked "
        "sum of the largest round would overflow; lower secagg.quantization_range to at most 1073741823",
    )
    _raises(
        lambda: secagg.check_secagg(SecAggSettings(), 1),
        "secagg.enabled with 1 client per round: SecAgg+ sums the updates of at least 2 clients; sample at "
        "least 2 clients per round or set secagg.enabled=false",
    )
    secagg.check_secagg(SecAggSettings(), 2)
    # threshold 3 in rounds of 3 clients, every client a neighbour: fits; in rounds of 2 it does not
    secagg.check_secagg(SecAggSettings(reconstruction_threshold=3), 3)
    _raises(
        lambda: secagg.check_secagg(SecAggSettings(reconstruction_threshold=3), 2, largest=5),
        "secagg.reconstruction_threshold=3 needs that many live neighbours per client, but a round may have 2 "
        "clients (clients.per_round / clients.fraction / min_nodes) and 2 shares each "
        "(secagg.num_shares=null): lower the threshold to at most 2 or sample more clients",
    )
    # 5 shares (odd) in rounds of 4: min(5, 4) = 4 neighbours, threshold 4 fits; 5 does not fit 5 shares
    secagg.check_secagg(SecAggSettings(num_shares=5, reconstruction_threshold=4), 4)
    # an even num_shares at the largest round is left alone by Flower; below it, the clients would fail
    secagg.check_secagg(SecAggSettings(num_shares=4), 3, largest=4)
    _raises(
        lambda: secagg.check_secagg(SecAggSettings(num_shares=4), 4, largest=5),
        "secagg.num_shares=4 is even and below the 5 clients a round may have: Flower's SecAgg+ would raise "
        "it to 5 on the server only and every client would fail; set secagg.num_shares=5 (odd) or null "
        "(every client)",
    )


def test_threshold_against_the_shares_of_a_smaller_round() -> None:
    # num_shares 6 in rounds of 4..6 clients: Flower makes 6 odd (7) below 6 clients, min(7, 4) = 4
    # neighbours in a round of 4, so threshold 5 does not fit there
    _raises(
        lambda: secagg.check_secagg(SecAggSettings(num_shares=6, reconstruction_threshold=5), 4, largest=6),
        "secagg.reconstruction_threshold=5 needs that many live neighbours per client, but a round may have 4 "
        "clients (clients.per_round / clients.fraction / min_nodes) and 4 shares each (secagg.num_shares=6): "
        "lower the threshold to at most 4 or sample more clients",
    )
    secagg.check_secagg(SecAggSettings(num_shares=6, reconstruction_threshold=4), 4, largest=6)


def test_incompatible_options_are_refused_whole() -> None:
    base = {"norm_factor": None, "dp_clipping": "off", "transfer": ("float32", "float32"), "het_upload": "auto",
            "strategies": ["fedalora", "fedalora-het"]}  # fmt: skip
    secagg.check_secagg_compatible(**base)
    secagg.check_secagg_compatible(**{**base, "dp_clipping": "client"})
    secagg.check_secagg_compatible(**{**base, "het_upload": "factors", "strategies": ["fedalora"]})
    cases = [
        ({"norm_factor": 3.0}, "secagg.enabled with reject.norm_factor=3.0: the server never sees a client's "
         "update under SecAgg+, so it cannot compare norms; set reject.norm_factor=null"),
        ({"dp_clipping": "server"}, "secagg.enabled with dp.clipping=server: the server cannot clip updates it "
         "never sees; use dp.clipping=client (each client clips, the server adds the noise to the sum)"),
        ({"transfer": ("float32", "bfloat16")}, "secagg.enabled with transfer.up='float32', transfer.down="
         "'bfloat16': SecAgg+ quantises the upload itself and sends the download as float32; set both to "
         "float32"),
        ({"transfer": ("int8", "float32")}, "secagg.enabled with transfer.up='int8', transfer.down='float32': "
         "SecAgg+ quantises the upload itself and sends the download as float32; set both to float32"),
        ({"het_upload": "factors"}, "secagg.enabled with het_upload=factors: SecAgg+ sums one shape per "
         "tensor, so fedalora-het clients must send the product B2·B1; set het_upload=product (or auto)"),
    ]  # fmt: skip
    for change, message in cases:
        _raises(lambda change=change: secagg.check_secagg_compatible(**{**base, **change}), message)


def test_check_secagg_weights_names_the_largest_client() -> None:
    s = SecAggSettings(max_weight=10.0)
    secagg.check_secagg_weights(s, [])
    secagg.check_secagg_weights(s, [10, 3])  # n_k = W is allowed (weight 1)
    _raises(
        lambda: secagg.check_secagg_weights(s, [5, 12, 12, 3]),
        "secagg.max_weight=10 is below client 1's 12 training examples: SecAgg+ weighs a client by n_k / "
        "max_weight <= 1; set secagg.max_weight=12 (the largest client)",
    )
    _raises(
        lambda: secagg.check_secagg_weights(SecAggSettings(max_weight=2.5), [1, 2, 3]),
        "secagg.max_weight=2.5 is below client 2's 3 training examples: SecAgg+ weighs a client by n_k / "
        "max_weight <= 1; set secagg.max_weight=3 (the largest client)",
    )


def test_the_remaining_edges_of_the_messages_and_the_state() -> None:
    # 3 clients × 1431655766 overflow 2^32: (2^32 − 1) // 3 = 1431655765 is the largest that fits
    _raises(
        lambda: secagg.check_secagg(SecAggSettings(quantization_range=1431655766), 3),
        "3 clients × secagg.quantization_range=1431655766 reach secagg.modulus_range=4294967296: the masked "
        "sum of the largest round would overflow; lower secagg.quantization_range to at most 1431655765",
    )
    # modulus 1 = 2^0 is a power of 2 (the overflow check refuses it next); no quantization_range >= 2 fits
    # below it, so the fix is the smallest power of 2 above 3 · 2 = 6 (it used to say "at most 0")
    _raises(
        lambda: secagg.check_secagg(SecAggSettings(modulus_range=1, quantization_range=2), 3),
        "3 clients × secagg.quantization_range=2 reach secagg.modulus_range=1: the masked sum of the largest "
        "round would overflow; raise secagg.modulus_range to 8 or more (a power of 2, at most 2^32)",
    )
    secagg.check_secagg(SecAggSettings(modulus_range=8, quantization_range=2), 3)  # that fix works
    # 8 = 2^3 is also the fix at the edge: 3 · 2 = 6 < 8 and (8 − 1) // 3 = 2 is the largest range that fits
    _raises(
        lambda: secagg.check_secagg(SecAggSettings(modulus_range=4, quantization_range=2), 3),
        "3 clients × secagg.quantization_range=2 reach secagg.modulus_range=4: the masked sum of the largest "
        "round would overflow; raise secagg.modulus_range to 8 or more (a power of 2, at most 2^32)",
    )
    # no modulus up to 2^32 holds 3 · 2^31: both change, and the pair given works
    _raises(
        lambda: secagg.check_secagg(SecAggSettings(modulus_range=4, quantization_range=2**31), 3),
        "3 clients × secagg.quantization_range=2147483648 reach secagg.modulus_range=4: the masked sum of the "
        "largest round would overflow; set secagg.modulus_range=4294967296 (2^32) and "
        "secagg.quantization_range to at most 1431655765",
    )
    secagg.check_secagg(SecAggSettings(modulus_range=2**32, quantization_range=1431655765), 3)
    # modulus 0 passed the power-of-2 test (0 & -1 == 0) and got the fix "at most -1"
    _raises(
        lambda: secagg.check_secagg(SecAggSettings(modulus_range=0), 3),
        "secagg.modulus_range=0 must be a power of 2, at most 2^32",
    )
    # at most three unknown names are listed
    extra = {k: torch.zeros(1) for k in ("B", "c", "d", "e", "f")}
    _raises(
        lambda: secagg.secagg_vector("mean", extra, {"B": torch.zeros(1)}, SecAggSettings(), 10),
        "upload has tensors the server does not hold: ['c', 'd', 'e']",
    )
    # float32 arrays from Flower are unscaled in float64: 1 / 3 to the last bit of a float64 server tensor
    out = secagg.secagg_state("mean", {"w": torch.zeros(1, dtype=torch.float64)}, [np.float32([1.0])], 3.0)
    assert out["w"].item() == 1 / 3
