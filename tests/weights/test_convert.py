"""grok1 convert: release -> grok1 bit-identical, resume after a kill, corruption and a full disk."""

import errno
import json
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import generate, small_config

from grok1.cli.main import main
from grok1.engine.sampling import SamplingParams
from grok1.model import Transformer, init_weights
from grok1.quant import quantize
from grok1.weights import convert as conv
from grok1.weights import names
from grok1.weights import safetensors as st
from grok1.weights.load import load_model, save_model

DEMO = Path(__file__).resolve().parents[2] / "grok1" / "assets" / "grok-1-mini"


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def greedy(model, prompts, n=12):
    params = SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True)
    return [c.token_ids for c in generate(model, prompts, [params] * len(prompts))]


@pytest.fixture(scope="module")
def release_to_grok1(golden_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "g1"
    conv.convert(golden_dir / "tiny-ckpt", out, "grok1", config=golden_dir / "tiny-config.json",
                 max_shard_bytes=256 << 10)
    return out


def test_release_to_grok1_is_bit_identical_with_identical_logits(release_to_grok1, golden_model, golden_config,
                                                                  golden):
    assert st.read_config(release_to_grok1) == (golden_config, "int8")
    assert (release_to_grok1 / conv.MANIFEST).exists()  # kept: a rerun reuses every shard (test_rerun_...)
    converted = load_model(release_to_grok1, golden_config)
    same_weights(golden_model, converted)
    ids = torch.tensor(golden["prompt_ids"][:1, :11], dtype=torch.long)
    with torch.no_grad():
        assert torch.equal(golden_model(ids), converted(ids))
    prompt = [golden["prompt_ids"][0, : golden["prompt_lens"][0]].tolist()]
    assert greedy(converted, prompt, 3) == greedy(golden_model, prompt, 3)


def test_index_records_checksums_and_shards_are_standard_safetensors(release_to_grok1):
    from safetensors import safe_open

    index = json.loads((release_to_grok1 / st.INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and sorted(index["metadata"]["crc32"]) == shards
    with safe_open(str(release_to_grok1 / shards[0]), "pt") as f:  # the reference library reads them
        name = next(iter(f.keys()))
        assert torch.equal(f.get_tensor(name), st.read_tensor(release_to_grok1, name))


def test_tensor_parallel_slices_read_only_their_bytes(release_to_grok1):
    full = st.open_checkpoint(release_to_grok1)
    for name in ["layers.3.attention.wqkv.weight", "layers.3.attention.wo.weight", "layers.3.moe.experts.w2",
                 "layers.3.moe.experts.w1", "layers.3.attention.wo.scales", "tok_embeddings.weight"]:
        axis = names.tp_split_axis(name)
        size = full[name].shape[axis]
        for rank in range(2):
            lo, hi = rank * size // 2, (rank + 1) * size // 2
            assert torch.equal(st.read_slice(release_to_grok1, name, axis, lo, hi), full[name].narrow(axis, lo, hi - lo))
    assert names.tp_split_axis("layers.0.attn_norm.weight") is None


def test_float_source_to_int8_uses_the_release_recipe(tmp_path):
    cfg = small_config()
    model = Transformer(cfg)
    init_weights(model, torch.Generator().manual_seed(3))
    save_model(model, tmp_path / "f32")
    conv.convert(tmp_path / "f32", tmp_path / "i8", "grok1", dtype="int8")
    loaded = load_model(tmp_path / "i8", cfg)
    q, s = quantize(model.layers[1].attention.wo.weight.data, 8)
    assert torch.equal(loaded.layers[1].attention.wo.weight, q) and torch.equal(loaded.layers[1].attention.wo.scales, s)
    q, s = quantize(model.layers[0].moe.experts.w1.data, 1)
    assert torch.equal(loaded.layers[0].moe.experts.w1, q) and torch.equal(loaded.layers[0].moe.experts.s1, s)
    assert torch.equal(loaded.tok_embeddings.weight, model.tok_embeddings.weight)


class Interrupt(BaseException):
    pass


def _files(d: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(d.iterdir())}


def _interrupted(golden_dir: Path, out: Path, stop_after: int) -> dict[str, str]:
    """Run a conversion that is killed after writing stop_after bytes; the finished shards' checksums."""
    budget = [stop_after]

    def kill(n):
        budget[0] -= n
        if budget[0] < 0:
            raise Interrupt

    with pytest.raises(Interrupt):
        conv.convert(golden_dir / "tiny-ckpt", out, "grok1", progress=kill, **ARGS(golden_dir))
    return json.loads((out / conv.MANIFEST).read_text())["done"]


def ARGS(golden_dir):
    return {"config": golden_dir / "tiny-config.json", "max_shard_bytes": 256 << 10}


def _halfway(g1: Path, fraction: float) -> int:
    """Bytes after which `fraction` of the shards after the first (the big embedding) are written."""
    sizes = [f.stat().st_size for f in sorted(g1.glob("*.safetensors"))]
    return sizes[0] + int(fraction * sum(sizes[1:]))


def test_interrupted_conversion_resumes_to_the_same_files(golden_dir, release_to_grok1, tmp_path):
    out = tmp_path / "g1"
    done = _interrupted(golden_dir, out, _halfway(release_to_grok1, 0.5))
    assert done and not (out / st.INDEX).exists() and not list(out.glob("*.tmp"))
    # A SIGKILL also leaves the shard being written behind as .tmp.
    n = len(list(release_to_grok1.glob("*.safetensors")))
    (out / (st.shard_name(len(done), n) + ".tmp")).write_bytes(b"partial")
    result = conv.convert(golden_dir / "tiny-ckpt", out, "grok1", **ARGS(golden_dir))
    assert sorted(result.skipped_shards) == sorted(done)
    assert _files(out) == _files(release_to_grok1)


def _flip_a_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 1
    file.write_bytes(bytes(data))


def test_a_corrupt_shard_is_named_by_the_verification(release_to_grok1, tmp_path, capsys):
    out = tmp_path / "g1"
    subprocess.run(["cp", "-r", str(release_to_grok1), str(out)], check=True)
    shard = sorted(out.glob("*.safetensors"))[2]
    _flip_a_byte(shard)
    with pytest.raises(ValueError, match=shard.name):
        st.verify_checkpoint(out)
    assert main(["convert", str(out), str(out), "--to", "grok1", "--verify-only"]) == 2
    assert shard.name in capsys.readouterr().err


def test_resume_rewrites_a_finished_shard_that_got_corrupted(golden_dir, release_to_grok1, tmp_path):
    out = tmp_path / "g1"
    done = _interrupted(golden_dir, out, _halfway(release_to_grok1, 0.75))
    bad = sorted(done)[1]
    _flip_a_byte(out / bad)
    result = conv.convert(golden_dir / "tiny-ckpt", out, "grok1", **ARGS(golden_dir))
    assert bad not in result.skipped_shards and len(result.skipped_shards) == len(done) - 1
    assert _files(out) == _files(release_to_grok1)


@pytest.fixture
def tiny_disk(tmp_path):
    """A 2 MB tmpfs (root can mount one); None when mounting is not allowed here."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True,
                      check=False).returncode:
        yield None
        return
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_full_disk_is_a_clear_error_and_leaves_nothing_that_looks_complete(golden_dir, tiny_disk, tmp_path,
                                                                           monkeypatch):
    out = (tiny_disk or tmp_path) / "g1"
    if tiny_disk is None:  # no tmpfs: the write path fails the way a full disk makes it fail
        real = st.os.fsync
        calls = [0]

        def fsync(fd):
            calls[0] += 1
            if calls[0] > 2:
                raise OSError(errno.ENOSPC, "No space left on device")
            real(fd)

        monkeypatch.setattr(st.os, "fsync", fsync)
    with pytest.raises(OSError, match="No space left on device.*rerun to resume") as e:
        conv.convert(golden_dir / "tiny-ckpt", out, "grok1", config=golden_dir / "tiny-config.json",
                     max_shard_bytes=1 << 20)
    assert e.value.errno == errno.ENOSPC
    assert not (out / st.INDEX).exists() and not (out / "config.json").exists()
    assert not list(out.glob("*.tmp"))
    done = json.loads((out / conv.MANIFEST).read_text())["done"] if (out / conv.MANIFEST).exists() else {}
    assert sorted(f.name for f in out.glob("*.safetensors")) == sorted(done)  # only finished, checksummed shards


def test_cli_convert_and_errors(golden_dir, tmp_path, capsys):
    args = ["convert", str(golden_dir / "tiny-ckpt"), str(tmp_path / "g1"), "--config",
            str(golden_dir / "tiny-config.json"), "--to", "grok1"]
    assert main(args) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "g1"), str(tmp_path / "hf"), "--to", "hf", "--dtype", "int8"]) == 2
    assert "not available for --to hf" in capsys.readouterr().err
    assert main(["convert", str(tmp_path), str(tmp_path / "x"), "--to", "grok1"]) == 2
    assert "not a Grok-1 checkpoint" in capsys.readouterr().err


@pytest.mark.skipif(not (DEMO / st.INDEX).is_file(), reason=f"demo model not built yet ({DEMO})")
def test_converted_demo_model_generates_the_same_tokens(tmp_path):
    cfg, _ = st.read_config(DEMO)
    conv.convert(DEMO, tmp_path / "hf", "hf", dtype="fp32")
    conv.convert(tmp_path / "hf", tmp_path / "back", "grok1")
    demo, back = load_model(DEMO, cfg), load_model(tmp_path / "back", cfg)
    prompts = [[5, 17, 300, 41], [9, 8, 7]]
    assert greedy(back, prompts) == greedy(demo, prompts)
