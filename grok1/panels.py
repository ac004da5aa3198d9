"""Panels: the compiled CPU kernel's own storage layout for a matrix, for inference.

A matrix W [.., N, K] (int8 with bf16 scales [.., G, N], bf16, or float32) is stored as panels
[.., ceil(N / 16), K, 16]: panel p holds outputs 16p..16p+15, input k's 16 weights side by side (outputs
past N are zero), with the int8 scales widened to float32 [.., G, 16 ceil(N / 16)]. The kernel
(grok1/csrc/panels.cpp) then streams weights in the order it multiplies them: no horizontal sums, 2-3x
the speed of row-major weights on a batch, and each output's arithmetic independent of the batch.
Same bytes as the row-major matrix (plus at most 15 zero rows): `pack_model` converts in place.

`PackedLinear`, `PackedExperts` and `PackedEmbedding` hold panels; `pack_model` replaces a loaded model's
modules by them (after kernels.install), and `is_packed` says whether every matrix is in panels. A layout,
not a weight format: the int8 values and scales are quant.py's, unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from grok1 import kernels
from grok1.model import Experts, TiedEmbedding, Transformer
from grok1.quant import QEmbedding, QExperts, QLinear, _ExpertStacks, dequantize

PANEL = 16


def to_panels(w: Tensor, scales: Tensor | None = None,
              release: Callable[[Tensor], None] | None = None) -> tuple[Tensor, Tensor]:
    """int8 (with scales), bf16 or float32 w [.., N, K] -> (panels [.., P, K, 16], float32 scales [.., G, 16 P]
    for int8, else empty), P = ceil(N / 16). Copied ~64 MB at a time, `release(rows)` called on each piece of w once copied,
    so a memory-mapped w need not be resident whole next to its copy."""
    *lead, n, k = w.shape
    p = -(-n // PANEL)
    panels = torch.empty(*lead, p, k, PANEL, dtype=w.dtype, device=w.device)
    src, dst = w.reshape(-1, n, k), panels.view(-1, p, k, PANEL)
    step = max(1, (64 << 20) // (PANEL * k * w.element_size()))  # panels per piece
    ops = kernels.cpu_ops() if w.device.type == "cpu" and w.is_contiguous() else None
    for i in range(src.shape[0]):
        for p0 in range(0, p, step):
            rows = src[i, p0 * PANEL: (p0 + step) * PANEL]  # [<= step * 16, K]
            full, rest = divmod(rows.shape[0], PANEL)
            if ops is not None:  # compiled: cache-blocked, both threads
                ops.pack_panels(rows, dst[i, p0: p0 + full + (rest > 0)])
            else:
                dst[i, p0: p0 + full] = rows[: full * PANEL].view(full, PANEL, k).transpose(1, 2)
                if rest:  # the last panel: its outputs past N are zero
                    dst[i, p0 + full] = 0
                    dst[i, p0 + full, :, :rest] = rows[full * PANEL:].T
            if release is not None:
                release(rows)
    if w.dtype != torch.int8:
        return panels, torch.empty(0, device=w.device)
    assert scales is not None, "int8 weights need their scales"
    s = scales.float()
    pad = p * PANEL - n
    if pad:
        s = torch.cat([s, s.new_zeros(*s.shape[:-1], pad)], dim=-1)
    return panels, s.contiguous()


def from_panels(panels: Tensor, scales: Tensor, n_out: int, dtype: torch.dtype) -> Tensor:
    """Panels (see to_panels) -> the dense weight [.., n_out, K] in dtype (the plain-torch path)."""
    *lead, p, k, _ = panels.shape
    w = panels.transpose(-1, -2).reshape(*lead, p * PANEL, k)[..., :n_out, :]
    return dequantize(w, scales[..., :n_out], dtype) if panels.dtype == torch.int8 else w.to(dtype)


class PackedLinear(nn.Module):
    """Bias-free linear layer over a panel-packed weight (int8, bf16 or float32)."""

    def __init__(self, panels: Tensor, scales: Tensor, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = panels.shape[-2], out_features
        self.register_buffer("panels", panels)
        self.register_buffer("scales", scales)

    def forward(self, x: Tensor) -> Tensor:
        y = kernels.panel_linear(x, self.panels, self.scales, self.out_features)
        return y if y is not None else F.linear(x, from_panels(self.panels, self.scales, self.out_features, x.dtype))


class PackedExperts(_ExpertStacks):
    """Experts whose w1, w3 [E, F, D] and w2 [E, D, F] are panel-packed (int8, bf16 or float32)."""

    def __init__(self, w1: tuple[Tensor, Tensor], w2: tuple[Tensor, Tensor], w3: tuple[Tensor, Tensor]) -> None:
        super().__init__()
        self.n_experts, _, self.dim, _ = w1[0].shape  # [E, P, D, 16]
        self.ffn_dim = w2[0].shape[2]
        for i, (p, s) in zip("123", (w1, w2, w3)):
            self.register_buffer(f"w{i}", p)
            self.register_buffer(f"s{i}", s)

    def expert_weights(self, idx: Tensor | int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        outs = {"1": self.ffn_dim, "2": self.dim, "3": self.ffn_dim}
        return tuple(from_panels(getattr(self, f"w{i}")[idx], self._scales(i, idx), outs[i], dtype)  # type: ignore[return-value]
                     for i in "123")


class PackedEmbedding(nn.Module):
    """The tied embedding table [V, D] in panels (float32, bf16, or int8 with one scale per row): rows are
    gathered for the lookup, and the output projection is the panel kernel's."""

    def __init__(self, panels: Tensor, scales: Tensor, vocab_size: int, rows: Tensor | None = None) -> None:
        """rows: the table's exact values for the lookup, where the panels hold a rounded copy (QEmbedding.rows)."""
        super().__init__()
        self.vocab_size = vocab_size
        self.register_buffer("panels", panels)
        self.register_buffer("scales", scales)
        self.register_buffer("rows", rows, persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32  # packed only for float32 compute

    def forward(self, tokens: Tensor) -> Tensor:
        if self.rows is not None:
            return self.rows[tokens].float()
        rows = self.panels[tokens // PANEL, :, tokens % PANEL]  # [.., D]
        if rows.dtype == torch.int8:
            return rows.float() * self.scales[0, tokens][..., None]
        return rows.float()

    def unembed(self, h: Tensor) -> Tensor:
        y = kernels.panel_linear(h, self.panels, self.scales, self.vocab_size)
        return y if y is not None else F.linear(h, from_panels(self.panels, self.scales, self.vocab_size, h.dtype))


def is_packed(model: Transformer) -> bool:
    """Whether every matrix the kernel multiplies is in panels: then no batch size changes a row's arithmetic."""
    unpacked = (TiedEmbedding, QEmbedding, Experts, QExperts)  # anywhere, e.g. inside a parallel wrapper
    return not any(isinstance(m, unpacked) for m in model.modules()) and all(
        isinstance(layer.attention.wqkv, PackedLinear) and isinstance(layer.attention.wo, PackedLinear)
        for layer in model.layers)


def _packable(weight: Tensor) -> bool:
    return weight.dtype in (torch.int8, torch.bfloat16, torch.float32)


def pack_model(model: Transformer, release: Callable[[Tensor], None] | None = None) -> Transformer:
    """Store the attention projections, the experts and the tied embedding in panels, in place, where the
    compiled CPU kernel runs them: CPU, float32 compute, kernel built, int8, bf16 or float32 weights (int4
    ones stay as they are). For inference: the result computes the same function (to float32
    rounding), but training, LoRA and saving need the unpacked modules. `release(tensor)` is called on
    each matrix once packed (a loader's chance to drop its pages). Returns the model."""
    emb = model.tok_embeddings
    if emb.dtype != torch.float32 or model.norm.weight.device.type != "cpu" or kernels.cpu_ops() is None:
        return model

    def panels(w: Tensor, s: Tensor | None) -> tuple[Tensor, Tensor]:
        return to_panels(w.detach(), s, release)

    for layer in model.layers:
        att = layer.attention
        for name in ("wqkv", "wo"):
            lin = getattr(att, name)
            if isinstance(lin, (QLinear, nn.Linear)) and _packable(lin.weight):
                setattr(att, name, PackedLinear(*panels(lin.weight, getattr(lin, "scales", None)), lin.weight.shape[0]))
    # Experts and the table wherever they sit (a parallel wrapper, grok1/parallel, may hold a rank's share), by
    # name: holding no reference to a replaced module, so its memory goes as soon as its panels exist.
    for path in [n for n, m in model.named_modules() if isinstance(m, (QExperts, Experts, TiedEmbedding, QEmbedding))]:
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        child = getattr(parent, name)
        if isinstance(child, (QExperts, Experts)) and _packable(child.w1):
            setattr(parent, name, PackedExperts(*(panels(getattr(child, f"w{i}"), getattr(child, f"s{i}", None))
                                                  for i in "123")))
        elif isinstance(child, TiedEmbedding) or (isinstance(child, QEmbedding) and _packable(child.weight)):
            setattr(parent, name, PackedEmbedding(*panels(child.weight, getattr(child, "scales", None)),
                                                  child.weight.shape[0], getattr(child, "rows", None)))
        del child
    if is_packed(model):
        # What stays is small (norms, router): copy it too, so that nothing holds on to a memory-mapped
        # checkpoint any more and its pages leave the process: the weights are in memory once, not twice.
        for module in model.modules():
            if not isinstance(module, (PackedLinear, PackedExperts, PackedEmbedding)):
                for p in module.parameters(recurse=False):
                    p.data = p.data.clone()
                for name, b in list(module.named_buffers(recurse=False)):
                    setattr(module, name, b.clone())
    return model
