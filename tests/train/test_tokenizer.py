"""grok1.train.tokenizer: a SentencePiece BPE model with the Grok-1 conventions."""

import pytest
from train_helpers import corpus_fixture, tokenizer_path_fixture  # noqa: F401  (fixtures)

from grok1.tokenizer import Tokenizer
from grok1.train.tokenizer import train_tokenizer


def test_grok1_conventions(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    assert tok.vocab_size == 320
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert [tok.id_to_piece(i) for i in range(4)] == ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]
    assert [tok.id_to_piece(i) for i in range(4, 14)] == ["\n" * n for n in range(1, 11)]
    assert [tok.id_to_piece(i) for i in range(14, 24)] == [str(d) for d in range(10)]


def test_byte_fallback_digits_and_newlines_round_trip(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    text = "The lady said 1811 things\n\nnever seen: Ж 日本 😀"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.unk_id not in ids  # byte fallback: nothing is unknown
    pieces = [tok.id_to_piece(i) for i in ids]
    assert ["1", "8", "1", "1"] == [p for p in pieces if p.isdigit()]  # split digits
    assert "\n\n" in pieces
    assert any(tok.byte_value(i) is not None for i in ids)


def test_deterministic(corpus, tokenizer_path, tmp_path):
    again = train_tokenizer([corpus], tmp_path / "again.model", vocab_size=320)
    assert again.read_bytes() == tokenizer_path.read_bytes()


def test_errors(corpus, tmp_path):
    with pytest.raises(ValueError, match="exceed"):
        train_tokenizer([corpus], tmp_path / "t.model", vocab_size=100)
    with pytest.raises(ValueError, match="not found"):
        train_tokenizer([tmp_path / "missing.txt"], tmp_path / "t.model")
