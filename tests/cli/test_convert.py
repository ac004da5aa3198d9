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


@pytest.mark.xfail(reason="generate reads HF layouts once weights/source.py lands", strict=False)
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
