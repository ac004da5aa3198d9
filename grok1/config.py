"""ModelConfig: the architecture facts of a Grok-1 model, named presets, and `resolve_config` (which one a
command line means: a config file, a preset, or the config.json beside a checkpoint).

Runtime knobs (batch size, dtype, device, parallelism) are not here: they live in
`engine.engine.EngineConfig`; sampling knobs live in `engine.sampling.SamplingParams`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

LIMITS = {"vocab_size": 1 << 21, "dim": 1 << 16, "n_layers": 1024, "n_heads": 1024, "n_kv_heads": 1024,
          "head_dim": 1024, "n_experts": 1024, "n_active_experts": 1024, "ffn_dim": 1 << 20, "max_seq_len": 1 << 21}


def _short(value: object) -> str:
    """A config value for an error message, cut short (a config file may hold anything)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def ffn_size(widening_factor: float, dim: int) -> int:
    """Expert width as the reference derives it: int(w * D) * 2 // 3, rounded up to a multiple of 8."""
    f = int(widening_factor * dim) * 2 // 3
    return f + (8 - f) % 8


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 131072
    dim: int = 6144  # d_model ("emb_size")
    n_layers: int = 64
    n_heads: int = 48  # query heads
    n_kv_heads: int = 8  # query head n uses KV head n // (n_heads // n_kv_heads)
    head_dim: int = 128  # "key_size"; value size is the same
    n_experts: int = 8
    n_active_experts: int = 2  # top-k ("num_selected_experts")
    ffn_dim: int = 32768  # expert hidden width
    embedding_multiplier: float = 78.38367176906169  # sqrt(6144), on input embeddings
    output_multiplier: float = 0.5773502691896257  # 1/sqrt(3), on logits
    attn_scale: float = 0.08838834764831845  # "attn_output_multiplier": the QK logit scale
    attn_softcap: float = 30.0  # logits -> cap * tanh(logits / cap), before masking
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    max_seq_len: int = 8192
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self) -> None:
        # Bounds far above any real model (Grok-1: 131072, 6144, 64, 48, 8, 128, 8, 2, 32768, 8192) but low enough
        # that a config can never make building the model (even on the meta device) exhaust memory.
        for name, most in LIMITS.items():
            value = getattr(self, name)
            if type(value) is not int or not 0 < value <= most:
                raise ValueError(f"ModelConfig.{name} must be an integer in 1..{most}, got {_short(value)}")
        for name in ("embedding_multiplier", "output_multiplier", "attn_scale", "attn_softcap", "norm_eps",
                     "rope_base"):
            value = getattr(self, name)
            if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"ModelConfig.{name} must be a finite number >= 0, got {_short(value)}")
        if self.norm_eps <= 0 or self.rope_base <= 0:
            raise ValueError(f"ModelConfig.norm_eps and rope_base must be > 0, got {self.norm_eps}, {self.rope_base}")
        for name in ("pad_id", "bos_id", "eos_id"):
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value < self.vocab_size:
                raise ValueError(f"ModelConfig.{name} must be a token id in 0..{self.vocab_size - 1}, "
                                 f"got {_short(value)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"ModelConfig.n_heads ({self.n_heads}) must be a multiple of "
                             f"n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if self.n_active_experts > self.n_experts:
            raise ValueError(f"ModelConfig.n_active_experts ({self.n_active_experts}) exceeds "
                             f"n_experts ({self.n_experts})")

    # Parameter counts, from shapes (no biases; tied embedding counted once).
    def attention_params(self) -> int:
        return self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)

    def expert_params(self) -> int:
        return 3 * self.dim * self.ffn_dim  # one expert: gate, up, down

    def layer_params(self) -> int:
        return (self.attention_params() + self.n_experts * self.expert_params()
                + self.dim * self.n_experts + 4 * self.dim)

    def num_params(self) -> int:
        return self.vocab_size * self.dim + self.dim + self.n_layers * self.layer_params()

    def active_params(self) -> int:
        """Parameters touched per token: top-k experts, and the embedding once (tied: read as the head)."""
        per_layer = self.layer_params() - (self.n_experts - self.n_active_experts) * self.expert_params()
        return self.vocab_size * self.dim + self.dim + self.n_layers * per_layer

    def weight_bytes(self, embedding_bytes: int = 4, scale_groups: int = 8) -> int:
        """Bytes in memory with int8 matrices as released (bf16 scales, at most `scale_groups` per
        output), the embedding at `embedding_bytes` per value, float32 norms and router."""
        matrices = self.n_layers * (self.attention_params() + self.n_experts * self.expert_params())
        outputs = self.n_layers * (self.head_dim * (self.n_heads + 2 * self.n_kv_heads) + self.dim
                                   + self.n_experts * (2 * self.ffn_dim + self.dim))
        small = self.dim + self.n_layers * (4 * self.dim + self.dim * self.n_experts)
        return (matrices + 2 * scale_groups * outputs + embedding_bytes * self.vocab_size * self.dim
                + 4 * small)

    def kv_cache_bytes(self, batch: int, seq_len: int, dtype_bytes: int = 4) -> int:
        return 2 * self.n_layers * batch * seq_len * self.n_kv_heads * self.head_dim * dtype_bytes

    # The reference (run.py) config format.
    @classmethod
    def from_reference_json(cls, path: str | Path) -> ModelConfig:
        """Read a config written with the release's run.py field names (e.g. shared/golden/tiny-config.json)."""
        path = Path(path)
        if path.exists() and not path.is_file():  # a FIFO would block the read forever
            raise ValueError(f"model config {path}: not a regular file")
        try:
            raw = json.loads(path.read_bytes())
        except OSError as e:
            raise ValueError(f"cannot read model config {path}: {e.strerror or e}") from None
        except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError, nesting deeper than the stack
            raise ValueError(f"model config {path}: not valid JSON") from None
        if not isinstance(raw, dict):
            raise ValueError(f"model config {path}: expected a JSON object")
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> ModelConfig:
        """Accept either our field names or the reference's run.py names (not both for one field)."""
        if not isinstance(raw, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in raw.items():
            name = _REFERENCE_NAMES.get(key, key)
            if name in fields:
                if name in kwargs and kwargs[name] != value:
                    raise ValueError(f"{source}: field {key!r} conflicts with another name for {name!r}")
                kwargs[name] = value
        if "ffn_dim" not in kwargs and "widening_factor" in raw:
            w, d = raw["widening_factor"], kwargs.get("dim", cls.dim)
            if type(w) not in (int, float) or not 0 < w <= 64 or type(d) is not int or not 0 < d <= LIMITS["dim"]:
                raise ValueError(f"{source}: widening_factor must be a number in (0, 64] (and dim an integer), "
                                 f"got {_short(w)}")
            kwargs["ffn_dim"] = ffn_size(w, d)
        missing = [k for k in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim")
                   if k not in kwargs]
        if missing:
            raise ValueError(f"{source}: missing field(s) {', '.join(missing)}")
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# run.py / golden config field name -> ModelConfig field name.
_REFERENCE_NAMES = {
    "emb_size": "dim",
    "num_layers": "n_layers",
    "num_q_heads": "n_heads",
    "num_kv_heads": "n_kv_heads",
    "key_size": "head_dim",
    "num_experts": "n_experts",
    "num_selected_experts": "n_active_experts",
    "ffn_size": "ffn_dim",
    "attn_output_multiplier": "attn_scale",
    "embedding_multiplier_scale": "embedding_multiplier",
    "output_multiplier_scale": "output_multiplier",
    "attn_logit_softcap": "attn_softcap",
    "rms_norm_eps": "norm_eps",
    "sequence_len": "max_seq_len",
    "pad_token": "pad_id",
    "eos_token": "eos_id",
    "bos_token_in_tokenizer": "bos_id",
}

_GROK1 = ModelConfig()

PRESETS: dict[str, ModelConfig] = {
    # The March 2024 release.
    "grok-1": _GROK1,
    # Same shapes as shared/golden/tiny-config.json: every feature, 12 layers so the
    # checkpoint's lexicographic layer order (0, 1, 10, 11, 2, ...) is exercised.
    "tiny": dataclasses.replace(_GROK1, dim=32, n_layers=12, n_heads=16, n_kv_heads=8, head_dim=16,
                                ffn_dim=ffn_size(8, 32)),
    # The bundled demo model (grok1/assets/grok-1-mini, trained on Jane Austen by scripts/make_demo_model.py):
    # every Grok-1 feature at small scale: sandwich norms, soft-cap 30, GQA (4 query heads per KV head),
    # 8 experts with top-2, tied embedding x sqrt(D) on input, logits x 1/sqrt(3), QK scale 1/sqrt(Hd).
    "grok-1-mini": dataclasses.replace(_GROK1, vocab_size=4096, dim=256, n_layers=4, n_heads=8, n_kv_heads=2,
                                       head_dim=32, n_experts=8, n_active_experts=2, ffn_dim=ffn_size(2, 256),
                                       embedding_multiplier=256**0.5, attn_scale=32**-0.5, max_seq_len=256),
    # The two scaled configs of shared/BENCH.md (random weights, for benchmarks).
    "bench-s": dataclasses.replace(_GROK1, dim=512, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=64,
                                   ffn_dim=1376),
    "bench-m": dataclasses.replace(_GROK1, dim=1024, n_layers=8, n_heads=8, n_kv_heads=2, head_dim=128,
                                   ffn_dim=5472),
}


def from_name(name: str) -> ModelConfig:
    """Exact preset lookup; the error lists the valid names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}") from None


def resolve_config(checkpoint: str | Path | None, config: str | Path | None = None,
                   preset: str | None = None) -> ModelConfig:
    """--config JSON wins, then --preset, then a config.json next to the checkpoint."""
    if config is not None and preset is not None:
        raise ValueError("give either a config file or a preset, not both")
    if config is not None:
        return ModelConfig.from_reference_json(config)
    if preset is not None:
        return from_name(preset)
    if checkpoint is not None:
        for candidate in (Path(checkpoint) / "config.json", Path(checkpoint).parent / "config.json"):
            if candidate.is_file():
                return ModelConfig.from_reference_json(candidate)
    raise ValueError(f"no model config found next to checkpoint {checkpoint}: pass --config FILE or --preset NAME")
