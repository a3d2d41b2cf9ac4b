"""Re-evaluate a finished run, and export one task of it as a standard peft LoRA adapter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import peft

from asymlora.config import RunConfig, load_config
from asymlora.recipes.multitask import (
    CONFIG_FILE,
    RESULTS_FILE,
    evaluate,
    load_tasks_for,
    primary_metrics,
    write_json,
)


def _run_config(run_dir: Path) -> RunConfig:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{run_dir} is not an asymlora run directory (no {CONFIG_FILE}); train one first"
        )
    return load_config(path)


def method_dirs(run_dir: Path, cfg: RunConfig) -> dict[str, Path]:
    """Method -> directory holding its ``adapter/`` (the run dir itself for a single-method run)."""
    if cfg.compare.methods:
        return {m: run_dir / m for m in cfg.compare.methods}
    return {cfg.adapter.method: run_dir}


def evaluate_run(run_dir: Path) -> dict[str, Any]:
    """Score every trained method of a run again on its test splits; rewrites their results.json."""
    from asymlora.eval import format_table, summarize
    from asymlora.models import load

    cfg = _run_config(run_dir)
    tasks = load_tasks_for(cfg)
    primary = primary_metrics(tasks)
    model, tokenizer = load(cfg.model.name, device=cfg.model.device)
    rows: dict[str, Any] = {}
    for method, directory in method_dirs(run_dir, cfg).items():
        adapter = directory / "adapter"
        if not (adapter / "adapter_config.json").is_file():
            raise FileNotFoundError(
                f"{adapter} holds no adapter: the {method} run did not finish; resume it first"
            )
        pm = peft.PeftModel.from_pretrained(model, str(adapter))
        routed = pm.peft_config["default"].router == "task" and method != "lora"
        per_task = evaluate(pm, tokenizer, tasks, cfg, task_routed=routed, label=method)
        results_path = directory / RESULTS_FILE
        results = json.loads(results_path.read_text()) if results_path.is_file() else {"method": method}
        results.update(per_task=per_task, **summarize(per_task, primary, cfg.baselines))
        write_json(results_path, results)
        rows[method] = per_task
        model = pm.unload()
    print(format_table(rows, primary, [t.name for t in tasks], cfg.baselines))
    return rows


def export_run_task(
    run_dir: Path, task: str, out: Path, *, method: str | None = None, overwrite: bool = False
) -> Path:
    """Export task ``task`` (name or index) of a task-routed run as a stock peft LoRA adapter."""
    from asymlora.export import export_task_adapter
    from asymlora.models import load

    cfg = _run_config(run_dir)
    dirs = method_dirs(run_dir, cfg)
    if method is None:
        if len(dirs) > 1:
            raise ValueError(f"{run_dir} holds several methods {list(dirs)}; choose one with --method")
        method = next(iter(dirs))
    if method not in dirs:
        raise ValueError(f"method {method!r} is not in {run_dir}; it holds {list(dirs)}")
    adapter = dirs[method] / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter} holds no adapter; finish (or resume) the run first")
    model, _ = load(cfg.model.name, device="cpu")
    pm = peft.PeftModel.from_pretrained(model, str(adapter))
    key: int | str = int(task) if task.isdigit() else task
    return export_task_adapter(pm, key, out, overwrite=overwrite)
