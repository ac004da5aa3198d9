"""The Grok-1 network, exactly as GROK1.md section 2 describes the released reference.

Shape letters: B batch, T tokens in this call, S attended cache length, D model dim,
H query heads, K KV heads, G = H // K query heads per KV head, Hd head dim, E experts,
A active experts per token, F expert width, V vocab. `N` = B * T flattened tokens.

The compute dtype is the embedding's dtype (float32, or bfloat16 when loaded so); norms,
router, RoPE and softmax run in float32 whatever it is, as in the reference. This file knows
nothing of devices, files, quantization or parallelism: those wrap a finished model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from grok1.config import ModelConfig


class RMSNorm(nn.Module):
    """y = x * rsqrt(mean(x^2) + eps) * weight, in float32, cast back; no offset, no bias."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # F.rms_norm computes exactly x * rsqrt(mean(x^2) + eps) * weight, as one fused op.
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def rope_cos_sin(pos: Tensor, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """float32 cos/sin [B, T, 1, Hd] for absolute positions pos [B, T]; rotate-half layout."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim))
    phase = pos.float()[..., None] * inv_freq  # [B, T, Hd/2]
    phase = torch.cat([phase, phase], dim=-1)[:, :, None, :]  # [B, T, 1, Hd]
    return phase.cos(), phase.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, T, heads, Hd]: dim i pairs with dim i + Hd/2 (GPT-NeoX style), over the full head dim."""
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)


class KVCache(nn.Module):
    """Static per-layer key/value buffers; keys are stored after RoPE.

    k, v: [L, B, K, S_max, Hd]. `valid` [B, S_max] records which cache positions hold a real
    token (the reference never attends to a pad-token key, id 0).
    """

    def __init__(self, n_layers: int, batch: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None) -> None:
        super().__init__()
        shape = (n_layers, batch, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("valid", torch.zeros(batch, max_seq_len, dtype=torch.bool, device=device),
                             persistent=False)

    def attention_mask(self, tokens: Tensor, pos: Tensor, pad_id: int, kv_len: int,
                       rows: Tensor | None = None) -> Tensor:
        """Record this call's tokens and return the mask [B, 1, 1, T, S=kv_len] (True = attend).

        Batch row b of the call uses cache row rows[b] (default: row b)."""
        r = _rows(rows, tokens)
        self.valid[r[:, None], pos] = tokens != pad_id
        key_pos = torch.arange(kv_len, device=tokens.device)
        causal = key_pos[None, None, :] <= pos[:, :, None]  # [B, T, S]
        valid = self.valid[:, :kv_len] if rows is None else self.valid[rows, :kv_len]  # [B, S]
        return (causal & valid[:, None, :])[:, None, None]

    def update(self, layer: int, pos: Tensor, k: Tensor, v: Tensor, kv_len: int,
               rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Write k, v [B, T, K, Hd] at positions pos [B, T] of cache rows `rows` [B] (default 0..B-1);
        return this layer's keys and values [B, K, S=kv_len, Hd] for those rows."""
        r = _rows(rows, k)
        self.k[layer][r[:, None], :, pos] = k  # advanced indices first: target shape [B, T, K, Hd]
        self.v[layer][r[:, None], :, pos] = v
        if rows is None:  # a view, no copy
            return self.k[layer, : k.shape[0], :, :kv_len], self.v[layer, : k.shape[0], :, :kv_len]
        return self.k[layer, rows, :, :kv_len], self.v[layer, rows, :, :kv_len]


def _rows(rows: Tensor | None, like: Tensor) -> Tensor:
    return torch.arange(like.shape[0], device=like.device) if rows is None else rows


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.head_dim = cfg.head_dim
        self.group = cfg.n_heads // cfg.n_kv_heads  # G: query head n uses KV head n // G
        self.scale = cfg.attn_scale
        self.softcap = cfg.attn_softcap
        self.wqkv = nn.Linear(cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, pos: Tensor,
                cache: KVCache | None, kv_len: int, rows: Tensor | None = None) -> Tensor:
        B, T, _ = x.shape
        qkv = self.wqkv(x)  # [B, T, (H + 2K) * Hd]
        kv_size = qkv.shape[-1] // (self.group + 2)  # K * Hd, whatever slice of heads this module holds
        qk, v = qkv.split([(self.group + 1) * kv_size, kv_size], dim=-1)
        qk = apply_rope(qk.reshape(B, T, -1, self.head_dim), cos, sin)  # queries and keys in one go: [B, T, H + K, Hd]
        q, k = qk.split([self.group * kv_size // self.head_dim, kv_size // self.head_dim], dim=2)
        v = v.view(B, T, -1, self.head_dim)
        if cache is not None:
            k, v = cache.update(self.layer_id, pos, k, v, kv_len, rows)  # [B, K, S, Hd]
        else:
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        if T <= ATTN_CHUNK:
            out = attend(q, k, v, mask, self.scale, self.softcap)
        else:  # long prefill: blocks of queries, each against the keys it can see; never a T x T matrix
            outs = []
            for t0 in range(0, T, ATTN_CHUNK):
                t1 = min(T, t0 + ATTN_CHUNK)
                s_end = int(pos[:, t1 - 1].max()) + 1  # causal: later keys are masked for this block anyway
                outs.append(attend(q[:, t0:t1], k[:, :, :s_end], v[:, :, :s_end], mask[..., t0:t1, :s_end],
                                   self.scale, self.softcap))
            out = torch.cat(outs, dim=1)
        return self.wo(out)


ATTN_CHUNK = 512  # queries per attention block in long prefills


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float, softcap: float) -> Tensor:
    """q [B, T, H, Hd], k/v [B, K, S, Hd], mask [B, 1, 1, T, S] -> [B, T, H * Hd].

    Scores are scaled, soft-capped (cap * tanh(s / cap)), then masked by replacement with -1e30,
    and softmaxed in float32, as in the reference."""
    B, T, H, Hd = q.shape
    n_kv = k.shape[1]
    G = H // n_kv
    # Contiguous query-head groups share a KV head: fold G into the query axis, no K/V copy.
    q = q.transpose(1, 2).reshape(B, n_kv, G * T, Hd)  # [B, K, G*T, Hd]
    scores = (q @ k.transpose(-1, -2)).float() * scale  # [B, K, G*T, S]
    scores = softcap * torch.tanh(scores / softcap)
    scores = scores.view(B, n_kv, G, T, -1).masked_fill(~mask, -1e30)  # [B, K, G, T, S]
    probs = torch.softmax(scores, dim=-1).to(v.dtype).view(B, n_kv, G * T, -1)
    out = (probs @ v).view(B, H, T, Hd)
    return out.transpose(1, 2).reshape(B, T, H * Hd)


# An expert-weight getter maps expert ids (a tensor of any shape, or an int) to the dense
# (w1 [.., F, D], w2 [.., D, F], w3 [.., F, D]) of those experts in the given dtype.
WeightGetter = Callable[[Tensor | int, torch.dtype], tuple[Tensor, Tensor, Tensor]]


def experts_gather(get: WeightGetter, x_ND: Tensor, idx_NA: Tensor, gate_NA: Tensor) -> Tensor:
    """Few tokens (decode): gather each token's chosen experts' weights and apply them."""
    w1, w2, w3 = get(idx_NA, x_ND.dtype)  # [N, A, F, D], [N, A, D, F], [N, A, F, D]
    h_NAF = F.gelu(torch.einsum("nd,nafd->naf", x_ND, w1), approximate="tanh")
    h_NAF = h_NAF * torch.einsum("nd,nafd->naf", x_ND, w3)
    y_NAD = torch.einsum("naf,nadf->nad", h_NAF, w2)
    return torch.einsum("nad,na->nd", y_NAD, gate_NA)


def experts_sorted(get: WeightGetter, x_ND: Tensor, idx_NA: Tensor, gate_NA: Tensor, n_experts: int) -> Tensor:
    """Many tokens (prefill): group (token, slot) rows by expert so each expert is applied once."""
    A = idx_NA.shape[1]
    order = idx_NA.flatten().argsort(stable=True)  # [N*A] rows sorted by expert
    counts = torch.bincount(idx_NA.flatten(), minlength=n_experts).tolist()
    token = order // A  # [N*A] which token each sorted row belongs to
    outs = []
    for e, x_e in enumerate(x_ND[token].split(counts)):
        if x_e.shape[0]:
            w1, w2, w3 = get(e, x_ND.dtype)  # [F, D], [D, F], [F, D]
            outs.append(F.linear(F.gelu(F.linear(x_e, w1), approximate="tanh") * F.linear(x_e, w3), w2))
    y_RD = torch.cat(outs) * gate_NA.flatten()[order, None]  # [N*A, D]
    return torch.zeros_like(x_ND).index_add_(0, token, y_RD)


def route_to_experts(get: WeightGetter, x_ND: Tensor, idx_NA: Tensor, gate_NA: Tensor, n_experts: int) -> Tensor:
    if idx_NA.numel() < n_experts:
        return experts_gather(get, x_ND, idx_NA, gate_NA)
    return experts_sorted(get, x_ND, idx_NA, gate_NA, n_experts)


class Experts(nn.Module):
    """E GELU-gated FFNs, stacked: out = (gelu(x @ w1^T) * (x @ w3^T)) @ w2^T.

    w1 = reference `moe/linear` (gate, gelu branch), w3 = `moe/linear_v` (up), w2 = `moe/linear_1` (down).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_experts = cfg.n_experts
        self.w1 = nn.Parameter(torch.empty(cfg.n_experts, cfg.ffn_dim, cfg.dim))  # [E, F, D]
        self.w2 = nn.Parameter(torch.empty(cfg.n_experts, cfg.dim, cfg.ffn_dim))  # [E, D, F]
        self.w3 = nn.Parameter(torch.empty(cfg.n_experts, cfg.ffn_dim, cfg.dim))  # [E, F, D]

    def expert_weights(self, idx: Tensor | int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        return self.w1[idx].to(dtype), self.w2[idx].to(dtype), self.w3[idx].to(dtype)

    def forward(self, x_ND: Tensor, idx_NA: Tensor, gate_NA: Tensor) -> Tensor:
        return route_to_experts(self.expert_weights, x_ND, idx_NA, gate_NA, self.n_experts)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_active = cfg.n_active_experts
        self.gate = nn.Linear(cfg.dim, cfg.n_experts, bias=False)  # the router, float32
        self.experts = Experts(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x_ND = x.reshape(-1, x.shape[-1])
        probs_NE = torch.softmax(self.gate(x_ND.float()), dim=-1)  # router in float32 (its weight stays float32)
        # Softmax over all experts first, then top-k; the chosen probabilities are NOT renormalised.
        gate_NA, idx_NA = probs_NE.topk(self.n_active, dim=-1)
        return self.experts(x_ND, idx_NA, gate_NA.to(x.dtype)).view_as(x)


class Block(nn.Module):
    """Sandwich norms: pre- and post-norm around attention and around the MoE, post-norms on the branch."""

    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, layer_id)
        self.attn_post_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.moe_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.moe = MoE(cfg)
        self.moe_post_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, pos: Tensor,
                cache: KVCache | None, kv_len: int, rows: Tensor | None = None) -> Tensor:
        att = self.attention(self.attn_norm(h), cos, sin, mask, pos, cache, kv_len, rows)
        h = h + self.attn_post_norm(att)
        return h + self.moe_post_norm(self.moe(self.moe_norm(h)))


class TiedEmbedding(nn.Module):
    """The [V, D] table: rows are the input embeddings, and its transpose is the output projection."""

    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, dim))

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: embeddings leave here in it, and everything downstream follows."""
        return self.weight.dtype

    def forward(self, tokens: Tensor) -> Tensor:
        return F.embedding(tokens, self.weight)  # [B, T, D]

    def unembed(self, h: Tensor) -> Tensor:
        return F.linear(h, self.weight)  # [.., V]


@dataclass(frozen=True)
class ForwardMeta:
    """What a caller (the engine, a checker) asks of one forward besides the tokens, positions and cache, as
    mistral's input metadata does; none of it changes the arithmetic of a row. All optional."""
    cache_rows: Tensor | None = None  # [B]: batch row b uses cache row cache_rows[b] (default: row b)
    logits_at: Tensor | None = None  # [B]: logits only at this position of each row -> [B, V]
    logits_rows: Tensor | None = None  # [R]: then only these batch rows -> [R, V] (or [R, T, V])
    hidden: list[Tensor] | None = None  # a list: the residual stream after the embedding and each layer is appended


NO_META = ForwardMeta()


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_embeddings = TiedEmbedding(cfg.vocab_size, cfg.dim)  # tied: also the output projection
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def new_cache(self, batch: int, max_seq_len: int) -> KVCache:
        cfg, emb = self.config, self.tok_embeddings
        # The KV heads this model's attention holds: all of them, or a tensor-parallel rank's share of wqkv.
        att = self.layers[0].attention
        rows = getattr(att.wqkv, "out_features", (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim)
        n_kv_heads = rows // (cfg.head_dim * (att.group + 2))
        return KVCache(cfg.n_layers, batch, max_seq_len, n_kv_heads, cfg.head_dim, emb.dtype, self.norm.weight.device)

    def forward(self, tokens: Tensor, start_pos: Tensor | None = None, cache: KVCache | None = None,
                meta: ForwardMeta | None = None) -> Tensor:
        """tokens [B, T] -> logits [B, T, V] (or fewer: see ForwardMeta).

        Without a cache, the T tokens are the whole sequence (positions 0..T-1) and token id 0
        is masked as a key, as in the reference forward. With a cache, row b's tokens sit at
        positions start_pos[b] + 0..T-1 of its cache row and are attended together with the
        cached prefix.
        """
        meta = meta or NO_META
        B, T = tokens.shape
        cfg = self.config
        if start_pos is None:
            start_pos = torch.zeros(B, dtype=torch.long, device=tokens.device)
        pos = start_pos[:, None] + torch.arange(T, device=tokens.device)  # [B, T]
        if cache is None:
            kv_len = T
            key_ok = tokens != cfg.pad_id  # [B, S=T]
            mask = (torch.tril(torch.ones(T, T, dtype=torch.bool, device=tokens.device)) & key_ok[:, None, :])
            mask = mask[:, None, None]  # [B, 1, 1, T, S]
        else:
            kv_len = int(pos.max()) + 1
            mask = cache.attention_mask(tokens, pos, cfg.pad_id, kv_len, meta.cache_rows)
        cos, sin = rope_cos_sin(pos, cfg.head_dim, cfg.rope_base)
        h = self.tok_embeddings(tokens) * cfg.embedding_multiplier  # [B, T, D], in the compute dtype
        if meta.hidden is not None:
            meta.hidden.append(h)
        for layer in self.layers:
            h = layer(h, cos, sin, mask, pos, cache, kv_len, meta.cache_rows)
            if meta.hidden is not None:
                meta.hidden.append(h)
        if meta.logits_at is not None:
            h = h[torch.arange(B, device=h.device), meta.logits_at]  # [B, D]
        if meta.logits_rows is not None:
            h = h[meta.logits_rows]  # [R, ...]
        return self.tok_embeddings.unembed(self.norm(h)) * cfg.output_multiplier  # [.., V], tied


def init_weights(model: Transformer, generator: torch.Generator | None = None) -> None:
    """Random initialisation for tests, benchmarks and training from scratch: N(0, 1/fan_in) matrices,
    N(0, 1/D) embeddings (the input multiplier sqrt(D) brings them to unit scale), unit norm scales."""
    D = model.config.dim
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name == "tok_embeddings.weight":
                p.normal_(0.0, D**-0.5, generator=generator)
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5, generator=generator)  # fan_in = last axis
