"""`grok1 check`: find the first layer where a checkpoint departs from golden reference outputs."""

from __future__ import annotations

import argparse

from grok1.cli.common import config_from_args, model_from_args
from grok1.eval.check import compare, load_golden


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("check", parents=[common], help="compare per-layer outputs with golden reference data",
                       description="Run the golden prompts through the model and compare the residual stream "
                                   "after every layer, and the logits, with reference outputs; print the "
                                   "first layer that diverges. Exit status 1 when anything diverges.")
    p.add_argument("--golden", required=True, metavar="NPZ",
                   help="golden .npz (prompt_ids, prompt_lens, hidden_<precision>_p<k>, logits_<precision>_p<k>)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="which golden arrays to compare against (default fp32; use --dtype bfloat16 with bf16)")
    p.add_argument("--rel-tol", type=float, default=1e-4, metavar="R",
                   help="max |ours - golden| / max |golden| per hidden state (default 1e-4)")
    p.add_argument("--logit-tol", type=float, default=1e-3, metavar="A", help="max abs logit error (default 1e-3)")
    p.add_argument("--verbose", action="store_true", help="print every layer, not only the summary")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    golden = load_golden(args.golden)
    model = model_from_args(args, cfg)
    rows = compare(model, golden, args.precision, args.rel_tol, args.logit_tol)
    for r in rows:
        if args.verbose or not r.ok:
            print(f"prompt {r.prompt}  {r.layer:9}  max abs {r.max_abs:.3e}  rel {r.rel:.3e}  "
                  f"{'ok' if r.ok else 'DIVERGES'}")
    bad = [r for r in rows if not r.ok]
    if bad:
        first = bad[0]
        print(f"first divergence: prompt {first.prompt}, {first.layer} (rel {first.rel:.3e}, max abs {first.max_abs:.3e})")
        return 1
    worst = max(rows, key=lambda r: r.rel)
    print(f"all {len(rows)} comparisons within tolerance; largest relative error {worst.rel:.3e} ({worst.layer})")
    return 0
