"""The command line, run as a user would: real arguments, real golden checkpoint, real output."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from grok1.cli.main import main
from grok1.weights import legacy, legacy_write


@pytest.fixture
def model_args(golden_dir, shared_dir):
    return ["--checkpoint", str(golden_dir / "tiny-ckpt"), "--config", str(golden_dir / "tiny-config.json"),
            "--tokenizer", str(shared_dir / "grok-1" / "tokenizer.model")]


def test_generate_json_prints_reference_greedy_ids(golden, model_args, capsys):
    """The issue's acceptance command, run in a real subprocess through `python -m grok1`."""
    prompt = str(golden["prompt_text"][0])
    out = subprocess.run([sys.executable, "-m", "grok1", "generate", *model_args, prompt, "--temperature", "0",
                          "--dtype", "float32", "--json"], capture_output=True, text=True, check=True).stdout
    result = json.loads(out)
    n = int(golden["prompt_lens"][0])
    assert result["prompt_ids"] == golden["prompt_ids"][0, :n].tolist()
    assert result["token_ids"][:16] == golden["greedy_fp32"][0].tolist()


def test_generate_batch_and_stream(golden, model_args, capsys):
    prompts = [str(t) for t in golden["prompt_text"]]
    assert main(["generate", *model_args, *prompts, "--temperature", "0", "--max-new-tokens", "6",
                 "--ignore-eos", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["token_ids"] for r in rows] == golden["greedy_fp32"][:, :6].tolist()
    assert main(["generate", *model_args, prompts[1], "--temperature", "0", "--max-new-tokens", "6",
                 "--ignore-eos", "--stream"]) == 0
    assert capsys.readouterr().out == rows[1]["text"] + "\n"


def test_score_json(model_args, capsys):
    assert main(["score", *model_args, "The capital of France is", "--json", "--top", "3"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ids"] == [422, 4073, 359, 5827, 391]
    assert len(result["token_logprobs"]) == 4 and len(result["top_ids"][0]) == 3
    assert result["total_logprob"] == pytest.approx(sum(result["token_logprobs"]), abs=1e-4)
    assert all(lp <= top[0] + 1e-6 for lp, top in zip(result["token_logprobs"], result["top_logprobs"]))


def test_info(model_args, capsys):
    assert main(["info", *model_args, "--context", "1024", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    from grok1.config import ModelConfig
    cfg = ModelConfig.from_reference_json(model_args[3])
    assert f"{cfg.num_params():,} total" in out and "KV cache" in out


def test_info_grok1_counts(golden_dir, capsys):
    # GROK1.md: 315,684,820,992 parameters in the release.
    assert main(["info", "--checkpoint", str(golden_dir), "--preset", "grok-1"]) == 0
    assert "315,684,820,992 total" in capsys.readouterr().out


def test_check_passes_on_golden_and_finds_a_broken_layer(golden_dir, model_args, tmp_path, capsys):
    npz = str(golden_dir / "tiny-golden.npz")
    assert main(["check", *model_args, "--golden", npz]) == 0
    assert "within tolerance" in capsys.readouterr().out
    # Break layer 4's post-MoE norm scale (tensor index 2 + 12 * rank): rank of "4" in 0,1,10,11,2,3,4 is 6.
    ckpt = tmp_path / "broken"
    shutil.copytree(golden_dir / "tiny-ckpt", ckpt)
    index = legacy.reference_paths(legacy.ModelConfig.from_reference_json(model_args[3])).index(
        "transformer/decoder_layer_4/rms_norm_3/scale")
    file = ckpt / "ckpt-0" / f"tensor{index:05d}_000"
    scale = legacy.read_tensor(file)
    file.chmod(0o644)
    legacy_write.write_tensor(file, (scale * 1.01).astype(np.float32))
    args = list(model_args)
    args[1] = str(ckpt)
    assert main(["check", *args, "--golden", npz]) == 1
    assert "first divergence: prompt 0, layer 4 " in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["generate", "--checkpoint", "/nonexistent", "--preset", "tiny", "hi"], "does not exist"),
    (["generate", "--checkpoint", ".", "--preset", "nope", "hi"], "unknown preset 'nope'; valid presets"),
    (["generate", "--checkpoint", ".", "--preset", "tiny", "--tokenizer", "/nonexistent.model", "hi"],
     "/nonexistent.model"),
    (["info", "--checkpoint", ".", "--config", "/nonexistent.json"], "cannot read model config"),
])
def test_user_mistakes_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_bad_sampling_value_is_one_line(model_args):
    proc = subprocess.run(["grok1", "generate", *model_args, "hi", "--temperature", "-1"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "temperature" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("command", ["generate", "score", "info", "check"])
def test_every_flag_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    from grok1.cli.main import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    for action in sub._actions:
        assert action.help, f"{command} {action.option_strings or action.dest} has no help text"


def test_serve_uses_one_thread_for_a_small_model_unless_told(monkeypatch):
    """The demo model's matmuls are too small to share between threads: serve/chat default to 1 for it."""
    import torch

    from grok1.cli import serve
    from grok1.cli.main import build_parser
    from grok1.config import PRESETS

    threads = torch.get_num_threads()
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    serve.engine_from_args(build_parser().parse_args(["serve", "--max-seq-len", "64"]))
    serve.engine_from_args(build_parser().parse_args(["serve", "--max-seq-len", "64", "--threads", "3"]))
    assert calls == [1, 3]
    assert torch.get_num_threads() == threads  # nothing was really changed for the other tests
    # larger models keep torch's choice: BENCH.md's config S is already past the limit
    assert PRESETS["grok-1-mini"].weight_bytes() < serve.SMALL_MODEL_BYTES <= PRESETS["bench-s"].weight_bytes()


def test_inference_commands_pack_the_weights_unless_told(golden, model_args, capsys):
    """The weights go into the kernel's panels at load (where it runs), or stay as stored with --no-pack;
    either way the golden prompt gets the reference's greedy tokens."""
    from grok1 import kernels
    from grok1.cli.common import config_from_args, model_from_args
    from grok1.cli.main import build_parser
    from grok1.quant import is_packed

    prompt = str(golden["prompt_text"][0])
    for flags, packed in (([], kernels.cpu_ops() is not None), (["--no-pack"], False)):
        args = build_parser().parse_args(["generate", *model_args, *flags, prompt])
        assert is_packed(model_from_args(args, config_from_args(args))) == packed
        assert main(["generate", *model_args, *flags, prompt, "--temperature", "0", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["token_ids"][:16] == golden["greedy_fp32"][0].tolist()
