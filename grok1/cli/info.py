"""`grok1 info`: what a checkpoint holds and what running it costs, without loading it."""

from __future__ import annotations

import argparse
from pathlib import Path

from grok1.cli.common import config_from_args


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("info", parents=[common], help="config, parameter counts, sizes, memory estimate",
                       description="Describe a checkpoint: its config, parameter counts (total and active "
                                   "per token), size on disk and in memory, and the memory a run needs.")
    p.add_argument("--context", type=int, default=8192, metavar="N", help="tokens of KV cache per sequence (default 8192)")
    p.add_argument("--batch", type=int, default=1, metavar="B", help="sequences decoded together (default 1)")
    p.set_defaults(run=run)


def _gb(n: float) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.3f} MB"


def run(args: argparse.Namespace) -> int:
    if args.context < 1 or args.batch < 1:
        raise ValueError(f"--context and --batch must be positive, got {args.context} and {args.batch}")
    cfg = config_from_args(args)
    ckpt = Path(args.checkpoint)
    disk = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    dtype_bytes = 2 if args.dtype == "bfloat16" or (args.dtype is None and args.device.startswith("cuda")) else 4
    weights = cfg.weight_bytes(embedding_bytes=dtype_bytes)
    kv = cfg.kv_cache_bytes(args.batch, min(args.context, cfg.max_seq_len), dtype_bytes)
    print(f"checkpoint      {ckpt}")
    for key, value in cfg.to_dict().items():
        print(f"  {key:22} {value}")
    print(f"parameters      {cfg.num_params():,} total, {cfg.active_params():,} active per token "
          f"({cfg.n_active_experts} of {cfg.n_experts} experts)")
    print(f"on disk         {_gb(disk)}")
    print(f"in memory       {_gb(weights)} (int8 matrices + bf16 scales, {8 * dtype_bytes}-bit embedding)")
    print(f"KV cache        {_gb(kv)} for batch {args.batch} x {min(args.context, cfg.max_seq_len)} tokens")
    print(f"estimate        {_gb(weights + kv)} plus activations")
    return 0
