"""The models the parallel tests compare: the golden release-format checkpoint, the bundled demo model, and
a small random model stored in each weight format. Used by the test process (one rank) and by the workers."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from grok1.config import PRESETS, ModelConfig
from grok1.model import Transformer, init_weights
from grok1.panels import pack_model
from grok1.quant import quantize_embedding, quantize_model
from grok1.weights.load import load_model

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO.parent / "shared" / "golden"
DEMO = REPO / "grok1" / "assets" / "grok-1-mini"

PROMPTS = {
    "golden": [[422, 3033, 356, 1180, 333, 9072, 360, 2175, 391, 359, 1805], [422, 4073, 359, 5827, 391]],
    "demo": [[611, 389, 282, 1921, 493, 4032, 1194, 575, 2737], [382, 4049, 1063]],  # Austen openings
    "small": [[5, 17, 99, 250, 300, 41, 7], [11, 12]],
}


def small_config() -> ModelConfig:
    # 4 KV heads (TP up to 4), F = 128 (int4 blocks split over 2 and 4 ranks), 8 experts.
    return dataclasses.replace(PRESETS["tiny"], vocab_size=512, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=32,
                               dim=64, ffn_dim=256, max_seq_len=128)


def build(name: str, fmt: str | None = None, mesh=None, pack: bool = False) -> Transformer:
    """The model `name` ("golden", "demo", or "small" with matrices in `fmt`), float32 compute; with `mesh`,
    loaded sliced for this rank (golden, demo)."""
    if name == "golden":
        cfg = ModelConfig.from_reference_json(GOLDEN / "tiny-config.json")
        return load_model(GOLDEN / "tiny-ckpt", cfg, "cpu", torch.float32, pack=pack, mesh=mesh).eval()
    if name == "demo":
        cfg = ModelConfig.from_reference_json(DEMO / "config.json")
        return load_model(DEMO, cfg, "cpu", torch.float32, pack=pack, mesh=mesh).eval()
    model = Transformer(small_config())
    init_weights(model, torch.Generator().manual_seed(7))
    if fmt and fmt != "dense":
        quantize_model(model, fmt)
        quantize_embedding(model, "int8" if fmt in ("int8", "int4") else fmt)
    return model.eval()


def single(name: str, fmt: str | None = None, pack: bool = False) -> Transformer:
    model = build(name, fmt, pack=pack)
    return pack_model(model) if pack and name == "small" else model


@torch.inference_mode()
def greedy(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens after `prompt`, decoded through the KV cache (prefill, then one token per step)."""
    cache = model.new_cache(1, len(prompt) + n)
    logits = model(torch.tensor([prompt]), torch.zeros(1, dtype=torch.long), cache)[0, -1]
    out = []
    for i in range(n):
        out.append(int(logits.argmax()))
        logits = model(torch.tensor([[out[-1]]]), torch.tensor([len(prompt) + i]), cache)[0, -1]
    return out

