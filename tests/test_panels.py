"""Panel-packed weights (panels.to_panels, panels.pack_model) and their kernel (csrc/panels.cpp), against
float64 oracles, the row-major layout they replace, and the golden reference logits."""

import numpy as np
import pytest
import torch
from conftest import small_config

from grok1 import extension, kernels
from grok1.model import Transformer, init_weights
from grok1.panels import PackedEmbedding, PackedExperts, PackedLinear, from_panels, is_packed, pack_model, to_panels
from grok1.quant import pack, quantize_embedding, quantize_model, unpack


@pytest.fixture(scope="module")
def ops():
    if kernels.cpu_ops() is None:
        pytest.skip("the CPU kernel could not be compiled here (pack_model leaves the model as it is)")
    return kernels.cpu_ops()


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SHAPES = [(96, 64, 1), (40, 256, 8), (7, 96, 8), (130, 32, 1), (256, 344, 8), (17, 43, 1)]  # N, K, groups


def weights(fmt: str, N: int, K: int, G: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return pack(torch.randn(N, K, generator=torch.Generator().manual_seed(seed)), fmt, G)


@pytest.mark.parametrize("fmt", ["int8", "bf16", "fp32"])
@pytest.mark.parametrize("N,K,G", SHAPES)
def test_panels_hold_exactly_the_matrix(fmt, N, K, G):
    w, s = weights(fmt, N, K, G)
    panels, scales = to_panels(w, s)
    P = -(-N // 16)
    assert panels.shape == (P, K, 16) and panels.dtype == w.dtype
    assert panels[N // 16, :, N % 16:].count_nonzero() == 0 if N % 16 else True  # padding columns are zero
    n, k = N - 1, K // 2
    assert panels[n // 16, k, n % 16] == w[n, k]  # the layout: output n, input k
    assert torch.equal(from_panels(panels, scales, N, torch.float32), unpack(w, s, torch.float32))


@pytest.mark.parametrize("fmt", ["int8", "bf16", "fp32"])
@pytest.mark.parametrize("N,K,G", SHAPES)
def test_panel_matmul_matches_float64(ops, fmt, N, K, G):
    w, s = weights(fmt, N, K, G, seed=N + K)
    panels, scales = to_panels(w, s)
    dense = unpack(w, s, torch.float64)
    for M in [1, 2, 3, 4, 5, 7, 8, 9, 16, 33, 70]:
        x = torch.randn(M, K, generator=torch.Generator().manual_seed(M))
        y = kernels.panel_linear(x, panels, scales, N)
        assert y.shape == (M, N) and y.dtype == torch.float32
        torch.testing.assert_close(y.double(), x.double() @ dense.T, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("fmt", ["int8", "bf16", "fp32"])
def test_a_row_gets_the_same_bits_whatever_shares_the_call(ops, fmt):
    """Every row, at every batch size (all tile shapes and tails, beyond the old BLAS switch) and thread
    count, is bit-identical to the same row computed alone."""
    w, s = weights(fmt, 200, 344, 8, seed=3)
    panels, scales = to_panels(w, s)
    x = torch.randn(70, 344, generator=torch.Generator().manual_seed(4))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = torch.cat([kernels.panel_linear(x[i:i + 1], panels, scales, 200) for i in range(70)])
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for M in [2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 70]:
                assert torch.equal(kernels.panel_linear(x[:M], panels, scales, 200), alone[:M]), (threads, M)
    finally:
        torch.set_num_threads(before)


def test_bad_panels_are_clear_errors(ops):
    panels, scales = to_panels(*weights("int8", 40, 64, 1))
    with pytest.raises(RuntimeError, match="do not fill"):
        ops.panel_linear(torch.randn(2, 64), panels, scales, 49)  # 3 panels hold 33..48 outputs
    with pytest.raises(RuntimeError, match=r"\[P, K, 16\]"):
        ops.panel_linear(torch.randn(2, 32), panels, scales, 40)
    with pytest.raises(RuntimeError, match="scales float32"):
        ops.panel_linear(torch.randn(2, 64), panels, scales.bfloat16(), 40)


def test_experts_in_panels_match_the_row_major_experts(ops, one_thread):
    E, D, F = 8, 64, 86  # F: not a multiple of 16 (padded panels), w2 groups of 43 inputs
    g = torch.Generator().manual_seed(0)
    rows = {i: pack(torch.randn(E, *shape, generator=g), "int8", G)
            for i, shape, G in (("1", (F, D), 1), ("2", (D, F), 2), ("3", (F, D), 1))}
    packed = {i: to_panels(w, s) for i, (w, s) in rows.items()}
    x = torch.randn(20, D, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(20)])
    gate = torch.rand(20, 2, generator=g)
    order = ("1", "3", "2")
    got = kernels.experts(x, idx, gate, tuple(packed[i][0] for i in order), tuple(packed[i][1] for i in order))
    rowwise = kernels.experts(x, idx, gate, tuple(rows[i][0] for i in order), tuple(rows[i][1] for i in order))
    w1, w2, w3 = (unpack(*rows[i], torch.float64) for i in "123")  # oracle: float64, token by token
    ref = torch.zeros(20, D, dtype=torch.float64)
    for t in range(20):
        for a in range(2):
            e, v = int(idx[t, a]), x[t].double()
            h = torch.nn.functional.gelu(w1[e] @ v, approximate="tanh") * (w3[e] @ v)
            ref[t] += float(gate[t, a]) * (w2[e] @ h)
    scale = float(ref.abs().max())
    torch.testing.assert_close(got.double(), ref, atol=1e-5 * scale, rtol=0)
    torch.testing.assert_close(rowwise.double(), ref, atol=1e-5 * scale, rtol=0)  # the layout they replace
    for layout, out in ((packed, got), (rows, rowwise)):  # an odd F once made the GELU's vector steps batch-dependent
        one_by_one = torch.cat([kernels.experts(x[t:t + 1], idx[t:t + 1], gate[t:t + 1], tuple(layout[i][0] for i in order),
                                                tuple(layout[i][1] for i in order)) for t in range(20)])
        assert torch.equal(out, one_by_one)


@pytest.mark.parametrize("fmt,table", [("int8", "fp32"), ("int8", "int8"), ("fp32", "fp32"), ("int4", "fp32"),
                                       ("bf16", "bf16")])
def test_pack_model_computes_the_same_function(ops, fmt, table):
    torch.manual_seed(0)
    model = Transformer(small_config())
    init_weights(model, torch.Generator().manual_seed(1))
    quantize_model(model, fmt)
    if table != "fp32":
        quantize_embedding(model, table)
    model = kernels.install(model.eval())
    tokens = torch.randint(3, 512, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ref = model(tokens)
        emb = model.tok_embeddings(tokens)
        pack_model(model)
        got = model(tokens)
        assert torch.equal(model.tok_embeddings(tokens), emb)  # the lookup is exact
    layer = model.layers[0]
    packable = fmt != "int4"  # int4 matrices stay as they are; the table is packed either way
    assert isinstance(model.tok_embeddings, PackedEmbedding)
    assert isinstance(layer.attention.wqkv, PackedLinear) == packable
    assert isinstance(layer.moe.experts, PackedExperts) == packable
    assert is_packed(model) == packable
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)


def test_packed_modules_fall_back_to_torch_with_gradients(ops):
    w, s = weights("int8", 40, 64, 2)
    lin = PackedLinear(*to_panels(w, s), 40)
    x = torch.randn(3, 64, requires_grad=True)
    y = lin(x)  # kernels.applies refuses (x needs a gradient): dequantise-and-matmul
    y.sum().backward()
    dense = unpack(w, s, torch.float32)
    torch.testing.assert_close(y, x @ dense.T)
    torch.testing.assert_close(x.grad, dense.sum(0).expand(3, -1))


def test_pack_model_leaves_other_compute_dtypes_alone(ops):
    model = Transformer(small_config()).to(torch.bfloat16)
    pack_model(model)
    assert not is_packed(model) and not isinstance(model.tok_embeddings, PackedEmbedding)


def test_packed_golden_model_matches_reference_logits(ops, golden, golden_dir, golden_config):
    """The release-format golden checkpoint, packed as the grok1 commands run it, against the reference."""
    from grok1.weights.load import load_model

    model = pack_model(load_model(golden_dir / "tiny-ckpt", golden_config, "cpu", torch.float32))
    assert is_packed(model)
    for k in range(len(golden["prompt_lens"])):
        n = int(golden["prompt_lens"][k])
        with torch.inference_mode():
            logits = model(torch.tensor(golden["prompt_ids"][k:k + 1, :n], dtype=torch.long))[0].numpy()
        assert np.abs(logits - golden[f"logits_fp32_p{k}"]).max() <= 1e-3


def test_avx2_and_scalar_builds_give_the_same_bits(ops, tmp_path_factory):
    """The brief's machines have AVX2 but not AVX-512, other CPUs neither: built without them, the panel
    kernel computes every output with the same operations in the same order, so its bits match this
    build's; the row-major kernel's AVX2 loop matches its AVX-512 one (every format)."""
    import platform
    import shutil

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 instruction-set variants")
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler")
    flags = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-mno-avx512f"]
    builds = {"native": ops}
    for name, extra in (("avx2", []), ("scalar", ["-mno-avx2", "-mno-fma"])):
        builds[name] = extension.load(f"grok1_kernels_test_{name}_{kernels._build_tag()}", kernels._SOURCES, flags + extra,
                                      ["-fopenmp"])
    g = torch.Generator().manual_seed(0)
    for fmt in ("int8", "fp32", "int4", "bf16"):
        for N, K, G in [(40, 256, 8), (17, 96, 1), (256, 344, 8)]:
            if fmt == "int4" and K % 32:
                continue
            w, s = pack(torch.randn(N, K, generator=g), fmt, G)
            panels = to_panels(w, s) if fmt in ("int8", "bf16", "fp32") else None
            for M in (1, 3, 8, 9, 20):
                x = torch.randn(M, K, generator=g)
                for name, mod in builds.items():
                    if name != "scalar":  # the row-major kernel sums 8 lanes then across them, unlike its scalar tail
                        assert torch.equal(mod.linear(x, w, s, 32), ops.linear(x, w, s, 32)), (name, fmt, N, K, M)
                    if panels is not None:
                        assert torch.equal(mod.panel_linear(x, *panels, N), ops.panel_linear(x, *panels, N)), (name, fmt, N, K, M)
