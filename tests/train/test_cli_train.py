"""`grok1 train` and its actions, run as a user would (in-process through cli.main)."""

import json

import pytest
import torch
from conftest import small_config
from train_helpers import corpus_fixture, tokenizer_path_fixture  # noqa: F401  (fixtures)

from grok1.cli.main import main
from grok1.tokenizer import Tokenizer


@pytest.fixture(autouse=True)
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _config(tmp_path, vocab=320):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(small_config(vocab_size=vocab, max_seq_len=64).to_dict()))
    return path


FAST = ["--seq-len", "32", "--batch-size", "2", "--warmup-steps", "1", "--log-every", "1", "--eval-every", "2",
        "--eval-sequences", "2", "--save-every", "2", "--threads", "1", "--no-progress"]


def test_tokenizer_and_tokenize(corpus, tmp_path, capsys):
    assert main(["train", "tokenizer", "--input", str(corpus), "--out", str(tmp_path / "t.model"),
                 "--vocab-size", "330"]) == 0
    assert Tokenizer(tmp_path / "t.model").vocab_size == 330
    assert main(["train", "tokenize", str(corpus), "--tokenizer", str(tmp_path / "t.model"),
                 "--out", str(tmp_path / "t.npy")]) == 0
    assert (tmp_path / "t.npy").is_file() and "wrote" in capsys.readouterr().out


def test_train_generate_plot_lora_merge(corpus, tokenizer_path, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(corpus), "--tokenizer", str(tokenizer_path), "--config",
                 str(_config(tmp_path)), "--out", str(run), "--max-steps", "4", *FAST]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["step"] == 4 and last["heldout_sequences"] == "all"
    ckpt = run / "step-0000004"
    assert {"config.json", "tokenizer.model", "trainer_state.pt"} <= {p.name for p in ckpt.iterdir()}
    # A training checkpoint is a model directory every other command takes.
    assert main(["generate", "--checkpoint", str(ckpt), "The lady", "--max-new-tokens", "4", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("The lady")

    pytest.importorskip("matplotlib")
    assert main(["train", "plot", str(run)]) == 0
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()

    # LoRA on top of that checkpoint (quantised to int8 first, as the release is), then merged.
    int8 = tmp_path / "int8"
    from grok1.quant import quantize_model
    from grok1.weights.load import load_model, save_model

    model = load_model(ckpt, small_config(vocab_size=320, max_seq_len=64), "cpu", torch.float32)
    quantize_model(model)
    save_model(model, int8, ckpt / "tokenizer.model")
    lora_run = tmp_path / "lora"
    assert main(["train", "--checkpoint", str(int8), "--data", str(corpus), "--out", str(lora_run),
                 "--max-steps", "2", "--lora-rank", "4", "--lora-targets", "attention,w2", *FAST]) == 0
    adapter = lora_run / "step-0000002"
    assert json.loads((adapter / "adapter.json").read_text())["targets"] == ["wqkv", "wo", "w2"]
    merged = tmp_path / "merged"
    assert main(["train", "merge", "--checkpoint", str(int8), "--adapter", str(adapter), "--out", str(merged)]) == 0
    assert json.loads((merged / "config.json").read_text())["grok1"]["weights"] == "int8"
    assert main(["generate", "--checkpoint", str(merged), "The lady", "--max-new-tokens", "3"]) == 0


def test_resume_uses_the_saved_options(corpus, tokenizer_path, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--data", str(corpus), "--tokenizer", str(tokenizer_path), "--config", str(_config(tmp_path)),
            "--out", str(run), "--max-steps", "2", *FAST]
    assert main(args) == 0
    # Resuming a finished run with only --out: nothing left to do, and no option needs repeating.
    assert main(["train", "--out", str(run), "--resume", "--threads", "1", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {}


def test_errors(corpus, tmp_path, capsys):
    assert main(["train", "tokenizer", "--input", str(corpus), "--out", str(tmp_path / "t.model"),
                 "--vocab-size", "290"]) == 2
    assert "SentencePiece training failed" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "r")]) == 2
    assert "--data is required" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "missing.txt"), "--preset", "tiny", "--out", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err
