"""Sampling: SamplingParams and pure functions from logits to token ids and logprobs.

Shapes: B batch rows, V vocab. Every function takes tensors and returns new tensors: no
module state, no in-place edits of the caller's logits, no host sync (.item(), .tolist(),
data-dependent Python branches). Per-row parameters are [B] tensors, so one batch can
mix greedy and sampled requests with different temperatures, top-k and top-p.

Stop strings, EOS and max_new_tokens are fields here but are enforced by the generation
loop, not by these functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

MAX_LOGPROBS = 20

ArgMax = Callable[[Tensor], Tensor]  # [B, V] -> [B] int64, torch.argmax(x, -1)'s answer (e.g. kernels.argmax)


def torch_argmax(x: Tensor) -> Tensor:
    return x.argmax(dim=-1)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # 1 = off
    top_k: int = 0  # 0 = off
    seed: int | None = None  # None = the default torch RNG
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int = 0  # number of top logprobs to return per token; 0 = none
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit) pairs, applied before sampling

    def __post_init__(self) -> None:
        def check(name: str, ok: bool, valid: str) -> None:
            if not ok:
                raise ValueError(f"SamplingParams.{name}={getattr(self, name)!r} is invalid: must be {valid}")

        check("temperature", 0 <= self.temperature < math.inf, "a finite number >= 0 (0 = greedy)")
        check("top_p", 0 < self.top_p <= 1, "in (0, 1] (1 = off)")
        check("top_k", _is_int(self.top_k) and self.top_k >= 0, "an int >= 0 (0 = off)")
        check("max_new_tokens", _is_int(self.max_new_tokens) and self.max_new_tokens >= 1, "an int >= 1")
        check("logprobs", _is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS, f"an int in 0..{MAX_LOGPROBS}")
        check("seed", self.seed is None or _is_int(self.seed), "None or an int")
        stop_ok = isinstance(self.stop, tuple) and all(isinstance(s, str) and s for s in self.stop)
        check("stop", stop_ok, "a tuple of non-empty strings")
        bias_ok = isinstance(self.logit_bias, tuple) and all(
            isinstance(b, tuple) and len(b) == 2 and _is_int(b[0]) and b[0] >= 0 and isinstance(b[1], (int, float))
            and math.isfinite(b[1]) for b in self.logit_bias)
        check("logit_bias", bias_ok, "a tuple of (token id >= 0, finite bias) pairs")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def params_to_tensors(params: Sequence[SamplingParams], device: torch.device | str) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row (temperature float32 [B], top_p float32 [B], top_k int64 [B]) on `device`."""
    temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
    top_k = torch.tensor([p.top_k for p in params], dtype=torch.int64, device=device)
    return temperature, top_p, top_k


def make_generators(params: Sequence[SamplingParams], device: torch.device | str) -> list[torch.Generator | None]:
    """One generator per row, seeded from `seed`; None (default RNG) when seed is None."""
    return [None if p.seed is None else torch.Generator(device=device).manual_seed(p.seed) for p in params]


def top_k_filter(logits: Tensor, top_k: Tensor) -> Tensor:
    """Keep logits >= the k-th largest of their row (ties kept), the rest -> -inf.

    logits [B, V] float; top_k [B] int, 0 (or >= V) keeps the whole row.
    """
    V = logits.size(-1)
    k = torch.where(top_k > 0, top_k, V).clamp(max=V)  # [B]
    desc = logits.sort(dim=-1, descending=True).values  # [B, V]
    kth = desc.gather(-1, (k - 1).unsqueeze(-1))  # [B, 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, top_p: Tensor) -> Tensor:
    """Nucleus filter with the Grok-1 runner's rule (GROK1.md section 4).

    Sort ascending, softmax, cumulative sum; the threshold is the logit at the first index
    where the cumsum reaches 1 - p; keep logits >= it (ties kept), the rest -> -inf.
    logits [B, V] float; top_p [B] in (0, 1], 1 keeps the whole row. Unlike the reference,
    if rounding leaves the cumsum below 1 - p everywhere, only the largest logit is kept.
    """
    asc = logits.sort(dim=-1).values  # [B, V]
    cum = asc.softmax(dim=-1).cumsum(dim=-1)  # [B, V]
    idx = (cum < (1 - top_p).unsqueeze(-1)).sum(dim=-1, keepdim=True)  # [B, 1] first index reaching 1 - p
    threshold = asc.gather(-1, idx.clamp(max=logits.size(-1) - 1))  # [B, 1]
    return logits.masked_fill(logits < threshold, float("-inf"))


def sample(
    logits: Tensor,
    temperature: Tensor,
    top_p: Tensor,
    top_k: Tensor,
    generators: Sequence[torch.Generator | None],
    use_top_k: bool = True,
    use_top_p: bool = True,
    argmax: ArgMax = torch_argmax,
) -> Tensor:
    """Draw one token id per row.

    logits [B, V] (any float dtype, computed in float32); temperature/top_p [B] float,
    top_k [B] int; generators: B entries, row b's noise comes from generators[b] only, so a
    seeded request gets the same tokens whatever else is in the batch. Rows with
    temperature 0 take the argmax (ties -> lowest id); the others subtract their largest logit
    and divide by temperature (so a tiny temperature gives 0 for the top logits and -inf for the
    rest: the greedy limit it approaches, never inf - inf = nan), apply top-k then top-p, and draw with the exponential race argmax(probs / Exp(1)),
    which samples from probs. Every row consumes V noise draws, greedy or not.
    use_top_k / use_top_p = False skip a filter (each sorts the whole vocabulary) when the caller
    knows no row uses it; `argmax` computes the row-wise argmaxes. Returns [B] int64.
    """
    assert logits.dim() == 2 and len(generators) == logits.size(0), (tuple(logits.shape), len(generators))
    logits = logits.float()
    greedy = temperature == 0  # [B]
    t = torch.where(greedy, 1.0, temperature).unsqueeze(-1)  # [B, 1]
    scaled = (logits - logits.amax(dim=-1, keepdim=True)) / t  # <= 0: overflows only to -inf
    if use_top_k:
        scaled = top_k_filter(scaled, top_k)
    if use_top_p:
        scaled = top_p_filter(scaled, top_p)
    probs = scaled.softmax(dim=-1)  # [B, V]
    noise = torch.stack([torch.empty_like(probs[b]).exponential_(generator=g) for b, g in enumerate(generators)])
    noise = noise.clamp(min=torch.finfo(noise.dtype).tiny)  # a 0 draw would make 0/0 = nan win the argmax
    sampled = argmax(probs / noise)  # [B]
    return torch.where(greedy, argmax(logits), sampled)


def sample_requests(logits: Tensor, params: Sequence[SamplingParams],
                    generators: Sequence[torch.Generator | None], argmax: ArgMax = torch_argmax) -> Tensor:
    """One token per row for rows with their own SamplingParams: greedy rows take the argmax (what
    `sample` gives them) without its full-vocabulary sorts and noise; the others go through `sample`,
    with only the filters some row uses; each row's logit_bias is added first. logits [B, V] -> [B] int64."""
    logits = with_logit_bias(logits, params)
    tokens = argmax(logits)  # [B]
    rows = [i for i, p in enumerate(params) if p.temperature > 0]
    if rows:
        chosen = [params[i] for i in rows]
        t, p, k = params_to_tensors(chosen, logits.device)
        idx = torch.tensor(rows, device=logits.device)
        tokens[idx] = sample(logits[idx], t, p, k, [generators[i] for i in rows],
                             use_top_k=any(c.top_k > 0 for c in chosen), use_top_p=any(c.top_p < 1 for c in chosen),
                             argmax=argmax)
    return tokens


def within_vocab(logits: Tensor, n: int | None) -> Tensor:
    """logits [B, V] with the ids from n on at -inf (a new tensor; the same one when n is None or V): a
    model whose vocabulary outnumbers its tokenizer's pieces never samples an id that has no text."""
    if n is None or n >= logits.size(-1):
        return logits
    return torch.cat([logits[:, :n], torch.full_like(logits[:, n:], -math.inf)], dim=-1)


def with_logit_bias(logits: Tensor, params: Sequence[SamplingParams]) -> Tensor:
    """logits [B, V] plus each row's logit_bias (a new tensor; the same one when no row has a bias).
    Ids outside the vocabulary are the caller's to refuse; here they are skipped."""
    pairs = [(b, i, v) for b, p in enumerate(params) for i, v in p.logit_bias if i < logits.size(-1)]
    if not pairs:
        return logits
    rows, cols, values = zip(*pairs)
    out = logits.float().clone()
    out.index_put_((torch.tensor(rows, device=out.device), torch.tensor(cols, device=out.device)),
                   torch.tensor(values, dtype=out.dtype, device=out.device), accumulate=True)
    return out


def logprobs(logits: Tensor) -> Tensor:
    """float32 log-softmax over the vocab: [B, V] -> [B, V]."""
    return logits.float().log_softmax(dim=-1)


def top_logprobs(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest logprobs per row: (values float32 [B, k], ids int64 [B, k]), descending."""
    values, ids = logprobs(logits).topk(k, dim=-1)
    return values, ids
