"""The compiled CPU matmul kernel against the plain-torch dequantise-then-matmul path, every format."""

import pytest
import torch
from conftest import small_config

from grok1 import kernels
from grok1.model import Transformer, init_weights
from grok1.quant import FORMATS, pack, quantize_model, unpack


@pytest.fixture(scope="module")
def ops():
    if kernels.cpu_ops() is None:
        pytest.skip("the CPU kernel could not be compiled here (the fallback path is what runs)")
    return kernels.cpu_ops()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("M", [1, 2, 3, 5, 15, 16, 40])
@pytest.mark.parametrize("N,K,G", [(96, 64, 1), (40, 256, 8), (7, 96, 8), (130, 32, 1)])
def test_linear_matches_dequantised_matmul(ops, fmt, M, N, K, G):
    g = torch.Generator().manual_seed(M * 1000 + N)
    w, s = pack(torch.randn(N, K, generator=g), fmt, G)
    x = torch.randn(M, K, generator=g)
    ref = x.double() @ unpack(w, s, torch.float32).double().T
    y = kernels.linear(x, w, s)
    assert y.dtype == torch.float32 and y.shape == (M, N)
    torch.testing.assert_close(y.double(), ref, atol=1e-4, rtol=1e-5)


def test_odd_sizes_use_the_scalar_tail(ops):
    for fmt in ("int8", "bf16", "fp32"):
        w, s = pack(torch.randn(9, 37), fmt, 1)
        x = torch.randn(3, 37)
        torch.testing.assert_close(kernels.linear(x, w, s), x @ unpack(w, s, torch.float32).T, atol=1e-4, rtol=1e-5)


def test_kernel_does_not_apply_to_bf16_activations(ops):
    w, s = pack(torch.randn(8, 32), "int8")
    assert kernels.linear(torch.randn(2, 32, dtype=torch.bfloat16), w, s) is None


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("batch,T", [(1, 1), (3, 1), (2, 9), (1, 40)])
def test_model_kernel_equals_fallback(ops, monkeypatch, fmt, batch, T):
    """Whole model (attention, routed experts, all paths) in each format: compiled kernel vs pure torch."""
    cfg = small_config()
    model = Transformer(cfg)
    init_weights(model, torch.Generator().manual_seed(0))
    quantize_model(model, fmt)
    tokens = torch.randint(1, cfg.vocab_size, (batch, T))
    with torch.no_grad():
        fast = model(tokens)
        monkeypatch.setattr(kernels, "linear", lambda *a: None)
        slow = model(tokens)
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)


def test_prefill_gemm_under_inference_mode(ops):
    """The tiled GEMM runs ATen in OpenMP workers: they must inherit inference mode (this crashed once)."""
    w, s = pack(torch.randn(300, 64), "int8", 8)
    with torch.inference_mode():
        x = torch.randn(40, 64)
        y = kernels.linear(x, w, s)
    torch.testing.assert_close(y, x @ unpack(w, s, torch.float32).T, atol=1e-4, rtol=1e-5)


def test_backward_through_stored_weights_takes_the_torch_path(ops):
    """The compiled op has no backward: with gradients flowing into x, torch's path is used (this crashed once)."""
    w, s = pack(torch.randn(12, 32), "int8")
    x = torch.randn(3, 32, requires_grad=True)
    from grok1.quant import QLinear

    layer = QLinear(32, 12)
    layer.weight, layer.scales = w, s
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, unpack(w, s, torch.float32).sum(0).expand(3, -1))


@pytest.mark.parametrize("fmt,N,K,G", [(fmt, *shape) for fmt in FORMATS
                                        for shape in [(50, 344, 8), (37, 256, 1), (24, 96, 3)]
                                        if not (fmt == "int4" and shape[1] % 32)])  # int4: K in 32-blocks
def test_each_row_is_bit_identical_whatever_else_is_in_the_call(ops, fmt, N, K, G):
    """Below the GEMM threshold, row m of a batch equals the same row computed alone, bit for bit (this is
    what makes continuous batching give each request the tokens it would get alone)."""
    g = torch.Generator().manual_seed(N + K)
    w, s = pack(torch.randn(N, K, generator=g), fmt, G if fmt == "int8" else 1)
    x = torch.randn(kernels.GEMM_MIN_ROWS - 1, K, generator=g)
    alone = torch.cat([kernels.linear(x[m : m + 1], w, s) for m in range(x.shape[0])])
    for M in (2, 3, 4, 5, 8, 16, kernels.GEMM_MIN_ROWS - 1):
        assert torch.equal(kernels.linear(x[:M], w, s), alone[:M]), f"M={M}"
    torch.testing.assert_close(alone.double(), x.double() @ unpack(w, s, torch.float32).double().T,
                               atol=1e-4, rtol=1e-5)


def gelu_experts_oracle(x, idx, gate, w1, w3, w2):
    """The experts of a MoE layer written out token by token in float64 (the definition, slowly)."""
    y = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for a in range(idx.shape[1]):
            e = int(idx[t, a])
            v = x[t].double()
            h = torch.nn.functional.gelu(v @ w1[e].double().T, approximate="tanh") * (v @ w3[e].double().T)
            y[t] += gate[t, a].double() * (h @ w2[e].double().T)
    return y


@pytest.mark.parametrize("fmt", FORMATS)
def test_experts_op_matches_the_definition_and_batching_changes_nothing(ops, fmt):
    E, D, F_, A = 4, 64, 96, 2
    g = torch.Generator().manual_seed(7)
    dense = [torch.randn(E, F_, D, generator=g) / 8, torch.randn(E, F_, D, generator=g) / 8,
             torch.randn(E, D, F_, generator=g) / 8]
    packed = [pack(w.reshape(-1, w.shape[-1]), fmt, 1) for w in dense]
    ws = tuple(q.reshape(E, -1, q.shape[-1]) for q, _ in packed)
    ss = tuple(sc.reshape(sc.shape[0], E, -1).transpose(0, 1) if sc.numel() and sc.shape[0] == 1 else
               (sc.reshape(E, -1, sc.shape[-1]) if sc.numel() else sc) for _, sc in packed)
    deq = [unpack(q, sc, torch.float32).reshape(w.shape) for (q, sc), w in zip(packed, dense)]
    N = 19
    x = torch.randn(N, D, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:A] for _ in range(N)])
    gate = torch.rand(N, A, generator=g)
    y = kernels.experts(x, idx, gate, (ws[0], ws[1], ws[2]), (ss[0], ss[1], ss[2]))
    torch.testing.assert_close(y.double(), gelu_experts_oracle(x, idx, gate, deq[0], deq[1], deq[2]),
                               atol=1e-4, rtol=1e-4)
    alone = torch.cat([kernels.experts(x[t : t + 1], idx[t : t + 1], gate[t : t + 1], ws, ss) for t in range(N)])
    assert torch.equal(y, alone)


@pytest.mark.parametrize("B,V", [(1, 1), (3, 7), (2, 16), (5, 4096), (2, 131075)])
def test_argmax_is_torch_argmax_with_ties_infinities_and_nan(ops, B, V):
    g = torch.Generator().manual_seed(V)
    x = torch.randn(B, V, generator=g)
    assert torch.equal(kernels.argmax(x), x.argmax(-1))
    x = torch.randint(0, 3, (B, V), generator=g).float()  # many equal maxima: the lowest index wins
    assert torch.equal(kernels.argmax(x), x.argmax(-1))
    x[:, V // 2 :] = float("inf")
    assert torch.equal(kernels.argmax(x), x.argmax(-1))
    x = torch.full((B, V), float("-inf"))
    assert torch.equal(kernels.argmax(x), x.argmax(-1))
    x = torch.randn(B, V, generator=g)
    x[0, V - 1] = float("nan")  # torch treats NaN as the maximum: its first NaN
    x[-1, V // 3] = x[-1, V // 2] = float("nan")
    assert torch.equal(kernels.argmax(x), x.argmax(-1))
