"""The bundled demo model grok1/assets/grok-1-mini: what a fresh install runs with no --checkpoint."""

import json
import re

import pytest

from grok1.cli.common import DEFAULT_CHECKPOINT
from grok1.cli.main import main
from grok1.config import from_name
from grok1.tokenizer import Tokenizer
from grok1.weights.safetensors import read_config

pytestmark = pytest.mark.skipif(not (DEFAULT_CHECKPOINT / "config.json").is_file(),
                                reason=f"bundled demo model not built yet ({DEFAULT_CHECKPOINT})")

OPENING = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
           "must be in want of a wife.")


def test_bundled_model_is_the_preset_in_int8_and_small():
    cfg, kind = read_config(DEFAULT_CHECKPOINT)
    assert cfg == from_name("grok-1-mini") and kind == "int8"
    assert sum(f.stat().st_size for f in DEFAULT_CHECKPOINT.glob("*.safetensors")) <= 25e6
    # Every Grok-1 feature is kept: GQA with several query heads per KV head, top-2 of >= 4 experts,
    # the multipliers (embedding x sqrt(D), output, QK scale) and the soft-cap.
    assert cfg.n_heads // cfg.n_kv_heads > 1 and cfg.n_experts >= 4 and cfg.n_active_experts == 2
    assert cfg.embedding_multiplier == cfg.dim**0.5 and cfg.attn_softcap == 30.0
    assert cfg.attn_scale == cfg.head_dim**-0.5 and cfg.output_multiplier == 3**-0.5


def test_bundled_tokenizer_follows_grok1_conventions():
    tok = Tokenizer(DEFAULT_CHECKPOINT / "tokenizer.model")
    assert tok.vocab_size == from_name("grok-1-mini").vocab_size
    assert [tok.id_to_piece(i) for i in range(4)] == ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]
    assert tok.decode(tok.encode("Mr. Darcy, 1813 \u00e9")) == "Mr. Darcy, 1813 \u00e9"


def test_commands_default_to_the_bundled_model(capsys):
    assert main(["generate", "It is a truth universally acknowledged", "--max-new-tokens", "24",
                 "--temperature", "0"]) == 0
    text = capsys.readouterr().out
    continuation = text.removeprefix("It is a truth universally acknowledged")
    words = re.findall(r"[A-Za-z]+", continuation)
    assert len(words) >= 8, continuation
    assert main(["info"]) == 0 and "grok-1-mini" in capsys.readouterr().out


def test_bundled_model_knows_austen(capsys):
    """The famous opening is far more likely than chance (uniform: ln 4096 = 8.3 nats a token)."""
    assert main(["score", OPENING, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    nats = -result["total_logprob"] / len(result["token_logprobs"])
    assert nats < 4.0, nats


@pytest.fixture
def restore_threads():
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_train_fine_tunes_the_bundled_model_by_default(tmp_path, capsys, restore_threads):
    """`grok1 train` without a model source: LoRA on the bundled int8 model, its tokenizer found next to it."""
    text = tmp_path / "letters.txt"
    text.write_text("My dear Jane, I am sure you will be glad to hear that we are all well.\n\n" * 40)
    assert main(["train", "--data", str(text), "--out", str(tmp_path / "ft"), "--lora-rank", "2", "--max-steps", "2",
                 "--seq-len", "32", "--batch-size", "2", "--warmup-steps", "1", "--save-every", "2",
                 "--eval-every", "2", "--threads", "1", "--no-progress"]) == 0
    assert (tmp_path / "ft" / "step-0000002" / "adapter.safetensors").is_file()
    assert "trainable parameters" in capsys.readouterr().out
