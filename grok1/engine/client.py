"""The engine as its callers (the server, `grok1 chat`, `grok1 generate`) see it: one interface, whether the
engine loop runs on a thread of this process (`Engine`) or in a child process (`EngineProcess`).

A request is checked once, here at the edge, by `check_request`: whatever passes reaches the scheduler and the
model as it is, and whatever does not is a typed error (`grok1.engine.errors`) before anything was queued.
Outputs reach each request's `on_output` callback on the thread that delivers them (the engine's, or the
reader of the child's pipe); `stream()` turns them into an iterator.
"""

from __future__ import annotations

import queue
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from grok1.engine.errors import ContextOverflow, InvalidRequest, QueueFull
from grok1.engine.sampling import SamplingParams
from grok1.engine.scheduler import Output
from grok1.tokenizer import Tokenizer

POLL_S = 0.1  # how long stream() waits for an output before looking again (keeps Ctrl-C responsive)


class RequestHandle(Protocol):
    """What add_request returns: the request's id (to cancel it) and, once it has finished, why."""
    id: str
    finish_reason: str | None


class EngineClient(ABC):
    max_seq_len: int  # tokens per request: prompt plus completion
    max_queue: int  # waiting requests beyond which add_request raises QueueFull
    tokenizer: Tokenizer | None  # given, outputs carry text
    on_step: Callable[[int, float], None] | None  # metrics hook, called once per step: (batch size, seconds)
    on_death: Callable[[int | None], None] | None = None  # called if the loop ends on its own (a child process
                                                          # died: its exit code)

    @abstractmethod
    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams, request_id: str | None = None,
                    logprobs: int | None = None, on_output: Callable[[Output], None] | None = None,
                    prompt_logprobs: int | None = None) -> RequestHandle:
        """Queue a prompt. Raises InvalidRequest (ContextOverflow) for a request that can never run, QueueFull when
        too many wait, EngineUnavailable (ShuttingDown) when the engine takes no work. prompt_logprobs=k: the first
        output also carries each prompt token's log-prob and its top k alternatives (`Output.prompt_logprobs`,
        for echo and scoring)."""

    @abstractmethod
    def cancel(self, request_id: str) -> None:
        """Cancel a request (e.g. its client went away); it finishes as "cancelled" at the next step."""

    @abstractmethod
    def cancel_all(self) -> None:
        """Cancel every queued and running request (e.g. at the end of a graceful shutdown)."""

    @abstractmethod
    def stats(self) -> dict:
        """Queue lengths, free slots and token counters (see Engine.stats)."""

    @abstractmethod
    def alive(self) -> bool:
        """Whether the engine loop is running."""

    def stalled(self) -> bool:
        """Whether the engine loop runs but has stopped answering (a child process gone silent); see alive()."""
        return False

    @abstractmethod
    def start(self) -> None:
        """Start the engine loop (if it does not run yet)."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stop the engine loop; requests still queued or running finish as "cancelled"."""

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams, logprobs: int | None = None) -> Iterator[Output]:
        """Queue a request now (add_request's errors come from this call) and return its outputs as they come, to
        its finish. Closing the iterator early cancels the request."""
        outputs: queue.SimpleQueue[Output] = queue.SimpleQueue()
        req = self.add_request(prompt_ids, params, logprobs=logprobs, on_output=outputs.put)
        return self.follow(req, outputs)

    def follow(self, req: RequestHandle, outputs: queue.SimpleQueue[Output]) -> Iterator[Output]:
        """The outputs `req` delivers to `outputs`, to its finish; closing the iterator early cancels it."""
        try:
            while True:
                out = self.next_output(outputs)
                if out is not None:
                    yield out
                    if out.finish_reason is not None:
                        return
        finally:
            if req.finish_reason is None:
                self.cancel(req.id)

    def next_output(self, outputs: queue.SimpleQueue[Output]) -> Output | None:
        """The next output delivered to `outputs`, or None after a short wait (the loop runs elsewhere)."""
        try:
            return outputs.get(timeout=POLL_S)
        except queue.Empty:
            return None


def check_request(prompt_ids: Sequence[int], params: SamplingParams, vocab_size: int, max_seq_len: int,
                  has_tokenizer: bool) -> None:
    """Raise InvalidRequest for a prompt that is empty or holds an id outside the vocabulary, ContextOverflow
    for one that does not fit the context with one generated token, InvalidRequest for stop strings without a
    tokenizer (they need the text)."""
    n = len(prompt_ids)
    if n == 0:
        raise InvalidRequest("the prompt is empty: generation needs at least one prompt token")
    if n >= max_seq_len:
        raise ContextOverflow(f"the prompt has {n} tokens but the context holds {max_seq_len} "
                              f"(prompt plus at least one generated token must fit)")
    bad = [t for t in prompt_ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequest(f"token id {bad[0]} is outside the model's vocabulary (0..{vocab_size - 1})")
    if params.stop and not has_tokenizer:
        raise InvalidRequest("stop strings need a tokenizer")


def check_room(waiting: int, max_queue: int) -> None:
    """Raise QueueFull when `waiting` requests already fill the queue."""
    if waiting >= max_queue:
        raise QueueFull(f"{waiting} requests are already waiting (the limit is {max_queue})")
