"""Router diagnostics: which experts the soft/top-k routers use, per layer and per task (docs/design.md §3).

    with RouterStats(model, task_names=["add", "parity"]) as stats:   # forward hooks on the routed layers
        ...training or evaluation forwards...
        stats.write(run_dir / "router.jsonl", step=10)                 # one JSON line, then the sums restart

For each routed layer (``router`` soft or topk) and adapter, over the real tokens t = 1..T seen since the
last `write` (padding, i.e. attention mask 0, excluded), with g_t ∈ R^N the gate the layer applies (top-k:
after zeroing and renormalising) and N the number of experts:

    load_i          = (1/T) · #{t : argmax_j g_t,j = i}                  share of tokens whose top-1 is i
    mean_gate_i     = ḡ_i = (1/T) · Σ_t g_t,i                            the expert's mean weight
    token_entropy   = (1/T) · Σ_t H(g_t) / log N                         0: every token picks one expert
    load_entropy    = H(load) / log N                                    0: one expert takes every token
    max_load        = max_i load_i
    max_gate        = max_i ḡ_i                                           the largest share of the gate weight
    gate_entropy    = H(ḡ) / log N                                       0: one expert gets all the weight
    usage[τ][i]     = mean of g_t,i over the tokens of task τ            the task × expert matrix

with H(p) = −Σ_i p_i log p_i (0 log 0 = 0); the entropies are null for N = 1. A layer is *collapsed* when
max_gate > `COLLAPSE_MAX_SHARE` or gate_entropy < `COLLAPSE_MIN_ENTROPY`: expert i's adapter gets the
gradient through g_t,i, so ḡ_i is its share of the training signal, and the others then get almost none;
`write` warns (`RoutingCollapseWarning`) and lists the layer under ``"collapsed"`` in the record. With top-1
routing ḡ = load. A soft router's top-1 load alone is not the measure: gates of (0.31, 0.39, 0.30) on every
token put all of the load on one expert while all three train (observed in the multi-task campaign). A low
token entropy alone is not collapse either: it means hard, confident routing, which is what specialised
experts look like.

The gate is recomputed in a forward hook from the layer's input, ``router_probs(x, W_g)`` then
``topk_gate`` (`asymlora.routing`), under no_grad: the layer's own code is untouched, and the value is the
layer's up to float rounding (the layer may fuse W_g with its first product). The attention mask is read
from the forward of the model inside the peft wrapper (generation included), task ids from the routing
call (training batches carry them) or from `RouterStats.task` (evaluation). Layer calls made outside that
model's forward (gradient-checkpoint recomputation during backward) are not counted twice.
`plot_router_usage` and `plot_router_load` draw a ``router.jsonl``; `asymlora analyze` calls
`analyze_routing` for run directories that hold one.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from asymlora import distributed
from asymlora.analysis.factors import PEFT_KEY_PREFIX
from asymlora.analysis.figures import new_figure, save_figure
from asymlora.io import apply_umask
from asymlora.methods import get_method
from asymlora.methods.base import ATTR_PREFIX
from asymlora.routing import RoutingCall, router_probs, topk_gate
from asymlora.tuner.layer import AsymLoraLayer

__all__ = [
    "COLLAPSE_MAX_SHARE",
    "COLLAPSE_MIN_ENTROPY",
    "ROUTER_LOG",
    "RouterLog",
    "RouterStats",
    "RoutingCollapseWarning",
    "analyze_routing",
    "append_jsonl",
    "collapse_reasons",
    "plot_router_load",
    "plot_router_usage",
    "read_router_log",
    "routing_statistics",
]

ROUTER_LOG = "router.jsonl"
"""File name of the router log in a run directory."""

COLLAPSE_MAX_SHARE = 0.95
"""A layer one of whose experts gets more than this share of the gate weight (its mean gate) has collapsed."""

COLLAPSE_MIN_ENTROPY = 0.05
"""A layer whose gate-weight entropy H(ḡ) / log N is below this has collapsed (all weight on one expert)."""

ROUTED = ("soft", "topk")
ROUTER_ATTR = ATTR_PREFIX + "router"
"""The layer attribute holding the router weights W_g of each adapter."""


class RoutingCollapseWarning(UserWarning):
    """A learned router sends (almost) every token to one expert: the other experts are not trained."""


# --- the statistics ------------------------------------------------------------------------------------------
def _entropy(p: Tensor) -> Tensor:
    """H(p) = −Σ p log p over the last axis, 0 log 0 = 0 (torch.special.entr)."""
    return torch.special.entr(p).sum(-1)


@dataclass
class _Sums:
    """Running sums of one (layer, adapter) over the tokens seen since the last reset (float64)."""

    tokens: Tensor  # ()
    top1: Tensor  # (N,) tokens whose argmax is i
    gate: Tensor  # (N,) Σ_t g_t,i
    entropy: Tensor  # () Σ_t H(g_t)
    task_tokens: Tensor  # (num_tasks,)
    task_gate: Tensor  # (num_tasks, N)

    @classmethod
    def zeros(cls, n: int, num_tasks: int, device: torch.device) -> _Sums:
        def z(*shape: int) -> Tensor:
            return torch.zeros(shape, dtype=torch.float64, device=device)

        return cls(z(), z(n), z(n), z(), z(num_tasks), z(num_tasks, n))

    def add(self, gate: Tensor, mask: Tensor | None, task_ids: Tensor | None, num_tasks: int) -> None:
        """gate (tokens, N); mask (tokens,) bool or None; task_ids (tokens,) long in [0, num_tasks) or None.

        Everything stays on the gate's device (no host synchronisation)."""
        g = gate.to(torch.float64)
        w = torch.ones_like(g[:, 0]) if mask is None else mask.to(g.dtype)
        self.tokens += w.sum()
        self.top1.index_add_(0, g.argmax(-1), w)
        self.gate += (g * w[:, None]).sum(0)
        self.entropy += (_entropy(g) * w).sum()
        if task_ids is not None:
            if num_tasks > self.task_tokens.shape[0]:
                extra = num_tasks - self.task_tokens.shape[0]
                self.task_tokens = torch.cat([self.task_tokens, self.task_tokens.new_zeros(extra)])
                self.task_gate = torch.cat([self.task_gate, self.task_gate.new_zeros(extra, g.shape[1])])
            self.task_tokens.index_add_(0, task_ids.to(g.device), w)
            self.task_gate.index_add_(0, task_ids.to(g.device), g * w[:, None])


def _pad_rows(t: Tensor, rows: int) -> Tensor:
    """``t`` with zero rows appended up to ``rows`` along the first axis."""
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])]) if t.shape[0] < rows else t


def _check_task_ids(task_ids: Tensor, num_tasks: int) -> int:
    """The number of usage rows needed for ``task_ids`` (≥ num_tasks). Raises ValueError on a negative id."""
    if not task_ids.numel():
        return num_tasks
    lo, hi = int(task_ids.min()), int(task_ids.max())
    if lo < 0:
        raise ValueError(f"task id {lo} is negative; task ids index the tasks from 0")
    return max(num_tasks, hi + 1)


def _r(x: float) -> float:
    return float(f"{x:.6g}")


def routing_statistics(
    gate: Tensor, mask: Tensor | None = None, task_ids: Tensor | None = None, num_tasks: int = 0
) -> dict[str, Any]:
    """The statistics of the module docstring for one batch of gates.

    gate: (..., N) gates (rows sum to 1); mask: (...) bool/0-1, True = real token (None: all count);
    task_ids: (...) task of each token (None: no usage matrix); num_tasks: rows of the usage matrix
    (at least max id + 1). Returns a dict with ``tokens``, ``load``, ``mean_gate``, ``token_entropy``,
    ``load_entropy``, ``max_load``, ``usage`` (num_tasks × N, null rows for tasks without tokens) and
    ``task_tokens``. Raises ValueError when the shapes of mask or task_ids do not match the gate's.
    """
    n = gate.shape[-1]
    for name, t in (("mask", mask), ("task_ids", task_ids)):
        if t is not None and tuple(t.shape) != tuple(gate.shape[:-1]):
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}; it must be the gate's {tuple(gate.shape[:-1])}"
            )
    ids = None if task_ids is None else task_ids.reshape(-1).long()
    rows = num_tasks if ids is None else _check_task_ids(ids, num_tasks)
    sums = _Sums.zeros(n, rows, gate.device)
    sums.add(gate.reshape(-1, n), None if mask is None else mask.reshape(-1).bool(), ids, rows)
    return _finish(sums)


def _finish(s: _Sums) -> dict[str, Any]:
    """Per-layer record from running sums (all plain floats; null where there are no tokens)."""
    n, tokens = s.top1.shape[0], float(s.tokens)
    if tokens == 0:
        return {"tokens": 0, "load": None, "mean_gate": None, "token_entropy": None, "load_entropy": None,
                "max_load": None, "max_gate": None, "gate_entropy": None, "usage": None,
                "task_tokens": [0] * s.task_tokens.shape[0]}  # fmt: skip
    load = s.top1 / tokens
    log_n = math.log(n) if n > 1 else None
    usage = [
        [_r(v) for v in (s.task_gate[t] / c).tolist()] if (c := float(s.task_tokens[t])) > 0 else None
        for t in range(s.task_tokens.shape[0])
    ]
    return {
        "tokens": round(tokens),
        "load": [_r(v) for v in load.tolist()],
        "mean_gate": [_r(v) for v in (s.gate / tokens).tolist()],
        "token_entropy": None if log_n is None else _r(float(s.entropy) / tokens / log_n),
        "load_entropy": None if log_n is None else _r(float(_entropy(load)) / log_n),
        "max_load": _r(float(load.max())),
        "max_gate": _r(float((s.gate / tokens).max())),
        "gate_entropy": None if log_n is None else _r(float(_entropy(s.gate / tokens)) / log_n),
        "usage": usage,
        "task_tokens": [round(v) for v in s.task_tokens.tolist()],
    }


def collapse_reasons(stats: dict[str, Any]) -> list[str]:
    """Why a layer's routing counts as collapsed (empty list: it does not), from its ``mean_gate`` (module
    docstring; records written before ``max_gate`` existed are judged the same way). ``stats`` as
    `routing_statistics`."""
    gate = stats.get("mean_gate")
    if not gate or len(gate) < 2:
        return []
    share = torch.tensor(gate, dtype=torch.float64)
    share = share / share.sum()
    reasons, top = [], int(share.argmax())
    if float(share[top]) > COLLAPSE_MAX_SHARE:
        reasons.append(f"expert {top} gets {100 * float(share[top]):.1f} % of the gate weight")
    entropy = float(_entropy(share)) / math.log(len(gate))
    if entropy < COLLAPSE_MIN_ENTROPY:
        reasons.append(f"gate-weight entropy {entropy:.3f} < {COLLAPSE_MIN_ENTROPY}")
    return reasons


# --- the recorder --------------------------------------------------------------------------------------------
def _routed_layers(model: nn.Module) -> dict[str, AsymLoraLayer]:
    """Module name (peft prefix dropped) -> asymlora layer with at least one soft/topk adapter."""
    out: dict[str, AsymLoraLayer] = {}
    for name, module in model.named_modules():
        if isinstance(module, AsymLoraLayer) and any(
            get_method(c.method).uses_router and c.router in ROUTED for c in module.asymlora_config.values()
        ):
            out[name.removeprefix(PEFT_KEY_PREFIX)] = module
    return out


def _root(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper: its forward sees every call, generation included."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


class RouterStats:
    """Collect router statistics of a model's soft/top-k routed layers by forward hooks (module docstring).

    Args:
        model: a peft model with asymlora adapters (or the model inside it).
        task_names: names of the task ids 0..T-1, written into each record (optional).
        all_processes: under torchrun, `summary` and `write` are collectives over the tokens of every
            process (every process must call them; rank 0 writes); default: this process's tokens only.
    Use as a context manager (hooks removed on exit) or call `close`. Raises ValueError when the model
    has no soft/topk routed layer.
    """

    def __init__(
        self, model: nn.Module, task_names: Sequence[str] | None = None, *, all_processes: bool = False
    ) -> None:
        self.all_processes = all_processes
        self.layers = _routed_layers(model)
        if not self.layers:
            raise ValueError(
                "the model has no asymlora layer with a soft or topk router: nothing to record "
                "(plain LoRA, fedhet and router='task' adapters have no learned routing)"
            )
        self.task_names = list(task_names or [])
        self.num_tasks = len(self.task_names)
        self._sums: dict[tuple[str, str], _Sums] = {}
        self._task: int | None = None
        self._depth = 0
        self._paused = 0
        self._mask: Tensor | None = None
        root = _root(model)
        self._handles = [
            root.register_forward_pre_hook(self._enter, with_kwargs=True),
            root.register_forward_hook(self._leave, always_call=True),
        ]
        self._handles += [
            cast(nn.Module, m).register_forward_hook(self._observe(n)) for n, m in self.layers.items()
        ]

    # hooks
    def _enter(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._depth += 1
        if self._depth > 1:
            return
        mask = kwargs.get("attention_mask")  # peft and generate pass it by name
        self._mask = mask if isinstance(mask, Tensor) and mask.dim() == 2 else None
        call = next(iter(self.layers.values())).routing_state.call
        ids = call.task_ids if self._task is None and call is not None else None
        if self._task is not None:
            self.num_tasks = max(self.num_tasks, self._task + 1)
        elif ids is not None:
            self.num_tasks = max(self.num_tasks, _check_task_ids(ids, 0))

    def _leave(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._depth = max(0, self._depth - 1)
        if not self._depth:
            self._mask = None

    def _observe(self, name: str):
        def hook(module: Any, args: tuple, output: Any) -> None:
            if self._depth and not self._paused and not (module.disable_adapters or module.merged) and args:
                with torch.no_grad():
                    self._add(name, module, args[0])

        return hook

    def _add(self, name: str, layer: AsymLoraLayer, x: Tensor) -> None:
        call = layer.routing_state.call or RoutingCall()
        tokens = RoutingCall(attention_mask=self._mask if self._mask is not None else call.attention_mask)
        mask = tokens.token_mask(x)  # (batch, seq) or None
        ids = None
        if self._task is not None:
            ids = torch.full(x.shape[:-1], self._task, dtype=torch.long, device=x.device)
        elif x.dim() >= 2 and (rows := call.task_ids_for(x.shape[0], flat_tokens=x.dim() == 2)) is not None:
            ids = rows.to(x.device).view(-1, *([1] * (x.dim() - 2))).expand(x.shape[:-1])
        routers = getattr(layer, ROUTER_ATTR)  # set per adapter by the layer's update_layer
        for adapter in layer.active_adapters:
            cfg = layer.asymlora_config.get(adapter)
            if cfg is None or cfg.router not in ROUTED or not get_method(cfg.method).uses_router:
                continue
            probs = router_probs(x, routers[adapter])
            gate = (topk_gate(probs, cfg.top_k) if cfg.router == "topk" else probs).reshape(
                -1, cfg.num_experts
            )
            key = (name, adapter)
            if key not in self._sums:
                self._sums[key] = _Sums.zeros(cfg.num_experts, self.num_tasks, gate.device)
            self._sums[key].add(
                gate, None if mask is None else mask.reshape(-1), None if ids is None else ids.reshape(-1),
                self.num_tasks,
            )  # fmt: skip

    @property
    def task_label(self) -> int | None:
        """The task every token of the next forwards belongs to (None: the routing call's task ids)."""
        return self._task

    @task_label.setter
    def task_label(self, task_id: int | None) -> None:
        if task_id is not None and (not isinstance(task_id, int) or task_id < 0):
            raise ValueError(f"task label {task_id!r}: give the task's index, an int >= 0, or None")
        self._task = task_id

    @contextmanager
    def task(self, task_id: int) -> Iterator[None]:
        """Label every token of the forwards inside as task ``task_id`` (evaluation, one task at a time)."""
        saved, self.task_label = self._task, task_id
        try:
            yield
        finally:
            self._task = saved

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Count none of the forwards inside (e.g. the validation forwards of the stopping rule)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    # results
    def _all_sums(self) -> dict[tuple[str, str], _Sums]:
        """The sums of every process of a multi-process run (a collective: each saw its own slice of the
        batches; inside `asymlora.distributed.lockstep` every process sees every token: this one's alone)."""
        if not (self.all_processes and distributed.splitting()):
            return self._sums
        mine = {
            f"{n}\0{a}": [getattr(s, f.name).tolist() for f in fields(s)] for (n, a), s in self._sums.items()
        }
        merged: dict[tuple[str, str], _Sums] = {}
        for part in distributed.all_gather_json(mine):
            for key, values in part.items():
                name, adapter = key.split("\0")
                tokens, top1, gate, entropy, task_tokens, task_gate = (
                    torch.tensor(v, dtype=torch.float64) for v in values
                )
                total = merged.setdefault((name, adapter), _Sums.zeros(top1.shape[0], 0, torch.device("cpu")))
                total.tokens += tokens
                total.top1 += top1
                total.gate += gate
                total.entropy += entropy
                rows = max(total.task_tokens.shape[0], task_tokens.shape[0])
                total.task_tokens = _pad_rows(total.task_tokens, rows) + _pad_rows(task_tokens, rows)
                total.task_gate = _pad_rows(total.task_gate, rows) + _pad_rows(
                    task_gate.view(-1, top1.shape[0]), rows
                )
        order = [key for key in self._sums] + [key for key in merged if key not in self._sums]
        return {key: merged[key] for key in order}

    def summary(self) -> list[dict[str, Any]]:
        """Per (layer, adapter) statistics since the last reset, in module order (see module docstring); with
        ``all_processes`` in a multi-process run over the tokens of every process (a collective)."""
        out = []
        for (name, adapter), sums in self._all_sums().items():
            cfg = self.layers[name].asymlora_config[adapter]
            entry = {"module": name, "adapter": adapter, "router": cfg.router, "num_experts": cfg.num_experts}
            if cfg.router == "topk":
                entry["top_k"] = cfg.top_k
            entry.update(_finish(sums))
            entry["collapsed"] = collapse_reasons(entry)
            out.append(entry)
        return out

    def reset(self) -> None:
        """Start the sums again (`write` does this after writing)."""
        self._sums.clear()

    def write(self, path: str | os.PathLike, step: int, phase: str = "train", **extra: Any) -> dict[str, Any]:
        """Append one record (all layers) to ``path``, warn on collapsed layers, and reset the sums.

        With ``all_processes`` under torchrun every process must call it (the record covers the tokens of all
        of them); rank 0 writes and warns, the others get ``{}``.

        Record: ``{"step", "phase", "time", "tasks", "layers": [...], "collapsed": [module, ...], **extra}``.
        Returns it. Raises ValueError when an extra key would replace one of these.
        """
        layers = self.summary()
        if self.all_processes and not distributed.is_main():  # a collective summary: rank 0 alone writes
            self.reset()
            return {}
        record: dict[str, Any] = {"step": int(step), "phase": phase, "time": round(time.time(), 3), "tasks": self.task_names,
                  "layers": layers, "collapsed": [f"{e['module']} ({e['adapter']})" for e in layers if e["collapsed"]]}  # fmt: skip
        for key in extra:
            if key in record:
                raise ValueError(f"extra key {key!r} would replace a router record field")
        record.update(extra)
        append_jsonl(path, record)
        self.reset()
        if record["collapsed"]:
            warnings.warn(
                f"routing collapsed in {len(record['collapsed'])} of {len(layers)} routed layers "
                f"(e.g. {record['collapsed'][0]}): one expert gets more than "
                f"{100 * COLLAPSE_MAX_SHARE:.0f} % of the gate weight or the gate-weight entropy is below "
                f"{COLLAPSE_MIN_ENTROPY}; the other experts get almost no training. Details: {path}",
                RoutingCollapseWarning,
                stacklevel=2,
            )
        return record

    def close(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> RouterStats:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class RouterLog:
    """`RouterStats` written to ``run_dir/router.jsonl`` every ``every`` training steps (the recipe's use).

    Pass it as (or call it from) the training loop's ``on_step``: step s is logged when s % every == 0 or
    s == steps. For evaluation, label each task's forwards with ``log.stats.task(i)`` and call
    ``log.write(step, "eval")``. `close` removes the hooks. `for_run` gives None when there is nothing to do.
    Under torchrun every process keeps one and calls it (its records cover the batches of all processes,
    ``all_processes``); rank 0 writes.
    """

    def __init__(
        self, model: nn.Module, run_dir: str | os.PathLike, every: int, steps: int, task_names: Sequence[str]
    ) -> None:
        if every < 1:
            raise ValueError(f"every={every}: log the routers every K >= 1 steps (0 turns the log off)")
        self.path, self.every, self.steps = Path(run_dir) / ROUTER_LOG, every, steps
        self.stats = RouterStats(model, task_names, all_processes=True)

    @classmethod
    def for_run(
        cls, model: nn.Module, run_dir: str | os.PathLike, every: int, steps: int, task_names: Sequence[str]
    ) -> RouterLog | None:
        """A log, or None when ``every`` is 0 or the model has no soft/topk routed layer."""
        if not every or not _routed_layers(model):
            return None
        return cls(model, run_dir, every, steps, task_names)

    def __call__(self, step: int) -> None:
        if step % self.every == 0 or step == self.steps:
            self.write(step)

    def write(self, step: int, phase: str = "train") -> dict[str, Any]:
        return self.stats.write(self.path, step, phase)

    def close(self) -> None:
        self.stats.close()


# --- the log file --------------------------------------------------------------------------------------------
def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append ``record`` as one JSON line with a single write(2) on an O_APPEND descriptor, then fsync.

    A crash cannot interleave or half-write the line in practice; `read_router_log` skips an unterminated
    last line anyway. The file is created with the process umask (normally 0644)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(record, allow_nan=False) + "\n").encode()
    new = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    if new:
        apply_umask(path)


def read_router_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``router.jsonl``, in file order; a resumed run's re-logged steps keep the latest.

    Skips an unterminated last line (an interrupted write). Raises ValueError naming the line when a
    complete line is not a JSON router record."""
    text = Path(path).read_text(encoding="utf-8")
    lines = text.split("\n")
    if lines and lines[-1]:
        warnings.warn(f"{path}: ignoring an unterminated last line (an interrupted write)", stacklevel=2)
    latest: dict[tuple[str, int], dict[str, Any]] = {}
    for n, line in enumerate(lines[:-1], 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            key = (str(rec["phase"]), int(rec["step"]))
            if not isinstance(rec["layers"], list):
                raise TypeError("'layers' is not a list")
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"{path}:{n} is not a router record ({e}); was it written by RouterStats?"
            ) from e
        latest.pop(key, None)
        latest[key] = rec
    return list(latest.values())


# --- figures -------------------------------------------------------------------------------------------------
def _final(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The evaluation record if there is one, else the last training record."""
    evals = [r for r in records if r["phase"] == "eval"]
    return (evals or list(records))[-1]


def plot_router_usage(records: Sequence[dict[str, Any]], out_png: str | os.PathLike, title: str = "") -> Path:
    """Heatmaps of the task × expert usage (mean gate per task) per routed layer, from the evaluation record
    (else the last training record) of `read_router_log`. Returns the PNG path. Raises ValueError when the
    record has no task labels."""
    rec = _final(records)
    layers = [e for e in rec["layers"] if e.get("usage") and any(row is not None for row in e["usage"])]
    if not layers:
        raise ValueError(f"the {rec['phase']} record of step {rec['step']} has no task-labelled tokens")
    cols = min(6, len(layers))
    rows = math.ceil(len(layers) / cols)
    n_tasks, n_exp = len(layers[0]["usage"]), layers[0]["num_experts"]
    fig = new_figure(1.2 + cols * (0.5 + 0.45 * n_exp), 1.0 + rows * (0.8 + 0.35 * n_tasks))
    axes = fig.subplots(rows, cols, squeeze=False)
    names = rec.get("tasks") or []
    top = max(v for e in layers for row in e["usage"] if row is not None for v in row)  # one colour scale
    image = None
    for ax, e in zip(axes.flat, layers, strict=False):
        grid = [[math.nan] * e["num_experts"] if row is None else row for row in e["usage"]]
        image = ax.imshow(grid, vmin=0, vmax=top, cmap="viridis", aspect="auto")
        if n_tasks * n_exp <= 48:
            for (t, i), v in _cells(grid):
                if not math.isnan(v):
                    ax.text(
                        i,
                        t,
                        f"{v:.2f}",
                        ha="center",
                        va="center",
                        fontsize=5,
                        color="w" if v < top / 2 else "k",
                    )
        ax.set_title(e["module"].removeprefix("model.layers.").replace(".self_attn", "").replace(".mlp", ""),
                     fontsize=7)  # fmt: skip
        ax.set_xticks(range(e["num_experts"]))
        ax.set_yticks(range(len(grid)))
        ax.set_yticklabels([names[t] if t < len(names) else str(t) for t in range(len(grid))], fontsize=6)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(layers) :]:
        ax.set_axis_off()
    fig.colorbar(image, ax=axes, shrink=0.6, label="mean gate ḡ")
    fig.suptitle(f"{title + ': ' if title else ''}task × expert usage ({rec['phase']}, step {rec['step']}; "
                 "rows: tasks, columns: experts)", fontsize=9)  # fmt: skip
    return save_figure(fig, out_png)


def _cells(grid: list[list[float]]) -> Iterator[tuple[tuple[int, int], float]]:
    return (((t, i), v) for t, row in enumerate(grid) for i, v in enumerate(row))


def plot_router_load(records: Sequence[dict[str, Any]], out_png: str | os.PathLike, title: str = "") -> Path:
    """Expert load over training steps: left, each expert's load averaged over the routed layers; right, the
    largest share of the gate weight in each layer (max_i ḡ_i), with the collapse threshold. Returns the PNG
    path. Raises ValueError when no training record has tokens."""
    train = [r for r in records if r["phase"] == "train" and any(e.get("load") for e in r["layers"])]
    if not train:
        raise ValueError("no training record with routed tokens to plot")
    train.sort(key=lambda r: r["step"])
    steps = [r["step"] for r in train]
    fig = new_figure(11, 4)
    ax_l, ax_m = fig.subplots(1, 2)
    n_exp = max(len(e["load"]) for r in train for e in r["layers"] if e.get("load"))
    for i in range(n_exp):
        ys = []
        for r in train:
            vals = [e["load"][i] for e in r["layers"] if e.get("load") and i < len(e["load"])]
            ys.append(sum(vals) / len(vals) if vals else math.nan)
        ax_l.plot(steps, ys, marker="o", ms=2, label=f"expert {i}")
    ax_l.set(xlabel="training step", ylabel="load (share of top-1 tokens)", ylim=(0, 1),
             title="Expert load, mean over routed layers")  # fmt: skip
    ax_l.legend(fontsize=7, ncol=2)
    modules = list(dict.fromkeys((e["module"], e["adapter"]) for r in train for e in r["layers"]))
    for module, adapter in modules:
        ys = [next((max(e["mean_gate"]) for e in r["layers"] if (e["module"], e["adapter"]) == (module, adapter)
                    and e.get("mean_gate")), math.nan) for r in train]  # fmt: skip
        ax_m.plot(steps, ys, lw=0.8, alpha=0.6)
    ax_m.axhline(COLLAPSE_MAX_SHARE, color="red", ls="--", lw=1, label=f"collapse ({COLLAPSE_MAX_SHARE})")
    ax_m.axhline(1 / n_exp, color="gray", ls=":", lw=1, label=f"balanced (1/{n_exp})")
    ax_m.set(xlabel="training step", ylabel="max_i mean gate_i", ylim=(0, 1.02),
             title=f"Largest gate share per layer ({len(modules)} layers)")  # fmt: skip
    ax_m.legend(fontsize=7)
    from matplotlib.ticker import MaxNLocator  # optional at import time (see figures.new_figure)

    for ax in (ax_l, ax_m):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, out_png)


def _log_for(entry: dict[str, Any]) -> Path | None:
    """The router.jsonl next to an analysed adapter (its run directory), if any."""
    for d in (Path(entry.get("source", "")), Path(entry.get("path", "")).parent):
        if str(d) not in ("", ".") and (d / ROUTER_LOG).is_file():
            return d / ROUTER_LOG
    return None


def analyze_routing(
    adapters: Sequence[dict[str, Any]], out_dir: str | os.PathLike, *, figures: bool = True
) -> dict[str, Any]:
    """For each analysed adapter (``analysis.json``'s ``adapters`` entries) whose run directory holds a
    ``router.jsonl``: summarise its final record and (``figures``) draw ``router_usage_<label>.png`` and
    ``router_load_<label>.png`` into ``out_dir``.

    Returns ``{"figures": [...], "routing": {label: {"log", "step", "phase", "mean": {...}, "collapsed"}},
    "notes": [...]}``; a log that cannot be plotted gives a note, not an error."""
    out, pngs, routing, notes = Path(out_dir), [], {}, []
    for entry in adapters:
        log = _log_for(entry)
        if log is None:
            continue
        label = entry["label"]
        slug = "".join(c if c.isalnum() or c in "-_" else "_" for c in label)
        records = read_router_log(log)
        if not records:
            notes.append(f"{label}: {log} holds no router records")
            continue
        final = _final(records)
        layers = [e for e in final["layers"] if e.get("load")]
        routing[label] = {
            "log": str(log), "step": final["step"], "phase": final["phase"],
            "mean": {k: _r(sum(e[k] for e in layers) / len(layers)) if layers and all(e[k] is not None for e in layers)
                     else None for k in ("max_load", "token_entropy", "load_entropy")},
            # judged again from the statistics, so logs written under an older definition read the same way
            "collapsed": [f"{e['module']} ({e['adapter']})" for e in final["layers"] if collapse_reasons(e)],
        }  # fmt: skip
        mean = routing[label]["mean"]
        notes.append(
            f"{label}: routing at {final['phase']} step {final['step']}, mean over {len(layers)} layers: "
            + ", ".join(f"{k} {v:.3f}" for k, v in mean.items() if v is not None)
            + f"; collapsed in {len(routing[label]['collapsed'])} layer(s) (see {log})"
        )
        plots = {f"router_usage_{slug}.png": plot_router_usage, f"router_load_{slug}.png": plot_router_load}
        for name, plot in plots.items() if figures else ():
            try:
                plot(records, out / name, title=label)
                pngs.append(name)
            except ValueError as e:
                notes.append(f"{label}: no {name}: {e}")
    return {"figures": pngs, "routing": routing, "notes": notes}
