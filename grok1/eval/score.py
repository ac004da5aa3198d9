"""Scoring: how likely a model finds each next token of a sequence (the base of likelihood evaluations), and
the same for a text longer than the context, in overlapping windows."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from grok1.model import Transformer


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


def score_windows(model: Transformer, ids: Sequence[int], top: int, context: int) -> dict:
    """`score` for a text of any length: windows of `context` tokens starting half a context apart. Each token is
    scored once, in the first window that holds it after the window's first half, so it sees at least
    context // 2 tokens before it (all of them within the first window). Adds "windows": how many ran."""
    if len(ids) <= context:
        return score(model, ids, top) | {"windows": 1}
    stride = max(1, context // 2)
    out: dict = {"token_logprobs": [], "top_ids": [], "top_logprobs": []}
    done, start, windows = 1, 0, 0  # ids[:done] are scored (ids[0], without context, never is)
    while done < len(ids):
        window = ids[start:start + context]
        result = score(model, window, top)  # scores ids[start + 1 : start + len(window)]
        skip = done - (start + 1)
        for key in out:
            out[key] += result[key][skip:]
        done, start, windows = start + len(window), start + stride, windows + 1
    total = sum(out["token_logprobs"])
    return out | {"total_logprob": total, "perplexity": math.exp(-total / len(out["token_logprobs"])),
                  "windows": windows}
