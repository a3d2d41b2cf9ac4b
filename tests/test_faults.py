"""Regression tests for faults users reported against peft, HydraLoRA, MoE-LoRA trainers and Flower.

Each test holds the right value on a tiny random Llama: gradient checkpointing, balance loss over real
tokens, task-id batch sizes, reloading every peft feature, merging through tied weights, target-name
typos, train/eval mode, and every float dtype in a Flower record.
"""

from __future__ import annotations

import peft
import pytest
import torch
import torch.nn.functional as F

import asymlora
from asymlora import AsymLoraConfig
from asymlora.methods import METHODS
from asymlora.routing import balance_loss
from asymlora.tuner.layer import AsymLoraLayer
from conftest import make_tiny_llama

# users (and transformers' Trainer) still call gradient_checkpointing_enable; transformers 5 deprecates the name
pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")

IDS = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(1))


def randomised(pm: peft.PeftModel, seed: int = 0, std: float = 0.3) -> peft.PeftModel:
    """Give every trainable tensor random values (B included), so no path is trivially zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)
    return pm


def adapted(seed: int = 0, **cfg) -> peft.PeftModel:
    cfg.setdefault("target_modules", ["q_proj", "v_proj", "down_proj"])
    return randomised(peft.get_peft_model(make_tiny_llama(seed), AsymLoraConfig(r=4, **cfg)), seed)


# --- 1. gradient checkpointing ---------------------------------------------------------------------
def loss_and_grads(pm, checkpointing: bool, reentrant: bool, scale: float = 1.0, **batch):
    pm.train()
    if checkpointing:
        pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    pm.zero_grad()
    torch.manual_seed(5)  # same dropout masks in both runs (checkpointing replays the RNG state)
    out = pm(input_ids=IDS, labels=IDS, use_cache=False, **batch)
    (scale * out.loss).backward()
    grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}
    return out.loss.detach(), grads


CHECKPOINT_CASES = [
    (method, router, weight, dropout)
    for method in sorted(METHODS)
    for router in ("task", "soft", "topk")
    for weight in ((0.0,) if router == "task" or method in ("lora", "fedhet") else (0.0, 0.1))
    for dropout in ((0.0, 0.2) if (method, router, weight) == ("alora", "soft", 0.1) else (0.0,))
]


@pytest.mark.parametrize(("method", "router", "weight", "dropout"), CHECKPOINT_CASES)
def test_checkpointing_gives_the_same_loss_and_gradients(method, router, weight, dropout) -> None:
    extra = {"intermediate_rank": 4} if method == "fedhet" else {}
    cfg = dict(method=method, router=router, balance_loss_weight=weight, lora_dropout=dropout, **extra)
    task_ids = {"task_ids": torch.tensor([1, 0])}
    ref_loss, ref = loss_and_grads(adapted(**cfg), False, False, **task_ids)
    for reentrant in (False, True):
        loss, grads = loss_and_grads(adapted(**cfg), True, reentrant, **task_ids)
        torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-5)
        assert grads.keys() == ref.keys()
        for name, g in grads.items():
            torch.testing.assert_close(g, ref[name], rtol=0, atol=1e-5, msg=f"{name} (reentrant={reentrant})")
    if weight:
        routers = [g for n, g in ref.items() if "router" in n]
        assert routers and all(g.abs().sum() > 0 for g in routers)


def test_two_forwards_before_one_backward_under_checkpointing() -> None:
    """Each checkpointed layer is recomputed with the task ids of its own forward (peft raises here)."""
    cfg = dict(method="alora", router="task", num_experts=3)
    sums = []
    for checkpointing in (False, True):
        pm = adapted(**cfg).train()
        if checkpointing:
            pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        a = pm(input_ids=IDS, labels=IDS, task_ids=torch.tensor([0, 1]), use_cache=False).loss
        b = pm(input_ids=IDS, labels=IDS, task_ids=torch.tensor([2, 2]), use_cache=False).loss
        (a + 2 * b).backward()
        sums.append({n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad})
    for name, g in sums[0].items():
        torch.testing.assert_close(sums[1][name], g, rtol=0, atol=1e-5, msg=name)


def hand_balance(probs: torch.Tensor) -> torch.Tensor:
    """N · Σ_i f_i P_i written out per expert (all tokens real)."""
    flat = probs.reshape(-1, probs.shape[-1])
    n, tokens = flat.shape[1], flat.shape[0]
    top = flat.argmax(-1)
    return n * sum((top == i).sum() / tokens * flat[:, i].mean() for i in range(n))


@pytest.mark.parametrize("router", ["soft", "topk"])
def test_balance_loss_gradient_equals_the_written_out_loss(router) -> None:
    """Loss and router gradients equal CE + w · mean_layers(N Σ f_i P_i) computed from captured router
    inputs, also under loss scaling (gradient accumulation divides the loss)."""
    weight, scale = 0.5, 0.25
    pm = adapted(method="molora", router=router, num_experts=4, top_k=2, balance_loss_weight=weight).train()
    loss, grads = loss_and_grads(pm, False, False, scale=scale)

    inputs: list[tuple[AsymLoraLayer, torch.Tensor]] = []
    hooks = [
        m.register_forward_pre_hook(lambda m, a: inputs.append((m, a[0])))
        for m in pm.modules()
        if isinstance(m, AsymLoraLayer)
    ]
    pm.zero_grad()
    logits = pm(input_ids=IDS).logits
    for h in hooks:
        h.remove()
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), IDS[:, 1:].reshape(-1))
    aux = torch.stack([hand_balance((x @ m.asymlora_router["default"].T).softmax(-1)) for m, x in inputs])
    ref_loss = ce + weight * aux.mean()
    (scale * ref_loss).backward()
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=0, atol=1e-6)
    for name, p in pm.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)


# --- 2. balance loss over real tokens -----------------------------------------------------------------
def test_balance_loss_by_hand_with_a_mask() -> None:
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.2, 0.3, 0.5]])
    # all 3 tokens: f = (1/3, 1/3, 1/3), P = (1/3, 11/30, 3/10) -> 3 · (1/3) · (1/3 + 11/30 + 3/10) = 1
    torch.testing.assert_close(balance_loss(probs), torch.tensor(1.0))
    # last token padding: f = (1/2, 1/2, 0), P = (0.4, 0.4, 0.2) -> 3 · (0.2 + 0.2) = 1.2
    torch.testing.assert_close(balance_loss(probs, torch.tensor([1, 1, 0])), torch.tensor(1.2))
    torch.testing.assert_close(
        balance_loss(probs[None], torch.tensor([[True, True, False]])), torch.tensor(1.2)
    )
    assert balance_loss(probs, torch.zeros(3)) == 0


@pytest.mark.parametrize("method", ["molora", "alora", "hydralora", "malora"])
def test_balance_loss_is_equal_padded_and_unpadded(method) -> None:
    pm = adapted(method=method, router="topk", num_experts=4, top_k=2, balance_loss_weight=1.0)
    ids = IDS[:1, :6]
    alone = pm(input_ids=ids, labels=ids)
    padded_ids = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    mask = (torch.arange(9) < 6).long()[None]
    labels = padded_ids.masked_fill(mask == 0, -100)
    padded = pm(input_ids=padded_ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(padded.balance_loss, alone.balance_loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(padded.loss, alone.loss, rtol=0, atol=1e-5)


# --- 3. task_ids length ------------------------------------------------------------------------------
def test_task_ids_of_another_length_than_the_batch_are_refused() -> None:
    pm = adapted(method="alora", router="task", num_experts=2)
    four = torch.randint(3, 128, (4, 5))
    for ids in ([0, 1], [0, 1, 1], [0, 1, 0, 1, 1]):
        with pytest.raises(ValueError, match=rf"task_ids has {len(ids)} entries but the batch has 4"):
            pm(input_ids=four, task_ids=torch.tensor(ids))
    with pytest.raises(ValueError, match="task_ids has 3 entries but the batch has 4"):
        pm(inputs_embeds=torch.randn(4, 5, 32), task_ids=torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="task_ids has 1 entries but the batch has 2"):
        pm.generate(input_ids=four[:2], task_ids=torch.tensor([1]), max_new_tokens=2)


def test_generate_repeats_one_task_id_per_prompt_for_beams_and_samples() -> None:
    pm = adapted(method="alora", router="task", num_experts=2).eval()
    ids, tasks = IDS[:, :5], torch.tensor([0, 1])
    both = pm.generate(input_ids=ids, task_ids=tasks, max_new_tokens=3, num_beams=3, num_return_sequences=2)
    assert both.shape[0] == 4
    for row, task in enumerate(tasks.tolist()):  # each prompt alone, with its own task, gives the same beams
        alone = pm.generate(
            input_ids=ids[row : row + 1],
            task_ids=torch.tensor([task]),
            max_new_tokens=3,
            num_beams=3,
            num_return_sequences=2,
        )
        assert torch.equal(both[2 * row : 2 * row + 2], alone)
    torch.manual_seed(0)
    sampled = pm.generate(
        input_ids=ids, task_ids=tasks, max_new_tokens=2, do_sample=True, num_return_sequences=3
    )
    assert sampled.shape == (6, 7)


# --- 4. every peft feature saves and loads back --------------------------------------------------------
@pytest.mark.parametrize(
    "extra",
    [
        {"modules_to_save": ["lm_head"]},
        {"modules_to_save": ["embed_tokens"], "target_modules": ["q_proj"]},
        {"layers_to_transform": [1]},
        {"layers_to_transform": 0, "layers_pattern": "layers"},
        {"exclude_modules": ["layers.0.self_attn.q_proj"]},
        {"target_modules": ".*\\.1\\.mlp\\.(up|down)_proj"},
    ],
)
def test_peft_features_save_and_load_back(tmp_path, extra) -> None:
    cfg = {"method": "alora", "target_modules": ["q_proj", "v_proj"], **extra}
    pm = randomised(peft.get_peft_model(make_tiny_llama(), AsymLoraConfig(r=4, **cfg)))
    with torch.no_grad():
        ref = pm(input_ids=IDS).logits
    pm.save_pretrained(tmp_path)
    back = peft.PeftModel.from_pretrained(make_tiny_llama(), tmp_path)
    with torch.no_grad():
        assert torch.equal(back(input_ids=IDS).logits, ref)
    with pytest.raises(ValueError, match="does not fit this model"):
        peft.PeftModel.from_pretrained(make_tiny_llama(hidden=48), tmp_path)


def test_several_adapters_with_different_settings_load_back(tmp_path) -> None:
    pm = peft.get_peft_model(
        make_tiny_llama(),
        AsymLoraConfig(method="alora", r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
    )
    pm.add_adapter(
        "hydra", AsymLoraConfig(method="hydralora", r=2, target_modules=["v_proj"], layers_to_transform=[0])
    )
    pm.add_adapter(
        "tasks",
        AsymLoraConfig(method="molora", router="task", num_experts=2, target_modules=["o_proj", "up_proj"]),
    )
    randomised(pm)
    for name in ("hydra", "tasks"):  # add_adapter leaves new adapters frozen: randomise them too
        pm.set_adapter(name)
        randomised(pm, seed=len(name))
    refs = {}
    with torch.no_grad():
        for name in ("default", "hydra", "tasks"):
            pm.set_adapter(name)
            refs[name] = pm(input_ids=IDS, task_ids=torch.tensor([1, 0])).logits
    pm.save_pretrained(tmp_path)
    back = peft.PeftModel.from_pretrained(make_tiny_llama(), tmp_path)
    back.load_adapter(tmp_path / "hydra", "hydra")
    back.load_adapter(tmp_path / "tasks", "tasks")
    with torch.no_grad():
        for name, ref in refs.items():
            back.set_adapter(name)
            assert torch.equal(back(input_ids=IDS, task_ids=torch.tensor([1, 0])).logits, ref), name


# --- 5. merging through tied weights -----------------------------------------------------------------------
def test_merge_task_unties_a_tied_lm_head(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    pm = adapted(method="alora", router="task", num_experts=2, target_modules=["lm_head", "q_proj"]).eval()
    embedding = pm.get_base_model().model.embed_tokens.weight.detach().clone()
    with torch.no_grad():
        routed = pm(input_ids=IDS, task_ids=torch.tensor([1, 1])).logits
    with pytest.warns(UserWarning, match=r"lm_head.weight is tied to \['model.embed_tokens.weight'\]"):
        merged = asymlora.merge_task(pm, 1)
    assert torch.equal(merged.model.embed_tokens.weight, embedding)
    assert merged.lm_head.weight is not merged.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=IDS).logits, routed, rtol=0, atol=1e-4)
    merged.save_pretrained(tmp_path)  # the saved config no longer ties, so the merge survives a reload
    with torch.no_grad():
        torch.testing.assert_close(
            AutoModelForCausalLM.from_pretrained(tmp_path)(input_ids=IDS).logits, routed, rtol=0, atol=1e-4
        )


@pytest.mark.parametrize("path", ["merge_adapter", "merge_and_unload"])
def test_peft_merge_paths_untie_a_tied_lm_head(path) -> None:
    pm = adapted(method="lora", target_modules=["lm_head"]).eval()
    embedding = pm.get_base_model().model.embed_tokens.weight.detach().clone()
    with torch.no_grad():
        ref = pm(input_ids=IDS).logits
    with pytest.warns(UserWarning, match="tied to"):
        model = pm.merge_and_unload() if path == "merge_and_unload" else (pm.merge_adapter() or pm)
    base = model.get_base_model() if path == "merge_adapter" else model
    assert torch.equal(base.model.embed_tokens.weight, embedding)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, ref, rtol=0, atol=1e-4)
    if path == "merge_adapter":
        pm.unmerge_adapter()
        with torch.no_grad():
            torch.testing.assert_close(pm(input_ids=IDS).logits, ref, rtol=0, atol=1e-4)


# --- 6. names that match nothing ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"target_modules": ["q_proj", "v_prj"]}, r"target_modules entries \['v_prj'\]"),
        ({"exclude_modules": ["layers.0.q_proj"]}, r"exclude_modules entries \['layers.0.q_proj'\]"),
        ({"modules_to_save": ["lm_haed"]}, r"modules_to_save entries \['lm_haed'\]"),
        ({"layers_to_transform": [1, 5]}, r"layers_to_transform indexes \[5\]"),
    ],
)
def test_config_names_that_match_nothing_are_named(extra, named) -> None:
    cfg = {"target_modules": ["q_proj"], **extra}
    with pytest.raises(ValueError, match=named + r".*nn.Linear modules are \[.*'v_proj'.*embed_tokens"):
        peft.get_peft_model(make_tiny_llama(), AsymLoraConfig(**cfg))
    pm = peft.get_peft_model(make_tiny_llama(), AsymLoraConfig(target_modules=["k_proj"]))
    with pytest.raises(ValueError, match=named):
        pm.add_adapter("second", AsymLoraConfig(**cfg))


def test_regex_target_modules_keep_peft_semantics() -> None:
    pm = peft.get_peft_model(make_tiny_llama(), AsymLoraConfig(target_modules=r".*\.(q_proj|nothing_here)"))
    adapted_names = {n for n, m in pm.named_modules() if isinstance(m, AsymLoraLayer)}
    assert len(adapted_names) == 2 and all(n.endswith("q_proj") for n in adapted_names)


# --- 7. train/eval mode ------------------------------------------------------------------------------
@pytest.mark.parametrize("training", [False, True])
def test_adding_adapters_keeps_the_model_mode(training) -> None:
    base = make_tiny_llama().train(training)
    pm = peft.get_peft_model(
        base, AsymLoraConfig(method="alora", lora_dropout=0.5, target_modules=["q_proj"])
    )
    pm.add_adapter(
        "second", AsymLoraConfig(method="molora", lora_dropout=0.5, target_modules=["q_proj", "v_proj"])
    )
    assert {m.training for m in pm.modules()} == {training}
    if not training:
        randomised(pm)
        pm.set_adapter("second")
        randomised(pm, seed=1)
        with torch.no_grad():
            assert torch.equal(pm(input_ids=IDS).logits, pm(input_ids=IDS).logits)


# --- 8. every float dtype through a Flower record ---------------------------------------------------------
def test_records_round_trip_every_float_dtype_bit_for_bit() -> None:
    pytest.importorskip("flwr")
    from flwr.app import Array
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    from asymlora.federated.client_app import RAW_STYPE, from_record, to_record

    g = torch.Generator().manual_seed(0)
    state = {
        f"x.{dt}": torch.randn(4, 3, generator=g).to(dt)
        for dt in (torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.float8_e4m3fn)
    }
    state["special.bf16"] = torch.tensor([float("nan"), -0.0, float("inf"), 1e-40], dtype=torch.bfloat16)
    state["empty.bf16"] = torch.zeros(0, 3, dtype=torch.bfloat16)
    state["scalar.bf16"] = torch.tensor(1.5, dtype=torch.bfloat16)
    record = to_record(state)
    # what Flower puts on the wire: the record and its arrays' chunks deflated to bytes, then inflated
    objects = get_all_nested_objects(record)
    wire = {object_id: obj.deflate() for object_id, obj in objects.items()}
    back = from_record(inflate_object_from_contents(record.object_id, wire))
    assert list(back) == list(state)
    for key, t in state.items():
        assert back[key].dtype == t.dtype and back[key].shape == t.shape, key
        assert back[key].reshape(-1).view(torch.uint8).tolist() == t.reshape(-1).view(torch.uint8).tolist(), (
            key
        )
    raw = [k for k, a in record.items() if a.stype == RAW_STYPE]
    assert set(raw) == {k for k, t in state.items() if t.dtype in (torch.bfloat16, torch.float8_e4m3fn)}
    # the bytes counted are the bytes sent: bfloat16 costs 2 B per value, float8 1 B, no header
    assert record.count_bytes() == sum(len(a.data) + len(k) for k, a in record.items())
    assert all(len(record[k].data) == state[k].numel() * state[k].element_size() for k in raw)
    bad = type(record)({"x": Array("bfloat16", (2, 2), RAW_STYPE, b"\0" * 6)})
    with pytest.raises(ValueError, match=r"'x'.*6 bytes"):
        from_record(bad)


def test_numpy_codec_names_the_dtypes_it_cannot_hold() -> None:
    from asymlora.federated.strategies import bytes_to_state, state_to_arrays, state_to_bytes

    state = {"x": torch.randn(3, 2).to(torch.bfloat16)}
    with pytest.raises(TypeError, match="BFloat16.*to_record"):
        state_to_arrays(state)
    assert torch.equal(bytes_to_state(state_to_bytes(state))["x"], state["x"])  # safetensors keeps bfloat16


def test_export_refuses_an_adapter_with_modules_to_save(tmp_path) -> None:
    """A stock LoRA export holds only A_t and B: whole trained modules would be silently lost."""
    import peft
    from tests.conftest import make_tiny_llama

    from asymlora import AsymLoraConfig, export_task_adapter

    cfg = AsymLoraConfig(method="alora", router="task", r=2, num_experts=2, task_names=["a", "b"],
                         target_modules=["q_proj"], modules_to_save=["lm_head"])  # fmt: skip
    model = peft.get_peft_model(make_tiny_llama(), cfg)
    with pytest.raises(ValueError, match=r"modules_to_save=\['lm_head'\].*merge_task"):
        export_task_adapter(model, "b", tmp_path / "b")
    assert not (tmp_path / "b").exists()
