"""Scoring the options of a choice task: one prompt pass shared by the options vs one pass per option.

`asymlora.eval.option_loglikelihoods` scores a choice example's options either on top of the prompt's KV
cache (``share_prompt=True``, the default, what every evaluation of the project runs: each prompt once,
left-padded, then the options' tokens after the first, right-padded, on the repeated cache) or by one
forward pass per (example, option) sequence (``share_prompt=False``: right-padded, sorted by length).
Variants, at the same ``--batch-size`` (option sequences per forward; 16 = ``eval.batch_size`` of
configs/multitask_bigbench.yaml):

- ``per_option`` (the baseline of the ratio): ``share_prompt=False``;
- ``shared``: ``share_prompt=True``.

Models (``--models``): ``alora``, an ALoRA adapter on SmolLM2-135M (soft router, N = 3, r = 8, q_proj +
o_proj: the campaign's adapter, B random non-zero so that the adapter changes the scores) and ``base``, the
base model alone. Examples: the first ``--examples`` test examples of a BIG-bench choice task (``--task``,
the project's loader `asymlora.data.load_task` with seed 0, the split the campaign evaluates on), with the
prompt formatting of the evaluation (`asymlora.data.encode_example`, no truncation: evaluation passes no
``max_length``).

Before anything is timed, both variants score every example once per model (the warm-up); they must give
the same option log-likelihoods (largest absolute difference at most `ATOL`, in float32: with ``--dtype``
bfloat16 or float16 on a float32 copy of the model, the half-precision difference recorded beside it) and the
same argmax for every example, and the shared path must feed fewer tokens than the per-option one (a forward
hook counts the calls, sequences and tokens of each). Otherwise the benchmark stops (exit 1) and reports no
speed. Then the variants alternate, round after round (the order rotating each round), and the median of
``--reps`` rounds is reported as examples/s, with the spread beside it; the ratio shared / per-option of
the medians, paired (median over the rounds of the ratio within a round) and of the process CPU seconds
(with one torch thread, the work done: less sensitive to other jobs on the machine than wall time).

    python benchmarks/scoring.py --save benchmarks/results/scoring.json   # SmolLM2-135M (minutes on CPU)
    python benchmarks/scoring.py --smoke     # tiny random Llama, character tokenizer, seconds, for CI
    python benchmarks/scoring.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import peft
import torch
from torch import nn

import asymlora
from asymlora.data import DataError, Example, Task, build_task, load_task
from asymlora.eval import option_loglikelihoods
from asymlora.models import load

try:  # imported as the package `benchmarks`
    from benchmarks.common import (
        benchmark_parser,
        finish,
        machine,
        parse,
        positive_int,
        spread,
        sync,
        utc_now,
    )
    from benchmarks.train_precision import _conftest
    from benchmarks.train_step import load_base
except ImportError:  # run as a script: Python puts this folder first on sys.path
    from common import benchmark_parser, finish, machine, parse, positive_int, spread, sync, utc_now
    from train_precision import _conftest
    from train_step import load_base

VARIANTS = {"per_option": False, "shared": True}
"""Variant → ``share_prompt``."""
BASELINE = "per_option"
MODELS = ("alora", "base")
TARGETS = ("q_proj", "o_proj")
"""The campaign's adapted modules (configs/multitask_bigbench.yaml)."""
ATOL = 1e-4
"""Largest absolute difference allowed between the two variants' float32 option log-likelihoods (summed over
an option's tokens): they differ by rounding only (padding and batch shapes differ). In bfloat16 the two
paths round differently by far more (SmolLM2-135M, 32 social_iqa examples on CPU: 0.67, and one argmax of
32 changed), so a half-precision run checks a float32 copy of each model and records its own differences."""


# --- setting -------------------------------------------------------------------------------------------
def smoke_task(examples: int) -> Task:
    """A synthetic choice task for the character tokenizer: three options of several tokens each."""
    options = ["even", "odd", "neither"]
    rows = [
        Example(prompt=f"Is {i} even or odd?", target=options[i % 2], options=options, answer_index=i % 2)
        for i in range(5 * examples)  # test_fraction 0.2: the test split holds `examples`
    ]
    return build_task("parity", {"all": rows}, kind="choice")


def load_setting(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    """(base model in eval mode, tokenizer): SmolLM2-135M (`load_base`'s model, with its tokenizer) or, with
    ``--smoke``, the tiny random Llama and the character tokenizer of tests/conftest.py."""
    if args.smoke:
        return load_base(True, device, dtype).eval(), _conftest().make_char_tokenizer()
    model, tokenizer = load("smollm2-135m", device=str(device), dtype=dtype)
    return model.eval(), tokenizer


def bad_task(args: argparse.Namespace, why: str) -> SystemExit:
    """Exit 2 (as a bad flag does), naming ``--task`` and why, before any model is loaded."""
    print(f"benchmarks/scoring.py: --task {args.task}: {why}", file=sys.stderr)
    return SystemExit(2)


def load_examples(args: argparse.Namespace) -> tuple[str, list[Example]]:
    """(task name, its first ``--examples`` test examples); exits 2 when the task does not load, is not a
    choice task or has too few test examples."""
    if args.smoke:
        task = smoke_task(args.examples)
    else:
        try:
            task = load_task(args.task, seed=0, max_test=args.examples)
        except DataError as e:
            raise bad_task(args, str(e)) from None
    if task.kind != "choice":
        raise bad_task(args, f"a {task.kind} task, not a choice task")
    if len(task.test) < args.examples:
        raise bad_task(args, f"{len(task.test)} test examples, fewer than --examples {args.examples}")
    return task.name, list(task.test[: args.examples])


def build_models(args: argparse.Namespace, base: nn.Module) -> dict[str, nn.Module]:
    """The ``--models``: ``alora`` (a peft model on a deep copy of ``base``, B random) and ``base``."""
    models: dict[str, nn.Module] = {}
    if "alora" in args.models:
        torch.manual_seed(0)
        cfg = asymlora.AsymLoraConfig(method="alora", r=args.r, lora_alpha=2 * args.r,
                                      num_experts=args.experts, router="soft", target_modules=list(TARGETS))  # fmt: skip
        model = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "asymlora_B" in name:
                    p.normal_(std=args.b_std)  # a trained-looking adapter: B is zero only at init
        models["alora"] = model
    if "base" in args.models:
        models["base"] = base
    return models


# --- running -------------------------------------------------------------------------------------------
def score(
    model: nn.Module, tokenizer: Any, examples: list[Example], share: bool, batch: int
) -> list[list[float]]:
    """Every example's option log-likelihoods, as the evaluation computes them (no task id: soft router)."""
    return option_loglikelihoods(
        model, tokenizer, examples, task_id=None, batch_size=batch, share_prompt=share
    )


@contextmanager
def counting(model: nn.Module) -> Iterator[dict[str, int]]:
    """Count the forward calls of ``model``'s transformers model inside the block: calls, sequences (rows
    of ``input_ids``) and tokens fed (``input_ids`` elements, padding included)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    counts = {"forward_calls": 0, "sequences": 0, "tokens_fed": 0}

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        counts["forward_calls"] += 1
        if ids is not None:
            counts["sequences"] += int(ids.shape[0])
            counts["tokens_fed"] += int(ids.numel())

    handle = inner.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield counts
    finally:
        handle.remove()


def compare(scores: dict[str, list[list[float]]], atol: float) -> dict[str, Any]:
    """The two variants' scores side by side: the largest absolute difference, the examples whose argmax
    differs, and whether they agree (difference ≤ ``atol``, same argmax everywhere)."""
    a, b = scores["shared"], scores["per_option"]
    diff = max(abs(x - y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))
    argmax = (
        [max(range(len(r)), key=r.__getitem__) for r in a],
        [max(range(len(r)), key=r.__getitem__) for r in b],
    )
    differ = [i for i, (x, y) in enumerate(zip(*argmax, strict=True)) if x != y]
    return {"max_abs_diff": diff, "argmax_differs": differ, "agree": diff <= atol and not differ}


def check(
    args: argparse.Namespace, models: dict[str, nn.Module], tokenizer: Any, examples: list[Example]
) -> dict[str, Any]:
    """The warm-up: each model scores every example with both variants (counting their forward calls); they
    must agree in float32 (`compare`; in a half-precision run, a float32 copy of the model is scored too, and
    the run dtype's own differences are kept as ``<dtype>_diff``) and the shared path must feed fewer tokens;
    exits 1 otherwise."""
    found: dict[str, Any] = {}
    for name, model in models.items():
        scores, counts = {}, {}
        for variant, share in VARIANTS.items():
            with counting(model) as counts[variant]:
                scores[variant] = score(model, tokenizer, examples, share, args.batch_size)
        cmp = compare(scores, ATOL)
        found[name] = {**cmp, "counts": counts, "scores_first": scores["shared"][0]}
        if args.dtype != "float32":  # the check in float32; the run dtype's differences recorded
            reference = copy.deepcopy(model).float()
            ref = {
                v: score(reference, tokenizer, examples, share, args.batch_size)
                for v, share in VARIANTS.items()
            }
            del reference
            found[name] = {**found[name], **compare(ref, ATOL),
                           f"{args.dtype}_diff": {k: cmp[k] for k in ("max_abs_diff", "argmax_differs")}}  # fmt: skip
        cmp = found[name]
        log(f"check {name}: max |shared − per_option| = {cmp['max_abs_diff']:.2e} in float32, argmax differs on "
            f"{len(cmp['argmax_differs'])} of {len(examples)}; tokens fed {counts['shared']['tokens_fed']} vs "
            f"{counts['per_option']['tokens_fed']}")  # fmt: skip
        if not cmp["agree"]:
            raise SystemExit(
                f"benchmarks/scoring.py: {name}: the shared-prompt and per-option scores differ (max abs "
                f"difference {cmp['max_abs_diff']:.3g}, tolerance {ATOL:g} in float32; argmax differs on "
                f"examples {cmp['argmax_differs'][:10]}): no speed is reported for two different computations"
            )
        if not counts["shared"]["tokens_fed"] < counts["per_option"]["tokens_fed"]:
            raise SystemExit(
                f"benchmarks/scoring.py: {name}: share_prompt=True fed {counts['shared']['tokens_fed']} tokens, "
                f"share_prompt=False {counts['per_option']['tokens_fed']}: the shared-prompt path was not taken "
                "(does the model's forward take a KV cache under a name asymlora.eval.scoring probes?)"
            )
    return found


def log(message: str) -> None:
    """Progress on stderr (stdout carries the table and the JSON line)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def alternate(
    args: argparse.Namespace,
    models: dict[str, nn.Module],
    tokenizer: Any,
    examples: list[Example],
    device: torch.device,
) -> dict[str, dict[str, dict[str, list[float]]]]:
    """Wall and process CPU seconds (``[model][variant]["wall" | "cpu"]``) of each (model, variant) over
    ``--reps`` rounds, the variants' order rotating each round."""
    runs = {m: {v: {"wall": [], "cpu": []} for v in VARIANTS} for m in models}
    names = list(VARIANTS)
    for rnd in range(args.reps):
        for m, model in models.items():
            for variant in names[rnd % len(names) :] + names[: rnd % len(names)]:
                sync(device)
                t0, c0 = time.perf_counter(), time.process_time()
                score(model, tokenizer, examples, VARIANTS[variant], args.batch_size)
                sync(device)
                runs[m][variant]["wall"].append(time.perf_counter() - t0)
                runs[m][variant]["cpu"].append(time.process_time() - c0)
        log(f"round {rnd + 1}/{args.reps}: " + ", ".join(
            f"{m} {v} {runs[m][v]['wall'][-1]:.2f} s" for m in models for v in names))  # fmt: skip
    return runs


def summarize(runs: dict[str, dict[str, list[float]]], n_examples: int) -> dict[str, Any]:
    """One model's examples/s per variant (median wall time), spreads, all times, process CPU seconds, and
    the shared / per-option speed ratios: of the median wall times, paired (the median over the rounds of
    the two wall times of one round) and of the median CPU times (less sensitive to other jobs)."""
    wall = {v: r["wall"] for v, r in runs.items()}
    med = {v: statistics.median(t) for v, t in wall.items()}
    cpu = {v: statistics.median(r["cpu"]) for v, r in runs.items()}
    paired = statistics.median(b / s for s, b in zip(wall["shared"], wall[BASELINE], strict=True))
    return {
        "examples_per_s": {v: round(n_examples / m, 3) for v, m in med.items()},
        "median_s": {v: round(m, 4) for v, m in med.items()},
        "spread": {v: round(spread(t), 4) for v, t in wall.items()},
        "s_all": {v: [round(x, 3) for x in t] for v, t in wall.items()},
        "cpu_s": {v: round(c, 4) for v, c in cpu.items()},
        "cpu_spread": {v: round(spread(r["cpu"]), 4) for v, r in runs.items()},
        "shared_vs_per_option": round(med[BASELINE] / med["shared"], 4),
        "shared_vs_per_option_paired": round(paired, 4),
        "shared_vs_per_option_cpu": round(cpu[BASELINE] / cpu["shared"], 4),
    }


def print_table(result: dict[str, Any]) -> None:
    s = result["setting"]
    print(f"choice scoring: {result['model']}, {result['task']} ({s['examples']} test examples, "
          f"{s['options']} options), batch {s['batch_size']}, {result['device']}/{result['dtype']}; median of "
          f"{s['reps']} alternating rounds after 1 warm-up (examples/s)")  # fmt: skip
    print(f"{'model':<8}{'per_option':>12}{'shared':>10}{'shared/per_option':>19}{'paired':>8}{'CPU':>8}"
          f"{'spread p/s':>14}{'max |diff|':>12}{'seqs p/s':>12}{'tokens fed p/s':>17}")  # fmt: skip
    for m, r in result["models"].items():
        e, sp, c = r["examples_per_s"], r["spread"], r["counts"]
        print(f"{m:<8}{e['per_option']:>12.2f}{e['shared']:>10.2f}{r['shared_vs_per_option']:>19.3f}"
              f"{r['shared_vs_per_option_paired']:>8.3f}{r['shared_vs_per_option_cpu']:>8.3f}"
              f"{sp['per_option']:>7.0%}/{sp['shared']:<6.0%}"
              f"{r['max_abs_diff']:>12.1e}{c['per_option']['sequences']:>6}/{c['shared']['sequences']:<5}"
              f"{c['per_option']['tokens_fed']:>9}/{c['shared']['tokens_fed']:<7}")  # fmt: skip


# --- main ----------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = benchmark_parser(
        __doc__, "tiny random Llama, character tokenizer, a synthetic task, 1 rep, for CI"
    )
    parser.add_argument(
        "--task", default="bigbench:social_iqa", help="a choice task spec (asymlora.data.load_task)"
    )
    parser.add_argument("--examples", type=positive_int, default=32, help="test examples scored per run")
    parser.add_argument(
        "--batch-size", type=positive_int, default=16, help="option sequences per forward pass"
    )
    parser.add_argument(
        "--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}"
    )
    parser.add_argument("--r", type=positive_int, default=8)
    parser.add_argument("--experts", type=positive_int, default=3, help="N")
    parser.add_argument("--b-std", type=float, default=0.05, help="std of the random B (non-zero adapter)")
    parser.add_argument("--reps", type=positive_int, default=3, help="timed rounds (after the warm-up)")
    args = parse(parser, argv)
    args.models = [m for m in args.models.split(",") if m]
    if not args.models or set(args.models) - set(MODELS):
        parser.error(f"--models: unknown {sorted(set(args.models) - set(MODELS))}; choose from {MODELS}")
    if args.smoke:
        args.examples, args.reps = min(args.examples, 6), 1
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    t_start, load0 = time.perf_counter(), os.getloadavg()[0]
    task, examples = load_examples(args)
    base, tokenizer = load_setting(args, device, dtype)
    models = build_models(args, base)
    checks = check(args, models, tokenizer, examples)
    runs = alternate(args, models, tokenizer, examples, device)
    n_options = [len(e.options or []) for e in examples]
    command = ["python benchmarks/scoring.py", *(argv if argv is not None else sys.argv[1:])]
    result = {
        "benchmark": "scoring",
        "command": " ".join(command),
        "date": utc_now(),
        "model": "tiny random Llama" if args.smoke else "SmolLM2-135M",
        "smoke": args.smoke,
        "task": task,
        "device": args.device,
        "dtype": args.dtype,
        "setting": {
            "task_spec": "synthetic" if args.smoke else args.task,
            "examples": len(examples),
            "options": sorted(set(n_options)),
            "option_sequences": sum(n_options),
            "batch_size": args.batch_size,
            "method": "alora",
            "router": "soft",
            "r": args.r,
            "experts": args.experts,
            "targets": list(TARGETS),
            "b_std": args.b_std,
            "reps": args.reps,
            "threads": torch.get_num_threads(),
        },
        "baseline": BASELINE,
        "atol": ATOL,
        "models": {m: {**summarize(runs[m], len(examples)), **checks[m]} for m in models},
        "machine": machine(),
        "load_avg_1min": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    print_table(result)
    return finish(result, args)


if __name__ == "__main__":
    main()
