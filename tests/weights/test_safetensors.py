"""grok1's safetensors format: release -> grok1 is bit-identical, memory-mapped, atomic."""

import json

import pytest
import torch
from conftest import small_config

from grok1 import kernels
from grok1.model import Transformer, init_weights
from grok1.quant import quantize_model
from grok1.weights import safetensors as st
from grok1.weights.load import load_model, save_model


def _same_tensors(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def test_release_to_grok1_is_bit_identical(golden_model, golden_config, golden, tmp_path):
    out = save_model(golden_model, tmp_path / "g", tokenizer=None)
    assert st.is_checkpoint(out)
    assert st.read_config(out) == (golden_config, "int8")
    again = load_model(out, golden_config)
    _same_tensors(golden_model, again)
    ids = torch.tensor(golden["prompt_ids"][:1, :11], dtype=torch.long)
    with torch.no_grad():
        assert torch.equal(golden_model(ids), again(ids))


@pytest.mark.parametrize("int8", [False, True])
def test_round_trip_and_shards(tmp_path, int8):
    cfg = small_config()
    model = Transformer(cfg)
    init_weights(model, torch.Generator().manual_seed(0))
    if int8:
        quantize_model(model)
    out = st.save_checkpoint(model.state_dict(), cfg, tmp_path / "m", "int8" if int8 else "float32",
                             max_shard_bytes=200_000)
    index = json.loads((out / st.INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[-1].endswith(f"of-{len(shards):05d}.safetensors")
    _same_tensors(model, load_model(out, cfg))


def test_loaded_tensors_share_the_file_mapping(tmp_path):
    cfg = small_config()
    model = Transformer(cfg)
    init_weights(model)
    quantize_model(model)
    out = save_model(model, tmp_path / "m")
    loaded = load_model(out, cfg)
    # Two tensors of one shard sit exactly as far apart in memory as in the file: one mapping, no copies.
    shard = next(out.glob("*.safetensors"))
    header, _ = st.read_header(shard)
    a, b = "layers.0.moe.experts.w1", "layers.1.moe.experts.w2"
    ta, tb = loaded.get_buffer(a), loaded.get_buffer(b)
    file_gap = header[b]["data_offsets"][0] - header[a]["data_offsets"][0]
    assert tb.data_ptr() - ta.data_ptr() == file_gap


def test_incomplete_and_corrupt_checkpoints(tmp_path):
    cfg = small_config()
    model = Transformer(cfg)
    init_weights(model)
    out = save_model(model, tmp_path / "m")
    shard = next(out.glob("*.safetensors"))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_model(out, cfg)
    shard.write_bytes(b"\xff" * 4)
    with pytest.raises(ValueError, match="truncated"):
        load_model(out, cfg)
    (out / st.INDEX).unlink()
    with pytest.raises(ValueError, match="not a Grok-1 checkpoint"):
        load_model(out, cfg)
    assert not list(out.glob("*.tmp"))


@pytest.mark.parametrize("fmt", ["int8", "int4", "bf16"])
def test_every_stored_format_round_trips_with_a_stored_table(tmp_path, fmt):
    from grok1.quant import QEmbedding, quantize_embedding

    cfg = small_config(ffn_dim=192)
    model = Transformer(cfg)
    init_weights(model, torch.Generator().manual_seed(0))
    quantize_model(model, fmt)
    quantize_embedding(model, "bf16" if fmt == "bf16" else "int8")
    out = save_model(model, tmp_path / fmt)
    loaded = load_model(out, cfg)
    assert isinstance(loaded.tok_embeddings, QEmbedding)
    _same_tensors(model, loaded)
    kernels.compile_model(model)  # load_model plugs in the compiled kernels: compute both the same way
    tokens = torch.randint(1, cfg.vocab_size, (1, 5))
    with torch.no_grad():
        assert torch.equal(model(tokens), loaded(tokens))
