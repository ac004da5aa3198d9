"""How fast does grok1 train, and what dominates a step?

    python -m bench.train                                  # grok-1-mini, the demo recipe's batch
    python -m bench.train --preset grok-1-mini --threads 1,2 --batch 8 --seq-len 256 --record

Per thread count: median over --reps of full optimizer steps (forward, cross-entropy + MoE aux
losses through the router hooks, backward, clip, AdamW), the same code as grok1.train.loop, on
random tokens. Prints one JSON line: tokens/s, the median split of a step into forward / backward /
optimizer, peak RSS, and from one profiled step the share of time in matrix multiplies and the
top operators.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

from bench.common import CpuMonitor, emit, median_of, parse_list, peak_rss_mb, provenance, warn_if_noisy
from grok1.config import from_name
from grok1.model import Transformer, init_weights
from grok1.train.loop import TrainConfig, lm_loss, make_optimizer
from grok1.train.router import RouterTap, router_losses

MATMUL_OPS = {"aten::mm", "aten::bmm", "aten::addmm", "aten::matmul", "aten::linear"}


def step_fn(model: Transformer, opt: torch.optim.Optimizer, tap: RouterTap, batch: torch.Tensor,
            cfg: TrainConfig, phases: dict[str, list[float]]) -> None:
    t0 = time.perf_counter()
    tap.clear()
    ce = lm_loss(model, batch)
    balance, z, _ = router_losses(tap.logits, model.config.n_active_experts)
    loss = ce + cfg.aux_loss_coef * balance + cfg.z_loss_coef * z
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    for name, dt in (("forward", t1 - t0), ("backward", t2 - t1), ("optimizer", t3 - t2)):
        phases[name].append(dt)


def profile_shares(model: Transformer, opt: torch.optim.Optimizer, tap: RouterTap, batch: torch.Tensor,
                   cfg: TrainConfig) -> dict:
    from torch.profiler import profile

    with profile() as prof:
        step_fn(model, opt, tap, batch, cfg, defaultdict(list))
    self_us: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        self_us[e.key] += e.self_cpu_time_total
    total = sum(self_us.values())
    top = sorted(self_us.items(), key=lambda kv: -kv[1])[:6]
    return {"matmul_share": round(sum(v for k, v in self_us.items() if k in MATMUL_OPS) / total, 3),
            "top_ops": {k: round(v / total, 3) for k, v in top}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="grok-1-mini", help="model preset (default grok-1-mini)")
    p.add_argument("--batch", type=int, default=8, help="sequences per step (default 8, the demo recipe's)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--threads", action="append", help="thread counts, e.g. 1,2 (default 1,2)")
    p.add_argument("--reps", type=int, default=5, help="timed steps; the median is reported (default 5)")
    p.add_argument("--record", action="store_true", help="also append the rows to bench/results.jsonl")
    args = p.parse_args()
    cfg_model = from_name(args.preset)
    cfg = TrainConfig(seq_len=args.seq_len, batch_size=args.batch)
    for threads in parse_list(args.threads, int) or [1, 2]:
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        model = Transformer(cfg_model)
        init_weights(model, torch.Generator().manual_seed(0))
        model.train()
        opt = make_optimizer(model, cfg)
        tap = RouterTap(model)
        batch = torch.randint(4, cfg_model.vocab_size, (args.batch, args.seq_len + 1))
        phases: dict[str, list[float]] = defaultdict(list)
        step_fn(model, opt, tap, batch, cfg, phases)  # warm-up
        phases.clear()
        monitor = CpuMonitor()

        def one_step(model=model, opt=opt, tap=tap, batch=batch, phases=phases) -> float:
            t0 = time.perf_counter()
            step_fn(model, opt, tap, batch, cfg, phases)
            return time.perf_counter() - t0

        step_s = median_of(one_step, args.reps)
        other = monitor.other_cpu_pct()
        warn_if_noisy(other, f"{args.preset} threads={threads}")
        shares = profile_shares(model, opt, tap, batch, cfg)
        med = {k: sorted(v)[len(v) // 2] for k, v in phases.items()}
        row = provenance() | {
            "bench": "train", "preset": args.preset, "threads": threads, "batch": args.batch, "seq_len": args.seq_len,
            "params": cfg_model.num_params(), "active_params": cfg_model.active_params(),
            "tokens_per_s": round(args.batch * args.seq_len / step_s, 1), "step_ms": round(1e3 * step_s, 1),
            **{f"{k}_ms": round(1e3 * v, 1) for k, v in med.items()},
            "peak_rss_mb": peak_rss_mb(), "other_cpu_pct": round(other, 1), **shares,
        }
        emit(row, args.record)
        tap.remove()


if __name__ == "__main__":
    main()
