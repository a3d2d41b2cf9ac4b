"""The calibrated export (`asymlora.calibration`) on hand values.

Mutation tests (docs/testing.md, "Mutation results: `calibration.py`"): a toy model whose token ids pick
chosen 3-vectors, two adapted `nn.Linear(3, 2)` layers and a character tokenizer of three letters; every
expected value is worked out in the comments, never computed by the code under test. The shared example:

    tokens (ids -> x):  0 (padding) -> (2, 0, 0)   1 -> (1, 1, 0)   2 -> (-1, 0, 1)   3 -> (0, 1, 1)
    router W_g = [[0, 0, 0], [ln 3, 0, 0]], g(x) = softmax(W_g x) = (1, 3^x0) / (1 + 3^x0):
        g(1) = (1/4, 3/4)   g(2) = (3/4, 1/4)   g(3) = (1/2, 1/2)   g(0) = (1/10, 9/10)

ALoRA, N = 2, r = 1, alpha = 2 (s = 2): A_0 = [1, 0, 0], A_1 = [0, 1, 0], shared B = [[1], [2]], so the
adapter adds s · B · ρ(x) with ρ(x) = g_0 x_0 + g_1 x_1 (A_0 x = x_0, A_1 x = x_1).

BATCH = ids [[1, 2, 3], [1, 0, 0]], mask [[1, 1, 1], [1, 0, 0]]: real tokens 1, 2, 3, 1 (4 of them):
    ḡ = ((1/4 + 3/4 + 1/2 + 1/4) / 4, (3/4 + 1/4 + 1/2 + 3/4) / 4) = (7/16, 9/16) = (0.4375, 0.5625)
    (padding counted too: ((1.75 + 0.2) / 6, (2.25 + 1.8) / 6) = (0.325, 0.675))
    export: A = ḡ_0 A_0 + ḡ_1 A_1 = [7/16, 9/16, 0], B = [[1], [2]]: the exported scalar ε(x) = 7/16 x_0 + 9/16 x_1
    per token ρ, ε:  1: 1, 1   2: -3/4, -7/16   3: 1/2, 9/16
    layer error² = Σ (ε − ρ)² / Σ ρ² (the factor s² ‖B‖² = 20 cancels) = (25/256 + 1/256) / (1 + 9/16 + 1/4 + 1)
               = (26/256) / (720/256) = 13/360  ->  e = √(13/360) ≈ 0.190029

BATCH + BATCH2 (ids [[1, 1, 2]], no mask): 7 real tokens, Σ g_0 = 1.75 + (1/4 + 1/4 + 3/4) = 3
    ḡ = (3/7, 4/7) = (0.428571…, 0.571428…); ε(x) = 3/7 x_0 + 4/7 x_1
    ε − ρ:  1: 0   2: −3/7 + 3/4 = 9/28   3: 4/7 − 1/2 = 1/14 = 2/28
    num = (81 + 4 + 81) / 784 (tokens 2, 3, 2), den = Σ ρ² = 4 · 1 + 2 · 9/16 + 1/4 = 86/16
    e² = (166/784) / (86/16) = 83/2107  ->  e ≈ 0.198475
"""

from __future__ import annotations

import json
import math
import types
import warnings
from pathlib import Path

import numpy as np
import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from asymlora import AsymLoraConfig
from asymlora.calibration import (
    CALIBRATION_HELP,
    Fidelity,
    LayerExport,
    _fmt,
    _gate,
    _module,
    _ratio,
    _readme,
    _run,
    average_gates,
    calibrated_factors,
    calibration_batches,
    export_calibrated_adapter,
    measure_fidelity,
    routed_config,
    truncate,
)
from asymlora.data import Example, Task
from asymlora.routing import RoutingState
from asymlora.tuner.layer import Linear

LN3 = math.log(3.0)
EMBED = [[2.0, 0.0, 0.0], [1.0, 1.0, 0.0], [-1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]
W0 = [[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]]
BIAS = [0.5, -0.5]
ROUTER = [[0.0, 0.0, 0.0], [LN3, 0.0, 0.0]]
BATCH = {"input_ids": [[1, 2, 3], [1, 0, 0]], "attention_mask": [[1, 1, 1], [1, 0, 0]]}
BATCH2 = {"input_ids": [[1, 1, 2]]}
PROJ, SIDE = "base_model.model.proj", "base_model.model.side"
E_BATCH = math.sqrt(13 / 360)  # ≈ 0.190029
E_BOTH = math.sqrt(83 / 2107)  # ≈ 0.198475


def t(values, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def linear() -> nn.Linear:
    layer = nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight.copy_(t(W0))
        layer.bias.copy_(t(BIAS))
    return layer


class Toy(nn.Module):
    """ids -> EMBED rows -> logits = [proj(x), 10 · side(x)] (4 per token); ``unused`` is never called."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(4, 3)
        with torch.no_grad():
            self.embed.weight.copy_(t(EMBED))
        self.proj, self.side, self.unused = linear(), linear(), linear()
        self.config = types.SimpleNamespace(model_type="toy", use_return_dict=True)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs):
        x = self.embed(input_ids)
        return types.SimpleNamespace(logits=torch.cat([self.proj(x), 10 * self.side(x)], -1))

    def prepare_inputs_for_generation(self, *args, **kwargs):
        return kwargs


def set_tensors(layer, name: str = "default", **values) -> None:
    with torch.no_grad():
        for key, value in values.items():
            param = getattr(layer, "asymlora_" + key)[name]
            param.copy_(t(value, param.dtype))


def toy(method: str = "alora", targets=("proj", "side"), **cfg) -> peft.PeftModel:
    """The Toy with the ALoRA of the module docstring (or MoLoRA with B_0 = [[1], [0]], B_1 = [[0], [2]])."""
    config = AsymLoraConfig(
        method=method, r=1, lora_alpha=2, num_experts=2, router="soft", target_modules=list(targets), **cfg
    )
    pm = peft.get_peft_model(Toy(), config)
    for n in targets:
        layer = getattr(pm.base_model.model, n)
        b = [[1.0], [2.0]] if method == "alora" else [[[1.0], [0.0]], [[0.0], [2.0]]]
        set_tensors(layer, A=[[[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]]], B=b, router=ROUTER)
    return pm


class Tok:
    """Letters a, b, c -> ids 1, 2, 3; its special token (added only when asked) is id 3; pad 0."""

    pad_token_id = 0
    eos_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": ([3] if add_special_tokens else []) + [ord(c) - 96 for c in text]}


# --- the gate average ---------------------------------------------------------------------------------------
def test_average_gates_over_real_tokens_only_in_float64() -> None:
    pm = toy()
    gates, tokens = average_gates(pm, [BATCH])
    assert tokens == 4 and list(gates) == [PROJ, SIDE]
    for g in gates.values():
        assert g.dtype == torch.float64 and g.device.type == "cpu"
        torch.testing.assert_close(g, t([7 / 16, 9 / 16], torch.float64), rtol=0, atol=1e-7)
    gates, tokens = average_gates(pm, [BATCH, BATCH2], "default")  # Σ g_0 = 3 over 7 tokens
    assert tokens == 7
    torch.testing.assert_close(gates[PROJ], t([3 / 7, 4 / 7], torch.float64), rtol=0, atol=1e-7)


def test_average_gates_keeps_the_training_mode_and_runs_without_grad() -> None:
    pm = toy()
    pm.train()
    gates, _ = average_gates(pm, [BATCH])
    assert pm.training and not gates[PROJ].requires_grad


def test_average_gates_of_the_tuner_alone_counts_the_padding() -> None:
    """The tuner alone sets no routing call: every position counts (hence the export refuses it)."""
    pm = toy()
    gates, tokens = average_gates(pm.base_model, [BATCH])
    assert tokens == 4  # the token count still follows the mask
    # padding counted in the sums: (1.95 / 4, 4.05 / 4)
    assert list(gates) == ["model.proj", "model.side"]  # the tuner's own module names
    torch.testing.assert_close(gates["model.proj"], t([1.95 / 4, 4.05 / 4], torch.float64), rtol=0, atol=1e-7)


def test_average_gates_refusals_whole() -> None:
    pm = toy()
    with pytest.raises(ValueError) as e:
        average_gates(pm, [{"input_ids": [[1, 2]], "attention_mask": [[0, 0]]}])
    assert str(e.value) == "the calibration data has no real token (its attention_mask is all 0)"
    unused = toy(targets=("proj", "unused"))
    with pytest.raises(RuntimeError) as e:
        average_gates(unused, [BATCH])
    assert (
        str(e.value)
        == "the calibration forwards never reached the adapted layers ['base_model.model.unused']"
    )


def test_routed_config_refusals_whole() -> None:
    pm = toy()
    assert routed_config(pm, None)[0] == "default" and routed_config(pm, "default")[1].router == "soft"
    with pytest.raises(ValueError) as e:
        routed_config(pm, "x")
    assert str(e.value) == "model has no asymlora adapter named 'x' (adapters: ['default'])"
    with pytest.raises(ValueError) as e:
        routed_config(nn.Linear(1, 1), None)
    assert str(e.value) == "model has no asymlora adapter named 'default' (adapters: [])"
    task = peft.get_peft_model(
        Toy(), AsymLoraConfig(method="alora", r=1, num_experts=2, router="task", target_modules=["proj"])
    )
    with pytest.raises(ValueError) as e:
        routed_config(task, None)
    assert str(e.value) == (
        "adapter 'default' (alora, router='task') needs no calibration: its export is exact. Call "
        "asymlora.export_task_adapter(model, task, out_dir) without calibration."
    )
    lora = peft.get_peft_model(Toy(), AsymLoraConfig(method="lora", r=1, target_modules=["proj"]))
    with pytest.raises(ValueError, match=r"^adapter 'default' \(lora, router='soft'\) needs no calibration"):
        routed_config(lora, None)


def test_gate_and_module_refusals_whole() -> None:
    layer = Linear(linear(), "default", AsymLoraConfig(method="lora", r=1), RoutingState())
    with pytest.raises(ValueError) as e:
        _gate(layer, "default", t([[1.0, 0.0, 0.0]]))
    assert (
        str(e.value)
        == "adapter 'default' has no learned router on this layer, so there is no gate to calibrate"
    )
    with pytest.raises(TypeError) as e:
        _module(object())  # type: ignore[arg-type]
    assert str(e.value) == "object is not an nn.Module"
    assert _module(layer) is layer


# --- running the model ----------------------------------------------------------------------------------------
class Recorder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.calls: list[dict] = []

    def forward(self, input_ids, attention_mask, use_cache, position_ids):
        self.calls.append(dict(ids=input_ids, mask=attention_mask, use_cache=use_cache, pos=position_ids))
        return types.SimpleNamespace(logits=input_ids.double())


def test_run_counts_positions_over_real_tokens_and_returns_a_bool_mask() -> None:
    rec = Recorder()
    batch = {"input_ids": [[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]], "attention_mask": [[0, 0, 1, 1, 1], [1] * 5]}
    ((logits, mask),) = list(_run(rec, [batch]))
    call = rec.calls[0]
    assert call["use_cache"] is False
    assert call["pos"].tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]  # cumsum − 1, the padding at 0
    assert call["mask"].dtype == torch.long and call["ids"].dtype == torch.long
    assert mask.dtype == torch.bool and mask.tolist() == [[False, False, True, True, True], [True] * 5]
    assert logits.tolist() == [[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]]


def test_run_looks_for_position_ids_on_the_inner_pretrained_model() -> None:
    from tests.conftest import make_tiny_llama

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm = make_tiny_llama()
            self.kwargs: list[dict] = []

        def forward(self, **kwargs):
            self.kwargs.append(kwargs)
            return self.lm(**kwargs)

    w = Wrapper()
    list(_run(w, [{"input_ids": [[0, 5, 6]], "attention_mask": [[0, 1, 1]]}]))
    assert w.kwargs[0]["position_ids"].tolist() == [[0, 0, 1]]


# --- calibration data -------------------------------------------------------------------------------------------
def lists(batches) -> list[dict]:
    assert all(set(b) == {"input_ids", "attention_mask"} for b in batches)
    assert all(v.dtype == torch.long for b in batches for v in b.values())
    return [{k: v.tolist() for k, v in b.items()} for b in batches]


def test_calibration_batches_of_strings_without_special_tokens_cut_from_the_left() -> None:
    # "abc" -> [1, 2, 3]; "a" -> [1]; right-padded with 0 by the collator
    got = lists(calibration_batches(["abc", "a"], "t", Tok()))
    assert got == [BATCH]
    # batch_size 1: one batch each; max_length 2 keeps the last two ids; an empty string is dropped
    got = lists(calibration_batches(["abc", "", "a"], "t", Tok(), batch_size=1, max_length=2))
    assert got == [
        {"input_ids": [[2, 3]], "attention_mask": [[1, 1]]},
        {"input_ids": [[1]], "attention_mask": [[1]]},
    ]
    assert lists(calibration_batches("ab", "t", Tok())) == [
        {"input_ids": [[1, 2]], "attention_mask": [[1, 1]]}
    ]


def test_calibration_batches_of_tokenized_batches() -> None:
    one = lists(calibration_batches({"input_ids": [5, 6, 7]}, "t"))  # 1-D, no mask: one row, all real
    assert one == [{"input_ids": [[5, 6, 7]], "attention_mask": [[1, 1, 1]]}]
    flat_mask = lists(calibration_batches([{"input_ids": [[5, 6]], "attention_mask": [1, 0]}], 0))
    assert flat_mask == [{"input_ids": [[5, 6]], "attention_mask": [[1, 0]]}]
    tagged = [{"input_ids": [[5]], "task_ids": [2, 2]}, {"input_ids": [[6]], "task_ids": None}]
    assert len(calibration_batches(tagged, 2)) == 2 and len(calibration_batches(tagged, "x")) == 2


def small_task(name: str) -> Task:
    ex = [Example(prompt="ab", target="c")]
    return Task(name=name, kind="generate", train=ex, test=ex, metrics=["exact_match"])


def test_calibration_batches_of_a_task_and_examples() -> None:
    from tests.conftest import make_char_tokenizer

    from asymlora.data import encode_example

    tok = make_char_tokenizer()
    feature = encode_example(tok, Example(prompt="ab", target="c"), 512)
    want = [{"input_ids": [feature["input_ids"]], "attention_mask": [[1] * len(feature["input_ids"])]}]
    assert lists(calibration_batches(small_task("k"), "k", tok)) == want
    assert lists(calibration_batches(small_task("k"), 0, tok)) == want  # an index: no name to compare
    # an answer that cannot fit max_length is skipped, as in training; nothing left -> refused
    long = Example(prompt="ab", target="cdefgh")
    assert lists(calibration_batches([long, Example(prompt="ab", target="c")], "k", tok, max_length=5)) == [
        {"input_ids": [encode_example(tok, Example(prompt="ab", target="c"), 5)["input_ids"]],
         "attention_mask": [[1] * len(encode_example(tok, Example(prompt="ab", target="c"), 5)["input_ids"])]}
    ]  # fmt: skip
    with pytest.raises(ValueError) as e:
        calibration_batches([long], "k", tok, max_length=5)
    assert str(e.value) == "no calibration example of task 'k' has a token that fits max_length=5"


def test_calibration_data_refusals_whole() -> None:
    cases = [
        (None, "t", None, f"no calibration data given; {CALIBRATION_HELP}"),
        ([], "t", None, f"the calibration data for task 't' is empty; {CALIBRATION_HELP}"),
        (small_task("count"), "greet", Tok(),
         "the calibration data is task 'count', but task 'greet' is being exported; pass task 'greet''s "
         "examples (or export 'count')."),
        (["abc"], "t", None,
         "calibration holds str items: pass tokenizer= (the base model's) to tokenize them, or pass tokenized "
         "batches (input_ids + attention_mask)."),
        (["abc", 3.5], "t", Tok(),
         f"calibration holds a float, which is not a string, an Example or a batch; {CALIBRATION_HELP}"),
        ([{"input_ids": [[5]], "task_ids": [0]}, {"input_ids": [[5]], "task_ids": [1, 0]}], "greet", None,
         "the calibration batches carry task_ids [0, 1], but task 'greet' is being exported; pass only that "
         "task's examples (e.g. MultiTaskDataset([task], tokenizer))."),
        ([{"input_ids": [[5]], "task_ids": [0]}], 1, None,
         "the calibration batches carry task_ids [0], but task 1 is being exported; pass only that task's "
         "examples (e.g. MultiTaskDataset([task], tokenizer))."),
    ]  # fmt: skip
    for calibration, task, tok, message in cases:
        with pytest.raises(ValueError) as e:
            calibration_batches(calibration, task, tok)
        assert str(e.value) == message


# --- the factors ----------------------------------------------------------------------------------------------
G = t([0.25, 0.75])


def test_alora_factors_are_gate_weighted_a_and_the_shared_b() -> None:
    cfg = AsymLoraConfig(method="alora", r=1, num_experts=2)
    tensors = {"A": t([[[1.0, 0.0, 0.0]], [[0.0, 2.0, 0.0]]], torch.float64), "B": t([[1.0], [3.0]])}
    out = calibrated_factors(cfg, tensors, G.double(), 3, 2)
    # A = 0.25 [1, 0, 0] + 0.75 [0, 2, 0] = [0.25, 1.5, 0]; B unchanged; float32 out
    assert out.A.dtype == out.B.dtype == torch.float32 and out.discarded_energy is None
    assert out.A.tolist() == [[0.25, 1.5, 0.0]] and out.B.tolist() == [[1.0], [3.0]]


def test_hydralora_factors_are_the_shared_a_and_gate_weighted_b() -> None:
    cfg = AsymLoraConfig(method="hydralora", r=1, num_experts=2)
    tensors = {"A": t([[1.0, 2.0, 0.0]]), "B": t([[[4.0], [0.0]], [[0.0], [4.0]]])}
    out = calibrated_factors(cfg, tensors, G, 3, 2)
    # B = 0.25 [4, 0]ᵀ + 0.75 [0, 4]ᵀ = [1, 3]ᵀ
    assert out.A.tolist() == [[1.0, 2.0, 0.0]] and out.B.tolist() == [[1.0], [3.0]]


def test_molora_factors_split_the_square_root_of_each_gate_between_a_and_b() -> None:
    cfg = AsymLoraConfig(method="molora", r=1, num_experts=2)
    tensors = {"A": t([[[1.0, 0.0, 0.0]], [[1.0, 1.0, 0.0]]]), "B": t([[[2.0], [0.0]], [[0.0], [4.0]]])}
    out = calibrated_factors(cfg, tensors, G, 3, 2)
    # rows √0.25 A_0 = [0.5, 0, 0], √0.75 A_1 = [h, h, 0] (h = √3 / 2); columns 0.5 B_0 = [1, 0], h B_1 = [0, 4h]
    h = math.sqrt(3) / 2
    torch.testing.assert_close(out.A, t([[0.5, 0.0, 0.0], [h, h, 0.0]]), rtol=0, atol=1e-7)
    torch.testing.assert_close(out.B, t([[1.0, 0.0], [0.0, 4 * h]]), rtol=0, atol=1e-6)
    # B A = 0.25 B_0 A_0 + 0.75 B_1 A_1 = [[0.5, 0, 0], [3, 3, 0]]
    torch.testing.assert_close(out.B @ out.A, t([[0.5, 0.0, 0.0], [3.0, 3.0, 0.0]]), rtol=0, atol=1e-6)
    # rank 1 of [[0.5, 0, 0], [3, 3, 0]]: σ² are the eigenvalues of M Mᵀ = [[0.25, 1.5], [1.5, 18]]
    #   (trace 18.25, det 4.5 − 2.25 = 2.25): σ² = (18.25 ± √(18.25² − 9)) / 2; discarded = σ_2² / 18.25
    small = (18.25 - math.sqrt(18.25**2 - 9)) / 2
    trained = {k: v.requires_grad_() for k, v in tensors.items()}  # as the adapter's parameters
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "Converting a tensor with requires_grad=True to a scalar"
        one = calibrated_factors(cfg, trained, G, 3, 2, rank=1)
    assert one.discarded_energy == pytest.approx(small / 18.25)
    assert not one.A.requires_grad and not one.B.requires_grad
    with pytest.raises(ValueError) as e:
        calibrated_factors(cfg, tensors, G, 3, 2, rank=3)
    assert str(e.value) == "rank=3 is out of range: the averaged update has rank <= 2; pass 1..2"


def test_malora_factors_are_the_exact_gate_weighted_sum() -> None:
    cfg = AsymLoraConfig(method="malora", r=2, num_experts=2, router="soft")
    layer = Linear(linear(), "default", cfg, RoutingState())
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad and p.dim() > 0:
                p.copy_(torch.arange(p.numel(), dtype=p.dtype).reshape(p.shape) % 5 - 2)
    tensors = layer.tensors("default")
    from asymlora.methods import get_method

    pairs = get_method("malora").expert_factors(dict(tensors), 2)
    want = sum(float(g) * (b.double() @ a.double()) for g, (a, b) in zip(G, pairs, strict=True))
    out = calibrated_factors(cfg, tensors, G, 3, 2)
    torch.testing.assert_close((out.B @ out.A).double(), want, rtol=0, atol=1e-5)


# --- the truncation -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("a", "b"),
    [
        (torch.eye(3), torch.diag(t([3.0, 2.0, 1.0]))),
        # the same ΔW from factors that are not diagonal: b = diag(3, 2, 1) a⁻¹, a⁻¹ = [[1, −1, 0], [0, 1, 0], [0, 0, 1]]
        (t([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), t([[3.0, -3.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0]])),
    ],
)  # fmt: skip
def test_truncate_diag_321_to_rank_2_keeps_3_and_2_split_evenly(a, b) -> None:
    out = truncate(a, b, 2)
    # ΔW = diag(3, 2, 1): rank 2 keeps diag(3, 2, 0); discarded 1² / (9 + 4 + 1) = 1/14
    torch.testing.assert_close(out.B @ out.A, torch.diag(t([3.0, 2.0, 0.0])), rtol=0, atol=1e-5)
    assert out.discarded_energy == pytest.approx(1 / 14, rel=1e-12)
    err = torch.linalg.norm(torch.diag(t([3.0, 2.0, 1.0])) - out.B @ out.A) / math.sqrt(14)
    assert float(err) == pytest.approx(1 / math.sqrt(14), rel=1e-5)  # relative error 1/√14 ≈ 0.267
    # each kept σ split as √σ on both sides: |A| = [[√3, 0, 0], [0, √2, 0]], |B| = its transpose
    root = [[math.sqrt(3), 0.0, 0.0], [0.0, math.sqrt(2), 0.0]]
    torch.testing.assert_close(out.A.abs(), t(root), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.B.abs(), t(root).T, rtol=0, atol=1e-5)
    assert out.A.dtype == out.B.dtype == torch.float32
    full = truncate(a, b, 3)
    assert full.discarded_energy == 0.0 or full.discarded_energy == pytest.approx(0.0, abs=1e-15)
    one = truncate(a, b, 1)  # keeps 3: discarded (4 + 1) / 14
    assert one.discarded_energy == pytest.approx(5 / 14, rel=1e-12) and one.A.shape == (1, 3)
    torch.testing.assert_close(one.B @ one.A, torch.diag(t([3.0, 0.0, 0.0])), rtol=0, atol=1e-5)


def test_truncate_of_a_zero_update_and_of_a_tall_pair() -> None:
    zero = truncate(torch.zeros(2, 3), torch.zeros(4, 2), 1)
    assert zero.discarded_energy == 0.0 and zero.A.abs().sum() == 0 and zero.B.abs().sum() == 0
    # b (4 × 2), a (2 × 3): B A = [[0, 0, 0], [3, 0, 0], [0, 1, 0], [0, 0, 0]], σ = 3, 1
    a, b = torch.eye(3)[:2], t([[0.0, 0.0], [3.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    out = truncate(a, b, 1)
    assert out.A.shape == (1, 3) and out.B.shape == (4, 1) and out.discarded_energy == pytest.approx(0.1)
    torch.testing.assert_close(
        out.B @ out.A, t([[0, 0, 0], [3, 0, 0], [0, 0, 0], [0, 0, 0]]), rtol=0, atol=1e-6
    )


@pytest.mark.parametrize("rank", [0, 4, -1, True, 2.0, None])
def test_truncate_refuses_ranks_outside_1_to_k0_whole(rank) -> None:
    with pytest.raises(ValueError) as e:
        truncate(torch.eye(3), torch.eye(3), rank)  # type: ignore[arg-type]
    assert str(e.value) == f"rank={rank!r} is out of range: the averaged update has rank <= 3; pass 1..3"


# --- fidelity ---------------------------------------------------------------------------------------------------
def test_ratio_is_the_square_root_zero_or_undefined() -> None:
    assert _ratio(9.0, 4.0) == 1.5 and _ratio(0.0, 0.0) == 0.0 and _ratio(1e-300, 0.0) is None
    assert _ratio(0.0, 2.0) == 0.0


def test_measure_fidelity_on_hand_values() -> None:
    """proj gets the calibrated pair (e = √(13/360)); side an all-zero pair, so its error is its whole
    update (e = 1). Pooled: num = 20 (26 + 720) / 256, den = 2 · 20 · 720 / 256 -> √(746/1440).
    The logits hold side × 10, so its squares count 100 ×: √((26 + 100 · 720) / (720 + 100 · 720))."""
    pm = toy()
    exports = {
        PROJ: LayerExport(t([[7 / 16, 9 / 16, 0.0]]), t([[1.0], [2.0]])),
        SIDE: LayerExport(torch.zeros(1, 3), torch.zeros(2, 1)),
    }
    pm.train()
    fid = measure_fidelity(pm, [BATCH], exports)
    assert pm.training
    assert fid.layers[PROJ] == pytest.approx(E_BATCH, rel=1e-6)
    assert fid.layers[SIDE] == pytest.approx(1.0, rel=1e-6)
    assert fid.pooled == pytest.approx(math.sqrt(746 / 1440), rel=1e-6)
    assert fid.output == pytest.approx(math.sqrt(72026 / 72720), rel=1e-6)
    assert list(fid.layers) == [PROJ, SIDE]
    # two batches, the calibrated pair of both: e = √(83/2107) everywhere
    pair = LayerExport(t([[3 / 7, 4 / 7, 0.0]]), t([[1.0], [2.0]]))
    fid = measure_fidelity(pm, [BATCH, BATCH2], {PROJ: pair, SIDE: pair}, "default")
    for value in (fid.output, fid.pooled, *fid.layers.values()):
        assert value == pytest.approx(E_BOTH, rel=1e-5)
    # the routed model itself (a zero router: g = (1/2, 1/2) exactly, so ε = ρ): 0 everywhere
    for n in ("proj", "side"):
        set_tensors(getattr(pm.base_model.model, n), router=[[0.0] * 3, [0.0] * 3])
    half = LayerExport(t([[0.5, 0.5, 0.0]]), t([[1.0], [2.0]]))
    fid = measure_fidelity(pm, [BATCH], {PROJ: half, SIDE: half})
    assert fid == Fidelity(output=0.0, pooled=0.0, layers={PROJ: 0.0, SIDE: 0.0})


def test_fidelity_is_undefined_when_the_adapter_changes_nothing() -> None:
    pm = toy()
    for n in ("proj", "side"):
        set_tensors(getattr(pm.base_model.model, n), B=[[0.0], [0.0]])
    pair = LayerExport(t([[1.0, 0.0, 0.0]]), t([[1.0], [0.0]]))
    fid = measure_fidelity(pm, [BATCH], {PROJ: pair, SIDE: pair})
    assert fid.output is None and fid.pooled is None and fid.layers == {PROJ: None, SIDE: None}
    assert _fmt(None) == "undefined (the routed adapter changes nothing)" and _fmt(0.19002924) == "0.1900"


# --- the export -------------------------------------------------------------------------------------------------
DEFINITION = (
    "relative error ||y_export - y_routed||_F / ||y_routed - y_base||_F over the real tokens of the calibration "
    "set: 'output' on the model's logits, 'layers' on each adapted layer's output (inputs from the routed "
    "model), 'pooled' over all layers"
)


def report_of(out: Path) -> dict:
    return json.loads((out / "calibration.json").read_text())


def test_export_writes_the_averaged_pair_alpha_and_the_whole_report(tmp_path) -> None:
    pm = toy(task_names=["a", "b"])
    out = export_calibrated_adapter(pm, "a", tmp_path / "x", [BATCH, BATCH2])
    assert out == tmp_path / "x"
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "calibration.json"
    ]  # fmt: skip
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 1 and config["lora_alpha"] == 2  # s · r = (2 / 1) · 1
    state = load_file(out / "adapter_model.safetensors")
    for n in (PROJ, SIDE):
        torch.testing.assert_close(state[f"{n}.lora_A.weight"], t([[3 / 7, 4 / 7, 0.0]]), rtol=0, atol=1e-7)
        assert state[f"{n}.lora_B.weight"].tolist() == [[1.0], [2.0]]
    report = report_of(out)
    fid = report.pop("fidelity")
    assert report == {
        "task": "a",
        "source": {"method": "alora", "router": "soft", "num_experts": 2, "r": 1},
        "rank": 1,
        "truncated_to_rank": None,
        "calibration": {"tokens": 7, "batches": 2},
        "discarded_energy": {"max": None, "mean": None, "layers": None},
        "mean_gate": {PROJ: [0.428571, 0.571429], SIDE: [0.428571, 0.571429]},  # 3/7, 4/7 to 6 digits
    }
    assert fid.pop("definition") == DEFINITION and list(fid) == [
        "output",
        "pooled_layers",
        "max_layer",
        "layers",
    ]
    for value in (fid["output"], fid["pooled_layers"], fid["max_layer"], *fid["layers"].values()):
        assert value == pytest.approx(E_BOTH, rel=1e-5)
    assert (out / "README.md").read_text() == (
        "# LoRA adapter: task `a` (calibrated export of an asymlora adapter)\n\n"
        "A standard peft LoRA adapter (rank 1) exported from an asymlora `alora` adapter with `soft` routing over "
        "2 experts. The router's per-token gate is replaced by its average over the real tokens of the "
        "calibration data, so this adapter is an **approximation** of the routed model.\n\n"
        "Calibration: 7 real tokens in 2 batches.\n\n"
        "Fidelity on the calibration set (relative error ‖y_export − y_routed‖ / ‖y_routed − y_base‖ over real "
        "tokens; 0 = exact):\n\n"
        "- model output (logits): 0.1985\n"
        "- adapted layers, pooled: 0.1985; worst layer: 0.1985\n\n"
        "Per-layer numbers and mean gates: `calibration.json`.\n"
    )


def test_export_passes_tokenizer_batch_size_max_length_and_adapter_name(tmp_path) -> None:
    pm = toy()
    # "abc", "a" = BATCH: ḡ = (7/16, 9/16) in one batch of 8, or two batches of 1
    export_calibrated_adapter(pm, 0, tmp_path / "x", ["abc", "a"], tokenizer=Tok(), batch_size=1)
    report = report_of(tmp_path / "x")
    assert report["calibration"] == {"tokens": 4, "batches": 2} and report["mean_gate"][PROJ] == [
        0.4375,
        0.5625,
    ]
    assert report["fidelity"]["output"] == pytest.approx(E_BATCH, rel=1e-5)
    # max_length 2: "bc", "a" -> tokens 2, 3, 1: ḡ_0 = (3/4 + 1/2 + 1/4) / 3 = 1/2; written over x (overwrite)
    export_calibrated_adapter(
        pm,
        0,
        tmp_path / "x",
        ["abc", "a"],
        tokenizer=Tok(),
        max_length=2,
        overwrite=True,
        adapter_name="default",
    )
    assert report_of(tmp_path / "x")["mean_gate"][PROJ] == [0.5, 0.5]
    with pytest.raises(FileExistsError):
        export_calibrated_adapter(pm, 0, tmp_path / "x", ["abc", "a"], tokenizer=Tok())


def test_truncated_export_reports_the_discarded_energy_per_layer(tmp_path) -> None:
    """MoLoRA, B_0 = [[1], [0]], B_1 = [[0], [2]] (side: B_1 = [[0], [1]]), ḡ = (3/7, 4/7):
    proj ΔW / s = diag(3/7, 8/7) -> rank 1 discards 9 / (9 + 64) = 9/73;
    side diag(3/7, 4/7) -> 9 / 25; mean (9/73 + 9/25) / 2, max 9/25 = 0.36."""
    pm = toy("molora")
    set_tensors(pm.base_model.model.side, B=[[[1.0], [0.0]], [[0.0], [1.0]]])
    with warnings.catch_warnings():
        warnings.simplefilter(
            "error"
        )  # the SVD ran with autograd on: "Converting a tensor with requires_grad"
        export_calibrated_adapter(pm, "t", tmp_path / "x", [BATCH, BATCH2], rank=1)
    config = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    assert config["r"] == 1 and config["lora_alpha"] == 2
    state = load_file(tmp_path / "x" / "adapter_model.safetensors")
    # proj keeps 8/7 in cell (1, 1): |A| = [0, √(8/7), 0], |B| = [0, √(8/7)]ᵀ
    r87 = math.sqrt(8 / 7)
    torch.testing.assert_close(state[f"{PROJ}.lora_A.weight"].abs(), t([[0.0, r87, 0.0]]), rtol=0, atol=1e-6)
    torch.testing.assert_close(state[f"{PROJ}.lora_B.weight"].abs(), t([[0.0], [r87]]), rtol=0, atol=1e-6)
    report = report_of(tmp_path / "x")
    assert report["rank"] == 1 and report["truncated_to_rank"] == 1
    energy = report["discarded_energy"]
    assert energy["layers"] == {PROJ: pytest.approx(9 / 73), SIDE: pytest.approx(9 / 25)}
    assert energy["max"] == pytest.approx(0.36) and energy["mean"] == pytest.approx((9 / 73 + 9 / 25) / 2)
    readme = (tmp_path / "x" / "README.md").read_text()
    # (9/73 + 9/25) / 2 = 0.241644 -> 0.2416
    assert (
        "- truncated SVD to rank 1: discarded energy (Σ_(j>k) σ_j² / Σ σ_j²) mean 0.2416, max 0.3600\n"
        in readme
    )
    # without truncation MoLoRA has rank N · r = 2
    export_calibrated_adapter(pm, "t", tmp_path / "full", [BATCH])
    assert (
        report_of(tmp_path / "full")["rank"] == 2
        and report_of(tmp_path / "full")["truncated_to_rank"] is None
    )
    assert "truncated SVD" not in (tmp_path / "full" / "README.md").read_text()


def test_readme_of_undefined_fidelity() -> None:
    report = {
        "task": 3, "rank": 4, "truncated_to_rank": None,
        "source": {"method": "molora", "router": "topk", "num_experts": 5, "r": 2},
        "calibration": {"tokens": 1, "batches": 1},
        "fidelity": {"output": None, "pooled_layers": 0.5, "max_layer": None},
    }  # fmt: skip
    text = _readme(report)
    assert "- model output (logits): undefined (the routed adapter changes nothing)\n" in text
    assert (
        "- adapted layers, pooled: 0.5000; worst layer: undefined (the routed adapter changes nothing)\n"
        in text
    )
    assert "(rank 4) exported from an asymlora `molora` adapter with `topk` routing over 5 experts" in text


def test_export_refusals_whole_and_nothing_written(tmp_path) -> None:
    pm = toy(task_names=["a", "b"])
    cases = [
        (pm.base_model, "a",
         "export the calibrated adapter from the PeftModel, not from its base_model (the AsymLoraModel): run "
         "alone, the tuner does not hand the attention mask to its layers, so padding would count in the "
         "averaged gates"),
        (pm, "zz", "unknown task 'zz'; this adapter's tasks are ['a', 'b']"),
        (toy(modules_to_save=["embed"]), "a",
         "adapter 'default' also trains whole modules (modules_to_save=['embed']); a LoRA export would drop "
         "them. Train without modules_to_save to export it."),
    ]  # fmt: skip
    for model, task, message in cases:
        with pytest.raises(ValueError) as e:
            export_calibrated_adapter(model, task, tmp_path / "x", [BATCH])
        assert str(e.value) == message
    with pytest.raises(ValueError) as e:
        export_calibrated_adapter(pm, "a", tmp_path / "x", [BATCH], rank=2)
    assert str(e.value) == "rank=2 is out of range: the averaged update has rank <= 1; pass 1..1"
    assert not (tmp_path / "x").exists()


def test_numbers_in_the_docstring_agree_with_numpy() -> None:
    """The hand values above, recomputed here with numpy from the definitions (not with asymlora)."""
    x = np.array(EMBED)
    g1 = np.exp(np.c_[np.zeros(4), LN3 * x[:, 0]])
    g = g1 / g1.sum(1, keepdims=True)
    ids = [1, 2, 3, 1, 1, 1, 2]
    gbar = g[ids].mean(0)
    assert np.allclose(gbar, [3 / 7, 4 / 7])
    rho = (g[ids] * x[ids, :2]).sum(1)
    eps = x[ids, :2] @ gbar
    assert math.isclose(math.sqrt(((eps - rho) ** 2).sum() / (rho**2).sum()), E_BOTH, rel_tol=1e-12)
    ids = ids[:4]
    rho, eps = (g[ids] * x[ids, :2]).sum(1), x[ids, :2] @ g[ids].mean(0)
    assert math.isclose(math.sqrt(((eps - rho) ** 2).sum() / (rho**2).sum()), E_BATCH, rel_tol=1e-12)


# --- found by the mutants ---------------------------------------------------------------------------------------
def test_a_named_adapter_that_is_not_the_active_one_is_refused(tmp_path) -> None:
    """Bug: the calibration forwards run the *active* adapter, so the gates of a named inactive adapter were
    averaged over hidden states the other adapter produced (on the tiny Llama of test_calibrated_export.py,
    layer 1's mean gate read (0.64, 0.00, 0.36) instead of (0.85, 0.06, 0.09)). Now refused."""
    pm = toy()
    pm.add_adapter("cal", AsymLoraConfig(method="alora", r=1, num_experts=2, target_modules=["proj", "side"]))
    for n in ("proj", "side"):
        set_tensors(getattr(pm.base_model.model, n), "cal", router=[[0.0] * 3, [0.0] * 3])
    message = (
        "adapter 'cal' is not the model's only active adapter (active: ['default']): the calibration runs the "
        "model, so activate it first with model.set_adapter('cal')"
    )
    for call in (
        lambda: average_gates(pm, [BATCH], "cal"),
        lambda: measure_fidelity(pm, [BATCH], {}, "cal"),
        lambda: export_calibrated_adapter(pm, 0, tmp_path / "x", [BATCH], adapter_name="cal"),
    ):
        with pytest.raises(ValueError) as e:
            call()
        assert str(e.value) == message
    assert not (tmp_path / "x").exists()
    pm.set_adapter(
        "cal"
    )  # now the active one: found without a name, and calibrated (W_g = 0: ḡ = (1/2, 1/2))
    assert routed_config(pm, None)[0] == "cal"
    assert average_gates(pm, [BATCH])[0][PROJ].tolist() == [0.5, 0.5]


def test_strings_through_a_real_fast_tokenizer() -> None:
    """transformers' fast tokenizers take add_special_tokens as a bool only (None: TypeError)."""
    from tests.conftest import make_char_tokenizer

    # char ids: 4 + code − 32, so "a" = 69, "b" = 70
    assert lists(calibration_batches(["ab"], "t", make_char_tokenizer())) == [
        {"input_ids": [[69, 70]], "attention_mask": [[1, 1]]}
    ]


def test_default_batch_size_8_and_max_length_512(tmp_path) -> None:
    got = calibration_batches(["a"] * 9 + ["b" + "a" * 512], "t", Tok())
    assert [b["input_ids"].shape for b in got] == [(8, 1), (2, 512)]  # 8 + 2 rows; 513 letters cut to 512
    assert got[1]["input_ids"][1].tolist() == [1] * 512
    # the export's defaults: 17 strings -> 8 + 8 + 1 rows (3 batches; 9 a batch would give 2);
    # "b" + 512 × "a" -> the "b" cut: every gate (1/4, 3/4), 16 + 512 tokens
    pm = toy()
    export_calibrated_adapter(pm, 0, tmp_path / "x", ["a"] * 16 + ["b" + "a" * 512], tokenizer=Tok())
    report = report_of(tmp_path / "x")
    assert report["calibration"] == {"tokens": 528, "batches": 3}
    assert report["mean_gate"][PROJ] == [0.25, 0.75]
    assert (
        (tmp_path / "x" / "calibration.json")
        .read_text()
        .startswith('{\n  "task": 0,\n  "source": {\n    "method"')
    )
    assert (tmp_path / "x" / "calibration.json").read_text().endswith("\n  }\n}\n")  # indent 2, newline


def test_run_passes_no_position_ids_to_a_model_that_takes_none() -> None:
    class NoPositions(Recorder):
        def forward(self, input_ids, attention_mask, use_cache):  # type: ignore[override]
            return types.SimpleNamespace(logits=input_ids.double())

    assert len(list(_run(NoPositions(), [{"input_ids": [[1, 2]]}]))) == 1


def test_ratio_of_a_denominator_below_one() -> None:
    assert _ratio(0.25, 0.04) == pytest.approx(2.5)  # √(0.25 / 0.04)


def test_export_hands_the_task_to_the_calibration_check(tmp_path) -> None:
    with pytest.raises(ValueError) as e:
        export_calibrated_adapter(toy(), 0, tmp_path / "x", [{"input_ids": [[1, 2]], "task_ids": [1]}])
    assert str(e.value) == (
        "the calibration batches carry task_ids [1], but task 0 is being exported; pass only that task's "
        "examples (e.g. MultiTaskDataset([task], tokenizer))."
    )


def test_export_of_an_adapter_that_changes_nothing_on_the_calibration_set(tmp_path) -> None:
    """W_g = [[0, 0, 0], [200, 0, 0]]: g(1) = (0, 1), g(2) = (1, 0) exactly in float32 (e^-200 underflows).
    A_0 = [0, 2, 0], A_1 = [0, 0, 2]: token 1 (x = (1, 1, 0)) gets A_1 x = 0, token 2 (x = (−1, 0, 1)) gets
    A_0 x = 0, so the routed adapter adds nothing; the export with ḡ = (1/2, 1/2) adds B · 1 to both tokens:
    every ratio has a zero denominator and a nonzero numerator -> undefined (null)."""
    pm = toy()
    for n in ("proj", "side"):
        set_tensors(
            getattr(pm.base_model.model, n),
            A=[[[0.0, 2.0, 0.0]], [[0.0, 0.0, 2.0]]],
            router=[[0.0] * 3, [200.0, 0, 0]],
        )
    export_calibrated_adapter(pm, 0, tmp_path / "x", [{"input_ids": [[1, 2]]}])
    report = report_of(tmp_path / "x")
    assert report["mean_gate"][PROJ] == [0.5, 0.5]
    fid = report["fidelity"]
    assert fid["output"] is None and fid["pooled_layers"] is None and fid["max_layer"] is None
    assert fid["layers"] == {PROJ: None, SIDE: None}
    undefined = "undefined (the routed adapter changes nothing)"
    text = (tmp_path / "x" / "README.md").read_text()
    assert (
        f"- model output (logits): {undefined}\n- adapted layers, pooled: {undefined}; worst layer: {undefined}\n"
        in text
    )


def test_malora_export_has_rank_n_times_r_hat(tmp_path) -> None:
    """MALoRA's specs need d_in (its shared subspace); exported rank N · r̂ = 2 · 1.5 · 2 = 6."""
    config = AsymLoraConfig(method="malora", r=2, num_experts=2, router="soft", target_modules=["proj"])
    pm = peft.get_peft_model(Toy(), config)
    export_calibrated_adapter(pm, 0, tmp_path / "x", [BATCH])
    assert report_of(tmp_path / "x")["rank"] == 6
    assert json.loads((tmp_path / "x" / "adapter_config.json").read_text())["r"] == 6
