"""Readers for the public data of the ALoRA paper's benchmarks (arXiv 2509.25414, docs/reproduce.md).

Two source kinds, used as task specs (``data.tasks``) like ``json:`` or ``hf:``; every source
dataset (or FLAN category) becomes one task, so task routing and per-task tables work.

**LLM-Adapters** (github.com/AGI-Edgerunners/LLM-Adapters; the ALoRA code's commonsense and math
benchmarks): JSON arrays of ``{"instruction", "input", "output", "answer"}``, laid out as ::

    ROOT/ft-training_set/commonsense_170k.json   training mixtures (also math_10k.json, math_50k.json)
    ROOT/dataset/<name>/test.json                one test set per dataset (boolq, piqa, social_i_qa,
                                                 hellaswag, winogrande, ARC-Easy, ARC-Challenge,
                                                 openbookqa; gsm8k, SVAMP, AQuA, mawps, AddSub, ...)
    ROOT/dataset/<name>/train.json               per-dataset training sets (the commonsense ones)

- ``llm-adapters:ROOT#name`` (``ROOT`` the checkout, or its ``dataset/`` folder): trains on
  ``dataset/<name>/train.json``, tests on ``dataset/<name>/test.json``.
- ``llm-adapters:FILE.json#name`` (a training mixture, as the paper trains): tests on
  ``dataset/<name>/test.json`` found next to ``FILE`` or one level up (the repository layout).
  The mixture has no dataset column, so each row goes to the task whose test set shares its answer
  format (the ``Answer format: …`` line of commonsense rows; a letter A–E or a number for math
  rows). Rows of a format that several loaded tasks share (ARC-Easy, ARC-Challenge and OpenBookQA;
  GSM8K and MAWPS numbers) are dealt round-robin, in row order, among those tasks: every row is
  used once, as in the paper's soft-routed training, but their per-task training labels are not
  the true source dataset. Rows of a format no loaded task has are not used.
- ``#*`` loads every dataset under ``dataset/``.

The prompt is the Alpaca template LLM-Adapters trains and evaluates with (``generate_prompt`` in its
``finetune.py``, without that file's stray indentation); the training target is ``output`` (the
rationale: "the correct answer is true", "… The answer is 18"), the reference is ``answer``, and the
task's metric is the extraction rule that fits its test labels (:func:`asymlora.eval.extract.detect_rule`).

**FedDPA** (github.com/Lydia-yang/FedDPA; the ALoRA code's FLAN cross-domain and federated
benchmarks): JSON / JSON Lines rows ``{"instruction", "input"?, "output", "category"}`` ::

    DIR/<num_clients>/local_training_<k>.json    client k's training rows (federated protocol)
    DIR/flan_test_200_selected_nstrict_1.jsonl   test rows of every category (200 each)

- ``feddpa:DIR#category``: training rows of that category from every ``local_training_<k>.json``
  in ``DIR`` (or in its one numeric subfolder), test rows of that category from the test file in
  ``DIR`` or its parent. ``#*`` loads every category in client order (``k`` = 0, 1, …).
- ``feddpa:FILE.json#category``: training rows from one file (the cross-domain
  ``flan_multi_task_data.json``), the test file next to it or one level up.

Prompts use FedDPA's ``alpaca_short`` template; the metric is ROUGE as its ``metric.py`` computes it
(``flan_rouge``: ROUGE-1 primary, see :mod:`asymlora.eval.extract`).

Errors (:class:`~asymlora.data.tasks.DataError`) name the file, the row, the missing fields and the
format that was expected, before any model is loaded.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from asymlora.data.files import Row, read_json_rows
from asymlora.data.tasks import DataError, Example
from asymlora.eval.extract import FLAN_ROUGE, ExtractionError, detect_rule, label_family

__all__ = [
    "FEDDPA",
    "FEDDPA_TEST_FILE",
    "LLM_ADAPTERS",
    "PAPER_SCHEMES",
    "alpaca_prompt",
    "list_paper_task_names",
    "load_paper_splits",
]

LLM_ADAPTERS = "llm-adapters"
FEDDPA = "feddpa"
PAPER_SCHEMES = (LLM_ADAPTERS, FEDDPA)

LLM_ADAPTERS_FIELDS = ("instruction", "input", "output", "answer")
FEDDPA_FIELDS = ("instruction", "output", "category")
FEDDPA_TEST_FILE = "flan_test_200_selected_nstrict_1.jsonl"
"""The test file name FedDPA's README and ALoRA's inference scripts use."""
DATASET_DIR = "dataset"
CLIENT_FILE = re.compile(r"local_training_(\d+)\.json$")

ALPACA_HEADER = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
ALPACA_HEADER_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
RESPONSE_CUE = "\n\n### Response:\n"
"""Answer cue of both templates: the model writes the response right after it."""
_ANSWER_FORMAT = re.compile(r"Answer format:\s*([\w/]+)")


def alpaca_prompt(instruction: str, input_text: str = "", *, header: bool = True) -> str:
    """The Alpaca prompt up to (not including) ``### Response:``.

    ``header=True``: LLM-Adapters' template (with the "Below is an instruction …" sentence);
    ``header=False``: FedDPA's ``alpaca_short``. The ``### Input:`` block only when ``input_text``.
    """
    parts = []
    if header:
        parts.append(ALPACA_HEADER_INPUT if input_text.strip() else ALPACA_HEADER)
    parts.append("### Instruction:\n" + instruction.strip())
    if input_text.strip():
        parts.append("### Input:\n" + input_text.strip())
    return "\n\n".join(parts)


# --------------------------------------------------------------------------- rows


@lru_cache(maxsize=64)
def _cached_rows(path: str, mtime_ns: int, size: int) -> tuple[Row, ...]:
    return tuple(read_json_rows(path))


def _rows(path: Path) -> tuple[Row, ...]:
    """The rows of a JSON / JSONL file (read once per file version: test sets are read per task)."""
    stat = path.stat()
    return _cached_rows(str(path), stat.st_mtime_ns, stat.st_size)


def _record(row: Row, fields: Sequence[str], fmt: str) -> Mapping[str, Any]:
    """``row.record`` checked to be an object with ``fields`` (``input`` may be missing in FedDPA)."""
    record = row.record
    if not isinstance(record, Mapping):
        raise DataError(
            f"{row.where}: expected an object with fields {list(fields)} ({fmt}), got {record!r:.80}"
        )
    missing = [name for name in fields if name not in record]
    if missing:
        raise DataError(
            f"{row.where}: missing field(s) {missing}; the {fmt} expects {list(fields)} "
            f"(this row has {sorted(map(str, record))})"
        )
    bad = [
        name
        for name in (*fields, "input")
        if record.get(name) is not None and not isinstance(record[name], str)
    ]
    if bad:
        raise DataError(f"{row.where}: field(s) {bad} must be strings in the {fmt}")
    return record


def _text(record: Mapping[str, Any], key: str) -> str:
    return str(record.get(key) or "").strip()


def _example(row: Row, fmt: str, *, target: str, reference: str, header: bool) -> Example:
    record = row.record
    if not _text(record, "instruction"):
        raise DataError(f"{row.where}: 'instruction' is empty ({fmt})")
    if not target:
        raise DataError(f"{row.where}: the answer field is empty ({fmt}); every row needs one")
    prompt = alpaca_prompt(_text(record, "instruction"), _text(record, "input"), header=header)
    return Example(prompt, target, references=[reference or target], answer_prefix=RESPONSE_CUE)


# --------------------------------------------------------------------------- LLM-Adapters

_LLM_FMT = "LLM-Adapters JSON format (a JSON array of objects with instruction, input, output, answer)"


def _dataset_root(location: Path) -> Path:
    """The ``dataset/`` folder of an LLM-Adapters checkout: given, inside, or beside/above a file."""
    base = location.parent if location.is_file() else location
    candidates = [base] if base.name == DATASET_DIR else [base / DATASET_DIR, base.parent / DATASET_DIR]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise DataError(
        f"no LLM-Adapters '{DATASET_DIR}/' folder at {' or '.join(str(c) for c in candidates)}; point the "
        "spec at a checkout of github.com/AGI-Edgerunners/LLM-Adapters (it has dataset/<name>/test.json) "
        "or at a training file inside it (ft-training_set/commonsense_170k.json)"
    )


def _dataset_names(root: Path) -> list[str]:
    return sorted(p.parent.name for p in root.glob("*/test.json"))


def _test_file(root: Path, name: str) -> Path:
    path = root / name / "test.json"
    if not path.is_file():
        names = _dataset_names(root)
        raise DataError(
            f"no test set {str(path)!r}; datasets under {str(root)!r}: {', '.join(names) or 'none'}"
        )
    return path


def _answer_format(record: Mapping[str, Any]) -> str:
    """A row's answer format: the ``Answer format: …`` line, else the kind of its answer."""
    found = _ANSWER_FORMAT.search(_text(record, "instruction"))
    if found:
        return found.group(1)
    answer = _text(record, "answer")
    try:
        return detect_rule([answer])
    except ExtractionError:
        return label_family(answer) or "unknown"


@lru_cache(maxsize=64)
def _test_profile(path: str, mtime_ns: int) -> tuple[str, str]:
    """``(answer format, extraction rule)`` of a test set; raises when its labels fit no rule."""
    rows = _rows(Path(path))
    records = [_record(row, LLM_ADAPTERS_FIELDS, _LLM_FMT) for row in rows]
    if not records:
        raise DataError(f"{path}: the test set is empty; {_LLM_FMT}")
    try:
        rule = detect_rule(_text(record, "answer") for record in records)
    except ExtractionError as error:
        raise DataError(f"{path}: {error}") from None
    fmt = Counter(_answer_format(record) for record in records).most_common(1)[0][0]
    return fmt, rule


def _profile(test_file: Path) -> tuple[str, str]:
    return _test_profile(str(test_file), test_file.stat().st_mtime_ns)


def _llm_test_examples(test_file: Path) -> list[Example]:
    return [
        _example(
            row, _LLM_FMT, target=_text(record, "answer"), reference=_text(record, "answer"), header=True
        )
        for row in _rows(test_file)
        for record in [_record(row, LLM_ADAPTERS_FIELDS, _LLM_FMT)]
    ]


def _train_example(row: Row) -> Example:
    record = _record(row, LLM_ADAPTERS_FIELDS, _LLM_FMT)
    target = _text(record, "output") or _text(record, "answer")
    return _example(row, _LLM_FMT, target=target, reference=_text(record, "answer"), header=True)


@lru_cache(maxsize=8)
def _cached_formats(path: str, mtime_ns: int, size: int) -> tuple[str, ...]:
    rows = _rows(Path(path))
    return tuple(_answer_format(_record(row, LLM_ADAPTERS_FIELDS, _LLM_FMT)) for row in rows)


def _row_formats(path: Path) -> tuple[str, ...]:
    """The answer format of every row of a training mixture (computed once per file version)."""
    stat = path.stat()
    return _cached_formats(str(path), stat.st_mtime_ns, stat.st_size)


def _mixture_rows(train_file: Path, root: Path, name: str, siblings: Sequence[str]) -> list[Row]:
    """The rows of a training mixture dealt to ``name`` (see the module docstring)."""
    fmt = _profile(_test_file(root, name))[0]
    sharing = sorted({n for n in (name, *siblings) if _profile(_test_file(root, n))[0] == fmt})
    rows = [
        row
        for row, row_fmt in zip(_rows(train_file), _row_formats(train_file), strict=True)
        if row_fmt == fmt
    ]
    if not rows:
        raise DataError(
            f"{train_file} has no training row in the answer format {fmt!r} of test set {name!r}; "
            "pair each test set with the training file of its benchmark (commonsense_170k.json for the "
            "commonsense sets, math_10k.json / math_50k.json for the math sets)"
        )
    return rows[sharing.index(name) :: len(sharing)]


def _load_llm_adapters(location: str, name: str | None, siblings: Sequence[str]):
    if name is None:
        raise DataError(
            f"llm-adapters:{location} needs '#<dataset>' (or '#*'), e.g. llm-adapters:{location}#boolq"
        )
    path = Path(location).expanduser()
    if not path.exists():
        raise DataError(
            f"{str(path)!r} does not exist; pass an LLM-Adapters checkout or a training file in it"
        )
    root = _dataset_root(path)
    test_file = _test_file(root, name)
    rule = _profile(test_file)[1]
    if path.is_file():
        train_rows = _mixture_rows(path, root, name, siblings)
    else:
        train_file = root / name / "train.json"
        if not train_file.is_file():
            raise DataError(
                f"no per-dataset training file {str(train_file)!r}; train on a mixture instead: "
                f"llm-adapters:<checkout>/ft-training_set/<commonsense_170k|math_10k|math_50k>.json#{name}"
            )
        train_rows = list(_rows(train_file))
    splits = {"train": [_train_example(row) for row in train_rows], "test": _llm_test_examples(test_file)}
    return name, splits, {"kind": "generate", "metrics": [rule]}


# --------------------------------------------------------------------------- FedDPA

_FEDDPA_FMT = (
    "FedDPA format (JSON or JSON Lines objects with instruction, input (optional), output, category)"
)


def _client_files(folder: Path) -> list[Path]:
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CLIENT_FILE.search(p.name))]
    return [p for _, p in sorted(found)]


def _feddpa_sources(location: str) -> tuple[list[Path], Path]:
    """``(training files, test file)`` of a FedDPA folder or training file."""
    path = Path(location).expanduser()
    if path.is_file():
        files, base = [path], path.parent
    elif path.is_dir():
        files, base = _client_files(path), path
        subdirs = sorted(p for p in path.iterdir() if p.is_dir() and p.name.isdigit())
        if not files and len(subdirs) == 1:
            files = _client_files(subdirs[0])
        if not files:
            raise DataError(
                f"no local_training_<k>.json in {str(path)!r}"
                + (
                    f" (it has client folders {[p.name for p in subdirs]}: name one, e.g. {subdirs[0]})"
                    if subdirs
                    else ""
                )
                + "; FedDPA's layout is data/dataset1/<num_clients>/local_training_<k>.json"
            )
    else:
        raise DataError(
            f"{str(path)!r} does not exist; pass FedDPA's data folder (data/dataset1) or a training file"
        )
    for folder in (base, base.parent):
        if (folder / FEDDPA_TEST_FILE).is_file():
            return files, folder / FEDDPA_TEST_FILE
    raise DataError(
        f"no {FEDDPA_TEST_FILE} in {str(base)!r} or {str(base.parent)!r}; it comes with FedDPA's data"
    )


def _feddpa_rows(files: Sequence[Path]) -> list[tuple[Row, Mapping[str, Any]]]:
    return [(row, _record(row, FEDDPA_FIELDS, _FEDDPA_FMT)) for file in files for row in _rows(file)]


def _categories(pairs: Sequence[tuple[Row, Mapping[str, Any]]]) -> list[str]:
    return list(dict.fromkeys(_text(record, "category") for _, record in pairs))


def _feddpa_examples(pairs, category: str) -> list[Example]:
    return [
        _example(
            row, _FEDDPA_FMT, target=_text(record, "output"), reference=_text(record, "output"), header=False
        )
        for row, record in pairs
        if _text(record, "category") == category
    ]


def _load_feddpa(location: str, category: str | None):
    files, test_file = _feddpa_sources(location)
    train, test = _feddpa_rows(files), _feddpa_rows([test_file])
    if category is None:
        raise DataError(f"feddpa:{location} needs '#<category>' (or '#*'); categories: {_categories(train)}")
    for pairs, what in ((train, "training"), (test, "test")):
        if category not in _categories(pairs):
            raise DataError(
                f"no {what} rows of category {category!r}; categories there: {_categories(pairs)}"
            )
    splits = {"train": _feddpa_examples(train, category), "test": _feddpa_examples(test, category)}
    return category, splits, {"kind": "generate", "metrics": [FLAN_ROUGE]}


# --------------------------------------------------------------------------- dispatch


def load_paper_splits(
    scheme: str, location: str, selector: str | None, siblings: Sequence[str] = ()
) -> tuple[str, dict[str, list[Example]], dict[str, Any]]:
    """Read one task of an ``llm-adapters:`` or ``feddpa:`` spec.

    Args:
        scheme: :data:`LLM_ADAPTERS` or :data:`FEDDPA`.
        location: the folder or training file after the scheme.
        selector: the dataset (LLM-Adapters) or category (FedDPA) after ``#``.
        siblings: the other tasks loaded from the same ``location`` in the same call (a training
            mixture deals rows of a shared answer format among them).

    Returns:
        ``(task name, {"train": examples, "test": examples}, build_task overrides)``: generative
        tasks whose ``metrics`` name the paper's rule (:mod:`asymlora.eval.extract`).

    Raises:
        DataError: missing files or fields, labels that fit no extraction rule, unknown names.
    """
    if scheme == LLM_ADAPTERS:
        return _load_llm_adapters(location, selector, siblings)
    if scheme == FEDDPA:
        return _load_feddpa(location, selector)
    raise DataError(f"unknown paper data scheme {scheme!r}; expected one of {PAPER_SCHEMES}")


def list_paper_task_names(scheme: str, location: str) -> list[str]:
    """What ``#*`` expands to: every LLM-Adapters dataset (sorted) or FedDPA category (client order)."""
    if scheme == LLM_ADAPTERS:
        path = Path(location).expanduser()
        if not path.exists():
            raise DataError(
                f"{str(path)!r} does not exist; pass an LLM-Adapters checkout or a training file in it"
            )
        names = _dataset_names(_dataset_root(path))
        if not names:
            raise DataError(f"no <name>/test.json under {str(_dataset_root(path))!r}")
        return names
    files, _ = _feddpa_sources(location)
    return _categories(_feddpa_rows(files))
