"""Writer of the official Grok-1 release checkpoint format: the release's exact bytes, opcode for opcode.

`write_tensor` and `write_checkpoint` produce files byte-identical to what the release's own
`pickle.dump(obj, f)` wrote, without pickling any foreign class: `_tree` describes each object as
the reduce values numpy and the dataclass would hand the pickler, and `_Pickler` emits the opcodes
CPython's pickler writes for them. The safe reader of the same files is `legacy.py`.
"""

from __future__ import annotations

import os
import struct
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from grok1.config import ModelConfig
from grok1.weights.legacy import _TENSOR_FILE, CheckpointError, QuantizedWeight8bit, _check, reference_paths

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
