"""The OpenAI wire format: pydantic request models, response and SSE chunk builders, error objects.

Only what grok1 can honour is modelled; other fields a client may send are ignored. Ranges follow
OpenAI's (temperature 0..2, top_p (0, 1], up to 4 stop strings, logprobs 0..5 for completions and
top_logprobs 0..20 for chat); an out-of-range value is a 400 with the OpenAI error object.
Extensions: `top_k` and `ignore_eos`.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

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
    user: str | None = None

    def stop_list(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class CompletionRequest(SamplingFields):
    prompt: str | list[TokenId] | Annotated[list[str], Field(min_length=1)] | \
        Annotated[list[list[TokenId]], Field(min_length=1)]
    logprobs: int | None = Field(None, ge=0, le=5, description="top alternatives per token")


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


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="same as max_tokens")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


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


def sse(data: dict | str) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
