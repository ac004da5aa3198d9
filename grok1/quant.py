"""int8 weights as released: int8 values with bf16 scales in groups along the input axis.

A weight W [.., out, in] is stored as q int8 [.., out, in] and scales s [.., Gs, out]: input
column k of output n uses scale s[.., k // (in / Gs), n]. The release uses Gs = 1 for most
matrices and Gs = 8 for the attention output projection and the expert down projection.

Dequantisation is the reference's, bit for bit: the product int8 * scale is exact in float32
(8-bit x 8-bit mantissas), so the float32 weight is that exact product, and the bfloat16
weight is its rounding, which equals the reference's bf16(int8 * bf16 scale).

`swap_to_int8(model)` replaces the attention projections and the experts of a finished
(typically meta-device) model; the model file itself knows nothing of this.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from grok1 import kernels
from grok1.model import Experts, TiedEmbedding, Transformer, route_to_experts


def dequantize(q: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    """q int8 [.., out, in], scales [.., Gs, out] -> weight [.., out, in] in dtype."""
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


class Int8Linear(nn.Module):
    """Bias-free linear layer with int8 weight [out, in] and scales [Gs, out]; computes in x.dtype."""

    def __init__(self, in_features: int, out_features: int, groups: int = 1,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(groups, out_features, dtype=torch.bfloat16, device=device))

    def forward(self, x: Tensor) -> Tensor:
        y = kernels.int8_linear(x, self.weight, self.scales)  # int8 converted in registers (CPU, float32)
        return y if y is not None else F.linear(x, dequantize(self.weight, self.scales, x.dtype))


class Int8Experts(nn.Module):
    """Experts with int8 weights: w1, w3 [E, F, D], w2 [E, D, F], and scales s1, s3 [E, Gs, F], s2 [E, Gs, D]."""

    def __init__(self, n_experts: int, dim: int, ffn_dim: int, groups: tuple[int, int, int] = (1, 1, 1),
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.n_experts = n_experts
        shapes = {"1": (ffn_dim, dim), "2": (dim, ffn_dim), "3": (ffn_dim, dim)}
        for (i, (out, inp)), g in zip(shapes.items(), groups):
            self.register_buffer(f"w{i}", torch.zeros(n_experts, out, inp, dtype=torch.int8, device=device))
            self.register_buffer(f"s{i}", torch.ones(n_experts, g, out, dtype=torch.bfloat16, device=device))

    def expert_weights(self, idx: Tensor | int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        return (dequantize(self.w1[idx], self.s1[idx], dtype), dequantize(self.w2[idx], self.s2[idx], dtype),
                dequantize(self.w3[idx], self.s3[idx], dtype))

    def forward(self, x_ND: Tensor, idx_NA: Tensor, gate_NA: Tensor) -> Tensor:
        if kernels.int8_linear(x_ND[:0], self.w1[0, :0], self.s1[0, :, :0]) is None:
            return route_to_experts(self.expert_weights, x_ND, idx_NA, gate_NA, self.n_experts)
        if x_ND.shape[0] == 1:  # decode: just the chosen experts, no sorting
            y = torch.zeros_like(x_ND)
            for gate, e in zip(gate_NA[0], idx_NA[0].tolist()):
                y += gate * self._expert(e, x_ND)
            return y
        # Group (token, slot) rows by expert: each chosen expert's weights are read once per call.
        A = idx_NA.shape[1]
        order = idx_NA.flatten().argsort(stable=True)  # [N*A]
        counts = torch.bincount(idx_NA.flatten(), minlength=self.n_experts).tolist()
        token = order // A
        x_RD = x_ND[token]  # [N*A, D] sorted by expert
        y_RD = torch.empty_like(x_RD)
        start = 0
        for e, n in enumerate(counts):
            if n:
                y_RD[start : start + n] = self._expert(e, x_RD[start : start + n])
                start += n
        return torch.zeros_like(x_ND).index_add_(0, token, y_RD * gate_NA.flatten()[order, None])

    def _expert(self, e: int, x: Tensor) -> Tensor:
        """Expert e on rows x [M, D] with the compiled kernel: (gelu(x w1^T) * (x w3^T)) w2^T."""
        h = F.gelu(kernels.int8_linear(x, self.w1[e], self.s1[e]), approximate="tanh")
        h = h * kernels.int8_linear(x, self.w3[e], self.s3[e])
        return kernels.int8_linear(h, self.w2[e], self.s2[e])


class Int8TiedEmbedding(nn.Module):
    """An int8 embedding table [V, D] with one bf16 scale per row ([1, V]), used for lookup and as the
    output projection. Not the release's format (its table is float32): an opt-in for speed, since the
    unembedding is the largest single read per decoded token."""

    def __init__(self, vocab_size: int, dim: int, dtype: torch.dtype, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.compute_dtype = dtype
        self.register_buffer("weight", torch.zeros(vocab_size, dim, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(1, vocab_size, dtype=torch.bfloat16, device=device))

    @property
    def dtype(self) -> torch.dtype:
        return self.compute_dtype

    def forward(self, tokens: Tensor) -> Tensor:
        rows = self.weight[tokens]  # [B, T, D] int8
        return (rows.float() * self.scales[0, tokens].float()[..., None]).to(self.compute_dtype)

    def unembed(self, h: Tensor) -> Tensor:
        y = kernels.int8_linear(h, self.weight, self.scales)
        return y if y is not None else F.linear(h, dequantize(self.weight, self.scales, h.dtype))


def quantize_embedding(model: Transformer) -> None:
    """Replace the float tied embedding by an int8 one (per-row scales), keeping its compute dtype."""
    emb: TiedEmbedding = model.tok_embeddings
    V, D = emb.weight.shape
    q = Int8TiedEmbedding(V, D, emb.dtype, emb.weight.device)
    q.weight, q.scales = quantize(emb.weight.data, groups=1)
    model.tok_embeddings = q


def swap_to_int8(model: Transformer, groups: dict[str, int] | None = None) -> None:
    """Replace wqkv, wo and the experts of every layer by int8 modules (weights left as placeholders).

    `groups` gives the scale-group count per role ("wqkv", "wo", "w1", "w2", "w3"); the release's
    are the defaults. Call on a meta-device model before assigning checkpoint tensors.
    """
    g = {"wqkv": 1, "wo": 8, "w1": 1, "w2": 8, "w3": 1} | (groups or {})
    for layer in model.layers:
        att = layer.attention
        dev = att.wqkv.weight.device
        att.wqkv = Int8Linear(att.wqkv.in_features, att.wqkv.out_features, g["wqkv"], dev)
        att.wo = Int8Linear(att.wo.in_features, att.wo.out_features, g["wo"], dev)
        ex: Experts = layer.moe.experts
        E, F_, D = ex.w1.shape
        layer.moe.experts = Int8Experts(E, D, F_, (g["w1"], g["w2"], g["w3"]), dev)


def quantize_model(model: Transformer, groups: dict[str, int] | None = None) -> None:
    """Quantise a float model in place to the release's int8 layout (for tests and benchmarks)."""
    dense = {id(layer): (layer.attention.wqkv.weight.data, layer.attention.wo.weight.data,
                         layer.moe.experts.w1.data, layer.moe.experts.w2.data, layer.moe.experts.w3.data)
             for layer in model.layers}
    swap_to_int8(model, groups)
    for layer in model.layers:
        wqkv, wo, w1, w2, w3 = dense[id(layer)]
        att, ex = layer.attention, layer.moe.experts
        for module, w in ((att.wqkv, wqkv), (att.wo, wo)):
            module.weight, module.scales = quantize(w, module.scales.shape[0])
        for i, w in (("1", w1), ("2", w2), ("3", w3)):
            q, s = quantize(w, getattr(ex, f"s{i}").shape[1])
            setattr(ex, f"w{i}", q)
            setattr(ex, f"s{i}", s)
