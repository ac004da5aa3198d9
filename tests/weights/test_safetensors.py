"""grok1's safetensors format: release -> grok1 is bit-identical, memory-mapped, atomic."""

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import small_config

from grok1 import kernels
from grok1.fileio import release_pages
from grok1.model import Transformer, init_weights
from grok1.quant import quantize_model
from grok1.weights import safetensors as st
from grok1.weights.load import load_model, save_model
from grok1.weights.source import detect


def _same_tensors(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def test_release_to_grok1_is_bit_identical(golden_model, golden_config, golden, tmp_path):
    out = save_model(golden_model, tmp_path / "g", tokenizer=None)
    assert detect(out) == "grok1"
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
    kernels.install(model)  # load_model plugs in the compiled kernels: compute both the same way
    tokens = torch.randint(1, cfg.vocab_size, (1, 5))
    with torch.no_grad():
        assert torch.equal(model(tokens), loaded(tokens))


def _rss_file_kb() -> int:
    status = Path("/proc/self/status").read_text().splitlines()
    return next(int(line.split()[1]) for line in status if line.startswith("RssFile:"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc are Linux's")
def test_release_pages_drops_mapped_pages_and_never_touches_other_memory(tmp_path):
    from safetensors.torch import save_file

    big = torch.randn(16 << 20 >> 2)  # 16 MB
    save_file({"big": big, "small": torch.ones(3)}, tmp_path / "x.safetensors")
    mapped = st.open_shard(tmp_path / "x.safetensors")["big"]
    assert torch.equal(mapped, big)  # every page touched: resident
    before = _rss_file_kb()
    release_pages(mapped)
    assert before - _rss_file_kb() >= 12 << 10  # most of its 16 MB left the process
    assert torch.equal(mapped, big)  # touched again, the pages come back from the file
    anonymous = big.clone()
    release_pages(anonymous)  # not a file mapping: left alone (MADV_DONTNEED would zero it)
    assert torch.equal(anonymous, big)


def test_packing_at_load_keeps_the_weights_once(tmp_path):
    """load_model(pack=True) copies the mapped matrices into panels, and the rest too, so no tensor of the
    model points into the checkpoint's memory map any more (the map can go, the weights are in memory once)."""
    cfg = small_config()
    model = Transformer(cfg)
    init_weights(model)
    quantize_model(model)
    out = save_model(model, tmp_path / "m")
    shard = str(next(out.glob("*.safetensors")))
    tokens = torch.randint(3, cfg.vocab_size, (1, 7))

    def in_shard_mapping(m: torch.nn.Module) -> list[str]:
        spans = [[int(x, 16) for x in line.split()[0].split("-")]
                 for line in Path("/proc/self/maps").read_text().splitlines() if line.endswith(shard)]
        return [n for n, t in [*m.named_parameters(), *m.named_buffers()]
                if t.numel() and any(lo <= t.data_ptr() < hi for lo, hi in spans)]

    plain = load_model(out, cfg)
    packed = load_model(out, cfg, pack=True)
    with torch.inference_mode():
        torch.testing.assert_close(packed(tokens), plain(tokens), atol=1e-4, rtol=1e-4)
    if sys.platform.startswith("linux"):
        assert in_shard_mapping(plain)  # the check sees mapped tensors
        if kernels.cpu_ops() is not None:
            assert in_shard_mapping(packed) == []
