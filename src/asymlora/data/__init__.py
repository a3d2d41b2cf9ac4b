"""Tasks and data for asymlora: BIG-bench, JSON/JSONL files, Hugging Face datasets.

Quick start::

    from asymlora.data import load_task, MultiTaskDataset, MultiTaskCollator

    task = load_task("bigbench:strategyqa", max_train=300, max_test=200)
    dataset = MultiTaskDataset([task], tokenizer, max_length=256)
    batch = MultiTaskCollator(tokenizer)([dataset[0], dataset[1]])

See :func:`load_task` for the spec forms and :func:`format_prompt` for the prompt layout.
"""

from asymlora.data.collate import (
    IGNORE_INDEX,
    MultiTaskCollator,
    MultiTaskDataset,
    encode_example,
    tokenize_prompt_answer,
)
from asymlora.data.loading import load_task, load_tasks
from asymlora.data.tasks import (
    METRIC_ACCURACY,
    METRIC_BLEU,
    METRIC_EXACT_MATCH,
    METRIC_ROUGE,
    METRIC_ROUGE_LSUM,
    DataError,
    Example,
    Task,
    TaskKind,
    answer_continuation,
    build_task,
    compose_prompt,
    format_prompt,
    split_examples,
)

__all__ = [
    "IGNORE_INDEX",
    "METRIC_ACCURACY",
    "METRIC_BLEU",
    "METRIC_EXACT_MATCH",
    "METRIC_ROUGE",
    "METRIC_ROUGE_LSUM",
    "DataError",
    "Example",
    "MultiTaskCollator",
    "MultiTaskDataset",
    "Task",
    "TaskKind",
    "answer_continuation",
    "build_task",
    "compose_prompt",
    "encode_example",
    "format_prompt",
    "load_task",
    "load_tasks",
    "split_examples",
    "tokenize_prompt_answer",
]
