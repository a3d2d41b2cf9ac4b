"""Evaluation: option log-likelihood scoring, greedy generation, metrics, summaries, table and chart."""

from __future__ import annotations

import math

import peft
import pytest
import torch
import torch.nn.functional as F
from tests.conftest import make_char_tokenizer, make_tiny_llama

import asymlora
from asymlora.data import Example, Task, format_prompt, tokenize_prompt_answer
from asymlora.eval import (
    evaluate_task,
    evaluate_tasks,
    exact_match,
    format_table,
    greedy_generate,
    normalize_answer,
    option_loglikelihoods,
    plot_results,
    primary_metric,
    rouge_scores,
    summarize,
)


@pytest.fixture(scope="module")
def tok():
    """Character tokenizer with pad = eos, as SmolLM2's (no BOS added)."""
    return make_char_tokenizer(pad_token="</s>")


@pytest.fixture(scope="module")
def model(tok):
    return make_tiny_llama(seed=0, vocab_size=len(tok))


def choice_examples() -> list[Example]:
    return [
        Example(prompt="Question: Is the sky blue?", target="yes", options=["yes", "no"]),
        Example(
            prompt="Question: Pick a fruit.", target="apple", options=["apple", "stone", "a very long rock"]
        ),
        Example(prompt="Question: 2+2?", target="4", options=["3", "4", "22", "five"]),
        Example(prompt="A longer instruction line.\n\nQuestion: Which one?", target="b", options=["a", "b"]),
        Example(prompt="Question: Colour of grass?", target="green", options=["green", "red"]),
        # the cue ends in a newline, so no space is added: every option is a single token
        Example(prompt="Question: Letter?", target="b", options=["a", "b", "c"], answer_prefix="\nAnswer:\n"),
    ]


def single_token_examples() -> list[Example]:
    return [
        Example(prompt="Question: Letter?", target="b", options=["a", "b", "c"], answer_prefix="\nAnswer:\n"),
        Example(
            prompt="Question: Digit, longer?", target="1", options=["1", "2"], answer_prefix="\nAnswer:\n"
        ),
    ]


def generate_examples() -> list[Example]:
    return [
        Example(prompt="Question: Say hi.", target="hi"),
        Example(prompt="A much longer prompt here.\n\nQuestion: Say the word cat please.", target="cat"),
        Example(prompt="Question: x?", target="y", references=["y", "z"]),
        Example(prompt="Question: What is one plus one, in words?", target="two"),
    ]


# --------------------------------------------------------------------------- option log-likelihood


def hand_score(model, tok, example: Example, option: str) -> float:
    prompt_ids, answer_ids = tokenize_prompt_answer(tok, format_prompt(example), option)
    answer_ids = answer_ids[:-1]  # without the eos
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        logprobs = F.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return sum(float(logprobs[len(prompt_ids) + k - 1, t]) for k, t in enumerate(answer_ids))


@pytest.mark.parametrize("share_prompt", [True, False])
@pytest.mark.parametrize("which", ["mixed", "single_token"])
def test_option_scores_match_hand_computation(model, tok, share_prompt, which) -> None:
    examples = choice_examples() if which == "mixed" else single_token_examples()
    scores = option_loglikelihoods(
        model, tok, examples, task_id=None, batch_size=8, share_prompt=share_prompt
    )
    assert [len(row) for row in scores] == [len(e.options) for e in examples]
    for example, row in zip(examples, scores, strict=True):
        for option, value in zip(example.options, row, strict=True):
            assert value == pytest.approx(hand_score(model, tok, example, option), abs=1e-4)
            assert value < 0


def test_option_scores_do_not_count_eos(model, tok) -> None:
    example = choice_examples()[0]
    prompt_ids, answer_ids = tokenize_prompt_answer(tok, format_prompt(example), "yes")
    assert answer_ids[-1] == tok.eos_token_id and len(answer_ids) == len(" yes") + 1
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        logprobs = F.log_softmax(model(input_ids=ids).logits[0], dim=-1)
    with_eos = sum(float(logprobs[len(prompt_ids) + k - 1, t]) for k, t in enumerate(answer_ids))
    score = option_loglikelihoods(model, tok, [example], task_id=None, batch_size=1)[0][0]
    assert score > with_eos + 1e-3


@pytest.mark.parametrize("share_prompt", [True, False])
def test_batching_and_padding_do_not_change_scores(model, tok, share_prompt) -> None:
    examples = choice_examples()
    one = option_loglikelihoods(model, tok, examples, task_id=None, batch_size=1, share_prompt=share_prompt)
    four = option_loglikelihoods(model, tok, examples, task_id=None, batch_size=4, share_prompt=share_prompt)
    other = option_loglikelihoods(
        model, tok, examples, task_id=None, batch_size=4, share_prompt=not share_prompt
    )
    for a, b, c in zip(one, four, other, strict=True):
        assert a == pytest.approx(b, abs=1e-5)
        assert a == pytest.approx(c, abs=1e-5)


def test_truncated_prompts_are_scored_as_trained(model, tok) -> None:
    """With max_length the prompt is cut from the left exactly as encode_example cuts it for training."""
    from asymlora.data import encode_example

    example = choice_examples()[1]  # options of different lengths: the prompt is cut differently per option
    scores = option_loglikelihoods(model, tok, [example], task_id=None, batch_size=4, max_length=24)[0]
    for option, value in zip(example.options, scores, strict=True):
        as_target = Example(prompt=example.prompt, target=option, options=example.options)
        encoded = encode_example(tok, as_target, 24)
        ids = torch.tensor([encoded["input_ids"]])
        n_prompt = encoded["labels"].count(-100)
        with torch.no_grad():
            logprobs = F.log_softmax(model(input_ids=ids).logits[0], dim=-1)
        answer = encoded["input_ids"][n_prompt:-1]
        expected = sum(float(logprobs[n_prompt + k - 1, t]) for k, t in enumerate(answer))
        assert len(encoded["input_ids"]) == 24 and value == pytest.approx(expected, abs=1e-4)


def test_scoring_without_logits_to_keep(model, tok) -> None:
    """A model whose forward has no ``logits_to_keep`` is scored on its full logits, with the same result."""

    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    examples = choice_examples()
    direct = option_loglikelihoods(model, tok, examples, task_id=None, batch_size=4)
    wrapped = option_loglikelihoods(Wrapped(model), tok, examples, task_id=None, batch_size=4)
    for a, b in zip(direct, wrapped, strict=True):
        assert a == pytest.approx(b, abs=1e-5)


def test_eval_mode_and_training_flag_restored(tok) -> None:
    model = make_tiny_llama(vocab_size=len(tok))
    model.train()
    option_loglikelihoods(model, tok, choice_examples()[:1], task_id=None, batch_size=2)
    assert model.training


def task_routed_model(tok):
    base = make_tiny_llama(seed=1, vocab_size=len(tok))
    cfg = asymlora.AsymLoraConfig(
        method="alora", router="task", num_experts=2, target_modules=["q_proj", "v_proj"]
    )
    pm = peft.get_peft_model(base, cfg)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in pm.named_parameters():
            if "asymlora_B" in name:
                param.normal_(0.0, 0.5)
    return pm


def test_task_routed_adapter_gets_its_task_ids(tok) -> None:
    pm = task_routed_model(tok)
    examples = choice_examples()[:3]
    zero = option_loglikelihoods(pm, tok, examples, task_id=0, batch_size=4)
    one = option_loglikelihoods(pm, tok, examples, task_id=1, batch_size=4)
    diffs = [abs(a - b) for ra, rb in zip(zero, one, strict=True) for a, b in zip(ra, rb, strict=True)]
    assert max(diffs) > 1e-3
    # each matches a hand computation with the task's ids
    example, option = examples[1], examples[1].options[2]
    prompt_ids, answer_ids = tokenize_prompt_answer(tok, format_prompt(example), option)
    ids = torch.tensor([prompt_ids + answer_ids[:-1]])
    for task_id, scores in ((0, zero), (1, one)):
        with torch.no_grad():
            logits = pm(input_ids=ids, task_ids=torch.tensor([task_id])).logits[0]
        logprobs = F.log_softmax(logits, dim=-1)
        expected = sum(float(logprobs[len(prompt_ids) + k - 1, t]) for k, t in enumerate(answer_ids[:-1]))
        assert scores[1][2] == pytest.approx(expected, abs=1e-4)
    unshared = option_loglikelihoods(pm, tok, examples, task_id=1, batch_size=4, share_prompt=False)
    for a, b in zip(one, unshared, strict=True):
        assert a == pytest.approx(b, abs=1e-5)
    # the same task id gives the same scores batched or not
    zero_one_by_one = option_loglikelihoods(pm, tok, examples, task_id=0, batch_size=1)
    for a, b in zip(zero, zero_one_by_one, strict=True):
        assert a == pytest.approx(b, abs=1e-5)
    with pytest.raises(ValueError, match="task_ids"):
        option_loglikelihoods(pm, tok, examples, task_id=None, batch_size=4)
    with pytest.raises(ValueError, match="outside"):
        option_loglikelihoods(pm, tok, examples, task_id=2, batch_size=4)
    gen0 = greedy_generate(pm, tok, generate_examples()[:2], task_id=0, batch_size=2, max_new_tokens=6)
    gen1 = greedy_generate(pm, tok, generate_examples()[:2], task_id=1, batch_size=2, max_new_tokens=6)
    assert len(gen0) == len(gen1) == 2


def test_task_id_refused_by_plain_model(model, tok) -> None:
    with pytest.raises(ValueError, match="does not take task_ids"):
        option_loglikelihoods(model, tok, choice_examples(), task_id=0, batch_size=2)
    with pytest.raises(ValueError, match="no options"):
        option_loglikelihoods(model, tok, generate_examples(), task_id=None, batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        option_loglikelihoods(model, tok, choice_examples(), task_id=None, batch_size=0)


# --------------------------------------------------------------------------- generation


def peaky_model(tok):
    """A tiny model with large random weights, so its greedy output depends on the prompt."""
    model = make_tiny_llama(seed=0, vocab_size=len(tok))
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.3)
    return model


def test_left_padded_generation_matches_one_by_one(tok) -> None:
    examples = generate_examples()
    model = peaky_model(tok)
    tok.padding_side = "right"
    batched = greedy_generate(model, tok, examples, task_id=None, batch_size=4, max_new_tokens=8)
    single = [
        greedy_generate(model, tok, [example], task_id=None, batch_size=1, max_new_tokens=8)[0]
        for example in examples
    ]
    assert batched == single
    assert tok.padding_side == "right"
    assert len(set(batched)) == len(batched) and all(batched)  # prompt-dependent, non-empty


def steered_model(tok, letter: str = "z"):
    """A tiny model forced to answer ``letter`` and then eos, whatever the prompt."""
    model = make_tiny_llama(vocab_size=len(tok))
    target, eos = tok.convert_tokens_to_ids(letter), tok.eos_token_id

    def remember(module, args, kwargs):
        module.last_ids = kwargs["input_ids"][:, -1]

    def steer(module, args, kwargs, output):
        pick = torch.where(module.last_ids == target, eos, target)
        forced = torch.full_like(output.logits[:, -1], -1e4)
        output.logits[:, -1] = forced.scatter(-1, pick[:, None], 0.0)
        return output

    model.register_forward_pre_hook(remember, with_kwargs=True)
    model.register_forward_hook(steer, with_kwargs=True)
    return model


def test_generation_decodes_only_new_tokens_and_stops_at_eos(tok) -> None:
    model = steered_model(tok)
    out = greedy_generate(model, tok, generate_examples(), task_id=None, batch_size=3, max_new_tokens=5)
    assert out == ["z"] * 4
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_generate(model, tok, generate_examples(), task_id=None, batch_size=3, max_new_tokens=0)


# --------------------------------------------------------------------------- evaluate_task


def test_evaluate_task_choice_and_generate(model, tok) -> None:
    choice = Task("c", "choice", train=choice_examples()[:1], test=choice_examples(), metrics=["accuracy"])
    result = evaluate_task(model, tok, choice, task_id=None, batch_size=4)
    assert set(result) == {"accuracy", "n"} and result["n"] == 6.0
    scores = option_loglikelihoods(model, tok, choice_examples(), task_id=None, batch_size=4)
    expected = sum(
        max(range(len(row)), key=row.__getitem__) == ex.answer_index
        for ex, row in zip(choice_examples(), scores, strict=True)
    )
    assert result["accuracy"] == pytest.approx(expected / 6)
    assert evaluate_task(model, tok, choice, task_id=None, max_examples=2)["n"] == 2.0

    gen = Task(
        "g",
        "generate",
        train=generate_examples()[:1],
        test=generate_examples(),
        metrics=["exact_match", "rouge"],
    )
    result = evaluate_task(model, tok, gen, task_id=None, batch_size=2, max_new_tokens=4)
    assert set(result) == {"exact_match", "rouge1", "rouge2", "rougeL", "rougeLsum", "n"}
    assert all(0.0 <= v <= 1.0 for k, v in result.items() if k != "n")
    gen_em = Task(
        "g2", "generate", train=generate_examples()[:1], test=generate_examples(), metrics=["exact_match"]
    )
    assert set(evaluate_task(model, tok, gen_em, task_id=None, max_new_tokens=2)) == {"exact_match", "n"}

    both = evaluate_tasks(model, tok, [choice, gen_em], max_new_tokens=2, max_examples=2)
    assert list(both) == ["c", "g2"] and both["c"]["n"] == 2.0


def test_evaluate_task_exact_match_with_a_steered_model(tok) -> None:
    """A model that always answers "z" matches references "z" and "The Z." and no other."""
    test = [
        Example(prompt="Question: one?", target="z"),
        Example(prompt="Question: two?", target="The Z."),
        Example(prompt="Question: three?", target="q", references=["q", "z!"]),
        Example(prompt="Question: four?", target="y"),
    ]
    task = Task("z", "generate", train=test[:1], test=test, metrics=["exact_match", "rouge"])
    result = evaluate_task(steered_model(tok), tok, task, task_id=None, batch_size=2, max_new_tokens=4)
    assert result["exact_match"] == pytest.approx(0.75) and result["n"] == 4.0
    assert result["rouge1"] == pytest.approx((1 + 2 / 3 + 1 + 0) / 4)  # "the z" vs "z": F1 = 2/3


def test_choice_accuracy_accepts_any_best_reference(tok, monkeypatch) -> None:
    """An example with two right options counts the argmax as right when it is either of them."""
    import asymlora.eval.scoring as scoring

    examples = [
        Example(prompt="Q: a", target="x", options=["x", "y", "w"], references=["x", "y"]),
        Example(prompt="Q: b", target="x", options=["x", "y"]),
    ]
    monkeypatch.setattr(scoring, "option_loglikelihoods", lambda *a, **k: [[-2.0, -1.0, -3.0], [-2.0, -1.0]])
    task = Task("multi", "choice", train=examples[:1], test=examples, metrics=["accuracy"])
    assert evaluate_task(None, tok, task, task_id=None) == {"accuracy": 0.5, "n": 2.0}


# --------------------------------------------------------------------------- metrics


@pytest.mark.parametrize(
    ("prediction", "references", "expected"),
    [
        ("The Cat.", ["cat"], 1.0),
        ("  an   apple ", ["Apple"], 1.0),
        ("a dog", ["the cat", "A dog!"], 1.0),
        ("dogs", ["dog"], 0.0),
        ("Paris, France", "paris france", 1.0),
        ("", ["the"], 1.0),
        ("theory", ["ory"], 0.0),
        ("42", ["42.", "forty-two"], 1.0),
    ],
)
def test_exact_match(prediction, references, expected) -> None:
    assert exact_match(prediction, references) == expected


def test_normalize_answer() -> None:
    assert normalize_answer("  The  QUICK, brown fox!  ") == "quick brown fox"
    assert normalize_answer("An a the") == ""
    assert normalize_answer("there is an anteater") == "there is anteater"
    with pytest.raises(ValueError):
        exact_match("x", [])


def test_rouge_scores() -> None:
    perfect = rouge_scores(["the cat sat on the mat"], [["the cat sat on the mat"]])
    assert perfect == pytest.approx({"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0, "rougeLsum": 1.0})
    best_ref = rouge_scores(["the cats sat"], [["dogs ran", "the cat sat"]])  # stemming: cats -> cat
    assert best_ref["rouge1"] == pytest.approx(1.0)
    none = rouge_scores(["alpha"], ["beta"])
    assert none == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0, "rougeLsum": 0.0}
    mean = rouge_scores(["a b", "c d"], ["a b", "x y"])
    assert mean["rouge1"] == pytest.approx(0.5)
    assert rouge_scores([], []) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0, "rougeLsum": 0.0}
    with pytest.raises(ValueError):
        rouge_scores(["a"], [])


def test_primary_metric() -> None:
    assert primary_metric("choice") == "accuracy"
    assert primary_metric("generate") == "exact_match"
    assert primary_metric(["exact_match", "rouge"]) == "exact_match"
    assert primary_metric(["rouge"]) == "rougeL"
    assert primary_metric("rouge2") == "rouge2"
    task = Task("t", "choice", choice_examples()[:1], choice_examples()[1:], ["accuracy"])
    assert primary_metric(task) == "accuracy"
    assert primary_metric(["bleu", "exact_match"]) == "bleu"
    assert primary_metric("rougeLsum") == "rougeLsum"
    with pytest.raises(ValueError, match="unknown"):
        primary_metric("bleurt")
    with pytest.raises(ValueError):
        primary_metric([])


# --------------------------------------------------------------------------- report


PER_TASK = {
    "a": {"accuracy": 0.8, "n": 10.0},
    "b": {"exact_match": 0.4, "rouge1": 0.6, "n": 10.0},
    "c": {"accuracy": 0.6, "n": 10.0},
}
PRIMARY = {"a": "accuracy", "b": "exact_match", "c": "accuracy"}


def test_summarize_hand_computed() -> None:
    summary = summarize(PER_TASK, PRIMARY, None)
    assert summary["average"] == pytest.approx(0.6)
    assert summary["std"] == pytest.approx(math.sqrt((0.04 + 0.04 + 0.0) / 3))
    assert summary["worst"] == {"task": "b", "value": pytest.approx(0.4)}
    assert summary["delta_m"] is None
    baselines = {"a": 1.0, "b": 0.5, "c": 0.5}
    # (1.0-0.8)/1.0 = 0.2; (0.5-0.4)/0.5 = 0.2; (0.5-0.6)/0.5 = -0.2 → mean 0.0667 → 6.667 %
    assert summarize(PER_TASK, PRIMARY, baselines)["delta_m"] == pytest.approx(100 * (0.2 + 0.2 - 0.2) / 3)
    zero = summarize(PER_TASK, PRIMARY, {"a": 1.0, "b": 0.0, "c": 0.5})
    assert zero["delta_m"] == pytest.approx(100 * (0.2 - 0.2) / 2)
    assert any("'b'" in note for note in zero["notes"])
    assert summarize(PER_TASK, PRIMARY, {"b": 0.0})["delta_m"] is None
    # rougeL as the configured primary metric; a missing primary entry falls back to what is present
    rouge = summarize({"b": PER_TASK["b"] | {"rougeL": 0.3}}, {"b": "rouge"})
    assert rouge["worst"]["value"] == pytest.approx(0.3)
    assert summarize({"a": PER_TASK["a"]}, {})["average"] == pytest.approx(0.8)
    with pytest.raises(ValueError, match="primary metric"):
        summarize({"b": PER_TASK["b"]}, {"b": "accuracy"})


def test_table_and_chart(tmp_path) -> None:
    rows = {
        "base": {"a": {"accuracy": 0.5}, "b": {"exact_match": 0.1}, "c": {"accuracy": 0.3}},
        "lora": PER_TASK,
        "alora": {"a": {"accuracy": 0.9}, "b": {"exact_match": 0.5}},
    }
    table = format_table(rows, PRIMARY, ["a", "b", "c"], baselines={"a": 1.0, "b": 0.5, "c": 0.5})
    lines = table.splitlines()
    header = "| method | a (accuracy) | b (exact_match) | c (accuracy) | mean of mixed metrics | std | worst | Δm% |"
    assert lines[0] == header
    lora = next(line for line in lines if line.startswith("| lora "))
    assert "| 0.800 | 0.400 | 0.600 | 0.600 |" in lora and "0.400 (b)" in lora and "| 6.7 |" in lora
    alora = next(line for line in lines if line.startswith("| alora "))
    assert "| – |" in alora  # task c missing
    assert "exact_match" in table
    no_baseline = format_table(rows, PRIMARY, ["a", "b", "c"])
    assert next(line for line in no_baseline.splitlines() if line.startswith("| base ")).endswith("| – |")

    path = plot_results(rows, PRIMARY, tmp_path / "sub" / "chart.png")
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_plot_results_replaces_the_chart_whole_or_not_at_all(tmp_path, monkeypatch) -> None:
    """A chart write that dies half-way (killed, disk full) leaves the previous chart, not a truncated PNG."""
    from matplotlib.figure import Figure

    rows = {"lora": {"a": {"accuracy": 0.8}, "b": {"exact_match": 0.4}}}
    path = plot_results(rows, PRIMARY, tmp_path / "results.png")
    before = path.read_bytes()

    def dies_half_way(self, fname, *args, **kwargs):
        with open(fname, "wb") as f:
            f.write(before[:100])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", dies_half_way)
    with pytest.raises(OSError, match="No space left"):
        plot_results(rows, PRIMARY, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["results.png"]


# --------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_smollm2_gets_obvious_choices_right_and_generates() -> None:
    from asymlora.models import load

    model, tokenizer = load("smollm2-135m")
    examples = [
        Example(
            prompt="Question: What is the capital of France?", target="Paris", options=["banana", "Paris"]
        ),
        Example(
            prompt="Question: What colour is the sky on a clear day?",
            target="blue",
            options=["blue", "potato"],
        ),
        Example(prompt="Question: What do bees make?", target="honey", options=["concrete", "honey"]),
        Example(prompt="Question: Which animal barks?", target="dog", options=["dog", "spoon"]),
    ]
    task = Task("obvious", "choice", train=examples[:1], test=examples, metrics=["accuracy"])
    result = evaluate_task(model, tokenizer, task, task_id=None, batch_size=8)
    assert result == {"accuracy": 1.0, "n": 4.0}, result
    plain = option_loglikelihoods(model, tokenizer, examples, task_id=None, batch_size=8, share_prompt=False)
    shared = option_loglikelihoods(model, tokenizer, examples, task_id=None, batch_size=3)
    for a, b in zip(plain, shared, strict=True):
        assert a == pytest.approx(b, abs=1e-3)
    questions = [
        # without a cue the instruct model closes its turn at once after "Answer:" for this one
        Example(
            prompt="Question: What is the capital of France?",
            target="Paris",
            answer_prefix="\nAnswer: The capital of France is",
        ),
        Example(prompt="Question: Name a colour.", target="red"),
    ]
    texts = greedy_generate(model, tokenizer, questions, task_id=None, batch_size=2, max_new_tokens=8)
    assert all(text.strip() for text in texts), texts
    assert "paris" in texts[0].lower(), texts
    single = [
        greedy_generate(model, tokenizer, [q], task_id=None, batch_size=1, max_new_tokens=8)[0]
        for q in questions
    ]
    assert single == texts
    generate_task = Task("qa", "generate", train=questions[:1], test=questions, metrics=["exact_match"])
    # completions "Paris.\n\nQuestion: ..." and "Red\n\n...": first line, normalised -> both right
    assert evaluate_task(model, tokenizer, generate_task, task_id=None, max_new_tokens=8) == {
        "exact_match": 1.0,
        "n": 2.0,
    }
