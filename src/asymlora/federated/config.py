"""Federated run configuration: the federated sections of the one config tree (`asymlora.config`).

    cfg = load_fed_config("configs/fed_bigbench_homo.yaml", ["rounds=3", "train.local_steps=10"])

The model, data, adapter, train and eval sections extend the shared ones of `asymlora.config` (other
defaults; ``train.local_steps``, ``adapter.intermediate_rank``, ``eval.global_scores`` ...), and the file is
read by the same loader (`asymlora.config.load_config` with ``schema=FedConfig``): unknown keys and values
of the wrong type are refused with a message that names them. `FedConfig.validate` checks everything that
can be checked before Flower starts (strategy names, client ranks, d_m, partition settings), so a bad
config fails in a second with one clear line instead of inside a simulation.

The config travels to the clients inside every server message (`FedConfig.to_json`), so a SuperNode
needs nothing but its node config (``partition-id``; optionally ``data``, ``rank``, ``state-dir``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from asymlora.config import (
    BaseAdapterSettings,
    BaseEvalSettings,
    BaseModelSettings,
    BaseTrainSettings,
    ConfigError,
    config_dict,
    dump_config,
    from_dict,
    load_config,
)
from asymlora.config import DataSettings as MultiTaskDataSettings
from asymlora.data.loading import ALL_TASKS, TASK_SELECTOR
from asymlora.federated.codec import TRANSFER_DTYPES
from asymlora.federated.privacy import PrivacySettings, noise_multiplier_for
from asymlora.federated.secagg import SecAggSettings, check_secagg, check_secagg_compatible
from asymlora.federated.strategies import (
    STRATEGY_NAMES,
    Strategy,
    check_het_setup,
    client_config,
    get_strategy,
)
from asymlora.tuner.config import AsymLoraConfig

__all__ = [
    "AdapterSettings",
    "ClientSettings",
    "DataSettings",
    "EvalSettings",
    "FaultSettings",
    "FedConfig",
    "ModelSettings",
    "PrivacySettings",
    "RejectSettings",
    "SecAggSettings",
    "SimulationSettings",
    "TimeoutSettings",
    "TrainSettings",
    "TransferSettings",
    "dump_fed_config",
    "fed_config_from_json",
    "load_fed_config",
]


@dataclass
class ModelSettings(BaseModelSettings):
    """The base model every client adapts: the built-in ``smollm2-135m``, a local directory saved with
    ``save_pretrained``, or a hub id."""


@dataclass
class AdapterSettings(BaseAdapterSettings):
    """The adapter of every client (heterogeneous strategies change r and alpha per client)."""

    method: str = "lora"
    """Adapter method for the homogeneous strategies (``lora``; ``fedalora-het`` always uses ``fedhet``)."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Modules to adapt (the paper's federated setting: q_proj, v_proj)."""
    intermediate_rank: int = 16
    """d_m of ``fedalora-het``: the shared rank of B0 (paper: 16)."""

    def peft_values(self, task_names: list[str]) -> dict[str, Any]:
        """One expert: a federated client adapts one plain (or fedhet) LoRA."""
        return {"num_experts": 1}


@dataclass
class ClientSettings:
    """How many clients, their ranks, and how the data is split among them."""

    num: int = 8
    """Number of clients (= SuperNodes); every round waits for all of them (the sampled ones: ``fraction``)."""
    ranks: list[int] | None = None
    """Heterogeneous strategies: one rank per client (paper: [64, 64, 32, 32, 16, 16, 8, 8]); None: adapter.r."""
    partition: Literal["task", "dirichlet", "iid"] = "task"
    """``task``: client k gets data.tasks[k] (the paper's protocol; a ``#*`` spec counts one task per name it
    expands to); ``dirichlet``: each class's examples are
    spread over the clients with proportions drawn from Dir(alpha); ``iid``: a uniform random split."""
    dirichlet_over: Literal["labels", "tasks"] = "tasks"
    """What a Dirichlet class is: a task, or a (task, answer option) label of choice tasks."""
    alpha: float = 0.5
    """Dirichlet concentration α (small: skewed clients; large: close to IID)."""
    fraction: float = 1.0
    """Partial participation: the fraction of the clients sampled each round, ⌊fraction · num⌋ of them
    (Flower's ``fraction_train`` rule); 1.0: every client every round (docs/federated.md)."""
    per_round: int | None = None
    """Partial participation: the number of clients sampled each round (instead of ``fraction``)."""
    min_per_round: int = 1
    """A round is aggregated only when at least this many client updates are accepted — answered and passed
    the server's checks (shape, NaN/Inf, ``reject``, DP bound) — else it is recorded and the shared tensors
    are kept (docs/federated.md, "Partial participation")."""
    max_failed_rounds: int | None = 2
    """The server stops the strategy (status ``failed``) after this many consecutive rounds in which every
    sampled client failed (raised, timed out, node gone): such rounds train nothing, and a run that went on
    would end with fewer trained rounds than its config says. ``--resume`` runs them again from the last
    round a client answered (docs/federated.md, "Rounds no client answered"). null: never stop."""


@dataclass
class DataSettings(MultiTaskDataSettings):
    """Tasks and caps (per task, before partitioning), as in the multi-task config; ``tasks`` gives one
    task per client under ``clients.partition: task``. Only the defaults differ:"""

    max_test: int | None = 200
    """Test examples per task (None: all of the test split); 200 is the paper's federated protocol."""
    max_length: int = 192
    """Longest training sequence in tokens (prompts are cut from the left, answers never)."""


@dataclass
class TrainSettings(BaseTrainSettings):
    """Local training on each client, every round (plain AdamW at a constant learning rate, a fresh
    optimiser each round)."""

    KEY_ORDER: ClassVar[tuple[str, ...]] = (
        "local_steps",
        "batch_size",
        "lr",
        "weight_decay",
        "max_grad_norm",
    )
    """Key order of config.yaml: the federated section's own key first."""

    local_steps: int = 10
    """Optimiser steps per client per round. 0: no local training — each client returns what it received,
    so a round costs only the federation itself (messages, aggregation, checkpoint; see
    ``benchmarks/federated.py``); its train loss is then logged as null."""

    def check(self) -> None:
        """Raise `ConfigError` for negative local steps, a batch size below 1 or a learning rate <= 0."""
        if self.local_steps < 0:
            raise ConfigError(
                f"train.local_steps={self.local_steps!r} must be an integer >= 0 (0: no local training)"
            )
        super().check()


@dataclass
class EvalSettings(BaseEvalSettings):
    """Evaluation after the last round, on every client's own test split."""

    max_new_tokens: int = 16
    """Generation length for generative tasks."""
    global_scores: bool = True
    """Also score the aggregated shared tensors with each client's local ones."""
    local_only: bool = False
    """Also train each client alone (same rank, rounds × local_steps steps, no federation): the Δm% baseline."""


@dataclass
class SimulationSettings:
    """Flower's simulation engine (Ray) on this machine."""

    num_cpus: int = 2
    """CPUs Ray may use in total."""
    cpus_per_client: int = 1
    """CPUs per client; num_cpus // cpus_per_client clients train at the same time."""
    threads_per_client: int = 1
    """torch threads inside each client process."""
    object_store_mb: int = 512
    """Ray object store size (MB)."""
    num_gpus: float = 0.0
    """GPUs Ray may use in total (0: clients run on the CPU). With GPUs, clients load the model on CUDA in bf16."""
    gpus_per_client: float = 0.0
    """GPU share per client (e.g. 1.0: one client per GPU at a time; 0.5: two clients share one GPU)."""


@dataclass
class TimeoutSettings:
    """Seconds the server waits (a client that does not answer in time is recorded as missing)."""

    wait_nodes: float = 300.0
    """For all clients to connect and answer the first query (includes Ray's start and model loading)."""
    round: float = 3600.0
    """For the training replies of one round."""
    evaluate: float = 3600.0
    """For the evaluation replies."""


@dataclass
class FaultSettings:
    """Fault injection, to test that the server survives bad clients. Entries are ``"client:round"``."""

    raise_in: list[str] = field(default_factory=list)
    """The client raises in that round's training."""
    nan_in: list[str] = field(default_factory=list)
    """The client sends NaN in its update that round."""
    bad_shape_in: list[str] = field(default_factory=list)
    """The client sends a tensor of the wrong shape that round."""
    stop_after: int | None = None
    """The server stops after checkpointing this round (as if killed); continue with ``--resume``."""

    def hits(self, kind: Literal["raise_in", "nan_in", "bad_shape_in"], client: int, rnd: int) -> bool:
        """True when fault ``kind`` is configured for ``client`` in round ``rnd``."""
        return f"{client}:{rnd}" in getattr(self, kind)


@dataclass
class RejectSettings:
    """Extra checks the server applies to the updates of a round (beyond shape, NaN/Inf, example count)."""

    norm_factor: float | None = None
    """None: off. A number f > 1: reject an update whose L2 norm (`strategies.update_norm`) exceeds f × the
    median norm of the round's valid updates (`strategies.norm_outliers`); recorded in rounds.jsonl, the
    round goes on. Under DP the norms are those of the clipped updates. Refused when it can never reject: one
    client per round, or two with f >= 2 (the median counts the update itself)."""


@dataclass
class TransferSettings:
    """Wire dtype of the shared tensors each way (docs/design.md §4, "Compressed transfers"); the
    server's state stays float32 and ``rounds.jsonl`` counts the bytes actually sent."""

    up: Literal["float32", "bfloat16", "float16", "int8"] = "float32"
    """Client → server: the upload, cast (or int8-quantised per row, `codec.quantize_int8_rows`) after
    client-side clipping; the server aggregates the decoded float32 values."""
    down: Literal["float32", "bfloat16", "float16", "int8"] = "float32"
    """Server → client: the download (train and evaluate); the client trains from the decoded values."""

    @property
    def lossy(self) -> bool:
        """True when either direction is not float32."""
        return (self.up, self.down) != ("float32", "float32")


@dataclass
class FedConfig:
    """One federated experiment: model, strategies, clients, data, rounds, local training, evaluation."""

    model: ModelSettings = field(default_factory=ModelSettings)
    strategies: list[str] = field(default_factory=lambda: ["fedalora"])
    """Strategies run one after the other, same clients, data and seed (each into run_dir/<strategy>/)."""
    local_a: Literal["persist", "reset"] = "persist"
    """``fedalora``: keep each client's A across rounds, or reset it to the shared initial A every round."""
    het_local: Literal["fresh", "persist"] = "fresh"
    """``fedalora-het``: draw each client's A, M, B1 afresh every round, or keep its trained A, M, B1 across
    rounds (B2 is zeroed every round either way, so a round starts from the aggregated B0)."""
    het_upload: Literal["auto", "product", "factors"] = "auto"
    """``fedalora-het`` upload: the smaller of B2·B1 and (B2, B1) per layer, or always one of them."""
    adapter: AdapterSettings = field(default_factory=AdapterSettings)
    clients: ClientSettings = field(default_factory=ClientSettings)
    data: DataSettings = field(default_factory=DataSettings)
    rounds: int = 3
    """Communication rounds."""
    train: TrainSettings = field(default_factory=TrainSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    simulation: SimulationSettings = field(default_factory=SimulationSettings)
    timeouts: TimeoutSettings = field(default_factory=TimeoutSettings)
    min_nodes: int | None = None
    """Nodes the server waits for before round 1 (None: clients.num, so every client trains from round 1)."""
    run_dir: str = "runs/fed"
    """Where checkpoints, rounds.jsonl and results go."""
    seed: int = 0
    """Seed of the shared adapter init, data order and the per-(client, round) draws of fedalora-het."""
    log_keys: bool = False
    """Write the tensor names of every message into rounds.jsonl (for audits and tests)."""
    faults: FaultSettings = field(default_factory=FaultSettings)
    reject: RejectSettings = field(default_factory=RejectSettings)
    """Server-side rejection of outlying updates; off by default."""
    dp: PrivacySettings = field(default_factory=PrivacySettings)
    """Client-level differential privacy of the uploads (`asymlora.federated.privacy`); off by default."""
    transfer: TransferSettings = field(default_factory=TransferSettings)
    """Wire dtype of the shared tensors each way (``transfer.up`` / ``transfer.down``); float32 by default."""
    secagg: SecAggSettings = field(default_factory=SecAggSettings)
    """Secure aggregation with Flower's SecAgg+ (`asymlora.federated.secagg`); off by default."""

    # --- derived ---------------------------------------------------------------------------------
    def strategy(self, name: str) -> Strategy:
        """The strategy object of ``name`` with this config's options."""
        return get_strategy(name, local_a=self.local_a, het_local=self.het_local)

    def client_rank(self, client: int) -> int:
        """Client ``client``'s configured rank (``clients.ranks[client]``, else ``adapter.r``)."""
        return self.clients.ranks[client] if self.clients.ranks else self.adapter.r

    def base_adapter(self) -> AsymLoraConfig:
        """The adapter config before per-strategy and per-client changes (`strategies.client_config`)."""
        # base_model_name_or_path: peft records the directory the client's model was read from
        return self.adapter.to_peft()

    @property
    def clients_per_round(self) -> int:
        """Clients sampled each round: ``clients.per_round``, else ⌊clients.fraction · clients.num⌋."""
        if self.clients.per_round is not None:
            return self.clients.per_round
        return int(self.clients.fraction * self.clients.num + 1e-9)  # 1e-9: 0.7 · 10 is 7, not 6.99...

    @property
    def required_nodes(self) -> int:
        """Nodes the server waits for before round 1."""
        return self.min_nodes if self.min_nodes is not None else self.clients.num

    # --- validation ------------------------------------------------------------------------------
    def validate(self) -> FedConfig:
        """Check everything that can be checked before Flower starts; raise `ConfigError` otherwise."""
        try:
            self._validate()
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return self

    def _validate(self) -> None:
        self._check_strategies()
        self._check_clients()
        self._check_participation()
        self.data.check()
        self._check_partition()
        self.train.check()
        self._check_sizes()
        self._check_simulation()
        self._check_timeouts_and_faults()
        self._check_dp()
        self._check_reject()
        self._check_strategy_options()
        self._check_transfer()
        self._check_secagg()
        self._check_client_adapters()

    def _check_strategies(self) -> None:
        if not self.strategies:
            raise ConfigError(f"strategies is empty: name at least one of {list(STRATEGY_NAMES)}")
        if len(set(self.strategies)) != len(self.strategies):
            raise ConfigError(f"strategies {self.strategies} lists a strategy twice")
        for name in self.strategies:
            self.strategy(name)

    def _check_clients(self) -> None:
        k, d_m = self.clients.num, self.adapter.intermediate_rank
        if k < 1:
            raise ConfigError(f"clients.num={k!r} must be an integer >= 1")
        if d_m < 1:
            raise ConfigError(f"adapter.intermediate_rank (d_m) = {d_m!r} is invalid: use an integer >= 1")
        if self.adapter.r < 1:
            raise ConfigError(f"adapter.r={self.adapter.r!r} is invalid: the rank must be an integer >= 1")
        if self.clients.ranks is not None:
            try:
                check_het_setup(self.clients.ranks, k, d_m)
            except ValueError as e:
                raise ConfigError(f"clients.ranks: {e}") from None
        homo = [s for s in self.strategies if not get_strategy(s).heterogeneous]
        if homo and self.clients.ranks is not None and len(set(self.clients.ranks)) > 1:
            raise ConfigError(
                f"strategies {homo} need one rank for every client, but clients.ranks={self.clients.ranks}; "
                "use zeropad / fedalora-het for heterogeneous ranks, or drop clients.ranks"
            )
        if (
            homo and self.clients.ranks and self.clients.ranks[0] != self.adapter.r
        ):  # `check_ranks` on the server
            raise ConfigError(
                f"strategies {homo} train every client at adapter.r={self.adapter.r}, but clients.ranks="
                f"{self.clients.ranks}; set adapter.r={self.clients.ranks[0]} or drop clients.ranks"
            )

    def _check_participation(self) -> None:
        c = self.clients
        if not 0 < c.fraction <= 1:
            raise ConfigError(
                f"clients.fraction={c.fraction!r} must lie in (0, 1] (1.0: every client every round)"
            )
        if c.per_round is not None and c.fraction != 1.0:
            raise ConfigError(
                f"clients.per_round={c.per_round} and clients.fraction={c.fraction} are both set: set only one"
            )
        if c.per_round is not None and not 1 <= c.per_round <= c.num:
            raise ConfigError(f"clients.per_round={c.per_round!r} must lie in [1, clients.num={c.num}]")
        if c.max_failed_rounds is not None and c.max_failed_rounds < 1:
            raise ConfigError(
                f"clients.max_failed_rounds={c.max_failed_rounds!r} must be >= 1 (rounds in a row in which every "
                "client failed before the server stops), or null to never stop"
            )
        m, k = self.clients_per_round, c.min_per_round
        if 1 <= k <= m:
            return
        sampled = f"clients.per_round={m}" if c.per_round is not None else (
            f"clients.fraction={c.fraction:g} samples ⌊{c.fraction:g} × clients.num={c.num}⌋ = {m} client(s)"
        )  # fmt: skip
        beyond = f" (it cannot exceed clients.num={c.num})" if k > c.num else ""
        problem = (
            f"but clients.min_per_round={k} must lie in [1, {m}]{beyond}" if m
            else f"so no client would ever train (clients.min_per_round={k}{beyond})"
        )  # fmt: skip
        raise ConfigError(
            f"{sampled} per round, {problem}; fix: " + "; or ".join(self._participation_fixes())
        )

    def _participation_fixes(self) -> list[str]:
        """The fixes of a ``clients.min_per_round`` outside [1, clients sampled per round], each one feasible:
        sample more clients (when the minimum is at most ``clients.num``), lower / raise the minimum into the
        range (when a client is sampled at all), else both."""
        c, m, k = self.clients, self.clients_per_round, self.clients.min_per_round
        fixes = []
        if 1 <= k <= c.num:
            fixes.append(
                f"raise clients.per_round to >= {k}"
                if c.per_round is not None
                else f"raise clients.fraction to >= {min_fraction(k, c.num):g}"
            )
        if m >= 1:
            fixes.append(f"set clients.min_per_round to a value in [1, {m}]")
        elif not fixes:  # nobody is sampled and the minimum is out of range: both
            fixes.append(
                f"set clients.min_per_round=1 and raise clients.fraction to >= {min_fraction(1, c.num):g}"
            )
        return fixes

    def _check_partition(self) -> None:
        k = self.clients.num
        # a '#*' spec expands to one task per name: counted once the tasks are read (`load_partition`)
        expands = any(spec.endswith(TASK_SELECTOR + ALL_TASKS) for spec in self.data.tasks)
        if self.clients.partition == "task" and not expands and len(self.data.tasks) != k:
            raise ConfigError(
                f"clients.partition=task gives one task to each client: data.tasks has {len(self.data.tasks)} "
                f"task(s) for clients.num={k}; list exactly {k} tasks or use partition dirichlet/iid"
            )
        if self.clients.partition == "dirichlet" and not self.clients.alpha > 0:
            raise ConfigError(f"clients.alpha={self.clients.alpha!r} must be > 0 (Dirichlet concentration)")
        if self.clients.partition != "task" and self.data.seed < 0:  # NumPy: "expected non-negative integer"
            raise ConfigError(
                f"data.seed={self.data.seed!r} must be an integer >= 0: it seeds the clients.partition="
                f"{self.clients.partition} split"
            )

    def _check_sizes(self) -> None:
        for where, value in (
            ("rounds", self.rounds),
            ("eval.batch_size", self.eval.batch_size),
            ("data.max_length", self.data.max_length),
            ("simulation.num_cpus", self.simulation.num_cpus),
            ("simulation.cpus_per_client", self.simulation.cpus_per_client),
            ("simulation.threads_per_client", self.simulation.threads_per_client),
        ):
            if value < 1:
                raise ConfigError(f"{where}={value!r} must be >= 1")
        k = self.clients.num
        if self.min_nodes is not None and not 1 <= self.min_nodes <= k:
            raise ConfigError(f"min_nodes={self.min_nodes!r} must lie in [1, clients.num={k}]")
        # the clients score after the last round: a bad value there failed every client after all the training
        if self.eval.max_new_tokens < 1:
            raise ConfigError(f"eval.max_new_tokens={self.eval.max_new_tokens!r} must be >= 1")
        if self.eval.max_examples is not None and self.eval.max_examples < 1:
            raise ConfigError(
                f"eval.max_examples={self.eval.max_examples!r} must be >= 1, or null for the whole test split"
            )
        if self.seed < 0:  # round r's sample is drawn with NumPy's SeedSequence([seed, r]): no negatives
            raise ConfigError(f"seed={self.seed!r} must be an integer >= 0")

    def _check_simulation(self) -> None:
        sim = self.simulation
        if sim.object_store_mb < OBJECT_STORE_MIN_MB:  # else Ray crashed at start and the simulation hung
            raise ConfigError(
                f"simulation.object_store_mb={sim.object_store_mb!r} is below Ray's minimum object store of "
                f"{OBJECT_STORE_MIN_MB} MB; set simulation.object_store_mb >= {OBJECT_STORE_MIN_MB} (default 512)"
            )
        if sim.cpus_per_client > sim.num_cpus:
            raise ConfigError(
                f"simulation.cpus_per_client={sim.cpus_per_client} exceeds "
                f"simulation.num_cpus={sim.num_cpus}: no client could ever run"
            )
        if sim.num_gpus < 0 or sim.gpus_per_client < 0 or sim.gpus_per_client > max(sim.num_gpus, 0):
            raise ConfigError(
                f"simulation.gpus_per_client={sim.gpus_per_client!r} with simulation.num_gpus={sim.num_gpus!r}: "
                "both must be >= 0 and a client cannot need more GPUs than there are"
            )

    def _check_timeouts_and_faults(self) -> None:
        for name in ("wait_nodes", "round", "evaluate"):
            if not getattr(self.timeouts, name) > 0:  # NaN too: Flower refused a message with a NaN ttl
                raise ConfigError(
                    f"timeouts.{name}={getattr(self.timeouts, name)!r} must be a positive number of seconds"
                )
        for kind in ("raise_in", "nan_in", "bad_shape_in"):
            for entry in getattr(self.faults, kind):
                client, sep, rnd = str(entry).partition(":")
                if not sep or not client.isdigit() or not rnd.isdigit():
                    raise ConfigError(
                        f"faults.{kind}: {entry!r} is not of the form 'client:round' (e.g. '1:2')"
                    )
        if self.faults.stop_after is not None and not 1 <= self.faults.stop_after <= self.rounds:
            raise ConfigError(
                f"faults.stop_after={self.faults.stop_after!r} must lie in [1, rounds={self.rounds}]"
            )

    def _check_dp(self) -> None:
        if self.dp.enabled:
            noise_multiplier_for(self.dp, self.rounds)  # ValueError naming the key -> ConfigError
        elif self.dp.noise_multiplier is not None or self.dp.target_epsilon is not None:
            raise ConfigError(
                f"dp.clipping={self.dp.clipping!r} but dp.noise_multiplier / dp.target_epsilon is set: "
                "DP would be silently off; set dp.clipping=server or dp.clipping=client"
            )

    def _check_reject(self) -> None:
        f = self.reject.norm_factor
        if f is not None and not (math.isfinite(f) and f > 1):
            raise ConfigError(
                f"reject.norm_factor={f!r} must be a finite number > 1 (e.g. reject.norm_factor=10: reject an "
                "update more than 10 × the round's median norm), or null to turn the check off"
            )
        m = self.clients_per_round
        if f is not None and (m == 1 or (m == 2 and f >= 2)):
            # strategies.norm_outliers: the median runs over every norm of the round, the outlier's too
            why = (
                f"the round's median is the one update's own norm, never exceeded {f:g} times" if m == 1 else
                f"the median of two norms is their mean, which neither exceeds {f:g} times; a factor f < 2 "
                "rejects a norm above f/(2 − f) × the other, e.g. 1.5: above 3 ×"
            )  # fmt: skip
            raise ConfigError(
                f"reject.norm_factor={f:g} with {m} client(s) per round can never reject an update ({why}); "
                "set reject.norm_factor=null, or sample >= 3 clients per round"
                + (", or use a factor below 2" if m == 2 else "")
            )

    def _check_strategy_options(self) -> None:
        """An option of one strategy, set away from its default in a run without that strategy, would change
        nothing: refused, naming the fix."""
        options = [("het_local", "fresh", "fedalora-het"), ("local_a", "persist", "fedalora")]
        # SecAgg+ sets het_upload=product itself (`_check_secagg`), for any strategies
        if not self.secagg.enabled:
            options.append(("het_upload", "auto", "fedalora-het"))
        for key, default, strategy in options:
            value = getattr(self, key)
            if value != default and strategy not in self.strategies:
                raise ConfigError(
                    f"{key}={value} applies to {strategy} only, but strategies={self.strategies} has none: it "
                    f"would change nothing; drop {key} (or set {key}={default}), or add {strategy}"
                )

    def _check_transfer(self) -> None:
        """Wire dtypes the run can use: not a lossy one with client-side DP clipping (the server checks
        the received update against C, and rounding after the clip can exceed it)."""
        t = self.transfer
        for way in ("up", "down"):
            if getattr(t, way) not in TRANSFER_DTYPES:
                raise ConfigError(
                    f"transfer.{way}={getattr(t, way)!r} is not a transfer dtype: use one of {list(TRANSFER_DTYPES)}"
                )
        if self.dp.clipping == "client" and t.lossy:
            raise ConfigError(
                f"transfer.up={t.up!r}, transfer.down={t.down!r} with dp.clipping=client: the server refuses "
                "an update above dp.clipping_norm, and rounding the clipped upload (or the download it is "
                "measured from) can push it over; use dp.clipping=server (the server clips the decoded "
                "update) or transfer float32 both ways"
            )

    def _check_secagg(self) -> None:
        """SecAgg+ (`secagg.check_secagg`): enough clients, and none of the options it cannot honour;
        ``het_upload: auto`` becomes ``product`` (SecAgg+ sums one shape per tensor)."""
        if not self.secagg.enabled:
            changed = [k for k, v in config_dict(self.secagg).items() if v != getattr(SecAggSettings(), k)]
            if changed:
                raise ConfigError(
                    f"secagg.enabled is false but secagg.{changed[0]} is set: it would change nothing; set "
                    f"secagg.enabled=true or remove secagg.{', secagg.'.join(changed)}"
                )
            return
        m = self.clients_per_round  # the most a round may have; min_nodes may start round 1 with fewer
        if min(m, self.required_nodes) < 2:
            raise ConfigError(self._secagg_too_few())
        check_secagg(self.secagg, min(m, self.required_nodes), largest=m)
        check_secagg_compatible(
            norm_factor=self.reject.norm_factor, dp_clipping=self.dp.clipping,
            transfer=(self.transfer.up, self.transfer.down), het_upload=self.het_upload, strategies=self.strategies,
        )  # fmt: skip
        self.het_upload = "product"

    def _secagg_too_few(self) -> str:
        """The error of SecAgg+ with a round of fewer than 2 clients, with a fix that works."""
        c, m, need = self.clients, self.clients_per_round, "SecAgg+ sums the updates of at least 2 clients"
        if c.num < 2:
            return f"secagg.enabled with clients.num={c.num}: {need}; set clients.num >= 2 or secagg.enabled=false"
        if m < 2:
            fix = (
                "clients.per_round=2"
                if c.per_round is not None
                else f"clients.fraction={min_fraction(2, c.num):g} (2 of clients.num={c.num})"
            )
            return f"secagg.enabled with {m} client per round: {need}; set {fix} or more, or secagg.enabled=false"
        return (
            f"secagg.enabled with min_nodes={self.min_nodes}: round 1 may start with {self.min_nodes} client, "
            f"but {need}; set min_nodes >= 2 (or null: wait for every client)"
        )

    def _check_client_adapters(self) -> None:
        """The adapter config of every (strategy, client) must build."""
        base = self.base_adapter()
        for name in self.strategies:
            strategy = self.strategy(name)
            for c in range(self.clients.num):
                client_config(strategy, base, self.client_rank(c) if strategy.heterogeneous else None)

    # --- serialisation ---------------------------------------------------------------------------
    @classmethod
    def normalize_keys(cls, data: dict[str, Any]) -> dict[str, Any]:
        """A single strategy, e.g. as an override ``strategy=fedalora``, is the list ``strategies``."""
        if "strategy" in data:
            data = dict(data)
            if "strategies" in data and data["strategies"] != data["strategy"]:
                data.pop("strategies")
            data["strategies"] = data.pop("strategy")
        return data

    def to_dict(self) -> dict[str, Any]:
        return config_dict(self)

    def to_json(self) -> str:
        """Compact JSON, as sent to the clients inside every message."""
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True)


OBJECT_STORE_MIN_MB = 75
"""Ray's smallest object store, in MB of 2^20 bytes (``ray_constants.OBJECT_STORE_MINIMUM_MEMORY_BYTES``)."""


def min_fraction(k: int, num: int) -> float:
    """The smallest ``clients.fraction`` with three decimals that samples at least ``k`` of ``num`` clients
    (⌊fraction · num⌋ >= k, as `FedConfig.clients_per_round` counts), for 1 <= k <= num."""
    f = math.ceil(k / num * 1000 - 1e-6) / 1000
    while int(f * num + 1e-9) < k:  # float rounding of k / num · 1000
        f = round(f + 0.001, 3)
    return min(f, 1.0)


def fed_config_from_json(text: str) -> FedConfig:
    """Inverse of `FedConfig.to_json` (validated); raises `ConfigError` for a bad config."""
    return from_dict(FedConfig, json.loads(text)).validate()


def load_fed_config(path: str | Path | None, overrides: list[str] | None = None) -> FedConfig:
    """Read a YAML federated config (or start from defaults when ``path`` is None) and apply overrides:
    `asymlora.config.load_config` with ``schema=FedConfig``."""
    return load_config(path, overrides, schema=FedConfig)


def dump_fed_config(cfg: FedConfig) -> str:
    """YAML of a federated config (`asymlora.config.dump_config`)."""
    return dump_config(cfg)
