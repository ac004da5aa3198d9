"""HTTP routes: an OpenAI-compatible API over a background Engine, /health, /metrics and the chat page.

The engine thread runs `Engine.step()` in a loop; a handler turns its protocol object into engine
requests (`Job.submit`), and the engine's `on_output` callbacks append to the job's list and wake the
event loop (`loop.call_soon_threadsafe`, once until the job has looked). A handler takes everything that
arrived at once: when streaming falls behind the engine, a choice's consecutive outputs go out as one
chunk, so a loaded server spends less per token instead of queueing. A client that goes away (closed stream,
or a non-streaming client that disconnects) cancels its requests, which frees their KV-cache slots
at the next engine step. Every error is an OpenAI error object with the matching status.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from grok1.engine.engine import Engine
from grok1.engine.process import EngineProcess
from grok1.engine.sampling import SamplingParams
from grok1.engine.scheduler import Output, QueueFull, TokenLogprob
from grok1.engine.scheduler import Request as EngineRequest
from grok1.server import protocol as p
from grok1.server.metrics import Metrics
from grok1.tokenizer import CHAT_STOP, Tokenizer, chat_prompt

STATIC = Path(__file__).parent / "static"
ENDPOINTS = {"/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics", "/"}


@dataclasses.dataclass
class Choice:
    """What one engine request has produced so far."""
    prompt_tokens: int = 0
    text: str = ""
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    completion_tokens: int = 0
    finish_reason: str | None = None
    first_token: float | None = None


class Job:
    """One API call's engine requests (prompts x n) and the outputs that have arrived for them."""

    def __init__(self, engine: Engine | EngineProcess, metrics: Metrics) -> None:
        self.engine, self.metrics = engine, metrics
        self.loop = asyncio.get_running_loop()
        self.lock = threading.Lock()  # guards arrived / woken against the engine's thread
        self.arrived: list[tuple[int, Output]] = []
        self.woken = False  # a wake-up is on its way to the event loop
        self.ready = asyncio.Event()
        self.reqs: list[EngineRequest] = []
        self.choices: list[Choice] = []
        self.start = time.perf_counter()

    def submit(self, prompts: list[list[int]], params: list[SamplingParams], logprobs: int | None, param: str) -> None:
        try:
            for i, (ids, sp) in enumerate(zip(prompts, params)):
                self.choices.append(Choice(prompt_tokens=len(ids)))
                self.reqs.append(self.engine.add_request(ids, sp, logprobs=logprobs, on_output=partial(self._put, i)))
        except QueueFull as e:
            self.cancel()
            raise p.APIError(429, f"the server is busy: {e}; retry later", "rate_limit_error", code="queue_full")
        except ValueError as e:
            self.cancel()
            code = "context_length_exceeded" if "context" in str(e) else "invalid_value"
            raise p.APIError(400, str(e), param=param, code=code)
        except RuntimeError as e:
            self.cancel()
            code = "shutting_down" if "shutting down" in str(e) else "engine_unavailable"
            raise p.APIError(503, str(e), "server_error", code=code)

    def _put(self, i: int, out: Output) -> None:  # on the engine thread
        with self.lock:
            self.arrived.append((i, out))
            if self.woken:
                return
            self.woken = True
        try:
            self.loop.call_soon_threadsafe(self.ready.set)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    @property
    def done(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    async def next(self, timeout: float | None = None) -> list[tuple[int, Output]]:
        """Every output that has arrived since the last call, each recorded into its Choice, a choice's
        consecutive outputs merged into one, in arrival order; [] after `timeout` seconds without any."""
        while True:
            with self.lock:
                got, self.arrived, self.woken = self.arrived, [], False
                self.ready.clear()
            if got:
                break
            try:
                await asyncio.wait_for(self.ready.wait(), timeout)
            except asyncio.TimeoutError:
                return []
        merged: dict[int, Output] = {}
        for i, out in got:
            self._record(i, out)
            prev = merged.pop(i, None)  # re-inserted: a choice's place is its latest output's
            merged[i] = out if prev is None else dataclasses.replace(
                out, token_ids=prev.token_ids + out.token_ids, text=prev.text + out.text,
                logprobs=prev.logprobs + out.logprobs)
        return list(merged.items())

    def _record(self, i: int, out: Output) -> None:
        c = self.choices[i]
        c.text += out.text
        c.logprobs += out.logprobs
        c.completion_tokens = out.completion_tokens
        if out.token_ids and c.first_token is None:
            c.first_token = time.perf_counter() - self.start
        if out.finish_reason is not None:
            c.finish_reason = out.finish_reason
            self.metrics.finished(c.prompt_tokens, c.completion_tokens, c.first_token,
                                  time.perf_counter() - self.start)

    def cancel(self) -> None:
        for r in self.reqs:
            if r.finish_reason is None:
                self.engine.cancel(r.id)

    def failure(self) -> p.APIError | None:
        reasons = {c.finish_reason for c in self.choices}
        if "error" in reasons:
            return p.APIError(500, "the model failed while generating; see the server log", "server_error")
        if "cancelled" in reasons:
            return p.APIError(503, "the request was cancelled: the server is shutting down", "server_error")
        return None


def create_app(engine: Engine | EngineProcess, tokenizer: Tokenizer, model_name: str, api_key: str | None = None,
               system_prompt: str | None = None) -> FastAPI:
    """The ASGI app. Starts the engine thread on startup (if not running) and stops it on shutdown.
    `system_prompt` is used for chats that bring no system message (e.g. the Grok persona)."""
    metrics = Metrics()
    engine.on_step = metrics.step

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not engine.alive():
            engine.start()
        yield
        engine.shutdown()

    app = FastAPI(title="grok1", version="1", lifespan=lifespan,
                  description="OpenAI-compatible API for Grok-1-architecture models, served by grok1.")
    app.add_middleware(CountRequests, metrics=metrics)
    add_error_handlers(app)

    async def check_key(request: Request) -> None:  # async: a plain def would run on a worker thread per request
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not given.startswith("Bearer ") or not secrets.compare_digest(given[7:].encode(), api_key.encode()):
            raise p.APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")

    def check_model(name: str) -> None:
        if name != model_name:
            raise p.APIError(404, f"the model {name!r} does not exist; this server serves {model_name!r}",
                             param="model", code="model_not_found")

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": 0, "owned_by": "grok1",
                "max_model_len": engine.max_seq_len}

    api = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    @api.get("/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @api.get("/models/{model}")
    async def get_model(model: str) -> dict:
        check_model(model)
        return model_card()

    def sampling(body: p.SamplingFields, max_tokens: int, stop: tuple[str, ...], j: int) -> SamplingParams:
        seed = None if body.seed is None else (body.seed + j) % 2**63  # choice j of n gets its own seed
        return SamplingParams(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, seed=seed,
                              max_new_tokens=max_tokens, stop=stop, ignore_eos=body.ignore_eos)

    def check_room(prompts: list[list[int]], max_tokens: int | None, param: str) -> None:
        for ids in prompts:
            if max_tokens is not None and len(ids) + max_tokens > engine.max_seq_len:
                raise p.APIError(400, f"this model's context is {engine.max_seq_len} tokens, but {len(ids)} prompt "
                                 f"tokens + max_tokens {max_tokens} = {len(ids) + max_tokens}; shorten the prompt or "
                                 "lower max_tokens", param=param, code="context_length_exceeded")

    @api.post("/completions", response_model=None)
    async def completions(body: p.CompletionRequest, request: Request) -> dict | StreamingResponse:
        check_model(body.model)
        prompts = encode_prompts(tokenizer, body.prompt)
        max_tokens = body.max_tokens or 16
        check_room(prompts, max_tokens, "max_tokens")
        job = Job(engine, metrics)
        job.submit([ids for ids in prompts for _ in range(body.n)],
                   [sampling(body, max_tokens, body.stop_list(), j) for _ in prompts for j in range(body.n)],
                   body.logprobs, "prompt")
        cid, created = "cmpl-" + uuid.uuid4().hex, p.now()

        def choice(i: int, c: Choice, text: str, lps: list[TokenLogprob], offset: int) -> dict:
            logprobs = None if body.logprobs is None else p.completion_logprobs(tokenizer, lps, offset)
            return {"index": i, "text": text, "logprobs": logprobs, "finish_reason": p.finish_reason(c.finish_reason)}

        if body.stream:
            async def events() -> AsyncIterator[str]:
                async for i, out in stream_outputs(job):
                    c = job.choices[i]
                    chunk = {"id": cid, "object": "text_completion", "created": created, "model": model_name,
                             "choices": [choice(i, c, out.text, out.logprobs, len(c.text) - len(out.text))]}
                    yield p.sse(chunk)
                async for tail in stream_tail(job, {"id": cid, "object": "text_completion", "created": created,
                                                    "model": model_name}, body):
                    yield tail

            return StreamingResponse(events(), media_type="text/event-stream")
        await collect(job, request)
        return {"id": cid, "object": "text_completion", "created": created, "model": model_name,
                "choices": [choice(i, c, c.text, c.logprobs, 0) for i, c in enumerate(job.choices)],
                "usage": job_usage(job, body.n)}

    @api.post("/chat/completions", response_model=None)
    async def chat_completions(body: p.ChatCompletionRequest, request: Request) -> dict | StreamingResponse:
        check_model(body.model)
        if body.top_logprobs is not None and not body.logprobs:
            raise p.APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        if system_prompt and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": system_prompt})
        prompt = tokenizer.encode(chat_prompt(messages))
        max_tokens = body.max_completion_tokens or body.max_tokens
        check_room([prompt], max_tokens, "max_tokens")
        if max_tokens is None:
            max_tokens = max(1, engine.max_seq_len - len(prompt))
        stop = CHAT_STOP + body.stop_list()
        job = Job(engine, metrics)
        job.submit([prompt] * body.n, [sampling(body, max_tokens, stop, j) for j in range(body.n)],
                   (body.top_logprobs or 0) if body.logprobs else None, "messages")
        cid, created = "chatcmpl-" + uuid.uuid4().hex, p.now()
        head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_name}

        def logprobs(lps: list[TokenLogprob]) -> dict | None:
            return p.chat_logprobs(tokenizer, lps) if body.logprobs else None

        if body.stream:
            async def events() -> AsyncIterator[str]:
                started = [False] * body.n  # the reply's leading space (after "Assistant:") is dropped
                for i in range(body.n):
                    yield p.sse(head | {"choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                     "logprobs": None, "finish_reason": None}]})
                async for i, out in stream_outputs(job):
                    reason = p.finish_reason(out.finish_reason)
                    text = out.text if started[i] else out.text.lstrip()
                    started[i] = started[i] or bool(text)
                    delta = {"content": text} if text or not reason else {}
                    yield p.sse(head | {"choices": [{"index": i, "delta": delta, "logprobs": logprobs(out.logprobs),
                                                     "finish_reason": reason}]})
                async for tail in stream_tail(job, head, body):
                    yield tail

            return StreamingResponse(events(), media_type="text/event-stream")
        await collect(job, request)
        return {"id": cid, "object": "chat.completion", "created": created, "model": model_name,
                "choices": [{"index": i, "message": {"role": "assistant", "content": c.text.lstrip()},
                             "logprobs": logprobs(c.logprobs), "finish_reason": p.finish_reason(c.finish_reason)}
                            for i, c in enumerate(job.choices)],
                "usage": job_usage(job, body.n)}

    app.include_router(api)
    app.openapi = partial(openapi_with_model, app, model_name)  # type: ignore[method-assign]

    @app.get("/health")
    async def health() -> JSONResponse:
        stats = engine.stats()
        ok = engine.alive()
        return JSONResponse({"status": "ok" if ok else "engine stopped", "model": model_name} | stats,
                            status_code=200 if ok else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(engine.stats()), media_type="text/plain; version=0.0.4")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text())

    return app


def openapi_with_model(app: FastAPI, model_name: str) -> dict:
    """The generated schema, stating which model id this server accepts (clients and fuzzers read it)."""
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)
        for name in ("CompletionRequest", "ChatCompletionRequest"):
            schema["components"]["schemas"][name]["properties"]["model"] |= {"enum": [model_name]}
        for param in schema["paths"]["/v1/models/{model}"]["get"]["parameters"]:
            param["schema"] |= {"enum": [model_name]}
        app.openapi_schema = schema
    return app.openapi_schema


def encode_prompts(tokenizer: Tokenizer, prompt: str | list) -> list[list[int]]:
    """The four shapes of `prompt`: text, token ids, a list of texts, a list of token-id lists."""
    if isinstance(prompt, str):
        prompts = [tokenizer.encode(prompt)]
    elif not prompt or isinstance(prompt[0], int):
        prompts = [list(prompt)]
    else:
        prompts = [tokenizer.encode(x) if isinstance(x, str) else list(x) for x in prompt]
    for ids in prompts:
        bad = [t for t in ids if t >= tokenizer.vocab_size]
        if bad:
            raise p.APIError(400, f"token id {bad[0]} is outside the vocabulary (0..{tokenizer.vocab_size - 1})",
                             param="prompt")
    return prompts


async def collect(job: Job, request: Request) -> None:
    """Wait for every choice to finish; cancel the job if the client disconnects meanwhile."""
    checked = time.monotonic()
    try:
        while not job.done:
            await job.next(timeout=0.5)
            if time.monotonic() - checked >= 0.5:  # outputs keep coming, so check on a clock, not on idleness
                checked = time.monotonic()
                if await request.is_disconnected():
                    break
    finally:
        job.cancel()
    error = job.failure()
    if error is not None:
        raise error


async def stream_outputs(job: Job) -> AsyncIterator[tuple[int, Output]]:
    """Outputs worth a chunk (new text, logprobs or a finish; outputs that arrived together merged, see
    Job.next) until every choice is done. If the client
    goes away the response task is cancelled here, and the finally cancels the engine requests."""
    try:
        while not job.done:
            for i, out in await job.next():
                if out.finish_reason in ("error", "cancelled"):  # reported by stream_tail; text before it is not lost
                    out = dataclasses.replace(out, finish_reason=None)
                if out.text or out.logprobs or out.finish_reason:
                    yield i, out
    finally:
        job.cancel()


async def stream_tail(job: Job, head: dict, body: p.SamplingFields) -> AsyncIterator[str]:
    """An error event if the job failed, the usage chunk if asked for, then [DONE]."""
    error = job.failure()
    if error is not None:
        yield p.sse(error.body())
    elif body.stream_options and body.stream_options.include_usage:
        yield p.sse(head | {"choices": [], "usage": job_usage(job, body.n)})
    yield p.sse("[DONE]")


def job_usage(job: Job, n: int) -> dict:
    prompt = sum(c.prompt_tokens for c in job.choices[::n])  # each prompt counts once, whatever n
    return p.usage(prompt, sum(c.completion_tokens for c in job.choices))


class CountRequests:
    """ASGI middleware: count every HTTP request by endpoint and status for /metrics."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope["path"] if scope["path"] in ENDPOINTS else "other"
            self.metrics.count_request(path, status)


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(p.APIError)
    async def api_error(request: Request, e: p.APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
        if first.get("type") == "json_invalid":
            return JSONResponse(p.error_body(f"malformed JSON body: {first.get('msg')}", "invalid_request_error",
                                             code="json_invalid"), status_code=400)
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        return JSONResponse(p.error_body(f"{param or 'request'}: {first.get('msg')}", "invalid_request_error", param,
                                         "invalid_value"), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(p.error_body(str(e.detail), kind), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def crash(request: Request, e: Exception) -> JSONResponse:
        return JSONResponse(p.error_body(f"internal error: {type(e).__name__}", "server_error"), status_code=500)
