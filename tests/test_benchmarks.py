"""Seconds-long smokes of every benchmark (``benchmarks/*.py --smoke``: tiny random Llama, tiny shapes,
1-2 repetitions) so they cannot rot. The figures themselves are meaningless at these sizes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from benchmarks import report, run_all, tables, train_precision, train_step
from benchmarks.common import RESULTS, ROOT

from asymlora.train import precision

NOT_FEDERATED = ",".join(b for b in run_all.BENCHMARKS if b != "federated")
"""The federated smoke starts Ray: it has its own test, marked ``fed``."""


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, Path]:
    """One ``run_all.py --smoke`` (every benchmark but the federated one, in seconds): its results, its
    stdout, its output dir (the JSON results and the page)."""
    import contextlib
    import io

    out_dir = tmp_path_factory.mktemp("perf")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        result = run_all.main(
            [
                "--smoke",
                "--only",
                NOT_FEDERATED,
                "--out-dir",
                str(out_dir),
            ]
        )
    return result, buf.getvalue(), out_dir


def json_lines(stdout: str) -> dict[str, dict]:
    """The JSON line each benchmark printed, by benchmark name."""
    found = {}
    for line in stdout.splitlines():
        if line.startswith("{"):
            obj = json.loads(line)
            found[obj.get("benchmark", "?")] = obj
    return found


def test_every_benchmark_prints_a_json_line(smoke):
    result, stdout, out_dir = smoke
    assert result["run_all"]["failed"] == {}
    page_from = ("run_all", "layers", "train_step", "train_precision", "inference", "scaling", "scoring")
    assert set(page_from) <= set(json_lines(stdout))
    for name in page_from:  # what the page is rendered from
        assert json.loads((out_dir / f"{name}.json").read_text())["benchmark"] in (name, "run_all"), name


def test_layers_smoke(smoke):
    result = smoke[0]["layers"]
    assert {"adapter_vs_loop", "adapter_vs_peft_lora", "layer_vs_peft_lora"} <= set(result["ratios"])
    assert max(result["fused_vs_loop_max_rel_diff"].values()) <= 1e-5  # float32: rounding only
    assert (
        set(result["adapter_spread"]) == set(result["adapter_ms"]) and "base_only" in result["layer_spread"]
    )
    assert result["shape"]["reps"] == 2
    page = (smoke[2] / "performance.md").read_text()
    assert (
        "| variant | adapter path ms | spread | × peft LoRA | whole layer ms | spread | × peft LoRA |" in page
    )


def test_layers_rotates_the_order_each_round():
    """Warm-up in order, then one round per repetition, each starting one variant later (it ran them in the
    same order every round: fused ALoRA always first, the loop form always after it)."""
    import torch
    from benchmarks import layers

    order, x = [], torch.zeros(1, requires_grad=True)
    fns = {n: (lambda n=n: order.append(n) or x * 1.0) for n in "abc"}
    layers.measure(fns, x, 3, torch.device("cpu"))
    assert "".join(order) == "abc" + "abc" + "bca" + "cab"


def test_spread_by_hand():
    from benchmarks.common import spread

    assert (
        spread([1.0, 3.0, 2.0]) == 1.0 and spread([0.5, 0.5]) == 0.0 and spread([4.0]) == 0.0
    )  # (3 − 1) / 2


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_layers_runs_in_half_precision(dtype, capsys):
    """`layers.py --dtype bfloat16` (the documented GPU command) ran peft's LoRA with float32 adapter weights
    on a bf16 input and stopped at the first product; every variant now runs in the layer's dtype."""
    from benchmarks import layers

    result = layers.main(["--smoke", "--device", "cpu", "--dtype", dtype])
    assert result["dtype"] == dtype and result["adapter_ms"]["peft_lora"] > 0
    assert max(result["fused_vs_loop_max_rel_diff"].values()) <= layers.EQUAL_RTOL[dtype]


def test_layers_times_the_loop_only_when_it_equals_fused(monkeypatch):
    """A loop form that computes something else than fused ALoRA (here 1 % larger) stops the benchmark
    before any timing: its ratio would compare two different computations."""
    from benchmarks import layers

    loop = layers.loop_alora_delta
    monkeypatch.setattr(layers, "loop_alora_delta", lambda *a: 1.01 * loop(*a))
    monkeypatch.setattr(layers, "measure", lambda *a: pytest.fail("timed before the check"))
    with pytest.raises(AssertionError, match="fused ALoRA differs from the loop form"):
        layers.main(["--smoke", "--device", "cpu"])


def test_train_step_smoke(smoke):
    result = smoke[0]["train_step"]
    assert set(result["step_ms"]) == set(train_step.VARIANTS)
    assert result["ratios"]["peft_lora"]["step_time"] == pytest.approx(1.0)
    for name, mem in result["memory"].items():
        assert mem["saved_activation_bytes"] > 0, name
        assert mem["adam_state_bytes"] == 2 * mem["param_bytes"], name  # exp_avg + exp_avg_sq
        assert mem["grad_bytes"] == mem["param_bytes"], name
    # ALoRA has N A's: more trainable parameters than LoRA, fewer than MoLoRA
    params = {n: m["trainable_params"] for n, m in result["memory"].items()}
    assert params["peft_lora"] == params["lora"] < params["alora"] < params["molora"]
    assert {"peft_lora", "alora"} <= set(result["profile"])
    assert result["profile"]["alora"]["top"]
    # peak memory, each variant in its own child process
    assert {"peft_lora", "alora"} <= set(result["peak"])
    assert result["peak"]["alora"]["peak_bytes"] >= result["peak"]["alora"]["baseline_bytes"] > 0
    assert "peak_memory" in result["ratios"]["alora"]


def test_train_precision_smoke(smoke):
    """Four variants on real (synthetic) batches; the float32 target-logits loss is the full-logits loss,
    first batch and every step (each variant has its own adapter: shared, the first batch would differ)."""
    result, _, out_dir = smoke
    tp = result["train_precision"]
    assert set(tp["step_s"]) == set(tp["cpu_s"]) == set(tp["ratios"]) == set(train_precision.VARIANTS)
    assert tp["variants"]["bf16_targets"] == {"autocast": "bfloat16", "target_logits": True}
    assert tp["ratios"]["fp32_full"] == {"step_time": 1.0, "cpu_time": 1.0, "step_time_paired": 1.0}
    assert tp["slices_logits"] and tp["setting"]["steps"] == 2 and len(tp["step_s_all"]["bf16_full"]) == 2
    assert tp["setting"]["batch"] == 8 and tp["setting"]["targets"] == ["q_proj", "o_proj"]  # the config's
    tok = tp["tokens"]
    assert 0 < tok["target_per_batch"] < tok["real_per_batch"] <= tok["positions_per_batch"]
    loss = tp["first_batch_loss"]
    assert loss["fp32_targets"] == pytest.approx(loss["fp32_full"], rel=1e-5)
    assert tp["loss_rel_diff"]["fp32_targets"] <= tp["loss_rtol"] == 1e-5
    assert tp["loss_rel_diff_max_over_steps"]["fp32_targets"] <= 1e-5
    assert loss["bf16_targets"] == pytest.approx(loss["fp32_full"], rel=1e-2)  # bf16 rounding, recorded
    page = (out_dir / "performance.md").read_text()
    assert "### Target-position logits and bf16 autocast" in page and "| `bf16_targets` | bfloat16 |" in page


def test_train_precision_counts_and_checks_by_hand():
    """Target tokens are the labels after the one-token shift; a float32 loss gap over 1e-5 stops the run."""
    import torch

    labels = torch.tensor([[-100, -100, 7, 8, -100], [-100, 5, 6, 7, 9]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    counts = train_precision.token_counts([{"labels": labels, "attention_mask": mask}])
    assert counts == {"target_per_batch": 6, "positions_per_batch": 10, "real_per_batch": 9,
                      "target_fraction": 0.6, "batches": 1}  # fmt: skip
    assert train_precision.rel_diff(2.0, 4.0) == 0.5 and train_precision.rel_diff(0.0, 0.0) == 0.0
    found = {
        "first_batch_loss": {"fp32_full": 4.0, "fp32_targets": 4.0001},
        "loss_rel_diff": {"fp32_targets": 2.5e-5},
    }
    with pytest.raises(AssertionError, match="2.5e-05 relative"):
        train_precision.check_losses(found)
    train_precision.check_losses({**found, "loss_rel_diff": {"fp32_targets": 9e-6}})


def test_inference_smoke(smoke):
    result = smoke[0]["inference"]
    for r in result["batches"].values():
        assert set(r["tokens_per_s"]) == {"base", "merged", "unmerged"}
        assert r["merged_equals_unmerged"] == 1.0  # merging task 0 == routing to task 0


def test_scoring_smoke(smoke):
    """Both variants on a synthetic choice task: the same option log-likelihoods, the shared path feeding
    fewer tokens (one prompt pass per example), and §7 on the page."""
    result, _, out_dir = smoke
    scr = result["scoring"]
    assert set(scr["models"]) == {"alora", "base"} and scr["atol"] == 1e-4 and scr["setting"]["reps"] == 1
    for name, r in scr["models"].items():
        assert set(r["examples_per_s"]) == {"shared", "per_option"}, name
        assert r["agree"] and r["max_abs_diff"] <= 1e-4 and r["argmax_differs"] == [], name
        c = r["counts"]
        assert c["per_option"]["sequences"] == scr["setting"]["option_sequences"] == 18, name  # 6 × 3 options
        assert c["shared"]["tokens_fed"] < c["per_option"]["tokens_fed"], name
    # the random B changes the scores: the adapter is not the base model
    assert scr["models"]["alora"]["scores_first"] != scr["models"]["base"]["scores_first"]
    page = (out_dir / "performance.md").read_text()
    assert "## 7. Scoring choice tasks" in page and "| `alora` |" in page[page.index("## 7. Scoring") :]


def test_scoring_in_half_precision_checks_in_float32(capsys):
    """In bfloat16 the two paths round differently (SmolLM2-135M: 0.67 apart, one argmax of 32 changed), so the
    check runs on a float32 copy of the model, within the float32 tolerance; the bf16 difference is recorded."""
    from benchmarks import scoring

    r = scoring.main(["--smoke", "--device", "cpu", "--dtype", "bfloat16", "--models", "alora"])["models"][
        "alora"
    ]
    assert r["agree"] and r["max_abs_diff"] <= 1e-4 == scoring.ATOL
    bf16 = r["bfloat16_diff"]["max_abs_diff"]  # bf16 rounding, recorded only
    if precision.cpu_has_bf16():  # bfloat16 products in hardware: the two paths round apart
        assert bf16 > 10 * r["max_abs_diff"]
    else:  # an AVX2-only CPU emulates them (float32 products rounded after): the paths can agree closely
        assert math.isfinite(bf16) and bf16 >= 0  # (2026-12-02, AMD EPYC with AVX2: 3.8e-06 against 7.6e-06)


def test_scoring_compare_by_hand():
    from benchmarks import scoring

    found = scoring.compare({"shared": [[-1.0, -2.0], [-3.0, -2.5, -9.0]],
                             "per_option": [[-1.00005, -2.0], [-3.0, -2.5, -9.0]]}, 1e-4)  # fmt: skip
    assert found["max_abs_diff"] == pytest.approx(5e-5) and found["argmax_differs"] == [] and found["agree"]
    found = scoring.compare({"shared": [[-1.0, -1.00002]], "per_option": [[-1.00003, -1.00002]]}, 1e-4)
    assert found["argmax_differs"] == [0] and not found["agree"]  # within the tolerance, another argmax
    assert not scoring.compare({"shared": [[-1.0, -2.0]], "per_option": [[-1.0, -2.0002]]}, 1e-4)["agree"]


def test_scoring_reports_no_speed_when_the_variants_differ(monkeypatch, capsys):
    """Shared-prompt scores 1e-3 off the per-option ones: the benchmark exits 1, naming the difference,
    before any timing."""
    from benchmarks import scoring

    real = scoring.option_loglikelihoods

    def off(*args, share_prompt, **kwargs):
        return [
            [v + (1e-3 if share_prompt else 0.0) for v in row]
            for row in real(*args, share_prompt=share_prompt, **kwargs)
        ]

    monkeypatch.setattr(scoring, "option_loglikelihoods", off)
    monkeypatch.setattr(scoring, "alternate", lambda *a: pytest.fail("timed before the check"))
    with pytest.raises(SystemExit, match=r"differ \(max abs difference 0.001, tolerance 0.0001 in float32"):
        scoring.main(["--smoke", "--device", "cpu", "--models", "base"])


def test_scoring_reports_no_speed_when_the_shared_path_is_not_taken(monkeypatch):
    """The defect fixed in eval/scoring.py: the KV-cache argument not found, so `share_prompt=True` silently
    ran one pass per option (same scores, same cost). The benchmark sees the same tokens fed and exits 1."""
    from benchmarks import scoring

    import asymlora.eval.scoring

    monkeypatch.setattr(asymlora.eval.scoring, "_cache_name", lambda model: None)
    monkeypatch.setattr(scoring, "alternate", lambda *a: pytest.fail("timed before the check"))
    with pytest.raises(SystemExit, match="the shared-prompt path was not taken"):
        scoring.main(["--smoke", "--device", "cpu", "--models", "alora"])


def test_serving_smoke(capsys):
    """Mixed-task batches: every row of every method equals its task's merged model, peft's = ALoRA's."""
    from benchmarks import serving

    result = serving.main(["--smoke"])
    assert set(result["batches"]) == {"1", "8"} and set(result["scaling"]) == {"2", "4", "8"}
    for r in result["batches"].values():
        assert set(r["tokens_per_s"]) == {"base", *serving.METHODS, "peft"}
        assert set(r["equals_merged"].values()) == {1.0} and r["peft_equals_alora"] == 1.0
    assert result["profile"]["8"]["extra_ms_by_op"]
    assert '"benchmark": "serving"' in capsys.readouterr().out


def test_scaling_smoke_and_plot(smoke):
    result, _, out_dir = smoke
    assert (out_dir / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    checks = result["scaling"]["checks"]
    assert checks["fit_alora"]["params_A_is_N_r_d_in_and_B_is_r_d_out"]
    assert checks["alora"]["params_B_growth"] == 1  # ALoRA's B does not grow with N
    assert checks["hydralora"]["params_B_growth"] == max(checks["N_range"])
    assert all(set(row["spread"]) == {"total", "x_side", "b_side"} for row in result["scaling"]["rows"])
    assert (
        "| sweep | N | r | method | adapter ms | spread | x side ms |"
        in (out_dir / "performance.md").read_text()
    )


def test_scaling_plot_is_written_atomically(tmp_path, monkeypatch):
    """The plot of the committed scaling.json, then a plot that fails half-way: the first PNG is intact
    (savefig wrote docs/scaling.png in place)."""
    from benchmarks import scaling
    from matplotlib.figure import Figure

    result = json.loads((RESULTS / "scaling.json").read_text())
    target = tmp_path / "docs" / "scaling.png"
    scaling.plot(result, target)
    first = target.read_bytes()
    assert first[:8] == b"\x89PNG\r\n\x1a\n"

    def half_written(self, fname, **kwargs):
        Path(fname).write_bytes(first[:100])
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", half_written)
    with pytest.raises(KeyboardInterrupt):
        scaling.plot(result, target)
    assert target.read_bytes() == first and [p.name for p in target.parent.iterdir()] == ["scaling.png"]


def test_run_all_writes_the_doc(smoke):
    doc = (smoke[2] / "performance.md").read_text()
    for heading in ("## Targets", "## 1. Training step", "## 2. Layer level", "## 3. Inference",
                    "## 4. Federated", "## 5. Scaling", "## 7. Scoring", "## Findings", "## Reproduce"):  # fmt: skip
        assert heading in doc, heading
    assert "python benchmarks/train_step.py" in doc


def test_run_all_exits_1_when_a_benchmark_failed(monkeypatch, capsys):
    """The run goes on past a failed benchmark, but the command exits 1 (it exited 0: CI and `make bench`
    saw success)."""
    import runpy
    import sys

    from benchmarks import layers

    def boom(argv):
        raise RuntimeError("boom")

    monkeypatch.setattr(layers, "main", boom)
    monkeypatch.setattr(sys, "argv", ["benchmarks/run_all.py", "--smoke", "--only", "layers"])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(ROOT / "benchmarks" / "run_all.py"), run_name="__main__")
    assert exited.value.code == 1
    assert "FAILED layers: RuntimeError: boom" in capsys.readouterr().out


def test_run_all_goes_on_past_a_benchmark_that_exits(monkeypatch, capsys):
    """A benchmark that exits (train_precision's unreadable --config, federated's invalid config raise
    SystemExit) is a failure like any other: the run goes on (it ended the whole run, and the results of the
    benchmarks before it were lost)."""
    from benchmarks import layers

    def exits(argv):
        raise SystemExit("benchmarks/layers.py: cannot")

    monkeypatch.setattr(layers, "main", exits)
    res = run_all.main(["--smoke", "--only", "layers,scaling"])
    assert res["run_all"]["failed"]["layers"]["error"] == "SystemExit: benchmarks/layers.py: cannot"
    assert "scaling" in res and "layers" not in res


def test_run_all_page_is_the_render_of_its_json(smoke):
    out_dir = smoke[2]
    assert report.render_page(out_dir) == (out_dir / "performance.md").read_text()


def test_train_step_args():
    args = train_step.parse_args(["--all-projections", "--smoke"])
    assert args.targets == list(train_step.ALL_SEVEN)
    assert args.memory_variants == ["peft_lora", "alora"]
    with pytest.raises(SystemExit):
        train_step.parse_args(["--variants", "alora"])  # the baseline must be there


BAD_FLAGS = [
    ("layers", "main", ["--smoke", "--threads", "-1"], "argument --threads: expected an integer >= 1, got -1"),
    ("layers", "main", ["--smoke", "--device", "cuda"], "--device cuda: torch sees no CUDA device"),
    ("inference", "parse_args", ["--smoke", "--batches", "1,x"], "argument --batches: expected an integer >= 1"),
    ("inference", "parse_args", ["--smoke", "--task", "3"], "--task must be one of the --experts 3 tasks"),
    ("train_step", "parse_args", ["--smoke", "--steps", "0"], "argument --steps: expected an integer >= 1, got 0"),
    ("train_step", "parse_args", ["--smoke", "--memory-variants", "alora,foo"], "--memory-variants: unknown ['foo']"),
    ("train_precision", "parse_args", ["--smoke", "--steps", "0"], "argument --steps: expected an integer >= 1"),
    ("scaling", "parse_args", ["--smoke", "--ns", "0"], "argument --ns: expected an integer >= 1, got 0"),
    ("serving", "parse_args", ["--smoke", "--scaling-n", "2,-4"], "argument --scaling-n: expected an integer >= 1"),
    ("federated", "parse_args", ["--smoke", "--strategies", "fedit,bogus"], "--strategies: unknown ['bogus']"),
    ("scoring", "parse_args", ["--smoke", "--models", "alora,foo"], "--models: unknown ['foo']"),
    ("scoring", "parse_args", ["--smoke", "--examples", "0"], "argument --examples: expected an integer >= 1, got 0"),
    ("scoring", "main", ["--smoke", "--device", "cuda"], "--device cuda: torch sees no CUDA device"),
    ("federated", "parse_args", ["--smoke", "--device", "cuda"], "--device cuda: torch sees no CUDA device"),
    ("run_all", "parse_args", ["--smoke", "--device", "cuda"], "--device cuda: torch sees no CUDA device"),
    ("run_all", "parse_args", ["--smoke", "--threads", "0"], "argument --threads: expected an integer >= 1, got 0"),
    ("calibrated_export", "main", ["runs/none", "--out", "x", "--rank", "molora"], "--rank takes METHOD=K"),
    ("calibrated_export", "main", ["runs/none", "--out", "x"], "runs/none is not an asymlora run directory"),
]  # fmt: skip


@pytest.mark.parametrize(("module", "entry", "argv", "message"), BAD_FLAGS)
def test_bad_flags_exit_2_with_the_reason(module, entry, argv, message, monkeypatch, capsys):
    """A bad value (a count below 1, a malformed list, an unknown name, ``--device cuda`` on a machine
    without CUDA) is the parser's error, exit 2, before anything is built or timed (they were tracebacks
    mid-run, a StatisticsError after the steps, or Ray waiting for a GPU)."""
    import importlib

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exited:
        getattr(importlib.import_module(f"benchmarks.{module}"), entry)(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_invalid_configs_exit_2_before_anything_runs(monkeypatch, capsys):
    """federated.py with --ranks not one per client (its second group's config) and train_precision.py with
    a --config that does not load exit 2 naming the error, before any run (federated ran its first group,
    minutes, then exited 1; train_precision exited 1)."""
    from benchmarks import federated

    import asymlora.federated.run

    monkeypatch.setattr(asymlora.federated.run, "run", lambda *a, **k: pytest.fail("a run started"))
    with pytest.raises(SystemExit) as exited:
        federated.main(["--ranks", "8,8,16"])
    assert exited.value.code == 2 and "got 3 client ranks [8, 8, 16] for 2 clients" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        train_precision.main(["--smoke", "--config", "no-such.yaml"])
    assert exited.value.code == 2 and "--config no-such.yaml: config file" in capsys.readouterr().err


def test_count_saved_counts_unique_storages():
    import torch

    w = torch.randn(4, 3, requires_grad=True)
    x = torch.randn(5, 4)
    with train_step.count_saved(exclude=[w]) as saved:
        y = (x @ w).relu()  # mm saves x (w excluded); relu saves its output
        (y * 1.0).sum()
    assert saved["bytes"] == x.numel() * 4 + y.numel() * 4


@pytest.mark.fed
def test_federated_smoke_bytes_match_the_accounting(tmp_path):
    """Real simulation runs (tiny model, 2 clients, every strategy, with and without local training): the
    bytes each run logged equal `run_round_cost`'s prediction, and the doc gets the section."""
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        res = run_all.main(["--smoke", "--only", "federated", "--out-dir", str(tmp_path)])
    assert res["run_all"]["failed"] == {}
    result = res["federated"]
    assert set(result["strategies"]) == {"fedit", "ffa", "fedsa", "fedalora", "zeropad", "fedalora-het"}
    assert result["bytes_match_accounting"]
    for name, s in result["strategies"].items():
        assert s["payload_up_vs_predicted"] == s["payload_down_vs_predicted"] == 1.0, name
        assert s["payload_up_same_without_training"] and s["payload_down_same_without_training"], name
        assert s["framing_up"] > 1.0 and s["bytes_up"] > s["payload_up"] > 0, name  # + keys, array headers
        assert s["round_s_no_training"] > 0 and s["round_s_training"] > 0, name
    moved = {n: s["payload_up"] + s["payload_down"] for n, s in result["strategies"].items()}
    assert moved["fedalora"] == moved["ffa"] < moved["fedit"]  # B only vs A and B
    assert "federated" in json_lines(buf.getvalue())
    doc = (tmp_path / "performance.md").read_text()
    assert "## 4. Federated" in doc and "| `fedalora` |" in doc and "**yes**" in doc


# --- docs/performance.md is rendered from the committed JSON -------------------------------------------------
def test_the_committed_page_is_the_render_of_the_committed_json():
    """Nobody edits a figure of docs/performance.md by hand: edit benchmarks/results/*.json (by re-running the
    benchmark) or the prose of benchmarks/*.md.j2, then `python -m benchmarks.report`."""
    page = (ROOT / "docs" / "performance.md").read_text()
    assert report.render_page(RESULTS) == page, (
        "docs/performance.md is stale: run `python -m benchmarks.report`"
    )


def test_the_readme_figures_are_the_committed_json():
    """README.md types its benchmark figures by hand (the layer table and ratios of its "Benchmarks"
    section, the bf16 speed-up of its train example): each must be the committed JSON's, at the printed
    precision."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Benchmarks") : readme.index("## Development")]
    ly = json.loads((RESULTS / "layers.json").read_text())
    run = json.loads((RESULTS / "run_all.json").read_text())
    shape, a, w, r = ly["shape"], ly["adapter_ms"], ly["layer_ms"], ly["ratios"]
    reps = shape.get("reps", 7 if "--reps" not in ly["_run"]["command"] else None)  # layers.py's default
    assert f"`{ly['_run']['command'].split(' --')[0]}` — one adapted {shape['dim']}×{shape['dim']} layer, " \
        f"{shape['tokens']} tokens, r = {shape['r']}, N = {shape['experts']}," in section  # fmt: skip
    assert f"({run['machine']['cores']} CPU cores,\n{ly['dtype']}, median of {reps};" in section
    rows = [
        f"| ALoRA fused | {a['fused_alora']:.1f} | {w['fused_alora']:.1f} |",
        f"| ALoRA loop over experts (released code's algorithm) | {a['loop_alora']:.1f} | {w['loop_alora']:.1f} |",
        f"| peft LoRA, same r | {a['peft_lora']:.1f} | {w['peft_lora']:.1f} |",
        "| HydraLoRA / MoLoRA / MALoRA fused | "
        + " / ".join(f"{a[m + '_fused']:.1f}" for m in ("hydralora", "molora", "malora"))
        + " | "
        + " / ".join(f"{w[m + '_fused']:.1f}" for m in ("hydralora", "molora", "malora"))
        + " |",
        f"| W0 x alone | | {w['base_only']:.1f} |",
    ]
    for row in rows:
        assert row in section, row
    assert (f"Fused ALoRA is {r['adapter_vs_loop']:.2f}× faster than the loop form on the adapter path, "
            f"{r['adapter_vs_peft_lora']:.2f}× peft LoRA's adapter path and\n{r['layer_vs_peft_lora']:.3f}× peft "
            "LoRA's whole layer") in section  # fmt: skip
    tp = json.loads((RESULTS / "train_precision.json").read_text())
    speedup = tp["step_s"]["fp32_full"] / tp["step_s"]["bf16_full"]
    # the same step on a CPU where bf16 is emulated (docs/sweep.md, "bf16 or float32")
    avx2 = json.loads((RESULTS / "train_precision_avx2.json").read_text())
    slowdown = avx2["step_s"]["bf16_full"] / avx2["step_s"]["fp32_full"]
    assert (f"bfloat16 autocast: {speedup:.1f}x faster steps on an AVX512-BF16 CPU (docs/performance.md), "
            f"{slowdown:.1f}x slower on one with AVX2 only") in readme  # fmt: skip
    assert tp["cpu_bf16"]["avx512_bf16"] and not avx2["cpu_bf16"]["avx512_bf16"]


def test_the_page_reads_its_figures_from_the_json(tmp_path):
    """A changed figure in a JSON file changes the page (and the target status); a missing file drops its
    section; the serving paragraph's sums are the JSON's (hand-computed from serving.json below)."""
    for path in RESULTS.glob("*.json"):
        (tmp_path / path.name).write_text(path.read_text())
    page = report.render_page(tmp_path)
    # serving.json, batch 8: ALoRA 6659.0 ms - base 5703.2 ms = 955.8 ms of extra self CPU time
    assert "ALoRA's extra over the base model is 956 ms of 5,703 ms" in page
    assert "≈ 1 / 0.815 = 1.23× peft" in page  # 1 / 0.8148 = 1.2273
    layers = json.loads((tmp_path / "layers.json").read_text())
    layers["ratios"]["adapter_vs_loop"] = 2.5
    (tmp_path / "layers.json").write_text(json.dumps(layers))
    (tmp_path / "scaling.json").unlink()
    page = report.render_page(tmp_path)
    assert "| fused ALoRA vs loop form, adapter path (layer) | 2.500× | ≥ 3× | **missed** |" in page
    assert "fused ALoRA vs loop (adapter path) 2.50× faster" in page
    assert "**Missed targets, by how much and why**" in page
    assert "## 5. Scaling" not in page and "## 2. Layer level" in page


def test_the_page_reads_the_scoring_figures_from_the_json(tmp_path):
    """§7 comes from scoring.json (figures changed by hand below: 12.5 / 5.0 examples/s, 500 / 200 tokens fed);
    without the file the page has no §7 and no scoring command."""
    for path in RESULTS.glob("*.json"):
        (tmp_path / path.name).write_text(path.read_text())
    scr = json.loads((RESULTS / "scoring.json").read_text())
    alora = scr["models"]["alora"]
    alora.update(examples_per_s={"per_option": 5.0, "shared": 12.5}, shared_vs_per_option=2.5)
    alora["counts"]["per_option"]["tokens_fed"], alora["counts"]["shared"]["tokens_fed"] = 500, 200
    (tmp_path / "scoring.json").write_text(json.dumps(scr))
    page = report.render_page(tmp_path)
    section = page[page.index("## 7. Scoring choice tasks") : page.index("## Findings")]
    assert "| `alora` | 5.00 | " in section and " | 12.50 | " in section and "| 2.500× |" in section
    assert "feeds 2.50 times fewer tokens, and is 2.500× as fast for ALoRA (" in section  # 500 / 200
    assert f"`{scr['command']}`" in section and scr["command"] + "\n" in page[page.index("## Reproduce") :]
    (tmp_path / "scoring.json").unlink()
    page = report.render_page(tmp_path)
    assert "## 7. Scoring" not in page and "benchmarks/scoring.py" not in page


def test_the_page_says_how_the_peaks_were_measured(tmp_path):
    """§1 describes the peak-memory columns from the children's records: peak RSS (VmHWM) with the mmap
    threshold they ran with, or torch.cuda.max_memory_allocated on CUDA (it called every peak an RSS
    with a 64 KiB threshold, whatever was measured)."""
    for path in RESULTS.glob("*.json"):
        (tmp_path / path.name).write_text(path.read_text())
    ts = json.loads((RESULTS / "train_step.json").read_text())

    def section_1(how: str, threshold: str | None) -> str:
        for peak in ts["peak"].values():
            peak.update(how=how, malloc_mmap_threshold=threshold)
        (tmp_path / "train_step.json").write_text(json.dumps(ts))
        page = report.render_page(tmp_path)
        return page[page.index("## 1. Training step") : page.index("### All seven projections")]

    cuda = section_1("torch.cuda.max_memory_allocated", "65536")
    assert "**peak MiB**: `torch.cuda.max_memory_allocated` of a fresh child process" in cuda
    assert "RSS" not in cuda and "KiB" not in cuda
    rss = section_1("VmHWM after clear_refs", "131072")
    assert "peak RSS of a fresh child process" in rss and "mmap threshold fixed at 128 KiB" in rss
    assert "glibc's default mmap threshold, which grows" in section_1("VmHWM after clear_refs", None)
    maxrss = section_1("ru_maxrss (includes loading)", "65536")
    assert "loading included" in maxrss and "so loading does not count" not in maxrss


def test_the_templates_type_no_measured_figure():
    """Outside its {{ placeholders }} and {% tags %}, a template's prose has no number with a unit of a
    measurement (×, %, ms, s, MiB, tok/s): those come from the JSON."""
    import re

    for template in (ROOT / "benchmarks").glob("*.md.j2"):
        prose = re.sub(r"\{\{.*?\}\}|\{%.*?%\}|\{#.*?#\}", "", template.read_text(), flags=re.S)
        typed = re.findall(r"\d+(?:[.,]\d+)?\s?(?:×|%|ms\b|s\b|MiB|tok/s)", prose)
        assert not typed, f"{template.name} types measured figures: {typed}"


def test_a_failed_benchmark_leaves_no_earlier_figures_on_the_page(tmp_path):
    """run_all writes over a results folder that holds an earlier run: a benchmark that failed this time
    has its earlier JSON removed, so the page lists the failure and shows no figure of the earlier run
    under this run's header (the targets table included)."""
    for path in RESULTS.glob("*.json"):
        (tmp_path / path.name).write_text(path.read_text())
    run = json.loads((RESULTS / "run_all.json").read_text())
    run["failed"] = {"layers": {"error": "RuntimeError: boom", "command": "python benchmarks/layers.py"}}
    run_all.write_results({"run_all": run}, tmp_path, tmp_path, None)
    page = (tmp_path / "performance.md").read_text()
    assert not (tmp_path / "layers.json").exists()
    assert "- `python benchmarks/layers.py`: RuntimeError: boom" in page
    assert "## 2. Layer level" not in page and "fused ALoRA vs loop form, adapter path" not in page
    assert "## 1. Training step, whole model" in page  # the others' files stay


def test_a_step_without_all_projections_drops_the_earlier_seven_projection_step(tmp_path):
    """`run_all.py` without ``--all-projections`` over a folder holding an earlier seven-projection step: that
    file is removed (the page showed the earlier run's table and targets under this run's header)."""
    for path in RESULTS.glob("*.json"):
        (tmp_path / path.name).write_text(path.read_text())
    run = json.loads((RESULTS / "run_all.json").read_text())
    ts = json.loads((RESULTS / "train_step.json").read_text())
    run_all.write_results({"train_step": ts, "run_all": run}, tmp_path, tmp_path, None)
    page = (tmp_path / "performance.md").read_text()
    assert not (tmp_path / "train_step_all.json").exists() and (tmp_path / "layers.json").exists()
    assert "### All seven projections" not in page and "(whole model, all seven projections)" not in page
    assert "## 1. Training step, whole model" in page


def test_render_without_the_run_record_names_the_fix(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="run_all.json"):
        report.render_page(tmp_path)
    assert report.main(["--results", str(tmp_path), "--out", str(tmp_path / "p.md")]) == 2
    assert "benchmarks/run_all.py" in capsys.readouterr().err and not (tmp_path / "p.md").exists()


def test_target_rows_by_hand():
    """Bounds and gaps of the targets table, on hand-made figures."""
    res = {
        "train_step": {"ratios": {"alora": {"step_time": 1.21, "peak_memory": 1.0}}},
        "inference": {
            "batches": {"1": {"merged_vs_base": 0.93, "tolerance": 0.05, "merged_equals_base_speed": False}}
        },
    }
    rows = {r["figure"]: r for r in tables.target_rows(res)}
    step = rows["ALoRA / peft LoRA, training step time (whole model)"]
    assert step["target"] == "≤ 1.10×" and not step["met"] and step["gap"] == pytest.approx(0.11 / 1.10)
    assert rows["ALoRA / peft LoRA, peak memory (whole model)"]["met"]
    merged = rows["merged / base tokens/s, batch 1"]
    assert merged["target"] == "1 ± 5%" and merged["gap"] == pytest.approx(0.07 - 0.05)


def test_extra_calls_by_hand():
    profiles = {"peft_lora": {"calls": {"aten::mm": 10, "aten::cat": 1, "cudaLaunch": 3}},
                "alora": {"calls": {"aten::mm": 10, "aten::cat": 4, "aten::softmax": 2, "cudaLaunch": 9}}}  # fmt: skip
    assert train_step.extra_calls(profiles) == [("aten::cat", 3), ("aten::softmax", 2)]


def hand_made_precision() -> dict:
    """A small train_precision.json by hand: 4.70 / 3.90 / 3.30 / 2.75 s per step, 40 targets of 1200."""
    variants = {n: {"autocast": "bfloat16" if n.startswith("bf16") else None, "target_logits": n.endswith("targets")}
                for n in train_precision.VARIANTS}  # fmt: skip
    step = {"fp32_full": 4.70, "fp32_targets": 3.90, "bf16_full": 3.30, "bf16_targets": 2.75}
    ratios = {n: {"step_time": round(s / 4.70, 4), "cpu_time": round(s / 4.70, 4), "step_time_paired": 0.6}
              for n, s in step.items()}  # fmt: skip
    return {
        "benchmark": "train_precision", "command": "python benchmarks/train_precision.py --save x.json",
        "date": "2026-11-30 18:00 UTC", "model": "smollm2-135m", "smoke": False, "device": "cpu",
        "setting": {"config": "configs/multitask_bigbench.yaml", "batch": 8, "max_length": 192, "method": "alora",
                    "r": 8, "experts": 3, "router": "soft", "targets": ["q_proj", "o_proj"], "steps": 10,
                    "threads": 2},
        "variants": variants, "baseline": "fp32_full", "loss_rtol": 1e-5, "tasks": [f"t{i}" for i in range(8)],
        "slices_logits": True, "vocab_size": 49152, "hidden_size": 576,
        "tokens": {"target_per_batch": 40.0, "positions_per_batch": 1200.0, "real_per_batch": 1000.0,
                   "target_fraction": 40 / 1200, "batches": 11},
        "step_s": step, "cpu_s": {n: 2 * s for n, s in step.items()}, "spread": dict.fromkeys(step, 0.05),
        "ratios": ratios, "first_batch_loss": {"fp32_full": 2.5, "fp32_targets": 2.5000001, "bf16_full": 2.51,
                                               "bf16_targets": 2.52},
        "loss_rel_diff": {"fp32_full": 0.0, "fp32_targets": 4e-8, "bf16_full": 0.004, "bf16_targets": 0.008},
        "loss_rel_diff_max_over_steps": {"fp32_full": 0.0, "fp32_targets": 3e-7, "bf16_full": 0.01,
                                         "bf16_targets": 0.02},
        "cpu_bf16": {"avx512_bf16": True, "amx_bf16": False},
        "machine": {"cpu": "Test CPU", "cores": 2, "commit": "abc1234"}, "load_avg_1min": [0.5, 2.0], "wall_s": 300,
    }  # fmt: skip


def test_the_page_reads_the_precision_figures_from_the_json(tmp_path):
    """train_precision.json adds its section after §1 (figures hand-computed from `hand_made_precision`);
    without the file the page has no such section."""
    for path in RESULTS.glob("*.json"):
        (tmp_path / path.name).write_text(path.read_text())
    (tmp_path / "train_precision.json").unlink(missing_ok=True)
    without = report.render_page(tmp_path)
    assert "Target-position logits" not in without and "train_precision.py" not in without
    (tmp_path / "train_precision.json").write_text(json.dumps(hand_made_precision()))
    page = report.render_page(tmp_path)
    section = page[page.index("### Target-position logits and bf16 autocast (the campaign's step)") :]
    order = [page.index(h) for h in ("### Where the time goes", "### Target-position", "## 2. Layer")]
    assert order == sorted(order)
    assert "holds 40.0 target tokens on average (3.3 % of them)" in section  # 40 / 1200
    assert "a 49,152 × 576 product per position" in section
    assert "The step is 1.21× faster in float32, 1.20× faster under bf16" in section  # 4.70/3.90, 3.30/2.75
    assert "autocast makes the step 1.42× faster; with the target-position logits, 1.71× faster" in section
    assert "differ by 4.0e-08 relative (the benchmark stops above 1e-05)" in section
    assert "This CPU has AVX512-BF16" in section
    row = "| `bf16_targets` | bfloat16 | target positions | 2.75 | 0.585× | 0.600× | 5.50 | 0.585× | 5% | 2.520000 |"
    assert row in section  # 2.75 / 4.70 = 0.5851; CPU 2 × 2.75 s
    assert "python benchmarks/train_precision.py --save x.json\n" in page[page.index("## Reproduce") :]
