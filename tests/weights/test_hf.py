"""The Hugging Face layouts (vLLM / SGLang): names, config.json, grok1 -> hf -> grok1 round trips."""

import json

import pytest
import torch
from conftest import small_config

from grok1.model import Transformer, init_weights
from grok1.quant import dequantize
from grok1.weights import convert as conv
from grok1.weights import hf
from grok1.weights import safetensors as st
from grok1.weights.load import load_model, save_model


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.fixture
def float_model(tmp_path):
    cfg = small_config(dim=64, n_heads=4, head_dim=16, n_kv_heads=2, ffn_dim=96)  # dim == heads x head_dim
    model = Transformer(cfg)
    init_weights(model, torch.Generator().manual_seed(7))
    return model.eval(), save_model(model, tmp_path / "g1")


@pytest.mark.parametrize("layout", ["vllm", "sglang"])
def test_grok1_to_hf_to_grok1_is_identical(float_model, tmp_path, layout):
    model, g1 = float_model
    cfg = model.config
    conv.convert(g1, tmp_path / "hf", "hf", dtype="fp32", layout=layout)
    back = conv.convert(tmp_path / "hf", tmp_path / "back", "grok1")
    assert back.convert_s > 0
    same_weights(model, load_model(tmp_path / "back", cfg))
    tensors = st.open_checkpoint(tmp_path / "hf")
    att, moe, e = ("attn", "moe_block", "linear") if layout == "vllm" else ("self_attn", "block_sparse_moe", "w1")
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    assert tensors[f"model.layers.1.{att}.q_proj.weight"].shape == (q, cfg.dim)
    assert torch.equal(tensors[f"model.layers.1.{att}.v_proj.weight"], model.layers[1].attention.wqkv.weight[q + kv:])
    assert torch.equal(tensors[f"model.layers.0.{moe}.experts.5.{e}.weight"], model.layers[0].moe.experts.w1[5])
    assert torch.equal(tensors[f"model.layers.0.{moe}.gate.weight"], model.layers[0].moe.gate.weight)
    norm = "model.norm.scale" if layout == "vllm" else "model.norm.weight"
    assert torch.equal(tensors[norm], model.norm.weight)
    assert ("lm_head.weight" in tensors) == (layout == "sglang")  # vLLM ties it; SGLang needs a copy
    raw = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert raw["architectures"] == [hf.ARCHITECTURES[layout]] and raw["model_type"] == "grok-1"
    assert (raw["num_experts"], raw["num_local_experts"], raw["num_experts_per_tok"]) == (8, 8, 2)
    assert raw["hidden_size"] == cfg.dim and raw["head_dim"] == cfg.head_dim and raw["intermediate_size"] == cfg.ffn_dim
    assert raw["tie_word_embeddings"] == (layout == "vllm") and raw["torch_dtype"] == "float32"


def test_hpcai_config_without_our_block_reads_back(float_model, tmp_path):
    model, g1 = float_model
    conv.convert(g1, tmp_path / "hf", "hf")
    raw = json.loads((tmp_path / "hf" / "config.json").read_text())
    del raw["grok1"], raw["head_dim"], raw["num_local_experts"], raw["moe_intermediate_size"]
    assert hf.config_from_hf(raw, "x") == model.config


def test_int8_release_to_hf_bf16_is_the_exact_dequantisation(golden_dir, golden_config, golden_model, tmp_path):
    result = conv.convert(golden_dir / "tiny-ckpt", tmp_path / "hf", "hf", config=golden_dir / "tiny-config.json")
    assert any("cannot load it" in n for n in result.notes)  # tiny: dim 32 != 16 heads x 16
    conv.convert(tmp_path / "hf", tmp_path / "back", "grok1")
    cfg, kind = st.read_config(tmp_path / "back")
    assert (cfg, kind) == (golden_config, "bfloat16")
    back = st.open_checkpoint(tmp_path / "back")
    wo = golden_model.layers[4].attention.wo
    assert torch.equal(back["layers.4.attention.wo.weight"], dequantize(wo.weight, wo.scales, torch.bfloat16))
    ex = golden_model.layers[2].moe.experts
    assert torch.equal(back["layers.2.moe.experts.w2"], dequantize(ex.w2, ex.s2, torch.bfloat16))
    assert torch.equal(back["tok_embeddings.weight"], golden_model.tok_embeddings.weight.to(torch.bfloat16))
    assert back["layers.0.moe.gate.weight"].dtype == torch.float32  # router and norms stay exact


def test_hf_refuses_int8_with_a_reason(float_model, tmp_path):
    _, g1 = float_model
    with pytest.raises(ValueError, match="vLLM and SGLang load bf16"):
        conv.convert(g1, tmp_path / "hf", "hf", dtype="int8")


def test_compat_notes_name_what_the_ports_change(float_model):
    model, _ = float_model
    notes = hf.compat_notes(model.config)  # attn_scale 1/sqrt(128) vs head_dim 16
    assert any("router soft-cap" in n for n in notes) and any("QK scale" in n for n in notes)
