"""Communication accounting: parameters and bytes per client per round, measured from the payloads.

Every figure here is the size of what `asymlora.federated.strategies` actually puts into the messages
(`download_payload` server→client, `client_upload` client→server), computed on the model's real adapter
tensors. For 7B-scale shapes the base model is built on the meta device (no weights; the adapter tensors
end up on meta too), so the table costs a few seconds and no memory.

Beside the measured figures it gives the accounting formulas of docs/design.md §4 that reproduce the ALoRA
paper's published "params communicated" (LLaMA-2-7B, q_proj and v_proj, L = 32, r = 8; heterogeneous
ranks [64, 64, 32, 32, 16, 16, 8, 8], r̄ = 30, d_m = 16).

    python -m asymlora.federated.accounting                # LLaMA-2-7B and Qwen2-7B tables (markdown)
    python -m asymlora.federated.accounting --arch llama2-7b
    python -m asymlora.federated.accounting --arch llama2-7b --transfer int8   # bytes at int8 both ways
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import peft
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, Qwen2Config

from asymlora.federated.client import client_adapter_config, client_upload, factors_are_smaller
from asymlora.federated.codec import TRANSFER_DTYPES, payload_bytes, payload_params, transfer_payload_bytes
from asymlora.federated.state import RoleMap, adapter_state, role_map
from asymlora.federated.strategies import (
    STRATEGY_NAMES,
    Strategy,
    client_config,
    download_payload,
    get_strategy,
    het_alpha,
    init_server_state,
)
from asymlora.methods.base import Role
from asymlora.models import BUILTIN_MODELS, ensure_builtin_cached
from asymlora.tuner.config import AsymLoraConfig

if TYPE_CHECKING:
    from asymlora.federated.config import FedConfig

PAPER_HET_RANKS: tuple[int, ...] = (64, 64, 32, 32, 16, 16, 8, 8)
"""The paper's heterogeneous client ranks (r̄ = 30)."""

ARCHS: dict[str, dict[str, Any]] = {
    "llama2-7b": {
        "family": "llama",
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "intermediate_size": 11008,
        "vocab_size": 32000,
        "targets": ("q_proj", "v_proj"),
    },
    "qwen2-7b": {
        "family": "qwen2",
        "hidden_size": 3584,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "intermediate_size": 18944,
        "vocab_size": 152064,
        "targets": ("q_proj", "o_proj"),
    },
}
"""Shapes of the paper's models and the target modules of its federated tables."""

DEFAULT_TARGETS: tuple[str, ...] = ("q_proj", "v_proj")
"""Target modules of any other model (a built-in name or a local directory): the paper's LLaMA setting."""

PUBLISHED: dict[str, dict[str, float]] = {
    "llama2-7b": {"fedit": 8.39, "fedsa": 4.19, "fedalora": 4.19, "zeropad": 49.28, "fedalora-het": 12.12},
    "qwen2-7b": {"fedit": 6.42, "fedsa": 3.21, "fedalora": 3.21, "zeropad": 37.73, "fedalora-het": 9.23},
}
"""The paper's "params communicated" per client per round (upload + download), millions."""


# --- building the models -----------------------------------------------------------------------------
_CONFIGS: dict[str, Any] = {}


def meta_model(arch: str) -> nn.Module:
    """A causal LM on the meta device: real module shapes, no weights.

    ``arch`` is a key of `ARCHS` (the paper's 7B shapes), a built-in model name (``smollm2-135m``, whose
    config comes from the converted cache) or a local model directory (its ``config.json``)."""
    if arch in ARCHS:
        spec = {k: v for k, v in ARCHS[arch].items() if k not in ("family", "targets")}
        family: Any = LlamaConfig if ARCHS[arch]["family"] == "llama" else Qwen2Config
        config = family(**spec)
    else:
        if arch not in _CONFIGS:
            if arch.lower() in BUILTIN_MODELS:
                source = str(ensure_builtin_cached(arch))
            elif Path(arch).is_dir():
                source = arch
            else:
                raise ValueError(
                    f"unknown architecture {arch!r}: choose one of {sorted(ARCHS)}, a built-in model "
                    f"({', '.join(sorted(BUILTIN_MODELS))}) or a local model directory"
                )
            try:
                loaded = AutoConfig.from_pretrained(source)
            except OSError as e:  # a missing or unreadable config.json: a usage error, not a crash
                raise ValueError(f"cannot read the model config of {arch!r}: {e}") from e
            loaded.__dict__.pop("quantization_config", None)
            _CONFIGS[arch] = loaded
        config = _CONFIGS[arch]
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def adapted_meta_model(arch: str, cfg: AsymLoraConfig) -> nn.Module:
    """`meta_model` with the asymlora adapter ``cfg`` injected (its tensors end up on meta too)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(meta_model(arch), cfg)


# --- measuring -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClientCost:
    """One client's traffic in one round."""

    client: int
    rank: int
    params_up: int
    params_down: int
    bytes_up: int
    bytes_down: int

    @property
    def params(self) -> int:
        return self.params_up + self.params_down

    @property
    def bytes(self) -> int:
        return self.bytes_up + self.bytes_down


@dataclass(frozen=True)
class StrategyCost:
    """A strategy's traffic per client per round, measured, with the paper's formula beside it.

    Attributes:
        strategy: strategy name.
        clients: one `ClientCost` per client.
        paper_params: the docs/design.md §4 accounting formula (mean per client, upload + download).
        published: the paper's published figure in millions, or None.
        note: remarks for the table.
    """

    strategy: str
    clients: tuple[ClientCost, ...]
    paper_params: float
    published: float | None = None
    note: str = ""
    ranks: tuple[int, ...] = field(default=())

    def _mean(self, attr: str) -> float:
        return sum(getattr(c, attr) for c in self.clients) / len(self.clients)

    @property
    def params_up(self) -> float:
        return self._mean("params_up")

    @property
    def params_down(self) -> float:
        return self._mean("params_down")

    @property
    def params(self) -> float:
        """Mean parameters per client per round, upload + download."""
        return self._mean("params")

    @property
    def bytes(self) -> float:
        """Mean bytes per client per round, upload + download."""
        return self._mean("bytes")


def round_cost(
    strategy: Strategy,
    server: tuple[dict[str, torch.Tensor], RoleMap],
    clients: Sequence[tuple[dict[str, torch.Tensor], RoleMap]],
    ranks: Sequence[int],
    *,
    het_upload: Literal["auto", "product", "factors"] = "auto",
    transfer: tuple[str, str] | None = None,
) -> tuple[ClientCost, ...]:
    """Traffic of one round, from the strategy's real payloads.

    Args:
        server: (adapter state, role map) the server's shared tensors are initialised from (for
            ``zeropad``: at the largest rank).
        clients: (adapter state, role map) of every client after local training (values do not matter;
            meta tensors are fine).
        ranks: each client's rank, for the record.
        het_upload: ``fedalora-het``'s upload choice (see `client_upload`).
        transfer: (up, down) wire dtypes (`codec.TRANSFER_DTYPES`): bytes as `codec.transfer_payload_bytes`
            counts them (int8: 1 B per value + a float32 scale per row); None: at the tensors' dtype.
    """
    down = download_payload(strategy, init_server_state(strategy, *server))
    out = []
    for k, ((state, roles), rank) in enumerate(zip(clients, ranks, strict=True)):
        up = client_upload(strategy, state, roles, het_upload=het_upload)
        if transfer is None:
            b_up, b_down = payload_bytes(up), payload_bytes(down)
        else:
            b_up, b_down = transfer_payload_bytes(up, transfer[0]), transfer_payload_bytes(down, transfer[1])
        out.append(ClientCost(k, rank, payload_params(up), payload_params(down), b_up, b_down))
    return tuple(out)


def run_round_cost(cfg: FedConfig, strategy_name: str) -> tuple[ClientCost, ...]:
    """The traffic one round of ``strategy_name`` must have in the federated run ``cfg`` (its model, target
    modules, client ranks, ``het_upload``), from the strategy's payloads on the meta device, at the wire
    dtypes ``transfer.up`` / ``transfer.down`` — the reference the bytes logged by a real run
    (``rounds.jsonl``'s ``payload_up`` / ``payload_down``) are checked against."""
    strategy = cfg.strategy(strategy_name)
    # a homogeneous strategy trains adapter.r on every client, whatever clients.ranks lists
    ranks = [cfg.client_rank(k) if strategy.heterogeneous else cfg.adapter.r for k in range(cfg.clients.num)]

    def model_state(rank: int) -> tuple[dict[str, torch.Tensor], RoleMap]:
        model = adapted_meta_model(cfg.model.name, client_adapter_config(cfg, strategy, rank))
        return adapter_state(model), role_map(model)

    server = model_state(max(ranks) if strategy.heterogeneous else cfg.adapter.r)
    states = {k: model_state(k) for k in set(ranks)}
    wire = (cfg.transfer.up, cfg.transfer.down)
    return round_cost(
        strategy, server, [states[k] for k in ranks], ranks, het_upload=cfg.het_upload, transfer=wire
    )


def expected_round_bytes(cfg: FedConfig, strategy_name: str) -> dict[str, float]:
    """Expected traffic of one round of ``strategy_name`` under partial participation (docs/federated.md,
    "Partial participation"), in bytes of tensor data (the payload; float32), upload + download.

    Every client is sampled with the same probability m / K (m = ``cfg.clients_per_round``, K =
    ``clients.num``), so a participating client moves on average the mean of `run_round_cost` over all
    clients (``per_client``; equal for every client under a homogeneous strategy), and a round m times
    that (``per_round``; ``up_per_round`` + ``down_per_round``).
    """
    costs = run_round_cost(cfg, strategy_name)
    m, k = cfg.clients_per_round, len(costs)
    up, down = sum(c.bytes_up for c in costs) / k, sum(c.bytes_down for c in costs) / k
    return {
        "clients_per_round": m,
        "per_client": up + down,
        "per_round": m * (up + down),
        "up_per_round": m * up,
        "down_per_round": m * down,
    }


def _layer_dims(roles: RoleMap) -> list[tuple[int, int]]:
    """(d_in, d_out) of every adapted layer of a LoRA role map."""
    dims: dict[str, list[int]] = {}
    for info in roles.values():
        d = dims.setdefault(info.module, [0, 0])
        if info.role == Role.A:
            d[0] = info.shape[-1]
        elif info.role == Role.B:
            d[1] = info.shape[-2]
    return [(a, b) for a, b in dims.values()]


def paper_params(
    strategy: str,
    dims: Sequence[tuple[int, int]],
    r: int,
    ranks: Sequence[int],
    d_m: int,
    het_inner_factors: bool = True,
) -> float:
    """docs/design.md §4's accounting of the paper's figures, per client per round (upload + download).

    Args:
        dims: (d_in, d_out) of every adapted layer (all layers, all target modules).
        r: homogeneous rank; ranks: heterogeneous client ranks (r̄ = their mean); d_m: intermediate rank.
        het_inner_factors: Fed-ALoRA-het counts d_out·r̄ + 2·d_m·r̄ up (the paper's LLaMA-2 figure); False
            counts d_out·r̄ up only, which is what the paper's Qwen2 figure (9.23) works out to.
    """
    r_bar, r_max = sum(ranks) / len(ranks), max(ranks)
    if strategy == "fedit":
        return sum(2 * (i + o) * r for i, o in dims)
    if strategy in ("ffa", "fedalora"):
        return sum(2 * o * r for _, o in dims)
    if strategy == "fedsa":
        return sum(2 * i * r for i, _ in dims)
    if strategy == "zeropad":
        return sum((i + o) * (r_bar + r_max) for i, o in dims)
    if strategy == "fedalora-het":
        inner = 2 * d_m * r_bar if het_inner_factors else 0.0
        return sum(o * r_bar + inner + o * d_m for _, o in dims)
    raise ValueError(f"unknown strategy {strategy!r}; choose one of {list(STRATEGY_NAMES)}")


def communication_table(
    arch: str = "llama2-7b",
    r: int = 8,
    ranks: Sequence[int] = PAPER_HET_RANKS,
    d_m: int = 16,
    dtype: torch.dtype = torch.float32,
    transfer: tuple[str, str] | None = None,
) -> list[StrategyCost]:
    """Per-client per-round traffic of every strategy on ``arch`` (meta device), with the paper's figures.

    Homogeneous strategies use rank ``r`` on every client (as many clients as ``ranks``); ``zeropad`` and
    ``fedalora-het`` use the client ranks ``ranks`` and intermediate rank ``d_m``. Parameters are counted
    from the payloads; bytes at ``dtype``, or at the (up, down) wire dtypes ``transfer`` (`round_cost`).
    """
    targets = list(ARCHS[arch]["targets"]) if arch in ARCHS else list(DEFAULT_TARGETS)
    base = AsymLoraConfig(
        method="lora", r=r, lora_alpha=het_alpha(r), intermediate_rank=d_m, target_modules=targets
    )
    cache: dict[tuple[str, int], tuple[dict[str, torch.Tensor], RoleMap]] = {}

    def model_state(strategy: Strategy, rank: int) -> tuple[dict[str, torch.Tensor], RoleMap]:
        cfg = client_config(strategy, base, rank if strategy.heterogeneous else None)
        key = (cfg.method, cfg.r)
        if key not in cache:
            model = adapted_meta_model(arch, cfg)
            state = {k: v.to(dtype) for k, v in adapter_state(model).items()}
            cache[key] = (state, role_map(model))
        return cache[key]

    homo_ranks = [r] * len(ranks)
    dims = _layer_dims(model_state(get_strategy("fedit"), r)[1])
    published = PUBLISHED.get(arch, {})
    rows = []
    for name in STRATEGY_NAMES:
        strategy = get_strategy(name)
        client_ranks = list(ranks) if strategy.heterogeneous else homo_ranks
        server = model_state(strategy, max(client_ranks))
        clients = [model_state(strategy, k) for k in client_ranks]
        costs = round_cost(strategy, server, clients, client_ranks, transfer=transfer)
        note = ""
        paper = paper_params(name, dims, r, ranks, d_m)
        if name == "fedalora-het":
            # `client_upload`'s "auto" rule, layer by layer: a rank can send factors on some layers and the
            # product on others when the layers' d_out differ (q_proj and v_proj under grouped-query attention)
            sends_factors = {k: {factors_are_smaller(k, o, d_m) for _, o in dims} for k in set(ranks)}
            products = sorted(k for k, s in sends_factors.items() if s == {False})
            factors = sorted(k for k, s in sends_factors.items() if s == {True})
            mixed = sorted(k for k, s in sends_factors.items() if len(s) > 1)
            note = f"ours: B2·B1 up for r_i in {products}, factors B2, B1 for r_i in {factors}"
            if mixed:
                note += f", per layer the smaller of the two for r_i in {mixed}"
            note += "; B0 down"
            if arch == "qwen2-7b":
                alt = paper_params(name, dims, r, ranks, d_m, het_inner_factors=False)
                note += f"; the published 9.23 is L·Σ d_out·(r̄ + d_m) = {alt / 1e6:.2f} M (no 2·d_m·r̄ term)"
        elif name == "zeropad":
            note = "upload at own rank, download padded to the largest rank"
        rows.append(StrategyCost(name, costs, paper, published.get(name), note, tuple(client_ranks)))
    return rows


def format_table(
    arch: str,
    rows: Sequence[StrategyCost],
    dtype: torch.dtype = torch.float32,
    transfer: tuple[str, str] | None = None,
) -> str:
    """A markdown table of `communication_table`'s rows (millions of parameters, MB = 10⁶ bytes);
    ``transfer``: the (up, down) wire dtypes the rows' bytes were counted at."""
    size = torch.empty((), dtype=dtype).element_size()
    at = f"{str(dtype).removeprefix('torch.')}, {size} B/value"
    if transfer is not None:
        at = f"up {transfer[0]}, down {transfer[1]}; int8: 1 B/value + a float32 scale per row"
    lines = [
        f"{arch}: per client per round, mean over clients (bytes at {at})",
        "",
        "| strategy | client ranks | up (M) | down (M) | measured total (M) | MB | paper formula (M) "
        "| published (M) | note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        distinct = set(row.ranks)
        rank_text = (
            ",".join(map(str, row.ranks)) if len(distinct) > 1 else f"{row.ranks[0]} on all {len(row.ranks)}"
        )
        pub = f"{row.published:.2f}" if row.published is not None else "—"
        lines.append(
            f"| {row.strategy} | {rank_text} | {row.params_up / 1e6:.2f} | {row.params_down / 1e6:.2f} "
            f"| {row.params / 1e6:.2f} | {row.bytes / 1e6:.1f} | {row.paper_params / 1e6:.2f} | {pub} "
            f"| {row.note} |"
        )
    return "\n".join(lines)


def _transfer_arg(parser: argparse.ArgumentParser, text: str | None) -> tuple[str, str] | None:
    """``--transfer UP[,DOWN]`` as (up, down); a parser error names a value outside `TRANSFER_DTYPES`."""
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    bad = [p for p in parts if p not in TRANSFER_DTYPES]
    if bad or len(parts) > 2:
        parser.error(f"--transfer {text!r}: give UP or UP,DOWN, each one of {list(TRANSFER_DTYPES)}")
    return parts[0], parts[-1]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m asymlora.federated.accounting",
        description="Parameters and bytes communicated per client per round, per federated strategy.",
    )
    parser.add_argument(
        "--arch",
        default="all",
        help=f"one of {sorted(ARCHS)}, 'all' (both), a built-in model (smollm2-135m: q_proj, v_proj) "
        "or a local model directory",
    )
    parser.add_argument("--r", type=int, default=8, help="homogeneous rank (default 8)")
    parser.add_argument(
        "--ranks",
        default=",".join(map(str, PAPER_HET_RANKS)),
        help="heterogeneous client ranks, comma-separated",
    )
    parser.add_argument(
        "--d-m", type=int, default=16, help="Fed-ALoRA-het intermediate rank d_m (default 16)"
    )
    parser.add_argument(
        "--transfer",
        default=None,
        metavar="UP[,DOWN]",
        help=f"count bytes at these wire dtypes (one of {list(TRANSFER_DTYPES)}; DOWN defaults to UP)",
    )
    args = parser.parse_args(argv)
    transfer = _transfer_arg(parser, args.transfer)
    try:
        ranks = [int(k) for k in args.ranks.split(",") if k.strip()]
    except ValueError:
        parser.error(f"--ranks must be comma-separated integers, got {args.ranks!r}")
    if not ranks or min(ranks) < 1 or args.r < 1 or args.d_m < 1:
        parser.error("ranks, --r and --d-m must be integers >= 1")
    archs = sorted(ARCHS) if args.arch == "all" else [args.arch]
    for i, arch in enumerate(archs):
        if i:
            print()
        try:
            rows = communication_table(arch, args.r, ranks, args.d_m, transfer=transfer)
        except ValueError as e:
            parser.error(str(e))
        print(format_table(arch, rows, transfer=transfer))
    print(
        f"\nr = {args.r}; heterogeneous ranks {ranks} (r̄ = {math.fsum(ranks) / len(ranks):g}), d_m = {args.d_m}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
