"""The first-use kernel build (grok1/extension.py) against kills and concurrent first uses, for real: fresh
processes on an empty private cache (TORCH_EXTENSIONS_DIR).

The tests marked `compiles` build the kernels from scratch (about a minute per build on 2 cores; two builds
in the first, one in the second); `-m "not compiles"` leaves them out. The lock test compiles nothing.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from grok1 import kernels

ROOT = Path(__file__).resolve().parents[1]
BUILD_TIMEOUT = 900  # s: a bound, so that a hang fails the test instead of blocking the suite
COMPILING = "grok1: compiling the CPU kernels"  # what the process that builds says (a waiting one says whom it waits for)
USE_KERNELS = ("import torch\nfrom grok1 import kernels\nops = kernels.cpu_ops()\nassert ops is not None\n"
               "x = torch.randn(3, 50)\nassert torch.equal(ops.argmax(x), x.argmax(-1))\nprint('kernels ok')\n")

pytestmark = pytest.mark.skipif(not Path("/proc/self/cwd").exists(), reason="finds the build's processes in /proc")


@pytest.fixture(scope="module")
def compiler():
    if kernels.cpu_ops() is None:
        pytest.skip("the CPU kernels cannot be compiled here")


def _env(cache: Path) -> dict:
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "TORCH_EXTENSIONS_DIR": str(cache), "GROK1_KERNELS": "1", "PYTHONPATH": path}


def _python(code: str, cache: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], env=_env(cache), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _processes_in(cache: Path) -> list[str]:
    """Command lines of the processes working in `cache` (the build child, ninja, the compilers)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        if str(cache) in cmd or cwd.startswith(str(cache)):
            found.append(cmd)
    return found


def _wait_for(predicate, seconds: float):
    deadline = time.monotonic() + seconds
    while not (result := predicate()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return result


@pytest.mark.compiles
def test_a_build_killed_midway_leaves_nothing_that_blocks(compiler, tmp_path):
    cache = tmp_path / "cache"
    first = _python(USE_KERNELS, cache)
    compiling = _wait_for(lambda: [c for c in _processes_in(cache) if "-c " in c and ".cpp" in c], BUILD_TIMEOUT)
    assert compiling, "the build never started a compiler"
    first.send_signal(signal.SIGKILL)
    first.communicate()
    # What the kill leaves: torch's `lock` in the dead build's private directory (the file that used to
    # block every later load), and no process: the compilers die with the process that started them.
    (dead,) = cache.glob("*/build-*")
    assert (dead / "lock").exists()
    assert _wait_for(lambda: not _processes_in(cache), 30), _processes_in(cache)
    (dead.parent / "lock").touch()  # and a `lock` as torch's own loader leaves it in the cache entry
    second = _python(USE_KERNELS, cache)
    out, err = second.communicate(timeout=BUILD_TIMEOUT)
    assert second.returncode == 0 and "kernels ok" in out, err
    assert COMPILING in err
    assert not list(cache.glob("*/build-*"))  # the dead build's directory is gone, and so is this one's


@pytest.mark.compiles
def test_two_first_uses_at_once_both_succeed_and_build_once(compiler, tmp_path):
    cache = tmp_path / "cache"
    procs = [_python(USE_KERNELS, cache) for _ in range(2)]
    results = [p.communicate(timeout=BUILD_TIMEOUT) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0 and "kernels ok" in out, err
    assert sum(COMPILING in err for _, err in results) == 1  # the other waited for it (or came after)
    assert len(list(cache.glob("*/grok1_kernels_*.so"))) == 1


HOLD = ("import sys, time\nfrom pathlib import Path\nfrom grok1.extension import _locked\n"
        "with _locked(Path(sys.argv[1])):\n    print('held', flush=True)\n    time.sleep(600)\n")
TAKE = ("import sys\nfrom pathlib import Path\nfrom grok1.extension import _locked\n"
        "with _locked(Path(sys.argv[1])):\n    print('taken')\n")


def test_the_build_lock_says_whom_it_waits_for_and_dies_with_its_holder(tmp_path):
    lock = tmp_path / "build.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], env=_env(tmp_path), stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        waiter = subprocess.Popen([sys.executable, "-c", TAKE, str(lock)], env=_env(tmp_path),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        message = waiter.stderr.readline()  # printed before it blocks
        assert f"waiting for process {holder.pid} to finish compiling" in message, message
        assert waiter.poll() is None  # blocked while the holder lives
    finally:
        holder.kill()  # SIGKILL: no clean-up runs, the lock file stays on disk
        holder.wait()
    out, err = waiter.communicate(timeout=60)
    assert waiter.returncode == 0 and out.strip() == "taken", err
    assert lock.exists()


def test_kernel_choice_names_the_build_and_refuses_unknown_values(tmp_path):
    """GROK1_KERNELS: `avx2` builds without AVX-512 (its extra flag; tests/test_panels.py checks that build's
    bits), `1` is the native build, and an unknown value is one error line from the command line, with
    nothing compiled."""
    assert kernels.ISAS["avx2"] == ["-mno-avx512f"] and kernels.ISAS["1"] == kernels.ISAS["native"] == []
    env = {**_env(tmp_path), "GROK1_KERNELS": "avx9"}
    r = subprocess.run([sys.executable, "-m", "grok1", "generate", "hi", "--max-new-tokens", "2"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "grok1 generate: error: GROK1_KERNELS='avx9': valid values are native, 1, avx2 and 0")
    assert not list(tmp_path.rglob("*.so")) and COMPILING not in r.stderr
