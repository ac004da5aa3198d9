"""Which int8-weight matmul to use on this CPU: effective weight-read GB/s of each option, batch 1.

    python -m bench.matmul [--threads 1,2] [--reps 5] [--no-compile]

Options measured on the BENCH.md shapes (an M expert matrix 5472x1024, the M LM head 131072x1024),
each on the same int8 weights with the release's bf16 scales:
  eager      dequantise to float32 then F.linear (what a straightforward port does)
  int8pack   torch.ops.aten._weight_int8pack_mm with float32 activations and scales
  compiled   torch.compile of dequantise + linear (inductor's generated C++)
  grok1      grok1's compiled kernel (int8 converted in registers; grok1/csrc/linear.cpp)
  fp32       F.linear on the float32 matrix: the stock baseline, 4x the bytes
One JSON line per (option, shape, threads): gbs = int8 weight bytes / time (fp32: its own bytes).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from bench.common import emit, provenance
from grok1 import kernels
from grok1.quant import dequantize, quantize

SHAPES = {"expert 5472x1024": (5472, 1024), "lm head 131072x1024": (131072, 1024)}


def timed(fn, reps: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        n = 0
        while time.perf_counter() - t < 0.2 or n < 3:
            fn()
            n += 1
        times.append((time.perf_counter() - t) / n)
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", default="1,2", help="comma list of thread counts (default 1,2)")
    p.add_argument("--reps", type=int, default=5, help="repetitions, median reported (default 5)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile option (first compile ~15 s)")
    args = p.parse_args()
    base = provenance()
    for shape_name, (N, K) in SHAPES.items():
        w = torch.randn(N, K, generator=torch.Generator().manual_seed(0)) / K**0.5
        q, s = quantize(w, 1)
        x = torch.randn(1, K)
        s32 = s[0].float().contiguous()
        options = {
            "eager": lambda: F.linear(x, dequantize(q, s, torch.float32)),
            "int8pack": lambda: torch.ops.aten._weight_int8pack_mm(x, q, s32),
            "grok1": lambda: kernels.linear(x, q, s),
            "fp32": lambda: F.linear(x, w),
        }
        if not args.no_compile:
            compiled = torch.compile(lambda x_, q_, s_: F.linear(x_, dequantize(q_, s_, torch.float32)))
            options["compiled"] = lambda: compiled(x, q, s)
        ref = x @ dequantize(q, s, torch.float32).T
        for threads in [int(t) for t in args.threads.split(",")]:
            torch.set_num_threads(threads)
            for name, fn in options.items():
                with torch.inference_mode():
                    err = float((fn() - ref).abs().max()) if name != "fp32" else 0.0
                    dt = timed(fn, args.reps)
                nbytes = w.numel() * 4 if name == "fp32" else q.numel() + s.numel() * 2
                emit(base | {"option": name, "shape": shape_name, "threads": threads, "us": round(dt * 1e6, 1),
                             "gbs": round(nbytes / dt / 1e9, 2), "max_abs_err_vs_dequant": err})


if __name__ == "__main__":
    main()
