"""The Markdown tables and computed phrases of docs/performance.md, from the benchmarks' JSON results.

Used by ``report.py`` (as template globals, `TEMPLATE_FUNCTIONS`) and by ``run_all.py`` (the targets it
prints). Each function takes one benchmark's result as its ``main`` returned (and ``--save`` wrote) it.
"""

from __future__ import annotations

from typing import Any

try:  # imported as the package `benchmarks`
    from benchmarks.common import MiB
    from benchmarks.layers import TARGETS as LAYER_TARGETS
    from benchmarks.train_step import TARGETS as STEP_TARGETS
except ImportError:  # run as a script: Python puts this folder first on sys.path
    from common import MiB
    from layers import TARGETS as LAYER_TARGETS
    from train_step import TARGETS as STEP_TARGETS

TEMPLATE_FUNCTIONS = (
    "train_step_table", "peak_text", "profile_text", "layers_table", "inference_table", "min_tolerance",
    "federated_table", "federated_failure", "scaling_table", "serving_table", "serving_scaling_table", "faster_than_base",
    "scaling_range", "train_precision_table", "faster_or_slower", "scoring_table",
)  # fmt: skip


def fmt_ratio(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}×"


def status(met: bool | None) -> str:
    return "—" if met is None else ("met" if met else "**missed**")


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --- targets -------------------------------------------------------------------------------------------
def _row(figure: str, measured: float, target: str, met: bool, gap: float) -> dict[str, Any]:
    return {"figure": figure, "measured": measured, "target": target, "met": met, "gap": gap}


def _at_most(figure: str, value: float, bound: float, spec: str = "g") -> dict[str, Any]:
    return _row(figure, value, f"≤ {bound:{spec}}×", value <= bound, (value - bound) / bound)


def target_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Every figure that has a target: figure, measured, target, met, gap (relative to the bound)."""
    rows = []
    for key, where in (("train_step", ""), ("train_step_all", ", all seven projections")):
        ratios = (res.get(key) or {}).get("ratios", {}).get("alora")
        if ratios:
            rows.append(_at_most(f"ALoRA / peft LoRA, training step time (whole model{where})",
                                 ratios["step_time"], STEP_TARGETS["step_time"], ".2f"))  # fmt: skip
            if "peak_memory" in ratios:
                rows.append(_at_most(f"ALoRA / peft LoRA, peak memory (whole model{where})",
                                     ratios["peak_memory"], STEP_TARGETS["peak_memory"], ".2f"))  # fmt: skip
    if res.get("layers"):
        r, t = res["layers"]["ratios"], LAYER_TARGETS
        loop = r["adapter_vs_loop"]
        rows.append(_row("fused ALoRA vs loop form, adapter path (layer)", loop, f"≥ {t['adapter_vs_loop']:g}×",
                         loop >= t["adapter_vs_loop"], (t["adapter_vs_loop"] - loop) / t["adapter_vs_loop"]))  # fmt: skip
        rows.append(_at_most("ALoRA / peft LoRA, adapter path (layer)", r["adapter_vs_peft_lora"],
                             t["adapter_vs_peft_lora"]))  # fmt: skip
        rows.append(
            _at_most("ALoRA / peft LoRA, whole layer", r["layer_vs_peft_lora"], t["layer_vs_peft_lora"])
        )
    for b, r in ((res.get("inference") or {}).get("batches") or {}).items():
        rows.append(_row(f"merged / base tokens/s, batch {b}", r["merged_vs_base"], f"1 ± {r['tolerance']:.0%}",
                         r["merged_equals_base_speed"], abs(r["merged_vs_base"] - 1) - r["tolerance"]))  # fmt: skip
    fed = res.get("federated")
    if fed and "strategies" in fed:
        ratios = [v for st in fed["strategies"].values()
                  for v in (st["payload_up_vs_predicted"], st["payload_down_vs_predicted"])]  # fmt: skip
        worst = max(ratios, key=lambda v: abs(v - 1))
        figure = "federated bytes moved / accounting (every strategy, both ways)"
        rows.append(_row(figure, worst, "= 1", worst == 1.0, abs(worst - 1)))
    return rows


def targets_table(rows: list[dict[str, Any]]) -> str:
    cells = [[r["figure"], fmt_ratio(r["measured"]), r["target"], status(r["met"])] for r in rows]
    return md_table(["figure", "measured", "target", "status"], cells)


def why_missed(row: dict[str, Any], res: dict[str, Any]) -> str:
    """A sentence on why a missed target was missed, from the measured figures ("" for a met one)."""
    name, ly = row["figure"], res.get("layers")
    ts = res.get("train_step_all" if "all seven" in name else "train_step")
    if row["met"]:
        return ""
    if "training step time" in name and ts:
        noise, cpu = ts["spread"]["peft_lora"], ts["ratios"]["alora"]["cpu_time"]
        verdict = ("the wall-clock gap is within the noise of other jobs." if row["measured"] - 1 <= noise
                   else "the gap exceeds the noise; see the profile below for the ops ALoRA adds.")  # fmt: skip
        return (f"peft LoRA's own steps spread by {noise:.0%} (max − min over median) on this loaded machine and "
                f"ALoRA's CPU-time ratio is {cpu:.3f}×: {verdict}")  # fmt: skip
    if "peak memory" in name and ts:
        return "see the training-state column: adapters, gradients, AdamW state and saved activations."
    if "adapter path" in name and ly and "peft" in name:
        sh = ly["shape"]
        k = sh["experts"] * sh["r"] + sh["experts"]
        return (
            f"ALoRA's first product is (N·r + N) × d_in = {k} × {sh['dim']} against LoRA's {sh['r']} × {sh['dim']} "
            f"({k / sh['r']:.1f}× the FLOPs of the A side); the adapter path is bound by reading x and writing the "
            "(tokens × d_out) outputs, which both do, and by the full-size scaling of the output (forward and "
            "backward), which both do too."
        )
    if "vs loop" in name and ly:
        return (
            "both forms make the same full passes over x and over the (tokens × d_out) output and its gradient "
            "(product with the stacked A's, scaling, sum with W0 x); the loop's extra work is N − 1 more products "
            "with B, small at low rank, so the ratio is bounded by those shared passes."
        )
    if "whole layer" in name and ly:
        return "the frozen base product dominates; the gap is the adapter path's (row above)."
    if "merged" in name:
        return "merged runs the base architecture with the same shapes; a gap is noise from other jobs."
    return ""


# --- §1 training step ----------------------------------------------------------------------------------
def _train_step_row(ts: dict[str, Any], n: str, step_ms: float) -> list[Any]:
    r, mem, pk = ts["ratios"][n], ts["memory"][n], ts["peak"].get(n)
    return [
        f"`{n}`", ts["setting"]["routers"].get(n, "—"), f"{mem['trainable_params']:,}", f"{step_ms:.0f}",
        fmt_ratio(r["step_time"]), f"{ts['cpu_ms'][n]:.0f}", fmt_ratio(r["cpu_time"]), f"{ts['spread'][n]:.0%}",
        f"{pk['peak_bytes'] / MiB:.0f}" if pk else "—", fmt_ratio(r.get("peak_memory")),
        f"{pk['increment_bytes'] / MiB:.0f}" if pk else "—", fmt_ratio(r.get("peak_increment")),
        f"{mem['saved_activation_bytes'] / MiB:.1f}", f"{mem['training_state_bytes'] / MiB:.1f}",
        fmt_ratio(r["training_state"]),
    ]  # fmt: skip


def train_step_table(ts: dict[str, Any]) -> str:
    """The whole-model step table (times, memory, ratios) of one train_step result."""
    header = [
        "variant", "router", "trainable params", "step ms", "× peft", "CPU ms", "× peft", "spread",
        "peak MiB", "× peft", "step peak − model MiB", "× peft", "saved act. MiB", "training state MiB", "× peft",
    ]  # fmt: skip
    return md_table(header, [_train_step_row(ts, n, ms) for n, ms in ts["step_ms"].items()])


def memory_steps(ts: dict[str, Any]) -> str:
    """Steps each peak-memory child ran ("—" when none ran)."""
    return str(next(iter(ts["peak"].values()))["steps"]) if ts["peak"] else "—"


def peak_text(ts: dict[str, Any]) -> str:
    """What the peak-memory columns measured, from the children's own records (``how``, the glibc mmap
    threshold): peak RSS on CPU, ``torch.cuda.max_memory_allocated`` on CUDA. A record without them (read
    back from the page of the 2026-11-23 run) was measured as VmHWM after clear_refs, threshold 65536."""
    peaks = list(ts["peak"].values())
    if not peaks:
        return "not measured (`--memory-variants none`)."
    hows = {p.get("how", "VmHWM after clear_refs") for p in peaks}
    thresholds = {p.get("malloc_mmap_threshold", "65536") for p in peaks}
    steps, child = memory_steps(ts), "a fresh child process per variant (`--memory-child`"
    if hows == {"torch.cuda.max_memory_allocated"}:
        return (f"`torch.cuda.max_memory_allocated` of {child}; reset after the model is built) over {steps} "
                "steps: the tensors torch allocated on the GPU, the frozen base model included. **step peak − "
                "model**: that peak minus the memory allocated for the built model before the first step.")  # fmt: skip
    if hows != {"VmHWM after clear_refs"} or len(thresholds) != 1:
        return (f"peak memory of {child}) over {steps} steps, measured as {' / '.join(sorted(hows))} (ru_maxrss: "
                "the whole process's peak, loading included). **step peak − model**: that peak minus the RSS of "
                "the built model before the first step.")  # fmt: skip
    (threshold,) = thresholds
    mmap = (
        "glibc's default mmap threshold, which grows as blocks are freed (the peak of the same step then "
        "depends on the allocation history)"
        if threshold is None
        else f"glibc's mmap threshold fixed at {int(threshold) // 1024} KiB (`MALLOC_MMAP_THRESHOLD_`) so that "
        "freed tensors return to the OS at once and the RSS follows the live tensors (with glibc's growing "
        "default threshold the peak of the same step depends on the allocation history)"
    )
    return (f"peak RSS of {child}; VmHWM reset after the model is built, so loading does not count) over {steps} "
            f"steps, with {mmap}; it includes the frozen base model and the Python/torch runtime. **step peak − "
            "model**: that peak minus the RSS of the built model before the first step.")  # fmt: skip


def profile_text(ts: dict[str, Any]) -> str:
    """Top ops of one profiled step, peft LoRA and ALoRA side by side, then the ops ALoRA calls more often."""
    prof = ts.get("profile") or {}
    if not {"peft_lora", "alora"} <= set(prof):
        return "_not profiled_"
    p, a = prof["peft_lora"], prof["alora"]
    tops = {v: {row["op"]: row for row in prof[v]["top"]} for v in ("peft_lora", "alora")}
    ops = list(dict.fromkeys([row["op"] for row in a["top"]] + [row["op"] for row in p["top"]]))

    def cell(v: str, op: str) -> str:
        row = tops[v].get(op)
        return f"{row['self_ms']:.0f} ({row['share']:.1%})" if row else "—"

    rows = [[f"`{op[:70]}`", cell("peft_lora", op), p["calls"].get(op, 0), cell("alora", op),
             a["calls"].get(op, 0)] for op in ops]  # fmt: skip
    text = md_table(["op", "peft LoRA self ms (share)", "calls", "ALoRA self ms (share)", "calls"], rows)
    extra = ", ".join(f"`{op}` {d:+d}" for op, d in ts.get("profile_extra_calls", []))
    return text + (
        f"\n\nTotal self {p['clock']} time of the profiled step: peft LoRA {p['total_self_ms']:.0f} ms, "
        f"ALoRA {a['total_self_ms']:.0f} ms (one step each, on the loaded machine: compare shares and calls "
        f"more than milliseconds).\n\nOps ALoRA calls more (or fewer) times than peft LoRA per step "
        f"(exact, from the profiler): {extra}."
    )


def faster_or_slower(ratio: float) -> str:
    """A step-time ratio to its baseline in words: ``1.72× faster`` (ratio < 1) or ``1.05× slower``."""
    return f"{1 / ratio:.2f}× faster" if ratio < 1 else f"{ratio:.2f}× slower"


def train_precision_table(tp: dict[str, Any]) -> str:
    """The four variants of the campaign's step: times and ratios to float32 full logits, first-batch losses."""
    rows = []
    for n, step_s in tp["step_s"].items():
        v, r = tp["variants"][n], tp["ratios"][n]
        rows.append([
            f"`{n}`", v["autocast"] or "— (float32)", "target positions" if v["target_logits"] else "every position",
            f"{step_s:.2f}", fmt_ratio(r["step_time"]), fmt_ratio(r["step_time_paired"]), f"{tp['cpu_s'][n]:.2f}",
            fmt_ratio(r["cpu_time"]),
            f"{tp['spread'][n]:.0%}", f"{tp['first_batch_loss'][n]:.6f}", f"{tp['loss_rel_diff'][n]:.1e}",
            f"{tp['loss_rel_diff_max_over_steps'][n]:.1e}",
        ])  # fmt: skip
    header = [
        "variant", "autocast", "logits at", "step s", f"× `{tp['baseline']}`", "× per round", "CPU s",
        f"× `{tp['baseline']}`",
        "spread", "first-batch loss", "rel. diff. (first batch)", "max rel. diff. (every step)",
    ]  # fmt: skip
    return md_table(header, rows)


# --- §2 layers, §3 inference, §4 federated, §5 scaling ---------------------------------------------------------
def layers_table(ly: dict[str, Any]) -> str:
    """Adapter path and whole layer per variant; with the spreads where the run recorded them."""
    a, w, ax, wx = ly["adapter_ms"], ly["layer_ms"], ly["adapter_vs_peft"], ly["layer_vs_peft"]
    if "adapter_spread" not in ly:  # the committed run's file has none
        rows = [
            [f"`{n}`", f"{ms:.1f}", fmt_ratio(ax[n]), f"{w[n]:.1f}", fmt_ratio(wx[n])] for n, ms in a.items()
        ]
        rows.append(["`base W0 x only`", "", "", f"{w['base_only']:.1f}", ""])
        return md_table(["variant", "adapter path ms", "× peft LoRA", "whole layer ms", "× peft LoRA"], rows)
    sa, sw = ly["adapter_spread"], ly["layer_spread"]
    rows = [[f"`{n}`", f"{ms:.1f}", f"{sa[n]:.0%}", fmt_ratio(ax[n]), f"{w[n]:.1f}", f"{sw[n]:.0%}", fmt_ratio(wx[n])]
            for n, ms in a.items()]  # fmt: skip
    rows.append(["`base W0 x only`", "", "", "", f"{w['base_only']:.1f}", f"{sw['base_only']:.0%}", ""])
    header = ["variant", "adapter path ms", "spread", "× peft LoRA", "whole layer ms", "spread", "× peft LoRA"]  # fmt: skip
    return md_table(header, rows)


def inference_table(inf: dict[str, Any]) -> str:
    rows = []
    for b, r in inf["batches"].items():
        t = r["tokens_per_s"]
        rows.append([
            b, f"{t['base']:.1f}", f"{t['merged']:.1f}", f"{t['unmerged']:.1f}", fmt_ratio(r["merged_vs_base"]),
            fmt_ratio(r["unmerged_vs_base"]), f"{r['base_spread']:.1%}", f"± {r['tolerance']:.1%}",
            "yes" if r["merged_equals_base_speed"] else "**no**", f"{r['merged_equals_unmerged']:.0%}",
            f"{r['merged_equals_base']:.0%}",
        ])  # fmt: skip
    header = [
        "batch", "base tok/s", "merged tok/s", "unmerged tok/s", "merged / base", "unmerged / base",
        "base spread", "tolerance", "merged = base speed", "merged tokens = unmerged", "merged tokens = base",
    ]  # fmt: skip
    return md_table(header, rows)


def min_tolerance(inf: dict[str, Any]) -> str:
    """The inference benchmark's smallest tolerance on merged / base, as ``5 %``."""
    return f"{100 * inf['setting']['tolerance_floor']:g} %"


def federated_table(fed: dict[str, Any]) -> str:
    rows = []
    for name, r in fed["strategies"].items():
        ratio = r["overhead_vs_training"]
        rows.append([
            f"`{name}`", ",".join(map(str, r["ranks"])), f"{r['round_s_no_training']:.2f}",
            f"{r['round_s_training']:.2f}", f"{r['training_s_per_round']:.2f}", "–" if ratio is None else f"{ratio:.3f}",
            f"{r['bytes_up']:,}", f"{r['bytes_down']:,}", f"{r['predicted_up']:,} / {r['predicted_down']:,}",
            f"{r['payload_up_vs_predicted']:.4f} / {r['payload_down_vs_predicted']:.4f}", f"{r['framing_up']:.5f}",
        ])  # fmt: skip
    header = ["strategy", "client ranks", "T0: round, no training (s)", "T1: round, training (s)",
              "T1 − T0 (s)", "T0 / (T1 − T0)", "bytes up / client", "bytes down / client",
              "predicted payload up / down", "payload / predicted (up / down)", "message / payload"]  # fmt: skip
    return md_table(header, rows)


def federated_failure(run: dict[str, Any]) -> str:
    """The federated section when its benchmark did not run ("not run") or failed (the error, the command)."""
    failure = run.get("failed", {}).get("federated")
    if failure is None:
        return "_Not run (`--only`)._"
    return f"_Failed: {failure['error']}_ (command: `{failure['command']}`)"


def scaling_table(sc: dict[str, Any]) -> str:
    rows, has_spread = [], bool(sc["rows"]) and "spread" in sc["rows"][0]
    for row in sc["rows"]:
        ms, mem = row["ms"], row["memory"]
        spread = [f"{row['spread']['total']:.0%}"] if has_spread else []
        rows.append([
            row["sweep"], row["N"], row["r"], row["method"], f"{ms['total']:.1f}", *spread, f"{ms['x_side']:.1f}",
            f"{ms['b_side']:.1f}", f"{mem['params_A']:,}", f"{mem['params_B']:,}", f"{mem['params_router']:,}",
            f"{mem['saved_bytes'] / MiB:.2f}", f"{mem['total_bytes'] / MiB:.2f}",
        ])  # fmt: skip
    header = [
        "sweep", "N", "r", "method", "adapter ms", *(["spread"] if has_spread else []), "x side ms", "B side ms",
        "A-side params", "B-side params",
        "router params", "saved act. MiB", "memory MiB",
    ]  # fmt: skip
    return md_table(header, rows)


# --- §6 serving --------------------------------------------------------------------------------------------
SERVING_METHODS = ("alora", "hydralora", "molora", "malora")


def serving_table(sv: dict[str, Any]) -> str:
    """Tokens/s, ratios to base and peft, agreement with the merged models, per batch size."""
    rows: list[list[Any]] = []
    for b, r in sv["batches"].items():
        t, m = r["tokens_per_s"], SERVING_METHODS
        rows.append([f"{b} tok/s", *(f"{t[v]:.1f}" for v in ("base", *m, "peft"))])
        rows.append([f"{b} / base", 1, *(fmt_ratio(r["vs_base"][v]) for v in (*m, "peft"))])
        rows.append([f"{b} / peft", "", *(f"{r['vs_peft'][v]:.2f}×" for v in m), 1])
        same = "ALoRA" if r["peft_equals_alora"] == 1.0 else "ALoRA: **no**"
        rows.append([f"{b} rows = merged", "", *(f"{r['equals_merged'][v]:.0%}" for v in m),
                     f"{r['peft_equals_alora']:.0%} = {same}"])  # fmt: skip
    return md_table(["batch", "base", *SERVING_METHODS, "peft (N LoRA, `adapter_names`)"], rows)


def serving_scaling_table(sv: dict[str, Any]) -> str:
    rows = [[n, f"{r['tokens_per_s']['base']:.1f}", f"{r['tokens_per_s']['alora']:.1f}",
             f"{r['tokens_per_s']['peft']:.1f}", fmt_ratio(r["vs_base"]), f"{r['vs_peft']:.2f}×"]
            for n, r in sv["scaling"].items()]  # fmt: skip
    return md_table(["N", "base tok/s", "ALoRA tok/s", "peft tok/s", "ALoRA / base", "ALoRA / peft"], rows)


def faster_than_base(sv: dict[str, Any]) -> str:
    """ "Three methods" (how many read faster than the base model at the largest batch), "" for none."""
    big = list(sv["batches"])[-1]
    n = sum(sv["batches"][big]["vs_base"][m] > 1 for m in SERVING_METHODS)
    words = {1: "One method", 2: "Two methods", 3: "Three methods", 4: "All four methods"}
    return words.get(n, "")


def scaling_range(sv: dict[str, Any]) -> str:
    """ALoRA / peft over the N-scaling rows, as ``1.06–1.28×``."""
    values = [r["vs_peft"] for r in sv["scaling"].values()]
    return f"{min(values):.2f}–{max(values):.2f}×"


# --- §7 scoring ----------------------------------------------------------------------------------------------
def scoring_table(scr: dict[str, Any]) -> str:
    """Per model: examples/s of both variants with their spreads, the shared / per-option ratios, the check
    (largest |difference| of the option log-likelihoods, examples with the same argmax) and what each variant
    fed the model (forward calls, sequences, tokens: per-option / shared)."""
    n, rows = scr["setting"]["examples"], []
    for m, r in scr["models"].items():
        e, sp, c = r["examples_per_s"], r["spread"], r["counts"]
        fed = {
            k: f"{c['per_option'][k]:,} / {c['shared'][k]:,}"
            for k in ("forward_calls", "sequences", "tokens_fed")
        }
        rows.append([
            f"`{m}`", f"{e['per_option']:.2f}", f"{sp['per_option']:.0%}", f"{e['shared']:.2f}", f"{sp['shared']:.0%}",
            fmt_ratio(r["shared_vs_per_option"]), fmt_ratio(r["shared_vs_per_option_paired"]),
            fmt_ratio(r["shared_vs_per_option_cpu"]),
            f"{r['max_abs_diff']:.1e}", f"{n - len(r['argmax_differs'])} of {n}",
            fed["forward_calls"], fed["sequences"], fed["tokens_fed"],
        ])  # fmt: skip
    header = [
        "model", "per-option ex/s", "spread", "shared ex/s", "spread", "shared / per-option", "× per round", "× CPU time",
        "max abs. diff.", "same argmax", "forward calls", "sequences", "tokens fed",
    ]  # fmt: skip
    return md_table(header, rows)
