"""Loading and converting checkpoints: cold start from the release format and from grok1's own,
conversion throughput against a plain sequential read, and peak memory.

    python -m bench.load --preset bench-m [--dir DIR] [--reps 3] [--threads N] [--record] [--gguf]

The checkpoint is synthetic (random weights quantised with the release's recipe, written by
scripts/make_release_checkpoint.py) and is created under DIR (default /tmp/grok1-bench/<preset>)
when DIR/config.json is missing; a DIR holding another preset's checkpoint is refused. bench-s is
~0.3 GB on disk, bench-m ~1.9 GB (it takes a few minutes to write on 2 cores).

Every load runs in a fresh `python -m bench.load --child` process, so its peak RSS (VmHWM) is its
own: interpreter + torch + load_model + the first token. One JSON line per result:

- kind "sequential_read": all tensor files read in 16 MiB chunks into one reused buffer (what
  `cat ckpt-0/* > /dev/null` does), as GB/s. The first run follows an attempt to drop the page
  cache (`sync; echo 3 > /proc/sys/vm/drop_caches`); its `cache` field says "dropped", or
  "not dropped: <reason>" when the sandbox refuses (then it is as warm as the files were, e.g.
  just written). The second run is always warm.
- kind "load", one per repetition (warm page cache; plus one "cold" load when dropping works):
  `load_s` (load_model wall time), `read_gbs` (checkpoint bytes / load_s), `peak_rss_load_mb`
  (VmHWM right after loading), `baseline_rss_mb` (RSS after imports, before loading), `model_mb`
  (parameter + buffer bytes), `largest_tensor_mb`, `overhead_mb` = peak_rss_load -
  (model + largest tensor), as asked for: it includes the interpreter + torch baseline, and the
  largest tensor (the embedding) becomes model memory without a copy, so it can be negative;
  `beyond_model_mb` = peak_rss_load - baseline_rss - model: the load's own transient memory
  (one tensor in flight, the reader's buffers); `import_s` (spawn to main), `prefill_s` (8
  tokens), `decode_s` (one token), `first_token_s` (spawn to the decoded token: process start,
  imports, load, prefill, decode), `peak_rss_mb` (VmHWM at the end), `other_cpu_pct` (CPU used by
  other processes during the load; the machine may be shared, so times are noisy, RSS is not).
- kind "load_median": medians of the warm repetitions.
- kind "convert": `grok1 convert DIR -> DIR-grok1 --to grok1` (int8 kept) in a fresh process, after
  dropping the page cache ("cold", the case that matters: a 300 GB release never fits in it) and
  again with the release files cached ("warm"): `convert_s` (writing, without the verification
  pass), `verify_s` (re-reading every shard from disk against its CRC-32), `gbs` = release bytes /
  convert_s, `vs_sequential_read` = gbs / the sequential read's GB/s in the same cache state
  (target >= 0.8), `peak_rss_mb` (VmHWM of the converting process, interpreter and torch included)
  and `largest_tensor_mb` (the bound it should stay near). With --gguf also one q8_0 GGUF export.
- kind "load" / "load_median" with "format": "grok1": the same loads from the converted directory
  (memory-mapped safetensors); `first_token_s` is the cold-start time (target <= 2 s for bench-m).
  Rows without "format" are the release format.

MB are 10^6 bytes, GB 10^9.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.common import REPO_DIR, CpuMonitor, decode_step, emit, peak_rss_mb, prefill, provenance, warn_if_noisy
from grok1.config import PRESETS, ModelConfig, from_name
from grok1.weights.convert import convert
from grok1.weights.load import load_model

MAKE_CHECKPOINT = REPO_DIR / "scripts" / "make_release_checkpoint.py"
PROMPT = [3, 17, 523, 98, 4001, 77, 12, 900]  # 8 token ids, none of them pad/bos/eos
CHUNK = 16 << 20


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def rss_mb() -> float:
    """Current resident set size (VmRSS), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) * 1024 / 1e6, 1)
    raise RuntimeError("/proc/self/status has no VmRSS line")


# ---- the checkpoint and the page cache ----

def ensure_checkpoint(directory: Path, preset: str, seed: int) -> list[Path]:
    """Create the synthetic checkpoint unless complete (config.json is written last); its tensor files."""
    marker = directory / "config.json"
    if marker.is_file():
        found = ModelConfig.from_dict(json.loads(marker.read_text()), source=str(marker))
        if found != from_name(preset):
            sys.exit(f"{directory} holds a checkpoint of another config; pass --dir for {preset}")
    else:
        log(f"writing the {preset} checkpoint to {directory}")
        subprocess.run([sys.executable, str(MAKE_CHECKPOINT), str(directory), "--preset", preset,
                        "--seed", str(seed)], check=True)
    return sorted((directory / "ckpt-0").glob("tensor*_000"))


def drop_page_cache() -> str:
    """Try to empty the page cache; "dropped" or why not."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as e:
        return f"not dropped: {e.strerror or e}"
    return "dropped"


def sequential_read_s(files: list[Path]) -> float:
    """Read every file to its end through one reused buffer, like cat > /dev/null."""
    buf = bytearray(CHUNK)
    start = time.perf_counter()
    for file in files:
        with open(file, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - start


# ---- one load, in a fresh process ----

def child(args: argparse.Namespace) -> None:
    """Load, prefill 8 tokens, decode 1; print one JSON object of measurements to stdout."""
    import_s = time.time() - args.spawn_time
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = from_name(args.preset)
    baseline = rss_mb()
    monitor = CpuMonitor()
    start = time.perf_counter()
    model = load_model(args.dir, cfg, "cpu", torch.float32)
    load_s = time.perf_counter() - start
    other = monitor.other_cpu_pct()
    peak_load = peak_rss_mb()
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}.values()  # tied: count once
    model_bytes = sum(t.nbytes for t in tensors)
    largest = max(t.nbytes for t in tensors)
    with torch.inference_mode():
        cache = model.new_cache(1, 2 * len(PROMPT))
        start = time.perf_counter()
        logits = prefill(model, cache, [PROMPT])
        prefill_s = time.perf_counter() - start
        start = time.perf_counter()
        token = decode_step(model, cache, logits.argmax(-1), torch.tensor([len(PROMPT)]))[0].argmax()
        decode_s = time.perf_counter() - start
        int(token)  # the token exists on the host
    first_token_s = time.time() - args.spawn_time
    print(json.dumps({
        "load_s": round(load_s, 3), "peak_rss_load_mb": peak_load, "baseline_rss_mb": baseline,
        "model_mb": round(model_bytes / 1e6, 1), "largest_tensor_mb": round(largest / 1e6, 1),
        "overhead_mb": round(peak_load - (model_bytes + largest) / 1e6, 1),
        "beyond_model_mb": round(peak_load - baseline - model_bytes / 1e6, 1),
        "import_s": round(import_s, 3), "prefill_s": round(prefill_s, 3), "decode_s": round(decode_s, 3),
        "first_token_s": round(first_token_s, 3), "peak_rss_mb": peak_rss_mb(), "other_cpu_pct": other,
        "threads": torch.get_num_threads(),
    }), flush=True)


def load_in_fresh_process(args: argparse.Namespace, directory: Path | None = None) -> dict:
    cmd = [sys.executable, "-m", "bench.load", "--child", "--preset", args.preset, "--dir", str(directory or args.dir),
           "--spawn-time", repr(time.time())] + (["--threads", str(args.threads)] if args.threads else [])
    out = subprocess.run(cmd, cwd=REPO_DIR, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# ---- one conversion, in a fresh process ----

def convert_child(args: argparse.Namespace) -> None:
    """Convert --dir to --dst (--to, --dtype); print one JSON object of measurements to stdout."""
    if args.threads:
        torch.set_num_threads(args.threads)
    baseline = rss_mb()
    monitor = CpuMonitor()
    result = convert(args.dir, args.dst, args.to, args.dtype, preset=args.preset)
    largest = max(f.stat().st_size for f in (args.dir / "ckpt-0").iterdir())  # the reader holds one file's tensor
    print(json.dumps({
        "convert_s": round(result.convert_s, 3), "verify_s": round(result.verify_s, 3),
        "written_gb": round(result.bytes_written / 1e9, 3), "peak_rss_mb": peak_rss_mb(), "baseline_rss_mb": baseline,
        "largest_tensor_mb": round(largest / 1e6, 1),
        "other_cpu_pct": monitor.other_cpu_pct(), "threads": torch.get_num_threads(),
    }), flush=True)


def convert_in_fresh_process(args: argparse.Namespace, dst: Path, to: str, dtype: str | None) -> dict:
    cmd = [sys.executable, "-m", "bench.load", "--convert-child", "--preset", args.preset, "--dir", str(args.dir),
           "--dst", str(dst), "--to", to] + (["--dtype", dtype] if dtype else []) + \
          (["--threads", str(args.threads)] if args.threads else [])
    out = subprocess.run(cmd, cwd=REPO_DIR, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# ---- driver ----

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="bench-m", choices=sorted(PRESETS), help="model shape (default bench-m)")
    parser.add_argument("--dir", type=Path, help="checkpoint directory (default /tmp/grok1-bench/<preset>)")
    parser.add_argument("--reps", type=int, default=3, help="warm loads, each in a fresh process (default 3)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in the loading process (default: torch's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic weights when creating them")
    parser.add_argument("--record", action="store_true", help="also append the rows to bench/results.jsonl")
    parser.add_argument("--gguf", action="store_true", help="also time a q8_0 GGUF export")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--convert-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dst", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--to", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    parser.add_argument("--spawn-time", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dir = args.dir or Path("/tmp/grok1-bench") / args.preset
    if args.child:
        return child(args)
    if args.convert_child:
        return convert_child(args)

    files = ensure_checkpoint(args.dir, args.preset, args.seed)
    ckpt_bytes = sum(f.stat().st_size for f in files)
    base = {**provenance(), "preset": args.preset, "dir": str(args.dir), "files": len(files),
            "ckpt_gb": round(ckpt_bytes / 1e9, 3)}

    cache = drop_page_cache()
    read_gbs = {}
    for state in (cache, "warm"):
        seconds = sequential_read_s(files)
        read_gbs["cold" if state == "dropped" else "warm"] = ckpt_bytes / seconds / 1e9
        emit({"kind": "sequential_read", **base, "cache": state, "seconds": round(seconds, 3),
              "gbs": round(ckpt_bytes / seconds / 1e9, 3)}, args.record)

    grok1_dir = args.dir.parent / f"{args.dir.name}-grok1"
    states = (["cold"] if cache == "dropped" else []) + ["warm"]
    for state in states:
        if state == "cold":
            drop_page_cache()
        else:
            sequential_read_s(files)  # the release files in the page cache
        row = convert_in_fresh_process(args, grok1_dir, "grok1", None)
        warn_if_noisy(row["other_cpu_pct"], f"{state} conversion")
        gbs = ckpt_bytes / row["convert_s"] / 1e9
        emit({"kind": "convert", **base, "to": "grok1", "cache": state, **row, "gbs": round(gbs, 3),
              "vs_sequential_read": round(gbs / read_gbs[state], 3)}, args.record)
    if args.gguf:
        row = convert_in_fresh_process(args, args.dir.parent / f"{args.dir.name}.q8_0.gguf", "gguf", "q8_0")
        emit({"kind": "convert", **base, "to": "gguf", "dtype": "q8_0", "cache": "warm", **row,
              "gbs": round(ckpt_bytes / row["convert_s"] / 1e9, 3)}, args.record)

    for fmt, directory in (("release", args.dir), ("grok1", grok1_dir)):
        tag = {} if fmt == "release" else {"format": "grok1", "dir": str(directory)}
        sequential_read_s(sorted(directory.glob("ckpt-0/tensor*_000")) + sorted(directory.glob("*.safetensors")))
        runs = []
        for rep in range(args.reps):
            row = load_in_fresh_process(args, directory)
            warn_if_noisy(row["other_cpu_pct"], f"{fmt} load rep {rep}")
            runs.append(row)
            emit({"kind": "load", **base, **tag, "cache": "warm", "rep": rep, **row,
                  "read_gbs": round(ckpt_bytes / row["load_s"] / 1e9, 3)}, args.record)
        if cache == "dropped" and drop_page_cache() == "dropped":
            row = load_in_fresh_process(args, directory)
            emit({"kind": "load", **base, **tag, "cache": "cold", "rep": 0, **row,
                  "read_gbs": round(ckpt_bytes / row["load_s"] / 1e9, 3)}, args.record)
        median = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k != "threads"}
        emit({"kind": "load_median", **base, **tag, "cache": "warm", "reps": args.reps, "threads": runs[0]["threads"],
              **median, "read_gbs": round(ckpt_bytes / median["load_s"] / 1e9, 3)}, args.record)


if __name__ == "__main__":
    main()
