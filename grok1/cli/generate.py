"""`grok1 generate`: continue one or more prompts.

Output: each prompt followed by its continuation (several prompts: separated by a `---` line; --json: one object
a line). --stream prints the prompt, then the continuation as it comes. A summary (tokens, tokens/s) goes to
stderr unless --quiet. Prompts come from the arguments, stdin (`-`) or files (--file).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from grok1.cli import ranks
from grok1.cli.common import (
    check_sampling,
    config_from_args,
    model_from_args,
    seed_arg,
    texts_from_args,
    tokenizer_from_args,
)
from grok1.config import ModelConfig
from grok1.engine.engine import engine_for
from grok1.engine.sampling import SamplingParams
from grok1.tokenizer import Tokenizer


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("generate", parents=[common], help="continue text prompts",
                       description="Continue one or more prompts (several prompts run as one engine batch).")
    p.add_argument("prompts", nargs="*", metavar="PROMPT", help="text to continue; - reads one prompt from stdin")
    p.add_argument("--file", action="append", default=[], metavar="PATH",
                   help="continue the text of this UTF-8 file (repeatable: one prompt per file)")
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
    out.add_argument("--stream", action="store_true",
                     help="print the prompt, then the text as it is generated (one prompt only)")
    out.add_argument("--json", action="store_true",
                     help="print one JSON object per prompt: prompt_ids, token_ids, text, finish_reason")
    p.add_argument("--quiet", action="store_true", help="no summary (tokens, tokens/s) on stderr")
    p.set_defaults(run=run)


SEPARATOR = "---"  # the line between the outputs of several prompts


def check_room(prompts: list[list[int]], max_new_tokens: int, context: int) -> None:
    """Each prompt and its --max-new-tokens must fit the context (the server answers 400 for the same)."""
    for i, ids in enumerate(prompts):
        if len(ids) + max_new_tokens > context:
            room = context - len(ids)
            hint = f"use --max-new-tokens {room} or less" if room >= 1 else "shorten the prompt"
            raise ValueError(f"prompt {i + 1} has {len(ids)} tokens; with --max-new-tokens {max_new_tokens} that "
                             f"is {len(ids) + max_new_tokens}, beyond the model's context of {context} tokens: {hint}")


def summary(counts: list[tuple[int, int]], seconds: float) -> str:
    """counts: (prompt tokens, generated tokens) of each prompt."""
    prompt, new = sum(c[0] for c in counts), sum(c[1] for c in counts)
    return (f"grok1 generate: {new} tokens for {len(counts)} prompt{'s' * (len(counts) > 1)} "
            f"({prompt} prompt tokens) in {seconds:.2f} s, {new / max(seconds, 1e-9):.1f} tokens/s")


def run(args: argparse.Namespace) -> int:
    check_sampling(args)
    args.prompts = texts_from_args(args.prompts, args.file, "PROMPT")
    if args.stream and len(args.prompts) > 1:
        raise ValueError(f"--stream takes a single prompt, got {len(args.prompts)}")
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
    prompts = [tokenizer.encode(p, bos=args.bos) for p in args.prompts]
    check_room(prompts, args.max_new_tokens, cfg.max_seq_len)
    model = model_from_args(args, cfg, job.mesh if job else None)
    # Every rank (under torchrun) runs the same engine steps on its own thread: same prompts, same batches.
    engine = engine_for(model, tokenizer, prompts, [params] * len(prompts))
    start = time.perf_counter()
    if args.stream:
        sys.stdout.write(args.prompts[0])
        sys.stdout.flush()
        new = 0
        for out in engine.stream(prompts[0], params):
            new = out.completion_tokens
            sys.stdout.write(out.text)
            sys.stdout.flush()
        seconds = time.perf_counter() - start
        print()
        counts = [(len(prompts[0]), new)]
    else:
        reqs = engine.generate(prompts, [params] * len(prompts))
        seconds = time.perf_counter() - start
        for i, (prompt, r) in enumerate(zip(args.prompts, reqs)):
            if args.json:
                print(json.dumps({"prompt": prompt, "prompt_ids": r.prompt_ids, "token_ids": r.output_ids,
                                  "text": r.text, "finish_reason": r.finish_reason}))
            else:
                if i:
                    print(SEPARATOR)
                print(prompt + r.text)
        counts = [(len(r.prompt_ids), len(r.output_ids)) for r in reqs]
    sys.stdout.flush()
    if not args.quiet and (job is None or job.rank == 0):
        print(summary(counts, seconds), file=sys.stderr)
