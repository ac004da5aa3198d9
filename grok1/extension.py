"""Build a C++ extension once per machine and load it, safely when builds are killed or start together.

torch's extension loader builds in a shared directory guarded by a `lock` file that it deletes when done:
a build killed mid-way leaves that file behind, and every later load waits for it forever, silently,
while the killed build's compilers run on as orphans. Here instead:
  - a child process builds the library in a private directory (`build-*` beside the cache entry), and the
    finished library is renamed into place: a library in the cache is always whole;
  - one process builds while the others wait (saying for whom) under a lock on our own file
    (fcntl.flock), which the kernel releases when its holder dies: a dead holder never blocks;
  - the build (the child, ninja and the compilers) is ended when the process that asked for it dies
    (Linux), and the next build removes the dead builds' directories.

The cache entry is torch's directory for `name` (TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions/..),
holding `build.lock` and one library per set of flags, torch and Python version.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch


def load(name: str, sources: list[Path], cflags: list[str], ldflags: list[str]) -> ModuleType:
    """The compiled extension `name` (a valid module name; its sources define PYBIND11_MODULE with
    TORCH_EXTENSION_NAME), built first if this machine has none yet. Raises when it cannot be built."""
    from torch.utils.cpp_extension import LIB_EXT, _get_build_directory

    home = Path(_get_build_directory(name, verbose=False))
    key = hashlib.sha1(json.dumps([cflags, ldflags, torch.__version__, sys.version]).encode()).hexdigest()[:8]
    lib = home / f"{name}-{key}{LIB_EXT}"
    if not lib.is_file():
        with _locked(home / "build.lock"):
            if not lib.is_file():  # else another process built it while this one waited
                for dead in home.glob("build-*"):  # only a lock holder builds: these are killed builds' leftovers
                    shutil.rmtree(dead, ignore_errors=True)
                print("grok1: compiling the CPU kernels (first use on this machine, about a minute)...",
                      file=sys.stderr)
                _build(name, sources, cflags, ldflags, home, lib, LIB_EXT)
    spec = importlib.util.spec_from_file_location(name, lib)
    assert spec is not None and spec.loader is not None, lib
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if absent), released when the block ends or this process
    dies. Says so on stderr while another process holds it."""
    import fcntl  # POSIX; elsewhere the ImportError means no compiled kernels, as does a missing compiler

    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            print(f"grok1: waiting for {holder} to finish compiling the CPU kernels (lock: {path})...",
                  file=sys.stderr)
            fcntl.flock(f, fcntl.LOCK_EX)
        f.truncate(0)
        f.write(f"process {os.getpid()}")
        f.flush()
        yield


def _build(name: str, sources: list[Path], cflags: list[str], ldflags: list[str], home: Path, lib: Path,
           lib_ext: str) -> None:
    """Build in a child process and a private directory, then rename the library to `lib`."""
    private = Path(tempfile.mkdtemp(prefix="build-", dir=home))
    spec = {"name": name, "sources": [str(s) for s in sources], "cflags": cflags, "ldflags": ldflags,
            "dir": str(private), "parent": os.getpid()}
    path = os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])  # this grok1
    try:
        env = {**os.environ, "PYTHONPATH": path}
        child = subprocess.Popen([sys.executable, "-m", "grok1.extension", json.dumps(spec)], env=env,
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 text=True, start_new_session=True)  # its own process group: ninja and the compilers
        try:
            _, err = child.communicate()
        except BaseException:  # interrupted here: the build goes too (as in _end_build)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGTERM)
            child.wait()
            raise
        if child.returncode:
            lines = err.strip().splitlines()
            raise RuntimeError(lines[-1] if lines else f"the build exited with status {child.returncode}")
        os.replace(private / f"{name}{lib_ext}", lib)
    finally:
        shutil.rmtree(private, ignore_errors=True)


def _die_with(parent: int) -> None:
    """End this build (this process, ninja and the compilers) when process `parent` dies."""
    signal.signal(signal.SIGTERM, _end_build)
    with contextlib.suppress(OSError, AttributeError):  # Linux only; elsewhere an orphan finishes in its own
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # directory, which the next build removes. 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before the line above took effect
        _end_build()


def _end_build(*_) -> None:
    """SIGTERM to this process group: ninja, which runs each compiler in a process group of its own, passes it
    on to them before it exits; this process then dies of it too."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.killpg(0, signal.SIGTERM)


def _child(spec: dict) -> int:
    _die_with(spec["parent"])
    from torch.utils.cpp_extension import load as torch_load

    try:
        torch_load(name=spec["name"], sources=spec["sources"], extra_cflags=spec["cflags"],
                   extra_ldflags=spec["ldflags"], build_directory=spec["dir"], verbose=False)
    except Exception as e:  # noqa: BLE001  reported by the parent, in one line
        print(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # the child of _build: python -m grok1.extension SPEC
    sys.exit(_child(json.loads(sys.argv[1])))
