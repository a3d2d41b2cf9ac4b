"""The initialisation experiment (the paper's Figure 1, arXiv 2509.25414 §3), as one command.

Train plain LoRA (i) on several tasks from the *same* seed and (ii) on one task from *different* seeds,
then compare the adapters: if A's similarity across tasks comes from the shared initialisation rather than
shared knowledge, A is similar for (i) and dissimilar for (ii), while B is dissimilar either way.
Paper: A ≈ 0.8 same seed across tasks, ≈ 0.01–0.08 across seeds; B low in both.

    asymlora experiment init-similarity --out runs/init-similarity
    asymlora experiment init-similarity train.steps=20 'tasks=[bigbench:strategyqa,bigbench:winowhy]'

Finished adapters are kept under ``<out>/adapters/``; re-running skips them (a killed run resumes, and
more tasks or seeds extend it). Any other setting must match the one in ``<out>/settings.json``: adapters
trained with other sizes are not mixed into one analysis.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import peft
import torch

from asymlora.analysis.factors import CONFIG_NAME
from asymlora.analysis.report import analyze
from asymlora.config import ConfigError, TrainSettings, apply_overrides, from_dict
from asymlora.data import MultiTaskCollator, MultiTaskDataset, Task, load_tasks
from asymlora.io import atomic_dir, atomic_write_text, check_out_dir
from asymlora.models import load
from asymlora.recipes.multitask import safe_name
from asymlora.train import train
from asymlora.tuner.config import AsymLoraConfig

__all__ = [
    "DIFFERENT_BOTH",
    "DIFFERENT_SEEDS",
    "SAME_SEED",
    "InitSimilaritySettings",
    "plan",
    "run_init_similarity",
]


@dataclass
class InitSimilaritySettings:
    """Sizes of the experiment (defaults finish in well under 45 minutes on 2 CPU cores)."""

    model: str = "smollm2-135m"
    """Base model (hub id, local directory or ``smollm2-135m``)."""
    tasks: list[str] = field(
        default_factory=lambda: [
            "bigbench:strategyqa",
            "bigbench:formal_fallacies_syllogisms_negation",
            "bigbench:multiemo/hotels_sentence_en",
        ]
    )
    """Tasks trained from the same seed; the first is also trained from every seed in `seeds`."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Seeds of the one-task runs; the first is the shared seed of the multi-task runs."""
    r: int = 8
    """LoRA rank."""
    lora_alpha: float = 16
    """LoRA alpha."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Adapted modules."""
    max_train: int = 400
    """Training examples per task."""
    max_length: int = 192
    """Longest training sequence."""
    train: TrainSettings = field(
        default_factory=lambda: TrainSettings(steps=100, batch_size=8, lr=1e-3, warmup_steps=5, save_every=0)
    )
    """Optimisation of every run (train.seed is replaced by each run's seed)."""

    def validate(self) -> InitSimilaritySettings:
        if len(self.tasks) < 2:
            raise ConfigError(f"tasks={self.tasks} needs at least 2 tasks to compare across tasks")
        if len(set(self.seeds)) < 2:
            raise ConfigError(f"seeds={self.seeds} needs at least 2 different seeds")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds={self.seeds} repeats a seed; give each seed once")
        self.train.check()
        try:  # before anything is written: r, lora_alpha, target_modules as the runs will use them
            self.lora_config()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return self

    def lora_config(self) -> AsymLoraConfig:
        """The plain LoRA config of every run (no base_model_name_or_path: peft records the model's directory)."""
        return AsymLoraConfig(
            method="lora", r=self.r, lora_alpha=self.lora_alpha, target_modules=self.target_modules
        )

    def per_run(self) -> dict[str, Any]:
        """The settings every adapter was trained with: all but the lists of tasks and seeds (which only say
        which runs there are) and train.seed (replaced by each run's seed)."""
        d = dataclasses.asdict(self)
        del d["tasks"], d["seeds"], d["train"]["seed"]
        return d


SAME_SEED = "same seed, different tasks"
DIFFERENT_SEEDS = "different seeds, same task"
DIFFERENT_BOTH = "different seeds, different tasks"
SETTINGS_FILE = "settings.json"


def plan(settings: InitSimilaritySettings) -> list[tuple[int, int]]:
    """(task index, seed) of every run: all tasks at the first seed, the first task at the other seeds."""
    first = settings.seeds[0]
    return [(t, first) for t in range(len(settings.tasks))] + [(0, s) for s in settings.seeds[1:]]


def _train_one(
    settings: InitSimilaritySettings, task: Task, seed: int, model: Any, tokenizer: Any, out: Path, label: str
) -> Any:
    """Train plain LoRA on ``task`` from ``seed``, save it to ``<out>/adapters/<label>``; returns the base
    model with the adapter unloaded (for the next run)."""
    torch.manual_seed(seed)  # the adapter's initialisation: identical A for runs of the same seed
    pm = peft.get_peft_model(model, settings.lora_config())
    dataset = MultiTaskDataset([task], tokenizer, max_length=settings.max_length)
    run_settings = dataclasses.replace(settings.train.for_examples(len(dataset)), seed=seed)  # epochs → steps
    train(
        pm, dataset, MultiTaskCollator(tokenizer), run_settings, out / "train" / safe_name(label), desc=label
    )
    with atomic_dir(out / "adapters" / safe_name(label), overwrite=True) as tmp:
        pm.save_pretrained(str(tmp))
    return pm.unload()


def _pairs(settings: InitSimilaritySettings, labels: list[str]) -> list[tuple[str, str, str]]:
    """The compared pairs, the paper's three panels: every two runs of the shared seed, every two runs of
    the first task, and every two runs that differ in both (another task at the shared seed against the
    first task at another seed)."""
    runs = list(zip(plan(settings), labels, strict=True))
    first_seed = [lab for (_, s), lab in runs if s == settings.seeds[0]]
    first_task = [lab for (t, _), lab in runs if t == 0]
    pairs = [(a, b, SAME_SEED) for a, b in itertools.combinations(first_seed, 2)]
    pairs += [(a, b, DIFFERENT_SEEDS) for a, b in itertools.combinations(first_task, 2)]
    both = [
        (a, b) for ((ta, sa), a), ((tb, sb), b) in itertools.combinations(runs, 2) if ta != tb and sa != sb
    ]
    return pairs + [(a, b, DIFFERENT_BOTH) for a, b in both]


def _check_previous(out: Path, settings: InitSimilaritySettings) -> None:
    """ValueError when ``out`` holds adapters trained with other settings than ``settings`` (the lists of
    tasks and seeds aside: more of them extend the experiment)."""
    saved = out / SETTINGS_FILE
    trained = sorted(p.parent.name for p in (out / "adapters").glob(f"*/{CONFIG_NAME}"))
    if not trained or not saved.is_file():
        return
    try:
        old = from_dict(InitSimilaritySettings, json.loads(saved.read_text())).per_run()
    except (ValueError, TypeError) as e:
        raise ValueError(f"{saved} cannot be read ({e}); give another --out, or delete {out}") from None
    new = settings.per_run()
    changed = [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in new if old.get(k) != new[k]]
    if changed:
        raise ValueError(
            f"{out} holds adapters ({', '.join(trained[:3])}{' …' if len(trained) > 3 else ''}) trained with "
            f"other settings ({'; '.join(changed)}); give another --out, or delete {out / 'adapters'} to train "
            "them again"
        )


def run_init_similarity(out: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Train the runs (skipping finished ones), analyse them, write ``<out>/analysis.json`` and figures.

    Args:
        out: the experiment directory (created; finished adapters under ``<out>/adapters/`` are kept).
        overrides: ``key=value`` settings of `InitSimilaritySettings` (e.g. ``train.steps=20``).

    Returns:
        the analysis (`asymlora.analysis.analyze`), pairing kinds `SAME_SEED` and `DIFFERENT_SEEDS`.

    Raises:
        ConfigError: an unknown or invalid setting.
    """
    settings = from_dict(InitSimilaritySettings, apply_overrides({}, overrides or [])).validate()
    out = check_out_dir(out)
    tasks = load_tasks(settings.tasks, seed=0, max_train=settings.max_train, max_test=1)
    _check_previous(out, settings)
    settings_text = json.dumps(dataclasses.asdict(settings), indent=2) + "\n"
    model: Any = None
    tokenizer: Any = None
    labels, paths = [], []
    for task_index, seed in plan(settings):
        task = tasks[task_index]
        label = f"{task.name}@seed{seed}"
        labels.append(label)
        paths.append(out / "adapters" / safe_name(label))
        if (paths[-1] / "adapter_config.json").is_file():
            print(f"{label}: already trained, kept")
            continue
        if model is None:  # nothing is written into out before the model has loaded
            model, tokenizer = load(settings.model)
            atomic_write_text(out / SETTINGS_FILE, settings_text)
        model = _train_one(settings, task, seed, model, tokenizer, out, label)
    atomic_write_text(out / SETTINGS_FILE, settings_text)  # the tasks and seeds of this analysis
    return analyze(
        paths, out, labels=labels, pairs=_pairs(settings, labels), expert_pairs=False, verbose=True
    )
