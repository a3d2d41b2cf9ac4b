"""Federated strategies (docs/design.md §4): the strategy table and the server's aggregation, as pure
functions over ``dict[str, Tensor]``.

A *strategy* says which adapter tensors travel between server and clients, which stay on the client,
which are frozen and which are re-initialised every round, and how the server combines client updates.
Tensors are selected by the role each method declares (`asymlora.roles`), never by parameter-name
matching. Keys everywhere are the qualified parameter names of `asymlora.adapter_tensors` (the same on
every client, whatever its rank).

| strategy | server combines | stays on the client |
|---|---|---|
| ``fedit`` (FedIT) | weighted mean of A and B | nothing |
| ``ffa`` (FFA-LoRA) | weighted mean of B | A, frozen at a shared seed |
| ``fedsa`` (FedSA-LoRA) | weighted mean of A | B |
| ``fedalora`` (Fed-ALoRA) | weighted mean of B | A (``local_a="persist"``) or A reset to the shared initial A (``"reset"``) |
| ``fedalora-het`` | ``B0 <- B0 + Σ p_k B2_k B1_k`` | A, M, B1, B2: drawn afresh every round (``het_local="fresh"``), or A, M, B1 kept and B2 zeroed (``"persist"``) |
| ``zeropad`` (HetLoRA-style) | zero-pad A, B to the largest rank, weighted mean, truncate per client | nothing |

One round, as a Flower ServerApp/ClientApp calls it (the client side lives in `asymlora.federated.client`,
the model <-> dict copies in `asymlora.federated.state`, the message codecs in `asymlora.federated.codec`)::

    server:  state = init_server_state(strategy, fresh_adapter_state, roles)              # once
             msg   = download_payload(strategy, state)                                      # -> every client
    client:  train_from = client_round_start(strategy, my_state, msg, my_roles, initial=..., cfg=..., seed=...)
             ... load_adapter_state_(model, train_from); freeze_(model, strategy); train ...
             keep  = local_state(strategy, adapter_state(model), my_roles)                 # -> context.state
             up    = client_upload(strategy, adapter_state(model), my_roles)                # -> server
    server:  res   = aggregate(strategy, state, [(up_k, n_k), ...], roles, client_ids)      # res.state, res.rejected

Client weights are p_k = n_k / Σ_j n_j over the clients whose update was accepted.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

# Re-exported: the role map and the codecs were defined here before; server_app.py and the tests import
# them from this module.
from asymlora.federated.codec import (
    arrays_to_state,
    bytes_to_state,
    payload_bytes,
    payload_params,
    state_to_arrays,
    state_to_bytes,
)
from asymlora.federated.state import RoleMap, TensorInfo, het_groups, role_map
from asymlora.methods.base import Role
from asymlora.methods.fedhet import B0_NAME, B1_NAME, B2_NAME
from asymlora.tuner.config import AsymLoraConfig

__all__ = [
    "STRATEGY_NAMES",
    "AggregateResult",
    "Rejection",
    "RoleMap",
    "Select",
    "Strategy",
    "TensorInfo",
    "aggregate",
    "arrays_to_state",
    "bytes_to_state",
    "check_het_setup",
    "client_config",
    "combine",
    "download_payload",
    "fedavg_weights",
    "get_strategy",
    "het_alpha",
    "het_increments",
    "init_server_state",
    "norm_outliers",
    "payload_bytes",
    "payload_params",
    "rank_axis",
    "role_map",
    "state_to_arrays",
    "state_to_bytes",
    "truncate",
    "update_norm",
    "zero_pad",
]

StrategyName = Literal["fedit", "ffa", "fedsa", "fedalora", "fedalora-het", "zeropad"]
STRATEGY_NAMES: tuple[str, ...] = ("fedit", "ffa", "fedsa", "fedalora", "fedalora-het", "zeropad")
ClientId = Hashable


# --- strategies -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Select:
    """A set of adapter tensors by declared role (and optionally by trainable flag)."""

    roles: frozenset[Role] = frozenset()
    trainable: bool | None = None
    """None: trainable and frozen tensors alike; True/False: only those."""
    tensors: frozenset[str] | None = None
    """None: any method tensor name; else only these (e.g. ``{"B2"}``: Fed-ALoRA-het's outer factor)."""

    def __call__(self, info: TensorInfo) -> bool:
        return (
            info.role in self.roles
            and (self.trainable is None or info.trainable == self.trainable)
            and (self.tensors is None or info.tensor in self.tensors)
        )

    def names(self, roles: RoleMap) -> list[str]:
        """The selected names of a role map, in its order."""
        return [n for n, info in roles.items() if self(info)]


NOTHING = Select()


def _sel(*roles: Role, trainable: bool | None = None) -> Select:
    return Select(frozenset(roles), trainable)


@dataclass(frozen=True)
class Strategy:
    """Everything a Flower ServerApp/ClientApp needs to know about one strategy.

    Attributes:
        name: one of `STRATEGY_NAMES`.
        shared: tensors the server owns and sends to every client each round. For ``mean`` and
            ``zeropad`` aggregation the clients send the same tensors back; for ``accumulate``
            (Fed-ALoRA-het) the server sends B0 and clients send its increment B2·B1 (see `client_upload`).
        local: tensors that never leave the client and persist across rounds (keep them in ``context.state``).
        frozen: tensors the client never trains (`freeze_` sets ``requires_grad=False``); the method's own
            frozen tensors (B0) are frozen by the adapter layer already.
        seeded: tensors every client must initialise from the same seed (they never travel but must agree).
        reset: tensors re-initialised on the client at the start of every round (`client_round_start`).
        reset_to: ``"initial"`` (copy the client's round-0 value) or ``"fresh"`` (a new draw of the method's
            init), or None when nothing is reset.
        aggregation: ``"mean"`` (weighted mean), ``"zeropad"`` (pad to the largest rank, mean, truncate per
            client) or ``"accumulate"`` (B0 <- B0 + Σ p_k B2_k B1_k).
        method: the adapter method the strategy needs (``"lora"``, ``"fedhet"``), or None for any method
            whose tensors are all trainable.
        heterogeneous: True when clients may have different ranks (then alpha_i = `het_alpha` (r_i)).
        local_a: ``fedalora`` only: ``"persist"`` or ``"reset"``.
        het_local: ``fedalora-het`` only: ``"fresh"`` (A, M, B1 drawn afresh and B2 zeroed every round) or
            ``"persist"`` (A, M, B1 carried over, only B2 zeroed; see `get_strategy`).
        description: one line for logs and docs.
    """

    name: str
    shared: Select
    local: Select
    frozen: Select = NOTHING
    seeded: Select = NOTHING
    reset: Select = NOTHING
    reset_to: Literal["initial", "fresh"] | None = None
    aggregation: Literal["mean", "zeropad", "accumulate"] = "mean"
    method: str | None = None
    heterogeneous: bool = False
    local_a: Literal["persist", "reset"] | None = None
    het_local: Literal["fresh", "persist"] | None = None
    description: str = ""

    def upload_names(self, roles: RoleMap) -> list[str]:
        """Names a client may send back (for ``accumulate``: B0's name carries the product, or B1 and B2)."""
        if self.aggregation == "accumulate":
            return [n for n, i in roles.items() if i.tensor in (B0_NAME, B1_NAME, B2_NAME)]
        return self.shared.names(roles)

    def check_roles(self, roles: RoleMap) -> None:
        """Raise ValueError if the model's adapter method does not fit this strategy."""
        methods = sorted({i.method for i in roles.values()})
        if self.method is not None and methods != [self.method]:
            raise ValueError(
                f"strategy {self.name!r} needs adapter method {self.method!r} (AsymLoraConfig.method), "
                f"but the model uses {methods}"
            )
        if self.method is None and any(not i.trainable for i in roles.values()):
            raise ValueError(
                f"strategy {self.name!r} averages trainable tensors only; the model's method {methods} has frozen "
                "tensors (use strategy 'fedalora-het' with method 'fedhet')"
            )
        if not self.shared.names(roles):
            raise ValueError(f"strategy {self.name!r} shares no tensor of this model (methods {methods})")


_A, _B, _R = Role.A, Role.B, Role.ROUTER


def get_strategy(
    name: str,
    *,
    local_a: Literal["persist", "reset"] = "persist",
    het_local: Literal["fresh", "persist"] = "fresh",
) -> Strategy:
    """The strategy called ``name`` (one of `STRATEGY_NAMES`).

    ``local_a`` applies to ``fedalora`` only, ``het_local`` to ``fedalora-het`` only (docs/design.md §4):
    ``"fresh"`` re-draws A, M, B1 and zeroes B2 every round; ``"persist"`` keeps the client's trained A, M
    and B1 and zeroes only B2, so the round still starts from the aggregated B0 (B2·B1 = 0) with the
    client's own input side M·A. Raises ValueError for an unknown name or option.
    """
    if local_a not in ("persist", "reset"):
        raise ValueError(f"local_a={local_a!r} is invalid; choose 'persist' or 'reset'")
    if het_local not in ("fresh", "persist"):
        raise ValueError(f"het_local={het_local!r} is invalid; choose 'fresh' or 'persist'")
    if name == "fedit":
        return Strategy(name, shared=_sel(_A, _B, _R), local=NOTHING, description="FedIT: average A and B")
    if name == "ffa":
        return Strategy(
            name,
            shared=_sel(_B),
            local=_sel(_A, _R),
            frozen=_sel(_A),
            seeded=_sel(_A),
            description="FFA-LoRA: average B; A frozen at a shared seed",
        )
    if name == "fedsa":
        return Strategy(
            name, shared=_sel(_A), local=_sel(_B, _R), description="FedSA-LoRA: average A; B local"
        )
    if name == "fedalora":
        reset = local_a == "reset"
        return Strategy(
            name,
            shared=_sel(_B),
            local=_sel(_A, _R),
            seeded=_sel(_A) if reset else NOTHING,
            reset=_sel(_A) if reset else NOTHING,
            reset_to="initial" if reset else None,
            local_a=local_a,
            description=f"Fed-ALoRA: average B; A local ({local_a})",
        )
    if name == "fedalora-het":
        return _fedalora_het(het_local)
    if name == "zeropad":
        return Strategy(
            name,
            shared=_sel(_A, _B),
            local=NOTHING,
            aggregation="zeropad",
            method="lora",
            heterogeneous=True,
            description="Zero padding (HetLoRA-style): pad A, B to the largest rank, average, truncate",
        )
    raise ValueError(f"unknown federated strategy {name!r}; choose one of {list(STRATEGY_NAMES)}")


def _fedalora_het(het_local: Literal["fresh", "persist"]) -> Strategy:
    """Fed-ALoRA-het: B0 shared; A, M, B1, B2 local; all four reset (``fresh``) or B2 only (``persist``)."""
    persist = het_local == "persist"
    outer_b = Select(frozenset({_B}), True, frozenset({B2_NAME}))  # B2 only: zero every round
    return Strategy(
        "fedalora-het",
        shared=_sel(_B, trainable=False),
        local=_sel(_A, _B, trainable=True),
        reset=outer_b if persist else _sel(_A, _B, trainable=True),
        reset_to="fresh",
        aggregation="accumulate",
        method="fedhet",
        heterogeneous=True,
        het_local=het_local,
        description="Fed-ALoRA (heterogeneous ranks): B0 <- B0 + sum p_k B2_k B1_k"
        + (" (A, M, B1 kept)" if persist else ""),
    )


def check_het_setup(ranks: Sequence[int], num_clients: int, intermediate_rank: int | None = None) -> None:
    """Validate a heterogeneous setup: one integer rank >= 1 per client, d_m >= 1."""
    ranks = list(ranks)
    if len(ranks) != num_clients:
        raise ValueError(
            f"got {len(ranks)} client ranks {ranks} for {num_clients} clients; give exactly one rank per client"
        )
    for i, r in enumerate(ranks):
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"client {i}: rank {r!r} is invalid; every rank must be an integer >= 1")
    if intermediate_rank is not None and (
        isinstance(intermediate_rank, bool) or not isinstance(intermediate_rank, int) or intermediate_rank < 1
    ):
        raise ValueError(f"intermediate rank d_m={intermediate_rank!r} is invalid; use an integer >= 1")


def het_alpha(rank: int) -> int:
    """The LoRA scaling numerator of a client of rank r_i in a heterogeneous federation: alpha_i = 2·r_i,
    so every client has the same scale s_i = alpha_i / r_i = 2 (the paper's setting, docs/design.md §4)."""
    return 2 * rank


def client_config(strategy: Strategy | None, base: AsymLoraConfig, rank: int | None = None) -> AsymLoraConfig:
    """The adapter config of one client, the one builder of per-client configs.

    ``strategy``: ``base`` with the strategy's method and, given ``rank``, r = rank and, for heterogeneous
    strategies, alpha = `het_alpha` (rank). ``strategy=None`` (the local-only baseline): plain LoRA
    (``fedhet`` becomes ``lora``), and given ``rank`` r = rank with alpha = `het_alpha` (rank).
    Raises ValueError on a rank that is not an integer >= 1.
    """
    changes: dict[str, Any] = {}
    if strategy is None:
        changes["method"] = "lora" if rank is not None or base.method == "fedhet" else base.method
    elif strategy.method is not None:
        changes["method"] = strategy.method
    if rank is not None:
        check_het_setup([rank], 1)  # d_m: AsymLoraConfig checks its own intermediate_rank
        changes["r"] = rank
        if strategy is None or strategy.heterogeneous:
            changes["lora_alpha"] = het_alpha(rank)
    return replace(base, **changes) if changes else base


# --- the round, server side ------------------------------------------------------------------------
def init_server_state(strategy: Strategy, state: Mapping[str, Tensor], roles: RoleMap) -> dict[str, Tensor]:
    """The server's shared tensors at round 0, taken from a freshly initialised adapter ``state``.

    For ``zeropad`` build ``state``/``roles`` at the largest client rank; for ``fedalora-het`` any rank
    (B0 has one shape and starts at zero).
    """
    strategy.check_roles(roles)
    return {n: state[n].detach().clone() for n in strategy.shared.names(roles)}


def download_payload(strategy: Strategy, server_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """What the server sends every client at the start of a round: all its shared tensors.

    For ``zeropad`` they stay padded to the largest rank (the paper's accounting); each client truncates.
    """
    return {n: t.detach().clone() for n, t in server_state.items()}


def rank_axis(info: TensorInfo) -> int | None:
    """The axis holding the rank in a zero-padded tensor: A is (…, r, d_in), B is (…, d_out, r); None for
    tensors without a rank axis (routers)."""
    return {Role.A: -2, Role.B: -1}.get(info.role)


def truncate(value: Tensor, shape: Sequence[int]) -> Tensor:
    """The leading ``shape`` block of a zero-padded ``value`` (a view): what a client of a smaller rank keeps."""
    return value[tuple(slice(s) for s in shape)]


def zero_pad(value: Tensor, shape: Sequence[int]) -> Tensor:
    """``value`` in the leading corner of a float64 zero tensor of ``shape`` (HetLoRA-style padding of a
    rank-r_k factor to the largest rank; docs/design.md §4)."""
    padded = torch.zeros(tuple(shape), dtype=torch.float64)
    padded[tuple(slice(s) for s in value.shape)] = value
    return padded


def fedavg_weights(num_examples: Sequence[int]) -> list[float]:
    """FedAvg weights p_k = n_k / Σ_j n_j (McMahan et al. 2017), in the order given."""
    total = sum(num_examples)
    return [n / total for n in num_examples]


def combine(
    aggregation: Literal["mean", "zeropad", "accumulate"],
    server_state: Mapping[str, Tensor],
    updates: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float],
) -> dict[str, Tensor]:
    """The server's new shared tensors from validated updates and their weights p_k, in float64.

    ``mean``: Σ p_k U_k. ``zeropad``: Σ p_k pad(U_k), each update zero-padded to the server's shape.
    ``accumulate`` (Fed-ALoRA-het): B0 + Σ p_k Δ_k, the updates being the increments B2_k·B1_k under B0's
    name. The result takes each server tensor's dtype and device. Raises ValueError when ``weights`` and
    ``updates`` differ in length or, outside ``zeropad``, an update's shape differs from the server's.
    """
    out: dict[str, Tensor] = {}
    for name, old in server_state.items():
        if aggregation == "accumulate":
            acc = old.double().clone()
        else:
            acc = torch.zeros(old.shape, dtype=torch.float64)
        for p_k, upd in zip(weights, updates, strict=True):
            value = upd[name]
            if tuple(value.shape) != tuple(old.shape):
                if aggregation != "zeropad":
                    raise ValueError(
                        f"{name}: update of shape {tuple(value.shape)} for the server's {tuple(old.shape)} "
                        f"under {aggregation!r} aggregation; validate updates first (`aggregate` does)"
                    )
                value = zero_pad(value, old.shape)
            acc += p_k * value
        out[name] = acc.to(dtype=old.dtype, device=old.device)
    return out


# --- aggregation -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rejection:
    """A client update the server refused (not averaged in)."""

    client: ClientId
    reason: str
    key: str | None = None


@dataclass
class AggregateResult:
    """The server's state after a round, and what happened to every client update.

    Attributes:
        state: the new shared tensors (the previous ones when no update was accepted).
        accepted: ids of the clients averaged in.
        rejected: one `Rejection` per refused client.
        weights: p_k of every accepted client (sums to 1).
    """

    state: dict[str, Tensor]
    accepted: list[ClientId] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    weights: dict[ClientId, float] = field(default_factory=dict)
    norms: dict[ClientId, float] = field(default_factory=dict)
    """With ``norm_factor``: the L2 norm of every valid update (`update_norm`), outliers included."""

    @property
    def kept_previous(self) -> bool:
        """True when no client survived and the server kept the previous shared tensors."""
        return not self.accepted


def _check_finite(cid: ClientId, tensors: Mapping[str, Tensor]) -> Rejection | None:
    for n, t in tensors.items():
        if not isinstance(t, Tensor) or not t.dtype.is_floating_point:
            return Rejection(cid, f"{n} is not a floating-point tensor", n)
        if not bool(torch.isfinite(t).all()):
            return Rejection(cid, f"{n} contains NaN or Inf", n)
    return None


def _check_keys(cid: ClientId, got: Iterable[str], expected: Iterable[str]) -> Rejection | None:
    got, expected = set(got), set(expected)
    if got - expected:
        extra = sorted(got - expected)
        return Rejection(cid, f"sent tensors that are not shared under this strategy: {extra[:3]}", extra[0])
    if expected - got:
        missing = sorted(expected - got)
        return Rejection(cid, f"missing shared tensors: {missing[:3]}", missing[0])
    return None


def _validate_mean(
    cid: ClientId, upd: Mapping[str, Tensor], server: Mapping[str, Tensor]
) -> Rejection | None:
    bad = _check_keys(cid, upd, server)
    if bad:
        return bad
    for n, t in upd.items():
        if tuple(t.shape) != tuple(server[n].shape):
            return Rejection(
                cid, f"shape {tuple(t.shape)} does not match the server's {tuple(server[n].shape)}", n
            )
    return None


def _validate_zeropad(
    cid: ClientId, upd: Mapping[str, Tensor], server: Mapping[str, Tensor], roles: RoleMap
) -> Rejection | None:
    bad = _check_keys(cid, upd, server)
    if bad:
        return bad
    for n, t in upd.items():
        want, got, axis = tuple(server[n].shape), tuple(t.shape), rank_axis(roles[n])
        if len(got) != len(want) or axis is None:
            ok = got == want
        else:  # equal outside the rank axis; on it, 1 <= r_k <= the server's rank
            i = len(want) + axis
            ok = got[:i] + got[i + 1 :] == want[:i] + want[i + 1 :] and 1 <= got[i] <= want[i]
        if not ok:
            return Rejection(
                cid, f"shape {got} does not fit the server's {want} (only the rank may be smaller)", n
            )
    return None


def het_increments(
    cid: ClientId, upd: Mapping[str, Tensor], server: Mapping[str, Tensor], roles: RoleMap
) -> dict[str, Tensor] | Rejection:
    """B0 name -> this client's increment B2·B1 (float64), from the product or the two factors (see
    `client.client_upload`); or why the update is refused (``cid`` names the client in the `Rejection`)."""
    groups = het_groups(roles)
    allowed = {n for g in groups.values() for n in g.values()}
    extra = sorted(set(upd) - allowed)
    if extra:
        return Rejection(cid, f"sent tensors that are not shared under this strategy: {extra[:3]}", extra[0])
    out: dict[str, Tensor] = {}
    for names in groups.values():
        b0 = names[B0_NAME]
        want = tuple(server[b0].shape)
        has_p, has_b2, has_b1 = b0 in upd, names[B2_NAME] in upd, names[B1_NAME] in upd
        if has_p and not (has_b1 or has_b2):
            if tuple(upd[b0].shape) != want:
                return Rejection(cid, f"product shape {tuple(upd[b0].shape)} does not match B0's {want}", b0)
            out[b0] = upd[b0].double()
        elif has_b2 and has_b1 and not has_p:
            b2, b1 = upd[names[B2_NAME]], upd[names[B1_NAME]]
            if (
                b2.dim() != 2
                or b1.dim() != 2
                or b2.shape[0] != want[0]
                or b1.shape[1] != want[1]
                or (b2.shape[1] != b1.shape[0])
            ):
                return Rejection(
                    cid,
                    f"factor shapes B2 {tuple(b2.shape)}, B1 {tuple(b1.shape)} do not multiply to B0's {want}",
                    names[B2_NAME],
                )
            out[b0] = b2.double() @ b1.double()
        else:
            return Rejection(
                cid, "send either the product B2·B1 (under B0's name) or both factors B2 and B1", b0
            )
    return out


def _accept(
    strategy: Strategy,
    cid: ClientId,
    upd: Mapping[str, Tensor],
    n_k: object,
    server_state: Mapping[str, Tensor],
    roles: RoleMap,
) -> dict[str, Tensor] | Rejection:
    """One client's update as float64 tensors ready for `combine`, or why the server refuses it."""
    if isinstance(n_k, bool) or not isinstance(n_k, int | np.integer) or n_k < 1:
        return Rejection(cid, f"num_examples={n_k!r}: must be an integer >= 1")
    bad = _check_finite(cid, upd)
    if bad is None and strategy.aggregation == "mean":
        bad = _validate_mean(cid, upd, server_state)
    elif bad is None and strategy.aggregation == "zeropad":
        bad = _validate_zeropad(cid, upd, server_state, roles)
    if bad is not None:
        return bad
    if strategy.aggregation == "accumulate":
        return het_increments(cid, upd, server_state, roles)
    return {k: v.double() for k, v in upd.items()}


def update_norm(
    aggregation: Literal["mean", "zeropad", "accumulate"],
    update: Mapping[str, Tensor],
    server_state: Mapping[str, Tensor],
) -> float:
    """L2 norm of one client's update Δ_k over all its tensors together, as `_accept` returns it.

    ``mean``: the upload minus the server's tensors; ``zeropad``: minus the server's truncated to the
    client's rank; ``accumulate`` (Fed-ALoRA-het): the increment B2·B1 itself (it is the change of B0).
    The same Δ_k that DP clips (`asymlora.federated.privacy`; docs/design.md §4).
    """
    total = 0.0
    for name, value in update.items():
        delta = value.double()
        if aggregation != "accumulate":
            delta = delta - truncate(server_state[name], tuple(value.shape)).double()
        total += float(delta.pow(2).sum())
    return float(np.sqrt(total))


def norm_outliers(norms: Mapping[ClientId, float], factor: float) -> list[Rejection]:
    """One `Rejection` per client whose update norm exceeds ``factor`` × the median of ``norms``.

    The median runs over every client in ``norms`` (the outliers too; for an even count, the mean of the
    two middle norms), so one or two clients are never rejected by a factor >= 2 and the check needs about
    three clients to bite. Raises ValueError unless ``factor`` is a finite number > 1.
    """
    if isinstance(factor, bool) or not isinstance(factor, int | float) or not 1 < factor < float("inf"):
        raise ValueError(f"norm factor {factor!r} must be a finite number > 1 (e.g. 10)")
    if not norms:
        return []
    median = float(np.median(list(norms.values())))
    return [
        Rejection(
            cid,
            f"update norm {v:.6g} exceeds reject.norm_factor={factor:g} × the round's median {median:.6g}",
        )
        for cid, v in norms.items()
        if v > factor * median
    ]


def aggregate(
    strategy: Strategy,
    server_state: Mapping[str, Tensor],
    updates: Sequence[tuple[Mapping[str, Tensor], int]],
    roles: RoleMap,
    client_ids: Sequence[ClientId] | None = None,
    *,
    norm_factor: float | None = None,
) -> AggregateResult:
    """Combine the client updates of one round with weights p_k = n_k / Σ n_j over the accepted clients.

    Args:
        server_state: the shared tensors the server sent this round.
        updates: ``(client_upload(...), num_examples)`` per client.
        roles: a role map of the adapted model (any client's: names and roles are the same for all; for
            ``zeropad`` the server's, at the largest rank).
        client_ids: ids used in the result (default: the position in ``updates``).

        norm_factor: None (default): no norm check. A number f > 1: an otherwise valid update whose
            `update_norm` exceeds f × the median norm of the round's valid updates is rejected
            (`norm_outliers`).

    Updates with missing or extra keys, shapes that do not match the server's, NaN/Inf values or no examples
    (or, with ``norm_factor``, an outlying norm) are rejected and recorded, never averaged in. With no
    accepted update the previous state is returned. Raises ValueError when ``client_ids`` and ``updates``
    differ in length.
    """
    ids = list(range(len(updates))) if client_ids is None else list(client_ids)
    if len(ids) != len(updates):
        raise ValueError(f"{len(ids)} client ids for {len(updates)} updates")
    result = AggregateResult(state={n: t.detach().clone() for n, t in server_state.items()})
    accepted: list[tuple[ClientId, dict[str, Tensor], int]] = []
    for k, (upd, n_k) in enumerate(updates):  # len(ids) == len(updates), checked above
        cid = ids[k]
        ok = _accept(strategy, cid, upd, n_k, server_state, roles)
        if isinstance(ok, Rejection):
            result.rejected.append(ok)
        else:
            accepted.append((cid, ok, int(n_k)))
    if norm_factor is not None and accepted:
        result.norms = {cid: update_norm(strategy.aggregation, u, server_state) for cid, u, _ in accepted}
        outliers = norm_outliers(result.norms, norm_factor)
        result.rejected.extend(outliers)
        refused = {r.client for r in outliers}
        accepted = [a for a in accepted if a[0] not in refused]
    if not accepted:
        return result
    weights = fedavg_weights([n for _, _, n in accepted])
    result.accepted = [cid for cid, _, _ in accepted]
    result.weights = {accepted[k][0]: p for k, p in enumerate(weights)}
    result.state = combine(strategy.aggregation, server_state, [u for _, u, _ in accepted], weights)
    return result
