"""Engine: the loop over the Scheduler (queues) and the ModelRunner (the model), nano-vllm's LLMEngine.

`step()` is schedule -> plan -> run the model -> postprocess:
  - requests admitted this step are prefilled into their own cache rows, giving the logits of each prompt's
    last token: short prompts as one-token rows in the same forward as the decode rows, longer ones together,
    right-padded; with packed weights, a prompt admitted into a row that still holds a finished request's
    tokens skips the prefix they share (prefix reuse);
  - every other running request decodes one token in a batched forward over its rows;
  - one token is sampled per request with its own SamplingParams and seeded generator.

`loop()` steps while there is work until `stop()`; the background thread of `start()` runs it, and so does
EngineProcess's child. Threading: `add_request()` and `cancel()` may be called from any thread; `step()` runs
on one thread only: the loop's, or the caller's (`generate()`, `stream()` while no loop runs). Outputs reach
each request's `on_output` callback on that thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from grok1.engine.client import EngineClient, check_request, check_room
from grok1.engine.errors import InvalidRequest, ShuttingDown
from grok1.engine.runner import ONE_PASS_ROWS, ONE_PASS_ROWS_PACKED, ModelRunner, PromptScore, Seq, StepInput
from grok1.engine.sampling import SamplingParams
from grok1.engine.scheduler import Batch, Emit, Output, Request, Scheduler
from grok1.model import Transformer
from grok1.panels import is_packed
from grok1.tokenizer import Tokenizer

log = logging.getLogger("grok1.engine")

IDLE_WAIT_S = 0.5  # how long the idle loop waits for a request before looking again


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 16  # KV-cache rows = requests decoding together
    max_seq_len: int = 2048  # tokens per row (prompt + completion); capped at the model's context
    max_queue: int = 256  # waiting requests beyond which add_request raises QueueFull
    prefill_tokens: int = 4096  # padded prompt tokens one prefill may hold (at least one prompt)
    prefix_reuse: bool = True  # a prompt starting like a finished request's tokens reuses its cache row
                               # (where exact: packed models, see Engine.__init__)


class Engine(EngineClient):
    def __init__(self, model: Transformer, tokenizer: Tokenizer | None, config: EngineConfig = EngineConfig()) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.config = config
        self.max_seq_len = min(config.max_seq_len, model.config.max_seq_len)
        self.max_queue = config.max_queue
        # With every matrix in panels a token's keys and values are the same bits whatever batch computed
        # them, so a cache row's earlier tokens can stand in for a new prompt's: prefix reuse changes nothing.
        packed = is_packed(model)
        self.runner = ModelRunner(model, config.max_batch, self.max_seq_len,
                                  ONE_PASS_ROWS_PACKED if packed else ONE_PASS_ROWS,
                                  tokenizer.vocab_size if tokenizer is not None else None)
        self.scheduler = Scheduler(config.max_batch, self.max_seq_len, config.prefill_tokens, model.config.eos_id,
                                   tokenizer, prefix_reuse=config.prefix_reuse and packed)
        self.lock = threading.Lock()  # guards the scheduler between step() and other threads
        self.wakeup = threading.Event()
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.on_step: Callable[[int, float], None] | None = None
        self.steps = self.prompt_tokens = self.generated_tokens = self.reused_tokens = 0

    # ---- requests (any thread) ----

    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams, request_id: str | None = None,
                    logprobs: int | None = None, on_output: Callable[[Output], None] | None = None,
                    prompt_logprobs: int | None = None, detokenize: bool = True) -> Request:
        """Check and queue a prompt (see EngineClient.add_request). detokenize=False: outputs carry no text
        unless stop strings need it (a caller that decodes the ids itself)."""
        check_request(prompt_ids, params, self.model.config.vocab_size, self.max_seq_len, self.tokenizer is not None)
        req = Request(list(prompt_ids), params, logprobs=logprobs, on_output=on_output, detokenize=detokenize,
                      prompt_logprobs=prompt_logprobs)
        if request_id is not None:
            req.id = request_id
        with self.lock:
            if self.stopping:
                raise ShuttingDown("the engine is shutting down")
            check_room(len(self.scheduler.waiting), self.max_queue)
            if req.id in self.scheduler.requests:
                raise InvalidRequest(f"request id {req.id!r} is already in use")
            self.scheduler.add(req)
        self.wakeup.set()
        return req

    def submit(self, req: Request) -> None:
        """Queue a request that was checked where it came in (EngineProcess's parent checks its child's)."""
        with self.lock:
            self.scheduler.add(req)
        self.wakeup.set()

    def cancel(self, request_id: str) -> None:
        with self.lock:
            self.scheduler.cancel(request_id)
        self.wakeup.set()

    def cancel_all(self) -> None:
        with self.lock:
            for request_id in list(self.scheduler.requests):
                self.scheduler.cancel(request_id)
        self.wakeup.set()

    def has_work(self) -> bool:
        with self.lock:
            return self.scheduler.has_work()

    def stats(self) -> dict:
        with self.lock:
            s = self.scheduler
            return {"waiting": len(s.waiting), "running": len(s.running), "free_slots": s.slots.num_free,
                    "max_batch": s.slots.n_slots, "steps": self.steps, "prompt_tokens": self.prompt_tokens,
                    "generated_tokens": self.generated_tokens, "reused_prompt_tokens": self.reused_tokens,
                    "finished": dict(s.finished)}

    # ---- the step (one thread) ----

    def step(self) -> list[Output]:
        """Schedule, run the model once for the batch, postprocess; deliver and return the outputs."""
        t0 = time.perf_counter()
        with self.lock:
            batch, emits = self.scheduler.schedule()
        if len(batch):
            tokens, lps, scored = self.runner.run(self.plan(batch))
            reqs = batch.prefill + batch.decode
            with self.lock:
                emits += self.scheduler.postprocess(reqs, tokens, lps)
            for req, out in emits:
                if req.id in scored:
                    out.prompt_logprobs = scored.pop(req.id)
            self.steps += 1
            self.prompt_tokens += sum(len(r.prompt_ids) for r in batch.prefill)
            self.reused_tokens += sum(r.cached for r in batch.prefill)
            self.generated_tokens += len(reqs)
            if self.on_step is not None:
                self.on_step(len(batch), time.perf_counter() - t0)
        return deliver(emits)

    def plan(self, batch: Batch) -> StepInput:
        """The batch as the runner's plain input: what each request feeds, from which position, into which row.
        Short prompts run in one pass with the decode rows; the padded path computes whole prompts (its keys
        are not one-token rows' bits, so its rows' contents are not reused later)."""
        batch.decode.sort(key=lambda r: r.slot)  # row order (outputs follow the requests, so any order is fine)
        rows = len(batch.decode) + sum(len(r.prompt_ids) - r.cached for r in batch.prefill)
        one_pass = bool(batch.prefill) and self.runner.fits_one_pass(rows)
        for r in batch.prefill:
            r.cached = r.cached if one_pass else 0
            r.exact_kv = one_pass
        prefill = [Seq(r.id, r.slot, r.prompt_ids[r.cached:], r.cached, r.params, r.logprobs) for r in batch.prefill]
        decode = [Seq(r.id, r.slot, r.output_ids[-1:], r.last_pos, r.params, r.logprobs) for r in batch.decode]
        scored = [PromptScore(r.id, r.prompt_ids, r.prompt_logprobs) for r in batch.prefill
                  if r.prompt_logprobs is not None]
        return StepInput(prefill, decode, one_pass, scored)

    # ---- the loop ----

    def loop(self, receive: Callable[[float], None] | None = None, flush: Callable[[], None] = lambda: None) -> None:
        """Step while there is work, until stop(); then finish what is left as "cancelled".

        `receive(timeout)` takes in what arrived for the engine, waiting up to `timeout` seconds while idle
        (default: the wakeup that add_request and cancel set); `flush()` runs after each round (the child process
        sends its outputs). A failing step finishes its requests with "error" and the loop goes on."""
        receive = receive or self._wait
        while not self.stopping:
            receive(0.0 if self.has_work() else IDLE_WAIT_S)
            if self.has_work() and not self.stopping:
                try:
                    self.step()
                except Exception:  # keep serving: fail the requests of the broken step, not the engine
                    log.exception("engine step failed; finishing its requests with an error")
                    self._abort("error")
            flush()
        self._abort("cancelled")
        flush()

    def _wait(self, timeout: float) -> None:
        self.wakeup.wait(timeout)
        self.wakeup.clear()

    def _abort(self, reason: str) -> None:
        with self.lock:
            emits = self.scheduler.abort_all(reason)
        deliver(emits)

    def stop(self) -> None:
        """Make the loop finish (what is still queued or running ends as "cancelled") and refuse new requests."""
        with self.lock:
            self.stopping = True
        self.wakeup.set()

    def start(self) -> None:
        """Run the loop on a background thread until shutdown()."""
        assert self.thread is None, "the engine thread is already running"
        self.stopping = False
        self.thread = threading.Thread(target=self.loop, name="grok1-engine", daemon=True)
        self.thread.start()

    def shutdown(self) -> None:
        self.stop()
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        self._abort("cancelled")  # without a loop, nothing else finishes them

    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    # ---- driving it from the caller's thread ----

    def generate(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]) -> list[Request]:
        """Queue all prompts, step until every one is finished; the finished Requests in prompt order."""
        assert self.thread is None, "generate() steps itself; stop the background thread first"
        reqs = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        while any(r.finish_reason is None for r in reqs):
            self.step()
        return reqs

    def follow(self, req: Request, outputs: queue.SimpleQueue[Output]) -> Iterator[Output]:
        """EngineClient.follow; without a background loop it steps on the caller's thread (other queued requests
        advance too), and an early close frees the request's slot at once."""
        try:
            yield from super().follow(req, outputs)
        finally:
            if self.thread is None:
                with self.lock:
                    emits = self.scheduler.retire_cancelled()
                deliver(emits)

    def next_output(self, outputs: queue.SimpleQueue[Output]) -> Output | None:
        if self.thread is not None:
            return super().next_output(outputs)
        while outputs.empty():
            self.step()
        return outputs.get()


def deliver(emits: list[Emit]) -> list[Output]:
    """Hand each output to its request's on_output; the outputs."""
    for req, out in emits:
        if req.on_output is not None:
            req.on_output(out)
    return [out for _, out in emits]


def engine_for(model: Transformer, tokenizer: Tokenizer | None, prompts: Sequence[Sequence[int]],
               params: Sequence[SamplingParams]) -> Engine:
    """An Engine with a cache row per prompt, as long as the longest request needs (the model's context at
    most): what running a batch of prompts to the end takes (`grok1 generate`)."""
    longest = max(len(p) + sp.max_new_tokens for p, sp in zip(prompts, params))
    return Engine(model, tokenizer, EngineConfig(max_batch=len(prompts), max_seq_len=longest, max_queue=len(prompts)))
