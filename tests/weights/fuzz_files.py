"""A seeded random mutator for checkpoint files, run as a subprocess by test_fuzz_files.py:

    python tests/weights/fuzz_files.py KIND SEED SECONDS WORKDIR   ->  prints one JSON line

KIND is a file format grok1 reads: pickle (a release tensor file), safetensors (a shard's header and data),
index (model.safetensors.index.json), config (config.json), gguf (a GGUF file read back). Each case mutates
a valid file (bit flips, truncation, spliced bytes, or a structured edit of its JSON) and reads it the way
grok1 does; the only acceptable failure is ValueError (grok1's clear error; CheckpointError is one). Anything
else is reported with its traceback. The parent runs this under an address-space limit and a timeout, so an
unbounded allocation (MemoryError) or a hang fails the test too.
"""

import json
import random
import shutil
import struct
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from conftest import small_config

from grok1.model import Transformer, init_weights
from grok1.quant import quantize_model
from grok1.weights import gguf as ggufx
from grok1.weights import legacy
from grok1.weights import safetensors as st
from grok1.weights.convert import convert
from grok1.weights.legacy_write import write_tensor
from grok1.weights.load import save_model
from grok1.weights.source import open_source

WILD = [None, True, -1, 0, 2**64, 10**7, 1.5, float("nan"), float("inf"), "x", "", "../../etc/passwd", "/etc/passwd",
        [], [1, 2], [-5, 3], [3, 1], ["0", "8"], {}, {"a": 1}, "F32", "I8", "BF16", 2**63 - 1]


def mutate_bytes(data: bytes, rng: random.Random, region: int | None = None) -> bytes:
    """Flip, delete, duplicate or overwrite a few bytes (within the first `region` bytes, if given), or cut."""
    buf = bytearray(data)
    end = min(len(buf), region or len(buf))
    for _ in range(rng.randint(1, 4)):
        op = rng.random()
        i = rng.randrange(max(1, end))
        if op < 0.35 and buf:
            buf[i % len(buf)] ^= 1 << rng.randrange(8)
        elif op < 0.5:
            del buf[i:i + rng.randint(1, 16)]
        elif op < 0.65:
            buf[i:i] = buf[i:i + rng.randint(1, 64)]
        elif op < 0.8 and buf:
            buf[i % len(buf)] = rng.choice([0, 0xFF, 0x80, ord("("), ord("]"), ord("}"), ord('"'), ord("9")])
        else:
            return bytes(buf[:rng.randrange(len(buf) + 1)])
    return bytes(buf)


def mutate_json(obj, rng: random.Random, depth: int = 0):
    """A structured edit of parsed JSON: replace, delete or add a value somewhere, or nest it deeply."""
    if rng.random() < 0.02:
        return "[" * 100_000 + "]" * 100_000  # as raw text: the caller writes strings raw
    if isinstance(obj, dict) and obj and depth < 4 and rng.random() < 0.7:
        key = rng.choice(list(obj))
        out = dict(obj)
        r = rng.random()
        if r < 0.15:
            del out[key]
        elif r < 0.25:
            out[rng.choice(["__metadata__", "x", key + "_", ""])] = rng.choice(WILD)
        else:
            out[key] = mutate_json(obj[key], rng, depth + 1)
        return out
    if isinstance(obj, list) and obj and depth < 4 and rng.random() < 0.6:
        out = list(obj)
        i = rng.randrange(len(out))
        out[i] = mutate_json(out[i], rng, depth + 1)
        return out
    return rng.choice(WILD)


def dumps(obj) -> bytes:
    return obj.encode() if isinstance(obj, str) else json.dumps(obj).encode()


def shard_with_header(header, data: bytes, rng: random.Random) -> bytes:
    text = dumps(header)
    n = len(text) if rng.random() < 0.9 else rng.choice([0, 7, len(text) + 5, 2**63, 2**40])
    return struct.pack("<Q", n) + text + data


class Cases:
    """A small valid file of each kind, made once in WORKDIR, and one way to read each."""

    def __init__(self, work: Path) -> None:
        torch.manual_seed(0)
        cfg = small_config(dim=64, n_heads=4, head_dim=16, n_kv_heads=2, ffn_dim=96, n_layers=1, vocab_size=64)
        model = Transformer(cfg)
        init_weights(model)
        quantize_model(model)
        self.g1 = save_model(model, work / "g1")
        self.shard = next(self.g1.glob("*.safetensors"))
        self.good_shard = self.shard.read_bytes()
        self.header, start = st.read_header(self.shard)
        self.data = self.good_shard[start:]
        self.index = json.loads((self.g1 / st.INDEX).read_text())
        self.config = json.loads((self.g1 / "config.json").read_text())
        self.gguf = work / "m.gguf"
        convert(self.g1, self.gguf, "gguf", dtype="q8_0")
        self.good_gguf = self.gguf.read_bytes()
        self.pickle = work / "tensor00000_000"
        q = legacy.QuantizedWeight8bit(np.arange(-64, 64, dtype=np.int8).reshape(8, 16),
                                       np.full((1, 16), 0x3F80, dtype=np.uint16))
        write_tensor(self.pickle, q)
        self.good_pickle = self.pickle.read_bytes()
        self.array_pickle = work / "array.pkl"
        write_tensor(self.array_pickle, np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8))
        self.good_array = self.array_pickle.read_bytes()
        self.work = work

    def restore(self) -> None:
        self.shard.write_bytes(self.good_shard)
        (self.g1 / st.INDEX).write_text(json.dumps(self.index))
        (self.g1 / "config.json").write_text(json.dumps(self.config))

    def run(self, kind: str, rng: random.Random) -> None:
        self.restore()
        if kind == "pickle":
            file = self.pickle if rng.random() < 0.5 else self.array_pickle
            good = self.good_pickle if file == self.pickle else self.good_array
            bad = self.work / "bad.pkl"
            bad.write_bytes(mutate_bytes(good, rng, region=None if rng.random() < 0.3 else 200))
            legacy.read_tensor(bad)
        elif kind == "safetensors":
            if rng.random() < 0.5:
                self.shard.write_bytes(mutate_bytes(self.good_shard, rng, region=len(self.good_shard) - len(self.data)))
            else:
                self.shard.write_bytes(shard_with_header(mutate_json(self.header, rng), self.data, rng))
            st.open_shard(self.shard)
            st.verify_checkpoint(self.g1)
            src = open_source(self.g1)
            for name in src.names()[:3]:
                src.read(name)
        elif kind == "index":
            (self.g1 / st.INDEX).write_bytes(dumps(mutate_json(self.index, rng)))
            st.verify_checkpoint(self.g1)
            src = open_source(self.g1)
            st.open_checkpoint(self.g1)
            src.read(src.names()[0])
        elif kind == "config":
            (self.g1 / "config.json").write_bytes(dumps(mutate_json(self.config, rng)))
            src = open_source(self.g1)
            with torch.device("meta"):  # what a bad config must never reach unchecked
                Transformer(src.config)
        elif kind == "gguf":
            bad = self.work / "bad.gguf"
            region = None if rng.random() < 0.3 else 4096
            bad.write_bytes(mutate_bytes(self.good_gguf, rng, region))
            ggufx.read(bad)
        else:
            raise SystemExit(f"unknown kind {kind}")


def main() -> None:
    kind, seed, seconds, work = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), Path(sys.argv[4])
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    cases = Cases(work)
    rng = random.Random(seed)
    tried, clear, crashes = 0, 0, []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        tried += 1
        try:
            cases.run(kind, rng)
        except ValueError:
            clear += 1
        except Exception:  # noqa: BLE001 -- the point: anything else is a finding
            crashes.append(traceback.format_exc(limit=-4))
            if len(crashes) >= 5:
                break
    print(json.dumps({"kind": kind, "tried": tried, "clear_errors": clear, "crashes": crashes}))


if __name__ == "__main__":
    main()
