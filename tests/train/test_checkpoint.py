"""grok1.train.checkpoint on a full disk and after a killed save: nothing half-written stays behind."""

import errno
import os
import subprocess

import pytest
import torch
from conftest import small_config

from grok1.model import Transformer, init_weights
from grok1.train import checkpoint


def tiny_model():
    torch.manual_seed(0)
    model = Transformer(small_config(vocab_size=64, n_layers=2))
    init_weights(model)
    return model


def du(d):
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs that holds one checkpoint of tiny_model and a half (root can mount one); None if not allowed."""
    probe = tmp_path / "probe"
    checkpoint.save(probe, 1, tiny_model(), {"step": 1})
    mnt = tmp_path / "disk"
    mnt.mkdir()
    size = int(du(probe) * 1.5) // 4096 * 4096
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True,
                      check=False).returncode:
        yield None
        return
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_a_full_disk_during_a_save_leaves_no_tmp_files_and_the_last_checkpoint(small_disk, tmp_path, monkeypatch):
    run = (small_disk or tmp_path) / "run"
    model = tiny_model()
    checkpoint.save(run, 1, model, {"step": 1})
    if small_disk is None:  # no tmpfs here: fail the trainer state's write the way a full disk does
        real = os.fsync

        def fsync(fd):
            if os.readlink(f"/proc/self/fd/{fd}").endswith("trainer_state.pt.tmp"):
                raise OSError(errno.ENOSPC, "No space left on device")
            real(fd)

        monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="No space left on device") as e:
        checkpoint.save(run, 2, model, {"step": 2})
    assert e.value.errno == errno.ENOSPC and "last complete checkpoint is kept" in str(e.value)
    assert not list(run.rglob("*.tmp")), list(run.rglob("*.tmp"))
    assert sorted(p.name for p in run.iterdir()) == ["latest", "step-0000001"]
    assert checkpoint.latest(run).name == "step-0000001"
    assert checkpoint.load(checkpoint.latest(run), tiny_model())["step"] == 1


def test_the_next_start_removes_what_a_killed_save_left(tmp_path):
    run = tmp_path / "run"
    checkpoint.save(run, 1, tiny_model(), {"step": 1})
    (run / "latest.tmp").write_text("step-0000002\n")
    (run / "step-0000001" / "config.json.tmp").write_text("{")
    partial = run / "step-0000002"
    partial.mkdir()
    (partial / "model-00001-of-00001.safetensors.tmp").write_bytes(b"\0" * 4096)
    (partial / "config.json").write_text("{}")
    (run / "notes.txt").write_text("mine")  # not the checkpoint's: kept
    assert checkpoint.latest(run).name == "step-0000001"
    assert sorted(p.name for p in run.iterdir()) == ["latest", "notes.txt", "step-0000001"]
    assert not list(run.rglob("*.tmp"))
