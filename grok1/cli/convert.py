"""`grok1 convert`: rewrite a checkpoint as grok1's format, a Hugging Face layout or GGUF."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grok1.weights import convert as conv
from grok1.weights import safetensors as st
from grok1.weights.source import open_source


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "convert", help="convert a checkpoint: release/grok1/HF -> grok1, hf or gguf",
        description="Convert SRC (the release's ckpt-0 directory, a grok1 checkpoint or an HF-layout directory) "
                    "to DST, tensor by tensor with bounded memory. grok1 and hf outputs are sharded safetensors: "
                    "an interrupted run resumes (finished shards are verified and skipped) and every shard is "
                    "re-read against its CRC-32 at the end. gguf writes one file for llama.cpp.")
    p.add_argument("src", metavar="SRC", help="checkpoint directory to read")
    p.add_argument("dst", metavar="DST", help="output directory (for --to gguf: the .gguf file)")
    p.add_argument("--to", required=True, choices=sorted(conv.TARGETS), help="output format")
    p.add_argument("--dtype", choices=["int8", "bf16", "fp32", "f16", "q8_0"],
                   help="weights: grok1 int8|bf16|fp32 (default: as the source), hf bf16|fp32 (default bf16), "
                        "gguf fp32|f16|q8_0 (default q8_0)")
    p.add_argument("--layout", choices=sorted(conv.hf.LAYOUTS), default="vllm",
                   help="HF tensor names: vllm (hpcai-tech/grok-1, vLLM) or sglang (default vllm)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", metavar="JSON", help="model config of a release checkpoint (default: "
                     "config.json next to it)")
    src.add_argument("--preset", metavar="NAME", help="named model config of a release checkpoint, e.g. grok-1")
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer.model to copy (gguf: to embed); default: the "
                   "one next to SRC")
    p.add_argument("--shard-gb", type=float, default=2.0, metavar="GB",
                   help="maximum shard size in GiB for grok1/hf outputs (default 2)")
    p.add_argument("--no-verify", action="store_true", help="skip the final re-read of the output")
    p.add_argument("--verify-only", action="store_true",
                   help="only re-read DST (a grok1 or hf directory) against its recorded checksums")
    p.set_defaults(run=run)


def _bar(total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, smoothing=0.1)


def run(args: argparse.Namespace) -> int:
    if args.verify_only:
        st.verify_checkpoint(args.dst)
        print(f"{args.dst}: every shard matches its recorded CRC-32")
        return 0
    if args.shard_gb <= 0:
        raise ValueError(f"--shard-gb must be positive, got {args.shard_gb}")
    source = open_source(args.src, args.config, args.preset)
    dtype = args.dtype or conv.default_target_dtype(source, args.to)
    if dtype not in conv.TARGETS[args.to]:
        conv.convert(args.src, args.dst, args.to, dtype)  # raises the clear error before a bar is drawn
    with _bar(conv.planned_bytes(source, args.to, dtype, args.layout)) as bar:
        result = conv.convert(args.src, args.dst, args.to, args.dtype, args.layout, args.config, args.preset,
                              args.tokenizer, int(args.shard_gb * (1 << 30)), bar.update, not args.no_verify)
    rate = result.bytes_written / max(result.convert_s, 1e-9) / 1e6
    skipped = f", {len(result.skipped_shards)} finished shards verified and kept" if result.skipped_shards else ""
    verified = f", verified in {result.verify_s:.1f} s" if not args.no_verify else ""
    print(f"wrote {Path(args.dst)} ({result.bytes_written / 1e9:.3f} GB in {result.convert_s:.1f} s, "
          f"{rate:.0f} MB/s{skipped}{verified})")
    for note in result.notes:
        print(f"note: {note}")
    return 0
