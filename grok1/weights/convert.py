"""Convert a Grok-1 checkpoint to grok1's format, the Hugging Face layouts or GGUF, tensor by tensor.

    convert(SRC, DST, to="grok1" | "hf" | "gguf", dtype=None | "int8" | "bf16" | "fp32" | "f16" | "q8_0")

Sources, detected and read by `source.open_source`: the release (`ckpt-0/tensor*_000`, through the safe
reader; its config from config.json beside it or given), grok1's format, and both HF layouts.
dtype per target: grok1 int8 (quantising float weights with the release's recipe when needed),
bf16 or fp32 (default: the source's); hf bf16 (default) or fp32; gguf fp32, f16 or q8_0 (default).

Memory: about one source tensor: the release reader holds one file's payload, grok1/HF shards are
read with pread (not mapped, so resident memory does not grow with the model), and transposes,
dequantisation and quantisation run piece by piece (`safetensors.PIECE_BYTES`) straight into a few
reused write buffers. The next tensor is read on a thread while this one is written, when the two
together are no bigger than the largest tensor; shards are written with O_DIRECT from a writer
thread that also hashes them (`safetensors.write_shard`, `fileio.DirectWriter`), so reading, converting
and writing overlap.

Resume (grok1 and hf targets): shards are planned up front from the config, each written
atomically; a manifest (`.grok1-convert.json`) records the CRC-32 of every finished shard. A rerun
with the same source, target and options re-hashes the finished shards, skips those that match
and writes the rest, so an interrupted conversion ends with the same bytes as an uninterrupted
one. The index is written last (a directory with an index is complete), then the verification
pass re-reads every shard against the recorded checksums. The manifest stays: a rerun after the
index was written (e.g. killed during the verification) re-hashes and keeps every shard. GGUF is
one file, written to a temporary name and renamed when complete.

Safety: DST may not be SRC (also through a symlink, a bind mount or another spelling of the path) nor
contain it; convert deletes only what it wrote: unfinished `.tmp` shards and shards its manifest
recorded that the new plan no longer has.
"""

from __future__ import annotations

import itertools
import json
import os
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
from grok1.fileio import write_atomic
from grok1.quant import CONFIG_NAMES, RELEASE_GROUPS, STORAGE_DTYPES, quantize, unpack
from grok1.weights import gguf, hf, names
from grok1.weights import safetensors as st
from grok1.weights.safetensors import Stream
from grok1.weights.source import Source, float_pieces, model_shapes, open_source, scale_rows

# --dtype per target: grok1 and hf take weight formats (quant.FORMATS), gguf its own tensor types
TARGETS = {"grok1": ("int8", "bf16", "fp32"), "hf": ("bf16", "fp32"), "gguf": ("fp32", "f16", "q8_0")}
MANIFEST = ".grok1-convert.json"
Progress = Callable[[int], object]


@dataclass
class Result:
    out: Path
    bytes_written: int = 0
    convert_s: float = 0.0
    verify_s: float = 0.0
    skipped_shards: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def is_matrix(name: str) -> bool:
    return names.split_layer(name)[1] in names.SCALES


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


def _out_dtype(name: str, dtype: str, source_dtype: torch.dtype) -> torch.dtype:
    """Output dtype of a float tensor: norms and router stay float32, the embedding follows dtype
    (int8: kept as stored), matrices follow dtype."""
    rel = names.split_layer(name)[1]
    if rel.endswith("norm.weight") or rel == "moe.gate.weight" or name == "norm.weight":
        return torch.float32
    if dtype == "int8":
        return source_dtype
    return STORAGE_DTYPES[dtype]


def _release_groups(name: str) -> int:
    """The release's int8 scale-group count of one of our matrices (quant.RELEASE_GROUPS)."""
    return RELEASE_GROUPS[names.split_layer(name)[1].removesuffix(".weight").rsplit(".", 1)[-1]]


def _grok1_streams(name: str, dtype: str, w: Tensor, s: Tensor | None) -> Iterator[tuple[str, Stream]]:
    if is_matrix(name) and dtype == "int8":
        ws, ss = _int8_streams(w, s, _release_groups(name))
        yield name, ws
        yield names.scales_name(name), ss
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
    scales = {names.scales_name(name): len(shapes[name])} if is_matrix(name) and dtype == "int8" else {}
    return {name: len(shapes[name])} | scales


def _planned_bytes(name: str, dtype: str, shapes: dict, target: str, layout: str) -> int:
    n = int(np.prod(shapes[name]))
    if is_matrix(name):  # int8: + bf16 scales, in the release's groups
        scales = 2 * n // shapes[name][-1] * _release_groups(name) if dtype == "int8" else 0
        return n * STORAGE_DTYPES[dtype].itemsize + scales
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


def _stale_shards(out: Path, keep: set[str], ours: set[str]) -> list[Path]:
    """Files of an earlier run to delete: its unfinished `.tmp` shards, and the finished shards it recorded
    (`ours`) that the plan no longer has. Never a file convert did not write."""
    pattern = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
    return [f for f in out.iterdir() if f.name not in keep and f.is_file()
            and (f.name in ours or (f.name.endswith(".tmp") and pattern.fullmatch(f.name.removesuffix(".tmp"))))]


def check_destination(src: Path, dst: Path) -> None:
    """Refuse a DST that is SRC or holds it (convert writes config.json, tokenizer.model and shards into DST)."""
    s, d = src.resolve(), dst.resolve()
    same = s == d
    if not same and src.exists() and dst.exists():
        try:
            same = os.path.samefile(src, dst)  # the same directory through a bind mount or a hard link
        except OSError:
            pass
    if same or d in s.parents:
        raise ValueError(f"the destination {dst} {'is' if same else 'contains'} the source checkpoint {src}: "
                         "convert would overwrite or delete its files; write to a new directory "
                         "(to check a checkpoint in place: grok1 convert DIR DIR --verify-only)")


def convert_sharded(src: Source, out: Path, target: str, dtype: str, layout: str = "vllm",
                    max_shard_bytes: int = 2 << 30, progress: Progress | None = None,
                    tokenizer: Path | None = None) -> Result:
    """Write src as grok1's format or an HF layout in `out`, resumably (module doc); `convert` verifies it."""
    cfg, result = src.config, Result(out)
    shapes = model_shapes(cfg)
    units = names.unit_names(cfg)
    plan = st.plan_shards({u: _planned_bytes(u, dtype, shapes, target, layout) for u in units}, max_shard_bytes)
    key = {"source": str(src.path.resolve()), "source_format": src.format, "to": target, "dtype": dtype,
           "layout": layout if target == "hf" else None, "config": cfg.to_dict(), "plan": plan}
    out.mkdir(parents=True, exist_ok=True)
    (out / st.INDEX).unlink(missing_ok=True)  # incomplete until the index is back
    manifest = _read_manifest(out / MANIFEST)
    done: dict[str, str] = dict(manifest["done"]) if manifest.get("key") == key else {}
    files = [st.shard_name(i, len(plan)) for i in range(len(plan))]
    for stale in _stale_shards(out, set(files), set(manifest.get("done", {}))):
        stale.unlink()
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
        write_atomic(out / MANIFEST, json.dumps({"key": key, "done": dict(sorted(done.items()))}).encode())
        result.bytes_written += file.stat().st_size
    tokenizer = tokenizer or src.tokenizer
    if target == "grok1":
        st.write_config(out, cfg, CONFIG_NAMES[dtype])
    else:
        text = json.dumps(hf.hf_config(cfg, layout, STORAGE_DTYPES[dtype]), indent=2) + "\n"
        write_atomic(out / "config.json", text.encode())
        result.notes = hf.compat_notes(cfg)
    st.copy_tokenizer(tokenizer, out)
    total = sum((out / f).stat().st_size - st.read_header(out / f)[1] for f in files)
    st.write_index(out, weight_map, total, sha)
    return result


def _read_manifest(file: Path) -> dict:
    """The manifest of an earlier run ({} if none or unreadable: then nothing is reused)."""
    try:
        manifest = json.loads(file.read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    ok = isinstance(manifest, dict) and isinstance(manifest.get("done"), dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in manifest["done"].items())
    return manifest if ok else {}


def planned_bytes(src: Source, target: str, dtype: str, layout: str = "vllm") -> int:
    """Bytes of tensor data the conversion will write (for a progress bar)."""
    if target == "gguf":
        return sum(gguf.nbytes(shape, qtype) for _, _, _, shape, qtype in gguf.plan(src.config, dtype))
    shapes = model_shapes(src.config)
    return sum(_planned_bytes(u, dtype, shapes, target, layout) for u in names.unit_names(src.config))


def default_target_dtype(src: Source, target: str) -> str:
    """The --dtype a conversion to `target` takes when none is given: grok1 keeps the source's weight format
    (int4 becomes the release's int8), hf bf16, gguf q8_0."""
    if target == "grok1":
        return src.weights if src.weights in TARGETS["grok1"] else "int8"
    return {"hf": "bf16", "gguf": "q8_0"}[target]


def convert(src: str | Path, dst: str | Path, to: str, dtype: str | None = None, layout: str = "vllm",
            config: str | Path | None = None, preset: str | None = None, tokenizer: str | Path | None = None,
            max_shard_bytes: int = 2 << 30, progress: Progress | None = None, verify: bool = True) -> Result:
    """Convert checkpoint `src` to format `to` in `dst` (a directory; for gguf a .gguf file). See module doc."""
    if to not in TARGETS:
        raise ValueError(f"unknown target format {to!r}; valid: {', '.join(TARGETS)}")
    if to != "gguf":
        check_destination(Path(src), Path(dst))
    elif Path(src).resolve() in Path(dst).resolve().parents and Path(dst).exists() and Path(dst).suffix != ".gguf":
        raise ValueError(f"the destination {dst} is an existing file of the source checkpoint {src}; write the "
                         ".gguf file elsewhere")
    source = open_source(src, config, preset)
    dtype = dtype or default_target_dtype(source, to)
    if dtype not in TARGETS[to]:
        hint = (" (vLLM and SGLang load bf16: int8 weights are dequantised exactly to bf16, the reference's own "
                "bf16 weights; keep int8 in grok1's format)") if to == "hf" and dtype == "int8" else ""
        raise ValueError(f"--dtype {dtype} is not available for --to {to}; choose one of "
                         f"{', '.join(TARGETS[to])}{hint}")
    if layout not in hf.LAYOUTS:
        raise ValueError(f"unknown HF layout {layout!r}; valid: {', '.join(hf.LAYOUTS)}")
    out, tok = Path(dst), Path(tokenizer) if tokenizer else None
    start = time.perf_counter()
    if to == "gguf":
        result = Result(out)
        result.bytes_written, result.notes = gguf.export(source, out, dtype, tok or source.tokenizer, progress)
    else:
        result = convert_sharded(source, out, to, dtype, layout, max_shard_bytes, progress, tok)
    result.convert_s = time.perf_counter() - start
    if verify:
        start = time.perf_counter()
        gguf.check(out, gguf.plan(source.config, dtype)) if to == "gguf" else st.verify_checkpoint(out)
        result.verify_s = time.perf_counter() - start
    return result
