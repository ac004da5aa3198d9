"""Checkpoint sources: every format opens to the same tensors, and a rank's slice is the slice of the whole."""

import pytest
import torch

from grok1.weights import names
from grok1.weights.legacy import CheckpointError
from grok1.weights.load import save_model
from grok1.weights.source import detect, fuse, open_source


@pytest.fixture(scope="module")
def sources(golden_dir, golden_config, golden_model, tmp_path_factory):
    """The golden checkpoint as released, and as grok1 wrote it (save_model of the loaded model)."""
    g1 = save_model(golden_model, tmp_path_factory.mktemp("src") / "g1")
    return open_source(golden_dir / "tiny-ckpt", golden_config), open_source(g1)


def test_release_and_grok1_sources_hold_the_same_tensors(sources, golden_config):
    release, grok1 = sources
    assert (release.format, grok1.format) == ("release", "grok1")
    assert release.config == grok1.config == golden_config and release.weights == grok1.weights == "int8"
    assert sorted(release.names()) == sorted(grok1.names())
    ours = dict(grok1.tensors())
    for name, tensor in release.tensors():
        assert tensor.dtype == ours[name].dtype and torch.equal(tensor, ours[name]), name
    w, s = release.read("layers.2.attention.wqkv.weight")  # q, k, v fused, [out, in] with scales [1, out]
    assert torch.equal(w, ours["layers.2.attention.wqkv.weight"]) and torch.equal(s, ours["layers.2.attention.wqkv.scales"])


def test_read_slice_is_the_slice_of_the_whole_tensor_in_every_format(sources):
    release, grok1 = sources
    whole = dict(grok1.tensors())
    for name in ["layers.3.attention.wqkv.weight", "layers.3.attention.wqkv.scales", "layers.3.attention.wo.weight",
                 "layers.3.attention.wo.scales", "layers.1.moe.experts.w1", "layers.1.moe.experts.s2",
                 "layers.1.moe.experts.w2", "tok_embeddings.weight"]:
        axis = names.tp_split_axis(name)
        size = whole[name].shape[axis]
        for rank in range(2):
            lo, hi = rank * size // 2, (rank + 1) * size // 2
            expected = whole[name].narrow(axis, lo, hi - lo)
            for source in (release, grok1):
                got = source.read_slice(name, axis, lo, hi)
                assert got.is_contiguous() and torch.equal(got, expected), (source.format, name, rank)


def test_fuse_refuses_parts_with_different_scale_groups():
    q = (torch.zeros(4, 8, dtype=torch.int8), torch.ones(1, 4, dtype=torch.bfloat16))
    k = (torch.zeros(2, 8, dtype=torch.int8), torch.ones(2, 2, dtype=torch.bfloat16))
    with pytest.raises(CheckpointError, match=r"different scale group counts \[1, 2\]"):
        fuse([q, k], "ckpt: layers.0.attention.wqkv.weight")
    w, s = fuse([q, (k[0], torch.ones(1, 2, dtype=torch.bfloat16))], "x")
    assert w.shape == (6, 8) and s.shape == (1, 6)


def test_detect_names_what_it_expected(tmp_path, golden_dir):
    assert detect(golden_dir / "tiny-ckpt") == "release"
    with pytest.raises(CheckpointError, match="not a Grok-1 checkpoint directory"):
        detect(tmp_path)
