"""Log-likelihoods from full forwards of the model (no generation, no KV cache).

Sequences are sorted by length, right-padded with the pad id and run `batch` at a time; padding sits after
every real token, so with causal attention it changes nothing the real tokens see. Shapes: B sequences,
T tokens, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from grok1.model import ForwardMeta, Transformer


def _batches(seqs: Sequence[Sequence[int]], batch: int) -> Iterator[list[int]]:
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    for s in range(0, len(order), batch):
        yield order[s: s + batch]


def _padded(model: Transformer, seqs: list[Sequence[int]]) -> tuple[Tensor, Tensor]:
    device = model.norm.weight.device
    lengths = torch.tensor([len(s) for s in seqs], device=device)
    tokens = torch.full((len(seqs), int(lengths.max())), model.config.pad_id, dtype=torch.long, device=device)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
    return tokens, lengths


@torch.inference_mode()
def next_token_logprobs(model: Transformer, seqs: Sequence[Sequence[int]], batch: int = 8,
                        done: Callable[[int, list[float]], None] | None = None) -> list[list[float]]:
    """For each sequence s, [log p(s[t] | s[:t]) for t in 1..len(s)-1] (len(s) - 1 values, float32 math).
    `done(i, values)` is called as each sequence's values are ready."""
    out: list[list[float]] = [[] for _ in seqs]
    for idx in _batches(seqs, batch):
        tokens, lengths = _padded(model, [seqs[i] for i in idx])
        logp = model(tokens)[:, :-1].float().log_softmax(dim=-1)  # [B, T-1, V]
        picked = logp.gather(-1, tokens[:, 1:, None])[..., 0]  # [B, T-1]
        for row, i in enumerate(idx):
            out[i] = picked[row, : int(lengths[row]) - 1].tolist()
            if done is not None:
                done(i, out[i])
    return out


@torch.inference_mode()
def last_logprobs(model: Transformer, seqs: Sequence[Sequence[int]], token_ids: Sequence[int], batch: int = 8,
                  done: Callable[[int, list[float]], None] | None = None) -> list[list[float]]:
    """For each sequence, the log-probabilities of `token_ids` as its next token (one forward per sequence,
    logits only at its last position)."""
    out: list[list[float]] = [[] for _ in seqs]
    ids = torch.tensor(list(token_ids), device=model.norm.weight.device)
    for idx in _batches(seqs, batch):
        tokens, lengths = _padded(model, [seqs[i] for i in idx])
        logp = model(tokens, meta=ForwardMeta(logits_at=lengths - 1)).float().log_softmax(dim=-1)  # [B, V]
        values = logp[:, ids].tolist()  # [B, len(token_ids)]
        for row, i in enumerate(idx):
            out[i] = values[row]
            if done is not None:
                done(i, out[i])
    return out
