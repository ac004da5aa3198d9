"""The compiled attention kernel (csrc/attention.cpp, kernels.CompiledAttention) against the model's own
torch attention: same cache writes, same outputs within float32 rounding, and batch-independent results."""

import pytest
import torch
from conftest import small_config

from grok1 import kernels
from grok1.model import Attention, ForwardMeta, KVCache, RMSNorm, Transformer, init_weights, rope_cos_sin


@pytest.fixture(scope="module")
def ops():
    if kernels.cpu_ops() is None:
        pytest.skip("the CPU kernel could not be compiled here (the fallback path is what runs)")
    return kernels.cpu_ops()


def attention_pair(H, K, Hd, seed=0):
    """A plain Attention and a CompiledAttention with the same random weights."""
    cfg = small_config(n_heads=H, n_kv_heads=K, head_dim=Hd, dim=32)
    torch.manual_seed(seed)
    plain = Attention(cfg, layer_id=1)
    fast = Attention(cfg, layer_id=1)
    fast.load_state_dict(plain.state_dict())
    fast = kernels.CompiledAttention(fast)
    return cfg, plain, fast


def filled_cache(cfg, B, S, seed, pad_every=0):
    """A cache with random keys/values in every row and position; every pad_every-th position is a pad token."""
    g = torch.Generator().manual_seed(seed)
    cache = KVCache(2, B, S, cfg.n_kv_heads, cfg.head_dim, torch.float32)
    cache.k.normal_(generator=g)
    cache.v.normal_(generator=g)
    cache.valid.fill_(True)
    if pad_every:
        cache.valid[:, ::pad_every] = False
    return cache


def run(att, cfg, cache, x, pos, rows):
    """One call of `att` for one token per row: x [N, 1, D], pos [N], rows [N] (the mask as the model builds it)."""
    tokens = torch.ones(x.shape[0], 1, dtype=torch.long)
    valid = cache.valid.clone()
    kv_len = int(pos.max()) + 1
    mask = cache.attention_mask(tokens, pos[:, None], cfg.pad_id, kv_len, rows)
    cache.valid.copy_(valid)  # attention_mask marked this call's positions valid; keep the test's own pattern
    mask = (torch.arange(kv_len)[None, None, :] <= pos[:, None, None]) & cache.valid[rows, :kv_len][:, None, :]
    cos, sin = rope_cos_sin(pos[:, None], cfg.head_dim, cfg.rope_base)
    with torch.no_grad():
        return att(x, cos, sin, mask[:, None, None], pos[:, None], cache, kv_len, rows)


@pytest.mark.parametrize("H,K,Hd", [(8, 2, 32), (4, 4, 16), (6, 2, 12), (16, 8, 8)])
def test_matches_torch_attention_and_writes_the_same_cache(ops, H, K, Hd):
    cfg, plain, fast = attention_pair(H, K, Hd)
    B, S = 6, 40
    c_plain, c_fast = filled_cache(cfg, B, S, 1, pad_every=7), filled_cache(cfg, B, S, 1, pad_every=7)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 1, cfg.dim, generator=g)
    pos = torch.tensor([3, 17, 39, 9])  # rows of different lengths in one call
    rows = torch.tensor([5, 0, 2, 3])
    want = run(plain, cfg, c_plain, x, pos, rows)
    got = run(fast, cfg, c_fast, x, pos, rows)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert torch.equal(c_fast.k, c_plain.k) and torch.equal(c_fast.v, c_plain.v)  # RoPE'd keys bit for bit


def test_a_query_gets_the_same_bits_whatever_else_is_in_the_call(ops):
    """Continuous batching: a row's output does not depend on the other rows (nor on their longer kv_len)."""
    H, K, Hd, B, S = 8, 2, 32, 5, 64
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(B, (H + 2 * K) * Hd, generator=g)
    pos = torch.tensor([12, 30, 5, 63, 20])
    rows = torch.tensor([1, 4, 0, 3, 2])
    cos, sin = (t.view(B, Hd) for t in rope_cos_sin(pos[:, None], Hd, 10000.0))

    def call(i):  # queries i (a slice) on a fresh copy of the same cache
        cache = filled_cache(small_config(n_heads=H, n_kv_heads=K, head_dim=Hd), S, S, 4)
        return ops.decode_attention(qkv[i], cos[i], sin[i], pos[i], rows[i], cache.k[1], cache.v[1], cache.valid,
                                    int(pos[i].max()) + 1, 0.125, 30.0)

    together = call(slice(None))
    for i in range(B):
        assert torch.equal(call(slice(i, i + 1)), together[i : i + 1]), f"row {i}"


def test_keys_after_the_query_are_never_used(ops):
    """Keys are scored in whole blocks, reading past a query's own position (and its kv_len) up to the end of
    the cache row: whatever those positions hold, NaN included, the output is the same bits."""
    H, K, Hd, S = 8, 2, 32, 13  # S is not a whole number of blocks
    pos, rows = torch.tensor([4, 12, 9, 0]), torch.tensor([0, 1, 2, 3])
    g = torch.Generator().manual_seed(9)
    qkv = torch.randn(4, (H + 2 * K) * Hd, generator=g)
    cos, sin = (t.view(4, Hd) for t in rope_cos_sin(pos[:, None], Hd, 10000.0))
    outs = []
    for poison in (False, True):
        cache = filled_cache(small_config(n_heads=H, n_kv_heads=K, head_dim=Hd), 4, S, 10)
        if poison:
            for p, r in zip(pos.tolist(), rows.tolist()):
                cache.k[:, r, :, p + 1:] = float("nan")
                cache.v[:, r, :, p + 1:] = float("nan")
        outs.append(ops.decode_attention(qkv, cos, sin, pos, rows, cache.k[1], cache.v[1], cache.valid, S, 0.125, 30.0))
    assert not outs[0].isnan().any()
    assert torch.equal(outs[0], outs[1])


def test_tokens_of_one_row_in_one_call_see_each_other(ops):
    """A prompt riding along as one-token rows: each token attends to the ones before it, written in the same call."""
    cfg, plain, fast = attention_pair(4, 2, 16)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 1, cfg.dim, generator=g)
    pos, rows = torch.tensor([0, 1, 2]), torch.tensor([1, 1, 1])
    c_plain, c_fast = filled_cache(cfg, 2, 8, 6), filled_cache(cfg, 2, 8, 6)
    got = run(fast, cfg, c_fast, x, pos, rows)
    # The plain path as a prefill of the 3 tokens in one row (its causal mask does the same job).
    cos, sin = rope_cos_sin(pos[None], cfg.head_dim, cfg.rope_base)
    mask = (torch.arange(3)[None, :] <= torch.arange(3)[:, None])[None, None, None]
    with torch.no_grad():
        want = plain(x.view(1, 3, -1), cos, sin, mask, pos[None], c_plain, 3, torch.tensor([1]))
    torch.testing.assert_close(got.view(1, 3, -1), want, atol=2e-5, rtol=1e-4)


def test_all_keys_masked_is_the_reference_uniform_average(ops):
    """Every visible key a pad token: masked scores are -1e30 in the reference, so the softmax is uniform over kv_len."""
    cfg, plain, fast = attention_pair(4, 2, 16)
    c_plain, c_fast = filled_cache(cfg, 2, 16, 7), filled_cache(cfg, 2, 16, 7)
    for c in (c_plain, c_fast):
        c.valid[0] = False
    x = torch.randn(2, 1, cfg.dim, generator=torch.Generator().manual_seed(8))
    pos, rows = torch.tensor([4, 9]), torch.tensor([0, 1])
    torch.testing.assert_close(run(fast, cfg, c_fast, x, pos, rows), run(plain, cfg, c_plain, x, pos, rows),
                               atol=2e-5, rtol=1e-4)


def test_model_decode_with_the_kernel_matches_the_plain_model(ops):
    cfg = small_config()
    plain = Transformer(cfg)
    init_weights(plain, torch.Generator().manual_seed(0))
    fast = Transformer(cfg)
    fast.load_state_dict(plain.state_dict())
    kernels.install(fast)
    assert all(isinstance(layer.attention, kernels.CompiledAttention) for layer in fast.layers)
    prompts = torch.randint(3, cfg.vocab_size, (3, 9), generator=torch.Generator().manual_seed(1))
    rows = torch.tensor([2, 0, 3])
    caches = [m.new_cache(4, 32) for m in (plain, fast)]
    with torch.no_grad():
        outs = [m(prompts, torch.zeros(3, dtype=torch.long), c, ForwardMeta(cache_rows=rows)) for m, c in zip((plain, fast), caches)]
        torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)  # prefill: plain attention, compiled norms
        tokens, pos = outs[0][:, -1].argmax(-1), torch.full((3,), 9)
        for _ in range(12):
            a, b = (m(tokens[:, None], pos, c, ForwardMeta(cache_rows=rows))[:, 0] for m, c in zip((plain, fast), caches))
            torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
            tokens, pos = a.argmax(-1), pos + 1


def test_falls_back_where_the_kernel_does_not_apply(ops):
    """bfloat16 activations and gradients take the model's own path (the results are the plain module's, exactly)."""
    cfg, plain, fast = attention_pair(4, 2, 16)
    for att in (plain, fast):
        att.to(torch.bfloat16)
    c_plain, c_fast = (KVCache(2, 2, 8, 2, 16, torch.bfloat16) for _ in range(2))
    x = torch.randn(2, 1, cfg.dim, dtype=torch.bfloat16)
    pos, rows = torch.tensor([0, 0]), torch.tensor([0, 1])
    cos, sin = rope_cos_sin(pos[:, None], 16, cfg.rope_base)
    mask = torch.ones(2, 1, 1, 1, 1, dtype=torch.bool)
    with torch.no_grad():
        assert torch.equal(fast(x, cos, sin, mask, pos[:, None], c_fast, 1, rows),
                           plain(x, cos, sin, mask, pos[:, None], c_plain, 1, rows))
    assert not kernels.attention_applies(x, c_fast)
    assert not kernels.attention_applies(torch.randn(2, 3, cfg.dim), filled_cache(cfg, 2, 8, 0))  # T > 1


@pytest.mark.parametrize("shape", [(1, 1, 256), (16, 1, 256), (3, 5, 37), (2, 6144)])
def test_rms_norm_kernel_matches_torch_and_each_row_stands_alone(ops, shape):
    g = torch.Generator().manual_seed(shape[-1])
    x = torch.randn(*shape, generator=g) * 3
    norm = RMSNorm(shape[-1], 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(shape[-1], generator=g) + 0.5)
        want = norm(x)
        norm = kernels.CompiledRMSNorm(norm)
        got = norm(x)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        rows = x.reshape(-1, shape[-1])
        alone = torch.cat([norm(rows[i : i + 1]) for i in range(rows.shape[0])])
        assert torch.equal(alone, got.reshape(-1, shape[-1]))


def test_rms_norm_kernel_leaves_training_to_torch(ops):
    """With gradients wanted (for x or for the scale), the compiled op (no backward) is not used."""
    norm = RMSNorm(8, 1e-5)
    norm = kernels.CompiledRMSNorm(norm)
    x = torch.randn(2, 8)
    norm(x).sum().backward()  # x needs no grad, the scale does
    assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0
    x.requires_grad_(True)
    norm(x).sum().backward()
    assert x.grad is not None


def test_install_swaps_every_norm_and_attention(ops):
    model = Transformer(small_config())
    kernels.install(model)
    kinds = {type(m) for m in model.modules()}
    assert RMSNorm not in kinds and Attention not in kinds
    assert kernels.CompiledRMSNorm in kinds and kernels.CompiledAttention in kinds


def test_install_replaces_modules_keeping_their_parameters_and_settings():
    """The compiled modules hold the very parameters and submodules of the ones they replace, and every setting
    (a new attribute of model.Attention or RMSNorm that they failed to take over would show here)."""
    model = Transformer(small_config()).eval()
    before = dict(model.named_modules())
    params = dict(model.named_parameters())
    kernels.install(model)
    replaced = 0
    for name, module in model.named_modules():
        old = before[name]
        if module is not old:
            replaced += 1
            assert {k: v for k, v in vars(module).items() if not k.startswith("_")} == \
                {k: v for k, v in vars(old).items() if not k.startswith("_")}
            assert dict(module.named_children()) == dict(old.named_children())
            assert dict(module.named_parameters()).keys() == dict(old.named_parameters()).keys()
    assert replaced == 5 * small_config().n_layers + 1  # per layer 4 norms and the attention; the final norm
    assert dict(model.named_parameters()).keys() == params.keys()
    assert all(p is params[n] for n, p in model.named_parameters())
    assert not model.training


def test_install_keeps_the_hooks_on_a_module():
    """Tensor parallelism sums each attention's output with a forward hook (parallel/tp.py): it must still run."""
    model = Transformer(small_config())
    init_weights(model, torch.Generator().manual_seed(7))  # weights as built are uninitialised memory
    model.eval()
    seen = []
    model.layers[0].attention.register_forward_hook(lambda _m, _a, out: seen.append(out.shape) or out * 2)
    tokens = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        want = model(tokens)
        kernels.install(model)
        got = model(tokens)
    assert isinstance(model.layers[0].attention, kernels.CompiledAttention) and len(seen) == 2
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
