"""Tensor parallelism over a finished model: `apply_tp(model, group)`.

A rank of a group of T keeps:
  attention  wqkv: its H/T query heads and K/T KV heads (column-parallel: rows of q, of k and of v);
             wo: the matching H/T * Hd inputs (row-parallel), then one all-reduce of the output.
  experts    w1, w3: F/T rows of every expert (column-parallel); w2: the matching F/T inputs
             (row-parallel), then one all-reduce after the MoE.
  embedding  V/T rows of the tied table (vocab-parallel): a lookup keeps the rows it owns, zeros the
             rest and all-reduces; the unembedding's V/T logits are all-gathered into [.., V].
Norms and the router are replicated. Query head n uses KV head n // G on every rank alike, so the
model's own attention runs unchanged on the slice (it reshapes with -1 heads).

Every stored weight format of quant.py is sliced in its own layout: int8 [.., out, in] with scales
[.., G, out] (a row-parallel slice takes its inputs' scale groups: G/T groups each when T divides G,
the one group it lies in when G divides T), int4 [.., out, in/2] with scales [.., out, in/32] (whole
32-input blocks), bf16 and fp32 without scales. Call before panels.pack_model (panels are made from
the slices) and before kernels.install; model.py is not edited: the collectives are forward hooks on
`attention` and `moe`, and the table is wrapped.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor, nn

from grok1.config import ModelConfig
from grok1.model import Transformer

# A plan: slice `axis` of a tensor to the concatenation of these [start, stop) ranges.
Plan = tuple[int, list[tuple[int, int]]]

# Our tensor names (relative to `layers.{i}.` in a layer) -> (matrix, is_scales).
ROLES = {"attention.wqkv.weight": ("wqkv", False), "attention.wqkv.scales": ("wqkv", True),
         "attention.wo.weight": ("wo", False), "attention.wo.scales": ("wo", True),
         "tok_embeddings.weight": ("table", False), "tok_embeddings.scales": ("table", True),
         **{f"moe.experts.w{i}": (f"w{i}", False) for i in "123"},
         **{f"moe.experts.s{i}": (f"w{i}", True) for i in "123"}}
COLUMN = ("wqkv", "w1", "w3", "table")  # split outputs
ROW = ("wo", "w2")  # split inputs


def relative(name: str) -> str:
    return name.split(".", 2)[2] if name.startswith("layers.") else name


def weight_name(name: str) -> str:
    """The name of the weight tensor of the matrix that tensor `name` belongs to (itself for a weight)."""
    rel = relative(name)
    if rel.startswith("moe.experts.s"):
        return name[:-2] + "w" + name[-1]
    return name[: -len("scales")] + "weight" if name.endswith(".scales") else name


def check_tp(cfg: ModelConfig, size: int) -> None:
    """One clear error when the model's shapes cannot be split over `size` ranks."""
    need = {"n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads, "ffn_dim": cfg.ffn_dim, "vocab_size": cfg.vocab_size}
    bad = [f"{k}={v}" for k, v in need.items() if v % size]
    if size < 1 or bad:
        valid = [t for t in range(1, cfg.n_kv_heads + 1) if all(v % t == 0 for v in need.values())]
        raise ValueError(f"--tp {size}: the model's {', '.join(bad) or 'shapes'} do not split over {size} ranks; "
                         f"valid tensor-parallel sizes for this model: {', '.join(map(str, valid))}")


def _even(n: int, rank: int, size: int) -> list[tuple[int, int]]:
    return [(rank * n // size, (rank + 1) * n // size)]


def _out_ranges(role: str, n_out: int, cfg: ModelConfig, rank: int, size: int) -> list[tuple[int, int]]:
    """The output rows a rank keeps: per part (q, k, v) for wqkv, one even share otherwise."""
    if role != "wqkv":
        return _even(n_out, rank, size)
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return [(o + a, o + b) for o, n in ((0, q), (q, kv), (q + kv, kv)) for a, b in _even(n, rank, size)]


def tp_plan(name: str, shape: tuple[int, ...], fmt: str, cfg: ModelConfig, rank: int, size: int) -> Plan | None:
    """How rank `rank` of `size` slices tensor `name` (our names, e.g. layers.3.moe.experts.s2) of `shape`,
    whose matrix is stored as `fmt` ("int8", "int4", "bf16", "fp32"); None: replicated (or empty)."""
    role = ROLES.get(relative(name))
    if size == 1 or role is None or 0 in shape:
        return None
    matrix, scales = role
    if matrix in COLUMN:  # weight rows; int8 scales' last axis, int4 scales' rows
        axis = -1 if scales and fmt == "int8" else -2
        return axis, _out_ranges(matrix, shape[axis], cfg, rank, size)
    if not scales:  # row-parallel weight: inputs (int4: two per byte, whole blocks of 32)
        n_in = shape[-1] * (2 if fmt == "int4" else 1)
        if fmt == "int4":
            if (n_in // size) % 32:
                raise ValueError(f"{name}: its int4 blocks of 32 inputs do not split over {size} ranks")
            return -1, [(a // 2, b // 2) for a, b in _even(n_in, rank, size)]
        return -1, _even(n_in, rank, size)
    if fmt == "int4":  # scales [.., out, blocks]
        return -1, _even(shape[-1], rank, size)
    groups = shape[-2]  # int8 scales [.., G, out]
    if groups % size == 0:
        return -2, _even(groups, rank, size)
    if size % groups == 0:  # each rank's inputs lie inside one group: keep that group's row
        g = rank * groups // size
        return -2, [(g, g + 1)]
    raise ValueError(f"{name}: its {groups} int8 scale groups do not split over {size} ranks "
                     f"(a tensor-parallel size must divide the group count or be a multiple of it)")


def take(t: Tensor, plan: Plan | None) -> Tensor:
    """A fresh contiguous tensor holding t's slice under `plan` (t itself when replicated)."""
    if plan is None:
        return t
    axis, ranges = plan
    parts = [t.narrow(axis, a, b - a) for a, b in ranges]
    return (torch.cat(parts, dim=axis) if len(parts) > 1 else parts[0]).clone(memory_format=torch.contiguous_format)


def matrix_format(weight: Tensor) -> str:
    return {torch.int8: "int8", torch.uint8: "int4", torch.bfloat16: "bf16"}.get(weight.dtype, "fp32")


def shard_tensors(model: nn.Module, plan_of: Callable[[str, Tensor, str], Plan | None]) -> None:
    """Replace every tensor of the model by its slice under plan_of(name, tensor, format of its matrix), in
    place, and keep the modules' size attributes true (in/out_features, n_experts)."""
    tensors = dict([*model.named_parameters(), *model.named_buffers()])
    for module_name, module in model.named_modules():
        prefix = module_name + "." if module_name else ""
        for attr, t in [*module._parameters.items(), *module._buffers.items()]:
            name = prefix + attr
            if t is None or (plan := plan_of(name, t, matrix_format(tensors.get(weight_name(name), t)))) is None:
                continue
            new = take(t.detach(), plan)
            if attr in module._parameters:
                module._parameters[attr] = nn.Parameter(new, requires_grad=False)
            else:
                module._buffers[attr] = new
        _fix_sizes(module)


def _fix_sizes(module: nn.Module) -> None:
    w = module._parameters.get("weight", module._buffers.get("weight"))
    if hasattr(module, "out_features") and w is not None and w.dim() == 2:
        module.out_features = w.shape[0]
        module.in_features = w.shape[1] * (2 if w.dtype == torch.uint8 else 1)
    w1 = module._parameters.get("w1", module._buffers.get("w1"))
    if hasattr(module, "n_experts") and w1 is not None:
        module.n_experts = w1.shape[0]


def shard_tp(model: Transformer, rank: int, size: int) -> None:
    """Slice the model's weights to rank `rank`'s share of `size` (no communication; works on `meta`)."""
    if size == 1:
        return
    check_tp(model.config, size)
    _refuse_packed(model)
    shard_tensors(model, lambda name, t, fmt: tp_plan(name, tuple(t.shape), fmt, model.config, rank, size))


def _refuse_packed(model: Transformer) -> None:
    from grok1.panels import PackedEmbedding, PackedExperts, PackedLinear

    if any(isinstance(m, (PackedLinear, PackedExperts, PackedEmbedding)) for m in model.modules()):
        raise ValueError("shard the model before panels.pack_model: panels are made from each rank's slice")


def all_reduce(t: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Sum over `group`, functional (torch.compile traces it); waited for here, since the compiled CPU
    kernels read the result's memory directly."""
    return _done(funcol.all_reduce(t, "sum", group))


def all_gather(t: Tensor, dim: int, group: dist.ProcessGroup) -> Tensor:
    gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
    return _done(gather(t.contiguous(), dim % t.dim(), group))


def _done(t: Tensor) -> Tensor:
    return t.wait() if isinstance(t, funcol.AsyncCollectiveTensor) else t


def all_reduce_output(group: dist.ProcessGroup) -> Callable[[nn.Module, tuple, Tensor], Tensor]:
    """A forward hook summing a module's output over `group`."""

    def hook(_module: nn.Module, _args: tuple, output: Tensor) -> Tensor:
        return all_reduce(output, group)

    return hook


class VocabParallelEmbedding(nn.Module):
    """The tied table split by vocabulary rows: this rank holds rows [start, start + n_local) in `table`
    (any table module: TiedEmbedding, QEmbedding, PackedEmbedding)."""

    def __init__(self, table: nn.Module, start: int, n_local: int, group: dist.ProcessGroup) -> None:
        super().__init__()
        self.table, self.start, self.n_local, self.group = table, start, n_local, group

    @property
    def dtype(self) -> torch.dtype:
        return self.table.dtype

    def forward(self, tokens: Tensor) -> Tensor:
        local = tokens - self.start
        mine = (local >= 0) & (local < self.n_local)  # [B, T]
        rows = self.table(torch.where(mine, local, 0)) * mine[..., None]  # [B, T, D], zeros where not ours
        return all_reduce(rows, self.group)  # exactly the one owner's row

    def unembed(self, h: Tensor) -> Tensor:
        return all_gather(self.table.unembed(h), -1, self.group)  # [.., V / T] -> [.., V], in rank order


def connect_tp(model: Transformer, group: dist.ProcessGroup, moe_group: dist.ProcessGroup) -> None:
    """Install the collectives on a model whose weights are this rank's slices (shard_tp or a sliced load):
    one all-reduce after each attention (over `group`) and after each MoE (over `moe_group`: `group`, or with
    expert parallelism too the world, so that one all-reduce covers both splits), the vocab-parallel table."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if size == 1:
        return
    for layer in model.layers:
        layer.attention.register_forward_hook(all_reduce_output(group))
        layer.moe.register_forward_hook(all_reduce_output(moe_group))
    V = model.config.vocab_size
    model.tok_embeddings = VocabParallelEmbedding(model.tok_embeddings, rank * V // size, V // size, group)


def apply_tp(model: Transformer, group: dist.ProcessGroup) -> None:
    """Shard a finished (unpacked) model over `group` and install its collectives, in place."""
    shard_tp(model, dist.get_rank(group), dist.get_world_size(group))
    connect_tp(model, group, group)
