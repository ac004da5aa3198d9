"""Checkpoint sources: open a Grok-1 checkpoint in any format grok1 reads; read its tensors under our names.

    source = open_source(path, config=None, preset=None)
    source.format          "release", "grok1" or "hf": detected here (`detect`), and nowhere else
    source.config          its ModelConfig
    source.weights         how its matrices are stored, a quant.FORMATS name ("int8" for the release)
    source.tokenizer       the tokenizer.model beside it, or None
    source.names()         our names of the tensors it holds, weights and the scales of int8/int4 matrices
    source.read(name)      one of our weights: (weight [.., out, in], its scales or None)
    source.read_slice(name, axis, start, stop)   one rank's slice of a weight or scales tensor
    source.tensors()       every (name, tensor) of `names()`, for loading into a model

Formats:
  release  the official release, `ckpt-0/tensor{i:05d}_000` pickles, through the safe reader
           (legacy.py). The config is not in the checkpoint: the one given, else `config.resolve_config`.
           Its matrices are stored [.., in, out] (read as a transposed view) and q / k / v apart
           (fused into wqkv on read: `fuse`).
  grok1    grok1's sharded safetensors (safetensors.py), config.json with a "grok1" block. `tensors()`
           hands out tensors that share the shards' memory maps (zero copy); `read` and `read_slice`
           read with pread into fresh memory (resident memory does not grow with the model).
  hf       the Hugging Face layouts vLLM and SGLang load (hf.py), config.json with model_type "grok-1";
           q / k / v fused and experts stacked on read.

Memory: `read` holds one of our weights (and, for the release, the files of its parts) at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from grok1.config import ModelConfig, resolve_config
from grok1.model import Transformer
from grok1.quant import CONFIG_NAMES, unpack, weight_format
from grok1.weights import hf, legacy, names
from grok1.weights import safetensors as st
from grok1.weights.legacy import CheckpointError
from grok1.weights.validate import read_json, short


class Source:
    """A checkpoint opened for reading (module doc). The formats differ in `read`, and where they can do
    better than reading whole weights, in `read_slice` and `tensors`."""

    format: str

    def __init__(self, path: Path, config: ModelConfig, weights: str) -> None:
        self.path, self.config, self.weights = path, config, weights
        self.tokenizer = next((p for p in (path / "tokenizer.model", path.parent / "tokenizer.model") if p.is_file()),
                              None)

    def names(self) -> list[str]:
        """Our names of every tensor `tensors()` yields, in model order: each weight, then its scales."""
        return names.unit_names(self.config)

    def read(self, name: str) -> tuple[Tensor, Tensor | None]:
        """Our weight `name` (a name of `names.unit_names`): (weight [.., out, in], possibly a strided view;
        its scales [.., groups, out] for int8 (int4: [.., out, blocks]), or None for a float matrix)."""
        raise NotImplementedError

    def read_slice(self, name: str, axis: int, start: int, stop: int) -> Tensor:
        """`name`[.., start:stop, ..] along `axis`, in fresh contiguous memory: the part of one tensor that a
        tensor-parallel rank holds. `name` is a weight or a scales name of `names()`; `names.tp_split_axis`
        says which axis each splits on. Formats that can read only the slice's bytes do (grok1); the others
        read the whole tensor and slice it (the release's files hold whole tensors)."""
        _, rel = names.split_layer(name)
        owner = next((w for w, s in names.SCALES.items() if s == rel), None)  # name is the scales of `owner`
        whole = self.read(name)[0] if owner is None else self.read(name.removesuffix(rel) + owner)[1]
        if whole is None:
            raise CheckpointError(f"{self.path}: holds no tensor {name}")
        return whole.narrow(axis, start, stop - start).contiguous()

    def tensors(self) -> Iterator[tuple[str, Tensor]]:
        """(name, tensor) for every name of `names()`, contiguous, one weight read at a time."""
        for name in names.unit_names(self.config):
            weight, scales = self.read(name)
            yield name, weight.contiguous()
            if scales is not None:
                yield names.scales_name(name), scales.contiguous()


class ReleaseSource(Source):
    format = "release"

    def __init__(self, path: Path, root: Path, config: ModelConfig) -> None:
        super().__init__(path, config, "int8")
        self.root = root  # the directory holding tensor00000_000
        if len(list(root.glob("tensor*_000"))) != len(legacy.reference_paths(config)):
            legacy.read_checkpoint(root, config)  # raises the file-count error naming the config

    def names(self) -> list[str]:
        return [n for unit in names.unit_names(self.config) for n in (unit, names.scales_name(unit)) if n]

    def read(self, name: str) -> tuple[Tensor, Tensor | None]:
        parts = []
        for path, row in names.to_reference(name):
            weight, scales = _to_torch(legacy.read_path(self.root, path, self.config))
            parts.append((weight.transpose(-1, -2) if row.transpose else weight, scales))
        return fuse(parts, f"{self.root}: {name}")


class Grok1Source(Source):
    format = "grok1"

    def __init__(self, path: Path) -> None:
        config, kind = st.read_config(path)
        super().__init__(path, config, next(f for f, n in CONFIG_NAMES.items() if n == kind))
        self.weight_map = st.read_index(path)["weight_map"]
        check_tensors(path, self.weight_map, config)

    def names(self) -> list[str]:
        return list(self.weight_map)

    def read(self, name: str) -> tuple[Tensor, Tensor | None]:
        scales = names.scales_name(name)
        return st.read_tensor(self.path, name), st.read_tensor(self.path, scales) if scales in self.weight_map else None

    def read_slice(self, name: str, axis: int, start: int, stop: int) -> Tensor:
        return st.read_slice(self.path, name, axis, start, stop)  # only the slice's bytes

    def tensors(self) -> Iterator[tuple[str, Tensor]]:
        return iter(st.open_checkpoint(self.path).items())  # memory-mapped: nothing read until used


class HFSource(Source):
    format = "hf"

    def __init__(self, path: Path) -> None:
        file = path / "config.json"
        config = hf.config_from_hf(read_json(file), str(file))
        self.weight_map = st.read_index(path)["weight_map"]
        self.layout = hf.detect_layout(set(self.weight_map))
        probe = st.read_tensor(path, names.column(names.LAYER[3], hf.LAYOUTS[self.layout], 0))  # an o_proj
        super().__init__(path, config, weight_format(probe))

    def read(self, name: str) -> tuple[Tensor, Tensor | None]:
        parts: dict[int | None, list[Tensor]] = {}  # wqkv part (or None) -> its tensors, one per expert
        for hf_name, part, _expert in hf.tensor_names(name, self.config, self.layout):
            if hf_name == names.SGLANG_LM_HEAD:
                continue
            if hf_name not in self.weight_map:
                raise CheckpointError(f"{self.path}: HF checkpoint lacks tensor {hf_name} (for our {name})")
            parts.setdefault(part, []).append(st.read_tensor(self.path, hf_name))
        return fuse([(torch.stack(ts) if "experts" in name else ts[0], None) for ts in parts.values()],
                    f"{self.path}: {name}")


def check_tensors(path: Path, weight_map: dict[str, str], cfg: ModelConfig) -> None:
    """A grok1 checkpoint's index and shard headers against its config, before anything is built or read: the
    tensors the config needs are there, nothing else is, and each weight has the config's shape."""
    shapes = model_shapes(cfg)
    where = f"{path / st.INDEX}"
    missing = [n for n in shapes if n not in weight_map]
    if missing:
        raise CheckpointError(f"{where}: lacks tensor {missing[0]}{f' and {len(missing) - 1} more' if missing[1:] else ''}"
                              f", which its config.json ({cfg.n_layers} layers, {cfg.n_experts} experts) needs")
    owners = {names.scales_name(n): n for n in shapes if names.scales_name(n)}
    allowed = set(shapes) | set(owners)
    extra = [n for n in weight_map if n not in allowed and n.removesuffix(".scales") + ".weight" not in shapes]
    if extra:
        raise CheckpointError(f"{where}: lists tensor {short(extra[0])}, which its config.json has no place for")
    for shard in sorted(set(weight_map.values())):
        if not (path / shard).exists():
            raise CheckpointError(f"{path}: shard {shard} named in {st.INDEX} is missing")
        header, _ = st.read_header(path / shard)
        for name, shard_of in weight_map.items():
            if shard_of != shard:
                continue
            if name not in header or name == "__metadata__":
                raise CheckpointError(f"{path / shard}: lacks tensor {name} (the index puts it there)")
            got = header[name]["shape"]
            if header[name]["dtype"] == "U8" and got:  # int4: two values per byte along the input axis
                got = [*got[:-1], 2 * got[-1]]
            if name in shapes and tuple(got) != shapes[name]:
                raise CheckpointError(f"{path / shard}: tensor {name} has shape {got}, its config.json says "
                                      f"{list(shapes[name])}")
            owner = owners.get(name)
            if owner is not None and 0 not in got:  # int8 scales [.., groups, out], int4 [.., out, blocks]; or empty
                lead, out = shapes[owner][:-2], shapes[owner][-2]
                if len(got) != len(lead) + 2 or tuple(got[:-2]) != lead or out not in got[-2:]:
                    raise CheckpointError(f"{path / shard}: scales {name} have shape {got}, which does not fit "
                                          f"its weight's {list(shapes[owner])}")


def find_release_dir(path: str | Path) -> Path | None:
    """The release layout: `path/ckpt-0/tensor00000_000` (or `path` is the ckpt-0 directory itself)."""
    path = Path(path)
    for d in (path / "ckpt-0", path):
        if (d / "tensor00000_000").is_file():
            return d
    return None


def detect(path: str | Path) -> str:
    """The format of the checkpoint directory `path`: "release", "grok1" or "hf" (CheckpointError if none)."""
    path = Path(path)
    if (path / st.INDEX).is_file():
        try:
            raw = read_json(path / "config.json")
            hf_config = isinstance(raw, dict) and raw.get("model_type") == "grok-1"
        except ValueError:
            hf_config = False  # grok1's reader names what is wrong with config.json
        return "hf" if hf_config else "grok1"
    if find_release_dir(path) is not None:
        return "release"
    raise CheckpointError(f"{path}: not a Grok-1 checkpoint directory (expected the release's "
                          f"ckpt-0/tensor00000_000, grok1's {st.INDEX}, or an HF layout)")


def open_source(path: str | Path, config: ModelConfig | str | Path | None = None,
                preset: str | None = None) -> Source:
    """Open the checkpoint directory `path`, whatever its format. `config` (a ModelConfig or a JSON file) or
    `preset` is the release's config (default: config.json beside it); grok1 and HF checkpoints carry theirs."""
    path = Path(path)
    fmt = detect(path)
    if fmt == "grok1":
        return Grok1Source(path)
    if fmt == "hf":
        return HFSource(path)
    cfg = config if isinstance(config, ModelConfig) else resolve_config(path, config, preset)
    return ReleaseSource(path, find_release_dir(path), cfg)


def fuse(parts: list[tuple[Tensor, Tensor | None]], where: str) -> tuple[Tensor, Tensor | None]:
    """One of our weights from its stored parts (q, k, v -> wqkv; one part is returned as it is): the
    weights [.., out_i, in] joined along the output axis, and their scales [.., groups, out_i] too, which
    needs the same group count in every part."""
    if len(parts) == 1:
        return parts[0]
    scales = [s for _, s in parts if s is not None]
    if len({s.shape[-2] for s in scales}) > 1:
        raise CheckpointError(f"{where}: query/key/value have different scale group counts "
                              f"{[s.shape[-2] for s in scales]}; they must match to be fused")
    return torch.cat([w for w, _ in parts], dim=-2), torch.cat(scales, dim=-1) if scales else None


def _to_torch(obj: np.ndarray | legacy.QuantizedWeight8bit) -> tuple[Tensor, Tensor | None]:
    """A release tensor as torch, sharing numpy's memory: (weight, bf16 scales or None)."""
    if isinstance(obj, legacy.QuantizedWeight8bit):  # the scales arrive as the uint16 bits of bf16
        return torch.from_numpy(obj.weight), torch.from_numpy(obj.scales.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(obj), None


# ---- what the writers (convert.py, gguf.py) need of what they read ----


def model_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our tensors' shapes for a config (float model: no scales)."""
    with torch.device("meta"):
        return {n: tuple(t.shape) for n, t in Transformer(cfg).state_dict().items()}


def scale_rows(s: Tensor, w: Tensor, r: int, rows: int) -> Tensor:
    """The scales of output rows r .. r + rows of weight w (int8 scales [G, out], int4 [out, blocks])."""
    return s[:, r:r + rows] if w.dtype == torch.int8 else s[r:r + rows]


def float_pieces(w: Tensor, s: Tensor | None, dtype: torch.dtype, max_bytes: int = st.PIECE_BYTES // 4
                 ) -> Iterator[Tensor]:
    """The dense weight in dtype, piece by piece in C order (dequantised when s holds int8/int4 scales)."""
    if s is None or not s.numel():
        for p in st.pieces(w, max_bytes):
            yield p.to(dtype)
        return
    if w.dim() > 2:
        for e in range(w.shape[0]):
            yield from float_pieces(w[e], s[e], dtype, max_bytes)
        return
    rows = max(1, max_bytes // (4 * w.shape[-1] * (2 if w.dtype == torch.uint8 else 1)))
    for r in range(0, w.shape[0], rows):
        yield unpack(w[r:r + rows], scale_rows(s, w, r, rows), dtype)
