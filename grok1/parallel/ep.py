"""Expert parallelism over a finished model: `apply_ep(model, group)`.

Rank r of a group of P keeps experts [r E/P, (r + 1) E/P) of every layer (all of their w1, w2, w3 and
scales; E/P must be whole). Every rank sees every token (the batch is replicated): the router runs
everywhere, each rank applies its own experts to the (token, slot) pairs routed to them, and the
partial outputs are summed with one all-reduce after the MoE. For decode-sized batches that one
all-reduce of [N, D] is cheaper than an all-to-all dispatch and combine (two collectives, uneven
splits, and the same [N, D] bytes): see docs/parallel.md for the measurement.

Composes with tensor parallelism (each expert's F split inside the TP group): the MoE's partial
outputs then sum over both splits, in one all-reduce over the world (`moe_group`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from grok1.config import ModelConfig
from grok1.model import Transformer
from grok1.parallel.tp import Plan, _refuse_packed, all_reduce_output, shard_tensors

EXPERT_TENSORS = tuple(f"moe.experts.{k}{i}" for k in "ws" for i in "123")


def check_ep(cfg: ModelConfig, size: int) -> None:
    if size < 1 or cfg.n_experts % size:
        valid = [p for p in range(1, cfg.n_experts + 1) if cfg.n_experts % p == 0]
        raise ValueError(f"--ep {size}: the model's {cfg.n_experts} experts do not split over {size} ranks; "
                         f"valid expert-parallel sizes: {', '.join(map(str, valid))}")


def ep_plan(name: str, shape: tuple[int, ...], cfg: ModelConfig, rank: int, size: int) -> Plan | None:
    """Rank `rank` of `size` keeps its experts' slice of the leading (expert) axis of the expert stacks."""
    if size == 1 or not name.endswith(EXPERT_TENSORS) or not shape or 0 in shape:
        return None
    n = cfg.n_experts // size
    return 0, [(rank * n, (rank + 1) * n)]


def shard_ep(model: Transformer, rank: int, size: int) -> None:
    """Keep this rank's experts (no communication; works on `meta`)."""
    if size == 1:
        return
    check_ep(model.config, size)
    _refuse_packed(model)
    shard_tensors(model, lambda name, t, fmt: ep_plan(name, tuple(t.shape), model.config, rank, size))


class ExpertParallel(nn.Module):
    """This rank's experts `local` (any experts module: Experts, QExperts, PackedExperts), numbered from
    `first`; applies them to the (token, slot) pairs routed to them. Output [N, D]: this rank's part of
    the MoE output (zero rows for tokens none of whose experts live here)."""

    def __init__(self, local: nn.Module, first: int) -> None:
        super().__init__()
        self.local, self.first = local, first

    @property
    def n_experts(self) -> int:
        return self.local.n_experts

    def forward(self, x_ND: Tensor, idx_NA: Tensor, gate_NA: Tensor) -> Tensor:
        mine = (idx_NA >= self.first) & (idx_NA < self.first + self.local.n_experts)  # [N, A]
        token, slot = mine.nonzero(as_tuple=True)  # [R] pairs routed here
        out = torch.zeros_like(x_ND)
        if token.numel():
            idx_R1 = (idx_NA[token, slot] - self.first)[:, None]
            y_RD = self.local(x_ND[token], idx_R1, gate_NA[token, slot][:, None])  # one slot per row
            out.index_add_(0, token, y_RD)
        return out


def connect_ep(model: Transformer, group: dist.ProcessGroup, combine_over: dist.ProcessGroup | None) -> None:
    """Wrap each layer's (already sliced) experts; sum the MoE output over `combine_over` (None: a
    tensor-parallel hook already sums it over the world)."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if size == 1:
        return
    for layer in model.layers:
        layer.moe.experts = ExpertParallel(layer.moe.experts, rank * model.config.n_experts // size)
        if combine_over is not None:
            layer.moe.register_forward_hook(all_reduce_output(combine_over))


def apply_ep(model: Transformer, group: dist.ProcessGroup) -> None:
    """Keep this rank's experts of a finished (unpacked) model and install the combine, in place."""
    shard_ep(model, dist.get_rank(group), dist.get_world_size(group))
    connect_ep(model, group, group)
