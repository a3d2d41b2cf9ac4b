"""The evaluation phase after the last round and ``results.json`` of one strategy.

Every client that trained scores its own adapter (personalised) and the aggregated tensors alone
(global) on its own test split (`client.evaluate_client`); ``results.json`` holds the per-client scores,
their average / population std / worst client / Δm% (`summarize_scores`), the bytes of every round and,
with DP, the final (ε, δ).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flwr.app import Message
from torch import Tensor

from asymlora.eval import delta_m
from asymlora.federated.config import FedConfig
from asymlora.federated.messages import EvaluateInstruction, decode_evaluate_reply, to_record
from asymlora.federated.privacy import PrivacyAccountant
from asymlora.federated.round_log import RoundLog
from asymlora.federated.server_round import Federation, error_reason, finite_or_none
from asymlora.federated.strategies import Strategy, download_payload
from asymlora.io import atomic_write_text

__all__ = ["RESULTS_FILE", "assemble_results", "client_label", "evaluate_and_write", "summarize_scores"]

RESULTS_FILE = "results.json"


def _summary(values: Mapping[str, float]) -> dict[str, Any]:
    if not values:
        return {"average": None, "std": None, "worst": None}
    avg = sum(values.values()) / len(values)
    std = math.sqrt(sum((v - avg) ** 2 for v in values.values()) / len(values))
    worst = min(values, key=values.__getitem__)
    return {"average": avg, "std": std, "worst": {"client": worst, "value": values[worst]}}


def summarize_scores(
    per_client: Mapping[str, float], baselines: Mapping[str, float] | None = None
) -> dict[str, Any]:
    """Average, population std, worst client and Δm% (against local-only baselines) of client scores."""
    out = _summary(per_client)
    dm, notes = delta_m(per_client, baselines) if baselines else (None, [])
    out["delta_m"] = dm
    if notes:
        out["notes"] = notes
    return out


def client_label(k: int, names: Sequence[str]) -> str:
    """``client-K`` plus its task names (the key of a client in the results tables)."""
    return f"client-{k} ({', '.join(names)})" if names else f"client-{k}"


def _evaluate_replies(
    fed: Federation, replies: Mapping[int, Message]
) -> tuple[dict[int, dict[str, Any]], list[dict[str, Any]]]:
    """(scores by client, evaluation failures) from the evaluate replies; a client without either failed."""
    per_client: dict[int, dict[str, Any]] = {}
    failures: list[dict[str, Any]] = []
    for info in fed.sorted_infos():
        reply = replies.get(info.node_id)
        if reply is None:
            continue
        if reply.has_error():
            failures.append({"client": info.client, "reason": error_reason(reply)})
            continue
        try:
            per_client[info.client] = decode_evaluate_reply(reply.content).scores
        except ValueError as e:
            failures.append({"client": info.client, "reason": f"malformed reply: {e}"})
    for k in range(fed.cfg.clients.num):
        if k not in per_client and not any(f["client"] == k for f in failures):
            failures.append({"client": k, "reason": "no evaluation reply"})
    return per_client, failures


def _dp_summary(cfg: FedConfig, accountant: PrivacyAccountant, history: Sequence[Mapping[str, Any]]) -> dict:
    """results.json's ``dp``: the settings, the final (ε, δ) and ε after each round."""
    return {
        "clipping": cfg.dp.clipping,
        "noise_multiplier": accountant.noise_multiplier,
        "target_epsilon": cfg.dp.target_epsilon,
        "clipping_norm": cfg.dp.clipping_norm,
        "delta": cfg.dp.delta,
        "epsilon": finite_or_none(accountant.epsilon()),
        "releases": accountant.releases,
        "epsilon_per_round": [r.get("dp", {}).get("epsilon") for r in history],
        "accountant": "opacus RDPAccountant, sample rate 1 (every client every round)",
    }


def evaluate_and_write(
    fed: Federation, state: Mapping[str, Tensor], log: RoundLog, accountant: PrivacyAccountant | None
) -> tuple[dict[str, Any], int]:
    """Send the final shared tensors to every live client that trained, collect its scores and write
    ``results.json``: (the results, the number of clients that returned scores)."""
    t0 = time.perf_counter()
    final_record = to_record(download_payload(fed.strategy, state), transfer_dtype=fed.cfg.transfer.down)
    fed.rejoin(fed.cfg.timeouts.wait_nodes)  # a SuperNode restarted during the last round
    alive = set(fed.grid.get_node_ids())
    instructions = {
        i.node_id: fed.instruction(EvaluateInstruction, i, log.last_trained[i.client], final_record)
        for i in fed.sorted_infos()
        if i.node_id in alive and i.client in log.last_trained
    }
    replies, sent = fed.send(instructions, fed.cfg.timeouts.evaluate)
    per_client, failures = _evaluate_replies(fed, replies)
    results = assemble_results(fed.cfg, fed.strategy, log.history, per_client, failures, log.ranks)
    results["bytes"]["eval_down"] = final_record.count_bytes() * sum(sent.values())
    if accountant is not None:
        results["dp"] = _dp_summary(fed.cfg, accountant, log.history)
    results["eval_seconds"] = round(time.perf_counter() - t0, 2)
    atomic_write_text(Path(log.out_dir) / RESULTS_FILE, json.dumps(results, indent=2, default=float) + "\n")
    return results, len(per_client)


def _bytes(cfg: FedConfig, history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    up = sum(r["bytes_up"] for r in history)
    down = sum(r["bytes_down"] for r in history)
    n_rounds, n_clients = max(1, len(history)), max(1, cfg.clients.num)
    return {
        "up": up,
        "down": down,
        "total": up + down,
        "transfer": {"up": cfg.transfer.up, "down": cfg.transfer.down},
        "per_round": [{"round": r["round"], "up": r["bytes_up"], "down": r["bytes_down"]} for r in history],
        "per_client_per_round": (up + down) / n_rounds / n_clients,
        "payload_per_client_per_round": sum(r["payload_up"] + r["payload_down"] for r in history)
        / n_rounds
        / n_clients,
        # partial participation: per (round, sampled client), cf. accounting.expected_round_bytes
        "payload_per_sampled_client_per_round": sum(r["payload_up"] + r["payload_down"] for r in history)
        / max(1, sum(len(r.get("sampled", ())) for r in history)),
    }


def assemble_results(
    cfg: FedConfig,
    strategy: Strategy,
    history: Sequence[Mapping[str, Any]],
    per_client: Mapping[int, Mapping[str, Any]],
    eval_failures: Sequence[Mapping[str, Any]],
    ranks: Sequence[int],
) -> dict[str, Any]:
    """results.json of one strategy: per-client scores, summaries, bytes per round and in total."""
    clients = []
    pers: dict[str, float] = {}
    glob: dict[str, float] = {}
    for k in sorted(per_client):
        c = per_client[k]
        label = client_label(k, list(c["personalised"]["per_task"]))
        pers[label] = c["personalised"]["score"]
        if "global" in c:
            glob[label] = c["global"]["score"]
        clients.append({"label": label, **c})
    return {
        "strategy": strategy.name,
        "description": strategy.description,
        "local_a": strategy.local_a,
        "rounds": len(history),
        "ranks": list(ranks),
        "clients": clients,
        "personalised": summarize_scores(pers),
        "global": summarize_scores(glob) if glob else None,
        "scores": {"personalised": pers, "global": glob},
        "eval_failures": list(eval_failures),
        "bytes": _bytes(cfg, history),
        "rounds_with_failures": [r["round"] for r in history if r["failed"] or r["rejected"]],
        "rounds_kept_previous": [r["round"] for r in history if r["kept_previous"]],
        "round_seconds": round(sum(r["seconds"] for r in history), 2),  # resumes included
        "train_loss": [r["train_loss"] for r in history],
        **_secagg_clipped(history),
    }


def _secagg_clipped(history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """SecAgg+ runs: the values Flower clipped, in all and per round (each such round's aggregate is off
    by more than its error bound, which ``rounds.jsonl`` then records as null)."""
    rounds = [r for r in history if "secagg" in r]
    if not rounds:
        return {}
    per_round = {str(r["round"]): sum(r["secagg"]["clipped"].values()) for r in rounds}
    return {
        "secagg_clipped": sum(per_round.values()),
        "secagg_rounds_clipped": [int(k) for k, n in per_round.items() if n],
    }
