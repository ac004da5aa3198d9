"""`grok1 train` and its actions, run as a user would (in-process through cli.main)."""

import json

import pytest
import torch
from conftest import small_config
from train_helpers import corpus_fixture, pattern_file_fixture, tokenizer_path_fixture  # noqa: F401  (fixtures)

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
    capsys.readouterr()
    # Resuming a finished run with only --out: nothing left to do (said so), and no option needs repeating.
    assert main(["train", "--out", str(run), "--resume", "--threads", "1", "--no-progress"]) == 0
    assert "finished all 2 steps already" in capsys.readouterr().out
    # More steps on --resume would change the run's schedule: refused, saying how to train on.
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "40"]) == 2
    err = capsys.readouterr().err
    assert "--max-steps 40 differs from the 2" in err and "--checkpoint" in err
    # A new run into the same directory would truncate its log and mix checkpoints: refused.
    log = (run / "log.jsonl").read_text()
    assert main(args) == 2
    assert "already holds a training run" in capsys.readouterr().err and (run / "log.jsonl").read_text() == log


def test_errors(corpus, tmp_path, capsys):
    assert main(["train", "tokenizer", "--input", str(corpus), "--out", str(tmp_path / "t.model"),
                 "--vocab-size", "290"]) == 2
    assert "SentencePiece training failed" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "r")]) == 2
    assert "--data is required" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "missing.txt"), "--preset", "tiny", "--out", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, message", [
    ("--max-steps", "0", "--max-steps 0 is invalid: must be at least 1"),
    ("--batch-size", "0", "--batch-size 0 is invalid"), ("--grad-accum", "0", "--grad-accum 0 is invalid"),
    ("--lr", "-1", "--lr -1.0 is invalid: must be a positive number"),
    ("--heldout-fraction", "1.5", "--heldout-fraction 1.5 is invalid: must be in [0, 1)"),
    ("--seed", str(2**64), "outside 0..2**64-1")])
def test_bad_options_are_refused_before_the_run_directory_exists(flag, value, message, pattern_file, tmp_path,
                                                                 capsys):
    run = tmp_path / "run"
    try:
        code = main(["train", "--data", str(pattern_file), "--preset", "tiny", "--out", str(run), flag, value])
    except SystemExit as e:  # refused by the argument parser
        code = e.code
    assert code == 2 and message in capsys.readouterr().err and not run.exists()


def test_sequences_longer_than_the_context_are_refused_by_flag(pattern_file, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(pattern_file), "--out", str(run), "--seq-len", "1000", "--lora-rank", "2",
                 *FAST[2:]]) == 2
    assert "--seq-len 1000 exceeds the model's context of 256 tokens" in capsys.readouterr().err and not run.exists()


def test_non_utf8_text_names_the_file_and_offset(tmp_path, tokenizer_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"The lady said hello.\n" * 3 + "Caf\xe9\n".encode("latin-1"))
    run = tmp_path / "run"
    assert main(["train", "--data", str(bad), "--config", str(_config(tmp_path)), "--tokenizer",
                 str(tokenizer_path), "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"{bad} is not UTF-8 text: byte 0xe9 at byte offset {21 * 3 + 3}" in err and not run.exists()
    assert main(["train", "tokenize", str(bad), "--tokenizer", str(tokenizer_path), "--out",
                 str(tmp_path / "t.npy")]) == 2
    assert "byte 0xe9 at byte offset 66" in capsys.readouterr().err


def test_tokenizer_smaller_than_the_vocabulary_is_refused(corpus, tokenizer_path, tmp_path, capsys):
    """Ids 320..511 would have no text: generate could sample them. Refused before training starts."""
    run = tmp_path / "run"
    assert main(["train", "--data", str(corpus), "--tokenizer", str(tokenizer_path), "--config",
                 str(_config(tmp_path, vocab=512)), "--out", str(run), *FAST]) == 2
    assert "has 320 pieces but the model's vocabulary holds 512" in capsys.readouterr().err and not run.exists()


def test_zero_heldout_writes_valid_json(pattern_file, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(pattern_file), "--config", str(_config(tmp_path, vocab=64)), "--out",
                 str(run), "--max-steps", "2", "--heldout-fraction", "0", *FAST]) == 0
    for line in (run / "log.jsonl").read_text().splitlines():
        assert "NaN" not in line and "heldout_loss" not in json.loads(line)
    json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # the summary line is strict JSON too


def test_release_checkpoint_fine_tunes_and_merges(golden_dir, pattern_file, tmp_path, capsys):
    """The release format carries no config: --config names it, for training and for merge; the merge checks
    that the base is the one the adapters were trained on."""
    release = ["--checkpoint", str(golden_dir / "tiny-ckpt"), "--config", str(golden_dir / "tiny-config.json")]
    run = tmp_path / "lora"
    assert main(["train", *release, "--data", str(pattern_file), "--out", str(run), "--max-steps", "1",
                 "--lora-rank", "2", *FAST]) == 0
    adapter = run / "step-0000001"
    assert json.loads((adapter / "adapter.json").read_text())["base"]["checkpoint"] == str((golden_dir / "tiny-ckpt").resolve())
    merged = tmp_path / "merged"
    assert main(["train", "merge", "--adapter", str(adapter), *release, "--out", str(merged)]) == 0
    assert (merged / "config.json").is_file()
    # The same architecture with other weights: refused unless --force.
    from grok1.config import ModelConfig
    from grok1.model import Transformer, init_weights
    from grok1.weights.load import save_model

    other = Transformer(ModelConfig.from_reference_json(golden_dir / "tiny-config.json"))
    init_weights(other, torch.Generator().manual_seed(7))
    save_model(other, tmp_path / "other")
    assert main(["train", "merge", "--adapter", str(adapter), "--checkpoint", str(tmp_path / "other"),
                 "--out", str(tmp_path / "m2")]) == 2
    err = capsys.readouterr().err
    assert "were trained on" in err and "--force" in err and not (tmp_path / "m2").exists()
    # A base of another architecture: refused before loading it.
    assert main(["train", "merge", "--adapter", str(adapter), "--out", str(tmp_path / "m3")]) == 2
    assert "another architecture" in capsys.readouterr().err
    # An existing output is never overwritten.
    assert main(["train", "merge", "--adapter", str(adapter), *release, "--out", str(merged)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_a_model_larger_than_its_tokenizer_never_samples_ids_without_text(tokenizer_path, tmp_path, capsys):
    """Made before train refused it (or by hand): vocabulary 512, tokenizer 320 pieces. generate and chat must
    not sample ids 320..511, which have no text (decoding one used to crash with a traceback)."""
    from grok1.model import Transformer, init_weights
    from grok1.weights.load import save_model

    model = Transformer(small_config(vocab_size=512, max_seq_len=128))
    init_weights(model, torch.Generator().manual_seed(3))
    save_model(model, tmp_path / "m", tokenizer_path)
    ids = []
    for seed in range(3):
        assert main(["generate", "--checkpoint", str(tmp_path / "m"), "The lady", "--temperature", "3",
                     "--max-new-tokens", "60", "--ignore-eos", "--seed", str(seed), "--json", "--quiet"]) == 0
        ids += json.loads(capsys.readouterr().out)["token_ids"]
    assert len(ids) == 180 and max(ids) < 320 and len(set(ids)) > 50  # sampled widely, never beyond 319
