"""Tokenizer, StreamDecoder and TextStream against the real Grok-1 SentencePiece model."""

import functools
import hashlib
import random
from pathlib import Path

import pytest

from grok1.tokenizer import StreamDecoder, TextStream, Tokenizer

SHA256 = "5c69d7cbad192fa2c9d14e2a77fbfdc11597c68907b043ddb0260e3d28eddd7f"  # GROK1.md section 3


@functools.lru_cache(maxsize=1)
def _load(path: Path) -> Tokenizer:
    return Tokenizer(path)


@pytest.fixture
def model_path(shared_dir: Path) -> Path:
    path = shared_dir / "grok-1" / "tokenizer.model"
    if not path.is_file():
        pytest.skip(f"tokenizer model not found: {path}")
    return path


@pytest.fixture
def tok(model_path: Path) -> Tokenizer:
    return _load(model_path)


# GROK1.md section 3 table. The doc lists the emoji bytes as ids 264 260 309 228; those
# are <0xC3><0xBF><0xF0><0x9F>. The model maps <0xF0><0x9F><0x98><0x80> to 309 228 221 197.
EXAMPLES = [
    (
        "The answer to life the universe and everything is of course",
        [422, 3033, 356, 1180, 333, 9072, 360, 2175, 391, 359, 1805],
    ),
    ("The capital of France is", [422, 4073, 359, 5827, 391]),
    ("Hello, world!", [11770, 130111, 1135, 130166]),
    ("Grok-1 is a mixture of experts model.", [10590, 130113, 130116, 15, 391, 327, 8965, 359, 6356, 2128, 130109]),
    ("1234567", [130089, 15, 16, 17, 18, 19, 20, 21]),
    ("日本語", [54164, 130670]),
    ("\U0001f600", [130089, 309, 228, 221, 197]),
]

TEXTS = [
    "The answer to life the universe and everything is of course",
    "Hello, world!\n\nSecond paragraph.\n\n\n\n\n\n\n\n\n\n\n\nafter twelve newlines",
    "  leading spaces, trailing spaces   ",
    " x",
    "3.14159 + 2718281828 = 5859",
    "emoji \U0001f600\U0001f680 in a row\U0001f9d1\u200d\U0001f4bb and a flag \U0001f1eb\U0001f1f7",
    "日本語のテキストと中文混合, 한국어, ελληνικά, русский, עברית, العربية",
    "tabs\tand\r\ncarriage returns, zero-width\u200bspace, combining e\u0301",
    "def f(x):\n    return {'a': [1, 2, 3]}  # code\n",
    "\U0001f600",
    "",
]


def test_sha256_matches_doc(model_path: Path) -> None:
    assert hashlib.sha256(model_path.read_bytes()).hexdigest() == SHA256


def test_special_ids(tok: Tokenizer) -> None:
    assert tok.vocab_size == 131072
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert [tok.id_to_piece(i) for i in range(4)] == ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]
    assert tok.id_to_piece(4) == "\n" and tok.id_to_piece(13) == "\n" * 10
    assert [tok.id_to_piece(i) for i in range(14, 24)] == list("0123456789")


@pytest.mark.parametrize("text,ids", EXAMPLES)
def test_example_encodings(tok: Tokenizer, text: str, ids: list[int]) -> None:
    assert tok.encode(text) == ids
    assert tok.decode(ids) == text


def test_emoji_byte_pieces(tok: Tokenizer) -> None:
    pieces = [tok.id_to_piece(i) for i in tok.encode("\U0001f600")]
    assert pieces == ["\u2581", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    assert [tok.byte_value(i) for i in tok.encode("\U0001f600")] == [None, 0xF0, 0x9F, 0x98, 0x80]


def test_bos_eos_flags(tok: Tokenizer) -> None:
    ids = tok.encode("The capital of France is")
    assert tok.encode("The capital of France is", bos=True) == [1, *ids]
    assert tok.encode("The capital of France is", eos=True) == [*ids, 2]
    assert tok.encode("The capital of France is", bos=True, eos=True) == [1, *ids, 2]
    assert tok.decode([1, *ids, 2]) == "The capital of France is"  # control pieces are invisible


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


def _stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    dec = StreamDecoder(tok)
    return [dec.push(i) for i in ids] + [dec.flush()]


@pytest.mark.parametrize("text", TEXTS)
def test_stream_decoder_matches_decode(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    chunks = _stream(tok, ids)
    assert "".join(chunks) == tok.decode(ids) == text
    assert all("\ufffd" not in c for c in chunks)


def test_stream_decoder_holds_incomplete_character(tok: Tokenizer) -> None:
    ids = tok.encode("a\U0001f600b")  # '▁a' + 4 byte pieces + 'b'
    dec = StreamDecoder(tok)
    out = [dec.push(i) for i in ids]
    assert out == ["a", "", "", "", "\U0001f600", "b"]
    assert dec.flush() == ""


def test_stream_decoder_leading_space(tok: Tokenizer) -> None:
    # the first '▁' is the dummy prefix and is dropped; later ones are real spaces
    assert "".join(_stream(tok, [130089, 3033])) == tok.decode([130089, 3033]) == " answer"
    assert _stream(tok, tok.encode("The answer")) == ["The", " answer", ""]
    assert "".join(_stream(tok, [1, 3033, 2, 3033])) == tok.decode([1, 3033, 2, 3033])


def test_stream_decoder_invalid_bytes_flushed(tok: Tokenizer) -> None:
    f0, x9f = tok.encode("\U0001f600")[1:3]
    ids = [422, f0, x9f]  # 'The' + an incomplete 4-byte character
    chunks = _stream(tok, ids)
    assert chunks[:3] == ["The", "", ""]
    assert "".join(chunks) == tok.decode(ids) == "The\ufffd\ufffd"


def test_stream_decoder_random_ids(tok: Tokenizer) -> None:
    """Fuzz: random mixes of control, byte, whitespace, digit and word pieces."""
    rng = random.Random(0)
    byte_ids = [i for i in range(tok.vocab_size) if tok.byte_value(i) is not None]
    assert len(byte_ids) == 256
    emoji = tok.encode("\U0001f600\u00e9\u4e2d")
    pool = [0, 1, 2, 3, 4, 5, 14, 15, 130089, 325, 422, 3033, 54164, 130670, *emoji]
    for _ in range(300):
        ids = [rng.choice(byte_ids) if rng.random() < 0.3 else rng.choice(pool) for _ in range(rng.randint(1, 40))]
        assert "".join(_stream(tok, ids)) == tok.decode(ids), ids


def test_stream_decoder_window_stays_small(tok: Tokenizer) -> None:
    # words, then byte-fallback runs (hieroglyph, emoji, Thai): the re-decoded window
    # never grows past two 4-byte characters
    ids = tok.encode("word " * 300 + "\U00013000\U0001f600\u0e01" * 30)
    dec = StreamDecoder(tok)
    for i in ids:
        dec.push(i)
        assert len(dec.ids) - dec.prefix <= 8
    assert dec.flush() == ""


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nope.model"):
        Tokenizer(tmp_path / "nope.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="bad.model"):
        Tokenizer(bad)


def test_text_stream_cuts_at_stop_string_and_holds_back_prefixes(tok):
    ids = tok.encode("Hello world. The end is near.")
    stream = TextStream(tok, ["end is"])
    out = []
    for i in ids:
        out.append(stream.push(i))
        if stream.stopped:
            break
    assert stream.stopped
    assert "".join(out) == "Hello world. The "
    # Text that could start a stop string is held back until it is clear, then released.
    stream = TextStream(tok, ["world!"])
    pieces = [stream.push(i) for i in tok.encode("Hello world.")]
    assert not stream.stopped
    assert "".join(pieces) + stream.finish() == "Hello world."
    assert "world" not in "".join(pieces[: len(tok.encode("Hello world"))])


def test_continuation_keeps_its_leading_space(tok):
    """Decoded after the prompt, a first piece "▁word" gives " word" (alone it would lose the space)."""
    prompt = tok.encode("She was rich,")
    cont = tok.encode("She was rich, and happy")[len(prompt):]
    stream = TextStream(tok, [], prompt)
    text = "".join(stream.push(t) for t in cont) + stream.finish()
    assert text == " and happy"
    assert tok.decode(prompt + cont) == tok.decode(prompt) + text
