"""How much memory this process may use, and whether a model's weights fit in it.

The smaller of the RAM the kernel reports as available (/proc/meminfo MemAvailable) and the limit of the
memory cgroup the process runs in: v1 `memory.limit_in_bytes`, v2 `memory.max`, the smallest along the
path from its cgroup up to the hierarchy's root (a parent's limit binds its children). Linux only; None
where nothing is known.

Used to decide whether to copy the weights into the CPU kernel's panels (anonymous memory: they must fit)
or to keep them memory-mapped from the checkpoint, where the OS pages in what each step touches and drops
pages under pressure: a model larger than memory still runs, as llama.cpp does with mmap.
"""

from __future__ import annotations

from pathlib import Path

NO_LIMIT = 1 << 62  # v1 reports "unlimited" as a huge page-rounded number (9223372036854771712)
RESERVE_FRACTION = 0.10  # of the usable memory, kept for the KV cache, activations and the runtime
RESERVE_BYTES = 512 << 20  # Python, torch and the compiled kernels


def available_ram(meminfo: str | Path = "/proc/meminfo") -> int | None:
    """MemAvailable in bytes, or None when it cannot be read."""
    try:
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _read_limit(file: Path) -> int | None:
    try:
        text = file.read_text().strip()
    except OSError:
        return None
    if not text.isdigit():  # v2 "max"
        return None
    value = int(text)
    return value if value < NO_LIMIT else None


def _walk_limits(base: Path, path: str, name: str) -> int | None:
    """The smallest `name` limit from base/path up to base (base itself when path is not visible, as inside a
    cgroup namespace, where /proc/self/cgroup paths are relative to what is mounted)."""
    d = base / path.lstrip("/")
    if not d.is_dir():
        d = base
    limits = []
    while True:
        limit = _read_limit(d / name)
        if limit is not None:
            limits.append(limit)
        if d == base or base not in d.parents:
            break
        d = d.parent
    return min(limits, default=None)


def cgroup_limit(proc_cgroup: str | Path = "/proc/self/cgroup", root: str | Path = "/sys/fs/cgroup") -> int | None:
    """The memory limit (bytes) of the cgroup this process runs in, v1 or v2, or None when unlimited or unknown."""
    root = Path(root)
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if "memory" in controllers.split(","):  # v1
            limits.append(_walk_limits(root / "memory", path, "memory.limit_in_bytes"))
        elif hierarchy == "0" and controllers == "":  # v2: the unified hierarchy, at root or root/unified
            for base in (root, root / "unified"):
                if (base / "cgroup.controllers").is_file():
                    limits.append(_walk_limits(base, path, "memory.max"))
                    break
    return min((x for x in limits if x is not None), default=None)


def usable_memory() -> int | None:
    """min(available RAM, cgroup limit), in bytes; None when neither is known."""
    known = [x for x in (available_ram(), cgroup_limit()) if x is not None]
    return min(known, default=None)


def fits_in_memory(weight_bytes: int, usable: int | None) -> bool:
    """Can `weight_bytes` of weights live in anonymous memory, leaving a reserve for everything else?
    Unknown memory counts as enough (the old behaviour)."""
    if usable is None:
        return True
    return weight_bytes <= usable - RESERVE_BYTES - RESERVE_FRACTION * usable
