"""LoRA adapters applied from outside the model, on a float or a quantized (int8) base.

`apply_lora(model, ...)` freezes every base weight and wraps the chosen matrices:
attention `wqkv` / `wo` become LoRALinear (y = base(x) + s * x A^T B^T), and the experts become
LoRAExperts, which hand the MoE routing the per-expert weights W_e + s * B_e A_e through the same
weight getter the model uses, so routing code is untouched. The base may be int8 (the quant.py
modules): it stays int8 in memory and is dequantised on the fly, only the float32 adapters train.
s = alpha / rank; B starts at zero, so a fresh adapter changes nothing.

Quantized modules run a compiled kernel that has no backward, so while gradients flow every
quantized matrix on the path (targeted or not) is applied as its dequantised dense weight; with
gradients off (evaluation, generation) the base module's own fast forward is used.

Shape letters: E experts, F expert width, D model dim, r rank, I/O a matrix's input/output width.

Adapters are saved alone (adapter.safetensors + adapter.json), loaded on top of a base, or
merged into it (`merge_lora`), after which the model is a plain model again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

from grok1 import quant
from grok1.config import ModelConfig
from grok1.fileio import write_atomic
from grok1.model import Experts, Transformer, route_to_experts

TARGETS = ("wqkv", "wo", "w1", "w2", "w3")
GROUPS = {"attention": ("wqkv", "wo"), "experts": ("w1", "w2", "w3"), "all": TARGETS}


def parse_targets(spec: str | Sequence[str]) -> tuple[str, ...]:
    """'wqkv,wo' or 'attention,experts' or 'all' -> the matrix names, in TARGETS order."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    chosen = set()
    for n in (n.strip() for n in names if n.strip()):
        if n not in TARGETS and n not in GROUPS:
            raise ValueError(f"unknown LoRA target {n!r}; choose from {', '.join(TARGETS + tuple(GROUPS))}")
        chosen.update(GROUPS.get(n, (n,)))
    if not chosen:
        raise ValueError("no LoRA targets given")
    return tuple(t for t in TARGETS if t in chosen)


def is_quantized(module: nn.Module) -> bool:
    """A quant.py module: weights held as buffers with scales (linear: weight/scales; experts: w1../s1..)."""
    return "scales" in module._buffers or "s1" in module._buffers


def dense(weight: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    """A stored matrix (int8 + scales, another packed format, or float) as a dense weight in dtype."""
    if weight.dtype == torch.int8:
        return quant.dequantize(weight, scales, dtype)
    if weight.is_floating_point():
        return weight.to(dtype)
    return quant.unpack(weight, scales, dtype)  # other packed formats (e.g. int4)


def _linear_weight(base: nn.Module, dtype: torch.dtype) -> Tensor:
    return dense(base.weight, base.scales, dtype) if is_quantized(base) else base.weight.to(dtype)


def _needs_grad_path(module: nn.Module, x: Tensor) -> bool:
    return is_quantized(module) and torch.is_grad_enabled() and x.requires_grad


def _lora_pair(lead: tuple[int, ...], out: int, inp: int, rank: int, generator: torch.Generator | None,
               device: torch.device) -> tuple[nn.Parameter, nn.Parameter]:
    a = torch.randn(*lead, rank, inp, generator=generator) * inp**-0.5  # [.., r, I]
    return nn.Parameter(a.to(device)), nn.Parameter(torch.zeros(*lead, out, rank, device=device))  # B [.., O, r]


class LoRALinear(nn.Module):
    """base(x) + scale * (x @ A^T) @ B^T around a frozen linear (nn.Linear or quantized).
    With rank 0 there is no adapter: the wrapper only makes a quantized base differentiable in x."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.base, self.rank, self.scale = base, rank, alpha / max(rank, 1)
        if rank:
            out, inp = base.weight.shape[0], base.in_features
            self.lora_A, self.lora_B = _lora_pair((), out, inp, rank, generator, base.weight.device)

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, _linear_weight(self.base, x.dtype)) if _needs_grad_path(self.base, x) else self.base(x)
        if not self.rank:
            return y
        return y + F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype)) * self.scale

    def merged_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """W + scale * B A  [O, I], from the dequantised weight when the base is quantized."""
        w = _linear_weight(self.base, torch.float32)
        if self.rank:
            w = w + self.scale * (self.lora_B.detach().float() @ self.lora_A.detach().float())
        return w.to(dtype)


class LoRAExperts(nn.Module):
    """Experts (float or quantized) with per-expert adapters on a subset `which` of w1 [E, F, D],
    w2 [E, D, F], w3 [E, F, D] (possibly none: then it only makes a quantized base differentiable)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, which: Sequence[str],
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.base, self.rank, self.scale, self.which = base, rank, alpha / max(rank, 1), tuple(which)
        self.n_experts = base.n_experts
        for name in self.which:
            E, out, inp = getattr(base, name).shape
            a, b = _lora_pair((E,), out, inp, rank, generator, getattr(base, name).device)
            setattr(self, f"lora_A{name[1]}", a)  # [E, r, I]
            setattr(self, f"lora_B{name[1]}", b)  # [E, O, r]

    def expert_weights(self, idx: Tensor | int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        ws = list(self.base.expert_weights(idx, dtype))  # dense base weights, no gradient
        for name in self.which:
            i = int(name[1])
            a, b = getattr(self, f"lora_A{i}")[idx], getattr(self, f"lora_B{i}")[idx]  # [.., r, I], [.., O, r]
            ws[i - 1] = ws[i - 1] + (b.to(dtype) @ a.to(dtype)) * self.scale
        return ws[0], ws[1], ws[2]

    def forward(self, x_ND: Tensor, idx_NA: Tensor, gate_NA: Tensor) -> Tensor:
        if not self.which and not _needs_grad_path(self.base, x_ND):
            return self.base(x_ND, idx_NA, gate_NA)  # the base's own (fast) path
        return route_to_experts(self.expert_weights, x_ND, idx_NA, gate_NA, self.n_experts)


def apply_lora(model: Transformer, rank: int = 8, alpha: float = 16.0, targets: Sequence[str] = ("wqkv", "wo"),
               seed: int = 0) -> None:
    """Freeze every parameter of `model` and wrap the `targets` matrices of every layer with
    trainable LoRA adapters (float32); quantized matrices that are not targeted get an adapter-free
    wrapper so gradients can pass through them. Mutates `model`."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    targets = parse_targets(targets)
    if has_lora(model):
        raise ValueError("model already has LoRA adapters; merge them first")
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    experts = tuple(t for t in targets if t in GROUPS["experts"])
    for layer in model.layers:
        att = layer.attention
        for name in ("wqkv", "wo"):
            base = getattr(att, name)
            if name in targets or is_quantized(base):
                setattr(att, name, LoRALinear(base, rank if name in targets else 0, alpha, g))
        if experts or is_quantized(layer.moe.experts):
            layer.moe.experts = LoRAExperts(layer.moe.experts, rank, alpha, experts, g)
    model.lora_settings = {"rank": rank, "alpha": alpha, "targets": list(targets)}


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, (LoRALinear, LoRAExperts)) for m in model.modules())


def adapter_state(model: nn.Module) -> dict[str, Tensor]:
    """Just the adapter tensors, under their parameter names."""
    return {n: p.detach() for n, p in model.named_parameters() if ".lora_" in n}


def save_adapters(model: Transformer, out_dir: str | Path) -> Path:
    """Write adapter.safetensors and adapter.json (rank, alpha, targets, base shapes) to `out_dir`."""
    if not has_lora(model):
        raise ValueError("model has no LoRA adapters to save")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {n: t.contiguous().cpu() for n, t in adapter_state(model).items()}
    write_atomic(out / "adapter.safetensors", st_save(tensors, metadata={"format": "pt"}))
    meta = model.lora_settings | {"base_config": model.config.to_dict()}
    write_atomic(out / "adapter.json", (json.dumps(meta, indent=2) + "\n").encode())
    return out


def fingerprint(model: Transformer) -> str:
    """A short digest of a base model's weights (the first values of every tensor, as stored): tells two
    bases of the same shapes apart without reading all of either."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().reshape(-1)[:64].to("cpu", torch.float32).numpy().tobytes())
    return h.hexdigest()[:16]


def check_base_config(meta: dict, cfg: ModelConfig, adapter: str | Path, base: str | Path) -> None:
    """The base must have the architecture the adapters were trained on (adapter.json's base_config)."""
    want = meta.get("base_config")
    if want is not None and ModelConfig.from_dict(want, source=str(adapter)) != cfg:
        got = cfg.to_dict()
        diff = [f"{k} {want[k]} vs {got[k]}" for k in got if k in want and want[k] != got[k]]
        raise ValueError(f"the adapters in {adapter} were trained on another architecture than {base} "
                         f"({', '.join(diff[:4]) or 'config differs'})")


def check_base_weights(meta: dict, model: Transformer, adapter: str | Path, base: str | Path, force: bool) -> None:
    """The base must be the checkpoint the adapters were trained on (adapter.json's base fingerprint)."""
    want = meta.get("base", {})
    if "fingerprint" in want and want["fingerprint"] != fingerprint(model) and not force:
        raise ValueError(f"the adapters in {adapter} were trained on {want.get('checkpoint', 'another base')}, "
                         f"whose weights differ from {base}'s; pass that --checkpoint (or --force to merge anyway)")


def read_adapter_settings(path: str | Path) -> dict:
    file = Path(path) / "adapter.json"
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read LoRA adapter settings {file}: {e}") from None


def load_adapters(model: Transformer, path: str | Path) -> None:
    """Apply the adapters saved in `path` (by save_adapters) to a base model. Mutates `model`."""
    meta = read_adapter_settings(path)
    apply_lora(model, meta["rank"], meta["alpha"], meta["targets"])
    load_adapter_tensors(model, path)


def load_adapter_tensors(model: Transformer, path: str | Path) -> None:
    """Copy saved adapter values into a model that already carries adapters of the same shapes."""
    file = Path(path) / "adapter.safetensors"
    try:
        tensors = st_load(file.read_bytes())
    except (OSError, SafetensorError) as e:
        raise ValueError(f"cannot read LoRA adapters {file}: {e}") from None
    params = dict(model.named_parameters())
    expected = {n for n in params if ".lora_" in n}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ValueError(f"{file}: adapters do not match the model (missing {missing[:3]}, unexpected {extra[:3]})")
    with torch.no_grad():
        for name, t in tensors.items():
            if params[name].shape != t.shape:
                raise ValueError(f"{file}: {name} has shape {tuple(t.shape)}, the model needs {tuple(params[name].shape)}")
            params[name].copy_(t)


def _linear_like(base: nn.Module, w: Tensor, requantize: bool) -> nn.Module:
    """A plain module holding weight w [O, I]: the base's int8 module class again (same scale
    groups) when requantizing an int8 base, else nn.Linear."""
    if requantize and is_quantized(base) and base.weight.dtype == torch.int8:
        groups = base.scales.shape[0]
        m = type(base)(base.in_features, base.out_features, groups, w.device)
        m.weight, m.scales = quant.quantize(w, groups)
        return m
    m = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device)
    m.weight = nn.Parameter(w, requires_grad=False)
    return m


def _experts_like(base: nn.Module, ws: tuple[Tensor, Tensor, Tensor], requantize: bool, cfg: ModelConfig,
                  changed: Sequence[str] = ("w1", "w2", "w3")) -> nn.Module:
    """Plain experts holding ws (w1 [E, F, D], w2 [E, D, F], w3 [E, F, D]): the base's int8 class
    again (same groups; matrices not in `changed` keep their exact int8 values) or float Experts."""
    E, F_, D = ws[0].shape
    if requantize and is_quantized(base) and base.w1.dtype == torch.int8:
        groups = tuple(getattr(base, f"s{i}").shape[1] for i in (1, 2, 3))
        m = type(base)(E, D, F_, groups, ws[0].device)
        for i, w, g in zip((1, 2, 3), ws, groups):
            if f"w{i}" in changed:
                q, s = quant.quantize(w, g)
            else:
                q, s = getattr(base, f"w{i}"), getattr(base, f"s{i}")
            setattr(m, f"w{i}", q)
            setattr(m, f"s{i}", s)
        return m
    with torch.device("meta"):
        m = Experts(dataclasses.replace(cfg, n_experts=E, dim=D, ffn_dim=F_))
    for i, w in zip((1, 2, 3), ws):
        setattr(m, f"w{i}", nn.Parameter(w, requires_grad=False))
    return m


def merge_lora(model: Transformer, requantize: bool = True) -> None:
    """Fold every adapter into its base weight and remove the wrappers. An int8 base is requantised
    to int8 (same scale groups; adds int8 rounding error) unless `requantize` is False, in which
    case merged matrices become float32. Matrices without an adapter keep their stored form.
    Mutates `model`."""
    with torch.no_grad():
        for layer in model.layers:
            att = layer.attention
            for name in ("wqkv", "wo"):
                mod = getattr(att, name)
                if isinstance(mod, LoRALinear):
                    if not mod.rank:
                        setattr(att, name, mod.base)
                        continue
                    dtype = torch.float32 if is_quantized(mod.base) else mod.base.weight.dtype
                    setattr(att, name, _linear_like(mod.base, mod.merged_weight(dtype), requantize))
            ex = layer.moe.experts
            if isinstance(ex, LoRAExperts):
                if not ex.which:
                    layer.moe.experts = ex.base
                    continue
                dtype = torch.float32 if is_quantized(ex.base) else ex.base.w1.dtype
                all_e = torch.arange(ex.n_experts, device=ex.base.w1.device)
                ws = tuple(w.detach() for w in ex.expert_weights(all_e, dtype))
                layer.moe.experts = _experts_like(ex.base, ws, requantize, model.config, ex.which)
    if hasattr(model, "lora_settings"):
        del model.lora_settings


def dequantize_model(model: Transformer, dtype: torch.dtype = torch.float32) -> None:
    """Replace quantized attention and expert modules by float ones (for full fine-tuning of an int8
    checkpoint). Mutates `model`; the new weights do not require grad until asked."""
    with torch.no_grad():
        for layer in model.layers:
            att = layer.attention
            for name in ("wqkv", "wo"):
                mod = getattr(att, name)
                if is_quantized(mod):
                    setattr(att, name, _linear_like(mod, _linear_weight(mod, dtype), False))
            ex = layer.moe.experts
            if is_quantized(ex):
                all_e = torch.arange(ex.n_experts, device=ex.w1.device)
                layer.moe.experts = _experts_like(ex, ex.expert_weights(all_e, dtype), False, model.config)
