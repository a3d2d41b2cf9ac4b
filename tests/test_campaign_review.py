"""A campaign as a user meets it: run directories moved to another place, ledgers written by older code, reports
over partial ledgers (a seed in which a client has no score, a task scored by a corpus-level metric), and the
lines that say what would resolve an unresolved comparison. Each test failed before the fix it names."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml

from asymlora.config import ConfigError, load_config


def test_a_moved_run_directory_resumes(tmp_path: Path) -> None:
    """A run directory copied or moved elsewhere (a campaign's out_dir on another machine, a repository cloned
    to another path) keeps its config.yaml, whose run_dir names the old place: --resume (and the sweep, which
    finds the cell by its id, which leaves run_dir out) refused it as "a different config"; every path in a
    run directory is relative to it. Anything else still has to match."""
    from asymlora.federated import run as fed_run
    from asymlora.federated.config import load_fed_config
    from asymlora.recipes.multitask import prepare_run_dir

    def multitask(where: str, *extra: str):
        return load_config(None, ["data.tasks=[bigbench:strategyqa]", f"run_dir={tmp_path / where}", *extra])

    prepare_run_dir(multitask("a/run"), overwrite=False, resume=False)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    prepare_run_dir(multitask("b/run"), overwrite=False, resume=True)
    with pytest.raises(ConfigError, match="different config"):
        prepare_run_dir(multitask("b/run", "adapter.r=4"), overwrite=False, resume=True)

    def federated(where: str, *extra: str):
        return load_fed_config(None, ["data.tasks=[bigbench:strategyqa]", "clients.num=1",
                                      f"run_dir={tmp_path / where}", *extra])  # fmt: skip

    fed_run.prepare_run_dir(federated("c/fed"), overwrite=False, resume=False)
    shutil.copytree(tmp_path / "c", tmp_path / "d")
    fed_run.prepare_run_dir(federated("d/fed"), overwrite=False, resume=True)
    with pytest.raises(ConfigError, match=r"\(adapter differ\)"):
        fed_run.prepare_run_dir(federated("d/fed", "adapter.r=4"), overwrite=False, resume=True)


def test_a_key_listed_as_later_is_left_out_of_every_identity(monkeypatch) -> None:
    """What `test_a_new_config_key_is_a_decision_about_run_identities` asks of a new key: listed in
    `LATER_KEYS` at its neutral value, it is left out of the multi-task and federated cell ids (a ledger record
    written without it keeps its id and group) and of the clients' state identity (client files written without
    it are accepted on resume; hex digest by hand: sha256 of the identity JSON without the key). Here an existing
    key plays the new one."""
    from asymlora.config import LATER_KEYS
    from asymlora.federated.client import IDENTITY_KEYS, state_identity
    from asymlora.federated.config import load_fed_config
    from asymlora.recipes import fed_sweep, sweep

    monkeypatch.setitem(LATER_KEYS, "train.weight_decay", 0.0)
    run = load_config(None, ["data.tasks=[bigbench:strategyqa]"]).to_dict()
    older = json.loads(json.dumps(run))
    del older["train"]["weight_decay"]
    assert sweep.identity(older) == sweep.identity(run)
    run["train"]["weight_decay"] = 0.1  # not neutral: another cell
    assert sweep.identity(older) != sweep.identity(run)

    cfg = load_fed_config(None, ["data.tasks=[bigbench:strategyqa]", "clients.num=1"])
    fed = cfg.to_dict()
    del fed["train"]["weight_decay"]
    assert fed_sweep.identity(fed, "fedalora") == fed_sweep.identity(cfg.to_dict(), "fedalora")
    del fed["clients"]["max_failed_rounds"]  # as state_identity leaves it out
    text = json.dumps({"strategy": "fedalora", **{k: fed[k] for k in IDENTITY_KEYS}}, sort_keys=True)
    assert state_identity(cfg, "fedalora") == hashlib.sha256(text.encode()).hexdigest()


RUN_KEYS = (
    "model.name model.device model.gradient_checkpointing model.load_in_4bit model.load_in_8bit data.tasks "
    "data.max_train data.max_test data.test_fraction data.max_length data.seed data.metric adapter.method adapter.r "
    "adapter.lora_alpha adapter.lora_dropout adapter.num_experts adapter.router adapter.top_k "
    "adapter.balance_loss_weight adapter.target_modules adapter.subspace_rank adapter.expert_rank adapter.beta "
    "train.steps train.epochs train.batch_size train.grad_accum train.lr train.weight_decay train.warmup_steps "
    "train.scheduler train.max_grad_norm train.seed train.save_every train.keep_checkpoints train.log_every "
    "train.fsdp train.trace_every train.router_log_every eval.batch_size eval.max_new_tokens eval.max_examples "
    "eval.base_model compare.methods compare.single_task run_dir baselines"
)
FED_KEYS = (
    "model.name strategies local_a het_local het_upload adapter.method adapter.r adapter.lora_alpha "
    "adapter.lora_dropout adapter.target_modules adapter.intermediate_rank clients.num clients.ranks "
    "clients.partition clients.dirichlet_over clients.alpha clients.fraction clients.per_round "
    "clients.min_per_round clients.max_failed_rounds data.tasks data.max_train data.max_test data.test_fraction "
    "data.max_length data.seed data.metric rounds train.local_steps train.batch_size train.lr train.weight_decay "
    "train.max_grad_norm eval.batch_size eval.max_new_tokens eval.max_examples eval.global_scores eval.local_only "
    "simulation.num_cpus simulation.cpus_per_client simulation.threads_per_client simulation.object_store_mb "
    "simulation.num_gpus simulation.gpus_per_client timeouts.wait_nodes timeouts.round timeouts.evaluate "
    "min_nodes run_dir seed log_keys faults.raise_in faults.nan_in faults.bad_shape_in faults.stop_after "
    "reject.norm_factor dp.clipping dp.noise_multiplier dp.target_epsilon dp.clipping_norm dp.delta dp.noise_seed "
    "transfer.up transfer.down secagg.enabled secagg.num_shares secagg.reconstruction_threshold secagg.value_bound "
    "secagg.clipping_range secagg.quantization_range secagg.modulus_range secagg.max_weight"
)


def _flat_keys(data: dict, prefix: str = "") -> list[str]:
    out: list[str] = []
    for key, value in data.items():
        out += _flat_keys(value, f"{prefix}{key}.") if isinstance(value, dict) and value else [prefix + key]
    return out


@pytest.mark.parametrize("name", ["run", "fed"])
def test_a_new_config_key_is_a_decision_about_run_identities(name: str) -> None:
    """Every key of a run config enters the sweep cell ids and (federated) the clients' state identity, so a key
    added with a default changes the id of every cell of every running campaign: finished cells run again and
    a half-finished one starts over in a new directory (``clients.max_failed_rounds`` did). Adding a key must
    be decided: list it in `asymlora.config.LATER_KEYS` with the value at which it changes nothing (or leave it
    out of the identities as ``fed_sweep.PACE_KEYS`` do), or, when ids must change, add it here and say so in
    docs/sweep.md."""
    from asymlora.config import LATER_KEYS, RunConfig, config_dict
    from asymlora.federated.config import FedConfig

    keys = _flat_keys(config_dict(RunConfig() if name == "run" else FedConfig()))
    new = {k for k in keys if not any(k == later or k.startswith(later + ".") for later in LATER_KEYS)}
    pinned = set((RUN_KEYS if name == "run" else FED_KEYS).split())
    assert new == pinned, f"config keys added: {sorted(new - pinned)}, removed: {sorted(pinned - new)}"


def _client(label: str, scores: list[int]) -> dict:
    """One client's evaluation as the federated results hold it (one task, accuracy, 0/1 per example)."""
    examples = {"t": {"keys": [f"{label}-{i}" for i in range(len(scores))], "scores": scores}}
    return {"label": label, "personalised": {"score": sum(scores) / len(scores), "n": len(scores),
            "per_task": {"t": {}}, "primary": {"t": "accuracy"}, "examples": examples}}  # fmt: skip


def _fed_record(strategy: str, seed: int, clients: dict[str, list[int]]) -> dict:
    from asymlora.recipes import fed_sweep

    side = fed_sweep.side_record([_client(label, s) for label, s in clients.items()], "personalised")
    return {"id": f"{strategy}-{seed}", "kind": "federated", "params": {"strategy": strategy, "seed": seed},
            "strategy": strategy, "seed": seed, "clients": list(side["per_client"]), "average": side["average"],
            "personalised": side, "global": None, "dp": None, "rounds": 2, "local_steps": 3,
            "bytes": {"up": 100, "down": 300, "total": 400, "per_round": [{}, {}]}, "wall_seconds": 1.0,
            "config": {"run_dir": "", "seed": seed, "strategies": [strategy], "rounds": 2}}  # fmt: skip


def _write_ledger(where: Path, records: list[dict], kind: str, reference: str) -> Path:
    from asymlora.recipes import sweep

    where.mkdir(parents=True, exist_ok=True)
    (where / "ledger.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    spec = {"kind": kind, "out_dir": ".", "grid": {"seed": [0]}, "report": {"reference": reference}}
    (where / "sweep.yaml").write_text(yaml.safe_dump(spec))
    page = sweep.write_report(sweep.load_sweep(where / "sweep.yaml"))
    assert page == where / "results.md"
    return page


def test_a_seed_in_which_a_client_has_no_score_is_reported(tmp_path: Path) -> None:
    """A client whose evaluation failed, or that was never sampled (partial participation), is absent from that
    seed's record. The report indexed every seed's scores by the first seed's clients: KeyError, and no page
    (it is also written at the end of every sweep invocation). Now: each client over the seeds that have it,
    a line naming what is missing, and the paired tests on the seeds where both groups have every client."""
    a0, a1, a2 = [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]
    records = [
        _fed_record("fedalora", 0, {"c0": [1, 1, 1, 0], "c1": a0}),
        _fed_record("fedalora", 1, {"c0": [1, 0, 1, 1]}),  # c1: no score in seed 1
        _fed_record("fedalora", 2, {"c0": [1, 1, 1, 1], "c1": a2}),
        _fed_record("fedit", 0, {"c0": [0, 1, 0, 0], "c1": a1}),
        _fed_record("fedit", 1, {"c0": [0, 0, 1, 0], "c1": a1}),
        _fed_record("fedit", 2, {"c0": [0, 1, 1, 0], "c1": a1}),
    ]
    page = _write_ledger(tmp_path, records, "federated", "fedalora").read_text()
    summary = json.loads((tmp_path / "results.json").read_text())
    group = next(g for g in summary["groups"] if g["label"] == "fedalora")
    assert group["missing_clients"] == {"c1": [1]}
    c1 = group["personalised"]["per_client"]["c1"]  # seeds 0 and 2: 2/4 and 3/4
    assert c1["values"] == [0.5, 0.75] and c1["value"] == pytest.approx(0.625)
    assert c1["std"] == pytest.approx(0.25 / 2**0.5)
    assert "- fedalora: no score of c1 in seed(s) [1]" in page
    (pair,) = summary["paired"]
    assert pair["seeds"] == [0, 2]
    # c1 over seeds 0 and 2: A = [1, 1, .5, 0], B = [1, 0, 0, 0]: mean difference 1.5 / 4
    assert pair["tests"]["c1"]["difference"] == pytest.approx(0.375)


def _mt_record(method: str, seed: int, scores: dict[str, list[float]], bleu: str = "y") -> dict:
    """A multi-task ledger record as `sweep.make_record` writes it, task ``bleu`` scored by corpus BLEU (no
    per-example scores: its rows carry none, so it has no interval and no per_example entry)."""
    from asymlora.eval import stats
    from asymlora.recipes import sweep

    tasks = list(scores)
    specs = [f"jsonl:/data.jsonl#{t}" for t in tasks]
    cfg = load_config(
        None, [f"data.tasks={json.dumps(specs)}", f"train.seed={seed}", f"adapter.method={method}"]
    )
    primary = {t: "bleu" if t == bleu else "accuracy" for t in tasks}
    rows = {t: [{"key": f"{t}{i}", "scores": {} if t == bleu else {"accuracy": v}} for i, v in enumerate(s)]
            for t, s in scores.items()}  # fmt: skip
    per_task = {t: {primary[t]: sum(s) / len(s)} for t, s in scores.items()}
    means = [per_task[t][primary[t]] for t in tasks]
    worst = min(tasks, key=lambda t: per_task[t][primary[t]])
    per_example = {t: {"keys": t, "scores": [r["scores"]["accuracy"] for r in rs]}
                   for t, rs in rows.items() if t != bleu}  # fmt: skip
    params = {
        "adapter.method": method,
        "train.seed": seed,
        **({"data.tasks": specs} if len(tasks) == 1 else {}),
    }
    return {"id": sweep.cell_id(cfg), "params": params, "seed": seed, "tasks": tasks, "method": method,
            "per_task": per_task, "primary": primary, "average": sum(means) / len(means), "std": 0.0,
            "worst": {"task": worst, "value": per_task[worst][primary[worst]]},
            "intervals": stats.run_intervals(rows, primary), "per_example": per_example,
            "trainable_params": 100, "steps": 4, "config": cfg.to_dict()}  # fmt: skip


@pytest.mark.parametrize("seeds", [[0], [0, 1]])
def test_a_task_scored_by_corpus_bleu_is_reported(tmp_path: Path, seeds: list[int]) -> None:
    """A task whose primary metric is corpus-level (``bleu``, e.g. ``data.metric``) has no per-example scores,
    so no interval and no ``per_example`` entry. The multi-task report looked both up: KeyError (one seed: its
    interval; several: Δm%'s per-example scores), no page. Now its cell is the bare value and Δm% the point
    value against the single-task baselines (by hand: alora (1 − 0.75) / 1 and (0.8 − 0.4) / 0.8 → 37.5 %)."""
    records = []
    for s in seeds:
        records += [
            _mt_record("alora", s, {"x": [1, 0, 1, 1], "y": [0.4]}),
            _mt_record("lora", s, {"x": [0, 0, 1, 1], "y": [0.2]}),
            _mt_record("lora", s, {"x": [1, 1, 1, 1]}),
            _mt_record("lora", s, {"y": [0.8]}),
        ]
    page = _write_ledger(tmp_path, records, "multitask", "alora").read_text()
    summary = json.loads((tmp_path / "results.json").read_text())
    alora = next(g for g in summary["groups"] if g["label"] == "method=alora")
    assert alora["delta_m"]["value"] == pytest.approx(37.5)
    assert alora["per_task"]["y"]["value"] == pytest.approx(0.4)
    lora = next(g for g in summary["groups"] if g["label"] == "method=lora")
    assert lora["delta_m"]["value"] == pytest.approx((50 + 75) / 2)  # (1 − .5) / 1, (.8 − .2) / .8
    if seeds == [0]:
        assert "| method=alora | 0 | 0.750 [0.301, 0.954] | 0.400 | 0.575 |" in page  # Wilson for x; y bare


def test_a_paired_test_on_one_example_per_task() -> None:
    """A smoke campaign scores one test example per task (``eval.max_examples=1``, as in docs/sweep.md's timing
    command). The per-task paired test handed one pair to scipy's permutation_test, which needs two: ValueError,
    and no report. One pair's two sign flips both reach |a − b|, so the two-sided p is 2/2 = 1."""
    from asymlora.eval import stats

    one = stats.paired_test([1.0], [0.0])
    assert (one["difference"], one["p_value"], one["low"], one["high"], one["n"]) == (1.0, 1.0, None, None, 1)
    # the average over two such tasks: 4 sign flips of (+1/2, +1/2), |sum| >= 1 in 2: p = 0.5
    assert stats.paired_average_test({"x": [1.0], "y": [1.0]}, {"x": [0.0], "y": [0.0]})["p_value"] == 0.5


def test_an_unresolved_difference_without_spread_is_not_called_no_difference() -> None:
    """Two test examples per task, A right on all, B wrong on all: the average differs by +1 (p = 0.125: 2 of
    the 16 sign flips reach |1|), but the paired differences have no variance, so `stats.examples_to_resolve`
    has nothing to size by (None); the report then said "no difference to resolve" about a difference of +1."""
    from asymlora.recipes.groups import SeedGroup, paired_lines, paired_over_seeds

    def group(label: str, score: int) -> SeedGroup:
        return SeedGroup(
            label, [{"seed": 0, "per_example": {t: {"keys": t, "scores": [score] * 2} for t in "xy"}}]
        )

    result = paired_over_seeds(group("A", 1), group("B", 0), ["x", "y"], lambda r, t: r["per_example"][t])
    assert result is not None
    assert result["tests"]["average"]["difference"] == 1.0 and result["tests"]["average"]["p_value"] == 0.125
    assert result["resolve"]["examples_per_unit"] is None
    lines = paired_lines([{"a": "A", "b": "B", **result}], ["x", "y"], "Paired:", "task")
    assert lines[-1] == (
        "- A − B: +1.0000 (p=0.125): every test example differs by the same amount (now 2 per task), so there is "
        "no spread to size a study by: score more test examples per task"
    )
    same = paired_over_seeds(group("A", 1), group("B", 1), ["x", "y"], lambda r, t: r["per_example"][t])
    assert same is not None
    assert paired_lines([{"a": "A", "b": "B", **same}], ["x", "y"], "Paired:", "task")[-1].endswith(
        ": no difference to resolve"
    )


def test_a_finished_cell_stays_done_when_an_upgrade_changes_how_ids_are_computed(
    tmp_path: Path, monkeypatch
) -> None:
    """The federated cell ids changed once (the pace keys left out, then ``clients.max_failed_rounds``): a cell
    recorded under its old id was no longer found in the ledger and ran again, hours of work. A record keeps
    its full config, so the cell is found by the id that config has under the code now. ``fb10736c1016`` is the
    id the code of commit abbc4c2^ gave this cell; its record's config lacks the two keys added since."""
    from asymlora.recipes import fed_sweep, sweep

    base = Path(__file__).resolve().parents[1] / "configs" / "fed_bigbench_het.yaml"
    spec = {"base": str(base), "out_dir": "campaign", "overrides": ["eval.local_only=false"],
            "grid": {"strategy": ["fedalora-het"], "seed": [0, 1]}}  # fmt: skip
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(spec))
    loaded = sweep.load_sweep(tmp_path / "sweep.yaml")
    cells = sweep.expand(loaded)
    config = cells[0].config.to_dict()
    del config["clients"]["max_failed_rounds"], config["train"]["mixed_precision"]
    old = {"id": "fb10736c1016", "kind": "federated", "strategy": "fedalora-het", "seed": 0, "config": config}
    assert cells[0].id != old["id"]
    loaded.out_dir.mkdir()
    loaded.ledger.write_text(json.dumps(old) + "\n")
    assert [status for _, status in sweep.cell_status(loaded)] == ["done", "todo"]
    ran: list[str] = []
    monkeypatch.setattr(sweep, "run_cell", lambda cell, ledger: ran.append(cell.id) or {"average": 0.0,
                                                                                        "wall_seconds": 0.0})  # fmt: skip
    counts = sweep.run_sweep(loaded, say=lambda *a: None)
    assert ran == [cells[1].id] and (counts["done"], counts["ran"]) == (1, 1)
    assert fed_sweep.fed_cell_id(cells[0].config, "fedalora-het") == cells[0].id


def test_how_a_multitask_cell_is_saved_and_logged_is_not_part_of_its_id() -> None:
    """``train.save_every``, ``train.keep_checkpoints``, ``train.log_every``, ``train.trace_every`` and
    ``train.router_log_every`` only say how often a run checkpoints, how many checkpoints it keeps and how often
    it logs its loss, A/B traces and router statistics, yet each changed a cell's id: checkpointing more often
    made every finished cell of a campaign run again. Now a cell's identity holds them at their defaults
    (50, 2, 10, 0, 10), so the id is the one of the defaults (hex digest by hand: sha256 of the YAML
    dump of the config at the defaults, run_dir blank, the `LATER_KEYS` at their neutral values left out), and
    records that differ only there are one group. Anything else still makes another cell."""
    from asymlora.recipes import sweep

    tasks = "data.tasks=[bigbench:strategyqa]"
    base = load_config(None, [tasks])
    logged = load_config(None, [tasks, "train.save_every=7", "train.keep_checkpoints=5", "train.log_every=3",
                                "train.trace_every=4", "train.router_log_every=1"])  # fmt: skip
    by_hand = base.to_dict()
    by_hand["run_dir"] = ""
    del by_hand["stopping"], by_hand["train"]["mixed_precision"]
    digest = hashlib.sha256(yaml.safe_dump(by_hand, sort_keys=False).encode()).hexdigest()[:12]
    assert sweep.cell_id(base) == sweep.cell_id(logged) == digest
    assert sweep.cell_id(load_config(None, [tasks, "train.steps=7"])) != digest

    def record(cfg, seed: int) -> dict:
        config = cfg.to_dict()
        config["train"]["seed"] = seed
        return {"id": f"old-{seed}", "seed": seed, "method": "lora", "tasks": ["t"], "primary": {"t": "accuracy"},
                "params": {"train.seed": seed}, "config": config}  # fmt: skip

    (group,) = sweep.group_records([record(base, 0), record(logged, 1)])
    assert group.seeds == [0, 1]
    assert sweep.done_ids([record(logged, 0)]) >= {sweep.cell_id(base)}


HET_GRID_AT_10_ROUNDS = [
    {"strategy": ["zeropad", "local-only"], "seed": [0, 1, 2]},
    {"strategy": ["fedalora-het"], "het_local": ["fresh", "persist"], "seed": [0, 1, 2]},
]
"""The grid of configs/campaign_federated_het.yaml until 2026-12-02 (10 rounds × 30 local steps from the base
config, bf16 autocast: `HET_OVERRIDES_WITH_BF16`); its three seed-0 cells stay in the ledger beside the cells
of the 5 × 20 float32 grid."""
HET_OVERRIDES_WITH_BF16 = ["train.mixed_precision=bf16", "eval.local_only=false", "simulation.num_cpus=1"]
HOMO_OVERRIDES_WITH_BF16 = ["train.mixed_precision=bf16", "eval.local_only=false", "rounds=5", "train.local_steps=20",
                            "eval.global_scores=false", "simulation.num_cpus=1"]  # fmt: skip
"""The overrides of configs/campaign_federated.yaml until 2026-12-02 (bf16 autocast; the grid is unchanged): its
four seed-0 cells stay in the ledger beside the cells of the float32 campaign."""


@pytest.mark.parametrize(
    ("campaign", "old_grid"),
    [("campaign_multitask", None), ("campaign_federated", (None, HOMO_OVERRIDES_WITH_BF16)),
     ("campaign_federated_rouge", None),
     ("campaign_federated_het", (HET_GRID_AT_10_ROUNDS, HET_OVERRIDES_WITH_BF16))],
)  # fmt: skip
def test_the_committed_campaign_cells_keep_the_ids_they_were_recorded_under(campaign: str, old_grid) -> None:
    """Every record of a committed campaign ledger is a cell of its sweep file (or of the grid it had before a
    deliberate change of budget) under the id it was recorded with, so no change to how ids are computed leaves
    a done cell "done" only through its config while the half-finished cells of the campaign (run directories
    keyed by id) would start over."""
    from asymlora.recipes import sweep

    root = Path(__file__).resolve().parents[1]
    spec = sweep.load_sweep(root / "configs" / f"{campaign}.yaml")
    ids = {cell.id for cell in sweep.expand(spec)}
    if old_grid is not None:
        grid, overrides = old_grid
        grid = spec.grid if grid is None else grid
        ids |= {cell.id for cell in sweep.expand(dataclasses.replace(spec, grid=grid, overrides=overrides))}
    recorded = {r["id"] for r in sweep.read_ledger(root / "results" / campaign / "ledger.jsonl")}
    assert recorded and recorded <= ids
