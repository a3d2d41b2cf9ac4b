"""Scoring (`asymlora.eval.scoring`) on hand values.

Mutation tests (docs/testing.md, "Mutation results: `eval/scoring.py`"): a stub language model whose
next-token distribution is a rational function of what it attends to, a lookup tokenizer, and every
expected value worked out in the comments or by `ref_score`, a plain sum over one unpadded sequence
written here (never the code under test).

The stub LM (vocabulary 0..4; 0 is EOS, 4 the padding in most tests, so padding that leaks into the
context changes the numbers): the token after a context with real tokens h (those the attention mask
lets through, the KV cache included) at position id p has weight

    w_v = 1 + [v = h[-1] + 1 mod 5] + 2 [v = p mod 5] + 4 [v = Σh mod 5],   Σ_v w_v = 5 + 1 + 2 + 4 = 12

and probability w_v / 12 (the logits are ln w_v). Left padding needs the right position ids and mask,
the cache must be reordered to the right prompts, and a wrong scored position picks another w.

E1: prompt [3, 1], options "a" = [1], "bd" = [2, 4]:
    after [3, 1] at p = 1: w = 1 + [v=2] + 2[v=1] + 4[v=4]  = (1, 3, 2, 1, 5): "a" -> 3/12 = 1/4
    "b" -> 2/12 = 1/6; after [3, 1, 2] at p = 2: w = 1 + [v=3] + 2[v=2] + 4[v=1] = (1, 5, 3, 2, 1): "d" -> 1/12
    so scores (ln 1/4, ln 1/6 + ln 1/12 = −ln 72)
"""

from __future__ import annotations

import math
import types
from typing import Any

import pytest
import torch
from torch import nn

import asymlora.eval.scoring as scoring
from asymlora.data import Example, Task, format_prompt
from asymlora.eval.scoring import (
    _first_line,
    _pad_left,
    _pad_right,
    evaluate_task,
    evaluate_tasks,
    greedy_generate,
    model_device,
    option_loglikelihoods,
    prompt_ids,
)
from asymlora.eval.stats import example_key

LETTERS = ["", "a", "b", "c", "d", " ", "\n"]  # id 0 is EOS (decoded as nothing)
PAD = 4


def weights(history: list[int], position: int) -> list[int]:
    w = [1] * 5
    if history:
        w[(history[-1] + 1) % 5] += 1
    w[position % 5] += 2
    w[sum(history) % 5] += 4
    return w


def ref_score(ids: list[int], start: int) -> float:
    """Σ ln p(ids[k] | ids[:k]) for k in [start, len(ids)), one unpadded sequence at positions 0, 1, ..."""
    return sum(math.log(weights(ids[:k], k - 1)[ids[k]] / 12) for k in range(start, len(ids)))


# --------------------------------------------------------------------------- stubs


class Tok:
    """Lookup tokenizer: a prompt text from ``prompts``; any other text letter by letter (unknown letters dropped)."""

    eos_token_id: int | None = 0

    def __init__(self, prompts: dict[str, list[int]], pad: int | None = PAD) -> None:
        self.prompts, self.pad_token_id = prompts, pad

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        assert add_special_tokens is False
        if text in self.prompts:
            return {"input_ids": list(self.prompts[text])}
        return {"input_ids": [LETTERS.index(c) for c in text.lstrip(" ") if c in LETTERS[1:5]]}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        assert skip_special_tokens is True
        return "".join(LETTERS[i] for i in ids)


class Cache:
    def __init__(self, ids: torch.Tensor, mask: torch.Tensor) -> None:
        self.ids, self.mask = ids, mask

    def reorder_cache(self, select: torch.Tensor) -> None:
        self.ids, self.mask = self.ids[select], self.mask[select]


class StubLM(nn.Module):
    """The rule of the module docstring, over the cache and the attended tokens; records every call."""

    cache_key = "cache"

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict[str, Any]] = []

    def run(self, input_ids, attention_mask=None, position_ids=None, past=None, use_cache=None, keep=0, **kw):
        self.calls.append({"input_ids": input_ids.tolist(), "attention_mask": _list(attention_mask),
                           "position_ids": _list(position_ids), "past": past is not None, "use_cache": use_cache,
                           "keep": keep.tolist() if torch.is_tensor(keep) else keep, **kw})  # fmt: skip
        batch, width = input_ids.shape
        before = past.ids.shape[1] if past is not None else 0
        ids = torch.cat([past.ids, input_ids], 1) if past is not None else input_ids
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask
        assert mask.shape == ids.shape, "the mask must cover the cache and the new tokens"
        if position_ids is None:
            position_ids = torch.arange(before, before + width).expand(batch, width)
        logits = torch.zeros(batch, width, 5)
        for b in range(batch):
            for t in range(width):
                history = [int(ids[b, k]) for k in range(before + t + 1) if mask[b, k]]
                logits[b, t] = torch.tensor(weights(history, int(position_ids[b, t]))).log()
        logits = logits[:, -keep:] if isinstance(keep, int) else logits[:, keep]
        cache = Cache(ids, mask) if use_cache else None
        return types.SimpleNamespace(logits=logits, **{self.cache_key: cache})


def _list(value):
    return None if value is None else value.tolist()


class CacheLM(StubLM):
    """A transformers ≥ 5.2x forward: the cache is called ``cache``."""

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=None,
                logits_to_keep=0):  # fmt: skip
        return self.run(input_ids, attention_mask, position_ids, cache, use_cache, logits_to_keep)


class PastLM(StubLM):
    """A transformers 5.0 forward: ``past_key_values``."""

    cache_key = "past_key_values"

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None,
                logits_to_keep=0):  # fmt: skip
        return self.run(input_ids, attention_mask, position_ids, past_key_values, use_cache, logits_to_keep)


class BothLM(StubLM):
    """Takes both names (the newer one is the real one)."""

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=None,
                past_key_values=None, logits_to_keep=0):  # fmt: skip
        assert past_key_values is None, "the deprecated name was used"
        return self.run(input_ids, attention_mask, position_ids, cache, use_cache, logits_to_keep)


class NoKeepLM(StubLM):
    """A cache but no ``logits_to_keep``: all logits come back."""

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=None):
        return self.run(input_ids, attention_mask, position_ids, cache, use_cache)


class PlainLM(StubLM):
    """No cache, no position ids, no ``logits_to_keep``."""

    def forward(self, input_ids, attention_mask=None):
        return self.run(input_ids, attention_mask)


class NoPositionsLM(StubLM):
    """A cache but no ``position_ids``: the shared path cannot left-pad it, so the plain one is used."""

    def forward(self, input_ids, attention_mask=None, cache=None, use_cache=None, logits_to_keep=0):
        return self.run(input_ids, attention_mask, None, cache, use_cache, logits_to_keep)


class NoUseCacheLM(StubLM):
    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, logits_to_keep=0):
        return self.run(input_ids, attention_mask, position_ids, cache, True, logits_to_keep)


# --------------------------------------------------------------------------- examples

E1 = Example(prompt="one", target="a", options=["a", "bd"])
E2 = Example(prompt="two", target="d", options=["cab", "d", "b"])
E3 = Example(prompt="three", target="c", options=["dd", "abc", "c"])
E4 = Example(prompt="four", target="a", options=["a", "b"])
PROMPTS = {format_prompt(E1): [3, 1], format_prompt(E2): [2], format_prompt(E3): [1, 4, 2, 3],
           format_prompt(E4): [1, 2]}  # fmt: skip
OPTION_IDS = {
    "a": [1],
    "bd": [2, 4],
    "cab": [3, 1, 2],
    "d": [4],
    "b": [2],
    "dd": [4, 4],
    "abc": [1, 2, 3],
    "c": [3],
}


def expected(examples: list[Example]) -> list[list[float]]:
    return [
        [
            ref_score(PROMPTS[format_prompt(e)] + OPTION_IDS[o], len(PROMPTS[format_prompt(e)]))
            for o in e.options or []
        ]
        for e in examples
    ]


def test_reference_agrees_with_the_hand_values() -> None:
    assert ref_score([3, 1, 1], 2) == pytest.approx(math.log(1 / 4), abs=1e-12)
    assert ref_score([3, 1, 2, 4], 2) == pytest.approx(-math.log(72), abs=1e-12)
    # E2 "cab" after [2]: p=0: w = 1 + [v=3] + 2[v=0] + 4[v=2] = (3, 1, 5, 2, 1): c -> 2/12;
    # [2, 3] at p=1: 1 + [v=4] + 2[v=1] + 4[v=0] = (5, 3, 1, 1, 2): a -> 3/12;
    # [2, 3, 1] at p=2: 1 + [v=2] + 2[v=2] + 4[v=1] = (1, 5, 4, 1, 1): b -> 4/12
    assert ref_score([2, 3, 1, 2], 1) == pytest.approx(math.log(2 / 12 * 3 / 12 * 4 / 12), abs=1e-12)


@pytest.mark.parametrize("lm", [CacheLM, PastLM, BothLM, NoKeepLM, PlainLM, NoPositionsLM, NoUseCacheLM])
@pytest.mark.parametrize("share_prompt", [True, False])
@pytest.mark.parametrize("batch_size", [1, 2, 5, 64])
def test_option_scores_are_the_hand_values(lm, share_prompt, batch_size) -> None:
    examples = [E1, E2, E3]
    scores = option_loglikelihoods(lm(), Tok(PROMPTS), examples, task_id=None, batch_size=batch_size,
                                   share_prompt=share_prompt)  # fmt: skip
    assert scores[0] == pytest.approx([math.log(1 / 4), -math.log(72)], abs=1e-5)
    want = expected(examples)
    for row, ref in zip(scores, want, strict=True):
        assert row == pytest.approx(ref, abs=1e-5)
    assert all(type(v) is float for row in scores for v in row)


def test_pad_falls_back_to_eos_and_needs_one() -> None:
    scores = option_loglikelihoods(
        CacheLM(), Tok(PROMPTS, pad=None), [E1, E2, E3], task_id=None, batch_size=8
    )
    assert scores == [pytest.approx(r, abs=1e-5) for r in expected([E1, E2, E3])]
    tok = Tok(PROMPTS, pad=None)
    tok.eos_token_id = None
    with pytest.raises(
        ValueError, match=r"^the tokenizer has neither pad_token_id nor eos_token_id; set a pad token$"
    ):
        scoring._pad_id(tok)
    tok.pad_token_id = 3
    assert scoring._pad_id(tok) == 3 and type(scoring._pad_id(tok)) is int


def test_shared_path_calls_by_hand() -> None:
    """Chunks of at most 5 options, longest prompt first: [E3 (3 options), E1 (2)], then [E2 (3)]."""
    lm, progress = CacheLM(), []
    option_loglikelihoods(
        lm, Tok(PROMPTS), [E1, E2, E3], task_id=None, batch_size=5, on_progress=progress.append
    )
    assert progress == [5, 3]
    assert [c["input_ids"] for c in lm.calls] == [[[1, 4, 2, 3], [4, 4, 3, 1]], [[4, 4], [1, 2], [2, 4]], [[2]],
                                                   [[3, 1]]]  # fmt: skip
    # prompt pass: left padding (pad 4), positions 0.. on the real tokens (0 on padding), the last logit only
    # (position 3 of the width 4, as an index tensor: see test_the_prompt_pass_hands_the_lm_head_a_contiguous_slice)
    assert lm.calls[0] == {"input_ids": [[1, 4, 2, 3], [4, 4, 3, 1]], "attention_mask": [[1, 1, 1, 1], [0, 0, 1, 1]],
                           "position_ids": [[0, 1, 2, 3], [0, 0, 0, 1]], "past": False, "use_cache": True,
                           "keep": [3]}  # fmt: skip
    # options of 2+ tokens: "dd" (E3), "abc" (E3), "bd" (E1): the cache rows (0, 0, 1), every token but the last,
    # right-padded to width 3 - 1 = 2; positions go on from each prompt's length (4, 4, 2)
    assert lm.calls[1] == {"input_ids": [[4, 4], [1, 2], [2, 4]],
                           "attention_mask": [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]],
                           "position_ids": [[4, 5], [4, 5], [2, 3]], "past": True, "use_cache": True,
                           "keep": 0}  # fmt: skip
    assert lm.calls[2]["position_ids"] == [[0]] and lm.calls[2]["attention_mask"] == [[1]]
    assert lm.calls[3] == {"input_ids": [[3, 1]], "attention_mask": [[1, 1, 1]], "position_ids": [[1, 2]],
                           "past": True, "use_cache": True, "keep": 0}  # fmt: skip


def test_shared_path_with_single_token_options_needs_no_second_pass() -> None:
    e = Example(prompt="one", target="a", options=["a", "b", "c"])
    lm, progress = CacheLM(), []
    tok = Tok({format_prompt(e): [3, 1]})
    scores = option_loglikelihoods(lm, tok, [e], task_id=None, batch_size=1, on_progress=progress.append)
    # after [3, 1] at p = 1: w = (1, 3, 2, 1, 5): a 3/12, b 2/12, c 1/12 (one example per chunk, even over 1)
    assert scores == [pytest.approx([math.log(3 / 12), math.log(2 / 12), math.log(1 / 12)], abs=1e-6)]
    assert len(lm.calls) == 1 and progress == [3]


def test_shared_chunks_pack_examples_up_to_the_batch_size() -> None:
    """Prompts of lengths 4, 2, 1 with 3, 2, 3 options: batch 6 -> [E3, E1] (5), [E2]; batch 8 -> one chunk;
    batch 2 -> one example per chunk (E3's 3 options exceed it: an example is never split)."""
    for size, chunks in [(6, [2, 1]), (8, [3]), (5, [2, 1]), (4, [1, 1, 1]), (2, [1, 1, 1])]:
        lm = CacheLM()
        option_loglikelihoods(lm, Tok(PROMPTS), [E1, E2, E3], task_id=None, batch_size=size)
        prompt_passes = [len(c["input_ids"]) for c in lm.calls if not c["past"]]
        assert prompt_passes == chunks, size
    # longest prompt first: E3 ([1, 4, 2, 3]) leads, then E1 ([3, 1]), then E2 ([2])
    lm = CacheLM()
    option_loglikelihoods(lm, Tok(PROMPTS), [E2, E1, E3], task_id=None, batch_size=1)
    assert [c["input_ids"] for c in lm.calls if not c["past"]] == [[[1, 4, 2, 3]], [[3, 1]], [[2]]]


def test_plain_path_calls_by_hand() -> None:
    """Sequences sorted longest first, right-padded, logits kept from the first option position - 1 on."""
    lm, progress = CacheLM(), []
    option_loglikelihoods(lm, Tok(PROMPTS), [E1, E3], task_id=None, batch_size=3, share_prompt=False,
                          on_progress=progress.append)  # fmt: skip
    # sequences: E1 a [3,1,1] (3), E1 bd [3,1,2,4] (4), E3 dd [1,4,2,3,4,4] (6), abc [1,4,2,3,1,2,3] (7), c (5)
    assert progress == [3, 2]
    assert lm.calls[0]["input_ids"] == [[1, 4, 2, 3, 1, 2, 3], [1, 4, 2, 3, 4, 4, 4], [1, 4, 2, 3, 3, 4, 4]]
    assert lm.calls[0]["attention_mask"] == [[1] * 7, [1] * 6 + [0], [1] * 5 + [0, 0]]
    assert lm.calls[0]["keep"] == [3, 4, 5] and lm.calls[0]["position_ids"] is None
    assert lm.calls[0]["past"] is False and lm.calls[0]["use_cache"] is None
    assert lm.calls[1]["input_ids"] == [[3, 1, 2, 4], [3, 1, 1, 4]]
    assert lm.calls[1]["attention_mask"] == [[1, 1, 1, 1], [1, 1, 1, 0]] and lm.calls[1]["keep"] == [1, 2]
    # without logits_to_keep the slice is taken from the full logits (same numbers)
    lm = NoKeepLM()
    scores = option_loglikelihoods(lm, Tok(PROMPTS), [E1, E3], task_id=None, batch_size=3, share_prompt=False)
    assert scores == [pytest.approx(r, abs=1e-5) for r in expected([E1, E3])]
    assert lm.calls[0]["keep"] == 0


def test_truncation_scores_each_option_on_its_own_cut_prompt() -> None:
    """max_length 4: "a" (with EOS 2 tokens) keeps [3, 1]; "bd" (3) keeps [1]: the prompts differ -> plain path."""
    lm = CacheLM()
    scores = option_loglikelihoods(lm, Tok(PROMPTS), [E1], task_id=None, batch_size=4, max_length=4)
    # "bd" after [1] at p = 0: w = 1 + [v=2] + 2[v=0] + 4[v=1] = (3, 5, 2, 1, 1): b 2/12;
    # [1, 2] at p = 1: 1 + [v=3] + 2[v=1] + 4[v=3] = (1, 3, 1, 6, 1): d 1/12
    assert scores == [pytest.approx([math.log(1 / 4), math.log(2 / 12 * 1 / 12)], abs=1e-6)]
    assert not any(c["past"] for c in lm.calls) and lm.calls[0]["position_ids"] is None
    # E2 at max_length 5: "cab" keeps [2], "d" and "b" keep [2]: the same prompt -> shared path
    lm = CacheLM()
    scores = option_loglikelihoods(lm, Tok(PROMPTS), [E2], task_id=None, batch_size=4, max_length=5)
    assert scores == [pytest.approx(r, abs=1e-5) for r in expected([E2])]
    assert lm.calls[0]["keep"] == [0] and any(
        c["past"] for c in lm.calls
    )  # the prompt [2]'s last (only) position
    # E4 keeps [1, 2] for both options at max_length 4, E1 does not: every example must share its prompt
    lm = CacheLM()
    option_loglikelihoods(lm, Tok(PROMPTS), [E4, E1], task_id=None, batch_size=4, max_length=4)
    assert not any(c["past"] for c in lm.calls)


def test_same_prompts_compares_each_example_with_its_own_first_option() -> None:
    same = scoring._same_prompts
    assert same([([1, 2, 5], 2), ([1, 2, 6], 2), ([3, 5], 1)], [(0, 0), (0, 1), (1, 0)])
    assert not same([([1, 2, 5], 2), ([2, 6], 1)], [(0, 0), (0, 1)])
    assert not same([([1, 5], 1), ([2, 6], 1)], [(0, 0), (0, 1)])
    assert same([([1, 5], 1), ([2, 6], 1)], [(0, 0), (1, 0)])
    groups = scoring._group_by_example(
        [([1, 2, 5], 2), ([7], 0), ([1, 2, 6, 6], 2)], [(1, 0), (0, 0), (1, 1)]
    )
    assert groups == [([], [[7]]), ([1, 2], [[5], [6, 6]])]


def test_option_sequences_as_training_encodes_them() -> None:
    tok = Tok(PROMPTS)
    assert scoring._option_sequence(tok, E2, 0, 10**6) == ([2, 3, 1, 2], 1)
    assert scoring._option_sequence(tok, E2, 2, 10**6) == ([2, 2], 1)
    assert scoring._option_sequence(tok, E3, 1, 6) == (
        [2, 3, 1, 2, 3],
        2,
    )  # "abc" + EOS: 4 of 6, the prompt's last 2
    assert prompt_ids(tok, E3) == [1, 4, 2, 3]
    assert prompt_ids(tok, E3, max_length=4) == [2, 3]  # room for the target "c" and EOS
    assert prompt_ids(tok, E3, max_length=None) == [1, 4, 2, 3]


def test_refusals_whole() -> None:
    tok, lm = Tok(PROMPTS), CacheLM()
    no_tokens = Example(prompt="one", target="a", options=["a", "x"])
    with pytest.raises(ValueError, match=r"^option 'x' of example 'one'… has no tokens$"):
        option_loglikelihoods(lm, tok, [no_tokens], task_id=None, batch_size=2)
    empty = Example(prompt="empty", target="a", options=["a", "b"])
    tok.prompts[format_prompt(empty)] = []
    with pytest.raises(ValueError, match=r"^example 'empty'… has an empty prompt; nothing to condition on$"):
        option_loglikelihoods(lm, tok, [empty], task_id=None, batch_size=2)
    generate = Example(prompt="free", target="x")
    with pytest.raises(
        ValueError, match=r"^example 1 \('free'…\) has no options; it is not a choice example$"
    ):
        option_loglikelihoods(lm, tok, [E1, generate], task_id=None, batch_size=2)
    for bad in (0, -1, True, 1.5, None):
        with pytest.raises(ValueError, match=rf"^batch_size must be a positive integer, got {bad!r}$"):
            option_loglikelihoods(lm, tok, [E1], task_id=None, batch_size=bad)
    for bad in (-1, True, 1.0, "0"):
        with pytest.raises(
            ValueError, match=rf"^task_id must be a non-negative integer or None, got {bad!r}$"
        ):
            option_loglikelihoods(lm, tok, [E1], task_id=bad, batch_size=2)
    message = (r"^task_id=0 was given but CacheLM does not take task_ids \(only an asymlora peft model does\); "
               r"evaluate it with task_id=None$")  # fmt: skip
    with pytest.raises(ValueError, match=message):
        option_loglikelihoods(lm, tok, [E1], task_id=0, batch_size=2)
    with pytest.raises(ValueError, match=message.replace("CacheLM", "GenLM")):
        greedy_generate(GenLM(), tok, [E1], task_id=0, batch_size=2, max_new_tokens=1)
    assert lm.calls == []


def test_task_kwargs() -> None:
    assert scoring._task_kwargs(None, 3, torch.device("cpu")) == {}
    ids = scoring._task_kwargs(2, 3, torch.device("cpu"))["task_ids"]
    assert ids.tolist() == [2, 2, 2] and ids.dtype == torch.long
    assert scoring._task_kwargs(0, 1, torch.device("meta"))["task_ids"].device.type == "meta"


def test_model_device() -> None:
    meta = torch.device("meta")
    assert model_device(types.SimpleNamespace(device=meta)) == meta
    assert model_device(nn.Linear(2, 2, device="meta")) == meta
    linear = nn.Linear(2, 2, device="meta")
    linear.device = "cpu"  # not a torch.device: the first parameter's is used
    assert model_device(linear) == meta
    assert model_device(nn.ReLU()) == torch.device("cpu")


def test_pads() -> None:
    ids, mask = _pad_right([[5, 6, 7], [8]], 9)
    assert ids.tolist() == [[5, 6, 7], [8, 9, 9]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long
    ids, mask = _pad_left([[5, 6, 7], [8]], 9)
    assert ids.tolist() == [[5, 6, 7], [9, 9, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == mask.dtype == torch.long
    assert list(scoring._batches([4, 2, 0, 1, 3], 2)) == [[4, 2], [0, 1], [3]]


def test_supports_probes() -> None:
    assert scoring._supports_logits_to_keep(CacheLM()) and not scoring._supports_logits_to_keep(NoKeepLM())
    wrapped = types.SimpleNamespace(get_base_model=lambda: CacheLM())
    assert scoring._supports_logits_to_keep(wrapped) and scoring._cache_name(wrapped) == "cache"
    assert scoring._cache_name(PastLM()) == "past_key_values" and scoring._cache_name(BothLM()) == "cache"
    assert scoring._cache_name(PlainLM()) is None and scoring._cache_name(NoPositionsLM()) is None
    assert scoring._cache_name(NoUseCacheLM()) is None
    unsigned = types.SimpleNamespace(forward=1)  # no signature: neither
    assert scoring._cache_name(unsigned) is None and not scoring._supports_logits_to_keep(unsigned)


def test_eval_mode_restored() -> None:
    lm = CacheLM()
    lm.train()
    option_loglikelihoods(lm, Tok(PROMPTS), [E1], task_id=None, batch_size=2)
    assert lm.training
    lm.eval()
    option_loglikelihoods(lm, Tok(PROMPTS), [E1], task_id=None, batch_size=2, share_prompt=False)
    assert not lm.training


def test_shared_path_is_taken_by_a_transformers_llama() -> None:
    """transformers 5.2x calls the cache ``cache``: the shared path was never taken (only ``past_key_values``
    was probed), every option cost a full forward pass. Now the prompt pass hands its cache to the options."""
    from tests.conftest import make_char_tokenizer, make_tiny_llama

    tok = make_char_tokenizer(pad_token="</s>")
    model = make_tiny_llama(seed=0, vocab_size=len(tok))
    seen: list[bool] = []

    def spy(module, args, kwargs):
        seen.append(kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None)

    model.register_forward_pre_hook(spy, with_kwargs=True)
    examples = [Example(prompt="Question: sky?", target="yes", options=["yes", "no"])]
    shared = option_loglikelihoods(model, tok, examples, task_id=None, batch_size=4)
    assert seen == [False, True]  # the prompt, then the options on its cache
    plain = option_loglikelihoods(model, tok, examples, task_id=None, batch_size=4, share_prompt=False)
    assert shared[0] == pytest.approx(plain[0], abs=1e-4) and seen[2:] == [False]


# --------------------------------------------------------------------------- generation


class GenLM(nn.Module):
    """``generate`` appends, after each row's real tokens h: ' ', letter 1 + (Σh mod 4), '\\n', 'b', EOS, 'c', ...
    (cut to ``max_new_tokens``), padded with 4 ('d') past the EOS as transformers pads finished rows."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict[str, Any]] = []

    def generate(self, input_ids, attention_mask, generation_config, **kw):
        self.calls.append({"input_ids": input_ids.tolist(), "attention_mask": attention_mask.tolist(),
                           "config": generation_config, **kw})  # fmt: skip
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
            h = [i for i, m in zip(ids, mask, strict=True) if m]
            rows.append(([5, 1 + sum(h) % 4, 6, 2, 0, 3, 3])[: generation_config.max_new_tokens])
        width = max(len(r) for r in rows)
        new = [r + [PAD] * (width - len(r)) for r in rows]
        return torch.cat([input_ids, torch.tensor(new)], 1)


G1 = Example(prompt="g one", target="b")  # [3, 1]: Σ 4 -> 'a'
G2 = Example(prompt="g two", target="c")  # [2]: 'c'
G3 = Example(prompt="g three", target="x", references=["x", "b a"])  # [1, 4, 2]: Σ 7 -> 'd'
GEN = {format_prompt(G1): [3, 1], format_prompt(G2): [2], format_prompt(G3): [1, 4, 2]}


def test_greedy_generation_by_hand() -> None:
    lm, progress = GenLM(), []
    texts = greedy_generate(lm, Tok(GEN), [G1, G2, G3], task_id=None, batch_size=2, max_new_tokens=6,
                            on_progress=progress.append)  # fmt: skip
    # new tokens ' ', x, '\n', 'b', EOS, 'c': decoded up to EOS and stripped
    assert texts == ["a\nb", "c\nb", "d\nb"]
    assert progress == [2, 1]
    # longest prompt first, left-padded with 4
    assert [c["input_ids"] for c in lm.calls] == [[[1, 4, 2], [4, 3, 1]], [[2]]]
    assert [c["attention_mask"] for c in lm.calls] == [[[1, 1, 1], [0, 1, 1]], [[1]]]
    config = lm.calls[0]["config"]
    assert (config.max_new_tokens, config.do_sample, config.num_beams, config.eos_token_id, config.pad_token_id) == (
        6, False, 1, 0, 4)  # fmt: skip
    assert all(set(c) == {"input_ids", "attention_mask", "config"} for c in lm.calls)
    # no EOS among the new tokens: all kept; 2 new tokens: ' ' and the letter
    assert greedy_generate(GenLM(), Tok(GEN), [G1], task_id=None, batch_size=1, max_new_tokens=4) == ["a\nb"]
    assert greedy_generate(GenLM(), Tok(GEN), [G2], task_id=None, batch_size=1, max_new_tokens=2) == ["c"]
    # max_length cuts the prompt from the left as training does (room for the target: "x" has no token, EOS)
    lm = GenLM()
    greedy_generate(lm, Tok(GEN), [G3], task_id=None, batch_size=1, max_new_tokens=1, max_length=3)
    assert lm.calls[0]["input_ids"] == [[4, 2]]
    lm.train()
    greedy_generate(lm, Tok(GEN), [G3], task_id=None, batch_size=1, max_new_tokens=1)
    assert lm.training


def test_greedy_generation_refusals_whole() -> None:
    for bad in (0, -2, True, 2.0, None):
        with pytest.raises(ValueError, match=rf"^max_new_tokens must be a positive integer, got {bad!r}$"):
            greedy_generate(GenLM(), Tok(GEN), [G1], task_id=None, batch_size=1, max_new_tokens=bad)
    with pytest.raises(ValueError, match=r"^batch_size must be a positive integer, got 0$"):
        greedy_generate(GenLM(), Tok(GEN), [G1], task_id=None, batch_size=0, max_new_tokens=1)
    tok = Tok(GEN)
    tok.eos_token_id = None
    with pytest.raises(
        ValueError, match=r"^the tokenizer has no eos_token_id; set tokenizer.eos_token before generating$"
    ):
        greedy_generate(GenLM(), tok, [G1], task_id=None, batch_size=1, max_new_tokens=1)
    tok = Tok(GEN, pad=None)  # pad falls back to EOS 0
    lm = GenLM()
    greedy_generate(lm, tok, [G1, G2], task_id=None, batch_size=2, max_new_tokens=1)
    assert lm.calls[0]["input_ids"] == [[3, 1], [0, 2]] and lm.calls[0]["config"].pad_token_id == 0


def test_first_line() -> None:
    assert _first_line("\n  \n  ab c \nd") == "ab c"
    assert _first_line(" \n\t") == "" and _first_line("") == ""


# --------------------------------------------------------------------------- tasks


def test_evaluate_choice_task_rows_by_hand() -> None:
    """E1: a (ln 1/4) over bd (−ln 72): right. E2: "d" after [2] at p=0, w = (3, 1, 5, 2, 1): 2/12, "b" 5/12,
    "cab" 2/12·3/12·4/12: "b" wins over the target "d": wrong. E3 by `ref_score`: "c" after [1, 4, 2, 3] at p=3,
    w = 1 + [v=4] + 2[v=3] + 4[v=0] = (5, 1, 1, 3, 2): 3/12 beats "dd" and "abc" (below 2/12): right."""
    task = Task("ch", "choice", train=[E2], test=[E1, E2, E3], metrics=["accuracy"])
    metrics, rows = evaluate_task(CacheLM(), Tok(PROMPTS), task, task_id=None, with_examples=True)
    assert metrics == {"accuracy": pytest.approx(2 / 3), "n": 3.0}
    assert rows == [{"index": i, "key": example_key(e.prompt, e.target, e.options), "scores": {"accuracy": hit}}
                    for i, (e, hit) in enumerate([(E1, 1.0), (E2, 0.0), (E3, 1.0)])]  # fmt: skip
    assert evaluate_task(CacheLM(), Tok(PROMPTS), task, task_id=None) == metrics
    assert evaluate_task(CacheLM(), Tok(PROMPTS), task, task_id=None, max_examples=2) == {
        "accuracy": 0.5,
        "n": 2.0,
    }
    assert evaluate_task(CacheLM(), Tok(PROMPTS), task, task_id=None, split="train") == {
        "accuracy": 0.0,
        "n": 1.0,
    }
    # "b" as a second reference of E2 makes it right; a "d" reference alone keeps it wrong
    e2b = Example(prompt="two", target="d", options=["cab", "d", "b"], references=["d", "b"])
    task = Task("ch", "choice", train=[E2], test=[e2b], metrics=["accuracy"])
    assert evaluate_task(CacheLM(), Tok(PROMPTS), task, task_id=None) == {"accuracy": 1.0, "n": 1.0}


def test_choice_ties_go_to_the_first_option(monkeypatch) -> None:
    monkeypatch.setattr(
        scoring, "option_loglikelihoods", lambda *a, **k: [[-1.0, -1.0, -2.0], [-3.0, -1.0, -1.0]]
    )
    test = [Example(prompt="p", target="a", options=["a", "b", "c"]), Example(prompt="q", target="c",
                                                                               options=["a", "b", "c"])]  # fmt: skip
    task = Task("t", "choice", train=test, test=test, metrics=["accuracy"])
    assert evaluate_task(None, None, task, task_id=None) == {"accuracy": 0.5, "n": 2.0}


def test_evaluate_generate_task_rows_by_hand() -> None:
    """GenLM answers "a\\nb", "c\\nb", "d\\nb" (above). No reference has a line break: first lines "a", "c", "d";
    exact match (SQuAD normalisation drops the article "a": "") : G1 ("b") no, G2 ("c") yes, G3 ("x" / "b a") no."""
    task = Task("g", "generate", train=[G1], test=[G1, G2, G3], metrics=["exact_match"])
    metrics, rows = evaluate_task(GenLM(), Tok(GEN), task, task_id=None, max_new_tokens=6, with_examples=True,
                                  batch_size=1)  # fmt: skip
    assert metrics == {"exact_match": pytest.approx(1 / 3), "n": 3.0}
    assert [r["scores"] for r in rows] == [{"exact_match": 0.0}, {"exact_match": 1.0}, {"exact_match": 0.0}]
    assert [r["key"] for r in rows] == [example_key(e.prompt, e.target, e.options) for e in (G1, G2, G3)]
    assert [r["index"] for r in rows] == [0, 1, 2]
    # a reference with a line break keeps the whole completions: G2's "c\\nb" ("c b") is not "c"; G3's "d\\nb"
    # is its second reference
    g3 = Example(prompt="g three", target="x", references=["x", "d\nb"])
    task = Task("g", "generate", train=[G1], test=[G2, g3], metrics=["exact_match"])
    assert evaluate_task(GenLM(), Tok(GEN), task, task_id=None, max_new_tokens=6) == {
        "exact_match": 0.5,
        "n": 2.0,
    }
    # max_new_tokens reaches the generation: 2 tokens -> G2 "c" (no line to cut) matches
    g3 = Example(prompt="g three", target="x", references=["x\ny"])
    task = Task("g", "generate", train=[G1], test=[G2, g3], metrics=["exact_match"])
    assert evaluate_task(GenLM(), Tok(GEN), task, task_id=None, max_new_tokens=6)["exact_match"] == 0.0
    assert evaluate_task(GenLM(), Tok(GEN), task, task_id=None, max_new_tokens=2)["exact_match"] == 0.5


def test_per_example_scores_leave_out_corpus_metrics() -> None:
    per = scoring._per_example_scores(["a b", "c"], ["a b", "c"], [["a b"], ["d"]], ["exact_match", "bleu"],
                                      {"exact_match": 0.5, "bleu": 0.0})  # fmt: skip
    assert per == {"exact_match": [1.0, 0.0]}
    # a mean that is not the task's value is left out
    assert scoring._per_example_scores(["a"], ["a"], [["a"]], ["exact_match"], {"exact_match": 0.9}) == {}
    near = 1.0 - 1e-10
    assert scoring._per_example_scores(["a"], ["a"], [["a"]], ["exact_match"], {"exact_match": near}) == {
        "exact_match": [1.0]}  # fmt: skip


def test_split_examples_and_evaluate_tasks(monkeypatch) -> None:
    task = Task("ch", "choice", train=[E2], test=[E1, E2, E3], metrics=["accuracy"])
    with pytest.raises(ValueError, match=r"^split must be 'test' or 'train', got 'dev'$"):
        evaluate_task(CacheLM(), Tok(PROMPTS), task, task_id=None, split="dev")
    for bad in (0, True, 1.0):
        with pytest.raises(
            ValueError, match=rf"^max_examples must be a positive integer or None, got {bad!r}$"
        ):
            evaluate_task(CacheLM(), Tok(PROMPTS), task, task_id=None, max_examples=bad)
    empty = Task("none", "choice", train=[], test=[E1], metrics=["accuracy"])
    with pytest.raises(ValueError, match=r"^task 'none' has no train example to evaluate$"):
        evaluate_task(CacheLM(), Tok(PROMPTS), empty, task_id=None, split="train")
    assert scoring._split_examples(task, "test", None) == [E1, E2, E3]
    assert scoring._split_examples(task, "test", 1) == [E1]

    seen = []
    monkeypatch.setattr(scoring, "option_loglikelihoods",
                        lambda m, t, ex, **k: seen.append(k) or [[0.0, -1.0]] * len(ex))  # fmt: skip
    other = Task("other", "choice", train=[E1], test=[E1, E1], metrics=["accuracy"])
    out = evaluate_tasks(None, None, [task, other], task_ids=[3, None], batch_size=7, max_examples=1,
                         max_length=9)  # fmt: skip
    assert out == {"ch": {"accuracy": 1.0, "n": 1.0}, "other": {"accuracy": 1.0, "n": 1.0}}
    assert [(k["task_id"], k["batch_size"], k["max_length"], k["on_progress"]) for k in seen] == [
        (3, 7, 9, None), (None, 7, 9, None)]  # fmt: skip
    seen.clear()
    assert list(evaluate_tasks(None, None, [task, other])) == ["ch", "other"]
    assert [(k["task_id"], k["batch_size"], k["max_length"]) for k in seen] == [(None, 16, None)] * 2
    with pytest.raises(ValueError, match=r"^1 task ids for 2 tasks; give one per task \(or None\)$"):
        evaluate_tasks(None, None, [task, other], task_ids=[0])
    with pytest.raises(ValueError, match=r"^task names must be distinct, got \['ch', 'ch'\]$"):
        evaluate_tasks(None, None, [task, task])


def test_progress_bar_counts_options_or_examples(monkeypatch) -> None:
    import asymlora.eval.scoring as module

    bars = []

    class Bar:
        def __init__(self, **kw):
            self.kw, self.n = kw, 0
            bars.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def update(self, k):
            self.n += k

    monkeypatch.setattr(module, "progress_bar", lambda **kw: Bar(**kw))
    task = Task("ch", "choice", train=[E2], test=[E1, E2, E3], metrics=["accuracy"])
    evaluate_task(CacheLM(), Tok(PROMPTS), task, task_id=None, progress="scoring ch", batch_size=3)
    assert (
        bars[0].kw == {"desc": "scoring ch", "total": 8, "unit": "option", "leave": False} and bars[0].n == 8
    )
    gen = Task("g", "generate", train=[G1], test=[G1, G2, G3], metrics=["exact_match"])
    evaluate_task(GenLM(), Tok(GEN), gen, task_id=None, progress="g", batch_size=2, max_new_tokens=2)
    assert bars[1].kw == {"desc": "g", "total": 3, "unit": "example", "leave": False} and bars[1].n == 3


class NoCacheNameLM(StubLM):
    """Position ids and ``use_cache`` but no cache argument: the plain path."""

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None, logits_to_keep=0):
        return self.run(input_ids, attention_mask, position_ids, None, use_cache, logits_to_keep)


def test_a_forward_without_a_cache_argument_takes_the_plain_path() -> None:
    lm = NoCacheNameLM()
    assert scoring._cache_name(lm) is None
    scores = option_loglikelihoods(lm, Tok(PROMPTS), [E1, E2], task_id=None, batch_size=8)
    assert scores == [pytest.approx(r, abs=1e-5) for r in expected([E1, E2])]
    assert len(lm.calls) == 1 and lm.calls[0]["use_cache"] is None


@pytest.mark.filterwarnings("error")
def test_no_warning_on_either_path() -> None:
    """log_softmax gets its dimension (an implicit one warns)."""
    for share in (True, False):
        option_loglikelihoods(
            CacheLM(), Tok(PROMPTS), [E1, E2, E3], task_id=None, batch_size=4, share_prompt=share
        )


def test_messages_quote_the_first_60_characters_of_the_prompt() -> None:
    long = "p" * 59 + "qr"  # 61 characters: the message shows 60
    tok = Tok({})
    bad_option = Example(prompt=long, target="a", options=["a", "x"])
    tok.prompts[format_prompt(bad_option)] = [1]
    with pytest.raises(ValueError, match=rf"^option 'x' of example '{'p' * 59}q'… has no tokens$"):
        option_loglikelihoods(CacheLM(), tok, [bad_option], task_id=None, batch_size=2)
    empty = Example(prompt=long, target="a", options=["a", "b"])
    tok.prompts[format_prompt(empty)] = []
    with pytest.raises(
        ValueError, match=rf"^example '{'p' * 59}q'… has an empty prompt; nothing to condition on$"
    ):
        option_loglikelihoods(CacheLM(), tok, [empty], task_id=None, batch_size=2)
    with pytest.raises(
        ValueError, match=rf"^example 0 \('{'p' * 59}q'…\) has no options; it is not a choice example$"
    ):
        option_loglikelihoods(CacheLM(), tok, [Example(prompt=long, target="a")], task_id=None, batch_size=2)


def test_evaluate_task_hands_its_arguments_to_the_generator(monkeypatch) -> None:
    seen = []
    monkeypatch.setattr(scoring, "greedy_generate", lambda m, t, ex, **k: seen.append(k) or ["c"] * len(ex))
    task = Task("g", "generate", train=[G1], test=[G1, G2], metrics=["exact_match"])
    assert evaluate_task(None, None, task, task_id=None) == {"exact_match": 0.5, "n": 2.0}  # G2 is "c"
    assert seen[-1] == {"on_progress": None, "task_id": None, "batch_size": 16, "max_new_tokens": 32,
                        "max_length": None}  # fmt: skip
    evaluate_task(None, None, task, task_id=2, batch_size=3, max_new_tokens=7, max_length=11)
    assert seen[-1] == {
        "on_progress": None,
        "task_id": 2,
        "batch_size": 3,
        "max_new_tokens": 7,
        "max_length": 11,
    }


def test_evaluate_task_logs_its_result(caplog, monkeypatch) -> None:
    """GenLM's first lines "a", "c", "d" against "b", "c", "x"/"b a": 1/3, rounded to 4 digits in the log."""
    import logging
    import re

    caplog.set_level(logging.INFO, logger="asymlora.eval.scoring")
    task = Task("g", "generate", train=[G1], test=[G1, G2, G3], metrics=["exact_match"])
    evaluate_task(GenLM(), Tok(GEN), task, task_id=None, max_new_tokens=6)
    monkeypatch.setattr(scoring, "greedy_generate", lambda m, t, ex, **k: ["c"] * len(ex))
    evaluate_task(None, None, task, task_id=3)
    messages = [r.getMessage() for r in caplog.records if r.name == "asymlora.eval.scoring"]
    patterns = [
        r"evaluated g \(3 examples, task_id=None\) in (\d+\.\d) s: \{'exact_match': 0\.3333, 'n': 3\.0\}",
        r"evaluated g \(3 examples, task_id=3\) in (\d+\.\d) s: \{'exact_match': 0\.3333, 'n': 3\.0\}",
    ]
    assert len(messages) == 2
    for message, pattern in zip(messages, patterns, strict=True):
        found = re.fullmatch(pattern, message)
        assert found is not None, message
        assert 0.0 <= float(found.group(1)) < 60.0  # the elapsed time, not a clock reading


def test_sharded_scores_this_ranks_share_and_shows_no_bar_off_the_main_rank(monkeypatch) -> None:
    """As rank 1 of 2: examples 1, 3 are scored here; unshard gets them with the total (4)."""
    from asymlora import distributed

    gathered, bars = [], []
    monkeypatch.setattr(distributed, "shard", lambda items: list(items[1::2]))
    monkeypatch.setattr(
        distributed, "unshard", lambda local, total: gathered.append((local, total)) or [None] * total
    )
    monkeypatch.setattr(distributed, "is_main", lambda: False)
    monkeypatch.setattr(scoring, "progress_bar", lambda **kw: bars.append(kw))
    out = scoring._sharded(lambda m, t, ex, on_progress, **k: [(e.target, on_progress, k) for e in ex], None, None,
                           [G1, G2, G3, G1], "bar", "generate", x=1)  # fmt: skip
    assert out == [None] * 4 and bars == []
    assert gathered == [([("c", None, {"x": 1}), ("b", None, {"x": 1})], 4)]


def test_raw_metrics_read_the_whole_generation(monkeypatch) -> None:
    """answer_number reads the last number of the whole output ("5"), exact match the first line ("2 + 2 = 4")."""
    monkeypatch.setattr(scoring, "greedy_generate", lambda m, t, ex, **k: ["2 + 2 = 4\nthen 5"] * len(ex))
    task = Task("n", "generate", train=[G1], test=[Example(prompt="q", target="5")],
                metrics=["answer_number", "exact_match"])  # fmt: skip
    metrics, rows = evaluate_task(None, None, task, task_id=None, with_examples=True)
    assert metrics == {"exact_match": 0.0, "answer_number": 1.0, "n": 1.0}
    assert rows[0]["scores"] == {"exact_match": 0.0, "answer_number": 1.0}


def test_per_example_scores_tolerance() -> None:
    """A task value within 1e-9 of the mean (absolute, near 0; relative, away from it) keeps the scores."""
    per = scoring._per_example_scores
    assert per(["b"], ["b"], [["a"]], ["exact_match"], {"exact_match": 1e-10}) == {"exact_match": [0.0]}
    assert per(["b"], ["b"], [["a"]], ["exact_match"], {"exact_match": 1e-8}) == {}


def test_the_prompt_pass_hands_the_lm_head_a_contiguous_slice() -> None:
    """The prompt pass keeps the last position's logits only. Given as the int 1, transformers slices hidden[:, -1:],
    a strided view, on which torch's CPU bfloat16 linear copied the LM head's weight once per prompt (SmolLM2: 0.97 s
    against 0.012 s per call; benchmarks/scoring.py --dtype bfloat16 ran the shared path at 0.5x the per-option
    one). The LM head of a real Llama must see a contiguous (prompts, 1, hidden) input, in bfloat16 too."""
    from conftest import make_tiny_llama

    model = make_tiny_llama().to(torch.bfloat16).eval()
    seen: list[tuple[tuple[int, ...], bool]] = []
    model.lm_head.register_forward_pre_hook(
        lambda m, args: seen.append((tuple(args[0].shape), args[0].is_contiguous()))
    )
    lp, _, _ = scoring._prompt_pass(
        model, [[5, 6, 7], [8, 9]], cache_name="cache", pad_id=0, task_id=None, keep_logits=True
    )
    assert seen == [((2, 1, model.config.hidden_size), True)]
    with torch.no_grad():  # the same numbers as the last position of the full logits
        full = model(
            input_ids=torch.tensor([[5, 6, 7], [0, 8, 9]]),
            attention_mask=torch.tensor([[1, 1, 1], [0, 1, 1]]),
            position_ids=torch.tensor([[0, 1, 2], [0, 0, 1]]),
        ).logits[:, -1]
    torch.testing.assert_close(lp, torch.log_softmax(full.float(), -1))
