"""Helpers and fixtures for the training tests (imported by name: a second conftest.py here would shadow
tests/conftest.py for `from conftest import ...`). Test modules import the fixtures as `*_fixture`."""

from pathlib import Path

import numpy as np
import pytest

WORDS = [
    "the", "lady", "said", "that", "her", "sister", "would", "walk", "to", "the", "house", "before", "dinner",
    "and", "the", "gentleman", "was", "very", "glad", "of", "it", "because", "he", "had", "been", "long", "at",
    "home", "with", "his", "friend", "who", "never", "spoke"
]


def synthetic_text(n_sentences: int = 600, seed: int = 0) -> str:
    """Deterministic English-like text: sentences of words from a small list, paragraphs, some digits."""
    rng = np.random.default_rng(seed)
    paragraphs = []
    for p in range(n_sentences // 6):
        sentences = []
        for _ in range(6):
            words = [WORDS[i] for i in rng.integers(0, len(WORDS), rng.integers(5, 12))]
            sentences.append(" ".join(words).capitalize() + ".")
        paragraphs.append(" ".join(sentences) + f" Chapter {p}.")
    return "\n\n".join(paragraphs) + "\n"


@pytest.fixture(scope="session", name="corpus")
def corpus_fixture(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(synthetic_text())
    return path


@pytest.fixture(scope="session", name="tokenizer_path")
def tokenizer_path_fixture(corpus, tmp_path_factory) -> Path:
    from grok1.train.tokenizer import train_tokenizer

    return train_tokenizer([corpus], tmp_path_factory.mktemp("tok") / "tokenizer.model", vocab_size=320)


def pattern_tokens(n: int, period: int = 7, vocab: int = 64, seed: int = 0) -> np.ndarray:
    """A learnable token stream: a fixed random cycle of `period` ids (>= 4, so no pad/bos/eos/unk)."""
    rng = np.random.default_rng(seed)
    cycle = rng.integers(4, vocab, period)
    return np.resize(cycle, n).astype(np.uint16)


@pytest.fixture(name="pattern_file")
def pattern_file_fixture(tmp_path) -> Path:
    path = tmp_path / "pattern.npy"
    np.save(path, pattern_tokens(8000))
    return path
