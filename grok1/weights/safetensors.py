"""grok1's own checkpoint format: sharded safetensors, memory-mapped on load.

    DIR/config.json                        ModelConfig fields + "grok1": {"format": 1, "weights": KIND}
    DIR/model-00001-of-00002.safetensors   tensors under our parameter names (see names.py)
    DIR/model.safetensors.index.json       {"metadata": {"total_size": N}, "weight_map": {name: shard}}
    DIR/tokenizer.model                    when known

KIND is a weight format (quant.FORMATS) as config.json spells it (quant.CONFIG_NAMES): "int8" (the
release's int8 weights + bf16 scales, as released), "int4", "bfloat16" or "float32".
Every file is written to a temporary name, fsynced and renamed, and the index is written last,
so a directory with an index is complete. Loading maps each shard into memory (copy-on-write,
nothing read until used) and hands out tensors that share the mapping.

Shards are written as a stream (`write_shard`): tensor data goes to disk piece by piece, so
writing needs memory for one piece, not one shard; the safetensors header is written last into
space reserved for it (padded with spaces, as the format allows). The index records, per shard,
the CRC-32 of its data (the bytes after the header), computed from memory while writing
(`fileio.DirectWriter`); `verify_checkpoint` re-reads the shards against it.

Layout for tensor parallelism: tensors are [.., out, in] and C-contiguous, each wholly inside one
shard at an offset the header gives, so a rank reads only its slice (`read_slice`): a contiguous
byte range per leading index for an output-axis split, a contiguous run per row for an input-axis
split (`names.tp_split_axis` says which axis each tensor splits on).
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from grok1.config import ModelConfig
from grok1.fileio import ALIGN, DirectWriter, check_regular, crc32, write_atomic
from grok1.quant import CONFIG_NAMES
from grok1.weights.validate import DTYPES, check_header, read_json, short

INDEX = "model.safetensors.index.json"

_DTYPES = DTYPES
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
PIECE_BYTES = 64 << 20  # tensors are written (and converted) in pieces of at most this many bytes


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


def _header_reserve(names: list[str], ndims: list[int]) -> int:
    """Header bytes that surely hold the JSON header of these tensors, whatever their shapes and offsets,
    rounded so that the data starts at a multiple of ALIGN."""
    big = 10**19
    header = {"__metadata__": {"format": "pt"}} | {
        n: {"dtype": "BOOL", "shape": [big] * d, "data_offsets": [big, big]} for n, d in zip(names, ndims)}
    return -(-(8 + len(json.dumps(header, separators=(",", ":")))) // ALIGN) * ALIGN - 8


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
            sink = DirectWriter(tmp, 8 + reserve, PIECE_BYTES)
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


def write_index(out: Path, weight_map: dict[str, str], total: int, checksums: dict[str, str]) -> None:
    """The index, written last: its presence marks a complete checkpoint. It records each shard's data CRC-32
    (`checksums`) and its header's (computed here), so verification covers every byte."""
    headers = {shard: header_checksum(out / shard) for shard in sorted(checksums)}
    index = {"metadata": {"total_size": total, "crc32": dict(sorted(checksums.items())), "header_crc32": headers},
             "weight_map": weight_map}
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
    if weights not in CONFIG_NAMES.values():
        raise ValueError(f"weights must be one of {tuple(CONFIG_NAMES.values())}, got {weights!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / INDEX).unlink(missing_ok=True)  # the directory is incomplete until the index is back
    tensors = {name: t.detach().cpu() for name, t in tensors.items()}
    shards = plan_shards({n: t.numel() * t.element_size() for n, t in tensors.items()}, max_shard_bytes)
    weight_map, checksums = {}, {}
    for i, shard in enumerate(shards):
        fname = shard_name(i, len(shards))
        streams = ((n, as_stream(tensors[n])) for n in shard)
        checksums[fname] = write_shard(out / fname, streams, {n: tensors[n].dim() for n in shard})
        weight_map.update(dict.fromkeys(shard, fname))
    write_config(out, cfg, weights, extra)
    copy_tokenizer(tokenizer, out)
    write_index(out, weight_map, sum(t.numel() * t.element_size() for t in tensors.values()), checksums)
    return out


def read_header(file: str | Path) -> tuple[dict, int]:
    """The safetensors JSON header of `file` and the byte offset where tensor data starts, checked
    (`check_header`): what it says about every tensor is possible in this file. ValueError naming the file
    (and the tensor and field) otherwise; the message never quotes the file's bytes."""
    file = check_regular(file)
    size = file.stat().st_size
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{file}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(100 << 20, size - 8):
            raise ValueError(f"{file}: not a safetensors file, or a corrupt one (its header length is larger "
                             f"than {'the file' if n > size - 8 else '100 MB'})")
        text = f.read(n)
    try:
        header = json.loads(text)
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError; nesting deeper than the stack
        raise ValueError(f"{file}: corrupt safetensors header (not JSON)") from None
    check_header(header, file, size - 8 - n)
    return header, 8 + n


def header_checksum(file: Path) -> str:
    """CRC-32 of a shard's header bytes (the length and the JSON): the part the data CRC does not cover."""
    _, start = read_header(file)
    with open(file, "rb") as f:
        return f"{zlib.crc32(f.read(start)):08x}"


def _entry(header: dict, name: str, file: Path) -> dict:
    if name not in header or name == "__metadata__":
        raise ValueError(f"{file}: holds no tensor {short(name)} (the index says it does)")
    return header[name]


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
        dtype = _DTYPES[info["dtype"]]  # checked by read_header
        count = (end - begin) // torch.tensor([], dtype=dtype).element_size()
        t = torch.frombuffer(mm, dtype=dtype, count=count, offset=start + begin) if count else torch.empty(0, dtype=dtype)
        out[name] = t.view(info["shape"])
    return out


def read_config(path: str | Path) -> tuple[ModelConfig, str]:
    """(ModelConfig, weight kind as config.json spells it) of a grok1 checkpoint directory."""
    file = Path(path) / "config.json"
    raw = read_json(file)
    if not isinstance(raw, dict):
        raise ValueError(f"{file}: expected a JSON object")
    kind = raw.get("grok1", {}).get("weights") if isinstance(raw.get("grok1"), dict) else None
    if kind not in CONFIG_NAMES.values():
        raise ValueError(f"{file}: missing or unknown grok1.weights {kind!r} "
                         f"(expected one of {tuple(CONFIG_NAMES.values())})")
    return ModelConfig.from_dict(raw, source=str(file)), kind


def read_index(path: str | Path) -> dict:
    """The index of a checkpoint directory (grok1's or an HF layout): {"metadata": .., "weight_map": {name: shard}},
    checked: every shard is a file name inside the directory (never a path out of it), the checksums strings."""
    file = Path(path) / INDEX
    index = read_json(file)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise ValueError(f"{file}: no \"weight_map\" object")
    for name, shard in weight_map.items():
        if not (isinstance(shard, str) and shard not in ("", ".", "..") and Path(shard).name == shard
                and len(shard.encode("utf-8", "replace")) <= 255
                and "\\" not in shard and "\0" not in shard):
            raise ValueError(f"{file}: weight_map[{short(name)}] = {short(shard)} is not a file name in the "
                             "checkpoint directory")
    metadata = index.get("metadata", {})
    if not isinstance(metadata, dict) or not all(
            isinstance(metadata.get(k, {}), dict) and all(isinstance(v, str) for v in metadata.get(k, {}).values())
            for k in ("crc32", "header_crc32")):
        raise ValueError(f"{file}: \"metadata\" must be an object whose crc32 and header_crc32 map shards to strings")
    return index


def open_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """Every tensor of a checkpoint directory, memory-mapped."""
    path = Path(path)
    weight_map = read_index(path)["weight_map"]
    tensors: dict[str, Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        if not (path / shard).exists():
            raise ValueError(f"{path}: shard {shard} named in {INDEX} is missing")
        tensors.update(open_shard(path / shard))
    missing = set(weight_map) - set(tensors)
    if missing:
        raise ValueError(f"{path}: {INDEX} lists tensors no shard holds: {', '.join(sorted(missing)[:5])}")
    return tensors


def data_checksum(file: Path, progress: Callable[[int], object] | None = None) -> str:
    """CRC-32 of a shard's data (the bytes after its header), re-read from the disk (fileio.crc32)."""
    return crc32(file, read_header(file)[1], progress)


def verify_checkpoint(path: str | Path, progress: Callable[[int], object] | None = None) -> None:
    """Re-read every shard of a grok1 (or HF-layout) checkpoint directory against its index: the header
    parses, holds the tensors the index puts there, and the data's CRC-32 matches the recorded one.
    Raises ValueError naming the first bad shard."""
    path = Path(path)
    index = read_index(path)
    recorded = index.get("metadata", {}).get("crc32", {})
    headers = index.get("metadata", {}).get("header_crc32", {})
    for shard in sorted(set(index["weight_map"].values())):
        file = path / shard
        if not file.exists():
            raise ValueError(f"{path}: shard {shard} named in {INDEX} is missing")
        header, start = read_header(file)
        if shard in headers and header_checksum(file) != headers[shard]:
            raise ValueError(f"{file}: corrupt: the CRC-32 of its header differs from the one recorded in {INDEX}")
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
    shard = _shard_of(path, name)
    header, data_start = read_header(path / shard)
    info = _entry(header, name, path / shard)
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
    shard = _shard_of(Path(path), name)
    header, _ = read_header(Path(path) / shard)
    shape = _entry(header, name, Path(path) / shard)["shape"]
    if not shape:
        return open_shard(Path(path) / shard)[name].clone()
    return read_slice(path, name, 0, 0, shape[0])


def _shard_of(path: Path, name: str) -> str:
    weight_map = read_index(path)["weight_map"]
    if name not in weight_map:
        raise ValueError(f"{path / INDEX}: lists no tensor {short(name)}")
    return weight_map[name]
