"""Checkpoints of a training run, written so that a kill at any moment leaves a loadable one.

    RUN/step-0000100/   the model in grok1's safetensors layout (config.json, shards, index,
                        tokenizer.model), or for a LoRA run only the adapters (adapter.*)
                        plus trainer_state.pt: optimizer, step, data position, RNG states
    RUN/latest          the name of the newest complete step directory; replaced last

Every file is written to a temporary name, fsynced and renamed (fileio.write_atomic).
A new step's directory is complete before `latest` points at it, so an interrupted save leaves
`latest` on the previous checkpoint; older step directories are pruned only after that.
A save that fails (a full disk) removes what it wrote; what a killed one left (`*.tmp` files, a step
directory `latest` does not name and that has no trainer state) is removed by the next save and
on resume (`latest`), so the space comes back without anyone freeing it by hand.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import torch

from grok1.fileio import write_atomic
from grok1.model import Transformer
from grok1.train.lora import has_lora, load_adapter_tensors, save_adapters
from grok1.weights.load import save_model
from grok1.weights.safetensors import INDEX, open_checkpoint

STATE = "trainer_state.pt"
LATEST = "latest"


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / f"step-{step:07d}"


def save(run_dir: str | Path, step: int, model: Transformer, state: dict, tokenizer: str | Path | None = None,
         keep: int = 2) -> Path:
    """Write the model (or its adapters) and `state` for `step`, point `latest` at it, then delete
    all but the newest `keep` step directories. Returns the step directory."""
    run_dir = Path(run_dir)
    out = step_dir(run_dir, step)
    clean_partial(run_dir)
    (out / STATE).unlink(missing_ok=True)  # a re-save of this step is incomplete until the state is back
    try:
        if has_lora(model):
            save_adapters(model, out)
        else:
            save_model(model, out, tokenizer)
        buf = io.BytesIO()
        torch.save(state, buf)
        write_atomic(out / STATE, buf.getvalue())
        write_atomic(run_dir / LATEST, (out.name + "\n").encode())
    except OSError as e:
        clean_partial(run_dir)
        raise OSError(e.errno, f"cannot save the checkpoint of step {step} in {out} ({e.strerror or e}); what "
                      f"was written of it is removed, the last complete checkpoint is kept") from None
    steps = sorted(p for p in run_dir.glob("step-*") if p.is_dir())
    for old in steps[: max(0, len(steps) - keep)]:
        if old != out:
            shutil.rmtree(old, ignore_errors=True)
    return out


def clean_partial(run_dir: Path) -> None:
    """Remove what an interrupted or failed save left in a run directory: `*.tmp` files, and step directories
    other than the one `latest` names that have no trainer state (never complete)."""
    if not run_dir.is_dir():
        return
    pointer = run_dir / LATEST
    named = pointer.read_text().strip() if pointer.is_file() else None
    for tmp in [*run_dir.glob("*.tmp"), *run_dir.glob("step-*/*.tmp")]:
        tmp.unlink(missing_ok=True)
    for d in run_dir.glob("step-*"):
        if d.is_dir() and d.name != named and not (d / STATE).is_file():
            shutil.rmtree(d, ignore_errors=True)


def latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint directory of a run, or None when it has none yet (after removing what
    an interrupted save left: `clean_partial`)."""
    clean_partial(Path(run_dir))
    pointer = Path(run_dir) / LATEST
    if not pointer.is_file():
        return None
    d = Path(run_dir) / pointer.read_text().strip()
    if not (d / STATE).is_file() or not ((d / INDEX).is_file() or (d / "adapter.safetensors").is_file()):
        raise ValueError(f"{pointer} names {d.name}, which is not a complete checkpoint")
    return d


def load(ckpt: str | Path, model: Transformer) -> dict:
    """Copy a checkpoint's weights (or adapters) into `model` in place; return its trainer state."""
    ckpt = Path(ckpt)
    if has_lora(model):
        load_adapter_tensors(model, ckpt)
    else:
        tensors = open_checkpoint(ckpt)
        own = model.state_dict()
        if set(tensors) != set(own):
            diff = sorted(set(tensors) ^ set(own))
            raise ValueError(f"{ckpt}: checkpoint and model tensors differ: {', '.join(diff[:5])}")
        with torch.no_grad():
            for name, t in own.items():
                t.copy_(tensors[name])
    return torch.load(ckpt / STATE, weights_only=True)
