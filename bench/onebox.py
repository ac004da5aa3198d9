"""One-box mode: a model larger than the memory it may use, run from its memory-mapped checkpoint.

    python -m bench.onebox [--cap 700MB] [--dir /tmp/grok1-onebox] [--tokens 16] [--threads 1]
                           [--dim 1024 --layers 8 --ffn 8192] [--uncapped]

1. Writes (once) a synthetic int8 checkpoint in grok1's format under --dir: random weights, grok-1-mini's
   tokenizer, 8 experts of width --ffn in each of --layers layers (default ~1.65 GB, 98% of it experts).
2. Creates a memory cgroup below this process's own (v1 `memory.limit_in_bytes`, v2 `memory.max`) capped at
   --cap, drops the checkpoint's pages from the page cache (posix_fadvise DONTNEED), and runs in it:
   a. the command a user types, default flags: `grok1 generate --checkpoint DIR PROMPT --max-new-tokens 4
      --temperature 0` (cli.main, as `python -m grok1` runs it); it must exit 0 and say in one line that it
      keeps the weights mapped;
   b. `python -m bench.onebox --child`: the same CLI load (`cli.common.model_from_args`, default flags), then
      --tokens greedy tokens timed one by one.
   The cgroup's peak usage (v1 memory.max_usage_in_bytes, v2 memory.peak) and the child's own figures are
   reported, and the cgroup is removed.
3. With --uncapped, the child again without a cap and with the page cache warm (every expert resident,
   still memory-mapped: --no-pack): what a perfect expert cache would give.

Child figures, one JSON line each: `decode_tok_s` (tokens 2..N, the first one carries the prefill),
`read_bytes_per_token` (/proc/self/io read_bytes: bytes this process caused to be read from the disk),
`major_faults_per_token` (getrusage), `routed_bytes_per_token` (the two routed experts of every layer:
what a token needs), `page_cache_hit` = 1 - read / routed, `peak_rss_mb` (VmHWM: file pages included),
`rss_anon_mb` / `rss_file_mb` at the end, `packed`. The machine is shared: tokens/s are indicative.
Needs root and a writable cgroup hierarchy (exits with the reason otherwise).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from bench.common import CpuMonitor, emit, peak_rss_mb, provenance

PROMPT = "It is a truth universally acknowledged"
CGROUP_ROOT = Path("/sys/fs/cgroup")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- the synthetic checkpoint ----

def onebox_config(dim: int, layers: int, ffn: int):
    from grok1.config import from_name
    mini = from_name("grok-1-mini")  # its tokenizer (4,096 pieces) travels with the checkpoint
    return dataclasses.replace(mini, dim=dim, n_layers=layers, n_heads=8, n_kv_heads=2, head_dim=dim // 8,
                               ffn_dim=ffn, embedding_multiplier=dim**0.5, attn_scale=(dim // 8) ** -0.5,
                               max_seq_len=512)


def write_checkpoint(out: Path, cfg, seed: int = 0) -> Path:
    """Random int8 weights (std ~ 1/sqrt(fan_in) after the scales), float32 embedding, norms and router."""
    import torch

    from grok1.cli.common import DEFAULT_CHECKPOINT
    from grok1.model import Transformer
    from grok1.quant import swap_to_int8
    from grok1.weights import safetensors as st

    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = Transformer(cfg)
    swap_to_int8(model)
    tensors, shapes = {}, model.state_dict()
    for name, t in shapes.items():
        if t.dtype == torch.int8:
            tensors[name] = torch.randint(-127, 128, t.shape, dtype=torch.int8, generator=g)
        elif t.dtype == torch.bfloat16:  # scales: int8 uniform has std 73.3; fan_in is the weight's input
            w = name.rsplit(".", 1)[0] + ".weight" if name.endswith("scales") else name.replace(".s", ".w")
            fan_in = shapes[w].shape[-1]
            tensors[name] = torch.full(t.shape, 1 / (73.3 * fan_in**0.5), dtype=torch.bfloat16)
        elif name.endswith("moe.gate.weight"):
            tensors[name] = torch.randn(t.shape, generator=g) / cfg.dim**0.5
        elif name.endswith("norm.weight"):
            tensors[name] = torch.ones(t.shape)
        else:  # the embedding
            tensors[name] = torch.randn(t.shape, generator=g) / cfg.dim**0.5
    return st.save_checkpoint(tensors, cfg, out, "int8", DEFAULT_CHECKPOINT / "tokenizer.model")


def drop_from_page_cache(directory: Path) -> None:
    """Forget the checkpoint's clean pages (written or read before), so the capped run reads from the disk."""
    for f in directory.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ---- the memory cgroup ----

def make_cgroup(cap: int) -> tuple[Path, str, str]:
    """A child of this process's memory cgroup, capped: (directory, procs file, peak-usage file)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hierarchy, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):  # v1
            d = CGROUP_ROOT / "memory" / path.lstrip("/") / f"grok1-onebox-{os.getpid()}"
            d.mkdir()
            (d / "memory.limit_in_bytes").write_text(str(cap))
            return d, "cgroup.procs", "memory.max_usage_in_bytes"
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0":  # v2: the parent must delegate the memory controller to its children
            for base in (CGROUP_ROOT, CGROUP_ROOT / "unified"):
                if (base / "cgroup.controllers").is_file():
                    parent = base / path.lstrip("/")
                    (parent / "cgroup.subtree_control").write_text("+memory")
                    d = parent / f"grok1-onebox-{os.getpid()}"
                    d.mkdir()
                    (d / "memory.max").write_text(str(cap))
                    return d, "cgroup.procs", "memory.peak"
    raise OSError("no memory cgroup hierarchy (v1 or v2) found for this process")


# The process loads the compiled kernels, then joins the cgroup: torch's extension loader may rebuild them
# (another work tree built the same sources from other paths), a compiler needs ~350 MB, and one OOM-killed
# inside the cap leaves torch's build lock behind, on which every later load waits. The interpreter and torch
# (~160 MB anonymous) stay charged to the parent; the cap binds what the model touches.
JOIN = ("import os, sys; from grok1 import kernels; kernels.cpu_ops(); "
        "open(sys.argv[1], 'w').write(str(os.getpid())); ")
JOIN_THEN_CLI = JOIN + "from grok1.cli.main import main; sys.exit(main(sys.argv[2:]))"  # = python -m grok1 ...


def join_cgroup(procs: str) -> None:
    from grok1 import kernels
    kernels.cpu_ops()
    Path(procs).write_text(str(os.getpid()))


def run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=False, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def peak_usage(cgroup: tuple[Path, str, str]) -> int | None:
    try:
        return int((cgroup[0] / cgroup[2]).read_text())
    except (OSError, ValueError):
        return None


# ---- the measuring child ----

def _io_read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no read_bytes")


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) * 1024 / 1e6, 1)
    return 0.0


def child(args: argparse.Namespace) -> None:
    import torch

    from grok1 import plan
    from grok1.cli.common import config_from_args, model_from_args, tokenizer_from_args
    from grok1.cli.main import build_parser
    from grok1.engine.engine import engine_for
    from grok1.engine.sampling import SamplingParams
    from grok1.panels import is_packed

    torch.set_num_threads(args.threads)
    if args.join:
        join_cgroup(args.join)
    cli = ["generate", "--checkpoint", args.dir, PROMPT, *(["--no-pack"] if args.no_pack else [])]
    cli_args = build_parser().parse_args(cli)
    cfg = config_from_args(cli_args)
    tokenizer = tokenizer_from_args(cli_args)
    t0 = time.perf_counter()
    model = model_from_args(cli_args, cfg)  # the CLI's own load: default flags decide whether to pack
    load_s = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_new_tokens=args.tokens, ignore_eos=True)
    marks = []  # (time, read_bytes, major faults) after each token
    monitor = CpuMonitor()
    ids = tokenizer.encode(PROMPT)
    for _ in engine_for(model, tokenizer, [ids], [params]).stream(ids, params):  # an output per token
        marks.append((time.perf_counter(), _io_read_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_majflt))
    (t1, r1, f1), (t2, r2, f2) = marks[0], marks[-1]
    steps = len(marks) - 1
    routed = plan.routed_bytes_per_token(cfg, "int8")
    read = (r2 - r1) / steps
    emit({"kind": "onebox_child", **provenance(), "threads": args.threads, "tokens": len(marks),
          "weights_gb": round(sum(plan.weight_parts(cfg, "int8", embedding_bytes=4).values()) / 1e9, 3),
          "packed": is_packed(model), "load_s": round(load_s, 2), "decode_tok_s": round(steps / (t2 - t1), 3),
          "read_bytes_per_token": int(read), "major_faults_per_token": round((f2 - f1) / steps, 1),
          "routed_bytes_per_token": routed, "page_cache_hit": round(1 - read / routed, 3),
          "peak_rss_mb": peak_rss_mb(), "rss_anon_mb": _status_mb("RssAnon"), "rss_file_mb": _status_mb("RssFile"),
          "other_cpu_pct": monitor.other_cpu_pct()})


# ---- would an expert cache pay? routing on a trained model ----

def routing_skew(tokens: int, capacities: tuple[int, ...] = (2, 4, 6)) -> dict:
    """Route `tokens` of Austen (from the end of the corpus) through grok-1-mini, the trained demo model, and
    compare caches of `c` experts per layer for a decoded token stream: pinning the c most used experts (an
    oracle that knows the whole text) against LRU (what the page cache does); uniform routing gives c / E."""
    import torch

    from grok1.cli.common import DEFAULT_CHECKPOINT
    from grok1.tokenizer import Tokenizer
    from grok1.weights.load import load_model, resolve_config

    cfg = resolve_config(DEFAULT_CHECKPOINT)
    model = load_model(DEFAULT_CHECKPOINT, cfg)
    text = (Path(__file__).resolve().parents[2] / "shared" / "corpus" / "austen" / "austen.txt").read_text()
    ids = Tokenizer(DEFAULT_CHECKPOINT / "tokenizer.model").encode(text[-40 * tokens:])[-tokens:]
    chosen: list[list[torch.Tensor]] = [[] for _ in model.layers]  # per layer: [T, A] expert ids
    hooks = [layer.moe.gate.register_forward_hook(
        lambda m, i, out, k=k: chosen[k].append(out.float().softmax(-1).topk(cfg.n_active_experts, -1).indices))
        for k, layer in enumerate(model.layers)]
    with torch.no_grad():
        for a in range(0, len(ids), cfg.max_seq_len):
            model(torch.tensor([ids[a:a + cfg.max_seq_len]]))
    for h in hooks:
        h.remove()
    out = {"tokens": len(ids), "experts": cfg.n_experts, "active": cfg.n_active_experts, "layers": {}}
    for k, parts in enumerate(chosen):
        routes = torch.cat(parts).tolist()  # [T, A]
        counts = torch.bincount(torch.tensor(routes).flatten(), minlength=cfg.n_experts).tolist()
        row = {"share": [round(c / (2 * len(routes)), 3) for c in counts]}
        for cap in capacities:
            hot = set(sorted(range(cfg.n_experts), key=lambda e: -counts[e])[:cap])
            pinned = sum(e in hot for r in routes for e in r) / (2 * len(routes))
            lru: list[int] = []
            hits = 0
            for r in routes:
                for e in r:
                    hits += e in lru
                    lru = [x for x in lru if x != e] + [e]
                    lru = lru[-cap:]
            row[f"cache{cap}"] = {"pinned_hottest": round(pinned, 3), "lru": round(hits / (2 * len(routes)), 3),
                                  "uniform": round(cap / cfg.n_experts, 3)}
        out["layers"][k] = row
    return out


# ---- the driver ----

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cap", default="700MB", help="memory cgroup limit for the runs (default 700MB)")
    p.add_argument("--dir", default="/tmp/grok1-onebox", help="the synthetic checkpoint (written if missing)")
    p.add_argument("--tokens", type=int, default=16, help="greedy tokens the measuring child generates")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--ffn", type=int, default=8192)
    p.add_argument("--uncapped", action="store_true", help="also run without a cap, page cache warm, --no-pack")
    p.add_argument("--skew", type=int, metavar="TOKENS",
                   help="instead: routing skew of the trained grok-1-mini over TOKENS of Austen, and the hit rates "
                        "of pinned vs LRU expert caches")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-pack", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--join", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    if args.skew:
        return emit({"kind": "routing_skew", **provenance(), **routing_skew(args.skew)})

    from grok1.plan import parse_size
    cap = parse_size(args.cap)
    directory = Path(args.dir)
    # Our own build of the compiled kernels: the shared one is rebuilt whenever another work tree loads the
    # same sources from other paths, and its lock then makes every loader wait.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", f"{directory}-torch-extensions")
    from grok1 import kernels
    log("building / loading the compiled kernels ...")
    kernels.cpu_ops()
    if not (directory / "config.json").is_file():
        log(f"writing the synthetic checkpoint to {directory} ...")
        write_checkpoint(directory, onebox_config(args.dim, args.layers, args.ffn))
    size = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
    log(f"checkpoint {directory}: {size / 1e9:.3f} GB; cap {cap / 1e6:.0f} MB")
    me = [sys.executable, "-m", "bench.onebox", "--child", "--dir", str(directory), "--tokens", str(args.tokens),
          "--threads", str(args.threads)]
    try:
        cgroup = make_cgroup(cap)
    except OSError as e:
        sys.exit(f"bench.onebox: cannot create a memory cgroup here: {e}")
    procs = str(cgroup[0] / cgroup[1])
    try:
        drop_from_page_cache(directory)
        cli = run([sys.executable, "-c", JOIN_THEN_CLI, procs, "generate", "--checkpoint", str(directory), PROMPT,
                   "--max-new-tokens", "4", "--temperature", "0"])
        notice = [line for line in cli.stderr.splitlines() if "memory-mapped" in line]
        emit({"kind": "onebox_cli", "cap_mb": cap / 1e6, "checkpoint_gb": round(size / 1e9, 3), "rc": cli.returncode,
              "notice": notice, "cgroup_peak_mb": round((peak_usage(cgroup) or 0) / 1e6, 1),
              "stdout": cli.stdout.strip()[-200:], "stderr_tail": cli.stderr.strip()[-300:] if cli.returncode else ""})
        drop_from_page_cache(directory)
        measured = run([*me, "--join", procs])
        if measured.returncode:
            sys.exit(f"the capped child failed (rc {measured.returncode}): {measured.stderr.strip()[-500:]}")
        row = json.loads(measured.stdout.strip().splitlines()[-1])
        emit({**row, "kind": "onebox_capped", "cap_mb": cap / 1e6,
              "cgroup_peak_mb": round((peak_usage(cgroup) or 0) / 1e6, 1),
              "notice": [line for line in measured.stderr.splitlines() if "memory-mapped" in line]})
    finally:
        cgroup[0].rmdir()
    if args.uncapped:
        for f in directory.glob("*.safetensors"):  # warm the page cache: every expert resident
            with open(f, "rb") as fh:
                while fh.read(16 << 20):
                    pass
        warm = run([*me, "--no-pack"])
        if warm.returncode:
            sys.exit(f"the uncapped child failed: {warm.stderr.strip()[-500:]}")
        emit({**json.loads(warm.stdout.strip().splitlines()[-1]), "kind": "onebox_uncapped_warm"})


if __name__ == "__main__":
    main()
