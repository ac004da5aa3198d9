"""The bridge between the engine's thread and the event loop: one API call's requests as a `Job`.

A handler turns its protocol object into engine requests (`Job.submit`), and the engine's `on_output`
callbacks append to the job's list and wake the event loop (`loop.call_soon_threadsafe`, once until the job
has looked). A handler takes everything that arrived at once: when streaming falls behind the engine, a
choice's consecutive outputs go out as one chunk, so a loaded server spends less per token instead of
queueing. A client that goes away (closed stream, or a non-streaming client that disconnects) cancels its
requests, which frees their KV-cache slots at the next engine step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import AsyncIterator
from functools import partial

from fastapi import Request

from grok1.engine.client import EngineClient, RequestHandle
from grok1.engine.errors import EngineError
from grok1.engine.sampling import SamplingParams
from grok1.engine.scheduler import Output, TokenLogprob
from grok1.server import protocol as p
from grok1.server.metrics import Metrics


@dataclasses.dataclass
class Choice:
    """What one engine request has produced so far."""
    prompt_tokens: int = 0
    text: str = ""
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    completion_tokens: int = 0
    finish_reason: str | None = None
    first_token: float | None = None
    prompt_logprobs: list[TokenLogprob] | None = None  # echo with logprobs: prompt tokens 1.. (see Output)


class Job:
    """One API call's engine requests (prompts x n) and the outputs that have arrived for them."""

    def __init__(self, engine: EngineClient, metrics: Metrics) -> None:
        self.engine, self.metrics = engine, metrics
        self.loop = asyncio.get_running_loop()
        self.lock = threading.Lock()  # guards arrived / woken against the engine's thread
        self.arrived: list[tuple[int, Output]] = []
        self.woken = False  # a wake-up is on its way to the event loop
        self.ready = asyncio.Event()
        self.reqs: list[RequestHandle] = []
        self.choices: list[Choice] = []
        self.start = time.perf_counter()

    def submit(self, prompts: list[list[int]], params: list[SamplingParams], logprobs: int | None, param: str,
               prompt_logprobs: int | None = None) -> None:
        """Queue one engine request per prompt; an engine refusal cancels those already queued and becomes the
        matching OpenAI error (`param` names the request field the prompts came from)."""
        try:
            for i, (ids, sp) in enumerate(zip(prompts, params)):
                self.choices.append(Choice(prompt_tokens=len(ids)))
                self.reqs.append(self.engine.add_request(ids, sp, logprobs=logprobs, on_output=partial(self._put, i),
                                                         prompt_logprobs=prompt_logprobs))
        except EngineError as e:
            self.cancel()
            raise p.engine_error(e, param) from e

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
        if out.prompt_logprobs is not None:
            c.prompt_logprobs = out.prompt_logprobs
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
        if "unavailable" in reasons:
            return p.APIError(503, "the engine stopped answering (stopped or hung); retry later", "server_error",
                              code="engine_unavailable")
        if "cancelled" in reasons:
            return p.APIError(503, "the request was cancelled: the server is shutting down", "server_error")
        return None

    def usage(self, n: int) -> dict:
        """The usage object, for a job of `n` choices per prompt."""
        prompt = sum(c.prompt_tokens for c in self.choices[::n])  # each prompt counts once, whatever n
        return p.usage(prompt, sum(c.completion_tokens for c in self.choices))


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
    Job.next) until every choice is done. If the client goes away the response task is cancelled here, and
    the finally cancels the engine requests. An error or cancellation is not a finish here: the stream's
    end reports it (protocol.stream_end), and the text before it is not lost."""
    try:
        while not job.done:
            for i, out in await job.next():
                if out.finish_reason in ("error", "cancelled", "unavailable"):
                    out = dataclasses.replace(out, finish_reason=None)
                if out.text or out.logprobs or out.finish_reason:
                    yield i, out
    finally:
        job.cancel()
