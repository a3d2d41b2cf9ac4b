"""The paper's benchmarks: LLM-Adapters / FedDPA readers, the papers' scoring rules, configs/paper/*.yaml.

Every data file here is synthetic, written by the fixtures in the public layouts (docs/reproduce.md);
the configs run end to end on a tiny random Llama with only the model, sizes and paths overridden.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from tests.conftest import make_char_tokenizer, make_tiny_llama

from asymlora.config import ConfigError, load_config
from asymlora.data import DataError, answer_continuation, format_prompt, load_task, load_tasks
from asymlora.eval import evaluate_task, primary_metric
from asymlora.eval.extract import (
    ExtractionError,
    answer_letter_accuracy,
    answer_number_accuracy,
    answer_word_accuracy,
    detect_rule,
    extract_letter,
    extract_number,
    extract_word,
    flan_rouge,
)

PAPER = Path(__file__).resolve().parents[1] / "configs" / "paper"
LLM_PLACEHOLDER = "/path/to/LLM-Adapters"
FEDDPA_PLACEHOLDER = "/path/to/FedDPA/data/dataset1"
HEADER = "Below is an instruction that describes a task. Write a response that appropriately completes the request."

# dataset → (answer format line, labels cycled through by the synthetic rows)
COMMONSENSE = {
    "boolq": ("true/false", ["true", "false"]),
    "piqa": ("solution1/solution2", ["solution1", "solution2"]),
    "social_i_qa": ("answer1/answer2/answer3", ["answer1", "answer2", "answer3"]),
    "hellaswag": ("ending1/ending2/ending3/ending4", ["ending1", "ending4"]),
    "winogrande": ("option1/option2", ["option1", "option2"]),
    "ARC-Easy": ("answer1/answer2/answer3/answer4", ["answer1", "answer4"]),
    "ARC-Challenge": ("answer1/answer2/answer3/answer4", ["answer2", "answer3"]),
    "openbookqa": ("answer1/answer2/answer3/answer4", ["answer3", "answer1"]),
}
CATEGORIES = ["common_sense", "entailment", "open_domain_qa", "paraphrase", "reading_comprehension",
              "sentiment", "summarization", "text_formatting"]  # fmt: skip


def _cs_row(fmt: str, label: str, question: str) -> dict:
    return {"instruction": f"{question}\n\nAnswer format: {fmt}", "input": "",
            "output": f"the correct answer is {label}", "answer": label}  # fmt: skip


def _write(path: Path, rows: list, jsonl: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) if jsonl else json.dumps(rows, indent=2))
    return path


@pytest.fixture(scope="module")
def llm_root(tmp_path_factory) -> Path:
    """An LLM-Adapters checkout: dataset/<name>/test.json, boolq/train.json, the two training mixtures."""
    root = tmp_path_factory.mktemp("LLM-Adapters")
    mixture = []
    shared = COMMONSENSE["ARC-Easy"][0]
    for name, (fmt, labels) in COMMONSENSE.items():
        tests = [_cs_row(fmt, labels[i % len(labels)], f"{name} test question {i}?") for i in range(3)]
        _write(root / "dataset" / name / "test.json", tests)
        if fmt != shared:  # the shared ARC/OBQA format gets its rows below, in one block
            mixture += [_cs_row(fmt, labels[i % 2], f"{name} train question {i}?") for i in range(3)]
    mixture += [_cs_row(shared, f"answer{1 + i % 4}", f"shared train question {i}?") for i in range(9)]
    _write(root / "ft-training_set" / "commonsense_170k.json", mixture)
    _write(root / "dataset" / "boolq" / "train.json",
           [_cs_row("true/false", "true", f"own boolq train {i}?") for i in range(4)])  # fmt: skip
    numbers = [("What is 2 + 3?", "The answer is 5.", "5"), ("What is 1,000 + 234?", "The answer is 1,234.", "1234"),
               ("What is 7 - 9?", "The answer is -2.", "-2"), ("Half of 3?", "The answer is 1.5.", "1.5")]  # fmt: skip
    letters = [(f"Pick one {i}. Answer Choices: (A) 1 (B) 2 (C) 3 (D) 4 (E) 5", "The answer is (C).", "C")
               for i in range(3)]  # fmt: skip
    math_rows = [{"instruction": q, "input": "", "output": o, "answer": a} for q, o, a in numbers + letters]
    _write(root / "ft-training_set" / "math_10k.json", math_rows)
    for name, rows in (
        ("gsm8k", numbers[:2]),
        ("SVAMP", numbers[2:]),
        ("mawps", numbers[1:3]),
        ("AQuA", letters),
    ):
        _write(root / "dataset" / name / "test.json",
               [{"instruction": q, "input": "", "output": "", "answer": a if name == "AQuA" else str(float(a))}
                for q, _, a in rows])  # fmt: skip
    return root


@pytest.fixture(scope="module")
def feddpa_dir(tmp_path_factory) -> Path:
    """FedDPA's dataset1: 8/local_training_<k>.json (one category per client) and the FLAN test file."""
    root = tmp_path_factory.mktemp("FedDPA") / "dataset1"
    for k, category in enumerate(CATEGORIES):
        rows = [{"instruction": f"Task {category}: repeat the word.", "input": f"word{i}",
                 "output": f"word{i} again", "category": category} for i in range(4)]  # fmt: skip
        _write(root / "8" / f"local_training_{k}.json", rows, jsonl=k % 2 == 0)  # both encodings load
    tests = [{"instruction": f"Task {c}: repeat the word.", "input": f"test{i}", "output": f"test{i} again",
              "category": c} for c in CATEGORIES for i in range(3)]  # fmt: skip
    _write(root / "flan_test_200_selected_nstrict_1.jsonl", tests, jsonl=True)
    return root


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "model"
    tokenizer = make_char_tokenizer()
    make_tiny_llama(vocab_size=len(tokenizer), hidden=32, layers=2).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# --------------------------------------------------------------------------- extraction rules (hand values)


def test_answer_word_takes_the_first_label_of_the_datasets_family() -> None:
    assert extract_word("the correct answer is true", "true/false") == "true"
    assert extract_word("false, although true at first", "true/false") == "false"  # first occurrence wins
    assert extract_word("untrue", "true/false") == "true"  # the published rule has no word boundary
    assert extract_word("True.", "true/false") == ""  # and is case-sensitive
    assert extract_word("answer5 or answer2", "answer") == "answer5"
    # hand count: right, two answers (first is wrong), no answer, punctuation around the right one
    predictions = [
        "the correct answer is solution2.",
        "solution1 or solution2",
        "I am not sure",
        "(answer1).",
    ]
    references = [["solution2"], ["solution2"], ["answer1"], ["answer1"]]
    assert answer_word_accuracy(predictions, references) == {"answer_word": 0.5}


def test_numbers_drop_commas_take_the_last_one_and_allow_0_001() -> None:
    assert extract_number("He pays 1,234 dollars.") == 1234.0
    assert extract_number("From 10 to 12 it grows by 2") == 2.0
    assert extract_number("it is -3.5 degrees") == -3.5
    assert extract_number("The answer is 18.") == 18.0
    assert math.isinf(extract_number("no digits here"))
    predictions = ["so 1,000 + 234 = 1,234", "x = 18.0004", "x = 18.002", "I cannot tell", "-7 apples"]
    references = ["1234", "18.0", "18", "0", "-7.0"]  # 0.0004 <= 0.001 counts, 0.002 does not
    assert answer_number_accuracy(predictions, references) == {"answer_number": 3 / 5}


def test_option_letters_take_the_first_capital_a_to_e() -> None:
    assert extract_letter("The answer is (C).") == "C"  # 'T' is not A-E
    assert extract_letter("After all, (B)") == "A"  # the published rule's quirk, kept for comparability
    assert extract_letter("none of them") == ""
    assert answer_letter_accuracy(["The answer is (C).", "(D) or (C)", "no idea"], ["C", "C", "A"]) == {
        "answer_letter": 1 / 3
    }


def test_flan_rouge_is_unstemmed_rouge_1_and_l() -> None:
    # "the cat sat" vs "the cat sat on the mat": 3 common unigrams, P = 3/3, R = 3/6 → F = 2/3; LCS = 3 → same
    scores = flan_rouge(["the cat sat", "cats running"], ["the cat sat on the mat", "cat run"])
    # second pair: no common token without stemming (a stemmer would match both words)
    assert scores == pytest.approx({"flan_rouge1": (2 / 3 + 0) / 2, "flan_rougeL": (2 / 3 + 0) / 2})


def test_rule_detection_and_labels_that_fit_no_rule() -> None:
    assert detect_rule(["true", "false"]) == "answer_word"
    assert detect_rule(["A", "E"]) == "answer_letter"
    assert detect_rule(["18.0", "-2", "1,234"]) == "answer_number"
    with pytest.raises(ExtractionError, match="mix the answer formats"):
        detect_rule(["true", "solution1"])
    with pytest.raises(ExtractionError, match=r"\['maybe'\] match none of the extraction rules"):
        detect_rule(["maybe", "12"])


def test_evaluate_task_scores_the_raw_multi_line_generation(monkeypatch, llm_root) -> None:
    import asymlora.eval.scoring as scoring

    task = load_task(f"llm-adapters:{llm_root}/ft-training_set/math_10k.json#gsm8k")  # labels 5.0 and 1234.0
    by_label = {"5.0": "2 + 2 = 4\nthen 4 + 1 = 5", "1234.0": "It is 1,234, not 99\nso: 1,234"}
    monkeypatch.setattr(
        scoring, "greedy_generate", lambda m, t, ex, **k: [by_label[e.references[0]] for e in ex]
    )
    scores = evaluate_task(None, None, task, task_id=None)
    assert scores["answer_number"] == 1.0  # the last number of the whole output (first lines end in 4 and 99)
    assert scores["exact_match"] == 0.0 and primary_metric(task) == "answer_number"


# --------------------------------------------------------------------------- readers


def test_llm_adapters_prompt_target_and_reference(llm_root) -> None:
    task = load_task(f"llm-adapters:{llm_root}#boolq")  # directory mode: dataset/boolq/train.json
    assert (
        task.kind == "generate" and task.metrics == ["answer_word"] and primary_metric(task) == "answer_word"
    )
    assert sorted(e.prompt.split("\n")[3] for e in task.train) == [f"own boolq train {i}?" for i in range(4)]
    example = next(e for e in task.test if "test question 0?" in e.prompt)
    prompt = format_prompt(example)
    assert prompt == (f"{HEADER}\n\n### Instruction:\nboolq test question 0?\n\nAnswer format: true/false"
                      "\n\n### Response:\n")  # fmt: skip
    assert example.references == ["true"]
    train = task.train[0]
    assert answer_continuation(format_prompt(train), train.target) == "the correct answer is true"


def test_mixture_rows_go_to_the_task_of_their_answer_format_once_each(llm_root) -> None:
    mixture = llm_root / "ft-training_set" / "commonsense_170k.json"
    tasks = {t.name: t for t in load_tasks([f"llm-adapters:{mixture}#{name}" for name in COMMONSENSE])}
    questions = {name: sorted(e.prompt.split("\n")[3] for e in task.train) for name, task in tasks.items()}
    assert questions["boolq"] == [f"boolq train question {i}?" for i in range(3)]
    # the 9 shared-format rows, dealt round-robin in file order among ARC-Challenge < ARC-Easy < openbookqa
    assert questions["ARC-Challenge"] == [f"shared train question {i}?" for i in (0, 3, 6)]
    assert questions["ARC-Easy"] == [f"shared train question {i}?" for i in (1, 4, 7)]
    assert questions["openbookqa"] == [f"shared train question {i}?" for i in (2, 5, 8)]
    assert sum(len(t.train) for t in tasks.values()) == len(json.loads(mixture.read_text()))
    alone = load_task(f"llm-adapters:{mixture}#ARC-Easy")  # loaded alone, it takes the whole format
    assert len(alone.train) == 9


def test_math_mixture_rows_by_answer_kind(llm_root) -> None:
    math_tasks = load_tasks([f"llm-adapters:{llm_root}/ft-training_set/math_10k.json#{n}" for n in
                             ("AQuA", "gsm8k", "SVAMP")])  # fmt: skip
    aqua, gsm8k, svamp = math_tasks
    assert aqua.metrics == ["answer_letter"] and gsm8k.metrics == ["answer_number"]
    assert {e.target for e in aqua.train} == {"The answer is (C)."} and len(aqua.train) == 3
    assert len(gsm8k.train) + len(svamp.train) == 4  # the numeric rows, dealt between the two


def test_wildcard_lists_every_dataset(llm_root, feddpa_dir) -> None:
    from asymlora.data.loading import _expand_specs

    expanded = _expand_specs([f"llm-adapters:{llm_root}#*"])
    assert [s.rsplit("#", 1)[1] for s in expanded] == sorted(
        [*COMMONSENSE, "AQuA", "SVAMP", "gsm8k", "mawps"]
    )
    expanded = _expand_specs([f"feddpa:{feddpa_dir}#*"])
    assert [s.rsplit("#", 1)[1] for s in expanded] == CATEGORIES  # client order, not alphabetical


def test_feddpa_reader(feddpa_dir) -> None:
    task = load_task(f"feddpa:{feddpa_dir}#paraphrase")
    assert task.metrics == ["flan_rouge"] and primary_metric(task) == "flan_rouge1"
    assert len(task.train) == 4 and len(task.test) == 3
    example = next(e for e in task.test if "test0" in e.prompt)
    assert (
        format_prompt(example)
        == "### Instruction:\nTask paraphrase: repeat the word.\n\n### Input:\ntest0\n\n### Response:\n"
    )
    assert example.references == ["test0 again"]
    single = load_task(f"feddpa:{feddpa_dir}/8/local_training_3.json#paraphrase")  # one training file
    assert len(single.train) == 4 and len(single.test) == 3  # the test file is found one level up


# --------------------------------------------------------------------------- bad input


def test_wrong_format_names_missing_fields_and_expected_format(llm_root, feddpa_dir, tmp_path) -> None:
    bad = _write(tmp_path / "LLM" / "ft-training_set" / "mix.json", [{"instruction": "Q?", "output": "yes"}])
    (tmp_path / "LLM" / "dataset").symlink_to(llm_root / "dataset")
    with pytest.raises(
        DataError, match=r"mix.json:2: missing field\(s\) \['input', 'answer'\]; the LLM-Adapters"
    ):
        load_task(f"llm-adapters:{bad}#boolq")
    flan = _write(tmp_path / "flan" / "flan_multi_task_data.json", [{"instruction": "a", "output": "b"}])
    (flan.parent / "flan_test_200_selected_nstrict_1.jsonl").symlink_to(
        feddpa_dir / "flan_test_200_selected_nstrict_1.jsonl"
    )
    with pytest.raises(DataError, match=r"json:2: missing field\(s\) \['category'\]; the FedDPA format"):
        load_task(f"feddpa:{flan}#sentiment")
    with pytest.raises(DataError, match="no test set .*ARC-Hard.*datasets under"):
        load_task(f"llm-adapters:{llm_root}#ARC-Hard")
    with pytest.raises(DataError, match="needs '#<dataset>'"):
        load_task(f"llm-adapters:{llm_root}")
    with pytest.raises(DataError, match="no training row in the answer format 'true/false'"):
        load_task(f"llm-adapters:{llm_root}/ft-training_set/math_10k.json#boolq")
    for clients in ("8", "10"):
        (tmp_path / "two" / clients).mkdir(parents=True)
    with pytest.raises(
        DataError, match=r"no local_training_<k>.json .*client folders \['10', '8'\]: name one"
    ):
        load_task(f"feddpa:{tmp_path / 'two'}#sentiment")


def test_test_labels_that_fit_no_rule_fail_before_training(tmp_path) -> None:
    rows = [{"instruction": "Is it?", "input": "", "output": "", "answer": a} for a in ("maybe", "perhaps")]
    _write(tmp_path / "dataset" / "odd" / "test.json", rows)
    _write(tmp_path / "dataset" / "odd" / "train.json", rows)
    with pytest.raises(
        DataError, match=r"odd/test.json: labels such as .*'maybe'.* match none of the extraction"
    ):
        load_task(f"llm-adapters:{tmp_path}#odd")


def test_model_not_available_offline_says_what_to_download(monkeypatch, llm_root, tmp_path) -> None:
    import transformers

    from asymlora.recipes.multitask import run

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    cfg = _config("commonsense_llama3_8b.yaml", llm_root, None, tmp_path, [f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(FileNotFoundError, match=r"hf download meta-llama/Meta-Llama-3-8B --local-dir DIR"):
        run(cfg, quiet=True)
    assert not (tmp_path / "run" / "adapter").exists()  # nothing trained


# --------------------------------------------------------------------------- configs end to end


def _yaml_with_paths(name: str, llm_root: Path | None, feddpa_dir: Path | None, tmp_path: Path) -> Path:
    text = (PAPER / name).read_text()
    assert LLM_PLACEHOLDER in text or FEDDPA_PLACEHOLDER in text, "the data path is the one thing to fill in"
    text = text.replace(LLM_PLACEHOLDER, str(llm_root)).replace(FEDDPA_PLACEHOLDER, str(feddpa_dir))
    path = tmp_path / name
    path.write_text(text)
    return path


def _config(name: str, llm_root, feddpa_dir, tmp_path: Path, overrides: list[str]):
    return load_config(_yaml_with_paths(name, llm_root, feddpa_dir, tmp_path), overrides)


TINY = ["model.device=cpu", "train.batch_size=2", "train.grad_accum=2", "train.warmup_steps=1",
        "train.save_every=0", "eval.batch_size=8"]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "epochs", "max_new_tokens", "metric"),
    [
        ("commonsense_llama3_8b.yaml", 3, 32, "answer_word"),
        ("commonsense_qwen2_7b.yaml", 3, 32, "answer_word"),
        ("math_llama3_8b.yaml", 3, 256, "answer_number"),
        ("flan_cross_domain_llama2_7b.yaml", 50, 80, "flan_rouge1"),
    ],
)
def test_multitask_paper_configs_run_end_to_end(name, epochs, max_new_tokens, metric, llm_root, feddpa_dir,
                                                tiny_model, tmp_path) -> None:  # fmt: skip
    from asymlora.recipes.multitask import run

    shipped = _config(name, llm_root, feddpa_dir, tmp_path, [])
    assert (shipped.train.epochs, shipped.eval.max_new_tokens, shipped.adapter.r, shipped.adapter.num_experts) == (
        epochs, max_new_tokens, 8, 3)  # fmt: skip
    assert shipped.model.gradient_checkpointing and shipped.compare.methods == ["hydralora", "alora"]
    cfg = _config(name, llm_root, feddpa_dir, tmp_path, [f"model.name={tiny_model}", f"run_dir={tmp_path / 'run'}",
                  "train.epochs=0.5", "eval.max_new_tokens=6", "compare.methods=[alora]", *TINY])  # fmt: skip
    results = run(cfg, quiet=True)
    alora = results["methods"]["alora"]
    assert list(alora["per_task"]) == [spec.rsplit("#", 1)[1] for spec in shipped.data.tasks]
    expected = {task: "answer_letter" if task == "AQuA" else metric for task in alora["per_task"]}
    assert results["primary_metric"] == expected  # each task scored by its paper's rule
    assert all(expected[task] in scores for task, scores in alora["per_task"].items())
    n_train = {"commonsense_llama3_8b.yaml": 24, "commonsense_qwen2_7b.yaml": 24, "math_llama3_8b.yaml": 7,
               "flan_cross_domain_llama2_7b.yaml": 32}[name]  # fmt: skip
    assert alora["steps"] == math.ceil(0.5 * n_train / 4)  # train.epochs → steps (batch 2 × accumulation 2)


@pytest.mark.parametrize("name", ["fed_feddpa_llama2_7b.yaml", "fed_feddpa_het_llama2_7b.yaml"])
def test_federated_paper_configs_train_a_client(name, feddpa_dir, tiny_model, tmp_path) -> None:
    from asymlora.federated.client import local_only_baseline
    from asymlora.federated.config import load_fed_config
    from asymlora.federated.partition import client_tasks, load_partition

    path = _yaml_with_paths(name, None, feddpa_dir, tmp_path)
    shipped = load_fed_config(path)
    assert (shipped.clients.num, shipped.rounds, shipped.train.lr, shipped.data.max_length) == (
        8,
        11,
        5e-4,
        512,
    )
    data = yaml.safe_load(path.read_text())["data"]["tasks"][:2]
    ranks = ["clients.ranks=[4,2]", "adapter.intermediate_rank=4"] if shipped.clients.ranks else []
    cfg = load_fed_config(path, [f"model.name={tiny_model}", "clients.num=2", f"data.tasks={json.dumps(data)}",
                                 "rounds=1", "train.local_steps=2", "train.batch_size=2", "eval.max_new_tokens=6",
                                 "simulation.num_gpus=0", "simulation.gpus_per_client=0", *ranks])  # fmt: skip
    tasks, plan = load_partition(cfg)
    rank = cfg.clients.ranks[1] if cfg.clients.ranks else cfg.adapter.r
    result = local_only_baseline(cfg, 1, rank, client_tasks(tasks, plan[1]))
    scores = result["personalised"]["per_task"]["entailment"]
    assert set(scores) >= {"flan_rouge1", "flan_rougeL", "exact_match"} and result["rank"] == rank


def test_new_config_keys_are_checked(tmp_path) -> None:
    with pytest.raises(ConfigError, match="train.epochs=0.0 must be positive"):
        load_config(None, ["data.tasks=[json:x]", "train.epochs=0"])
    # checkpointing with task routing is allowed: the recomputed layers see the task ids (tests/test_train.py)
    cfg = load_config(
        None, ["data.tasks=[json:x]", "model.gradient_checkpointing=true", "adapter.router=task"]
    )
    assert cfg.model.gradient_checkpointing and cfg.adapter.router == "task"
    from asymlora.federated.config import load_fed_config

    with pytest.raises(ConfigError, match="gpus_per_client=2.0 with simulation.num_gpus=1"):
        load_fed_config(None, ["data.tasks=[json:x]", "clients.num=1", "simulation.num_gpus=1",
                               "simulation.gpus_per_client=2"])  # fmt: skip


@pytest.mark.fed
def test_heterogeneous_federated_paper_config_runs_in_simulation(feddpa_dir, tiny_model, tmp_path) -> None:
    import argparse

    from asymlora.federated.run import main

    path = _yaml_with_paths("fed_feddpa_het_llama2_7b.yaml", None, feddpa_dir, tmp_path)
    data = yaml.safe_load(path.read_text())["data"]["tasks"][:2]
    overrides = [f"model.name={tiny_model}", "clients.num=2", f"data.tasks={json.dumps(data)}", "rounds=1",
                 "clients.ranks=[4,2]", "adapter.intermediate_rank=4", "train.local_steps=1", "train.batch_size=2",
                 "eval.max_new_tokens=4", "simulation.num_cpus=2", "simulation.num_gpus=0",
                 "simulation.gpus_per_client=0", "timeouts.wait_nodes=300", f"run_dir={tmp_path / 'run'}"]  # fmt: skip
    assert main(argparse.Namespace(config=str(path), overrides=overrides, resume=False, overwrite=False)) == 0
    for strategy in ("zeropad", "fedalora-het"):
        res = json.loads((tmp_path / "run" / strategy / "results.json").read_text())
        assert res["ranks"] == [4, 2] and len(res["clients"]) == 2
        assert '"flan_rouge1"' in json.dumps(res)  # clients scored by the paper's ROUGE


def test_4bit_base_loads_quantised_and_trains(llm_root, tmp_path) -> None:
    pytest.importorskip("bitsandbytes")
    from asymlora.models import load
    from asymlora.recipes.multitask import run

    tiny_model = tmp_path / "model"  # hidden 64: bitsandbytes' CPU 4-bit decoding needs rows of >= 64 weights
    tokenizer = make_char_tokenizer()
    make_tiny_llama(vocab_size=len(tokenizer), hidden=64, layers=2).save_pretrained(tiny_model)
    tokenizer.save_pretrained(tiny_model)
    model, _ = load(str(tiny_model), device="cpu", load_in_4bit=True)
    assert type(model.model.layers[0].self_attn.q_proj.weight).__name__ == "Params4bit"
    cfg = _config("commonsense_llama3_8b.yaml", llm_root, None, tmp_path, [f"model.name={tiny_model}",
                  "model.load_in_4bit=true", f"run_dir={tmp_path / 'run'}", "train.epochs=1",
                  "eval.max_new_tokens=4", "compare.methods=[alora]", "data.max_test=2", *TINY,
                  f"data.tasks=[llm-adapters:{llm_root}/ft-training_set/commonsense_170k.json#piqa]"])  # fmt: skip
    results = run(cfg, quiet=True)["methods"]["alora"]
    assert results["steps"] == 1 and math.isfinite(results["final_loss"])  # 3 rows, 2 × 2 per step
    assert results["per_task"]["piqa"]["n"] == 2.0
