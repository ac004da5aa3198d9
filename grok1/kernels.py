"""Compiled CPU kernels (grok1/csrc/linear.cpp), built with torch's C++ extension loader at first use.

The build is cached (under ~/.cache/torch_extensions, keyed by source, flags and this CPU's
instruction set), so only the first run on a machine pays the ~30-60 s compile. Where no
compiler is available the callers fall back to plain torch, after one warning. Set
GROK1_KERNELS=0 to force the fallback.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

_SOURCE = Path(__file__).parent / "csrc" / "linear.cpp"

# Rows of activations from which the matmul dequantises weight tiles and uses BLAS (compute-bound
# prefill) instead of streaming the weights through the register kernel (memory-bound decode).
GEMM_MIN_ROWS = 32


def _cpu_tag() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return hashlib.sha1(flags.encode()).hexdigest()[:8]


@functools.cache
def cpu_ops() -> ModuleType | None:
    """The compiled kernel module, or None (with one warning) where it cannot be built."""
    if os.environ.get("GROK1_KERNELS", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import _get_build_directory, load

        name = f"grok1_linear_{_cpu_tag()}"
        if not list(Path(_get_build_directory(name, verbose=False)).glob("*.so")):
            print("grok1: compiling the CPU matmul kernel (first use on this machine, about a minute)...",
                  file=sys.stderr)
        return load(name=name, sources=[str(_SOURCE)], extra_cflags=["-O3", "-march=native", "-fopenmp"],
                    extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # no compiler, no ninja, unsupported platform: run slower, but run
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        warnings.warn(f"grok1: compiled CPU kernel unavailable ({reason}); using the slower pure-torch path",
                      stacklevel=2)
        return None


def applies(x: Tensor, weight: Tensor) -> bool:
    """Whether `linear` runs the compiled kernel for these operands (CPU, float32 activations, no
    gradient needed, built)."""
    if torch.is_grad_enabled() and x.requires_grad:  # the compiled op has no backward: training takes torch's path
        return False
    return x.device.type == "cpu" and x.dtype == torch.float32 and weight.device.type == "cpu" and cpu_ops() is not None


def linear(x: Tensor, weight: Tensor, scales: Tensor) -> Tensor | None:
    """x [.., K] float32 @ W.T for a stored-format W (int8, packed int4, bf16, fp32; see quant.py) on CPU,
    or None when the compiled kernel does not apply (other device or dtype, or not built)."""
    if not applies(x, weight):
        return None
    y = cpu_ops().linear(x.reshape(-1, x.shape[-1]), weight, scales, GEMM_MIN_ROWS)
    return y.view(*x.shape[:-1], weight.shape[0])


def experts(x_ND: Tensor, idx_NA: Tensor, gate_NA: Tensor, w: tuple[Tensor, ...], scales: tuple[Tensor, ...]) -> Tensor:
    """The experts of a MoE layer in one compiled call: token t of x_ND [N, D] goes to experts idx_NA[t]
    with weights gate_NA[t] (float32); w = (w1, w3, w2) stacked [E, ., .] in any stored format, scales
    likewise. Returns [N, D]. The caller checks `applies` first."""
    return cpu_ops().experts(x_ND, idx_NA, gate_NA, w[0], scales[0], w[1], scales[1], w[2], scales[2], GEMM_MIN_ROWS)
