"""Analysis toolkit: metrics with known answers, adapter reading, the report, training traces."""

from __future__ import annotations

import json
import math
from pathlib import Path

import peft
import pytest
import torch
from peft.tuners.lora import LoraLayer
from tests.conftest import make_tiny_llama

import asymlora
from asymlora.analysis import (
    TraceRecorder,
    analyze,
    cca_similarity,
    check_compatible,
    compare_subspaces,
    find_adapter_dir,
    frobenius_norm,
    load_adapter,
    magnitude_direction_change,
    numerical_rank,
    plot_traces,
    principal_angles,
    read_traces,
    relative_change,
    singular_spectrum,
    subspace_similarity,
    subspace_similarity_grid,
)
from asymlora.tuner.layer import AsymLoraLayer

TARGETS = ["q_proj", "v_proj"]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=torch.float64)


def orthogonal(n: int, seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(randn(n, n, seed=seed))
    return q


# --- subspace similarity -------------------------------------------------------------------------------------
def test_identical_row_space_gives_one_and_is_invariant_to_row_mixing_and_scale():
    x = randn(8, 64)
    m = randn(8, 8, seed=1)  # invertible mixing of the rows: same row space
    assert subspace_similarity(x, 3.7 * (m @ x), 8, 8, "row").item() == pytest.approx(1.0, abs=1e-10)
    # an orthogonal mixing keeps the singular vectors themselves, so every top-i is preserved
    q = orthogonal(8, seed=2)
    grid = subspace_similarity_grid(x, 0.01 * (q @ x), "row")
    assert grid.shape == (8, 8)
    assert torch.allclose(grid.diagonal(), torch.ones(8, dtype=torch.float64), atol=1e-10)


def test_column_space_is_the_side_for_b():
    b = randn(64, 8)
    m = randn(8, 8, seed=3)
    assert subspace_similarity(b, (b @ m) * 5, 8, 8, "col").item() == pytest.approx(1.0, abs=1e-10)
    # mixing the *columns* of an A-like matrix changes its row space: the side matters
    a = randn(8, 64)
    assert subspace_similarity(a, a @ randn(64, 64, seed=4), 8, 8, "row").item() < 0.9


def test_orthogonal_subspaces_give_zero():
    e = torch.eye(16, dtype=torch.float64)
    x = randn(4, 4, seed=1) @ e[:4]  # spans e1..e4
    y = randn(4, 4, seed=2) @ e[4:8]  # spans e5..e8
    assert subspace_similarity(x, y, 4, 4, "row").item() == pytest.approx(0.0, abs=1e-12)
    assert subspace_similarity(x.T, y.T, 4, 4, "col").item() == pytest.approx(0.0, abs=1e-12)
    assert torch.allclose(principal_angles(x, y, 4, 4), torch.full((4,), math.pi / 2, dtype=torch.float64))


def test_joint_rotation_of_the_space_leaves_similarity_unchanged():
    x, y = randn(3, 6, 40, seed=1), randn(3, 5, 40, seed=2)
    r = orthogonal(40, seed=3)
    before = subspace_similarity(x, y, 4, 3, "row")
    after = subspace_similarity(x @ r, y @ r, 4, 3, "row")
    assert before.shape == (3,)
    assert torch.allclose(before, after, atol=1e-10)
    assert torch.allclose(
        subspace_similarity(x.mT, y.mT, 4, 3, "col"),
        subspace_similarity(r @ x.mT, r @ y.mT, 4, 3, "col"),
        atol=1e-10,
    )


def test_known_principal_angles():
    a, b = 0.3, 1.1
    e = torch.eye(10, dtype=torch.float64)
    ux = torch.stack([e[0], e[1]])
    uy = torch.stack([math.cos(a) * e[0] + math.sin(a) * e[2], math.cos(b) * e[1] + math.sin(b) * e[3]])
    x = torch.tensor([[2.0, 1.0], [0.5, 3.0]], dtype=torch.float64) @ ux  # same row spaces, other bases
    y = torch.tensor([[1.0, -1.0], [2.0, 0.3]], dtype=torch.float64) @ uy
    angles = principal_angles(x, y, 2, 2, "row")
    assert torch.allclose(angles, torch.tensor([a, b], dtype=torch.float64), atol=1e-10)
    expected = (math.cos(a) ** 2 + math.cos(b) ** 2) / 2
    assert subspace_similarity(x, y, 2, 2, "row").item() == pytest.approx(expected, abs=1e-12)


def test_grid_matches_pointwise_and_batches_over_layers():
    x, y = randn(4, 6, 30, seed=5), randn(4, 5, 30, seed=6)
    grid = subspace_similarity_grid(x, y, "row")
    assert grid.shape == (4, 6, 5)
    for i, j in [(1, 1), (3, 2), (6, 5), (2, 5)]:
        assert torch.allclose(grid[:, i - 1, j - 1], subspace_similarity(x, y, i, j, "row"), atol=1e-12)
    for layer in range(4):
        single = subspace_similarity(x[layer], y[layer], 6, 5, "row")
        assert single.item() == pytest.approx(grid[layer, -1, -1].item(), abs=1e-12)


def test_compare_subspaces_agrees_with_the_single_metrics():
    x, y = randn(3, 8, 40, seed=11), randn(3, 4, 40, seed=12)
    both = compare_subspaces(x, y, "row")
    assert torch.allclose(both["similarity"], subspace_similarity(x, y, 4, 4, "row"), atol=1e-12)
    assert torch.allclose(both["principal_angles"], principal_angles(x, y, 4, 4, "row"), atol=1e-10)
    assert torch.allclose(both["grid"], subspace_similarity_grid(x, y, "row"), atol=1e-12)
    assert both["rank_x"].tolist() == [8, 8, 8]


def test_rank_too_large_and_zero_matrix():
    low_rank = randn(8, 3, seed=1) @ randn(3, 50, seed=2)  # rank 3 with 8 rows
    assert int(numerical_rank(low_rank)) == 3
    with pytest.raises(ValueError, match=r"numerical rank is 3"):
        subspace_similarity(low_rank, randn(8, 50), 4, 4, "row")
    with pytest.raises(ValueError, match="rank"):
        subspace_similarity(randn(4, 50), randn(4, 50, seed=1), 5, 5, "row")
    zero_b = torch.zeros(2, 32, 8)
    with pytest.raises(ValueError, match=r"rank is 0.*batch index 0"):
        subspace_similarity(zero_b, randn(2, 32, 8).float(), 8, 8, "col")
    lenient = subspace_similarity(zero_b, randn(2, 32, 8).float(), 8, 8, "col", strict=False)
    assert torch.isnan(lenient).all()
    with pytest.raises(ValueError, match="rank"):
        subspace_similarity_grid(low_rank, randn(8, 50), "row", max_i=5)


def test_nan_and_inf_are_rejected_with_the_matrix_named():
    x = randn(4, 20)
    bad = x.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"^Y contains non-finite values \(1 NaN"):
        subspace_similarity(x, bad, 2, 2)
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match=r"^X contains non-finite.*1 Inf"):
        cca_similarity(bad, x)
    with pytest.raises(ValueError, match="delta_W contains non-finite"):
        magnitude_direction_change(randn(5, 5), torch.full((5, 5), float("nan")))
    with pytest.raises(ValueError, match="matrix 1 contains non-finite"):
        singular_spectrum([x, bad])


def test_bad_side_and_mismatched_spaces():
    with pytest.raises(ValueError, match="side must be"):
        subspace_similarity(randn(4, 20), randn(4, 20), 2, 2, side="rows")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="same space"):
        subspace_similarity(randn(4, 20), randn(4, 21), 2, 2, "row")


# --- CCA -------------------------------------------------------------------------------------------------------
def test_cca_of_a_linear_transform_of_itself_is_one():
    x = randn(8, 200)
    m = randn(8, 8, seed=7) + 3 * torch.eye(8, dtype=torch.float64)  # invertible
    assert cca_similarity(x, m @ x, "row", keep=8).item() == pytest.approx(1.0, abs=1e-9)
    assert cca_similarity(x, m @ x, "row", keep=1.0).item() == pytest.approx(1.0, abs=1e-9)
    b = randn(200, 6, seed=8)
    assert cca_similarity(b, b @ randn(6, 6, seed=9), "col", keep=6).item() == pytest.approx(1.0, abs=1e-9)
    # a constant shift of a neuron over the datapoints is removed by centring
    assert cca_similarity(x, x + 5.0, "row", keep=8).item() == pytest.approx(1.0, abs=1e-9)


def test_cca_of_unrelated_matrices_is_low_and_batched():
    x, y = randn(3, 4, 2000, seed=1), randn(3, 4, 2000, seed=2)
    c = cca_similarity(x, y, "row", keep=0.99)
    assert c.shape == (3,)
    assert (c < 0.1).all()
    with pytest.raises(ValueError, match="keep"):
        cca_similarity(x, y, keep=1.5)
    with pytest.raises(ValueError, match="keep=9"):
        cca_similarity(x[0], y[0], keep=9)


# --- magnitude / direction, norms, spectra -----------------------------------------------------------------------
def test_pure_scaling_changes_only_magnitude():
    w0 = randn(16, 12)
    res = magnitude_direction_change(w0, 0.5 * w0)  # W = 1.5 W0
    assert res["delta_D"].item() == pytest.approx(0.0, abs=1e-14)
    assert res["delta_M"].item() == pytest.approx(
        0.5 * torch.linalg.vector_norm(w0, dim=0).mean().item(), rel=1e-12
    )


def test_pure_rotation_changes_only_direction():
    w0 = randn(16, 12)
    r = orthogonal(16, seed=4)
    res = magnitude_direction_change(w0, r @ w0 - w0)  # W = R W0: column norms kept
    assert res["delta_M"].item() == pytest.approx(0.0, abs=1e-12)
    assert res["delta_D"].item() > 0.1
    # a tiny update keeps its (tiny) direction change instead of rounding to zero
    tiny = magnitude_direction_change(w0, 1e-7 * randn(16, 12, seed=5))
    assert 0 < tiny["delta_D"].item() < 1e-12
    # batched: experts against one W0
    batch = magnitude_direction_change(w0, torch.stack([0.5 * w0, r @ w0 - w0]))
    assert batch["delta_M"].shape == (2,)
    assert batch["m0_mean"].shape == (2,)


def test_relative_change_and_norms():
    a0 = randn(3, 4, 10)
    assert torch.allclose(relative_change(a0 * 1.1, a0), torch.full((3,), 0.1, dtype=torch.float64))
    assert frobenius_norm(torch.ones(2, 3, 4)).tolist() == pytest.approx([math.sqrt(12)] * 2)
    with pytest.raises(ValueError, match="zero matrix"):
        relative_change(a0, torch.zeros_like(a0))


def test_singular_spectrum_of_concatenated_experts():
    basis = randn(4, 50)
    shared = [randn(4, 4, seed=s) @ basis for s in range(3)]  # 3 experts, one row space
    s = singular_spectrum(shared, "row")
    assert s.shape == (12,)
    assert (s[4:] < 1e-10 * s[0]).all() and (s[:4] > 1e-3 * s[0]).all()
    independent = singular_spectrum([randn(4, 50, seed=10 + k) for k in range(3)], "row")
    assert (independent > 1e-3 * independent[0]).all()
    cols = singular_spectrum(torch.stack([randn(30, 4, seed=k) for k in range(3)]), "col")  # (N, d_out, r)
    assert cols.shape == (12,)
    with pytest.raises(ValueError, match="different numbers of columns"):
        singular_spectrum([randn(4, 50), randn(4, 51)], "row")


# --- reading adapters --------------------------------------------------------------------------------------------
def _asym(method: str, seed: int = 0, hidden: int = 32, train_b: bool = True, **kw):
    model = peft.get_peft_model(
        make_tiny_llama(seed=seed, hidden=hidden),
        asymlora.AsymLoraConfig(method=method, target_modules=TARGETS, **kw),
    )
    if train_b:  # stand-in for training: B-side tensors away from their zero init
        with torch.no_grad():
            for p in asymlora.parameters_by_role(model, "B").values():
                p.normal_(generator=gen(seed + 100))
    return model


def _peft_lora(seed: int = 1, r: int = 4):
    model = peft.get_peft_model(
        make_tiny_llama(seed=seed), peft.LoraConfig(r=r, lora_alpha=8, target_modules=TARGETS)
    )
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, LoraLayer):
                layer.lora_B["default"].weight.normal_(generator=gen(seed + 200))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    alora = _asym("alora", seed=0)
    alora.save_pretrained(root / "alora")
    lora = _peft_lora()
    lora.save_pretrained(root / "lora")
    make_tiny_llama(seed=0).save_pretrained(root / "base")
    return {"root": root, "alora": alora, "lora": lora}


@pytest.mark.parametrize("method", ["alora", "hydralora", "molora", "malora", "lora"])
def test_load_adapter_reproduces_each_experts_update(tmp_path, method):
    model = _asym(method, seed=3)
    model.save_pretrained(tmp_path / method)
    ad = load_adapter(tmp_path / method)
    assert ad.method == method and ad.peft_type == "ASYMLORA"
    layers = {
        n.removeprefix("base_model.model."): m
        for n, m in model.named_modules()
        if isinstance(m, AsymLoraLayer)
    }
    assert set(ad.modules) == set(layers)
    for name, layer in layers.items():
        d_out, d_in = layer.out_features, layer.in_features
        assert ad.shapes[name] == (d_out, d_in)
        for e in range(ad.num_experts):
            expected = layer.task_delta_weight("default", e).double()
            assert torch.allclose(ad.delta_weight(name, e), expected, atol=1e-6)
    assert ad.shared == {"alora": {"A": False, "B": True}, "hydralora": {"A": True, "B": False}}.get(
        method, {"A": False, "B": False}
    )


def test_load_peft_lora_and_run_directories(saved, tmp_path):
    ad = load_adapter(saved["root"] / "lora")
    assert ad.peft_type == "LORA" and ad.num_experts == 1
    module = "model.layers.0.self_attn.q_proj"
    layer = saved["lora"].base_model.model.get_submodule(module)
    assert torch.equal(ad.modules[module][0][0], layer.lora_A["default"].weight.double())
    assert ad.scaling[module] == pytest.approx(2.0)
    # a run directory: the newest checkpoint wins (by step, not by name order)
    run = tmp_path / "run"
    for step in (90, 500):
        saved["lora"].save_pretrained(run / f"checkpoint-{step}")
    assert find_adapter_dir(run) == run / "checkpoint-500"
    saved["lora"].save_pretrained(run / "final")
    assert find_adapter_dir(run) == run / "final"


def test_not_an_adapter(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_adapter(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"is not an adapter: no adapter_config\.json"):
        load_adapter(tmp_path / "empty")
    # a compare run (what `asymlora demo` writes): <run>/<method>/adapter, named so the user can pick one
    for method in ("alora", "lora"):
        (tmp_path / "demo" / method / "adapter").mkdir(parents=True)
        (tmp_path / "demo" / method / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"holding adapters \(pass them\): \[.*demo/alora', .*demo/lora'\]"):
        load_adapter(tmp_path / "demo")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "adapter_config.json").write_text('{"peft_type": "IA3"}')
    (tmp_path / "other" / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="'IA3' is not supported"):
        load_adapter(tmp_path / "other")
    (tmp_path / "other" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    with pytest.raises(ValueError, match="cannot be read as safetensors"):
        load_adapter(tmp_path / "other")


def test_nan_in_a_saved_adapter_is_named(tmp_path):
    model = _asym("alora")
    layer = model.base_model.model.get_submodule("model.layers.1.self_attn.v_proj")
    with torch.no_grad():
        layer.asymlora_A["default"][2, 0, 0] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    with pytest.raises(
        ValueError, match=r"A of expert 2 in module model\.layers\.1\.self_attn\.v_proj has 1 NaN"
    ):
        analyze([tmp_path / "nan"], tmp_path / "out")


def test_incompatible_adapters_are_refused(saved, tmp_path):
    _asym("alora", hidden=48).save_pretrained(tmp_path / "wide")
    with pytest.raises(
        ValueError, match=r"layer shapes differ in 4 module\(s\).*q_proj: \(32, 32\) vs \(48, 48\)"
    ):
        analyze([saved["root"] / "alora", tmp_path / "wide"], tmp_path / "out")
    a, b = load_adapter(saved["root"] / "alora"), load_adapter(saved["root"] / "lora")
    a.base_model, b.base_model = "org/model-a", "org/model-b"
    with pytest.raises(ValueError, match="different base models"):
        check_compatible(a, b)
    peft.get_peft_model(
        make_tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "o_proj"])
    ).save_pretrained(tmp_path / "qo")
    with pytest.raises(ValueError, match="adapt different modules"):
        analyze([saved["root"] / "lora", tmp_path / "qo"], tmp_path / "out")


# --- the report -------------------------------------------------------------------------------------------------
def test_analyze_writes_json_and_figures(saved, tmp_path):
    out = tmp_path / "analysis"
    res = analyze(
        [saved["root"] / "alora", saved["root"] / "lora"],
        out,
        labels=["alora", "lora"],
        base_model=saved["root"] / "base",
    )
    data = json.loads((out / "analysis.json").read_text())
    assert data["summary"] == res["summary"]
    kinds = {s["kind"]: s for s in data["summary"]}
    assert set(kinds) == {"across adapters", "experts within alora"}
    across = kinds["across adapters"]
    assert across["comparisons"] == 3  # 3 ALoRA experts x 1 LoRA expert
    pairs = [c for c in data["comparisons"] if c["kind"] == "across adapters"]
    for role in ("A", "B"):  # the summary is the mean over the three expert-vs-LoRA comparisons
        for key in ("similarity", "cca"):
            values = [c["mean"][role][key] for c in pairs]
            assert across[role][f"{key}_mean"] == pytest.approx(sum(values) / 3, rel=1e-5)
    rec = data["comparisons"][0]
    mod = rec["modules"]["model.layers.1.self_attn.v_proj"]
    # φ(A_e0, A_lora, 4, 4) recomputed with numpy from the models' own tensors (top-4 right singular
    # vectors), and φ = mean cos² of the principal angles
    import numpy as np

    name = "model.layers.1.self_attn.v_proj"
    a_e0 = (
        saved["alora"].base_model.model.get_submodule(name).asymlora_A["default"][0].detach().double().numpy()
    )
    a_lora = (
        saved["lora"].base_model.model.get_submodule(name).lora_A["default"].weight.detach().double().numpy()
    )
    ux, uy = np.linalg.svd(a_e0)[2][:4].T, np.linalg.svd(a_lora)[2][:4].T
    assert rec["name"] == "alora[e0] vs lora"
    assert mod["A"]["similarity"] == pytest.approx(float(np.square(ux.T @ uy).sum()) / 4, rel=1e-4)
    cos2 = [math.cos(math.radians(t)) ** 2 for t in mod["A"]["principal_angles_deg"]]
    assert mod["A"]["similarity"] == pytest.approx(sum(cos2) / 4, rel=1e-3)
    assert len(mod["A"]["principal_angles_deg"]) == 4  # min(r=8, r=4)
    assert rec["k"] == {"A": 4, "B": 4}
    assert len(rec["grid"]["A"]["q_proj"]) == 8 and len(rec["grid"]["A"]["q_proj"][0]) == 4
    assert data["magnitude_direction"]["alora"]["mean"]["delta_D"] > 0
    for name in data["figures"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {
        "summary.png",
        "similarity_layers_A.png",
        "similarity_layers_B.png",
        "similarity_matrix_A.png",
        "grid_across_adapters.png",
        "spectra.png",
        "magnitude_direction.png",
    } <= set(data["figures"])
    text = (out / "summary.txt").read_text()
    assert "across adapters" in text and "experts within alora" in text


def test_a_bad_base_model_fails_before_a_previous_analysis_loses_its_figures(saved, tmp_path, monkeypatch):
    """A mistyped --base-model used to delete the figures of the analysis already in out_dir (its
    analysis.json still listing them) before failing with transformers' "Repo id must be in the form"."""
    from asymlora import models

    out = tmp_path / "analysis"
    paths = [saved["root"] / "alora", saved["root"] / "lora"]
    first = analyze(paths, out, labels=["alora", "lora"])
    with pytest.raises(FileNotFoundError, match=r"model directory '.*typo' does not exist"):
        analyze(paths, out, labels=["alora", "lora"], base_model=tmp_path / "typo")
    assert first["figures"] and all((out / name).is_file() for name in first["figures"])
    assert json.loads((out / "analysis.json").read_text())["figures"] == first["figures"]
    # a built-in model name is read from its converted cache, as asymlora.models.load reads it (it was
    # passed to from_pretrained as a hub id)
    monkeypatch.setenv(models.CACHE_ENV_VAR, str(tmp_path / "cache"))
    spec = models.BuiltinModel("tiny-builtin", "tiny", "no_such_package", "none==0", "tiny.gguf", "tiny/tiny")
    monkeypatch.setitem(models.BUILTIN_MODELS, "tiny-builtin", spec)
    make_tiny_llama(seed=0).save_pretrained(models.builtin_cache_dir("tiny-builtin"))
    (models.builtin_cache_dir("tiny-builtin") / models.COMPLETE_MARKER).write_text("{}")
    by_name = analyze(
        paths, tmp_path / "a", labels=["alora", "lora"], base_model="tiny-builtin", figures=False
    )
    by_dir = analyze(
        paths, tmp_path / "b", labels=["alora", "lora"], base_model=saved["root"] / "base", figures=False
    )
    assert by_name["magnitude_direction"] == by_dir["magnitude_direction"] is not None


def test_expert_pairs_inside_one_alora_adapter(saved, tmp_path):
    res = analyze([saved["root"] / "alora"], tmp_path / "one", figures=False)
    assert [r["name"] for r in res["comparisons"]] == [
        "alora[e0] vs alora[e1]",
        "alora[e0] vs alora[e2]",
        "alora[e1] vs alora[e2]",
    ]
    (summary,) = res["summary"]
    assert summary["kind"] == "experts within alora"
    assert summary["B"]["shared"] and summary["B"]["similarity_mean"] is None  # one B for all experts
    assert 0.0 < summary["A"]["similarity_mean"] < 0.9  # independent A draws
    spectrum = res["spectra"][0]
    assert spectrum["scope"] == "experts of one adapter"
    assert len(spectrum["A"]["per_module"]["model.layers.0.self_attn.q_proj"]) == 24  # 3 experts x r=8 rows
    assert res["figures"] == []


def test_pairs_with_kinds_and_bad_labels(saved, tmp_path):
    paths = [saved["root"] / "lora", saved["root"] / "lora", saved["root"] / "alora"]
    res = analyze(
        paths,
        tmp_path / "kinds",
        labels=["t1", "t2", "al"],
        pairs=[("t1", "t2", "same seed"), ("t1", "al", "lora vs alora")],
        expert_pairs=False,
        figures=False,
    )
    kinds = {s["kind"]: s for s in res["summary"]}
    assert kinds["same seed"]["A"]["similarity_mean"] == pytest.approx(1.0)
    assert kinds["same seed"]["B"]["cca_mean"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        analyze(paths, tmp_path / "x", labels=["t1", "t2", "al"], pairs=[("t1", "nope")])
    with pytest.raises(ValueError, match="one label per path"):
        analyze(paths, tmp_path / "x", labels=["t1"])
    with pytest.raises(ValueError, match="nothing to compare"):
        analyze([saved["root"] / "lora"], tmp_path / "x")


def test_untrained_b_is_reported_not_crashed(tmp_path):
    _asym("alora", train_b=False).save_pretrained(tmp_path / "fresh")
    _peft_lora().save_pretrained(tmp_path / "lora")
    res = analyze([tmp_path / "fresh", tmp_path / "lora"], tmp_path / "out", figures=False)
    assert res["summary"][0]["B"]["similarity_mean"] is None
    assert any("B is all zero" in n for n in res["notes"])


# --- bad paths, partial writes ---------------------------------------------------------------------------------
def test_an_unfinished_asymlora_run_and_an_experiment_directory_are_found(saved, tmp_path):
    run = tmp_path / "run"  # killed before run/adapter: only its checkpoints/step-N (train.checkpoint)
    for step in (4, 10):
        saved["lora"].save_pretrained(run / "checkpoints" / f"step-{step:06d}")
    assert find_adapter_dir(run) == run / "checkpoints" / "step-000010"
    exp = tmp_path / "exp"  # `asymlora experiment init-similarity --out exp`
    for label in ("add1_seed0", "add1_seed1"):
        saved["lora"].save_pretrained(exp / "adapters" / label)
    with pytest.raises(ValueError, match=r"\(pass them\): \[.*exp/adapters/add1_seed0', .*add1_seed1'\]"):
        load_adapter(exp)


def test_an_out_that_is_a_file_or_not_writable_is_named_before_any_work(saved, tmp_path, monkeypatch, capsys):
    from asymlora.cli import main as cli_main

    paths = [str(saved["root"] / "alora"), str(saved["root"] / "lora")]
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    for out in (afile, afile / "sub"):
        assert cli_main(["analyze", *paths, "--out", str(out)]) == 2
        assert f"--out {out} is not a directory" in capsys.readouterr().err
    assert afile.read_text() == "mine"
    monkeypatch.setattr("os.access", lambda *a, **k: False)  # as a user without write permission there
    assert cli_main(["analyze", *paths, "--out", str(tmp_path / "new")]) == 2
    assert f"{tmp_path} is not writable by this user" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    monkeypatch.undo()

    def denied(*a, **k):  # what root, whom os.access lets through, meets on a read-only file system
        raise PermissionError(1, "Operation not permitted", "/sys/out")

    monkeypatch.setattr("asymlora.cli.analyze", denied)
    assert cli_main(["analyze", *paths, "--out", "/sys/out"]) == 2
    assert "error: /sys/out: Operation not permitted; give a path you can write" in capsys.readouterr().err


def test_figures_are_written_whole_or_not_at_all(saved, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.png").write_bytes(b"a previous figure")

    def disk_full(self, fname, **kwargs):
        Path(fname).write_bytes(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", disk_full)
    with pytest.raises(OSError, match="No space left"):
        analyze([saved["root"] / "alora", saved["root"] / "lora"], out)
    assert (out / "summary.png").read_bytes() == b"a previous figure"
    assert sorted(p.name for p in out.iterdir()) == ["summary.png"]


def test_only_our_own_analysis_json_names_figures_to_delete(saved, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "analysis.json").write_text(json.dumps({"figures": ["plot.png"]}))  # another tool's
    (out / "plot.png").write_bytes(b"the user's")
    analyze([saved["root"] / "alora", saved["root"] / "lora"], out, figures=False)
    assert (out / "plot.png").read_bytes() == b"the user's"


# --- traces ------------------------------------------------------------------------------------------------------
def test_trace_recorder_writes_expected_lines(tmp_path):
    model = _asym("alora", train_b=False)
    path = tmp_path / "run" / "traces.jsonl"
    rec = TraceRecorder(model, path, every=2)
    assert rec(1) is None
    first = rec(2, loss=1.5)
    assert first["mean"]["A_rel_change"] == 0.0 and first["mean"]["B_norm"] == 0.0
    with torch.no_grad():
        for p in asymlora.parameters_by_role(model, "A").values():
            p.mul_(1.1)
        for p in asymlora.parameters_by_role(model, "B").values():
            p.fill_(0.01)
    rec.record(4)
    rows = read_traces(path)
    assert [r["step"] for r in rows] == [2, 4] and rows[0]["loss"] == 1.5
    layer = rows[1]["layers"][0]
    assert {
        "module",
        "method",
        "num_experts",
        "A_rel_change",
        "A_rel_change_experts",
        "B_norm",
        "B_norm_experts",
        "delta_M",
        "delta_D",
        "delta_M_experts",
        "delta_D_experts",
    } <= set(layer)
    assert layer["A_rel_change"] == pytest.approx(0.1)
    assert layer["A_rel_change_experts"] == pytest.approx([0.1] * 3)
    assert layer["B_norm"] > 0 and layer["delta_M"] > 0 and layer["delta_D"] > 0
    assert len(rows[1]["layers"]) == 4  # 2 layers x (q_proj, v_proj)
    assert layer["module"] == "model.layers.0.self_attn.q_proj"
    png = plot_traces(path, tmp_path / "traces.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_trace_recorder_on_plain_peft_lora(tmp_path):
    model = peft.get_peft_model(make_tiny_llama(), peft.LoraConfig(r=4, target_modules=TARGETS))
    rec = TraceRecorder(model, tmp_path / "t.jsonl")
    row = rec.record(0)
    assert row["layers"][0]["method"] == "lora (peft)"
    assert row["mean"]["delta_D"] == 0.0
