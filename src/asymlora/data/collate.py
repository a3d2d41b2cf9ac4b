"""Tokenisation for training: prompt-masked labels, padding with task ids, a multi-task dataset.

Only the answer and the closing EOS token are learned: prompt positions carry label ``-100``.
A prompt too long for ``max_length`` is cut from the left (its start, usually the instruction,
goes first); the answer is never truncated. :class:`MultiTaskDataset` counts both per task.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch.utils.data import Dataset

from asymlora.data.tasks import DataError, Example, Task, answer_continuation, format_prompt

__all__ = [
    "IGNORE_INDEX",
    "MultiTaskCollator",
    "MultiTaskDataset",
    "encode_example",
    "tokenize_prompt_answer",
]

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label value ignored by the cross-entropy loss (prompt and padding positions)."""


def _eos_id(tokenizer: Any) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no eos_token_id; set tokenizer.eos_token before encoding")
    return int(eos)


def tokenize_prompt_answer(tokenizer: Any, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids of ``prompt`` and of its answer continuation (ending with EOS).

    The prompt gets the BOS token only when the tokenizer adds one itself (``add_bos_token``;
    SmolLM2 does not). The answer is tokenised as :func:`answer_continuation` writes it (a
    leading space), so training and option scoring see the same tokens.
    """
    prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None:
        prompt_ids.insert(0, int(tokenizer.bos_token_id))
    continuation = answer_continuation(prompt, answer)
    answer_ids = [*tokenizer(continuation, add_special_tokens=False)["input_ids"], _eos_id(tokenizer)]
    return prompt_ids, answer_ids


def encode_example(tokenizer: Any, example: Example, max_length: int) -> dict[str, list[int]]:
    """Encode ``example`` for causal-LM training.

    Returns:
        ``input_ids`` (prompt + answer + EOS), ``attention_mask`` (all ones) and ``labels``
        (``-100`` over every prompt token, then the answer ids and EOS).

    Raises:
        DataError: the answer plus EOS (and one prompt token) does not fit in ``max_length``.
    """
    return _encode(tokenizer, example, max_length)[0]


def _encode(tokenizer: Any, example: Example, max_length: int) -> tuple[dict[str, list[int]], int]:
    """(:func:`encode_example`'s features, how many prompt tokens were cut to fit ``max_length``)."""
    prompt_ids, answer_ids = tokenize_prompt_answer(tokenizer, format_prompt(example), example.target)
    keep_bos = 1 if getattr(tokenizer, "add_bos_token", False) and prompt_ids else 0
    room = max_length - len(answer_ids) - keep_bos
    if room < 1:
        raise DataError(
            f"the answer of example {example.prompt[:60]!r}… takes {len(answer_ids)} tokens with EOS and "
            f"does not fit in max_length={max_length} with its prompt; raise max_length"
        )
    body = prompt_ids[keep_bos:]
    cut = max(0, len(body) - room)
    prompt_ids = prompt_ids[:keep_bos] + body[cut:]
    features = {
        "input_ids": prompt_ids + answer_ids,
        "attention_mask": [1] * (len(prompt_ids) + len(answer_ids)),
        "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids,
    }
    return features, cut


class MultiTaskCollator:
    """Pad encoded examples into a batch (right padding) and collect their task ids.

    Each feature is a mapping with ``input_ids``, ``attention_mask``, ``labels`` and, for
    multi-task batches, ``task_id``. Returns LongTensors ``input_ids`` / ``attention_mask`` /
    ``labels`` of shape ``[batch, length]`` (pad id / 0 / -100 on padding) and ``task_ids`` of
    shape ``[batch]`` (all zeros when no feature has a ``task_id``).

    Args:
        tokenizer: gives ``pad_token_id`` (falls back to ``eos_token_id``).
        pad_to_multiple_of: round the padded length up to a multiple of this.
    """

    def __init__(self, tokenizer: Any, pad_to_multiple_of: int | None = None) -> None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise DataError("the tokenizer has neither pad_token_id nor eos_token_id; set a pad token")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise DataError(f"pad_to_multiple_of must be a positive integer, got {pad_to_multiple_of!r}")
        self.pad_token_id = int(pad)
        self.pad_to_multiple_of = pad_to_multiple_of

    def _padded_length(self, features: Sequence[Mapping[str, Any]]) -> int:
        longest = max(len(feature["input_ids"]) for feature in features)
        if self.pad_to_multiple_of:
            longest = math.ceil(longest / self.pad_to_multiple_of) * self.pad_to_multiple_of
        return longest

    @staticmethod
    def _task_ids(features: Sequence[Mapping[str, Any]]) -> torch.Tensor:
        with_id = sum("task_id" in feature for feature in features)
        if with_id not in (0, len(features)):
            raise DataError(f"{with_id} of {len(features)} features have a 'task_id'; give every feature one")
        return torch.tensor([int(feature.get("task_id", 0)) for feature in features], dtype=torch.long)

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise DataError("cannot collate an empty list of features")
        shape = (len(features), self._padded_length(features))
        batch = {
            "input_ids": torch.full(shape, self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros(shape, dtype=torch.long),
            "labels": torch.full(shape, IGNORE_INDEX, dtype=torch.long),
        }
        for row, feature in enumerate(features):
            length = len(feature["input_ids"])
            labels = feature.get("labels", feature["input_ids"])
            mask = feature.get("attention_mask", [1] * length)
            batch["input_ids"][row, :length] = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            batch["attention_mask"][row, :length] = torch.as_tensor(mask, dtype=torch.long)
            batch["labels"][row, :length] = torch.as_tensor(labels, dtype=torch.long)
        batch["task_ids"] = self._task_ids(features)
        return batch


class MultiTaskDataset(Dataset):
    """The encoded examples of several tasks, flattened; each carries ``task_id`` = its task's index.

    Examples whose answer cannot fit in ``max_length`` are skipped (the answer is never truncated),
    prompts too long for it are cut from the left; both are counted per task in :attr:`notes` and
    logged as warnings (``warn=False``: only counted). A task left with no example raises
    :class:`DataError`. ``label`` names the examples in both (default: ``split``; e.g. ``"validation"``).

    Attributes:
        task_names: names of the tasks, indexed by ``task_id``.
        task_indices: for each task, the dataset indices of its examples (for per-task sampling).
        notes: one line per task that lost examples or prompt tokens to ``max_length``, saying how many.
    """

    def __init__(
        self,
        tasks: Sequence[Task],
        tokenizer: Any,
        max_length: int = 512,
        split: Literal["train", "test"] = "train",
        *,
        warn: bool = True,
        label: str | None = None,
    ) -> None:
        if split not in ("train", "test"):
            raise DataError(f"split must be 'train' or 'test', got {split!r}")
        if not tasks:
            raise DataError("MultiTaskDataset needs at least one task")
        self.task_names: list[str] = [task.name for task in tasks]
        self.task_indices: list[list[int]] = []
        self.features: list[dict[str, Any]] = []
        self.notes: list[str] = []
        for task_id, task in enumerate(tasks):
            self.task_indices.append(self._add_task(task, task_id, tokenizer, max_length, split, warn, label))

    def _add_task(
        self,
        task: Task,
        task_id: int,
        tokenizer: Any,
        max_length: int,
        split: str,
        warn: bool,
        label: str | None,
    ) -> list[int]:
        indices: list[int] = []
        skipped = cut = 0
        for example in getattr(task, split):
            try:
                encoded, cut_tokens = _encode(tokenizer, example, max_length)
            except DataError:
                skipped += 1
                continue
            cut += cut_tokens > 0
            indices.append(len(self.features))
            self.features.append({**encoded, "task_id": task_id})
        total, label = len(getattr(task, split)), label or split
        lost = [f"skipped {skipped} of {total} {label} examples whose answer does not fit"] if skipped else []
        lost += [f"cut the prompt of {cut} of {total} {label} examples from the left to fit"] if cut else []
        if lost:
            self.notes.append(f"task {task.name!r}, max_length={max_length}: {'; '.join(lost)}")
            if warn:
                logger.warning("%s", self.notes[-1])
        if not indices:
            raise DataError(
                f"task {task.name!r} has no {label} example that fits in max_length={max_length}; "
                "raise max_length or check the task's data"
            )
        return indices

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.features[index]
