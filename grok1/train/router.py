"""MoE training terms computed from outside the model: router logits are captured with forward
hooks on each layer's `moe.gate`, so model.py stays the inference-faithful reference.

Shape letters: N routed tokens, E experts, k active experts per token.

- load-balancing loss (Switch Transformer / GShard): E * sum_e f_e * P_e, where f_e is the
  fraction of the N*k routing slots given to expert e and P_e the mean router probability of e;
  1.0 when perfectly balanced, up to E when everything goes to one expert.
- router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2; keeps router logits small.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RouterTap:
    """Collects the router logits [N, E] of every MoE layer during a forward, in layer order."""

    def __init__(self, model: nn.Module) -> None:
        self.logits: list[Tensor] = []
        self.handles = [layer.moe.gate.register_forward_hook(self._hook) for layer in model.layers]

    def _hook(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        self.logits.append(output)

    def clear(self) -> None:
        self.logits = []

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def expert_load(logits_NE: Tensor, k: int) -> Tensor:
    """Fraction of the N*k routing slots each expert receives [E] (no gradient)."""
    idx = logits_NE.detach().topk(k, dim=-1).indices  # softmax is monotonic: same top-k as the model
    return torch.bincount(idx.flatten(), minlength=logits_NE.shape[-1]).float() / idx.numel()


def load_balancing_loss(logits_NE: Tensor, k: int) -> Tensor:
    probs_NE = F.softmax(logits_NE.float(), dim=-1)
    return logits_NE.shape[-1] * (expert_load(logits_NE, k) * probs_NE.mean(0)).sum()


def z_loss(logits_NE: Tensor) -> Tensor:
    return torch.logsumexp(logits_NE.float(), dim=-1).pow(2).mean()


def router_losses(logits: list[Tensor], k: int) -> tuple[Tensor, Tensor, Tensor]:
    """(load-balancing loss, z-loss), each averaged over layers, and the expert load [L, E]."""
    if not logits:
        zero = torch.zeros(())
        return zero, zero, torch.zeros(0, 0)
    balance = torch.stack([load_balancing_loss(x, k) for x in logits]).mean()
    z = torch.stack([z_loss(x) for x in logits]).mean()
    return balance, z, torch.stack([expert_load(x, k) for x in logits])
