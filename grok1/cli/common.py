"""Loading shared by the subcommands: model, config and tokenizer from command-line options."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from grok1.config import ModelConfig, resolve_config
from grok1.model import Transformer
from grok1.parallel.dist import Mesh
from grok1.tokenizer import Tokenizer
from grok1.weights.load import load_model
from grok1.weights.source import detect, find_release_dir, open_source

# The bundled demo model (package data): what every --checkpoint option means when it is omitted.
DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "assets" / "grok-1-mini"

SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes 64 bits


class DefaultsFormatter(argparse.HelpFormatter):
    """Help that ends each option with its default, unless the help already says it or there is nothing to
    say (flags, options without a default)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or not action.option_strings or action.default in (None, argparse.SUPPRESS)
                or isinstance(action.default, bool)):
            return text
        return text + " (default: %(default)s)"


def seed_arg(text: str) -> int:
    """argparse type of every --seed: an integer in 0..2**64-1."""
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= seed <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"{seed} is outside 0..2**64-1 (64 bits)")
    return seed


def device_arg(text: str) -> str:
    """argparse type of every --device: a torch device this machine has (cpu, cuda, cuda:1, mps, ...)."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: CUDA is not available in this torch build or machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text}: MPS is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"{text}: grok1 runs on cpu, cuda or mps")
    return text


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def texts_from_args(texts: list[str], files: list[str], what: str) -> list[str]:
    """The texts a command works on: its positional arguments ("-" = all of stdin), then each --file's text."""
    out = []
    for text in texts:
        if text == "-":
            data = sys.stdin.buffer.read()
            out.append(decode_utf8(data, "stdin"))
        else:
            out.append(text)
    for path in files:
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise ValueError(f"--file {path}: {e.strerror or e}") from None
        out.append(decode_utf8(data, path))
    if not out:
        raise ValueError(f"give at least one {what} (an argument, - for stdin, or --file PATH)")
    return out


def decode_utf8(data: bytes, source: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{source} is not UTF-8 text: byte 0x{data[e.start]:02x} at byte offset {e.start}") from None


def check_sampling(args: argparse.Namespace, max_tokens_flag: str = "--max-new-tokens") -> None:
    """Check the sampling options a command has, naming each by its flag (not by SamplingParams' fields)."""
    checks = [("temperature", "--temperature", lambda v: 0 <= v < float("inf"), "a finite number >= 0 (0 = greedy)"),
              ("top_p", "--top-p", lambda v: 0 < v <= 1, "in (0, 1] (1 = off)"),
              ("top_k", "--top-k", lambda v: v >= 0, "an integer >= 0 (0 = off)"),
              (max_tokens_flag.lstrip("-").replace("-", "_"), max_tokens_flag, lambda v: v is None or v >= 1,
               "at least 1")]
    for attr, flag, ok, valid in checks:
        if hasattr(args, attr) and not ok(getattr(args, attr)):
            raise ValueError(f"{flag} {getattr(args, attr)} is invalid: must be {valid}")
    if "" in getattr(args, "stop", ()):
        raise ValueError("--stop '' is invalid: a stop text must not be empty")


def config_from_args(args: argparse.Namespace, checkpoint: bool = True) -> ModelConfig:
    """Check the checkpoint exists and find its config (cheap: call before anything slow). An omitted
    --checkpoint becomes the bundled demo model (unless `checkpoint` is False: the config alone is wanted).
    --preset/--config name the config of a release checkpoint; a checkpoint that carries its own config.json
    (grok1's format) must agree with them."""
    if not checkpoint:
        return resolve_config(None, args.config, args.preset)
    if args.checkpoint is None:
        args.checkpoint = str(DEFAULT_CHECKPOINT)
    if not Path(args.checkpoint).exists():
        raise ValueError(f"checkpoint directory {args.checkpoint} does not exist")
    cfg = resolve_config(args.checkpoint, args.config, args.preset) if not carries_config(args.checkpoint) else None
    if cfg is None:  # grok1's format or an HF layout: the checkpoint's own config
        own = open_source(args.checkpoint).config
        cfg = resolve_config(None, args.config, args.preset) if (args.config or args.preset) else own
        if own != cfg:
            diff = [f"{k} {getattr(own, k)} vs {getattr(cfg, k)}" for k in own.to_dict()
                    if getattr(own, k) != getattr(cfg, k)]
            flag = f"--preset {args.preset}" if args.preset else f"--config {args.config}"
            raise ValueError(f"checkpoint {args.checkpoint} carries its own config.json, and {flag} describes a "
                             f"different model ({', '.join(diff[:4])}); leave {flag.split()[0]} out")
    return cfg


def carries_config(checkpoint: str | Path) -> bool:
    """grok1's format and the HF layouts hold their config (the release does not)."""
    return (Path(checkpoint) / "model.safetensors.index.json").is_file() and detect(checkpoint) != "release"


LOUD_LOAD_BYTES = 1 << 30  # checkpoints from this size on say that they are loading, and how long it took


def weight_files(ckpt: Path) -> list[Path]:
    """The files that hold a checkpoint's weights: safetensors shards or the release's tensor pickles (not
    trainer_state.pt, tokens, logs or anything else that may sit beside them)."""
    legacy = find_release_dir(ckpt)
    if legacy is not None:
        return sorted(f for f in legacy.glob("tensor*") if f.is_file())
    return sorted(f for f in ckpt.glob("*.safetensors") if f.is_file())


def model_from_args(args: argparse.Namespace, cfg: ModelConfig, mesh: Mesh | None = None) -> Transformer:
    if mesh is None and args.tp * args.ep > 1:
        raise ValueError(f"--tp {args.tp} --ep {args.ep}: `grok1 {args.command}` runs in one process; "
                         f"generate, score and serve run under torchrun")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    size = sum(f.stat().st_size for f in weight_files(Path(args.checkpoint)))
    loud = size >= LOUD_LOAD_BYTES and (mesh is None or mesh.rank == 0)
    if loud:  # a large checkpoint takes a while: say so, so a silent terminal is not mistaken for a hang
        print(f"grok1 {args.command}: loading {args.checkpoint} ({size / 1e9:.1f} GB of weights)...", file=sys.stderr,
              flush=True)
    start = time.perf_counter()
    # Inference only (generate, chat, serve, score, check): the kernel's weight layout where it runs.
    # pack=None: panels unless the weights do not fit in the memory this process may use (then kept mapped).
    model = load_model(args.checkpoint, cfg, args.device, dtype, pack=False if getattr(args, "no_pack", False) else None,
                       mesh=mesh, table=getattr(args, "table", None))
    if loud:
        print(f"grok1 {args.command}: loaded in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return model


def tokenizer_from_args(args: argparse.Namespace) -> Tokenizer:
    if args.tokenizer:
        return Tokenizer(args.tokenizer)
    ckpt = Path(args.checkpoint or DEFAULT_CHECKPOINT)  # as config_from_args, which may not have run yet
    for candidate in (ckpt / "tokenizer.model", ckpt.parent / "tokenizer.model"):
        if candidate.is_file():
            return Tokenizer(candidate)
    raise ValueError(f"no tokenizer.model next to checkpoint {ckpt}: pass --tokenizer PATH")
