"""Loading shared by the subcommands: model, config and tokenizer from command-line options."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from grok1.config import ModelConfig
from grok1.model import Transformer
from grok1.parallel.dist import Mesh
from grok1.tokenizer import Tokenizer
from grok1.weights.load import load_model, resolve_config

# The bundled demo model (package data): what every --checkpoint option means when it is omitted.
DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "assets" / "grok-1-mini"


def config_from_args(args: argparse.Namespace) -> ModelConfig:
    """Check the checkpoint exists and find its config (cheap: call before anything slow)."""
    if not Path(args.checkpoint).exists():
        raise ValueError(f"checkpoint directory {args.checkpoint} does not exist")
    return resolve_config(args.checkpoint, args.config, args.preset)


def model_from_args(args: argparse.Namespace, cfg: ModelConfig, mesh: Mesh | None = None) -> Transformer:
    if mesh is None and args.tp * args.ep > 1:
        raise ValueError(f"--tp {args.tp} --ep {args.ep}: `grok1 {args.command}` runs in one process; "
                         f"generate and score run under torchrun")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available in this torch build")
    # Inference only (generate, chat, serve, score, check): the kernel's weight layout where it runs.
    return load_model(args.checkpoint, cfg, args.device, dtype, pack=not getattr(args, "no_pack", False), mesh=mesh)


def tokenizer_from_args(args: argparse.Namespace) -> Tokenizer:
    if args.tokenizer:
        return Tokenizer(args.tokenizer)
    ckpt = Path(args.checkpoint)
    for candidate in (ckpt / "tokenizer.model", ckpt.parent / "tokenizer.model"):
        if candidate.is_file():
            return Tokenizer(candidate)
    raise ValueError(f"no tokenizer.model next to checkpoint {ckpt}: pass --tokenizer PATH")
