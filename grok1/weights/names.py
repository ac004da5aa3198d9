"""The one table between checkpoint tensor names of other formats and our parameter names.

Our names (model.py): `tok_embeddings.weight`, `norm.weight`, and per layer `layers.{i}.` +
`attention.wqkv` (query, key and value fused along the output axis, in that order),
`attention.wo`, `attn_norm` / `attn_post_norm` / `moe_norm` / `moe_post_norm` (the four
sandwich norms), `moe.gate` (router), `moe.experts.w1` / `w3` / `w2` (gate / up / down).
An int8 matrix is two tensors: `X.weight` + `X.scales` for a linear layer, `w{i}` + `s{i}`
for the experts.

Columns of `LAYER` (one row per tensor, or per part of the fused wqkv):

- reference: the release's Haiku path under `transformer/decoder_layer_{i}/`. Matrices and the
  router are stored input-major `[.., in, out]`; ours are `[.., out, in]` (torch's Linear), so
  they are transposed. Scales have the same `[.., groups, out]` layout in both.
- hf: the Hugging Face layout of hpcai-tech/grok-1, the one vLLM's `Grok1ForCausalLM` loads
  (vllm/model_executor/models/grok1.py), under `model.layers.{i}.`. `[out, in]` like ours; the
  experts are one tensor per expert (`{e}`). vLLM fuses q/k/v into `qkv_proj` at load, maps
  `linear` / `linear_v` / `linear_1` to its fused-MoE gate / up / down, renames `norm.scale` to
  `norm.weight`, and skips `lm_head` when `tie_word_embeddings` is true.
- sglang: the Mixtral-like layout SGLang's `Grok1ForCausalLM` loads (python/sglang/srt/models/
  grok.py; the lmzheng/grok-1 checkpoint), under `model.layers.{i}.`: `self_attn`, and
  `block_sparse_moe.experts.{e}.w1` (gate) / `w3` (up) / `w2` (down). SGLang never ties the
  output projection, so this layout also carries `lm_head.weight` (a copy of the embedding; SGLang
  multiplies it by `output_multiplier_scale` at load). llama.cpp's convert_hf_to_gguf.py reads
  this layout too.
- gguf: llama.cpp's "grok" architecture (gguf-py constants MODEL_ARCH.GROK), under `blk.{i}.`.
  numpy shapes equal ours (GGUF lists dimensions innermost first, so `[out, in]` is ne = {in, out});
  the embedding is tied: no `output.weight`, llama.cpp reuses `token_embd.weight`.

Global tensors are in `GLOBAL`. `config.json` fields of the HF layouts are in `weights/hf.py`,
the GGUF metadata keys in `weights/gguf.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

from grok1.config import ModelConfig


@dataclass(frozen=True)
class Row:
    ours: str  # our weight name, relative to `layers.{i}.` for layer rows
    part: int | None  # index in a fused tensor (wqkv: 0 = q, 1 = k, 2 = v)
    reference: str
    hf: str  # `{e}` = expert index
    sglang: str
    gguf: str
    transpose: bool = False  # reference [.., in, out] <-> ours [.., out, in]


LAYER: tuple[Row, ...] = (
    Row("attention.wqkv.weight", 0, "multi_head_attention/query/w", "attn.q_proj.weight",
        "self_attn.q_proj.weight", "attn_q.weight", True),
    Row("attention.wqkv.weight", 1, "multi_head_attention/key/w", "attn.k_proj.weight",
        "self_attn.k_proj.weight", "attn_k.weight", True),
    Row("attention.wqkv.weight", 2, "multi_head_attention/value/w", "attn.v_proj.weight",
        "self_attn.v_proj.weight", "attn_v.weight", True),
    Row("attention.wo.weight", None, "multi_head_attention/linear/w", "attn.o_proj.weight",
        "self_attn.o_proj.weight", "attn_output.weight", True),
    Row("moe.experts.w1", None, "moe/linear/w", "moe_block.experts.{e}.linear.weight",
        "block_sparse_moe.experts.{e}.w1.weight", "ffn_gate_exps.weight", True),
    Row("moe.experts.w3", None, "moe/linear_v/w", "moe_block.experts.{e}.linear_v.weight",
        "block_sparse_moe.experts.{e}.w3.weight", "ffn_up_exps.weight", True),
    Row("moe.experts.w2", None, "moe/linear_1/w", "moe_block.experts.{e}.linear_1.weight",
        "block_sparse_moe.experts.{e}.w2.weight", "ffn_down_exps.weight", True),
    Row("moe.gate.weight", None, "router/w", "moe_block.gate.weight", "block_sparse_moe.gate.weight",
        "ffn_gate_inp.weight", True),
    Row("attn_norm.weight", None, "rms_norm/scale", "pre_attn_norm.scale", "pre_attn_norm.weight",
        "attn_norm.weight"),
    Row("attn_post_norm.weight", None, "rms_norm_1/scale", "post_attn_norm.scale", "post_attn_norm.weight",
        "attn_output_norm.weight"),
    Row("moe_norm.weight", None, "rms_norm_2/scale", "pre_moe_norm.scale", "pre_moe_norm.weight",
        "ffn_norm.weight"),
    Row("moe_post_norm.weight", None, "rms_norm_3/scale", "post_moe_norm.scale", "post_moe_norm.weight",
        "layer_output_norm.weight"),
)

GLOBAL: tuple[Row, ...] = (
    Row("tok_embeddings.weight", None, "language_model/in_out_embed/embeddings", "model.embed_tokens.weight",
        "model.embed_tokens.weight", "token_embd.weight"),
    Row("norm.weight", None, "language_model/rms_norm/scale", "model.norm.scale", "model.norm.weight",
        "output_norm.weight"),
)

HF_LAYER_PREFIX = "model.layers.{i}."
GGUF_LAYER_PREFIX = "blk.{i}."
SGLANG_LM_HEAD = "lm_head.weight"  # the untied output projection SGLang needs (= the embedding)

# Our int8 weight name -> its scales name.
SCALES = {"attention.wqkv.weight": "attention.wqkv.scales", "attention.wo.weight": "attention.wo.scales",
          "moe.experts.w1": "moe.experts.s1", "moe.experts.w2": "moe.experts.s2", "moe.experts.w3": "moe.experts.s3"}


@dataclass(frozen=True)
class Entry:
    """One release path seen from our side (`from_reference`)."""

    ours: str  # weight name, relative to `layers.{i}.` for layer entries
    scales: str | None  # our scales name for int8 matrices, else None
    part: int | None = None
    transpose: bool = False


REFERENCE_LAYER: dict[str, Entry] = {r.reference: Entry(r.ours, SCALES.get(r.ours), r.part, r.transpose) for r in LAYER}
REFERENCE_GLOBAL: dict[str, Entry] = {r.reference: Entry(r.ours, None, r.part, r.transpose) for r in GLOBAL}

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


def unit_names(cfg: ModelConfig) -> list[str]:
    """Our weight names in model order (an int8 matrix's scales travel with their weight: `scales_name`)."""
    layer = list(dict.fromkeys(r.ours for r in LAYER))
    return ["tok_embeddings.weight", *(f"layers.{i}.{rel}" for i in range(cfg.n_layers) for rel in layer), "norm.weight"]


def scales_name(name: str) -> str | None:
    """Our full scales name of an int8 matrix's full weight name, or None for a tensor without scales."""
    _, rel = split_layer(name)
    return name.removesuffix(rel) + SCALES[rel] if rel in SCALES else None


def split_layer(name: str) -> tuple[int | None, str]:
    """Our full name -> (layer index or None for a global tensor, name relative to the layer)."""
    if name.startswith("layers."):
        layer, _, rest = name[len("layers."):].partition(".")
        return int(layer), rest
    return None, name


def rows(name: str) -> list[Row]:
    """The table rows of one of our full weight names (three for wqkv, in part order)."""
    layer, rel = split_layer(name)
    found = [r for r in (LAYER if layer is not None else GLOBAL) if r.ours == rel]
    if not found:
        raise KeyError(f"no name-table row for our tensor {name!r}")
    return found


def to_reference(name: str) -> list[tuple[str, Row]]:
    """Our full weight name -> [(release path, row)], one per fused part."""
    layer, _ = split_layer(name)
    prefix = "" if layer is None else f"{_LAYER_PREFIX}{layer}/"
    return [(prefix + r.reference, r) for r in rows(name)]


def column(row: Row, style: str, layer: int | None, expert: int | None = None) -> str:
    """The full name of a row in layout `style` ("hf", "sglang" or "gguf") for a layer (and expert)."""
    name = getattr(row, style).replace("{e}", str(expert))
    if layer is None:
        return name
    return (GGUF_LAYER_PREFIX if style == "gguf" else HF_LAYER_PREFIX).format(i=layer) + name


def tp_split_axis(name: str) -> int | None:
    """The axis a tensor-parallel rank slices in our [.., out, in] layout, or None when replicated.

    Column-parallel matrices (wqkv rows per q/k/v part, w1/w3 rows per expert) split their output
    axis: a rank's slice is one contiguous byte range per part or per expert. Row-parallel ones
    (wo, w2) split their input axis: one contiguous run of in/tp values per output row, and their
    8 scale groups run along that same axis, so 1, 2, 4 or 8 ranks each get whole groups. The
    embedding splits its vocabulary rows (one contiguous range). Norms and the router are replicated.
    """
    _, rel = split_layer(name)
    if rel in ("attention.wqkv.weight", "moe.experts.w1", "moe.experts.w3", "tok_embeddings.weight"):
        return -2
    if rel in ("attention.wo.weight", "moe.experts.w2"):
        return -1
    if rel in ("attention.wqkv.scales", "moe.experts.s1", "moe.experts.s3"):
        return -1  # scales [.., groups, out]: follow the output rows
    if rel in ("attention.wo.scales", "moe.experts.s2"):
        return -2  # follow the input groups
    return None
