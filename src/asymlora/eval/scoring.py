"""Scoring a model on a task: option log-likelihoods (choice tasks) and greedy generation.

Both read the prompt tokens exactly as training writes them (:func:`asymlora.data.encode_example`:
:func:`~asymlora.data.format_prompt`, then :func:`~asymlora.data.tokenize_prompt_answer`), so an
adapter is evaluated on the token sequences it learned.

- Option log-likelihood: the score of an option is the sum of the log-probabilities of its
  tokens in the sequence ``prompt + " " + option`` (the closing EOS is not counted). By default
  (``share_prompt``) each prompt is run once, left-padded, and its options are scored on top of
  its KV cache: the same numbers as one forward pass per (example, option) sequence at about
  1/#options of the cost. The plain path (``share_prompt=False``, or a model that takes no cache)
  sorts the sequences by length and batches them with right padding. Either way the vocabulary
  projection is applied only to scored positions (``logits_to_keep``) when the model supports it.
- Generation: greedy decoding of the prompts, left-padded and sorted by length, stopping at EOS.

Task-routed adapters (``router="task"``) need ``task_ids``: pass ``task_id`` and every sequence of
the call gets it. A model that does not take ``task_ids`` (a plain transformers model, a stock peft
model) must be called with ``task_id=None``.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from transformers import GenerationConfig

from asymlora import distributed
from asymlora.data.collate import IGNORE_INDEX, encode_example
from asymlora.data.tasks import Example, Task
from asymlora.eval.metrics import corpus_level, score_generations
from asymlora.eval.stats import example_key
from asymlora.progress import bar as progress_bar
from asymlora.tuner.peft_model import AsymLoraModelForCausalLM

__all__ = [
    "accepts_task_ids",
    "evaluate_task",
    "evaluate_tasks",
    "greedy_generate",
    "model_device",
    "option_loglikelihoods",
    "prompt_ids",
]

logger = logging.getLogger(__name__)

NO_LIMIT = sys.maxsize
"""``max_length`` used when none is given: never truncate."""


# --------------------------------------------------------------------------- helpers


def model_device(model: Any) -> torch.device:
    """The device inputs go to: ``model.device`` when defined, else that of its first parameter."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def accepts_task_ids(model: Any) -> bool:
    """Whether ``model``'s forward and generate take ``task_ids`` (an asymlora peft model)."""
    return isinstance(model, AsymLoraModelForCausalLM)


def _check_task_id(model: Any, task_id: int | None) -> None:
    if task_id is None:
        return
    if isinstance(task_id, bool) or not isinstance(task_id, int) or task_id < 0:
        raise ValueError(f"task_id must be a non-negative integer or None, got {task_id!r}")
    if not accepts_task_ids(model):
        raise ValueError(
            f"task_id={task_id} was given but {type(model).__name__} does not take task_ids (only an "
            "asymlora peft model does); evaluate it with task_id=None"
        )


def _task_kwargs(task_id: int | None, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
    if task_id is None:
        return {}
    return {"task_ids": torch.full((batch,), task_id, dtype=torch.long, device=device)}


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither pad_token_id nor eos_token_id; set a pad token")
    return int(pad)


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def _supports_logits_to_keep(model: Any) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def _pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), both (len(seqs), longest): the sequences right-padded with ``pad_id``, mask 1 on tokens."""
    width = max(len(seq) for seq in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for n, seq in enumerate(seqs):
        ids[n, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[n, : len(seq)] = 1
    return ids, mask


def _pad_left(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), both (len(seqs), longest): the sequences left-padded with ``pad_id``, mask 1 on tokens."""
    length = max(len(seq) for seq in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for n, seq in enumerate(seqs):
        ids[n, length - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[n, length - len(seq) :] = 1
    return ids, mask


def _batches(order: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(order), size):
        yield list(order[start : start + size])


@contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    """Eval mode and ``torch.inference_mode`` for the block; the training flag is restored afterwards."""
    was_training = bool(getattr(model, "training", False))
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        if was_training:
            model.train()


def prompt_ids(tokenizer: Any, example: Example, max_length: int | None = None) -> list[int]:
    """Token ids of ``example``'s model prompt, as training encodes them (BOS only if the tokenizer adds one).

    With ``max_length`` the prompt is cut from the left as :func:`~asymlora.data.encode_example`
    cuts it for training (room is kept for the target answer).
    """
    encoded = encode_example(tokenizer, example, NO_LIMIT if max_length is None else max_length)
    n_prompt = sum(label == IGNORE_INDEX for label in encoded["labels"])
    return encoded["input_ids"][:n_prompt]


def _option_sequence(tokenizer: Any, example: Example, index: int, max_length: int) -> tuple[list[int], int]:
    """(prompt + option tokens without EOS, index of the option's first token)."""
    options = example.options or []
    as_target = dataclasses.replace(example, target=options[index], answer_index=index)
    encoded = encode_example(tokenizer, as_target, max_length)
    n_prompt = sum(label == IGNORE_INDEX for label in encoded["labels"])
    ids = encoded["input_ids"][:-1]  # drop the EOS: only the option's own tokens are scored
    if len(ids) <= n_prompt:
        raise ValueError(f"option {options[index]!r} of example {example.prompt[:60]!r}… has no tokens")
    if n_prompt < 1:
        raise ValueError(f"example {example.prompt[:60]!r}… has an empty prompt; nothing to condition on")
    return ids, n_prompt


# --------------------------------------------------------------------------- option log-likelihood


def option_loglikelihoods(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    task_id: int | None,
    batch_size: int,
    max_length: int | None = None,
    share_prompt: bool = True,
    on_progress: Callable[[int], None] | None = None,
) -> list[list[float]]:
    """Summed log-probability of each option's tokens given the prompt, per choice example.

    Args:
        model: a causal LM (plain transformers, stock peft or asymlora peft model), on any device.
        tokenizer: its tokenizer (needs ``eos_token_id``; padding uses ``pad_token_id`` or EOS).
        examples: choice examples (each with ``options``).
        task_id: passed as ``task_ids=torch.full((batch,), task_id)`` when not None (needed by
            task-routed adapters; refused by models that do not take ``task_ids``).
        batch_size: number of (example, option) sequences per forward pass.
        max_length: cut long prompts from the left to fit (as training does); None: no cut.
        share_prompt: run each prompt once and score its options from the prompt's KV cache
            (same scores, about ``#options`` times less compute; options of a single token need
            no second pass). Off, or when the model takes no KV cache (``cache`` or ``past_key_values``):
            one forward pass per (example, option) sequence, right-padded.
        on_progress: called with the number of (example, option) sequences scored after each batch.

    Returns:
        ``scores[i][j]``: log p(option j of example i | prompt i), summed over the option's tokens
        (float32 log-softmax whatever the model dtype). ``argmax`` over ``j`` is the prediction.

    The model is put in eval mode for the call (its training flag is restored afterwards).
    """
    _check_batch_size(batch_size)
    _check_task_id(model, task_id)
    sequences, owners = _option_sequences(tokenizer, examples, NO_LIMIT if max_length is None else max_length)
    scores: list[list[float]] = [[0.0] * len(example.options or []) for example in examples]
    pad_id = _pad_id(tokenizer)
    cache_name = _cache_name(model) if share_prompt else None
    if cache_name is not None and _same_prompts(sequences, owners):
        groups = _group_by_example(sequences, owners)
        flat = _score_shared(
            model,
            groups,
            cache_name=cache_name,
            pad_id=pad_id,
            task_id=task_id,
            batch_size=batch_size,
            on_progress=on_progress,
        )
    else:
        flat = _score_sequences(
            model, sequences, pad_id=pad_id, task_id=task_id, batch_size=batch_size, on_progress=on_progress
        )
    for (i, j), value in zip(owners, flat, strict=True):
        scores[i][j] = value
    return scores


def _option_sequences(
    tokenizer: Any, examples: Sequence[Example], max_length: int
) -> tuple[list[tuple[list[int], int]], list[tuple[int, int]]]:
    """Every (example, option) sequence as (ids, first option position), and its (example, option) index."""
    sequences: list[tuple[list[int], int]] = []
    owners: list[tuple[int, int]] = []
    for i, example in enumerate(examples):
        if not example.options:
            raise ValueError(
                f"example {i} ({example.prompt[:60]!r}…) has no options; it is not a choice example"
            )
        for j in range(len(example.options)):
            sequences.append(_option_sequence(tokenizer, example, j, max_length))
            owners.append((i, j))
    return sequences, owners


def _cache_name(model: Any) -> str | None:
    """The name under which ``model``'s forward takes a KV cache (None: it takes none, or no positions).

    transformers 5 renamed ``past_key_values`` to ``cache`` (5.2x; the old name is a deprecated alias):
    the newer name wins when the forward takes both.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        params = set(inspect.signature(base.forward).parameters)
    except (TypeError, ValueError):
        return None
    if not {"position_ids", "use_cache"} <= params:
        return None
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def _same_prompts(sequences: Sequence[tuple[list[int], int]], owners: Sequence[tuple[int, int]]) -> bool:
    """Whether all options of each example share the prompt tokens (false only after unequal truncation)."""
    first: dict[int, list[int]] = {}
    for (ids, start), (i, _) in zip(sequences, owners, strict=True):
        if first.setdefault(i, ids[:start]) != ids[:start]:
            return False
    return True


def _group_by_example(
    sequences: Sequence[tuple[list[int], int]], owners: Sequence[tuple[int, int]]
) -> list[tuple[list[int], list[list[int]]]]:
    """[(prompt ids, [option ids, ...]), ...] per example, from the flat (example, option) sequences."""
    groups: dict[int, tuple[list[int], list[list[int]]]] = {}
    for (ids, start), (i, _) in zip(sequences, owners, strict=True):
        groups.setdefault(i, (ids[:start], []))[1].append(ids[start:])
    return [groups[i] for i in sorted(groups)]


def _chunks(groups: Sequence[tuple[list[int], list[list[int]]]], batch_size: int) -> list[list[int]]:
    """Example indexes, longest prompt first, in chunks of at most ``batch_size`` options (one example at least)."""
    order = sorted(range(len(groups)), key=lambda g: len(groups[g][0]), reverse=True)
    chunks: list[list[int]] = []
    for g in order:
        if chunks and sum(len(groups[h][1]) for h in chunks[-1]) + len(groups[g][1]) <= batch_size:
            chunks[-1].append(g)
        else:
            chunks.append([g])
    return chunks


def _prompt_pass(
    model: Any,
    prompts: Sequence[list[int]],
    *,
    cache_name: str,
    pad_id: int,
    task_id: int | None,
    keep_logits: bool,
) -> tuple[torch.Tensor, Any, torch.Tensor]:
    """Run left-padded prompts once: (log-probs of the next token (prompts, vocab), KV cache, mask)."""
    device = model_device(model)
    input_ids, attention = _pad_left(prompts, pad_id)
    attention = attention.to(device)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    kwargs: dict[str, Any] = _task_kwargs(task_id, len(prompts), device)
    if keep_logits:
        # the last position as an index tensor, not the int 1: transformers slices an int as hidden[:, -1:], a
        # strided view, and torch's CPU bfloat16 linear on a strided (B, 1, H) input copies the LM head's weight
        # per prompt (0.97 s against 0.012 s for SmolLM2's 49152 × 576 head, benchmarks/scoring.py); an index
        # tensor gathers a contiguous (B, 1, H) copy first, the same numbers
        kwargs["logits_to_keep"] = torch.tensor([input_ids.shape[1] - 1], device=device)
    first = model(input_ids=input_ids.to(device), attention_mask=attention, position_ids=positions,
                  use_cache=True, **kwargs)  # fmt: skip
    return F.log_softmax(first.logits[:, -1].float(), dim=-1), getattr(first, cache_name), attention


def _option_tail(
    model: Any,
    cache: Any,
    attention: torch.Tensor,
    select: torch.Tensor,
    option_ids: torch.Tensor,
    option_mask: torch.Tensor,
    task_id: int | None,
    cache_name: str,
) -> torch.Tensor:
    """Summed log-probs of option tokens 2.. (options of 2+ tokens), fed on top of their prompt's cache.

    ``select``: the prompt row of each option; ``option_ids``/``option_mask``: (options, width), right-padded.
    """
    device = option_ids.device
    width = option_ids.shape[1]
    cache.reorder_cache(select)
    # feed each option's tokens but its last; logit k predicts option token k + 1
    rest = model(
        input_ids=option_ids[:, : width - 1],
        attention_mask=torch.cat([attention[select], option_mask[:, : width - 1]], dim=-1),
        position_ids=attention.sum(-1)[select][:, None] + torch.arange(width - 1, device=device)[None, :],
        use_cache=True,
        **{cache_name: cache},
        **_task_kwargs(task_id, len(select), device),
    ).logits
    rest_lp = F.log_softmax(rest.float(), dim=-1)
    token_lp = rest_lp.gather(-1, option_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    scored = option_mask[:, 1:].bool()
    return torch.where(scored, token_lp, torch.zeros_like(token_lp)).sum(-1)


def _score_shared(
    model: Any,
    groups: Sequence[tuple[list[int], list[list[int]]]],
    *,
    cache_name: str,
    pad_id: int,
    task_id: int | None,
    batch_size: int,
    on_progress: Callable[[int], None] | None = None,
) -> list[float]:
    """Option scores, flat in (example, option) order, with one prompt pass per example.

    Prompts are left-padded (explicit position ids) and run once with ``use_cache=True``; the
    last prompt logit scores each option's first token; for the options of two tokens or more the
    cache is repeated once per option (``reorder_cache``) and the option tokens, right-padded, are
    run on top of it. A chunk holds
    as many examples as fit ``batch_size`` option sequences (at least one example).
    """
    device = model_device(model)
    keep_logits = _supports_logits_to_keep(model)
    offsets = [0]
    for _, options in groups:
        offsets.append(offsets[-1] + len(options))
    out = [0.0] * offsets[-1]
    with _eval_mode(model):
        for chunk in _chunks(groups, batch_size):
            first_lp, cache, attention = _prompt_pass(
                model,
                [groups[g][0] for g in chunk],
                cache_name=cache_name,
                pad_id=pad_id,
                task_id=task_id,
                keep_logits=keep_logits,
            )
            rows = [(r, option) for r, g in enumerate(chunk) for option in groups[g][1]]
            row_of = torch.tensor([r for r, _ in rows], dtype=torch.long, device=device)
            option_ids, option_mask = _pad_right([option for _, option in rows], pad_id)
            option_ids, option_mask = option_ids.to(device), option_mask.to(device)
            sums = first_lp[row_of, option_ids[:, 0]]
            multi = (option_mask.sum(-1) > 1).nonzero().squeeze(-1)  # options of 2+ tokens
            if multi.numel():
                sums[multi] += _option_tail(model, cache, attention, row_of[multi], option_ids[multi],
                                            option_mask[multi], task_id, cache_name)  # fmt: skip
            flat_index = [offsets[g] + k for g in chunk for k in range(len(groups[g][1]))]
            for index, value in zip(flat_index, sums.tolist(), strict=True):
                out[index] = float(value)
            if on_progress is not None:
                on_progress(len(flat_index))
    return out


def _score_sequences(
    model: Any,
    sequences: Sequence[tuple[list[int], int]],
    *,
    pad_id: int,
    task_id: int | None,
    batch_size: int,
    on_progress: Callable[[int], None] | None = None,
) -> list[float]:
    """Sum of log p(ids[k] | ids[:k]) for k in [start, len(ids)), for each (ids, start)."""
    device = model_device(model)
    keep_logits = _supports_logits_to_keep(model)
    order = sorted(range(len(sequences)), key=lambda k: len(sequences[k][0]), reverse=True)
    out = [0.0] * len(sequences)
    with _eval_mode(model):
        for chunk in _batches(order, batch_size):
            rows = [sequences[k] for k in chunk]
            input_ids, attention = _pad_right([ids for ids, _ in rows], pad_id)
            length = input_ids.shape[1]
            # logits at positions first-1 .. length-2 predict the tokens at first .. length-1
            first = min(start for _, start in rows)
            positions = torch.arange(first - 1, length - 1, device=device)
            kwargs: dict[str, Any] = _task_kwargs(task_id, len(rows), device)
            if keep_logits:
                kwargs["logits_to_keep"] = positions
            logits = model(
                input_ids=input_ids.to(device), attention_mask=attention.to(device), **kwargs
            ).logits
            if not keep_logits:
                logits = logits[:, first - 1 : length - 1]
            logprobs = F.log_softmax(logits.float(), dim=-1)
            targets = input_ids[:, first:length].to(device)
            token_lp = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (batch, span)
            span = torch.arange(first, length, device=device)
            starts = torch.tensor([start for _, start in rows], device=device)
            ends = torch.tensor([len(ids) for ids, _ in rows], device=device)
            scored = (span[None, :] >= starts[:, None]) & (span[None, :] < ends[:, None])
            sums = torch.where(scored, token_lp, torch.zeros_like(token_lp)).sum(-1)
            for k, value in zip(chunk, sums.tolist(), strict=True):
                out[k] = float(value)
            if on_progress is not None:
                on_progress(len(chunk))
    return out


# --------------------------------------------------------------------------- generation


def greedy_generate(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    task_id: int | None,
    batch_size: int,
    max_new_tokens: int,
    max_length: int | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Greedy completions of the examples' prompts (new tokens only, decoded, stripped).

    Prompts are tokenised as training does (:func:`prompt_ids`), sorted by length and batched with
    LEFT padding (the tokenizer is not modified); decoding stops at EOS or after
    ``max_new_tokens`` tokens. ``task_id`` as in :func:`option_loglikelihoods`; ``on_progress`` is
    called with the number of examples completed after each batch.

    Returns:
        One string per example, in the order of ``examples``.
    """
    _check_batch_size(batch_size)
    _check_task_id(model, task_id)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; set tokenizer.eos_token before generating")
    pad = _pad_id(tokenizer)
    device = model_device(model)
    prompts = [prompt_ids(tokenizer, example, max_length) for example in examples]
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=int(eos), pad_token_id=pad
    )
    order = sorted(range(len(prompts)), key=lambda k: len(prompts[k]), reverse=True)
    texts = [""] * len(prompts)
    with _eval_mode(model):
        for chunk in _batches(order, batch_size):
            input_ids, attention = _pad_left([prompts[k] for k in chunk], pad)
            length = input_ids.shape[1]
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                generation_config=config,
                **_task_kwargs(task_id, len(chunk), device),
            )
            for r, k in enumerate(chunk):
                new = output[r, length:].tolist()
                if int(eos) in new:
                    new = new[: new.index(int(eos))]
                texts[k] = tokenizer.decode(new, skip_special_tokens=True).strip()
            if on_progress is not None:
                on_progress(len(chunk))
    return texts


def _first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


# --------------------------------------------------------------------------- tasks


@contextmanager
def _task_bar(
    desc: str | None, kind: str, examples: Sequence[Example]
) -> Iterator[Callable[[int], None] | None]:
    """A progress bar over one task's scoring (None: no bar); yields its ``update`` callback."""
    if desc is None:
        yield None
        return
    choice = kind == "choice"
    total = sum(len(example.options or []) for example in examples) if choice else len(examples)
    with progress_bar(desc=desc, total=total, unit="option" if choice else "example", leave=False) as bar:
        yield bar.update


def evaluate_task(
    model: Any,
    tokenizer: Any,
    task: Task,
    *,
    task_id: int | None,
    batch_size: int = 16,
    max_new_tokens: int = 32,
    max_examples: int | None = None,
    max_length: int | None = None,
    split: str = "test",
    with_examples: bool = False,
    progress: str | None = None,
) -> dict[str, float] | tuple[dict[str, float], list[dict[str, Any]]]:
    """Score ``model`` on one task's held-out examples.

    - ``choice`` tasks: ``accuracy`` by option log-likelihood (the argmax option counts as right
      when it is among the example's references, i.e. any option with the best target score).
    - ``generate`` tasks: greedy decoding, ``exact_match`` against any reference after SQuAD
      normalisation, and ``rouge1``/``rouge2``/``rougeL`` (F-measure, stemmed) when the task's
      metrics include ``rouge``. When no reference contains a line break, only the first
      non-empty line of a completion is kept (a model that goes on with a new "Question:" is
      not penalised for it).
    - the papers' rules named in ``task.metrics`` (answer-word / number / letter extraction,
      unstemmed ROUGE; :mod:`asymlora.eval.extract`), on the whole generation.

    Args:
        task_id: the task's index for task-routed adapters, or None (see :func:`option_loglikelihoods`).
        max_examples: score only the first ``max_examples`` examples of the split.
        max_length: cut long prompts from the left (as training does); None: no cut.
        split: ``"test"`` (default) or ``"train"``.
        with_examples: also return each example's scores (for intervals and paired tests,
            :mod:`asymlora.eval.stats`).
        progress: when given, a progress bar with this description counts the scored (example, option)
            sequences of a choice task or the completed examples of a generative one (off under
            ``asymlora --quiet``, :mod:`asymlora.progress`).

    Under ``torchrun`` (:mod:`asymlora.distributed`) every process calls this and scores its share of the
    examples; all get the gathered result.

    Returns:
        The metrics (means over the examples), plus ``n`` (the number of examples scored), all as
        floats; with ``with_examples``, ``(metrics, rows)`` with one row per example, in split
        order: ``{"index": i, "key": stats.example_key(...), "scores": {metric: value}}``.
    """
    examples = _split_examples(task, split, max_examples)
    started = time.perf_counter()
    if task.kind == "choice":
        scores = _sharded(option_loglikelihoods, model, tokenizer, examples, progress, task.kind,
                          task_id=task_id, batch_size=batch_size, max_length=max_length)  # fmt: skip
        results, per_example = _choice_results(examples, scores)
    else:
        predictions = _sharded(greedy_generate, model, tokenizer, examples, progress, task.kind, task_id=task_id,
                               batch_size=batch_size, max_new_tokens=max_new_tokens, max_length=max_length)  # fmt: skip
        results, per_example = _generation_results(examples, predictions, task.metrics)
    results["n"] = float(len(examples))
    logger.info("evaluated %s (%d examples, task_id=%s) in %.1f s: %s", task.name, len(examples), task_id,
                time.perf_counter() - started, {k: round(v, 4) for k, v in results.items()})  # fmt: skip
    return (results, _example_rows(examples, per_example)) if with_examples else results


def _example_rows(examples: Sequence[Example], per_example: dict[str, list[float]]) -> list[dict[str, Any]]:
    """One row per example: ``{"index", "key" (stats.example_key), "scores": {metric: value}}``."""
    return [
        {"index": i, "key": example_key(e.prompt, e.target, e.options),
         "scores": {m: v[i] for m, v in per_example.items()}}
        for i, e in enumerate(examples)
    ]  # fmt: skip


def _split_examples(task: Task, split: str, max_examples: int | None) -> list[Example]:
    """The first ``max_examples`` examples of the task's split (all with None), checked."""
    if split not in ("test", "train"):
        raise ValueError(f"split must be 'test' or 'train', got {split!r}")
    examples = list(getattr(task, split))
    if max_examples is not None:
        if isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1:
            raise ValueError(f"max_examples must be a positive integer or None, got {max_examples!r}")
        examples = examples[:max_examples]
    if not examples:
        raise ValueError(f"task {task.name!r} has no {split} example to evaluate")
    return examples


def _sharded(
    score: Callable[..., list[Any]],
    model: Any,
    tokenizer: Any,
    examples: list[Example],
    desc: str | None,
    kind: str,
    **kwargs: Any,
) -> list[Any]:
    """``score(model, tokenizer, examples, **kwargs)`` per example, in split order.

    Under torchrun each process scores every world-th example; the outputs are gathered in split order.
    """
    mine = distributed.shard(examples)
    with _task_bar(desc if distributed.is_main() else None, kind, mine) as on_progress:
        outputs = score(model, tokenizer, mine, on_progress=on_progress, **kwargs) if mine else []
    return distributed.unshard(outputs, len(examples))


def _choice_results(
    examples: Sequence[Example], scores: Sequence[Sequence[float]]
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Accuracy (the argmax option is the answer or among the references) and each example's hit."""
    hits: list[float] = []
    for example, row in zip(examples, scores, strict=True):
        best = max(range(len(row)), key=row.__getitem__)
        options = example.options or []
        hits.append(float(best == example.answer_index or options[best] in example.references))
    return {"accuracy": sum(hits) / len(examples)}, {"accuracy": hits}


def _generation_results(
    examples: Sequence[Example], raw: list[str], metrics: Sequence[str]
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """The generation metrics and each example's scores; completions are cut to their first non-empty
    line when no reference spans several lines (the papers' extraction rules read the raw text)."""
    references = [example.references or [example.target] for example in examples]
    predictions = raw
    if not any("\n" in ref for refs in references for ref in refs):
        predictions = [_first_line(text) for text in raw]
    results = score_generations(predictions, references, metrics, raw)
    return results, _per_example_scores(predictions, raw, references, metrics, results)


def _per_example_scores(
    predictions: Sequence[str],
    raw: Sequence[str],
    references: Sequence[Sequence[str]],
    metrics: Sequence[str],
    results: dict[str, float],
) -> dict[str, list[float]]:
    """Each example's score, for the metrics whose task value is the mean over examples.

    Corpus-level metrics (BLEU: n-gram counts pooled over the corpus, `metrics.corpus_level`) are left out,
    since the mean of sentence scores is not the corpus score; intervals and paired tests then skip them.
    Left out by name, not only when the mean of the sentence scores differs from the corpus score: where the
    two agree (BLEU 0 on every sentence and on the corpus) the task had per-example scores in one run and none
    in another, and a sweep's paired test of the two groups was dropped whole.
    """
    rows = [
        score_generations([p], [r], metrics, [w])
        for p, w, r in zip(predictions, raw, references, strict=True)
    ]
    per_example = {key: [row[key] for row in rows] for key in rows[0] if not corpus_level(key)}
    return {
        key: values
        for key, values in per_example.items()
        if math.isclose(sum(values) / len(values), results[key], rel_tol=1e-9, abs_tol=1e-9)
    }


def evaluate_tasks(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[Task],
    *,
    task_ids: Sequence[int | None] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """:func:`evaluate_task` on each task: ``{task name: metrics}`` (``(metrics, rows)`` with ``with_examples``).

    Args:
        task_ids: one id (or None) per task, e.g. ``range(len(tasks))`` for a task-routed adapter
            trained on these tasks in this order; None: no task ids for any task.
        kwargs: passed to :func:`evaluate_task` (``batch_size``, ``max_new_tokens``, ``max_examples``, ...).
    """
    ids = list(task_ids) if task_ids is not None else [None] * len(tasks)
    if len(ids) != len(tasks):
        raise ValueError(f"{len(ids)} task ids for {len(tasks)} tasks; give one per task (or None)")
    names = [task.name for task in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be distinct, got {names}")
    return {
        task.name: evaluate_task(model, tokenizer, task, task_id=task_id, **kwargs)
        for task, task_id in zip(tasks, ids, strict=True)
    }
