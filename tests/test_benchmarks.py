"""Seconds-long smokes of every benchmark (``benchmarks/*.py --smoke``: tiny random Llama, tiny shapes,
1-2 repetitions) so they cannot rot. The figures themselves are meaningless at these sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchmarks import run_all, train_step

NOT_FEDERATED = ",".join(b for b in run_all.BENCHMARKS if b != "federated")
"""The federated smoke starts Ray: it has its own test, marked ``fed``."""


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, Path]:
    """One ``run_all.py --smoke`` (every benchmark but the federated one, in seconds): its result, its
    stdout, its output dir."""
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
                "--save",
                str(out_dir / "perf.json"),
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
    result, stdout, _ = smoke
    assert result["failed"] == {}
    assert {"layers", "train_step", "inference", "scaling", "hot_path_candidate", "run_all"} <= set(
        json_lines(stdout)
    )


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


def test_hot_path_candidate_is_exact(smoke):
    assert smoke[0]["candidate"]["max_rel_diff"] < 1e-5  # the scaling folded into the rank side


def test_run_all_writes_the_doc(smoke):
    doc = (smoke[2] / "performance.md").read_text()
    for heading in ("## Targets", "## 1. Training step", "## 2. Layer level", "## 3. Inference",
                    "## 4. Federated", "## 5. Scaling", "## Findings", "## Reproduce"):  # fmt: skip
        assert heading in doc, heading
    assert "python benchmarks/train_step.py" in doc


def test_run_all_renders_the_doc_again_from_saved_figures(smoke, tmp_path, capsys):
    out_dir = smoke[2]
    run_all.main(["--render", str(out_dir / "perf.json"), "--out-dir", str(tmp_path)])
    assert (tmp_path / "performance.md").read_text() == (out_dir / "performance.md").read_text().replace(
        "![scaling](scaling.png)\n\n", ""
    )


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
    fed = res["federated"]
    assert fed["status"] == "measured", fed
    result = fed["result"]
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


def test_regenerating_the_performance_page_keeps_the_serving_section(tmp_path) -> None:
    from benchmarks.run_all import write_doc

    page = tmp_path / "performance.md"
    page.write_text("# Performance\n\n## 5. Scaling\n\nold\n\n## 6. Serving mixed-task batches (x)\n\nkept 1.19×\n\n"
                    "## Findings and recommended changes\n\nold findings\n")  # fmt: skip
    write_doc(
        page, "# Performance\n\n## 5. Scaling\n\nnew\n\n## Findings and recommended changes\n\nnew findings\n"
    )
    assert page.read_text() == (
        "# Performance\n\n## 5. Scaling\n\nnew\n\n## 6. Serving mixed-task batches (x)\n\nkept 1.19×\n\n"
        "## Findings and recommended changes\n\nnew findings\n"
    )
