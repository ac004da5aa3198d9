"""Tests for grok1.weights.legacy: the allow-listed reader of the release's pickled checkpoint and
the writer of the same format.

Oracles independent of the code under test: the golden checkpoint (written by the real release
stack) is checked against the raw payload bytes found by `pickletools.genops`, and the writer must
reproduce every golden file byte for byte, match CPython's own pickler on numpy arrays, and give
the file sizes measured on the real release. Hostile and malformed files are built by a small
opcode assembler (`_array`, `_qw8`) that shares no code with the reader or the writer.
"""

import dataclasses
import inspect
import io
import json
import os
import pickle
import pickletools
import struct
import subprocess
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest

from grok1.config import PRESETS, ModelConfig
from grok1.weights import legacy_write
from grok1.weights.legacy import (
    CheckpointError,
    QuantizedWeight8bit,
    expected_shape,
    read_checkpoint,
    read_tensor,
    reference_paths,
)
from grok1.weights.legacy_write import write_checkpoint, write_tensor

# 2 layers, small vocab: 26 files of a few tens of KB.
SMALL = dataclasses.replace(PRESETS["tiny"], vocab_size=64, n_layers=2)
GROUPS_8 = ("multi_head_attention/linear/w", "moe/linear_1/w")  # input axis sharded 8 ways in the release


# --- A pickle assembler for hostile and malformed files (protocol 4 opcodes, no memo, no frames). ---


def _s(text: str) -> bytes:
    data = text.encode()
    return b"\x8c" + bytes([len(data)]) + data  # SHORT_BINUNICODE


def _glob(module: str, name: str) -> bytes:
    return _s(module) + _s(name) + b"\x93"  # STACK_GLOBAL


def _i(n: int) -> bytes:
    return b"J" + struct.pack("<i", n)  # BININT


def _dtype(name: str | None) -> bytes:
    """numpy.dtype(name, False, True) + BUILD(state); name None means ml_dtypes.bfloat16."""
    if name is None:  # ml_dtypes' dtype state, as in the release
        arg, state = _glob("ml_dtypes", "bfloat16"), _s("<") + b"NNN" + _i(2) + _i(2) + _i(64)
    else:
        endian = "|" if name[-1] == "1" else "<"
        arg, state = _s(name), _s(endian) + b"NNN" + _i(-1) + _i(-1) + _i(0)
    return _glob("numpy", "dtype") + arg + b"\x89\x88\x87R" + b"(" + _i(3) + state + b"tb"


def _array(a: np.ndarray, bf16: bool = False, dtype_name: str | None = None, args: bytes | None = None) -> bytes:
    """_reconstruct(ndarray, (0,), b'b') + BUILD((1, shape, dtype, False, bytes)), as numpy 1.x writes."""
    head = _glob("numpy.core.multiarray", "_reconstruct") + (args or _glob("numpy", "ndarray") + _i(0) + b"\x85C\x01b")
    dtype = _dtype(None if bf16 else (dtype_name or a.dtype.str[1:]))
    data = a.tobytes()
    shape = b"(" + b"".join(_i(n) for n in a.shape) + b"t"
    return head + b"\x87R" + b"(" + _i(1) + shape + dtype + b"\x89B" + struct.pack("<I", len(data)) + data + b"tb"


def _qw8(weight: bytes, scales: bytes, extra: bytes = b"") -> bytes:
    """A __main__.QuantizedWeight8bit built by NEWOBJ, then BUILD with {weight: ..., scales: ...}."""
    items = _s("weight") + weight + _s("scales") + scales + extra
    return _glob("__main__", "QuantizedWeight8bit") + b")\x81}(" + items + b"ub"


def _pickle(body: bytes) -> bytes:
    return b"\x80\x04" + body + b"."


def _random_tensor(path: str, config: ModelConfig, rng: np.random.Generator) -> np.ndarray | QuantizedWeight8bit:
    shape, kind = expected_shape(path, config)
    if kind == "ndarray":
        return rng.standard_normal(shape, dtype=np.float32)
    groups = 8 if path.endswith(GROUPS_8) else 1
    weight = rng.integers(-127, 128, shape, dtype=np.int8)
    scales = rng.integers(0, 1 << 16, (*shape[:-2], groups, shape[-1]), dtype=np.uint16)
    return QuantizedWeight8bit(weight, scales)


@pytest.fixture
def small_ckpt(tmp_path: Path) -> tuple[Path, dict]:
    """A SMALL checkpoint in release format at tmp_path/ckpt/ckpt-0; returns (dir, {path: tensor})."""
    rng = np.random.default_rng(0)
    tensors = {p: _random_tensor(p, SMALL, rng) for p in reference_paths(SMALL)}
    root = write_checkpoint(tmp_path / "ckpt", tensors.items(), SMALL)
    assert root == tmp_path / "ckpt" / "ckpt-0"
    return root, tensors


def _payloads(file: Path) -> list[bytes]:
    """The raw byte strings in a pickle, read by pickletools (not by the unpickler under test)."""
    with open(file, "rb") as f:
        return [arg for op, arg, _ in pickletools.genops(f) if op.name in ("SHORT_BINBYTES", "BINBYTES", "BINBYTES8")]


# --- Paths, order, shapes. --------------------------------------------------------------------------


def test_reference_paths_order_tiny() -> None:
    paths = reference_paths(PRESETS["tiny"])
    assert len(paths) == 2 + 12 * 12
    assert paths[:2] == ["language_model/in_out_embed/embeddings", "language_model/rms_norm/scale"]
    layers = [p.split("/")[1] for p in paths[2::12]]
    assert layers == [f"decoder_layer_{n}" for n in (0, 1, 10, 11, 2, 3, 4, 5, 6, 7, 8, 9)]
    assert paths[2:14] == [
        f"transformer/decoder_layer_0/{s}"
        for s in ("moe/linear/w", "moe/linear_1/w", "moe/linear_v/w", "multi_head_attention/key/w",
                  "multi_head_attention/linear/w", "multi_head_attention/query/w", "multi_head_attention/value/w",
                  "rms_norm/scale", "rms_norm_1/scale", "rms_norm_2/scale", "rms_norm_3/scale", "router/w")
    ]


def test_reference_paths_and_shapes_match_release_index(shared_dir: Path) -> None:
    index = json.loads((shared_dir / "grok-1" / "ckpt-0-index.json").read_text())["tensors"]
    config = PRESETS["grok-1"]
    assert len(index) == 770
    assert reference_paths(config) == [t["path"] for t in index]
    for t in index:
        assert t["file"] == f"tensor{t['index']:05d}_000"
        shape, kind = expected_shape(t["path"], config)
        if kind == "qw8":
            assert t["kind"] == "QuantizedWeight8bit" and t["weight_shape"] == list(shape), t
            groups = t["scale_groups_along_input_axis"]
            assert t["scales_shape"] == [*shape[:-2], groups, shape[-1]] and shape[-2] % groups == 0, t
        else:
            assert t["kind"] == "ndarray" and t["shape"] == list(shape) and t["dtype"] == "float32", t


def test_expected_shape_unknown_path() -> None:
    with pytest.raises(CheckpointError, match="decoder_layer_12"):
        expected_shape("transformer/decoder_layer_12/router/w", PRESETS["tiny"])


# --- The golden checkpoint (the release's exact format). --------------------------------------------


def test_golden_checkpoint_bit_exact(shared_dir: Path) -> None:
    config_file = shared_dir / "golden" / "tiny-config.json"
    config = ModelConfig.from_reference_json(config_file)
    groups = json.loads(config_file.read_text())["quantized_scale_groups"]
    root = shared_dir / "golden" / "tiny-ckpt" / "ckpt-0"
    count = 0
    for i, (path, obj) in enumerate(read_checkpoint(root.parent, config)):
        count += 1
        shape, kind = expected_shape(path, config)
        payloads = _payloads(root / f"tensor{i:05d}_000")
        if kind == "ndarray":
            assert isinstance(obj, np.ndarray) and obj.dtype == np.float32 and obj.shape == shape, path
            assert payloads == [b"b", obj.tobytes()], path
            continue
        assert isinstance(obj, QuantizedWeight8bit), path
        assert obj.weight.dtype == np.int8 and obj.weight.shape == shape, path
        slot = path.split("/", 2)[2]
        assert obj.scales.dtype == np.dtype("<u2") and obj.scales.shape[-2] == groups[slot], path
        assert obj.scales.shape[-2] == (8 if slot in GROUPS_8 else 1), path
        # The typecode b"b" appears once; the second _reconstruct reuses it from the memo.
        assert payloads == [b"b", obj.weight.tobytes(), obj.scales.tobytes()], path
        # The bits are bf16 scales max|w|/127: positive, finite, well below 1 for these weights.
        values = (obj.scales.astype(np.uint32) << 16).view(np.float32)
        assert np.all(values > 0) and np.all(values < 1), path
    assert count == 146


def test_golden_embedding_is_zero_copy(shared_dir: Path) -> None:
    emb = read_tensor(shared_dir / "golden" / "tiny-ckpt" / "ckpt-0" / "tensor00000_000")
    assert isinstance(emb, np.ndarray) and emb.shape == (131072, 32)
    assert isinstance(emb.base, bytes) and not emb.flags.owndata  # the unpickled bytes, not a copy
    assert emb.flags.writeable


# --- Our own release-format files and real numpy pickles. --------------------------------------------


def test_small_checkpoint_round_trip(small_ckpt: tuple[Path, dict]) -> None:
    root, tensors = small_ckpt
    for ckpt_dir in (root, root.parent):  # ckpt-0 itself or its parent
        stream = read_checkpoint(ckpt_dir, SMALL)
        assert inspect.isgenerator(stream)
        got = dict(stream)
        assert list(got) == list(tensors)
        for path, want in tensors.items():
            obj = got[path]
            if isinstance(want, QuantizedWeight8bit):
                assert isinstance(obj, QuantizedWeight8bit), path
                assert obj.weight.dtype == np.int8 and np.array_equal(obj.weight, want.weight), path
                assert obj.scales.dtype == np.dtype("<u2") and np.array_equal(obj.scales, want.scales), path
            else:
                assert obj.dtype == np.float32 and np.array_equal(obj, want), path


@pytest.mark.parametrize("protocol", [3, 4])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int8, np.uint16, np.int64, np.bool_])
def test_reads_numpy_pickles(tmp_path: Path, protocol: int, dtype: type) -> None:
    # numpy 2 writes numpy._core.multiarray._reconstruct; with numpy.core nothing may warn either.
    a = (np.arange(3000) % 7).astype(dtype).reshape(30, 100)
    file = tmp_path / "t"
    file.write_bytes(pickle.dumps(a, protocol=protocol))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = read_tensor(file)
    assert got.dtype == a.dtype and np.array_equal(got, a)


def test_release_spelling_does_not_warn(tmp_path: Path) -> None:
    file = tmp_path / "t"
    write_tensor(file, np.ones(4, np.float32))
    assert b"numpy.core.multiarray" in file.read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.array_equal(read_tensor(file), np.ones(4, np.float32))


# --- Hostile pickles: nothing may run. --------------------------------------------------------------


class _Reduce:
    """Pickles as a call of `func(*args)`; we only ever dump it."""

    def __init__(self, func: object, *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple:
        return self.func, self.args


def _hostile(marker: Path) -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, the refused global or dtype the error must name)."""
    touch = f"touch {marker}"
    system = f"{os.system.__module__}.system"  # posix.system on Linux
    evil = _Reduce(os.system, touch)
    evil_body = pickle.dumps(evil, protocol=3)[2:-1]  # no PROTO, no STOP: spliced into our opcodes
    int8 = _array(np.zeros((2, 2), np.int8))
    bits = _array(np.zeros((1, 2), np.uint16), bf16=True)
    return {
        "os.system p4": (pickle.dumps(evil, protocol=4), system),
        "os.system p2 GLOBAL": (pickle.dumps(evil, protocol=2), system),
        "os.system p0 GLOBAL": (f"cos\nsystem\n(V{touch}\ntR.".encode(), "os.system"),
        "eval": (pickle.dumps(_Reduce(eval, f"__import__('os').system({touch!r})"), protocol=4), "builtins.eval"),
        "Popen": (pickle.dumps(_Reduce(subprocess.Popen, ["touch", str(marker)]), protocol=4), "subprocess.Popen"),
        # getattr(__import__("os"), "system")(touch)
        "getattr": (_pickle(_glob("builtins", "getattr") + _glob("builtins", "__import__") + _s("os") + b"\x85R"
                            + _s("system") + b"\x86R" + _s(touch) + b"\x85R"), "builtins.getattr"),
        "numpy.load": (_pickle(_glob("numpy", "load") + _s(str(marker)) + b"\x85R"), "numpy.load"),
        "in QuantizedWeight8bit state": (_pickle(_qw8(evil_body, bits)), system),
        "in _reconstruct args": (_pickle(_array(np.zeros(2, np.float32), args=_glob("numpy", "ndarray") + _i(0)
                                                + b"\x85" + evil_body)), system),
        "object dtype": (_pickle(_array(np.zeros(2, np.int64), dtype_name="O")), "dtype 'O'"),
        "structured dtype": (_pickle(_array(np.zeros(2, np.int64), dtype_name="V8")), "dtype 'V8'"),
        "_reconstruct of another class": (_pickle(_array(np.zeros(2, np.int8), args=_glob(
            "__main__", "QuantizedWeight8bit") + _i(0) + b"\x85C\x01b")), "_reconstruct of class QuantizedWeight8bit"),
        # A legal u2 dtype whose state adds an object field (numpy itself would accept this).
        "dtype state with fields": (_pickle(_array(np.zeros(2, np.uint16)).replace(
            _s("<") + b"NNN", _s("<") + b"N" + _s("a") + b"\x85}" + _s("a") + _i(0) + b"\x85s")),
            "refused dtype state"),
        "persistent id": (_pickle(_s("weights") + b"Q"), "refused persistent id 'weights'"),
        "QuantizedWeight8bit extra key": (_pickle(_qw8(int8, bits, _s("run") + _i(1))), "exactly weight and scales"),
        "QuantizedWeight8bit uint16 scales": (_pickle(_qw8(int8, _array(np.zeros((1, 2), np.uint16)))),
                                              "scales must be a bfloat16 array"),
        "QuantizedWeight8bit via REDUCE": (_pickle(_glob("__main__", "QuantizedWeight8bit") + int8 + bits + b"\x86R"),
                                           "weight must be an int8 array, got _Array"),
        "top-level bf16": (_pickle(bits), "holds bfloat16 array"),
        "top-level dict": (_pickle(b"}"), "holds dict"),
    }


HOSTILE = list(_hostile(Path("/nonexistent")))


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_pickle_refused(tmp_path: Path, name: str) -> None:
    marker = tmp_path / "pwned"
    data, refused = _hostile(marker)[name]
    file = tmp_path / "tensor00000_000"
    file.write_bytes(data)
    with pytest.raises(CheckpointError) as e:
        read_tensor(file)
    message = str(e.value)
    assert str(file) in message and refused in message, message
    assert "\n" not in message
    assert not marker.exists()


def test_hostile_payload_is_live(tmp_path: Path) -> None:
    """Control: the os.system file really runs code under plain pickle.loads."""
    marker = tmp_path / "pwned"
    pickle.loads(_hostile(marker)["os.system p4"][0])
    assert marker.exists()


# --- Errors a user can hit. ------------------------------------------------------------------------


def test_missing_file(small_ckpt: tuple[Path, dict]) -> None:
    root, tensors = small_ckpt
    (root / "tensor00005_000").rename(root / "tensor00099_000")  # same count, index 5 missing
    path = list(tensors)[5]
    stream = read_checkpoint(root, SMALL)
    for _ in range(5):
        next(stream)
    with pytest.raises(CheckpointError) as e:
        next(stream)
    assert "tensor 5" in str(e.value) and path in str(e.value) and str(root / "tensor00005_000") in str(e.value)


def test_read_tensor_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file"):
        read_tensor(tmp_path / "nope")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_file(small_ckpt: tuple[Path, dict], damage: str) -> None:
    root, _ = small_ckpt
    file = root / "tensor00003_000"
    data = file.read_bytes()
    file.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\xde\xad\xbe\xef" * 100, "empty": b""}[damage])
    with pytest.raises(CheckpointError) as e:
        list(read_checkpoint(root, SMALL))
    assert str(file) in str(e.value) and "truncated or corrupt" in str(e.value)


def _replace(root: Path, tensors: dict, index: int, obj: np.ndarray | QuantizedWeight8bit) -> tuple[str, Path]:
    path, file = list(tensors)[index], root / f"tensor{index:05d}_000"
    write_tensor(file, obj)
    return path, file


def test_wrong_weight_shape(small_ckpt: tuple[Path, dict]) -> None:
    root, tensors = small_ckpt
    i = reference_paths(SMALL).index("transformer/decoder_layer_0/multi_head_attention/query/w")
    path, file = _replace(root, tensors, i, QuantizedWeight8bit(np.zeros((32, 128), np.int8),
                                                                np.zeros((1, 128), np.uint16)))
    with pytest.raises(CheckpointError) as e:
        list(read_checkpoint(root, SMALL))
    assert path in str(e.value) and str(file) in str(e.value)
    assert "expected weight shape [32, 256], found [32, 128]" in str(e.value)


def test_scale_groups_must_divide_input(small_ckpt: tuple[Path, dict]) -> None:
    root, tensors = small_ckpt
    i = reference_paths(SMALL).index("transformer/decoder_layer_1/moe/linear_1/w")
    path, file = _replace(root, tensors, i, QuantizedWeight8bit(np.zeros((8, 176, 32), np.int8),
                                                                np.zeros((8, 7, 32), np.uint16)))
    with pytest.raises(CheckpointError, match="scales shape \\[8, 7, 32\\] does not fit") as e:
        list(read_checkpoint(root, SMALL))
    assert path in str(e.value) and str(file) in str(e.value)


def test_wrong_dtype_and_kind(small_ckpt: tuple[Path, dict]) -> None:
    root, tensors = small_ckpt
    norm = reference_paths(SMALL).index("language_model/rms_norm/scale")
    path, file = _replace(root, tensors, norm, np.ones(32, np.float64))
    with pytest.raises(CheckpointError, match="expected dtype float32, found float64") as e:
        list(read_checkpoint(root, SMALL))
    assert path in str(e.value) and str(file) in str(e.value)
    _replace(root, tensors, norm, QuantizedWeight8bit(np.ones((32, 1), np.int8), np.ones((1, 1), np.uint16)))
    with pytest.raises(CheckpointError, match="expected a float32 array, found QuantizedWeight8bit"):
        list(read_checkpoint(root, SMALL))
    _replace(root, tensors, norm, tensors[path])
    key = reference_paths(SMALL).index("transformer/decoder_layer_0/multi_head_attention/key/w")
    _replace(root, tensors, key, np.zeros((32, 128), np.float32))
    with pytest.raises(CheckpointError, match="expected a QuantizedWeight8bit, found a float32 array"):
        list(read_checkpoint(root, SMALL))


def test_wrong_tensor_count(small_ckpt: tuple[Path, dict]) -> None:
    root, _ = small_ckpt
    (root / "tensor00000_000").write_bytes(b"garbage")  # never read: the count is checked first
    three = dataclasses.replace(SMALL, n_layers=3)
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(root, three)  # raises at call time, before iteration
    assert str(e.value) == f"found 26 tensor files in {root}, config with 3 layers needs 38; 26 files fit n_layers=2"
    (root / "tensor00025_000").unlink()
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(root.parent, SMALL)
    assert str(e.value) == f"found 25 tensor files in {root}, config with 2 layers needs 26"


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        read_checkpoint(tmp_path / "absent", SMALL)


# --- The writer. -------------------------------------------------------------------------------------


def test_golden_rewrite_is_byte_identical(shared_dir: Path, tmp_path: Path) -> None:
    """read_tensor -> write_tensor reproduces every file the release stack wrote, byte for byte."""
    root = shared_dir / "golden" / "tiny-ckpt" / "ckpt-0"
    files = sorted(root.glob("tensor*_000"))
    assert len(files) == 146
    for file in files:
        out = tmp_path / file.name
        write_tensor(out, read_tensor(file))
        assert out.read_bytes() == file.read_bytes(), file.name
    assert sorted(p.name for p in tmp_path.iterdir()) == [f.name for f in files]  # no temp files left


def _layout(obj: np.ndarray | QuantizedWeight8bit) -> tuple[int, list[tuple[int, int]]]:
    """(file size, [(offset, length) of each payload written unframed]) by the writer's own code path,
    counting bytes instead of storing them: zero arrays from np.zeros are never touched."""
    size, big = 0, []

    def count(data: bytes | memoryview) -> None:
        nonlocal size
        if isinstance(data, memoryview):
            big.append((size, data.nbytes))
        size += len(data)

    legacy_write._dump(obj, count)
    return size, big


def test_release_file_sizes() -> None:
    """Zero tensors of the release's shapes give the file sizes measured on the real release (GROK1.md 5)."""
    size, big = _layout(np.zeros((131072, 6144), np.float32))
    assert size == 3_221_225_637 and big == [(151, 131072 * 6144 * 4)]
    for shape, scales, want in (((8, 6144, 32768), (8, 1, 32768), 1_611_137_347),  # moe/linear, linear_v
                                ((8, 32768, 6144), (8, 8, 6144), 1_611_399_491)):  # moe/linear_1
        size, big = _layout(QuantizedWeight8bit(np.zeros(shape, np.int8), np.zeros(scales, np.uint16)))
        assert size == want and [n for _, n in big] == [np.prod(shape), 2 * np.prod(scales)], shape


def _numpy_pickle(a: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> bytes:
    """CPython's own pickler on `a`, with numpy 2's `numpy._core` renamed to the release's `numpy.core`."""
    def _reconstruct(*args: object) -> None:
        raise AssertionError("only pickled, never called")

    _reconstruct.__module__, _reconstruct.__qualname__ = "numpy.core.multiarray", "_reconstruct"
    module = types.ModuleType("numpy.core.multiarray")
    module._reconstruct = _reconstruct  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "numpy.core.multiarray", module)

    class Pickler(pickle.Pickler):
        def reducer_override(self, obj: object) -> object:
            if type(obj) is np.ndarray:
                _, args, state = obj.__reduce__()
                return _reconstruct, args, state
            return NotImplemented

    buf = io.BytesIO()
    Pickler(buf, protocol=4).dump(a)
    return buf.getvalue()


WRITE_CASES = {
    "float32": np.arange(12, dtype=np.float32).reshape(3, 4),
    "bool": np.array([True, False, True]),
    "big-endian f8": np.arange(3, dtype=">f8"),
    "float16 0-d": np.array(1.5, np.float16),
    "uint16 4-d": np.arange(120, dtype=np.uint16).reshape(2, 3, 4, 5),
    "int64 empty": np.zeros((0, 4), np.int64),
    "int8 b'b' payload": np.array([98], np.int8),  # a 1-byte payload is CPython's shared b"b": a memo get
    "fortran order": np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)),
    "strided": np.arange(40, dtype=np.int32)[::3],
    "transposed 3-d": np.arange(24, dtype=np.float32).reshape(2, 3, 4).transpose(0, 2, 1),
    # Around CPython's 64 KiB frame target: in the frame, frame closed after the payload, unframed.
    "65400 B": np.ones(65400, np.uint8),
    "65535 B": np.ones(65535, np.uint8),
    "65536 B": np.ones(65536, np.uint8),
    "large 2-d": np.arange(300_000, dtype=np.float32).reshape(600, 500),
    "large dims": np.zeros((70_000, 1), np.int8),  # a BININT shape entry
}


@pytest.mark.parametrize("name", WRITE_CASES)
def test_writer_matches_cpython_pickler(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    a = WRITE_CASES[name]
    ours = io.BytesIO()
    legacy_write._dump(a, ours.write)
    assert ours.getvalue() == _numpy_pickle(a, monkeypatch)


@pytest.mark.parametrize("name", WRITE_CASES)
def test_write_read_round_trip(name: str, tmp_path: Path) -> None:
    a = WRITE_CASES[name]
    write_tensor(tmp_path / "t", a)
    got = read_tensor(tmp_path / "t")
    # numpy itself unpickles a big-endian array as native-endian with the same values.
    assert got.dtype == a.dtype.newbyteorder("=") and got.shape == a.shape and np.array_equal(got, a)


@pytest.mark.parametrize("shape", [(4, 6), (2, 300, 200)])  # payloads in the frame, and unframed
def test_write_read_round_trip_qw8(shape: tuple[int, ...], tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    weight = rng.integers(-127, 128, shape, dtype=np.int8)
    scales = rng.integers(0, 1 << 16, (*shape[:-2], 2, shape[-1]), dtype=np.uint16)
    write_tensor(tmp_path / "t", QuantizedWeight8bit(weight, scales))
    got = read_tensor(tmp_path / "t")
    assert isinstance(got, QuantizedWeight8bit)
    assert np.array_equal(got.weight, weight) and np.array_equal(got.scales, scales)
    assert _globals(tmp_path / "t") == ["__main__.QuantizedWeight8bit", "numpy.core.multiarray._reconstruct",
                                        "numpy.ndarray", "numpy.dtype", "ml_dtypes.bfloat16"]


def _globals(file: Path) -> list[str]:
    """module.name of each STACK_GLOBAL, in order, read by pickletools (tracking memoised strings)."""
    stack: list[object] = []
    memo: list[object] = []
    found = []
    with open(file, "rb") as f:
        for op, arg, _ in pickletools.genops(f):
            if op.name == "SHORT_BINUNICODE":
                stack.append(arg)
            elif op.name == "MEMOIZE":
                memo.append(stack[-1] if stack else None)
            elif op.name == "BINGET":
                stack.append(memo[arg])
            elif op.name == "STACK_GLOBAL":
                found.append(f"{stack[-2]}.{stack[-1]}")
                stack.append(None)
            else:
                stack.append(None)
    return found


@pytest.mark.parametrize("obj", [np.zeros(2, np.complex64), np.array(["a"]), np.zeros(2, object), [1.0]],
                         ids=["complex", "str", "object", "list"])
def test_write_tensor_refuses(obj: object, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="cannot write"):
        write_tensor(tmp_path / "t", obj)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_write_tensor_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = tmp_path / "tensor00000_000"
    write_tensor(file, np.ones(3, np.float32))
    before = file.read_bytes()

    def fail(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(CheckpointError, match=f"{file}: cannot write"):
        write_tensor(file, np.zeros(1000, np.float32))
    assert file.read_bytes() == before and list(tmp_path.iterdir()) == [file]


def test_write_checkpoint_any_order_and_errors(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    tensors = {p: _random_tensor(p, SMALL, rng) for p in reference_paths(SMALL)}
    root = write_checkpoint(tmp_path, reversed(tensors.items()), SMALL)  # a generator, in any order
    got = dict(read_checkpoint(tmp_path, SMALL))
    assert list(got) == list(tensors)
    first = next(iter(tensors))
    assert np.array_equal(got[first], tensors[first])
    assert (root / "tensor00000_000").read_bytes() == _bytes(tensors[first])

    items = list(tensors.items())
    with pytest.raises(CheckpointError, match="25 of 26 tensors were not given, first language_model/rms_norm/scale"):
        write_checkpoint(tmp_path, items[:1], SMALL)
    with pytest.raises(CheckpointError, match="given twice"):
        write_checkpoint(tmp_path, items[:1] * 2, SMALL)
    with pytest.raises(CheckpointError, match="unknown parameter path 'transformer/decoder_layer_2/router/w'"):
        write_checkpoint(tmp_path, [("transformer/decoder_layer_2/router/w", np.zeros((32, 8), np.float32))], SMALL)
    with pytest.raises(CheckpointError, match=r"language_model/rms_norm/scale .*expected shape \[32\], found \[3\]"):
        write_checkpoint(tmp_path, [("language_model/rms_norm/scale", np.zeros(3, np.float32))], SMALL)
    one = dataclasses.replace(SMALL, n_layers=1)  # 14 files: the existing tensor00014_000.. do not belong
    with pytest.raises(CheckpointError, match="holds tensor00014_000 \\(and 11 more\\) beyond the 14 files"):
        write_checkpoint(tmp_path, [], one)


def _bytes(obj: np.ndarray | QuantizedWeight8bit) -> bytes:
    buf = io.BytesIO()
    legacy_write._dump(obj, buf.write)
    return buf.getvalue()
