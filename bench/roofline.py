"""This machine's ceilings: memory read bandwidth and fp32 GEMM throughput, per thread count.

    python -m bench.roofline                  # 1 GB read, 1024x4096 @ 4096x4096 GEMM, threads 1,2; saves bench/roofline.json
    python -m bench.roofline --quick          # small sizes for a smoke test (not saved)

Read bandwidth is timed as torch.sum over a float32 tensor far larger than the caches (a pure
streaming read; torch's int8 sum is compute-bound, so int8 is not used). The result is the
decode roofline: bytes of weights per token / bandwidth. bench/generate.py reads the cached
bench/roofline.json when it was measured on the same kind of machine, else measures quickly.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from bench.common import BENCH_DIR, CpuMonitor, emit, median_of, parse_list, provenance, warn_if_noisy

CACHE = BENCH_DIR / "roofline.json"
QUICK_MB = 256


@contextmanager
def num_threads(n: int) -> Iterator[None]:
    """torch.set_num_threads(n) inside the block, the previous count restored after."""
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def machine() -> str:
    """CPU model and count, to tell whether a cached roofline belongs to this machine."""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown cpu")
    return f"{model} x{os.cpu_count()}"


def _seconds(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def read_bandwidth_gbs(n_threads: int, mb: int = 1024, reps: int = 3) -> float:
    """Median read bandwidth (GB/s, 10^9 bytes) of torch.sum over an `mb`-MB float32 tensor."""
    x = torch.ones(mb * 2**20 // 4)  # written once, so every page is resident before timing
    with num_threads(n_threads), torch.inference_mode():
        x.sum()  # warm-up
        return x.nbytes / median_of(lambda: _seconds(x.sum), reps) / 1e9


def gemm_gflops(n_threads: int, m: int = 1024, k: int = 4096, n: int = 4096, reps: int = 3) -> float:
    """Median fp32 GFLOP/s of an [m, k] @ [k, n] matmul."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    out = torch.empty(m, n)
    with num_threads(n_threads), torch.inference_mode():
        torch.mm(a, b, out=out)  # warm-up
        return 2 * m * k * n / median_of(lambda: _seconds(lambda: torch.mm(a, b, out=out)), reps) / 1e9


def cached_read_bandwidth_gbs(n_threads: int) -> tuple[float, str]:
    """(GB/s, source): from bench/roofline.json when it was measured on this machine with this
    thread count, else measured now (1 GB, median of 3: about a second)."""
    try:
        cached = json.loads(CACHE.read_text())
        if cached.get("machine") == machine() and str(n_threads) in cached["read_gbs"]:
            return float(cached["read_gbs"][str(n_threads)]), "roofline.json"
    except (OSError, ValueError, KeyError, TypeError):
        pass
    mon = CpuMonitor()
    gbs = round(read_bandwidth_gbs(n_threads), 2)
    warn_if_noisy(mon.other_cpu_pct(), f"the roofline read, {n_threads} threads")
    return gbs, "measured now"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", action="append", help="thread counts, comma list or repeated (default 1,2)")
    p.add_argument("--mb", type=int, default=1024, help="size of the tensor read, MB (default 1024)")
    p.add_argument("--gemm", default="1024,4096,4096", help="GEMM shape m,k,n for [m,k] @ [k,n]")
    p.add_argument("--reps", type=int, default=3, help="repetitions; the median is reported (default 3)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: {QUICK_MB} MB read, 256x1024 @ 1024x1024 GEMM; nothing cached")
    p.add_argument("--no-save", action="store_true", help="do not write bench/roofline.json")
    p.add_argument("--record", action="store_true", help="also append the rows to bench/results.jsonl")
    args = p.parse_args()
    thread_counts = parse_list(args.threads, int) or [1, 2]
    mb = QUICK_MB if args.quick else args.mb
    m, k, n = (256, 1024, 1024) if args.quick else parse_list([args.gemm], int)
    base = {"bench": "roofline", **provenance(), "machine": machine()}

    read, gemm, noise = {}, {}, {}
    for kind in ("read", "gemm"):
        for t in thread_counts:
            mon = CpuMonitor()
            if kind == "read":
                read[str(t)] = value = round(read_bandwidth_gbs(t, mb, args.reps), 2)
                row = {"kind": kind, "dtype": "float32", "threads": t, "mb": mb, "gbs": value}
            else:
                gemm[str(t)] = value = round(gemm_gflops(t, m, k, n, args.reps), 1)
                row = {"kind": kind, "dtype": "float32", "threads": t, "shape": [m, k, n], "gflops": value}
            noise[f"{kind}/{t}"] = other = mon.other_cpu_pct()
            emit({**base, **row, "reps": args.reps, "other_cpu_pct": other}, args.record)
            warn_if_noisy(other, f"{kind}, {t} threads")

    if not (args.quick or args.no_save):
        CACHE.write_text(json.dumps({**base, "mb": mb, "gemm_shape": [m, k, n], "read_gbs": read,
                                     "gemm_gflops": gemm, "other_cpu_pct": noise}, indent=2) + "\n")


if __name__ == "__main__":
    main()
