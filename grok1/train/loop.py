"""Next-token training of a Grok-1 architecture model: the loop, as one readable function.

    for each step: lr from (warmup, cosine) -> grad_accum micro-batches of cross-entropy
                   + load-balancing and z-loss on the router logits -> clip -> AdamW step
                   -> log (JSONL + progress bar) -> held-out eval -> checkpoint

Trains whatever parameters require grad (all of them, or LoRA adapters only). Everything that
decides the next losses (weights, optimizer moments, step, data position, RNG) is in the
checkpoint, so `resume=True` continues exactly where the latest checkpoint left off.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from grok1.fileio import write_atomic
from grok1.model import Transformer
from grok1.train import checkpoint
from grok1.train.data import DataState, TokenData
from grok1.train.router import RouterTap, router_losses


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and bookkeeping knobs of one run (the architecture lives in ModelConfig)."""

    seq_len: int = 256
    batch_size: int = 8  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 1000
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at max_steps
    warmup_steps: int = 100
    weight_decay: float = 0.1  # on matrices and embeddings, not on norm scales
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    aux_loss_coef: float = 0.01  # load-balancing loss weight
    z_loss_coef: float = 0.001  # router z-loss weight
    seed: int = 0
    heldout_fraction: float = 0.05
    eval_every: int = 100
    eval_sequences: int = 128  # held-out sequences per periodic eval (the final eval uses all)
    log_every: int = 10
    save_every: int = 100
    keep_checkpoints: int = 2
    deterministic: bool = False  # torch.use_deterministic_algorithms for bit-exact resumes


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over warmup_steps, then cosine from lr to lr * min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: Transformer, cfg: TrainConfig) -> torch.optim.AdamW:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    decay = [p for n, p in params if p.dim() >= 2]
    no_decay = [p for n, p in params if p.dim() < 2]  # norm scales
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=False)


def lm_loss(model: Transformer, batch: Tensor) -> Tensor:
    """Mean next-token cross-entropy of batch [B, T + 1] (inputs [:, :-1], targets [:, 1:])."""
    logits = model(batch[:, :-1])  # [B, T, V]
    return F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())


@torch.no_grad()
def heldout_loss(model: Transformer, data: TokenData, batch_size: int, max_sequences: int | None = None) -> float:
    """Mean cross-entropy over held-out sequences (token-weighted); nan when there are none."""
    total, n = 0.0, 0
    for batch in data.heldout_batches(batch_size, max_sequences):
        total += lm_loss(model, batch).item() * batch[:, 1:].numel()
        n += batch[:, 1:].numel()
    return total / n if n else float("nan")


def json_safe(record: dict) -> dict:
    """The record with non-finite numbers (a diverged loss) as None: JSON has no NaN or Infinity."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}


def _append_log(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(json_safe(record), allow_nan=False) + "\n")


def _truncate_log(path: Path, step: int) -> None:
    """Drop records after `step` (written by a run that was killed before its next checkpoint)."""
    if path.is_file():
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        write_atomic(path, "".join(line + "\n" for line in keep).encode())


def train(model: Transformer, data: TokenData, cfg: TrainConfig, run_dir: str | Path,
          tokenizer: str | Path | None = None, resume: bool = False, progress: bool = True) -> dict:
    """Train `model` in place on `data` for cfg.max_steps optimizer steps; returns the last log record.

    Writes RUN/train.json (settings), RUN/log.jsonl (one JSON record per log/eval step) and
    checkpoints (see checkpoint.py). With `resume`, the latest checkpoint of RUN is loaded first
    (weights, optimizer, step, data position, RNG) and the log is cut back to its step.
    """
    from tqdm import tqdm

    if data.seq_len != cfg.seq_len:
        raise ValueError(f"data packs sequences of {data.seq_len} tokens but TrainConfig.seq_len is {cfg.seq_len}")
    if cfg.seq_len > model.config.max_seq_len:
        raise ValueError(f"seq_len {cfg.seq_len} exceeds the model's context {model.config.max_seq_len}")
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "log.jsonl"
    settings = {"train": dataclasses.asdict(cfg), "model": model.config.to_dict(),
                "lora": getattr(model, "lora_settings", None)}
    opt = make_optimizer(model, cfg)
    step, state = 0, DataState()
    last = checkpoint.latest(run_dir) if resume else None
    if last is not None:
        saved = json.loads((run_dir / "train.json").read_text())
        if saved != settings:
            diff = [k for k in cfg.__dataclass_fields__ if saved["train"].get(k) != getattr(cfg, k)]
            raise ValueError(f"{run_dir} was trained with other settings (differing: {diff or 'model'}); "
                             "resume with the same ones")
        ts = checkpoint.load(last, model)
        opt.load_state_dict(ts["optimizer"])
        step, state = ts["step"], DataState(**ts["data"])
        torch.set_rng_state(ts["torch_rng"])
        _truncate_log(log, step)
    else:
        if resume:
            print(f"no checkpoint in {run_dir} yet: starting from step 0")
        log.unlink(missing_ok=True)
        torch.manual_seed(cfg.seed)
        write_atomic(run_dir / "train.json", (json.dumps(settings, indent=2) + "\n").encode())

    k = model.config.n_active_experts
    tap = RouterTap(model)
    bar = tqdm(total=cfg.max_steps, initial=step, desc="train", unit="step", disable=not progress)
    window = {"loss": 0.0, "aux": 0.0, "z": 0.0, "tokens": 0, "time": 0.0, "steps": 0, "load": None}
    record: dict = {}
    try:
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            model.train()
            for _ in range(cfg.grad_accum):
                batch, state = data.next_batch(state, cfg.batch_size)
                tap.clear()
                ce = lm_loss(model, batch)
                balance, z, load = router_losses(tap.logits, k)
                loss = ce + cfg.aux_loss_coef * balance + cfg.z_loss_coef * z
                (loss / cfg.grad_accum).backward()
                window["loss"] += ce.item() / cfg.grad_accum
                window["aux"] += balance.item() / cfg.grad_accum
                window["z"] += z.item() / cfg.grad_accum
                window["load"] = load if window["load"] is None else window["load"] + load
                window["tokens"] += batch[:, 1:].numel()
            params = [p for g in opt.param_groups for p in g["params"]]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            window["time"] += time.perf_counter() - t0
            window["steps"] += 1
            bar.update(1)

            if step % cfg.log_every == 0 or step == cfg.max_steps:
                n = window["steps"]
                load_LE = window["load"] / (n * cfg.grad_accum)
                record = {"step": step, "epoch": state.epoch, "tokens": step * cfg.grad_accum * cfg.batch_size * cfg.seq_len,
                          "loss": window["loss"] / n, "aux_loss": window["aux"] / n, "z_loss": window["z"] / n,
                          "lr": lr, "grad_norm": grad_norm.item(), "tokens_per_s": window["tokens"] / window["time"],
                          "expert_load": [[round(x, 4) for x in row] for row in load_LE.tolist()]}
                bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}",
                                load=f"{load_LE.min().item():.2f}-{load_LE.max().item():.2f}" if load_LE.numel() else "-")
                window = {"loss": 0.0, "aux": 0.0, "z": 0.0, "tokens": 0, "time": 0.0, "steps": 0, "load": None}
                _append_log(log, record)
            if (step % cfg.eval_every == 0 or step == cfg.max_steps) and len(data.heldout):  # none held out: no eval
                final = step == cfg.max_steps
                model.eval()
                tap.clear()
                h = heldout_loss(model, data, cfg.batch_size, None if final else cfg.eval_sequences)
                record = {"step": step, "heldout_loss": h, "heldout_sequences": "all" if final else cfg.eval_sequences}
                _append_log(log, record)
                bar.write(f"step {step}: held-out loss {h:.4f}")
            if step % cfg.save_every == 0 or step == cfg.max_steps:
                ts = {"optimizer": opt.state_dict(), "step": step, "data": dataclasses.asdict(state),
                      "torch_rng": torch.get_rng_state()}
                checkpoint.save(run_dir, step, model, ts, tokenizer, cfg.keep_checkpoints)
    finally:
        tap.remove()
        bar.close()
    model.eval()
    return record
