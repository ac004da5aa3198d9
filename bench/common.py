"""Helpers shared by the bench scripts: provenance (commit, torch), peak memory, a machine-busy
check, the median of repeated measurements, one-JSON-line output, and a bare prefill/decode pair
(the model's own forward over a static cache, without the engine's scheduling).

Never imported by grok1/ or tests/.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from grok1.model import ForwardMeta, KVCache, Transformer

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results.jsonl"
NOISY_PCT = 10.0  # other_cpu_pct above this: something else ran during the measurement, repeat it


def git_commit() -> str:
    """Short sha of HEAD, with "+dirty" when the work tree has uncommitted changes ("unknown" outside git)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_DIR, capture_output=True, text=True, check=True).stdout

    try:
        sha = git("rev-parse", "--short", "HEAD").strip()
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").strip())
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def provenance() -> dict:
    """Fields every row carries."""
    return {"device": "cpu", "torch": torch.__version__, "commit": git_commit()}


def parse_list(values: Sequence[str] | None, kind: type = str) -> list:
    """Repeatable and/or comma-separated flag values -> flat list: ["1,2", "8"] -> [1, 2, 8]."""
    return [kind(v) for item in values or [] for v in item.split(",") if v.strip()]


# ---- memory ----

def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line")


def peak_rss_mb() -> float:
    """Peak resident set size of this process (VmHWM), in MB (10^6 bytes)."""
    return round(_status_kb("VmHWM") * 1024 / 1e6, 1)


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the next peak excludes e.g. model building.
    Returns False when the kernel refuses (the peak then covers the whole process)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ---- is the machine busy with something else? ----

class CpuMonitor:
    """Machine-wide busy CPU time minus this process's own CPU time, over a measurement.

    /proc/stat counts busy jiffies on all CPUs (user, nice, system, irq, softirq, steal: steal is
    time the hypervisor gave to other guests); os.times() is this process's user + system time.
    `other_cpu_pct()` is the share of the machine's CPU capacity used by anything else while the
    monitor ran: near 0 on a quiet machine; a run with more than a few percent should be repeated.
    """

    HZ = os.sysconf("SC_CLK_TCK")

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
        busy = user + nice + system + irq + softirq + steal  # guest time is already inside user
        total = busy + idle + iowait
        t = os.times()
        return busy / CpuMonitor.HZ, total / CpuMonitor.HZ, t.user + t.system

    def other_cpu_pct(self) -> float:
        busy0, total0, own0 = self.start
        busy1, total1, own1 = self._sample()
        capacity = total1 - total0
        if capacity <= 0:
            return 0.0
        other = max(0.0, (busy1 - busy0) - (own1 - own0))
        return round(100.0 * other / capacity, 1)


def warn_if_noisy(other_cpu_pct: float, what: str) -> None:
    """Tell stderr when other processes used more than NOISY_PCT % of the machine during `what`."""
    if other_cpu_pct > NOISY_PCT:
        print(f"other processes used {other_cpu_pct} % of the CPU during {what}: repeat it", file=sys.stderr)


# ---- measurement and output ----

def median_of(fn: Callable[[], float], reps: int) -> float:
    """Call fn() reps times (it returns one measurement, e.g. seconds) and return the median."""
    assert reps >= 1, reps
    return statistics.median(fn() for _ in range(reps))


def emit(row: dict, record: bool = False) -> None:
    """Print the row as one JSON line; with record=True also append it to bench/results.jsonl."""
    line = json.dumps(row)
    print(line, flush=True)
    if record:
        with RESULTS.open("a") as f:
            f.write(line + "\n")


def prefill(model: Transformer, cache: KVCache, prompts: Sequence[Sequence[int]]) -> Tensor:
    """Run the right-padded prompts through the model, filling cache rows 0..B-1; logits [B, V] at each last token."""
    device = cache.k.device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    tokens = torch.full((len(prompts), int(lengths.max())), model.config.pad_id, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p, dtype=torch.long)
    start = torch.zeros(len(prompts), dtype=torch.long, device=device)
    return model(tokens, start, cache, ForwardMeta(logits_at=lengths - 1))


def decode_step(model: Transformer, cache: KVCache, tokens: Tensor, pos: Tensor) -> Tensor:
    """One token per row: tokens [B] at positions pos [B] -> logits [B, V]."""
    return model(tokens[:, None], pos, cache)[:, 0]
