"""The memory planner against hand-computed sizes, the release's own index and real checkpoints."""

import json
import math

import pytest

from grok1 import plan
from grok1.config import from_name

GROK1 = from_name("grok-1")
MINI = from_name("grok-1-mini")  # V 4096, D 256, 4 layers, 8/2 heads of 32, 8 experts of width 344
TINY = from_name("tiny")  # the golden model: V 131072, D 32, 12 layers, 16/8 heads of 16, 8 experts of width 176


def test_matrix_bytes_per_format():
    assert plan.matrix_bytes(64, 64, "int8") == 4096 + 2 * 64  # one bf16 scale per output
    assert plan.matrix_bytes(64, 64, "int8", groups=8) == 4096 + 2 * 8 * 64
    assert plan.matrix_bytes(64, 64, "int4") == 2048 + 2 * 128  # two per byte, a bf16 scale per 32 inputs
    assert plan.matrix_bytes(64, 64, "bf16") == 8192
    with pytest.raises(ValueError, match="fp8"):
        plan.matrix_bytes(64, 64, "fp8")


def test_grok1_mini_int8_by_hand():
    # wqkv [(8 + 2*2) * 32 = 384, 256] + 384 scales; wo [256, 256] + 8 x 256 scales
    attention = 4 * ((384 * 256 + 2 * 384) + (256 * 256 + 2 * 8 * 256))
    # w1, w3 [344, 256] + 344 scales each; w2 [256, 344] + 8 x 256 scales
    experts = 4 * 8 * (2 * (344 * 256 + 2 * 344) + (256 * 344 + 2 * 8 * 256))
    parts = plan.weight_parts(MINI, "int8")
    assert parts == {"attention": attention, "experts": experts, "embedding": 2 * 4096 * 256,
                     "replicated": 4 * (256 + 4 * (4 * 256 + 256 * 8))}
    assert sum(parts.values()) == 11_451_392


def test_grok1_mini_matches_the_bundled_checkpoint():
    """The demo model as shipped: int8 + bf16 scales + float32 embedding, norms and router."""
    from grok1.cli.common import DEFAULT_CHECKPOINT
    from grok1.weights import safetensors as st
    stored = sum(t.numel() * t.element_size() for t in st.open_checkpoint(DEFAULT_CHECKPOINT).values())
    assert stored == sum(plan.weight_parts(MINI, "int8", embedding_bytes=4).values()) == 13_548_544


def test_tiny_int8_by_hand_and_against_the_golden_checkpoint(golden_dir):
    attention = 12 * ((512 * 32 + 2 * 512) + (32 * 256 + 2 * 8 * 32))
    experts = 12 * 8 * (2 * (176 * 32 + 2 * 176) + (32 * 176 + 2 * 8 * 32))
    parts = plan.weight_parts(TINY, "int8", embedding_bytes=4)
    assert (parts["attention"], parts["experts"], parts["embedding"]) == (attention, experts, 4 * 131072 * 32)
    assert sum(parts.values()) == 18_847_872
    from grok1.weights import legacy
    stored = 0
    for _, obj in legacy.read_checkpoint(golden_dir / "tiny-ckpt" / "ckpt-0", TINY):
        stored += obj.weight.nbytes + obj.scales.nbytes if isinstance(obj, legacy.QuantizedWeight8bit) else obj.nbytes
    assert stored == sum(parts.values())


def test_grok1_int8_total_equals_the_release_index(shared_dir):
    """316 GB: the sum of the 770 tensors of ckpt-0-index.json (float32 embedding as released: 318.24 GB)."""
    index = json.loads((shared_dir / "grok-1" / "ckpt-0-index.json").read_text())
    total = 0
    for t in index["tensors"]:
        if t["kind"] == "ndarray":
            total += 4 * math.prod(t["shape"])
        else:
            total += math.prod(t["weight_shape"]) + 2 * math.prod(t["scales_shape"])
    assert total == sum(plan.weight_parts(GROK1, "int8", embedding_bytes=4).values()) == 318_239_694_848
    held = sum(plan.weight_parts(GROK1, "int8").values())  # the table in bf16 on a GPU
    assert held == total - 2 * 131072 * 6144 and round(held / 1e9) == 317


def test_grok1_int4_and_bf16():
    params = GROK1.num_params() - GROK1.vocab_size * GROK1.dim
    matrices = params - (GROK1.dim + GROK1.n_layers * (4 * GROK1.dim + GROK1.dim * GROK1.n_experts))
    parts = plan.weight_parts(GROK1, "int4")
    assert parts["attention"] + parts["experts"] == matrices * 9 // 16  # 4 bits + 16 bits / 32
    parts = plan.weight_parts(GROK1, "bf16")
    assert parts["attention"] + parts["experts"] == 2 * matrices


def test_kv_cache_bytes_per_token():
    assert plan.kv_bytes_per_token(GROK1) == 256 * 1024  # 64 layers x K,V x 8 heads x 128 x bf16
    assert plan.kv_bytes_per_token(MINI) == 4 * 2 * 2 * 32 * 2
    assert plan.kv_bytes_per_token(TINY) == 12 * 2 * 8 * 16 * 2


def test_split_shards_by_tp_and_ep():
    p = plan.plan_split(MINI, "int8", 10**9, batch=2, context=256, tp=2, ep=2)
    w = plan.weight_parts(MINI, "int8")
    assert p.weights == w["attention"] // 2 + w["experts"] // 4 + w["embedding"] // 2 + w["replicated"]
    assert p.weights == 3_593_472
    assert p.kv_cache == 2 * 256 * 1024 // 2  # KV heads split by TP, replicated over EP
    assert p.headroom == 2 * 10**9 + 0.05 * 10**9  # fixed + 5% of the device


def test_activations_by_hand():
    # mini, batch 2 x 256, TP 1: a 512-token prefill
    hidden = 4 * 512 * 256 * 2
    qkv = 512 * 12 * 32 * 2
    scores = 3 * 8 * 512 * 256 * 4
    moe = 3 * 512 * 344 * 2
    dequant = 3 * 344 * 256 * 2
    logits = 2 * 4096 * 4
    expected = hidden + qkv + scores + moe + dequant + logits
    assert plan.activation_bytes(MINI, "int8", 2, 256, 1) == expected == 15_642_624
    assert plan.activation_bytes(MINI, "bf16", 2, 256, 1) == expected - dequant


def test_valid_splits_and_errors():
    assert plan.splits(GROK1, "int8", 8) == [(8, 1), (4, 2), (2, 4), (1, 8)]
    assert plan.splits(GROK1, "int8", 16) == [(8, 2), (4, 4), (2, 8)]
    assert plan.splits(GROK1, "int8", 3) == []
    assert plan.splits(MINI, "int8", 4) == [(2, 2), (1, 4)]  # 2 KV heads
    assert "KV heads" in plan.split_error(GROK1, "int8", 16, 1)
    assert "3" in plan.split_error(GROK1, "int8", 3, 1)
    assert "experts" in plan.split_error(GROK1, "int8", 1, 3)
    assert "344" in plan.split_error(MINI, "int4", 1, 1)  # int4 needs multiples of 32
    assert plan.split_error(GROK1, "int4", 8, 1) is None


def test_best_split_and_devices_needed():
    gb = 10**9
    best = plan.best_split(GROK1, "int8", 8, 80 * gb, batch=8, context=8192)
    assert (best.tp, best.ep, best.fits) == (8, 1, True)
    assert round(best.weights / gb, 2) == 39.60
    none = plan.best_split(GROK1, "int8", 8, 24 * gb, batch=1, context=8192)
    assert not none.fits
    need = plan.devices_needed(GROK1, "int8", 24 * gb, batch=1, context=8192)
    assert need.fits and need.tp * need.ep == 32
    assert all(not p.fits for n in range(1, 32) if (p := plan.best_split(GROK1, "int8", n, 24 * gb, 1, 8192)))


def test_one_box_in_ram_or_mapped():
    gb = 10**9
    big = plan.plan_split(GROK1, "int8", 512 * gb, 1, 8192, 1, 1)
    assert plan.one_box(GROK1, "int8", big) == {"mode": "in memory", "page_in_gb_per_token": 0.0}
    small = plan.plan_split(GROK1, "int8", 256 * gb, 1, 8192, 1, 1)
    box = plan.one_box(GROK1, "int8", small)
    experts = plan.weight_parts(GROK1, "int8")["experts"]
    cached = 256 * gb - (small.total - experts)
    routed = experts // 8 * 2  # top-2 of 8 in every layer: 77.3 GB
    assert box["mode"] == "memory-mapped"
    assert box["experts_cached"] == round(cached / experts, 3)
    assert box["page_in_gb_per_token"] == round((1 - cached / experts) * routed / gb, 2)


def test_parse_size():
    assert plan.parse_size("80GB") == 80 * 10**9
    assert plan.parse_size("141 GB") == 141 * 10**9
    assert plan.parse_size("80GiB") == 80 * 2**30
    assert plan.parse_size("1.5TB") == 1.5 * 10**12
    assert plan.parse_size("512gb") == 512 * 10**9
    for bad in ("80", "eighty GB", "80XB", "0GB", "-1GB", ""):
        with pytest.raises(ValueError, match="--memory-per-device"):
            plan.parse_size(bad)


def test_constants_match_the_code_they_describe():
    from grok1 import model, quant
    from grok1.engine.engine import EngineConfig
    assert plan.RELEASE_GROUPS == quant.RELEASE_GROUPS
    assert plan.INT4_BLOCK == quant.INT4_BLOCK
    assert plan.ATTN_CHUNK == model.ATTN_CHUNK
    assert plan.PREFILL_TOKENS == EngineConfig().prefill_tokens


def test_make_plan_names_a_better_split_or_the_devices_needed():
    gb = 10**9
    p = plan.make_plan(GROK1, "int8", 8, 48 * gb, 1, 8192, tp=2, ep=4)
    assert p.given and not p.chosen.fits and (p.better.tp, p.better.ep) == (8, 1) and p.needed is None
    p = plan.make_plan(GROK1, "int8", 8, 24 * gb, 1, 8192)
    assert not p.given and not p.chosen.fits and p.better is None and p.needed.tp * p.needed.ep == 32
    p = plan.make_plan(GROK1, "int8", 8, 80 * gb, 1, 8192, ep=2)
    assert (p.chosen.tp, p.chosen.ep) == (4, 2) and p.chosen.fits and p.better is None and p.one_box is None
    with pytest.raises(ValueError, match="TP x EP must equal --devices 8"):
        plan.make_plan(GROK1, "int8", 8, 80 * gb, 1, 8192, tp=2, ep=2)
    with pytest.raises(ValueError, match="--context 9000"):
        plan.make_plan(GROK1, "int8", 8, 80 * gb, 1, 9000)
