"""Weight formats: the release's int8, 4-bit, bf16 and fp32 matrices, computed in the activation dtype.

A weight W [.., out, in] is stored in one of these formats (`weight`, `scales` buffers):
  int8  the release: q int8 [.., out, in], scales bf16 [.., Gs, out]; input k of output n uses
        scale [.., k // (in / Gs), n]. The release has Gs = 1 for most matrices and Gs = 8 for the
        attention output and expert down projections.
  int4  q packed two per byte, uint8 [.., out, in / 2], scales bf16 [.., out, in / 32]: blocks of
        32 inputs, byte j of a block holds input j (low nibble) and input j + 16 (high nibble),
        values stored + 8 (symmetric, -8..7). Not a release format: an option for speed and memory.
  bf16, fp32  the plain matrix, no scales.

int8 dequantisation is the reference's, bit for bit: the product int8 * scale is exact in float32
(8-bit x 8-bit mantissas), so the float32 weight is that exact product, and the bfloat16 weight
is its rounding, which equals the reference's bf16(int8 * bf16 scale).

`QLinear`, `QExperts` and `QEmbedding` hold one format each and run the compiled CPU kernel
(grok1/kernels.py, weights converted in registers) where it applies, else dequantise and use
torch. `swap_to_int8`, `quantize_model` and `quantize_embedding` replace the modules of a finished
model from outside; the model file knows nothing of this.

For inference on CPU, `pack_model` then stores the int8 and fp32 matrices in panels, the compiled
kernel's own layout (see "panels" below): `PackedLinear`, `PackedExperts`, `PackedEmbedding`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from grok1 import kernels
from grok1.model import Experts, TiedEmbedding, Transformer, route_to_experts

FORMATS = ("int8", "int4", "bf16", "fp32")
INT4_BLOCK = 32


def dequantize(q: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    """int8 q [.., out, in], scales [.., Gs, out] -> weight [.., out, in] in dtype."""
    groups = scales.shape[-2]
    s = scales.float().transpose(-1, -2)  # [.., out, Gs]
    s = s.repeat_interleave(q.shape[-1] // groups, dim=-1)  # [.., out, in]
    return (q.float() * s).to(dtype)


def quantize(w: Tensor, groups: int = 1) -> tuple[Tensor, Tensor]:
    """w [.., out, in] -> (q int8 [.., out, in], scales bf16 [.., groups, out]), as the release was made:
    per (group, output) scale = bf16(max|w| / 127), q = clip(round(w / scale), -127, 127)."""
    *lead, out, inp = w.shape
    assert inp % groups == 0, (inp, groups)
    wg = w.float().reshape(*lead, out, groups, inp // groups)
    scales = (wg.abs().amax(dim=-1) / 127).to(torch.bfloat16)  # [.., out, groups]
    s = scales.float().clamp_min(torch.finfo(torch.float32).tiny)[..., None]
    q = (wg / s).round().clamp(-127, 127).to(torch.int8).reshape(*lead, out, inp)
    return q, scales.transpose(-1, -2).contiguous()


def quantize_int4(w: Tensor) -> tuple[Tensor, Tensor]:
    """w [.., out, in] (in a multiple of 32) -> (packed uint8 [.., out, in / 2], scales bf16 [.., out, in / 32]).
    Per block of 32 inputs: scale = bf16(max|w| / 7), q = clip(round(w / scale), -8, 7)."""
    *lead, out, inp = w.shape
    if inp % INT4_BLOCK:
        raise ValueError(f"int4 needs an input size that is a multiple of {INT4_BLOCK}, got {inp}")
    wb = w.float().reshape(*lead, out, inp // INT4_BLOCK, INT4_BLOCK)
    scales = (wb.abs().amax(dim=-1) / 7).to(torch.bfloat16)  # [.., out, blocks]
    s = scales.float().clamp_min(torch.finfo(torch.float32).tiny)[..., None]
    q = ((wb / s).round().clamp(-8, 7) + 8).to(torch.uint8)  # [.., out, blocks, 32]
    packed = q[..., :16] | (q[..., 16:] << 4)  # [.., out, blocks, 16]
    return packed.reshape(*lead, out, inp // 2), scales


def dequantize_int4(packed: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    *lead, out, half = packed.shape
    p = packed.reshape(*lead, out, half // 16, 16)
    q = torch.cat([p & 15, p >> 4], dim=-1).float() - 8  # [.., out, blocks, 32]
    return (q * scales.float()[..., None]).reshape(*lead, out, 2 * half).to(dtype)


def unpack(weight: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    """Any stored format -> the dense weight in dtype (the plain-torch path)."""
    if weight.dtype == torch.int8:
        return dequantize(weight, scales, dtype)
    if weight.dtype == torch.uint8:
        return dequantize_int4(weight, scales, dtype)
    return weight.to(dtype)


def pack(w: Tensor, fmt: str, groups: int = 1) -> tuple[Tensor, Tensor]:
    """Dense w [.., out, in] -> (weight, scales) in `fmt` (scales empty for bf16 / fp32)."""
    if fmt == "int8":
        return quantize(w, groups)
    if fmt == "int4":  # an input size that does not split into 32-blocks keeps the release's int8
        return quantize_int4(w) if w.shape[-1] % INT4_BLOCK == 0 else quantize(w, groups)
    if fmt in ("bf16", "fp32"):
        dtype = torch.bfloat16 if fmt == "bf16" else torch.float32
        return w.detach().to(dtype).contiguous(), torch.empty(0, dtype=torch.bfloat16, device=w.device)
    raise ValueError(f"unknown weight format {fmt!r}; valid formats: {', '.join(FORMATS)}")


def weight_format(weight: Tensor) -> str:
    return {torch.int8: "int8", torch.uint8: "int4", torch.bfloat16: "bf16", torch.float32: "fp32"}[weight.dtype]


def _matmul(x: Tensor, weight: Tensor, scales: Tensor) -> Tensor:
    y = kernels.linear(x, weight, scales)  # weights converted in registers (CPU, float32 activations)
    return y if y is not None else F.linear(x, unpack(weight, scales, x.dtype))


class QLinear(nn.Module):
    """Bias-free linear layer with a stored-format weight (see module doc); computes in x.dtype."""

    def __init__(self, in_features: int, out_features: int, groups: int = 1,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        # Placeholders in the release's int8 layout; loading or packing assigns the real tensors.
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(groups, out_features, dtype=torch.bfloat16, device=device))

    def forward(self, x: Tensor) -> Tensor:
        return _matmul(x, self.weight, self.scales)


class _ExpertStacks(nn.Module):
    """What QExperts and PackedExperts share: stacks w1, w2, w3 with scales s1, s2, s3 (maybe empty), run by
    the compiled experts op, else expert by expert through `expert_weights` (the subclass's)."""

    n_experts: int

    def expert_weights(self, idx: Tensor | int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def _scales(self, i: str, idx: Tensor | int) -> Tensor:
        s = getattr(self, f"s{i}")
        return s[idx] if s.numel() else s

    def forward(self, x_ND: Tensor, idx_NA: Tensor, gate_NA: Tensor) -> Tensor:
        if not kernels.applies(x_ND, self.w1):
            return route_to_experts(self.expert_weights, x_ND, idx_NA, gate_NA, self.n_experts)
        # One compiled call: routing, each chosen expert once on all its rows, the gated sum.
        return kernels.experts(x_ND, idx_NA, gate_NA.float(), (self.w1, self.w3, self.w2), (self.s1, self.s3, self.s2))


class QExperts(_ExpertStacks):
    """Experts with stored-format weights w1, w3 [E, F, D] and w2 [E, D, F], scales s1, s2, s3."""

    def __init__(self, n_experts: int, dim: int, ffn_dim: int, groups: tuple[int, int, int] = (1, 1, 1),
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.n_experts = n_experts
        shapes = {"1": (ffn_dim, dim), "2": (dim, ffn_dim), "3": (ffn_dim, dim)}
        for (i, (out, inp)), g in zip(shapes.items(), groups):
            self.register_buffer(f"w{i}", torch.zeros(n_experts, out, inp, dtype=torch.int8, device=device))
            self.register_buffer(f"s{i}", torch.ones(n_experts, g, out, dtype=torch.bfloat16, device=device))

    def expert_weights(self, idx: Tensor | int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        return tuple(unpack(getattr(self, f"w{i}")[idx], self._scales(i, idx), dtype) for i in "123")  # type: ignore[return-value]


class QEmbedding(nn.Module):
    """A stored-format tied embedding table [V, D] (int8 with one scale per row, [1, V], bf16 or fp32), used
    for lookup and as the output projection. Not the release's format (its table is float32): an
    opt-in for speed, since the unembedding is the largest single read per decoded token."""

    def __init__(self, vocab_size: int, dim: int, dtype: torch.dtype, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.compute_dtype = dtype
        self.register_buffer("weight", torch.zeros(vocab_size, dim, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(1, vocab_size, dtype=torch.bfloat16, device=device))

    @property
    def dtype(self) -> torch.dtype:
        return self.compute_dtype

    def forward(self, tokens: Tensor) -> Tensor:
        rows = self.weight[tokens]  # [B, T, D]
        if rows.dtype == torch.int8:
            return (rows.float() * self.scales[0, tokens].float()[..., None]).to(self.compute_dtype)
        return rows.to(self.compute_dtype)

    def unembed(self, h: Tensor) -> Tensor:
        return _matmul(h, self.weight, self.scales)


def quantize_embedding(model: Transformer, fmt: str = "int8") -> None:
    """Store the tied embedding table as int8 (per-row scales), bf16 or fp32 (then only to use the
    compiled kernel for the unembedding), keeping the compute dtype."""
    if fmt not in ("int8", "bf16", "fp32"):
        raise ValueError(f"the embedding table can be stored as int8, bf16 or fp32, not {fmt!r}")
    emb: TiedEmbedding = model.tok_embeddings
    V, D = emb.weight.shape
    q = QEmbedding(V, D, emb.dtype, emb.weight.device)
    q.weight, q.scales = pack(emb.weight.data, fmt, 1)
    model.tok_embeddings = q


RELEASE_GROUPS = {"wqkv": 1, "wo": 8, "w1": 1, "w2": 8, "w3": 1}


def swap_to_int8(model: Transformer, groups: dict[str, int] | None = None) -> None:
    """Replace wqkv, wo and the experts of every layer by QLinear / QExperts placeholders.

    `groups` gives the scale-group count per role ("wqkv", "wo", "w1", "w2", "w3"); the release's
    are the defaults. Call on a meta-device model before assigning checkpoint tensors (which may be
    of any stored format: the modules take the format of what is assigned).
    """
    g = RELEASE_GROUPS | (groups or {})
    for layer in model.layers:
        att = layer.attention
        dev = att.wqkv.weight.device
        att.wqkv = QLinear(att.wqkv.in_features, att.wqkv.out_features, g["wqkv"], dev)
        att.wo = QLinear(att.wo.in_features, att.wo.out_features, g["wo"], dev)
        ex: Experts = layer.moe.experts
        E, F_, D = ex.w1.shape
        layer.moe.experts = QExperts(E, D, F_, (g["w1"], g["w2"], g["w3"]), dev)


def quantize_model(model: Transformer, fmt: str = "int8", groups: dict[str, int] | None = None) -> None:
    """Store the attention projections and experts of a float model in `fmt` (int8 with the release's
    recipe and groups, int4, bf16 or fp32), in place. The embedding, norms and router are untouched."""
    g = RELEASE_GROUPS | (groups or {})
    dense = {id(layer): (layer.attention.wqkv.weight.data, layer.attention.wo.weight.data,
                         layer.moe.experts.w1.data, layer.moe.experts.w2.data, layer.moe.experts.w3.data)
             for layer in model.layers}
    swap_to_int8(model, groups)
    for layer in model.layers:
        wqkv, wo, w1, w2, w3 = dense[id(layer)]
        att, ex = layer.attention, layer.moe.experts
        att.wqkv.weight, att.wqkv.scales = pack(wqkv, fmt, g["wqkv"])
        att.wo.weight, att.wo.scales = pack(wo, fmt, g["wo"])
        for i, w in (("1", w1), ("2", w2), ("3", w3)):
            q, s = pack(w, fmt, g[f"w{i}"])
            setattr(ex, f"w{i}", q)
            setattr(ex, f"s{i}", s)


# ---- panels: the compiled CPU kernel's own layout, for inference ----
# A matrix W [.., N, K] (int8 with bf16 scales [.., G, N], or float32) is stored as panels
# [.., ceil(N / 16), K, 16]: panel p holds outputs 16p..16p+15, input k's 16 weights side by side (outputs
# past N are zero), with the int8 scales widened to float32 [.., G, 16 ceil(N / 16)]. The kernel
# (grok1/csrc/panels.cpp) then streams weights in the order it multiplies them: no horizontal sums, 2-3x
# the speed of row-major weights on a batch, and each output's arithmetic independent of the batch.
# Same bytes as the row-major matrix (plus at most 15 zero rows): `pack_model` converts in place.
PANEL = 16


def to_panels(w: Tensor, scales: Tensor | None = None,
              release: Callable[[Tensor], None] | None = None) -> tuple[Tensor, Tensor]:
    """int8 (with scales) or float32 w [.., N, K] -> (panels [.., P, K, 16], float32 scales [.., G, 16 P] or
    empty), P = ceil(N / 16). Copied ~64 MB at a time, `release(rows)` called on each piece of w once copied,
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
    """Bias-free linear layer over a panel-packed weight (int8 or float32)."""

    def __init__(self, panels: Tensor, scales: Tensor, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = panels.shape[-2], out_features
        self.register_buffer("panels", panels)
        self.register_buffer("scales", scales)

    def forward(self, x: Tensor) -> Tensor:
        y = kernels.panel_linear(x, self.panels, self.scales, self.out_features)
        return y if y is not None else F.linear(x, from_panels(self.panels, self.scales, self.out_features, x.dtype))


class PackedExperts(_ExpertStacks):
    """Experts whose w1, w3 [E, F, D] and w2 [E, D, F] are panel-packed (int8 or float32)."""

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
    """The tied embedding table [V, D] in panels (float32, or int8 with one scale per row): rows are
    gathered for the lookup, and the output projection is the panel kernel's."""

    def __init__(self, panels: Tensor, scales: Tensor, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.register_buffer("panels", panels)
        self.register_buffer("scales", scales)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32  # packed only for float32 compute

    def forward(self, tokens: Tensor) -> Tensor:
        rows = self.panels[tokens // PANEL, :, tokens % PANEL]  # [.., D]
        if rows.dtype == torch.int8:
            return rows.float() * self.scales[0, tokens][..., None]
        return rows

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
    return weight.dtype in (torch.int8, torch.float32)


def pack_model(model: Transformer, release: Callable[[Tensor], None] | None = None) -> Transformer:
    """Store the attention projections, the experts and the tied embedding in panels, in place, where the
    compiled CPU kernel runs them: CPU, float32 compute, kernel built, int8 or float32 weights (int4 and
    bf16 ones stay as they are). For inference: the result computes the same function (to float32
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
                                                  child.weight.shape[0]))
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
