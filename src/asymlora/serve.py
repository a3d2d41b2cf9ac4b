"""`asymlora serve`: an OpenAI-compatible ``/v1/completions`` server that batches requests of several tasks.

For the adapters a LoRA server such as vLLM cannot take as plain LoRAs: soft/top-k routed ALoRA (experts
mixed per token) and task-routed adapters served in one process. The request's ``model`` field names the
task, as vLLM names a LoRA adapter (``--lora-modules name=path``); a non-routed or learned-routing adapter
has one name, its served model name. Concurrent requests, of any tasks, are collected for up to
``max_wait_ms`` and run as ONE left-padded ``generate`` with one task id per row (docs/design.md §3: task
routing selects expert t per example), so a batch of k tasks costs one forward per token, not k.

Decoding is greedy (``temperature`` absent or 0); the server refuses what it cannot honour (sampling,
``n`` > 1, streaming, logprobs, presence/frequency penalties) with a 400 naming the field, rather than
silently ignoring it.

The HTTP layer is FastAPI + uvicorn (the optional extra ``asymlora[serve]``); the request queue and the
batching loop are our own because they must group rows of different tasks into one routed forward, which
no generic server library does for a custom peft tuner.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import peft
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator
from starlette.exceptions import HTTPException
from transformers import GenerationConfig

from asymlora.methods import get_method
from asymlora.models import load
from asymlora.recipes.evaluate import read_adapter_config, run_adapter
from asymlora.recipes.multitask import CONFIG_FILE
from asymlora.tuner.config import AsymLoraConfig

__all__ = ["Completion", "ServedModel", "create_app", "generate_rows", "load_served_model", "serve"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


@dataclass
class ServedModel:
    """A model ready to serve: ``names`` maps each served model name to its task index (None: no task ids).

    ``model`` is a peft model (or any causal LM); ``max_positions`` bounds prompt + completion tokens.
    """

    model: Any
    tokenizer: Any
    names: dict[str, int | None]
    max_positions: int


@dataclass
class Completion:
    """One generated row: ``token_ids`` (new tokens, EOS excluded) and why generation stopped."""

    token_ids: list[int]
    finish_reason: str  # "stop" (EOS) or "length" (max_tokens reached)


# --------------------------------------------------------------------------- loading


def _adapter_dir(path: Path, method: str | None) -> Path:
    """The adapter directory of ``path``: an adapter directory itself, or the one of a run (directory)."""
    if (path / "adapter_config.json").is_file():
        return path
    if not (path / CONFIG_FILE).is_file():
        raise FileNotFoundError(
            f"{path} is neither an adapter directory (no adapter_config.json) nor an asymlora run directory "
            f"(no {CONFIG_FILE}); give one of them"
        )
    return run_adapter(path, method)[1]


def served_names(config: Any, default_name: str) -> dict[str, int | None]:
    """Served model name -> task index: one per task of a task-routed asymlora adapter, else one name."""
    if (
        isinstance(config, AsymLoraConfig)
        and get_method(config.method).uses_router
        and config.router == "task"
    ):
        names = config.task_names or [str(i) for i in range(config.num_experts)]
        return {name: i for i, name in enumerate(names)}
    return {default_name: None}


def load_served_model(
    path: str | os.PathLike,
    *,
    method: str | None = None,
    base_model: str | None = None,
    served_model_name: str | None = None,
    device: str | None = None,
) -> ServedModel:
    """Load a run directory or an adapter directory (asymlora or stock peft LoRA) for serving.

    Args:
        path: a run directory of ``asymlora train`` or a directory with ``adapter_config.json``.
        method: which method of a compare run (default: the only one).
        base_model: base model name or path (default: the adapter's ``base_model_name_or_path``).
        served_model_name: the name of an adapter without task routing (default: the directory that holds
            ``adapter/``: a run's own name, or the method's in a compare run; else the adapter directory's
            name). Task-routed adapters are served under their task names.
        device: as :func:`asymlora.models.load`.

    Raises:
        FileNotFoundError: ``path`` is neither a run nor an adapter directory.
        ValueError: several methods and no ``method``, or no base model known.
    """
    path = Path(path)
    if path.is_file():
        raise FileNotFoundError(
            f"{path} is a file; give a run directory or an adapter directory (its folder)"
        )
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist; give a run directory or an adapter directory")
    adapter = _adapter_dir(path, method)
    config = read_adapter_config(adapter)
    base = base_model or config.base_model_name_or_path
    if not base:
        raise ValueError(f"{adapter}/adapter_config.json names no base model; give it with --base-model")
    base_lm, tokenizer = load(base, device=device)
    model = peft.PeftModel.from_pretrained(base_lm, str(adapter))
    model.eval()
    default_name = served_model_name or (adapter.parent.name if adapter.name == "adapter" else adapter.name)
    positions = getattr(base_lm.config, "max_position_embeddings", None) or 2048
    return ServedModel(model, tokenizer, served_names(config, default_name), int(positions))


# --------------------------------------------------------------------------- batched generation


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = {int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None}
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if not ids:
        raise ValueError("the tokenizer has no eos_token_id; set tokenizer.eos_token before serving")
    return ids


def _fitting_groups(
    prompt_lengths: Sequence[int], max_tokens: Sequence[int], max_positions: int
) -> list[list[int]]:
    """Row indexes split, in order, into groups whose left-padded ``generate`` stays within ``max_positions``.

    A batch runs to its longest prompt plus its largest ``max_tokens``: two requests that each fit the context
    can overflow it together (a 60-token prompt wanting 2 tokens beside a 2-token prompt wanting 50, on a
    64-position model), and a model with learned position embeddings (GPT-2) then fails the whole batch.
    """
    groups: list[list[int]] = []
    width = new = 0
    for i, (length, limit) in enumerate(zip(prompt_lengths, max_tokens, strict=True)):
        if groups and max(width, length) + max(new, limit) <= max_positions:
            groups[-1].append(i)
            width, new = max(width, length), max(new, limit)
        else:
            groups.append([i])
            width, new = length, limit
    return groups


def generate_rows(
    served: ServedModel,
    prompts: Sequence[Sequence[int]],
    tasks: Sequence[int | None],
    max_tokens: Sequence[int],
) -> list[Completion]:
    """Greedy completions of several prompts, possibly of different tasks, in one left-padded ``generate``
    (or as few as keep every row within ``served.max_positions``: :func:`_fitting_groups`).

    Args:
        prompts: token ids of each prompt (non-empty).
        tasks: task index of each row, or all None for an adapter without task routing.
        max_tokens: the most new tokens of each row (>= 1); a batch runs to its largest.

    Returns:
        One :class:`Completion` per row: its new tokens up to (excluding) the first EOS, at most
        ``max_tokens[i]`` of them.
    """
    if (some := [t for t in tasks if t is not None]) and len(some) != len(tasks):
        raise ValueError(f"tasks must be all task indexes or all None, got {list(tasks)}")
    results: dict[int, Completion] = {}
    for group in _fitting_groups([len(p) for p in prompts], max_tokens, served.max_positions):
        rows = [prompts[i] for i in group], [tasks[i] for i in group], [max_tokens[i] for i in group]
        results.update(zip(group, _generate_batch(served, *rows), strict=True))
    return [results[i] for i in range(len(prompts))]


@torch.inference_mode()
def _generate_batch(
    served: ServedModel,
    prompts: Sequence[Sequence[int]],
    tasks: Sequence[int | None],
    max_tokens: Sequence[int],
) -> list[Completion]:
    """:func:`generate_rows` of rows that fit the context together: one left-padded ``generate``."""
    model, tokenizer = served.model, served.tokenizer
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, ids in enumerate(prompts):
        input_ids[r, width - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
        attention[r, width - len(ids) :] = 1
    config = GenerationConfig(
        max_new_tokens=max(max_tokens),
        do_sample=False,
        num_beams=1,
        eos_token_id=sorted(eos),
        pad_token_id=pad,
    )
    kwargs: dict[str, Any] = {}
    if task_ids := [t for t in tasks if t is not None]:
        kwargs["task_ids"] = torch.tensor(task_ids, dtype=torch.long)
    device = next(model.parameters()).device
    kwargs = {k: v.to(device) for k, v in kwargs.items()}
    output = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention.to(device),
        generation_config=config,
        **kwargs,
    )
    completions = []
    for r, limit in enumerate(max_tokens):
        new = output[r, width:].tolist()
        stop = next((k for k, tok in enumerate(new) if tok in eos), None)
        if stop is not None and stop < limit:
            completions.append(Completion(new[:stop], "stop"))
        else:
            completions.append(Completion(new[:limit], "length"))
    return completions


@dataclass
class _Row:
    prompt: list[int]
    task: int | None
    max_tokens: int
    future: asyncio.Future


@dataclass
class Batcher:
    """Collects rows for up to ``max_wait_s`` (or ``max_batch_size`` rows) and runs them as one batch
    (:func:`generate_rows`: one ``generate``, or several where the rows would pass the context together).

    Batches run one at a time on a single worker thread (the model is not re-entrant); rows arriving
    meanwhile form the next batch. ``batch_tasks`` records the task ids of every batch collected (for tests
    and monitoring; bounded to the last 1000).
    """

    served: ServedModel
    max_batch_size: int = 16
    max_wait_s: float = 0.005
    batch_tasks: list[list[int | None]] = field(default_factory=list)

    def open(self) -> None:
        """Make the queue and the worker thread; call inside the event loop that will serve."""
        self._queue: asyncio.Queue[_Row] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="asymlora-generate")

    async def submit(self, prompt: list[int], task: int | None, max_tokens: int) -> Completion:
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Row(prompt, task, max_tokens, future))
        return await future

    async def _collect(self) -> list[_Row]:
        loop = asyncio.get_running_loop()
        rows = [await self._queue.get()]
        deadline = loop.time() + self.max_wait_s
        while len(rows) < self.max_batch_size and (left := deadline - loop.time()) > 0:
            try:
                rows.append(await asyncio.wait_for(self._queue.get(), left))
            except TimeoutError:
                break
        return [row for row in rows if not row.future.done()]  # drop rows whose client went away

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            rows = await self._collect()
            if not rows:
                continue
            self.batch_tasks = [*self.batch_tasks[-999:], [row.task for row in rows]]
            args = ([r.prompt for r in rows], [r.task for r in rows], [r.max_tokens for r in rows])
            results: list[Completion] | list[Exception]
            try:
                results = await loop.run_in_executor(self._executor, generate_rows, self.served, *args)
            except Exception as e:  # a failing batch fails its requests (500), not the server
                results = [e] * len(rows)
            for row, result in zip(rows, results, strict=True):
                if row.future.done():
                    continue
                if isinstance(result, Exception):
                    row.future.set_exception(result)
                else:
                    row.future.set_result(result)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


# --------------------------------------------------------------------------- HTTP


class CompletionRequest(BaseModel):
    """The body of ``POST /v1/completions`` (OpenAI's legacy completions API; other fields are ignored)."""

    model_config = ConfigDict(extra="ignore")
    model: str
    prompt: str | list[str]
    max_tokens: int = 16
    stop: str | list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    best_of: int | None = None
    stream: bool | None = False
    logprobs: int | None = None
    echo: bool | None = False
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None

    @field_validator("max_tokens", "n", mode="before")
    @classmethod
    def _null_is_default(cls, value: Any, info: ValidationInfo) -> Any:
        """null, which OpenAI's API allows for both: the default (16 tokens, one choice)."""
        return cls.model_fields[str(info.field_name)].default if value is None else value


class APIError(Exception):
    """A request the server refuses: HTTP ``status`` with an OpenAI-style error body naming ``param``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _error_body(message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}


def _parse(body: bytes) -> CompletionRequest:
    """The request body as a :class:`CompletionRequest`; APIError 400 naming the bad fields otherwise."""
    try:
        return CompletionRequest.model_validate_json(body)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in e.errors()
        )
        param = next((str(err["loc"][0]) for err in e.errors() if err["loc"]), None)
        raise APIError(400, f"invalid request body: {problems}", param) from None


def _check_sampling(request: Any) -> None:
    """Refuse the OpenAI fields this server cannot honour (it decodes greedily, one choice, no stream)."""
    refused = {
        "temperature": request.temperature not in (None, 0),
        "top_p": request.top_p not in (None, 1),
        "n": request.n != 1,
        "best_of": request.best_of not in (None, 1),
        "stream": bool(request.stream),
        "logprobs": request.logprobs is not None,
        "echo": bool(request.echo),
        "logit_bias": bool(request.logit_bias),
        "suffix": bool(request.suffix),
        "presence_penalty": request.presence_penalty not in (None, 0),
        "frequency_penalty": request.frequency_penalty not in (None, 0),
    }
    for name, bad in refused.items():
        if bad:
            zero = name in ("temperature", "presence_penalty", "frequency_penalty")
            fix = f"omit {name}" + (" (or set it to 0)" if zero else "")
            raise APIError(
                400,
                f"{name}={getattr(request, name)!r} is not supported: this server decodes greedily, one "
                f"choice per prompt, without streaming, logprobs, logit bias, penalties or suffix; {fix}",
                param=name,
            )


def _prompt_rows(request: Any, served: ServedModel, limit: int, max_batch_size: int) -> list[list[int]]:
    """Token ids of each prompt of the request, after checking them and ``max_tokens`` against the limits."""
    prompts = [request.prompt] if isinstance(request.prompt, str) else list(request.prompt)
    if not prompts or len(prompts) > max_batch_size:
        raise APIError(400, f"prompt must hold 1 to {max_batch_size} prompts, got {len(prompts)}", "prompt")
    if request.max_tokens < 1 or request.max_tokens > limit:
        raise APIError(
            400,
            f"max_tokens={request.max_tokens} is out of range: this server generates 1 to {limit} tokens "
            "per prompt (asymlora serve --max-tokens)",
            "max_tokens",
        )
    rows = [served.tokenizer(p)["input_ids"] for p in prompts]
    for ids in rows:
        if not ids:
            raise APIError(400, "prompt is empty (it has no tokens)", "prompt")
        if len(ids) + request.max_tokens > served.max_positions:
            raise APIError(
                400,
                f"this model's maximum context length is {served.max_positions} tokens; the prompt has "
                f"{len(ids)} and max_tokens is {request.max_tokens}: shorten the prompt or lower max_tokens",
                "max_tokens",
                "context_length_exceeded",
            )
    return rows


def _cut_at_stop(text: str, stop: str | list[str] | None) -> tuple[str, bool]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    cuts = [text.find(s) for s in stops if s and s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def _tokens_to_stop(served: ServedModel, token_ids: list[int], stop: Any) -> int:
    """How many of ``token_ids`` were needed to produce the first stop string: the shortest prefix whose text
    holds one (binary search: a longer prefix's text extends a shorter one's). OpenAI and vLLM stop generating
    there, so ``usage.completion_tokens`` counts those tokens, not the ones this batched server generated past
    the stop before cutting the text."""
    low, high = 1, len(token_ids)
    while low < high:
        mid = (low + high) // 2
        text = served.tokenizer.decode(token_ids[:mid], skip_special_tokens=True)
        low, high = (low, mid) if _cut_at_stop(text, stop)[1] else (mid + 1, high)
    return high


def _choices(served: ServedModel, results: list[Completion], stop: Any) -> tuple[list[dict[str, Any]], int]:
    """OpenAI's choices for ``results``, and the completion tokens they count (up to each stop string)."""
    choices, tokens = [], 0
    for index, result in enumerate(results):
        text = served.tokenizer.decode(result.token_ids, skip_special_tokens=True)
        text, stopped = _cut_at_stop(text, stop)
        reason = "stop" if stopped else result.finish_reason
        tokens += _tokens_to_stop(served, result.token_ids, stop) if stopped else len(result.token_ids)
        choices.append({"index": index, "text": text, "logprobs": None, "finish_reason": reason})
    return choices, tokens


def _response(
    served: ServedModel, request: CompletionRequest, rows: list[list[int]], results: list[Completion]
) -> dict[str, Any]:
    """OpenAI's text_completion object for the request's prompts (``rows``) and their completions."""
    choices, generated = _choices(served, results, request.stop)
    prompt_tokens = sum(len(ids) for ids in rows)
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": request.model,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": generated,
            "total_tokens": prompt_tokens + generated,
        },
    }


def _check_limits(max_batch_size: int, max_wait_ms: float, max_tokens: int) -> None:
    """ValueError naming the server limit that is out of range (see :func:`create_app`)."""
    for name, value, low in (("max_batch_size", max_batch_size, 1), ("max_tokens", max_tokens, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not 0 <= max_wait_ms < math.inf:  # inf: a lone request would wait for a full batch; NaN: never ordered
        raise ValueError(f"max_wait_ms must be a finite number >= 0 of milliseconds, got {max_wait_ms!r}")


def _lifespan(batcher: Batcher) -> Callable[[FastAPI], contextlib.AbstractAsyncContextManager[None]]:
    """The app's lifespan: the batcher's worker task runs while the server does, and is stopped after."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.open()
        worker = asyncio.create_task(batcher.run())
        try:
            yield
        finally:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
            batcher.close()

    return lifespan


def create_app(
    served: ServedModel, *, max_batch_size: int = 16, max_wait_ms: float = 5.0, max_tokens: int = 256
) -> FastAPI:
    """The FastAPI application: ``POST /v1/completions``, ``GET /v1/models``, ``GET /health``.

    Args:
        max_batch_size: most rows (prompts) of one ``generate``.
        max_wait_ms: how long the first request of a batch waits for others (milliseconds).
        max_tokens: the largest ``max_tokens`` a request may ask for.

    Errors are OpenAI-style ``{"error": {"message", "type", "param", "code"}}``: 400 for a malformed body
    or an unsupported/out-of-range field, 404 for an unknown ``model``, 500 (``server_error``) for a batch whose
    generation failed; the server keeps serving.

    Raises:
        ValueError: ``max_batch_size`` or ``max_tokens`` < 1, or ``max_wait_ms`` not a finite number >= 0.
    """
    _check_limits(max_batch_size, max_wait_ms, max_tokens)
    batcher = Batcher(served, max_batch_size, max_wait_ms / 1000.0)
    app = FastAPI(title="asymlora serve", lifespan=_lifespan(batcher))
    app.state.batcher = batcher

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(_error_body(e.message, e.param, e.code), status_code=e.status)

    @app.exception_handler(HTTPException)  # unknown route, wrong method: OpenAI's error shape, not {"detail"}
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        message = (
            f"{e.detail}: {request.method} {request.url.path}; this server answers POST /v1/completions, "
            "GET /v1/models and GET /health"
        )
        return JSONResponse(_error_body(message), status_code=e.status_code, headers=e.headers)

    # a batch that failed: OpenAI's error shape (the traceback goes to the log)
    @app.exception_handler(Exception)
    async def server_error(_: Request, e: Exception) -> JSONResponse:
        body = _error_body(f"generation failed: {type(e).__name__}: {e}")
        body["error"]["type"] = "server_error"
        return JSONResponse(body, status_code=500)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        data = [{"id": name, "object": "model", "owned_by": "asymlora"} for name in served.names]
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(http_request: Request) -> dict[str, Any]:
        request = _parse(await http_request.body())
        if request.model not in served.names:
            raise APIError(
                404, f"model {request.model!r} does not exist; served: {sorted(served.names)}", "model",
                "model_not_found",
            )  # fmt: skip
        _check_sampling(request)
        rows = _prompt_rows(request, served, max_tokens, max_batch_size)
        task = served.names[request.model]
        results = await asyncio.gather(*(batcher.submit(ids, task, request.max_tokens) for ids in rows))
        return _response(served, request, rows, results)

    return app


def serve(
    served: ServedModel,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    max_batch_size: int = 16,
    max_wait_ms: float = 5.0,
    max_tokens: int = 256,
) -> None:
    """Run :func:`create_app` under uvicorn until interrupted (binds ``host``, default 127.0.0.1 only)."""
    app = create_app(served, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_tokens=max_tokens)
    uvicorn.run(app, host=host, port=port, log_level="info")
