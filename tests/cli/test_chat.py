"""`grok1 chat` and `grok1 serve` as a user runs them: real subprocesses, real stdin, real signals."""

import json
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from grok1.tokenizer import CHAT_STOP, chat_prompt


@pytest.fixture
def model_args(golden_dir, shared_dir):
    return ["--checkpoint", str(golden_dir / "tiny-ckpt"), "--config", str(golden_dir / "tiny-config.json"),
            "--tokenizer", str(shared_dir / "grok-1" / "tokenizer.model")]


class Reader:
    """Collect a process's stdout on a thread so the test can wait for text without blocking."""

    def __init__(self, proc):
        self.text = ""
        self.thread = threading.Thread(target=self._read, args=(proc.stdout,), daemon=True)
        self.thread.start()

    def _read(self, stream):
        for chunk in iter(lambda: stream.read1(256), b""):
            self.text += chunk.decode("utf-8", "replace")

    def wait_for(self, predicate, timeout=120.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.text):
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out; output so far:\n{self.text[-2000:]}")


def test_chat_template():
    text = chat_prompt([{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}])
    assert text == "System: Be brief.\n\nUser: Hi\n\nAssistant: Hello!\n\nUser: 2+2?\n\nAssistant:"
    assert all(stop in "\n\n" + text for stop in CHAT_STOP)  # each turn starts with a stop sequence
    with pytest.raises(ValueError, match="role 'robot'"):
        chat_prompt([{"role": "robot", "content": "beep"}])


def test_commands_history_and_save(model_args, tmp_path):
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    script = f"Hello\n/system Be brief.\n/save {first}\n/reset\n/save {second}\n/nonsense\n"
    run = subprocess.run([sys.executable, "-m", "grok1", "chat", *model_args, "--temperature", "0",
                          "--max-tokens", "6", "--max-seq-len", "128"], input=script, capture_output=True,
                         text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    saved = json.loads(first.read_text())["messages"]
    assert [m["role"] for m in saved] == ["system", "user", "assistant"]
    assert saved[0]["content"] == "Be brief." and saved[1]["content"] == "Hello" and saved[2]["content"]
    assert saved[2]["content"] in run.stdout  # the answer was streamed to the terminal
    assert json.loads(second.read_text())["messages"] == [{"role": "system", "content": "Be brief."}]
    assert "commands: /reset" in run.stdout  # unknown commands print the help


def test_ctrl_c_stops_the_answer_and_ctrl_d_exits(model_args, tmp_path):
    saved = tmp_path / "chat.json"
    proc = subprocess.Popen([sys.executable, "-m", "grok1", "chat", *model_args, "--temperature", "0",
                             "--max-tokens", "3000", "--max-seq-len", "4096"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out = Reader(proc)
        proc.stdin.write(b"Tell me a very long story.\n")
        proc.stdin.flush()
        out.wait_for(lambda t: len(t.partition("grok> ")[2]) > 20)  # the answer is streaming
        proc.send_signal(signal.SIGINT)
        out.wait_for(lambda t: "[stopped]" in t and t.endswith("you> "))
        proc.stdin.write(f"/save {saved}\n".encode())
        proc.stdin.close()  # Ctrl-D
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill() if proc.poll() is None else None
    messages = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"] and messages[1]["content"]


def stream_in_background(url, body, events):
    """POST a streaming completion on a thread, appending its `data:` lines to events; returns the thread."""
    def stream():
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            events.extend(line for line in r.iter_lines() if line.startswith("data: "))

    reader = threading.Thread(target=stream)
    reader.start()
    return reader


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_then_chat_over_http_and_graceful_shutdown(model_args):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "grok1", "serve", *model_args, "--port", str(port),
                               "--max-seq-len", "256", "--max-batch", "4", "--persona", "grok",
                               "--shutdown-timeout", "120"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        logs = Reader(server)
        logs.wait_for(lambda t: "Uvicorn running" in t or server.poll() is not None)
        assert httpx.get(url + "/health").json()["status"] == "ok"
        chat = subprocess.run([sys.executable, "-m", "grok1", "chat", *model_args, "--url", url,
                               "--temperature", "0", "--max-tokens", "5"], input="Hi\n", capture_output=True,
                              text=True, timeout=120, check=False)
        assert chat.returncode == 0 and "grok> " in chat.stdout, chat.stdout + chat.stderr

        events = []
        body = {"model": "tiny-ckpt", "prompt": "Count:", "max_tokens": 60, "stream": True, "ignore_eos": True}

        reader = stream_in_background(url, body, events)
        deadline = time.monotonic() + 60
        while httpx.get(url + "/health").json()["running"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        server.send_signal(signal.SIGINT)  # Ctrl-C: the running stream finishes, then the server exits
        reader.join(timeout=120)
        assert server.wait(timeout=120) == 0, logs.text[-3000:]
    finally:
        server.kill() if server.poll() is None else None
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"
    assert "Application shutdown complete" in logs.text


def test_shutdown_timeout_cancels_streams_that_run_on(model_args):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "grok1", "serve", *model_args, "--port", str(port),
                               "--max-seq-len", "2048", "--max-batch", "2", "--shutdown-timeout", "1"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    events = []
    try:
        logs = Reader(server)
        logs.wait_for(lambda t: "Uvicorn running" in t or server.poll() is not None)
        body = {"model": "tiny-ckpt", "prompt": "Go on forever:", "max_tokens": 2000, "stream": True,
                "ignore_eos": True}

        reader = stream_in_background(url, body, events)
        deadline = time.monotonic() + 60
        while len(events) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=120) == 0, logs.text[-3000:]  # did not wait for 2000 tokens
        reader.join(timeout=60)
    finally:
        server.kill() if server.poll() is None else None
    assert events[-1] == "data: [DONE]" and "shutting down" in events[-2], events[-3:]  # ended, not cut off
    assert len(events) < 1000 and "Traceback" not in logs.text, logs.text[-3000:]
    assert "Application shutdown complete" in logs.text
