"""Static-batch generation over a preallocated KV cache: prefill, decode_step, generate, score.

Prompts of different lengths are right-padded into one prefill; each row then decodes at its
own position, so every row gets exactly the tokens it would get alone. Stop conditions: EOS
(unless ignore_eos), stop strings (the text is cut before them), max_new_tokens.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from grok1 import kernels
from grok1.engine.sampling import SamplingParams, make_generators, sample_requests, within_vocab
from grok1.model import ForwardMeta, KVCache, Transformer
from grok1.tokenizer import StreamDecoder, Tokenizer


def prefill(model: Transformer, cache: KVCache, prompts: Sequence[Sequence[int]]) -> Tensor:
    """Run the right-padded prompts through the model, filling cache rows 0..B-1; logits [B, V] at each last token."""
    pad = model.config.pad_id
    device = cache.k.device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    tokens = torch.full((len(prompts), int(lengths.max())), pad, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p, dtype=torch.long)
    start = torch.zeros(len(prompts), dtype=torch.long, device=device)
    return model(tokens, start, cache, ForwardMeta(logits_at=lengths - 1))


def decode_step(model: Transformer, cache: KVCache, tokens: Tensor, pos: Tensor) -> Tensor:
    """One token per row: tokens [B] at positions pos [B] -> logits [B, V]."""
    return model(tokens[:, None], pos, cache)[:, 0]


CONTEXT_IDS = 16  # prompt ids replayed into a TextStream's decoder: enough to reach a piece boundary


class TextStream:
    """Incremental text of one request, holding back anything that might begin a stop string."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str], context: Sequence[int] = ()) -> None:
        """`context`: the prompt ids. The continuation is decoded after them, so a first piece like
        "▁may" gives " may" (decoded alone, SentencePiece would drop that leading space)."""
        self.decoder = StreamDecoder(tokenizer)
        for token in context[-CONTEXT_IDS:]:
            self.decoder.push(token)  # primes the decoder; the prompt's own text is not emitted
        self.stop = [s for s in stop if s]
        self.text = ""  # all text decoded so far
        self.emitted = 0  # characters of `text` already handed out
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; return the text that is now final. Sets `stopped` when a stop string appears."""
        return self._advance(self.decoder.push(token))

    def finish(self) -> str:
        """No more tokens: release whatever was held back."""
        return self._advance(self.decoder.flush(), final=True)

    def _advance(self, new: str, final: bool = False) -> str:
        self.text += new
        longest = max((len(s) for s in self.stop), default=0)
        start = max(0, self.emitted - longest)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
            final = True
        safe = len(self.text)
        if not final:  # hold back a suffix that is a prefix of some stop string
            for s in self.stop:
                for n in range(min(len(s) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(s[:n]):
                        safe = min(safe, len(self.text) - n)
                        break
        out, self.emitted = self.text[self.emitted : safe], max(self.emitted, safe)
        return out


@dataclass
class Completion:
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "eos", "stop" or "length"


@torch.no_grad()
def generate_stream(model: Transformer, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams],
                    tokenizer: Tokenizer | None = None) -> Iterator[tuple[int, int, str, Completion]]:
    """Yield (row, token, new_text, completion) as tokens are produced; completions finish in place.

    new_text is "" when no tokenizer is given (stop strings then need one). Raises ValueError
    for an empty prompt or one that does not leave room for a token in the context.
    """
    cfg = model.config
    if len(prompts) != len(params):
        raise ValueError(f"got {len(prompts)} prompts but {len(params)} sampling parameter sets")
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty: generation needs at least one prompt token")
        if len(p) >= cfg.max_seq_len:
            raise ValueError(f"prompt {i} has {len(p)} tokens; the context holds {cfg.max_seq_len}")
    if any(p.stop for p in params) and tokenizer is None:
        raise ValueError("stop strings need a tokenizer")
    device = model.norm.weight.device
    max_len = min(cfg.max_seq_len, max(len(p) + sp.max_new_tokens for p, sp in zip(prompts, params)))
    cache = model.new_cache(len(prompts), max_len)
    generators = make_generators(params, device)
    streams = [TextStream(tokenizer, sp.stop, p) if tokenizer else None for p, sp in zip(prompts, params)]
    done = [Completion(list(p)) for p in prompts]
    pos = torch.tensor([len(p) for p in prompts], device=device)

    logits = prefill(model, cache, prompts)
    while True:
        tokens = sample_requests(within_vocab(logits, tokenizer.vocab_size if tokenizer else None), params,
                                 generators, kernels.argmax)
        for row, token in enumerate(tokens.tolist()):
            c, sp, stream = done[row], params[row], streams[row]
            if c.finish_reason is not None:
                continue
            if token == cfg.eos_id and not sp.ignore_eos:
                c.finish_reason = "eos"
                new = stream.finish() if stream else ""
            else:
                c.token_ids.append(token)
                new = stream.push(token) if stream else ""
                if stream and stream.stopped:
                    c.finish_reason = "stop"
                elif len(c.token_ids) >= sp.max_new_tokens or len(c.prompt_ids) + len(c.token_ids) >= max_len:
                    c.finish_reason = "length"
                    new += stream.finish() if stream else ""
            c.text += new
            yield row, token, new, c
        if all(c.finish_reason is not None for c in done):
            return
        logits = decode_step(model, cache, tokens, pos)
        pos = (pos + 1).clamp(max=max_len - 1)  # finished rows keep decoding harmlessly at the end


def generate(model: Transformer, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams],
             tokenizer: Tokenizer | None = None) -> list[Completion]:
    """Run generate_stream to the end and return one Completion per prompt."""
    completions: dict[int, Completion] = {}
    for row, _, _, c in generate_stream(model, prompts, params, tokenizer):
        completions[row] = c
    return [completions[i] for i in range(len(prompts))]


@torch.no_grad()
def score(model: Transformer, ids: Sequence[int], top: int = 5) -> dict:
    """Log-probability of each next token of `ids` under the model, with the top alternatives.

    Returns {"token_logprobs": [T-1], "top_ids": [T-1][top], "top_logprobs": [T-1][top],
    "total_logprob", "perplexity"}; position t scores ids[t+1] given ids[: t+1].
    """
    if len(ids) < 2:
        raise ValueError("scoring needs at least two tokens (a context and a next token)")
    device = model.norm.weight.device
    tokens = torch.tensor([list(ids)], device=device)
    logp = torch.log_softmax(model(tokens)[0, :-1].float(), dim=-1)  # [T-1, V]
    target = tokens[0, 1:]
    token_lp = logp.gather(-1, target[:, None])[:, 0]
    top_lp, top_ids = logp.topk(top, dim=-1)
    total = float(token_lp.sum())
    return {"token_logprobs": token_lp.tolist(), "top_ids": top_ids.tolist(), "top_logprobs": top_lp.tolist(),
            "total_logprob": total, "perplexity": float(torch.exp(-token_lp.mean()))}
