"""`grok1 convert`: rewrite a checkpoint as grok1's format, a Hugging Face layout or GGUF."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from grok1.config import resolve_config
from grok1.weights import convert as conv
from grok1.weights import safetensors as st
from grok1.weights.source import Source, open_source


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
    p.add_argument("--layout", choices=sorted(conv.hf.LAYOUTS),
                   help="--to hf only: tensor names for vllm (hpcai-tech/grok-1, vLLM) or sglang (default vllm)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", metavar="JSON", help="model config of a release checkpoint (default: "
                     "config.json next to it)")
    src.add_argument("--preset", metavar="NAME", help="named model config of a release checkpoint, e.g. grok-1")
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer.model to copy (gguf: to embed); default: the "
                   "one next to SRC")
    p.add_argument("--shard-gb", type=float, metavar="GB",
                   help="--to grok1/hf only: maximum shard size in GiB (default 2)")
    p.add_argument("--force", action="store_true",
                   help="replace what DST holds (another model, other files); without it convert refuses, and "
                        "only resumes its own unfinished conversion or redoes one of the same model")
    p.add_argument("--no-verify", action="store_true", help="skip the final re-read of the output")
    p.add_argument("--verify-only", action="store_true",
                   help="only re-read DST (a grok1 or hf directory) against its recorded checksums")
    p.set_defaults(run=run)


def _bar(total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, smoothing=0.1)


def check_options(args: argparse.Namespace) -> None:
    """Options that do not apply are refused, not ignored."""
    if args.verify_only:
        given = [flag for flag, value in (("--dtype", args.dtype), ("--layout", args.layout),
                                          ("--shard-gb", args.shard_gb), ("--config", args.config),
                                          ("--preset", args.preset), ("--tokenizer", args.tokenizer),
                                          ("--no-verify", args.no_verify), ("--force", args.force)) if value]
        if given:
            raise ValueError(f"--verify-only only re-reads DST: {', '.join(given)} does not apply")
        return
    if args.layout is not None and args.to != "hf":
        raise ValueError(f"--layout applies to --to hf only (not --to {args.to})")
    if args.shard_gb is not None and args.to == "gguf":
        raise ValueError("--shard-gb applies to --to grok1/hf only: --to gguf writes one file")
    if args.shard_gb is not None and not args.shard_gb > 0:
        raise ValueError(f"--shard-gb must be positive, got {args.shard_gb}")


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def check_destination(args: argparse.Namespace, source: Source, dtype: str, planned: int) -> None:
    """DST must be usable and must not hold another model, checked before any tensor is read: a 318 GB
    conversion must not find out at the end that it cannot write, or overwrite what it should not."""
    src, dst = Path(args.src), Path(args.dst)
    if dst.resolve() == src.resolve():
        raise ValueError(f"DST {dst} is the source itself; convert into another directory")
    existing = 0  # bytes of finished shards a resumed conversion may keep
    if args.to == "gguf":
        if dst.is_dir():
            raise ValueError(f"--to gguf writes one file, but DST {dst} is a directory; name a .gguf file")
        if dst.exists() and not args.force:
            raise ValueError(f"{dst} already exists; --force replaces it")
    else:
        if dst.exists() and not dst.is_dir():
            raise ValueError(f"--to {args.to} writes a directory, but DST {dst} is a file")
        if dst.is_dir() and any(dst.iterdir()) and not args.force:
            existing = _check_existing(dst, source, args.to, dtype)
    where = _existing_ancestor(dst.parent if args.to == "gguf" else dst)
    if not os.access(where, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write into {where}: permission denied")
    free = shutil.disk_usage(where).free
    if planned > free + existing:
        raise ValueError(f"the conversion writes {planned / 1e9:.2f} GB but {where} has {free / 1e9:.2f} GB free")


def _check_existing(dst: Path, source: Source, to: str, dtype: str) -> int:
    """A non-empty DST is fine when it is this conversion, unfinished (resume), or the same model already
    converted (redo); returns the bytes of shards it may keep. Anything else needs --force."""
    manifest = dst / conv.MANIFEST
    if manifest.is_file():
        try:
            key = json.loads(manifest.read_text()).get("key", {})
        except (OSError, ValueError):
            key = {}
        same = key.get("source") == str(Path(source.path).resolve()) and key.get("to") == to
        if same and (key.get("dtype") == dtype or not (dst / st.INDEX).is_file()):
            return sum(f.stat().st_size for f in dst.glob("*.safetensors"))
        if not (dst / st.INDEX).is_file():  # finished conversions keep their manifest (reruns reuse shards)
            raise ValueError(f"{dst} holds an unfinished conversion of {key.get('source', 'another checkpoint')}; "
                             "--force replaces it, or choose another DST")
    if (dst / st.INDEX).is_file():
        try:
            other = open_source(dst)
        except (ValueError, OSError):
            other = None
        if other is not None and other.format == to and other.config == source.config and other.weights == dtype:
            return 0  # the same model in the same form: converting again rewrites it identically
        what = "another model" if other is None or other.config != source.config else "this model in another form"
        raise ValueError(f"{dst} already holds {what}; --force replaces it, or choose another DST")
    raise ValueError(f"{dst} is not empty and holds no checkpoint; choose a new or empty directory (or --force)")


def run(args: argparse.Namespace) -> int:
    check_options(args)
    if args.verify_only:
        st.verify_checkpoint(args.dst)
        print(f"{args.dst}: every shard matches its recorded CRC-32")
        return 0
    layout = args.layout or "vllm"
    shard_gb = 2.0 if args.shard_gb is None else args.shard_gb
    source = open_source(args.src, args.config, args.preset)
    if (args.config or args.preset) and source.format != "release":
        given = resolve_config(None, args.config, args.preset)
        if given != source.config:
            flag = f"--preset {args.preset}" if args.preset else f"--config {args.config}"
            raise ValueError(f"{args.src} carries its own config, and {flag} describes a different model; leave "
                             f"{flag.split()[0]} out (it names the config of a release checkpoint)")
    dtype = args.dtype or conv.default_target_dtype(source, args.to)
    if dtype not in conv.TARGETS[args.to]:
        conv.convert(args.src, args.dst, args.to, dtype)  # raises the clear error before a bar is drawn
    planned = conv.planned_bytes(source, args.to, dtype, layout)
    check_destination(args, source, dtype, planned)
    if args.force and args.to != "gguf" and Path(args.dst).is_dir():
        (Path(args.dst) / conv.MANIFEST).unlink(missing_ok=True)  # start over
    with _bar(planned) as bar:
        result = conv.convert(args.src, args.dst, args.to, args.dtype, layout, args.config, args.preset,
                              args.tokenizer, int(shard_gb * (1 << 30)), bar.update, not args.no_verify)
    rate = result.bytes_written / max(result.convert_s, 1e-9) / 1e6
    skipped = f", {len(result.skipped_shards)} finished shards verified and kept" if result.skipped_shards else ""
    verified = f", verified in {result.verify_s:.1f} s" if not args.no_verify else ""
    print(f"wrote {Path(args.dst)} ({result.bytes_written / 1e9:.3f} GB in {result.convert_s:.1f} s, "
          f"{rate:.0f} MB/s{skipped}{verified})")
    for note in result.notes:
        print(f"note: {note}")
    return 0
