"""Safe reader of the official Grok-1 release checkpoint (`ckpt-0/tensor{i:05d}_000` pickles).

Each file is one pickle of a float32 numpy array or of a `__main__.QuantizedWeight8bit` holding
`weight` (int8) and `scales` (bfloat16 via `ml_dtypes`). Pickles run code, so this module never
calls `pickle.load`: `_SafeUnpickler.find_class` resolves only the handful of names these files
use, and each name resolves to an inert stand-in of ours (never to numpy's own pickle hooks,
whose `dtype.__setstate__` accepts arbitrary flags and object fields). The array bytes are
handed to numpy once, zero-copy, with a dtype we built ourselves. See GROK1.md section 5.

The writer (`write_tensor`, `write_checkpoint`) produces the release's exact bytes without
pickling any foreign class: it emits the opcodes CPython's pickler writes for these objects.

Letters: V vocab, D model dim, H query heads, G KV heads, K head dim, E experts, F expert width.
"""

from __future__ import annotations

import os
import pickle
import re
import struct
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from grok1.config import ModelConfig


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


def _describe(obj: Any) -> str:
    """A short description for error messages (never the repr of a possibly huge payload)."""
    if isinstance(obj, _Array) and obj.array is not None:
        return f"{'bfloat16' if obj.bf16 else obj.array.dtype} array of shape {list(obj.array.shape)}"
    if isinstance(obj, np.ndarray):
        return f"{obj.dtype} array of shape {list(obj.shape)}"
    if isinstance(obj, str) and len(obj) < 40:
        return repr(obj)
    if isinstance(obj, tuple):
        inner = ", ".join(_describe(x) for x in obj[:8])
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
    file = Path(file)
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
        file = root / f"tensor{i:05d}_000"
        if not file.is_file():
            raise CheckpointError(f"missing tensor {i} ({path}): expected file {file}")
        obj = read_tensor(file)
        _check(obj, path, file, config)
        yield path, obj
        del obj  # do not hold this tensor while the next one is read


# --- The writer: the release's bytes, opcode for opcode. --------------------------------------------
#
# The release was written by `pickle.dump(obj, f)` (protocol 4, CPython's C pickler) under numpy 1.x
# and ml_dtypes. We never call the pickler on foreign classes: `_tree` describes the object as the
# reduce values numpy and the dataclass would hand the pickler, and `_Pickler` emits for them what
# `save()` in CPython's _pickle.c emits, with the same memo references and the same frames.

_FRAME_TARGET = 64 * 1024  # a frame closes at the next save() once this full; payloads this big skip frames
_FRAME_MIN = 4  # a shorter frame is written without its FRAME header


class _Global:
    """`module.name`, written as STACK_GLOBAL and memoised (like a class or function object)."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name


class _Reduce:
    """`func(*args)` then BUILD(state), as `save_reduce` writes it; `key` memoises a shared object (a dtype)."""

    def __init__(self, func: _Global, args: tuple, state: tuple, key: Any = None) -> None:
        self.func, self.args, self.state, self.key = func, args, state, key


class _NewObj:
    """`cls.__new__(cls)` then BUILD(state): what pickle writes for a plain class instance."""

    def __init__(self, cls: _Global, state: dict) -> None:
        self.cls, self.state = cls, state


_RECONSTRUCT = _Global("numpy.core.multiarray", "_reconstruct")  # numpy 1.x's spelling, as in the release
_NDARRAY_CLASS = _Global("numpy", "ndarray")
_DTYPE_CLASS = _Global("numpy", "dtype")
# ml_dtypes' bfloat16 descriptor: a user-defined type, so numpy records its itemsize, alignment and flags.
_BF16_DTYPE = _Reduce(_DTYPE_CLASS, (_Global("ml_dtypes", "bfloat16"), False, True),
                      (3, "<", None, None, None, 2, 2, 64), key="bfloat16")
_QW8_CLASS = _Global("__main__", "QuantizedWeight8bit")


def _dtype_tree(dtype: np.dtype) -> _Reduce:
    # numpy's dtype.__reduce__: dtype(kind + itemsize, align=False, copy=True), state with -1 sizes.
    if dtype.kind not in "biuf":
        raise CheckpointError(f"cannot write dtype {dtype} (only bool, int, uint, float)")
    big = dtype.byteorder == ">" or (dtype.byteorder == "=" and sys.byteorder == "big")
    order = "|" if dtype.byteorder == "|" else ">" if big else "<"
    state = (3, order, None, None, None, -1, -1, 0)
    return _Reduce(_DTYPE_CLASS, (f"{dtype.kind}{dtype.itemsize}", False, True), state, key=dtype.str)


def _array_tree(a: np.ndarray, bf16: bool = False) -> _Reduce:
    # numpy's ndarray.__reduce__: _reconstruct(ndarray, (0,), b"b") + (1, shape, dtype, fortran, bytes).
    # A Fortran-ordered array is stored in Fortran order; any other non-contiguous array is copied.
    dtype = _BF16_DTYPE if bf16 else _dtype_tree(a.dtype)
    fortran = a.ndim > 1 and a.flags.f_contiguous and not a.flags.c_contiguous
    flat = a.T if fortran else a if a.flags.c_contiguous else a.copy(order="C")
    data = flat.reshape(-1).view(np.uint8).data  # a memoryview of the array's own buffer, not a copy
    return _Reduce(_RECONSTRUCT, (_NDARRAY_CLASS, (0,), b"b"), (1, a.shape, dtype, bool(fortran), data))


def _tree(obj: np.ndarray | QuantizedWeight8bit) -> _Reduce | _NewObj:
    if isinstance(obj, QuantizedWeight8bit):
        if obj.weight.dtype != np.int8 or obj.scales.dtype != np.dtype("<u2"):
            raise CheckpointError(f"cannot write {obj!r}: weight must be int8, scales uint16 bf16 bits, got "
                                  f"{obj.weight.dtype} and {obj.scales.dtype}")
        # The dataclass's __dict__ in field order: weight, then scales.
        return _NewObj(_QW8_CLASS, {"weight": _array_tree(obj.weight), "scales": _array_tree(obj.scales, bf16=True)})
    if isinstance(obj, np.ndarray):
        return _array_tree(obj)
    raise CheckpointError(f"cannot write a {type(obj).__name__}: expected a numpy array or QuantizedWeight8bit")


def _memo_key(obj: Any) -> Any:
    """What makes two saved values one object to the pickler's memo (it keys by identity)."""
    if isinstance(obj, str):
        return ("str", obj)  # our strings are interned names or appear once
    if isinstance(obj, (bytes, memoryview)) and len(obj) <= 1:
        return ("bytes", bytes(obj))  # CPython shares empty and one-byte bytes objects
    if isinstance(obj, _Global):
        return ("global", obj.module, obj.name)
    if isinstance(obj, _Reduce) and obj.key is not None:
        return ("reduce", obj.key)
    return None  # tuples, dicts, payloads and instances are new objects every time


class _Pickler:
    """Protocol-4 opcodes with CPython's framing, written through `write` (a file's write, or a counter)."""

    def __init__(self, write: Callable[[bytes | memoryview], object]) -> None:
        self.write = write
        self.frame: bytearray | None = None  # the open frame, or None between frames
        self.memo: dict[Any, int] = {}
        self.memo_len = 0

    def dump(self, obj: Any) -> None:
        self.write(b"\x80\x04")  # PROTO 4, before the first frame
        self._save(obj)
        self._emit(b".")  # STOP
        self._commit()

    def _emit(self, data: bytes) -> None:
        if self.frame is None:
            self.frame = bytearray()
        self.frame += data

    def _commit(self) -> None:
        if self.frame is not None:
            if len(self.frame) >= _FRAME_MIN:
                self.write(b"\x95" + struct.pack("<Q", len(self.frame)))  # FRAME
            self.write(bytes(self.frame))
            self.frame = None

    def _memoize(self, key: Any) -> None:
        if key is not None:
            self.memo[key] = self.memo_len
        self.memo_len += 1
        self._emit(b"\x94")  # MEMOIZE

    def _save(self, obj: Any) -> None:
        """One call of the C pickler's save(): it starts at an opcode boundary, where a frame that has
        reached the target size is closed (so a frame never ends inside an object's own opcodes)."""
        if self.frame is not None and len(self.frame) >= _FRAME_TARGET:
            self._commit()
        key = _memo_key(obj)
        if key is not None and key in self.memo:
            i = self.memo[key]
            self._emit(b"h" + bytes([i]) if i < 256 else b"j" + struct.pack("<I", i))  # BINGET, LONG_BINGET
        elif obj is None or isinstance(obj, bool):
            self._emit({None: b"N", True: b"\x88", False: b"\x89"}[obj])  # NONE, NEWTRUE, NEWFALSE
        elif isinstance(obj, int):
            self._emit(_int_opcode(obj))
        elif isinstance(obj, str):
            data = obj.encode("utf-8", "surrogatepass")
            self._emit(_sized(data, b"\x8c", b"X", b"\x8d") + data)  # SHORT_BINUNICODE, BINUNICODE, BINUNICODE8
            self._memoize(key)
        elif isinstance(obj, (bytes, memoryview)):
            self._save_bytes(obj, key)
        elif isinstance(obj, tuple):
            self._save_tuple(obj)
        elif isinstance(obj, dict):
            self._emit(b"}")  # EMPTY_DICT
            self._memoize(None)
            if len(obj) > 1:
                self._emit(b"(")  # MARK
            for k, v in obj.items():
                self._save(k)
                self._save(v)
            if obj:
                self._emit(b"u" if len(obj) > 1 else b"s")  # SETITEMS, SETITEM
        elif isinstance(obj, _Global):
            self._save(obj.module)
            self._save(obj.name)
            self._emit(b"\x93")  # STACK_GLOBAL
            self._memoize(key)
        elif isinstance(obj, _Reduce):
            self._save(obj.func)
            self._save(obj.args)
            self._emit(b"R")  # REDUCE
            self._memoize(key)
            self._save(obj.state)
            self._emit(b"b")  # BUILD
        elif isinstance(obj, _NewObj):
            self._save(obj.cls)
            self._save(())
            self._emit(b"\x81")  # NEWOBJ
            self._memoize(None)
            self._save(obj.state)
            self._emit(b"b")  # BUILD
        else:
            raise TypeError(f"no release-format encoding for {type(obj).__name__}")

    def _save_bytes(self, data: bytes | memoryview, key: Any) -> None:
        header = _sized(data, b"C", b"B", b"\x8e")  # SHORT_BINBYTES, BINBYTES, BINBYTES8
        if len(data) >= _FRAME_TARGET:
            # A large payload closes the open frame and goes out unframed, straight from its buffer.
            self._commit()
            self.write(header)
            self.write(data)
        else:
            self._emit(header + bytes(data))
        self._memoize(key)

    def _save_tuple(self, items: tuple) -> None:
        if not items:
            self._emit(b")")  # EMPTY_TUPLE, never memoised
            return
        if len(items) > 3:
            self._emit(b"(")  # MARK
        for item in items:
            self._save(item)
        self._emit(b"t" if len(items) > 3 else b"\x85\x86\x87"[len(items) - 1:len(items)])  # TUPLE, TUPLE1-3
        self._memoize(None)


def _sized(data: bytes | memoryview, op1: bytes, op4: bytes, op8: bytes) -> bytes:
    """The opcode and length prefix for a string or bytes payload of len(data) bytes."""
    n = len(data)
    return op1 + bytes([n]) if n < 256 else op4 + struct.pack("<I", n) if n <= 0xFFFFFFFF else op8 + struct.pack("<Q", n)


def _int_opcode(n: int) -> bytes:
    if 0 <= n <= 0xFF:
        return b"K" + bytes([n])  # BININT1
    if 0 <= n <= 0xFFFF:
        return b"M" + struct.pack("<H", n)  # BININT2
    if -(1 << 31) <= n < 1 << 31:
        return b"J" + struct.pack("<i", n)  # BININT
    assert n > 0, n  # only sizes reach here
    data = n.to_bytes(n.bit_length() // 8 + 1, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data  # LONG1


def _dump(obj: np.ndarray | QuantizedWeight8bit, write: Callable[[bytes | memoryview], object]) -> None:
    """Emit one release tensor file's bytes through `write`; large payloads are passed as memoryviews
    of the array's own buffer (a C-contiguous array is never copied)."""
    _Pickler(write).dump(_tree(obj))


def write_tensor(file: str | Path, obj: np.ndarray | QuantizedWeight8bit) -> None:
    """Write one release tensor file: byte for byte what the release's own `pickle.dump(obj, f)` wrote.

    `obj` is a numpy array (bool/int/uint/float) or a `QuantizedWeight8bit` (int8 weight, scales as
    uint16 bf16 bits, written as `ml_dtypes.bfloat16`); arrays are written as numpy 1.x pickles them
    (`numpy.core.multiarray._reconstruct`, Fortran-ordered arrays in Fortran order). The payload goes
    to disk from the array's buffer without a copy. The file appears atomically: it is written to a
    temporary file in the same directory, fsynced, then renamed over `file`. Raises CheckpointError,
    naming the file, for an object it cannot write or an OS error.
    """
    file = Path(file)
    tree = _tree(obj)
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            _Pickler(f.write).dump(tree)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, file)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"{file}: cannot write ({e})") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_checkpoint(ckpt_dir: str | Path, tensors: Iterable[tuple[str, np.ndarray | QuantizedWeight8bit]],
                     config: ModelConfig) -> Path:
    """Write (reference path, tensor) pairs as a release checkpoint in `ckpt_dir/ckpt-0/` (created).

    Path p goes to `tensor{i:05d}_000` with i = `reference_paths(config).index(p)`, so the pairs may
    come in any order; each is checked as `read_checkpoint` checks it (kind, dtype, shape, scale
    groups) and written with `write_tensor` as it arrives, so a generator streams a model of any size.
    Existing files of the same names are replaced. Raises CheckpointError for an unknown, repeated or
    misshapen tensor, for tensor files in ckpt-0 beyond this config's count (before writing
    anything), and at the end for paths that were never given. Returns the ckpt-0 directory.
    """
    root = Path(ckpt_dir) / "ckpt-0"
    root.mkdir(parents=True, exist_ok=True)
    paths = reference_paths(config)
    index = {p: i for i, p in enumerate(paths)}
    stray = sorted(p.name for p in root.iterdir() if _TENSOR_FILE.fullmatch(p.name) and int(p.name[6:11]) >= len(paths))
    if stray:
        raise CheckpointError(f"{root} holds {stray[0]} (and {len(stray) - 1} more) beyond the {len(paths)} files "
                              f"of a {config.n_layers}-layer config; use an empty directory")
    written: set[str] = set()
    for path, obj in tensors:
        file = root / f"tensor{index.get(path, 0):05d}_000"
        _check(obj, path, file, config)  # also refuses an unknown path
        if path in written:
            raise CheckpointError(f"{path} ({file}): given twice")
        write_tensor(file, obj)
        written.add(path)
    missing = [p for p in paths if p not in written]
    if missing:
        raise CheckpointError(f"{root}: {len(missing)} of {len(paths)} tensors were not given, "
                              f"first {missing[0]} (tensor{index[missing[0]]:05d}_000)")
    return root
