"""Prefill and decode speed of grok1 on CPU, one JSON line per (config, weights, threads, path, batch).

    python -m bench.generate                                   # tiny-golden + bench-s, int8 + fp32, 1,2 threads
    python -m bench.generate --config bench-m --weights int8 --threads 2 --batch 1,8,32 --prefill 0
    python -m bench.generate --config bench-s --naive          # also the reference-like all-experts MoE

Configs: `tiny-golden` is the release-format golden checkpoint (../shared/golden, int8 as released);
`bench-s` / `bench-m` are the BENCH.md configs with seeded random weights (init_weights), quantised
with quantize_model for int8. fp32 on tiny-golden is the dequantised checkpoint.

Paths: "routed" is the model as it is (only the chosen experts are computed); "naive" replaces
every layer's `moe.experts` forward, from outside, by the reference's way: all E experts on every
token, combined with a one-hot of the chosen experts times their gates. Its logits are checked
against the routed path's once per model before timing.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.common import (
    REPO_DIR,
    CpuMonitor,
    decode_step,
    emit,
    median_of,
    parse_list,
    peak_rss_mb,
    prefill,
    provenance,
    reset_peak_rss,
    warn_if_noisy,
)
from bench.roofline import cached_read_bandwidth_gbs
from grok1 import kernels
from grok1.config import ModelConfig, from_name, resolve_config
from grok1.kernels import install
from grok1.model import Experts, Transformer, init_weights
from grok1.panels import pack_model
from grok1.quant import QExperts, QLinear, dequantize, quantize_embedding, quantize_model
from grok1.weights.load import load_model

CONFIGS = ("tiny-golden", "bench-s", "bench-m")
# int8: every matrix int8 with bf16 scales, the tied table too (what llama.cpp's q8_0 does: the
# shapes of BENCH.md's targets); int8-f32emb: as released (int8 matrices, float32 table);
# int4: 4-bit matrices (32-blocks), int8 table; bf16: bf16 matrices and table; fp32: all float32.
# All compute in float32.
WEIGHTS = ("int8", "int8-f32emb", "int4", "bf16", "fp32")
GOLDEN_DIR = REPO_DIR.parent / "shared" / "golden"
FIRST_ID = 3  # random token ids avoid pad (0), bos (1) and eos (2)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- models ----

def dequantize_model(model: Transformer) -> None:
    """Replace int8 attention projections and experts by float32 ones holding the dequantised weights."""
    for layer in model.layers:
        att = layer.attention
        for name in ("wqkv", "wo"):
            q: QLinear = getattr(att, name)
            dense = nn.Linear(q.in_features, q.out_features, bias=False, device="meta")
            dense.weight = nn.Parameter(dequantize(q.weight, q.scales, torch.float32), requires_grad=False)
            setattr(att, name, dense)
        ex: QExperts = layer.moe.experts
        with torch.device("meta"):
            experts = Experts(model.config)
        for i in "123":
            w = dequantize(getattr(ex, f"w{i}"), getattr(ex, f"s{i}"), torch.float32)
            setattr(experts, f"w{i}", nn.Parameter(w, requires_grad=False))
        layer.moe.experts = experts


def build_model(config: str, weights: str, golden_dir: Path, seed: int) -> Transformer:
    """The model for a --config name in a --weights format, in eval mode, computing in float32."""
    fmt = weights.removesuffix("-f32emb")
    if config == "tiny-golden":
        cfg_path, ckpt = golden_dir / "tiny-config.json", golden_dir / "tiny-ckpt"
        if not cfg_path.is_file() or not ckpt.is_dir():
            raise SystemExit(f"tiny-golden: golden data not found at {golden_dir} (pass --golden-dir)")
        model = load_model(ckpt, ModelConfig.from_reference_json(cfg_path), "cpu", torch.float32)
        if fmt != "int8":  # repack the released weights: dequantised exactly, then stored as fmt
            dequantize_model(model)
            quantize_model(model, fmt)
    else:
        with torch.device("meta"):
            model = Transformer(from_name(config))
        model.to_empty(device="cpu")
        init_weights(model, torch.Generator().manual_seed(seed))
        quantize_model(model, fmt)  # fp32 too: float32 matrices through the compiled kernel
    if weights != "int8-f32emb":
        quantize_embedding(model, "int8" if fmt in ("int8", "int4") else fmt)
    return model.eval()


def bytes_per_token(model: Transformer) -> int:
    """Weight bytes one decoded token reads at batch 1: the whole (tied) table as the unembedding plus one
    embedding row, the final norm, and per layer everything except the experts, plus A/E of the experts."""
    cfg = model.config
    emb = model.tok_embeddings
    # (a --table copy: the output projection reads the copy; the lookup's exact rows, one per token, are left out)
    table = sum(t.nbytes for name, t in [*emb.named_parameters(), *emb.named_buffers()] if name.rpartition(".")[2] != "rows")
    total = table + table // cfg.vocab_size + model.norm.weight.nbytes  # the table, and about one row of it
    for layer in model.layers:
        for name, t in [*layer.named_parameters(), *layer.named_buffers()]:
            share = cfg.n_active_experts / cfg.n_experts if name.startswith("moe.experts.") else 1.0
            total += t.nbytes * share
    return int(total)


# ---- the reference-like MoE: every expert on every token ----

def naive_experts_forward(ex: Experts | QExperts, x_ND: Tensor, idx_NA: Tensor, gate_NA: Tensor) -> Tensor:
    E = ex.n_experts
    w1, w2, w3 = ex.expert_weights(torch.arange(E), x_ND.dtype)  # all experts: [E, F, D], [E, D, F], [E, F, D]
    h_NEF = F.gelu(torch.einsum("nd,efd->nef", x_ND, w1), approximate="tanh") * torch.einsum("nd,efd->nef", x_ND, w3)
    y_NED = torch.einsum("nef,edf->ned", h_NEF, w2)
    combine_NE = (F.one_hot(idx_NA, E).to(x_ND.dtype) * gate_NA[..., None]).sum(1)  # [N, A, E] -> [N, E]
    return torch.einsum("ned,ne->nd", y_NED, combine_NE)


@contextmanager
def naive_experts(model: Transformer, enabled: bool = True) -> Iterator[None]:
    """Inside the block every layer's experts run naive_experts_forward (an instance attribute
    shadowing the class's forward); the model is restored after."""
    patched = [layer.moe.experts for layer in model.layers] if enabled else []
    for ex in patched:
        ex.forward = lambda x_ND, idx_NA, gate_NA, ex=ex: naive_experts_forward(ex, x_ND, idx_NA, gate_NA)
    try:
        yield
    finally:
        for ex in patched:
            del ex.forward


def check_naive(model: Transformer, gen: torch.Generator) -> float:
    """Max |logits naive - logits routed| on a 16-token forward (sorted routed path) and a
    2 x 1-token forward (gather routed path)."""
    V = model.config.vocab_size
    diff = 0.0
    for shape in ((1, 16), (2, 1)):
        tokens = torch.randint(FIRST_ID, V, shape, generator=gen)
        routed = model(tokens)
        with naive_experts(model):
            naive = model(tokens)
        diff = max(diff, float((naive - routed).abs().max()))
    return diff


# ---- measurements ----

def measure_prefill(model: Transformer, n_tokens: int, reps: int, gen: torch.Generator) -> dict:
    """Batch-1 prefill of n_tokens into a cache of that length: tokens/s of the prefill() call, and the
    time to first token (prefill + greedy pick). Warm-up call first, then the median of reps."""
    prompt = torch.randint(FIRST_ID, model.config.vocab_size, (n_tokens,), generator=gen).tolist()
    cache = model.new_cache(1, n_tokens)
    ttft: list[float] = []

    def once() -> float:
        t0 = time.perf_counter()
        logits = prefill(model, cache, [prompt])
        t1 = time.perf_counter()
        int(kernels.argmax(logits.view(1, -1))[0])
        ttft.append(time.perf_counter() - t0)
        return t1 - t0

    mon = CpuMonitor()
    once()
    ttft.clear()
    seconds = median_of(once, reps)
    return {"prefill_tokens_per_s": round(n_tokens / seconds, 2),
            "ttft_ms": round(1000 * statistics.median(ttft), 2), "other_cpu_pct": mon.other_cpu_pct()}


def measure_decode(model: Transformer, batch: int, steps: int, reps: int, context: int, warmup: int,
                   gen: torch.Generator) -> dict:
    """Aggregate decode tokens/s (batch * steps / time) of greedy decode_step calls after a `context`-token
    prefill. Each rep restarts at position `context` (same cache lengths every rep)."""
    cache = model.new_cache(batch, context + max(steps, warmup))
    prompts = torch.randint(FIRST_ID, model.config.vocab_size, (batch, context), generator=gen).tolist()
    first = prefill(model, cache, prompts).argmax(-1)  # [B]

    def run(n: int) -> float:
        tokens, pos = first, torch.full((batch,), context, dtype=torch.long)
        t = time.perf_counter()
        for _ in range(n):
            tokens = kernels.argmax(decode_step(model, cache, tokens, pos))  # the greedy pick grok1's engine makes
            pos += 1
        return time.perf_counter() - t

    mon = CpuMonitor()
    run(warmup)
    seconds = median_of(lambda: run(steps), reps)
    return {"decode_tokens_per_s": round(batch * steps / seconds, 2), "other_cpu_pct": mon.other_cpu_pct()}


def bench_model(model: Transformer, args: argparse.Namespace, roofline: dict[int, tuple[float, str]]) -> Iterator[dict]:
    """Rows (without config/weights/provenance) for every threads x path x batch of one model."""
    per_token = bytes_per_token(model)
    gen = torch.Generator().manual_seed(args.seed)
    for threads in args.threads:
        torch.set_num_threads(threads)
        gbs, source = roofline[threads]
        for path in ["routed", "naive"] if args.naive else ["routed"]:
            with naive_experts(model, enabled=path == "naive"):
                reset_peak_rss()  # peak RSS below covers serving (weights, caches, activations), not building
                pre = measure_prefill(model, args.prefill, args.reps, gen) if args.prefill else {}
                for batch in args.batch:
                    dec = measure_decode(model, batch, args.decode_tokens, args.reps, args.context, args.warmup, gen)
                    tok_s = dec["decode_tokens_per_s"]
                    achieved = per_token * tok_s / 1e9 if batch == 1 else None  # bytes/token hold at batch 1 only
                    yield {"compute_dtype": "float32", "threads": threads, "batch": batch, "path": path,
                           "prefill_len": args.prefill, "prefill_tokens_per_s": pre.get("prefill_tokens_per_s"),
                           "ttft_ms": pre.get("ttft_ms"), "decode_steps": args.decode_tokens,
                           "decode_tokens_per_s": tok_s, "bytes_per_token": per_token,
                           "achieved_gbs": None if achieved is None else round(achieved, 2),
                           "roofline_gbs": gbs, "roofline_source": source,
                           "roofline_tokens_per_s": round(gbs * 1e9 / per_token, 1),
                           "pct_of_roofline": None if achieved is None else round(100 * achieved / gbs, 1),
                           "reps": args.reps, "peak_rss_mb": peak_rss_mb(),
                           "other_cpu_pct": max(pre.get("other_cpu_pct", 0.0), dec["other_cpu_pct"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", help=f"comma list or repeated, of {', '.join(CONFIGS)} "
                   "(default tiny-golden,bench-s)")
    p.add_argument("--weights", action="append", help="comma list of int8 (all int8, incl. the tied table), int8-f32emb (as released), fp32 "
                        "int4, bf16 (default int8,fp32)")
    p.add_argument("--threads", action="append", help="torch thread counts, comma list (default 1,2)")
    p.add_argument("--batch", action="append", help="decode batch sizes, comma list (default 1,8,32)")
    p.add_argument("--prefill", type=int, default=512, help="prefill length, batch 1; 0 skips prefill (default 512)")
    p.add_argument("--decode-tokens", type=int, default=32, help="timed decode steps per rep (default 32)")
    p.add_argument("--context", type=int, default=16, help="prompt length prefilled before decoding (default 16)")
    p.add_argument("--warmup", type=int, default=2, help="untimed decode steps before timing (default 2)")
    p.add_argument("--reps", type=int, default=3, help="repetitions; medians are reported (default 3)")
    p.add_argument("--layout", action="append",
                   help="weight layout, comma list: panels (what the grok1 commands run: panels.pack_model) or rows "
                        "(the stored row-major matrices through the older kernel) (default panels)")
    p.add_argument("--table", choices=["int8", "bf16"],
                   help="as `grok1 generate --table`: the output projection reads an int8 or bf16 copy of the tied "
                        "table (with --weights int8-f32emb: the release's float32 table for the lookup)")
    p.add_argument("--naive", action="store_true", help="also time the reference-like all-experts MoE")
    p.add_argument("--seed", type=int, default=0, help="seed of random weights and token ids (default 0)")
    p.add_argument("--checkpoint", type=Path, metavar="DIR",
                   help="measure this checkpoint (any format grok1 loads, packed as `grok1 generate` runs it) "
                        "instead of --config/--weights (bench/versus.py uses it)")
    p.add_argument("--golden-dir", type=Path, default=GOLDEN_DIR, help=f"golden data (default {GOLDEN_DIR})")
    p.add_argument("--record", action="store_true", help="also append the rows to bench/results.jsonl")
    args = p.parse_args()
    args.config = parse_list(args.config) or ["tiny-golden", "bench-s"]
    args.weights = parse_list(args.weights) or ["int8", "fp32"]
    args.layout = parse_list(args.layout) or ["panels"]
    args.threads = parse_list(args.threads, int) or [1, 2]
    args.batch = parse_list(args.batch, int) or [1, 8, 32]
    for name, got, valid in (("--config", args.config, CONFIGS), ("--weights", args.weights, WEIGHTS),
                             ("--layout", args.layout, ("panels", "rows"))):
        if bad := [v for v in got if v not in valid]:
            p.error(f"{name}: unknown {', '.join(bad)}; valid: {', '.join(valid)}")
    if min(args.threads + args.batch) < 1 or min(args.reps, args.decode_tokens, args.context) < 1:
        p.error("--threads, --batch, --reps, --decode-tokens and --context must be >= 1")
    base = {"bench": "generate", **provenance()}

    # Measured (or read from bench/roofline.json) before any model exists, so it stays out of peak RSS.
    roofline = {t: cached_read_bandwidth_gbs(t) for t in args.threads}
    torch.set_grad_enabled(False)
    if args.checkpoint is not None:  # one model, loaded as `grok1 generate` loads it
        runs = [(str(args.checkpoint), "checkpoint", "panels")]
    else:
        runs = [(c, w, lay) for c in args.config for w, lay in itertools.product(args.weights, args.layout)]
    for config, weights, layout in runs:
        t0 = time.perf_counter()
        if args.checkpoint is not None:
            model = load_model(args.checkpoint, resolve_config(args.checkpoint), "cpu", torch.float32, pack=True,
                               table=args.table)
        else:
            model = build_model(config, weights, args.golden_dir, args.seed)
            if args.table:
                quantize_embedding(model, args.table, exact_lookup=True)
            model = install(model)
            if layout == "panels":
                pack_model(model)
        log(f"{config} {weights} {layout}: built in {time.perf_counter() - t0:.1f} s, "
            f"{bytes_per_token(model) / 1e6:.1f} MB of weights read per decoded token")
        with torch.inference_mode():
            if args.naive:
                diff = check_naive(model, torch.Generator().manual_seed(args.seed))
                log(f"{config} {weights}: naive vs routed logits, max abs diff {diff:.3g}")
                assert diff < 1e-3, f"{config} {weights}: naive path differs from routed by {diff}"
            for row in bench_model(model, args, roofline):
                emit({**base, "config": config, "weights": weights, "layout": layout, **row}, args.record)
                warn_if_noisy(row["other_cpu_pct"], f"{config} {weights} {row['path']} "
                              f"threads {row['threads']} batch {row['batch']}")
        del model
        gc.collect()


if __name__ == "__main__":
    main()
