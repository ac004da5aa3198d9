"""`grok1 score`: per-token log-likelihood of texts under the model."""

from __future__ import annotations

import argparse
import json

from grok1.cli import ranks
from grok1.cli.common import config_from_args, model_from_args, texts_from_args, tokenizer_from_args
from grok1.eval.score import score_windows
from grok1.model import Transformer
from grok1.tokenizer import Tokenizer


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("score", parents=[common], help="log-probabilities of texts",
                       description="Score each text: log-probability of every next token, the top "
                                   "alternatives at each position, total log-likelihood and perplexity.")
    p.add_argument("texts", nargs="*", metavar="TEXT", help="text to score; - reads it from stdin")
    p.add_argument("--file", action="append", default=[], metavar="PATH",
                   help="score the text of this UTF-8 file (repeatable)")
    p.add_argument("--sliding-window", action="store_true",
                   help="score texts longer than the model's context in windows of the context, half a context "
                        "apart: each token is scored once, seeing at least half a context of text before it "
                        "(without this, such texts are refused, as generate refuses them)")
    p.add_argument("--top", type=int, default=5, metavar="N", help="alternatives listed per position (default 5)")
    p.add_argument("--bos", action="store_true", help="prepend the BOS token (then the first token is scored too)")
    p.add_argument("--json", action="store_true", help="print one JSON object per text instead of a summary")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.top < 1:
        raise ValueError(f"--top must be at least 1, got {args.top}")
    args.texts = texts_from_args(args.texts, args.file, "TEXT")
    cfg = config_from_args(args)
    tokenizer = tokenizer_from_args(args)
    job = ranks.join(args, cfg)
    model = model_from_args(args, cfg, job.mesh if job else None)
    with ranks.rank0_output(job):
        _score(args, model, tokenizer)
    if job is not None:
        job.leave()
    return 0


def _score(args: argparse.Namespace, model: Transformer, tokenizer: Tokenizer) -> None:
    context = model.config.max_seq_len
    encoded = [tokenizer.encode(text, bos=args.bos) for text in args.texts]
    for i, ids in enumerate(encoded):
        if len(ids) > context and not args.sliding_window:
            raise ValueError(f"text {i + 1} has {len(ids)} tokens but the model's context holds {context}; "
                             "pass --sliding-window to score it in windows of the context")
    for text, ids in zip(args.texts, encoded):
        result = score_windows(model, ids, args.top, context)
        windows = result.pop("windows")
        if args.json:
            print(json.dumps({"text": text, "ids": ids, **result} | ({"windows": windows} if args.sliding_window else {})))
        else:
            n = len(result["token_logprobs"])
            how = f" in {windows} windows" if windows > 1 else ""
            print(f"{result['total_logprob']:.4f} logprob over {n} tokens{how}, perplexity {result['perplexity']:.3f}: "
                  f"{text}")

