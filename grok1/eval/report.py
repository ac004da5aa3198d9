"""The report: every item, a summary with standard errors, and a table beside xAI's published numbers.

Standard errors are those of a mean over items, sqrt(sample variance / n) (for a 0/1 score: sqrt(p(1-p)/(n-1))),
as lm-evaluation-harness reports them. A macro average over subjects gets sqrt(sum of squared SEs) / subjects.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from pathlib import Path

# xAI's numbers for Grok-1 (x.ai/blog/grok, model card, November 2023 / March 2024), percent.
PUBLISHED = {"gsm8k": ("GSM8k, 8-shot CoT", 62.9), "mmlu": ("MMLU, 5-shot", 73.0),
             "humaneval": ("HumanEval, 0-shot pass@1", 63.2), "math": ("MATH, 4-shot", 23.9)}
NOTE = ("xAI's numbers are for Grok-1 as evaluated by xAI; the open-weights release is the base model (the "
        "pre-training checkpoint, not fine-tuned for dialogue), with no published prompts or extraction rules.")


def mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n == 1:
        return mean, math.nan
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def summarize(records: list[dict], metrics: dict[str, str], by: str | None = None) -> dict:
    """{metric: {"value", "stderr", "n"}} over records (fields named by `metrics`: reported name -> item
    field); with `by` (e.g. "subject"), also per-group values and their macro average ("<metric>_macro")."""
    out: dict = {}
    for name, field in metrics.items():
        mean, se = mean_se([float(r[field]) for r in records])
        out[name] = {"value": mean, "stderr": se, "n": len(records)}
        if by:
            groups: dict[str, list[float]] = defaultdict(list)
            for r in records:
                groups[r[by]].append(float(r[field]))
            per = {g: dict(zip(("value", "stderr"), mean_se(v)), n=len(v)) for g, v in sorted(groups.items())}
            ses = [g["stderr"] for g in per.values()]
            macro = sum(g["value"] for g in per.values()) / len(per) if per else math.nan
            macro_se = math.sqrt(sum(s * s for s in ses if not math.isnan(s))) / len(per) if per else math.nan
            out[f"{name}_macro"] = {"value": macro, "stderr": macro_se, "n": len(records), "groups": len(per)}
            out[f"{name}_by_{by}"] = per
    return out


def perplexity_summary(records: list[dict]) -> dict:
    """Token-weighted: exp(-sum of log-probs / scored tokens) over every window."""
    tokens = sum(r["tokens"] for r in records)
    nll = -sum(r["logprob"] for r in records)
    per_window = [-r["logprob"] / r["tokens"] for r in records if r["tokens"]]
    _, se = mean_se(per_window)
    return {"nll_per_token": nll / tokens if tokens else math.nan, "nll_stderr": se,
            "perplexity": math.exp(nll / tokens) if tokens else math.nan, "tokens": tokens, "windows": len(records)}


def write(path: str | Path, report: dict) -> None:
    """Write the report JSON atomically (temporary name, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def table(task: str, name: str, summary: dict, run: dict) -> str:
    """A few printable lines: our scores with standard errors beside xAI's number for the task."""
    lines = [f"{name}: {run.get('items', 0)} items in {run.get('wall_s', 0):.1f} s "
             f"({run.get('items_per_s', 0):.2f} items/s)"]
    if task == "perplexity":
        s = summary
        lines.append(f"  perplexity {s['perplexity']:.3f}  ({s['nll_per_token']:.4f} nats/token over {s['tokens']} "
                     f"tokens, {s['windows']} windows; {run.get('tokens_per_s', 0):.0f} tokens/s)")
        return "\n".join(lines)
    label, published = PUBLISHED.get(task, (name, None))
    lines.append(f"  {'metric':<22} {'grok1 (this run)':>20} {'xAI Grok-1':>12}")
    for metric, v in summary.items():
        if not isinstance(v, dict) or "value" not in v:
            continue
        ours = f"{100 * v['value']:.1f} ± {100 * v['stderr']:.1f}" if not math.isnan(v["stderr"]) else \
            f"{100 * v['value']:.1f}"
        theirs = f"{published:.1f}" if published is not None else "-"
        lines.append(f"  {metric:<22} {ours:>20} {theirs:>12}")
    if published is not None:
        lines.append(f"  ({label} published by xAI. {NOTE})")
    return "\n".join(lines)
