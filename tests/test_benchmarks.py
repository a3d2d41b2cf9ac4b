"""Seconds-long smokes of every benchmark (``benchmarks/*.py --smoke``: tiny random Llama, tiny shapes,
1-2 repetitions) so they cannot rot. The figures themselves are meaningless at these sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchmarks import run_all, train_step


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, Path]:
    """One ``run_all.py --smoke`` (every benchmark, in seconds): its result, its stdout, its output dir."""
    import contextlib
    import io

    out_dir = tmp_path_factory.mktemp("perf")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        result = run_all.main(["--smoke", "--out-dir", str(out_dir), "--save", str(out_dir / "perf.json")])
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


def test_federated_hook_summarises_rounds(tmp_path):
    log = tmp_path / "fedalora" / "rounds.jsonl"
    log.parent.mkdir()
    rows = [
        {
            "round": i,
            "strategy": "fedalora",
            "seconds": 10.0 + i,
            "clients": [
                {"client": c, "bytes_up": 100 * (c + 1), "client_seconds": 4.0 + c} for c in range(2)
            ],
        }
        for i in range(3)
    ]
    log.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    assert run_all.find_rounds_jsonl(str(tmp_path)) == [log]
    assert run_all.find_rounds_jsonl(str(tmp_path / "missing")) == []
    summary = run_all.summarise_rounds(log)
    assert (summary["strategy"], summary["rounds"]) == ("fedalora", 3)
    med = summary["median"]
    assert med["seconds"] == 11.0
    assert med["clients.bytes_up"] == 150.0  # mean over the round's clients
    assert med["overhead_seconds"] == 6.0  # 11 s round - 5 s slowest client
    assert "round" not in med and "clients.client" not in med
