"""What every benchmark shares: the command-line options (device, dtype, threads, smoke, save), the
timing helpers, the per-run record (command, wall and CPU seconds, load average) and the JSON output.

Each ``benchmarks/<name>.py`` builds its parser with `benchmark_parser`, adds its own options, and ends with
`finish` (prints the one JSON line, writes ``--save`` atomically). ``run_all.py`` runs them in one process
and keeps each result as ``benchmarks/results/<name>.json``; ``report.py`` renders docs/performance.md
from those files.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import peft
import torch
import transformers

from asymlora.io import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
"""The committed JSON results docs/performance.md is rendered from (``report.py``)."""
MiB = 1024**2
DTYPES = ("float32", "bfloat16", "float16")


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1 (a count, a size, a number of repetitions)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def positive_ints(text: str) -> list[int]:
    """argparse type: comma-separated integers of at least 1 (``1,4``)."""
    return [positive_int(v) for v in text.split(",")]


def check_device(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--device cuda`` without a CUDA device: the parser's error (exit 2), not a traceback mid-run."""
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device on this machine; run with --device cpu")


def benchmark_parser(
    doc: str | None, smoke_help: str, *, dtype: bool = True, threads_help: str | None = None
) -> argparse.ArgumentParser:
    """A parser with the options every benchmark takes: ``--device``, ``--dtype`` (unless ``dtype=False``),
    ``--threads``, ``--smoke`` (``smoke_help`` says what it shrinks) and ``--save`` (the JSON result to this
    file, e.g. ``benchmarks/results/<name>.json``, the folder docs/performance.md is rendered from)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"]
    )
    if dtype:
        parser.add_argument("--dtype", default="float32", choices=DTYPES)
    threads_help = threads_help or "torch CPU threads (default: torch's, one per core)"
    parser.add_argument("--threads", type=positive_int, default=None, help=threads_help)
    parser.add_argument("--smoke", action="store_true", help=smoke_help)
    parser.add_argument("--save", default=None, help="also write the JSON result to this file")
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser.parse_args(argv)`` (a ``--device cuda`` without CUDA is an error, exit 2), then the torch
    thread count of ``--threads`` (when given)."""
    args = parser.parse_args(argv)
    check_device(parser, args)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def finish(result: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Print ``result`` as one JSON line and, with ``--save``, write it there (atomically, indented)."""
    print(json.dumps(result, default=str))
    if getattr(args, "save", None):
        atomic_write_text(args.save, json.dumps(result, indent=1, default=str) + "\n")
    return result


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA is asynchronous), so wall-clock times are the work's."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], torch.Tensor], device: torch.device) -> float:
    """Seconds of ``fn()`` forward + backward (through the sum of its output, in float32)."""
    sync(device)
    t0 = time.perf_counter()
    fn().float().sum().backward()
    sync(device)
    return time.perf_counter() - t0


def spread(times: list[float]) -> float:
    """(max − min) / median of one variant's own repetitions (0 for a single one)."""
    return (max(times) - min(times)) / statistics.median(times) if len(times) > 1 else 0.0


def layer_shape(args: argparse.Namespace) -> dict[str, Any]:
    """The layer shape a layer-level benchmark records (layers.py, scaling.py): the same keys in both."""
    return {k: getattr(args, k) for k in ("dim", "tokens", "r", "experts", "reps")}


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (user + system)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def utc_now() -> str:
    """The time now, as the reports print it (``2026-11-30 09:01 UTC``)."""
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def run_record(command: str, start: tuple[float, float, float]) -> dict[str, Any]:
    """The ``_run`` record of one benchmark: its command, wall and CPU seconds since ``start`` (as returned
    by `start_clock`), the 1-minute load average at its start and end."""
    load0, t0, c0 = start
    return {
        "command": command,
        "wall_s": round(time.perf_counter() - t0, 1),
        "cpu_s": round(cpu_seconds() - c0, 1),
        "load_avg_1min": [round(load0, 2), round(os.getloadavg()[0], 2)],
    }


def start_clock() -> tuple[float, float, float]:
    """(1-minute load average, wall clock, CPU seconds) now: the start of a `run_record`."""
    return os.getloadavg()[0], time.perf_counter(), cpu_seconds()


def _proc_field(path: str, key: str) -> str | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def machine() -> dict[str, Any]:
    """CPU, cores, memory, GPU, library versions and commit of this run."""
    mem = _proc_field("/proc/meminfo", "MemTotal")
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "?"
    return {
        "cpu": _proc_field("/proc/cpuinfo", "model name") or platform.processor() or "?",
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(int(mem.split()[0]) / 1024**2, 1) if mem else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "commit": commit,
    }
