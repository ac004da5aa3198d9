"""Tensor parallelism: each rank's slices reassemble the whole model in every weight format, and TP runs in
real processes (gloo, one thread each) give the single-process logits and greedy tokens."""

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from grok1.config import ModelConfig
from grok1.parallel.tp import check_tp, shard_tp
from grok1.quant import unpack

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import DEMO, GOLDEN, build  # noqa: E402
from oracle import compare_with_single  # noqa: E402


def dense(module: nn.Module, attr: str = "weight") -> torch.Tensor:
    """The float32 matrix a linear layer (or an experts stack `w{i}`) computes with."""
    w = getattr(module, attr)
    scales = getattr(module, "scales" if attr == "weight" else "s" + attr[-1], None)
    return w.float() if scales is None or not scales.numel() else unpack(w, scales, torch.float32)


def assert_reassembles(model, size: int) -> None:
    cfg = model.config
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shards = []
    for rank in range(size):
        m = copy.deepcopy(model)
        shard_tp(m, rank, size)
        shards.append(m)
    for i, layer in enumerate(model.layers):
        full_qkv = dense(layer.attention.wqkv)
        parts = [dense(s.layers[i].attention.wqkv).split([q // size, kv // size, kv // size]) for s in shards]
        for j, whole in enumerate(full_qkv.split([q, kv, kv])):  # q, k, v: each the ranks' rows in order
            torch.testing.assert_close(torch.cat([p[j] for p in parts]), whole, rtol=0, atol=0)
        wo = torch.cat([dense(s.layers[i].attention.wo) for s in shards], dim=1)
        torch.testing.assert_close(wo, dense(layer.attention.wo), rtol=0, atol=0)
        for w, dim in (("w1", 1), ("w3", 1), ("w2", 2)):
            got = torch.cat([dense(s.layers[i].moe.experts, w) for s in shards], dim=dim)
            torch.testing.assert_close(got, dense(layer.moe.experts, w), rtol=0, atol=0)
        for s in shards:
            assert s.layers[i].moe.experts.n_experts == cfg.n_experts
            assert s.layers[i].attention.wo.in_features == q // size
    table = torch.cat([dense(s.tok_embeddings) for s in shards])
    torch.testing.assert_close(table, dense(model.tok_embeddings), rtol=0, atol=0)
    assert shards[0].new_cache(1, 4).k.shape[2] == cfg.n_kv_heads // size  # the rank's KV heads only


@pytest.mark.parametrize("fmt", ["int8", "int4", "bf16", "dense"])
@pytest.mark.parametrize("size", [2, 4])
def test_slices_reassemble_every_format(fmt, size):
    assert_reassembles(build("small", fmt), size)


@pytest.mark.parametrize("size", [2, 4, 8])
def test_release_scale_groups_split_with_their_inputs(golden_dir, size):
    """The release's 8 int8 scale groups on wo and w2: 8 / size whole groups per rank."""
    model = build("golden")
    assert model.layers[0].attention.wo.scales.shape[0] == 8
    assert_reassembles(model, size)
    m = copy.deepcopy(model)
    shard_tp(m, 1, size)
    assert m.layers[0].attention.wo.scales.shape[0] == 8 // size
    assert m.layers[0].moe.experts.s2.shape[1] == 8 // size


def test_sizes_that_do_not_divide_the_heads_are_refused():
    cfg = ModelConfig.from_reference_json(DEMO / "config.json")  # 8 query heads, 2 KV heads
    with pytest.raises(ValueError, match=r"--tp 4: the model's n_kv_heads=2 .* valid tensor-parallel sizes for "
                                         r"this model: 1, 2$"):
        check_tp(cfg, 4)


@pytest.mark.parametrize("fmt", ["int4", "bf16"])
def test_tp2_small_model_formats(tmp_path, fmt):
    compare_with_single(tmp_path, "small", tp=2, fmt=fmt, pack=True)


def test_tp4_dense_fp32(tmp_path):
    compare_with_single(tmp_path, "small", tp=4, fmt="dense", pack=True)


def test_tp2_golden_library(tmp_path, golden_dir):
    """apply on the whole loaded model, unpacked (torch's matmuls)."""
    compare_with_single(tmp_path, "golden", tp=2, atol=1e-4)


def test_tp2_demo_sliced_load_packed(tmp_path):
    compare_with_single(tmp_path, "demo", tp=2, mode="load", pack=True, atol=5e-5)
