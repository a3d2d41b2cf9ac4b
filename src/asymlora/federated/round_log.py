"""The server's record of a strategy's run: ``rounds.jsonl``, the checkpoint after every round, and
``--resume`` from it (docs/federated.md, "Resume").

In ``out_dir``::

    rounds.jsonl                         one line per completed round (`server_round.round_record`)
    checkpoint/server_state.safetensors  the shared tensors after the last completed round
    checkpoint/state.json                round number, strategy, client ranks, every round's record,
                                         the last round each client trained in
    rounds_rerun.jsonl                   the records of rounds no client answered that a ``--resume`` ran
                                         again (`no_client_answered`), kept for the record
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

from asymlora.io import atomic_dir, atomic_write_text

__all__ = [
    "CHECKPOINT_DIR",
    "META_FILE",
    "RERUN_FILE",
    "ROUNDS_FILE",
    "STATE_FILE",
    "RoundLog",
    "completed_rounds",
    "load_checkpoint",
    "no_client_answered",
    "save_checkpoint",
    "trailing_failed_rounds",
]

ROUNDS_FILE = "rounds.jsonl"
RERUN_FILE = "rounds_rerun.jsonl"
CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "server_state.safetensors"
META_FILE = "state.json"


def save_checkpoint(out_dir: Path, state: Mapping[str, Tensor], meta: dict[str, Any]) -> None:
    """Write the shared tensors and the round metadata atomically (a half-written checkpoint never shows)."""
    with atomic_dir(out_dir / CHECKPOINT_DIR, overwrite=True) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp / STATE_FILE))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1, default=float) + "\n")


def load_checkpoint(out_dir: Path) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
    """(shared tensors, metadata) of the last completed round, or None when there is no checkpoint."""
    ck = out_dir / CHECKPOINT_DIR
    if not (ck / META_FILE).is_file() or not (ck / STATE_FILE).is_file():
        return None
    return load_file(str(ck / STATE_FILE)), json.loads((ck / META_FILE).read_text())


def completed_rounds(out_dir: Path) -> int:
    """The rounds a ``--resume`` of ``out_dir`` keeps: its checkpoint's round less the rounds at its end that no
    client answered (they run again, `RoundLog.start`); 0 without a checkpoint."""
    meta = out_dir / CHECKPOINT_DIR / META_FILE
    if not meta.is_file():
        return 0
    saved = json.loads(meta.read_text())
    return int(saved["round"]) - trailing_failed_rounds(saved.get("history", []))


def no_client_answered(record: Mapping[str, Any]) -> bool:
    """True for a round in which every sampled client failed (status ``failed`` or ``missing``: raised,
    timed out, node gone): nothing was trained, uploaded or released, so the round can be run again.
    Sampled clients whose node never connected (``min_nodes`` below ``clients.num``: no ``node_id``) are
    left out — nobody asked them — so a round that sampled only those is not one (else a run whose absent
    clients happen to be drawn twice in a row would stop, and stop again on every resume)."""
    asked = [c for c in record["clients"] if c["status"] != "not_sampled" and c.get("node_id") is not None]
    return bool(asked) and all(c["status"] in ("failed", "missing") for c in asked)


def trailing_failed_rounds(history: Sequence[Mapping[str, Any]]) -> int:
    """How many rounds at the end of ``history`` no client answered (`no_client_answered`)."""
    n = 0
    while n < len(history) and no_client_answered(history[-1 - n]):
        n += 1
    return n


def write_rounds(out_dir: Path, history: Sequence[Mapping[str, Any]]) -> None:
    """``rounds.jsonl``: one JSON line per round record (written whole, atomically)."""
    atomic_write_text(out_dir / ROUNDS_FILE, "".join(json.dumps(r, default=float) + "\n" for r in history))


class RoundLog:
    """The completed rounds of one strategy in ``out_dir``: their records (``history``), the last round
    each client trained in (``last_trained``, what the evaluation asks for) and the checkpoint.

    Raises (from `open`): FileExistsError when ``out_dir`` holds a checkpoint and ``resume`` is off.
    """

    def __init__(self, out_dir: Path, strategy: str, checkpoint: tuple[dict[str, Tensor], dict] | None):
        self.out_dir, self.strategy = out_dir, strategy
        self.history: list[dict[str, Any]] = []
        self.last_trained: dict[int, int] = {}
        self.ranks: list[int] = []
        self.next_round = 1
        """The first round still to run (1, or the checkpoint's round + 1 once `start` resumed)."""
        self._checkpoint = checkpoint
        self.resume_asked = False
        """Whether the run asked to resume (`start` says so when there was no checkpoint to resume)."""

    @classmethod
    def open(cls, out_dir: str | Path, strategy: str, resume: bool) -> RoundLog:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        ck = load_checkpoint(out_dir) if resume else None
        if ck is None and (out_dir / CHECKPOINT_DIR).exists() and not resume:
            raise FileExistsError(
                f"{out_dir} already holds a checkpoint; resume it or start in an empty run_dir"
            )
        log = cls(out_dir, strategy, ck)
        log.resume_asked = resume
        return log

    def start(
        self, state: dict[str, Tensor], ranks: list[int], say: Callable[[str], None]
    ) -> dict[str, Tensor]:
        """The shared tensors to start from: ``state`` (round 0), or the checkpoint's when resuming, after
        checking it belongs to this strategy, these client ranks and these tensor shapes. Rewrites
        ``rounds.jsonl`` from the checkpoint's history. Raises ValueError when the checkpoint does not fit."""
        self.ranks = list(ranks)
        if self._checkpoint is not None:
            saved, meta = self._checkpoint
            if meta.get("strategy") != self.strategy:
                raise ValueError(
                    f"{self.out_dir} holds a checkpoint of strategy {meta.get('strategy')!r}, not {self.strategy!r}"
                )
            if meta.get("ranks") != ranks:
                raise ValueError(f"the client ranks {ranks} differ from the checkpoint's {meta.get('ranks')}")
            if set(saved) != set(state) or any(saved[k].shape != state[k].shape for k in state):
                raise ValueError(
                    f"the checkpoint in {self.out_dir} does not fit this config's shared tensors"
                )
            state, self.history = saved, list(meta["history"])
            self.last_trained = {int(k): int(v) for k, v in meta.get("last_trained", {}).items()}
            self.next_round = int(meta["round"]) + 1
            if self._rerun_failed_rounds(say):
                self._save(state)  # a resume killed before its next round does not drop them twice
            say(
                f"{self.strategy}: resuming after round {self.next_round - 1} from {self.out_dir / CHECKPOINT_DIR}"
            )
        elif self.resume_asked:  # e.g. resume=true naming another strategy's run_dir, or a first run
            say(f"{self.strategy}: nothing to resume in {self.out_dir / CHECKPOINT_DIR}; starting at round 1")
        write_rounds(self.out_dir, self.history)
        return state

    def _rerun_failed_rounds(self, say: Callable[[str], None]) -> int:
        """Drop the rounds at the end of the history that no client answered, so that they run again: they
        kept the shared tensors (the checkpoint's are those of the last round before them), trained no
        client (``last_trained`` is unchanged) and released nothing (the DP accountant composes only
        releases). Their records go to ``rounds_rerun.jsonl``."""
        n = trailing_failed_rounds(self.history)
        if not n:
            return 0
        dropped, self.history = self.history[-n:], self.history[:-n]
        self.next_round -= n
        old = (self.out_dir / RERUN_FILE).read_text() if (self.out_dir / RERUN_FILE).is_file() else ""
        # a resume killed after this write but before its checkpoint drops the same records again: kept once
        kept = set(old.splitlines())
        new = [line for line in (json.dumps(r, default=float) for r in dropped) if line not in kept]
        atomic_write_text(self.out_dir / RERUN_FILE, old + "".join(line + "\n" for line in new))
        say(
            f"{self.strategy}: round(s) {dropped[0]['round']}-{dropped[-1]['round']} had no answer from any client; "
            f"they run again (their records: {self.out_dir / RERUN_FILE})"
        )
        return n

    def append(self, record: dict[str, Any], state: Mapping[str, Tensor], trained: Sequence[int]) -> None:
        """Record a completed round (clients ``trained`` replied with an update): checkpoint, then
        ``rounds.jsonl``."""
        self.history.append(record)
        self.last_trained.update({k: int(record["round"]) for k in trained})
        self._save(state)

    def _save(self, state: Mapping[str, Tensor]) -> None:
        """The checkpoint (after the last round of ``history``), then ``rounds.jsonl``."""
        meta = {
            "round": self.history[-1]["round"] if self.history else 0,
            "strategy": self.strategy,
            "ranks": self.ranks,
            "history": self.history,
            "last_trained": self.last_trained,
        }
        save_checkpoint(self.out_dir, state, meta)
        write_rounds(self.out_dir, self.history)
