"""Engine: owns the model, the tokenizer, one static KV cache and the Scheduler.

`step()` is schedule -> run the model -> sample -> postprocess:
  - requests admitted this step are prefilled into their own cache rows (`cache_rows`), giving the
    logits of each prompt's last token: short prompts as one-token rows in the same forward as the
    decode rows, longer ones together, right-padded; with packed weights, a prompt admitted into a row
    that still holds a finished request's tokens skips the prefix they share (prefix reuse);
  - every other running request decodes one token in a batched forward over its rows;
  - one token is sampled per request with its own SamplingParams and seeded generator, so a
    request gets the same tokens whatever else shares the batch.

Threading: `add_request()` and `cancel()` may be called from any thread; `step()` runs on one
thread only: the caller's (`stream()`, `generate()`) or the background thread of `start()`.
Outputs reach each request's `on_output` callback on that thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from grok1 import kernels
from grok1.engine.cache import clear_slot
from grok1.engine.errors import ShuttingDown
from grok1.engine.sampling import SamplingParams, logprobs, sample_requests, within_vocab
from grok1.engine.scheduler import Batch, Emit, Output, Request, Scheduler, TokenLogprob, check_prompt
from grok1.model import ForwardMeta, Transformer
from grok1.panels import is_packed
from grok1.tokenizer import Tokenizer

log = logging.getLogger("grok1.engine")

# Rows (tokens) up to which a step's prompts and decode rows share one forward: below the compiled
# kernel's switch to BLAS (kernels.GEMM_MIN_ROWS), where results do not depend on the batch; with
# panel-packed weights (panels.pack_model) no size switches kernels, so the bound only keeps long prompts on
# the padded prefill path (batched attention).
ONE_PASS_ROWS = kernels.GEMM_MIN_ROWS
ONE_PASS_ROWS_PACKED = 512


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 16  # KV-cache rows = requests decoding together
    max_seq_len: int = 2048  # tokens per row (prompt + completion); capped at the model's context
    max_queue: int = 256  # waiting requests beyond which add_request raises QueueFull
    prefill_tokens: int = 4096  # padded prompt tokens one prefill may hold (at least one prompt)
    prefix_reuse: bool = True  # a prompt starting like a finished request's tokens reuses its cache row
                               # (where exact: packed models, see Engine.__init__)


class Engine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer | None, config: EngineConfig = EngineConfig()) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.config = config
        self.max_seq_len = min(config.max_seq_len, model.config.max_seq_len)
        self.device = model.norm.weight.device
        self.cache = model.new_cache(config.max_batch, self.max_seq_len)
        # With every matrix in panels a token's keys and values are the same bits whatever batch computed
        # them, so a cache row's earlier tokens can stand in for a new prompt's: prefix reuse changes nothing.
        packed = is_packed(model)
        self.scheduler = Scheduler(config.max_batch, self.max_seq_len, config.max_queue, config.prefill_tokens,
                                   model.config.eos_id, tokenizer, prefix_reuse=config.prefix_reuse and packed)
        self.lock = threading.Lock()  # guards the scheduler between step() and other threads
        self.wakeup = threading.Event()
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.on_step: Callable[[int, float], None] | None = None  # metrics hook: (batch size, seconds)
        self.steps = self.prompt_tokens = self.generated_tokens = self.reused_tokens = 0
        self.one_pass_rows = ONE_PASS_ROWS_PACKED if packed else ONE_PASS_ROWS

    # ---- requests (any thread) ----

    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams, request_id: str | None = None,
                    logprobs: int | None = None, on_output: Callable[[Output], None] | None = None,
                    detokenize: bool = True, prompt_logprobs: int | None = None) -> Request:
        """Queue a prompt. Raises ValueError (prompt empty, too long for the context, or an id outside the
        vocabulary) or QueueFull. detokenize=False: outputs carry no text unless stop strings need it (a
        caller that decodes the ids itself). prompt_logprobs=k: the first output also carries each prompt
        token's log-prob and its top k alternatives (`Output.prompt_logprobs`, for echo/scoring)."""
        check_prompt(prompt_ids, self.model.config.vocab_size, self.max_seq_len)
        req = Request(list(prompt_ids), params, logprobs=logprobs if logprobs is not None else
                      (params.logprobs or None), on_output=on_output, detokenize=detokenize,
                      prompt_logprobs=prompt_logprobs)
        if request_id is not None:
            req.id = request_id
        with self.lock:
            if self.stopping:
                raise ShuttingDown("the engine is shutting down")
            self.scheduler.add(req)
        self.wakeup.set()
        return req

    def cancel(self, request_id: str) -> None:
        """Cancel a request (e.g. its client went away); its slot is freed at the next step."""
        with self.lock:
            self.scheduler.cancel(request_id)
        self.wakeup.set()

    def cancel_all(self) -> None:
        """Cancel every queued and running request (e.g. at the end of a graceful shutdown)."""
        with self.lock:
            for request_id in list(self.scheduler.requests):
                self.scheduler.cancel(request_id)
        self.wakeup.set()

    def stats(self) -> dict:
        with self.lock:
            s = self.scheduler
            return {"waiting": len(s.waiting), "running": len(s.running), "free_slots": s.slots.num_free,
                    "max_batch": s.slots.n_slots, "steps": self.steps, "prompt_tokens": self.prompt_tokens,
                    "generated_tokens": self.generated_tokens, "reused_prompt_tokens": self.reused_tokens,
                    "finished": dict(s.finished)}

    # ---- the step (one thread) ----

    @torch.inference_mode()
    def step(self) -> list[Output]:
        """Schedule, run the model once for the batch, sample, postprocess; deliver and return the outputs."""
        t0 = time.perf_counter()
        with self.lock:
            batch, emits = self.scheduler.schedule()
        batch.decode.sort(key=lambda r: r.slot)  # row order (outputs follow the requests, so any order is fine)
        scored = {r.id: self._prompt_logprobs(r) for r in batch.prefill if r.prompt_logprobs is not None}
        if len(batch):
            if batch.prefill and self._fits_one_pass(batch):
                logits = self._prefill_with_decode(batch.prefill, batch.decode)
            else:
                parts = [self._prefill(batch.prefill)] if batch.prefill else []
                if batch.decode:
                    parts.append(self._decode(batch.decode))
                logits = torch.cat(parts) if len(parts) > 1 else parts[0]  # [B, V], prefill rows first
            reqs = batch.prefill + batch.decode
            tokens = self._sample(logits, reqs)
            lps = self._logprobs(logits, tokens, reqs)
            with self.lock:
                emits += self.scheduler.postprocess(reqs, tokens.tolist(), lps)
            for req, out in emits:
                if req.id in scored:
                    out.prompt_logprobs = scored.pop(req.id)
            self.steps += 1
            self.prompt_tokens += sum(len(r.prompt_ids) for r in batch.prefill)
            self.reused_tokens += sum(r.cached for r in batch.prefill)
            self.generated_tokens += len(reqs)
            if self.on_step is not None:
                self.on_step(len(batch), time.perf_counter() - t0)
        return self._deliver(emits)

    def _prefill(self, reqs: list[Request]) -> Tensor:
        for r in reqs:  # the padded path computes whole prompts (its keys are not one-token rows' bits)
            r.cached, r.exact_kv = 0, False
        lengths = torch.tensor([len(r.prompt_ids) for r in reqs], device=self.device)
        tokens = torch.full((len(reqs), int(lengths.max())), self.model.config.pad_id, device=self.device)
        for i, r in enumerate(reqs):
            clear_slot(self.cache, r.slot)
            tokens[i, : len(r.prompt_ids)] = torch.tensor(r.prompt_ids)
        rows = torch.tensor([r.slot for r in reqs], device=self.device)
        start = torch.zeros(len(reqs), dtype=torch.long, device=self.device)
        return self.model(tokens, start, self.cache, ForwardMeta(logits_at=lengths - 1, cache_rows=rows))  # [B, V]

    def _prompt_logprobs(self, req: Request) -> list[TokenLogprob]:
        """Each prompt token after the first: its log-prob given the tokens before it and the top
        `req.prompt_logprobs` alternatives, from one uncached forward of the whole prompt (a scoring request:
        the same numbers as a full forward of the sequence alone)."""
        ids = torch.tensor([req.prompt_ids], device=self.device)
        lp = logprobs(self.model(ids)[0, :-1])  # [T-1, V]
        chosen = lp.gather(-1, ids[0, 1:, None])[:, 0].tolist()
        k = req.prompt_logprobs or 0
        values, top = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
        return [TokenLogprob(t, c, list(zip(i, v))) for t, c, i, v in
                zip(req.prompt_ids[1:], chosen, top.tolist(), values.tolist())]

    def _fits_one_pass(self, batch: Batch) -> bool:
        """Short prompts run as one-token rows (riding along with the decode rows, if any) while the rows stay
        below the point where the matmuls switch kernels: a prompt then gets the same arithmetic whether it
        arrives alone or joins a running batch."""
        return len(batch.decode) + sum(len(r.prompt_ids) - r.cached for r in batch.prefill) < self.one_pass_rows

    def _prefill_with_decode(self, prefill: list[Request], decode: list[Request]) -> Tensor:
        """One forward for new prompts and running requests: every token is a row of its own ([N, 1], its
        position and cache row), so nothing is padded; logits for each prompt's last token and each decode row."""
        tokens, pos, rows, last = [], [], [], []
        for r in prefill:  # positions before r.cached: already in its row (prefix reuse)
            clear_slot(self.cache, r.slot, r.cached)
            tokens += r.prompt_ids[r.cached:]
            pos += range(r.cached, len(r.prompt_ids))
            rows += [r.slot] * (len(r.prompt_ids) - r.cached)
            last.append(len(tokens) - 1)
            r.exact_kv = True
        last += range(len(tokens), len(tokens) + len(decode))
        tokens += [r.output_ids[-1] for r in decode]
        pos += [r.last_pos for r in decode]
        rows += [r.slot for r in decode]
        as_tensor = partial(torch.tensor, device=self.device)
        return self.model(as_tensor(tokens)[:, None], as_tensor(pos), self.cache,
                          ForwardMeta(cache_rows=as_tensor(rows), logits_rows=as_tensor(last)))[:, 0]  # [len(prefill) + len(decode), V]

    def _decode(self, reqs: list[Request]) -> Tensor:
        tokens = torch.tensor([[r.output_ids[-1]] for r in reqs], device=self.device)  # [B, 1]
        pos = torch.tensor([r.last_pos for r in reqs], device=self.device)
        slots = [r.slot for r in reqs]
        # A batch that is every cache row in order needs no row indices: the cache hands out views, not copies.
        rows = None if slots == list(range(self.config.max_batch)) else torch.tensor(slots, device=self.device)
        return self.model(tokens, pos, self.cache, ForwardMeta(cache_rows=rows))[:, 0]  # [B, V]

    def _sample(self, logits: Tensor, reqs: list[Request]) -> Tensor:
        """One token per request, with its own SamplingParams and generator (greedy rows: argmax)."""
        logits = within_vocab(logits, self.tokenizer.vocab_size if self.tokenizer is not None else None)
        return sample_requests(logits, [r.params for r in reqs], [r.generator for r in reqs], kernels.argmax)

    def _logprobs(self, logits: Tensor, tokens: Tensor, reqs: list[Request]) -> list[TokenLogprob | None]:
        rows = [i for i, r in enumerate(reqs) if r.logprobs is not None]
        out: list[TokenLogprob | None] = [None] * len(reqs)
        if not rows:
            return out
        idx = torch.tensor(rows, device=self.device)
        lp = logprobs(logits[idx])  # [R, V]
        chosen = lp.gather(-1, tokens[idx, None])[:, 0].tolist()
        k = max(reqs[i].logprobs or 0 for i in rows)
        values, ids = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
        top_lp, top_ids = values.tolist(), ids.tolist()
        for j, i in enumerate(rows):
            n = reqs[i].logprobs or 0
            out[i] = TokenLogprob(int(tokens[i]), chosen[j], list(zip(top_ids[j][:n], top_lp[j][:n])))
        return out

    @staticmethod
    def _deliver(emits: list[Emit]) -> list[Output]:
        for req, out in emits:
            if req.on_output is not None:
                req.on_output(out)
        return [out for _, out in emits]

    # ---- driving it ----

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams, logprobs: int | None = None) -> Iterator[Output]:
        """Run one request to the end, stepping on the caller's thread (no background thread);
        other queued requests advance too. Closing the iterator early cancels the request."""
        assert self.thread is None, "stream() steps itself; with start() use add_request(on_output=...)"
        pending: list[Output] = []
        req = self.add_request(prompt_ids, params, logprobs=logprobs, on_output=pending.append)
        try:
            while True:
                if not pending:
                    self.step()
                while pending:
                    out = pending.pop(0)
                    yield out
                    if out.finish_reason is not None:
                        return
        finally:
            if req.finish_reason is None:
                self.cancel(req.id)
                with self.lock:
                    self._deliver(self.scheduler.retire_cancelled())

    def generate(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]) -> list[Request]:
        """Queue all prompts, step until every one is finished; the finished Requests in prompt order."""
        assert self.thread is None, "generate() steps itself; stop the background thread first"
        reqs = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        while any(r.finish_reason is None for r in reqs):
            self.step()
        return reqs

    def start(self) -> None:
        """Run step() on a background thread until shutdown()."""
        assert self.thread is None, "the engine thread is already running"
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="grok1-engine", daemon=True)
        self.thread.start()

    def shutdown(self) -> None:
        """Stop the background thread; requests still queued or running finish as "cancelled"."""
        with self.lock:
            self.stopping = True
        self.wakeup.set()
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        with self.lock:
            emits = self.scheduler.abort_all("cancelled")
        self._deliver(emits)

    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def _loop(self) -> None:
        while not self.stopping:
            with self.lock:
                idle = not self.scheduler.has_work()
            if idle:
                self.wakeup.wait(timeout=0.5)
                self.wakeup.clear()
                continue
            try:
                self.step()
            except Exception:  # keep serving: fail the requests of the broken step, not the engine
                log.exception("engine step failed; finishing its requests with an error")
                with self.lock:
                    emits = self.scheduler.abort_all("error")
                self._deliver(emits)
