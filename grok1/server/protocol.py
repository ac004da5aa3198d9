"""The OpenAI wire format: pydantic request models, response and SSE chunk builders, error objects (which
one each of the engine's errors becomes, and the app's handlers that turn every error into one).

Only what grok1 can honour is modelled. OpenAI fields that would change the answer but that grok1 does not
implement (`suffix`, `best_of` other than n, `tools`, `tool_choice`, `functions`, `function_call`, a
`response_format` other than text, `audio`, `prediction`, `modalities` other than text) are a 400 naming the
field; other unknown fields are ignored. Ranges follow OpenAI's (temperature 0..2, top_p (0, 1], up to 4 stop
strings, logprobs 0..5 for completions and top_logprobs 0..20 for chat, logit_bias -100..100 for up to 300
tokens); an out-of-range value is a 400 with the OpenAI error object. Text anywhere in a request must be
Unicode text: a lone UTF-16 surrogate (JSON "\ud800" unpaired) is a 400 naming the field.
Extensions: `top_k` and `ignore_eos`.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator
from starlette.exceptions import HTTPException

from grok1.engine.errors import ContextOverflow, EngineError, InvalidRequest, QueueFull, ShuttingDown
from grok1.engine.sampling import SamplingParams
from grok1.engine.scheduler import TokenLogprob
from grok1.tokenizer import Tokenizer

StopString = Annotated[str, StringConstraints(min_length=1)]
TokenId = Annotated[int, Field(ge=0)]


class APIError(Exception):
    """An error the client caused (or may retry): becomes {"error": {...}} with `status`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def engine_error(e: EngineError, param: str) -> APIError:
    """The engine's refusal of a request as the client sees it; `param` names the field the prompt came from."""
    if isinstance(e, QueueFull):
        return APIError(429, f"the server is busy: {e}; retry later", "rate_limit_error", code="queue_full")
    if isinstance(e, InvalidRequest):
        code = "context_length_exceeded" if isinstance(e, ContextOverflow) else "invalid_value"
        return APIError(400, str(e), param=param, code=code)
    code = "shutting_down" if isinstance(e, ShuttingDown) else "engine_unavailable"  # EngineUnavailable
    return APIError(503, str(e), "server_error", code=code)


SURROGATE = re.compile("[\ud800-\udfff]")


def find_surrogate(data: Any) -> tuple[str, int] | None:
    """The first string in parsed JSON (keys too) holding a lone surrogate: (its dotted path, the index). A
    loop, not recursion, so any nesting depth is fine."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            m = SURROGATE.search(value)
            if m:
                return path or "body", m.start()
        elif isinstance(value, dict):
            for k, v in value.items():
                key = f"{path}.{k}" if path else str(k)
                if isinstance(k, str) and SURROGATE.search(k):
                    return path or "body", SURROGATE.search(k).start()
                stack.append((key, v))
        elif isinstance(value, list):
            stack.extend((f"{path}.{i}", v) for i, v in reversed(list(enumerate(value))))
    return None


def unsupported(field: str, why: str) -> APIError:
    return APIError(400, f"{field}: {why}", param=field, code="unsupported_parameter")


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """What /v1/completions and /v1/chat/completions share."""
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate; default: completions 16, "
                                   "chat the rest of the context")
    temperature: float = Field(1.0, ge=0, le=2, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, le=1_000_000, description="grok1 extension: keep the k most likely tokens; 0 = off")
    n: int = Field(1, ge=1, le=8, description="completions per prompt")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=4)] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    presence_penalty: float = Field(0.0, ge=-2, le=2, description="accepted for compatibility; ignored")
    frequency_penalty: float = Field(0.0, ge=-2, le=2, description="accepted for compatibility; ignored")
    ignore_eos: bool = Field(False, description="grok1 extension: keep generating after the end-of-sequence token")
    logit_bias: Annotated[dict[str, Annotated[float, Field(ge=-100, le=100)]], Field(max_length=300)] | None = Field(
        None, description="token id (as a string) -> bias added to its logit before sampling, -100..100")
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: Any) -> Any:
        found = find_surrogate(data)
        if found is not None:  # sentencepiece (and UTF-8) cannot encode it
            path, index = found
            raise APIError(400, f"{path}: character {index} is a lone UTF-16 surrogate, which is not text; send "
                           "valid Unicode", param=path, code="invalid_value")
        return data

    def check_logit_bias(self, vocab_size: int) -> None:
        for key in self.logit_bias or {}:
            if not key.isdigit() or int(key) >= vocab_size:
                raise APIError(400, f"logit_bias: {key[:20]!r} is not a token id (0..{vocab_size - 1})",
                               param="logit_bias", code="invalid_value")

    def stop_list(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def sampling_params(self, max_tokens: int, stop: tuple[str, ...], j: int) -> SamplingParams:
        """Choice j's sampling parameters (choice j of n gets its own seed)."""
        seed = None if self.seed is None else (self.seed + j) % 2**63
        bias = tuple((int(k), float(v)) for k, v in (self.logit_bias or {}).items())
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=seed,
                              max_new_tokens=max_tokens, stop=stop, ignore_eos=self.ignore_eos, logit_bias=bias)


class CompletionRequest(SamplingFields):
    prompt: str | list[TokenId] | Annotated[list[str], Field(min_length=1)] | \
        Annotated[list[list[TokenId]], Field(min_length=1)]
    logprobs: int | None = Field(None, ge=0, le=5, description="top alternatives per token")
    echo: bool = Field(False, description="return the prompt before the completion; with logprobs, the prompt "
                       "tokens' log-probs too (the first token's is null), as lm-eval's local-completions needs")
    suffix: str | None = Field(None, description="not supported (Grok-1 is not trained to fill in): a 400 unless "
                               "null or empty")
    best_of: int | None = Field(None, ge=1, description="only null or equal to n: the server returns every choice")

    @model_validator(mode="after")
    def _supported(self) -> CompletionRequest:
        if self.suffix:
            raise unsupported("suffix", "not supported: this model only continues text (send null or leave it out)")
        if self.best_of is not None and self.best_of != self.n:
            raise unsupported("best_of", f"only best_of = n ({self.n}) is supported: every generated choice is "
                              "returned")
        return self

    def many_prompts(self) -> bool:
        """Whether `prompt` is a list of prompts (texts or token-id lists) rather than one."""
        return isinstance(self.prompt, list) and bool(self.prompt) and not isinstance(self.prompt[0], int)

    def prompt_ids(self, tokenizer: Tokenizer) -> list[list[int]]:
        """The four shapes of `prompt` (text, token ids, a list of texts, a list of token-id lists) as token ids."""
        if isinstance(self.prompt, str):
            prompts = [tokenizer.encode(self.prompt)]
        elif not self.prompt or isinstance(self.prompt[0], int):
            prompts = [list(self.prompt)]
        else:
            prompts = [tokenizer.encode(x) if isinstance(x, str) else list(x) for x in self.prompt]
        for ids in prompts:
            bad = [t for t in ids if t >= tokenizer.vocab_size]
            if bad:
                raise APIError(400, f"token id {bad[0]} is outside the vocabulary (0..{tokenizer.vocab_size - 1})",
                               param="prompt")
        return prompts


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="same as max_tokens")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = Field(None, description="only {\"type\": \"text\"}: JSON modes are "
                                                   "not supported (a 400)")
    tools: list[Any] | None = Field(None, description="not supported: a 400 unless null or empty")
    tool_choice: Any = Field(None, description="only null or \"none\"")
    functions: list[Any] | None = Field(None, description="not supported: a 400 unless null or empty")
    function_call: Any = Field(None, description="only null or \"none\"")
    audio: Any = Field(None, description="not supported: a 400 unless null")
    prediction: Any = Field(None, description="not supported: a 400 unless null")
    modalities: list[str] | None = Field(None, description="only [\"text\"]")

    @model_validator(mode="after")
    def _supported(self) -> ChatCompletionRequest:
        no_tools = "tool and function calling is not supported by this server"
        checks = [("response_format", self.response_format is None or self.response_format.type == "text",
                   "only {\"type\": \"text\"} is supported (no JSON mode)"),
                  ("tools", not self.tools, no_tools), ("functions", not self.functions, no_tools),
                  ("tool_choice", self.tool_choice in (None, "none"), no_tools),
                  ("function_call", self.function_call in (None, "none"), no_tools),
                  ("audio", self.audio is None, "audio output is not supported"),
                  ("prediction", self.prediction is None, "predicted outputs are not supported"),
                  ("modalities", self.modalities in (None, ["text"]), "only [\"text\"] is supported")]
        for field, ok, why in checks:
            if not ok:
                raise unsupported(field, why)
        return self


# ---- responses ----

def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def finish_reason(reason: str | None) -> str | None:
    """Engine reasons -> OpenAI's: EOS and stop strings are both "stop"."""
    return {"eos": "stop", "stop": "stop", "length": "length"}.get(reason or "", None)


def token_text(tok: Tokenizer, token_id: int) -> tuple[str, list[int]]:
    """A token's own text and bytes (a byte-fallback piece is one raw byte)."""
    b = tok.byte_value(token_id)
    if b is not None:
        return (chr(b) if b < 0x80 else f"\\x{b:02x}"), [b]
    text = "" if tok.is_control(token_id) else tok.id_to_piece(token_id).replace("\u2581", " ")
    return text, list(text.encode("utf-8"))


def completion_logprobs(tok: Tokenizer, lps: list[TokenLogprob], offset: int) -> dict:
    """The legacy completions format: parallel lists, text offsets from `offset`."""
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for lp in lps:
        text = token_text(tok, lp.token_id)[0]
        out["tokens"].append(text)
        out["token_logprobs"].append(lp.logprob)
        out["top_logprobs"].append({token_text(tok, i)[0]: v for i, v in lp.top})
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def chat_logprobs(tok: Tokenizer, lps: list[TokenLogprob]) -> dict:
    def entry(token_id: int, logprob: float) -> dict:
        text, raw = token_text(tok, token_id)
        return {"token": text, "logprob": logprob, "bytes": raw}

    return {"content": [entry(lp.token_id, lp.logprob) | {"top_logprobs": [entry(i, v) for i, v in lp.top]}
                        for lp in lps]}


def echo_logprobs(tok: Tokenizer, prompt_ids: list[int], prompt: list[TokenLogprob], completion: list[TokenLogprob]
                  ) -> dict:
    """Legacy-format logprobs of prompt + completion: the first prompt token has no context (null entries)."""
    first = token_text(tok, prompt_ids[0])[0]
    rest = completion_logprobs(tok, prompt + completion, len(first))
    return {"tokens": [first] + rest["tokens"], "token_logprobs": [None] + rest["token_logprobs"],
            "top_logprobs": [None] + rest["top_logprobs"], "text_offset": [0] + rest["text_offset"]}


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    prompt: str
    add_special_tokens: bool = Field(False, description="prepend the BOS token")


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    tokens: list[TokenId]


def completion_choice(index: int, text: str, logprobs: dict | None, reason: str | None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason(reason)}


def chat_message(index: int, text: str, logprobs: dict | None, reason: str | None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": finish_reason(reason)}


def chat_delta(index: int, delta: dict, logprobs: dict | None, reason: str | None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason(reason)}


def sse(data: dict | str) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def chunk(head: dict, choice: dict) -> str:
    """One streamed chunk: the response's head (id, object, created, model) and one choice's news."""
    return sse(head | {"choices": [choice]})


def stream_end(head: dict, error: APIError | None, usage: dict | None) -> Iterator[str]:
    """A stream's last events: the error if the request failed, else the usage chunk if asked for; then [DONE]."""
    if error is not None:
        yield sse(error.body())
    elif usage is not None:
        yield sse(head | {"choices": [], "usage": usage})
    yield sse("[DONE]")


# ---- errors: every one an OpenAI error object ----

class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "invalid request: malformed JSON, a value out of range, an "
          "unsupported field, a prompt that does not fit the context"},
    401: {"model": ErrorResponse, "description": "missing or wrong API key (when the server has one)"},
    404: {"model": ErrorResponse, "description": "unknown model"},
    413: {"model": ErrorResponse, "description": "request body larger than the server accepts"},
    429: {"model": ErrorResponse, "description": "too many requests are waiting; retry later"},
    503: {"model": ErrorResponse, "description": "the engine is shutting down or not running"},
}


def add_error_handlers(app: FastAPI) -> None:
    """Answer every error with an OpenAI error object: ours, a request that fails validation, FastAPI's own
    (404, 405), and a crash (500, its name only)."""
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, crash)


async def api_error(request: Request, e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
    errors = e.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        return JSONResponse(error_body(f"malformed JSON body: {first.get('msg')}", "invalid_request_error",
                                       code="json_invalid"), status_code=400)
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    return JSONResponse(error_body(f"{param or 'request'}: {first.get('msg')}", "invalid_request_error", param,
                                   "invalid_value"), status_code=400)


async def http_error(request: Request, e: HTTPException) -> JSONResponse:
    kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    return JSONResponse(error_body(str(e.detail), kind), status_code=e.status_code, headers=e.headers)


async def crash(request: Request, e: Exception) -> JSONResponse:
    return JSONResponse(error_body(f"internal error: {type(e).__name__}", "server_error"), status_code=500)
