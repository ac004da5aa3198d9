"""Safe reader of the official Grok-1 release checkpoint (`ckpt-0/tensor{i:05d}_000` pickles).

Each file is one pickle of a float32 numpy array or of a `__main__.QuantizedWeight8bit` holding
`weight` (int8) and `scales` (bfloat16 via `ml_dtypes`). Pickles run code, so this module never
calls `pickle.load`: `_SafeUnpickler.find_class` resolves only the handful of names these files
use, and each name resolves to an inert stand-in of ours (never to numpy's own pickle hooks,
whose `dtype.__setstate__` accepts arbitrary flags and object fields). The array bytes are
handed to numpy once, zero-copy, with a dtype we built ourselves. See GROK1.md section 5.

The writer of the same format (`write_tensor`, `write_checkpoint`) is in `legacy_write.py`.

Letters: V vocab, D model dim, H query heads, G KV heads, K head dim, E experts, F expert width.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from grok1.config import ModelConfig
from grok1.fileio import check_regular


class CheckpointError(ValueError):
    """A checkpoint file or directory is missing, unsafe, corrupt, or does not fit the config."""


class QuantizedWeight8bit:
    """The release's int8 weight: `weight` int8 [..., in, out] and `scales` [..., groups, out].

    `scales` are bfloat16 values kept as their raw uint16 bit patterns (`<u2`), so numpy needs no
    ml_dtypes; `torch.from_numpy(scales).view(torch.bfloat16)` gives the values. The dequantised
    weight is `weight[..., k, n] * scales[..., k // (in // groups), n]`.
    """

    def __init__(self, weight: np.ndarray, scales: np.ndarray) -> None:
        if not isinstance(weight, np.ndarray) or weight.dtype != np.int8:
            got = _describe(weight) if isinstance(weight, np.ndarray) else type(weight).__name__
            raise CheckpointError(f"QuantizedWeight8bit.weight must be an int8 array, got {got}")
        if not isinstance(scales, np.ndarray) or scales.dtype != np.dtype("<u2") or scales.ndim != weight.ndim:
            got = _describe(scales) if isinstance(scales, np.ndarray) else type(scales).__name__
            raise CheckpointError(f"QuantizedWeight8bit.scales must be uint16 (bf16 bits) of rank {weight.ndim}, "
                                  f"got {got}")
        self.weight, self.scales = weight, scales

    def __setstate__(self, state: Any) -> None:
        """Pickle hook: `state` must be a dict with exactly the keys `weight` and `scales`, arrays
        decoded by this module's unpickler with dtypes int8 and bfloat16 respectively."""
        if not isinstance(state, dict) or set(state) != {"weight", "scales"}:
            got = ", ".join(sorted(map(_describe, state))) if isinstance(state, dict) else type(state).__name__
            raise CheckpointError(f"QuantizedWeight8bit state must hold exactly weight and scales, got {got}")
        weight, scales = state["weight"], state["scales"]
        # The bf16 flag records that the file said ml_dtypes.bfloat16, not plain uint16.
        if not isinstance(weight, _Array) or weight.array is None or weight.bf16:
            raise CheckpointError(f"QuantizedWeight8bit.weight must be an int8 array, got {_describe(weight)}")
        if not isinstance(scales, _Array) or scales.array is None or not scales.bf16:
            raise CheckpointError(f"QuantizedWeight8bit.scales must be a bfloat16 array, got {_describe(scales)}")
        QuantizedWeight8bit.__init__(self, weight.array, scales.array)

    def __repr__(self) -> str:
        return f"QuantizedWeight8bit(weight=int8{list(self.weight.shape)}, scales=bf16{list(self.scales.shape)})"


# --- The unpickler's stand-ins. Each global the files name resolves to one of these. ----------------

_BF16 = object()  # what the global `ml_dtypes.bfloat16` resolves to
_NDARRAY = object()  # what the global `numpy.ndarray` resolves to: a token, never the class itself


class _DType:
    """Stand-in for a numpy dtype: `numpy.dtype(name, align, copy)` then BUILD(state)."""

    def __init__(self, dtype: np.dtype, bf16: bool) -> None:
        self.dtype, self.bf16 = dtype, bf16

    def __setstate__(self, state: Any) -> None:
        # numpy writes (3, byteorder, subarray, names, fields, itemsize, alignment, flags). Only the
        # byte order matters for a plain number type; anything shaping a subarray/struct is refused.
        if not (isinstance(state, tuple) and len(state) == 8 and state[0] == 3 and state[2:5] == (None,) * 3
                and state[1] in ("<", ">", "|", "=")):
            raise CheckpointError(f"refused dtype state {_describe(state)}")
        self.dtype = self.dtype.newbyteorder(state[1]) if state[1] in "<>" else self.dtype


class _Array:
    """Stand-in for an ndarray: `_reconstruct(ndarray, (0,), b'b')` then BUILD(state)."""

    def __init__(self) -> None:
        self.array: np.ndarray | None = None
        self.bf16 = False

    def __setstate__(self, state: Any) -> None:
        # numpy writes (1, shape, dtype, is_fortran, raw bytes).
        ok = isinstance(state, tuple) and len(state) == 5 and state[0] == 1
        _, shape, dtype, fortran, data = state if ok else (None,) * 5
        if not (ok and isinstance(shape, tuple) and all(type(n) is int and n >= 0 for n in shape)
                and isinstance(dtype, _DType) and type(fortran) is bool and isinstance(data, bytes)):
            raise CheckpointError(f"refused ndarray state {_describe(state)}")
        # For payloads over 1000 bytes numpy keeps a reference to `data` instead of copying it,
        # so a multi-GB tensor is held in memory once (it checks the length against the shape).
        array = np.empty(0, np.uint8)
        # The numpy stub asks for np.bool as is_fortran, but numpy itself accepts only a Python bool.
        array.__setstate__((1, shape, dtype.dtype, fortran, data))  # type: ignore[arg-type]
        self.array, self.bf16 = array, dtype.bf16


def _reconstruct(cls: Any, shape: Any, typecode: Any) -> _Array:
    # numpy's version would build any class it is given; ours builds only the array stand-in.
    if cls is not _NDARRAY:
        raise CheckpointError(f"refused _reconstruct of {_describe(cls)} (only numpy.ndarray)")
    return _Array()


def _dtype(obj: Any, align: Any = False, copy: Any = False) -> _DType:
    if obj is _BF16:
        return _DType(np.dtype("<u2"), bf16=True)  # keep the bf16 bits as uint16
    # numpy writes kind + itemsize ("f4", "i1", "b1"); anything else (object "O", structs,
    # strings, datetimes) is refused before numpy parses it.
    if not (isinstance(obj, str) and _NUMBER_DTYPE.fullmatch(obj)):
        raise CheckpointError(f"refused dtype {_describe(obj)} (only bool, int, uint, float, bfloat16)")
    dtype = np.dtype(obj)
    if dtype.kind not in "biuf":  # e.g. "b2" is not a bool; defence in depth
        raise CheckpointError(f"refused dtype {obj!r}")
    return _DType(dtype, bf16=False)


_NUMBER_DTYPE = re.compile(r"[<>|=]?[biuf][1-9][0-9]?")

_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,  # numpy 1.x spelling (the release)
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # numpy 2.x spelling
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _dtype,
    ("ml_dtypes", "bfloat16"): _BF16,
    ("__main__", "QuantizedWeight8bit"): QuantizedWeight8bit,
}


class _SafeUnpickler(pickle.Unpickler):
    # Every opcode that names a global (GLOBAL, STACK_GLOBAL, INST, OBJ, EXT*) goes through
    # find_class, so this allow-list is the only way a pickle can reach a callable.
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise CheckpointError(f"refused global {module}.{name} (not part of the checkpoint format)") from None

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError(f"refused persistent id {_describe(pid)}")


def _describe(obj: Any, depth: int = 0) -> str:
    """A short description for error messages (never the repr of a possibly huge or deeply nested payload)."""
    if depth > 3:
        return "..."
    if isinstance(obj, _Array) and obj.array is not None:
        return f"{'bfloat16' if obj.bf16 else obj.array.dtype} array of shape {list(obj.array.shape)}"
    if isinstance(obj, np.ndarray):
        return f"{obj.dtype} array of shape {list(obj.shape)}"
    if isinstance(obj, str) and len(obj) < 40:
        return repr(obj)
    if isinstance(obj, tuple):
        inner = ", ".join(_describe(x, depth + 1) for x in obj[:8])
        return f"({inner}{', ...' if len(obj) > 8 else ',' if len(obj) == 1 else ''})"
    if obj is None or type(obj) in (bool, int):
        return repr(obj)
    if isinstance(obj, QuantizedWeight8bit) and not hasattr(obj, "weight"):
        return "QuantizedWeight8bit without state"
    return f"class {obj.__qualname__}" if isinstance(obj, type) else type(obj).__name__


def read_tensor(file: str | Path) -> np.ndarray | QuantizedWeight8bit:
    """Safely load one release tensor file (a pickle) without running any code from it.

    Returns a numpy array (bool/int/uint/float dtypes only, zero-copy over the file's payload) or
    a `QuantizedWeight8bit` (int8 weight, bf16 scales as uint16 bits). Raises CheckpointError,
    naming the file, when it is missing or unreadable, truncated or corrupt, refers to anything
    outside the allow-list, or holds another top-level object.
    """
    try:
        file = check_regular(file)  # a FIFO would block the read forever
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    try:
        with open(file, "rb") as f:  # buffered: the unpickler reads each payload straight into its bytes
            obj = _SafeUnpickler(f).load()
    except CheckpointError as e:
        raise CheckpointError(f"{file}: {e}") from None
    except FileNotFoundError:
        raise CheckpointError(f"{file}: no such file") from None
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read ({e})") from None
    except Exception as e:  # only our stand-ins and numpy run, so anything else means bad data
        raise CheckpointError(f"{file}: truncated or corrupt pickle ({type(e).__name__}: {e})") from e
    if isinstance(obj, QuantizedWeight8bit) and isinstance(getattr(obj, "weight", None), np.ndarray):
        return obj
    if isinstance(obj, _Array) and obj.array is not None and not obj.bf16:
        return obj.array
    raise CheckpointError(f"{file}: holds {_describe(obj)}, expected a numpy array or QuantizedWeight8bit")


# --- Parameter paths and shapes, as the reference's Haiku init produces them. ----------------------


def _layer_params(c: ModelConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """Per-layer parameters under `transformer/decoder_layer_N/`: (shape, kind); weights are [in, out]."""
    D, H, G, K, E, F = c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.n_experts, c.ffn_dim
    return {
        "multi_head_attention/query/w": ((D, H * K), "qw8"),
        "multi_head_attention/key/w": ((D, G * K), "qw8"),
        "multi_head_attention/value/w": ((D, G * K), "qw8"),
        "multi_head_attention/linear/w": ((H * K, D), "qw8"),
        "moe/linear/w": ((E, D, F), "qw8"),  # gate (gelu branch)
        "moe/linear_v/w": ((E, D, F), "qw8"),  # up
        "moe/linear_1/w": ((E, F, D), "qw8"),  # down
        "router/w": ((D, E), "ndarray"),
        "rms_norm/scale": ((D,), "ndarray"),
        "rms_norm_1/scale": ((D,), "ndarray"),
        "rms_norm_2/scale": ((D,), "ndarray"),
        "rms_norm_3/scale": ((D,), "ndarray"),
    }


def _all_params(c: ModelConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    params = {
        "language_model/in_out_embed/embeddings": ((c.vocab_size, c.dim), "ndarray"),
        "language_model/rms_norm/scale": ((c.dim,), "ndarray"),
    }
    for i in range(c.n_layers):
        params.update({f"transformer/decoder_layer_{i}/{k}": v for k, v in _layer_params(c).items()})
    return params


def reference_paths(config: ModelConfig) -> list[str]:
    """Reference parameter paths in checkpoint file order: entry i is stored in `tensor{i:05d}_000`.

    Haiku keeps params as {module path: {param name: array}} and JAX flattens dicts in sorted key
    order, so the order is a sort on (module path, param name); hence layers 0, 1, 10, 11, ..., 2.
    """
    return sorted(_all_params(config), key=lambda p: tuple(p.rsplit("/", 1)))


def expected_shape(path: str, config: ModelConfig) -> tuple[tuple[int, ...], str]:
    """(shape, kind) of a reference parameter: kind "ndarray" (float32) or "qw8" (int8 weight of that
    shape, [in, out] layout, with bf16 scales of the same shape but the input axis -2 replaced by a
    group count dividing it). Raises CheckpointError for a path the config does not have."""
    try:
        return _all_params(config)[path]
    except KeyError:
        raise CheckpointError(f"unknown parameter path {path!r} for a {config.n_layers}-layer config") from None


# --- The whole checkpoint. --------------------------------------------------------------------------

_TENSOR_FILE = re.compile(r"tensor\d{5}_000")


def _check(obj: np.ndarray | QuantizedWeight8bit, path: str, file: Path, config: ModelConfig) -> None:
    shape, kind = expected_shape(path, config)
    where = f"{path} ({file})"
    if kind == "ndarray":
        if not isinstance(obj, np.ndarray):
            raise CheckpointError(f"{where}: expected a float32 array, found {obj!r}")
        if obj.dtype != np.float32:
            raise CheckpointError(f"{where}: expected dtype float32, found {obj.dtype}")
        if obj.shape != shape:
            raise CheckpointError(f"{where}: expected shape {list(shape)}, found {list(obj.shape)}")
        return
    if not isinstance(obj, QuantizedWeight8bit):
        raise CheckpointError(f"{where}: expected a QuantizedWeight8bit, found a {obj.dtype} array")
    if obj.weight.shape != shape:
        raise CheckpointError(f"{where}: expected weight shape {list(shape)}, found {list(obj.weight.shape)}")
    s = obj.scales.shape
    if len(s) != len(shape) or s[:-2] + s[-1:] != shape[:-2] + shape[-1:] or not s[-2] or shape[-2] % s[-2]:
        raise CheckpointError(f"{where}: scales shape {list(s)} does not fit weight shape {list(shape)} "
                              f"(expected {list(shape[:-2])} + [groups dividing {shape[-2]}, {shape[-1]}])")


def read_checkpoint(
    ckpt_dir: str | Path, config: ModelConfig
) -> Iterator[tuple[str, np.ndarray | QuantizedWeight8bit]]:
    """Stream (reference path, tensor) pairs from a release checkpoint, one file at a time.

    `ckpt_dir` is the `ckpt-0` directory or the directory containing it. Before reading anything
    the number of `tensor*_000` files must equal `len(reference_paths(config))`; then each file is
    read with `read_tensor` and checked for kind, dtype (float32 / int8 + bf16) and shape. Nothing
    is kept after a pair is yielded. Raises CheckpointError naming the file and parameter path.
    """
    root = Path(ckpt_dir)
    root = root / "ckpt-0" if (root / "ckpt-0").is_dir() else root
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a checkpoint directory (expected ckpt-0/tensor00000_000, ...)")
    paths = reference_paths(config)
    found = sum(1 for p in root.iterdir() if _TENSOR_FILE.fullmatch(p.name))
    if found != len(paths):
        hint = f"; {found} files fit n_layers={(found - 2) // 12}" if found > 2 and (found - 2) % 12 == 0 else ""
        raise CheckpointError(f"found {found} tensor files in {root}, config with {config.n_layers} layers "
                              f"needs {len(paths)}{hint}")
    return _stream(root, paths, config)


def _stream(
    root: Path, paths: list[str], config: ModelConfig
) -> Iterator[tuple[str, np.ndarray | QuantizedWeight8bit]]:
    # A separate generator so read_checkpoint's directory checks run at call time, not at first next().
    for i, path in enumerate(paths):
        obj = _read_checked(root, i, path, config)
        yield path, obj
        del obj  # do not hold this tensor while the next one is read


def _read_checked(root: Path, i: int, path: str, config: ModelConfig) -> np.ndarray | QuantizedWeight8bit:
    """Read `tensor{i:05d}_000`, which holds reference path `path`, and check it against the config."""
    file = root / f"tensor{i:05d}_000"
    if not file.is_file():
        raise CheckpointError(f"missing tensor {i} ({path}): expected file {file}")
    obj = read_tensor(file)
    _check(obj, path, file, config)
    return obj


def read_path(ckpt_dir: str | Path, path: str, config: ModelConfig) -> np.ndarray | QuantizedWeight8bit:
    """Random access: read and check the one tensor file holding reference path `path` (the checks
    of `read_checkpoint`). `ckpt_dir` is the `ckpt-0` directory or the directory containing it."""
    root = Path(ckpt_dir)
    root = root / "ckpt-0" if (root / "ckpt-0").is_dir() else root
    paths = reference_paths(config)
    if path not in paths:
        expected_shape(path, config)  # raises the unknown-path error
    return _read_checked(root, paths.index(path), path, config)
