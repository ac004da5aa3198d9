"""int8 weights: the release's quantisation, bit-exact dequantisation, and int8 modules in the model."""

import torch
from conftest import small_config

from grok1.model import Transformer, init_weights
from grok1.quant import QExperts, QLinear, dequantize, quantize, quantize_model


def test_dequantize_by_hand_with_groups():
    q = torch.tensor([[1, -2, 3, -4], [127, 0, -127, 5]], dtype=torch.int8)  # [out 2, in 4]
    s = torch.tensor([[0.5, 2.0], [0.25, 1.5]], dtype=torch.bfloat16)  # [groups 2, out 2]
    expect = torch.tensor([[0.5, -1.0, 0.75, -1.0], [254.0, 0.0, -190.5, 7.5]])
    assert torch.equal(dequantize(q, s, torch.float32), expect)


def test_bf16_dequantisation_is_bf16_of_int8_times_scale():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (64, 32), dtype=torch.int8, generator=g)
    s = (torch.rand(4, 64, generator=g) * 0.05).to(torch.bfloat16)
    ref = q.to(torch.bfloat16) * s.transpose(0, 1).repeat_interleave(8, dim=1)  # computed in bf16, as the reference
    assert torch.equal(dequantize(q, s, torch.bfloat16), ref)


def test_quantize_follows_release_recipe():
    w = torch.tensor([[0.1, -0.2, 0.3, -1.27], [2.54, 0.0, 0.01, -0.02]])
    q, s = quantize(w, groups=2)
    assert s.dtype == torch.bfloat16 and s.shape == (2, 2)
    expect_s = torch.tensor([[0.2, 2.54], [1.27, 0.02]]) / 127
    assert torch.equal(s, expect_s.to(torch.bfloat16))
    # Round trip error is at most half a quantisation step (scale rounding to bf16 aside).
    err = (dequantize(q, s, torch.float32) - w).abs()
    step = s.float().transpose(0, 1).repeat_interleave(2, dim=1)
    assert (err <= 0.5 * step * 1.01 + 1e-6).all()
    assert q.abs().max() <= 127


def test_int8_model_close_to_float_and_keeps_int8():
    cfg = small_config()
    model = Transformer(cfg)
    init_weights(model, torch.Generator().manual_seed(0))
    tokens = torch.randint(1, cfg.vocab_size, (2, 10))
    with torch.no_grad():
        ref = model(tokens)
        quantize_model(model)
        out = model(tokens)
    att, ex = model.layers[0].attention, model.layers[0].moe.experts
    assert isinstance(att.wqkv, QLinear) and att.wqkv.weight.dtype == torch.int8
    assert isinstance(ex, QExperts) and ex.w1.dtype == torch.int8
    assert att.wo.scales.shape[0] == 8 and ex.s2.shape[1] == 8  # the release's scale groups
    rel = (out - ref).abs().max() / ref.abs().max()
    assert rel < 0.05
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8


def test_int8_embedding_is_close_and_int8():
    from grok1.quant import QEmbedding, quantize_embedding

    cfg = small_config()
    model = Transformer(cfg)
    init_weights(model, torch.Generator().manual_seed(0))
    tokens = torch.randint(1, cfg.vocab_size, (2, 6))
    with torch.no_grad():
        ref = model(tokens)
        quantize_embedding(model)
        out = model(tokens)
    assert isinstance(model.tok_embeddings, QEmbedding) and model.tok_embeddings.weight.dtype == torch.int8
    assert (out - ref).abs().max() / ref.abs().max() < 0.05
