"""Weight formats: the release's int8, 4-bit, bf16 and fp32 matrices, computed in the activation dtype.

A weight W [.., out, in] is stored in one of these formats (`weight`, `scales` buffers):
  int8  the release: q int8 [.., out, in], scales bf16 [.., Gs, out]; input k of output n uses
        scale [.., k // (in / Gs), n]. The release has Gs = 1 for most matrices and Gs = 8 for the
        attention output and expert down projections.
  int4  q packed two per byte, uint8 [.., out, in / 2], scales bf16 [.., out, in / 32]: blocks of
        32 inputs, byte j of a block holds input j (low nibble) and input j + 16 (high nibble),
        values stored + 8 (symmetric, -8..7). Not a release format: an option for speed and memory.
  bf16, fp32  the plain matrix, no scales.
These four names (`FORMATS`) are the one vocabulary of weight formats; grok1's config.json spells the
last two "bfloat16" and "float32" (`CONFIG_NAMES`).

int8 dequantisation is the reference's, bit for bit: the product int8 * scale is exact in float32
(8-bit x 8-bit mantissas), so the float32 weight is that exact product, and the bfloat16 weight
is its rounding, which equals the reference's bf16(int8 * bf16 scale).

`QLinear`, `QExperts` and `QEmbedding` hold one format each and run the compiled CPU kernel
(grok1/kernels.py, weights converted in registers) where it applies, else dequantise and use
torch. `swap_to_int8`, `quantize_model` and `quantize_embedding` replace the modules of a finished
model from outside; the model file knows nothing of this.

For inference on CPU, panels.pack_model then stores the int8 and fp32 matrices in the compiled
kernel's own layout (a storage layout, not a format: grok1/panels.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from grok1 import kernels
from grok1.model import Experts, TiedEmbedding, Transformer, route_to_experts

FORMATS = ("int8", "int4", "bf16", "fp32")  # how a matrix is stored (module doc)
STORAGE_DTYPES = dict(zip(FORMATS, (torch.int8, torch.uint8, torch.bfloat16, torch.float32)))  # its tensor's dtype
CONFIG_NAMES = dict(zip(FORMATS, ("int8", "int4", "bfloat16", "float32")))  # grok1 config.json "weights"
RELEASE_GROUPS = {"wqkv": 1, "wo": 8, "w1": 1, "w2": 8, "w3": 1}  # int8 scale groups per matrix, as released
INT4_BLOCK = 32


def weight_format(weight: Tensor) -> str:
    """The format of a stored matrix, from its dtype (any other float dtype counts as fp32: a plain matrix)."""
    return next((f for f, d in STORAGE_DTYPES.items() if d == weight.dtype), "fp32")


def dequantize(q: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    """int8 q [.., out, in], scales [.., Gs, out] -> weight [.., out, in] in dtype: the exact float32 products
    int8 * scale, the scales broadcast over each group of inputs (never expanded to the weight's size)."""
    groups = scales.shape[-2]
    s = scales.float().transpose(-1, -2)[..., None]  # [.., out, Gs, 1]
    return (q.unflatten(-1, (groups, q.shape[-1] // groups)).float() * s).flatten(-2).to(dtype)


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
        return w.detach().to(STORAGE_DTYPES[fmt]).contiguous(), torch.empty(0, dtype=torch.bfloat16, device=w.device)
    raise ValueError(f"unknown weight format {fmt!r}; valid formats: {', '.join(FORMATS)}")


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

    def __init__(self, vocab_size: int, dim: int, dtype: torch.dtype, device: torch.device | str | None = None,
                 rows: Tensor | None = None) -> None:
        """rows: the table's values in a float dtype, for the lookup (one row per token: few bytes) where the
        stored weight is a rounded copy made for the output projection (`quantize_embedding`)."""
        super().__init__()
        self.compute_dtype = dtype
        self.register_buffer("weight", torch.zeros(vocab_size, dim, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(1, vocab_size, dtype=torch.bfloat16, device=device))
        self.register_buffer("rows", rows, persistent=False)  # not a checkpoint tensor

    @property
    def dtype(self) -> torch.dtype:
        return self.compute_dtype

    def forward(self, tokens: Tensor) -> Tensor:
        if self.rows is not None:
            return self.rows[tokens].to(self.compute_dtype)
        rows = self.weight[tokens]  # [B, T, D]
        if rows.dtype == torch.int8:
            return (rows.float() * self.scales[0, tokens].float()[..., None]).to(self.compute_dtype)
        return rows.to(self.compute_dtype)

    def unembed(self, h: Tensor) -> Tensor:
        return _matmul(h, self.weight, self.scales)


TABLE_FORMATS = ("int8", "bf16", "fp32")  # how the tied table may be stored (`grok1 ... --table`)


def quantize_embedding(model: Transformer, fmt: str = "int8", exact_lookup: bool = False) -> None:
    """Store the tied embedding table as int8 (per-row scales), bf16 or fp32 (then only to use the
    compiled kernel for the unembedding), keeping the compute dtype. The table may already be stored in
    any of these (a QEmbedding: its values are taken exactly, then stored in `fmt`), and may sit inside a
    wrapper holding it as `.table` (a tensor-parallel rank's rows). exact_lookup: the input embedding keeps
    reading the table's own values (the original tensor, not a copy: a memory-mapped table stays mapped and
    only the rows looked up are read), so only the output projection sees the rounded table."""
    if fmt not in TABLE_FORMATS:
        raise ValueError(f"the embedding table can be stored as {', '.join(TABLE_FORMATS)}, not {fmt!r}")
    holder, name = model, "tok_embeddings"
    while not isinstance(getattr(holder, name), (TiedEmbedding, QEmbedding)):
        holder, name = getattr(holder, name), "table"
    emb = getattr(holder, name)
    if isinstance(emb, TiedEmbedding):
        dense = emb.weight.data
        rows = dense if exact_lookup else None
    else:
        dense = unpack(emb.weight, emb.scales, torch.float32)
        rows = emb.rows if emb.rows is not None else (dense if exact_lookup else None)
    V, D = dense.shape
    q = QEmbedding(V, D, emb.dtype, dense.device, rows)
    q.weight, q.scales = pack(dense, fmt, 1)
    setattr(holder, name, q)


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
