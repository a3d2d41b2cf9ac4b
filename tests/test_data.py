"""Tests for asymlora.data: synthetic files offline; real BIG-bench and tokenizer in slow tests."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from tests.conftest import make_char_tokenizer

from asymlora.data import (
    IGNORE_INDEX,
    DataError,
    Example,
    MultiTaskCollator,
    MultiTaskDataset,
    Task,
    answer_continuation,
    encode_example,
    format_prompt,
    load_task,
    load_tasks,
    split_examples,
)
from asymlora.data import bigbench as bb

# --------------------------------------------------------------------------- helpers


@pytest.fixture
def tokenizer():
    return make_char_tokenizer()


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def qa_rows(n: int, task: str | None = None) -> list[dict]:
    rows = [{"instruction": "Add one.", "input": f"{i}", "output": f"{i + 1}"} for i in range(n)]
    return [{**row, "task": task} for row in rows] if task else rows


def choice_rows(n: int, task: str | None = None) -> list[dict]:
    rows = [
        {"input": f"Is {i} even?", "options": ["yes", "no"], "target": "yes" if i % 2 == 0 else "no"}
        for i in range(n)
    ]
    return [{**row, "task": task} for row in rows] if task else rows


def prompts(examples: list[Example]) -> list[str]:
    return [example.prompt for example in examples]


# --------------------------------------------------------------------------- files


def test_json_array_instruction_rows(tmp_path):
    path = tmp_path / "add.json"
    path.write_text(json.dumps(qa_rows(20), indent=2))
    task = load_task(f"json:{path}")
    assert task.name == "add" and task.kind == "generate"
    assert task.metrics == ["exact_match"]
    assert (len(task.train), len(task.test)) == (16, 4)
    example = task.train[0]
    assert example.prompt.startswith("Add one.\n\nQuestion: ")
    assert example.references == [example.target] and example.options is None


def test_jsonl_choice_rows_and_task_selector(tmp_path):
    path = write_jsonl(tmp_path / "mix.jsonl", choice_rows(10, "parity") + qa_rows(12, "add"))
    parity = load_task(f"jsonl:{path}#parity")
    assert parity.name == "parity" and parity.kind == "choice" and parity.metrics == ["accuracy"]
    assert len(parity.train) + len(parity.test) == 10
    for example in parity.train + parity.test:
        assert example.options == ["yes", "no"]
        assert example.target == example.options[example.answer_index]
    add = load_task(f"json:{path}#add")  # json: reads JSON Lines too
    assert add.kind == "generate" and len(add.train) + len(add.test) == 12


def test_choice_target_as_index_and_list_references(tmp_path):
    rows = [{"input": f"q{i}", "options": ["a", "b", "c"], "target": 2} for i in range(5)]
    task = load_task(f"jsonl:{write_jsonl(tmp_path / 'idx.jsonl', rows)}")
    assert {example.target for example in task.train + task.test} == {"c"}
    rows = [{"input": f"q{i}", "output": ["first answer here", "second"]} for i in range(5)]
    task = load_task(f"jsonl:{write_jsonl(tmp_path / 'refs.jsonl', rows)}")
    example = task.test[0]
    assert example.target == "first answer here" and example.references == ["first answer here", "second"]


def test_load_tasks_expands_every_task(tmp_path):
    path = write_jsonl(tmp_path / "mix.jsonl", choice_rows(10, "parity") + qa_rows(12, "add"))
    tasks = load_tasks([f"jsonl:{path}#*"], max_train=3)
    assert [task.name for task in tasks] == ["parity", "add"]
    assert all(len(task.train) == 3 for task in tasks)


# --------------------------------------------------------------------------- split and caps


def test_split_is_deterministic_and_independent_of_caps(tmp_path):
    path = write_jsonl(tmp_path / "add.jsonl", qa_rows(50))
    full = load_task(f"jsonl:{path}", seed=3)
    again = load_task(f"jsonl:{path}", seed=3)
    capped = load_task(f"jsonl:{path}", seed=3, max_train=5, max_test=2)
    other = load_task(f"jsonl:{path}", seed=4)
    assert prompts(full.train) == prompts(again.train) and prompts(full.test) == prompts(again.test)
    assert prompts(capped.train) == prompts(full.train)[:5]
    assert prompts(capped.test) == prompts(full.test)[:2]
    assert not set(prompts(full.train)) & set(prompts(full.test))
    assert len(full.train) + len(full.test) == 50 and len(full.test) == 10
    assert set(prompts(other.test)) != set(prompts(full.test))


def test_split_examples_fraction_and_bounds():
    examples = [Example(f"q{i}", f"a{i}") for i in range(7)]
    train, test = split_examples(examples, name="t", test_fraction=0.5)
    assert (len(train), len(test)) == (3, 4)
    train, test = split_examples(examples[:2], name="t", test_fraction=0.01)
    assert (len(train), len(test)) == (1, 1)
    with pytest.raises(DataError, match="test_fraction"):
        split_examples(examples, name="t", test_fraction=1.0)
    with pytest.raises(DataError, match="'t' has 1 example"):
        split_examples(examples[:1], name="t")


def test_hf_dataset_from_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    single = tmp_path / "single"
    datasets.Dataset.from_list(qa_rows(10, "add") + qa_rows(5, "other")).save_to_disk(str(single))
    task = load_task(f"hf:{single}#add")
    assert task.name == "add" and len(task.train) + len(task.test) == 10

    given = tmp_path / "given"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(choice_rows(8)),
            "test": datasets.Dataset.from_list(choice_rows(3)),
        }
    ).save_to_disk(str(given))
    task = load_task(f"hf:{given}", max_train=5)
    assert task.kind == "choice" and (len(task.train), len(task.test)) == (5, 3)


# --------------------------------------------------------------------------- prompt formatting


def test_format_prompt_choice_and_generate():
    choice = Example("Question: Is 2 even?", "yes", options=["yes", "no"], answer_index=0)
    prompt = format_prompt(choice)
    assert prompt == "Question: Is 2 even?\nOptions:\n- yes\n- no\nAnswer:"
    assert answer_continuation(prompt, choice.target) == " yes"
    inline = Example("John thinks it rains", "it does not rain", answer_prefix=", but ")
    assert format_prompt(inline) == "John thinks it rains, but"
    assert answer_continuation("ends with newline\n", " x ") == "x"


def test_example_validation():
    with pytest.raises(DataError, match="not one of the options"):
        Example("q", "maybe", options=["yes", "no"])
    with pytest.raises(DataError, match="differs from"):
        Example("q", "no", options=["yes", "no"], answer_index=0)
    assert Example("q", "no", options=["yes", "no"]).answer_index == 1
    with pytest.raises(DataError, match="empty"):
        Example("q", "  ")


# --------------------------------------------------------------------------- encoding and collation


def test_encode_example_masks_exactly_the_prompt(tokenizer):
    example = Example("Question: Is 2 even?", "yes", options=["yes", "no"], answer_index=0)
    prompt = format_prompt(example)
    encoded = encode_example(tokenizer, example, max_length=256)
    n_prompt = len(prompt)  # one token per character
    assert encoded["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    answer_ids = encoded["labels"][n_prompt:]
    assert IGNORE_INDEX not in answer_ids
    assert answer_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(answer_ids[:-1]) == " yes"
    assert encoded["input_ids"][n_prompt:] == answer_ids
    assert tokenizer.decode(encoded["input_ids"][:n_prompt]) == prompt
    assert encoded["attention_mask"] == [1] * len(encoded["input_ids"])


def test_encode_example_truncates_prompt_from_the_left(tokenizer):
    example = Example("x" * 100 + " the end", "answer")
    encoded = encode_example(tokenizer, example, max_length=30)
    assert len(encoded["input_ids"]) == 30
    answer_length = len(" answer") + 1
    assert encoded["labels"][-answer_length:] == encoded["input_ids"][-answer_length:]
    assert encoded["labels"].count(IGNORE_INDEX) == 30 - answer_length
    kept_prompt = tokenizer.decode(encoded["input_ids"][: 30 - answer_length])
    assert format_prompt(example).endswith(kept_prompt) and kept_prompt.endswith("Answer:")
    with pytest.raises(DataError, match="max_length=8"):
        encode_example(tokenizer, example, max_length=8)


def test_encode_example_keeps_bos_when_the_tokenizer_adds_it(tokenizer):
    tokenizer.add_bos_token = True
    encoded = encode_example(tokenizer, Example("y" * 50, "ok"), max_length=20)
    assert encoded["input_ids"][0] == tokenizer.bos_token_id
    assert len(encoded["input_ids"]) == 20


def test_collator_pads_right_and_returns_task_ids(tokenizer):
    short = {**encode_example(tokenizer, Example("a?", "b"), 64), "task_id": 1}
    long = {**encode_example(tokenizer, Example("a longer question?", "an answer"), 64), "task_id": 0}
    batch = MultiTaskCollator(tokenizer, pad_to_multiple_of=8)([short, long])
    length = len(long["input_ids"])
    assert batch["input_ids"].shape == (2, 8 * -(-length // 8))
    assert batch["task_ids"].tolist() == [1, 0] and batch["task_ids"].dtype == torch.long
    n = len(short["input_ids"])
    assert batch["input_ids"][0, :n].tolist() == short["input_ids"]
    assert (batch["input_ids"][0, n:] == tokenizer.pad_token_id).all()
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all()
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
    assert batch["labels"][1, :length].tolist() == long["labels"]
    no_ids = MultiTaskCollator(tokenizer)([encode_example(tokenizer, Example("q", "a"), 16)])
    assert no_ids["task_ids"].tolist() == [0]
    with pytest.raises(DataError, match="task_id"):
        MultiTaskCollator(tokenizer)([short, encode_example(tokenizer, Example("q", "a"), 16)])


def test_multitask_dataset_flattens_tasks(tokenizer):
    def task(name: str, n: int) -> Task:
        train = [Example(f"{name} {i}?", "ok") for i in range(n)]
        return Task(name, "generate", train, [Example("t?", "ok")], ["exact_match"])

    dataset = MultiTaskDataset([task("a", 3), task("b", 2)], tokenizer, max_length=64)
    assert len(dataset) == 5 and dataset.task_names == ["a", "b"]
    assert [dataset[i]["task_id"] for i in range(5)] == [0, 0, 0, 1, 1]
    assert dataset.task_indices == [[0, 1, 2], [3, 4]]
    batch = MultiTaskCollator(tokenizer)([dataset[i] for i in range(5)])
    assert batch["task_ids"].tolist() == [0, 0, 0, 1, 1]
    assert len(MultiTaskDataset([task("a", 3)], tokenizer, split="test")) == 1
    with pytest.raises(DataError, match="'a'"):
        MultiTaskDataset([task("a", 3)], tokenizer, max_length=3)


def test_multitask_dataset_counts_skipped_examples_and_cut_prompts(tokenizer, caplog):
    """One token per character, max_length 12: 'Q\\nAnswer:' (9) + ' a' + EOS (3) fits exactly;
    'Question: 1\\nAnswer:' (19) + ' 2' + EOS is cut to 12 (its first 10 prompt tokens go); an answer of
    20 characters + space + EOS (22) cannot fit and is skipped. The user is told both counts."""
    train = [Example("Q", "a"), Example("Question: 1", "2"), Example("Q", "x" * 20)]
    task = Task("t", "generate", train, [Example("Q", "a")], ["exact_match"])
    with caplog.at_level("WARNING", logger="asymlora.data.collate"):
        dataset = MultiTaskDataset([task], tokenizer, max_length=12)
    note = (
        "task 't', max_length=12: skipped 1 of 3 train examples whose answer does not fit; "
        "cut the prompt of 1 of 3 train examples from the left to fit"
    )
    assert dataset.notes == [note] and [r.getMessage() for r in caplog.records] == [note]
    assert [len(f["input_ids"]) for f in dataset.features] == [12, 12]
    assert tokenizer.decode(dataset.features[1]["input_ids"]) == "1\nAnswer: 2</s>"
    caplog.clear()
    quiet = MultiTaskDataset([task], tokenizer, max_length=12, warn=False, label="validation")
    assert quiet.notes == [note.replace("train", "validation")] and not caplog.records
    assert MultiTaskDataset([task], tokenizer, max_length=64).notes == []
    with pytest.raises(DataError, match="task 't' has no validation example that fits in max_length=3"):
        MultiTaskDataset([task], tokenizer, max_length=3, label="validation")


# --------------------------------------------------------------------------- bad input


def test_missing_field_names_file_and_line(tmp_path):
    rows = [*qa_rows(3), {"instruction": "Add one.", "input": "7"}]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=rf"{path}:4: missing field 'output'"):
        load_task(f"jsonl:{path}")
    array = tmp_path / "bad.json"
    array.write_text(json.dumps([*qa_rows(2), {"output": "x"}], indent=2))
    with pytest.raises(DataError, match=rf"{array}:12: missing field 'input'"):
        load_task(f"json:{array}")


def test_invalid_json_and_bad_values(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(qa_rows(1)[0]) + "\n{not json\n")
    with pytest.raises(DataError, match=rf"{path}:2: invalid JSON"):
        load_task(f"jsonl:{path}")
    rows = [{"input": "q", "options": ["a", "b"], "target": "c"}]
    with pytest.raises(DataError, match=r"bad2.jsonl:1: .*'c' must be one of the options"):
        load_task(f"jsonl:{write_jsonl(tmp_path / 'bad2.jsonl', rows)}")
    mixed = write_jsonl(tmp_path / "mixed.jsonl", choice_rows(3) + qa_rows(3))
    with pytest.raises(DataError, match="'mixed' mixes"):
        load_task(f"jsonl:{mixed}")


def test_byte_order_mark_and_non_utf8_bytes(tmp_path):
    """A file saved with a UTF-8 BOM (Notepad, spreadsheet exports) reads as without one, as JSON Lines and
    as a JSON array; Latin-1 bytes are refused naming the file, the line and the fix (not a bare
    UnicodeDecodeError)."""
    rows = qa_rows(5)
    lines = "".join(json.dumps(row) + "\n" for row in rows)
    for name, text in (("bom.jsonl", lines), ("bom.json", json.dumps(rows, indent=1))):
        (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + text.encode())
        task = load_task(f"jsonl:{tmp_path / name}", test_fraction=0.2)
        expected = sorted(f"Add one.\n\nQuestion: {i}" for i in range(5))
        assert sorted(prompts(task.train + task.test)) == expected
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(lines.encode() + '{"input": "café", "output": "x"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=rf"{latin}:6: not UTF-8 text \(byte 0xe9\); save the file as UTF-8"):
        load_task(f"jsonl:{latin}")


def test_text_after_the_json_array_is_refused(tmp_path):
    """Two arrays in one .json file (or anything after the closing ']') would silently lose the rest."""
    path = tmp_path / "two.json"
    path.write_text(json.dumps(qa_rows(3)) + "\n\n" + json.dumps(qa_rows(3)) + "\n")
    with pytest.raises(DataError, match=rf"{path}:3: text after the closing '\]' of the JSON array"):
        load_task(f"json:{path}")
    path.write_text(json.dumps(qa_rows(3), indent=2) + "  \n\n")  # trailing whitespace is fine
    assert len(load_task(f"json:{path}").train) == 2


def test_task_names_with_a_hash_and_empty_task_names(tmp_path):
    """A 'task' value holding '#' is selected (and expanded by '#*') as written; an empty one names its row
    (was: "bad task spec 'jsonl:F#': empty task name after '#'", a spec the user never wrote)."""
    rows = [*qa_rows(5, task="c#"), *qa_rows(5, task="ok")]
    path = write_jsonl(tmp_path / "names.jsonl", rows)
    assert [len(t.train) for t in load_tasks([f"jsonl:{path}#c#"])] == [4]
    assert [t.name for t in load_tasks([f"jsonl:{path}#*"])] == ["c#", "ok"]
    empty = write_jsonl(
        tmp_path / "empty_name.jsonl", [*qa_rows(2, task="ok"), {**qa_rows(1)[0], "task": ""}]
    )
    for spec in (f"jsonl:{empty}#*", f"jsonl:{empty}#ok"):
        with pytest.raises(DataError, match=rf"{empty}:3: field 'task' is empty"):
            load_tasks([spec])


def test_missing_paths(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="does not exist; pass"):
        load_task(f"jsonl:{tmp_path / 'nope.jsonl'}")
    monkeypatch.chdir(tmp_path)  # relative: the message says where it was looked for (not the config's dir)
    cwd = rf"\(relative paths start at the current directory, {tmp_path}\)"
    with pytest.raises(DataError, match=rf"'nope.jsonl' does not exist {cwd}; pass"):
        load_task("jsonl:nope.jsonl")
    with pytest.raises(DataError, match="does not exist"):
        load_task(f"hf:{tmp_path / 'nope_dir'}")


def test_hub_id_without_network_is_explained(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="network"):
        load_task("hf:someone/some_dataset")


def test_empty_task_after_capping_names_it(tmp_path):
    path = write_jsonl(tmp_path / "tiny.jsonl", qa_rows(5))
    with pytest.raises(DataError, match="task 'tiny' is empty"):
        load_task(f"jsonl:{path}", max_train=0)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no rows"):
        load_task(f"jsonl:{empty}")


def test_unknown_task_in_file_suggests_close_matches(tmp_path):
    path = write_jsonl(tmp_path / "mix.jsonl", choice_rows(4, "parity") + qa_rows(4, "add"))
    with pytest.raises(DataError, match="did you mean 'parity'"):
        load_task(f"jsonl:{path}#parit")
    plain = write_jsonl(tmp_path / "plain.jsonl", qa_rows(4))
    with pytest.raises(DataError, match="no 'task' column"):
        load_task(f"jsonl:{plain}#add")


def test_bad_specs():
    with pytest.raises(DataError, match="must start with one of"):
        load_task("csv:/tmp/x.csv")
    with pytest.raises(DataError, match="must start with one of"):
        load_task("strategyqa")
    with pytest.raises(DataError, match="max_train"):
        load_task("bigbench:strategyqa", max_train=-1, cache_dir="/nonexistent-never-used")


# --------------------------------------------------------------------------- BIG-bench, offline


TOY_TASKS = {
    "toy_choice": {
        "task_prefix": "Pick the right word.",
        "preferred_score": "multiple_choice_grade",
        "examples": [
            {
                "input": f"Item {i}",
                "target_scores": {"cat": int(i % 2 == 0), "dog": int(i % 2 == 1)},
                "target": "x",
            }
            for i in range(10)
        ]
        + [{"input": "no answer", "target_scores": {"cat": 0, "dog": 0}, "target": "x"}],
    },
    "group/sub_generate": {
        "preferred_score": "exact_str_match",
        "example_input_prefix": "John thinks ",
        "example_output_prefix": ", but ",
        "examples": [{"input": f"it is {i}", "target": [f"it is not {i}", "nope"]} for i in range(10)],
    },
    "group": {"name": "group"},
}


def _make_toy_archive(cache_dir: Path) -> Path:
    archive = bb.archive_path(cache_dir)
    archive.parent.mkdir(parents=True)
    with tarfile.open(archive, "w:gz") as tar:
        members = {f"{name}/task.json": json.dumps(data).encode() for name, data in TOY_TASKS.items()}
        members["programmatic_task/task.py"] = b"# generated in Python"
        for name, data in members.items():
            info = tarfile.TarInfo(bb.MEMBER_PREFIX + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return archive


def test_bigbench_from_a_toy_archive(tmp_path):
    archive = _make_toy_archive(tmp_path)
    choice = load_task("bigbench:toy_choice", cache_dir=tmp_path, test_fraction=0.3)
    assert choice.kind == "choice" and choice.metrics == ["accuracy"]
    assert len(choice.train) + len(choice.test) == 10  # the example without a positive score is skipped
    example = choice.train[0]
    assert example.prompt.startswith("Pick the right word.\n\nQuestion: Item ")
    assert example.options == ["cat", "dog"] and example.target in ("cat", "dog")

    generate = load_task("bigbench:group/sub_generate", cache_dir=tmp_path)
    example = generate.test[0]
    assert generate.kind == "generate" and example.references[1] == "nope"
    assert format_prompt(example).startswith("John thinks it is ") and format_prompt(example).endswith(
        ", but"
    )

    archive.unlink()  # later loads use the cached index and task files only
    again = load_task("bigbench:toy_choice", cache_dir=tmp_path, test_fraction=0.3)
    assert prompts(again.test) == prompts(choice.test)
    cached = bb.bigbench_dir(tmp_path) / bb.BIGBENCH_VERSION / "tasks" / "toy_choice" / "task.json"
    assert cached.is_file()


def test_bigbench_bad_names_offline(tmp_path):
    _make_toy_archive(tmp_path)
    with pytest.raises(DataError, match="did you mean bigbench:toy_choice"):
        load_task("bigbench:toy_choise", cache_dir=tmp_path)
    with pytest.raises(DataError, match="pick one: bigbench:group/sub_generate"):
        load_task("bigbench:group", cache_dir=tmp_path)
    with pytest.raises(DataError, match="programmatic"):
        load_task("bigbench:programmatic_task", cache_dir=tmp_path)
    with pytest.raises(DataError, match="did you mean bigbench:group/sub_generate"):
        load_task("bigbench:sub_generate", cache_dir=tmp_path)


def test_parse_task_json_prefers_preferred_score():
    data = {
        "preferred_score": "exact_str_match",
        "metrics": ["exact_str_match", "rouge"],
        "examples": [{"input": "1+1", "target": "2", "target_scores": {"2": 1, "3": 0}}],
    }
    parsed = bb.parse_task_json(data, "arith")
    assert parsed.kind == "generate" and parsed.metrics == ["exact_match", "rouge"]
    parsed = bb.parse_task_json({**data, "preferred_score": "multiple_choice_grade"}, "arith")
    assert parsed.kind == "choice" and parsed.examples[0].options == ["2", "3"]
    with pytest.raises(DataError, match="no examples"):
        bb.parse_task_json({"examples": []}, "empty")


# --------------------------------------------------------------------------- slow: real data and tokenizer


@pytest.mark.slow
def test_real_bigbench_tasks():
    strategy = load_task("bigbench:strategyqa", max_train=40, max_test=20)
    assert strategy.kind == "choice" and (len(strategy.train), len(strategy.test)) == (40, 20)
    assert all(set(example.options) == {"Yes", "No"} for example in strategy.train)

    arithmetic = load_task("bigbench:arithmetic/2_digit_addition", max_train=40, max_test=20)
    assert arithmetic.kind == "generate" and arithmetic.metrics == ["exact_match"]
    assert all(example.target.lstrip("-").isdigit() for example in arithmetic.train)

    emotions = load_task("bigbench:multiemo/hotels_sentence_en", max_train=40, max_test=20)
    assert emotions.kind == "choice"
    assert set(emotions.train[0].options) == {"positive", "negative", "neutral", "ambivalent"}
    assert emotions.train[0].prompt.startswith("Determine whether given opinion is positive")

    with pytest.raises(DataError, match="did you mean bigbench:strategyqa"):
        load_task("bigbench:strategyqaa")


@pytest.mark.slow
def test_encode_with_the_real_smollm2_tokenizer():
    from transformers import AutoTokenizer

    from asymlora.models import ensure_builtin_cached

    tokenizer = AutoTokenizer.from_pretrained(ensure_builtin_cached("smollm2-135m"))
    example = Example("Question: Is the sky blue?", "Yes", options=["Yes", "No"], answer_index=0)
    prompt = format_prompt(example)
    encoded = encode_example(tokenizer, example, max_length=128)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    n_prompt = len(prompt_ids)
    assert encoded["input_ids"][:n_prompt] == prompt_ids
    assert encoded["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert tokenizer.decode(encoded["labels"][n_prompt:]) == " Yes<|im_end|>"
    # prompt and answer tokenised apart give the same tokens as the joined text
    joined = tokenizer(prompt + answer_continuation(prompt, example.target), add_special_tokens=False)
    assert encoded["input_ids"][:-1] == joined["input_ids"]
