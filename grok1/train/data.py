"""Token data for training: tokenize text once into a memory-mapped .npy file, pack it into
fixed-length sequences, split off a held-out set, and walk the training sequences in a seeded
order per epoch.

A sequence i of shard s is tokens[i*T : i*T + T + 1] (T inputs and the T next tokens), so
consecutive sequences share one boundary token and nothing else. Sequences are the unit of the
held-out split and of the shuffle. The position in the data is (epoch, sequences consumed in
that epoch): with the seed, that is all a resumed run needs to continue with the same batches.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from grok1.fileio import write_atomic
from grok1.tokenizer import Tokenizer


def check_utf8(file: str | Path) -> None:
    """Raise ValueError naming the file and the byte offset of the first byte that is not UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0  # bytes of the file before `block`
    with open(file, "rb") as f:
        while True:
            block = f.read(1 << 20)
            pending = decoder.getstate()[0]  # an unfinished character carried over from the previous block
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                data = pending + block
                raise ValueError(f"{file} is not UTF-8 text: byte 0x{data[e.start]:02x} at byte offset "
                                 f"{offset - len(pending) + e.start}") from None
            if not block:
                return
            offset += len(block)


def _text_chunks(file: Path, chunk_chars: int) -> Iterator[str]:
    """The file's text in pieces of about chunk_chars; a new piece starts only at a paragraph (a
    non-blank line after a blank one), so no newline run is split between pieces."""
    buf: list[str] = []
    size = 0
    with open(file, encoding="utf-8") as f:
        for line in f:
            if size >= chunk_chars and buf[-1] == "\n" and line != "\n":
                yield "".join(buf)
                buf, size = [], 0
            buf.append(line)
            size += len(line)
    if buf:
        yield "".join(buf)


def encode_continuation(tokenizer: Tokenizer, text: str) -> list[int]:
    """Ids of `text` as they appear when it follows a newline inside a longer text: SentencePiece
    puts its dummy-prefix space only at the start of an encode call, so encode "\n" + text and drop
    the ids of that "\n" (["▁", "\n"]). Chunked encoding then equals encoding the whole file."""
    lead = tokenizer.encode("\n")
    ids = tokenizer.encode("\n" + text)
    assert ids[: len(lead)] == lead, (lead, ids[: len(lead)])
    return ids[len(lead) :]


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def tokenize_files(files: Sequence[str | Path], tokenizer: Tokenizer, out: str | Path, eos: bool = True,
                   chunk_chars: int = 1 << 16, progress: bool = True) -> Path:
    """Encode UTF-8 text files into one 1-D .npy token file at `out` (uint16 when the vocabulary
    fits, else uint32), each file followed by EOS when `eos`. Streams: memory stays small
    whatever the corpus size. Written to a temporary name and renamed when complete."""
    from tqdm import tqdm

    for file in files:
        check_utf8(file)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    dtype = _token_dtype(tokenizer.vocab_size)
    raw = out.with_name(out.name + ".raw.tmp")
    total = sum(os.path.getsize(f) for f in files)
    count = 0
    with open(raw, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, desc=f"tokenizing -> {out.name}",
                                    disable=not progress) as bar:
        for file in files:
            for i, text in enumerate(_text_chunks(Path(file), chunk_chars)):
                ids = tokenizer.encode(text) if i == 0 else encode_continuation(tokenizer, text)
                ids = np.asarray(ids, dtype=dtype)
                f.write(ids.tobytes())
                count += ids.size
                bar.update(len(text.encode()))
            if eos:
                f.write(np.asarray([tokenizer.eos_id], dtype=dtype).tobytes())
                count += 1

    def npy() -> Iterator[bytes]:
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (count,)}
        with open(raw, "rb") as src:
            head = io.BytesIO()
            np.lib.format.write_array_header_1_0(head, header)
            yield head.getvalue()
            while block := src.read(1 << 24):
                yield block

    write_atomic(out, npy())
    raw.unlink()
    return out


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def cached_tokens(files: Sequence[str | Path], tokenizer: Tokenizer, cache_dir: str | Path,
                  progress: bool = True) -> Path:
    """Tokenize `files` into cache_dir/tokens.npy unless that file was already made from the same
    files (sizes and modification times) with the same tokenizer; returns its path."""
    cache_dir = Path(cache_dir)
    out, meta_file = cache_dir / "tokens.npy", cache_dir / "tokens.json"
    meta = {"sources": [[str(Path(f).resolve()), os.path.getsize(f), os.path.getmtime(f)] for f in files],
            "tokenizer_sha256": file_digest(tokenizer.path)}
    if out.is_file() and meta_file.is_file() and json.loads(meta_file.read_text()) == meta:
        return out
    tokenize_files(files, tokenizer, out, progress=progress)
    write_atomic(meta_file, json.dumps(meta, indent=1).encode())
    return out


def load_shards(paths: Sequence[str | Path]) -> list[np.ndarray]:
    """Memory-map pre-tokenized 1-D .npy token files (any integer dtype)."""
    shards = []
    for p in paths:
        try:
            a = np.load(p, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read token file {p}: {e}") from None
        if a.ndim != 1 or a.dtype.kind not in "iu":
            raise ValueError(f"token file {p}: expected a 1-D integer array, got {a.dtype} {a.shape}")
        shards.append(a)
    return shards


@dataclass
class DataState:
    """Where the training stream stands: `offset` sequences of epoch `epoch` have been used."""

    epoch: int = 0
    offset: int = 0


class TokenData:
    """Fixed-length sequences over memory-mapped token shards, with a seeded held-out split.

    `heldout_fraction` of the sequences (at least one when there are two or more) are chosen
    by a generator seeded with `split_seed` and never trained on.
    """

    def __init__(self, shards: Sequence[np.ndarray], seq_len: int, heldout_fraction: float = 0.05,
                 split_seed: int = 0, seed: int = 0) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.shards, self.seq_len, self.seed = list(shards), seq_len, seed
        per_shard = [max(0, (len(s) - 1) // seq_len) for s in self.shards]
        self.starts = np.cumsum([0, *per_shard])  # global sequence index -> shard via searchsorted
        n = int(self.starts[-1])
        if n < 1:
            raise ValueError(f"not enough tokens for one sequence of {seq_len + 1} "
                             f"(shards hold {sum(len(s) for s in self.shards)} tokens)")
        n_held = min(n - 1, max(1 if n > 1 and heldout_fraction > 0 else 0, round(n * heldout_fraction)))
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed)).numpy()
        self.heldout = np.sort(perm[:n_held])
        self.train = np.sort(perm[n_held:])
        self._order: tuple[int, np.ndarray] | None = None

    @property
    def tokens_per_epoch(self) -> int:
        return len(self.train) * self.seq_len

    def sequences(self, idx: Sequence[int] | np.ndarray) -> Tensor:
        """Global sequence indices -> int64 tensor [len(idx), T + 1]."""
        rows = []
        for i in idx:
            s = int(np.searchsorted(self.starts, i, side="right")) - 1
            start = (int(i) - int(self.starts[s])) * self.seq_len
            rows.append(np.asarray(self.shards[s][start : start + self.seq_len + 1], dtype=np.int64))
        return torch.from_numpy(np.stack(rows))

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The training sequences in the order epoch `epoch` visits them (seeded by seed and epoch)."""
        if self._order is None or self._order[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = (epoch, self.train[torch.randperm(len(self.train), generator=g).numpy()])
        return self._order[1]

    def next_batch(self, state: DataState, batch_size: int) -> tuple[Tensor, DataState]:
        """The next `batch_size` training sequences [B, T + 1] and the state after them; a batch
        never straddles epochs (the tail of an epoch that cannot fill a batch is skipped)."""
        if batch_size > len(self.train):
            raise ValueError(f"batch size {batch_size} exceeds the {len(self.train)} training sequences")
        epoch, offset = state.epoch, state.offset
        if offset + batch_size > len(self.train):
            epoch, offset = epoch + 1, 0
        idx = self.epoch_order(epoch)[offset : offset + batch_size]
        return self.sequences(idx), DataState(epoch, offset + batch_size)

    def heldout_batches(self, batch_size: int, max_sequences: int | None = None) -> Iterator[Tensor]:
        """The held-out sequences in a fixed order, in batches (the first `max_sequences` only, if given)."""
        idx = self.heldout[:max_sequences] if max_sequences else self.heldout
        for i in range(0, len(idx), batch_size):
            yield self.sequences(idx[i : i + batch_size])


def bigram_loss(data: TokenData, vocab_size: int, smoothing: float = 0.1) -> float:
    """Held-out cross-entropy (nats/token) of an add-`smoothing` bigram model counted on the
    training sequences: the simple baseline a trained model should beat. Scores exactly the
    (input, target) pairs the model is scored on."""
    counts = torch.zeros(vocab_size, vocab_size, dtype=torch.float64)
    for i in range(0, len(data.train), 256):
        seq = data.sequences(data.train[i : i + 256])
        pairs = seq[:, :-1].flatten() * vocab_size + seq[:, 1:].flatten()
        counts += torch.bincount(pairs, minlength=vocab_size * vocab_size).view(vocab_size, vocab_size)
    logp = (counts + smoothing).log() - (counts.sum(1, keepdim=True) + smoothing * vocab_size).log()
    total, n = 0.0, 0
    for seq in data.heldout_batches(256):
        total -= logp[seq[:, :-1].flatten(), seq[:, 1:].flatten()].sum().item()
        n += seq[:, 1:].numel()
    return total / n
