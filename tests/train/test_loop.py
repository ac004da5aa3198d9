"""grok1.train.loop: the training loop, its schedule, logging, and exact resumption after SIGKILL."""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import small_config
from train_helpers import pattern_tokens

from grok1.model import Transformer, init_weights
from grok1.train import checkpoint
from grok1.train.data import TokenData
from grok1.train.loop import TrainConfig, heldout_loss, lr_at, train
from grok1.weights.load import load_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls: one thread is faster, and immune to a busy machine's thread contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_lr_schedule():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)  # half way down the cosine
    assert lr_at(110, cfg) == pytest.approx(0.1) and lr_at(500, cfg) == pytest.approx(0.1)


def _model(seed=0, **overrides):
    model = Transformer(small_config(vocab_size=64, **overrides))
    init_weights(model, torch.Generator().manual_seed(seed))
    return model


def test_training_learns_and_logs(tmp_path):
    data = TokenData([pattern_tokens(6000)], 32, heldout_fraction=0.1)
    model = _model()
    before = heldout_loss(model, data, 8)
    cfg = TrainConfig(seq_len=32, batch_size=4, grad_accum=2, max_steps=30, lr=1e-2, warmup_steps=3, log_every=5,
                      eval_every=10, eval_sequences=8, save_every=15)
    last = train(model, data, cfg, tmp_path, progress=False)
    after = heldout_loss(model, data, 8)
    assert after < 0.4 * before and last["heldout_loss"] == pytest.approx(after, rel=1e-5)
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [5, 10, 15, 20, 25, 30]
    r = steps[-1]
    assert r["tokens"] == 30 * 2 * 4 * 32 and r["tokens_per_s"] > 0 and r["lr"] > 0 and r["grad_norm"] >= 0
    assert len(r["expert_load"]) == 2 and all(math.isclose(sum(row), 1, abs_tol=1e-3) for row in r["expert_load"])
    assert r["aux_loss"] >= 0.99 and r["z_loss"] > 0
    assert [r["step"] for r in records if "heldout_loss" in r] == [10, 20, 30]
    # Checkpoints: the newest two, `latest` on the last; the saved model reproduces the trained one.
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-0000015", "step-0000030"]
    assert checkpoint.latest(tmp_path).name == "step-0000030"
    loaded = load_model(tmp_path / "step-0000030", model.config, "cpu", torch.float32)
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name


def test_aux_loss_balances_the_experts(tmp_path):
    """With a large load-balancing weight the experts end up used near-uniformly."""
    data = TokenData([np.random.default_rng(0).integers(4, 64, 6000).astype(np.uint16)], 32)
    cfg = TrainConfig(seq_len=32, batch_size=4, max_steps=40, lr=1e-2, warmup_steps=2, log_every=40,
                      eval_every=1000, save_every=1000, aux_loss_coef=1.0)
    record = next(json.loads(x) for x in [json.dumps(train(_model(), data, cfg, tmp_path, progress=False))])
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert record["step"] == 40 and log[-1]["aux_loss"] < 1.1
    assert max(max(row) for row in log[-1]["expert_load"]) < 0.3  # 8 experts: 0.125 each when uniform


def test_resume_refuses_other_settings(tmp_path):
    data = TokenData([pattern_tokens(3000)], 16)
    cfg = TrainConfig(seq_len=16, batch_size=2, max_steps=4, warmup_steps=1, save_every=2, eval_every=100)
    train(_model(), data, cfg, tmp_path, progress=False)
    with pytest.raises(ValueError, match="lr"):
        train(_model(), data, TrainConfig(**{**cfg.__dict__, "lr": 0.5}), tmp_path, resume=True, progress=False)


# --- SIGKILL and exact resumption, with real `grok1 train` processes -------------------------------

def _write_config(path: Path) -> Path:
    path.write_text(json.dumps(small_config(vocab_size=64, n_layers=2).to_dict()))
    return path


def _train_cmd(data: Path, config: Path, run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "grok1", "train", "--data", str(data), "--config", str(config), "--out", str(run),
            "--seq-len", "16", "--batch-size", "4", "--max-steps", "24", "--warmup-steps", "4", "--lr", "3e-3",
            "--log-every", "1", "--eval-every", "8", "--eval-sequences", "4", "--save-every", "4",
            "--threads", "1", "--deterministic", "--no-progress", *extra]


def _losses(run: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss", r.get("heldout_loss"))) for r in records]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """(token file, config file, losses of a run that nobody interrupts), shared by the kill tests."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    data, config = tmp / "pattern.npy", _write_config(tmp / "config.json")
    np.save(data, pattern_tokens(8000))
    subprocess.run(_train_cmd(data, config, tmp / "whole"), check=True, env=_env(), capture_output=True)
    return data, config, _losses(tmp / "whole")


def test_sigkill_then_resume_gives_the_same_losses(uninterrupted, tmp_path):
    pattern_file, config, expected = uninterrupted
    run = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(pattern_file, config, run), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # kill once past the second checkpoint
        log = run / "log.jsonl"
        if log.is_file() and any(json.loads(x)["step"] >= 10 for x in log.read_text().splitlines() if x.endswith("}")):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = checkpoint.latest(run)
    assert killed_at is not None and int(killed_at.name[5:]) < 24
    subprocess.run(_train_cmd(pattern_file, config, run, "--resume"), check=True, env=_env(), capture_output=True)
    assert _losses(run) == expected  # bit-identical: every step's loss and every held-out loss


KILL_DURING_SAVE = textwrap.dedent("""
    import os, signal, sys
    target = sys.argv.pop(1)  # kill just before this file of step 8's checkpoint would be renamed into place
    original = os.replace
    def dying_replace(src, dst, *args, **kwargs):
        if "step-0000008" in str(dst) and str(dst).endswith(target):
            os.kill(os.getpid(), signal.SIGKILL)
        return original(src, dst, *args, **kwargs)
    os.replace = dying_replace
    from grok1.cli.main import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.parametrize("target", [".safetensors", "trainer_state.pt"])
def test_kill_during_checkpoint_write_leaves_the_previous_one(uninterrupted, tmp_path, target):
    pattern_file, config, expected = uninterrupted
    run = tmp_path / "crash"
    cmd = _train_cmd(pattern_file, config, run)
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, target, *cmd[3:]], env=_env(), capture_output=True,
                          check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert list((run / "step-0000008").glob("*.tmp"))  # the interrupted write
    last = checkpoint.latest(run)
    assert last.name == "step-0000004"
    model = load_model(last, small_config(vocab_size=64, n_layers=2), "cpu", torch.float32)
    assert model(torch.randint(4, 64, (1, 8))).isfinite().all()
    subprocess.run(_train_cmd(pattern_file, config, run, "--resume"), check=True, env=_env(), capture_output=True)
    assert _losses(run) == expected
