"""The one table between checkpoint tensor names of other formats and our parameter names.

Our names (model.py): `tok_embeddings.weight`, `norm.weight`, and per layer `layers.{i}.` +
`attention.wqkv` (query, key and value fused along the output axis, in that order),
`attention.wo`, `attn_norm` / `attn_post_norm` / `moe_norm` / `moe_post_norm` (the four
sandwich norms), `moe.gate` (router), `moe.experts.w1` / `w3` / `w2` (gate / up / down).
An int8 matrix is two tensors: `X.weight` + `X.scales` for a linear layer, `w{i}` + `s{i}`
for the experts.

Reference (release) paths store matrices input-major `[.., in, out]`; ours are `[.., out, in]`
(torch's Linear convention). Scales have the same `[.., groups, out]` layout in both.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Entry:
    ours: str  # weight name, relative to `layers.{i}.` for layer entries
    scales: str | None  # our scales name for int8 matrices, else None
    part: int | None = None  # index in a fused tensor (wqkv: 0 = q, 1 = k, 2 = v)
    transpose: bool = False  # reference [.., in, out] -> ours [.., out, in]


# Release path (under `transformer/decoder_layer_{i}/` for layers) -> our tensor(s).
REFERENCE_LAYER: dict[str, Entry] = {
    "multi_head_attention/query/w": Entry("attention.wqkv.weight", "attention.wqkv.scales", 0, True),
    "multi_head_attention/key/w": Entry("attention.wqkv.weight", "attention.wqkv.scales", 1, True),
    "multi_head_attention/value/w": Entry("attention.wqkv.weight", "attention.wqkv.scales", 2, True),
    "multi_head_attention/linear/w": Entry("attention.wo.weight", "attention.wo.scales", None, True),
    "moe/linear/w": Entry("moe.experts.w1", "moe.experts.s1", None, True),
    "moe/linear_v/w": Entry("moe.experts.w3", "moe.experts.s3", None, True),
    "moe/linear_1/w": Entry("moe.experts.w2", "moe.experts.s2", None, True),
    "rms_norm/scale": Entry("attn_norm.weight", None),
    "rms_norm_1/scale": Entry("attn_post_norm.weight", None),
    "rms_norm_2/scale": Entry("moe_norm.weight", None),
    "rms_norm_3/scale": Entry("moe_post_norm.weight", None),
    "router/w": Entry("moe.gate.weight", None, None, True),
}

REFERENCE_GLOBAL: dict[str, Entry] = {
    "language_model/in_out_embed/embeddings": Entry("tok_embeddings.weight", None),
    "language_model/rms_norm/scale": Entry("norm.weight", None),
}

_LAYER_PREFIX = "transformer/decoder_layer_"


def from_reference(path: str) -> tuple[str, str | None, Entry]:
    """Release parameter path -> (our full weight name, our full scales name or None, entry)."""
    if path in REFERENCE_GLOBAL:
        e = REFERENCE_GLOBAL[path]
        return e.ours, e.scales, e
    if path.startswith(_LAYER_PREFIX):
        layer, _, rest = path[len(_LAYER_PREFIX):].partition("/")
        if layer.isdigit() and rest in REFERENCE_LAYER:
            e = REFERENCE_LAYER[rest]
            prefix = f"layers.{int(layer)}."
            return prefix + e.ours, (prefix + e.scales) if e.scales else None, e
    raise KeyError(f"unknown Grok-1 reference parameter path {path!r}")
