"""What tensor and expert parallelism cost and save on this machine: bytes read and peak RSS per rank when
loading, and decode tokens/s for one process vs several with the same total threads.

    python -m bench.parallel checkpoint --preset bench-s --out /tmp/bench-s-int8      # a random int8 checkpoint
    torchrun --nproc-per-node 2 -m bench.parallel load --checkpoint /tmp/bench-s-int8 --tp 2   # one line per rank
    python -m bench.parallel decode --preset bench-m --threads 2                      # one process, 2 threads
    torchrun --nproc-per-node 2 -m bench.parallel decode --preset bench-m --tp 2 --threads 1
    torchrun --nproc-per-node 2 -m bench.parallel collectives --tokens 1,8,64 --dim 1024   # all-reduce vs all-to-all

`decode` builds random int8 weights per rank directly in its slice (timing needs no shared weights), packs them
for the compiled kernel and times batched decode steps. On a shared CPU the figures are indicative only.
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path

import torch
import torch.distributed as dist

from bench.common import emit, peak_rss_mb, provenance
from grok1 import kernels
from grok1.config import from_name
from grok1.model import Transformer, init_weights
from grok1.panels import pack_model
from grok1.parallel.dist import Mesh, build_mesh, connect, shard
from grok1.quant import quantize_model, swap_to_int8
from grok1.weights.load import load_model, save_model


def rchar() -> int:
    """Bytes read through read()/pread() so far, page-cache hits included (what a rank asked the files for)."""
    line = next(x for x in Path("/proc/self/io").read_text().splitlines() if x.startswith("rchar:"))
    return int(line.split()[1])


def join(tp: int, ep: int) -> Mesh | None:
    if tp * ep == 1:
        return None
    dist.init_process_group("gloo")
    return build_mesh(tp, ep)


def cmd_checkpoint(args: argparse.Namespace) -> None:
    model = Transformer(from_name(args.preset))
    init_weights(model, torch.Generator().manual_seed(0))
    quantize_model(model, "int8")
    save_model(model, args.out)
    print(f"wrote {args.out}")


def cmd_load(args: argparse.Namespace) -> None:
    mesh = join(args.tp, args.ep)
    kernels.cpu_ops()
    cfg = from_name(args.preset)
    if mesh is not None:  # a first load of the small demo model: the modules it imports on first use are not counted
        load_model(Path(__file__).parents[1] / "grok1" / "assets" / "grok-1-mini", from_name("grok-1-mini"), mesh=mesh)
    base_rss, before, t0 = peak_rss_mb(), rchar(), time.perf_counter()
    model = load_model(args.checkpoint, cfg, "cpu", torch.float32, pack=args.pack, mesh=mesh)
    seconds = time.perf_counter() - t0
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    emit(provenance() | {"bench": "load", "preset": args.preset, "tp": args.tp, "ep": args.ep, "rank": mesh.rank if mesh else 0,
                         "read_mb": round((rchar() - before) / 1e6, 1), "weights_held_mb": round(held / 1e6, 1),
                         "rss_before_mb": base_rss, "peak_rss_mb": peak_rss_mb(), "load_s": round(seconds, 2),
                         "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3, 1)})


def random_sliced_model(preset: str, mesh: Mesh | None) -> Transformer:
    """bench weights: random int8 matrices (release scale groups) and float32 table, made only in this rank's slice."""
    with torch.device("meta"):
        model = Transformer(from_name(preset))
    swap_to_int8(model)
    if mesh is not None:
        shard(model, mesh)
    gen = torch.Generator().manual_seed(0)
    for module in model.modules():
        for name, t in [*module._parameters.items(), *module._buffers.items()]:
            if t is None:
                continue
            if t.dtype == torch.int8:
                new = torch.randint(-127, 128, t.shape, dtype=torch.int8, generator=gen)
            elif t.dtype == torch.bfloat16:
                new = torch.full(t.shape, 1 / (127 * t.shape[-1] ** 0.5 if t.dim() else 1), dtype=torch.bfloat16)
            else:
                new = torch.randn(t.shape, generator=gen) * (t.shape[-1] ** -0.5 if t.dim() > 1 else 0) + (t.dim() == 1)
            if name in module._parameters:
                module._parameters[name] = torch.nn.Parameter(new, requires_grad=False)
            else:
                module._buffers[name] = new
    if mesh is not None:
        connect(model, mesh)
    return pack_model(kernels.install(model.eval()))


@torch.inference_mode()
def cmd_decode(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    mesh = join(args.tp, args.ep)
    model = random_sliced_model(args.preset, mesh)
    for batch in args.batch:
        cache = model.new_cache(batch, args.warmup + args.steps + 2)
        tokens = torch.full((batch, 1), 5)
        times = []
        for step in range(args.warmup + args.steps):
            pos = torch.full((batch,), step)
            t0 = time.perf_counter()
            tokens = model(tokens, pos, cache)[:, 0].argmax(-1, keepdim=True)
            times.append(time.perf_counter() - t0)
        per_step = sorted(times[args.warmup:])[len(times[args.warmup:]) // 2]  # median
        if mesh is None or mesh.rank == 0:
            emit(provenance() | {"bench": "parallel-decode", "preset": args.preset, "tp": args.tp, "ep": args.ep,
                                 "processes": args.tp * args.ep, "threads_per_process": args.threads,
                                 "batch": batch, "median_step_ms": round(per_step * 1e3, 2),
                                 "tokens_per_s": round(batch / per_step, 1)})


def cmd_collectives(args: argparse.Namespace) -> None:
    """The EP combine for N tokens: one all-reduce of [N, D] vs an all-to-all dispatch + combine (each rank
    sends an even share of N * A rows of D and gets as many back), float32."""
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    for n in args.tokens:
        x = torch.randn(n, args.dim)
        rows = max(world, n * 2 // world * world)
        send, recv = torch.randn(rows, args.dim), torch.empty(rows, args.dim)
        results = {}
        for name, op in (("all_reduce", lambda: dist.all_reduce(x)),
                         ("all_to_all_x2", lambda: (dist.all_to_all_single(recv, send),
                                                    dist.all_to_all_single(send, recv)))):
            for _ in range(5):
                op()
            t0 = time.perf_counter()
            for _ in range(args.iters):
                op()
            results[name + "_us"] = round((time.perf_counter() - t0) / args.iters * 1e6, 1)
        if dist.get_rank() == 0:
            emit(provenance() | {"bench": "ep-combine", "ranks": world, "tokens": n, "dim": args.dim} | results)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("checkpoint", help="write a random int8 grok1 checkpoint of a preset")
    c.add_argument("--preset", default="bench-s", help="model preset (default bench-s)")
    c.add_argument("--out", required=True, help="checkpoint directory to write")
    for name in ("load", "decode"):
        q = sub.add_parser(name, help=f"{name} benchmark (run under torchrun for --tp/--ep > 1)")
        q.add_argument("--preset", default="bench-s" if name == "load" else "bench-m", help="model preset")
        q.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks")
        q.add_argument("--ep", type=int, default=1, help="expert-parallel ranks")
    sub.choices["load"].add_argument("--checkpoint", required=True, help="grok1 checkpoint directory")
    sub.choices["load"].add_argument("--pack", action="store_true", help="pack the weights for the CPU kernel")
    d = sub.choices["decode"]
    d.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    d.add_argument("--batch", type=lambda s: [int(v) for v in s.split(",")], default=[1, 8], help="e.g. 1,8")
    d.add_argument("--steps", type=int, default=24, help="timed decode steps (default 24)")
    d.add_argument("--warmup", type=int, default=4, help="untimed steps first (default 4)")
    k = sub.add_parser("collectives", help="EP combine: all-reduce vs all-to-all (run under torchrun)")
    k.add_argument("--tokens", type=lambda s: [int(v) for v in s.split(",")], default=[1, 8, 64, 512])
    k.add_argument("--dim", type=int, default=6144, help="model dim (default 6144, Grok-1's)")
    k.add_argument("--iters", type=int, default=50, help="timed repetitions (default 50)")
    args = p.parse_args()
    {"checkpoint": cmd_checkpoint, "load": cmd_load, "decode": cmd_decode, "collectives": cmd_collectives}[args.cmd](args)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
