"""Run every benchmark in one command, print every figure with its ratio, write the JSON and the docs.

    python benchmarks/run_all.py                     # full: benchmarks/results/*.json, docs/performance.md, docs/scaling.png
    python benchmarks/run_all.py --all-projections   # + the training step with all seven projections
    python benchmarks/run_all.py --smoke --out-dir /tmp/perf   # seconds-long smoke (CI)
    python benchmarks/run_all.py --device cuda --dtype bfloat16

Benchmarks run in this process, one after the other (never two at once): ``layers.py`` (layer level),
``train_step.py`` (whole-model step, with a torch.profiler comparison of ALoRA and peft LoRA),
``train_precision.py`` (the campaign's step: target-position logits and bf16 autocast against float32),
``inference.py`` (merged / unmerged / base generation), ``scaling.py`` (N and r sweeps, the PNG) and
``federated.py`` (Flower's per-round overhead against local training, bytes per round per strategy) and
``scoring.py`` (choice-task scoring: the options on the prompt's KV cache vs one pass per option). Each
result is written to ``<results>/<name>.json``, the run's own record to ``<results>/run_all.json``, and the
page is rendered from that folder by ``report.py`` (``serving.json``, from ``serving.py``, is kept there and
rendered too). A full run writes benchmarks/results/ and docs/; ``--smoke`` or ``--only`` write only with
``--out-dir`` (the JSON and the page both go there).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

try:  # imported as the package `benchmarks` (the tests, `python -m benchmarks.run_all`)
    from benchmarks import (
        federated,
        inference,
        layers,
        report,
        scaling,
        scoring,
        tables,
        train_precision,
        train_step,
    )
    from benchmarks.common import (
        RESULTS,
        ROOT,
        check_device,
        machine,
        positive_int,
        run_record,
        start_clock,
        utc_now,
    )
except ImportError:  # run as a script: Python puts this folder first on sys.path
    import federated
    import inference
    import layers
    import report
    import scaling
    import scoring
    import tables
    import train_precision
    import train_step
    from common import RESULTS, ROOT, check_device, machine, positive_int, run_record, start_clock, utc_now

from asymlora.io import atomic_write_text

BENCHMARKS = ("layers", "train_step", "train_precision", "inference", "scaling", "federated", "scoring")
Main = Callable[[list[str]], dict[str, Any]]


def run(name: str, fn: Main, argv: list[str], command: str | None = None) -> dict[str, Any]:
    """Run one benchmark's ``main(argv)``; record its command line, wall and CPU seconds, load average.

    A benchmark that raises (or exits: a config it cannot read) is reported (``_failed``) and the run goes on."""
    command = command or " ".join(["python", f"benchmarks/{name}.py", *argv])
    print(f"\n=== {command}", flush=True)
    start = start_clock()
    try:
        result = fn(argv)
    except (Exception, SystemExit) as e:  # one broken benchmark must not hide the others' figures
        traceback.print_exc()
        result = {"_failed": f"{type(e).__name__}: {e}"[:500]}
    result["_run"] = run_record(command, start)
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="every benchmark with --smoke (seconds)")
    parser.add_argument("--out-dir", default=None, help="where the JSON, performance.md and scaling.png go")
    parser.add_argument(
        "--all-projections", action="store_true", help="also the step with all seven projections"
    )
    parser.add_argument("--device", default=None, choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="torch CPU threads for every benchmark (default: torch's, one per core); on a machine "
        "oversubscribed by other jobs, 1 avoids OpenMP threads waiting for each other",
    )
    parser.add_argument(
        "--only",
        default=None,
        help=f"comma-separated subset of {','.join(BENCHMARKS)} (written only with --out-dir)",
    )
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_device(parser, args)
    args.only = args.only.split(",") if args.only else list(BENCHMARKS)
    if set(args.only) - set(BENCHMARKS):
        parser.error(f"--only: unknown {sorted(set(args.only) - set(BENCHMARKS))}; choose from {BENCHMARKS}")
    if args.threads:
        torch.set_num_threads(args.threads)  # every benchmark runs in this process
    return args


def out_dirs(args: argparse.Namespace) -> tuple[Path, Path] | None:
    """(results folder, page folder), or None when nothing is written (a smoke or a subset, no --out-dir)."""
    if args.out_dir:
        return Path(args.out_dir), Path(args.out_dir)
    if args.smoke or len(args.only) < len(BENCHMARKS):
        return None
    return RESULTS, ROOT / "docs"


def run_benchmarks(args: argparse.Namespace, plot: Path | None) -> dict[str, dict[str, Any]]:
    """Every selected benchmark, in the page's order, by result name (``train_step_all`` included)."""
    rest = (["--smoke"] if args.smoke else []) + (["--threads", str(args.threads)] if args.threads else [])
    common = ["--device", args.device, "--dtype", args.dtype, *rest]
    found: dict[str, dict[str, Any]] = {}
    if "layers" in args.only:
        found["layers"] = run("layers", layers.main, common)
    if "train_step" in args.only:
        found["train_step"] = run("train_step", train_step.main, [*common, "--profile"])
        if args.all_projections:
            found["train_step_all"] = run("train_step", train_step.main, [*common, "--all-projections"])
    if "train_precision" in args.only:  # float32 and bf16 autocast are its variants: no --dtype
        argv = ["--device", args.device, *rest]
        found["train_precision"] = run("train_precision", train_precision.main, argv)
    if "inference" in args.only:
        found["inference"] = run("inference", inference.main, common)
    if "scaling" in args.only:
        shown = ["--plot", os.path.relpath(plot, ROOT)] if plot else []
        command = " ".join(["python benchmarks/scaling.py", *common, *shown])
        found["scaling"] = run(
            "scaling", scaling.main, [*common, *(["--plot", str(plot)] if plot else [])], command
        )
    if "federated" in args.only:
        argv = (["--smoke"] if args.smoke else []) + ["--device", "cuda" if args.device == "cuda" else "cpu"]
        found["federated"] = run(
            "federated", federated.main, argv + (["--threads", str(args.threads)] if args.threads else [])
        )
    if "scoring" in args.only:
        found["scoring"] = run("scoring", scoring.main, common)
    return found


def run_summary(
    argv: list[str] | None, args: argparse.Namespace, found: dict[str, Any], start: tuple
) -> dict[str, Any]:
    """``run_all.json``: the run's command, date, wall and CPU time, load range, machine, arguments, failures."""
    loads = [v for r in found.values() for v in r["_run"]["load_avg_1min"]]
    record = run_record("", start)
    return {
        "benchmark": "run_all",
        "command": "python benchmarks/run_all.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": utc_now(),
        "wall_s": record["wall_s"],
        "cpu_s": record["cpu_s"],
        "load_avg_1min": [min(loads), max(loads)] if loads else None,
        "machine": machine(),
        "args": {"device": args.device, "dtype": args.dtype, "smoke": args.smoke, "threads": args.threads},
        "failed": {
            k: {"error": r["_failed"], "command": r["_run"]["command"]}
            for k, r in found.items()
            if "_failed" in r
        },
    }


def print_figures(res: dict[str, Any]) -> None:
    """Every figure with a target, and the whole-model ratios, as one line each."""
    print("\n=== every figure, with its ratio")
    for row in tables.target_rows(res):
        print(f"{row['figure']:<58}{tables.fmt_ratio(row['measured']):>10}  target {row['target']:<10} "
              f"{tables.status(row['met'])}")  # fmt: skip
    for n, r in (res.get("train_step") or {}).get("ratios", {}).items():
        print(f"whole-model step {n:<12} time {tables.fmt_ratio(r['step_time'])} cpu {tables.fmt_ratio(r['cpu_time'])} "
              f"peak {tables.fmt_ratio(r.get('peak_memory'))} training state {tables.fmt_ratio(r['training_state'])} "
              "vs peft LoRA")  # fmt: skip
    for n, r in (res.get("train_precision") or {}).get("ratios", {}).items():
        print(f"campaign step {n:<16} time {tables.fmt_ratio(r['step_time'])} cpu {tables.fmt_ratio(r['cpu_time'])} "
              "vs float32 full logits")  # fmt: skip
    for key, failure in res["run_all"]["failed"].items():
        print(f"FAILED {key}: {failure['error']} ({failure['command']})")
    print(f"total: {res['run_all']['wall_s'] / 60:.1f} min wall, {res['run_all']['cpu_s'] / 60:.1f} CPU-min")


def write_results(res: dict[str, Any], results: Path, page: Path, plot: Path | None) -> None:
    """Each result of ``res`` as ``results/<name>.json``, then the page rendered from them. A failed
    benchmark's file from an earlier run is removed (the page lists the failure instead of showing the
    earlier run's figures under this run's date and machine), and so is the seven-projection step's when
    the step ran without ``--all-projections``."""
    results.mkdir(parents=True, exist_ok=True)
    for name, result in res.items():
        atomic_write_text(results / f"{name}.json", json.dumps(result, indent=1, default=str) + "\n")
    stale = set(res["run_all"]["failed"])
    if "train_step" in res or "train_step" in stale:  # the step ran: so is the seven-projection one, or none
        stale |= {"train_step_all"} - set(res)
    for name in sorted(stale):
        (results / f"{name}.json").unlink(missing_ok=True)
    if (
        results != RESULTS
        and (RESULTS / "serving.json").is_file()
        and not (results / "serving.json").exists()
    ):
        shutil.copyfile(RESULTS / "serving.json", results / "serving.json")  # §6 comes from serving.py
    page.mkdir(parents=True, exist_ok=True)
    shown = "scaling.png" if plot and "scaling" in res else None
    atomic_write_text(page / "performance.md", report.render_page(results, plot=shown))
    print(f"wrote {results}/*.json and {page / 'performance.md'}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmarks; returns every result by name and ``run_all`` (the run's record)."""
    args = parse_args(argv)
    start = start_clock()
    dirs = out_dirs(args)
    plot = dirs[1] / "scaling.png" if dirs else None
    found = run_benchmarks(args, plot)
    ok = {name: result for name, result in found.items() if "_failed" not in result}
    res: dict[str, Any] = {**ok, "run_all": run_summary(argv, args, found, start)}
    print_figures(res)
    if dirs is not None:
        write_results(res, *dirs, plot)
    targets = [{k: v for k, v in row.items()} for row in tables.target_rows(res)]
    summary = {"benchmark": "run_all", "wall_s": res["run_all"]["wall_s"], "targets": targets,
               "failed": res["run_all"]["failed"]}  # fmt: skip
    print(json.dumps(summary, default=str))
    return res


if __name__ == "__main__":
    raise SystemExit(1 if main()["run_all"]["failed"] else 0)  # a failed benchmark fails the command
