"""The compiled int8 CPU kernel against the plain-torch dequantise-then-matmul path."""

import pytest
import torch
from conftest import small_config

from grok1 import kernels
from grok1.model import Transformer, init_weights
from grok1.quant import dequantize, quantize, quantize_model


@pytest.fixture(scope="module")
def ops():
    if kernels.int8_ops() is None:
        pytest.skip("int8 CPU kernel could not be compiled here (the fallback path is what runs)")
    return kernels.int8_ops()


@pytest.mark.parametrize("M", [1, 2, 3, 5, 15, 16, 40])
@pytest.mark.parametrize("N,K,G", [(96, 64, 1), (40, 256, 8), (7, 48, 8), (130, 33, 1)])
def test_int8_linear_matches_dequantised_matmul(ops, M, N, K, G):
    g = torch.Generator().manual_seed(M * 1000 + N)
    q, s = quantize(torch.randn(N, K, generator=g), G)
    x = torch.randn(M, K, generator=g)
    ref = x.double() @ dequantize(q, s, torch.float32).double().T
    y = kernels.int8_linear(x, q, s)
    assert y.dtype == torch.float32 and y.shape == (M, N)
    torch.testing.assert_close(y.double(), ref, atol=1e-4, rtol=1e-5)


def test_kernel_does_not_apply_to_bf16(ops):
    q, s = quantize(torch.randn(8, 16))
    assert kernels.int8_linear(torch.randn(2, 16, dtype=torch.bfloat16), q, s) is None


@pytest.mark.parametrize("batch,T", [(1, 1), (3, 1), (2, 9), (1, 40)])
def test_int8_model_kernel_equals_fallback(ops, monkeypatch, batch, T):
    """Whole int8 model (attention, routed experts, all paths): compiled kernel vs pure torch."""
    cfg = small_config()
    model = Transformer(cfg)
    init_weights(model, torch.Generator().manual_seed(0))
    quantize_model(model)
    tokens = torch.randint(1, cfg.vocab_size, (batch, T))
    with torch.no_grad():
        fast = model(tokens)
        monkeypatch.setattr(kernels, "int8_linear", lambda *a: None)
        slow = model(tokens)
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)
