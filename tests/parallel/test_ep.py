"""Expert parallelism: the ranks' partial MoE outputs sum to the whole layer's, and EP and TP x EP runs in
real processes give the single-process logits and greedy tokens."""

import copy
import sys
from pathlib import Path

import pytest
import torch

from grok1.config import ModelConfig
from grok1.parallel.ep import ExpertParallel, check_ep, shard_ep

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import DEMO, build  # noqa: E402
from oracle import compare_with_single  # noqa: E402


@pytest.mark.parametrize("fmt", ["int8", "dense"])
@pytest.mark.parametrize("size", [2, 4, 8])
def test_partial_outputs_sum_to_the_layer(fmt, size):
    """Each rank applies only its experts to the pairs routed to them; the sum over ranks is the MoE."""
    torch.manual_seed(0)
    model = build("small", fmt)
    moe = model.layers[0].moe
    x = torch.randn(9, model.config.dim)
    parts = []
    for rank in range(size):
        m = copy.deepcopy(model)
        shard_ep(m, rank, size)
        local = m.layers[0].moe.experts
        assert local.n_experts == model.config.n_experts // size
        m.layers[0].moe.experts = ExpertParallel(local, rank * model.config.n_experts // size)
        with torch.inference_mode():
            parts.append(m.layers[0].moe(x))
    with torch.inference_mode():
        want = moe(x)
    torch.testing.assert_close(sum(parts), want, rtol=0, atol=1e-6)


def test_sizes_that_do_not_divide_the_experts_are_refused():
    cfg = ModelConfig.from_reference_json(DEMO / "config.json")
    with pytest.raises(ValueError, match=r"--ep 3: the model's 8 experts do not split over 3 ranks; valid "
                                         r"expert-parallel sizes: 1, 2, 4, 8"):
        check_ep(cfg, 3)


def test_ep2_golden_library(tmp_path, golden_dir):
    compare_with_single(tmp_path, "golden", ep=2)


def test_ep4_demo_sliced_load_packed(tmp_path):
    compare_with_single(tmp_path, "demo", ep=4, mode="load", pack=True)


def test_tp2_ep2_golden_sliced_load_packed(tmp_path, golden_dir):
    """2-D: TP within pairs of ranks, EP across them; one all-reduce after each MoE over all four."""
    compare_with_single(tmp_path, "golden", tp=2, ep=2, mode="load", pack=True, atol=1e-4)
