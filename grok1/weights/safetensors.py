"""grok1's own checkpoint format: sharded safetensors, memory-mapped on load.

    DIR/config.json                        ModelConfig fields + "grok1": {"format": 1, "weights": KIND}
    DIR/model-00001-of-00002.safetensors   tensors under our parameter names (see names.py)
    DIR/model.safetensors.index.json       {"metadata": {"total_size": N}, "weight_map": {name: shard}}
    DIR/tokenizer.model                    when known

KIND is "int8" (the release's int8 weights + bf16 scales, as released), "bfloat16" or "float32".
Every file is written to a temporary name, fsynced and renamed, and the index is written last,
so a directory with an index is complete. Loading maps each shard into memory (copy-on-write,
nothing read until used) and hands out tensors that share the mapping.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save as st_save
from torch import Tensor

from grok1.config import ModelConfig

INDEX = "model.safetensors.index.json"
WEIGHT_KINDS = ("int8", "bfloat16", "float32")

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I8": torch.int8,
           "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool}


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / INDEX).is_file()


def write_atomic(path: Path, data: bytes | Iterable[bytes]) -> None:
    """Write to `path.tmp`, fsync, rename: a crash leaves the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        for chunk in [data] if isinstance(data, bytes) else data:
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(tensors: dict[str, Tensor], cfg: ModelConfig, out_dir: str | Path, weights: str,
                    tokenizer: str | Path | None = None, max_shard_bytes: int = 2 << 30,
                    extra: dict | None = None) -> Path:
    """Write `tensors` (our names) as a grok1 checkpoint in `out_dir`; returns the directory."""
    if weights not in WEIGHT_KINDS:
        raise ValueError(f"weights must be one of {WEIGHT_KINDS}, got {weights!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / INDEX).unlink(missing_ok=True)  # the directory is incomplete until the index is back
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.detach().contiguous().cpu()
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_atomic(out / fname, st_save(shard, metadata={"format": "pt"}))
        weight_map.update(dict.fromkeys(shard, fname))
    config = cfg.to_dict() | {"grok1": {"format": 1, "weights": weights} | (extra or {})}
    write_atomic(out / "config.json", (json.dumps(config, indent=2) + "\n").encode())
    if tokenizer is not None and Path(tokenizer).resolve() != (out / "tokenizer.model").resolve():
        write_atomic(out / "tokenizer.model", Path(tokenizer).read_bytes())
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    write_atomic(out / INDEX, (json.dumps(index, indent=1) + "\n").encode())
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
