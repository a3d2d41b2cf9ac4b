"""asymlora adapters trained through transformers.Trainer and TRL's SFTTrainer (asymlora.hf, docs/trainer.md)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from conftest import make_char_tokenizer, make_tiny_llama

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from peft import PeftModel, get_peft_model  # noqa: E402
from transformers import TrainerCallback, TrainingArguments  # noqa: E402
from trl import SFTConfig  # noqa: E402

from asymlora import AsymLoraConfig  # noqa: E402
from asymlora.hf import AsymLoraSFTTrainer, AsymLoraTrainer, TaskIdsCollator  # noqa: E402
from asymlora.tuner.layer import AsymLoraLayer  # noqa: E402

TASKS = ["add", "sub", "mul"]
TARGETS = ["q_proj", "v_proj", "o_proj"]


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)


def task_rows(n: int = 12) -> list[dict]:
    """Texts of equal length that start with their task name (so a row's task can be read back from its ids)."""
    ops = {"add": "+", "sub": "-", "mul": "*"}
    rows = []
    for i in range(n):
        task = TASKS[(i * 7) % 3]  # a mixed order, so batches hold several tasks
        a, b = i % 10, (3 * i + 1) % 10
        rows.append({"text": f"{task} {a}{ops[task]}{b}", "task": task})
    return rows


def task_config(**kw) -> AsymLoraConfig:
    return AsymLoraConfig(
        method="alora", router="task", num_experts=3, task_names=TASKS, target_modules=TARGETS, **kw
    )


def common_args(tmp_path, **kw) -> dict:
    base = dict(
        output_dir=str(tmp_path / "out"),
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
        bf16=False,  # SFTConfig's default bf16=True autocasts on CPU too: compare in float32
    )
    return {**base, **kw}


def randomize_adapter(model, seed: int = 1) -> None:
    """Non-zero B so that the task ids change the output from the first step (B starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def record_layer_task_ids(model) -> list[list[int]]:
    """Task ids the first adapted layer sees in each forward (checkpoint recomputations included)."""
    seen: list[list[int]] = []
    layer = next(m for m in model.modules() if isinstance(m, AsymLoraLayer))
    layer.register_forward_hook(lambda mod, a, o: seen.append(mod.routing_state.call.task_ids.tolist()))
    return seen


def record_batches(trainer) -> list[dict]:
    batches: list[dict] = []
    inner = trainer.data_collator

    def collate(features):
        batch = inner(features)
        batches.append(batch)
        return batch

    trainer.data_collator = collate
    return batches


def expected_ids(tok, input_ids: torch.Tensor) -> list[int]:
    """Each row's task, read from its own text (independent of the collator's mapping)."""
    return [TASKS.index(tok.decode(row, skip_special_tokens=True).split(" ")[0]) for row in input_ids]


def sft_trainer(tmp_path, config, rows, **kw):
    tok = make_char_tokenizer()
    args = SFTConfig(
        **common_args(tmp_path, **{"per_device_train_batch_size": 4, "max_length": 64, **kw.pop("args", {})})
    )
    return AsymLoraSFTTrainer(
        model=make_tiny_llama(),
        peft_config=config,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tok,
        **kw,
    )


def test_sft_mixed_task_batches_route_each_example_by_its_task(tmp_path):
    trainer = sft_trainer(tmp_path, task_config(), task_rows(), args={"max_steps": 3})
    randomize_adapter(trainer.model)
    seen, batches = record_layer_task_ids(trainer.model), record_batches(trainer)
    before = adapter_state(trainer.model)
    trainer.train()
    tok = trainer.processing_class
    assert len(batches) == 3
    assert any(len(set(expected_ids(tok, b["input_ids"]))) > 1 for b in batches), "batches should mix tasks"
    for batch in batches:
        want = expected_ids(tok, batch["input_ids"])
        assert batch["task_ids"].tolist() == want
    # each layer call sees its batch's ids (twice per batch: TRL's default gradient checkpointing reruns it)
    per_batch = len(seen) // len(batches)
    assert per_batch in (1, 2)
    assert seen == [b["task_ids"].tolist() for b in batches for _ in range(per_batch)]
    after = adapter_state(trainer.model)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def manual_loss(model, batch, task_ids) -> float:
    """Mean next-token cross-entropy over the labelled tokens, from the model's logits."""
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], task_ids=task_ids
        ).logits
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100
    ).item()


def test_trainer_loss_is_the_forward_with_the_batch_task_ids(tmp_path):
    """Plain Trainer on a tokenized dataset: the 'task' column survives column pruning and sets the routing."""
    tok = make_char_tokenizer()
    rows = task_rows(8)
    enc = [tok(r["text"]) for r in rows]
    ds = datasets.Dataset.from_list(
        [
            {"input_ids": e["input_ids"], "labels": e["input_ids"], "task": r["task"]}
            for e, r in zip(enc, rows, strict=True)
        ]
    )
    model = get_peft_model(make_tiny_llama(), task_config())
    randomize_adapter(model)
    from transformers import DataCollatorForLanguageModeling

    args = TrainingArguments(
        **common_args(tmp_path), max_steps=1, per_device_train_batch_size=8, learning_rate=0.0
    )
    trainer = AsymLoraTrainer(
        model=model,
        args=args,
        train_dataset=ds,
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
    )
    batches = record_batches(trainer)
    trainer.train()
    (batch,) = batches
    logged = trainer.state.log_history[0]["loss"]
    model.eval()
    right = torch.tensor(expected_ids(tok, batch["input_ids"]))
    assert batch["task_ids"].tolist() == right.tolist()
    assert logged == pytest.approx(manual_loss(model, batch, right), rel=1e-5)
    wrong = (right + 1) % 3
    assert abs(logged - manual_loss(model, batch, wrong)) > 1e-3


# --- balance loss --------------------------------------------------------------------------------


def soft_config(weight: float) -> AsymLoraConfig:
    return AsymLoraConfig(
        method="alora", router="soft", num_experts=3, balance_loss_weight=weight, target_modules=TARGETS
    )


def own_loop_step(model, micro_batches, lr: float) -> list[float]:
    """The project's own loop (asymlora.train.loop): loss = mean over micro-batches of (CE mean + balance
    loss), then one SGD step. Returns each micro-batch's CE (by hand from the logits) + balance term."""
    model.train()
    values = []
    for batch in micro_batches:
        out = model(**batch, use_cache=False)
        ce = F.cross_entropy(
            out.logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100
        )
        aux = out["balance_loss"].item() if "balance_loss" in out else 0.0
        assert out.loss.item() == pytest.approx(ce.item() + aux, rel=1e-6)
        (out.loss / len(micro_batches)).backward()
        values.append(ce.item() + aux)
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= lr * p.grad
                p.grad = None
    return values


def one_step(tmp_path, kind: str, weight: float, lr: float = 0.5):
    """One SGD step over 2 accumulated micro-batches of 4, by the trainer and by the own loop, from the same
    adapter. Returns (start, trainer's adapter, own loop's adapter, trainer's log, own loop's loss)."""
    tok = make_char_tokenizer()
    rows = task_rows(8)
    opts = dict(
        max_steps=1,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=lr,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        weight_decay=0.0,
        train_sampling_strategy="sequential",
    )
    if kind == "sft":
        trainer = sft_trainer(tmp_path, soft_config(weight), rows, args=opts)
    else:
        from transformers import DataCollatorForLanguageModeling

        trainer = AsymLoraTrainer(
            model=get_peft_model(make_tiny_llama(), soft_config(weight)),
            args=TrainingArguments(**common_args(tmp_path), **opts),
            train_dataset=datasets.Dataset.from_list(
                [{"input_ids": tok(r["text"])["input_ids"]} for r in rows]
            ),
            data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
        )
    randomize_adapter(trainer.model)
    start = adapter_state(trainer.model)
    batches = record_batches(trainer)
    trainer.train()
    trained = adapter_state(trainer.model)
    model = trainer.model
    assert len(batches) == 2
    # evaluation (one batch of all 8 rows): the eval loss is CE by hand + the balance loss of that batch
    eval_loss = trainer.evaluate(trainer.train_dataset)["eval_loss"]
    model.eval()
    with torch.no_grad():
        out = model(**batches[2])
    ce = F.cross_entropy(
        out.logits[:, :-1].flatten(0, 1), batches[2]["labels"][:, 1:].flatten(), ignore_index=-100
    )
    aux = out["balance_loss"].item() if "balance_loss" in out else 0.0
    assert eval_loss == pytest.approx(ce.item() + aux, rel=1e-5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(start[name])
    values = own_loop_step(model, batches[:2], lr)
    return start, trained, adapter_state(model), trainer.state.log_history[0], sum(values) / 2


@pytest.mark.parametrize("kind", ["trainer", "sft"])
def test_balance_loss_reaches_the_trainer_loss_and_gradient(tmp_path, kind):
    """The logged loss is the own loop's mean over micro-batches of (CE + balance loss); the updated adapter
    and the balance loss's share of the update (adapter with it minus without it, routers included) are the
    own loop's."""
    _, trained, own, logs, own_loss = one_step(tmp_path / "w", kind, 0.5)
    _, trained0, own0, logs0, own_loss0 = one_step(tmp_path / "0", kind, 0.0)
    assert logs["loss"] == pytest.approx(own_loss, rel=1e-5)
    assert logs0["loss"] == pytest.approx(own_loss0, rel=1e-5)
    assert (
        logs["balance_loss"] == pytest.approx(own_loss - own_loss0, rel=1e-4) and logs["balance_loss"] > 0.1
    )
    routers = [k for k in own if "router" in k]
    assert routers
    for name in own:
        torch.testing.assert_close(trained[name], own[name], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(
            trained[name] - trained0[name], own[name] - own0[name], rtol=1e-3, atol=1e-6
        )
    assert any((own[k] - own0[k]).abs().max() > 1e-3 for k in routers)


# --- target-position logits ----------------------------------------------------------------------


def masked_step(tmp_path, **extra):
    """One SGD step of AsymLoraTrainer on 8 equal-length rows whose first 5 tokens (the prompt) are labelled
    -100. Returns (start adapter, trained adapter, the batch, the LM head's output shapes, the logged loss)."""
    from transformers import default_data_collator

    tok = make_char_tokenizer()
    rows = []
    for r in task_rows(8):
        ids = tok(r["text"])["input_ids"]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * 5 + ids[5:]})
    opts = dict(max_steps=1, per_device_train_batch_size=8, learning_rate=0.5, optim="sgd", max_grad_norm=0.0,
                lr_scheduler_type="constant", weight_decay=0.0, train_sampling_strategy="sequential")  # fmt: skip
    trainer = AsymLoraTrainer(
        model=get_peft_model(make_tiny_llama(), soft_config(0.0)),
        args=TrainingArguments(**common_args(tmp_path), **opts, **extra),
        train_dataset=datasets.Dataset.from_list(rows),
        data_collator=default_data_collator,
    )
    randomize_adapter(trainer.model)
    start, batches, shapes = adapter_state(trainer.model), record_batches(trainer), []
    head = trainer.model.get_base_model().lm_head
    hook = head.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    trainer.train()
    hook.remove()
    return (
        start,
        adapter_state(trainer.model),
        trainer,
        batches[0],
        shapes,
        trainer.state.log_history[0]["loss"],
    )


def test_training_projects_only_the_target_positions(tmp_path):
    """Prompt-masked labels: the training forward projects only the 8 x (len - 5) target positions onto the
    vocabulary; the logged loss is the cross-entropy by hand from the full logits, and the SGD update is the
    one of that hand loss. With label_smoothing_factor (Trainer's own loss from the logits) the full
    (batch, seq, vocab) logits stay."""
    start, trained, trainer, batch, shapes, logged = masked_step(tmp_path / "t")
    vocab, (n, seq) = trainer.model.config.vocab_size, batch["input_ids"].shape
    assert shapes == [(n * (seq - 5), vocab)]
    model = trainer.model
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(start[name])
    model.train()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)
    ce.backward()
    assert logged == pytest.approx(ce.item(), rel=1e-5)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(trained[name], start[name] - 0.5 * p.grad, rtol=1e-4, atol=1e-6)
    *_, smoothed_shapes, _ = masked_step(tmp_path / "s", label_smoothing_factor=0.1)
    assert smoothed_shapes == [(n, seq, vocab)]


# --- checkpoints ---------------------------------------------------------------------------------


class StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_save = control.should_training_stop = True
        return control


def test_resume_from_checkpoint_gives_the_uninterrupted_adapter(tmp_path):
    """AdamW + linear decay + adapter dropout: interrupted at step 2 and resumed (a fresh trainer whose adapter
    is overwritten with noise) reaches the same adapter as 4 uninterrupted steps; the saved adapter reloads
    exactly."""
    rows = task_rows(16)
    opts = dict(max_steps=4, learning_rate=1e-2, save_strategy="steps", save_steps=100)
    cfg = dict(lora_dropout=0.1)
    full = sft_trainer(tmp_path / "full", task_config(**cfg), rows, args=opts)
    full.train()
    want = adapter_state(full.model)

    first = sft_trainer(tmp_path / "cut", task_config(**cfg), rows, args=opts, callbacks=[StopAt(2)])
    first.train()
    ckpt = tmp_path / "cut" / "out" / "checkpoint-2"
    assert (ckpt / "adapter_model.safetensors").is_file() and first.state.global_step == 2
    halfway = adapter_state(first.model)
    second = sft_trainer(tmp_path / "cut", task_config(**cfg), rows, args=opts)
    randomize_adapter(second.model, seed=5)  # the checkpoint, not the fresh initialisation, must count
    second.train(resume_from_checkpoint=str(ckpt))
    got = adapter_state(second.model)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-7)
    assert any(not torch.equal(halfway[k], want[k]) for k in want)

    final = tmp_path / "cut" / "out" / "checkpoint-4"
    second.save_model(str(final))
    loaded = PeftModel.from_pretrained(make_tiny_llama(), str(final))
    assert loaded.peft_config["default"].task_names == TASKS
    for name, value in adapter_state(second.model).items():
        torch.testing.assert_close(dict(loaded.named_parameters())[name], value, rtol=0, atol=0)


# --- bad input -----------------------------------------------------------------------------------


def test_dataset_without_the_task_column_is_refused_before_the_adapter_is_built(tmp_path):
    rows = [{"text": r["text"]} for r in task_rows(4)]
    base = make_tiny_llama()
    with pytest.raises(ValueError, match=r"no 'task' column.*task_column="):
        AsymLoraSFTTrainer(
            model=base,
            peft_config=task_config(),
            args=SFTConfig(**common_args(tmp_path)),
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=make_char_tokenizer(),
        )
    assert not any(isinstance(m, AsymLoraLayer) for m in base.modules())


def test_unknown_task_name_is_refused_naming_it(tmp_path):
    rows = task_rows(4)
    rows[2]["task"] = "div"
    with pytest.raises(ValueError, match=r"unknown task 'div' in column 'task'.*\['add', 'sub', 'mul'\]"):
        sft_trainer(tmp_path, task_config(), rows)
    collate = TaskIdsCollator(lambda f: {}, task_config())
    with pytest.raises(ValueError, match=r"task id 3 .*outside \[0, 3\)"):
        collate([{"task": 3}])
    with pytest.raises(ValueError, match="task_names"):
        TaskIdsCollator(lambda f: {}, AsymLoraConfig(router="task", num_experts=2))([{"task": "add"}])


def test_packing_is_refused_for_task_routing(tmp_path):
    with pytest.raises(ValueError, match=r"packing=True .*set packing=False"):
        sft_trainer(tmp_path, task_config(), task_rows(4), args={"packing": True})


def test_adapter_config_of_a_tuner_reads_its_active_adapter_and_refuses_several():
    """A peft tuner's ``active_adapter`` is a list of names (was: TypeError, unhashable list)."""
    from asymlora.hf import adapter_config

    model = get_peft_model(make_tiny_llama(), task_config())
    other = AsymLoraConfig(method="hydralora", num_experts=2, target_modules=TARGETS)
    model.add_adapter("other", other)
    tuner = model.base_model
    assert adapter_config(tuner).method == "alora"  # active: ["default"]
    tuner.set_adapter("other")
    assert adapter_config(tuner) is other
    tuner.set_adapter(["default", "other"])
    with pytest.raises(ValueError) as err:
        adapter_config(tuner)
    assert str(err.value) == (
        "2 adapters are active (['default', 'other']); the trainer trains one asymlora adapter: call "
        "model.set_adapter('default') (or the name of the one to train) first."
    )
    assert adapter_config(make_tiny_llama()) is None
