"""The ``asymlora`` command line.

    asymlora demo                                  train + evaluate LoRA, ALoRA, HydraLoRA on BIG-bench (SmolLM2-135M)
    asymlora train CONFIG.yaml [key=value ...]     run a multi-task config (see configs/)
    asymlora eval RUN_DIR                          re-evaluate a finished run
    asymlora compare RUN_A RUN_B                   paired tests of two runs on the same test examples
    asymlora sweep SWEEP.yaml [--shard i/n] [--time-limit 2h]  run a grid of configs resumably into one ledger
    asymlora export RUN_DIR --task NAME --out DIR  one task of a run as a stock peft LoRA (--calibration train: soft/topk)
    asymlora analyze PATH [PATH ...] --out DIR     where the knowledge sits: A vs B similarity, spectra
    asymlora experiment init-similarity            the paper's Figure 1: A vs B similarity across tasks and seeds
    asymlora fed CONFIG.yaml [key=value ...]       federated fine-tuning on Flower (simulation)
    asymlora serve RUN_OR_ADAPTER [--port N]       OpenAI-compatible /v1/completions, tasks batched together

A user mistake (bad config, unknown task, missing path, ...) prints one clear line and exits with 2.
Every command takes ``--quiet``: no progress bars (download, model conversion, training, evaluation).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import socket
import sys
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import torch

from asymlora import distributed, progress
from asymlora.analysis import analyze
from asymlora.calibration import REPORT_FILE
from asymlora.config import load_config
from asymlora.io import atomic_write_text
from asymlora.recipes import multitask, sweep
from asymlora.recipes.evaluate import compare_runs, evaluate_run, export_run_task
from asymlora.recipes.init_similarity import run_init_similarity
from asymlora.train import TrainingError

# Before a command imports flwr (asymlora fed, lazily) or a tokenizer forks; nothing above imports flwr.
os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

EXIT_USER_ERROR = 2
RESUME_HINTS = {
    "train": "; resume with --resume",
    "fed": "; resume with --resume",
    "sweep": "; run the same command again: finished cells are in the ledger, a started cell resumes from its "
    "last checkpoint",
}
"""What a command interrupted by Ctrl-C says about going on (``asymlora sweep`` has no --resume flag)."""


def demo_config_path() -> Path:
    return Path(str(resources.files("asymlora") / "configs" / "demo.yaml"))


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    multitask.run(cfg, overwrite=args.overwrite, resume=args.resume)
    if distributed.is_main():  # torchrun: one line, not one per process
        print(f"results: {Path(cfg.run_dir) / 'results.json'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    overrides = [f"run_dir={args.run_dir}", *args.overrides]
    cfg = load_config(demo_config_path(), overrides)
    t0 = time.perf_counter()
    multitask.run(cfg, overwrite=True)
    print(
        f"demo finished in {time.perf_counter() - t0:.0f} s; table, results.json and results.png in {cfg.run_dir}"
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    evaluate_run(Path(args.run_dir))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    if args.json and Path(args.json).is_dir():  # checked before the tests, not after them
        raise ValueError(
            f"--json {args.json!r} is a folder; give a file name, e.g. {Path(args.json) / 'compare.json'}"
        )
    tests, table = compare_runs(Path(args.run_a), Path(args.run_b))
    print(table)
    if args.json:
        atomic_write_text(args.json, json.dumps(tests, indent=2) + "\n")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    return sweep.main(args)


def cmd_export(args: argparse.Namespace) -> int:
    out = export_run_task(
        Path(args.run_dir), args.task, Path(args.out), method=args.method, overwrite=args.overwrite,
        calibration=args.calibration, rank=args.rank,
    )  # fmt: skip
    rank = json.loads((out / "adapter_config.json").read_text())["r"]  # vLLM needs --max-lora-rank >= it
    print(f"wrote a standard peft LoRA adapter of rank {rank} to {out}")
    if (out / REPORT_FILE).is_file():  # a soft/topk run's calibrated export (a task-routed one is exact)
        print(f"an approximation of the routed adapter: its fidelity is in {out / 'README.md'}")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    analyze(args.paths, args.out, labels=args.labels, base_model=args.base_model, verbose=True)
    print(f"analysis written to {args.out}")
    return 0


def check_device(device: str | None) -> None:
    """ValueError (a user mistake) for a device string torch does not know or cannot use here."""
    if device in (None, "auto"):
        return
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ValueError(
            f"--device {device!r} is not a torch device; give cpu, auto or e.g. cuda:0"
        ) from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r}: no CUDA GPU is available to this torch; give cpu (or auto)")


def check_listen(host: str, port: int) -> None:
    """ValueError when ``host``:``port`` cannot be listened on (no such address here, or the port is taken):
    checked by binding it once, as uvicorn will, before the model loads (uvicorn itself reports it only after).
    Another process may still take the port in between; uvicorn then exits 1 with its own message."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ValueError(
            f"--host {host!r} is not an address this machine has ({e.strerror}); give e.g. 127.0.0.1"
        ) from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        # as uvicorn: a port left in TIME_WAIT by a closed server is free, one being listened on is not
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as e:
            raise ValueError(
                f"cannot listen on {host}:{port} ({e.strerror}); give another --port (or stop what holds it)"
            ) from None


def cmd_serve(args: argparse.Namespace) -> int:
    try:  # the optional [serve] extra (fastapi, uvicorn)
        from asymlora import serve
    except ModuleNotFoundError as e:
        raise ValueError(f"{e}; install the server's packages: pip install 'asymlora[serve]'") from None
    for flag, value, low in (("--port", args.port, 1), ("--max-batch-size", args.max_batch_size, 1),
                             ("--max-tokens", args.max_tokens, 1), ("--max-wait-ms", args.max_wait_ms, 0)):  # fmt: skip
        if not low <= value < math.inf or (flag == "--port" and value > 65535):  # NaN and inf fail too
            raise ValueError(
                f"{flag} {value} is out of range; give "
                + {"--port": "1..65535", "--max-wait-ms": "a finite number >= 0"}.get(flag, f">= {low}")
            )
    check_device(args.device)  # before the model is loaded
    check_listen(args.host, args.port)
    served = serve.load_served_model(
        args.path, method=args.method, base_model=args.base_model,
        served_model_name=args.served_model_name, device=args.device,
    )  # fmt: skip
    print(f"serving {sorted(served.names)} on http://{args.host}:{args.port}/v1/completions", flush=True)
    limits = dict(
        max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms, max_tokens=args.max_tokens
    )
    serve.serve(served, host=args.host, port=args.port, **limits)
    return 0


def cmd_fed(args: argparse.Namespace) -> int:
    from asymlora.federated.run import main as fed_main  # the optional [fed] extra (flwr)

    return fed_main(args)


def cmd_experiment(args: argparse.Namespace) -> int:
    run_init_similarity(args.out, args.overrides)
    return 0


QUIET_HELP = "no progress bars or per-step log lines (results and errors are still printed)"


Subparsers = argparse._SubParsersAction  # argparse's type of add_subparsers()


def _add(
    sub: Subparsers, name: str, fn: Callable[[argparse.Namespace], int], help: str, description: str
) -> argparse.ArgumentParser:
    """Subcommand ``name`` running ``fn``, with ``--quiet``."""
    p = sub.add_parser(name, help=help, description=description)
    p.set_defaults(func=fn)
    # SUPPRESS: a --quiet given before the command (asymlora --quiet COMMAND) is not reset here
    p.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help=QUIET_HELP)
    return p


def _add_train(sub: Subparsers) -> None:
    p = _add(sub, "train", cmd_train, "train and evaluate a multi-task config",
                 "Train the configured method(s) on the configured tasks, evaluate every task (and the base model), "
                 "and write results.json, results.md and results.png into run_dir.")  # fmt: skip
    p.add_argument("config", help="YAML run config (e.g. configs/multitask_bigbench.yaml)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.steps=100")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--resume", action="store_true", help="continue the run in run_dir from its last checkpoint"
    )
    mode.add_argument("--overwrite", action="store_true", help="delete what run_dir holds and start over")


def _add_demo(sub: Subparsers) -> None:
    p = _add(sub, "demo", cmd_demo, "the embedded demo: LoRA, ALoRA, HydraLoRA; SmolLM2-135M; 4 BIG-bench tasks (minutes on 2 CPU cores)",
                 "Train LoRA, ALoRA and HydraLoRA on four BIG-bench tasks of different kinds with SmolLM2-135M, "
                 "evaluate the base model and each method, print the per-task table and write it with a PNG chart.")  # fmt: skip
    p.add_argument(
        "--run-dir", default="runs/demo", help="where to write (default runs/demo; replaced if it exists)"
    )
    p.add_argument("overrides", nargs="*", help="section.key=value overrides of the demo config")


def _add_eval(sub: Subparsers) -> None:
    p = _add(sub, "eval", cmd_eval, "re-evaluate a finished run",
                 "Load the adapter(s) of RUN_DIR and score every task again; rewrites results.json and per_example.jsonl "
                 "(the per-example scores `asymlora compare` reads).")  # fmt: skip
    p.add_argument("run_dir", help="directory of a finished run (its run_dir)")


def _add_compare(sub: Subparsers) -> None:
    p = _add(sub, "compare", cmd_compare, "paired tests of two runs on the same test examples",
                 "Per task and on the average over tasks: the difference A − B of the primary metric, its 95 % paired "
                 "bootstrap interval and a paired permutation p-value. Both runs need per_example.jsonl "
                 "(written by train; `asymlora eval RUN` writes it for older runs).")  # fmt: skip
    p.add_argument("run_a", help="run directory (or run_dir/<method> of a compare run)")
    p.add_argument("run_b", help="run directory scored on the same test examples")
    p.add_argument("--json", help="also write the tests as JSON to this file")


def _add_sweep(sub: Subparsers) -> None:
    p = _add(sub, "sweep", cmd_sweep, "run a grid of configs (methods × seeds × tasks) into one results ledger",
                 "Expand the sweep file's grid into cells, train and evaluate the cells not yet in the ledger "
                 "(resuming partial ones), append one record per cell to ledger.jsonl; several processes or machines "
                 "sharing the sweep directory take disjoint cells. --report rebuilds results.md and figures from the "
                 "ledger alone.")  # fmt: skip
    p.add_argument("config", help="sweep YAML (base config, overrides, grid; see docs/sweep.md)")
    p.add_argument("--shard", help="i/n: take only cells i, i+n, i+2n, ... of the grid (0 <= i < n)")
    p.add_argument("--time-limit", help="a duration (2h30m, 90m, 1.5h, 5400s; a bare number is seconds): start no "
                   "cell after it has passed, nor one expected (from the ledger's done cells) to take longer than "
                   "the time left (a machine lent for some hours, a batch job's time limit); the cells left run "
                   "next time")  # fmt: skip
    only = p.add_mutually_exclusive_group()  # each runs nothing: given both, --list was silently dropped
    only.add_argument(
        "--report", action="store_true", help="only regenerate results.md and figures from the ledger"
    )
    only.add_argument(
        "--list", action="store_true", help="list the cells and whether each is done; run nothing"
    )
    p.add_argument(
        "--keep-going",
        action="store_true",
        help="log a failing cell to failures.jsonl and go on with the next",
    )


def _add_export(sub: Subparsers) -> None:
    p = _add(sub, "export", cmd_export, "export one task as a standard peft LoRA adapter",
                 "Write task TASK of a task-routed run (router: task) as a stock peft LoRA adapter that peft, vLLM "
                 "or any LoRA server loads without asymlora. A soft/topk-routed run needs --calibration: each layer's "
                 "gate is averaged over the task's examples (an approximation, its fidelity reported).")  # fmt: skip
    p.add_argument("run_dir", help="directory of a finished task-routed (or soft/topk) run")
    p.add_argument("--task", required=True, help="task name (as in results.json) or expert index")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--method", help="which method of a compare run (default: the only one)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--calibration", choices=["train", "test"],
                   help="soft/topk-routed runs: average each layer's gate over this split of the task's "
                   "data (an approximation; its fidelity goes into the adapter's README.md)")  # fmt: skip
    p.add_argument("--rank", type=int, help="with --calibration: truncate the export to this rank (SVD)")


def _add_analyze(sub: Subparsers) -> None:
    p = _add(sub, "analyze", cmd_analyze, "compare adapters: A vs B subspace similarity, CCA, spectra",
                 "Pair the given adapters (asymlora or plain peft LoRA; adapter or run directories) and their experts, "
                 "and write analysis.json plus PNG figures.")  # fmt: skip
    p.add_argument("paths", nargs="+", help="adapter directories or run directories")
    p.add_argument("--out", default="analysis", help="output directory (default: ./analysis)")
    p.add_argument("--labels", nargs="*", help="one label per path")
    p.add_argument("--base-model", help="base model, for the magnitude/direction change of W0 + ΔW")


def _add_experiment(sub: Subparsers) -> None:
    p = _add(sub, "experiment", cmd_experiment, "run the paper's experiments (init-similarity)",
                 "init-similarity: train LoRA on several tasks from one seed and on one task from several seeds, then "
                 "compare A and B similarities (the paper's Figure 1).")  # fmt: skip
    p.add_argument("name", choices=["init-similarity"], help="the experiment to run")
    p.add_argument(
        "--out", default="runs/init-similarity", help="output directory (default runs/init-similarity)"
    )
    p.add_argument(
        "overrides",
        nargs="*",
        help="key=value overrides of the sizes, e.g. train.steps=20 max_length=96 'seeds=[0,1]'",
    )


def _add_serve(sub: Subparsers) -> None:
    p = _add(sub, "serve", cmd_serve, "serve a run or adapter on an OpenAI-compatible /v1/completions endpoint",
                 "Serve RUN_OR_ADAPTER (a run directory or an adapter directory) over HTTP. The request's `model` "
                 "names the task (task-routed adapters; GET /v1/models lists them) or the adapter; concurrent "
                 "requests of different tasks run as one batched forward. Greedy decoding. See docs/serving.md.")  # fmt: skip
    p.add_argument("path", metavar="RUN_OR_ADAPTER", help="a run directory or an adapter directory")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--method", help="which method of a compare run (default: the only one)")
    p.add_argument("--base-model", help="base model (default: the adapter's base_model_name_or_path)")
    p.add_argument(
        "--served-model-name",
        help="name of an adapter without task routing (default: the run's directory name, a compare run's "
        "method, or the adapter directory's name)",
    )
    p.add_argument("--device", help="cpu (default), auto or a torch device")
    p.add_argument("--max-batch-size", type=int, default=16, help="most prompts in one forward (default 16)")
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=5.0,
        help="how long a batch waits for more requests, in ms (default 5)",
    )
    p.add_argument(
        "--max-tokens", type=int, default=256, help="largest max_tokens a request may ask for (default 256)"
    )


def _add_fed(sub: Subparsers) -> None:
    p = _add(sub, "fed", cmd_fed, "federated fine-tuning on Flower (simulation)",
                 "Run a federated config (configs/fed_*.yaml) with Flower's simulation engine.")  # fmt: skip
    p.add_argument("config", help="federated YAML config (e.g. configs/fed_bigbench_homo.yaml)")
    p.add_argument(
        "overrides", nargs="*", help="section.key=value overrides, e.g. rounds=5 train.local_steps=20"
    )
    p.add_argument("--resume", action="store_true", help="continue from the last completed round")
    p.add_argument("--overwrite", action="store_true", help="delete what run_dir holds and start over")


def build_parser() -> argparse.ArgumentParser:
    """The ``asymlora`` parser: one subcommand per ``cmd_*`` function."""
    parser = argparse.ArgumentParser(
        prog="asymlora",
        description="Fine-tune language models with several LoRA adapters that share parameters asymmetrically "
        "(ALoRA, Fed-ALoRA) and their peers (LoRA, HydraLoRA, MoLoRA, MALoRA; FedIT, FFA-LoRA, FedSA-LoRA).",
        epilog="Configs are YAML (see configs/); any key can be overridden as section.key=value, "
        "e.g. adapter.r=16 train.steps=200 'data.tasks=[bigbench:strategyqa]'.",
    )
    parser.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in (
        _add_train,
        _add_demo,
        _add_eval,
        _add_compare,
        _add_sweep,
        _add_export,
        _add_analyze,
        _add_experiment,
        _add_serve,
        _add_fed,
    ):
        add_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides given after an option (argparse stops collecting positionals there)
        if not hasattr(args, "overrides") or not all("=" in a and not a.startswith("-") for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        with progress.quiet() if args.quiet else contextlib.nullcontext():
            return args.func(args)
    except KeyboardInterrupt:
        print(f"interrupted{RESUME_HINTS.get(args.command, '')}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into a reader that stopped early (`asymlora sweep --list | head`)
        # Python's documented recipe: point stdout at devnull so the interpreter's final flush is silent.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a program killed by a closed pipe
    except PermissionError as e:  # a path the user gave that this user may not write (or read)
        print(
            f"asymlora {args.command}: error: "
            f"{f'{e.filename}: {e.strerror}' if e.filename else e}; give a path you can write",
            file=sys.stderr,
        )
        return EXIT_USER_ERROR
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not isinstance(e, TrainingError):
            raise
        print(f"asymlora {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    finally:
        distributed.shutdown()  # under torchrun / accelerate launch: leave the process group before exiting


if __name__ == "__main__":
    sys.exit(main())
