"""The wheel ships what the compiled kernels need: built, installed into a fresh venv and run from outside
the repository, grok1 compiles its kernels from the installed sources and runs them (no fallback)."""

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import sys, warnings
warnings.simplefilter("error")  # the fallback announces itself with a warning: fail on it
import torch
import grok1, grok1.kernels as k
assert grok1.__file__.startswith(sys.prefix), grok1.__file__
ops = k.cpu_ops()
assert ops is not None, "no compiled kernels"
x, w = torch.randn(3, 64), torch.randn(32, 64)
y = k.linear(x, w, torch.empty(0, dtype=torch.bfloat16))
assert y is not None and torch.allclose(y, x @ w.T, atol=1e-4)
print(ops.__file__)
"""


def _missing_tool() -> str | None:
    if shutil.which("c++") is None and shutil.which("g++") is None:
        return "no C++ compiler on PATH"
    if shutil.which("ninja") is None:
        return "ninja is not installed (pip install ninja)"
    try:
        import setuptools
    except ImportError:
        return "setuptools is not installed"
    if int(setuptools.__version__.split(".")[0]) < 64:
        return f"setuptools {setuptools.__version__} is older than the 64 pyproject.toml needs"
    return None


@pytest.mark.slow  # builds a wheel and the kernels from scratch: about a minute
@pytest.mark.skipif(sys.platform != "linux", reason="the kernels are built and tested on Linux")
def test_wheel_installs_and_runs_the_compiled_kernels(tmp_path):
    if reason := _missing_tool():
        pytest.skip(reason)
    src = tmp_path / "src"  # only what the wheel is built from: nothing built in the repository itself
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "grok1", src / "grok1", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the installed copy, not this tree
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", str(src), "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist")],
                   check=True, env=env, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("grok1-*.whl"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True)  # torch and the rest come from here
    python = str(env_dir / "bin" / "python")
    subprocess.run([python, "-m", "pip", "--disable-pip-version-check", "-q", "install", "--no-deps",
                    "--ignore-installed", str(wheel)], check=True, env=env, cwd=tmp_path)
    env["TORCH_EXTENSIONS_DIR"] = str(env_dir / "torch_extensions")  # a fresh build, from the installed files
    run = subprocess.run([python, "-c", CHECK], env=env, cwd=tmp_path, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().startswith(str(env_dir)), run.stdout
