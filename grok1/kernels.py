"""Compiled CPU kernels (grok1/csrc/: linear.cpp and panels.cpp for matmuls, attention.cpp, argmax.cpp,
norm.cpp), built at first use, and `CompiledAttention` / `CompiledRMSNorm`, the modules that `install`
puts in place of a finished model's attention and norms.

The build is cached (under ~/.cache/torch_extensions, keyed by the sources, flags and this CPU's
instruction set), so only the first run on a machine pays the ~30-60 s compile; a killed build or two
first uses at once are safe (extension.py). Where no compiler is available the callers fall back to
plain torch, after one warning. GROK1_KERNELS picks the build: unset or `native` (this CPU's instruction
set, -march=native), `avx2` (the same without AVX-512: what an AVX2-only CPU runs, to measure that path
on an AVX-512 machine), `0` (no compiled kernels: the plain-torch fallback).
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import warnings
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor, nn

from grok1 import extension
from grok1.model import Attention, KVCache, RMSNorm, Transformer

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = [_CSRC / n for n in ("linear.cpp", "panels.cpp", "attention.cpp", "argmax.cpp", "norm.cpp")]  # + their header simd.h

# -ffp-contract=off: a * b + c stays two roundings unless the source asks for a fused multiply-add (the
# attention kernel's RoPE must round as torch's elementwise ops do).
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"]
# Instruction sets a build may be limited to (GROK1_KERNELS): the kernels pick their code paths by the
# compiler's macros (simd.h), so `avx2` compiles exactly what an AVX2-only CPU gets.
ISAS = {"native": [], "1": [], "avx2": ["-mno-avx512f"]}

# Rows of activations from which the matmul dequantises weight tiles and uses BLAS (compute-bound
# prefill) instead of streaming the weights through the register kernel (memory-bound decode).
GEMM_MIN_ROWS = 32


def _build_tag() -> str:
    """This CPU's instruction set and the kernel sources (headers included): a change of either is a new build."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    digest = hashlib.sha1(flags.encode())
    for path in sorted(_CSRC.iterdir()):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:8]


@functools.cache
def cpu_ops() -> ModuleType | None:
    """The compiled kernel module, or None (with one warning) where it cannot be built."""
    choice = os.environ.get("GROK1_KERNELS", "native")
    if choice == "0":
        return None
    if choice not in ISAS:
        raise ValueError(f"GROK1_KERNELS={choice!r}: valid values are {', '.join(ISAS)} and 0")
    try:
        suffix = "" if not ISAS[choice] else f"_{choice}"  # native (or 1): the plain name, as before
        return extension.load(f"grok1_kernels{suffix}_{_build_tag()}", _SOURCES, CFLAGS + ISAS[choice], ["-fopenmp"])
    except Exception as e:  # noqa: BLE001  no compiler, no ninja, unsupported platform: run slower, but run
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


def panel_linear(x: Tensor, panels: Tensor, scales: Tensor, n_out: int) -> Tensor | None:
    """x [.., K] float32 @ W.T for W [n_out, K] packed in panels (panels.to_panels) on CPU, or None when the
    compiled kernel does not apply."""
    if not applies(x, panels):
        return None
    y = cpu_ops().panel_linear(x.reshape(-1, x.shape[-1]), panels, scales, n_out)
    return y.view(*x.shape[:-1], n_out)


def experts(x_ND: Tensor, idx_NA: Tensor, gate_NA: Tensor, w: tuple[Tensor, ...], scales: tuple[Tensor, ...]) -> Tensor:
    """The experts of a MoE layer in one compiled call: token t of x_ND [N, D] goes to experts idx_NA[t]
    with weights gate_NA[t] (float32); w = (w1, w3, w2) stacked [E, ., .] in any stored format, or stacked
    panels [E, P, K, 16] (panels.to_panels), scales likewise. Returns [N, D]. The caller checks `applies` first."""
    return cpu_ops().experts(x_ND, idx_NA, gate_NA, w[0], scales[0], w[1], scales[1], w[2], scales[2], GEMM_MIN_ROWS)


def argmax(x: Tensor) -> Tensor:
    """Row-wise argmax of [B, V] logits, torch.argmax(x, -1)'s answer (lowest index on ties, first NaN):
    compiled for float32 CPU tensors (torch's CPU argmax is a scalar loop), torch's elsewhere."""
    if x.dim() == 2 and x.dtype == torch.float32 and x.device.type == "cpu" and x.shape[1] and cpu_ops() is not None:
        return cpu_ops().argmax(x)
    return x.argmax(dim=-1)


def attention_applies(x: Tensor, cache: KVCache | None) -> bool:
    """Whether `CompiledAttention` runs the kernel for this call: one token per row, over a float32 CPU
    cache, float32 activations, no gradient, kernel built."""
    return cache is not None and x.shape[1] == 1 and cache.k.dtype == torch.float32 and applies(x, cache.k)


class CompiledAttention(Attention):
    """Attention whose one-token-per-row calls with a cache (decode rows, and prompt tokens riding along
    with them) run the compiled kernel: RoPE, the cache write and attention over the cache read in place,
    in one call, instead of a gathered copy of the cache and a dozen small tensor ops. Every other call
    (prefill, no cache, other devices or dtypes, training) is the model's own Attention.forward."""

    def __init__(self, attention: Attention) -> None:
        """The layer `attention` (its settings, and its wqkv and wo modules themselves, not copies)."""
        nn.Module.__init__(self)
        self.layer_id, self.head_dim, self.group = attention.layer_id, attention.head_dim, attention.group
        self.scale, self.softcap = attention.scale, attention.softcap
        self.wqkv, self.wo = attention.wqkv, attention.wo
        self.train(attention.training)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, pos: Tensor,
                cache: KVCache | None, kv_len: int, rows: Tensor | None = None) -> Tensor:
        if not attention_applies(x, cache):
            return super().forward(x, cos, sin, mask, pos, cache, kv_len, rows)
        assert cache is not None
        B = x.shape[0]
        qkv = self.wqkv(x).view(B, -1)  # [B, (H + 2K) * Hd]
        rows = rows if rows is not None else torch.arange(B, device=x.device)
        out = cpu_ops().decode_attention(qkv, cos.view(B, -1), sin.view(B, -1), pos.view(B), rows,
                                         cache.k[self.layer_id], cache.v[self.layer_id], cache.valid, kv_len,
                                         self.scale, self.softcap)  # [B, H * Hd]
        return self.wo(out.view(B, 1, -1))


class CompiledRMSNorm(RMSNorm):
    """RMSNorm computed by the compiled kernel (one pass, instead of torch's five ops) for float32 CPU
    activations without gradients; elsewhere the model's own RMSNorm.forward."""

    def __init__(self, norm: RMSNorm) -> None:
        """The norm `norm` (its eps, and its weight parameter itself, not a copy)."""
        nn.Module.__init__(self)
        self.eps, self.weight = norm.eps, norm.weight
        self.train(norm.training)

    def forward(self, x: Tensor) -> Tensor:
        if (x.dtype != torch.float32 or self.weight.dtype != torch.float32 or not applies(x, self.weight)
                or (torch.is_grad_enabled() and self.weight.requires_grad)):  # training the scale: torch's path
            return super().forward(x)
        return cpu_ops().rms_norm(x, self.weight, self.eps)


def install(model: Transformer) -> Transformer:
    """Replace every Attention by a CompiledAttention and every RMSNorm by a CompiledRMSNorm holding the
    same parameters (each falls back to the plain path wherever its kernel does not apply), as
    quant.swap_to_int8 replaces modules. Returns the model."""
    compiled = {Attention: CompiledAttention, RMSNorm: CompiledRMSNorm}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in compiled:
                new = compiled[type(child)](child)
                for key, hooks in vars(child).items():  # hooks move along (tensor parallelism's all-reduce)
                    if "hooks" in key:
                        object.__setattr__(new, key, hooks)
                setattr(parent, name, new)
    return model
