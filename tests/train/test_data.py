"""grok1.train.data: token files, packing, held-out split, seeded order, bigram baseline."""

import math

import numpy as np
import pytest
import torch
from train_helpers import corpus_fixture, pattern_tokens, tokenizer_path_fixture  # noqa: F401  (fixtures)

from grok1.tokenizer import Tokenizer
from grok1.train.data import DataState, TokenData, bigram_loss, cached_tokens, load_shards, tokenize_files


def test_tokenize_files_matches_the_tokenizer(corpus, tokenizer_path, tmp_path):
    tok = Tokenizer(tokenizer_path)
    out = tokenize_files([corpus, corpus], tok, tmp_path / "t.npy", chunk_chars=500, progress=False)
    arr = np.load(out, mmap_mode="r")
    assert isinstance(arr, np.memmap) and arr.dtype == np.uint16
    one = np.asarray(arr[: len(arr) // 2])
    assert one[-1] == tok.eos_id and np.array_equal(one, arr[len(arr) // 2 :])  # each file then EOS
    # Chunked encoding decodes back to the text (chunks end at blank lines).
    assert tok.decode(one[:-1].tolist()) == corpus.read_text()
    assert not list(tmp_path.glob("*.tmp"))


def test_cached_tokens_tokenizes_once(corpus, tokenizer_path, tmp_path):
    tok = Tokenizer(tokenizer_path)
    first = cached_tokens([corpus], tok, tmp_path, progress=False)
    mtime = first.stat().st_mtime_ns
    assert cached_tokens([corpus], tok, tmp_path, progress=False).stat().st_mtime_ns == mtime


def _data(n_tokens=1000, seq_len=10, **kw):
    return TokenData([np.arange(n_tokens, dtype=np.int64)], seq_len, **kw)


def test_packing_and_split():
    data = _data(heldout_fraction=0.1)
    assert len(data.train) + len(data.heldout) == 99  # (1000 - 1) // 10
    assert len(data.heldout) == 10 and not set(data.train) & set(data.heldout)
    seq = data.sequences([3])
    assert seq.tolist() == [list(range(30, 41))]  # T inputs + the next token
    assert torch.equal(_data(heldout_fraction=0.1).sequences(data.heldout), data.sequences(data.heldout))


def test_shards_are_indexed_as_one_stream():
    data = TokenData([np.arange(25), np.arange(100, 131)], 5, heldout_fraction=0)
    assert len(data.train) == 4 + 6
    assert data.sequences([4]).tolist() == [[100, 101, 102, 103, 104, 105]]


def test_order_is_seeded_and_resumable():
    data = _data(seed=3)
    state, first = DataState(), []
    for _ in range(25):  # more than an epoch: 89 training sequences / 8 per batch = 11 batches
        batch, state = data.next_batch(state, 8)
        first.append(batch)
    assert state.epoch == 2
    # Each epoch visits every training sequence once, in its own order.
    epoch0 = torch.cat(first[:11])[:, 0] // 10
    assert sorted(epoch0.tolist()) == sorted(data.train.tolist()[:88]) or len(set(epoch0.tolist())) == 88
    assert not torch.equal(first[0], first[11])
    # A fresh object continues from a saved position with the same batches.
    resumed, s = _data(seed=3), DataState(1, 16)
    batch, _ = resumed.next_batch(s, 8)
    assert torch.equal(batch, first[13])
    other, _ = _data(seed=4).next_batch(DataState(), 8)
    assert not torch.equal(other, first[0])


def test_heldout_batches_cover_the_heldout_set():
    data = _data(heldout_fraction=0.2)
    rows = torch.cat(list(data.heldout_batches(7)))
    assert rows.shape == (len(data.heldout), 11)
    assert len(torch.cat(list(data.heldout_batches(7, max_sequences=5)))) == 5


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="not enough tokens"):
        TokenData([np.arange(5)], 10)
    np.save(tmp_path / "f.npy", np.zeros((2, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="1-D integer"):
        load_shards([tmp_path / "f.npy"])


def test_bigram_baseline():
    tokens = pattern_tokens(5000, period=7, vocab=64)  # deterministic successor: bigram is near-perfect
    data = TokenData([tokens], 16, heldout_fraction=0.1)
    assert bigram_loss(data, 64) < 0.05
    noise = np.random.default_rng(0).integers(4, 64, 5000)
    loss = bigram_loss(TokenData([noise], 16, heldout_fraction=0.1), 64)
    assert loss > math.log(60) - 0.2  # no structure to find: no better than uniform


def test_chunked_encoding_equals_whole_text_encoding(corpus, tokenizer_path, tmp_path):
    tok = Tokenizer(tokenizer_path)
    text = corpus.read_text()
    arr = np.load(tokenize_files([corpus], tok, tmp_path / "t.npy", chunk_chars=300, progress=False))
    assert arr[:-1].tolist() == tok.encode(text)
