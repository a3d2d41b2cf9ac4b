"""Logits on target positions only (asymlora.train.targets): the loss, its gradients and the validation
loss against a hand-written reference from the full logits (one −log softmax per predicted token)."""

from __future__ import annotations

import math

import peft
import pytest
import torch
from tests.conftest import make_tiny_llama
from transformers import GPT2Config, GPT2LMHeadModel

from asymlora import AsymLoraConfig
from asymlora.train.stopping import token_loss_sum
from asymlora.train.targets import on_targets, slices_logits, target_mask


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """3 rows of 12 tokens, right padding; answers at different places (row 2 has 1 target token)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 120, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 9:] = 0
    ids[1, 9:] = 0
    labels = torch.full((3, 12), -100)
    labels[0, 5:9] = ids[0, 5:9]
    labels[1, 6:9] = ids[1, 6:9]
    labels[2, 11] = ids[2, 11]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _reference_loss(full_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over predicted tokens of −log softmax(logits[b, t − 1])[labels[b, t]], one token at a time."""
    terms = []
    for b in range(labels.shape[0]):
        for t in range(1, labels.shape[1]):
            if labels[b, t] != -100:
                terms.append(-torch.log_softmax(full_logits[b, t - 1].double(), -1)[labels[b, t]])
    return torch.stack(terms).mean()


def _alora(method: str = "alora", **extra):
    model = make_tiny_llama(seed=1)
    cfg = AsymLoraConfig(method=method, r=4, num_experts=2, target_modules=["q_proj", "o_proj"], **extra)
    torch.manual_seed(0)
    pm = peft.get_peft_model(model, cfg)
    for p in pm.parameters():  # B away from zero so the adapter changes the logits
        if p.requires_grad:
            p.data.normal_(0, 0.3)
    return pm


def test_target_mask_marks_the_positions_that_predict_a_label():
    labels = torch.tensor([[-100, -100, 7, 8, -100], [-100, 5, -100, -100, 9]])
    expected = torch.tensor([[False, True, True, False, False], [True, False, False, True, False]])
    assert torch.equal(target_mask(labels), expected)


def test_training_loss_and_gradients_equal_the_full_projection():
    pm = _alora()
    pm.train()
    batch = _batch()
    with torch.no_grad():
        full_logits = pm(**{k: v for k, v in batch.items() if k != "labels"}).logits
    reference = _reference_loss(full_logits, batch["labels"])
    sparse = on_targets(pm, batch)
    assert sparse["logits_to_keep"].sum() == 8 and sparse["shift_labels"].shape == (8,)
    out = pm(**sparse, use_cache=False)
    assert out.logits.shape == (8, 128)  # 4 + 3 + 1 target tokens
    assert out.loss.item() == pytest.approx(reference.item(), rel=1e-5)
    out.loss.backward()
    sparse_grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}
    pm.zero_grad()
    pm(**batch, use_cache=False).loss.backward()
    for n, p in pm.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(sparse_grads[n], p.grad, rtol=1e-4, atol=1e-7)


def test_num_items_in_batch_divides_the_summed_target_losses():
    pm = _alora()
    batch = _batch(1)
    with torch.no_grad():
        full_logits = pm(**{k: v for k, v in batch.items() if k != "labels"}).logits
        reference = _reference_loss(full_logits, batch["labels"]) * 8 / 5.0  # sum of 8 terms / 5
        loss = pm(**on_targets(pm, batch), num_items_in_batch=torch.tensor(5.0)).loss
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)


def test_the_balance_loss_still_rides_on_the_labels():
    pm = _alora("molora", router="soft", balance_loss_weight=0.5)
    batch = _batch(2)
    with torch.no_grad():
        full = pm(**batch)
        sparse = pm(**on_targets(pm, batch))
    assert "balance_loss" in sparse and sparse["balance_loss"].item() > 0
    assert sparse.loss.item() == pytest.approx(full.loss.item(), rel=1e-5)
    assert sparse.balance_loss.item() == pytest.approx(full.balance_loss.item(), rel=1e-6)


def test_validation_loss_sum_from_target_logits_equals_the_reference():
    pm = _alora()
    batch = _batch(3)
    labels = batch["labels"]
    with torch.no_grad():
        full_logits = pm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        kept = pm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  logits_to_keep=target_mask(labels)).logits  # fmt: skip
    total, count = token_loss_sum(kept, labels).tolist()
    assert count == 8
    assert total / count == pytest.approx(_reference_loss(full_logits, labels).item(), rel=1e-5)
    assert token_loss_sum(full_logits, labels).tolist() == pytest.approx([total, count], rel=1e-5)


def test_which_models_slice_their_logits():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    assert slices_logits(make_tiny_llama()) and slices_logits(gpt2)
    assert slices_logits(_alora())  # through peft's wrapper
    ddp_like = torch.nn.Module()
    ddp_like.module = _alora()
    assert slices_logits(ddp_like)  # through DDP's .module

    class Plain(torch.nn.Module):
        def forward(self, input_ids, labels=None):  # no logits_to_keep: the batch goes unchanged
            return input_ids

    batch = _batch()
    assert not slices_logits(Plain()) and on_targets(Plain(), batch) is batch
    from transformers import BartConfig, BartForCausalLM

    bart = BartForCausalLM(BartConfig(vocab_size=128, d_model=16, decoder_layers=1, encoder_layers=1,
                                      decoder_attention_heads=2, encoder_attention_heads=2, decoder_ffn_dim=32,
                                      encoder_ffn_dim=32))  # fmt: skip
    assert not slices_logits(bart)  # it slices its logits but computes its own loss (no shift_labels)
    assert on_targets(bart, batch) is batch and torch.isfinite(bart(**batch).loss)
    no_labels = {k: v for k, v in batch.items() if k != "labels"}
    assert on_targets(make_tiny_llama(), no_labels) is no_labels


def test_a_batch_without_targets_gives_a_nan_loss_as_before():
    pm = _alora()
    batch = _batch()
    batch["labels"] = torch.full_like(batch["labels"], -100)
    with torch.no_grad():
        assert math.isnan(pm(**on_targets(pm, batch)).loss.item())
        assert math.isnan(pm(**batch).loss.item())
