"""`grok1 generate`: continue one or more prompts."""

from __future__ import annotations

import argparse
import json
import sys

from grok1.cli import ranks
from grok1.cli.common import check_sampling, config_from_args, model_from_args, seed_arg, tokenizer_from_args
from grok1.engine.generate import generate_stream
from grok1.config import ModelConfig
from grok1.engine.sampling import SamplingParams
from grok1.tokenizer import Tokenizer


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("generate", parents=[common], help="continue text prompts",
                       description="Continue one or more prompts (several prompts run as one batch).")
    p.add_argument("prompts", nargs="+", metavar="PROMPT", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.8, metavar="T",
                   help="sampling temperature; 0 = greedy (default 0.8)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="nucleus sampling with the reference's semantics; 1 = off (default)")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="keep the K most likely tokens; 0 = off (default)")
    p.add_argument("--seed", type=seed_arg, metavar="S", help="random seed for reproducible sampling (0..2**64-1)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when this text appears (not included in the output); repeatable")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating after the end-of-sequence token")
    p.add_argument("--bos", action="store_true", help="prepend the BOS token (the reference does not)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--stream", action="store_true", help="print text as it is generated (one prompt only)")
    out.add_argument("--json", action="store_true",
                     help="print one JSON object per prompt: prompt_ids, token_ids, text, finish_reason")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_sampling(args)
    if args.stream and len(args.prompts) > 1:
        raise ValueError("--stream takes a single prompt")
    cfg = config_from_args(args)
    tokenizer = tokenizer_from_args(args)
    job = ranks.join(args, cfg)
    with ranks.rank0_output(job):
        _generate(args, cfg, tokenizer, job)
    if job is not None:
        job.leave()
    return 0


def _generate(args: argparse.Namespace, cfg: ModelConfig, tokenizer: Tokenizer, job: ranks.Job | None) -> None:
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            seed=ranks.common_seed(job, args.seed), max_new_tokens=args.max_new_tokens,
                            stop=tuple(args.stop), ignore_eos=args.ignore_eos)
    model = model_from_args(args, cfg, job.mesh if job else None)
    prompts = [tokenizer.encode(p, bos=args.bos) for p in args.prompts]
    completions = {}
    for row, _, new_text, completion in generate_stream(model, prompts, [params] * len(prompts), tokenizer):
        completions[row] = completion
        if args.stream:
            sys.stdout.write(new_text)
            sys.stdout.flush()
    if args.stream:
        print()
        return
    for i, prompt in enumerate(args.prompts):
        c = completions[i]
        if args.json:
            print(json.dumps({"prompt": prompt, "prompt_ids": c.prompt_ids, "token_ids": c.token_ids,
                              "text": c.text, "finish_reason": c.finish_reason}))
        else:
            print(prompt + c.text)
