"""`grok1 train`: train or fine-tune (fully or with LoRA), and the tools around it.

    grok1 train --data TEXT_OR_NPY... --out RUN [model source] [options]   train (resumable)
    grok1 train tokenizer --input TEXT... --out tokenizer.model           SentencePiece BPE
    grok1 train tokenize --tokenizer M --out tokens.npy TEXT...           pre-tokenize shards
    grok1 train plot RUN                                                  loss curves PNG
    grok1 train merge --adapter RUN/step-N --out DIR [--checkpoint BASE]  fold LoRA into a base
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from grok1.cli.common import DEFAULT_CHECKPOINT, DefaultsFormatter, positive_int, seed_arg
from grok1.config import ModelConfig, resolve_config
from grok1.fileio import write_atomic
from grok1.model import Transformer, init_weights
from grok1.tokenizer import Tokenizer
from grok1.train import lora
from grok1.train.checkpoint import latest
from grok1.train.data import TokenData, cached_tokens, check_utf8, load_shards, tokenize_files
from grok1.train.loop import TrainConfig, json_safe, train
from grok1.train.plot import plot_run
from grok1.train.tokenizer import train_tokenizer
from grok1.weights.load import load_model, save_model

# Options that may change when a run is resumed (they do not affect the losses).
RUNTIME = ("threads", "progress", "resume", "action", "run", "command", "defaults")


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("train", help="train or fine-tune a model; train a tokenizer; plot a run; merge LoRA",
                       description="Next-token training on text files or pre-tokenized .npy shards. The model "
                                   "is a fresh one of --preset/--config architecture, or the weights of "
                                   "--checkpoint (default: the bundled grok-1-mini) for fine-tuning. Actions: "
                                   "tokenizer, tokenize, plot, merge (`grok1 train ACTION --help`).",
                       formatter_class=DefaultsFormatter)
    p.add_argument("--data", nargs="+", metavar="FILE",
                   help="UTF-8 text files (tokenized once into RUN/tokens.npy) and/or 1-D .npy token files")
    p.add_argument("--out", metavar="RUN", help="run directory: log, checkpoints, plot")
    p.add_argument("--resume", action="store_true",
                   help="continue RUN from its latest checkpoint with the options it was started with")
    m = p.add_argument_group("model")
    m.add_argument("--checkpoint", metavar="DIR",
                   help="start from these weights (default when no --preset/--config: the bundled grok-1-mini)")
    src = m.add_mutually_exclusive_group()
    src.add_argument("--preset", metavar="NAME", help="alone: train a freshly initialised model of this preset; with "
                     "--checkpoint: the config of a release checkpoint (e.g. grok-1)")
    src.add_argument("--config", metavar="JSON", help="alone: train a freshly initialised model of this config; "
                     "with --checkpoint: the config of a release checkpoint")
    m.add_argument("--tokenizer", metavar="PATH", help="SentencePiece model (default: next to --checkpoint)")
    d = TrainConfig()
    o = p.add_argument_group("optimisation")
    o.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per training sequence")
    o.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per micro-batch")
    o.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    o.add_argument("--max-steps", type=int, default=d.max_steps, help="optimizer steps")
    o.add_argument("--lr", type=float, default=d.lr, help="peak AdamW learning rate")
    o.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="final lr as a fraction of --lr")
    o.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear warmup steps")
    o.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay (matrices)")
    o.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max gradient norm; 0 = off")
    o.add_argument("--aux-loss-coef", type=float, default=d.aux_loss_coef, help="MoE load-balancing loss weight")
    o.add_argument("--z-loss-coef", type=float, default=d.z_loss_coef, help="router z-loss weight")
    o.add_argument("--seed", type=seed_arg, default=d.seed, help="seed of initialisation, split and shuffling")
    o.add_argument("--heldout-fraction", type=float, default=d.heldout_fraction,
                   help="fraction of sequences held out")
    o.add_argument("--deterministic", action="store_true", help="use only deterministic torch algorithms")
    lo = p.add_argument_group("LoRA")
    lo.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank (0 = full training)")
    lo.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA scale numerator (scale = alpha / rank)")
    lo.add_argument("--lora-targets", default="wqkv,wo",
                    help="comma list of wqkv, wo, w1, w2, w3 (or attention, experts, all)")
    b = p.add_argument_group("bookkeeping")
    b.add_argument("--log-every", type=int, default=d.log_every, help="steps between log records")
    b.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between held-out evaluations")
    b.add_argument("--eval-sequences", type=int, default=d.eval_sequences,
                   help="held-out sequences per periodic evaluation")
    b.add_argument("--save-every", type=int, default=d.save_every, help="steps between checkpoints")
    b.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints, help="checkpoints kept")
    b.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    b.add_argument("--no-progress", dest="progress", action="store_false", default=True, help="no progress bar")
    p.set_defaults(run=run, action=None)
    p.set_defaults(defaults=p.parse_args([]))  # to tell the options given on the command line (see --resume)

    actions = p.add_subparsers(dest="action", metavar="ACTION",
                               help="tokenizer, tokenize, plot or merge (optional; without one: train)")
    t = actions.add_parser("tokenizer", help="train a SentencePiece BPE tokenizer (Grok-1 conventions)",
                           formatter_class=DefaultsFormatter,
                           description="Byte fallback, split digits, pad 0 / bos 1 / eos 2 / unk 3, newline runs "
                                       "and digits as pieces 4..23, as in the Grok-1 tokenizer.")
    t.add_argument("--input", nargs="+", required=True, metavar="TEXT", help="UTF-8 text files (one sentence a line)")
    t.add_argument("--out", required=True, metavar="PATH", help="where to write the .model file")
    t.add_argument("--vocab-size", type=positive_int, default=4096, help="total pieces")
    t.set_defaults(run=run_tokenizer)
    k = actions.add_parser("tokenize", help="pre-tokenize text files into one .npy token shard",
                           description="Tokenize UTF-8 text files (each followed by EOS) into one 1-D .npy "
                                       "token file that `grok1 train --data` takes.")
    k.add_argument("files", nargs="+", metavar="TEXT", help="UTF-8 text files")
    k.add_argument("--tokenizer", required=True, metavar="PATH", help="SentencePiece model")
    k.add_argument("--out", required=True, metavar="NPY", help="output .npy file")
    k.set_defaults(run=run_tokenize)
    pl = actions.add_parser("plot", help="write a PNG of a run's loss curves",
                            description="Plot the training and held-out losses of RUN/log.jsonl as a PNG.")
    pl.add_argument("run_dir", metavar="RUN", help="run directory (holds log.jsonl)")
    pl.add_argument("--out", metavar="PNG", help="output file (default RUN/loss.png)")
    pl.add_argument("--baseline", type=float, metavar="LOSS", help="draw a reference loss line (e.g. bigram)")
    pl.set_defaults(run=run_plot)
    mg = actions.add_parser("merge", help="merge LoRA adapters into their base and save the result",
                            description="Fold the LoRA adapters of a run's checkpoint into the base they were "
                                        "trained on (checked against what adapter.json records) and write the "
                                        "merged model in grok1's format.")
    mg.add_argument("--adapter", required=True, metavar="DIR", help="directory with adapter.safetensors/.json")
    mg.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), metavar="DIR",
                    help="base checkpoint (default: the bundled grok-1-mini)")
    msrc = mg.add_mutually_exclusive_group()
    msrc.add_argument("--preset", metavar="NAME", help="config of a release base checkpoint, e.g. grok-1")
    msrc.add_argument("--config", metavar="JSON", help="config file of a release base checkpoint")
    mg.add_argument("--force", action="store_true",
                    help="merge even if the base is not the one the adapters were trained on")
    mg.add_argument("--out", required=True, metavar="DIR", help="where to write the merged checkpoint")
    mg.add_argument("--float", action="store_true", help="keep merged matrices float32 instead of requantising int8")
    mg.set_defaults(run=run_merge)


def run_tokenizer(args: argparse.Namespace) -> int:
    out = train_tokenizer(args.input, args.out, args.vocab_size)
    print(f"wrote {out} ({Tokenizer(out).vocab_size} pieces)")
    return 0


def run_tokenize(args: argparse.Namespace) -> int:
    out = tokenize_files(args.files, Tokenizer(args.tokenizer), args.out)
    print(f"wrote {out}")
    return 0


def run_plot(args: argparse.Namespace) -> int:
    print(f"wrote {plot_run(args.run_dir, args.out, baseline=args.baseline)}")
    return 0


def run_merge(args: argparse.Namespace) -> int:
    meta = lora.read_adapter_settings(args.adapter)
    base = resolve_config(args.checkpoint, args.config, args.preset)
    lora.check_base_config(meta, base, args.adapter, args.checkpoint)
    if not Path(args.checkpoint).exists():
        raise ValueError(f"base checkpoint {args.checkpoint} does not exist")
    check_output(args.out, "--out")
    model = load_model(args.checkpoint, base, "cpu", torch.float32)
    lora.check_base_weights(meta, model, args.adapter, args.checkpoint, args.force)
    lora.load_adapters(model, args.adapter)
    lora.merge_lora(model, requantize=not args.float)
    tok = Path(args.checkpoint) / "tokenizer.model"
    print(f"wrote {save_model(model, args.out, tok if tok.is_file() else None)}")
    return 0


def check_output(path: str, flag: str) -> None:
    """A model is written to an empty or new directory only (never over another model)."""
    out = Path(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{flag} {out} already exists and is not an empty directory; choose another")


# Checked before anything is read or created: (option, valid?, what it must be).
CHECKS = [("seq_len", lambda v: v >= 1, "at least 1"), ("batch_size", lambda v: v >= 1, "at least 1"),
          ("grad_accum", lambda v: v >= 1, "at least 1"), ("max_steps", lambda v: v >= 1, "at least 1"),
          ("lr", lambda v: 0 < v < float("inf"), "a positive number"),
          ("min_lr_ratio", lambda v: 0 <= v <= 1, "in [0, 1]"), ("warmup_steps", lambda v: v >= 0, "at least 0"),
          ("weight_decay", lambda v: 0 <= v < float("inf"), "at least 0"),
          ("grad_clip", lambda v: 0 <= v < float("inf"), "at least 0 (0 = off)"),
          ("aux_loss_coef", lambda v: 0 <= v < float("inf"), "at least 0"),
          ("z_loss_coef", lambda v: 0 <= v < float("inf"), "at least 0"),
          ("heldout_fraction", lambda v: 0 <= v < 1, "in [0, 1)"), ("log_every", lambda v: v >= 1, "at least 1"),
          ("eval_every", lambda v: v >= 1, "at least 1"), ("eval_sequences", lambda v: v >= 1, "at least 1"),
          ("save_every", lambda v: v >= 1, "at least 1"), ("keep_checkpoints", lambda v: v >= 1, "at least 1"),
          ("lora_rank", lambda v: v >= 0, "at least 0 (0 = full training)"),
          ("lora_alpha", lambda v: 0 < v < float("inf"), "a positive number"),
          ("threads", lambda v: v is None or v >= 1, "at least 1")]


def check_options(args: argparse.Namespace) -> None:
    for name, ok, valid in CHECKS:
        if not ok(getattr(args, name)):
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)} is invalid: must be {valid}")
    lora.parse_targets(args.lora_targets)


def _resume_options(args: argparse.Namespace, defaults: argparse.Namespace) -> None:
    """Replace the options of `args` by those RUN was started with (runtime ones excepted). An option given
    again must agree: a run resumes with the settings it started with (its learning-rate schedule and data
    order depend on them)."""
    saved_file = Path(args.out) / "options.json"
    if not saved_file.is_file():
        raise ValueError(f"{args.out} holds no training run to resume (no options.json); leave out --resume "
                         "to start one")
    saved = json.loads(saved_file.read_text())
    for key, value in saved.items():
        if key in RUNTIME:
            continue
        given = getattr(args, key, None)
        if given != getattr(defaults, key, None) and given != value:
            flag = "--" + key.replace("_", "-")
            raise ValueError(f"{flag} {given} differs from the {value} that {args.out} was started with; --resume "
                             f"continues a run with its own options (to train on, start a new run with "
                             f"--checkpoint {args.out}/latest's step directory)")
        setattr(args, key, value)


def _check_new_run(out: Path) -> None:
    """A new run never writes into another run's directory (it would truncate the log and leave stale
    checkpoints beside the new ones)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a run directory")
    found = [p.name for p in (out / "log.jsonl", out / "options.json", out / "latest") if p.exists()]
    found += sorted(p.name for p in out.glob("step-*"))[:2] if out.is_dir() else []
    if found:
        raise ValueError(f"{out} already holds a training run ({', '.join(found)}); pass --resume to continue it, "
                         "or choose another --out")


def build_model(args: argparse.Namespace) -> tuple[Transformer, Path | None]:
    """The model to train (float32, trainable parts requiring grad) and its tokenizer path. --preset/--config
    alone make a fresh model; with --checkpoint they give the config of a release checkpoint."""
    fresh = (args.preset is not None or args.config is not None) and not args.checkpoint
    if fresh:
        cfg: ModelConfig = resolve_config(None, args.config, args.preset)
        model = Transformer(cfg)
        init_weights(model, torch.Generator().manual_seed(args.seed))
        ckpt = None
    else:
        ckpt = Path(args.checkpoint or DEFAULT_CHECKPOINT)
        if not ckpt.exists():
            raise ValueError(f"checkpoint directory {ckpt} does not exist")
        model = load_model(ckpt, resolve_config(ckpt, args.config, args.preset), "cpu", torch.float32)
        base = {"checkpoint": str(ckpt.resolve()), "fingerprint": lora.fingerprint(model)}
        if args.lora_rank == 0:
            lora.dequantize_model(model)
            model.requires_grad_(True)
    if args.lora_rank:
        lora.apply_lora(model, args.lora_rank, args.lora_alpha, lora.parse_targets(args.lora_targets), args.seed)
        if ckpt is not None:
            model.lora_settings = model.lora_settings | {"base": base}
    tok = Path(args.tokenizer) if args.tokenizer else None
    if tok is None and ckpt is not None:
        tok = next((c for c in (ckpt / "tokenizer.model", ckpt.parent / "tokenizer.model") if c.is_file()), None)
    return model, tok


def check_tokenizer(tok: Tokenizer, vocab_size: int) -> None:
    """The tokenizer must cover the model's vocabulary exactly: a larger one makes ids the model cannot
    embed, a smaller one leaves ids the model learns to predict but no text can show."""
    if tok.vocab_size != vocab_size:
        raise ValueError(f"tokenizer {tok.path} has {tok.vocab_size} pieces but the model's vocabulary holds "
                         f"{vocab_size}; train a tokenizer with --vocab-size {vocab_size}, or a model whose "
                         f"vocab_size is {tok.vocab_size}")


def run(args: argparse.Namespace) -> int:
    if not args.out:
        raise ValueError("--out RUN is required (the run directory)")
    out = Path(args.out)
    if args.resume:
        _resume_options(args, args.defaults)
    else:
        _check_new_run(out)
    if not args.data:
        raise ValueError("--data is required: text files or .npy token files")
    check_options(args)
    texts = [f for f in args.data if not str(f).endswith(".npy")]
    npys = [f for f in args.data if str(f).endswith(".npy")]
    for f in texts + npys:
        if not Path(f).is_file():
            raise ValueError(f"data file not found: {f}")
    for f in texts:
        check_utf8(f)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok_path = build_model(args)
    if texts and tok_path is None:
        raise ValueError("text data needs a tokenizer: pass --tokenizer PATH")
    if tok_path is not None:
        tok = Tokenizer(tok_path)
        check_tokenizer(tok, model.config.vocab_size)
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)})
    if cfg.seq_len > model.config.max_seq_len:
        raise ValueError(f"--seq-len {cfg.seq_len} exceeds the model's context of {model.config.max_seq_len} tokens")
    if args.resume and (last := latest(out)) is not None:
        done = torch.load(last / "trainer_state.pt", weights_only=True)["step"]
        if done >= cfg.max_steps:
            print(f"{out} finished all {cfg.max_steps} steps already ({last.name}); nothing to do. To train on, "
                  f"start a new run from it: grok1 train --checkpoint {last} ...")
            return 0
    out.mkdir(parents=True, exist_ok=True)
    shards = [cached_tokens(texts, tok, out, args.progress)] if texts else []
    data = TokenData(load_shards(shards + npys), cfg.seq_len, cfg.heldout_fraction, 0, cfg.seed)
    options = {k: v for k, v in vars(args).items() if k not in RUNTIME}
    write_atomic(out / "options.json", (json.dumps(options, indent=1, default=str) + "\n").encode())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{len(data.train)} training / {len(data.heldout)} held-out sequences of {cfg.seq_len} tokens; "
          f"{n_train:,} trainable parameters")
    record = train(model, data, cfg, out, tok_path, resume=args.resume, progress=args.progress)
    print(json.dumps(json_safe(record), allow_nan=False))
    return 0
