"""Seconds-long smokes of every benchmark (``benchmarks/*.py --smoke``: tiny random Llama, tiny shapes,
1-2 repetitions) so they cannot rot. The figures themselves are meaningless at these sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchmarks import report, run_all, tables, train_step
from benchmarks.common import RESULTS, ROOT

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
    assert {"layers", "train_step", "inference", "scaling", "run_all"} <= set(json_lines(stdout))
    for name in ("run_all", "layers", "train_step", "inference", "scaling"):  # what the page is rendered from
        assert json.loads((out_dir / f"{name}.json").read_text())["benchmark"] in (name, "run_all"), name


def test_layers_smoke(smoke):
    result = smoke[0]["layers"]
    assert {"adapter_vs_loop", "adapter_vs_peft_lora", "layer_vs_peft_lora"} <= set(result["ratios"])


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


def test_inference_smoke(smoke):
    result = smoke[0]["inference"]
    for r in result["batches"].values():
        assert set(r["tokens_per_s"]) == {"base", "merged", "unmerged"}
        assert r["merged_equals_unmerged"] == 1.0  # merging task 0 == routing to task 0


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


def test_run_all_writes_the_doc(smoke):
    doc = (smoke[2] / "performance.md").read_text()
    for heading in ("## Targets", "## 1. Training step", "## 2. Layer level", "## 3. Inference",
                    "## 4. Federated", "## 5. Scaling", "## Findings", "## Reproduce"):  # fmt: skip
        assert heading in doc, heading
    assert "python benchmarks/train_step.py" in doc


def test_run_all_page_is_the_render_of_its_json(smoke):
    out_dir = smoke[2]
    assert report.render_page(out_dir) == (out_dir / "performance.md").read_text()


def test_train_step_args():
    args = train_step.parse_args(["--all-projections", "--smoke"])
    assert args.targets == list(train_step.ALL_SEVEN)
    assert args.memory_variants == ["peft_lora", "alora"]
    with pytest.raises(SystemExit):
        train_step.parse_args(["--variants", "alora"])  # the baseline must be there


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


def test_the_templates_type_no_measured_figure():
    """Outside its {{ placeholders }} and {% tags %}, a template's prose has no number with a unit of a
    measurement (×, %, ms, s, MiB, tok/s): those come from the JSON."""
    import re

    for template in (ROOT / "benchmarks").glob("*.md.j2"):
        prose = re.sub(r"\{\{.*?\}\}|\{%.*?%\}|\{#.*?#\}", "", template.read_text(), flags=re.S)
        typed = re.findall(r"\d+(?:[.,]\d+)?\s?(?:×|%|ms\b|s\b|MiB|tok/s)", prose)
        assert not typed, f"{template.name} types measured figures: {typed}"


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
