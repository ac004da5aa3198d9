"""Loss curves of a run as a PNG: training loss (and held-out loss) against tokens seen, plus the
router's load-balancing loss. Reads RUN/log.jsonl; needs matplotlib (`pip install matplotlib`)."""

from __future__ import annotations

import json
from pathlib import Path


def read_log(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        raise ValueError(f"no training log at {path}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(run_dir: str | Path, out: str | Path | None = None, title: str | None = None,
             baseline: float | None = None) -> Path:
    """Write the loss curves of `run_dir` to `out` (default RUN/loss.png); `baseline` draws a
    horizontal reference line (e.g. a bigram model's held-out loss)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("plotting needs matplotlib: pip install matplotlib") from None
    records = read_log(run_dir)
    train = [r for r in records if "loss" in r]
    held = [r for r in records if "heldout_loss" in r]
    if not train:
        raise ValueError(f"{run_dir}/log.jsonl has no training records yet")
    tokens_per_step = train[-1]["tokens"] / train[-1]["step"]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(8, 6.5), height_ratios=(3, 1), sharex=True)
    ax.plot([r["tokens"] / 1e6 for r in train], [r["loss"] for r in train], label="training loss", lw=1.2)
    if held:
        ax.plot([r["step"] * tokens_per_step / 1e6 for r in held], [r["heldout_loss"] for r in held],
                "o-", label="held-out loss", ms=3)
    if baseline is not None:
        ax.axhline(baseline, color="grey", ls="--", lw=1, label=f"bigram baseline ({baseline:.2f})")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title or f"{Path(run_dir).name}")
    ax.grid(alpha=0.3)
    ax.legend()
    ax2.plot([r["tokens"] / 1e6 for r in train], [r["aux_loss"] for r in train], color="tab:green", lw=1)
    ax2.set_ylabel("load-balance loss")
    ax2.set_xlabel("training tokens (millions)")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "loss.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
