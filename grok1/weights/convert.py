"""Convert a Grok-1 checkpoint to grok1's format, the Hugging Face layouts or GGUF, tensor by tensor.

    convert(SRC, DST, to="grok1" | "hf" | "gguf", dtype=None | "int8" | "bf16" | "fp32" | "f16" | "q8_0")

Sources, detected from SRC: the release (`ckpt-0/tensor*_000`, through the safe reader; its config
from config.json beside it or given), grok1's format, and both HF layouts (`weights/hf.py`).
dtype per target: grok1 int8 (quantising float weights with the release's recipe when needed),
bf16 or fp32 (default: the source's); hf bf16 (default) or fp32; gguf fp32, f16 or q8_0 (default).

Memory: about one source tensor: the release reader holds one file's payload, grok1/HF shards are
read with pread (not mapped, so resident memory does not grow with the model), and transposes,
dequantisation and quantisation run piece by piece (`safetensors.PIECE_BYTES`) straight into a few
reused write buffers. The next tensor is read on a thread while this one is written, when the two
together are no bigger than the largest tensor; shards are written with O_DIRECT from a writer
thread that also hashes them (`safetensors.write_shard`), so reading, converting and writing overlap.

Resume (grok1 and hf targets): shards are planned up front from the config, each written
atomically; a manifest (`.grok1-convert.json`) records the CRC-32 of every finished shard. A rerun
with the same source, target and options re-hashes the finished shards, skips those that match
and writes the rest, so an interrupted conversion ends with the same bytes as an uninterrupted
one. The index is written last (a directory with an index is complete), then the verification
pass re-reads every shard against the recorded checksums. GGUF is one file, written to a
temporary name and renamed when complete.
"""

from __future__ import annotations

import itertools
import json
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from grok1.config import ModelConfig
from grok1.model import Transformer
from grok1.quant import quantize, unpack
from grok1.weights import hf, legacy, names
from grok1.weights import safetensors as st
from grok1.weights.legacy import CheckpointError
from grok1.weights.load import find_legacy_dir, resolve_config
from grok1.weights.safetensors import Stream

TARGETS = {"grok1": ("int8", "bf16", "fp32"), "hf": ("bf16", "fp32"), "gguf": ("fp32", "f16", "q8_0")}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "f16": torch.float16}
KIND_OF = {"int8": "int8", "bf16": "bfloat16", "fp32": "float32"}  # --dtype -> grok1 config "weights"
MANIFEST = ".grok1-convert.json"
RELEASE_GROUPS = {"attention.wqkv.weight": 1, "attention.wo.weight": 8, "moe.experts.w1": 1,
                  "moe.experts.w2": 8, "moe.experts.w3": 1}  # int8 scale groups, as released
Progress = Callable[[int], object]


@dataclass
class Source:
    path: Path
    format: str  # "release", "grok1" or "hf"
    config: ModelConfig
    kind: str  # "int8" (weights + scales), "bfloat16" or "float32"
    read: Callable[[str], tuple[Tensor, Tensor | None]]  # our weight name -> (weight [.., out, in], scales)
    nbytes: int  # bytes of the source files
    tokenizer: Path | None


@dataclass
class Result:
    out: Path
    bytes_written: int = 0
    convert_s: float = 0.0
    verify_s: float = 0.0
    skipped_shards: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _tokenizer_near(path: Path) -> Path | None:
    return next((p for p in (path / "tokenizer.model", path.parent / "tokenizer.model") if p.is_file()), None)


def _files_bytes(path: Path, pattern: str) -> int:
    return sum(f.stat().st_size for f in path.glob(pattern))


def open_source(path: str | Path, config: str | Path | None = None, preset: str | None = None) -> Source:
    """Detect the format of checkpoint directory `path` and give random access to its tensors."""
    path = Path(path)
    if st.is_checkpoint(path) and hf.is_hf_checkpoint(path):
        cfg, layout, _ = hf.open_hf(path)
        cache: dict[str, Tensor] = {}  # the tensors' names, for the layout's name lookups (no data read)
        cache.update(dict.fromkeys(json.loads((path / st.INDEX).read_text())["weight_map"], torch.empty(0)))

        def read_hf(name: str) -> tuple[Tensor, Tensor | None]:
            parts = {n: st.read_tensor(path, n) for n, _, _ in hf.tensor_names(name, cfg, layout)
                     if n != names.SGLANG_LM_HEAD}
            return hf.read_weight(parts, name, cfg, layout), None

        kind = str(st.read_tensor(path, names.column(names.LAYER[3], hf.LAYOUTS[layout], 0)).dtype)
        return Source(path, "hf", cfg, kind.removeprefix("torch."), read_hf, _files_bytes(path, "*.safetensors"),
                      _tokenizer_near(path))
    if st.is_checkpoint(path):
        cfg, kind = st.read_config(path)
        weight_map = json.loads((path / st.INDEX).read_text())["weight_map"]

        def read_grok1(name: str) -> tuple[Tensor, Tensor | None]:
            _layer, rel = names.split_layer(name)
            scales = name.removesuffix(rel) + names.SCALES.get(rel, "")
            return st.read_tensor(path, name), st.read_tensor(path, scales) if scales in weight_map else None

        return Source(path, "grok1", cfg, kind, read_grok1, _files_bytes(path, "*.safetensors"), _tokenizer_near(path))
    root = find_legacy_dir(path)
    if root is None:
        raise CheckpointError(f"{path}: not a Grok-1 checkpoint directory (expected the release's "
                              f"ckpt-0/tensor00000_000, grok1's {st.INDEX}, or an HF layout)")
    cfg = resolve_config(path, config, preset)
    if len(list(root.glob("tensor*_000"))) != len(legacy.reference_paths(cfg)):
        legacy.read_checkpoint(root, cfg)  # raises the file-count error naming the config

    def read_release(name: str) -> tuple[Tensor, Tensor | None]:
        parts = []
        for ref_path, row in names.to_reference(name):
            obj = legacy.read_path(root, ref_path, cfg)
            if isinstance(obj, legacy.QuantizedWeight8bit):
                w, s = torch.from_numpy(obj.weight), torch.from_numpy(obj.scales.view(np.int16)).view(torch.bfloat16)
            else:
                w, s = torch.from_numpy(obj), None
            parts.append((w.transpose(-1, -2) if row.transpose else w, s))  # a view: copied piece by piece
        if len(parts) == 1:
            return parts[0]
        if len({s.shape[-2] for _, s in parts if s is not None}) > 1:
            raise CheckpointError(f"{root}: query/key/value of {name} have different scale group counts")
        return torch.cat([w for w, _ in parts]), torch.cat([s for _, s in parts if s is not None], dim=-1)

    return Source(path, "release", cfg, "int8", read_release, _files_bytes(root, "tensor*_000"), _tokenizer_near(path))


def unit_names(cfg: ModelConfig) -> list[str]:
    """Our weight names in model order (int8 scales travel with their weight)."""
    layer = list(dict.fromkeys(r.ours for r in names.LAYER))
    return ["tok_embeddings.weight", *(f"layers.{i}.{rel}" for i in range(cfg.n_layers) for rel in layer), "norm.weight"]


def model_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {n: tuple(t.shape) for n, t in Transformer(cfg).state_dict().items()}


def is_matrix(name: str) -> bool:
    return names.split_layer(name)[1] in names.SCALES


def float_pieces(w: Tensor, s: Tensor | None, dtype: torch.dtype, max_bytes: int = st.PIECE_BYTES // 4) -> Iterator[Tensor]:
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
        sp = s[:, r:r + rows] if w.dtype == torch.int8 else s[r:r + rows]  # int8 [G, out], int4 [out, blocks]
        yield dequantize_int8(w[r:r + rows], sp).to(dtype) if w.dtype == torch.int8 else unpack(w[r:r + rows], sp, dtype)


def dequantize_int8(q: Tensor, s: Tensor) -> Tensor:
    """quant.dequantize(q, s, float32) (exact int8 * scale products) by broadcasting the [G, out] scales
    over groups of inputs instead of expanding them: the same values, half the passes over memory."""
    groups = s.shape[-2]
    return (q.unflatten(-1, (groups, q.shape[-1] // groups)).float() * s.float().transpose(-1, -2)[..., None]).flatten(-2)


def _int8_streams(w: Tensor, s: Tensor | None, groups: int) -> tuple[Stream, Stream]:
    """Weight and scales streams in the release's int8: passed through, or quantised piece by piece."""
    if s is not None and w.dtype == torch.int8:
        return Stream(torch.int8, tuple(w.shape), st.pieces(w)), st.as_stream(s)
    *lead, out, inp = w.shape
    if inp % groups:
        groups = 1
    scales = torch.empty(*lead, groups, out, dtype=torch.bfloat16)

    def quantised() -> Iterator[Tensor]:
        for idx in np.ndindex(*lead):  # one expert (or the single matrix) at a time, in row blocks
            rows = max(1, (st.PIECE_BYTES // 4) // (4 * inp))
            for r in range(0, out, rows):
                wp = w[idx][r:r + rows]
                dense = wp.float() if s is None else unpack(wp, scale_rows(s[idx], w, r, rows), torch.float32)
                q, sp = quantize(dense, groups)
                scales[idx][:, r:r + rows] = sp
                yield q

    return Stream(torch.int8, tuple(w.shape), quantised()), Stream(torch.bfloat16, tuple(scales.shape), iter([scales]))


def scale_rows(s: Tensor, w: Tensor, r: int, rows: int) -> Tensor:
    """The scales of output rows r .. r + rows of weight w (int8 scales [G, out], int4 [out, blocks])."""
    return s[:, r:r + rows] if w.dtype == torch.int8 else s[r:r + rows]


def _out_dtype(name: str, dtype: str, source_dtype: torch.dtype) -> torch.dtype:
    """Output dtype of a float tensor: norms and router stay float32, the embedding follows dtype
    (int8: kept as stored), matrices follow dtype."""
    rel = names.split_layer(name)[1]
    if rel.endswith("norm.weight") or rel == "moe.gate.weight" or name == "norm.weight":
        return torch.float32
    if dtype == "int8":
        return source_dtype
    return DTYPES[dtype]


def _grok1_streams(name: str, dtype: str, w: Tensor, s: Tensor | None) -> Iterator[tuple[str, Stream]]:
    if is_matrix(name) and dtype == "int8":
        ws, ss = _int8_streams(w, s, RELEASE_GROUPS[names.split_layer(name)[1]])
        yield name, ws
        yield name.removesuffix(names.split_layer(name)[1]) + names.SCALES[names.split_layer(name)[1]], ss
        return
    out = _out_dtype(name, dtype, w.dtype if s is None else torch.float32)
    yield name, Stream(out, tuple(w.shape), float_pieces(w, s, out))


def _hf_streams(cfg: ModelConfig, name: str, dtype: str, layout: str, w: Tensor, s: Tensor | None
                ) -> Iterator[tuple[str, Stream]]:
    out = _out_dtype(name, dtype, w.dtype)
    rows = hf.part_rows(cfg)
    for hf_name, part, expert in hf.tensor_names(name, cfg, layout):
        wp, sp = w, s
        if part is not None:
            r0, r1 = rows[part]
            wp, sp = w[r0:r1], None if s is None else scale_rows(s, w, r0, r1 - r0)
        if expert is not None:
            wp, sp = w[expert], None if s is None else s[expert]
        yield hf_name, Stream(out, tuple(wp.shape), float_pieces(wp, sp, out))


def _ndims(name: str, target: str, dtype: str, cfg: ModelConfig, shapes: dict, layout: str) -> dict[str, int]:
    if target == "hf":
        return {n: len(shapes[name]) - (expert is not None) for n, _, expert in hf.tensor_names(name, cfg, layout)}
    rel = names.split_layer(name)[1]
    scales = {name.removesuffix(rel) + names.SCALES[rel]: len(shapes[name])} if is_matrix(name) and dtype == "int8" else {}
    return {name: len(shapes[name])} | scales


def _planned_bytes(name: str, dtype: str, shapes: dict, target: str, layout: str) -> int:
    n = int(np.prod(shapes[name]))
    if is_matrix(name):  # int8: + bf16 scales, in the release's groups
        scales = 2 * n // shapes[name][-1] * RELEASE_GROUPS[names.split_layer(name)[1]] if dtype == "int8" else 0
        return n * {"int8": 1, "bf16": 2, "fp32": 4}[dtype] + scales
    size = n * (4 if dtype in ("fp32", "int8") or not name.endswith("embeddings.weight") else 2)
    return 2 * size if target == "hf" and layout == "sglang" and name == "tok_embeddings.weight" else size


def read_ahead(src: Source, units: list[str], sizes: dict[str, int]) -> Iterator[tuple[str, tuple]]:
    """(unit, src.read(unit)) in order; the next unit is read on a thread while the caller writes this
    one, when the two fit in the largest unit's size (so memory stays near one big tensor)."""
    budget = max(sizes.values(), default=0)
    with ThreadPoolExecutor(1) as pool:
        pending = None
        for i, unit in enumerate(units):
            data = pending.result() if pending is not None else src.read(unit)
            pending = None
            if i + 1 < len(units) and sizes[unit] + sizes[units[i + 1]] <= budget:
                pending = pool.submit(src.read, units[i + 1])
            yield unit, data


def _stale_shards(out: Path, keep: set[str]) -> list[Path]:
    pattern = re.compile(r"model-\d{5}-of-\d{5}\.safetensors(\.tmp)?")
    return [f for f in out.iterdir() if pattern.fullmatch(f.name) and f.name not in keep]


def convert_sharded(src: Source, out: Path, target: str, dtype: str, layout: str = "vllm",
                    max_shard_bytes: int = 2 << 30, progress: Progress | None = None,
                    verify: bool = True, tokenizer: Path | None = None) -> Result:
    """Write src as grok1's format or an HF layout in `out`, resumably (module doc)."""
    cfg, result = src.config, Result(out)
    shapes = model_shapes(cfg)
    units = unit_names(cfg)
    plan = st.plan_shards({u: _planned_bytes(u, dtype, shapes, target, layout) for u in units}, max_shard_bytes)
    key = {"source": str(src.path.resolve()), "source_format": src.format, "to": target, "dtype": dtype,
           "layout": layout if target == "hf" else None, "config": cfg.to_dict(), "plan": plan}
    out.mkdir(parents=True, exist_ok=True)
    (out / st.INDEX).unlink(missing_ok=True)  # incomplete until the index is back
    manifest = _read_manifest(out / MANIFEST)
    done: dict[str, str] = manifest["done"] if manifest.get("key") == key else {}
    files = [st.shard_name(i, len(plan)) for i in range(len(plan))]
    for stale in _stale_shards(out, set(files)):
        stale.unlink()
    start = time.perf_counter()
    weight_map: dict[str, str] = {}
    sha: dict[str, str] = {}
    todo = []
    for fname, shard in zip(files, plan):
        file = out / fname
        if fname in done and file.is_file() and st.data_checksum(file) == done[fname]:
            sha[fname] = done[fname]  # finished before, verified: kept
            result.skipped_shards.append(fname)
            if progress is not None:
                progress(file.stat().st_size)
        else:
            done.pop(fname, None)
            todo.append(fname)
    sizes = {u: _planned_bytes(u, dtype, shapes, target, layout) for u in units}
    reads = read_ahead(src, [u for f, shard in zip(files, plan) if f in todo for u in shard], sizes)
    for fname, shard in zip(files, plan):
        ndims: dict[str, int] = {}
        for u in shard:
            ndims |= _ndims(u, target, dtype, cfg, shapes, layout)
        weight_map |= dict.fromkeys(ndims, fname)
        if fname not in todo:
            continue
        file = out / fname
        streams = (t for u, (w, s) in itertools.islice(reads, len(shard))
                   for t in (_grok1_streams(u, dtype, w, s) if target == "grok1"
                             else _hf_streams(cfg, u, dtype, layout, w, s)))
        try:
            sha[fname] = done[fname] = st.write_shard(file, streams, ndims, progress)
        except OSError as e:
            raise OSError(e.errno, f"cannot write {file} ({e.strerror or e}); nothing half-written is left, "
                          f"{len(done)} finished shards are kept: free space and rerun to resume") from None
        st.write_atomic(out / MANIFEST, json.dumps({"key": key, "done": done}).encode())
        result.bytes_written += file.stat().st_size
    tokenizer = tokenizer or src.tokenizer
    if target == "grok1":
        st.write_config(out, cfg, KIND_OF[dtype])
    else:
        text = json.dumps(hf.hf_config(cfg, layout, DTYPES[dtype]), indent=2) + "\n"
        st.write_atomic(out / "config.json", text.encode())
        result.notes = hf.compat_notes(cfg)
    st.copy_tokenizer(tokenizer, out)
    total = sum((out / f).stat().st_size - st.read_header(out / f)[1] for f in files)
    st.write_index(out, weight_map, total, sha)
    (out / MANIFEST).unlink(missing_ok=True)
    result.convert_s = time.perf_counter() - start
    if verify:
        start = time.perf_counter()
        st.verify_checkpoint(out)
        result.verify_s = time.perf_counter() - start
    return result


def _read_manifest(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def planned_bytes(src: Source, target: str, dtype: str, layout: str = "vllm") -> int:
    """Bytes of tensor data the conversion will write (for a progress bar)."""
    if target == "gguf":
        from grok1.weights import gguf

        return sum(gguf.nbytes(shape, qtype) for _, _, _, shape, qtype in gguf.plan(src.config, dtype))
    shapes = model_shapes(src.config)
    return sum(_planned_bytes(u, dtype, shapes, target, layout) for u in unit_names(src.config))


def default_dtype(src: Source, target: str) -> str:
    if target == "grok1":
        return {"int8": "int8", "bfloat16": "bf16", "float32": "fp32"}.get(src.kind, "int8")
    return {"hf": "bf16", "gguf": "q8_0"}[target]


def convert(src: str | Path, dst: str | Path, to: str, dtype: str | None = None, layout: str = "vllm",
            config: str | Path | None = None, preset: str | None = None, tokenizer: str | Path | None = None,
            max_shard_bytes: int = 2 << 30, progress: Progress | None = None, verify: bool = True) -> Result:
    """Convert checkpoint `src` to format `to` in `dst` (a directory; for gguf a .gguf file). See module doc."""
    if to not in TARGETS:
        raise ValueError(f"unknown target format {to!r}; valid: {', '.join(TARGETS)}")
    source = open_source(src, config, preset)
    dtype = dtype or default_dtype(source, to)
    if dtype not in TARGETS[to]:
        hint = (" (vLLM and SGLang load bf16: int8 weights are dequantised exactly to bf16, the reference's own "
                "bf16 weights; keep int8 in grok1's format)") if to == "hf" and dtype == "int8" else ""
        raise ValueError(f"--dtype {dtype} is not available for --to {to}; choose one of "
                         f"{', '.join(TARGETS[to])}{hint}")
    if layout not in hf.LAYOUTS:
        raise ValueError(f"unknown HF layout {layout!r}; valid: {', '.join(hf.LAYOUTS)}")
    tok = Path(tokenizer) if tokenizer else None
    if to == "gguf":
        from grok1.weights import gguf  # gguf imports this module

        return gguf.export(source, Path(dst), dtype, tok or source.tokenizer, progress, verify)
    return convert_sharded(source, Path(dst), to, dtype, layout, max_shard_bytes, progress, verify, tok)
