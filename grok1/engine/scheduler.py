"""Continuous batching: Request, Output and the Scheduler (nano-vllm style).

Two queues. `waiting` holds requests in arrival order; `running` holds the requests that own a
KV-cache slot. Each engine step: `schedule()` retires cancelled requests and admits waiting ones
into free slots (they are prefilled this step; the rest decode one token); the engine runs the
model and samples one token per scheduled request; `postprocess()` appends the tokens, applies
the stop conditions (EOS, stop strings, max_new_tokens, end of context) and retires finished
requests, freeing their slots for the next step.

Finish reasons: "eos", "stop" (a stop string; the text is cut before it), "length",
"cancelled" (the client went away), "error" (the model step raised).
"""

from __future__ import annotations

import uuid
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from grok1.engine.cache import SlotAllocator
from grok1.engine.sampling import SamplingParams
from grok1.tokenizer import TextStream, Tokenizer


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely alternatives, descending


@dataclass
class Output:
    """What one step produced for one request: 0 or 1 new tokens, the text they completed."""
    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    prompt_logprobs: list[TokenLogprob] | None = None  # on the first output of a request that asked for them:
                                                        # prompt tokens 1.. (token 0 has no context)


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    logprobs: int | None = None  # None: params.logprobs (0: none); k >= 0: the chosen token's and the top k
    on_output: Callable[[Output], None] | None = None  # called on the engine thread
    detokenize: bool = True  # False: outputs carry token ids and no text (unless stop strings need the text)
    prompt_logprobs: int | None = None  # k >= 0: score the prompt too (its tokens' logprobs, top k alternatives)
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    slot: int = -1  # the KV-cache row while running
    stream: TextStream | None = None
    finish_reason: str | None = None
    cancelled: bool = False
    cached: int = 0  # prompt tokens whose keys and values its slot already held (prefix reuse)
    exact_kv: bool = False  # its keys and values were computed as one-token rows (reusable bit for bit)

    def __post_init__(self) -> None:
        if self.logprobs is None:
            self.logprobs = self.params.logprobs or None

    @property
    def last_pos(self) -> int:
        """Cache position of output_ids[-1], the token the next decode step feeds."""
        return len(self.prompt_ids) + len(self.output_ids) - 1


Emit = tuple[Request, Output]  # an output and the request it is for (whose on_output receives it)


@dataclass
class Batch:
    prefill: list[Request]  # admitted this step: run their prompts
    decode: list[Request]  # already running: feed their last token

    def __len__(self) -> int:
        return len(self.prefill) + len(self.decode)


class Scheduler:
    """Not thread-safe: the engine serialises calls with its lock. Takes requests as they are: the client
    checked them (grok1.engine.client.check_request) and enforces the queue limit."""

    def __init__(self, max_batch: int, max_seq_len: int, prefill_tokens: int, eos_id: int,
                 tokenizer: Tokenizer | None = None, prefix_reuse: bool = False) -> None:
        self.max_seq_len, self.prefill_tokens = max_seq_len, prefill_tokens
        self.prefix_reuse = prefix_reuse  # admit prompts into the free slot holding most of their prefix
        self.eos_id, self.tokenizer = eos_id, tokenizer
        self.slots = SlotAllocator(max_batch)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}  # every live request by id
        self.finished: Counter[str] = Counter()  # finish reason -> requests

    def add(self, req: Request) -> None:
        """Queue a checked request (a fresh id; stop strings only with a tokenizer)."""
        assert req.id not in self.requests and len(req.prompt_ids) < self.max_seq_len, req.id
        wants_text = req.detokenize or req.params.stop
        req.stream = TextStream(self.tokenizer, req.params.stop, req.prompt_ids) if self.tokenizer and wants_text else None
        self.waiting.append(req)
        self.requests[req.id] = req

    def cancel(self, request_id: str) -> None:
        """Mark a request cancelled; it is retired (and its slot freed) at the next schedule()."""
        if request_id in self.requests:
            self.requests[request_id].cancelled = True

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[Batch, list[Emit]]:
        """Retire cancelled requests (their final outputs are returned), admit waiting requests into free
        slots while the padded prefill stays within `prefill_tokens` (always at least one)."""
        outputs = self.retire_cancelled()
        prefill: list[Request] = []
        while self.waiting and self.slots.num_free:
            longest = max(len(r.prompt_ids) for r in [*prefill, self.waiting[0]])
            if prefill and (len(prefill) + 1) * longest > self.prefill_tokens:
                break
            req = self.waiting.popleft()
            got = self.slots.allocate_for(req.id, req.prompt_ids) if self.prefix_reuse else (self.slots.allocate(req.id), 0)
            assert got is not None and got[0] is not None
            req.slot, req.cached = got
            prefill.append(req)
        batch = Batch(prefill, list(self.running))
        self.running.extend(prefill)
        return batch, outputs

    def retire_cancelled(self) -> list[Emit]:
        gone = [r for r in [*self.waiting, *self.running] if r.cancelled]
        return [self._finish(r, "cancelled", "") for r in gone]

    def abort_all(self, reason: str) -> list[Emit]:
        """Finish every live request with `reason` ("cancelled" at shutdown, "error" after a failed step)."""
        emits = [self._finish(r, reason, "") for r in [*self.waiting, *self.running]]
        self.slots.forget()  # a failed step may have written part of its rows
        return emits

    def postprocess(self, reqs: Sequence[Request], tokens: Sequence[int],
                    logprobs: Sequence[TokenLogprob | None]) -> list[Emit]:
        """Apply one sampled token per request (in `reqs` order); return (request, Output) for each."""
        outputs = []
        for req, token, lp in zip(reqs, tokens, logprobs):
            if req.finish_reason is not None:  # finished (e.g. aborted) while the model ran
                continue
            if token == self.eos_id and not req.params.ignore_eos:
                outputs.append(self._finish(req, "eos", req.stream.finish() if req.stream else ""))
                continue
            req.output_ids.append(token)
            text = req.stream.push(token) if req.stream else ""
            new = [lp] if lp is not None else []
            if req.stream and req.stream.stopped:
                outputs.append(self._finish(req, "stop", text, [token], new))
            elif (len(req.output_ids) >= req.params.max_new_tokens
                  or len(req.prompt_ids) + len(req.output_ids) >= self.max_seq_len):
                text += req.stream.finish() if req.stream else ""
                outputs.append(self._finish(req, "length", text, [token], new))
            else:
                req.text += text
                outputs.append(self._output(req, [token], text, new))
        return outputs

    def _finish(self, req: Request, reason: str, text: str, token_ids: list[int] | None = None,
                logprobs: list[TokenLogprob] | None = None) -> Emit:
        req.finish_reason = reason
        req.text += text
        self.finished[reason] += 1
        if req.slot >= 0:
            # The row holds the prompt and every output token fed back so far (not the last one).
            held = req.prompt_ids + req.output_ids[:-1] if req.exact_kv and req.output_ids else None
            self.slots.release(req.slot, held)
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        del self.requests[req.id]
        return self._output(req, token_ids or [], text, logprobs or [])

    @staticmethod
    def _output(req: Request, token_ids: list[int], text: str, logprobs: list[TokenLogprob]) -> Emit:
        return req, Output(req.id, token_ids, text, logprobs, req.finish_reason, len(req.prompt_ids),
                           len(req.output_ids))
