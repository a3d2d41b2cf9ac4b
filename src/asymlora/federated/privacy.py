"""Client-level differential privacy of what each client uploads (central DP with fixed clipping).

The mechanism is DP-FedAvg with fixed clipping (McMahan et al., "Learning Differentially Private Recurrent
Language Models", ICLR 2018, arXiv:1710.06963; Flower's ``DifferentialPrivacy{Server,Client}SideFixedClipping``):

1. each client's update Δ_k (what it uploads minus what it was sent, over all uploaded tensors together)
   is scaled to L2 norm ≤ C — on the server (``dp.clipping: server``) or on the client before it sends
   (``dp.clipping: client``, Flower's ``fixedclipping_mod``);
2. the server averages the m accepted updates with **equal weights** 1/m (the sensitivity of the average
   to one client is then C/m; example weights would make it max_k p_k · C and leak n_k);
3. it adds Gaussian noise N(0, σ²) to every shared coordinate, σ = z · C / m (Flower's ``compute_stdv``);
4. an RDP accountant (Opacus) composes one Gaussian mechanism of noise multiplier z per round with
   sampling rate q = 1 (every client takes part in every round: no amplification by subsampling) and
   reports (ε, δ) after each round.

What is clipped, per aggregation (docs/design.md §4): ``mean`` strategies — the shared tensors minus the
server's; ``zeropad`` — the client's rank-r_k tensors minus the server's truncated to r_k (zero-padding
keeps the norm); ``accumulate`` (Fed-ALoRA-het) — the increment B2·B1 itself (it is the delta of B0;
uploaded factors are scaled by √s each so their product is scaled by s). Only the shared part is
released; tensors that stay on the client are not.

Clipping and noise reuse Flower's own functions (``flwr.supercore.differential_privacy``); accounting
uses Opacus's ``RDPAccountant`` (Flower's own accountant needs the optional ``dp-accounting`` package and
a Flower ``Strategy`` object, which the Message-API loop of `server_app` does not use).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from asymlora.federated.strategies import Rejection, RoleMap, Strategy, het_increments, truncate
from asymlora.methods.base import ATTR_PREFIX

# flwr and opacus are the optional `fed` extra: imported where used (privacy settings load without them).
__all__ = [
    "KEY_CLIPPING_NORM",
    "ClippedUpdates",
    "PrivacyAccountant",
    "PrivacySettings",
    "add_noise",
    "clip_update",
    "clip_upload_locally",
    "noise_multiplier_for",
    "noise_std",
    "privatize_updates",
]

KEY_CLIPPING_NORM = "clipping_norm"
"""Config key of the clipping norm in a train message (Flower's ``KEY_CLIPPING_NORM``)."""

DP_CLIPPING = ("off", "server", "client")


@dataclass
class PrivacySettings:
    """Client-level DP of the uploads (``dp:`` in the federated config); see the module docstring."""

    clipping: Literal["off", "server", "client"] = "off"
    """``off``: no DP; ``server``: the server clips each update; ``client``: each client clips its own
    (Flower's ``fixedclipping_mod``) and the server checks the norm."""
    noise_multiplier: float | None = None
    """z: the noise std is z · clipping_norm / m. Give this or ``target_epsilon`` (not both); 0: clip only (ε = ∞)."""
    target_epsilon: float | None = None
    """Target ε after all rounds at ``delta``: the smallest z that reaches it is found with Opacus."""
    clipping_norm: float = 1.0
    """C: the L2 bound on each client's update (all its uploaded tensors together)."""
    delta: float = 1e-5
    """δ of the reported (ε, δ); keep it below 1 / (number of clients)."""
    noise_seed: int | None = None
    """Seed of the noise (seed + round), for reproducible experiments; None: fresh OS entropy. A known
    seed voids the guarantee against whoever knows it."""

    @property
    def enabled(self) -> bool:
        return self.clipping != "off"


# --- configuration ---------------------------------------------------------------------------------------
def noise_multiplier_for(dp: PrivacySettings, rounds: int) -> float:
    """z of ``dp``: ``noise_multiplier`` as given, or the smallest z whose ε after ``rounds`` rounds (sample
    rate 1) is at most ``target_epsilon`` (Opacus ``get_noise_multiplier``, RDP, tolerance 0.01, or 10^-9 · ε
    above ε = 10^7).

    Raises ValueError naming the bad key and the fix: clipping_norm ≤ 0, δ outside (0, 1), both or neither
    of noise_multiplier / target_epsilon, a negative or infinite z, a z > 0 the accountant or float32 cannot
    use (`_check_noise_range`), a target ε that is not finite or that no z reaches, or a noise_seed whose
    seed + round leaves [0, 2^32 - 1].
    """
    if dp.clipping not in DP_CLIPPING:
        raise ValueError(f"dp.clipping={dp.clipping!r} is invalid: choose one of {list(DP_CLIPPING)}")
    if not (
        isinstance(dp.clipping_norm, int | float) and math.isfinite(dp.clipping_norm) and dp.clipping_norm > 0
    ):
        raise ValueError(
            f"dp.clipping_norm={dp.clipping_norm!r} must be a finite number > 0 (the L2 bound on each "
            "client's update), e.g. dp.clipping_norm=1.0"
        )
    if not 0 < dp.delta < 1:
        raise ValueError(f"dp.delta={dp.delta!r} must lie in (0, 1), e.g. dp.delta=1e-5")
    if (dp.noise_multiplier is None) == (dp.target_epsilon is None):
        raise ValueError(
            "with dp.clipping on, give exactly one of dp.noise_multiplier (e.g. 1.0) and dp.target_epsilon "
            f"(e.g. 8); got noise_multiplier={dp.noise_multiplier!r}, target_epsilon={dp.target_epsilon!r}"
        )
    _check_noise_seed(dp.noise_seed, rounds)
    if dp.noise_multiplier is not None:
        if not dp.noise_multiplier >= 0:
            raise ValueError(f"dp.noise_multiplier={dp.noise_multiplier!r} must be >= 0 (0: clipping only)")
        if math.isinf(dp.noise_multiplier):  # infinite noise: the aggregate and every client's loss are NaN
            raise ValueError(
                f"dp.noise_multiplier={dp.noise_multiplier!r} must be finite, e.g. dp.noise_multiplier=1.0 (or "
                "give dp.target_epsilon: the smallest z that reaches it)"
            )
        _check_noise_range(float(dp.noise_multiplier), dp.clipping_norm, dp.delta, rounds)
        return float(dp.noise_multiplier)
    return _solve_noise(float(dp.target_epsilon), dp.delta, rounds)  # type: ignore[arg-type]


NOISE_SEED_MAX = 2**32 - 1
"""The largest seed NumPy's legacy generator takes (`add_noise` seeds it with noise_seed + round)."""


def _check_noise_seed(seed: int | None, rounds: int) -> None:
    """Round r's noise is seeded with ``seed + r`` (`server_round`), which NumPy needs in [0, 2^32 - 1]."""
    if seed is not None and not 0 <= seed <= NOISE_SEED_MAX - rounds:
        raise ValueError(
            f"dp.noise_seed={seed!r} must lie in [0, {NOISE_SEED_MAX - rounds}] (round r's noise is seeded "
            f"with dp.noise_seed + r, at most 2^32 - 1 after rounds={rounds}), e.g. dp.noise_seed=0; or null "
            "for fresh entropy"
        )


NOISE_STD_MAX = float(torch.finfo(torch.float32).max) / 1000
"""The largest σ = z · C / m `add_noise` may draw with (m = 1): the server's shared tensors are float32, and
1000 σ of margin keeps every draw finite."""


def _check_noise_range(z: float, clipping_norm: float, delta: float, rounds: int) -> None:
    """Refuse a z > 0 whose ε Opacus cannot compute (z² under- or overflows: the server failed after round 1
    with a bare ZeroDivisionError or OverflowError) or whose noise overflows float32 (inf in the shared
    tensors, every later round failed)."""
    if z == 0:
        return
    try:
        ok = z * clipping_norm <= NOISE_STD_MAX and PrivacyAccountant(z, delta, rounds).epsilon() >= 0
    except (OverflowError, ZeroDivisionError):
        ok = False
    if not ok:
        raise ValueError(
            f"dp.noise_multiplier={z:g} with dp.clipping_norm={clipping_norm:g} is out of range: the accountant "
            "cannot compute ε for it, or the noise z · C overflows the float32 shared tensors; use a noise "
            "multiplier of the usual size (e.g. dp.noise_multiplier=1.0), dp.noise_multiplier=0 to clip only, "
            "or give dp.target_epsilon"
        )


def _solve_noise(target: float, delta: float, rounds: int) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    if not target > 0:
        raise ValueError(f"dp.target_epsilon={target!r} must be > 0, e.g. dp.target_epsilon=8")
    if math.isinf(target):  # Opacus would return its starting z (10), far from "no noise"
        raise ValueError(
            f"dp.target_epsilon={target!r} must be finite, e.g. dp.target_epsilon=8; for no noise (ε = ∞) "
            "give dp.noise_multiplier=0 instead"
        )
    try:
        with warnings.catch_warnings():  # see PrivacyAccountant.epsilon
            warnings.simplefilter("ignore", UserWarning)
            # tolerance 0.01, relative above ε = 10^7: an absolute 0.01 is below the float spacing of ε ≳ 10^14,
            # and Opacus's bisection then never ended (asymlora fed hung before round 1)
            z = get_noise_multiplier(
                target_epsilon=target, target_delta=delta, sample_rate=1.0, steps=rounds, accountant="rdp",
                epsilon_tolerance=max(0.01, 1e-9 * target),
            )  # fmt: skip
        return float(z)
    except ValueError:  # Opacus: "The privacy budget is too low." (z would exceed its MAX_SIGMA)
        raise ValueError(
            f"dp.target_epsilon={target!r} is out of reach: no noise multiplier gives ε ≤ {target} at "
            f"δ={delta} after rounds={rounds}; raise dp.target_epsilon, raise dp.delta or run fewer rounds"
        ) from None


# --- accounting ------------------------------------------------------------------------------------------
class PrivacyAccountant:
    """(ε, δ) spent so far: Opacus's RDP accountant over one Gaussian mechanism per released round
    (noise multiplier z, sample rate 1). z = 0 gives ε = ∞ (reported as None in JSON)."""

    def __init__(self, noise_multiplier: float, delta: float, releases: int = 0) -> None:
        from opacus.accountants import RDPAccountant

        self.noise_multiplier, self.delta = float(noise_multiplier), float(delta)
        self._acc = RDPAccountant()
        self.releases = 0
        for _ in range(releases):
            self.step()

    def step(self) -> None:
        """Compose one more release (one round's noisy aggregate)."""
        self.releases += 1
        if self.noise_multiplier > 0:
            self._acc.step(noise_multiplier=self.noise_multiplier, sample_rate=1.0)

    def epsilon(self) -> float:
        """ε at ``delta`` after the releases so far (0 before the first, ∞ without noise)."""
        if self.releases == 0:
            return 0.0
        if self.noise_multiplier == 0:
            return math.inf
        with warnings.catch_warnings():  # "Optimal order is the largest alpha": ε is an upper bound still
            warnings.simplefilter("ignore", UserWarning)
            return float(self._acc.get_epsilon(delta=self.delta))


# --- clipping and noise (Flower's functions) -------------------------------------------------------------
def clip_update(update: Sequence[np.ndarray], reference: Sequence[np.ndarray], clipping_norm: float) -> float:
    """Clip ``update`` in place so that ``update − reference`` has L2 norm ≤ ``clipping_norm`` (over all
    arrays together; Flower's ``compute_clip_model_update``). Returns the norm before clipping.

    ``update`` must be a list of float arrays of the same shapes as ``reference``.
    """
    from flwr.supercore.differential_privacy import compute_clip_model_update, get_norm

    norm = get_norm([np.subtract(u, r) for u, r in zip(update, reference, strict=True)])
    if norm > 0:  # Flower's clip divides by the norm
        compute_clip_model_update(update, list(reference), clipping_norm)  # type: ignore[arg-type]
    return norm


def noise_std(noise_multiplier: float, clipping_norm: float, num_clients: int) -> float:
    """σ = z · C / m of the noise on the equal-weight average of m clipped updates (Flower's ``compute_stdv``)."""
    from flwr.supercore.differential_privacy import compute_stdv

    return compute_stdv(noise_multiplier, clipping_norm, num_clients)


def add_noise(state: Mapping[str, Tensor], std: float, seed: int | None = None) -> dict[str, Tensor]:
    """``state`` plus i.i.d. N(0, std²) on every value (Flower's ``add_gaussian_noise_inplace``, NumPy's
    global generator; with ``seed`` it is seeded for the call and restored after)."""
    from flwr.supercore.differential_privacy import add_gaussian_noise_inplace

    arrays = [t.detach().cpu().double().numpy().copy() for t in state.values()]
    saved = np.random.get_state() if seed is not None else None
    try:
        if seed is not None:
            np.random.seed(seed)
        add_gaussian_noise_inplace(arrays, std)
    finally:
        if saved is not None:
            np.random.set_state(saved)
    return {k: torch.from_numpy(a).to(t.dtype) for (k, t), a in zip(state.items(), arrays, strict=True)}


# --- the server's side -------------------------------------------------------------------------------------
@dataclass
class ClippedUpdates:
    """`privatize_updates`'s result: the updates to aggregate (equal weights) and what clipping did."""

    updates: list[tuple[dict[str, Tensor], int]]
    ids: list[Any]
    norms: dict[Any, float] = field(default_factory=dict)
    """L2 norm of each client's update before clipping (server) or as received (client)."""
    refused: dict[Any, str] = field(default_factory=dict)
    """Client-side clipping: clients whose update exceeds the clipping norm (not aggregated)."""


def _delta_form(
    strategy: Strategy, upd: Mapping[str, Tensor], server: Mapping[str, Tensor], roles: RoleMap
) -> tuple[dict[str, Tensor], dict[str, Tensor]] | None:
    """(upload as aggregated, reference) so that their difference is the client's update, or None when the
    upload does not fit (then `strategies.aggregate` rejects it with its own reason)."""
    if strategy.aggregation == "accumulate":  # the increment B2·B1 is the update of B0
        inc = het_increments(None, upd, server, roles)
        if isinstance(inc, Rejection):
            return None
        return {k: v.float() for k, v in inc.items()}, {
            k: torch.zeros_like(v.float()) for k, v in inc.items()
        }
    if set(upd) != set(server):
        return None
    ref = {}
    for k, v in upd.items():
        want = tuple(server[k].shape)
        if v.dim() != len(want) or any(g > w for g, w in zip(v.shape, want, strict=True)):
            return None
        if strategy.aggregation == "mean" and tuple(v.shape) != want:
            return None
        ref[k] = truncate(server[k], tuple(v.shape))
    return dict(upd), ref


def privatize_updates(
    dp: PrivacySettings,
    strategy: Strategy,
    server_state: Mapping[str, Tensor],
    updates: Sequence[tuple[Mapping[str, Tensor], int]],
    roles: RoleMap,
    ids: Sequence[Any],
) -> ClippedUpdates:
    """The round's updates ready for `strategies.aggregate` under DP: clipped to ``dp.clipping_norm``
    (``server``) or checked against it (``client``: an update above C·(1 + 1e-4) is refused), every valid
    example count replaced by 1 (equal weights). Updates that do not fit pass unchanged, for ``aggregate``
    to reject."""
    out = ClippedUpdates([], [])
    c = dp.clipping_norm
    for cid, (upd, n_k) in zip(ids, updates, strict=True):
        form = _delta_form(strategy, upd, server_state, roles)
        valid_n = isinstance(n_k, int | np.integer) and not isinstance(n_k, bool) and n_k >= 1
        if form is None or not all(bool(torch.isfinite(t).all()) for t in upd.values()):
            out.updates.append((dict(upd), n_k))
            out.ids.append(cid)
            continue
        values, ref = form
        keys = list(values)
        arrays = [values[k].detach().double().numpy().copy() for k in keys]
        refs = [ref[k].detach().double().numpy() for k in keys]
        if dp.clipping == "server":
            out.norms[cid] = clip_update(arrays, refs, c)
        else:
            from flwr.supercore.differential_privacy import get_norm

            out.norms[cid] = get_norm([a - r for a, r in zip(arrays, refs, strict=True)])
            if out.norms[cid] > c * (1 + 1e-4):
                out.refused[cid] = (
                    f"update norm {out.norms[cid]:.6g} exceeds dp.clipping_norm={c:g}: the client did not "
                    "clip (client-side DP needs asymlora's ClientApp, whose clipping_mod clips)"
                )
                continue
        dtype = next(iter(upd.values())).dtype
        new = {k: torch.from_numpy(a).to(dtype) for k, a in zip(keys, arrays, strict=True)}
        out.updates.append((new, 1 if valid_n else n_k))
        out.ids.append(cid)
    return out


# --- the client's side (the Flower mod that calls this: `client_app.clipping_mod`) ------------------------
def clip_upload_locally(
    aggregation: str, upload: Mapping[str, Tensor], sent: Mapping[str, Tensor], clipping_norm: float
) -> dict[str, Tensor]:
    """``zeropad``: clip against the download truncated to the client's rank. ``accumulate``: clip the
    increments (products as sent; factor pairs B2, B1 by √s each, so B2·B1 is scaled by s)."""
    keys = list(upload)
    if aggregation == "zeropad":
        arrays = [upload[k].double().numpy().copy() for k in keys]
        clip_update(
            arrays, [truncate(sent[k], tuple(upload[k].shape)).double().numpy() for k in keys], clipping_norm
        )
        return {k: torch.from_numpy(a).to(upload[k].dtype) for k, a in zip(keys, arrays, strict=True)}
    b2, b1 = f".{ATTR_PREFIX}B2.", f".{ATTR_PREFIX}B1."
    incs = {
        k: upload[k].double() @ upload[k.replace(b2, b1)].double() if b2 in k else upload[k].double()
        for k in keys
        if b1 not in k
    }
    arrays = [v.numpy().copy() for v in incs.values()]
    norm = clip_update(arrays, [np.zeros_like(a) for a in arrays], clipping_norm)
    s = min(1.0, clipping_norm / norm) if norm > 0 else 1.0
    return {k: (v * (math.sqrt(s) if (b1 in k or b2 in k) else s)) for k, v in upload.items()}
