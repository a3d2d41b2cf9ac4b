"""Evaluation: option log-likelihood accuracy, greedy generation with exact match / ROUGE, summaries.

Quick start::

    from asymlora.eval import evaluate_tasks, format_table, primary_metric, summarize

    per_task = evaluate_tasks(model, tokenizer, tasks, task_ids=range(len(tasks)))  # task-routed adapter
    primary = {task.name: primary_metric(task) for task in tasks}
    summary = summarize(per_task, primary, baselines=None)
    print(format_table({"alora": per_task}, primary, [task.name for task in tasks]))

See :mod:`asymlora.eval.scoring` for how sequences are scored and :mod:`asymlora.eval.report`
for Δm%.
"""

from asymlora.eval.metrics import ROUGE_KEYS, exact_match, normalize_answer, primary_metric, rouge_scores
from asymlora.eval.report import delta_m, format_table, plot_results, primary_values, summarize
from asymlora.eval.scoring import (
    accepts_task_ids,
    evaluate_task,
    evaluate_tasks,
    greedy_generate,
    model_device,
    option_loglikelihoods,
    prompt_ids,
)

__all__ = [
    "ROUGE_KEYS",
    "accepts_task_ids",
    "delta_m",
    "evaluate_task",
    "evaluate_tasks",
    "exact_match",
    "format_table",
    "greedy_generate",
    "model_device",
    "normalize_answer",
    "option_loglikelihoods",
    "plot_results",
    "primary_metric",
    "primary_values",
    "prompt_ids",
    "rouge_scores",
    "summarize",
]
