"""The oracle of the multi-process tests: the same model in this process, one rank, no parallelism."""

from __future__ import annotations

from pathlib import Path

import torch

from grok1 import kernels
from models import PROMPTS, greedy, single
from ranks import run_job

_cache: dict[tuple, tuple] = {}


def reference(name: str, fmt: str | None, pack: bool, new_tokens: int = 6) -> tuple[list, list]:
    key = (name, fmt, pack, new_tokens)
    if key not in _cache:
        torch.set_num_threads(1)
        model = single(name, fmt, pack)
        with torch.inference_mode():
            logits = [model(torch.tensor([p]))[0] for p in PROMPTS[name]]
        _cache[key] = logits, [greedy(model, p, new_tokens) for p in PROMPTS[name]]
    return _cache[key]


def compare_with_single(tmp: Path, name: str, tp: int = 1, ep: int = 1, mode: str = "library", fmt: str | None = None,
                        pack: bool = False, atol: float = 1e-5) -> list[dict]:
    """Run the model on tp x ep ranks; every rank's logits within atol of one process's, tokens identical."""
    kernels.cpu_ops()  # built (or loaded) here first: the ranks then only load it
    results = run_job(tmp, model=name, tp=tp, ep=ep, mode=mode, fmt=fmt, pack=pack)
    logits, tokens = reference(name, fmt, pack)
    for rank, res in enumerate(results):
        for got, want in zip(res["logits"], logits):
            assert got.shape == want.shape
            err = float((got - want).abs().max())
            assert err <= atol, f"rank {rank}: logits differ from one process by {err:.3g} > {atol}"
        assert res["tokens"] == tokens, f"rank {rank}: greedy tokens {res['tokens']} != one process's {tokens}"
    return results
