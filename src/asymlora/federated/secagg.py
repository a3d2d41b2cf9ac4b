"""Secure aggregation with Flower's SecAgg+ (Bell et al., CCS 2020): settings, their checks, and the
arithmetic around Flower's protocol (docs/design.md §4, "Secure aggregation").

Flower 1.41 runs SecAgg+ as a workflow of its legacy strategy API (`SecAggPlusWorkflow` on the server,
`secaggplus_mod` on the client). asymlora drives that workflow once per round
(`asymlora.federated.secagg_server`) and answers it from its ClientApp (`asymlora.federated.secagg_client`).
Flower's protocol, per client k with n_k examples (``secaggplus_mod._collect_masked_vectors``)::

    d_k = round(n_k / W · Q) / Q                   W = max_weight, Q = quantization_range
    z_k = stochastic_round((clip(d_k · x_k, ±c) + c) · Q / 2c)      c = clipping_range
    masked upload: (d_k·Q, z_k) + pairwise and private masks (mod modulus_range)

and the server unmasks Σ z_k and returns Σ d_k x_k / Σ d_k, the weighted mean. This module supplies x_k
and undoes the scale: every client sends ``x_k = U_k · c / β`` (β = ``value_bound``), where U_k is, in one
shape for every client, ``mean``: its shared tensors; ``zeropad``: its tensors zero-padded to the server's
(largest) rank; ``accumulate`` (Fed-ALoRA-het): its increment B2·B1 under B0's name. The server takes
``mean · β / c`` (plus B0 for ``accumulate``) as its new shared tensors, float32 as always.

Error (`error_bound`): each client's stochastic rounding is off by < 1 step 2c/Q, and the weights are
d_k instead of n_k/W (off by ≤ 1/2Q each), so every coordinate of the result is within
``3 · β · N / (Q · Σ d_k)`` of the plain FedAvg Σ n_k U_k / Σ n_k (N clients), as long as no value is
clipped (|d_k U_k| ≤ β; `secagg_vector` counts the clipped values) and N · Q < modulus_range (no overflow).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from asymlora.federated.strategies import zero_pad

__all__ = [
    "SecAggSettings",
    "check_secagg",
    "check_secagg_compatible",
    "check_secagg_weights",
    "error_bound",
    "round_shares",
    "secagg_state",
    "secagg_vector",
    "weight_factor",
]

Aggregation = Literal["mean", "zeropad", "accumulate"]
MAX_MODULUS = 2**32
"""The largest ``modulus_range`` Flower's SecAgg+ takes."""


@dataclass
class SecAggSettings:
    """The ``secagg`` section: Flower's SecAgg+ for every round (off by default)."""

    enabled: bool = False
    num_shares: int | None = None
    """Shares each client's secrets are split into (its neighbours, itself included); None: every client
    of the round (Flower's ``num_shares=1.0``). An integer must be >= 3 (Flower's rule)."""
    reconstruction_threshold: int = 2
    """Shares needed to rebuild a secret: the round survives dropouts while every client keeps this many
    live neighbours; a larger value resists more colluding clients. >= 2, and below ``num_shares`` when that
    is set (else at most the clients of the smallest round)."""
    value_bound: float = 1.0
    """β: |values| up to β are mapped onto ±clipping_range (x = U · clipping_range / β); larger ones are
    clipped (counted in rounds.jsonl, ``secagg.clipped``; that round's error bound is then null). LoRA B
    grows over the rounds: β must bound the largest |value| of any round, with a margin."""
    clipping_range: float = 8.0
    """c of Flower's quantiser (its default): values are clipped to ±c before quantisation."""
    quantization_range: int = 2**22
    """Q: quantisation steps across [-c, c] (Flower's default 2^22)."""
    modulus_range: int = 2**32
    """Modulus of the masked arithmetic, a power of 2 (Flower's default and maximum 2^32)."""
    max_weight: float = 1000.0
    """W: the largest num_examples a client may have (Flower's weight n_k / W must stay <= 1). The error
    grows with W / Σ n_k: set it to the largest client (a smaller W is refused before round 1,
    `check_secagg_weights`). Under DP every weight is 1 and W is 1."""

    @property
    def scale(self) -> float:
        """c / β: what the clients multiply their values by before Flower quantises them."""
        return self.clipping_range / self.value_bound


def round_shares(settings: SecAggSettings, clients: int) -> int:
    """The shares per client in a round of ``clients`` clients, by Flower's rule
    (``SecAggPlusWorkflow.setup_stage``): ``num_shares`` (None: all clients), odd when fewer than all."""
    if settings.num_shares is None:
        return clients
    shares = settings.num_shares
    if clients != shares and shares % 2 == 0:
        shares += 1
    return shares


def check_secagg(s: SecAggSettings, clients_per_round: int, *, largest: int | None = None) -> None:
    """Raise ValueError naming the value and the fix when SecAgg+ with ``s`` cannot run rounds of
    ``clients_per_round`` (the fewest a round may have: the reconstruction threshold must fit) to ``largest``
    clients (the most a round may have, default ``clients_per_round``: the masked sum must not overflow and
    Flower must not change ``num_shares``); checked before round 1, `FedConfig.validate`."""
    _check_numbers(s)
    m = clients_per_round
    big = max(m, largest if largest is not None else m)
    if m < 2:
        raise ValueError(
            f"secagg.enabled with {m} client per round: SecAgg+ sums the updates of at least 2 clients; "
            "sample at least 2 clients per round or set secagg.enabled=false"
        )
    neighbours = min(round_shares(s, m), m)
    if s.reconstruction_threshold > neighbours:
        raise ValueError(
            f"secagg.reconstruction_threshold={s.reconstruction_threshold} needs that many live neighbours per "
            f"client, but a round may have {m} clients (clients.per_round / clients.fraction / min_nodes) and "
            f"{neighbours} shares each (secagg.num_shares={_yaml(s.num_shares)}): lower the threshold to at "
            f"most {neighbours} or sample more clients"
        )
    _check_largest_round(s, big)


def _yaml(value: object) -> str:
    return "null" if value is None else str(value)


def _check_largest_round(s: SecAggSettings, big: int) -> None:
    """The checks against the largest round (``big`` clients): Flower's share rule and the overflow."""
    if s.num_shares is not None and s.num_shares % 2 == 0 and s.num_shares < big:
        # SecAggPlusWorkflow.setup_stage sends the clients num_shares, then makes it odd on the server only
        # (a round of more clients than shares): the clients' share lists are one short and they all fail
        raise ValueError(
            f"secagg.num_shares={s.num_shares} is even and below the {big} clients a round may have: Flower's "
            f"SecAgg+ would raise it to {s.num_shares + 1} on the server only and every client would fail; "
            f"set secagg.num_shares={s.num_shares + 1} (odd) or null (every client)"
        )
    if big * s.quantization_range >= s.modulus_range:
        raise ValueError(
            f"{big} clients × secagg.quantization_range={s.quantization_range} reach secagg.modulus_range="
            f"{s.modulus_range}: the masked sum of the largest round would overflow; {_overflow_fix(s, big)}"
        )


def _overflow_fix(s: SecAggSettings, big: int) -> str:
    """A fix of ``big`` × quantization_range >= modulus_range that works: a quantization_range of at least 2
    below the modulus, else a larger modulus (a power of 2, at most 2^32), else both."""
    most = (s.modulus_range - 1) // big
    if most >= 2:
        return f"lower secagg.quantization_range to at most {most}"
    modulus = 1 << (big * s.quantization_range).bit_length()  # the smallest power of 2 above the sum
    if modulus <= MAX_MODULUS:
        return f"raise secagg.modulus_range to {modulus} or more (a power of 2, at most 2^32)"
    return (
        f"set secagg.modulus_range={MAX_MODULUS} (2^32) and secagg.quantization_range to at most "
        f"{(MAX_MODULUS - 1) // big}"
    )


def _check_numbers(s: SecAggSettings) -> None:
    if s.num_shares is not None and s.num_shares < 3:
        raise ValueError(
            f"secagg.num_shares={s.num_shares}: Flower's SecAgg+ needs at least 3 shares, or null (every client)"
        )
    if s.reconstruction_threshold < 2:
        raise ValueError(f"secagg.reconstruction_threshold={s.reconstruction_threshold} must be >= 2")
    if s.num_shares is not None and s.reconstruction_threshold >= s.num_shares:
        raise ValueError(
            f"secagg.reconstruction_threshold={s.reconstruction_threshold} must be below secagg.num_shares="
            f"{s.num_shares} (Flower's rule); lower the threshold or raise num_shares"
        )
    for key in ("value_bound", "clipping_range", "max_weight"):
        value = getattr(s, key)
        if not (np.isfinite(value) and value > 0):
            raise ValueError(f"secagg.{key}={value!r} must be a finite number > 0")
    if s.quantization_range < 2:
        raise ValueError(f"secagg.quantization_range={s.quantization_range} must be an integer >= 2")
    if not 1 <= s.modulus_range <= MAX_MODULUS or s.modulus_range & (s.modulus_range - 1):  # 0 & -1 == 0
        raise ValueError(f"secagg.modulus_range={s.modulus_range} must be a power of 2, at most 2^32")
    if s.num_shares is not None and s.num_shares * s.quantization_range > s.modulus_range:
        raise ValueError(  # SecAggPlusWorkflow refuses it when it starts
            f"secagg.num_shares={s.num_shares} exceeds secagg.modulus_range / secagg.quantization_range = "
            f"{s.modulus_range // s.quantization_range} (Flower's rule); lower num_shares or quantization_range"
        )


def check_secagg_compatible(
    *,
    norm_factor: float | None,
    dp_clipping: str,
    transfer: tuple[str, str],
    het_upload: str,
    strategies: list[str],
) -> None:
    """Raise ValueError for the options SecAgg+ cannot honour: those that need every client's update in
    the clear (``reject.norm_factor``, ``dp.clipping: server``), lossy ``transfer`` (up, down) and
    ``het_upload: factors`` under fedalora-het (the sum needs one shape per tensor)."""
    if norm_factor is not None:
        raise ValueError(
            f"secagg.enabled with reject.norm_factor={norm_factor}: the server never sees a client's update "
            "under SecAgg+, so it cannot compare norms; set reject.norm_factor=null"
        )
    if dp_clipping == "server":
        raise ValueError(
            "secagg.enabled with dp.clipping=server: the server cannot clip updates it never sees; use "
            "dp.clipping=client (each client clips, the server adds the noise to the sum)"
        )
    if transfer != ("float32", "float32"):
        raise ValueError(
            f"secagg.enabled with transfer.up={transfer[0]!r}, transfer.down={transfer[1]!r}: SecAgg+ "
            "quantises the upload itself and sends the download as float32; set both to float32"
        )
    if het_upload == "factors" and "fedalora-het" in strategies:
        raise ValueError(
            "secagg.enabled with het_upload=factors: SecAgg+ sums one shape per tensor, so fedalora-het "
            "clients must send the product B2·B1; set het_upload=product (or auto)"
        )


def check_secagg_weights(s: SecAggSettings, examples: Sequence[int]) -> None:
    """Raise ValueError when a client's training examples (``examples[k]``: client k's n_k, from the
    partition) exceed ``max_weight`` W: Flower's weight n_k / W must be <= 1, so that client would refuse
    to send (`secagg_client.secagg_fit_mod`) after training. Checked before round 1 (not under DP, whose
    weights are 1)."""
    if not examples or max(examples) <= s.max_weight:
        return
    k = max(range(len(examples)), key=lambda i: examples[i])
    raise ValueError(
        f"secagg.max_weight={s.max_weight:g} is below client {k}'s {examples[k]} training examples: SecAgg+ "
        f"weighs a client by n_k / max_weight <= 1; set secagg.max_weight={examples[k]} (the largest client)"
    )


def weight_factor(num_examples: int, max_weight: float, quantization_range: int) -> float:
    """d_k = round(n_k / W · Q) / Q: the weight Flower's ``secaggplus_mod`` gives a client."""
    return round(num_examples / max_weight * quantization_range) / quantization_range


def secagg_vector(
    aggregation: Aggregation,
    upload: Mapping[str, Tensor],
    download: Mapping[str, Tensor],
    settings: SecAggSettings,
    weight: int,
) -> tuple[list[np.ndarray], int]:
    """The client's SecAgg+ input x_k (float64 arrays in ``download``'s order, each of its download
    tensor's shape) and how many of its values Flower will clip (|d_k · U| > β, `weight_factor`).

    ``upload``: `client.client_upload` (``accumulate``: the product B2·B1 under B0's name); ``weight``:
    the n_k it is weighted by. Raises ValueError when a tensor is missing, extra, of a shape that does not
    fit, or not finite (the server cannot refuse it after masking, so the client refuses to send it)."""
    extra = sorted(set(upload) - set(download))
    if extra:
        raise ValueError(f"upload has tensors the server does not hold: {extra[:3]}")
    d_k = weight_factor(weight, settings.max_weight, settings.quantization_range)
    out, clipped = [], 0
    for name, ref in download.items():
        if name not in upload:
            raise ValueError(f"upload lacks the shared tensor {name}")
        value = upload[name].detach().double()
        if aggregation == "zeropad" and value.dim() == ref.dim() and value.shape != ref.shape:
            value = zero_pad(value, ref.shape)
        if value.shape != ref.shape:
            raise ValueError(
                f"{name}: upload shape {tuple(value.shape)} does not fit the server's {tuple(ref.shape)}"
            )
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{name} contains NaN or Inf: refused before masking")
        clipped += int((value.abs() * d_k > settings.value_bound).sum())
        out.append((value * settings.scale).numpy())
    return out, clipped


def secagg_state(
    aggregation: Aggregation, server_state: Mapping[str, Tensor], mean: Sequence[np.ndarray], scale: float
) -> dict[str, Tensor]:
    """The server's new shared tensors from SecAgg+'s weighted mean of the x_k (in ``server_state``'s
    order): ``mean / scale``, plus the old B0 under ``accumulate``; each in its server tensor's dtype."""
    if len(mean) != len(server_state):
        raise ValueError(f"SecAgg+ returned {len(mean)} arrays for {len(server_state)} shared tensors")
    out = {}
    for (name, old), arr in zip(server_state.items(), mean, strict=True):
        value = torch.from_numpy(np.asarray(arr, dtype=np.float64)).reshape(old.shape) / scale
        if aggregation == "accumulate":
            value = old.double() + value
        out[name] = value.to(dtype=old.dtype, device=old.device)
    return out


def error_bound(settings: SecAggSettings, weights: Sequence[int], max_weight: float | None = None) -> float:
    """Largest |SecAgg+ result − plain FedAvg| per coordinate, before the cast to float32 (module
    docstring): 3 · β · N / (Q · Σ d_k) over the N clients of ``weights`` (their n_k); ``max_weight``
    overrides ``settings.max_weight`` (1 under DP). Holds while no value is clipped."""
    w = settings.max_weight if max_weight is None else max_weight
    q = settings.quantization_range
    total = sum(weight_factor(n, w, q) for n in weights)
    return 3 * settings.value_bound * len(weights) / (q * total) if total else float("inf")
