"""`asymlora serve`: concurrent requests of different tasks batch into one forward and equal per-task generate.

A tiny task-routed ALoRA (random B, so each task's output differs) is served by uvicorn on a real
127.0.0.1 socket; an httpx client sends concurrent requests. The references are plain ``model.generate``
calls, one prompt and one task at a time, never the server's own batching code.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import socket
import stat
import threading
import time

import httpx
import peft
import pytest
import torch
import uvicorn

import asymlora
from asymlora import serve
from conftest import make_char_tokenizer, make_tiny_llama

TASKS = ["sst", "qa", "sum"]
PROMPTS = ["hello there", "Q: who? A:", "x", "a rather longer prompt to pad the others"]
MAX_TOKENS = 6


def _free_port() -> int:
    for port in range(19300, 19400):
        with contextlib.closing(socket.socket()) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free port in 19300-19399")


def _routed_model(router: str = "task", save_base_to=None):
    """A tiny ALoRA with random B (and router); ``save_base_to``: also save the base and its tokenizer."""
    tokenizer = make_char_tokenizer()
    base = make_tiny_llama(vocab_size=len(tokenizer))  # every generated id decodes to a character
    if save_base_to is not None:
        base.save_pretrained(save_base_to)
        tokenizer.save_pretrained(save_base_to)
    cfg = asymlora.AsymLoraConfig(
        method="alora",
        router=router,
        num_experts=3,
        task_names=TASKS if router == "task" else None,
        target_modules=["q_proj", "v_proj"],
    )
    model = peft.get_peft_model(base, cfg)
    with torch.no_grad():
        for p in asymlora.parameters_by_role(model, "B").values():
            p.normal_(std=1.0, generator=torch.Generator().manual_seed(p.numel()))
        for name, p in model.named_parameters():
            if "router" in name:
                p.normal_(std=1.0, generator=torch.Generator().manual_seed(5))
    return model.eval(), cfg


def _reference(model, tokenizer, prompt: str, task: int | None, max_tokens: int = MAX_TOKENS) -> str:
    """One prompt, one task, stock ``generate``: new tokens up to EOS, decoded."""
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    kwargs = {} if task is None else {"task_ids": torch.tensor([task])}
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **kwargs,
        )
    new = out[0, ids.shape[1] :].tolist()
    if tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id)]
    return tokenizer.decode(new, skip_special_tokens=True)


@contextlib.contextmanager
def _running(app):
    """uvicorn serving ``app`` on 127.0.0.1:<free port> in a thread; yields the base URL."""
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def routed_server():
    model, cfg = _routed_model()
    tokenizer = make_char_tokenizer()
    served = serve.ServedModel(model, tokenizer, serve.served_names(cfg, "unused"), max_positions=256)
    app = serve.create_app(served, max_batch_size=16, max_wait_ms=300, max_tokens=32)
    with _running(app) as url:
        yield url, app, model, tokenizer


def test_concurrent_requests_of_different_tasks_share_one_batch_and_equal_generate(routed_server) -> None:
    url, app, model, tokenizer = routed_server
    requests = [(task, prompt) for prompt in PROMPTS for task in TASKS]

    async def send_all():
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            body = [{"model": t, "prompt": p, "max_tokens": MAX_TOKENS} for t, p in requests]
            return await asyncio.gather(*(client.post("/v1/completions", json=b) for b in body))

    before = len(app.state.batcher.batch_tasks)
    responses = asyncio.run(send_all())
    for (task, prompt), response in zip(requests, responses, strict=True):
        assert response.status_code == 200, response.text
        data = response.json()
        assert data["object"] == "text_completion" and data["model"] == task
        choice = data["choices"][0]
        assert choice["text"] == _reference(model, tokenizer, prompt, TASKS.index(task)), (task, prompt)
        assert choice["text"], "an empty completion would compare equal whatever the routing"
        assert data["usage"]["prompt_tokens"] == len(tokenizer(prompt)["input_ids"])
    # the tasks really route differently (a server that ignored `model` would fail the equalities above)
    per_task = {t: tuple(_reference(model, tokenizer, p, i) for p in PROMPTS) for i, t in enumerate(TASKS)}
    assert len(set(per_task.values())) == len(TASKS), per_task
    batches = app.state.batcher.batch_tasks[before:]
    assert sum(len(b) for b in batches) == len(requests)
    assert max(len(set(b)) for b in batches) == len(TASKS), batches  # several tasks in one forward


def test_a_list_prompt_gives_one_choice_per_prompt_and_models_lists_the_tasks(routed_server) -> None:
    url, _, model, tokenizer = routed_server
    with httpx.Client(base_url=url, timeout=120) as client:
        listed = client.get("/v1/models").json()
        data = client.post(
            "/v1/completions", json={"model": "qa", "prompt": PROMPTS[:2], "max_tokens": 4}
        ).json()
    assert [m["id"] for m in listed["data"]] == TASKS
    assert [c["index"] for c in data["choices"]] == [0, 1]
    for choice, prompt in zip(data["choices"], PROMPTS[:2], strict=True):
        assert choice["text"] == _reference(model, tokenizer, prompt, 1, max_tokens=4)
        assert choice["finish_reason"] in ("stop", "length")


def test_an_unknown_route_or_method_gets_an_openai_error_body(routed_server) -> None:
    """OpenAI clients read error.message; FastAPI's default body is {"detail": "Not Found"}."""
    url = routed_server[0]
    with httpx.Client(base_url=url, timeout=60) as client:
        missing = client.post("/v1/chat/completions", json={"model": "qa", "messages": []})
        wrong = client.get("/v1/completions")
    assert missing.status_code == 404 and wrong.status_code == 405
    says = "Not Found: POST /v1/chat/completions; this server answers POST /v1/completions"
    assert missing.json()["error"]["message"].startswith(says)
    assert wrong.json()["error"]["message"].startswith("Method Not Allowed: GET /v1/completions")
    assert wrong.headers["allow"] == "POST"


def test_stop_cuts_the_text_and_null_max_tokens_and_n_are_the_defaults(routed_server) -> None:
    url, _, model, tokenizer = routed_server
    full = _reference(model, tokenizer, PROMPTS[0], 0, max_tokens=16)
    assert len(full) >= 2
    stop = full[1]
    with httpx.Client(base_url=url, timeout=120) as client:
        plain = client.post(
            "/v1/completions", json={"model": "sst", "prompt": PROMPTS[0], "max_tokens": None, "n": None}
        )  # OpenAI's API allows null for both (16 tokens, one choice); "n": null was a 400
        cut = client.post("/v1/completions", json={"model": "sst", "prompt": PROMPTS[0], "stop": [stop]})
    assert plain.json()["choices"][0]["text"] == full
    assert cut.json()["choices"][0]["text"] == full[: full.index(stop)]
    assert cut.json()["choices"][0]["finish_reason"] == "stop"
    # one character = one token here: the tokens counted end with the one that completes the stop string
    # (OpenAI and vLLM stop there), not the 16 this server generated before cutting the text
    assert plain.json()["usage"]["completion_tokens"] == len(full)
    assert cut.json()["usage"]["completion_tokens"] == full.index(stop) + 1


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"model": "nope", "prompt": "hi"}, 404, "'nope' does not exist"),
        ({"model": "qa", "prompt": "hi", "max_tokens": 10_000}, 400, "max_tokens=10000"),
        ({"model": "qa", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens=0"),
        ({"model": "qa", "prompt": "y" * 250, "max_tokens": 20}, 400, "maximum context length is 256"),
        ({"model": "qa", "prompt": "hi", "temperature": 0.7}, 400, "temperature=0.7"),
        ({"model": "qa", "prompt": "hi", "stream": True}, 400, "stream=True"),
        ({"model": "qa", "prompt": "hi", "n": 2}, 400, "n=2 is not supported"),
        ({"model": "qa", "prompt": "hi", "logit_bias": {"5": 100}}, 400, "logit_bias={'5': 100.0}"),
        ({"model": "qa", "prompt": "hi", "suffix": "!"}, 400, "suffix='!'"),
        # penalties change greedy tokens: refused, not ignored (they were answered 200 without them)
        (
            {"model": "qa", "prompt": "hi", "presence_penalty": 1.0},
            400,
            "presence_penalty=1.0 is not supported",
        ),
        ({"model": "qa", "prompt": "hi", "frequency_penalty": -0.5}, 400, "frequency_penalty=-0.5"),
        ({"model": "qa"}, 400, "prompt"),
        ({"model": "qa", "prompt": [1, 2, 3]}, 400, "prompt"),
        (b'{"model": "qa", "prompt": ', 400, "invalid request body"),
    ],
)
def test_bad_requests_get_4xx_with_a_message_and_the_server_keeps_serving(
    routed_server, body, status, says
) -> None:
    url, _, model, tokenizer = routed_server
    with httpx.Client(base_url=url, timeout=120) as client:
        if isinstance(body, bytes):
            bad = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
        else:
            bad = client.post("/v1/completions", json=body)
        good = client.post("/v1/completions", json={"model": "sum", "prompt": "ok", "max_tokens": 3})
    assert bad.status_code == status, bad.text
    assert says in bad.json()["error"]["message"]
    assert good.status_code == 200
    assert good.json()["choices"][0]["text"] == _reference(model, tokenizer, "ok", 2, max_tokens=3)


def test_a_soft_routed_adapter_is_served_under_its_name_without_task_ids(tmp_path) -> None:
    from fastapi.testclient import TestClient

    model, _ = _routed_model(router="soft", save_base_to=tmp_path / "base")
    tokenizer = make_char_tokenizer()
    model.save_pretrained(tmp_path / "mixture")
    served = serve.load_served_model(tmp_path / "mixture", base_model=str(tmp_path / "base"))
    assert served.names == {"mixture": None}
    with TestClient(serve.create_app(served)) as client:
        response = client.post(
            "/v1/completions", json={"model": "mixture", "prompt": PROMPTS[1], "max_tokens": 5}
        )
        unknown = client.post("/v1/completions", json={"model": "qa", "prompt": "hi"})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == _reference(
        model, tokenizer, PROMPTS[1], None, max_tokens=5
    )
    assert unknown.status_code == 404


def test_the_default_served_name_is_the_directory_holding_the_adapter(tmp_path) -> None:
    """`--served-model-name`'s default, as docs/serving.md states it: a run's directory name, a compare run's
    method (its ``run_dir/<method>/adapter``), an adapter directory's own name."""
    model, _ = _routed_model(router="soft", save_base_to=tmp_path / "base")
    model.save_pretrained(tmp_path / "mt_soft" / "adapter")  # a single-method run: run_dir/adapter
    (tmp_path / "mt_soft" / "config.yaml").write_text("data: {tasks: [bigbench:strategyqa]}\n")
    model.save_pretrained(tmp_path / "compare" / "hydralora" / "adapter")  # one method of a compare run
    base = str(tmp_path / "base")
    assert serve.load_served_model(tmp_path / "mt_soft", base_model=base).names == {"mt_soft": None}
    adapter = tmp_path / "compare" / "hydralora" / "adapter"
    assert serve.load_served_model(adapter, base_model=base).names == {"hydralora": None}
    named = serve.load_served_model(tmp_path / "mt_soft", base_model=base, served_model_name="alora-soft")
    assert named.names == {"alora-soft": None}


def test_a_saved_task_routed_adapter_is_served_under_its_task_names(tmp_path) -> None:
    model, _ = _routed_model(save_base_to=tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    served = serve.load_served_model(tmp_path / "adapter", base_model=str(tmp_path / "base"))
    assert served.names == {"sst": 0, "qa": 1, "sum": 2}
    assert served.max_positions == 256


def test_a_task_routed_run_directory_is_served_under_its_task_names(tmp_path) -> None:
    """The CLI's usual input: a run of `asymlora train` (2 steps on a tiny model), served per task."""
    from fastapi.testclient import TestClient

    from asymlora.config import load_config
    from asymlora.recipes.multitask import run

    _routed_model(save_base_to=tmp_path / "model")
    rows = [{"input": f"{i}+1=", "output": str(i + 1), "task": t} for t in ("inc", "echo") for i in range(12)]
    (tmp_path / "tasks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = tmp_path / "tasks.jsonl"
    args = [
        f"model.name={tmp_path / 'model'}", f"data.tasks=[jsonl:{data}#inc, jsonl:{data}#echo]",
        "data.max_train=8", "data.max_test=2", "adapter.r=2", "adapter.router=task", "adapter.num_experts=2",
        "adapter.target_modules=[q_proj,v_proj]", "train.steps=2", "train.batch_size=4", "train.lr=1e-2",
        "train.warmup_steps=0", "eval.base_model=false", "eval.max_new_tokens=2", f"run_dir={tmp_path / 'run'}",
    ]  # fmt: skip
    run(load_config(None, args), quiet=True)
    served = serve.load_served_model(tmp_path / "run")
    names = list(served.names)
    assert len(names) == 2 and served.names == {names[0]: 0, names[1]: 1}
    with TestClient(serve.create_app(served)) as client:
        for name in names:
            reply = client.post("/v1/completions", json={"model": name, "prompt": "7+1=", "max_tokens": 4})
            assert reply.status_code == 200, reply.text
            expected = _reference(served.model, served.tokenizer, "7+1=", served.names[name], max_tokens=4)
            assert reply.json()["choices"][0]["text"] == expected


def test_cli_serve_of_a_missing_path_exits_2_with_one_line(tmp_path, capsys) -> None:
    from asymlora.cli import main

    assert main(["serve", str(tmp_path / "missing"), "--port", "19399"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
    # a file, and a folder that is neither: each named for what it is (were "does not exist", and "not an
    # asymlora run directory (no config.yaml); train one first", with no word of adapter directories)
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    for path, says in [("adapter_config.json", "adapter_config.json is a file; give a run directory or an "
                        "adapter directory"), ("empty", "is neither an adapter directory (no adapter_config.json) "
                        "nor an asymlora run directory (no config.yaml)")]:  # fmt: skip
        assert main(["serve", str(tmp_path / path), "--port", "19399"]) == 2
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("flags", "says"),
    [(["--port", "99999"], "--port 99999 is out of range; give 1..65535"),
     (["--port", "-1"], "--port -1 is out of range"),
     (["--max-tokens", "0"], "--max-tokens 0 is out of range; give >= 1"),
     (["--max-wait-ms", "-5"], "--max-wait-ms -5.0 is out of range; give a finite number >= 0"),
     # inf made a lone request wait for a full batch; NaN passed the check and failed after the model loaded
     (["--max-wait-ms", "inf"], "--max-wait-ms inf is out of range"),
     (["--max-wait-ms", "nan"], "--max-wait-ms nan is out of range"),
     (["--device", "bogus"], "--device 'bogus' is not a torch device")],
)  # fmt: skip
def test_cli_serve_flags_are_checked_before_the_model_loads(tmp_path, capsys, flags, says) -> None:
    from asymlora.cli import main

    assert main(["serve", str(tmp_path / "missing"), *flags]) == 2  # the path is never read
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err and "serving" not in capsys.readouterr().out


def test_cli_serve_refuses_a_taken_port_or_unknown_host_before_the_model_loads(tmp_path, capsys) -> None:
    """Both failed in uvicorn with exit 1, after the model had loaded and 'serving ...' had printed."""
    import socket

    from asymlora.cli import main

    with socket.socket() as held:  # a port another process listens on
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert main(["serve", str(tmp_path / "missing"), "--port", str(port)]) == 2  # the path is never read
        err = capsys.readouterr().err
        assert f"cannot listen on 127.0.0.1:{port}" in err and "give another --port" in err
    assert (
        main(["serve", str(tmp_path / "missing"), "--host", "no-such-host.invalid", "--port", "19398"]) == 2
    )
    err = capsys.readouterr().err
    assert "--host 'no-such-host.invalid' is not an address" in err and "Traceback" not in err
    assert "serving" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("limits", "says"),
    [({"max_batch_size": 0}, "max_batch_size must be"), ({"max_tokens": 0}, "max_tokens must be"),
     ({"max_wait_ms": -1.0}, "max_wait_ms must be"), ({"max_wait_ms": float("inf")}, "finite number"),
     ({"max_wait_ms": float("nan")}, "max_wait_ms must be")],
)  # fmt: skip
def test_server_limits_are_checked(limits, says) -> None:
    served = serve.ServedModel(None, None, {"x": None}, max_positions=16)
    with pytest.raises(ValueError, match=says):
        serve.create_app(served, **limits)


def test_an_exported_adapter_is_readable_by_other_users(tmp_path) -> None:
    """A server running as another user must read the export: 0755 directory, 0644 files (umask 022)."""
    model, _ = _routed_model()
    old = os.umask(0o022)
    try:
        out = asymlora.export_task_adapter(model, "qa", tmp_path / "qa")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    files = sorted(p.name for p in out.iterdir())
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors"] or files == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in out.iterdir())


def test_requests_that_fit_the_context_alone_but_not_together_are_both_answered() -> None:
    """A 60-token prompt wanting 2 tokens and a 2-token prompt wanting 50 each fit a 64-position GPT-2, but
    one left-padded batch runs to 60 + 50 positions: its learned position embedding failed both (500)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = make_char_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=64,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    cfg = asymlora.AsymLoraConfig(
        method="alora", router="task", num_experts=2, task_names=["a", "b"], target_modules=["c_attn"]
    )
    model = peft.get_peft_model(GPT2LMHeadModel(config), cfg).eval()
    with torch.no_grad():
        for p in asymlora.parameters_by_role(model, "B").values():
            p.normal_(std=1.0, generator=torch.Generator().manual_seed(3))
    served = serve.ServedModel(model, tokenizer, serve.served_names(cfg, "unused"), max_positions=64)
    app = serve.create_app(served, max_wait_ms=500, max_tokens=64)
    bodies = [
        {"model": "a", "prompt": "y" * 60, "max_tokens": 2},
        {"model": "b", "prompt": "hi", "max_tokens": 50},
    ]

    async def send_both():
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            return await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))

    with _running(app) as url:
        replies = asyncio.run(send_both())
    assert [len(b) for b in app.state.batcher.batch_tasks] == [2]  # collected together
    for body, reply in zip(bodies, replies, strict=True):
        assert reply.status_code == 200, reply.text
        merged = asymlora.merge_task(copy.deepcopy(model), body["model"])  # that task's plain model
        expected = _reference(merged, tokenizer, body["prompt"], None, max_tokens=body["max_tokens"])
        assert reply.json()["choices"][0]["text"] == expected


@pytest.mark.parametrize(
    ("damage", "says"),
    [("truncated config", "adapter_config.json is not valid JSON"),
     ("config without peft_type", "names no adapter type peft knows (peft_type=None)"),
     ("no weights", "has adapter_config.json but no adapter_model.safetensors")],
)  # fmt: skip
def test_a_half_written_adapter_is_named_by_serve_and_export(tmp_path, capsys, damage, says) -> None:
    """Were a traceback (KeyError 'peft_type'), a bare 'Unterminated string ...' naming no file, and peft's
    hub error 'Repo id must be in the form ...' for the missing weights file."""
    from asymlora.cli import main

    model, _ = _routed_model(save_base_to=tmp_path / "base")
    adapter = tmp_path / "run" / "adapter"
    model.save_pretrained(adapter)
    (tmp_path / "run" / "config.yaml").write_text("data: {tasks: [bigbench:strategyqa]}\n")
    config = adapter / "adapter_config.json"
    if damage == "truncated config":
        config.write_text(config.read_text()[:100])
    elif damage == "config without peft_type":
        config.write_text("{}")
    else:
        (adapter / "adapter_model.safetensors").unlink()
    base = ["--base-model", str(tmp_path / "base"), "--port", str(_free_port())]
    for argv in (
        ["serve", str(adapter), *base],
        ["export", str(tmp_path / "run"), "--task", "qa", "--out", str(tmp_path / "o")],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err, err


def test_export_of_a_task_named_by_digits_takes_the_name_the_server_serves(tmp_path) -> None:
    """Tasks named "7" and "3" are served as "7" and "3"; `asymlora export --task 3` read 3 as an index
    (outside [0, 2)), and `--task 1` exported task "3" under the other name."""
    from safetensors.torch import load_file

    from asymlora.cli import main

    model, _ = _routed_model(save_base_to=tmp_path / "base")
    model.peft_config["default"].task_names = ["7", "3", "5"]
    model.save_pretrained(tmp_path / "run" / "adapter")
    (tmp_path / "run" / "config.yaml").write_text(
        f"model: {{name: {tmp_path / 'base'}}}\ndata: {{tasks: [x]}}\n"
    )
    assert main(["export", str(tmp_path / "run"), "--task", "3", "--out", str(tmp_path / "three")]) == 0
    exported = load_file(tmp_path / "three" / "adapter_model.safetensors")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    a_three = layer.tensors("default")["A"][1]  # task "3" is expert 1 (ALoRA: A_t per task, one B)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    torch.testing.assert_close(exported[key], a_three.detach(), rtol=0, atol=0)


def test_export_refuses_an_out_that_holds_the_run_before_overwriting_it(tmp_path, capsys) -> None:
    """`--out RUN --overwrite` replaced the whole run (adapter, config, results) with one task's export."""
    from asymlora.cli import main

    model, _ = _routed_model(save_base_to=tmp_path / "base")
    run = tmp_path / "run"
    model.save_pretrained(run / "adapter")
    (run / "config.yaml").write_text(f"model: {{name: {tmp_path / 'base'}}}\ndata: {{tasks: [x]}}\n")
    before = sorted(p.relative_to(tmp_path) for p in run.rglob("*"))
    for out in (run, run / "adapter", tmp_path):
        assert main(["export", str(run), "--task", "qa", "--out", str(out), "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert f"--out {out} holds the adapter being exported" in err and "Traceback" not in err, err
    assert sorted(p.relative_to(tmp_path) for p in run.rglob("*")) == before
    file = (
        run / "config.yaml"
    )  # a file on the way: named before the model loads (was '[Errno 17] File exists')
    assert main(["export", str(run), "--task", "qa", "--out", str(file / "qa")]) == 2
    assert f"{file} on the way to it is a file" in capsys.readouterr().err


def test_cli_export_prints_the_rank_vllm_must_allow(tmp_path, capsys) -> None:
    """vLLM refuses a LoRA above --max-lora-rank, and a MALoRA export's rank is r̂ = r + r/2, not adapter.r."""
    from asymlora.cli import main

    tokenizer = make_char_tokenizer()
    base = make_tiny_llama(vocab_size=len(tokenizer))
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    cfg = asymlora.AsymLoraConfig(
        method="malora", router="task", r=8, num_experts=2, target_modules=["q_proj"]
    )
    peft.get_peft_model(base, cfg).save_pretrained(tmp_path / "run" / "adapter")
    (tmp_path / "run" / "config.yaml").write_text(
        f"model: {{name: {tmp_path / 'base'}}}\ndata: {{tasks: [x]}}\n"
    )
    assert main(["export", str(tmp_path / "run"), "--task", "1", "--out", str(tmp_path / "one")]) == 0
    assert f"wrote a standard peft LoRA adapter of rank 12 to {tmp_path / 'one'}" in capsys.readouterr().out


def test_a_failing_batch_answers_500_in_openai_shape_and_the_server_keeps_serving(monkeypatch) -> None:
    """Starlette answered a plain-text 'Internal Server Error', which OpenAI clients cannot read."""
    from fastapi.testclient import TestClient

    model, cfg = _routed_model()
    served = serve.ServedModel(
        model, make_char_tokenizer(), serve.served_names(cfg, "unused"), max_positions=256
    )
    real = serve._generate_batch
    calls = iter([RuntimeError("out of memory"), None])

    def flaky(*args):
        if (error := next(calls)) is not None:
            raise error
        return real(*args)

    monkeypatch.setattr(serve, "_generate_batch", flaky)
    with TestClient(serve.create_app(served), raise_server_exceptions=False) as client:
        failed = client.post("/v1/completions", json={"model": "qa", "prompt": "hi", "max_tokens": 2})
        good = client.post("/v1/completions", json={"model": "qa", "prompt": "hi", "max_tokens": 2})
    assert failed.status_code == 500
    error = failed.json()["error"]
    assert (
        error["message"] == "generation failed: RuntimeError: out of memory"
        and error["type"] == "server_error"
    )
    assert good.status_code == 200 and len(good.json()["choices"][0]["text"]) >= 1


@pytest.mark.parametrize("rank", ["0", "-3"])
def test_export_refuses_a_rank_below_1_before_the_model_loads(tmp_path, capsys, rank) -> None:
    """Was refused by the calibration code, after the model had loaded (the base here does not exist)."""
    from asymlora.cli import main

    model, _ = _routed_model(router="soft")
    model.save_pretrained(tmp_path / "run" / "adapter")
    (tmp_path / "run" / "config.yaml").write_text(
        f"model: {{name: {tmp_path / 'nowhere'}}}\ndata: {{tasks: [x]}}\n"
    )
    argv = [
        "export",
        str(tmp_path / "run"),
        "--task",
        "0",
        "--out",
        str(tmp_path / "o"),
        "--calibration",
        "train",
    ]
    assert main([*argv, "--rank", rank]) == 2
    assert f"--rank {rank} is out of range: give a rank >= 1" in capsys.readouterr().err
