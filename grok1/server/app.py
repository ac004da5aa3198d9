"""HTTP routes: an OpenAI-compatible API over a background Engine, /health, /metrics and the chat page.

`create_app` builds the app around one `Server` (the engine, the tokenizer and this server's settings), kept
in `app.state`; each route reads it from its request. The engine runs on its own thread (or process); a
route hands it a `Job` (bridge.py) and builds its answer with protocol.py. Every error is an OpenAI error
object with the matching status (protocol.add_error_handlers). Host, API key and body limits are checked
before any route runs (guard.py); tokenizing runs on a worker thread, so a long prompt never stalls the
event loop (other streams, /health).
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from grok1.engine.client import EngineClient
from grok1.engine.sampling import SamplingParams
from grok1.server import protocol as p
from grok1.server.bridge import Choice, Job, collect, stream_outputs
from grok1.server.guard import Guard
from grok1.server.metrics import CountRequests, Metrics
from grok1.tokenizer import CHAT_STOP, Tokenizer, chat_prompt

STATIC = Path(__file__).parent / "static"
ENDPOINTS = {"/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics", "/", "/tokenize",
             "/detokenize", "/tokenizer_info"}
MAX_BODY_BYTES = 4 << 20  # a full 8k-token context as text is ~40 KB, as token ids ~60 KB; 4 MiB leaves room
BODY_TIMEOUT = 60.0  # seconds for a request's whole body to arrive


@dataclasses.dataclass
class Server:
    """What the routes serve from. `system_prompt` is used for chats that bring no system message."""
    engine: EngineClient
    tokenizer: Tokenizer
    model_name: str
    system_prompt: str | None
    metrics: Metrics

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise p.APIError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                             param="model", code="model_not_found")

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": 0, "owned_by": "grok1",
                "max_model_len": self.engine.max_seq_len}

    def check_room(self, prompts: list[list[int]], max_tokens: int | None, param: str) -> None:
        n_ctx = self.engine.max_seq_len
        for ids in prompts:
            if max_tokens is not None and len(ids) + max_tokens > n_ctx:
                raise p.APIError(400, f"this model's context is {n_ctx} tokens, but {len(ids)} prompt tokens + "
                                 f"max_tokens {max_tokens} = {len(ids) + max_tokens}; shorten the prompt or lower "
                                 "max_tokens", param=param, code="context_length_exceeded")

    def check_count(self, count: int, param: str) -> None:
        """One API call may queue at most the engine's queue length of completions: more could never be
        admitted, so that is a 400, not a 429 that clients would retry forever."""
        capacity = self.engine.max_queue
        if count > capacity:
            raise p.APIError(400, f"this request asks for {count} completions (prompts x n) but the server queues "
                             f"at most {capacity}; split it into smaller requests", param=param,
                             code="too_many_completions")

    def submit(self, prompts: list[list[int]], params: list[SamplingParams], logprobs: int | None, param: str,
               prompt_logprobs: int | None = None) -> Job:
        job = Job(self.engine, self.metrics)
        job.submit(prompts, params, logprobs, param, prompt_logprobs)
        return job


def create_app(engine: EngineClient, tokenizer: Tokenizer, model_name: str, api_key: str | None = None,
               system_prompt: str | None = None, allowed_hosts: frozenset[str] | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, body_timeout: float = BODY_TIMEOUT) -> FastAPI:
    """The ASGI app. Starts the engine thread on startup (if not running) and stops it on shutdown.
    `system_prompt` is used for chats that bring no system message (e.g. the Grok persona). `api_key`,
    `allowed_hosts` (None: any), `max_body_bytes` and `body_timeout`: see guard.py."""
    metrics = Metrics()
    engine.on_step = metrics.step
    app = FastAPI(title="grok1", version="1", lifespan=lifespan,
                  description="OpenAI-compatible API for Grok-1-architecture models, served by grok1.")
    app.state.server = Server(engine, tokenizer, model_name, system_prompt, metrics)
    app.add_middleware(Guard, api_key=api_key, allowed_hosts=allowed_hosts, max_body_bytes=max_body_bytes,
                       body_timeout=body_timeout)
    app.add_middleware(CountRequests, metrics=metrics, endpoints=ENDPOINTS)  # outermost: counts the guard's too
    p.add_error_handlers(app)
    app.include_router(api)
    app.include_router(tokens)
    app.openapi = partial(openapi_with_model, app, model_name)  # type: ignore[method-assign]
    app.include_router(site)
    return app


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    engine = app.state.server.engine
    if not engine.alive():
        engine.start()
    yield
    engine.shutdown()


def server(request: Request) -> Server:
    return request.app.state.server


api = APIRouter(prefix="/v1", responses=p.ERROR_RESPONSES)
tokens = APIRouter(responses=p.ERROR_RESPONSES)  # vLLM's tokenizer endpoints (lm-eval's remote tokenizer)
site = APIRouter()


@api.get("/models")
async def list_models(request: Request) -> dict:
    return {"object": "list", "data": [server(request).model_card()]}


@api.get("/models/{model}")
async def get_model(model: str, request: Request) -> dict:
    server(request).check_model(model)
    return server(request).model_card()


@api.post("/completions", response_model=None)
async def completions(body: p.CompletionRequest, request: Request) -> dict | StreamingResponse:
    s = server(request)
    s.check_model(body.model)
    many = body.many_prompts()
    s.check_count((len(body.prompt) if many else 1) * body.n, "prompt" if many else "n")
    body.check_logit_bias(s.tokenizer.vocab_size)
    prompts = await run_in_threadpool(body.prompt_ids, s.tokenizer)
    max_tokens = body.max_tokens or 16
    s.check_room(prompts, max_tokens, "max_tokens")
    if body.echo and body.stream:
        raise p.APIError(400, "echo is not supported with stream", param="echo")
    scored = body.logprobs if body.echo else None  # echo + logprobs: the prompt tokens' log-probs too
    job = s.submit([ids for ids in prompts for _ in range(body.n)],
                   [body.sampling_params(max_tokens, body.stop_list(), j) for _ in prompts for j in range(body.n)],
                   body.logprobs, "prompt", scored)
    head = {"id": "cmpl-" + uuid.uuid4().hex, "object": "text_completion", "created": p.now(), "model": s.model_name}

    def logprobs(lps: list, offset: int) -> dict | None:
        return None if body.logprobs is None else p.completion_logprobs(s.tokenizer, lps, offset)

    if body.stream:
        async def events() -> AsyncIterator[str]:
            async for i, out in stream_outputs(job):
                offset = len(job.choices[i].text) - len(out.text)
                yield p.chunk(head, p.completion_choice(i, out.text, logprobs(out.logprobs, offset),
                                                        job.choices[i].finish_reason))
            for event in p.stream_end(head, job.failure(), stream_usage(job, body)):
                yield event

        return StreamingResponse(events(), media_type="text/event-stream")
    await collect(job, request)

    def choice(i: int, c: Choice) -> dict:
        if not body.echo:
            return p.completion_choice(i, c.text, logprobs(c.logprobs, 0), c.finish_reason)
        ids = prompts[i // body.n]
        lps = None if scored is None else p.echo_logprobs(s.tokenizer, ids, c.prompt_logprobs or [], c.logprobs)
        return p.completion_choice(i, s.tokenizer.decode(ids) + c.text, lps, c.finish_reason)

    return head | {"choices": [choice(i, c) for i, c in enumerate(job.choices)], "usage": job.usage(body.n)}


@api.post("/chat/completions", response_model=None)
async def chat_completions(body: p.ChatCompletionRequest, request: Request) -> dict | StreamingResponse:
    s = server(request)
    s.check_model(body.model)
    s.check_count(body.n, "n")
    body.check_logit_bias(s.tokenizer.vocab_size)
    if body.top_logprobs is not None and not body.logprobs:
        raise p.APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    if s.system_prompt and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": s.system_prompt})
    prompt = await run_in_threadpool(lambda: s.tokenizer.encode(chat_prompt(messages)))
    max_tokens = body.max_completion_tokens or body.max_tokens
    s.check_room([prompt], max_tokens, "max_tokens")
    if max_tokens is None:
        max_tokens = max(1, s.engine.max_seq_len - len(prompt))
    stop = CHAT_STOP + body.stop_list()
    job = s.submit([prompt] * body.n, [body.sampling_params(max_tokens, stop, j) for j in range(body.n)],
                   (body.top_logprobs or 0) if body.logprobs else None, "messages")
    cid, created = "chatcmpl-" + uuid.uuid4().hex, p.now()

    def logprobs(lps: list) -> dict | None:
        return p.chat_logprobs(s.tokenizer, lps) if body.logprobs else None

    if body.stream:
        head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": s.model_name}

        async def events() -> AsyncIterator[str]:
            started = [False] * body.n  # the reply's leading space (after "Assistant:") is dropped
            for i in range(body.n):
                yield p.chunk(head, p.chat_delta(i, {"role": "assistant", "content": ""}, None, None))
            async for i, out in stream_outputs(job):
                text = out.text if started[i] else out.text.lstrip()
                started[i] = started[i] or bool(text)
                delta = {"content": text} if text or not p.finish_reason(out.finish_reason) else {}
                yield p.chunk(head, p.chat_delta(i, delta, logprobs(out.logprobs), out.finish_reason))
            for event in p.stream_end(head, job.failure(), stream_usage(job, body)):
                yield event

        return StreamingResponse(events(), media_type="text/event-stream")
    await collect(job, request)
    return {"id": cid, "object": "chat.completion", "created": created, "model": s.model_name,
            "choices": [p.chat_message(i, c.text.lstrip(), logprobs(c.logprobs), c.finish_reason)
                        for i, c in enumerate(job.choices)],
            "usage": job.usage(body.n)}


def special_tokens(tok: Tokenizer) -> dict[str, int]:
    return {tok.id_to_piece(i): i for i in (tok.bos_id, tok.eos_id, tok.pad_id) if 0 <= i < tok.vocab_size}


@tokens.post("/tokenize")
async def tokenize(body: p.TokenizeRequest, request: Request) -> dict:
    """Text -> token ids (no BOS unless add_special_tokens); a special token's own text (e.g. the
    tokenizer_info eos_token) gives its id, as lm-eval's remote tokenizer expects."""
    s = server(request)
    special = special_tokens(s.tokenizer)
    ids = [special[body.prompt]] if body.prompt in special else \
        await run_in_threadpool(s.tokenizer.encode, body.prompt, body.add_special_tokens)
    return {"tokens": ids, "count": len(ids), "max_model_len": s.engine.max_seq_len}


@tokens.post("/detokenize")
async def detokenize(body: p.DetokenizeRequest, request: Request) -> dict:
    tok = server(request).tokenizer
    bad = [t for t in body.tokens if t >= tok.vocab_size]
    if bad:
        raise p.APIError(400, f"token id {bad[0]} is outside the vocabulary (0..{tok.vocab_size - 1})", param="tokens")
    return {"prompt": tok.decode(body.tokens)}


@tokens.get("/tokenizer_info")
async def tokenizer_info(request: Request) -> dict:
    s = server(request)
    tok = s.tokenizer
    return {"tokenizer_class": "SentencePiece", "vocab_size": tok.vocab_size, "model_max_length": s.engine.max_seq_len,
            "bos_token": tok.id_to_piece(tok.bos_id), "eos_token": tok.id_to_piece(tok.eos_id),
            "pad_token": tok.id_to_piece(tok.pad_id) if tok.pad_id >= 0 else None, "chat_template": None}


@site.get("/health", responses={503: {"model": p.ErrorResponse, "description": "the engine is not running"}})
async def health(request: Request) -> JSONResponse:
    s = server(request)
    stats = s.engine.stats()
    stalled = s.engine.stalled()
    ok = s.engine.alive() and not stalled
    status = "ok" if ok else "engine not answering" if stalled else "engine stopped"
    return JSONResponse({"status": status, "model": s.model_name} | stats, status_code=200 if ok else 503)


@site.get("/metrics", response_class=PlainTextResponse, responses={401: p.ERROR_RESPONSES[401]})
async def prometheus(request: Request) -> PlainTextResponse:
    s = server(request)
    return PlainTextResponse(s.metrics.render(s.engine.stats()), media_type="text/plain; version=0.0.4")


@site.get("/", response_class=HTMLResponse, include_in_schema=False)
async def index() -> HTMLResponse:
    return HTMLResponse((STATIC / "index.html").read_text())


def stream_usage(job: Job, body: p.SamplingFields) -> dict | None:
    """The usage for a stream's last chunk, if the client asked for it."""
    return job.usage(body.n) if body.stream_options and body.stream_options.include_usage else None


def openapi_with_model(app: FastAPI, model_name: str) -> dict:
    """The generated schema, stating which model id this server accepts (clients and fuzzers read it), without
    FastAPI's 422: a request that fails validation is a 400 here (protocol.invalid)."""
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)
        for ops in schema["paths"].values():
            for op in ops.values():
                op["responses"].pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema["components"]["schemas"].pop(name, None)
        for name in ("CompletionRequest", "ChatCompletionRequest"):
            schema["components"]["schemas"][name]["properties"]["model"] |= {"enum": [model_name]}
        for param in schema["paths"]["/v1/models/{model}"]["get"]["parameters"]:
            param["schema"] |= {"enum": [model_name]}
        app.openapi_schema = schema
    return app.openapi_schema
