"""Memory limits from /proc/meminfo and cgroup v1/v2 trees (fake trees in tmp_path: every layout by hand)."""

import json
from pathlib import Path

from grok1 import memory


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_available_ram(tmp_path):
    _write(tmp_path / "meminfo", "MemTotal:       24683792 kB\nMemFree:  100 kB\nMemAvailable:   12806068 kB\n")
    assert memory.available_ram(tmp_path / "meminfo") == 12806068 * 1024
    assert memory.available_ram(tmp_path / "missing") is None


def test_v1_smallest_limit_on_the_path_to_the_root(tmp_path):
    root = tmp_path / "cgroup"
    _write(tmp_path / "self", "9:name=systemd:/\n4:memory:/job/child\n3:cpuset:/\n0::/\n")
    _write(root / "memory" / "memory.limit_in_bytes", "9223372036854771712\n")  # unlimited
    _write(root / "memory" / "job" / "memory.limit_in_bytes", "1000000000\n")
    _write(root / "memory" / "job" / "child" / "memory.limit_in_bytes", "2000000000\n")
    assert memory.cgroup_limit(tmp_path / "self", root) == 1_000_000_000
    _write(root / "memory" / "job" / "memory.limit_in_bytes", "9223372036854771712\n")
    assert memory.cgroup_limit(tmp_path / "self", root) == 2_000_000_000
    _write(root / "memory" / "job" / "child" / "memory.limit_in_bytes", "9223372036854771712\n")
    assert memory.cgroup_limit(tmp_path / "self", root) is None


def test_v2_unified_at_the_root_or_under_unified(tmp_path):
    root = tmp_path / "cgroup"
    _write(tmp_path / "self", "0::/user.slice/job\n")
    _write(root / "cgroup.controllers", "cpu memory io\n")
    _write(root / "user.slice" / "memory.max", "max\n")
    _write(root / "user.slice" / "job" / "memory.max", "734003200\n")
    assert memory.cgroup_limit(tmp_path / "self", root) == 734_003_200
    hybrid = tmp_path / "hybrid"  # v1 mounts beside a v2 hierarchy at /sys/fs/cgroup/unified
    _write(hybrid / "unified" / "cgroup.controllers", "memory\n")
    _write(hybrid / "unified" / "user.slice" / "job" / "memory.max", "600000000\n")
    assert memory.cgroup_limit(tmp_path / "self", hybrid) == 600_000_000


def test_inside_a_cgroup_namespace_the_mount_root_is_our_cgroup(tmp_path):
    """A container sees its own cgroup mounted at the root while /proc/self/cgroup may name a host path."""
    root = tmp_path / "cgroup"
    _write(tmp_path / "self", "0::/../../host/path\n")
    _write(root / "cgroup.controllers", "memory\n")
    _write(root / "memory.max", "800000000\n")
    assert memory.cgroup_limit(tmp_path / "self", root) == 800_000_000


def test_no_cgroup_information(tmp_path):
    assert memory.cgroup_limit(tmp_path / "missing", tmp_path) is None
    _write(tmp_path / "self", "0::/\n")
    assert memory.cgroup_limit(tmp_path / "self", tmp_path / "nothing-mounted") is None


def test_fits_in_memory_keeps_a_reserve():
    gib = 1 << 30
    assert memory.fits_in_memory(100 << 20, 16 * gib)
    assert not memory.fits_in_memory(1500 << 20, 700 << 20)  # the one-box proof: 1.5 GB under a 700 MB cap
    usable = 10 * gib
    edge = int(usable - memory.RESERVE_BYTES - memory.RESERVE_FRACTION * usable)
    assert memory.fits_in_memory(edge, usable) and not memory.fits_in_memory(edge + 1, usable)
    assert memory.fits_in_memory(10**15, None)  # unknown: as before, pack


def test_this_machine_reads_without_error():
    limit, ram = memory.cgroup_limit(), memory.available_ram()
    assert limit is None or limit > 0
    assert ram is None or ram > 0


# ---- a model larger than its memory cgroup runs, memory-mapped, with default flags ----

def _synthetic_checkpoint(out: Path) -> int:
    """Random int8 weights (std ~ 1/sqrt(fan_in)), grok-1-mini's tokenizer; returns the weight bytes."""
    import dataclasses

    import torch

    from grok1.cli.common import DEFAULT_CHECKPOINT
    from grok1.config import from_name
    from grok1.model import Transformer
    from grok1.quant import swap_to_int8
    from grok1.weights import safetensors as st

    cfg = dataclasses.replace(from_name("grok-1-mini"), ffn_dim=6144)  # experts: 4 x 8 x 3 x 256 x 6144 = 151 MB
    g = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        model = Transformer(cfg)
    swap_to_int8(model)
    shapes, tensors = model.state_dict(), {}
    for name, t in shapes.items():
        if t.dtype == torch.int8:
            tensors[name] = torch.randint(-127, 128, t.shape, dtype=torch.int8, generator=g)
        elif t.dtype == torch.bfloat16:
            w = name.rsplit(".", 1)[0] + ".weight" if name.endswith("scales") else name.replace(".s", ".w")
            tensors[name] = torch.full(t.shape, 1 / (73.3 * shapes[w].shape[-1] ** 0.5), dtype=torch.bfloat16)
        elif name.endswith("norm.weight"):
            tensors[name] = torch.ones(t.shape)
        else:  # embedding, router
            tensors[name] = torch.randn(t.shape, generator=g) / cfg.dim**0.5
    st.save_checkpoint(tensors, cfg, out, "int8", DEFAULT_CHECKPOINT / "tokenizer.model")
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _capped_cgroup(cap: int) -> tuple[Path, str]:
    """A child of this process's memory cgroup (v1 or v2) with the cap; (directory, pressure file)."""
    import os
    root = Path("/sys/fs/cgroup")
    lines = Path("/proc/self/cgroup").read_text().splitlines()
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            d = root / "memory" / path.lstrip("/") / f"grok1-test-{os.getpid()}"
            d.mkdir()
            (d / "memory.limit_in_bytes").write_text(str(cap))
            return d, "memory.failcnt"
    for line in lines:
        hierarchy, _, path = line.split(":", 2)
        for base in (root, root / "unified"):
            if hierarchy == "0" and (base / "cgroup.controllers").is_file():
                parent = base / path.lstrip("/")
                (parent / "cgroup.subtree_control").write_text("+memory")
                d = parent / f"grok1-test-{os.getpid()}"
                d.mkdir()
                (d / "memory.max").write_text(str(cap))
                return d, "memory.events"
    raise OSError("no memory cgroup hierarchy")


def test_a_model_larger_than_its_cgroup_runs_memory_mapped(tmp_path):
    import os
    import subprocess
    import sys

    import pytest

    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("needs Linux and root to create a memory cgroup")
    cap = 200 * 10**6
    try:
        cgroup, pressure = _capped_cgroup(cap)
    except OSError as e:
        pytest.skip(f"cannot create a memory cgroup here: {e}")
    try:
        # The torch path (no compiled kernels): nothing to build or lock inside the cap, same ids in both runs.
        env = {**os.environ, "GROK1_KERNELS": "0"}
        weights = _synthetic_checkpoint(tmp_path / "ckpt")
        assert weights > 150 * 10**6  # with the activations (dequantised experts on the torch path) it cannot all
        # stay resident under the cap (the interpreter and torch, loaded before joining, are charged to the parent)
        gen = [sys.executable, "-m", "grok1", "generate", "--checkpoint", str(tmp_path / "ckpt"), "Once",
               "--max-new-tokens", "4", "--temperature", "0", "--ignore-eos", "--json"]
        free = subprocess.run([*gen, "--no-pack"], capture_output=True, text=True, env=env, check=True, timeout=600)
        for f in (tmp_path / "ckpt").glob("*.safetensors"):  # read it back from the disk under the cap
            fd = os.open(f, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        # `python -m grok1 generate ...` that joins the cgroup once torch is imported (what the cap measures is
        # the model, not the interpreter).
        join = ("import os, sys; from grok1 import kernels; kernels.cpu_ops(); "
                "open(sys.argv[1], 'w').write(str(os.getpid())); from grok1.cli.main import main; sys.exit(main(sys.argv[2:]))")
        capped = subprocess.run([sys.executable, "-c", join, str(cgroup / "cgroup.procs"), *gen[3:]],
                                capture_output=True, text=True, env=env, check=False, timeout=600)
        assert capped.returncode == 0, capped.stderr[-2000:]
        notes = [line for line in capped.stderr.splitlines() if "memory-mapped" in line]
        assert len(notes) == 1 and "do not fit in the memory this process may use (0.20 GB" in notes[0], capped.stderr
        assert json.loads(capped.stdout)["token_ids"] == json.loads(free.stdout)["token_ids"]
        text = (cgroup / pressure).read_text()
        hits = int(text) if pressure == "memory.failcnt" else int(dict(x.split() for x in text.splitlines())["max"])
        assert hits > 0  # it ran against the cap: pages were reclaimed and read again
    finally:
        cgroup.rmdir()
