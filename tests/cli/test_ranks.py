"""`torchrun ... -m grok1 generate|score --tp T --ep E` in real processes (gloo on 127.0.0.1, one thread per
rank, every process bounded in time): the same greedy ids as one process; two "nodes" through c10d
rendezvous; a rank killed mid-generation stops the others with an error naming it; ranks started with
different options refuse to run together."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parallel"))
from ranks import free_port, rank_env  # noqa: E402

DEMO = Path(__file__).resolve().parents[2] / "grok1" / "assets" / "grok-1-mini"
PROMPTS = ["It is a truth universally acknowledged", "Mr. Darcy"]
TIMEOUT = 240


@pytest.fixture
def golden_args(golden_dir, shared_dir):
    return ["--checkpoint", str(golden_dir / "tiny-ckpt"), "--config", str(golden_dir / "tiny-config.json"),
            "--tokenizer", str(shared_dir / "grok-1" / "tokenizer.model")]


def env() -> dict[str, str]:
    return os.environ | {"OMP_NUM_THREADS": "1"}


def generate_argv(model_args: list[str], n: int = 12) -> list[str]:
    return ["generate", *model_args, *PROMPTS, "--temperature", "0", "--max-new-tokens", str(n), "--json",
            "--ignore-eos"]


def single(argv: list[str]) -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "grok1", *argv], capture_output=True, text=True, env=env(),
                         timeout=TIMEOUT, check=True).stdout
    return [json.loads(line) for line in out.splitlines()]


def torchrun(nproc: int, argv: list[str], *extra: str) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(free_port()), *extra, "-m", "grok1", *argv]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines()]  # rank 0's lines only


@pytest.mark.parametrize("nproc,split", [(2, ["--tp", "2"]), (2, ["--ep", "2"]), (4, ["--tp", "2", "--ep", "2"])])
def test_torchrun_generate_golden_prints_the_single_process_ids(golden_args, nproc, split):
    argv = generate_argv(golden_args)
    want = single(argv)
    got = torchrun(nproc, argv + split)
    assert [r["token_ids"] for r in got] == [r["token_ids"] for r in want]
    assert [r["text"] for r in got] == [r["text"] for r in want]


def test_torchrun_score_demo_tp2():
    argv = ["score", "--checkpoint", str(DEMO), *PROMPTS, "--json"]
    want, got = single(argv), torchrun(2, argv + ["--tp", "2"])
    for g, w in zip(got, want):
        assert g["top_ids"] == w["top_ids"]
        assert abs(g["total_logprob"] - w["total_logprob"]) < 1e-4


def test_two_nodes_through_c10d_rendezvous():
    """Two torchrun invocations (--nnodes 2, one process each) meeting at a c10d rendezvous on 127.0.0.1."""
    argv = generate_argv(["--checkpoint", str(DEMO)]) + ["--tp", "2"]
    want = single(generate_argv(["--checkpoint", str(DEMO)]))
    port, run_id = free_port(), f"grok1-test-{os.getpid()}"
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node",
                               "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id",
                               run_id, "-m", "grok1", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env()) for _ in range(2)]
    try:
        outs = [p.communicate(timeout=TIMEOUT) for p in nodes]
    finally:
        for p in nodes:
            p.kill()
            p.wait()
    assert [p.returncode for p in nodes] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    printed = [json.loads(line) for out, _ in outs for line in out.splitlines()]  # only rank 0 prints
    assert [r["token_ids"] for r in printed] == [r["token_ids"] for r in want]


def launch(argvs: list[list[str]]) -> list[subprocess.Popen]:
    """One process per rank without torchrun's agent (nothing else would stop the survivors)."""
    port = free_port()
    return [subprocess.Popen([sys.executable, "-m", "grok1", *argv], env=rank_env(r, len(argvs), port),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for r, argv in enumerate(argvs)]


def test_a_rank_killed_mid_generation_stops_the_others_naming_it():
    argv = ["generate", "--checkpoint", str(DEMO), PROMPTS[0], "--temperature", "0", "--max-new-tokens", "200",
            "--ignore-eos", "--stream", "--tp", "2", "--heartbeat-timeout", "5"]
    procs = launch([argv, argv])
    try:
        assert procs[0].stdout.read(20)  # rank 0 is streaming its continuation
        procs[1].send_signal(signal.SIGKILL)
        start = time.monotonic()
        _, err = procs[0].communicate(timeout=60)
        waited = time.monotonic() - start
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert procs[0].returncode == 1
    assert "rank 1 stopped responding" in err, err[-2000:]
    assert waited < 60


def test_ranks_with_different_options_refuse_to_start():
    argv = ["generate", "--checkpoint", str(DEMO), PROMPTS[0], "--max-new-tokens", "2", "--tp", "2"]
    procs = launch([argv, argv + ["--dtype", "bfloat16"]])
    try:
        outs = [p.communicate(timeout=TIMEOUT) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert [p.returncode for p in procs] == [2, 2]
    assert "the ranks disagree on the model (config, checkpoint index, options): rank(s) 1 differ from rank 0" \
        in outs[0][1]


def wait_health(url: str, want: int, timeout: float = 120) -> dict:
    """Poll GET url/health until it answers HTTP `want` (bounded)."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == want:
                    return json.loads(r.read())
        except urllib.error.HTTPError as e:
            if e.code == want:
                return json.loads(e.read())
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url}/health never answered {want} within {timeout} s")


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=30)


def test_serve_under_torchrun_answers_the_openai_client_with_the_single_process_text():
    openai = pytest.importorskip("openai")
    prompt = PROMPTS[0]
    want = single(["generate", prompt, "--temperature", "0", "--max-new-tokens", "12", "--json", "--ignore-eos"])[0]
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "grok1", "serve", "--tp", "2", "--port", str(port)]
    server = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_health(url, 200)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=60, max_retries=0)
        out = client.completions.create(model="grok-1-mini", prompt=prompt, max_tokens=12, temperature=0)
        assert out.choices[0].text == want["text"]
        chunks = client.completions.create(model="grok-1-mini", prompt=prompt, max_tokens=12, temperature=0,
                                           stream=True)
        assert "".join(c.choices[0].text for c in chunks) == want["text"]
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=60)
        finally:
            stop([server])


def test_serve_answers_503_when_a_rank_dies():
    port = free_port()
    argv = ["serve", "--tp", "2", "--port", str(port), "--heartbeat-timeout", "3"]
    procs = launch([argv, argv])
    try:
        url = f"http://127.0.0.1:{port}"
        wait_health(url, 200)
        procs[1].send_signal(signal.SIGKILL)
        health = wait_health(url, 503, timeout=60)  # bounded: the watchdog's 3 s plus a step
        assert health["status"] != "ok"
        import urllib.error
        import urllib.request

        body = json.dumps({"model": "grok-1-mini", "prompt": "Hello", "max_tokens": 4}).encode()
        request = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request, timeout=30)
        assert e.value.code == 503
    finally:
        stop(procs)
