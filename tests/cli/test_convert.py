"""`grok1 convert` as a user runs it: every format it writes loads in `grok1 generate` and gives the source's
tokens, converted there and back; outputs are checked before a byte is read; options that do not apply are
refused."""

import json

import pytest

from grok1.cli.main import main

TOKENS = 8  # greedy tokens compared (the golden prompt's top-2 gaps stay above 1e-2 over these)


def generate_ids(capsys, checkpoint, tokenizer, prompt, extra=()):
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(checkpoint), "--tokenizer", str(tokenizer), *extra, prompt,
                 "--temperature", "0", "--max-new-tokens", str(TOKENS), "--ignore-eos", "--json"]) == 0
    return json.loads(capsys.readouterr().out)["token_ids"]


def convert(capsys, src, dst, *options):
    assert main(["convert", str(src), str(dst), *options, "--shard-gb", "0.001"]) == 0, capsys.readouterr().err
    capsys.readouterr()


def test_every_format_loads_and_generates_the_same_tokens_there_and_back(golden_dir, golden, tmp_path, capsys):
    tok = golden_dir.parent / "grok-1" / "tokenizer.model"
    prompt = str(golden["prompt_text"][0])
    config = ["--config", str(golden_dir / "tiny-config.json")]
    src = golden_dir / "tiny-ckpt"
    want = generate_ids(capsys, src, tok, prompt, config)
    assert want == golden["greedy_fp32"][0, :TOKENS].tolist()  # the reference's own greedy tokens

    # Exact formats: int8 as released, its exact float32 dequantisation, and HF fp32 in both layouts.
    exact = {"int8": tmp_path / "int8", "fp32": tmp_path / "fp32"}
    for dtype, out in exact.items():
        convert(capsys, src, out, "--to", "grok1", "--dtype", dtype, *config)
    for layout in ("vllm", "sglang"):
        convert(capsys, exact["int8"], tmp_path / f"hf-{layout}-fp32", "--to", "hf", "--layout", layout,
                "--dtype", "fp32")
        convert(capsys, tmp_path / f"hf-{layout}-fp32", tmp_path / f"back-{layout}-fp32", "--to", "grok1")
        convert(capsys, tmp_path / f"hf-{layout}-fp32", tmp_path / f"back-{layout}-int8", "--to", "grok1",
                "--dtype", "int8")
    for name in ("int8", "fp32", "hf-vllm-fp32", "hf-sglang-fp32", "back-vllm-fp32", "back-sglang-fp32",
                 "back-vllm-int8", "back-sglang-int8"):
        assert generate_ids(capsys, tmp_path / name, tok, prompt) == want, name

    # bf16: the reference's own bf16 of each weight; every bf16 format holds the same values.
    convert(capsys, src, tmp_path / "bf16", "--to", "grok1", "--dtype", "bf16", *config)
    for layout in ("vllm", "sglang"):
        convert(capsys, exact["int8"], tmp_path / f"hf-{layout}", "--to", "hf", "--layout", layout)  # bf16
        convert(capsys, tmp_path / f"hf-{layout}", tmp_path / f"back-{layout}", "--to", "grok1")
    bf16 = {name: generate_ids(capsys, tmp_path / name, tok, prompt)
            for name in ("bf16", "hf-vllm", "hf-sglang", "back-vllm", "back-sglang")}
    assert len({tuple(ids) for ids in bf16.values()}) == 1, bf16
    assert bf16["bf16"][:4] == want[:4]  # bf16 rounding of the weights, same leading tokens


@pytest.mark.parametrize("argv, message", [
    (["--to", "grok1", "--layout", "sglang"], "--layout applies to --to hf only (not --to grok1)"),
    (["--to", "gguf", "--shard-gb", "1"], "--shard-gb applies to --to grok1/hf only"),
    (["--to", "grok1", "--verify-only", "--dtype", "bf16"], "--verify-only only re-reads DST: --dtype does not apply"),
    (["--to", "grok1", "--preset", "tiny"], "carries its own config, and --preset tiny describes a different model"),
])
def test_options_that_do_not_apply_are_refused(argv, message, tmp_path, capsys):
    from grok1.cli.common import DEFAULT_CHECKPOINT

    assert main(["convert", str(DEFAULT_CHECKPOINT), str(tmp_path / "out"), *argv]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_destination_is_checked_before_any_tensor_is_read(golden_dir, tmp_path, capsys, monkeypatch):
    """A release whose first tensor file is unreadable: every destination problem is reported instead, so it
    was found before the conversion began; a different model in DST is never overwritten without --force."""
    import shutil

    from grok1.cli import convert as cli_convert
    from grok1.cli.common import DEFAULT_CHECKPOINT

    broken = tmp_path / "release"
    shutil.copytree(golden_dir / "tiny-ckpt", broken)
    (broken / "ckpt-0" / "tensor00000_000").chmod(0o644)
    (broken / "ckpt-0" / "tensor00000_000").write_bytes(b"not a pickle")
    config = ["--config", str(golden_dir / "tiny-config.json")]
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert main(["convert", str(broken), str(a_file), "--to", "grok1", *config]) == 2
    assert "writes a directory, but DST" in capsys.readouterr().err
    assert main(["convert", str(broken), str(tmp_path), "--to", "gguf", *config]) == 2
    assert "--to gguf writes one file" in capsys.readouterr().err
    assert main(["convert", str(broken), str(broken), "--to", "grok1", *config]) == 2
    assert "is the source itself" in capsys.readouterr().err
    monkeypatch.setattr(cli_convert.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 1000))
    assert main(["convert", str(broken), str(tmp_path / "new"), "--to", "grok1", *config]) == 2
    assert "the conversion writes" in capsys.readouterr().err and not (tmp_path / "new").exists()
    monkeypatch.undo()

    # The demo model converted into a directory; converting it again is a redo; another model is refused.
    demo_out = tmp_path / "demo-fp32"
    assert main(["convert", str(DEFAULT_CHECKPOINT), str(demo_out), "--to", "grok1", "--dtype", "fp32"]) == 0
    assert main(["convert", str(DEFAULT_CHECKPOINT), str(demo_out), "--to", "grok1", "--dtype", "fp32"]) == 0
    index = (demo_out / "model.safetensors.index.json").read_bytes()
    capsys.readouterr()
    assert main(["convert", str(golden_dir / "tiny-ckpt"), str(demo_out), "--to", "grok1", *config]) == 2
    assert "already holds another model; --force replaces it" in capsys.readouterr().err
    assert (demo_out / "model.safetensors.index.json").read_bytes() == index  # untouched
    assert main(["convert", str(DEFAULT_CHECKPOINT), str(demo_out), "--to", "grok1", "--dtype", "bf16"]) == 2
    assert "already holds this model in another form" in capsys.readouterr().err
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    assert main(["convert", str(DEFAULT_CHECKPOINT), str(notes), "--to", "grok1"]) == 2
    assert "is not empty and holds no checkpoint" in capsys.readouterr().err
    assert main(["convert", str(golden_dir / "tiny-ckpt"), str(demo_out), "--to", "grok1", *config, "--force",
                 "--shard-gb", "0.001"]) == 0
    assert json.loads((demo_out / "config.json").read_text())["dim"] == 32  # now the tiny model
