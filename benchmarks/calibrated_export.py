"""Score calibrated exports of a soft/topk-routed run against the routed adapters (docs/serving.md).

For every method of RUN_DIR and every task: export the task as a stock peft LoRA adapter with the task's
training examples as calibration data (`asymlora.export_task_adapter(..., calibration=task)`), load it with
plain peft and score it on the task's test split with the project's evaluation code, beside the routed
adapter's score from the run's own results.json (same test split, same evaluation settings).

    python benchmarks/calibrated_export.py runs/demo_soft --out runs/demo_soft/exports \
        [--methods alora] [--rank molora=8] [--calibration-examples 32]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import peft

import asymlora
from asymlora.eval import evaluate_task, primary_metric
from asymlora.io import atomic_write_text
from asymlora.models import load
from asymlora.recipes.evaluate import _run_config, method_dirs
from asymlora.recipes.multitask import CONFIG_FILE, RESULTS_FILE, load_tasks_for, safe_name

try:  # imported as the package `benchmarks`
    from benchmarks.common import positive_int
except ImportError:  # run as a script: Python puts this folder first on sys.path
    from common import positive_int


def measure(
    run_dir: Path,
    out: Path,
    ranks: dict[str, int],
    methods: list[str] | None,
    examples: int | None,
    ranked_only: bool = False,
) -> list[dict]:
    """One row per (method[, rank], task): routed score, export score, fidelity, seconds. ``examples``:
    calibrate on the first that many training examples of each task (None: all)."""
    cfg = _run_config(run_dir)
    tasks = load_tasks_for(cfg)
    model, tokenizer = load(cfg.model.name, device="cpu")
    rows = []
    for method, directory in method_dirs(run_dir, cfg).items():
        if methods and method not in methods:
            continue
        routed = json.loads((directory / RESULTS_FILE).read_text())["per_task"]
        for rank in ([] if ranked_only else [None]) + ([ranks[method]] if method in ranks else []):
            label = method if rank is None else f"{method} (rank {rank})"
            for task in tasks:
                target = out / f"{method}-r{rank or 'full'}" / safe_name(task.name)
                t0 = time.perf_counter()
                pm = peft.PeftModel.from_pretrained(model, str(directory / "adapter"))
                calibration = task.train[:examples] if examples else task.train
                asymlora.export_task_adapter(pm, task.name, target, calibration=calibration, tokenizer=tokenizer,
                                             rank=rank, overwrite=True)  # fmt: skip
                model = pm.unload()
                export_s = time.perf_counter() - t0
                report = json.loads((target / "calibration.json").read_text())
                lm = peft.PeftModel.from_pretrained(model, str(target))
                scores = evaluate_task(lm, tokenizer, task, task_id=None, batch_size=cfg.eval.batch_size,
                                       max_new_tokens=cfg.eval.max_new_tokens, max_examples=cfg.eval.max_examples)  # fmt: skip
                model = lm.unload()
                metric = primary_metric(task)
                row = {
                    "method": label,
                    "task": task.name,
                    "metric": metric,
                    "n": int(scores["n"]),
                    "routed": routed[task.name][metric],
                    "export": scores[metric],
                    "rank": report["rank"],
                    "output_error": report["fidelity"]["output"],
                    "layer_error": report["fidelity"]["pooled_layers"],
                    "discarded_energy": report["discarded_energy"]["mean"],
                    "calibration_tokens": report["calibration"]["tokens"],
                    "export_seconds": round(export_s, 1),
                }
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    """Markdown table of the rows, with the mean score per method (discarded energy: mean over layers)."""
    lines = [
        "| method | task | metric | routed | export | export rank | logit error | layer error | discarded energy |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        energy = "—" if r["discarded_energy"] is None else f"{r['discarded_energy']:.3f}"
        lines.append(
            f"| {r['method']} | {r['task']} | {r['metric']} | {r['routed']:.3f} | {r['export']:.3f} | "
            f"{r['rank']} | {r['output_error']:.3f} | {r['layer_error']:.3f} | {energy} |"
        )
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        routed = sum(r["routed"] for r in mine) / len(mine)
        export = sum(r["export"] for r in mine) / len(mine)
        lines.append(f"| {method} | **average** | | **{routed:.3f}** | **{export:.3f}** | | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, required=True, help="where the exported adapters and rows go")
    p.add_argument("--rank", action="append", default=[], help="METHOD=K: also export METHOD at rank K")
    p.add_argument("--methods", nargs="*", help="only these methods of the run (default: all)")
    p.add_argument("--ranked-only", action="store_true", help="only the --rank exports (not the full rank)")
    p.add_argument(
        "--calibration-examples", type=positive_int, help="first N training examples per task (default: all)"
    )
    args = p.parse_args(argv)
    try:
        ranks = {m: positive_int(k) for m, k in (item.split("=", 1) for item in args.rank)}
    except (ValueError, argparse.ArgumentTypeError):
        p.error(f"--rank takes METHOD=K with K an integer >= 1 (e.g. molora=8), got {args.rank}")
    if not (args.run_dir / CONFIG_FILE).is_file():
        p.error(f"{args.run_dir} is not an asymlora run directory (no {CONFIG_FILE}); train one first")
    rows = measure(args.run_dir, args.out, ranks, args.methods, args.calibration_examples, args.ranked_only)
    atomic_write_text(args.out / "rows.json", json.dumps(rows, indent=2) + "\n")
    text = table(rows)
    atomic_write_text(args.out / "table.md", text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
