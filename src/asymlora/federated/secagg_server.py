"""The server's side of SecAgg+ rounds (`asymlora.federated.secagg`): one round of asymlora's federation
(`server_round.run_round`'s sampling, records and ``rounds.jsonl`` line) whose exchange is Flower's own
``SecAggPlusWorkflow``.

Flower 1.41 offers SecAgg+ only as a workflow of its legacy strategy API: it takes a ``LegacyContext``,
asks ``context.strategy.configure_fit`` for every node's ``FitIns`` and hands the unmasked weighted mean
to ``context.strategy.aggregate_fit`` (as the parameters of every client's ``FitRes``). So each round
builds a `SecAggStrategy` — a legacy ``Strategy`` whose ``configure_fit`` returns the FitIns built from
asymlora's instruction and download for each sampled node (`messages.secagg_fitins`) and whose
``aggregate_fit`` keeps the mean — and runs the workflow once on the ServerApp's grid, wrapped in a
`CountingGrid` that records the four stages' messages (bytes per node and the train replies' metrics,
which travel in the clear beside the masked vector). The new shared tensors are `secagg.secagg_state`
of that mean; the server never holds a client's update.

What changes in ``rounds.jsonl``: ``bytes_up`` / ``bytes_down`` count the ArrayRecords plus Flower's
SecAgg+ ConfigRecord (public keys, encrypted shares, masked vector, key shares) of all four stages;
``payload_up`` is the masked vector (int64: 8 B per value, plus the weight); a ``secagg`` record holds the
shares, threshold, bounds, per-client clipped values, the error bound (`secagg.error_bound`) and each
stage's seconds and bytes. Per-client validation is the client's own (`secagg.secagg_vector`): the server
cannot reject an update it never sees, so ``rejected`` stays empty.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, FitRes, Parameters, Scalar, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid
from torch import Tensor

from asymlora.federated.messages import SecAggFit, TrainInstruction, decode_secagg_metrics, secagg_fitins
from asymlora.federated.privacy import PrivacyAccountant
from asymlora.federated.secagg import error_bound, round_shares, secagg_state
from asymlora.federated.server_round import (
    Federation,
    _release,
    _replying_node,
    _round_start,
    collect_train_replies,
    error_reason,
    round_record,
    sit_out,
    too_few_answered,
)
from asymlora.federated.strategies import AggregateResult, download_payload

__all__ = ["STAGES", "CountingGrid", "SecAggStrategy", "protocol_bytes", "run_secagg_round"]

logger = logging.getLogger(__name__)

STAGES = ("setup", "share-keys", "collect-masked-vectors", "unmask")
"""The four exchanges of Flower's SecAgg+ workflow, in order."""


def protocol_bytes(content: RecordDict) -> int:
    """Bytes of a SecAgg+ message as counted in ``rounds.jsonl``: its ArrayRecords plus Flower's SecAgg+
    ConfigRecord (asymlora's own config and metrics are not counted, as in rounds without SecAgg+)."""
    protocol = content.config_records.get(RECORD_KEY_CONFIGS)
    arrays = sum(r.count_bytes() for r in content.array_records.values())
    if protocol is None:
        return arrays
    # Flower 1.41's ConfigRecord.count_bytes raises IndexError on an empty list (the unmask stage's list of
    # dropped nodes is usually empty); an empty list holds no bytes, so it is left out of the count
    filled = ConfigRecord({k: v for k, v in protocol.items() if not (isinstance(v, list) and not v)})
    return arrays + filled.count_bytes()


class CountingGrid:
    """The ServerApp's grid for Flower's workflow, recording every ``send_and_receive`` (one per stage):
    its messages, replies (by node) and seconds."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.stages: list[tuple[list[Message], dict[int, Message], float]] = []

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        sent, t0 = list(messages), time.perf_counter()
        replies = list(self.grid.send_and_receive(sent, timeout=timeout))
        self.stages.append((sent, {_replying_node(r, sent): r for r in replies}, time.perf_counter() - t0))
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def node_bytes(self) -> tuple[Counter[int], Counter[int]]:
        """(bytes sent to, bytes received from) every node over all stages (`protocol_bytes`)."""
        down, up = Counter[int](), Counter[int]()
        for sent, replies, _ in self.stages:
            for m in sent:
                down[m.metadata.dst_node_id] += protocol_bytes(m.content)
            for node, r in replies.items():
                up[node] += 0 if r.has_error() else protocol_bytes(r.content)
        return down, up


class SecAggStrategy(LegacyStrategy):
    """The legacy Flower ``Strategy`` the SecAgg+ workflow calls: the round's FitIns by node in, the
    unmasked weighted mean (``mean``) and the (node, weight) of the summed clients (``summed``) out."""

    def __init__(self, fitins: Mapping[int, FitIns], grid: CountingGrid) -> None:
        self.fitins, self.grid = dict(fitins), grid
        self.mean: list[np.ndarray] | None = None
        self.summed: list[tuple[int, int]] = []

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        grid = cast(Grid, self.grid)
        return [(GridClientProxy(node, grid, 0), ins) for node, ins in self.fitins.items()]

    def aggregate_fit(
        self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list[Any]
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        if results:  # every FitRes carries the same unmasked mean
            self.mean = parameters_to_ndarrays(results[0][1].parameters)
            self.summed = [(cast(GridClientProxy, p).node_id, r.num_examples) for p, r in results]
        return None, {}  # the round's state is taken from ``mean`` (`run_secagg_round`)

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list:
        return []

    def aggregate_evaluate(self, server_round: int, results: list, failures: list) -> tuple[None, dict]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> None:
        return None


def _max_weight(fed: Federation) -> float:
    return 1.0 if fed.cfg.dp.enabled else fed.cfg.secagg.max_weight  # DP: every weight is 1


def _exchange(
    fed: Federation, rnd: int, instructions: Mapping[int, Any], down: Mapping[str, Tensor]
) -> tuple[SecAggStrategy, CountingGrid]:
    """Run Flower's SecAgg+ workflow once: the sampled nodes train and their masked sum is unmasked."""
    s = fed.cfg.secagg
    fit = SecAggFit(tuple(down), s.value_bound, s.clipping_range, _max_weight(fed), s.quantization_range)
    fitins = {n: secagg_fitins(cast(TrainInstruction, ins), down, fit) for n, ins in instructions.items()}
    workflow = SecAggPlusWorkflow(
        s.num_shares if s.num_shares is not None else 1.0, s.reconstruction_threshold,
        max_weight=fit.max_weight, clipping_range=s.clipping_range, quantization_range=s.quantization_range,
        modulus_range=s.modulus_range, timeout=fed.cfg.timeouts.round,
    )  # fmt: skip
    grid = CountingGrid(fed.grid)
    strategy = SecAggStrategy(fitins, grid)
    context = LegacyContext(Context(0, 0, {}, RecordDict(), {}), strategy=strategy)
    for proxy, _ in strategy.configure_fit(rnd, Parameters([], ""), context.client_manager):
        context.client_manager.register(proxy)  # only for Flower's log line ("sampled N clients out of M")
    context.state[MAIN_PARAMS_RECORD] = ArrayRecord()
    context.state[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: rnd})
    workflow(cast(Grid, grid), context)
    return strategy, grid


def _fill_records(
    fed: Federation, records: dict[int, dict[str, Any]], grid: CountingGrid, instructed: Iterable[int]
) -> dict[int, int]:
    """The client records from the workflow's stages (failures named by stage, bytes per node);
    the values each client's SecAgg+ reply says were clipped."""
    for i, (_, replies, _) in enumerate(grid.stages[:2]):  # a node that failed before training
        for node, r in replies.items():
            if r.has_error() and node in fed.infos:
                rec = records[fed.infos[node].client]
                rec.setdefault("status", "failed")
                rec.setdefault("reason", f"SecAgg+ {STAGES[i]}: {error_reason(r)}")
    train_replies = grid.stages[2][1] if len(grid.stages) > 2 else {}
    collect_train_replies(fed, records, train_replies)
    down, up = grid.node_bytes()
    clipped: dict[int, int] = {}
    for node in instructed:
        rec = records[fed.infos[node].client]
        rec.update(bytes_down=down[node], bytes_up=up[node])
        reply = train_replies.get(node)
        if rec["status"] == "ok" and reply is not None:
            clipped[rec["client"]], values = decode_secagg_metrics(reply.content)
            rec.update(payload_up=8 * (values + 1), tensors_up=rec["tensors_down"])
    return clipped


def _bookkeeping(fed: Federation, grid: CountingGrid, instructed: set[int]) -> set[int]:
    """Update which nodes hold the run config and which failed; the nodes whose training was summed."""
    failed = {n for _, replies, _ in grid.stages for n, r in replies.items() if r.has_error()}
    failed |= {m.metadata.dst_node_id for sent, replies, _ in grid.stages for m in sent} - {
        n for _, replies, _ in grid.stages for n in replies
    }  # sent a stage's message and never answered it
    trained = {n for n, r in (grid.stages[2][1] if len(grid.stages) > 2 else {}).items() if not r.has_error()}
    fed.holds_config.update(trained)
    fed.holds_config -= failed  # a node that failed (maybe restarted) gets the config again
    fed.failed = (fed.failed - instructed) | failed
    return trained


def _secagg_record(
    fed: Federation, grid: CountingGrid, strategy: SecAggStrategy, clipped: Mapping[int, int], m: int
) -> dict[str, Any]:
    s = fed.cfg.secagg
    weights = [n for _, n in strategy.summed]
    return {
        "completed": strategy.mean is not None,
        "shares": round_shares(s, m), "threshold": s.reconstruction_threshold, "value_bound": s.value_bound,
        "clipping_range": s.clipping_range, "quantization_range": s.quantization_range,
        "max_weight": _max_weight(fed),
        "clipped": {str(k): v for k, v in sorted(clipped.items())},
        "clipped_total": sum(clipped.values()),
        # the bound holds only while nothing is clipped: null says the aggregate is off by more
        "error_bound": error_bound(s, weights, _max_weight(fed)) if weights and not any(clipped.values()) else None,
        "stages": [
            {"stage": STAGES[i], "seconds": round(sec, 3), "messages": len(sent), "replies": len(replies)}
            for i, (sent, replies, sec) in enumerate(grid.stages)
        ],
    }  # fmt: skip


def _warn_clipped(fed: Federation, rnd: int, clipped: Mapping[int, int]) -> None:
    """Warn (logging) when Flower clipped values of round ``rnd``: its aggregate is then not the weighted mean
    within `secagg.error_bound` (``rounds.jsonl`` records a null bound)."""
    total = sum(clipped.values())
    if total:
        logger.warning(
            "%s round %d: SecAgg+ clipped %d value(s) (clients %s) whose |n_k / max_weight · value| exceeds "
            "secagg.value_bound=%g: the aggregate is wrong by an unknown amount; raise secagg.value_bound "
            "above the largest |value| of any round (with a margin)",
            fed.strategy.name, rnd, total, sorted(k for k, v in clipped.items() if v), fed.cfg.secagg.value_bound,
        )  # fmt: skip


def _halted(fed: Federation, rnd: int, records: dict[int, dict[str, Any]], grid: CountingGrid) -> str:
    """The round's note when the workflow stopped before aggregating (too few live clients). A client that
    trained is ``not_aggregated``; one that answered every message it was sent but was never asked to train
    stays ``missing`` (no update: the round trained nothing of it) with the halt, not a timeout, as reason."""
    stage = STAGES[max(len(grid.stages) - 1, 0)]
    unanswered = {m.metadata.dst_node_id for sent, replies, _ in grid.stages for m in sent} - {
        n for _, replies, _ in grid.stages for n in replies
    }
    for node, info in fed.infos.items():
        rec = records.get(info.client)
        if rec is None or rec.get("status") not in ("ok", "missing"):
            continue
        if rec["status"] == "ok":
            rec.update(status="not_aggregated", reason=f"SecAgg+ halted in its {stage} stage")
        elif node not in unanswered:
            rec["reason"] = f"SecAgg+ halted in its {stage} stage before asking this client to train"
    return (
        f"round {rnd}: SecAgg+ halted in its {stage} stage (fewer live clients than "
        f"secagg.reconstruction_threshold={fed.cfg.secagg.reconstruction_threshold}, or fewer than 2); "
        f"the shared tensors of round {rnd - 1} are kept"
    )


def run_secagg_round(
    fed: Federation, state: dict[str, Tensor], rnd: int, accountant: PrivacyAccountant | None,
    *, last_trained: Mapping[int, int] | None = None,
) -> tuple[dict[str, Tensor], dict[str, Any], list[int]]:  # fmt: skip
    """`server_round.run_round` with Flower's SecAgg+ as the exchange: (the new shared tensors, the
    round's record, the clients that trained). The aggregate is SecAgg+'s weighted mean of the clients'
    scaled uploads, unscaled (`secagg.secagg_state`); under DP the noise is added to it as usual."""
    t0 = time.perf_counter()
    down = download_payload(fed.strategy, state)
    records, instructions = _round_start(fed, rnd, down, ArrayRecord())
    sampled = (
        sorted(records) if last_trained is None else sit_out(fed, rnd, records, instructions, last_trained)
    )
    strategy, grid = _exchange(fed, rnd, instructions, down)
    clipped = _fill_records(fed, records, grid, instructions)
    trained = [fed.infos[n].client for n in sorted(_bookkeeping(fed, grid, set(instructions)))]
    summed = {fed.infos[n].client: w for n, w in strategy.summed}
    note = too_few_answered(fed.cfg, rnd, records, sorted(summed))
    if strategy.mean is None and instructions:
        note = _halted(fed, rnd, records, grid)
    res = AggregateResult(state={n: t.detach().clone() for n, t in state.items()})
    if strategy.mean is not None and not note:
        res.state = secagg_state(fed.strategy.aggregation, state, strategy.mean, fed.cfg.secagg.scale)
        res.accepted = list(sorted(summed))
        res.weights = {k: w / sum(summed.values()) for k, w in sorted(summed.items())}
    if note:
        fed.say(note)
    dp_record = None
    if accountant is not None:
        res.state, dp_record = _release(fed.cfg, accountant, res.state, len(res.accepted), {}, rnd)
    record = round_record(rnd, fed.strategy.name, records, res, note, round(time.perf_counter() - t0, 3))
    record.update(sampled=sampled, weights={str(k): p for k, p in res.weights.items()})
    record["secagg"] = _secagg_record(fed, grid, strategy, clipped, len(instructions))
    _warn_clipped(fed, rnd, clipped)
    if dp_record is not None:
        record["dp"] = dp_record
    return res.state, record, trained
