"""Re-evaluate a finished run, compare two runs with paired tests, export one task as a peft LoRA adapter."""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import peft

from asymlora import distributed
from asymlora.config import RunConfig, load_config
from asymlora.eval import format_table, metric_notes, summarize
from asymlora.eval.stats import (
    PERMUTATION_NOTE,
    ExampleMismatchError,
    compare_examples,
    format_interval,
    with_example_scores,
)
from asymlora.export import export_task_adapter
from asymlora.io import check_out_dir, check_target_dir
from asymlora.methods import get_method
from asymlora.models import load
from asymlora.recipes.multitask import (
    CONFIG_FILE,
    PER_EXAMPLE_FILE,
    RESULTS_FILE,
    evaluate,
    example_scores,
    intervals_of,
    load_tasks_for,
    primary_metrics,
    read_examples,
    safe_name,
    write_json,
)
from asymlora.tuner.config import AsymLoraConfig


def _run_config(run_dir: Path) -> RunConfig:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{run_dir} is not an asymlora run directory (no {CONFIG_FILE}); train one first"
        )
    return load_config(path)


def single_task_baselines(
    run_dir: Path, cfg: RunConfig, primary: dict[str, str]
) -> tuple[dict[str, float] | None, dict[str, list[float]] | None]:
    """The Δm% baselines of a run: its saved single-task LoRA scores (``compare.single_task``, from
    ``run_dir/single/``, with their per-example scores for a paired interval), else ``cfg.baselines``."""
    if not cfg.compare.single_task:
        return cfg.baselines, None
    values: dict[str, float] = {}
    examples: dict[str, list[float]] = {}
    for task, metric in primary.items():
        out = run_dir / "single" / safe_name(task)
        if not (out / RESULTS_FILE).is_file():
            raise FileNotFoundError(
                f"{out} has no {RESULTS_FILE}: the single-task run of {task!r} did not finish"
            )
        values[task] = json.loads((out / RESULTS_FILE).read_text())["per_task"][task][metric]
        if (scores := example_scores(out / PER_EXAMPLE_FILE, task, metric)) is not None:
            examples[task] = scores
    return values, examples or None


def method_dirs(run_dir: Path, cfg: RunConfig) -> dict[str, Path]:
    """Method -> directory holding its ``adapter/`` (the run dir itself for a single-method run)."""
    if cfg.compare.methods:
        return {m: run_dir / m for m in cfg.compare.methods}
    return {cfg.adapter.method: run_dir}


def evaluate_run(run_dir: Path) -> dict[str, Any]:
    """Score every trained method of a run again on its test splits; rewrites their results.json."""
    cfg = _run_config(run_dir)
    distributed.init(cfg.model.device)  # under torchrun the test sets are split across the processes
    tasks = load_tasks_for(cfg)
    primary, notes = primary_metrics(tasks), metric_notes(tasks)
    baselines, baseline_examples = single_task_baselines(run_dir, cfg, primary)
    model, tokenizer = load(cfg.model.name, device=distributed.process_device(cfg.model.device))
    rows: dict[str, Any] = {}
    intervals: dict[str, Any] = {}
    for method, directory in method_dirs(run_dir, cfg).items():
        adapter = directory / "adapter"
        if not (adapter / "adapter_config.json").is_file():
            raise FileNotFoundError(
                f"{adapter} holds no adapter: the {method} run did not finish; resume it first"
            )
        pm = peft.PeftModel.from_pretrained(model, str(adapter))
        routed = _peft_config(pm).router == "task" and method != "lora"
        examples_path = directory / PER_EXAMPLE_FILE
        per_task = evaluate(
            pm, tokenizer, tasks, cfg, task_routed=routed, examples_path=examples_path, label=method
        )
        results_path = directory / RESULTS_FILE
        results = json.loads(results_path.read_text()) if results_path.is_file() else {"method": method}
        results.update(per_task=per_task, **summarize(per_task, primary, baselines, metric_notes=notes))
        results["intervals"] = intervals[method] = intervals_of(
            examples_path, tasks, baseline_examples or baselines
        )
        write_json(results_path, results)
        rows[method] = per_task
        model = pm.unload()
    table = format_table(
        rows, primary, [t.name for t in tasks], baselines, metric_notes=notes, intervals=intervals
    )
    if distributed.is_main():
        print(table)
    return rows


def run_adapter(run_dir: Path, method: str | None, cfg: RunConfig | None = None) -> tuple[str, Path]:
    """(method, adapter directory) of a finished run; ``method`` may be None when the run holds one.

    Raises:
        ValueError: several methods and none chosen, or an unknown method (both name the run's methods).
        FileNotFoundError: not a run directory, or the method's adapter is not written yet.
    """
    dirs = method_dirs(run_dir, cfg if cfg is not None else _run_config(run_dir))
    if method is None:
        if len(dirs) > 1:
            raise ValueError(f"{run_dir} holds several methods {list(dirs)}; choose one with --method")
        method = next(iter(dirs))
    if method not in dirs:
        raise ValueError(f"method {method!r} is not in {run_dir}; it holds {list(dirs)}")
    adapter = dirs[method] / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter} holds no adapter; finish (or resume) the run first")
    return method, adapter


def read_adapter_config(adapter: Path) -> peft.PeftConfig:
    """peft's config of the adapter directory ``adapter``, after checking its two files are whole.

    Raises:
        ValueError: ``adapter_config.json`` is not a JSON object naming a peft type (a save or copy cut short
            left it truncated: peft raised a bare JSONDecodeError, KeyError or TypeError).
        FileNotFoundError: no weights file beside it (peft then looked the directory up as a hub repo id).
    """
    path = adapter / "adapter_config.json"
    try:
        raw = json.loads(path.read_bytes())
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path} is not valid JSON ({e}); save or copy the adapter again") from None
    kind = raw.get("peft_type") if isinstance(raw, dict) else None
    if kind not in peft.PEFT_TYPE_TO_CONFIG_MAPPING:
        raise ValueError(
            f"{path} names no adapter type peft knows (peft_type={kind!r}); save the adapter again"
        )
    if not any((adapter / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
        raise FileNotFoundError(
            f"{adapter} has adapter_config.json but no adapter_model.safetensors: the adapter was not completely "
            "written (an interrupted save or copy); save or copy it again"
        )
    return peft.PeftConfig.from_pretrained(str(adapter))


def export_run_task(
    run_dir: Path,
    task: str,
    out: Path,
    *,
    method: str | None = None,
    overwrite: bool = False,
    calibration: str | None = None,
    rank: int | None = None,
) -> Path:
    """Export task ``task`` (name or index) of a run as a stock peft LoRA adapter: exact for a task-routed
    run; for a soft/topk-routed one ``calibration`` (``"train"`` or ``"test"``) names the split of the
    run's data for that task over which each layer's gate is averaged (`asymlora.calibration`), and ``rank``
    truncates that export. Every refusal (and ``out`` not writable) is raised before the model is loaded."""
    if calibration is not None and calibration not in ("train", "test"):
        raise ValueError(f"--calibration {calibration!r} is not a split; pass --calibration train (or test)")
    cfg = _run_config(run_dir)
    method, adapter = run_adapter(run_dir, method, cfg)
    peft_cfg = read_adapter_config(adapter)
    if not isinstance(peft_cfg, AsymLoraConfig):
        raise ValueError(f"{adapter} holds a {type(peft_cfg).__name__}, not an asymlora adapter")
    routed = get_method(peft_cfg.method).uses_router and peft_cfg.router != "task"
    routing = f"router={peft_cfg.router!r}" if get_method(peft_cfg.method).uses_router else "no router"
    if routed and calibration is None:
        raise ValueError(
            f"the {method} adapter of {run_dir} uses router={peft_cfg.router!r}: exporting one LoRA averages each layer's "
            "gate over the task's examples; pass --calibration train (the task's training split) and "
            "optionally --rank K"
        )
    if not routed and rank is not None:
        raise ValueError(
            f"--rank {rank} truncates the calibrated export of a soft/topk-routed run, but the {method} adapter "
            f"of {run_dir} ({routing}) exports exactly at its rank {peft_cfg.r}: drop --rank"
        )
    if rank is not None and rank < 1:  # the upper bound (the averaged update's rank) needs the weights
        raise ValueError(f"--rank {rank} is out of range: give a rank >= 1 (at most the export's rank)")
    # a task name first: a run's tasks may be named by digits (served under those names), then an index
    key: int | str = int(task) if task.isdigit() and task not in (peft_cfg.task_names or []) else task
    if not routed and peft_cfg.experts == 1 and key != 0:
        raise ValueError(
            f"the {method} adapter of {run_dir} is one set of weights that all its tasks share (no per-task "
            f"expert): pass --task 0 to export it (the same adapter for every task)"
        )
    check_out_dir(check_target_dir(out, overwrite))
    if adapter.resolve().is_relative_to(out.resolve()):  # --overwrite would replace the trained adapter
        raise ValueError(
            f"--out {out} holds the adapter being exported ({adapter}); writing there would delete it: give a "
            f"new directory, e.g. {run_dir / 'exports' / str(task)}"
        )
    if routed:
        return _export_calibrated_run_task(run_dir, cfg, adapter, task, out, overwrite, calibration, rank)
    if calibration is not None:
        warnings.warn(
            f"--calibration {calibration} is not used: the {method} adapter of {run_dir} "
            f"({routing}) is exported exactly",
            stacklevel=2,
        )
    model, _ = load(cfg.model.name, device="cpu")
    pm = peft.PeftModel.from_pretrained(model, str(adapter))
    return export_task_adapter(pm, key, out, overwrite=overwrite)


def _export_calibrated_run_task(
    run_dir: Path, cfg: RunConfig, adapter: Path, task: str, out: Path, overwrite: bool, split: str | None,
    rank: int | None,
) -> Path:  # fmt: skip
    """`export_run_task` of a soft/topk-routed run (its config ``cfg``, adapter directory ``adapter``),
    calibrated on split ``split`` of task ``task``."""
    tasks = load_tasks_for(cfg)
    names = [t.name for t in tasks]
    index = names.index(task) if task in names else int(task) if task.isdigit() else -1
    if not 0 <= index < len(names):
        raise ValueError(f"unknown task {task!r}; the tasks of {run_dir} are {names} (or their index)")
    model, tokenizer = load(cfg.model.name, device="cpu")
    pm = peft.PeftModel.from_pretrained(model, str(adapter))
    examples = getattr(tasks[index], split or "train")
    return export_task_adapter(pm, names[index], out, overwrite=overwrite, calibration=examples,
                               tokenizer=tokenizer, rank=rank)  # fmt: skip


def _peft_config(pm: peft.PeftModel) -> AsymLoraConfig:
    """The asymlora config of a loaded adapter (TypeError for another peft type: not an asymlora run)."""
    cfg = pm.peft_config["default"]
    if not isinstance(cfg, AsymLoraConfig):
        raise TypeError(f"the adapter holds a {type(cfg).__name__}, not an asymlora adapter")
    return cfg


def _scored_run(path: Path) -> tuple[dict[str, Sequence[Mapping[str, Any]]], dict[str, str]]:
    """(per-example rows per task that has per-example scores of its primary metric, primary metric of every
    task) of a run (or method) directory; a task scored by a corpus-level metric (BLEU) is in the second only."""
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory; give a run directory (or run_dir/<method>)")
    if not (path / PER_EXAMPLE_FILE).is_file() and (path / CONFIG_FILE).is_file():
        methods = load_config(path / CONFIG_FILE).compare.methods
        if methods:
            raise ValueError(
                f"{path} holds several methods {methods}; compare one of them, e.g. {path / methods[0]}"
            )
    examples = read_examples(path / PER_EXAMPLE_FILE)
    results_path = path / RESULTS_FILE
    saved = json.loads(results_path.read_text()).get("primary", {}) if results_path.is_file() else {}
    primary = {
        task: saved.get(task) or ("accuracy" if "accuracy" in rows[0]["scores"] else "exact_match")
        for task, rows in examples.items()
    }
    return dict(with_example_scores(examples, primary)), primary


def left_out(
    scored_a: Mapping[str, Any],
    primary_a: Mapping[str, str],
    scored_b: Mapping[str, Any],
    primary_b: Mapping[str, str],
) -> dict[str, str]:
    """``{task: why it has no paired test}`` over the tasks of run A then run B: only in one run, scored by
    different metrics in A and B, or scored by a corpus-level metric (BLEU) with no per-example scores to pair."""
    reasons: dict[str, str] = {}
    for task in [*primary_a, *(t for t in primary_b if t not in primary_a)]:
        if task not in primary_b or task not in primary_a:
            reasons[task] = f"only in run {'A' if task in primary_a else 'B'}"
        elif primary_a[task] != primary_b[task]:
            reasons[task] = (
                f"scored by different metrics in A and B: {primary_a[task]} in A, {primary_b[task]} in B"
            )
        elif task not in scored_a or task not in scored_b:
            reasons[task] = f"{primary_a[task]} is a corpus-level score: no per-example scores to pair"
    return reasons


def compare_runs(run_a: Path, run_b: Path) -> tuple[dict[str, Any], str]:
    """Paired tests of run A against run B on their shared tasks and on the average over those tasks.

    Both runs must have been scored on the same test examples (``per_example.jsonl``, written by
    training and by ``asymlora eval``). A task without a paired test (`left_out`: in one run only, scored by
    different metrics, or by a corpus-level metric such as BLEU) is named under the table with the reason.

    Returns:
        (``{task | "average": paired test}`` as in :func:`asymlora.eval.stats.compare_examples`,
        a markdown table).

    Raises:
        FileNotFoundError: a run without per-example scores (the message says how to produce them).
        ExampleMismatchError: no task has a paired test (the message gives each task's reason), or a task was
            scored on other examples.
    """
    examples_a, primary_a = _scored_run(run_a)
    examples_b, primary_b = _scored_run(run_b)
    reasons = left_out(examples_a, primary_a, examples_b, primary_b)
    examples_a = {t: rows for t, rows in examples_a.items() if t not in reasons}
    examples_b = {t: rows for t, rows in examples_b.items() if t not in reasons}
    if not examples_a:
        raise ExampleMismatchError(
            f"no task of {run_a} and {run_b} has a paired test: "
            + "; ".join(f"{task}: {why}" for task, why in reasons.items())
        )
    tests = compare_examples(examples_a, examples_b, primary_a)
    mean = {
        label: {t: sum(r["scores"][primary_a[t]] for r in rows) / len(rows) for t, rows in ex.items()}
        for label, ex in (("a", examples_a), ("b", examples_b))
    }
    lines = [
        f"A = {run_a}, B = {run_b}",
        "",
        "| task | metric | n | A | B | A − B [95 % CI] | p | p (Holm) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for task, test in tests.items():
        if task == "average":
            a = sum(mean["a"][t] for t in tests if t != task) / (len(tests) - 1)
            b = sum(mean["b"][t] for t in tests if t != task) / (len(tests) - 1)
        else:
            a, b = mean["a"][task], mean["b"][task]
        diff = format_interval(test["difference"], test["low"], test["high"])
        holm = f"{test['p_holm']:.4f}" if "p_holm" in test else "–"
        lines.append(
            f"| {task} | {test['metric']} | {test['n']} | {a:.3f} | {b:.3f} | {diff} | {test['p_value']:.4f} | {holm} |"
        )
    if reasons:
        lines += ["", "Left out of the paired tests (and of the average):"]
        lines += [f"- {task}: {why}" for task, why in reasons.items()]
    lines += [
        "",
        f"p: two-sided paired permutation test (sign flips of A − B per example; {PERMUTATION_NOTE}); "
        "interval: paired bootstrap over examples (stratified by task for the average, each task weighted 1/T). "
        "p (Holm): a task's p adjusted by Holm's procedure over the tasks compared (call a task different where "
        "it is below 0.05, and the chance of any false call among them is at most 5 %).",
    ]
    return tests, "\n".join(lines)
