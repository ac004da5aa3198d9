"""grok1 against llama.cpp, side by side on the same weights, interleaved, with ratios: BENCH.md's rule.

    python -m bench.versus                                  # bench-s and bench-m, 2 threads, 3 rounds
    python -m bench.versus --config bench-m --rounds 5
    python -m bench.versus --isa native,avx2                # also both engines' AVX2-only builds

For each config (BENCH.md's S and M, seeded random weights) it writes, once, a grok1 int8 checkpoint (int8
matrices with the release's scale groups, an int8 tied table with per-row scales: q8_0's bytes) and its
`grok1 convert --to gguf --dtype q8_0` export, under ~/.cache/grok1-bench/models. Then, per round, llama.cpp
(`llama-bench`, built by bench/llamacpp.py) and grok1 (`python -m bench.generate --checkpoint`, the
checkpoint loaded as `grok1 generate` loads it) each run in a fresh process, one after the other (A B A B),
measuring prefill (512 tokens) and batch-1 decode (and grok1's batch 8). The machine's read bandwidth is
measured before the first round and after the last. Output: one JSON line per measurement on stdout, and a
table of medians over rounds with the ratios on stderr (`--markdown` prints it as markdown on stdout).
Each grok1 round reports how busy the rest of the machine was; a round over 10 % is flagged.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from bench.common import REPO_DIR, emit, parse_list, provenance
from bench.llamacpp import CACHE, VERSION, build

CONFIGS = ("bench-s", "bench-m")
MODELS = CACHE / "models"
TOKENIZER = REPO_DIR.parent / "shared" / "grok-1" / "tokenizer.model"
FORMAT_VERSION = 1  # bump when the way the checkpoints are made changes: old caches are then rebuilt


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cpu_description() -> str:
    """CPU model, count and the vector extensions that pick code paths."""
    info = Path("/proc/cpuinfo").read_text()
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "unknown")
    flags = set(next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []))
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8") if f in flags]
    return f"{model} x{os.cpu_count()} ({' '.join(isa) or 'no AVX2'})"


def make_models(config: str, seed: int) -> tuple[Path, Path]:
    """(grok1 checkpoint dir, q8_0 GGUF file) for `config`, written once and cached."""
    out = MODELS / f"{config}-seed{seed}-v{FORMAT_VERSION}"
    ckpt, gguf = out / "grok1-int8", out / "q8_0.gguf"
    if (ckpt / "model.safetensors.index.json").is_file() and gguf.is_file():
        return ckpt, gguf
    if not TOKENIZER.is_file():
        raise SystemExit(f"versus: {TOKENIZER} not found: llama.cpp needs the tokenizer inside the GGUF")
    log(f"{config}: writing the grok1 int8 checkpoint and its q8_0 GGUF export under {out} (once)")
    from bench.generate import GOLDEN_DIR, build_model
    from grok1.weights import safetensors as st

    out.mkdir(parents=True, exist_ok=True)
    model = build_model(config, "int8", GOLDEN_DIR, seed)  # int8 matrices, int8 table
    st.save_checkpoint(model.state_dict(), model.config, ckpt, "int8", TOKENIZER)
    del model
    partial = gguf.with_suffix(".partial.gguf")
    run([sys.executable, "-m", "grok1", "convert", str(ckpt), str(partial), "--to", "gguf", "--dtype", "q8_0",
         "--tokenizer", str(TOKENIZER), "--force"], quiet=True)
    partial.rename(gguf)
    return ckpt, gguf


def run(cmd: list[str], env: dict | None = None, quiet: bool = False) -> str:
    """stdout of cmd; its stderr shown only when it fails (or always unless quiet)."""
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if r.returncode:
        raise SystemExit(f"versus: {' '.join(cmd[:4])}... failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return r.stdout


REPACK_CRASHED: set[Path] = set()


def llama_round(bin_dir: Path, gguf: Path, threads: int, prefill: int, decode: int) -> dict:
    """One llama-bench run: prefill and decode tokens/s (its own warm-up run first). llama.cpp repacks q8_0
    weights for its fastest kernels (AMX on CPUs that have it); where that path crashes (it does on the KVM
    Xeon of 2026-12-06, in ggml::cpu::amx), the run is redone without repacking (`--repack 0`) and says so."""
    cmd = [str(bin_dir / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", str(prefill),
           "-n", str(decode), "-r", "1", "-o", "jsonl"]
    if bin_dir not in REPACK_CRASHED:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode < 0:  # killed by a signal
            log(f"  llama-bench ({bin_dir.parent.name}) died of signal {-r.returncode} with repacked weights: "
                "measuring it with --repack 0 from now on")
            REPACK_CRASHED.add(bin_dir)
        elif r.returncode:
            raise SystemExit(f"versus: llama-bench failed ({r.returncode}):\n{r.stderr[-3000:]}")
        else:
            return parse_llama(r.stdout) | {"repack": 1}
    return parse_llama(run([*cmd, "--repack", "0"])) | {"repack": 0}


def parse_llama(out: str) -> dict:
    got = {}
    for line in out.splitlines():
        row = json.loads(line)
        kind = "prefill" if row["n_prompt"] else "decode"
        got[kind] = row["avg_ts"]
    return got


def grok1_round(ckpt: Path, isa: str, threads: int, prefill: int, decode: int, batches: list[int]) -> dict:
    """One bench.generate run on the checkpoint: prefill and decode tokens/s per batch."""
    cmd = [sys.executable, "-m", "bench.generate", "--checkpoint", str(ckpt), "--threads", str(threads),
           "--prefill", str(prefill), "--decode-tokens", str(decode), "--reps", "3",
           "--batch", ",".join(map(str, batches))]
    env = {"GROK1_KERNELS": isa, "PYTHONPATH": os.pathsep.join([str(REPO_DIR), os.environ.get("PYTHONPATH", "")])}
    got = {"other_cpu_pct": 0.0}
    for line in run(cmd, env=env).splitlines():
        row = json.loads(line)
        got["prefill"] = row["prefill_tokens_per_s"]
        got[f"decode_b{row['batch']}"] = row["decode_tokens_per_s"]
        got["other_cpu_pct"] = max(got["other_cpu_pct"], row["other_cpu_pct"])
        if row["batch"] == 1:
            got["bytes_per_token"] = row["bytes_per_token"]
    return got


def read_gbs(threads: int) -> float:
    from bench.roofline import read_bandwidth_gbs, num_threads

    with num_threads(threads):
        return read_bandwidth_gbs(threads, mb=1024, reps=5)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", help=f"comma list of {', '.join(CONFIGS)} (default both)")
    p.add_argument("--isa", action="append", help="comma list of builds to compare: native (this CPU's best, "
                   "both engines), avx2 (both engines built for AVX2/FMA only) (default native)")
    p.add_argument("--threads", type=int, default=2, help="threads for both engines (default 2)")
    p.add_argument("--rounds", type=int, default=3, help="A B rounds; medians reported (default 3)")
    p.add_argument("--prefill", type=int, default=512, help="prompt tokens of the prefill test (default 512)")
    p.add_argument("--decode-tokens", type=int, default=32, help="decoded tokens per test (default 32)")
    p.add_argument("--batch", default="1,8", help="grok1 decode batch sizes, comma list (default 1,8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    p.add_argument("--markdown", action="store_true", help="also print the table as markdown on stdout")
    args = p.parse_args()
    configs = parse_list(args.config) or list(CONFIGS)
    isas = parse_list(args.isa) or ["native"]
    batches = parse_list([args.batch], int)
    for name, got, valid in (("--config", configs, CONFIGS), ("--isa", isas, ("native", "avx2"))):
        if bad := [v for v in got if v not in valid]:
            p.error(f"{name}: unknown {', '.join(bad)}; valid: {', '.join(valid)}")
    if 1 not in batches or min(batches + [args.threads, args.rounds, args.prefill, args.decode_tokens]) < 1:
        p.error("--batch must include 1; --threads, --rounds, --prefill, --decode-tokens must be >= 1")

    base = {"bench": "versus", **provenance(), "cpu": cpu_description(), "threads": args.threads,
            "llama_cpp": f"llama-cpp-python {VERSION} sdist"}
    bins = {isa: build(isa) for isa in isas}
    models = {c: make_models(c, args.seed) for c in configs}
    bw = [read_gbs(args.threads)]
    emit({**base, "kind": "read_gbs", "when": "before", "gbs": round(bw[0], 2)})
    results: dict[tuple, list[dict]] = {}
    for r in range(args.rounds):
        for config in configs:
            ckpt, gguf = models[config]
            for isa in isas:
                log(f"round {r + 1}/{args.rounds}: {config} {isa}: llama.cpp, then grok1")
                a = llama_round(bins[isa], gguf, args.threads, args.prefill, args.decode_tokens)
                b = grok1_round(ckpt, isa, args.threads, args.prefill, args.decode_tokens, batches)
                for engine, row in (("llama.cpp", a), ("grok1", b)):
                    emit({**base, "kind": "round", "round": r + 1, "config": config, "isa": isa, "engine": engine, **row})
                    results.setdefault((config, isa, engine), []).append(row)
                if b["other_cpu_pct"] > 10:
                    log(f"  other processes used {b['other_cpu_pct']} % of the CPU during grok1's run: repeat it")
    bw.append(read_gbs(args.threads))
    emit({**base, "kind": "read_gbs", "when": "after", "gbs": round(bw[1], 2)})
    gbs = max(bw)

    def med(config: str, isa: str, engine: str, key: str) -> float | None:
        vals = [row[key] for row in results[(config, isa, engine)] if row.get(key) is not None]
        return statistics.median(vals) if vals else None

    lines = [f"CPU: {base['cpu']}; {args.threads} threads; read bandwidth {bw[0]:.1f} / {bw[1]:.1f} GB/s "
             f"(before / after); medians of {args.rounds} interleaved rounds; commit {base['commit']}",
             "", "| config | build | metric | llama.cpp q8_0 | grok1 int8 | grok1 / llama.cpp | grok1 % of read bw |",
             "|---|---|---|---|---|---|---|"]
    for config in configs:
        for isa in isas:
            per_tok = results[(config, isa, "grok1")][0]["bytes_per_token"]
            for metric, key in (("prefill 512", "prefill"), ("decode b1", "decode")):
                a, b = med(config, isa, "llama.cpp", key), med(config, isa, "grok1", key if key == "prefill" else "decode_b1")
                pct = f"{100 * b * per_tok / 1e9 / gbs:.0f} %" if key == "decode" else ""
                lines.append(f"| {config} | {isa} | {metric} (tok/s) | {a:.1f} | {b:.1f} | **{b / a:.2f}x** | {pct} |")
                emit({**base, "kind": "summary", "config": config, "isa": isa, "metric": metric, "llama_cpp": a,
                      "grok1": b, "ratio": round(b / a, 3)})
            b1 = med(config, isa, "grok1", "decode_b1")
            for batch in batches[1:]:
                bb = med(config, isa, "grok1", f"decode_b{batch}")
                lines.append(f"| {config} | {isa} | decode b{batch} aggregate (tok/s) | | {bb:.1f} | "
                             f"{bb / b1:.2f}x grok1's b1 | |")
    if REPACK_CRASHED:
        lines.insert(1, f"llama.cpp ran with --repack 0 ({', '.join(b.parent.name for b in REPACK_CRASHED)}): "
                        "its repacked (AMX) path crashed on this machine")
    table = "\n".join(lines)
    log("\n" + table)
    if args.markdown:
        print(table)


if __name__ == "__main__":
    main()
