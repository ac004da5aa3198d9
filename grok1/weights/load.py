"""Build a ready-to-run model from a checkpoint directory.

`load_model` builds the Transformer on the `meta` device (no memory), swaps in the int8
modules when the checkpoint is int8, then assigns each checkpoint tensor as it is read
(one at a time, moved straight to the target device), so peak memory is the model plus
one tensor in flight.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from grok1 import kernels
from grok1.config import ModelConfig, from_name
from grok1.model import Transformer
from grok1.panels import pack_model
from grok1.parallel.dist import Mesh, connect, plans, shard
from grok1.parallel.tp import matrix_format, take, weight_name
from grok1.quant import QEmbedding, swap_to_int8
from grok1.weights import legacy, names
from grok1.weights import safetensors as st
from grok1.weights.legacy import CheckpointError


def default_dtype(device: torch.device | str) -> torch.dtype:
    """float32 on CPU (no fast bf16 matmul on most CPUs), bfloat16 on accelerators."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def find_legacy_dir(path: str | Path) -> Path | None:
    """The release layout: `path/ckpt-0/tensor00000_000` (or `path` is the ckpt-0 directory itself)."""
    path = Path(path)
    for d in (path / "ckpt-0", path):
        if (d / "tensor00000_000").is_file():
            return d
    return None


def resolve_config(checkpoint: str | Path | None, config: str | Path | None = None,
                   preset: str | None = None) -> ModelConfig:
    """--config JSON wins, then --preset, then a config.json next to the checkpoint."""
    if config is not None and preset is not None:
        raise ValueError("give either a config file or a preset, not both")
    if config is not None:
        return ModelConfig.from_reference_json(config)
    if preset is not None:
        return from_name(preset)
    if checkpoint is not None:
        for candidate in (Path(checkpoint) / "config.json", Path(checkpoint).parent / "config.json"):
            if candidate.is_file():
                return ModelConfig.from_reference_json(candidate)
    raise ValueError(f"no model config found next to checkpoint {checkpoint}: pass --config FILE or --preset NAME")


def _to_torch(obj: np.ndarray | legacy.QuantizedWeight8bit) -> tuple[Tensor, Tensor | None]:
    """numpy (sharing memory, no copy) -> (weight, scales or None); bf16 scales arrive as uint16 bits."""
    if isinstance(obj, legacy.QuantizedWeight8bit):
        return torch.from_numpy(obj.weight), torch.from_numpy(obj.scales.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(obj), None


def legacy_tensors(ckpt_dir: Path, cfg: ModelConfig) -> Iterator[tuple[str, Tensor]]:
    """Stream (our name, tensor) pairs from a release checkpoint; q/k/v are fused into wqkv."""
    pending: dict[str, dict[int, tuple[Tensor, Tensor]]] = {}  # wqkv name -> part -> (weight, scales)
    for path, obj in legacy.read_checkpoint(ckpt_dir, cfg):
        weight_name, scales_name, entry = names.from_reference(path)
        w, s = _to_torch(obj)
        if entry.transpose:
            w = w.transpose(-1, -2).contiguous()
        if entry.part is None:
            yield weight_name, w
            if scales_name is not None and s is not None:
                yield scales_name, s
            continue
        parts = pending.setdefault(weight_name, {})
        parts[entry.part] = (w, s)
        if len(parts) == 3:
            ws, ss = zip(*(parts[i] for i in range(3)))
            if len({x.shape[0] for x in ss}) != 1:
                raise CheckpointError(f"{ckpt_dir}: query/key/value of {weight_name} have different scale "
                                      f"group counts {[x.shape[0] for x in ss]}; they must match to be fused")
            yield weight_name, torch.cat(ws, dim=0)
            yield scales_name, torch.cat(ss, dim=1)
            del pending[weight_name]


def sliced_tensors(checkpoint: Path, cfg: ModelConfig, mesh: Mesh) -> Iterator[tuple[str, Tensor]]:
    """(name, this rank's slice) of every tensor of a grok1 checkpoint, reading only the slice's bytes
    (pread, no mapping): a contiguous run per leading index (`safetensors.read_slice`). Where a tensor is
    split on two axes (experts x tensor-parallel) the expert range is read and the rest sliced in memory."""
    index = json.loads((checkpoint / st.INDEX).read_text())["weight_map"]
    headers = {shard_file: st.read_header(checkpoint / shard_file)[0] for shard_file in set(index.values())}
    info = {name: headers[shard_file][name] for name, shard_file in index.items()}
    for name, meta in info.items():
        fmt = matrix_format(torch.empty(0, dtype=st._DTYPES[info.get(weight_name(name), meta)["dtype"]]))
        todo = plans(name, tuple(meta["shape"]), fmt, cfg, mesh)
        if not todo:
            yield name, st.read_tensor(checkpoint, name)
            continue
        axis, ranges = todo[0]
        parts = [st.read_slice(checkpoint, name, axis, a, b) for a, b in ranges]
        t = torch.cat(parts, dim=axis) if len(parts) > 1 else parts[0]
        for plan in todo[1:]:
            t = take(t, plan)
        yield name, t


def sliced_release(tensors: Iterator[tuple[str, Tensor]], cfg: ModelConfig, mesh: Mesh) -> Iterator[tuple[str, Tensor]]:
    """The release's whole tensors, one in flight, each cut to this rank's slice (a copy) before the next."""
    for name, t in tensors:
        for plan in plans(name, tuple(t.shape), "int8" if t.dtype in (torch.int8, torch.bfloat16) else "fp32",
                          cfg, mesh):
            t = take(t, plan)
        yield name, t


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


def load_model(checkpoint: str | Path, cfg: ModelConfig, device: torch.device | str = "cpu",
               dtype: torch.dtype | None = None, pack: bool = False, mesh: Mesh | None = None) -> Transformer:
    """Load a checkpoint (grok1 safetensors or the release's ckpt-0) into an eval-mode Transformer
    computing in `dtype` on `device`. int8 weights stay int8; attention runs the compiled kernel where it
    applies (kernels.CompiledAttention). pack=True: for inference, the matrices in the kernel's panels
    (panels.pack_model), each memory-mapped original dropped once copied. mesh: this rank's part of a
    tensor/expert-parallel model (grok1/parallel), reading only its slices, with its collectives."""
    dtype = dtype or default_dtype(device)
    stored_table = False
    if st.is_checkpoint(checkpoint):
        _, kind = st.read_config(checkpoint)
        if mesh is None:
            mapped = st.open_checkpoint(checkpoint)
            tensors: Iterator[tuple[str, Tensor]] = iter(mapped.items())
        else:
            mapped = json.loads((Path(checkpoint) / st.INDEX).read_text())["weight_map"]
            tensors = sliced_tensors(Path(checkpoint), cfg, mesh)
        stored_table = "tok_embeddings.scales" in mapped  # an int8 / bf16 table (QEmbedding)
    else:
        ckpt_dir = find_legacy_dir(checkpoint)
        if ckpt_dir is None:
            raise CheckpointError(f"{checkpoint}: not a Grok-1 checkpoint directory (expected {st.INDEX} "
                                  "or the release's ckpt-0/tensor00000_000)")
        kind, tensors = "int8", legacy_tensors(ckpt_dir, cfg)
        if mesh is not None:
            tensors = sliced_release(tensors, cfg, mesh)
    with torch.device("meta"):
        model = Transformer(cfg)
    if kind != "float32":  # stored-format matrices: the modules take whatever format is assigned
        swap_to_int8(model)
    if stored_table:
        model.tok_embeddings = QEmbedding(cfg.vocab_size, cfg.dim, dtype, "meta")
    if mesh is not None:
        shard(model, mesh)  # meta: the placeholders take the slices' shapes
    for name, tensor in tensors:
        _assign(model, name, tensor.to(device), dtype)
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:
        raise CheckpointError(f"{checkpoint}: checkpoint did not provide {', '.join(missing[:5])}")
    if mesh is not None:
        connect(model, mesh)
    model = kernels.install(model.eval())
    return pack_model(model, release=st.release_pages) if pack else model


def checkpoint_identity(path: Path) -> dict:
    """What tells checkpoints apart cheaply (no tensor read): the grok1 index (names, shards, sizes, CRC-32s),
    or the release files' names and sizes."""
    if st.is_checkpoint(path):
        return json.loads((path / st.INDEX).read_text())
    root = find_legacy_dir(path)
    return {f.name: f.stat().st_size for f in sorted(root.glob("tensor*"))} if root else {}


def weight_kind(model: Transformer) -> str:
    """How the model's matrices are stored: "int8", "int4", "bfloat16" or "float32"."""
    w = model.layers[0].attention.wqkv.weight
    return {torch.int8: "int8", torch.uint8: "int4", torch.bfloat16: "bfloat16"}.get(w.dtype, "float32")


def save_model(model: Transformer, out_dir: str | Path, tokenizer: str | Path | None = None) -> Path:
    """Write a model in grok1's safetensors format (int8 stays int8)."""
    return st.save_checkpoint(model.state_dict(), model.config, out_dir, weight_kind(model), tokenizer)
