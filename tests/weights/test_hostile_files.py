"""Checkpoints as an attacker or a careless operator leaves them: convert never destroys its source; configs,
headers, indexes and pickles that lie get one clear error naming the file and field (never a traceback, a
hang, unbounded memory, or a leak of another file's bytes); reruns reuse finished work."""

import json
import os
import pickle
import struct
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import small_config

from grok1.config import ModelConfig
from grok1.model import Transformer, init_weights
from grok1.quant import quantize_model
from grok1.weights import convert as conv
from grok1.weights import legacy
from grok1.weights import safetensors as st
from grok1.weights.load import load_model, save_model
from grok1.weights.source import open_source


def bounded(fn, seconds=60):
    """fn() on a thread; its exception (or None). Fails the test if fn is still running after `seconds`."""
    box = {}

    def run():
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 -- handed to the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still running after {seconds} s: it hangs"
    return box.get("error")


@pytest.fixture
def g1(tmp_path):
    torch.manual_seed(0)
    model = Transformer(small_config(dim=64, n_heads=4, head_dim=16, n_kv_heads=2, ffn_dim=96, vocab_size=64))
    init_weights(model)
    quantize_model(model)
    return save_model(model, tmp_path / "g1")


def files(d: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(d.iterdir()) if f.is_file()}


# ---- 1. convert never destroys its source ----

def test_convert_refuses_its_source_as_destination_however_spelled(g1, tmp_path):
    before = files(g1)
    (tmp_path / "alias").symlink_to(g1)
    outer = tmp_path / "outer"
    outer.mkdir()
    (outer / "src").symlink_to(g1, target_is_directory=True)
    for dst in (g1, tmp_path / "alias", g1 / ".." / "g1", Path(os.path.relpath(g1)), tmp_path):
        with pytest.raises(ValueError, match="is the source checkpoint|contains the source checkpoint"):
            conv.convert(g1, dst, "grok1")
    with pytest.raises(ValueError, match="the source checkpoint"):
        conv.convert(tmp_path / "alias", g1, "hf")
    with pytest.raises(ValueError, match="existing file of the source"):
        conv.convert(g1, next(g1.glob("*.safetensors")), "gguf")
    assert files(g1) == before
    st.verify_checkpoint(g1)


def test_convert_deletes_only_what_it_wrote(g1, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    foreign = {"model-00007-of-00009.safetensors": b"someone else's", "notes.txt": b"mine"}
    for name, data in foreign.items():
        (out / name).write_bytes(data)
    conv.convert(g1, out, "grok1", max_shard_bytes=64 << 10)
    for name, data in foreign.items():
        assert (out / name).read_bytes() == data, name
    st.verify_checkpoint(out)


# ---- 2. configs: bounds and the files present, before anything is built ----

BASE = {"vocab_size": 64, "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "head_dim": 16, "ffn_dim": 96}


@pytest.mark.parametrize("field,value", [("n_layers", 10**7), ("num_layers", 10**7), ("vocab_size", 2**40),
                                         ("dim", True), ("norm_eps", "x"), ("norm_eps", 0), ("rope_base", -1.0),
                                         ("attn_softcap", float("nan")), ("eos_id", 64), ("max_seq_len", 2**40),
                                         ("widening_factor", "xx")])
def test_config_values_out_of_bounds_are_refused_naming_the_field(field, value, tmp_path):
    raw = {k: v for k, v in BASE.items() if not (field == "num_layers" and k == "n_layers")} | {field: value}
    if field == "widening_factor":
        del raw["ffn_dim"]
    with pytest.raises(ValueError, match=f"c.json: .*{field.replace('num_layers', 'n_layers')}"):
        ModelConfig.from_dict(raw, "c.json")


def test_a_checkpoint_config_with_ten_million_layers_fails_before_building(g1):
    config = json.loads((g1 / "config.json").read_text())
    (g1 / "config.json").write_text(json.dumps(config | {"n_layers": 10**7}))
    error = bounded(lambda: load_model(g1, None))
    assert isinstance(error, ValueError) and "n_layers" in str(error) and "config.json" in str(error)


def test_a_config_that_contradicts_the_files_is_named(g1):
    config = json.loads((g1 / "config.json").read_text())
    (g1 / "config.json").write_text(json.dumps(config | {"n_layers": 3}))
    with pytest.raises(ValueError, match=r"index.json: lacks tensor layers\.2\..*3 layers"):
        open_source(g1)
    (g1 / "config.json").write_text(json.dumps(config | {"n_layers": 1}))
    with pytest.raises(ValueError, match=r"lists tensor 'layers\.1\..*no place for"):
        open_source(g1)
    (g1 / "config.json").write_text(json.dumps(config | {"ffn_dim": 64}))
    with pytest.raises(ValueError, match=r"safetensors: tensor layers\.0\.moe\.experts\.w1 has shape"):
        open_source(g1)


# ---- 3 and 4. malformed and lying files ----

def rewrite_header(shard: Path, edit) -> None:
    """Replace the shard's header by edit(header), keeping the data."""
    header, start = st.read_header(shard)
    data = shard.read_bytes()[start:]
    text = edit(header)
    text = text if isinstance(text, bytes) else json.dumps(text).encode()
    shard.write_bytes(struct.pack("<Q", len(text)) + text + data)


def first_tensor(header):
    return next(k for k in header if k != "__metadata__")


def two_tensors(header):
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])[:2]


HEADERS = {  # what is wrong -> (edit of the header, what the error must say)
    "deep nesting": (lambda h: b"[" * 100_000 + b"]" * 100_000, "not JSON"),
    "a list": (lambda h: [h], "a JSON list, expected an object"),
    "string offsets": (lambda h: h | {first_tensor(h): h[first_tensor(h)] | {"data_offsets": ["0", "8"]}},
                       "data_offsets"),
    "begin > end": (lambda h: h | {first_tensor(h): h[first_tensor(h)] | {
        "data_offsets": h[first_tensor(h)]["data_offsets"][::-1]}}, "data_offsets"),
    "wrong dtype size": (lambda h: h | {first_tensor(h): h[first_tensor(h)] | {
        "dtype": "F32" if h[first_tensor(h)]["dtype"] != "F32" else "F16"}}, "need"),
    "unknown dtype": (lambda h: h | {first_tensor(h): h[first_tensor(h)] | {"dtype": "F8_E4M3"}}, "dtype"),
    "negative shape": (lambda h: h | {first_tensor(h): h[first_tensor(h)] | {"shape": [-1, 4]}}, "shape"),
    "past the end": (lambda h: h | {first_tensor(h): h[first_tensor(h)] | {"data_offsets": [
        h[first_tensor(h)]["data_offsets"][0] + 10**9, h[first_tensor(h)]["data_offsets"][1] + 10**9]}},
        "truncated or corrupt"),
    "overlap": (lambda h: h | {two_tensors(h)[1]: h[two_tensors(h)[1]] | {"data_offsets": [
        h[two_tensors(h)[0]]["data_offsets"][0] + 1,
        h[two_tensors(h)[0]]["data_offsets"][0] + 1 + h[two_tensors(h)[1]]["data_offsets"][1]
        - h[two_tensors(h)[1]]["data_offsets"][0]]}}, "overlap"),
}


@pytest.mark.parametrize("what", list(HEADERS))
def test_malformed_headers_get_one_clear_error_naming_the_file(g1, what):
    edit, says = HEADERS[what]
    shard = next(g1.glob("*.safetensors"))
    rewrite_header(shard, edit)
    for read in (lambda: open_source(g1), lambda: st.verify_checkpoint(g1), lambda: load_model(g1, None)):
        error = bounded(read)
        assert isinstance(error, ValueError), (what, repr(error))
        assert shard.name in str(error) and says in str(error), (what, str(error))


def test_a_fifo_is_refused_not_read_forever(g1, tmp_path):
    shard = next(g1.glob("*.safetensors"))
    shard.unlink()
    os.mkfifo(shard)
    for read in (lambda: open_source(g1), lambda: st.verify_checkpoint(g1)):
        error = bounded(read, 30)
        assert isinstance(error, ValueError) and "FIFO" in str(error), repr(error)
    os.mkfifo(tmp_path / "tensor00000_000")
    error = bounded(lambda: legacy.read_tensor(tmp_path / "tensor00000_000"), 30)
    assert isinstance(error, legacy.CheckpointError) and "FIFO" in str(error)
    (g1 / "config.json").unlink()
    os.mkfifo(g1 / "config.json")
    error = bounded(lambda: open_source(g1), 30)
    assert isinstance(error, ValueError) and "FIFO" in str(error)


def test_a_pickle_of_200000_nested_tuples_is_a_clear_error(tmp_path):
    file = tmp_path / "tensor00000_000"
    file.write_bytes(b"\x80\x02)" + b"\x85" * 200_000 + b".")  # EMPTY_TUPLE then TUPLE1 200k times
    with pytest.raises(legacy.CheckpointError, match="tensor00000_000: holds"):
        legacy.read_tensor(file)
    sys.setrecursionlimit(sys.getrecursionlimit())  # (nothing to restore: no recursion happened)
    assert pickle.loads(file.read_bytes())  # the payload is valid pickle: only our description could recurse


def test_index_paths_stay_inside_the_checkpoint_and_errors_leak_no_bytes(g1, tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(b"root:x:0:0:TOPSECRET\n" * 10)
    index = json.loads((g1 / st.INDEX).read_text())
    name = next(iter(index["weight_map"]))
    for target in ("../secret", str(secret), "sub/../../secret", "..", ""):
        (g1 / st.INDEX).write_text(json.dumps(index | {"weight_map": index["weight_map"] | {name: target}}))
        for read in (lambda: open_source(g1), lambda: st.verify_checkpoint(g1), lambda: st.read_tensor(g1, name)):
            error = bounded(read)
            assert isinstance(error, ValueError) and "not a file name in the checkpoint directory" in str(error)
    # a file inside the directory that is not a shard: named, its bytes not quoted (not even as a number)
    shard = next(g1.glob("*.safetensors"))
    shard.write_bytes(secret.read_bytes())
    (g1 / st.INDEX).write_text(json.dumps(index))
    error = bounded(lambda: open_source(g1))
    leaked = str(struct.unpack("<Q", b"root:x:0")[0])
    assert isinstance(error, ValueError) and shard.name in str(error)
    assert "root:x" not in str(error) and "TOPSECRET" not in str(error) and leaked not in str(error)


def test_verify_only_covers_the_headers(g1, capsys):
    from grok1.cli.main import main

    shard = next(g1.glob("*.safetensors"))
    name = next(k for k, v in st.read_header(shard)[0].items() if k != "__metadata__" and len(v["shape"]) == 2
                and v["shape"][0] != v["shape"][1])

    def swap(h):  # same bytes, a transposed shape: the data CRC cannot see it
        return h | {name: h[name] | {"shape": h[name]["shape"][::-1]}}

    header, start = st.read_header(shard)
    text = json.dumps(swap(header)).encode()
    data = shard.read_bytes()
    shard.write_bytes(struct.pack("<Q", start - 8) + text + b" " * (start - 8 - len(text)) + data[start:])
    assert main(["convert", str(g1), str(g1), "--to", "grok1", "--verify-only"]) == 2
    assert "header differs" in capsys.readouterr().err


# ---- 5. a rerun after the index was written reuses everything ----

def test_rerunning_a_finished_conversion_reuses_every_shard(g1, tmp_path):
    out = tmp_path / "out"
    first = conv.convert(g1, out, "grok1", max_shard_bytes=64 << 10, verify=False)  # as if killed in verification
    shards = sorted(f.name for f in out.glob("*.safetensors"))
    assert len(shards) > 1 and (out / st.INDEX).exists() and first.bytes_written
    written = files(out)
    again = conv.convert(g1, out, "grok1", max_shard_bytes=64 << 10)
    assert sorted(again.skipped_shards) == shards and again.bytes_written == 0
    assert files(out) == written
