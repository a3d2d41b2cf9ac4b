"""Every method on the real SmolLM2-135M (docs/design.md §7): forward, backward, starts equal to the base."""

from __future__ import annotations

import peft
import pytest
import torch

import asymlora

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm():
    from asymlora.models import load

    return load("smollm2-135m")


@pytest.mark.parametrize("method", ["lora", "alora", "hydralora", "molora", "malora"])
def test_forward_and_backward_on_smollm2(smollm, method: str) -> None:
    model, tokenizer = smollm
    batch = tokenizer(
        ["Question: Is the sky blue?\nAnswer: yes", "2 + 2 ="], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        base_logits = model(**batch).logits
    torch.manual_seed(0)
    cfg = asymlora.AsymLoraConfig(method=method, target_modules=["q_proj", "o_proj"])
    pm = peft.get_peft_model(model, cfg)
    try:
        out = pm(**batch, labels=batch["input_ids"])
        torch.testing.assert_close(out.logits, base_logits, rtol=1e-4, atol=1e-4)  # B = 0 at init
        out.loss.backward()
        grads = {t.name: t.param.grad for t in asymlora.adapter_tensors(pm)}
        assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
        b_grads = [t.param.grad for t in asymlora.adapter_tensors(pm) if t.role == asymlora.Role.B]
        assert len(b_grads) == 2 * 30 and all(g.abs().sum() > 0 for g in b_grads)  # q and o in 30 layers
    finally:
        pm.unload()
    assert not any(isinstance(m, asymlora.tuner.AsymLoraLayer) for m in model.modules())
