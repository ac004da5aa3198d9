"""grok1.train.lora: adapters from outside the model, on float and int8 bases."""

import copy

import pytest
import torch
from conftest import small_config
from train_helpers import pattern_tokens

from grok1.model import Transformer, init_weights
from grok1.quant import quantize_model
from grok1.train import lora
from grok1.train.data import TokenData
from grok1.train.loop import TrainConfig, heldout_loss, train


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _base(int8: bool = False, seed: int = 0) -> Transformer:
    model = Transformer(small_config(vocab_size=64))
    init_weights(model, torch.Generator().manual_seed(seed))
    if int8:
        quantize_model(model)
    return model.eval()


def _randomize_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


TOKENS = torch.randint(4, 64, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("int8", [False, True])
def test_only_adapters_receive_gradients(int8):
    model = _base(int8)
    lora.apply_lora(model, rank=4, targets="all")
    _randomize_adapters(model)
    model(TOKENS).logsumexp(-1).mean().backward()  # would crash in the int8 kernel without the grad path
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    adapters = {n for n, _ in model.named_parameters() if ".lora_" in n}
    assert with_grad == adapters and len(adapters) == 2 * 2 * (2 + 3)  # 2 layers x (A, B) x 5 matrices
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in adapters)
    if int8:
        assert all(b.dtype in (torch.int8, torch.bfloat16) for n, b in model.named_buffers()
                   if n.rpartition(".")[2] in ("weight", "scales", "w1", "w2", "w3", "s1", "s2", "s3"))


def test_fresh_adapter_changes_nothing_and_targets_are_selectable():
    model = _base()
    want = model(TOKENS)
    lora.apply_lora(model, rank=2, targets="wo,w2")
    assert torch.equal(model(TOKENS), want)
    names = {n.rpartition(".")[0] + "." + n.rpartition(".")[2][:6] for n, _ in model.named_parameters() if ".lora_" in n}
    assert names == {"layers.0.attention.wo.lora_A", "layers.0.attention.wo.lora_B", "layers.0.moe.experts.lora_A",
                     "layers.0.moe.experts.lora_B", "layers.1.attention.wo.lora_A", "layers.1.attention.wo.lora_B",
                     "layers.1.moe.experts.lora_A", "layers.1.moe.experts.lora_B"}
    assert lora.parse_targets("experts,attention") == ("wqkv", "wo", "w1", "w2", "w3")
    with pytest.raises(ValueError, match="unknown LoRA target"):
        lora.parse_targets("wq")


@pytest.mark.parametrize("int8", [False, True])
def test_merged_output_equals_unmerged(int8):
    model = _base(int8)
    lora.apply_lora(model, rank=4, targets="all")
    _randomize_adapters(model)
    with torch.no_grad():
        unmerged = model(TOKENS)
        with torch.enable_grad():  # the differentiable path computes the same function
            assert torch.allclose(model(TOKENS), unmerged, atol=1e-4)
        exact = copy.deepcopy(model)
        lora.merge_lora(exact, requantize=False)
        assert not lora.has_lora(exact)
        assert torch.allclose(exact(TOKENS), unmerged, atol=1e-4, rtol=1e-4)
        lora.merge_lora(model)  # int8 stays int8 (requantised), float stays float
        assert lora.is_quantized(model.layers[0].attention.wqkv) == int8
        merged = model(TOKENS)
    if int8:  # requantising adds int8 rounding: close, not equal
        assert (merged - unmerged).abs().max() < 0.05 * unmerged.abs().max()
    else:
        assert torch.allclose(merged, unmerged, atol=1e-4, rtol=1e-4)


def test_save_load_adapters(tmp_path):
    model = _base(int8=True)
    lora.apply_lora(model, rank=3, alpha=6, targets="wqkv,w1")
    _randomize_adapters(model)
    lora.save_adapters(model, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"adapter.safetensors", "adapter.json"}
    other = _base(int8=True)
    lora.load_adapters(other, tmp_path)
    with torch.no_grad():
        assert torch.equal(other(TOKENS), model(TOKENS))
    wrong = Transformer(small_config(vocab_size=64, dim=64))
    with pytest.raises(ValueError, match="shape"):
        lora.load_adapters(wrong, tmp_path)


def test_dequantize_model_for_full_fine_tuning():
    model = _base(int8=True)
    with torch.no_grad():
        want = model(TOKENS)
        lora.dequantize_model(model)
        assert not lora.is_quantized(model.layers[0].attention.wqkv)
        assert torch.allclose(model(TOKENS), want, atol=1e-4, rtol=1e-4)


def test_lora_run_on_an_int8_base_learns_a_small_task(tmp_path):
    """Pre-train a tiny base on a token cycle, quantise it to int8, then teach adapters the reversed
    cycle. (A random base cannot show this: with its embedding and norm scales frozen at their
    initial values its logits stay too flat for any adapter to make confident predictions.)"""
    forward = pattern_tokens(6000, period=7, vocab=64)
    model = _base()
    cfg = TrainConfig(seq_len=32, batch_size=4, max_steps=40, lr=1e-2, warmup_steps=3, log_every=10,
                      eval_every=1000, save_every=1000)
    train(model, TokenData([forward], 32), cfg, tmp_path / "base", progress=False)
    quantize_model(model)
    base_state = {n: t.clone() for n, t in model.state_dict().items()}
    task = TokenData([forward[::-1].copy()], 32, heldout_fraction=0.1)
    lora.apply_lora(model, rank=8, alpha=16, targets="all")
    start = heldout_loss(model, task, 8)
    cfg = TrainConfig(seq_len=32, batch_size=4, max_steps=40, lr=1e-2, warmup_steps=4, weight_decay=0.0,
                      log_every=10, eval_every=1000, save_every=20)
    train(model, task, cfg, tmp_path / "lora", progress=False)
    end = heldout_loss(model, task, 8)
    assert end < 0.5 * start, (start, end)
    # Checkpoints hold only the adapters; the int8 base is untouched.
    run = tmp_path / "lora"
    assert (run / "step-0000040" / "adapter.safetensors").is_file()
    assert not list(run.glob("step-*/model-*.safetensors"))
    layer = model.layers[1]
    assert torch.equal(layer.attention.wqkv.base.weight, base_state["layers.1.attention.wqkv.weight"])
    assert torch.equal(layer.moe.experts.base.w2, base_state["layers.1.moe.experts.w2"])
    assert layer.moe.experts.base.w2.dtype == torch.int8
    lora.merge_lora(model, requantize=False)
    with torch.no_grad():
        assert heldout_loss(model, task, 8) == pytest.approx(end, rel=1e-3)
