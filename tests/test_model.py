"""The network against independent oracles: literal loops written from GROK1.md, and itself uncached."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import small_config

from grok1.model import ForwardMeta, Transformer, apply_rope, experts_gather, experts_sorted, init_weights, rope_cos_sin


def literal_moe(x, moe):
    """mistral-style oracle: softmax over all experts, top-k, un-renormalised gates, one token at a time."""
    ex = moe.experts
    out = torch.zeros_like(x)
    probs = torch.softmax(x.float() @ moe.gate.weight.float().T, dim=-1)
    for t in range(x.shape[0]):
        chosen = sorted(range(probs.shape[1]), key=lambda e: -probs[t, e].item())[: moe.n_active]
        for e in chosen:
            h = F.gelu(ex.w1[e] @ x[t], approximate="tanh") * (ex.w3[e] @ x[t])
            out[t] += probs[t, e] * (ex.w2[e] @ h)
    return out


def literal_attention(x, att, cfg):
    """Per-head loop over the reference's steps: RoPE at positions 0..T-1, scale, soft-cap, causal mask."""
    T = x.shape[0]
    Hd, H, K = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    qkv = x @ att.wqkv.weight.T
    q, k, v = qkv.split([H * Hd, K * Hd, K * Hd], dim=-1)
    pos = torch.arange(T)
    out = []
    for n in range(H):
        kv = n // (H // K)  # contiguous groups
        qs, ks, vs = q[:, n * Hd:(n + 1) * Hd], k[:, kv * Hd:(kv + 1) * Hd], v[:, kv * Hd:(kv + 1) * Hd]
        inv = torch.tensor([1 / cfg.rope_base ** (2 * j / Hd) for j in range(Hd // 2)])
        ph = torch.cat([pos[:, None] * inv, pos[:, None] * inv], -1)
        rot = lambda z: z * ph.cos() + torch.cat([-z[:, Hd // 2:], z[:, :Hd // 2]], -1) * ph.sin()  # noqa: E731
        s = rot(qs) @ rot(ks).T * cfg.attn_scale
        s = 30.0 * torch.tanh(s / 30.0)
        s = s.masked_fill(~torch.tril(torch.ones(T, T, dtype=torch.bool)), -1e30)
        out.append(torch.softmax(s, -1) @ vs)
    return torch.cat(out, -1) @ att.wo.weight.T


def test_attention_matches_literal_per_head_loop(small_model):
    cfg = small_model.config
    att = small_model.layers[0].attention
    x = torch.randn(9, cfg.dim) * 3
    pos = torch.arange(9)[None]
    cos, sin = rope_cos_sin(pos, cfg.head_dim, cfg.rope_base)
    mask = torch.tril(torch.ones(9, 9, dtype=torch.bool))[None, None, None]
    with torch.no_grad():
        ours = att(x[None], cos, sin, mask, pos, None, 9)[0]
        ref = literal_attention(x, att, cfg)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)


def test_softcap_bounds_logits():
    # With a huge QK scale every logit saturates at +-30: attention becomes (nearly) hard argmax but finite.
    cfg = small_config(attn_scale=1e6)
    model = Transformer(cfg)
    init_weights(model, torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(torch.randint(1, cfg.vocab_size, (1, 6)))
    assert torch.isfinite(out).all()


def test_rope_rotate_half_by_hand():
    # Head dim 4: pairs (0, 2) and (1, 3); inv_freq = [1, 1/base^(1/2)].
    x = torch.tensor([[[[1.0, 2.0, 3.0, 4.0]]]])
    cos, sin = rope_cos_sin(torch.tensor([[3]]), 4, 100.0)
    y = apply_rope(x, cos, sin)[0, 0, 0]
    a0, a1 = 3.0, 3.0 / 10.0
    expect = [1 * math.cos(a0) - 3 * math.sin(a0), 2 * math.cos(a1) - 4 * math.sin(a1),
              3 * math.cos(a0) + 1 * math.sin(a0), 4 * math.cos(a1) + 2 * math.sin(a1)]
    torch.testing.assert_close(y, torch.tensor(expect))


@pytest.mark.parametrize("n_tokens", [1, 3, 40])
@pytest.mark.parametrize("experts,active", [(8, 2), (4, 1), (6, 3)])
def test_moe_paths_match_literal_loop(n_tokens, experts, active):
    cfg = small_config(n_experts=experts, n_active_experts=active)
    model = Transformer(cfg)
    init_weights(model, torch.Generator().manual_seed(7))
    moe = model.layers[0].moe
    x = torch.randn(n_tokens, cfg.dim)
    with torch.no_grad():
        ref = literal_moe(x, moe)
        torch.testing.assert_close(moe(x), ref, atol=1e-5, rtol=1e-4)
        probs = torch.softmax(x @ moe.gate.weight.T, -1)
        gate, idx = probs.topk(active, -1)
        get = moe.experts.expert_weights
        torch.testing.assert_close(experts_gather(get, x, idx, gate), ref, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(experts_sorted(get, x, idx, gate, experts), ref, atol=1e-5, rtol=1e-4)


def test_router_gates_are_not_renormalised(small_model):
    moe = small_model.layers[0].moe
    x = torch.randn(5, small_model.config.dim)
    seen = {}
    moe.experts.register_forward_hook(lambda mod, args, out: seen.update(gate=args[2]))
    with torch.no_grad():
        moe(x)
    probs = torch.softmax(x @ moe.gate.weight.T, -1)
    torch.testing.assert_close(seen["gate"], probs.topk(2, -1).values)
    assert (seen["gate"].sum(-1) < 1).all()


def test_cached_decode_equals_full_recompute(small_model):
    torch.manual_seed(3)
    tokens = torch.randint(1, small_model.config.vocab_size, (2, 12))
    with torch.no_grad():
        full = small_model(tokens)
        cache = small_model.new_cache(2, 32)
        parts = [small_model(tokens[:, :5], torch.tensor([0, 0]), cache)]
        for t in range(5, 12):
            parts.append(small_model(tokens[:, t:t + 1], torch.tensor([t, t]), cache))
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-4, rtol=1e-4)


def test_pad_token_is_never_attended(small_model):
    # Token id 0 is padding: as a key it is masked, so what follows it does not depend on its embedding row.
    tokens = torch.tensor([[5, 0, 7, 9]])
    with torch.no_grad():
        a = small_model(tokens)
        small_model.tok_embeddings.weight[0] += 10.0
        b = small_model(tokens)
        c_cache = small_model.new_cache(1, 8)
        c = torch.cat([small_model(tokens[:, :2], torch.tensor([0]), c_cache),
                       small_model(tokens[:, 2:], torch.tensor([2]), c_cache)], 1)
    # Column 0 of the logits is the (changed) pad row of the tied embedding itself; skip it.
    torch.testing.assert_close(a[0, 2:, 1:], b[0, 2:, 1:])
    torch.testing.assert_close(c[0, 2:], b[0, 2:], atol=1e-4, rtol=1e-4)


def test_logits_at_selects_rows(small_model):
    tokens = torch.randint(1, 512, (3, 6))
    at = torch.tensor([5, 0, 3])
    with torch.no_grad():
        full = small_model(tokens)
        picked = small_model(tokens, meta=ForwardMeta(logits_at=at))
    torch.testing.assert_close(picked, full[torch.arange(3), at])


def test_output_uses_tied_embedding_and_multipliers(small_model):
    cfg = small_model.config
    tokens = torch.tensor([[11]])
    with torch.no_grad():
        hidden = []
        logits = small_model(tokens, meta=ForwardMeta(hidden=hidden))
        h = small_model.norm(hidden[-1])
        expect = h @ small_model.tok_embeddings.weight.T * cfg.output_multiplier
    torch.testing.assert_close(hidden[0][0, 0], small_model.tok_embeddings.weight[11] * cfg.embedding_multiplier)
    torch.testing.assert_close(logits, expect)


def test_cache_rows_select_slots(small_model):
    """Rows of a shared cache can be driven independently (continuous batching): same results as alone."""
    torch.manual_seed(5)
    a, b = torch.randint(1, 512, (1, 6)), torch.randint(1, 512, (1, 4))
    with torch.no_grad():
        ref_a, ref_b = small_model(a), small_model(b)
        cache = small_model.new_cache(4, 16)
        pa = small_model(a[:, :5], torch.tensor([0]), cache, ForwardMeta(cache_rows=torch.tensor([2])))
        pb = small_model(b[:, :3], torch.tensor([0]), cache, ForwardMeta(cache_rows=torch.tensor([0])))
        step = small_model(torch.tensor([[a[0, 5]], [b[0, 3]]]), torch.tensor([5, 3]), cache,
                           ForwardMeta(cache_rows=torch.tensor([2, 0])))
    torch.testing.assert_close(torch.cat([pa[0], step[0]]), ref_a[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.cat([pb[0], step[1]]), ref_b[0], atol=1e-4, rtol=1e-4)


def test_long_prefill_in_query_blocks_equals_one_block(small_model, monkeypatch):
    import grok1.model as model_module

    cfg = small_model.config
    tokens = torch.randint(1, cfg.vocab_size, (2, 70))
    tokens[1, 50:] = 0  # right padding: masked keys
    with torch.no_grad():
        whole = small_model(tokens)
        cache = small_model.new_cache(2, 100)
        cached_whole = small_model(tokens[:, :40], torch.tensor([0, 0]), cache)
        monkeypatch.setattr(model_module, "ATTN_CHUNK", 16)  # 70 tokens -> blocks of 16
        blocked = small_model(tokens)
        cache = small_model.new_cache(2, 100)
        cached_blocked = small_model(tokens[:, :40], torch.tensor([0, 0]), cache)
    torch.testing.assert_close(blocked, whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cached_blocked, cached_whole, atol=1e-5, rtol=1e-5)
