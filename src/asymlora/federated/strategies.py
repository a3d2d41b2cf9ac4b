"""Federated strategies as pure functions over ``dict[str, Tensor]`` (docs/design.md §4).

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
| ``fedalora-het`` | ``B0 <- B0 + Σ p_k B2_k B1_k`` | A, M, B1, B2 (fresh every round) |
| ``zeropad`` (HetLoRA-style) | zero-pad A, B to the largest rank, weighted mean, truncate per client | nothing |

One round, as a Flower ServerApp/ClientApp calls it::

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

import io
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

from asymlora.methods import get_method
from asymlora.methods.base import Role
from asymlora.methods.fedhet import B0_NAME, B1_NAME, B2_NAME
from asymlora.roles import adapter_tensors
from asymlora.tuner.config import AsymLoraConfig

__all__ = [
    "STRATEGY_NAMES",
    "AggregateResult",
    "Rejection",
    "RoleMap",
    "Select",
    "Strategy",
    "TensorInfo",
    "adapter_state",
    "aggregate",
    "arrays_to_state",
    "bytes_to_state",
    "check_het_setup",
    "client_config",
    "client_round_start",
    "client_upload",
    "download_payload",
    "freeze_",
    "get_strategy",
    "init_server_state",
    "load_adapter_state_",
    "local_state",
    "payload_bytes",
    "payload_params",
    "role_map",
    "state_to_arrays",
    "state_to_bytes",
]

StrategyName = Literal["fedit", "ffa", "fedsa", "fedalora", "fedalora-het", "zeropad"]
STRATEGY_NAMES: tuple[str, ...] = ("fedit", "ffa", "fedsa", "fedalora", "fedalora-het", "zeropad")
ClientId = Hashable


# --- the role map ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorInfo:
    """What the federation needs to know about one adapter tensor (no data).

    Attributes:
        name: qualified parameter name: the key in every state dict and message.
        module: qualified name of the adapted layer.
        adapter: peft adapter name.
        method: the adapter method (``lora``, ``fedhet``, ...).
        tensor: the method's name for the tensor (``A``, ``B``, ``M``, ``B0``, ``B1``, ...).
        role: `Role.A`, `Role.B` or `Role.ROUTER`, as declared by the method.
        shape: the tensor's shape on this model (client ranks differ, names do not).
        trainable: False for tensors the method keeps frozen (Fed-ALoRA-het's B0).
    """

    name: str
    module: str
    adapter: str
    method: str
    tensor: str
    role: Role
    shape: tuple[int, ...]
    trainable: bool


RoleMap = dict[str, TensorInfo]
"""Qualified tensor name -> `TensorInfo`, in module order."""


def role_map(model: nn.Module, adapter_name: str | None = None) -> RoleMap:
    """The role map of a model's asymlora tensors (works on meta-device models: only shapes are read)."""
    out: RoleMap = {}
    for t in adapter_tensors(model, adapter_name):
        method = model.get_submodule(t.module).asymlora_config[t.adapter].method
        out[t.name] = TensorInfo(
            t.name, t.module, t.adapter, method, t.tensor, t.role, tuple(t.param.shape), t.trainable
        )
    if not out:
        raise ValueError("the model has no asymlora adapter tensors; wrap it with peft.get_peft_model first")
    return out


# --- strategies -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Select:
    """A set of adapter tensors by declared role (and optionally by trainable flag)."""

    roles: frozenset[Role] = frozenset()
    trainable: bool | None = None
    """None: trainable and frozen tensors alike; True/False: only those."""

    def __call__(self, info: TensorInfo) -> bool:
        return info.role in self.roles and (self.trainable is None or info.trainable == self.trainable)

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
        heterogeneous: True when clients may have different ranks (then alpha_i = 2 r_i, see `client_config`).
        local_a: ``fedalora`` only: ``"persist"`` or ``"reset"``.
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


def get_strategy(name: str, *, local_a: Literal["persist", "reset"] = "persist") -> Strategy:
    """The strategy called ``name`` (one of `STRATEGY_NAMES`); ``local_a`` applies to ``fedalora`` only."""
    if local_a not in ("persist", "reset"):
        raise ValueError(f"local_a={local_a!r} is invalid; choose 'persist' or 'reset'")
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
        return Strategy(
            name,
            shared=_sel(_B, trainable=False),
            local=_sel(_A, _B, trainable=True),
            reset=_sel(_A, _B, trainable=True),
            reset_to="fresh",
            aggregation="accumulate",
            method="fedhet",
            heterogeneous=True,
            description="Fed-ALoRA (heterogeneous ranks): B0 <- B0 + sum p_k B2_k B1_k",
        )
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


def client_config(strategy: Strategy, base: AsymLoraConfig, rank: int | None = None) -> AsymLoraConfig:
    """The adapter config of one client: ``base`` with the strategy's method and, for heterogeneous
    strategies, the client's rank and alpha_i = 2·r_i (the paper's setting, s_i = 2)."""
    changes: dict[str, object] = {}
    if strategy.method is not None:
        changes["method"] = strategy.method
    if rank is not None:
        check_het_setup([rank], 1, base.intermediate_rank)
        changes["r"] = rank
        if strategy.heterogeneous:
            changes["lora_alpha"] = 2 * rank
    return replace(base, **changes) if changes else base


# --- model <-> state dict ----------------------------------------------------------------------------
def adapter_state(model: nn.Module, adapter_name: str | None = None) -> dict[str, Tensor]:
    """Detached copies of every adapter tensor of ``model``, keyed by qualified name."""
    return {t.name: t.param.detach().clone() for t in adapter_tensors(model, adapter_name)}


@torch.no_grad()
def load_adapter_state_(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Copy ``state`` into the model's adapter tensors in place (every key must exist with its shape)."""
    params = {t.name: t.param for t in adapter_tensors(model)}
    for name, value in state.items():
        if name not in params:
            raise KeyError(f"{name!r} is not an adapter tensor of this model")
        if tuple(value.shape) != tuple(params[name].shape):
            raise ValueError(
                f"{name}: shape {tuple(value.shape)} does not match the model's {tuple(params[name].shape)}"
            )
        params[name].copy_(value)


def freeze_(model: nn.Module, strategy: Strategy) -> list[str]:
    """Set ``requires_grad=False`` on the tensors the strategy never trains (FFA's A); returns their names."""
    frozen = []
    for t in adapter_tensors(model):
        info = TensorInfo(
            t.name, t.module, t.adapter, "", t.tensor, t.role, tuple(t.param.shape), t.trainable
        )
        if strategy.frozen(info):
            t.param.requires_grad_(False)
            frozen.append(t.name)
    return frozen


# --- the round -------------------------------------------------------------------------------------
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


def _rank_axis(info: TensorInfo) -> int | None:
    """The axis holding the rank in a zero-padded tensor: A is (…, r, d_in), B is (…, d_out, r)."""
    return {Role.A: -2, Role.B: -1}.get(info.role)


def _truncate(value: Tensor, shape: tuple[int, ...]) -> Tensor:
    return value[tuple(slice(0, s) for s in shape)]


def client_round_start(
    strategy: Strategy,
    state: Mapping[str, Tensor],
    received: Mapping[str, Tensor],
    roles: RoleMap,
    *,
    initial: Mapping[str, Tensor] | None = None,
    cfg: AsymLoraConfig | None = None,
    seed: int | None = None,
) -> dict[str, Tensor]:
    """The client's full adapter state to train from this round.

    Args:
        state: the client's current adapter tensors (its local ones from ``context.state``, or a fresh model).
        received: the server's download payload.
        roles: the client's role map (its own ranks).
        initial: the client's round-0 adapter state (needed by ``fedalora`` with ``local_a="reset"``).
        cfg: the client's adapter config (needed by ``fresh`` resets, i.e. ``fedalora-het``).
        seed: seed of the fresh draw (``fedalora-het``); None uses torch's global generator.

    Shared tensors are replaced by the server's (truncated to the client's rank for ``zeropad``), reset
    tensors are re-initialised, everything else is kept. Raises ValueError if the payload does not fit.
    """
    new = {n: state[n] for n in roles}
    shared = strategy.shared.names(roles)
    missing = [n for n in shared if n not in received]
    extra = [n for n in received if n not in shared]
    if missing or extra:
        raise ValueError(
            f"server payload does not fit strategy {strategy.name!r}: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    for n in shared:
        own, value = roles[n].shape, received[n]
        if strategy.aggregation == "zeropad":
            if value.dim() != len(own) or any(v < o for v, o in zip(value.shape, own, strict=True)):
                raise ValueError(f"{n}: server tensor {tuple(value.shape)} cannot be truncated to {own}")
            value = _truncate(value, own)
        elif tuple(value.shape) != own:
            raise ValueError(f"{n}: server tensor {tuple(value.shape)} does not match the client's {own}")
        new[n] = value.detach().clone().to(dtype=state[n].dtype, device=state[n].device)

    reset = strategy.reset.names(roles)
    if reset and strategy.reset_to == "initial":
        if initial is None:
            raise ValueError(
                f"strategy {strategy.name!r} resets {reset[:2]}…: pass the client's initial state"
            )
        for n in reset:
            new[n] = initial[n].detach().clone()
    elif reset and strategy.reset_to == "fresh":
        if cfg is None:
            raise ValueError(
                f"strategy {strategy.name!r} re-initialises tensors each round: pass the client cfg"
            )
        new.update(_fresh(roles, reset, state, cfg, seed))
    return new


def _fresh(
    roles: RoleMap, names: Sequence[str], like: Mapping[str, Tensor], cfg: AsymLoraConfig, seed: int | None
) -> dict[str, Tensor]:
    """A fresh draw of the method's init for ``names`` (grouped by layer; the other tensors are discarded)."""
    method = get_method(cfg.method)
    groups: dict[tuple[str, str], dict[str, str]] = {}
    for n, info in roles.items():
        groups.setdefault((info.module, info.adapter), {})[info.tensor] = n
    wanted = set(names)
    out: dict[str, Tensor] = {}
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        with torch.no_grad():
            for members in groups.values():
                fresh = {t: torch.empty(roles[n].shape, dtype=torch.float32) for t, n in members.items()}
                method.init_(fresh, cfg)
                for t, n in members.items():
                    if n in wanted:
                        out[n] = fresh[t].to(dtype=like[n].dtype, device=like[n].device)
    return out


def local_state(strategy: Strategy, state: Mapping[str, Tensor], roles: RoleMap) -> dict[str, Tensor]:
    """The tensors a client keeps for the next round (its ``context.state``): the strategy's local ones."""
    return {n: state[n].detach().clone() for n in strategy.local.names(roles)}


def _het_groups(roles: RoleMap) -> dict[tuple[str, str], dict[str, str]]:
    """(module, adapter) -> {B0/B1/B2 tensor name -> qualified name} for every fedhet layer."""
    groups: dict[tuple[str, str], dict[str, str]] = {}
    for n, info in roles.items():
        if info.tensor in (B0_NAME, B1_NAME, B2_NAME):
            groups.setdefault((info.module, info.adapter), {})[info.tensor] = n
    return groups


def client_upload(
    strategy: Strategy,
    state: Mapping[str, Tensor],
    roles: RoleMap,
    *,
    het_upload: Literal["auto", "product", "factors"] = "auto",
) -> dict[str, Tensor]:
    """What the client sends back after training.

    ``mean``/``zeropad``: its shared tensors (at its own rank). ``accumulate`` (Fed-ALoRA-het), per layer:
    the product B2·B1 (d_out × d_m) under B0's name, or — when ``r·(d_out + d_m) < d_out·d_m`` (``"auto"``)
    — the two factors under B2's and B1's names, for the server to multiply.
    """
    if strategy.aggregation != "accumulate":
        return {n: state[n].detach().clone() for n in strategy.shared.names(roles)}
    out: dict[str, Tensor] = {}
    for names in _het_groups(roles).values():
        b2, b1 = state[names[B2_NAME]].detach(), state[names[B1_NAME]].detach()
        d_out, d_m = roles[names[B0_NAME]].shape
        r = b2.shape[1]
        factors = r * (d_out + d_m) < d_out * d_m if het_upload == "auto" else het_upload == "factors"
        if factors:
            out[names[B2_NAME]], out[names[B1_NAME]] = b2.clone(), b1.clone()
        else:
            out[names[B0_NAME]] = b2 @ b1
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
        want, axis = tuple(server[n].shape), _rank_axis(roles[n])
        got = tuple(t.shape)
        ok = len(got) == len(want) and all(
            g == w or (axis is not None and i == len(want) + axis and 1 <= g <= w)
            for i, (g, w) in enumerate(zip(got, want, strict=True))
        )
        if not ok:
            return Rejection(
                cid, f"shape {got} does not fit the server's {want} (only the rank may be smaller)", n
            )
    return None


def _het_increments(
    cid: ClientId, upd: Mapping[str, Tensor], server: Mapping[str, Tensor], roles: RoleMap
) -> dict[str, Tensor] | Rejection:
    """B0 name -> this client's B2·B1 (float64), from products or factors; or why the update is refused."""
    groups = _het_groups(roles)
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


def aggregate(
    strategy: Strategy,
    server_state: Mapping[str, Tensor],
    updates: Sequence[tuple[Mapping[str, Tensor], int]],
    roles: RoleMap,
    client_ids: Sequence[ClientId] | None = None,
) -> AggregateResult:
    """Combine the client updates of one round with weights p_k = n_k / Σ n_j over the accepted clients.

    Args:
        server_state: the shared tensors the server sent this round.
        updates: ``(client_upload(...), num_examples)`` per client.
        roles: a role map of the adapted model (any client's: names and roles are the same for all; for
            ``zeropad`` the server's, at the largest rank).
        client_ids: ids used in the result (default: the position in ``updates``).

    Updates with missing or extra keys, shapes that do not match the server's, NaN/Inf values or no examples
    are rejected and recorded, never averaged in. With no accepted update the previous state is returned.
    """
    if client_ids is None:
        client_ids = list(range(len(updates)))
    if len(client_ids) != len(updates):
        raise ValueError(f"{len(client_ids)} client ids for {len(updates)} updates")
    result = AggregateResult(state={n: t.detach().clone() for n, t in server_state.items()})
    accepted: list[tuple[ClientId, dict[str, Tensor], int]] = []
    for cid, (upd, n_k) in zip(client_ids, updates, strict=True):
        if isinstance(n_k, bool) or not isinstance(n_k, int | np.integer) or n_k < 1:
            result.rejected.append(Rejection(cid, f"num_examples={n_k!r}: must be an integer >= 1"))
            continue
        bad = _check_finite(cid, upd)
        if bad is None and strategy.aggregation == "mean":
            bad = _validate_mean(cid, upd, server_state)
        elif bad is None and strategy.aggregation == "zeropad":
            bad = _validate_zeropad(cid, upd, server_state, roles)
        if bad is not None:
            result.rejected.append(bad)
            continue
        if strategy.aggregation == "accumulate":
            inc = _het_increments(cid, upd, server_state, roles)
            if isinstance(inc, Rejection):
                result.rejected.append(inc)
                continue
            accepted.append((cid, inc, int(n_k)))
        else:
            accepted.append((cid, {k: v.double() for k, v in upd.items()}, int(n_k)))
    if not accepted:
        return result
    total = sum(n for _, _, n in accepted)
    result.accepted = [cid for cid, _, _ in accepted]
    result.weights = {cid: n / total for cid, _, n in accepted}
    for name, old in server_state.items():
        acc = (
            old.double().clone()
            if strategy.aggregation == "accumulate"
            else torch.zeros(old.shape, dtype=torch.float64)
        )
        for cid, upd, _ in accepted:
            value = upd[name]
            if strategy.aggregation == "zeropad" and tuple(value.shape) != tuple(old.shape):
                padded = torch.zeros(old.shape, dtype=torch.float64)
                padded[tuple(slice(0, s) for s in value.shape)] = value
                value = padded
            acc += result.weights[cid] * value
        result.state[name] = acc.to(dtype=old.dtype, device=old.device)
    return result


# --- serialisation ---------------------------------------------------------------------------------
def payload_params(tensors: Mapping[str, Tensor]) -> int:
    """Number of values in a message (works on meta tensors)."""
    return sum(t.numel() for t in tensors.values())


def payload_bytes(tensors: Mapping[str, Tensor]) -> int:
    """Bytes of tensor data a message carries: Σ numel × element size, at the tensors' dtype.

    This is what a Flower ``ArrayRecord`` holds as array data; keys and array headers add a few dozen
    bytes per tensor (see `state_to_bytes` for an exact serialised size).
    """
    return sum(t.numel() * t.element_size() for t in tensors.values())


def state_to_arrays(tensors: Mapping[str, Tensor]) -> tuple[list[str], list[np.ndarray]]:
    """(keys, numpy arrays) in the given order: what Flower's ``ArrayRecord`` takes as a list."""
    keys = list(tensors)
    try:
        return keys, [tensors[k].detach().cpu().contiguous().numpy() for k in keys]
    except TypeError as e:  # bfloat16 / float8: NumPy has no such dtype
        raise TypeError(
            f"{e}: NumPy cannot hold these tensors; send them with asymlora.federated.client_app.to_record "
            "(bit-exact raw bytes) or state_to_bytes (safetensors)"
        ) from None


def arrays_to_state(keys: Sequence[str], arrays: Sequence[np.ndarray]) -> dict[str, Tensor]:
    """Inverse of `state_to_arrays`."""
    if len(keys) != len(arrays):
        raise ValueError(f"{len(keys)} keys for {len(arrays)} arrays")
    return {k: torch.from_numpy(np.array(a, copy=True)) for k, a in zip(keys, arrays, strict=True)}


def state_to_bytes(tensors: Mapping[str, Tensor]) -> bytes:
    """A state dict as safetensors bytes (exact, self-describing; len() is the real message size)."""
    return st_save({k: t.detach().cpu().contiguous() for k, t in tensors.items()})


def bytes_to_state(data: bytes | bytearray | io.BytesIO) -> dict[str, Tensor]:
    """Inverse of `state_to_bytes`; raises ValueError on corrupted bytes."""
    raw = data.getvalue() if isinstance(data, io.BytesIO) else bytes(data)
    try:
        return st_load(raw)
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"not a valid safetensors payload ({e})") from None
