"""GGUF export for llama.cpp: re-read with the gguf package's own reader."""

from pathlib import Path

import gguf
import pytest
import torch
from conftest import small_config

from grok1.model import Transformer, init_weights
from grok1.quant import quantize_model, unpack
from grok1.weights import convert as conv
from grok1.weights import gguf as ggufx
from grok1.weights import safetensors as st
from grok1.weights.load import save_model

DEMO = Path(__file__).resolve().parents[2] / "grok1" / "assets" / "grok-1-mini"


def dense(model: Transformer) -> dict[str, torch.Tensor]:
    """Our float32 weights (int8 dequantised exactly), scales left out."""
    sd = model.state_dict()
    out = {}
    for k, v in sd.items():
        if k.endswith(("scales", ".s1", ".s2", ".s3")):
            continue
        scales = k.removesuffix("weight") + "scales" if k.endswith("weight") else k[:-2] + "s" + k[-1]
        out[k] = unpack(v, sd[scales], torch.float32) if v.dtype == torch.int8 else v.float()
    return out


@pytest.fixture(scope="module")
def int8_model(tmp_path_factory):
    cfg = small_config(dim=64, n_heads=4, head_dim=16, n_kv_heads=2, ffn_dim=96)  # llama.cpp's shape rules
    model = Transformer(cfg)
    init_weights(model, torch.Generator().manual_seed(5))
    quantize_model(model)
    return model.eval(), save_model(model, tmp_path_factory.mktemp("m") / "g1")


@pytest.mark.parametrize("dtype", ["fp32", "f16", "q8_0"])
def test_export_reads_back_with_the_gguf_reader(int8_model, tmp_path, dtype):
    model, g1 = int8_model
    out = tmp_path / "m.gguf"
    result = conv.convert(g1, out, "gguf", dtype=dtype)
    assert not result.notes and not out.with_name("m.gguf.tmp").exists()
    _, tensors = ggufx.read(out)
    ref = dense(model)
    assert tensors.keys() == ref.keys()
    for name, want in ref.items():
        got = tensors[name]
        if dtype == "fp32" or want.dim() == 1 or name.endswith("moe.gate.weight"):
            assert torch.equal(got, want), name  # int8 x bf16 products are exact in float32
        elif dtype == "f16":
            assert torch.equal(got, want.half().float()), name
        else:  # q8_0: blocks of 32, q = round(x / d) with d = max|x| / 127, d stored as f16 (2^-11 relative):
            step = want.reshape(-1, 32).abs().amax(-1, keepdim=True) / 127  # |error| <= d/2 + 127 d 2^-11
            err = (got - want).reshape(-1, 32).abs()
            assert (err <= 0.57 * step + 1e-7).all(), name


def test_metadata_and_names_are_llama_cpp_grok(int8_model, tmp_path):
    model, g1 = int8_model
    cfg = model.config
    conv.convert(g1, tmp_path / "m.gguf", "gguf", dtype="q8_0")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    meta = {k: f.contents() for k, f in reader.fields.items()}
    assert meta["general.architecture"] == "grok"
    expect = {"grok.block_count": cfg.n_layers, "grok.embedding_length": cfg.dim, "grok.context_length": cfg.max_seq_len,
              "grok.feed_forward_length": cfg.ffn_dim, "grok.expert_feed_forward_length": cfg.ffn_dim,
              "grok.attention.head_count": cfg.n_heads, "grok.attention.head_count_kv": cfg.n_kv_heads,
              "grok.attention.key_length": cfg.head_dim, "grok.rope.dimension_count": cfg.head_dim,
              "grok.expert_count": cfg.n_experts, "grok.expert_used_count": cfg.n_active_experts,
              "general.file_type": int(gguf.LlamaFileType.MOSTLY_Q8_0)}
    assert {k: meta[k] for k in expect} == expect
    for key, value in {"grok.embedding_scale": cfg.embedding_multiplier, "grok.logit_scale": cfg.output_multiplier,
                       "grok.attention.output_scale": cfg.attn_scale, "grok.attn_logit_softcapping": cfg.attn_softcap,
                       "grok.rope.freq_base": cfg.rope_base, "grok.attention.layer_norm_rms_epsilon": cfg.norm_eps}.items():
        assert meta[key] == pytest.approx(value, rel=1e-6), key
    arch_names = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.GROK]}
    found = {t.name: t for t in reader.tensors}
    assert "output.weight" not in found  # tied: llama.cpp reuses token_embd
    for name, t in found.items():
        template = name.rsplit(".", 1)[0].replace(f"blk.{name.split('.')[1]}.", "blk.{bid}.", 1)
        assert template in arch_names, name
        assert t.tensor_type == (gguf.GGMLQuantizationType.F32 if len(t.shape) == 1 or "gate_inp" in name
                                 else gguf.GGMLQuantizationType.Q8_0), name
    assert [int(n) for n in found["blk.1.ffn_down_exps.weight"].shape] == [cfg.ffn_dim, cfg.dim, cfg.n_experts]


def _sentencepiece(file: Path, pieces: int) -> Path:
    import io

    import sentencepiece

    text = [f"It is a truth universally acknowledged, that a man {i} in possession of a good fortune" for i in range(300)]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=model, vocab_size=pieces,
                                             byte_fallback=True, hard_vocab_limit=False, minloglevel=2)
    file.write_bytes(model.getvalue())
    return file


def test_vocabulary_and_fallbacks(tmp_path):
    """A SentencePiece tokenizer goes in as llama.cpp's "llama" vocabulary, padded to the model's rows;
    shapes llama.cpp cannot take are named."""
    cfg = small_config()  # the tiny preset's shapes: dim 32 != 16 heads x 16, expert width 176
    model = Transformer(cfg)
    init_weights(model)
    quantize_model(model)
    g1 = save_model(model, tmp_path / "g1", tokenizer=_sentencepiece(tmp_path / "tokenizer.model", 300))
    result = conv.convert(g1, tmp_path / "m.gguf", "gguf")
    assert any("will not load there" in n for n in result.notes)
    assert any("ffn_down_exps.weight written as F16" in n for n in result.notes)
    f = gguf.GGUFReader(tmp_path / "m.gguf").fields
    assert f["tokenizer.ggml.model"].contents() == "llama" and f["tokenizer.ggml.add_bos_token"].contents() is False
    tokens = f["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == cfg.vocab_size and tokens[-1] == f"[PAD{cfg.vocab_size - 1}]"
    types = f["tokenizer.ggml.token_type"].contents()
    assert types[0] == gguf.TokenType.UNKNOWN and types[1] == gguf.TokenType.CONTROL and types[-1] == gguf.TokenType.UNUSED
    assert gguf.TokenType.BYTE in types and gguf.TokenType.NORMAL in types
    assert f["tokenizer.ggml.bos_token_id"].contents() == 1 and f["tokenizer.ggml.eos_token_id"].contents() == 2


def test_renormalised_top2_is_removed_by_the_post_moe_norm():
    """llama.cpp divides the MoE output by p1 + p2; the post-MoE RMSNorm cancels any per-token factor
    up to its epsilon, which is the whole difference."""
    cfg = small_config()
    model = Transformer(cfg)
    init_weights(model, torch.Generator().manual_seed(2))
    block = model.layers[0]
    x = torch.randn(5, cfg.dim, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        probs = torch.softmax(block.moe.gate(x), -1)
        c = 1 / probs.topk(cfg.n_active_experts, -1).values.sum(-1, keepdim=True)  # >= 1
        y = block.moe(block.moe_norm(x))
        ours, renormalised = block.moe_post_norm(y), block.moe_post_norm(c * y)
    bound = (cfg.norm_eps / y.pow(2).mean(-1, keepdim=True)).max()  # relative, from the formula in gguf.py
    assert ((renormalised - ours).abs() / ours.abs().amax(-1, keepdim=True)).max() <= bound + 1e-6
    assert (c > 1.01).any()  # the factor itself is far from 1


@pytest.mark.skipif(not (DEMO / st.INDEX).is_file(), reason=f"demo model not built yet ({DEMO})")
def test_demo_model_exports_with_the_expected_metadata(tmp_path):
    cfg, _ = st.read_config(DEMO)
    conv.convert(DEMO, tmp_path / "demo.gguf", "gguf")
    meta, tensors = ggufx.read(tmp_path / "demo.gguf")
    assert meta["general.architecture"] == "grok" and meta["grok.block_count"] == cfg.n_layers
    assert meta["grok.embedding_scale"] == pytest.approx(cfg.embedding_multiplier, rel=1e-6)
    assert tensors["tok_embeddings.weight"].shape == (cfg.vocab_size, cfg.dim)
