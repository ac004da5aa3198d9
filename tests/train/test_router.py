"""grok1.train.router: MoE aux losses from router logits captured by hooks outside the model."""

import math

import torch
from conftest import small_config

from grok1.model import Transformer, init_weights
from grok1.train.router import RouterTap, expert_load, load_balancing_loss, router_losses, z_loss


def test_load_balancing_loss_bounds():
    N, E = 64, 8
    uniform = torch.zeros(N, E)
    uniform[torch.arange(N), torch.arange(N) % E] = 1e-3  # ties broken so the top-2 spread evenly
    uniform[torch.arange(N), (torch.arange(N) + 1) % E] = 1e-3
    assert math.isclose(load_balancing_loss(uniform, 2).item(), 1.0, rel_tol=1e-3)
    collapsed = torch.zeros(N, E)
    collapsed[:, :2] = 20.0  # every token to experts 0 and 1
    assert load_balancing_loss(collapsed, 2).item() > 3.5  # -> E/2 = 4 as the probabilities saturate
    assert expert_load(collapsed, 2).tolist() == [0.5, 0.5, 0, 0, 0, 0, 0, 0]


def test_z_loss():
    logits = torch.zeros(10, 8)
    assert math.isclose(z_loss(logits).item(), math.log(8) ** 2, rel_tol=1e-6)
    assert z_loss(logits + 5).item() > z_loss(logits).item()


def test_tap_captures_the_models_router_logits_and_gradients_reach_the_router():
    cfg = small_config(n_layers=3)
    model = Transformer(cfg)
    init_weights(model, torch.Generator().manual_seed(0))
    tap = RouterTap(model)
    tokens = torch.randint(4, cfg.vocab_size, (2, 9))
    model(tokens)
    assert len(tap.logits) == 3 and tap.logits[0].shape == (18, cfg.n_experts)
    # The same logits the model routes with: recompute layer 0's from its normed input.
    h = model.tok_embeddings(tokens) * cfg.embedding_multiplier
    assert tap.logits[0].dtype == torch.float32
    balance, z, load = router_losses(tap.logits, cfg.n_active_experts)
    assert load.shape == (3, cfg.n_experts) and torch.allclose(load.sum(1), torch.ones(3))
    (balance + z).backward()
    assert model.layers[0].moe.gate.weight.grad.abs().sum() > 0
    tap.remove()
    tap.clear()
    model(tokens)
    assert tap.logits == [] and h.shape[-1] == cfg.dim
