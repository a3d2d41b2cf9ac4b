"""The multi-task recipe: load model and tasks, train each configured method, evaluate, write results.

Run directory of a single-method run::

    run_dir/config.yaml          the resolved config
    run_dir/base.json            the base model's scores (eval.base_model)
    run_dir/checkpoints/step-N/  atomic checkpoints (adapter, optimiser, scheduler, RNG)
    run_dir/adapter/             the final adapter (peft save_pretrained)
    run_dir/train_log.jsonl      loss every train.log_every steps
    run_dir/router.jsonl         router load, entropies, task × expert usage every train.router_log_every steps
    run_dir/results.json         per_task, average, std, worst, delta_m, method, trainable_params, ...,
                                 intervals (95 %: per task, average, Δm%; asymlora.eval.stats)
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
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import peft
import torch

from asymlora import distributed
from asymlora.config import ConfigError, RunConfig, dump_config, load_config
from asymlora.io import atomic_dir, atomic_write_text
from asymlora.roles import count_parameters

if TYPE_CHECKING:
    from asymlora.analysis.router_stats import RouterStats

CONFIG_FILE = "config.yaml"
RESULTS_FILE = "results.json"
PER_EXAMPLE_FILE = "per_example.jsonl"


def prepare_run_dir(cfg: RunConfig, *, overwrite: bool, resume: bool) -> Path:
    """Create the run directory, refusing to mix two different runs in one directory.

    In a multi-process run only rank 0 checks and writes; the others wait and raise the same error."""
    distributed.on_main(_prepare_run_dir, cfg, overwrite=overwrite, resume=resume)
    return Path(cfg.run_dir)


def _prepare_run_dir(cfg: RunConfig, *, overwrite: bool, resume: bool) -> None:
    run_dir = Path(cfg.run_dir)
    saved = run_dir / CONFIG_FILE
    text = dump_config(cfg)
    if saved.is_file() and not overwrite:
        if not resume:
            raise FileExistsError(
                f"{run_dir} already holds a run; pass --resume to continue it or --overwrite to start over "
                "(or choose another run_dir=...)"
            )
        previous = load_config(saved)
        if dump_config(dataclasses.replace(previous, train=cfg.train)) != text:
            raise ConfigError(
                f"{run_dir} holds a run with a different config; --resume needs the same config "
                f"(only train.* may change). Compare with {saved}, or use --overwrite."
            )
    elif run_dir.exists() and any(run_dir.iterdir()) and not overwrite and not saved.is_file():
        raise FileExistsError(f"{run_dir} exists and is not an asymlora run; choose another run_dir=...")
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(saved, text)


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
            if not isinstance(task, str) or not isinstance(scores, dict):
                raise TypeError("'task' must be a string and 'scores' an object")
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


def load_tasks_for(cfg: RunConfig):
    from asymlora.data import load_tasks
    from asymlora.eval.metrics import apply_metric_choices

    tasks = load_tasks(
        cfg.data.tasks,
        seed=cfg.data.seed,
        max_train=cfg.data.max_train,
        max_test=cfg.data.max_test,
        test_fraction=cfg.data.test_fraction,
    )
    return apply_metric_choices(tasks, cfg.data.metric, cfg.data.tasks)


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
    from asymlora.eval import evaluate_task

    per_task: dict[str, dict] = {}
    examples: dict[str, list[dict[str, Any]]] = {}
    for i, task in enumerate(tasks):
        if router_stats is not None:
            router_stats.task_label = i  # this task's tokens fill row i of the task × expert usage
        per_task[task.name], examples[task.name] = evaluate_task(
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
    if router_stats is not None:
        router_stats.task_label = None
    if examples_path is not None:
        write_examples(examples_path, examples)
    return per_task


def intervals_of(examples_path: Path, tasks: list, baselines: dict[str, Any] | None) -> dict[str, Any]:
    """95 % intervals of a run from its ``per_example.jsonl`` (asymlora.eval.stats.run_intervals).

    ``baselines``: per task, the single-task score, or its per-example scores (a paired Δm% interval).
    """
    from asymlora.eval.stats import run_intervals

    return run_intervals(read_examples(examples_path), primary_metrics(tasks), baselines)


def primary_metrics(tasks: list) -> dict[str, str]:
    from asymlora.eval import primary_metric

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
) -> tuple[dict[str, Any], Any]:
    """Train ``method`` on ``tasks`` into ``out_dir``, evaluate it, and give the base model back."""
    from asymlora.data import MultiTaskCollator, MultiTaskDataset
    from asymlora.eval import metric_notes, summarize
    from asymlora.train import train
    from asymlora.train.sharding import full_adapter_state, is_sharded

    out_dir.mkdir(parents=True, exist_ok=True)
    settings = cfg.adapter_for(method)
    torch.manual_seed(cfg.train.seed)
    # peft records the directory the model was read from (and reads its config.json when saving); naming
    # anything else here only makes get_peft_model warn that it renamed it.
    peft_cfg = settings.to_peft([t.name for t in tasks], base_model=model.name_or_path or None)
    pm = peft.get_peft_model(model, peft_cfg)
    dataset = MultiTaskDataset(tasks, tokenizer, max_length=cfg.data.max_length)
    on_step = None
    if cfg.train.trace_every:
        from asymlora.analysis.traces import TraceRecorder

        recorder = TraceRecorder(pm, out_dir / "traces.jsonl")
        on_step = lambda step: step % cfg.train.trace_every == 0 and recorder.record(step)  # noqa: E731
    settings_train = cfg.train.for_examples(len(dataset))  # train.epochs → steps
    from asymlora.analysis.router_stats import RouterLog

    router_log = RouterLog.for_run(pm, out_dir, cfg.train.router_log_every, settings_train.steps,
                                   [t.name for t in tasks]) if distributed.is_main() else None  # fmt: skip
    if router_log is not None:  # router.jsonl: expert loads and task × expert usage (docs/analysis.md)
        trace, on_step = on_step, lambda step: (trace and trace(step), router_log(step))
    result = train(pm, dataset, MultiTaskCollator(tokenizer), settings_train, out_dir, resume=resume, on_step=on_step,
                   desc=f"{method} ({len(tasks)} task{'s' * (len(tasks) > 1)})")  # fmt: skip
    full_state = full_adapter_state(pm)  # FSDP: gathered to rank 0 (a collective); else None
    distributed.on_main(save_adapter, pm, out_dir / "adapter", full_state)
    t0 = time.perf_counter()
    routed = peft_cfg.router == "task" and method != "lora"
    examples_path = out_dir / PER_EXAMPLE_FILE
    with distributed.lockstep() if is_sharded(pm) else contextlib.nullcontext():  # FSDP: no split
        per_task = evaluate(pm, tokenizer, tasks, cfg, task_routed=routed, examples_path=examples_path, label=method,
                            router_stats=router_log and router_log.stats)  # fmt: skip
    if router_log is not None:
        router_log.write(result.steps, "eval")
        router_log.close()
    summary = summarize(per_task, primary_metrics(tasks), baselines, metric_notes=metric_notes(tasks))
    summary["intervals"] = intervals_of(examples_path, tasks, baseline_examples or baselines)
    results = {
        "method": method,
        "per_task": per_task,
        **summary,
        "trainable_params": count_parameters(pm)["total"],
        "train_seconds": round(result.train_seconds, 2),
        "eval_seconds": round(time.perf_counter() - t0, 2),
        "peak_memory_mb": round(result.peak_memory_mb, 1),
        "steps": result.steps,
        "final_loss": result.final_loss,
        "losses": result.losses,
        "router": peft_cfg.router,
        "num_experts": peft_cfg.experts,
    }
    write_json(out_dir / RESULTS_FILE, results)
    return results, pm.unload()


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
    from asymlora.eval import format_table, metric_notes, plot_results, summarize
    from asymlora.models import load

    distributed.per_process_batch(cfg.train.batch_size, distributed.launched_world_size())
    if cfg.train.fsdp and (cfg.compare.methods or cfg.compare.single_task):
        raise ConfigError(
            "train.fsdp=true trains one method per launch (the sharded base model cannot be reused); drop "
            "the compare section (override compare=null), or use train.fsdp=false (DDP)"
        )
    if cfg.train.fsdp and (cfg.model.load_in_4bit or cfg.model.load_in_8bit):
        bits = "model.load_in_4bit=true" if cfg.model.load_in_4bit else "model.load_in_8bit=true"
        raise ConfigError(f"train.fsdp=true cannot shard a quantised base model ({bits}); use one of the two")
    distributed.init(cfg.model.device)
    say = print if not quiet and distributed.is_main() else (lambda *a: None)
    tasks = load_tasks_for(cfg)  # bad data or metrics fail before run_dir is written
    run_dir = prepare_run_dir(cfg, overwrite=overwrite, resume=resume)
    say(
        "tasks: "
        + ", ".join(f"{t.name} ({t.kind}, {len(t.train)} train / {len(t.test)} test)" for t in tasks)
    )
    notes = metric_notes(tasks)
    for note in notes.values():
        say(f"note: {note}")
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
    primary = primary_metrics(tasks)
    rows: dict[str, dict[str, dict[str, float]]] = {}
    intervals: dict[str, dict[str, Any]] = {}  # per row, for the table and the error bars
    combined: dict[str, Any] = {"tasks": [t.name for t in tasks], "primary_metric": primary, "methods": {}}
    combined["metric_notes"] = notes

    if cfg.eval.base_model:
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
                **summarize(per_task, primary, None, metric_notes=notes),
                "intervals": intervals_of(examples_path, tasks, None),
            }
            write_json(base_file, base)
        rows["base"] = base["per_task"]
        intervals["base"] = base.get("intervals") or {}
        combined["base"] = base

    baselines = cfg.baselines
    baseline_examples: dict[str, list[float]] = {}  # single-task per-example scores (paired Δm%)
    if cfg.compare.single_task:
        single_cfg = dataclasses.replace(
            cfg, train=dataclasses.replace(cfg.train, steps=max(1, math.ceil(cfg.train.steps / len(tasks))))
        )
        single: dict[str, dict[str, float]] = {}
        for task in tasks:
            out = run_dir / "single" / safe_name(task.name)
            res, model = train_and_evaluate(single_cfg, "lora", model, tokenizer, [task], out,
                                            resume=resume, baselines=None)  # fmt: skip
            single[task.name] = res["per_task"][task.name]
            if (scores := example_scores(out / PER_EXAMPLE_FILE, task.name, primary[task.name])) is not None:
                baseline_examples[task.name] = scores
            intervals.setdefault("single-task lora", {"per_task": {}})["per_task"].update(
                res["intervals"]["per_task"]
            )
        rows["single-task lora"] = single
        baselines = {name: scores[primary[name]] for name, scores in single.items()}
        combined["single_task"] = {"per_task": single, **summarize(single, primary, None, metric_notes=notes)}
    combined["baselines"] = baselines

    methods = cfg.compare.methods or [cfg.adapter.method]
    flat = not cfg.compare.methods
    for method in methods:
        out = run_dir if flat else run_dir / method
        res, model = train_and_evaluate(cfg, method, model, tokenizer, tasks, out, resume=resume,
                                        baselines=baselines, baseline_examples=baseline_examples or None)  # fmt: skip
        rows[method] = res["per_task"]
        intervals[method] = res["intervals"]
        combined["methods"][method] = {k: v for k, v in res.items() if k != "losses"}

    table = format_table(
        rows, primary, [t.name for t in tasks], baselines, metric_notes=notes, intervals=intervals
    )
    say(table)
    if not flat:
        write_json(run_dir / RESULTS_FILE, combined)
    distributed.on_main(atomic_write_text, run_dir / "results.md", table + "\n")
    distributed.on_main(plot_results, rows, primary, run_dir / "results.png", intervals=intervals)
    if flat:  # a single-method run: results.json holds that run's keys, plus the base model's scores
        results = json.loads((run_dir / RESULTS_FILE).read_text())
        results["base"] = combined.get("base")
        write_json(run_dir / RESULTS_FILE, results)
        return results
    return combined


def safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
