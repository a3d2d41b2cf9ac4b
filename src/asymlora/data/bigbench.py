"""BIG-bench JSON tasks, read straight out of the ``bigbench==1.0.0`` source archive on PyPI.

Nothing is installed (``pip install bigbench`` would pull tensorflow) and the archive is never
extracted as a whole (its ``task.json`` files add up to 1.7 GB). Cache layout under
``<root>/bigbench`` (root: ``cache_dir``, else ``$ASYMLORA_CACHE``, else ``~/.cache/asymlora``)::

    bigbench-1.0.0.tar.gz              the archive (358 MB), fetched once with pip download
    1.0.0/index.json                   every JSON task path (and the programmatic ones)
    1.0.0/tasks/<path>/task.json       each task file read so far, so the tarball is not reopened

Task data is fetched at first use, never committed: licences differ per source task (e.g.
FEVER is CC BY-SA); see each task's README in BIG-bench for its source and licence.

Example formats: ``{"input", "target_scores": {option: score}}`` gives a choice example (the
best-scored option is the answer); ``{"input", "target": str | [str]}`` a generative one.
Tasks with both use ``preferred_score``: ``multiple_choice_grade`` → choice, else generative.
The task's ``task_prefix`` becomes the instruction; ``example_input_prefix`` and
``example_output_prefix`` replace the default ``Question:`` / ``Answer:`` labels.

Metrics follow the task's declaration: ``preferred_score`` becomes the primary metric
(:data:`DECLARED_SCORES`: ``multiple_choice_grade`` → accuracy, ``exact_str_match`` → exact match,
``rougeLsum`` → ROUGE-Lsum, ``bleu`` → BLEU), and the other declared ``metrics`` are reported too.
A declared score asymlora does not compute (BLEURT needs a model from the hub; see
:data:`NOT_COMPUTED`) is never replaced silently: the first computable declared metric (else the
default of the task kind) takes its place, and :attr:`BigBenchTask.metric_note` says so.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asymlora import progress
from asymlora.cache import cache_root, file_lock
from asymlora.data.tasks import (
    DEFAULT_ANSWER_PREFIX,
    DEFAULT_INPUT_PREFIX,
    METRIC_ACCURACY,
    METRIC_BLEU,
    METRIC_EXACT_MATCH,
    METRIC_ROUGE,
    METRIC_ROUGE_LSUM,
    DataError,
    Example,
    TaskKind,
    compose_prompt,
)
from asymlora.io import atomic_write_bytes

__all__ = [
    "BIGBENCH_VERSION",
    "DECLARED_SCORES",
    "NOT_COMPUTED",
    "BigBenchIndex",
    "BigBenchTask",
    "archive_path",
    "bigbench_dir",
    "ensure_archive",
    "load_bigbench",
    "parse_task_json",
    "prefetch",
    "resolve_task_path",
    "task_index",
]

logger = logging.getLogger(__name__)

BIGBENCH_VERSION = "1.0.0"
PIP_REQUIREMENT = f"bigbench=={BIGBENCH_VERSION}"
ARCHIVE_NAME = f"bigbench-{BIGBENCH_VERSION}.tar.gz"
MEMBER_PREFIX = f"bigbench-{BIGBENCH_VERSION}/bigbench/benchmark_tasks/"
JSON_TASK_FILE = "task.json"
PROGRAMMATIC_TASK_FILE = "task.py"
INDEX_FILE = "index.json"
CLOSE_MATCHES = 5
CLOSE_MATCH_CUTOFF = 0.6
MAX_LISTED_SUBTASKS = 30
CHOICE_SCORE = "multiple_choice_grade"
DECLARED_SCORES: dict[str, str] = {
    CHOICE_SCORE: METRIC_ACCURACY,
    "exact_str_match": METRIC_EXACT_MATCH,
    "rougeLsum": METRIC_ROUGE_LSUM,
    "rouge1": "rouge1",
    "rouge2": "rouge2",
    "rouge": METRIC_ROUGE,  # only in ``metrics``: ROUGE-1/2/Lsum in BIG-bench
    "bleu": METRIC_BLEU,
}
"""BIG-bench score (``preferred_score`` or a ``metrics`` entry) → the asymlora metric computing it.

BIG-bench reports these on a 0–100 scale (ROUGE, BLEU) or as strict string equality
(``exact_str_match``); asymlora reports them in [0, 1], its exact match compares answers after
SQuAD normalisation, and its ROUGE stems words (Porter) where BIG-bench's does not (see
:mod:`asymlora.eval.metrics`). BLEU uses BIG-bench's sacrebleu settings."""
NOT_COMPUTED: dict[str, str] = {
    "bleurt": "BLEURT is a learned metric whose checkpoint comes from the model hub",
    "log_likelihood": "the log-likelihood of the target is a scoring metric, not an answer metric",
    "sequence_f1": "BIG-bench's per-token sequence-labelling F1 is not implemented",
    "numeric_match_with_0_1_relative_error": "numeric match within 10 % relative error is not implemented",
    "case_insensitive_str_match": "case-insensitive string match is not implemented as such",
    "macro_f1": "macro-F1 over the classes is not implemented",
}
"""BIG-bench scores asymlora does not compute, with the reason stated in :attr:`BigBenchTask.metric_note`."""
FETCH_TIMEOUT_S = 1800
ARCHIVE_BYTES = 358_249_635
"""Size of ``bigbench-1.0.0.tar.gz`` on PyPI (the total of the download progress bar)."""

# pip >= 26 rejects the bigbench sdist while preparing its metadata, because it declares
# ``bleurt @ file://…`` (a direct URL dependency), even with --no-deps. We only want the
# archive, never an install, so this shim runs the ordinary ``pip download`` with that one
# check switched off (a no-op on pips without it).
PIP_DOWNLOAD_SHIM = """
import runpy, sys
try:
    import pip._internal.operations.prepare as prepare
    if hasattr(prepare, "_check_linked_requirement_metadata"):
        prepare._check_linked_requirement_metadata = lambda *args, **kwargs: None
except ImportError:
    pass
runpy.run_module("pip", run_name="__main__", alter_sys=True)
"""


# --------------------------------------------------------------------------- cache paths


def bigbench_dir(cache_dir: str | Path | None = None) -> Path:
    """``<cache root>/bigbench``: where the archive and the cached task files live."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    return root / "bigbench"


def archive_path(cache_dir: str | Path | None = None) -> Path:
    """Path of the cached ``bigbench-1.0.0.tar.gz`` (may not exist yet)."""
    return bigbench_dir(cache_dir) / ARCHIVE_NAME


def _version_dir(cache_dir: str | Path | None) -> Path:
    return bigbench_dir(cache_dir) / BIGBENCH_VERSION


def _cached_task_file(path: str, cache_dir: str | Path | None) -> Path:
    return _version_dir(cache_dir) / "tasks" / path / JSON_TASK_FILE


def _write_atomic(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` through a temporary sibling and ``os.replace``."""
    atomic_write_bytes(target, data)


# --------------------------------------------------------------------------- fetching


def _run_pip_download(dest: Path) -> None:
    """``pip download`` the archive into ``dest``, with a progress bar of the bytes received.

    pip's own bar needs a terminal and its output is captured (for the error message), so the bar
    follows the size of the partial archive in pip's temporary directory (``TMPDIR`` of the subprocess).
    """
    command = [
        sys.executable,
        "-c",
        PIP_DOWNLOAD_SHIM,
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "--progress-bar",
        "off",
        PIP_REQUIREMENT,
        "-d",
        str(dest),
    ]
    pip_tmp = dest / "pip-tmp"
    pip_tmp.mkdir()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "TMPDIR": str(pip_tmp)},
        )
        _follow_download(proc, pip_tmp, dest / ARCHIVE_NAME)
        log.seek(0)
        output = log.read()
    if proc.returncode != 0 or not (dest / ARCHIVE_NAME).is_file():
        tail = "\n".join(output.strip().splitlines()[-15:])
        raise RuntimeError(
            f"could not fetch {PIP_REQUIREMENT} with pip download (exit {proc.returncode}). Fix the "
            f"package index access, or download {ARCHIVE_NAME} from PyPI by hand and place it at "
            f"{dest.parent / ARCHIVE_NAME}. pip said:\n{tail}"
        )


def _partial_size(pip_tmp: Path) -> int:
    """Bytes of the archive pip is writing (``<TMPDIR>/pip-unpack-*/<archive>``); 0 before it starts."""
    size = 0
    for path in pip_tmp.glob(f"pip-unpack-*/{ARCHIVE_NAME}"):
        with contextlib.suppress(OSError):  # pip may move or delete it meanwhile
            size = max(size, path.stat().st_size)
    return size


def _follow_download(proc: subprocess.Popen, pip_tmp: Path, final: Path) -> None:
    """Wait for ``proc`` (at most :data:`FETCH_TIMEOUT_S`), showing the archive's size as it grows."""
    deadline = time.monotonic() + FETCH_TIMEOUT_S
    desc = f"downloading BIG-bench {BIGBENCH_VERSION} from PyPI (once)"
    with progress.bar(desc=desc, total=ARCHIVE_BYTES, unit="B", unit_scale=True) as bar:
        while proc.poll() is None:
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise RuntimeError(
                    f"pip download of {PIP_REQUIREMENT} took over {FETCH_TIMEOUT_S} s; stopped"
                )
            bar.update(max(_partial_size(pip_tmp), bar.n) - bar.n)
            if bar.n >= ARCHIVE_BYTES:
                bar.set_postfix_str("pip checks the archive")
            time.sleep(0.5)
        if final.is_file():
            bar.update(max(0, final.stat().st_size - bar.n))


def ensure_archive(cache_dir: str | Path | None = None) -> Path:
    """Fetch the BIG-bench source archive into the cache once (≈358 MB); return its path.

    Runs ``python -m pip download --no-deps bigbench==1.0.0`` in a subprocess into a temporary
    directory, under a file lock, and renames the archive into place, so concurrent callers
    never see a partial file. An archive already at :func:`archive_path` is used as is.
    """
    target = archive_path(cache_dir)
    if target.is_file():
        return target
    with file_lock(target.with_name(f".{ARCHIVE_NAME}.lock")):
        if target.is_file():
            return target
        logger.info("Fetching %s (≈358 MB) into %s", PIP_REQUIREMENT, target.parent)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=".download-", dir=target.parent) as tmp:
            _run_pip_download(Path(tmp))
            os.replace(Path(tmp) / ARCHIVE_NAME, target)
        logger.info("Fetched BIG-bench in %.1f s", time.perf_counter() - started)
    return target


# --------------------------------------------------------------------------- the index


@dataclass(frozen=True)
class BigBenchIndex:
    """Task paths (under ``bigbench/benchmark_tasks/``) found in the archive.

    Attributes:
        json_tasks: directories holding a ``task.json`` (loadable), sorted.
        programmatic: directories holding a ``task.py`` (not loadable: generated in Python).
    """

    json_tasks: tuple[str, ...]
    programmatic: tuple[str, ...]

    def subtasks(self, path: str) -> list[str]:
        """JSON tasks below ``path``."""
        return [name for name in self.json_tasks if name.startswith(path + "/")]


def _task_dir(member_name: str, file_name: str) -> str | None:
    suffix = "/" + file_name
    if member_name.startswith(MEMBER_PREFIX) and member_name.endswith(suffix):
        return member_name[len(MEMBER_PREFIX) : -len(suffix)]
    return None


def _scan_archive(
    archive: Path, wanted: set[str], full: bool
) -> tuple[BigBenchIndex | None, dict[str, bytes]]:
    """One sequential pass over the archive: the index (if ``full``) and the ``wanted`` task files.

    Without ``full`` the pass stops as soon as every wanted file has been read.
    """
    json_tasks: list[str] = []
    programmatic: list[str] = []
    found: dict[str, bytes] = {}
    desc = (
        "indexing the BIG-bench archive (once)" if full else f"reading {len(wanted)} BIG-bench task file(s)"
    )
    with (
        open(archive, "rb") as raw,
        tarfile.open(fileobj=raw, mode="r:gz") as tar,
        progress.bar(desc=desc, total=archive.stat().st_size, unit="B", unit_scale=True, leave=False) as bar,
    ):
        for member in tar:
            bar.update(raw.tell() - bar.n)  # compressed bytes read so far
            json_dir = _task_dir(member.name, JSON_TASK_FILE)
            if json_dir is not None:
                json_tasks.append(json_dir)
                if json_dir in wanted:
                    found[json_dir] = tar.extractfile(member).read()  # type: ignore[union-attr]
            elif (py_dir := _task_dir(member.name, PROGRAMMATIC_TASK_FILE)) is not None:
                programmatic.append(py_dir)
            if not full and len(found) == len(wanted):
                break
    index = BigBenchIndex(tuple(sorted(json_tasks)), tuple(sorted(programmatic))) if full else None
    return index, found


def _store_tasks(found: Mapping[str, bytes], cache_dir: str | Path | None) -> None:
    for path, data in found.items():
        _write_atomic(_cached_task_file(path, cache_dir), data)


def _read_index(cache_dir: str | Path | None) -> BigBenchIndex | None:
    index_file = _version_dir(cache_dir) / INDEX_FILE
    if not index_file.is_file():
        return None
    data = json.loads(index_file.read_text())
    return BigBenchIndex(tuple(data["json_tasks"]), tuple(data["programmatic"]))


def _build_index(cache_dir: str | Path | None, wanted: Iterable[str] = ()) -> BigBenchIndex:
    """Scan the archive once for the index, caching any ``wanted`` task files on the way."""
    archive = ensure_archive(cache_dir)
    started = time.perf_counter()
    index, found = _scan_archive(archive, set(wanted), full=True)
    assert index is not None
    payload = {"archive": ARCHIVE_NAME, "json_tasks": index.json_tasks, "programmatic": index.programmatic}
    _write_atomic(_version_dir(cache_dir) / INDEX_FILE, json.dumps(payload, indent=0).encode())
    _store_tasks(found, cache_dir)
    logger.info(
        "Indexed %d BIG-bench JSON tasks in %.1f s", len(index.json_tasks), time.perf_counter() - started
    )
    return index


def task_index(cache_dir: str | Path | None = None) -> BigBenchIndex:
    """The list of BIG-bench tasks (cached after the first scan of the archive)."""
    return _read_index(cache_dir) or _build_index(cache_dir)


def _close_matches(name: str, index: BigBenchIndex) -> list[str]:
    by_leaf = [path for path in index.json_tasks if path.rsplit("/", 1)[-1] == name.rsplit("/", 1)[-1]]
    fuzzy = difflib.get_close_matches(name, index.json_tasks, n=CLOSE_MATCHES, cutoff=CLOSE_MATCH_CUTOFF)
    return list(dict.fromkeys([*by_leaf, *fuzzy]))[:CLOSE_MATCHES]


def resolve_task_path(name: str, index: BigBenchIndex) -> str:
    """Check ``name`` against the index; unknown names raise :class:`DataError` with close matches."""
    path = name.strip().strip("/")
    subtasks = index.subtasks(path)  # in 1.0.0 no group task.json has examples of its own
    if path in index.json_tasks and not subtasks:
        return path
    if subtasks:
        listed = ", ".join(f"bigbench:{sub}" for sub in subtasks[:MAX_LISTED_SUBTASKS])
        more = " …" if len(subtasks) > MAX_LISTED_SUBTASKS else ""
        raise DataError(f"bigbench:{path} is a group of subtasks; pick one: {listed}{more}")
    if path in index.programmatic:
        raise DataError(
            f"bigbench:{path} is a programmatic BIG-bench task (task.py, examples generated in Python); "
            "only JSON tasks (task.json) can be loaded"
        )
    close = _close_matches(path, index)
    hint = (
        f"did you mean {' or '.join(f'bigbench:{c}' for c in close)}?" if close else "no similar task names"
    )
    raise DataError(
        f"unknown BIG-bench task {path!r}: {hint} (task names are paths under "
        "bigbench/benchmark_tasks/, e.g. bigbench:strategyqa, bigbench:multiemo/hotels_sentence_en)"
    )


# --------------------------------------------------------------------------- reading tasks


def prefetch(names: Sequence[str], cache_dir: str | Path | None = None) -> list[str]:
    """Make sure the task files of ``names`` are cached, reading the archive at most once.

    Returns the resolved task paths. Unknown names raise :class:`DataError`.
    """
    index = _read_index(cache_dir)
    if index is None:
        candidates = [name.strip().strip("/") for name in names]
        missing = [name for name in candidates if not _cached_task_file(name, cache_dir).is_file()]
        index = _build_index(cache_dir, wanted=missing)
    paths = [resolve_task_path(name, index) for name in names]
    missing = sorted({path for path in paths if not _cached_task_file(path, cache_dir).is_file()})
    if missing:
        started = time.perf_counter()
        _, found = _scan_archive(ensure_archive(cache_dir), set(missing), full=False)
        _store_tasks(found, cache_dir)
        logger.info("Read %d BIG-bench task file(s) in %.1f s", len(found), time.perf_counter() - started)
    return paths


def read_task_json(name: str, cache_dir: str | Path | None = None) -> tuple[str, dict[str, Any]]:
    """The parsed ``task.json`` of task ``name`` (from the cache, or the archive once)."""
    (path,) = prefetch([name], cache_dir)
    return path, json.loads(_cached_task_file(path, cache_dir).read_text(encoding="utf-8"))


@dataclass
class BigBenchTask:
    """The examples of one BIG-bench task, before splitting.

    Attributes:
        name: the task path, e.g. ``multiemo/hotels_sentence_en``.
        kind: ``"choice"`` or ``"generate"``.
        examples: every usable example in file order.
        metrics: metric names for :class:`~asymlora.data.tasks.Task`.
        skipped: examples dropped (no positive option score or an empty target).
        metric_note: why the primary metric is not the declared ``preferred_score``, or None.
    """

    name: str
    kind: TaskKind
    examples: list[Example]
    metrics: list[str]
    skipped: int = 0
    metric_note: str | None = None


def _infer_kind(data: Mapping[str, Any], examples: Sequence[Mapping[str, Any]], name: str) -> TaskKind:
    has_scores = all("target_scores" in example for example in examples)
    has_target = all("target" in example for example in examples)
    if has_scores and (data.get("preferred_score") == CHOICE_SCORE or not has_target):
        return "choice"
    if has_target:
        return "generate"
    raise DataError(
        f"bigbench:{name}: examples mix 'target_scores' and 'target' formats; this task is not supported"
    )


def _computable(score: str, kind: TaskKind) -> str | None:
    """The asymlora metric for BIG-bench ``score`` on a task of ``kind``, or None when there is none."""
    metric = DECLARED_SCORES.get(score)
    if metric is None:
        return None
    return metric if (metric == METRIC_ACCURACY) == (kind == "choice") else None


def _fallback_note(name: str, preferred: str, kind: TaskKind, primary: str, declared: bool) -> str:
    source = "the first computable metric it declares" if declared else f"the default for {kind} tasks"
    if preferred:
        reason = NOT_COMPUTED.get(preferred, f"asymlora does not compute it for {kind} tasks")
        declared_as = f"preferred_score {preferred!r} ({reason})"
    else:
        declared_as = "no preferred_score"
    return f"bigbench:{name} declares {declared_as}; scored by {primary!r} instead, {source}"


def _metrics(data: Mapping[str, Any], kind: TaskKind, name: str) -> tuple[list[str], str | None]:
    """The task's metrics (primary first: its ``preferred_score``) and a note when that is not computed.

    Choice tasks are scored by option log-likelihood only, so they report accuracy alone.
    """
    declared = [str(score) for score in data.get("metrics", [])]
    others = [metric for score in declared if (metric := _computable(score, kind)) is not None]
    preferred = str(data.get("preferred_score") or "")
    primary = _computable(preferred, kind)
    fallback = primary is None
    if primary is None:
        primary = others[0] if others else (METRIC_ACCURACY if kind == "choice" else METRIC_EXACT_MATCH)
    if primary == METRIC_ROUGE:  # BIG-bench's "rouge" is ROUGE-1/2/Lsum, ranked by rougeLsum
        primary = METRIC_ROUGE_LSUM
    note = _fallback_note(name, preferred, kind, primary, bool(others)) if fallback else None
    if note:
        logger.info("%s", note)
    metrics = [primary, *others] if kind == "generate" else [METRIC_ACCURACY]
    return list(dict.fromkeys(metrics)), note


def _choice_example(raw: Mapping[str, Any], prompt: str, answer_prefix: str) -> Example | None:
    scores = {str(option).strip(): float(score) for option, score in raw["target_scores"].items()}
    best = max(scores.values(), default=0.0)
    if best <= 0 or len(scores) < 2:
        return None
    options = list(scores)
    index = next(i for i, option in enumerate(options) if scores[option] == best)
    references = [option for option in options if scores[option] == best]
    return Example(prompt, options[index], options, index, references, answer_prefix)


def _generate_example(raw: Mapping[str, Any], prompt: str, answer_prefix: str) -> Example | None:
    target = raw["target"]
    targets = target if isinstance(target, list) else [target]
    references = [str(item).strip() for item in targets if str(item).strip()]
    if not references:
        return None
    return Example(prompt, references[0], references=references, answer_prefix=answer_prefix)


def parse_task_json(data: Mapping[str, Any], name: str) -> BigBenchTask:
    """Turn a parsed ``task.json`` into examples, honouring the task's prefixes."""
    raw_examples = data.get("examples") or []
    if not raw_examples:
        raise DataError(f"bigbench:{name} has no examples in its task.json")
    kind = _infer_kind(data, raw_examples, name)
    instruction = str(data.get("task_prefix", ""))
    input_prefix = str(data.get("example_input_prefix", DEFAULT_INPUT_PREFIX))
    answer_prefix = str(data.get("example_output_prefix", DEFAULT_ANSWER_PREFIX))
    make = _choice_example if kind == "choice" else _generate_example
    examples: list[Example] = []
    for raw in raw_examples:
        try:
            prompt = compose_prompt(
                str(raw.get("input", "")), instruction=instruction, input_prefix=input_prefix
            )
            example = make(raw, prompt, answer_prefix)
        except DataError:  # an empty input and no instruction
            example = None
        if example is not None:
            examples.append(example)
    skipped = len(raw_examples) - len(examples)
    if skipped:
        logger.info("bigbench:%s: skipped %d example(s) without a usable answer", name, skipped)
    metrics, note = _metrics(data, kind, name)
    return BigBenchTask(name, kind, examples, metrics, skipped, note)


def load_bigbench(name: str, cache_dir: str | Path | None = None) -> BigBenchTask:
    """Load BIG-bench JSON task ``name`` (path under ``bigbench/benchmark_tasks/``).

    Fetches the archive at first use (see :func:`ensure_archive`); unknown names raise
    :class:`DataError` listing close matches (``strategyqaa`` → ``bigbench:strategyqa``).
    """
    path, data = read_task_json(name, cache_dir)
    return parse_task_json(data, path)
