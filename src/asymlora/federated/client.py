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

import json
import logging
import math
import os
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from asymlora.federated.config import FedConfig
from asymlora.federated.strategies import (
    RoleMap,
    Strategy,
    adapter_state,
    client_config,
    client_round_start,
    client_upload,
    freeze_,
    load_adapter_state_,
    local_state,
    role_map,
)
from asymlora.io import atomic_file
from asymlora.methods import get_method
from asymlora.methods.base import Role
from asymlora.methods.fedhet import B2_NAME
from asymlora.roles import adapter_tensors
from asymlora.tuner.config import AsymLoraConfig

__all__ = [
    "RoundResult",
    "adapted_model",
    "base_model",
    "client_adapter_config",
    "evaluate_client",
    "global_state",
    "initial_state",
    "load_client_state",
    "local_only_baseline",
    "save_client_state",
    "score_tasks",
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
        from asymlora.models import load

        t0 = time.perf_counter()
        _BASE[name] = load(name, device="auto")  # CUDA (bf16) when Ray gave this client a GPU, else CPU
        logger.info("loaded %s in %.1f s (pid %d)", name, time.perf_counter() - t0, os.getpid())
    return _BASE[name]


def _cfg_key(cfg: AsymLoraConfig) -> str:
    return json.dumps(cfg.to_dict(), sort_keys=True, default=str)


def adapted_model(name: str, cfg: AsymLoraConfig) -> tuple[Any, Any]:
    """(peft model with adapter ``cfg``, tokenizer); cached until a client of another config needs it."""
    import peft

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
    """The adapter of one client: the strategy's method and, for heterogeneous strategies, r_i and
    alpha_i = 2·r_i. ``strategy=None`` (local-only baseline): plain LoRA at the client's rank, with
    alpha_i = 2·r_i when the config gives per-client ranks."""
    base = cfg.base_adapter()
    if strategy is not None:
        return client_config(strategy, base, rank if strategy.heterogeneous else None)
    from dataclasses import replace

    if cfg.clients.ranks is not None:
        return replace(base, method="lora", r=rank, lora_alpha=2 * rank)
    return replace(base, method="lora" if base.method == "fedhet" else base.method)


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
    groups: dict[tuple[str, str], dict[str, str]] = {}
    for n, info in roles.items():
        groups.setdefault((info.module, info.adapter), {})[info.tensor] = n
    out: dict[str, Tensor] = {}
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        for (module, adapter), members in groups.items():
            torch.manual_seed(_layer_seed(seed, module, adapter))
            fresh = {t: torch.empty(roles[n].shape, dtype=torch.float32) for t, n in members.items()}
            method.init_(fresh, cfg)
            for t, n in members.items():
                out[n] = fresh[t]
    return out


def het_seed(seed: int, client: int, rnd: int) -> int:
    """Seed of client ``client``'s fresh A, M, B1 in round ``rnd`` (fedalora-het)."""
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


# --- local training ----------------------------------------------------------------------------------
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
) -> tuple[float, int]:
    """``steps`` AdamW steps on the training examples of ``tasks``; returns (mean loss, examples). The
    mean loss is NaN when ``steps`` is 0.

    Batches come from `asymlora.train.batch_indices` at global steps ``step_offset`` … so the data order
    continues across rounds. Raises RuntimeError on a non-finite loss.
    """
    from asymlora.data import MultiTaskCollator, MultiTaskDataset
    from asymlora.train import batch_indices

    train_tasks = [t for t in tasks if t.train]
    if not train_tasks:
        raise ValueError("this client has no training example")
    dataset = MultiTaskDataset(train_tasks, tokenizer, max_length=max_length)
    collate = MultiTaskCollator(tokenizer)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable adapter tensor: nothing to train")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    losses: list[float] = []
    model.train()
    try:
        for s in range(steps):
            idx = batch_indices(step_offset + s, len(dataset), batch_size, seed)
            batch = collate([dataset[i] for i in idx])
            out = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                labels=batch["labels"],
                use_cache=False,  # a training forward needs no KV cache
            )
            loss = out.loss
            if not torch.isfinite(loss):
                raise RuntimeError(f"non-finite training loss {float(loss)} at local step {s}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            losses.append(float(loss.detach()))
    finally:
        model.eval()
        for p in params:
            p.grad = None
    return (sum(losses) / len(losses) if losses else math.nan), len(dataset)


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


def train_round(
    cfg: FedConfig,
    strategy: Strategy,
    client: int,
    rank: int,
    rnd: int,
    received: Mapping[str, Tensor],
    carried: Mapping[str, Tensor] | None,
    tasks: Sequence[Any],
) -> RoundResult:
    """One client's round: start from the server's tensors and its own local ones, train, build the upload.

    Args:
        client: the client index (partition id); rank: its adapter rank; rnd: the round (1-based).
        received: the server's download payload.
        carried: the client's trained adapter of the previous round (None in round 1 or when lost).
        tasks: the client's data.
    """
    t0 = time.perf_counter()
    f = cfg.faults
    if f.hits("raise_in", client, rnd):
        raise RuntimeError(f"injected fault: client {client} raises in round {rnd} (faults.raise_in)")
    acfg = client_adapter_config(cfg, strategy, rank)
    model, tokenizer = adapted_model(cfg.model.name, acfg)
    roles = role_map(model)
    init = initial_state(roles, acfg, cfg.seed)
    notes = []
    state = dict(init)
    if carried is not None:
        state.update(local_state(strategy, carried, roles))
    elif rnd > 1 and strategy.local.names(roles) and not strategy.reset.names(roles):
        notes.append(
            f"client {client}: no local tensors from round {rnd - 1}; starting them from the shared init"
        )
    start = client_round_start(
        strategy, state, received, roles, initial=init, cfg=acfg, seed=het_seed(cfg.seed, client, rnd)
    )
    load_adapter_state_(model, start)
    _reset_trainable_(model)
    freeze_(model, strategy)
    t = cfg.train
    loss, n = train_local(
        model,
        tokenizer,
        tasks,
        steps=t.local_steps,
        batch_size=t.batch_size,
        lr=t.lr,
        seed=data_seed(cfg.seed, client),
        step_offset=(rnd - 1) * t.local_steps,
        max_length=cfg.data.max_length,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
    )
    trained = adapter_state(model)
    upload = client_upload(strategy, trained, roles, het_upload=cfg.het_upload)
    if f.hits("nan_in", client, rnd) and upload:
        first = next(iter(upload))
        upload[first] = torch.full_like(upload[first], float("nan"))
    if f.hits("bad_shape_in", client, rnd) and upload:
        first = next(iter(upload))
        bad = upload[first]
        upload[first] = torch.zeros((bad.shape[0] + 1, *bad.shape[1:]), dtype=bad.dtype)
    return RoundResult(
        upload=upload,
        trained=trained,
        num_examples=n,
        train_loss=loss,
        seconds=time.perf_counter() - t0,
        a_drift_start=a_drift(start, init, roles),
        a_drift_end=a_drift(trained, init, roles),
        notes=notes,
    )


# --- evaluation --------------------------------------------------------------------------------------
def score_tasks(model: Any, tokenizer: Any, tasks: Sequence[Any], cfg: FedConfig) -> dict[str, Any]:
    """Scores of ``model`` on the test split of each task; ``score`` is the test-size-weighted mean of the
    tasks' primary metrics (the task's own metric when the client holds one task)."""
    from asymlora.eval import evaluate_task, primary_metric

    e = cfg.eval
    per_task: dict[str, dict[str, float]] = {}
    primary: dict[str, str] = {}
    total = weighted = 0.0
    for task in tasks:
        if not task.test:
            continue
        metrics = evaluate_task(
            model,
            tokenizer,
            task,
            task_id=None,
            batch_size=e.batch_size,
            max_new_tokens=e.max_new_tokens,
            max_examples=e.max_examples,
        )
        per_task[task.name] = metrics
        primary[task.name] = primary_metric(task)
        weighted += metrics[primary[task.name]] * metrics["n"]
        total += metrics["n"]
    if total == 0:
        raise ValueError("this client has no test example to evaluate")
    return {"score": weighted / total, "n": int(total), "per_task": per_task, "primary": primary}


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
            if value.dim() != len(own) or any(v < o for v, o in zip(value.shape, own, strict=True)):
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
    t = cfg.train
    loss, n = train_local(
        model,
        tokenizer,
        tasks,
        steps=cfg.rounds * t.local_steps,
        batch_size=t.batch_size,
        lr=t.lr,
        seed=data_seed(cfg.seed, client),
        max_length=cfg.data.max_length,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
    )
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


def save_client_state(
    state_dir: str | Path, client: int, rnd: int, trained: Mapping[str, Tensor], strategy: str
) -> Path:
    """Write the client's trained adapter of round ``rnd`` atomically; keep this round and the one before."""
    from safetensors.torch import save_file

    path = _state_file(state_dir, client, rnd)
    tensors = {k: v.detach().cpu().contiguous() for k, v in trained.items()}
    atomic_file(path, lambda tmp: save_file(tensors, tmp, metadata={"round": str(rnd), "strategy": strategy}))
    for old in path.parent.glob("round-*.safetensors"):
        r = old.stem.removeprefix("round-")
        if r.isdigit() and int(r) < rnd - 1:
            old.unlink(missing_ok=True)
    return path


def load_client_state(
    state_dir: str | Path | None, client: int, rnd: int, strategy: str
) -> dict[str, Tensor] | None:
    """The client's trained adapter of round ``rnd`` from its storage, or None if it is not there."""
    if not state_dir:
        return None
    path = _state_file(state_dir, client, rnd)
    if not path.is_file():
        return None
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    if meta.get("strategy") != strategy or meta.get("round") != str(rnd):
        return None
    return load_file(str(path))
