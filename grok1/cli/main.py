"""`grok1` command line: one argparse subcommand per job, each in its own module."""

from __future__ import annotations

import argparse
import os
import sys

import torch.distributed as dist

from grok1 import __version__
from grok1.cli import chat, check, convert, eval, generate, info, plan, ranks, score, serve, train
from grok1.cli.common import device_arg


def model_options() -> argparse.ArgumentParser:
    """Options every model-loading subcommand shares."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", metavar="DIR",
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
    g.add_argument("--table", choices=["int8", "bf16"],
                   help="the output projection reads a copy of the tied embedding table (read whole for every "
                        "token's logits) made at load as int8 (one scale per row: a quarter of the release's float32 "
                        "bytes) or bf16 (half; each value rounded to 8 significant bits); the input lookup keeps the "
                        "stored rows (so the copy adds its own bytes to memory); both change the logits slightly "
                        "(the error on the golden model: bench/README.md); default: the table as stored, for both")
    g.add_argument("--device", default="cpu", type=device_arg, help="torch device: cpu, cuda, cuda:1, ... (default cpu)")
    g.add_argument("--no-pack", action="store_true",
                   help="generate/chat/serve/score/check on CPU: keep the int8 and fp32 matrices memory-mapped in the "
                        "checkpoint's row-major layout instead of copying them at load (~1 s per GB) into the "
                        "compiled kernel's panels (with panels: decoding 1.7-2.5x and prefill ~2x faster); without it, "
                        "grok1 keeps them mapped anyway when they do not fit in the memory it may use (RAM, "
                        "cgroup limit), so a model larger than memory runs from disk")
    ranks.add_options(p)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grok1", description="Run xAI's Grok-1 and models of its architecture. "
                                     "`grok1 COMMAND --help` describes each command.")
    parser.add_argument("--version", action="version", version=f"grok1 {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    common = model_options()
    for module in (generate, chat, serve, score, info, plan, check, eval, train, convert):
        module.add_parser(sub, common)
    info.add_presets_parser(sub)
    return parser


def undecodable(argv: list[str]) -> str | None:
    """The first command-line argument that is not valid UTF-8 (Python keeps its bytes as surrogates), described."""
    for i, arg in enumerate(argv):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError as e:
            offset = len(arg[:e.start].encode("utf-8", "surrogateescape"))
            return f"argument {i + 1} is not valid UTF-8 (byte 0x{ord(arg[e.start]) & 0xFF:02x} at byte {offset})"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if not argv:  # bare `grok1`: the command list, not an error
        parser.print_help()
        return 0
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if (problem := undecodable(argv)) is not None:
        print(f"grok1 {args.command}: error: {problem}", file=sys.stderr)
        return 2
    try:
        return args.run(args) or 0
    except BrokenPipeError:  # `grok1 ... | head`: the reader left; exit quietly as Unix tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not complain
        return 141
    except (ValueError, OSError) as e:  # user mistakes: one clear line, no traceback
        print(f"grok1 {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if not dist.is_initialized():
            raise
        ranks.exit_on_failure(e, args.heartbeat_timeout + 3)  # one rank of a job: name the failure, never hang
        raise
