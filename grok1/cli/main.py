"""`grok1` command line: one argparse subcommand per job, each in its own module."""

from __future__ import annotations

import argparse
import sys

import torch.distributed as dist

from grok1.cli import chat, check, convert, generate, info, plan, ranks, score, serve, train
from grok1.cli.common import DEFAULT_CHECKPOINT


def model_options() -> argparse.ArgumentParser:
    """Options every model-loading subcommand shares."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", metavar="DIR", default=str(DEFAULT_CHECKPOINT),
                   help="checkpoint directory: the release layout (DIR/ckpt-0/tensor*_000) or grok1's own "
                        "safetensors layout; default: the bundled demo model grok-1-mini")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--config", metavar="JSON",
                     help="model config file (reference run.py field names or ours); default: "
                          "config.json next to the checkpoint")
    src.add_argument("--preset", metavar="NAME", help="named model config, e.g. grok-1, tiny, bench-s, bench-m")
    g.add_argument("--tokenizer", metavar="PATH",
                   help="SentencePiece model; default: tokenizer.model next to the checkpoint")
    g.add_argument("--dtype", choices=["float32", "bfloat16"],
                   help="compute dtype (weights stay int8); default float32 on CPU, bfloat16 on CUDA")
    g.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ... (default cpu)")
    g.add_argument("--no-pack", action="store_true",
                   help="generate/chat/serve/score/check on CPU: keep the int8 and fp32 matrices memory-mapped in the "
                        "checkpoint's row-major layout instead of copying them at load (~1 s per GB) into the "
                        "compiled kernel's panels (with panels: decoding 1.7-2.5x and prefill ~2x faster)")
    ranks.add_options(p)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grok1", description="Run xAI's Grok-1 and models of its architecture.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = model_options()
    for module in (generate, score, info, plan, check, serve, chat, train, convert):
        module.add_parser(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except (ValueError, OSError) as e:  # user mistakes: one clear line, no traceback
        print(f"grok1 {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if not dist.is_initialized():
            raise
        ranks.exit_on_failure(e, args.heartbeat_timeout)  # one rank of a job: name the failure, never hang
        raise
