"""Build a ready-to-run model from a checkpoint directory, and save one.

`load_model` is one sequence: build the Transformer on the `meta` device (no memory); give it the
stored formats the checkpoint holds (`swap_to_int8`, a stored embedding table); assign each
checkpoint tensor as the source hands it out (one at a time, moved straight to the target device, so
peak memory is the model plus one tensor in flight); install the compiled kernels; and, when asked,
pack the matrices into the kernel's panels.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from grok1 import kernels, memory
from grok1.config import ModelConfig
from grok1.fileio import release_pages
from grok1.model import Transformer
from grok1.panels import pack_model
from grok1.parallel.dist import Mesh, connect, plans, shard
from grok1.parallel.tp import matrix_format, take, weight_name
from grok1.quant import CONFIG_NAMES, QEmbedding, quantize_embedding, swap_to_int8, weight_format
from grok1.weights import safetensors as st
from grok1.weights.legacy import CheckpointError
from grok1.weights.source import Source, find_release_dir, open_source


def default_dtype(device: torch.device | str) -> torch.dtype:
    """The compute dtype on `device`: float32 on CPU (no fast bf16 matmul on most CPUs), bfloat16 on
    accelerators."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


_SCALES = {"scales", "s1", "s2", "s3"}


def _assign(model: nn.Module, name: str, tensor: Tensor, dtype: torch.dtype) -> None:
    """Put `tensor` at `name`. Float parameters (embedding, dense matrices) take the compute dtype, as the
    reference casts them; norm scales and the router stay float32; stored-format buffers (int8, int4,
    bf16 matrices and their scales) stay as stored."""
    module_name, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
        current = getattr(module, attr)
    except AttributeError:
        raise CheckpointError(f"checkpoint tensor {name} has no place in the model") from None
    expected = tuple(current.shape)
    if tensor.dtype == torch.uint8:  # packed int4: two inputs per byte
        expected = (*expected[:-1], expected[-1] // 2)
    if attr not in _SCALES and expected != tuple(tensor.shape):  # scales carry their own group count
        raise CheckpointError(f"tensor {name}: expected shape {expected}, found {tuple(tensor.shape)}")
    if attr in module._parameters:
        if tensor.is_floating_point() and not name.endswith(("norm.weight", "moe.gate.weight")):
            tensor = tensor.to(dtype)
        setattr(module, attr, nn.Parameter(tensor, requires_grad=False))
    else:
        setattr(module, attr, tensor)


def keep_mapped_reason(weight_bytes: int) -> str | None:
    """One line saying why memory-mapped weights should stay mapped rather than be packed (copied into
    anonymous memory), or None when they fit in the memory this process may use (grok1.memory)."""
    usable = memory.usable_memory()
    if memory.fits_in_memory(weight_bytes, usable):
        return None
    return (f"grok1: the weights ({weight_bytes / 1e9:.2f} GB) do not fit in the memory this process may use "
            f"({usable / 1e9:.2f} GB: available RAM or cgroup limit); keeping them memory-mapped from the "
            f"checkpoint instead of packing them (the OS pages in what each step reads)")


def _should_pack(source: Source, device: torch.device | str, mesh: Mesh | None) -> bool:
    """pack=None: pack, unless the weights are memory-mapped (grok1's format, one process, CPU) and do not fit
    in the memory this process may use; then say so in one line and keep them mapped (one-box mode)."""
    if source.format != "grok1" or mesh is not None or torch.device(device).type != "cpu":
        return True
    total = st.read_index(source.path).get("metadata", {}).get("total_size")
    if total is None:
        total = sum(f.stat().st_size for f in Path(source.path).glob("*.safetensors"))
    reason = keep_mapped_reason(total)
    if reason:
        print(reason, file=sys.stderr)
    return reason is None


def load_model(checkpoint: str | Path, cfg: ModelConfig, device: torch.device | str = "cpu",
               dtype: torch.dtype | None = None, pack: bool | None = False, mesh: Mesh | None = None,
               table: str | None = None) -> Transformer:
    """Load a checkpoint (any format `source.open_source` reads) into an eval-mode Transformer computing in
    `dtype` on `device`. int8 weights stay int8; attention and norms run the compiled kernels where they
    apply (kernels.install). pack=True: for inference, the matrices in the kernel's panels
    (panels.pack_model), each memory-mapped original released once copied; pack=None (the CLI's default):
    the same, unless memory-mapped weights do not fit in the memory this process may use (_should_pack).
    mesh: this rank's part of a tensor/expert-parallel model (grok1/parallel), reading only its slices,
    with its collectives. table: a copy of the tied embedding table in int8 (one scale per row) or bf16 for the
    output projection, the one read of the whole table per token (the release holds it as float32); the input
    lookup keeps the stored values. None: the table as stored, for both."""
    dtype = dtype or default_dtype(device)
    source = open_source(checkpoint, cfg)
    if pack is None:
        pack = _should_pack(source, device, mesh)
    with torch.device("meta"):
        model = Transformer(cfg)
    _stored_formats(model, source, dtype)
    if mesh is not None:
        shard(model, mesh)  # meta: the placeholders take the slices' shapes
    for name, tensor in source.tensors() if mesh is None else rank_tensors(source, cfg, mesh):
        _assign(model, name, tensor.to(device), dtype)
    _no_scales_for_float(model)
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:
        raise CheckpointError(f"{checkpoint}: checkpoint did not provide {', '.join(missing[:5])}")
    if mesh is not None:
        connect(model, mesh)
    if table is not None:
        quantize_embedding(model, table, exact_lookup=True)
    model = kernels.install(model.eval())
    return pack_model(model, release=release_pages) if pack else model


def rank_tensors(source: Source, cfg: ModelConfig, mesh: Mesh) -> Iterator[tuple[str, Tensor]]:
    """(name, this rank's slice) of every tensor of `source`. grok1's format: only the slice's bytes are read
    (`source.read_slice`); where a tensor is split on two axes (experts x tensor-parallel) the expert range is
    read and the rest sliced in memory. Other formats: each whole tensor, one in flight, cut to the slice."""
    if source.format != "grok1":
        for name, t in source.tensors():
            for plan in plans(name, tuple(t.shape), "int8" if t.dtype in (torch.int8, torch.bfloat16) else "fp32",
                              cfg, mesh):
                t = take(t, plan)
            yield name, t
        return
    index = st.read_index(source.path)["weight_map"]
    headers = {shard_file: st.read_header(source.path / shard_file)[0] for shard_file in set(index.values())}
    info = {name: headers[shard_file][name] for name, shard_file in index.items()}
    for name, meta in info.items():
        fmt = matrix_format(torch.empty(0, dtype=st._DTYPES[info.get(weight_name(name), meta)["dtype"]]))
        todo = plans(name, tuple(meta["shape"]), fmt, cfg, mesh)
        if not todo:
            yield name, st.read_tensor(source.path, name)
            continue
        axis, ranges = todo[0]
        parts = [source.read_slice(name, axis, a, b) for a, b in ranges]
        t = torch.cat(parts, dim=axis) if len(parts) > 1 else parts[0]
        for plan in todo[1:]:
            t = take(t, plan)
        yield name, t


def _stored_formats(model: Transformer, source: Source, dtype: torch.dtype) -> None:
    """Give the meta model the modules that hold the checkpoint's stored formats: QLinear / QExperts for
    matrices that are not plain fp32 (they take whatever format is assigned), QEmbedding for a stored table."""
    if source.weights != "fp32":
        swap_to_int8(model)
    if "tok_embeddings.scales" in source.names():  # an int8 / bf16 table
        model.tok_embeddings = QEmbedding(model.config.vocab_size, model.config.dim, dtype, "meta")


def _no_scales_for_float(model: Transformer) -> None:
    """A matrix stored as bf16 (or fp32) has no scales in the checkpoint: its module's scales placeholder
    becomes empty, as quant.pack gives it (a grok1 bf16 checkpoint, or one converted back from HF bf16)."""
    for module in model.modules():
        for weight, scales in (("weight", "scales"), ("w1", "s1"), ("w2", "s2"), ("w3", "s3")):
            w, s = module._buffers.get(weight), module._buffers.get(scales)
            if s is not None and s.is_meta and w is not None and not w.is_meta and w.is_floating_point():
                module._buffers[scales] = torch.empty(0, dtype=torch.bfloat16, device=w.device)


def checkpoint_identity(path: Path) -> dict:
    """What tells checkpoints apart cheaply (no tensor read): the index of grok1's format (names, shards,
    sizes, CRC-32s), or the release files' names and sizes."""
    if (path / st.INDEX).is_file():
        return st.read_index(path)
    root = find_release_dir(path)
    return {f.name: f.stat().st_size for f in sorted(root.glob("tensor*"))} if root else {}


def save_model(model: Transformer, out_dir: str | Path, tokenizer: str | Path | None = None) -> Path:
    """Write a model in grok1's safetensors format (int8 stays int8)."""
    kind = CONFIG_NAMES[weight_format(model.layers[0].attention.wqkv.weight)]
    return st.save_checkpoint(model.state_dict(), model.config, out_dir, kind, tokenizer)
