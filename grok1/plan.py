"""The memory planner: what a Grok-1 model needs per device for a weight format, a TP x EP split, a batch and
a context, and the split that fits. Pure arithmetic on a ModelConfig; `grok1 plan` prints it.

Bytes per format (grok1's own formats, grok1/quant.py):
  int8  1 byte per weight + bf16 scales: one per output column for wqkv, w1, w3; 8 groups along the input
        axis for wo and w2 (the release's groups, quant.RELEASE_GROUPS)
  int4  two weights per byte + one bf16 scale per block of 32 inputs (0.5625 bytes per weight)
  bf16  2 bytes per weight
The embedding table is held in the compute dtype (bfloat16: the CUDA default; load_model casts the release's
float32 table), as are the KV cache and the activations. Norms and the router stay float32.

Sharding, as the parallelism of grok1/parallel (issue 14) places it: TP (tensor parallel, group size T)
splits the query and KV heads (wqkv, wo and the KV cache), the expert widths (w1, w3 by output, w2 by input,
with its 8 scale groups) and the tied embedding by vocabulary; EP (expert parallel, E) places n_experts / E
whole experts on each rank. Attention, the embedding and the KV cache are replicated across EP ranks (every
rank runs the same batch); norms and the router are replicated everywhere. T x E = devices.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from grok1.config import ModelConfig
from grok1.quant import FORMATS as STORED_FORMATS
from grok1.quant import INT4_BLOCK, RELEASE_GROUPS  # noqa: F401  INT4_BLOCK: inputs per int4 scale

FORMATS = tuple(f for f in STORED_FORMATS if f != "fp32")  # the formats worth planning a deployment in
COMPUTE_BYTES = 2  # bfloat16 embedding, KV cache and activations
PREFILL_TOKENS = 4096  # padded prompt tokens one prefill holds (engine.EngineConfig.prefill_tokens)
ATTN_CHUNK = 512  # queries per attention block in a prefill (model.ATTN_CHUNK)
HEADROOM_FIXED = 2e9  # CUDA context, NCCL buffers, compiled kernels / the OS and Python on a CPU box
HEADROOM_FRACTION = 0.05  # allocator fragmentation
GB = 1e9

_UNITS = {"mb": 1e6, "gb": 1e9, "tb": 1e12, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """'80GB', '141 GB', '80GiB', '1.5TB' -> bytes (GB = 10^9, GiB = 2^30)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([a-zA-Z]+)\s*", text)
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"--memory-per-device {text!r}: give a positive size with a unit, e.g. 80GB, 80GiB or "
                         "1.5TB (units: MB, GB, TB, MiB, GiB, TiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def matrix_bytes(n_out: int, n_in: int, fmt: str, groups: int = 1) -> int:
    """One [out, in] matrix in a stored format, scales included."""
    n = n_out * n_in
    if fmt == "int8":
        return n + 2 * groups * n_out
    if fmt == "int4":
        return n // 2 + 2 * (n // INT4_BLOCK)
    if fmt == "bf16":
        return 2 * n
    raise ValueError(f"--weights {fmt!r}: choose one of {', '.join(FORMATS)}")


def weight_parts(cfg: ModelConfig, fmt: str, embedding_bytes: int = COMPUTE_BYTES) -> dict[str, int]:
    """Whole-model weight bytes by how they shard: attention (TP), experts (TP and EP), embedding
    (vocab-parallel over TP), replicated (norms and router, float32)."""
    D, F, hd = cfg.dim, cfg.ffn_dim, cfg.head_dim
    g = RELEASE_GROUPS
    attention = (matrix_bytes((cfg.n_heads + 2 * cfg.n_kv_heads) * hd, D, fmt, g["wqkv"])
                 + matrix_bytes(D, cfg.n_heads * hd, fmt, g["wo"]))
    expert = (matrix_bytes(F, D, fmt, g["w1"]) + matrix_bytes(F, D, fmt, g["w3"])
              + matrix_bytes(D, F, fmt, g["w2"]))
    return {"attention": cfg.n_layers * attention,
            "experts": cfg.n_layers * cfg.n_experts * expert,
            "embedding": embedding_bytes * cfg.vocab_size * D,
            "replicated": 4 * (D + cfg.n_layers * (4 * D + D * cfg.n_experts))}


def device_weight_parts(cfg: ModelConfig, fmt: str, tp: int, ep: int) -> dict[str, int]:
    """weight_parts on one rank of a TP x EP split."""
    w = weight_parts(cfg, fmt)
    return {"attention": w["attention"] // tp, "experts": w["experts"] // (tp * ep),
            "embedding": w["embedding"] // tp, "replicated": w["replicated"]}


def split_error(cfg: ModelConfig, fmt: str, tp: int, ep: int) -> str | None:
    """Why TP x EP cannot shard this model in this format, or None."""
    if tp < 1 or ep < 1:
        return f"--tp {tp} --ep {ep}: both must be positive"
    if cfg.n_kv_heads % tp or cfg.n_heads % tp:
        return (f"--tp {tp}: TP must divide the {cfg.n_kv_heads} KV heads and {cfg.n_heads} query heads "
                f"(use one of {', '.join(map(str, _divisors(cfg.n_kv_heads)))})")
    groups = RELEASE_GROUPS["wo"]
    if fmt == "int8" and groups % tp and tp % groups:
        return f"--tp {tp}: the {groups} int8 scale groups of wo and w2 must split evenly over TP (or TP over them)"
    if cfg.vocab_size % tp:
        return f"--tp {tp}: TP must divide the vocabulary ({cfg.vocab_size}) for the vocab-parallel embedding"
    if fmt == "int4":
        # Inputs: D whole (wqkv, w1, w3 are split by output); wo's H * Hd and w2's F split by TP.
        for what, n, split in (("model dim", cfg.dim, 1), ("attention width", cfg.n_heads * cfg.head_dim, tp),
                               ("expert width", cfg.ffn_dim, tp)):
            if n % split or (n // split) % INT4_BLOCK:
                shard = f" / TP {split}" if split > 1 else ""
                return f"--weights int4: the {what} {n}{shard} is not a multiple of {INT4_BLOCK} (int4 scale blocks)"
    if cfg.ffn_dim % tp:
        return f"--tp {tp}: the expert width {cfg.ffn_dim} must be a multiple of TP"
    if cfg.n_experts % ep:
        return f"--ep {ep}: EP must divide the {cfg.n_experts} experts"
    return None


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def splits(cfg: ModelConfig, fmt: str, devices: int) -> list[tuple[int, int]]:
    """Every valid (TP, EP) with TP x EP = devices, largest TP first."""
    return [(t, devices // t) for t in reversed(_divisors(devices))
            if split_error(cfg, fmt, t, devices // t) is None]


def kv_bytes_per_token(cfg: ModelConfig) -> int:
    """layers x (K and V) x KV heads x head_dim x bf16: 256 KiB for Grok-1."""
    return cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim * COMPUTE_BYTES


def activation_bytes(cfg: ModelConfig, fmt: str, batch: int, context: int, tp: int) -> int:
    """Peak transient memory of one forward on a rank, the largest being a prefill of P padded tokens:
    the residual stream and branch buffers, the qkv projection, one attention block of scores (float32:
    scores, soft-capped, softmaxed), the experts' hidden activations with every token in one expert (worst
    case), one expert's matrices dequantised to bf16 on the torch path, and the decode logits."""
    P = min(batch * context, max(PREFILL_TOKENS, context))
    D, F = cfg.dim, cfg.ffn_dim // tp
    a = COMPUTE_BYTES
    hidden = 4 * P * D * a
    qkv = P * (cfg.n_heads + 2 * cfg.n_kv_heads) // tp * cfg.head_dim * a
    scores = 3 * (cfg.n_heads // tp) * min(P, ATTN_CHUNK) * context * 4
    moe = 3 * P * F * a  # gate, up, gelu(gate) * up of the tokens of one expert
    dequant = 3 * F * D * a if fmt != "bf16" else 0
    logits = batch * cfg.vocab_size * 4
    return hidden + qkv + scores + moe + dequant + logits


@dataclass(frozen=True)
class DevicePlan:
    """Memory of one device (bytes) for one split."""
    tp: int
    ep: int
    weights: int
    kv_cache: int
    activations: int
    headroom: int
    memory: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.headroom

    @property
    def fits(self) -> bool:
        return self.total <= self.memory


def plan_split(cfg: ModelConfig, fmt: str, memory: int, batch: int, context: int, tp: int, ep: int) -> DevicePlan:
    """Per-device bytes for TP x EP (the split must be valid: see split_error)."""
    err = split_error(cfg, fmt, tp, ep)
    if err:
        raise ValueError(err)
    weights = sum(device_weight_parts(cfg, fmt, tp, ep).values())
    kv = batch * context * kv_bytes_per_token(cfg) // tp
    headroom = int(HEADROOM_FIXED + HEADROOM_FRACTION * memory)
    return DevicePlan(tp, ep, weights, kv, activation_bytes(cfg, fmt, batch, context, tp), headroom, memory)


def best_split(cfg: ModelConfig, fmt: str, devices: int, memory: int, batch: int,
               context: int) -> DevicePlan | None:
    """The valid split with the least memory per device (TP shards everything, EP only the experts), or
    None when no split of this many devices exists."""
    plans = [plan_split(cfg, fmt, memory, batch, context, t, e) for t, e in splits(cfg, fmt, devices)]
    return min(plans, key=lambda p: (p.total, -p.tp), default=None)


def devices_needed(cfg: ModelConfig, fmt: str, memory: int, batch: int, context: int,
                   limit: int = 1024) -> DevicePlan | None:
    """The smallest device count (and its best split) that fits, or None up to `limit` devices."""
    for n in range(1, limit + 1):
        p = best_split(cfg, fmt, n, memory, batch, context)
        if p is not None and p.fits:
            return p
    return None


def routed_bytes_per_token(cfg: ModelConfig, fmt: str) -> int:
    """Expert bytes one decoded token reads: its top-k experts in every layer."""
    return weight_parts(cfg, fmt)["experts"] // cfg.n_experts * cfg.n_active_experts


def one_box(cfg: ModelConfig, fmt: str, plan: DevicePlan) -> dict:
    """One device (a CPU box): do the weights fit in RAM, or run memory-mapped from disk? When mapped,
    the page cache keeps what memory is left after everything else; a decoded token then pages in its
    routed experts that are not resident (uniform routing assumed: the fraction of experts not cached)."""
    if plan.fits:
        return {"mode": "in memory", "page_in_gb_per_token": 0.0}
    w = weight_parts(cfg, fmt)
    other = plan.total - w["experts"]  # everything but the experts stays resident
    cached = max(0, min(w["experts"], plan.memory - other))
    miss = 1 - cached / w["experts"]
    return {"mode": "memory-mapped", "experts_cached": round(1 - miss, 3),
            "page_in_gb_per_token": round(miss * routed_bytes_per_token(cfg, fmt) / GB, 2)}


def to_json(plan: DevicePlan) -> dict:
    d = asdict(plan)
    out = {"tp": d.pop("tp"), "ep": d.pop("ep")}
    out.update({f"{k}_gb": round(v / GB, 3) for k, v in d.items()})
    return out | {"total_gb": round(plan.total / GB, 3), "fits": plan.fits}


def resolve_split(cfg: ModelConfig, fmt: str, devices: int, tp: int | None, ep: int | None) -> tuple[int, int] | None:
    """Check --tp/--ep against the device count and the model (one of them may be omitted), or, with neither,
    that some split exists; returns (TP, EP), or None to pick the best. Raises ValueError naming the flag."""
    given = " ".join(f"--{k} {v}" for k, v in (("tp", tp), ("ep", ep)) if v is not None)
    if devices < 1:
        raise ValueError(f"--devices must be a positive integer, got {devices}")
    if split_error(cfg, fmt, 1, 1):  # the format does not fit the model's shapes at all
        raise ValueError(split_error(cfg, fmt, 1, 1))
    if tp is None and ep is None:
        if not splits(cfg, fmt, devices):
            raise ValueError(f"--devices {devices}: no TP x EP split uses {devices} devices (TP must divide the "
                             f"{cfg.n_kv_heads} KV heads, EP the {cfg.n_experts} experts)")
        return None
    if (tp is not None and tp < 1) or (ep is not None and ep < 1):
        raise ValueError(f"{given}: TP and EP must be positive")
    tp = devices // ep if tp is None else tp
    ep = devices // tp if ep is None else ep
    if tp * ep != devices:
        raise ValueError(f"{given}: TP x EP must equal --devices {devices}")
    err = split_error(cfg, fmt, tp, ep)
    if err:
        raise ValueError(err)
    return tp, ep


@dataclass(frozen=True)
class Plan:
    chosen: DevicePlan  # the given split, or the best one
    given: bool  # the split came from --tp/--ep
    better: DevicePlan | None  # the given split does not fit, this one does
    needed: DevicePlan | None  # no split of these devices fits: the fewest devices that do
    one_box: dict | None  # one device: in RAM or memory-mapped (see one_box)


def make_plan(cfg: ModelConfig, fmt: str, devices: int, memory: int, batch: int, context: int,
              tp: int | None = None, ep: int | None = None) -> Plan:
    """The whole answer of `grok1 plan` (validates its inputs: ValueError naming the flag)."""
    if batch < 1 or context < 1:
        raise ValueError(f"--batch and --context must be positive integers, got {batch} and {context}")
    if context > cfg.max_seq_len:
        raise ValueError(f"--context {context}: the model holds at most {cfg.max_seq_len} tokens")
    split = resolve_split(cfg, fmt, devices, tp, ep)
    best = best_split(cfg, fmt, devices, memory, batch, context)
    assert best is not None
    chosen = best if split is None else plan_split(cfg, fmt, memory, batch, context, *split)
    better = best if not chosen.fits and best.fits else None  # best has the least memory: if it fails, all do
    needed = None if best.fits else devices_needed(cfg, fmt, memory, batch, context)
    box = one_box(cfg, fmt, chosen) if devices == 1 else None
    return Plan(chosen, split is not None, better, needed, box)
