"""`grok1 info`: what a checkpoint (or a preset) holds and what running it costs, without loading it;
`grok1 presets`: the named model configs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from grok1.cli.common import DEFAULT_CHECKPOINT, config_from_args, weight_files
from grok1.config import PRESETS, ModelConfig
from grok1.weights.source import find_release_dir

KIND_NAMES = {"int8": "int8 matrices + bf16 scales", "bfloat16": "bf16", "float32": "fp32"}


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("info", parents=[common], help="config, parameter counts, sizes, memory estimate",
                       description="Describe a checkpoint: its config, parameter counts (total and active "
                                   "per token), size on disk and in memory, and the memory a run needs. With "
                                   "--preset or --config and no --checkpoint, describe that config alone.")
    p.add_argument("--context", type=int, default=8192, metavar="N",
                   help="tokens of KV cache per sequence (default 8192, at most the model's context)")
    p.add_argument("--batch", type=int, default=1, metavar="B", help="sequences decoded together (default 1)")
    p.set_defaults(run=run)


def add_presets_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("presets", help="list the named model configs (--preset NAME)",
                       description="List the named model configs that --preset takes, with their sizes.")
    p.set_defaults(run=run_presets)


def run_presets(args: argparse.Namespace) -> int:
    print(f"{'preset':12} {'parameters':>16} {'active':>15} {'layers':>6} {'dim':>5} {'experts':>7} {'context':>7}")
    for name, cfg in PRESETS.items():
        print(f"{name:12} {cfg.num_params():>16,} {cfg.active_params():>15,} {cfg.n_layers:>6} {cfg.dim:>5} "
              f"{cfg.n_experts:>7} {cfg.max_seq_len:>7}")
    print(f"(the bundled demo model, {DEFAULT_CHECKPOINT.name}, is what --checkpoint means when it is omitted)")
    return 0


def _gb(n: float) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.3f} MB"


def weight_kind(ckpt: Path) -> str:
    """How the checkpoint stores its matrices: int8, bfloat16 or float32 (what loading it keeps in memory)."""
    if find_release_dir(ckpt) is not None:
        return "int8"
    try:
        raw = json.loads((ckpt / "config.json").read_text())
    except (OSError, ValueError):
        return "int8"
    if "grok1" in raw and raw["grok1"].get("weights") in KIND_NAMES and raw.get("model_type") != "grok-1":
        return raw["grok1"]["weights"]
    return {"bfloat16": "bfloat16", "float32": "float32"}.get(raw.get("torch_dtype"), "int8")


def memory_bytes(cfg: ModelConfig, kind: str, embedding_bytes: int) -> int:
    if kind == "int8":
        return cfg.weight_bytes(embedding_bytes=embedding_bytes)
    return cfg.num_params() * (2 if kind == "bfloat16" else 4)


def run(args: argparse.Namespace) -> int:
    given = [flag for flag, on in (("--table", args.table), ("--no-pack", args.no_pack)) if on]
    if given:  # options of the commands that run the model: refused here, not ignored
        raise ValueError(f"{', '.join(given)} applies to the commands that run the model (generate, chat, serve, "
                         f"score, check, eval), not to info")
    if args.context < 1 or args.batch < 1:
        raise ValueError(f"--context and --batch must be at least 1, got {args.context} and {args.batch}")
    config_only = args.checkpoint is None and (args.preset or args.config)
    if config_only:
        cfg = config_from_args(args, checkpoint=False)
        ckpt, files, kind = None, [], "int8"
    else:
        cfg = config_from_args(args)
        ckpt = Path(args.checkpoint)
        files = weight_files(ckpt)
        if not files:
            raise ValueError(f"{ckpt} is not a checkpoint: it holds no *.safetensors shards and no release "
                             "ckpt-0/tensor* files")
        kind = weight_kind(ckpt)
    dtype_bytes = 2 if args.dtype == "bfloat16" or (args.dtype is None and args.device.startswith("cuda")) else 4
    weights = memory_bytes(cfg, kind, dtype_bytes)
    context = min(args.context, cfg.max_seq_len)
    kv = cfg.kv_cache_bytes(args.batch, context, dtype_bytes)
    print(f"checkpoint      {ckpt if ckpt else '(none: ' + (args.preset or args.config) + ' alone)'}")
    for key, value in cfg.to_dict().items():
        print(f"  {key:22} {value}")
    print(f"parameters      {cfg.num_params():,} total, {cfg.active_params():,} active per token "
          f"({cfg.n_active_experts} of {cfg.n_experts} experts)")
    if files:
        print(f"on disk         {_gb(sum(f.stat().st_size for f in files))} in {len(files)} weight files")
    embedding = f", {8 * dtype_bytes}-bit embedding" if kind == "int8" else ""
    print(f"in memory       {_gb(weights)} ({KIND_NAMES[kind]}{embedding}{'' if ckpt else ', as released'})")
    print(f"KV cache        {_gb(kv)} for batch {args.batch} x {context} tokens")
    print(f"estimate        {_gb(weights + kv)} plus activations")
    return 0
