"""The Hugging Face layouts of Grok-1 that vLLM and SGLang load: config.json and tensor names.

Two layouts exist (tensor names in `names.py`, columns "hf" and "sglang"):

- "vllm": hpcai-tech/grok-1's, loaded by vLLM's `Grok1ForCausalLM` (registered for the
  architectures `Grok1ModelForCausalLM` and `Grok1ForCausalLM`): `attn.{q,k,v,o}_proj`,
  `moe_block.gate`, `moe_block.experts.{e}.{linear,linear_v,linear_1}`, `*_norm.scale`, tied
  output (no `lm_head.weight`, `tie_word_embeddings: true`).
- "sglang": the Mixtral-like one SGLang's `Grok1ForCausalLM` loads: `self_attn.{q,k,v,o}_proj`,
  `block_sparse_moe.gate`, `block_sparse_moe.experts.{e}.{w1,w3,w2}`, `*_norm.weight`, and an
  explicit `lm_head.weight` (SGLang never ties it).

Both are `[out, in]` bfloat16 (or float32) safetensors shards with `model.safetensors.index.json`.
int8 is not offered: neither port reads the release's grouped int8 scales, so int8 weights are
dequantised exactly (bf16(int8 * scale), the reference's own bf16 weights).

config.json fields written (the union both ports and llama.cpp's converter read):
`architectures`, `model_type` "grok-1", `vocab_size`, `hidden_size`, `intermediate_size` and
`moe_intermediate_size` (expert width), `num_hidden_layers`, `num_attention_heads`,
`num_key_value_heads`, `head_dim`, `num_experts` (vLLM, hpcai-tech) and `num_local_experts`
(SGLang, llama.cpp), `num_experts_per_tok`, `attn_output_multiplier`, `embedding_multiplier_scale`,
`output_multiplier_scale`, `attn_logit_softcapping` (vLLM, SGLang) and `max_attn_value`
(hpcai-tech) for the soft-cap, `max_position_embeddings`, `rms_norm_eps`, `rope_theta`,
`pad/bos/eos_token_id`, `tie_word_embeddings`, `torch_dtype`, and a `grok1` block with our exact
ModelConfig (read back first, so a round trip is exact).

How the ports differ from the reference (what `compat_notes` reports for a config):
- both hard-code a router soft-cap `30 tanh(logits / 30)` the reference does not have (close to
  the identity for router logits well below 30, not equal);
- vLLM renormalises the top-2 gates to sum to 1 (the reference does not; SGLang does not either).
  The MoE output is multiplied by 1 / (p1 + p2) per token, and the post-MoE RMSNorm divides any
  per-token scale c out again: rms(c y) = c rms(y), so norm(c y) = norm(y) up to the epsilon
  (c y / sqrt(c^2 ms + eps) vs y / sqrt(ms + eps)): equal within a relative eps / (2 mean(y^2));
- vLLM multiplies the attention output by `attn_output_multiplier` as well: a constant the
  post-attention RMSNorm removes the same way;
- both use `head_dim ** -0.5` as the QK scale (the reference: `attn_output_multiplier`), and
  vLLM derives `head_dim = hidden_size / num_attention_heads`: faithful only when those agree.
"""

from __future__ import annotations

import torch
from torch import Tensor

from grok1.config import ModelConfig
from grok1.weights import names

LAYOUTS = {"vllm": "hf", "sglang": "sglang"}  # layout -> names.py column
ARCHITECTURES = {"vllm": "Grok1ModelForCausalLM", "sglang": "Grok1ForCausalLM"}


def hf_config(cfg: ModelConfig, layout: str, dtype: torch.dtype) -> dict:
    """config.json of the HF layout `layout` ("vllm" or "sglang")."""
    return {
        "architectures": [ARCHITECTURES[layout]], "model_type": "grok-1",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim,
        "moe_intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "num_experts": cfg.n_experts, "num_local_experts": cfg.n_experts, "num_experts_per_tok": cfg.n_active_experts,
        "attn_output_multiplier": cfg.attn_scale, "embedding_multiplier_scale": cfg.embedding_multiplier,
        "output_multiplier_scale": cfg.output_multiplier, "attn_logit_softcapping": cfg.attn_softcap,
        "max_attn_value": cfg.attn_softcap, "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_base, "pad_token_id": cfg.pad_id, "bos_token_id": cfg.bos_id, "eos_token_id": cfg.eos_id,
        "tie_word_embeddings": layout == "vllm", "torch_dtype": str(dtype).removeprefix("torch."),
        "grok1": {"format": 1, "layout": layout, "config": cfg.to_dict()},
    }


def config_from_hf(raw: dict, source: str) -> ModelConfig:
    """ModelConfig from an HF config.json: our exact block when present, else the HF fields."""
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: expected a JSON object")
    if isinstance(raw.get("grok1"), dict) and isinstance(raw["grok1"].get("config"), dict):
        return ModelConfig.from_dict(raw["grok1"]["config"], source=source)
    pick = {"vocab_size": "vocab_size", "hidden_size": "dim", "num_hidden_layers": "n_layers",
            "num_attention_heads": "n_heads", "num_key_value_heads": "n_kv_heads", "head_dim": "head_dim",
            "num_experts_per_tok": "n_active_experts", "moe_intermediate_size": "ffn_dim",
            "attn_output_multiplier": "attn_scale", "embedding_multiplier_scale": "embedding_multiplier",
            "output_multiplier_scale": "output_multiplier", "rms_norm_eps": "norm_eps", "rope_theta": "rope_base",
            "max_position_embeddings": "max_seq_len", "pad_token_id": "pad_id", "bos_token_id": "bos_id",
            "eos_token_id": "eos_id"}
    fields = {ours: raw[theirs] for theirs, ours in pick.items() if raw.get(theirs) is not None}
    fields.setdefault("ffn_dim", raw.get("intermediate_size"))
    fields["n_experts"] = raw.get("num_local_experts", raw.get("num_experts", 8))
    fields["attn_softcap"] = raw.get("attn_logit_softcapping", raw.get("max_attn_value", 30.0))
    if "head_dim" not in fields and type(raw.get("hidden_size")) is int and type(raw.get("num_attention_heads")) is int \
            and raw["num_attention_heads"] > 0:
        fields["head_dim"] = raw["hidden_size"] // raw["num_attention_heads"]
    return ModelConfig.from_dict({k: v for k, v in fields.items() if v is not None}, source=source)


def compat_notes(cfg: ModelConfig) -> list[str]:
    """What vLLM / SGLang will compute differently from the reference for this config (module doc)."""
    notes = ["vLLM and SGLang apply a router soft-cap 30*tanh(x/30) that the reference lacks",
             ("vLLM renormalises the top-2 gates and scales the attention output by attn_output_multiplier "
             "(both removed by the post-norms up to eps)")]
    if abs(cfg.attn_scale - cfg.head_dim ** -0.5) > 1e-12:
        notes.append(f"QK scale: the ports use head_dim**-0.5 = {cfg.head_dim ** -0.5:.6g}, this model "
                     f"{cfg.attn_scale:.6g}: their logits will differ")
    if cfg.dim != cfg.n_heads * cfg.head_dim:
        notes.append(f"hidden_size {cfg.dim} != heads x head_dim {cfg.n_heads * cfg.head_dim}: vLLM derives "
                     "head_dim = hidden_size / heads and cannot load it")
    return notes


def part_rows(cfg: ModelConfig) -> list[tuple[int, int]]:
    """Output-row ranges of q, k, v inside our fused wqkv."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return [(0, q), (q, q + kv), (q + kv, q + 2 * kv)]


def tensor_names(name: str, cfg: ModelConfig, layout: str) -> list[tuple[str, int | None, int | None]]:
    """HF tensors of one of our weights: [(HF name, wqkv part or None, expert or None)], in file order."""
    layer, _ = names.split_layer(name)
    col = LAYOUTS[layout]
    out: list[tuple[str, int | None, int | None]] = []
    for row in names.rows(name):
        experts = range(cfg.n_experts) if "{e}" in getattr(row, col) else [None]
        out += [(names.column(row, col, layer, e), row.part, e) for e in experts]
    if layout == "sglang" and name == "tok_embeddings.weight":
        out.append((names.SGLANG_LM_HEAD, None, None))
    return out


def detect_layout(tensors: dict[str, Tensor] | set[str]) -> str:
    for layout, col in LAYOUTS.items():
        if names.column(names.LAYER[0], col, 0) in tensors:
            return layout
    raise ValueError("not a Grok-1 HF layout: no model.layers.0.attn.q_proj.weight (vLLM) or "
                     "model.layers.0.self_attn.q_proj.weight (SGLang)")
