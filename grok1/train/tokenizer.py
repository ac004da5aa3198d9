"""Train a SentencePiece BPE tokenizer with the Grok-1 conventions (GROK1.md section 3).

Byte fallback (no text is ever unknown), split digits, identity normaliser, a dummy prefix,
extra whitespace kept, pad 0 `[PAD]`, bos 1 `[BOS]`, eos 2 `[EOS]`, unk 3 `[UNK]`, then runs of
1..10 newlines and the digits 0..9 as user-defined pieces (ids 4..23), as in the release.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from pathlib import Path

import sentencepiece as spm

from grok1.fileio import write_atomic

NEWLINE_RUNS = ["\n" * n for n in range(1, 11)]
DIGITS = [str(d) for d in range(10)]
MAX_LINE_BYTES = 1 << 16  # a reflowed paragraph is one training "sentence"; longer ones are split


def _lines(files: Sequence[str | Path]) -> Iterator[str]:
    for file in files:
        with open(file, encoding="utf-8") as f:
            for line in f:
                line = line.rstrip("\n")
                while len(line.encode()) > MAX_LINE_BYTES:  # split at a space so no line is dropped
                    cut = line.rfind(" ", 0, MAX_LINE_BYTES // 4) + 1 or MAX_LINE_BYTES // 4
                    yield line[:cut]
                    line = line[cut:]
                if line.strip():
                    yield line


def train_tokenizer(files: Sequence[str | Path], out: str | Path, vocab_size: int = 4096,
                    max_sentences: int = 2_000_000, seed_sentences: int = 1_000_000, threads: int = 2) -> Path:
    """Train a BPE tokenizer on the lines of UTF-8 text `files` and write it to `out` (atomically).

    `vocab_size` counts everything: 4 special pieces, 20 user-defined pieces, 256 byte pieces
    and the learned merges. Lines are the training sentences; at most `max_sentences` are sampled.
    Deterministic for the same input.
    """
    if not files:
        raise ValueError("train_tokenizer needs at least one text file")
    for f in files:
        if not Path(f).is_file():
            raise ValueError(f"tokenizer training text not found: {f}")
    reserved = 4 + len(NEWLINE_RUNS) + len(DIGITS) + 256
    if vocab_size <= reserved:
        raise ValueError(f"vocab_size must exceed {reserved} (special, user-defined and byte pieces), got {vocab_size}")
    model = io.BytesIO()
    try:
        _train(files, model, vocab_size, max_sentences, seed_sentences, threads)
    except RuntimeError as e:  # e.g. a vocabulary too small for the characters of the text
        raise ValueError(f"SentencePiece training failed: {str(e).strip().splitlines()[-1]}") from None
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, model.getvalue())
    return out


def _train(files: Sequence[str | Path], model: io.BytesIO, vocab_size: int, max_sentences: int,
           seed_sentences: int, threads: int) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=_lines(files), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", add_dummy_prefix=True,
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, max_sentencepiece_length=16,
        split_by_whitespace=True, character_coverage=1.0, max_sentence_length=MAX_LINE_BYTES,
        input_sentence_size=max_sentences, shuffle_input_sentence=True, seed_sentencepiece_size=seed_sentences,
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, pad_piece="[PAD]", bos_piece="[BOS]", eos_piece="[EOS]",
        unk_piece="[UNK]", user_defined_symbols=NEWLINE_RUNS + DIGITS, num_threads=threads,
        minloglevel=2,
    )
