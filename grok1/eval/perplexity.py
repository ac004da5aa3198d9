"""Perplexity of a text file with a sliding window.

The file is tokenized as one sequence. Window k covers tokens [k*stride, k*stride + window) (the last one
ends at the end of the text); it scores only the tokens the previous window did not, each conditioned on
everything before it in the window, so every token after the first is scored exactly once, with at least
window - stride tokens of context (except near the start). A window's first token is never scored (it has no
context in it), so stride = window gives chunks that overlap by one token (fastest, least context);
smaller strides: more context per token, more compute.
"""

from __future__ import annotations

from pathlib import Path

NAME = "perplexity"
DATA_HINT = "any UTF-8 text file (e.g. held-out text in the model's domain)"


def load_text(path: str | Path) -> str:
    text = Path(path).read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"{path}: the file is empty")
    return text


def windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) per window; positions are token indices, end exclusive. Token t is
    scored from window (begin, end) when first <= t < end, with tokens begin..t-1 as its context."""
    if window < 2:
        raise ValueError(f"--window must be at least 2 tokens, got {window}")
    if not 1 <= stride <= window:
        raise ValueError(f"--stride must be between 1 and the window ({window}), got {stride}")
    if n_tokens < 2:
        raise ValueError(f"the text has {n_tokens} token(s); perplexity needs at least 2")
    out, scored_to, begin = [], 1, 0  # token 0 has no context: never scored
    while scored_to < n_tokens:
        end = min(begin + window, n_tokens)
        out.append((begin, end, scored_to))
        scored_to, begin = end, min(begin + stride, end - 1)  # a window's first token is context only
    return out
