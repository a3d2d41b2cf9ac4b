"""User data: JSON / JSONL files and Hugging Face ``datasets``.

Each row is an object with either

* ``instruction`` / ``input`` / ``output`` (generative; ``input`` or ``instruction`` may be
  empty but not both; ``output`` a string or a list of acceptable answers), or
* ``input`` / ``options`` / ``target`` (choice when ``options`` is present: ``target`` is the
  correct option's text or its 0-based index; generative without ``options``),

plus an optional ``task`` column; ``#taskname`` at the end of a spec selects that task's rows.
A file whose first non-blank character is ``[`` is read as a JSON array, anything else as
JSON Lines, whatever its extension. Errors name the file and the line (JSON arrays: the line
where the bad element starts; datasets: the split and row number).
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asymlora.data.tasks import DataError, Example, compose_prompt

__all__ = [
    "Row",
    "example_from_record",
    "list_task_names",
    "load_file_splits",
    "load_hf_splits",
    "read_json_rows",
]

INSTRUCTION_FIELD = "instruction"
INPUT_FIELD = "input"
OPTIONS_FIELD = "options"
TASK_FIELD = "task"
ANSWER_FIELDS = ("output", "target")
EXPECTED_FIELDS = (
    "each row needs 'instruction'/'input'/'output' (generative) or 'input'/'options'/'target' "
    "(choice), plus an optional 'task'"
)
HF_TEST_SPLITS = ("test", "validation")
"""Split names used as the test split of a ``DatasetDict`` that also has ``train``."""
MAX_LISTED_NAMES = 20


@dataclass(frozen=True)
class Row:
    """A raw record and where it came from (``file:line`` or ``dataset [split] row n``)."""

    where: str
    record: Any


# --------------------------------------------------------------------------- reading files


def _skip_whitespace(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def _json_array_rows(text: str, source: str) -> list[Row]:
    """Parse a JSON array element by element, recording the line where each element starts."""
    decoder = json.JSONDecoder()
    pos = _skip_whitespace(text, text.index("[") + 1)
    rows: list[Row] = []
    line, counted = 1, 0
    while pos < len(text) and text[pos] != "]":
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as error:
            raise DataError(f"{source}:{error.lineno}: invalid JSON ({error.msg})") from None
        rows.append(Row(f"{source}:{line}", value))
        pos = _skip_whitespace(text, end)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_whitespace(text, pos + 1)
        elif pos >= len(text) or text[pos] != "]":
            raise DataError(f"{source}:{line}: expected ',' or ']' after this element of the JSON array")
    if pos >= len(text):
        raise DataError(f"{source}: the JSON array is not closed with ']'")
    after = _skip_whitespace(text, pos + 1)
    if after < len(text):
        line = text.count("\n", 0, after) + 1
        raise DataError(
            f"{source}:{line}: text after the closing ']' of the JSON array; a JSON "
            "file holds one array of objects: put every row in it (or write JSON Lines, one object per line)"
        )
    return rows


def _jsonl_rows(text: str, source: str) -> list[Row]:
    rows: list[Row] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(Row(f"{source}:{number}", json.loads(line)))
        except json.JSONDecodeError as error:
            raise DataError(
                f"{source}:{number}: invalid JSON ({error.msg}); JSON Lines needs one object per line "
                "(a JSON file must be an array of objects)"
            ) from None
    return rows


def _existing_file(location: str) -> Path:
    path = Path(location).expanduser()
    if not path.exists():
        cwd = "" if path.is_absolute() else f" (relative paths start at the current directory, {Path.cwd()})"
        raise DataError(f"data file {str(path)!r} does not exist{cwd}; pass an existing .json or .jsonl file")
    if not path.is_file():
        raise DataError(f"{str(path)!r} is not a file; json:/jsonl: specs take a .json or .jsonl file")
    return path


def _read_text(path: Path) -> str:
    """The file's text: UTF-8, a leading byte-order mark (Windows editors, spreadsheet exports) dropped."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DataError(
            f"{path}:{line}: not UTF-8 text (byte {data[error.start]:#04x}); save the file as UTF-8, e.g. "
            f"iconv -f latin1 -t utf-8 {path} > fixed.jsonl (name its real encoding after -f)"
        ) from None


def read_json_rows(location: str | Path) -> list[Row]:
    """Every record of a JSON-array or JSON-Lines file (UTF-8, with or without a BOM), with its ``file:line``."""
    path = _existing_file(str(location))
    text = _read_text(path)
    if text.lstrip().startswith("["):
        return _json_array_rows(text, str(path))
    return _jsonl_rows(text, str(path))


# --------------------------------------------------------------------------- records → examples


def _text_field(record: Mapping[str, Any], key: str) -> str:
    value = record.get(key)
    if value is None:
        return ""
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        return str(value)
    raise DataError(f"field {key!r} must be a string, got {type(value).__name__}")


def _answer_strings(value: Any, key: str) -> list[str]:
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(item, str | int | float) and not isinstance(item, bool) for item in values):
        raise DataError(f"field {key!r} must be a string or a list of strings, got {value!r}")
    answers = [str(item).strip() for item in values if str(item).strip()]
    if not answers:
        raise DataError(f"field {key!r} is empty")
    return answers


def _choice_example(prompt: str, options: Any, answer: Any, key: str) -> Example:
    if not isinstance(options, list) or len(options) < 2:
        raise DataError(f"field 'options' must be a list of at least 2 option texts, got {options!r}")
    texts = _answer_strings(options, OPTIONS_FIELD)
    if len(texts) != len(options):
        raise DataError(f"field 'options' contains empty options: {options!r}")
    if isinstance(answer, int) and not isinstance(answer, bool):
        if not 0 <= answer < len(texts):
            raise DataError(f"field {key!r} = {answer} is not a valid index into {len(texts)} options")
        index = answer
    elif isinstance(answer, str) and answer.strip() in texts:
        index = texts.index(answer.strip())
    else:
        raise DataError(
            f"field {key!r} = {answer!r} must be one of the options {texts} or a 0-based option index"
        )
    return Example(prompt, texts[index], options=texts, answer_index=index)


def example_from_record(record: Any, where: str) -> Example:
    """Turn one row into an :class:`Example`; errors are prefixed with ``where``."""
    if not isinstance(record, Mapping):
        raise DataError(f"{where}: expected an object, got {type(record).__name__}; {EXPECTED_FIELDS}")
    key = next((name for name in ANSWER_FIELDS if record.get(name) is not None), None)
    if key is None:
        raise DataError(f"{where}: missing field 'output' (or 'target'); {EXPECTED_FIELDS}")
    try:
        instruction = _text_field(record, INSTRUCTION_FIELD)
        text = _text_field(record, INPUT_FIELD)
        if not instruction.strip() and not text.strip():
            raise DataError(f"missing field 'input' (or 'instruction'); {EXPECTED_FIELDS}")
        prompt = compose_prompt(text, instruction=instruction)
        options = record.get(OPTIONS_FIELD)
        if options is not None:
            return _choice_example(prompt, options, record[key], key)
        answers = _answer_strings(record[key], key)
        return Example(prompt, answers[0], references=answers)
    except DataError as error:
        raise DataError(f"{where}: {error}") from None


# --------------------------------------------------------------------------- task selection


def _task_value(row: Row) -> str | None:
    if not isinstance(row.record, Mapping) or row.record.get(TASK_FIELD) is None:
        return None
    return str(row.record[TASK_FIELD])


def _names_in_order(rows: Iterable[Row]) -> list[str]:
    names: dict[str, None] = {}
    for row in rows:
        value = _task_value(row)
        if value is not None and not value.strip():
            raise DataError(
                f"{row.where}: field {TASK_FIELD!r} is empty; give the row a task name or no {TASK_FIELD!r}"
            )
        if value is not None:
            names[value] = None
    return list(names)


def _check_selector(rows: list[Row], selector: str, source: str) -> None:
    names = _names_in_order(rows)
    if not names:
        raise DataError(
            f"{source} has no {TASK_FIELD!r} column, so '#{selector}' selects nothing; drop the "
            f"'#{selector}' suffix or add a {TASK_FIELD!r} field to the rows"
        )
    if selector not in names:
        close = difflib.get_close_matches(selector, names, n=3)
        hint = f"did you mean {', '.join(repr(n) for n in close)}? " if close else ""
        listed = ", ".join(names[:MAX_LISTED_NAMES]) + (" …" if len(names) > MAX_LISTED_NAMES else "")
        raise DataError(f"{source} has no rows with {TASK_FIELD}={selector!r}; {hint}tasks in it: {listed}")


def _select_rows(rows: list[Row], selector: str | None) -> list[Row]:
    return rows if selector is None else [row for row in rows if _task_value(row) == selector]


def _examples(rows: Iterable[Row]) -> list[Example]:
    return [example_from_record(row.record, row.where) for row in rows]


def load_file_splits(location: str, selector: str | None) -> tuple[str, dict[str, list[Example]]]:
    """Examples of a JSON/JSONL file (optionally one task's rows): ``(name, {"all": examples})``."""
    rows = read_json_rows(location)
    path = str(Path(location).expanduser())
    if not rows:
        raise DataError(f"data file {path!r} contains no rows; {EXPECTED_FIELDS}")
    if selector is not None:
        _check_selector(rows, selector, path)
    examples = _examples(_select_rows(rows, selector))
    return selector or Path(location).stem, {"all": examples}


# --------------------------------------------------------------------------- Hugging Face datasets


def _looks_like_path(location: str) -> bool:
    return location.startswith(("/", ".", "~")) or location.count("/") > 1 or location.endswith("/")


def _open_dataset(location: str) -> Any:
    """``load_from_disk`` for an existing directory, ``load_dataset`` for a hub id."""
    try:
        import datasets  # optional extra (asymlora[hf]), and ~0.7 s to import
    except ImportError as error:
        raise DataError("hf: specs need the 'datasets' package: pip install 'asymlora[hf]'") from error
    path = Path(location).expanduser()
    if path.exists():
        return datasets.load_from_disk(str(path))
    if _looks_like_path(location):
        raise DataError(
            f"dataset directory {str(path)!r} does not exist; pass a directory written by "
            "Dataset.save_to_disk / DatasetDict.save_to_disk, or a hub id (needs network)"
        )
    try:
        return datasets.load_dataset(location)
    except Exception as error:
        raise DataError(
            f"could not load {location!r} from the Hugging Face hub (hub ids need network access; "
            "this machine may have none). On a machine with access run "
            f"datasets.load_dataset({location!r}).save_to_disk(DIR) and pass hf:DIR. Cause: {error}"
        ) from error


def _dataset_rows(dataset: Any, source: str, split: str | None) -> list[Row]:
    label = f"{source} [{split}]" if split else source
    return [Row(f"{label} row {number}", record) for number, record in enumerate(dataset, start=1)]


def _hf_row_splits(dataset: Any, source: str) -> dict[str, list[Row]]:
    """``{"train", "test"}`` when the dataset has both, else everything under ``"all"``."""
    if not hasattr(dataset, "keys"):  # a single Dataset
        return {"all": _dataset_rows(dataset, source, None)}
    test_split = next((name for name in HF_TEST_SPLITS if name in dataset), None)
    if "train" in dataset and test_split is not None:
        return {
            "train": _dataset_rows(dataset["train"], source, "train"),
            "test": _dataset_rows(dataset[test_split], source, test_split),
        }
    return {"all": [row for split in dataset for row in _dataset_rows(dataset[split], source, split)]}


def load_hf_splits(location: str, selector: str | None) -> tuple[str, dict[str, list[Example]]]:
    """Examples of a saved dataset directory or a hub dataset: ``(name, splits)``."""
    row_splits = _hf_row_splits(_open_dataset(location), location)
    all_rows = [row for rows in row_splits.values() for row in rows]
    if not all_rows:
        raise DataError(f"dataset {location!r} contains no rows; {EXPECTED_FIELDS}")
    if selector is not None:
        _check_selector(all_rows, selector, location)
    splits = {split: _examples(_select_rows(rows, selector)) for split, rows in row_splits.items()}
    name = selector or Path(location.rstrip("/")).name
    return name, splits


def list_task_names(scheme: str, location: str) -> list[str]:
    """Distinct values of the ``task`` column of a ``json``/``jsonl``/``hf`` source, in order."""
    if scheme == "hf":
        rows = [row for rows in _hf_row_splits(_open_dataset(location), location).values() for row in rows]
    elif scheme in ("json", "jsonl"):
        rows = read_json_rows(location)
    else:
        raise DataError(f"'#*' only works with json:, jsonl: and hf: specs, not {scheme + ':'!r}")
    names = _names_in_order(rows)
    if not names:
        raise DataError(f"{location!r} has no {TASK_FIELD!r} column, so '#*' finds no tasks")
    return names
