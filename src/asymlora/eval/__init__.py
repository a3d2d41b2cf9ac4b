"""Evaluation: option log-likelihood accuracy, greedy generation with exact match / ROUGE / BLEU, summaries.

Quick start::

    from asymlora.eval import evaluate_tasks, format_table, primary_metrics, summarize

    per_task = evaluate_tasks(model, tokenizer, tasks, task_ids=range(len(tasks)))  # task-routed adapter
    primary = primary_metrics(tasks)  # each task's declared (or configured) primary metric
    summary = summarize(per_task, primary, baselines=None)
    print(format_table({"alora": per_task}, primary, [task.name for task in tasks]))

See :mod:`asymlora.eval.scoring` for how sequences are scored, :mod:`asymlora.eval.metrics` for
the metrics and their registry, :mod:`asymlora.eval.report` for Δm%, per-metric averages and the
markdown table writer, and :mod:`asymlora.eval.stats` for intervals, paired tests and the one ``std``.
"""

from asymlora.eval.metrics import (
    METRICS,
    ROUGE_KEYS,
    Metric,
    apply_metric_choices,
    bleu_score,
    check_metric,
    exact_match,
    metric_choices,
    metric_notes,
    normalize_answer,
    primary_metric,
    primary_metrics,
    rouge_scores,
    score_generations,
)
from asymlora.eval.report import (
    MIXED,
    delta_m,
    format_table,
    markdown_table,
    per_metric_means,
    plot_results,
    primary_values,
    summarize,
)
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
    "METRICS",
    "MIXED",
    "ROUGE_KEYS",
    "Metric",
    "accepts_task_ids",
    "apply_metric_choices",
    "bleu_score",
    "check_metric",
    "delta_m",
    "evaluate_task",
    "evaluate_tasks",
    "exact_match",
    "format_table",
    "greedy_generate",
    "markdown_table",
    "metric_choices",
    "metric_notes",
    "model_device",
    "normalize_answer",
    "option_loglikelihoods",
    "per_metric_means",
    "plot_results",
    "primary_metric",
    "primary_metrics",
    "primary_values",
    "prompt_ids",
    "rouge_scores",
    "score_generations",
    "summarize",
]
