"""The name table covers every tensor once in each format, and agrees with the gguf package."""

import gguf
import torch
from conftest import small_config

from grok1.model import Transformer
from grok1.quant import swap_to_int8
from grok1.weights import hf, names
from grok1.weights.legacy import reference_paths
from grok1.weights.names import unit_names


def test_every_parameter_has_one_row_and_names_are_unique_per_format():
    cfg = small_config()
    with torch.device("meta"):
        model = Transformer(cfg)
    swap_to_int8(model)
    params = set(model.state_dict())
    weights = {n for n in params if not n.endswith(tuple(names.SCALES.values()))}
    assert set(unit_names(cfg)) == weights
    for style in ("reference", "hf", "sglang", "gguf"):
        column = [getattr(r, style) for r in names.LAYER]
        assert len(set(column)) == len(column), style
    scales = {n.removesuffix(rel) + names.SCALES[rel] for n in weights if (rel := names.split_layer(n)[1]) in names.SCALES}
    assert scales == params - weights


def test_reference_paths_round_trip():
    cfg = small_config()
    seen = []
    for name in unit_names(cfg):
        for path, row in names.to_reference(name):
            ours, _, entry = names.from_reference(path)
            assert ours == name and entry.part == row.part
            seen.append(path)
    assert sorted(seen) == sorted(reference_paths(cfg))


def test_gguf_names_are_llama_cpp_grok_tensors():
    arch = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.GROK]}
    for row in (*names.LAYER, *names.GLOBAL):
        assert row.gguf.removesuffix(".weight") in {a.replace("blk.{bid}.", "") for a in arch}, row.gguf
    assert names.column(names.LAYER[-1], "gguf", 3) == "blk.3.layer_output_norm.weight"


def test_hf_names_are_what_the_ports_load():
    q, _, e1 = names.LAYER[0], None, names.LAYER[4]
    assert names.column(q, "hf", 2) == "model.layers.2.attn.q_proj.weight"  # vLLM / hpcai-tech
    assert names.column(q, "sglang", 2) == "model.layers.2.self_attn.q_proj.weight"
    assert names.column(e1, "hf", 0, 7) == "model.layers.0.moe_block.experts.7.linear.weight"
    assert names.column(e1, "sglang", 0, 7) == "model.layers.0.block_sparse_moe.experts.7.w1.weight"
    cfg = small_config()
    assert [n for n, _, _ in hf.tensor_names("tok_embeddings.weight", cfg, "sglang")] == [
        "model.embed_tokens.weight", "lm_head.weight"]
    assert len(hf.tensor_names("layers.1.moe.experts.w2", cfg, "vllm")) == cfg.n_experts


def test_every_matrix_has_a_tensor_parallel_axis():
    for name in unit_names(small_config()):
        rel = names.split_layer(name)[1]
        assert (names.tp_split_axis(name) is not None) == (rel in names.SCALES or rel == "tok_embeddings.weight")
