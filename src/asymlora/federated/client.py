"""The client side of a federated round, without Flower: local training and personalised evaluation.

`client_app` (the Flower ``ClientApp``) is a thin layer over this module; the local-only baseline of
`run` calls it directly. Everything here works on ``dict[str, Tensor]`` keyed by qualified adapter
tensor names and on the pure functions of `asymlora.federated.strategies`:

    start   = client_round_start(strategy, {initial, carried local}, received, roles, ...)   # this round
    ...train `local_steps` AdamW steps on the client's own data...
    trained = adapter_state(model)                          # kept by the client (context.state, disk)
    upload  = client_upload(strategy, trained, roles)       # the only tensors that leave the client

The base model is loaded once per process and the peft-wrapped model is cached per adapter config
(clients of other ranks in the same process re-wrap it, which takes milliseconds).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import peft
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from asymlora.config import without_later_keys
from asymlora.data import MultiTaskCollator, MultiTaskDataset
from asymlora.eval import evaluate_task, primary_metric
from asymlora.federated.config import FedConfig
from asymlora.federated.state import (
    RoleMap,
    adapter_state,
    het_groups,
    layer_groups,
    load_adapter_state_,
    role_map,
)
from asymlora.federated.strategies import Strategy, client_config, truncate
from asymlora.io import atomic_file
from asymlora.methods import get_method
from asymlora.methods.base import Role
from asymlora.methods.fedhet import B0_NAME, B1_NAME, B2_NAME
from asymlora.models import load
from asymlora.roles import adapter_tensors
from asymlora.train import StepLoop, step_batches
from asymlora.train.precision import autocast_dtype
from asymlora.tuner.config import AsymLoraConfig

__all__ = [
    "IDENTITY_KEYS",
    "RoundResult",
    "adapted_model",
    "base_model",
    "check_client_state",
    "client_adapter_config",
    "client_round_start",
    "client_upload",
    "evaluate_client",
    "freeze_",
    "global_state",
    "initial_state",
    "load_client_state",
    "local_only_baseline",
    "local_state",
    "save_client_state",
    "score_tasks",
    "state_identity",
    "tensors_sha256",
    "train_local",
    "train_round",
]

logger = logging.getLogger(__name__)

# --- the model, cached per process -------------------------------------------------------------------
_BASE: dict[str, tuple[Any, Any]] = {}
_WRAPPED: dict[str, tuple[str, Any]] = {}


def base_model(name: str) -> tuple[Any, Any]:
    """(model, tokenizer) of ``name``, loaded once per process (`asymlora.models.load`)."""
    if name not in _BASE:
        t0 = time.perf_counter()
        _BASE[name] = load(name, device="auto")  # CUDA (bf16) when Ray gave this client a GPU, else CPU
        logger.info("loaded %s in %.1f s (pid %d)", name, time.perf_counter() - t0, os.getpid())
    return _BASE[name]


def _cfg_key(cfg: AsymLoraConfig) -> str:
    return json.dumps(cfg.to_dict(), sort_keys=True, default=str)


def adapted_model(name: str, cfg: AsymLoraConfig) -> tuple[Any, Any]:
    """(peft model with adapter ``cfg``, tokenizer); cached until a client of another config needs it."""
    key = _cfg_key(cfg)
    cached = _WRAPPED.get(name)
    if cached is not None and cached[0] == key:
        return cached[1], _BASE[name][1]
    model, tokenizer = base_model(name)
    if cached is not None:
        model = cached[1].unload()
        _BASE[name] = (model, tokenizer)
        del _WRAPPED[name]
    pm = peft.get_peft_model(model, cfg)
    _WRAPPED[name] = (key, pm)
    return pm, tokenizer


def client_adapter_config(cfg: FedConfig, strategy: Strategy | None, rank: int) -> AsymLoraConfig:
    """The adapter of client ``rank``'s client in the run ``cfg`` (`strategies.client_config` on
    ``cfg.base_adapter()``): the strategy's method and, for heterogeneous strategies, r_i and
    alpha_i = `het_alpha` (r_i). ``strategy=None`` (local-only baseline): plain LoRA, at the client's rank
    with alpha_i = `het_alpha` (r_i) when the config gives per-client ranks."""
    if strategy is None:
        return client_config(None, cfg.base_adapter(), rank if cfg.clients.ranks is not None else None)
    return client_config(strategy, cfg.base_adapter(), rank if strategy.heterogeneous else None)


def _reset_trainable_(model: nn.Module) -> None:
    """requires_grad back to what each method declares (a cached model may carry FFA's frozen A)."""
    for t in adapter_tensors(model):
        t.param.requires_grad_(t.trainable)


# --- initial state -----------------------------------------------------------------------------------
def _layer_seed(seed: int, module: str, adapter: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(f"{module}/{adapter}".encode())) % 2**63


def initial_state(roles: RoleMap, cfg: AsymLoraConfig, seed: int) -> dict[str, Tensor]:
    """The method's initialisation of every adapter tensor, drawn per layer from ``seed`` and the layer name.

    Only shapes are read from ``roles``, so the server (meta-device model) and every client (real model)
    get the same values: the shared seed of FFA's frozen A and of Fed-ALoRA's initial A.
    """
    method = get_method(cfg.method)
    out: dict[str, Tensor] = {}
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        for (module, adapter), members in layer_groups(roles).items():
            torch.manual_seed(_layer_seed(seed, module, adapter))
            fresh = {t: torch.empty(roles[n].shape, dtype=torch.float32) for t, n in members.items()}
            method.init_(fresh, cfg)
            for t, n in members.items():
                out[n] = fresh[t]
    return out


def het_seed(seed: int, client: int, rnd: int) -> int:
    """Seed of client ``client``'s fresh A, M, B1 in round ``rnd`` (fedalora-het: every round under
    ``het_local="fresh"``; under ``"persist"`` only when the client has no carried A, M, B1)."""
    return (seed * 7_919 + client) * 100_003 + rnd


def data_seed(seed: int, client: int) -> int:
    """Seed of client ``client``'s batch order (continued across rounds)."""
    return seed * 1_009 + client


def a_drift(state: Mapping[str, Tensor], initial: Mapping[str, Tensor], roles: RoleMap) -> float:
    """‖A − A_init‖ / ‖A_init‖ over every trainable A-side tensor (0 when A is at its initial value)."""
    num = den = 0.0
    for n, info in roles.items():
        if info.role == Role.A and info.trainable:
            num += float((state[n].double() - initial[n].double()).pow(2).sum())
            den += float(initial[n].double().pow(2).sum())
    return math.sqrt(num / den) if den > 0 else 0.0


# --- the round: what the client loads and uploads -------------------------------------------------
def freeze_(model: nn.Module, strategy: Strategy) -> list[str]:
    """Set ``requires_grad=False`` on the tensors the strategy never trains (FFA's A); returns their names."""
    frozen = strategy.frozen.names(role_map(model))
    params = {t.name: t.param for t in adapter_tensors(model)}
    for n in frozen:
        params[n].requires_grad_(False)
    return frozen


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
            if value.dim() != len(own) or any(value.shape[i] < o for i, o in enumerate(own)):
                raise ValueError(f"{n}: server tensor {tuple(value.shape)} cannot be truncated to {own}")
            value = truncate(value, own)
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
    groups = layer_groups(roles)
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


def _local_start(
    strategy: Strategy,
    carried: Mapping[str, Tensor] | None,
    init: Mapping[str, Tensor],
    roles: RoleMap,
    cfg: AsymLoraConfig,
    seed: int,
) -> dict[str, Tensor]:
    """The client's state before `client_round_start`: the shared init with its carried local tensors.

    Without carried tensors (round 1, or lost), ``fedalora-het`` with ``het_local="persist"`` draws its
    local A, M, B1 from ``seed`` (`het_seed`), exactly as ``"fresh"`` does every round, so both variants
    start round 1 from the same adapter.
    """
    state = dict(init)
    if carried is not None:
        state.update(local_state(strategy, carried, roles))
    elif strategy.het_local == "persist":
        state.update(_fresh(roles, strategy.local.names(roles), init, cfg, seed))
    return state


def local_state(strategy: Strategy, state: Mapping[str, Tensor], roles: RoleMap) -> dict[str, Tensor]:
    """The tensors a client keeps for the next round (its ``context.state``): the strategy's local ones."""
    return {n: state[n].detach().clone() for n in strategy.local.names(roles)}


def factors_are_smaller(r: int, d_out: int, d_m: int) -> bool:
    """Fed-ALoRA-het's ``"auto"`` upload rule for one layer (docs/design.md §4): send the factors B2 (d_out × r)
    and B1 (r × d_m) when they hold fewer values than their product B2·B1 (d_out × d_m)."""
    return r * (d_out + d_m) < d_out * d_m


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
    for names in het_groups(roles).values():
        b2, b1 = state[names[B2_NAME]].detach(), state[names[B1_NAME]].detach()
        d_out, d_m = roles[names[B0_NAME]].shape
        r = b2.shape[1]
        factors = factors_are_smaller(r, d_out, d_m) if het_upload == "auto" else het_upload == "factors"
        if factors:
            out[names[B2_NAME]], out[names[B1_NAME]] = b2.clone(), b1.clone()
        else:
            out[names[B0_NAME]] = b2 @ b1
    return out


# --- local training ----------------------------------------------------------------------------------
_TRAIN_KEYS = ("input_ids", "attention_mask", "labels")  # the collator's task ids are not passed: a federated
# client trains one adapter on its whole mixture


_DATA_NOTES_LOGGED: set[str] = set()
"""The data notes (`MultiTaskDataset.notes`) this process has logged: a client's data is the same every round,
and a note per client per round filled a campaign cell's log with 80 copies of 8 lines."""


def train_local(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[Any],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    step_offset: int = 0,
    max_length: int = 192,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    autocast: torch.dtype | None = None,
) -> tuple[float, int]:
    """``steps`` AdamW steps on the training examples of ``tasks``; returns (mean loss, examples). The
    mean loss is NaN when ``steps`` is 0. ``autocast``: the forwards' autocast dtype (None: off).

    Batches come from `asymlora.train.batch_indices` at global steps ``step_offset`` … so the data order
    continues across rounds; the loop is `asymlora.train.StepLoop`. Raises `asymlora.train.TrainingError`
    (a RuntimeError) on a non-finite loss.
    """
    train_tasks = [t for t in tasks if t.train]
    if not train_tasks:
        raise ValueError("this client has no training example")
    dataset = MultiTaskDataset(train_tasks, tokenizer, max_length=max_length, warn=False)
    for note in dataset.notes:  # the same data every round: what max_length cuts or skips, once per process
        if note not in _DATA_NOTES_LOGGED:
            _DATA_NOTES_LOGGED.add(note)
            logger.warning("%s", note)
    collate = MultiTaskCollator(tokenizer)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable adapter tensor: nothing to train")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    loop = StepLoop(
        model,
        optimizer,
        params,
        max_grad_norm,
        failure=lambda value, step: f"non-finite training loss {value} at local step {step - step_offset}",
        autocast=autocast,
    )

    def batches_of(step: int) -> list[dict[str, Tensor]]:
        return step_batches(dataset, collate, step, batch_size, seed, keys=_TRAIN_KEYS)

    model.train()
    try:
        losses = loop.run(batches_of, step_offset, step_offset + steps)
    finally:
        model.eval()
        for p in params:
            p.grad = None
    return (sum(losses) / len(losses) if losses else math.nan), len(dataset)


def _train_client(
    cfg: FedConfig,
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[Any],
    client: int,
    steps: int,
    step_offset: int = 0,
) -> tuple[float, int]:
    """`train_local` with the run's ``train.*`` settings and client ``client``'s data order. The steps draw
    their random numbers (adapter dropout) from torch's generator seeded by the run seed, the client and
    ``step_offset`` (restored afterwards), not from whatever the process drew before (loading the model the
    first time, other clients), so a client's round trains the same in a restarted or resumed process."""
    t = cfg.train
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(data_seed(cfg.seed, client) * 1_000_003 + step_offset)
        return train_local(
            model,
            tokenizer,
            tasks,
            steps=steps,
            batch_size=t.batch_size,
            lr=t.lr,
            seed=data_seed(cfg.seed, client),
            step_offset=step_offset,
            max_length=cfg.data.max_length,
            weight_decay=t.weight_decay,
            max_grad_norm=t.max_grad_norm,
            autocast=autocast_dtype(t.mixed_precision),
        )


@dataclass
class RoundResult:
    """What one client's training round produced."""

    upload: dict[str, Tensor]
    """The tensors sent to the server (`client_upload`)."""
    trained: dict[str, Tensor]
    """The client's whole adapter after training (kept locally, for the next round and evaluation)."""
    num_examples: int
    train_loss: float
    seconds: float
    a_drift_start: float
    """‖A − A_init‖/‖A_init‖ when the round's training started (0 under local_a=reset)."""
    a_drift_end: float
    notes: list[str] = field(default_factory=list)
    local_sha256_start: str = ""
    """`tensors_sha256` of the strategy's local tensors as loaded into the model at the round's start."""


def _inject_faults(cfg: FedConfig, client: int, rnd: int, upload: dict[str, Tensor]) -> dict[str, Tensor]:
    """``upload`` with the configured faults of this (client, round): the first tensor NaN
    (``faults.nan_in``) or one row too long (``faults.bad_shape_in``)."""
    f = cfg.faults
    if f.hits("nan_in", client, rnd) and upload:
        first = next(iter(upload))
        upload[first] = torch.full_like(upload[first], float("nan"))
    if f.hits("bad_shape_in", client, rnd) and upload:
        first = next(iter(upload))
        bad = upload[first]
        upload[first] = torch.zeros((bad.shape[0] + 1, *bad.shape[1:]), dtype=bad.dtype)
    return upload


def train_round(
    cfg: FedConfig,
    strategy: Strategy,
    client: int,
    rank: int,
    rnd: int,
    received: Mapping[str, Tensor],
    carried: Mapping[str, Tensor] | None,
    tasks: Sequence[Any],
    *,
    carried_round: int | None = None,
) -> RoundResult:
    """One client's round: start from the server's tensors and its own local ones, train, build the upload.

    Args:
        client: the client index (partition id); rank: its adapter rank; rnd: the round (1-based).
        received: the server's download payload.
        carried: the client's trained adapter of the previous round (None in round 1 or when lost).
        tasks: the client's data.
        carried_round: the round ``carried`` is from (partial participation: the last round the client
            trained in; 0: it never trained, so nothing is missing); None: ``rnd - 1``.
    """
    t0 = time.perf_counter()
    if cfg.faults.hits("raise_in", client, rnd):
        raise RuntimeError(f"injected fault: client {client} raises in round {rnd} (faults.raise_in)")
    acfg = client_adapter_config(cfg, strategy, rank)
    model, tokenizer = adapted_model(cfg.model.name, acfg)
    roles = role_map(model)
    init = initial_state(roles, acfg, cfg.seed)
    notes: list[str] = []
    seed = het_seed(cfg.seed, client, rnd)
    state = _local_start(strategy, carried, init, roles, acfg, seed)
    kept = set(strategy.local.names(roles)) - set(strategy.reset.names(roles))
    if carried is None and rnd > 1 and carried_round != 0 and kept:
        src = rnd - 1 if carried_round is None else carried_round
        where = "a fresh draw" if strategy.het_local == "persist" else "the shared init"
        notes.append(f"client {client}: no local tensors from round {src}; starting them from {where}")
    start = client_round_start(strategy, state, received, roles, initial=init, cfg=acfg, seed=seed)
    load_adapter_state_(model, start)
    local_start = tensors_sha256(local_state(strategy, adapter_state(model), roles))
    _reset_trainable_(model)
    freeze_(model, strategy)
    steps = cfg.train.local_steps
    loss, n = _train_client(cfg, model, tokenizer, tasks, client, steps, step_offset=(rnd - 1) * steps)
    trained = adapter_state(model)
    upload = _inject_faults(
        cfg, client, rnd, client_upload(strategy, trained, roles, het_upload=cfg.het_upload)
    )
    return RoundResult(
        upload=upload,
        trained=trained,
        num_examples=n,
        train_loss=loss,
        seconds=time.perf_counter() - t0,
        a_drift_start=a_drift(start, init, roles),
        a_drift_end=a_drift(trained, init, roles),
        notes=notes,
        local_sha256_start=local_start,
    )


# --- evaluation --------------------------------------------------------------------------------------
def score_tasks(model: Any, tokenizer: Any, tasks: Sequence[Any], cfg: FedConfig) -> dict[str, Any]:
    """Scores of ``model`` on the test split of each task; ``score`` is the test-size-weighted mean of the
    tasks' primary metrics (the task's own metric when the client holds one task). ``examples`` holds, per
    task, the example keys (`asymlora.eval.stats.example_key`) and each example's primary score in split
    order (absent for a corpus-level metric such as BLEU): the intervals and paired tests of a sweep."""
    e = cfg.eval
    per_task: dict[str, dict[str, float]] = {}
    primary: dict[str, str] = {}
    examples: dict[str, dict[str, list[Any]]] = {}
    total = weighted = 0.0
    for task in tasks:
        if not task.test:
            continue
        metrics, rows = cast(
            tuple[dict[str, float], list[dict[str, Any]]],
            evaluate_task(model, tokenizer, task, task_id=None, batch_size=e.batch_size,
                          max_new_tokens=e.max_new_tokens, max_examples=e.max_examples, with_examples=True),
        )  # fmt: skip
        per_task[task.name] = metrics
        primary[task.name] = metric = primary_metric(task)
        if rows and all(metric in r["scores"] for r in rows):
            examples[task.name] = {
                "keys": [r["key"] for r in rows],
                "scores": [r["scores"][metric] for r in rows],
            }
        weighted += metrics[primary[task.name]] * metrics["n"]
        total += metrics["n"]
    if total == 0:
        raise ValueError("this client has no test example to evaluate")
    return {"score": weighted / total, "n": int(total), "per_task": per_task, "primary": primary,
            "examples": examples}  # fmt: skip


def global_state(
    strategy: Strategy, trained: Mapping[str, Tensor], received: Mapping[str, Tensor], roles: RoleMap
) -> dict[str, Tensor]:
    """The client's adapter with the server's aggregated shared tensors in place of its own.

    Zero-padded tensors are truncated to the client's rank. Under ``fedalora-het`` the client's own
    correction B2·B1 is dropped (B2 = 0): it is already folded into the aggregated B0.
    """
    out = {n: t.clone() for n, t in trained.items()}
    for n in strategy.shared.names(roles):
        if n not in received:
            raise ValueError(f"the server's final tensors lack {n!r}")
        own = roles[n].shape
        value = received[n]
        if tuple(value.shape) != tuple(own):
            if value.dim() != len(own) or any(value.shape[i] < o for i, o in enumerate(own)):
                raise ValueError(f"{n}: server tensor {tuple(value.shape)} does not fit the client's {own}")
            value = value[tuple(slice(0, s) for s in own)]
        out[n] = value.clone().to(dtype=trained[n].dtype)
    if strategy.aggregation == "accumulate":
        for n, info in roles.items():
            if info.tensor == B2_NAME:
                out[n] = torch.zeros_like(out[n])
    return out


def evaluate_client(
    cfg: FedConfig,
    strategy: Strategy,
    client: int,
    rank: int,
    received: Mapping[str, Tensor],
    trained: Mapping[str, Tensor],
    tasks: Sequence[Any],
) -> dict[str, Any]:
    """Personalised (the client's own trained adapter) and, if configured, global scores on its test split."""
    t0 = time.perf_counter()
    acfg = client_adapter_config(cfg, strategy, rank)
    model, tokenizer = adapted_model(cfg.model.name, acfg)
    roles = role_map(model)
    load_adapter_state_(model, trained)
    out: dict[str, Any] = {
        "client": client,
        "rank": rank,
        "personalised": score_tasks(model, tokenizer, tasks, cfg),
    }
    if cfg.eval.global_scores:
        load_adapter_state_(model, global_state(strategy, trained, received, roles))
        out["global"] = score_tasks(model, tokenizer, tasks, cfg)
    out["seconds"] = time.perf_counter() - t0
    return out


def local_only_baseline(cfg: FedConfig, client: int, rank: int, tasks: Sequence[Any]) -> dict[str, Any]:
    """The Δm% reference: the client trains alone (plain LoRA at its rank, rounds × local_steps steps)."""
    t0 = time.perf_counter()
    acfg = client_adapter_config(cfg, None, rank)
    model, tokenizer = adapted_model(cfg.model.name, acfg)
    roles = role_map(model)
    load_adapter_state_(model, initial_state(roles, acfg, cfg.seed))
    _reset_trainable_(model)
    loss, n = _train_client(cfg, model, tokenizer, tasks, client, cfg.rounds * cfg.train.local_steps)
    scores = score_tasks(model, tokenizer, tasks, cfg)
    return {
        "client": client,
        "rank": rank,
        "personalised": scores,
        "train_loss": loss if math.isfinite(loss) else None,
        "num_examples": n,
        "seconds": time.perf_counter() - t0,
    }


# --- the client's own storage (for --resume) -----------------------------------------------------------
def _state_file(state_dir: str | Path, client: int, rnd: int) -> Path:
    return Path(state_dir) / f"client-{client}" / f"round-{rnd}.safetensors"


IDENTITY_KEYS = ("model", "adapter", "clients", "data", "train", "seed", "local_a", "het_local", "dp")
"""The config keys that decide what a client trains: two runs that agree on them (and on the strategy)
are the same run for the client's storage — a ``--resume`` may change ``rounds``, ``timeouts``, ``faults``,
``eval`` and ``run_dir``, not these."""


def state_identity(cfg: FedConfig, strategy: str) -> str:
    """SHA-256 (hex, 64 characters) of the strategy and the `IDENTITY_KEYS` of ``cfg``: the run identity
    stored with the client's adapter (`save_client_state`) and checked when it is read back."""
    d = cfg.to_dict()
    # clients.max_failed_rounds only says when the server stops: not what a client trains, and leaving it out
    # keeps the identity of the client files written before the setting existed (their runs can resume)
    d["clients"] = {k: v for k, v in d["clients"].items() if k != "max_failed_rounds"}
    # keys added later at their neutral value: files written before them match. train.mixed_precision has been
    # in this identity since it was added (16:38 UTC, 2026-11-30; files written since carry it at null), so it
    # stays (the files of runs started before it, with it null, are refused: one or the other had to be)
    without_later_keys(d, keep=("train.mixed_precision",))
    text = json.dumps({"strategy": strategy, **{k: d.get(k) for k in IDENTITY_KEYS}}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def tensors_sha256(tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 (hex) over ``tensors`` in name order: each name's UTF-8 bytes, then the raw bytes of the
    tensor (row-major, its own dtype). Equal digests mean bit-equal tensors; used to show what a client
    started a round from (``local_sha256_start`` in ``rounds.jsonl``)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        t = tensors[name].detach().cpu().contiguous().reshape(-1)  # bf16 has no numpy dtype: hash its bytes
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_client_state(
    state_dir: str | Path, client: int, rnd: int, trained: Mapping[str, Tensor], strategy: str,
    *, identity: str = "", started_from: int | None = None,
) -> Path:  # fmt: skip
    """Write the client's trained adapter of round ``rnd`` atomically (temp file + rename), with its
    round, strategy and run ``identity`` (`state_identity`) as metadata; keep it, the last round before
    it that the client trained in (a round re-run after a resume starts from that one; with partial
    participation it need not be ``rnd - 1``) and every round from ``started_from`` on — the round the
    server said the client last trained in: rounds after it whose replies never reached the server may
    be run again from it (docs/federated.md, "Rounds no client answered")."""
    path = _state_file(state_dir, client, rnd)
    tensors = {k: v.detach().cpu().contiguous() for k, v in trained.items()}
    meta = {"round": str(rnd), "strategy": strategy, "identity": identity}
    atomic_file(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    saved = {int(n): f for f in path.parent.glob("round-*.safetensors") if (n := f.stem[6:]).isdigit()}
    keep_from = rnd if started_from is None else started_from
    for r in sorted(k for k in saved if k < rnd)[:-1]:
        if r < keep_from:
            saved[r].unlink(missing_ok=True)
    return path


def check_client_state(state_dir: str | Path | None, client: int, identity: str) -> None:
    """Refuse a state directory that holds client ``client``'s adapter of another run.

    Raises:
        ValueError: a ``client-K/round-R.safetensors`` there was written under another run identity
            (`state_identity`: another config or strategy), naming the file and the fix.
    """
    if not state_dir or not identity:
        return
    for path in sorted((Path(state_dir) / f"client-{client}").glob("round-*.safetensors")):
        with safe_open(str(path), framework="pt") as fh:
            theirs = (fh.metadata() or {}).get("identity", "")
        if theirs and theirs != identity:
            raise ValueError(
                f"state-dir {state_dir}: {path.name} of client {client} belongs to another run (identity "
                f"{theirs[:12]}, this run {identity[:12]}: another config or strategy); give this node an "
                "empty state-dir or remove that run's files"
            )


def load_client_state(
    state_dir: str | Path | None, client: int, rnd: int, strategy: str, *, identity: str = "",
    or_earlier: bool = False,
) -> dict[str, Tensor] | None:  # fmt: skip
    """The client's trained adapter of round ``rnd`` from its storage, or None if it is not there.

    ``or_earlier``: else the one of its latest earlier round still kept (a client that missed a round —
    its SuperNode was killed — continues from where it was). With ``identity``, a file of another run
    raises ValueError (`check_client_state`)."""
    if not state_dir:
        return None
    check_client_state(state_dir, client, identity)
    for r in range(rnd, 0 if or_earlier else rnd - 1, -1):
        path = _state_file(state_dir, client, r)
        if not path.is_file():
            continue
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        if meta.get("strategy") == strategy and meta.get("round") == str(r):
            return load_file(str(path))
    return None
