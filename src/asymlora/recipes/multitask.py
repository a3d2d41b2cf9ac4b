"""The multi-task recipe: load model and tasks, train each configured method, evaluate, write results.

Run directory of a single-method run::

    run_dir/config.yaml          the resolved config
    run_dir/base.json            the base model's scores (eval.base_model)
    run_dir/checkpoints/step-N/  atomic checkpoints (adapter, optimiser, scheduler, RNG)
    run_dir/adapter/             the final adapter (peft save_pretrained)
    run_dir/train_log.jsonl      loss every train.log_every steps
    run_dir/val_log.jsonl        validation loss per task and mean every stopping.every steps (stopping rule)
    run_dir/router.jsonl         router load, entropies, task × expert usage every train.router_log_every steps
    run_dir/results.json         per_task, average, std, worst, delta_m, method, trainable_params, ...,
                                 intervals (95 %: per task, average, Δm%; asymlora.eval.stats), data_notes
                                 (examples skipped or prompts cut to fit data.max_length, per task)
    run_dir/per_example.jsonl    each test example's scores: {"task", "index", "key", "scores"}

With ``compare.methods`` each method gets such a directory ``run_dir/<method>/``, single-task baselines go
to ``run_dir/single/<task>/``, and ``run_dir/results.json``, ``results.md`` and ``results.png`` hold the
side-by-side table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import peft
import torch

from asymlora import distributed
from asymlora import train as training  # called as training.train: tests and tools patch asymlora.train.train
from asymlora.analysis.router_stats import ROUTER_LOG, RouterLog, RouterStats
from asymlora.analysis.traces import TRACES_FILE, TraceRecorder
from asymlora.config import ConfigError, RunConfig, dump_config, load_config
from asymlora.data import MultiTaskCollator, MultiTaskDataset, load_tasks
from asymlora.data.tasks import split_validation
from asymlora.eval import (
    apply_metric_choices,
    evaluate_task,
    format_table,
    metric_notes,
    plot_results,
    primary_metric,
    summarize,
)
from asymlora.eval.stats import run_intervals
from asymlora.io import atomic_dir, atomic_write_text
from asymlora.models import hardware, load
from asymlora.roles import count_parameters
from asymlora.train.sharding import full_adapter_state, is_sharded
from asymlora.train.stopping import Validation

CONFIG_FILE = "config.yaml"
RESULTS_FILE = "results.json"
PER_EXAMPLE_FILE = "per_example.jsonl"


def prepare_run_dir(cfg: RunConfig, *, overwrite: bool, resume: bool) -> Path:
    """Create the run directory, refusing to mix two different runs in one directory.

    In a multi-process run only rank 0 checks and writes; the others wait and raise the same error."""
    distributed.on_main(_prepare_run_dir, cfg, overwrite=overwrite, resume=resume)
    return Path(cfg.run_dir)


def check_run_dir(cfg: RunConfig, *, overwrite: bool, resume: bool) -> None:
    """Raise what `prepare_run_dir` would refuse (another run, another config, not a run), writing nothing."""
    distributed.on_main(_check_run_dir, cfg, overwrite=overwrite, resume=resume)


def _prepare_run_dir(cfg: RunConfig, *, overwrite: bool, resume: bool) -> None:
    _check_run_dir(cfg, overwrite=overwrite, resume=resume)
    run_dir = Path(cfg.run_dir)
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / CONFIG_FILE, dump_config(cfg))


def _check_run_dir(cfg: RunConfig, *, overwrite: bool, resume: bool) -> None:
    run_dir = Path(cfg.run_dir)
    saved = run_dir / CONFIG_FILE
    if saved.is_file() and not overwrite:
        if not resume:
            raise FileExistsError(
                f"{run_dir} already holds a run; pass --resume to continue it or --overwrite to start over "
                "(or choose another run_dir=...)"
            )
        previous = load_config(saved)  # compared by value: a reread 16 is 16.0, the same config
        # run_dir: the directory may have been moved or copied (a campaign's out_dir on another machine)
        if dataclasses.replace(previous, train=cfg.train, run_dir=cfg.run_dir) != cfg:
            raise ConfigError(
                f"{run_dir} holds a run with a different config; --resume needs the same config "
                f"(only train.* and run_dir may change). Compare with {saved}, or use --overwrite."
            )
    elif run_dir.exists() and any(run_dir.iterdir()) and not overwrite and not saved.is_file():
        raise FileExistsError(f"{run_dir} exists and is not an asymlora run; choose another run_dir=...")


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON atomically (rank 0 only in a multi-process run; the others wait for it)."""
    distributed.on_main(atomic_write_text, path, json.dumps(data, indent=2, default=float) + "\n")


def write_examples(path: Path, examples: dict[str, list[dict[str, Any]]]) -> None:
    """Write ``{task: per-example rows}`` as JSON lines ``{"task": name, **row}`` (atomically; rank 0 only)."""
    lines = [json.dumps({"task": task, **row}) + "\n" for task, rows in examples.items() for row in rows]
    distributed.on_main(atomic_write_text, path, "".join(lines))


def read_examples(path: Path) -> dict[str, list[dict[str, Any]]]:
    """``{task: per-example rows}`` from a ``per_example.jsonl`` written by :func:`write_examples`."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: this run has no per-example scores; produce them with "
            f"`asymlora eval {path.parent}` (re-scores the saved adapter)"
        )
    examples: dict[str, list[dict[str, Any]]] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            row = json.loads(line)
            task, scores = row.pop("task"), row["scores"]
            if not isinstance(task, str) or not isinstance(scores, dict) or not isinstance(row["key"], str):
                raise TypeError("'task' and 'key' must be strings and 'scores' an object")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(
                f"{path} line {number} is not a per-example record ({type(e).__name__}: {e}); the file is "
                f"damaged: rewrite it with `asymlora eval {path.parent}` (re-scores the saved adapter)"
            ) from None
        examples.setdefault(task, []).append(row)
    return examples


def example_scores(path: Path, task: str, metric: str) -> list[float] | None:
    """Task ``task``'s per-example ``metric`` scores from a ``per_example.jsonl``; None for a corpus-level
    metric (BLEU), which has none."""
    rows = read_examples(path)[task]
    if not all(metric in row["scores"] for row in rows):
        return None
    return [row["scores"][metric] for row in rows]


def load_tasks_for(cfg: RunConfig) -> list[Any]:
    """The configured tasks (``data.*``) with the configured primary metrics (``data.metric``); their
    training splits without the validation examples of the stopping rule (``stopping.val_examples``)."""
    return load_split_tasks(cfg)[0]


def load_split_tasks(cfg: RunConfig) -> tuple[list[Any], list[Any]]:
    """(the tasks of `load_tasks_for`, their validation tasks: one per task, whose ``train`` split holds its
    ``stopping.val_examples`` validation examples; empty when the stopping rule is off).

    Each task is read with ``max_train + val_examples`` training examples in its seeded order; the last
    ``val_examples`` are its validation split (`asymlora.data.tasks.split_validation`), so the training
    examples are those of the same config without validation whenever the source has enough of them."""
    n, max_train = cfg.stopping.val_examples, cfg.data.max_train
    tasks = load_tasks(
        cfg.data.tasks,
        seed=cfg.data.seed,
        max_train=max_train + n if max_train is not None else None,
        max_test=cfg.data.max_test,
        test_fraction=cfg.data.test_fraction,
    )
    tasks = apply_metric_choices(tasks, cfg.data.metric, cfg.data.tasks)
    if not n:
        return tasks, []
    pairs = [split_validation(task, n) for task in tasks]
    return [train for train, _ in pairs], [val for _, val in pairs]


def evaluate(
    model: Any,
    tokenizer: Any,
    tasks: list,
    cfg: RunConfig,
    task_routed: bool,
    examples_path: Path | None = None,
    label: str = "model",
    router_stats: RouterStats | None = None,
) -> dict[str, dict]:
    """Score every task; a task-routed adapter gets each task's id.

    Per-example scores go to ``examples_path``; a progress bar per task names ``label``; ``router_stats``
    labels each task's tokens with its index (the task × expert usage).
    """
    per_task: dict[str, dict] = {}
    examples: dict[str, list[dict[str, Any]]] = {}
    for i, task in enumerate(tasks):
        if router_stats is not None:
            router_stats.task_label = i  # this task's tokens fill row i of the task × expert usage
        scored = evaluate_task(
            model,
            tokenizer,
            task,
            task_id=i if task_routed else None,
            batch_size=cfg.eval.batch_size,
            max_new_tokens=cfg.eval.max_new_tokens,
            max_examples=cfg.eval.max_examples,
            with_examples=True,
            progress=f"evaluating {label} on {task.name} ({i + 1}/{len(tasks)})",
        )
        per_task[task.name], examples[task.name] = cast(
            tuple[dict, list[dict[str, Any]]], scored
        )  # with_examples
    if router_stats is not None:
        router_stats.task_label = None
    if examples_path is not None:
        write_examples(examples_path, examples)
    return per_task


def intervals_of(examples_path: Path, tasks: list, baselines: dict[str, Any] | None) -> dict[str, Any]:
    """95 % intervals of a run from its ``per_example.jsonl`` (asymlora.eval.stats.run_intervals).

    ``baselines``: per task, the single-task score, or its per-example scores (a paired Δm% interval).
    """
    return run_intervals(read_examples(examples_path), primary_metrics(tasks), baselines)


def primary_metrics(tasks: list) -> dict[str, str]:
    return {task.name: primary_metric(task) for task in tasks}


def train_and_evaluate(
    cfg: RunConfig,
    method: str,
    model: Any,
    tokenizer: Any,
    tasks: list,
    out_dir: Path,
    *,
    resume: bool,
    baselines: dict[str, float] | None,
    baseline_examples: dict[str, list[float]] | None = None,
    val_tasks: list | None = None,
) -> tuple[dict[str, Any], Any]:
    """Train ``method`` on ``tasks`` into ``out_dir``, evaluate it, and give the base model back.

    ``val_tasks``: the validation tasks of ``tasks`` (`load_split_tasks`): the run follows the stopping rule
    ``cfg.stopping`` (val_log.jsonl, early stopping, the best adapter saved and evaluated)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.train.seed)
    # peft records the directory the model was read from (and reads its config.json when saving); naming
    # anything else here only makes get_peft_model warn that it renamed it.
    peft_cfg = cfg.adapter_for(method).to_peft([t.name for t in tasks], base_model=model.name_or_path or None)
    pm = peft.get_peft_model(model, peft_cfg)
    dataset = MultiTaskDataset(
        tasks, tokenizer, max_length=cfg.data.max_length, warn=False
    )  # check_data_fits
    settings_train = cfg.train.for_examples(len(dataset))  # train.epochs → steps
    on_step, router_log = _step_hooks(cfg, pm, out_dir, settings_train.steps, tasks)
    validation = _validation(cfg, tokenizer, val_tasks, router_log)
    result = training.train(pm, dataset, MultiTaskCollator(tokenizer), settings_train, out_dir, resume=resume, on_step=on_step,
                   desc=f"{method} ({len(tasks)} task{'s' * (len(tasks) > 1)})", step_logs=(ROUTER_LOG, TRACES_FILE),
                   **({"validation": validation} if validation is not None else {}))  # fmt: skip
    full_state = full_adapter_state(pm)  # FSDP: gathered to rank 0 (a collective); else None
    distributed.on_main(save_adapter, pm, out_dir / "adapter", full_state)
    t0 = time.perf_counter()
    routed = peft_cfg.router == "task" and method != "lora"
    examples_path = out_dir / PER_EXAMPLE_FILE
    with distributed.lockstep() if is_sharded(pm) else contextlib.nullcontext():  # FSDP: no split
        per_task = evaluate(pm, tokenizer, tasks, cfg, task_routed=routed, examples_path=examples_path, label=method,
                            router_stats=router_log.stats if router_log else None)  # fmt: skip
        # a collective: split evaluation sums the processes' tokens, lockstep does not
        if router_log is not None:
            router_log.write(result.steps, "eval")
    if router_log is not None:
        router_log.close()
    summary = summarize(per_task, primary_metrics(tasks), baselines, metric_notes=metric_notes(tasks))
    summary["intervals"] = intervals_of(examples_path, tasks, baseline_examples or baselines)
    results = {
        "method": method,
        "per_task": per_task,
        **summary,
        **_run_facts(pm, peft_cfg, result, eval_seconds=time.perf_counter() - t0),
    }
    write_json(out_dir / RESULTS_FILE, results)
    return results, pm.unload()


def _validation(
    cfg: RunConfig, tokenizer: Any, val_tasks: list | None, router_log: RouterLog | None
) -> Validation | None:
    """The stopping rule of a training run (None when ``stopping.val_examples`` is 0); validation forwards
    are kept out of the router statistics."""
    if not val_tasks:
        return None
    dataset = MultiTaskDataset(val_tasks, tokenizer, max_length=cfg.data.max_length, warn=False)
    pause = router_log.stats.paused if router_log is not None else None
    return Validation(dataset, MultiTaskCollator(tokenizer), cfg.stopping, cfg.eval.batch_size, pause)


def _step_hooks(
    cfg: RunConfig, pm: Any, out_dir: Path, steps: int, tasks: list
) -> tuple[Callable[[int], Any] | None, RouterLog | None]:
    """The per-step callback of training, run by every process (A/B traces every ``train.trace_every`` steps,
    rank 0 only; router statistics every ``train.router_log_every``, over the batches of all processes;
    docs/analysis.md) and the router log it fills (written by rank 0)."""
    on_step: Callable[[int], Any] | None = None
    if cfg.train.trace_every and distributed.is_main():
        recorder = TraceRecorder(pm, out_dir / TRACES_FILE)
        on_step = lambda step: step % cfg.train.trace_every == 0 and recorder.record(step)  # noqa: E731
    router_log = RouterLog.for_run(pm, out_dir, cfg.train.router_log_every, steps, [t.name for t in tasks])
    if router_log is not None:  # router.jsonl: expert loads and task × expert usage (docs/analysis.md)
        trace = on_step
        on_step = lambda step: (trace and trace(step), router_log(step))  # noqa: E731
    return on_step, router_log


def _run_facts(
    pm: Any, peft_cfg: Any, result: training.TrainResult, *, eval_seconds: float
) -> dict[str, Any]:
    """The size, cost and training record of a trained method (the keys of results.json after the scores)."""
    return {
        "trainable_params": count_parameters(pm)["total"],
        "train_seconds": None if result.train_seconds is None else round(result.train_seconds, 2),
        "step_seconds": None if result.step_seconds is None else round(result.step_seconds, 4),
        "eval_seconds": round(eval_seconds, 2),
        "peak_memory_mb": round(result.peak_memory_mb, 1),
        "steps": result.steps,
        "final_loss": result.final_loss,
        "losses": result.losses,
        "router": peft_cfg.router,
        "num_experts": peft_cfg.experts,
        "hardware": hardware(pm),
        **({"stopping": result.stopping} if result.stopping is not None else {}),
    }


def save_adapter(model: Any, target: Path, state_dict: dict[str, Any] | None = None) -> None:
    """``model.save_pretrained`` into ``target`` atomically (of ``state_dict``, a sharded model's gathered
    tensors, when given)."""
    with atomic_dir(target, overwrite=True) as tmp:
        model.save_pretrained(str(tmp), **({"state_dict": state_dict} if state_dict is not None else {}))


def run(
    cfg: RunConfig, *, overwrite: bool = False, resume: bool = False, quiet: bool = False
) -> dict[str, Any]:
    """Run the whole recipe; returns what `results.json` holds.

    Under ``torchrun`` / ``accelerate launch`` every process runs this: training and evaluation are split
    across them, rank 0 alone writes. Raises ValueError when the number of processes does not divide
    ``train.batch_size``, before anything is loaded or written (docs/distributed.md).
    """
    check_launch(cfg)
    distributed.init(cfg.model.device)
    say = print if not quiet and distributed.is_main() else (lambda *a: None)
    tasks, val_tasks = load_split_tasks(cfg)  # bad data or metrics fail before run_dir is written
    check_run_dir(cfg, overwrite=overwrite, resume=resume)
    val = f"{cfg.stopping.val_examples} validation / " if val_tasks else ""
    say(
        "tasks: "
        + ", ".join(f"{t.name} ({t.kind}, {len(t.train)} train / {val}{len(t.test)} test)" for t in tasks)
    )
    notes = metric_notes(tasks)
    for note in notes.values():
        say(f"note: {note}")
    model, tokenizer = load_model(cfg)
    data_notes = check_data_fits(cfg, tokenizer, tasks, val_tasks)  # no example that fits: before run_dir
    run_dir = prepare_run_dir(cfg, overwrite=overwrite, resume=resume)
    table = _Table(primary_metrics(tasks), notes)
    combined: dict[str, Any] = {
        "tasks": [t.name for t in tasks],
        "primary_metric": table.primary,
        "methods": {},
    }
    combined["metric_notes"] = notes
    combined["data_notes"] = data_notes  # examples skipped or prompts cut to fit data.max_length
    if cfg.eval.base_model:
        combined["base"] = _base_scores(cfg, model, tokenizer, tasks, run_dir, resume=resume, table=table)
    baselines, baseline_examples = cfg.baselines, None
    if cfg.compare.single_task:
        model, baselines, baseline_examples, combined["single_task"] = _single_task_baselines(
            cfg, model, tokenizer, tasks, run_dir, resume=resume, table=table, val_tasks=val_tasks
        )
    combined["baselines"] = baselines
    flat = not cfg.compare.methods
    for method in cfg.compare.methods or [cfg.adapter.method]:
        res, model = train_and_evaluate(cfg, method, model, tokenizer, tasks, run_dir if flat else run_dir / method,
                                        resume=resume, baselines=baselines, baseline_examples=baseline_examples,
                                        val_tasks=val_tasks)  # fmt: skip
        table.add(method, res["per_task"], res["intervals"])
        combined["methods"][method] = {k: v for k, v in res.items() if k != "losses"}
    text = table.render([t.name for t in tasks], baselines)
    say(text)
    if not flat:
        write_json(run_dir / RESULTS_FILE, combined)
    distributed.on_main(atomic_write_text, run_dir / "results.md", text + "\n")
    distributed.on_main(
        plot_results, table.rows, table.primary, run_dir / "results.png", intervals=table.intervals
    )
    if flat:  # a single-method run: results.json holds that run's keys, plus the base model's scores
        results = json.loads((run_dir / RESULTS_FILE).read_text())
        results["base"] = combined.get("base")
        results["data_notes"] = data_notes
        write_json(run_dir / RESULTS_FILE, results)
        return results
    return combined


def check_data_fits(cfg: RunConfig, tokenizer: Any, tasks: list, val_tasks: list) -> list[str]:
    """Raise `DataError` for a task (or validation split) with no example whose answer fits in
    ``data.max_length``; warn, once per run, of each task's examples skipped or prompts cut to fit it, and
    return those lines (``results.json``'s ``data_notes``)."""
    warn = distributed.is_main()  # torchrun: each process checks, rank 0 alone warns
    notes = MultiTaskDataset(tasks, tokenizer, max_length=cfg.data.max_length, warn=warn).notes
    if val_tasks:
        notes += MultiTaskDataset(
            val_tasks, tokenizer, max_length=cfg.data.max_length, label="validation", warn=warn
        ).notes
    return notes


def check_launch(cfg: RunConfig) -> None:
    """Refuse what cannot run under this launch (before anything is loaded or written): a process count
    that does not divide ``train.batch_size``, FSDP with several methods, a quantised base model or mixed
    precision, an ``accelerate launch --mixed_precision`` that disagrees with ``train.mixed_precision``."""
    distributed.per_process_batch(cfg.train.batch_size, distributed.launched_world_size())
    if cfg.train.fsdp and (cfg.compare.methods or cfg.compare.single_task):
        raise ConfigError(
            "train.fsdp=true trains one method per launch (the sharded base model cannot be reused); drop "
            "the compare section (override compare=null), or use train.fsdp=false (DDP)"
        )
    if cfg.train.fsdp and (cfg.model.load_in_4bit or cfg.model.load_in_8bit):
        bits = "model.load_in_4bit=true" if cfg.model.load_in_4bit else "model.load_in_8bit=true"
        raise ConfigError(f"train.fsdp=true cannot shard a quantised base model ({bits}); use one of the two")
    if cfg.train.mixed_precision is not None and cfg.train.fsdp:
        raise ConfigError(
            f"train.mixed_precision={cfg.train.mixed_precision} with train.fsdp=true is not supported here (not "
            "tested with a sharded model; FSDP2 has its own MixedPrecisionPolicy); use train.fsdp=false (DDP) "
            "or train.mixed_precision=null"
        )
    # `accelerate launch` always sets ACCELERATE_MIXED_PRECISION ("no" without --mixed_precision), and a plain
    # `python` / sweep process leaves it unset: only a precision asked for at launch that the config does not
    # say is refused (the Accelerator is built with mixed_precision="no", so it would be silently dropped)
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if launched != "no" and launched != cfg.train.mixed_precision:
        raise ConfigError(
            f"accelerate's mixed precision is {launched!r} (ACCELERATE_MIXED_PRECISION, set by `accelerate launch "
            f"--mixed_precision` or its config file) but train.mixed_precision={cfg.train.mixed_precision or 'null'}: "
            "asymlora autocasts from its config alone; set train.mixed_precision=bf16 (or null) and launch "
            "without --mixed_precision (and with mixed_precision: 'no' in accelerate's config file)"
        )


def load_model(cfg: RunConfig) -> tuple[Any, Any]:
    """(model, tokenizer) of ``model.*`` on this process's device, gradient checkpointing on if asked."""
    model, tokenizer = load(
        cfg.model.name,
        device=distributed.process_device(cfg.model.device),
        load_in_4bit=cfg.model.load_in_4bit,
        load_in_8bit=cfg.model.load_in_8bit,
    )
    if cfg.model.gradient_checkpointing:  # transformers ≥ 5.2x: activation_*; older 5.x: gradient_*
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer


@dataclasses.dataclass
class _Table:
    """The rows of the side-by-side table (results.md, results.png): per row, per-task scores and intervals."""

    primary: dict[str, str]
    notes: dict[str, str]
    rows: dict[str, dict[str, dict[str, float]]] = dataclasses.field(default_factory=dict)
    intervals: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def add(self, label: str, per_task: dict[str, dict[str, float]], intervals: dict[str, Any]) -> None:
        self.rows[label] = per_task
        self.intervals[label] = intervals

    def render(self, tasks: list[str], baselines: dict[str, float] | None) -> str:
        return format_table(self.rows, self.primary, tasks, baselines, metric_notes=self.notes,
                            intervals=self.intervals)  # fmt: skip


def _base_scores(
    cfg: RunConfig, model: Any, tokenizer: Any, tasks: list, run_dir: Path, *, resume: bool, table: _Table
) -> dict[str, Any]:
    """The base model's scores (``base.json``; read back when resuming), added to ``table``."""
    base_file = run_dir / "base.json"
    if resume and base_file.is_file():
        base = json.loads(base_file.read_text())
    else:
        examples_path = run_dir / f"base_{PER_EXAMPLE_FILE}"
        per_task = evaluate(model, tokenizer, tasks, cfg, task_routed=False, examples_path=examples_path,
                            label="the base model")  # fmt: skip
        base = {
            "method": "base",
            "per_task": per_task,
            **summarize(per_task, table.primary, None, metric_notes=table.notes),
            "intervals": intervals_of(examples_path, tasks, None),
        }
        write_json(base_file, base)
    table.add("base", base["per_task"], base.get("intervals") or {})
    return base


def _single_task_baselines(
    cfg: RunConfig,
    model: Any,
    tokenizer: Any,
    tasks: list,
    run_dir: Path,
    *,
    resume: bool,
    table: _Table,
    val_tasks: list | None = None,
) -> tuple[Any, dict[str, float], dict[str, list[float]] | None, dict[str, Any]]:
    """Train one plain LoRA per task (steps / T each) into ``run_dir/single/<task>/``: the Δm% baselines,
    under the same stopping rule as the multi-task runs (``val_tasks``: each task's validation split).

    Returns (the base model back, baseline score per task, their per-example scores for a paired Δm%
    interval or None, the ``single_task`` entry of results.json); adds the row to ``table``."""
    single_cfg = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, steps=max(1, math.ceil(cfg.train.steps / len(tasks))))
    )
    single: dict[str, dict[str, float]] = {}
    examples: dict[str, list[float]] = {}
    per_task_intervals: dict[str, Any] = {}
    for i, task in enumerate(tasks):
        out = run_dir / "single" / safe_name(task.name)
        res, model = train_and_evaluate(single_cfg, "lora", model, tokenizer, [task], out, resume=resume,
                                        baselines=None, val_tasks=[val_tasks[i]] if val_tasks else None)  # fmt: skip
        single[task.name] = res["per_task"][task.name]
        metric = table.primary[task.name]
        if (scores := example_scores(out / PER_EXAMPLE_FILE, task.name, metric)) is not None:
            examples[task.name] = scores
        per_task_intervals.update(res["intervals"]["per_task"])
    table.add("single-task lora", single, {"per_task": per_task_intervals})
    baselines = {name: scores[table.primary[name]] for name, scores in single.items()}
    entry = {"per_task": single, **summarize(single, table.primary, None, metric_notes=table.notes)}
    return model, baselines, examples or None, entry


def safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
