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
    assert capsys.readouterr().out == prompts[1] + rows[1]["text"] + "\n"  # the prompt, as plain mode prints it


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


def test_info_grok1_counts(capsys):
    # GROK1.md: 315,684,820,992 parameters in the release. A preset alone describes that config, and no
    # checkpoint's disk size (the demo model's used to be reported).
    assert main(["info", "--preset", "grok-1"]) == 0
    out = capsys.readouterr().out
    assert "315,684,820,992 total" in out and "on disk" not in out and "(none: grok-1 alone)" in out


def test_info_sizes_are_the_checkpoints_own(golden_dir, model_args, tmp_path, capsys):
    import torch

    from grok1.cli.common import DEFAULT_CHECKPOINT
    from grok1.config import PRESETS

    # The demo checkpoint: its weight file only, int8 in memory.
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    shard = next(DEFAULT_CHECKPOINT.glob("*.safetensors")).stat().st_size
    assert f"on disk         {shard / 1e6:.3f} MB in 1 weight files" in out and "int8 matrices" in out
    # Its own config.json wins: a --preset that contradicts it is refused, not silently used.
    assert main(["info", "--checkpoint", str(DEFAULT_CHECKPOINT), "--preset", "tiny"]) == 2
    assert "carries its own config.json, and --preset tiny describes a different model" in capsys.readouterr().err
    # A float32 checkpoint needs 4 bytes per parameter; trainer_state.pt and other files are not counted.
    from grok1.model import Transformer, init_weights
    from grok1.weights.load import save_model

    cfg = PRESETS["grok-1-mini"]
    model = Transformer(cfg)
    init_weights(model, torch.Generator().manual_seed(0))
    save_model(model, tmp_path / "fp32")
    (tmp_path / "fp32" / "trainer_state.pt").write_bytes(b"x" * 10_000_000)
    assert main(["info", "--checkpoint", str(tmp_path / "fp32")]) == 0
    out = capsys.readouterr().out
    on_disk = sum(f.stat().st_size for f in (tmp_path / "fp32").glob("*.safetensors"))
    assert f"on disk         {on_disk / 1e6:.3f} MB" in out
    assert f"in memory       {cfg.num_params() * 4 / 1e6:.3f} MB (fp32)" in out
    # A directory that is not a checkpoint is an error, not "0.000 MB".
    assert main(["info", "--checkpoint", str(golden_dir), "--preset", "grok-1"]) == 2
    assert "is not a checkpoint" in capsys.readouterr().err


def test_presets_version_and_bare_command(capsys):
    from grok1 import __version__
    from grok1.config import PRESETS

    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in PRESETS) and "315,684,820,992" in out
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "generate" in out and "chat" in out and "presets" in out and "convert" in out
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"grok1 {__version__}"
    run = subprocess.run([sys.executable, "-m", "grok1"], capture_output=True, text=True, check=False)
    assert run.returncode == 0 and "COMMAND" in run.stdout and not run.stderr


def test_train_help_states_each_default_once(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: True)" not in out and "(default: None)" not in out
    assert "optimizer steps (default: 1000)" in out
    assert "default" not in out.split("--no-progress")[1].split("--")[0]


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


def test_check_bf16_passes_at_its_own_tolerance_and_still_finds_a_wrong_constant(golden_dir, model_args, tmp_path,
                                                                                capsys):
    npz = str(golden_dir / "tiny-golden.npz")
    assert main(["check", *model_args, "--golden", npz, "--precision", "bf16"]) == 0
    assert "within tolerance" in capsys.readouterr().out
    # A wrong embedding multiplier (1.0 instead of 78.38, a classic port mistake) is far outside it.
    cfg = json.loads((golden_dir / "tiny-config.json").read_text())
    text = json.dumps(cfg).replace("78.38367176906169", "1.0")
    assert text != json.dumps(cfg)
    (tmp_path / "wrong.json").write_text(text)
    args = list(model_args)
    args[3] = str(tmp_path / "wrong.json")
    assert main(["check", *args, "--golden", npz, "--precision", "bf16"]) == 1
    assert "first divergence: prompt 0, embed" in capsys.readouterr().out


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
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert "--temperature -1.0 is invalid" in proc.stderr and "Traceback" not in proc.stderr
    assert "SamplingParams" not in proc.stderr  # the flag the user typed, not an internal field
    proc = subprocess.run(["grok1", "generate", *model_args, "hi", "--stop", ""], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 2 and "--stop '' is invalid" in proc.stderr


@pytest.mark.parametrize("command", ["generate", "score", "check", "serve", "chat", "info"])
def test_unknown_device_is_one_line_on_every_command(command, capsys):
    extra = {"generate": ["hi"], "score": ["hi"], "check": ["--golden", "x.npz"]}.get(command, [])
    with pytest.raises(SystemExit) as e:
        main([command, "--device", "foo", *extra])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --device: 'foo' is not a torch device" in err and "Traceback" not in err


@pytest.mark.parametrize("command", [["generate", "hi"], ["chat"], ["train", "--out", "r"]])
def test_seed_beyond_64_bits_is_one_line(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([*command, "--seed", str(2**64)])
    assert e.value.code == 2 and "outside 0..2**64-1" in capsys.readouterr().err


def test_non_utf8_arguments_are_one_line(model_args):
    for command in (["generate", "caf\udce9"], ["score", "caf\udce9"]):
        proc = subprocess.run([sys.executable, "-m", "grok1", *command[:1], *model_args,
                               command[1].encode("utf-8", "surrogateescape")], capture_output=True, check=False)
        err = proc.stderr.decode()
        assert proc.returncode == 2 and "Traceback" not in err, err
        assert "is not valid UTF-8 (byte 0xe9 at byte 3)" in err


def test_golden_that_is_not_npz_is_one_line(model_args, tmp_path, capsys):
    bad = tmp_path / "golden.txt"
    bad.write_text("not a numpy archive")
    assert main(["check", *model_args, "--golden", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}" in err and "not a golden .npz" in err and len(err.strip().splitlines()) == 1
    assert main(["check", *model_args, "--golden", str(tmp_path / "missing.npz")]) == 2
    assert "missing.npz" in capsys.readouterr().err


def test_serve_checks_host_and_port_before_loading(capsys):
    import socket

    with pytest.raises(SystemExit) as e:
        main(["serve", "--port", "70000"])
    assert e.value.code == 2 and "70000 is not a TCP port" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        # A checkpoint that does not exist is never reached: the address is checked first.
        assert main(["serve", "--port", str(port), "--checkpoint", "/nonexistent"]) == 2
        err = capsys.readouterr().err
        assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in err
    assert main(["serve", "--host", "no-such-host.invalid", "--checkpoint", "/nonexistent"]) == 2
    assert "cannot listen on no-such-host.invalid:8000" in capsys.readouterr().err


def test_chat_url_errors_are_one_line(capsys):
    """A 401 keeps the server's message and says which option fixes it; no server at all says so."""
    import http.server
    import threading

    class Locked(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"error": {"message": "invalid API key", "type": "invalid_request_error"}}).encode()
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Locked)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        assert main(["chat", "--url", url]) == 2
        err = capsys.readouterr().err
        assert "answered 401: invalid API key (pass the server's key with --api-key KEY)" in err
    finally:
        server.shutdown()
        server.server_close()
    assert main(["chat", "--url", url]) == 2
    assert f"cannot reach {url}" in capsys.readouterr().err
    assert main(["chat", "--url", "localhost:8000"]) == 2
    assert "give the server's base URL, e.g. http://127.0.0.1:8000" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["generate", "score", "info", "check", "serve", "chat", "train", "convert",
                                     "presets"])
def test_every_flag_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    from grok1.cli.main import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    assert sub.description, f"{command} has no description"
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
    from grok1.panels import is_packed

    prompt = str(golden["prompt_text"][0])
    for flags, packed in (([], kernels.cpu_ops() is not None), (["--no-pack"], False)):
        args = build_parser().parse_args(["generate", *model_args, *flags, prompt])
        assert is_packed(model_from_args(args, config_from_args(args))) == packed
        assert main(["generate", *model_args, *flags, prompt, "--temperature", "0", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["token_ids"][:16] == golden["greedy_fp32"][0].tolist()


def test_score_refuses_a_text_beyond_the_context_or_scores_it_in_windows(capsys):
    """The demo model's context is 256 tokens: a longer text is refused like generate refuses it, or scored
    in windows, each token once with at least 128 tokens before it (checked against scoring that prefix)."""
    import torch

    from grok1.cli.common import DEFAULT_CHECKPOINT
    from grok1.config import resolve_config
    from grok1.eval.score import score, score_windows
    from grok1.weights.load import load_model

    text = " ".join(f"It was the {i}th day of the month, and Elizabeth walked to Meryton." for i in range(40))
    assert main(["score", text]) == 2
    err = capsys.readouterr().err
    assert "tokens but the model's context holds 256; pass --sliding-window" in err
    assert main(["score", text, "--sliding-window", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    ids = result["ids"]
    assert len(ids) > 512 and len(result["token_logprobs"]) == len(ids) - 1 and result["windows"] >= 4
    model = load_model(DEFAULT_CHECKPOINT, resolve_config(DEFAULT_CHECKPOINT), "cpu", torch.float32, pack=True)
    for p in (1, 255, 256, 300, 383, 384, len(ids) - 1):  # token p, scored in the window starting at 128 k
        start = 0 if p < 256 else 128 * ((p - 256) // 128 + 1)
        want = score(model, ids[start:p + 1], 1)["token_logprobs"][-1]
        assert result["token_logprobs"][p - 1] == pytest.approx(want, abs=1e-4), p
    assert score_windows(model, ids[:200], 3, 256) == score(model, ids[:200], 3) | {"windows": 1}


def test_texts_from_stdin_and_files(tmp_path):
    story = tmp_path / "story.txt"
    story.write_text("It is a truth universally acknowledged")
    run = subprocess.run([sys.executable, "-m", "grok1", "score", "-", "--file", str(story), "--json"],
                         input=b"The lady said", capture_output=True, check=False)
    rows = [json.loads(line) for line in run.stdout.decode().splitlines()]
    assert run.returncode == 0 and [r["text"] for r in rows] == ["The lady said", story.read_text()]
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok \xff")
    run = subprocess.run([sys.executable, "-m", "grok1", "score", "--file", str(bad)], capture_output=True,
                         text=True, check=False)
    assert run.returncode == 2 and f"{bad} is not UTF-8 text: byte 0xff at byte offset 3" in run.stderr


def test_generate_output_a_user_can_read_and_pipe(tmp_path, capsys, monkeypatch):
    """Several prompts are separated, --stream shows the prompt too, a summary with tokens/s goes to stderr,
    a large checkpoint says it is loading, prompts come from stdin or files."""
    from grok1.cli import common

    prompts = ["It was", "The lady said"]
    assert main(["generate", *prompts, "--temperature", "0", "--max-new-tokens", "12"]) == 0
    out, err = capsys.readouterr()
    parts = out.split("\n---\n")
    assert len(parts) == 2 and parts[0].startswith("It was") and parts[1].startswith("The lady said")
    assert "grok1 generate: " in err and "tokens/s" in err and "2 prompts" in err
    assert main(["generate", prompts[0], "--temperature", "0", "--max-new-tokens", "12", "--stream", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert out == parts[0].rstrip("\n") + "\n" and err == ""  # the same text as plain mode, prompt first
    monkeypatch.setattr(common, "LOUD_LOAD_BYTES", 0)
    assert main(["generate", prompts[0], "--max-new-tokens", "2", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "loading" in err and "MB of weights" not in err and "loaded in" in err
    story = tmp_path / "prompt.txt"
    story.write_text("It was")
    run = subprocess.run([sys.executable, "-m", "grok1", "generate", "-", "--file", str(story), "--temperature", "0",
                          "--max-new-tokens", "12", "--json"], input=b"The lady said", capture_output=True, check=False)
    rows = [json.loads(line) for line in run.stdout.decode().splitlines()]
    assert [r["prompt"] for r in rows] == ["The lady said", "It was"]
    assert rows[1]["prompt"] + rows[1]["text"] == parts[0].rstrip("\n")


def test_generate_refuses_more_new_tokens_than_the_context_holds(capsys):
    assert main(["generate", "It was", "--max-new-tokens", "100000"]) == 2
    err = capsys.readouterr().err
    assert "prompt 1 has 2 tokens; with --max-new-tokens 100000 that is 100002, beyond the model's context of 256 " \
           "tokens: use --max-new-tokens 254 or less" in err
    assert main(["generate", "It was", "--max-new-tokens", "254", "--ignore-eos", "--quiet", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["token_ids"]) == 254  # exactly the room there is


def test_a_closed_pipe_ends_generate_quietly():
    proc = subprocess.Popen([sys.executable, "-m", "grok1", "generate", "It was", "--stream", "--ignore-eos",
                             "--max-new-tokens", "250", "--temperature", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.read(6) == b"It was"  # then the reader goes away, as `| head -c 6` does
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and "Traceback" not in err and "Broken pipe" not in err, err
