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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from grok1.config import ModelConfig
from grok1.fileio import ALIGN, DirectWriter, crc32, write_atomic
from grok1.quant import CONFIG_NAMES

INDEX = "model.safetensors.index.json"

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I8": torch.int8,
           "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool}
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
    """The index, written last: its presence marks a complete checkpoint."""
    index = {"metadata": {"total_size": total, "crc32": dict(sorted(checksums.items()))}, "weight_map": weight_map}
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


def read_config(path: str | Path) -> tuple[ModelConfig, str]:
    """(ModelConfig, weight kind as config.json spells it) of a grok1 checkpoint directory."""
    file = Path(path) / "config.json"
    try:
        raw = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {file}: {e}") from None
    kind = raw.get("grok1", {}).get("weights")
    if kind not in CONFIG_NAMES.values():
        raise ValueError(f"{file}: missing or unknown grok1.weights {kind!r} "
                         f"(expected one of {tuple(CONFIG_NAMES.values())})")
    return ModelConfig.from_dict(raw, source=str(file)), kind


def read_index(path: str | Path) -> dict:
    """The index of a checkpoint directory (grok1's or an HF layout): {"metadata": .., "weight_map": {name: shard}}."""
    file = Path(path) / INDEX
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {file}: {e}") from None


def open_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """Every tensor of a checkpoint directory, memory-mapped."""
    path = Path(path)
    weight_map = read_index(path)["weight_map"]
    tensors: dict[str, Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        if not (path / shard).is_file():
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
    shard = read_index(path)["weight_map"][name]
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
    shard = read_index(path)["weight_map"][name]
    header, _ = read_header(Path(path) / shard)
    shape = header[name]["shape"]
    if not shape:
        return open_shard(Path(path) / shard)[name].clone()
    return read_slice(path, name, 0, 0, shape[0])
