"""grok1's own checkpoint format: sharded safetensors, memory-mapped on load.

    DIR/config.json                        ModelConfig fields + "grok1": {"format": 1, "weights": KIND}
    DIR/model-00001-of-00002.safetensors   tensors under our parameter names (see names.py)
    DIR/model.safetensors.index.json       {"metadata": {"total_size": N}, "weight_map": {name: shard}}
    DIR/tokenizer.model                    when known

KIND is "int8" (the release's int8 weights + bf16 scales, as released), "bfloat16" or "float32".
Every file is written to a temporary name, fsynced and renamed, and the index is written last,
so a directory with an index is complete. Loading maps each shard into memory (copy-on-write,
nothing read until used) and hands out tensors that share the mapping.

Shards are written as a stream (`write_shard`): tensor data goes to disk piece by piece, so
writing needs memory for one piece, not one shard; the safetensors header is written last into
space reserved for it (padded with spaces, as the format allows). The index records, per shard,
the CRC-32 of its data (the bytes after the header), computed from memory while writing;
`verify_checkpoint` re-reads the shards against it.

Layout for tensor parallelism: tensors are [.., out, in] and C-contiguous, each wholly inside one
shard at an offset the header gives, so a rank reads only its slice (`read_slice`): a contiguous
byte range per leading index for an output-axis split, a contiguous run per row for an input-axis
split (`names.tp_split_axis` says which axis each tensor splits on).
"""

from __future__ import annotations

import ctypes
import json
import math
import mmap
import os
import queue
import struct
import sys
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from grok1.config import ModelConfig

INDEX = "model.safetensors.index.json"
WEIGHT_KINDS = ("int8", "int4", "bfloat16", "float32")

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I8": torch.int8,
           "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
PIECE_BYTES = 64 << 20  # tensors are written (and converted) in pieces of at most this many bytes


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / INDEX).is_file()


def write_atomic(path: Path, data: bytes | Iterable[bytes]) -> None:
    """Write to `path.tmp`, fsync, rename: a crash leaves the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.writelines([data] if isinstance(data, bytes) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@dataclass
class Stream:
    """A tensor to write piece by piece: `pieces` are its consecutive slices in C order (any strides)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    pieces: Iterable[Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.tensor([], dtype=self.dtype).element_size()


def pieces(t: Tensor, max_bytes: int = PIECE_BYTES) -> Iterator[Tensor]:
    """Slices of t along its leading axes, in order, each at most max_bytes unless one row is bigger."""
    if t.dim() <= 1 or t.numel() * t.element_size() <= max_bytes:
        yield t
        return
    row = t[0].numel() * t.element_size()
    if row > max_bytes:
        for sub in t.unbind(0):
            yield from pieces(sub, max_bytes)
        return
    yield from t.split(max(1, max_bytes // row), dim=0)


def as_stream(t: Tensor) -> Stream:
    return Stream(t.dtype, tuple(t.shape), pieces(t))


ALIGN = 4096  # O_DIRECT granularity: tensor data starts at a multiple of it and is written in multiples


def _header_reserve(names: list[str], ndims: list[int]) -> int:
    """Header bytes that surely hold the JSON header of these tensors, whatever their shapes and offsets,
    rounded so that the data starts at a multiple of ALIGN."""
    big = 10**19
    header = {"__metadata__": {"format": "pt"}} | {
        n: {"dtype": "BOOL", "shape": [big] * d, "data_offsets": [big, big]} for n, d in zip(names, ndims)}
    return -(-(8 + len(json.dumps(header, separators=(",", ":")))) // ALIGN) * ALIGN - 8


class _Sink:
    """Tensor data -> file at `start`, written and hashed on a background thread.

    Each piece is copied (transposed, cast) straight into one of a few reused page-aligned buffers,
    then the writer thread writes whole ALIGN-blocks with O_DIRECT where the file system allows it
    (no page cache: on a VM whose fresh memory is slow to touch, and for outputs larger than RAM,
    that is faster) and hashes them; the bytes short of a block move on to the next buffer. Making
    the next piece overlaps with writing this one. Writes and crc32 release the GIL."""

    def __init__(self, file: Path, start: int, buffers: int = 3) -> None:
        self.fd = os.open(file, os.O_WRONLY)
        try:
            self.direct = os.open(file, os.O_WRONLY | getattr(os, "O_DIRECT", 0))
        except OSError:  # e.g. tmpfs: buffered writes
            self.direct = os.dup(self.fd)
        self.cap = PIECE_BYTES + ALIGN
        self.free: queue.Queue = queue.Queue()
        for _ in range(buffers):
            self.free.put(mmap.mmap(-1, self.cap))  # page-aligned, touched once, reused
        self.buf, self.fill, self.pos = self.free.get(), 0, start
        self.crc = 0
        self.error: Exception | None = None
        self.todo: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (job := self.todo.get()) is not None:
            buf, n = job
            if self.error is None:
                try:
                    view, done = memoryview(buf)[:n], 0
                    while done < n:
                        done += os.pwrite(self.direct, view[done:], self.pos + done)
                    self.pos += n
                    self.crc = zlib.crc32(view, self.crc)
                except Exception as e:  # noqa: BLE001 -- any failure must reach the producer
                    self.error = e
            self.free.put(buf)

    def put(self, piece: Tensor, dtype: torch.dtype) -> int:
        """Copy a piece (any strides) into the stream as dtype; returns its byte count."""
        if self.error is not None:
            raise self.error
        item = torch.tensor([], dtype=dtype).element_size()
        n = piece.numel() * item
        if not n:
            return 0
        if n > self.cap - self.fill or self.fill % item:  # an oversized row, or an odd offset: go through bytes
            data = piece.to(dtype).contiguous().reshape(-1).view(torch.uint8)
            for i in range(0, n, PIECE_BYTES):
                self._put_bytes(data[i:i + PIECE_BYTES])
            return n
        dst = torch.frombuffer(self.buf, dtype=torch.uint8, count=n, offset=self.fill)
        dst.view(dtype).view(piece.shape).copy_(piece)
        self.fill += n
        self._ship()
        return n

    def _put_bytes(self, data: Tensor) -> None:
        n = min(data.numel(), self.cap - self.fill)
        torch.frombuffer(self.buf, dtype=torch.uint8, count=n, offset=self.fill).copy_(data[:n])
        self.fill += n
        self._ship()
        if n < data.numel():
            self._put_bytes(data[n:])

    def _ship(self) -> None:
        """Hand the whole blocks to the writer; keep the rest in a fresh buffer."""
        whole = self.fill - self.fill % ALIGN
        if not whole:
            return
        buf, rest = self.buf, self.fill - whole
        self.todo.put((buf, whole))
        self.buf = self.free.get()
        self.buf[:rest] = buf[whole:self.fill]  # the writer only reads [0, whole) of the old buffer
        self.fill = rest

    def close(self) -> str:
        """Finish: the last partial block (buffered write); the CRC-32 of all data (8 hex digits)."""
        try:
            self.todo.put(None)
            self.thread.join()
            if self.error is not None:
                raise self.error
            tail = memoryview(self.buf)[:self.fill]
            if os.pwrite(self.fd, tail, self.pos) != len(tail):
                raise OSError(f"short write at the end of {self.fd}")
            return f"{zlib.crc32(tail, self.crc):08x}"
        finally:
            os.close(self.direct)
            os.close(self.fd)


def write_shard(file: Path, tensors: Iterable[tuple[str, Stream]], ndims: dict[str, int],
                progress: Callable[[int], object] | None = None) -> str:
    """Write a safetensors file from streamed tensors (`ndims`: name -> rank, for every name, in order);
    returns the CRC-32 of the data. Memory: a few reused pieces. Atomic: written as `file.tmp`,
    fsynced, renamed. An OSError (e.g. a full disk) removes the temporary file and propagates."""
    reserve = _header_reserve(list(ndims), list(ndims.values()))
    header: dict = {"__metadata__": {"format": "pt"}}
    tmp = file.with_name(file.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            sink = _Sink(tmp, 8 + reserve)
            try:
                offset = 0
                for name, stream in tensors:
                    if name not in ndims or name in header or len(stream.shape) != ndims[name]:
                        raise ValueError(f"{file}: tensor {name} {list(stream.shape)} is not in the shard plan")
                    start = offset
                    for piece in stream.pieces:
                        n = sink.put(piece, stream.dtype)
                        offset += n
                        if progress is not None:
                            progress(n)
                    if offset - start != stream.nbytes:
                        raise ValueError(f"{file}: tensor {name} gave {offset - start} bytes, its shape needs "
                                         f"{stream.nbytes}")
                    header[name] = {"dtype": _DTYPE_NAMES[stream.dtype], "shape": list(stream.shape),
                                    "data_offsets": [start, offset]}
            finally:
                checksum = sink.close()
            missing = [n for n in ndims if n not in header]
            if missing:
                raise ValueError(f"{file}: the shard plan's tensor {missing[0]} was never given")
            text = json.dumps(header, separators=(",", ":")).encode()
            f.write(struct.pack("<Q", reserve) + text + b" " * (reserve - len(text)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, file)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return checksum


def write_index(out: Path, weight_map: dict[str, str], total: int, crc32: dict[str, str]) -> None:
    """The index, written last: its presence marks a complete checkpoint."""
    index = {"metadata": {"total_size": total, "crc32": dict(sorted(crc32.items()))}, "weight_map": weight_map}
    write_atomic(out / INDEX, (json.dumps(index, indent=1) + "\n").encode())


def write_config(out: Path, cfg: ModelConfig, weights: str, extra: dict | None = None) -> None:
    config = cfg.to_dict() | {"grok1": {"format": 1, "weights": weights} | (extra or {})}
    write_atomic(out / "config.json", (json.dumps(config, indent=2) + "\n").encode())


def copy_tokenizer(tokenizer: str | Path | None, out: Path) -> None:
    if tokenizer is not None and Path(tokenizer).resolve() != (out / "tokenizer.model").resolve():
        write_atomic(out / "tokenizer.model", Path(tokenizer).read_bytes())


def plan_shards(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Split names (in order) into consecutive groups of at most max_shard_bytes (a bigger tensor alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in sizes.items():
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def save_checkpoint(tensors: dict[str, Tensor], cfg: ModelConfig, out_dir: str | Path, weights: str,
                    tokenizer: str | Path | None = None, max_shard_bytes: int = 2 << 30,
                    extra: dict | None = None) -> Path:
    """Write `tensors` (our names) as a grok1 checkpoint in `out_dir`; returns the directory."""
    if weights not in WEIGHT_KINDS:
        raise ValueError(f"weights must be one of {WEIGHT_KINDS}, got {weights!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / INDEX).unlink(missing_ok=True)  # the directory is incomplete until the index is back
    tensors = {name: t.detach().cpu() for name, t in tensors.items()}
    shards = plan_shards({n: t.numel() * t.element_size() for n, t in tensors.items()}, max_shard_bytes)
    weight_map, crc32 = {}, {}
    for i, shard in enumerate(shards):
        fname = shard_name(i, len(shards))
        streams = ((n, as_stream(tensors[n])) for n in shard)
        crc32[fname] = write_shard(out / fname, streams, {n: tensors[n].dim() for n in shard})
        weight_map.update(dict.fromkeys(shard, fname))
    write_config(out, cfg, weights, extra)
    copy_tokenizer(tokenizer, out)
    write_index(out, weight_map, sum(t.numel() * t.element_size() for t in tensors.values()), crc32)
    return out


def read_header(file: str | Path) -> tuple[dict, int]:
    """The safetensors JSON header of `file` and the byte offset where tensor data starts."""
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{file}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 << 20:
            raise ValueError(f"{file}: corrupt safetensors header (claims {n} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{file}: corrupt safetensors header") from None
    return header, 8 + n


def open_shard(file: str | Path) -> dict[str, Tensor]:
    """All tensors of one shard, sharing a copy-on-write memory map of the file (zero copy)."""
    header, start = read_header(file)
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else b""
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{file}: tensor {name} has unsupported dtype {info['dtype']}")
        if start + end > size:
            raise ValueError(f"{file}: truncated: tensor {name} ends at byte {start + end}, file has {size}")
        count = (end - begin) // torch.tensor([], dtype=dtype).element_size()
        t = torch.frombuffer(mm, dtype=dtype, count=count, offset=start + begin) if count else torch.empty(0, dtype=dtype)
        out[name] = t.view(info["shape"])
    return out


def release_pages(t: Tensor) -> None:
    """Drop the pages of a tensor handed out by `open_shard` once it is no longer needed (e.g. copied into
    another layout): the memory map lives as long as any tensor of its shard, so without this a model
    rebuilt from the mapped weights holds them twice. Only whole pages inside t, only where they belong to a
    private file mapping (dropped pages read back from the file if touched); a no-op elsewhere and off Linux."""
    if sys.platform != "linux" or t.device.type != "cpu" or not t.is_contiguous() or not t.numel():
        return
    page = mmap.PAGESIZE
    start = -(-t.data_ptr() // page) * page
    end = (t.data_ptr() + t.numel() * t.element_size()) // page * page
    if end <= start or not _in_private_file_mapping(start, end):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4)  # MADV_DONTNEED


def _in_private_file_mapping(start: int, end: int) -> bool:
    """Whether [start, end) lies inside one private mapping of a file (/proc/self/maps)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        fields = line.split()
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= start and end <= hi:
            return fields[1].endswith("p") and len(fields) >= 6 and fields[4] != "0" and fields[5].startswith("/")
    return False


def read_config(path: str | Path) -> tuple[ModelConfig, str]:
    """(ModelConfig, weight kind) of a grok1 checkpoint directory."""
    file = Path(path) / "config.json"
    try:
        raw = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {file}: {e}") from None
    kind = raw.get("grok1", {}).get("weights")
    if kind not in WEIGHT_KINDS:
        raise ValueError(f"{file}: missing or unknown grok1.weights {kind!r} (expected one of {WEIGHT_KINDS})")
    return ModelConfig.from_dict(raw, source=str(file)), kind


def open_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """Every tensor of a grok1 checkpoint directory, memory-mapped."""
    path = Path(path)
    try:
        index = json.loads((path / INDEX).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path / INDEX}: {e}") from None
    tensors: dict[str, Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        if not (path / shard).is_file():
            raise ValueError(f"{path}: shard {shard} named in {INDEX} is missing")
        tensors.update(open_shard(path / shard))
    missing = set(index["weight_map"]) - set(tensors)
    if missing:
        raise ValueError(f"{path}: {INDEX} lists tensors no shard holds: {', '.join(sorted(missing)[:5])}")
    return tensors


def data_checksum(file: Path, progress: Callable[[int], object] | None = None) -> str:
    """CRC-32 of a shard's data (the bytes after its header), read from the disk with O_DIRECT where
    the file system allows it (a true re-read, and no page cache filled with the model)."""
    _, start = read_header(file)
    crc = 0
    buf = mmap.mmap(-1, 16 << 20)  # page-aligned
    try:
        fd = os.open(file, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    except OSError:
        fd = os.open(file, os.O_RDONLY)
    try:
        pos = start - start % ALIGN  # O_DIRECT reads whole blocks: skip the header's part of the first one
        skip = start - pos
        while n := os.preadv(fd, [buf], pos):
            crc = zlib.crc32(memoryview(buf)[skip:n], crc)
            if progress is not None:
                progress(n - skip)
            pos, skip = pos + n, 0
    finally:
        os.close(fd)
    return f"{crc:08x}"


def verify_checkpoint(path: str | Path, progress: Callable[[int], object] | None = None) -> None:
    """Re-read every shard of a grok1 (or HF-layout) checkpoint directory against its index: the header
    parses, holds the tensors the index puts there, and the data's CRC-32 matches the recorded one.
    Raises ValueError naming the first bad shard."""
    path = Path(path)
    try:
        index = json.loads((path / INDEX).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path / INDEX}: {e}") from None
    recorded = index.get("metadata", {}).get("crc32", {})
    for shard in sorted(set(index["weight_map"].values())):
        file = path / shard
        if not file.is_file():
            raise ValueError(f"{path}: shard {shard} named in {INDEX} is missing")
        header, start = read_header(file)
        expected = {n for n, s in index["weight_map"].items() if s == shard}
        if expected - set(header):
            raise ValueError(f"{file}: corrupt header: lacks {min(expected - set(header))}")
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if start + end != file.stat().st_size:
            raise ValueError(f"{file}: corrupt or truncated: header says {start + end} bytes, file has "
                             f"{file.stat().st_size}")
        if shard in recorded and data_checksum(file, progress) != recorded[shard]:
            raise ValueError(f"{file}: corrupt: the CRC-32 of its data differs from the one recorded in {INDEX}")


def read_slice(path: str | Path, name: str, axis: int, start: int, stop: int) -> Tensor:
    """Read tensor `name`[..., start:stop, ...] (slice along `axis`) from a checkpoint directory, reading
    only the bytes of the slice from its shard (what a tensor-parallel rank needs)."""
    path = Path(path)
    shard = json.loads((path / INDEX).read_text())["weight_map"][name]
    header, data_start = read_header(path / shard)
    info = header[name]
    shape, dtype = info["shape"], _DTYPES[info["dtype"]]
    axis = axis % len(shape)
    item = torch.tensor([], dtype=dtype).element_size()
    outer, inner = math.prod(shape[:axis]), math.prod(shape[axis + 1:]) * item
    run = (stop - start) * inner
    out = torch.empty(outer * run, dtype=torch.uint8)
    buf = out.numpy()
    fd = os.open(path / shard, os.O_RDONLY)
    try:
        for o in range(outer):
            at = data_start + info["data_offsets"][0] + (o * shape[axis] + start) * inner
            if os.preadv(fd, [buf[o * run:(o + 1) * run].data], at) != run:
                raise ValueError(f"{path / shard}: truncated while reading {name}")
    finally:
        os.close(fd)
    return out.view(dtype).view(*shape[:axis], stop - start, *shape[axis + 1:])


def read_tensor(path: str | Path, name: str) -> Tensor:
    """One whole tensor of a checkpoint directory, read with pread into fresh memory (not mapped)."""
    shard = json.loads((Path(path) / INDEX).read_text())["weight_map"][name]
    header, _ = read_header(Path(path) / shard)
    shape = header[name]["shape"]
    if not shape:
        return open_shard(Path(path) / shard)[name].clone()
    return read_slice(path, name, 0, 0, shape[0])
