"""`grok1 plan`: memory per device for a model, weight format, device count, TP x EP split, batch and context."""

from __future__ import annotations

import argparse
import json
import sys
from typing import NoReturn

from grok1 import plan
from grok1.config import PRESETS, ModelConfig, from_name


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("plan", help="memory per device, whether it fits, and the TP x EP split that does",
                       description="Plan a deployment without loading anything: memory per device (weights, KV "
                                   "cache, activations, runtime headroom) for a preset, weight format, device "
                                   "count, TP x EP split, batch and context; whether it fits; the best split. "
                                   "Assumes bfloat16 compute (the CUDA default; on CPU pass --dtype bfloat16 to "
                                   "the other commands to match).")
    p.add_argument("--preset", default="grok-1", metavar="NAME",
                   help=f"model config: {', '.join(PRESETS)} (default grok-1)")
    p.add_argument("--weights", default="int8", metavar="FORMAT",
                   help="weight format: int8 (the release), int4, bf16 (default int8)")
    p.add_argument("--devices", type=int, default=8, metavar="N", help="GPUs (or 1 for a CPU box; default 8)")
    p.add_argument("--memory-per-device", default="80GB", metavar="SIZE",
                   help="memory of each device, e.g. 80GB, 141GB, 512GB, 80GiB (GB = 10^9 bytes; default 80GB)")
    p.add_argument("--batch", type=int, default=1, metavar="B", help="sequences decoded together (default 1)")
    p.add_argument("--context", type=int, metavar="N", help="tokens of context per sequence (default: the model's "
                                                            "maximum, 8192 for grok-1)")
    p.add_argument("--tp", type=int, metavar="T", help="tensor-parallel group size (default: the best split)")
    p.add_argument("--ep", type=int, metavar="E", help="expert-parallel group size (default: devices / TP)")
    p.add_argument("--json", action="store_true", help="print one JSON object for scripts")
    p.set_defaults(run=run)
    p.error = _one_line_error  # type: ignore[method-assign]


def _one_line_error(message: str) -> NoReturn:
    """Bad flags (a non-number for --devices, an unknown flag): one line and exit 2, like the other errors."""
    print(f"grok1 plan: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def run(args: argparse.Namespace) -> int:
    cfg = from_name(args.preset)
    if args.weights not in plan.FORMATS:
        raise ValueError(f"--weights {args.weights!r}: choose one of {', '.join(plan.FORMATS)}")
    memory = plan.parse_size(args.memory_per_device)
    context = cfg.max_seq_len if args.context is None else args.context
    result = plan.make_plan(cfg, args.weights, args.devices, memory, args.batch, context, args.tp, args.ep)
    c = result.chosen
    if args.json:
        out = {"preset": args.preset, "weights": args.weights, "devices": args.devices,
               "memory_per_device_gb": round(memory / plan.GB, 3), "batch": args.batch, "context": context,
               "kv_cache_bytes_per_token": plan.kv_bytes_per_token(cfg), "tp": c.tp, "ep": c.ep, "fits": c.fits,
               "per_device": plan.to_json(c),
               "best_fitting": plan.to_json(result.better) if result.better else None,
               "devices_needed": plan.to_json(result.needed) | {"devices": result.needed.tp * result.needed.ep}
               if result.needed else None}
        if result.one_box is not None:
            out["one_box"] = result.one_box
        print(json.dumps(out))
    else:
        _print(args, cfg, context, result)
    return 0


def _gb(n: float) -> str:
    return f"{n / plan.GB:.2f} GB" if abs(n) >= 0.1 * plan.GB else f"{n / 1e6:.2f} MB"


def _print(args: argparse.Namespace, cfg: ModelConfig, context: int, result: plan.Plan) -> None:
    c = result.chosen
    parts = plan.device_weight_parts(cfg, args.weights, c.tp, c.ep)
    print(f"{args.preset}, {args.weights} weights, {args.devices} x {c.memory / plan.GB:g} GB, batch {args.batch} x "
          f"{context} tokens: TP {c.tp} x EP {c.ep} ({'given' if result.given else 'best'} split)")
    print("per device")
    print(f"  weights           {_gb(c.weights):>11}   attention {_gb(parts['attention'])}, experts "
          f"{_gb(parts['experts'])}, embedding {_gb(parts['embedding'])}, norms and router "
          f"{_gb(parts['replicated'])}")
    print(f"  KV cache          {_gb(c.kv_cache):>11}   {plan.kv_bytes_per_token(cfg) / 1024:g} KiB per token "
          f"x {args.batch * context} tokens / TP {c.tp}")
    print(f"  activations       {_gb(c.activations):>11}   peak of one forward (a prefill)")
    print(f"  runtime headroom  {_gb(c.headroom):>11}   {plan.HEADROOM_FIXED / plan.GB:g} GB + "
          f"{plan.HEADROOM_FRACTION:.0%} of the device")
    free = c.memory - c.total
    verdict = f"fits, {_gb(free)} spare" if c.fits else f"does not fit, {_gb(-free)} over"
    print(f"  total             {_gb(c.total):>11}   of {_gb(c.memory)}: {verdict}")
    box, better, needed = result.one_box, result.better, result.needed
    if box is not None:
        if box["mode"] == "in memory":
            print("one box: the weights fit in RAM (grok1 packs them into the kernel's panels at load)")
        else:
            print(f"one box: the weights do not fit in RAM; grok1 keeps them memory-mapped from disk (one-box "
                  f"mode): {box['experts_cached']:.0%} of the experts stay cached, each token pages in about "
                  f"{box['page_in_gb_per_token']:g} GB of routed experts from disk")
    elif better:
        print(f"best split that fits: TP {better.tp} x EP {better.ep} ({_gb(better.total)} per device)")
    elif needed:
        print(f"no split of {args.devices} devices fits; {needed.tp * needed.ep} devices of this size do "
              f"(TP {needed.tp} x EP {needed.ep}, {_gb(needed.total)} per device)")
    elif not c.fits:
        print("no split of any device count fits this memory per device")
