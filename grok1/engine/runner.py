"""ModelRunner: one engine step, batch -> tensors -> forward -> sampled tokens (nano-vllm's ModelRunner).

It owns the model and its KV cache and nothing else: no queues, no threads, no requests. A step comes in as a
`StepInput`, plain data (ints, lists, SamplingParams) that pickles and broadcasts as it is, so under tensor
parallelism every rank runs the same StepInput through its shard of the model.

A step's new prompts run one of two ways (`StepInput.one_pass`, chosen by the engine with `fits_one_pass`):
  - one pass: every token is a row of its own ([N, 1], its position and cache row), the prompts' tokens and
    the decode rows in one forward, nothing padded; each prompt's keys and values are then the same bits
    whatever else shared the batch;
  - padded: the prompts right-padded into one forward (batched attention), then the decode rows in another.
One token is sampled per sequence with its own SamplingParams and seeded generator, so a request gets the same
tokens whatever else shares the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor

from grok1 import kernels
from grok1.engine.cache import clear_slot
from grok1.engine.sampling import SamplingParams, logprobs, sample_requests, within_vocab
from grok1.engine.scheduler import TokenLogprob
from grok1.model import ForwardMeta, Transformer

# Rows (tokens) up to which a step's prompts and decode rows share one forward: below the compiled
# kernel's switch to BLAS (kernels.GEMM_MIN_ROWS), where results do not depend on the batch; with
# panel-packed weights (panels.pack_model) no size switches kernels, so the bound only keeps long prompts on
# the padded prefill path (batched attention).
ONE_PASS_ROWS = kernels.GEMM_MIN_ROWS
ONE_PASS_ROWS_PACKED = 512


@dataclass(frozen=True)
class Seq:
    """One request's share of a step."""
    id: str
    slot: int  # its KV-cache row
    tokens: list[int]  # what to feed: a prompt (or the part its row does not hold yet), or the last token
    start: int  # the position of tokens[0]; the row's positions from here on are overwritten
    params: SamplingParams
    logprobs: int | None = None  # None: none; k: the chosen token's logprob and the top k alternatives


@dataclass(frozen=True)
class PromptScore:
    """A new prompt whose own tokens are scored (echo with log-probs): one uncached forward of the whole prompt."""
    id: str
    ids: list[int]
    top: int  # alternatives listed per position


@dataclass(frozen=True)
class StepInput:
    prefill: list[Seq]  # new prompts
    decode: list[Seq]  # running requests, one token each
    one_pass: bool = False  # the prompts as one-token rows in the decode rows' forward (else padded, first)
    scored: list[PromptScore] = field(default_factory=list)

    @property
    def seqs(self) -> list[Seq]:
        """Every sequence in the order of the step's logits and tokens: prompts first."""
        return self.prefill + self.decode


class ModelRunner:
    def __init__(self, model: Transformer, max_batch: int, max_seq_len: int, one_pass_rows: int,
                 sampled_vocab: int | None = None) -> None:
        """sampled_vocab: ids from here on are never sampled (a vocabulary larger than the tokenizer's: no text)."""
        self.model = model
        self.sampled_vocab = sampled_vocab
        self.device = model.norm.weight.device
        self.max_batch = max_batch
        self.cache = model.new_cache(max_batch, max_seq_len)
        self.one_pass_rows = one_pass_rows
        self.generators: dict[str, torch.Generator] = {}  # the seeded sequences' generators, by request id

    def fits_one_pass(self, rows: int) -> bool:
        """Whether a step of `rows` token rows may run in one pass: below the point where the matmuls switch
        kernels, so a prompt gets the same arithmetic whether it arrives alone or joins a running batch."""
        return rows < self.one_pass_rows

    @torch.inference_mode()
    def run(self, step: StepInput) -> tuple[list[int], list[TokenLogprob | None], dict[str, list[TokenLogprob]]]:
        """One token per sequence (step.seqs order) and, for those that asked, its logprobs; the scored prompts'
        per-token logprobs by request id."""
        scored = {p.id: self.score_prompt(p.ids, p.top) for p in step.scored}
        logits = self.forward(step)  # [len(step.seqs), V]
        tokens = self.sample(logits, step)
        return tokens.tolist(), self.logprobs(logits, tokens, step.seqs), scored

    def score_prompt(self, prompt: list[int], top: int) -> list[TokenLogprob]:
        """Each prompt token after the first: its log-prob given the tokens before it and the top `top`
        alternatives, from one uncached forward of the whole prompt (the same numbers as a full forward of the
        sequence alone)."""
        ids = torch.tensor([prompt], device=self.device)
        lp = logprobs(self.model(ids)[0, :-1])  # [T-1, V]
        chosen = lp.gather(-1, ids[0, 1:, None])[:, 0].tolist()
        values, alts = lp.topk(top, dim=-1) if top else (lp[:, :0], lp[:, :0].long())
        return [TokenLogprob(t, c, list(zip(i, v))) for t, c, i, v in
                zip(prompt[1:], chosen, alts.tolist(), values.tolist())]

    def forward(self, step: StepInput) -> Tensor:
        """Logits [len(step.seqs), V] of each sequence's last token."""
        if step.one_pass:
            return self._one_pass(step.prefill, step.decode)
        parts = [self._prefill(step.prefill)] if step.prefill else []
        if step.decode:
            parts.append(self._decode(step.decode))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _prefill(self, seqs: list[Seq]) -> Tensor:
        lengths = torch.tensor([len(s.tokens) for s in seqs], device=self.device)
        tokens = torch.full((len(seqs), int(lengths.max())), self.model.config.pad_id, device=self.device)
        for i, s in enumerate(seqs):
            clear_slot(self.cache, s.slot, s.start)
            tokens[i, : len(s.tokens)] = torch.tensor(s.tokens)
        rows = torch.tensor([s.slot for s in seqs], device=self.device)
        start = torch.tensor([s.start for s in seqs], device=self.device)
        return self.model(tokens, start, self.cache, ForwardMeta(logits_at=lengths - 1, cache_rows=rows))  # [B, V]

    def _one_pass(self, prefill: list[Seq], decode: list[Seq]) -> Tensor:
        tokens, pos, rows, last = [], [], [], []
        for i, s in enumerate([*prefill, *decode]):  # positions before s.start: already in its row (prefix reuse)
            if i < len(prefill):
                clear_slot(self.cache, s.slot, s.start)
            tokens += s.tokens
            pos += range(s.start, s.start + len(s.tokens))
            rows += [s.slot] * len(s.tokens)
            last.append(len(tokens) - 1)
        as_tensor = partial(torch.tensor, device=self.device)
        meta = ForwardMeta(cache_rows=as_tensor(rows), logits_rows=as_tensor(last))
        return self.model(as_tensor(tokens)[:, None], as_tensor(pos), self.cache, meta)[:, 0]  # [len(seqs), V]

    def _decode(self, seqs: list[Seq]) -> Tensor:
        tokens = torch.tensor([s.tokens for s in seqs], device=self.device)  # [B, 1]
        pos = torch.tensor([s.start for s in seqs], device=self.device)
        slots = [s.slot for s in seqs]
        # A batch that is every cache row in order needs no row indices: the cache hands out views, not copies.
        rows = None if slots == list(range(self.max_batch)) else torch.tensor(slots, device=self.device)
        return self.model(tokens, pos, self.cache, ForwardMeta(cache_rows=rows))[:, 0]  # [B, V]

    def sample(self, logits: Tensor, step: StepInput) -> Tensor:
        """One token per sequence, with its own SamplingParams and generator (greedy rows: argmax)."""
        for s in step.prefill:
            if s.params.seed is not None:
                self.generators[s.id] = torch.Generator().manual_seed(s.params.seed)
        seqs = step.seqs
        generators = [self.generators.get(s.id) for s in seqs]
        self.generators = {s.id: g for s, g in zip(seqs, generators) if g is not None}  # every running one is here
        logits = within_vocab(logits, self.sampled_vocab)
        return sample_requests(logits, [s.params for s in seqs], generators, kernels.argmax)

    def logprobs(self, logits: Tensor, tokens: Tensor, seqs: list[Seq]) -> list[TokenLogprob | None]:
        rows = [i for i, s in enumerate(seqs) if s.logprobs is not None]
        out: list[TokenLogprob | None] = [None] * len(seqs)
        if not rows:
            return out
        idx = torch.tensor(rows, device=self.device)
        lp = logprobs(logits[idx])  # [R, V]
        chosen = lp.gather(-1, tokens[idx, None])[:, 0].tolist()
        k = max(seqs[i].logprobs or 0 for i in rows)
        values, ids = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
        top_lp, top_ids = values.tolist(), ids.tolist()
        for j, i in enumerate(rows):
            n = seqs[i].logprobs or 0
            out[i] = TokenLogprob(int(tokens[i]), chosen[j], list(zip(top_ids[j][:n], top_lp[j][:n])))
        return out
