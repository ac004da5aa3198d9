"""`grok1 chat` and `grok1 serve` as a user runs them: real subprocesses, real stdin, real signals."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

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


def fake_reply(context_words):
    """A stand-in model whose context holds `context_words` words of prompt plus answer: it answers 'ok N' (N =
    messages it saw), refuses like the engine when the conversation does not fit, and fails on 'boom'."""
    from grok1.cli.chat import ContextFull

    def reply(messages, settings):
        words = sum(len(m["content"].split()) for m in messages)
        if words + settings["max_tokens"] > context_words:
            raise ContextFull(f"{words} words do not fit")
        if messages[-1]["content"] == "boom":
            raise ValueError("the server went away")
        return iter(["", "ok", f" {len(messages)}"])

    return reply


def run_loop(monkeypatch, capsys, lines, reply, max_tokens=2, system=None):
    import io

    from grok1.cli.chat import chat_loop

    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line + "\n" for line in lines)))
    assert chat_loop(reply, {"max_tokens": max_tokens}, system) == 0
    return capsys.readouterr().out


def test_full_context_drops_the_oldest_turns_and_failures_leave_no_trace(monkeypatch, capsys, tmp_path):
    saved = tmp_path / "chat.json"
    lines = ["one two three", "four five six", "boom", "seven eight nine", "a b c d e f g h i j k l m n",
             f"/save {saved}", f"/save {tmp_path / 'no' / 'such' / 'dir.json'}", "after the bad path"]
    out = run_loop(monkeypatch, capsys, lines, fake_reply(context_words=12))
    # turn 1 sees 1 message; turn 2: 3; "boom" fails and leaves nothing; turn 3 needs room: the oldest turn goes.
    assert out.count("grok> ok") == 4 and "grok> ok 1" in out and "grok> ok 3" in out
    assert "[error: the server went away]" in out
    assert "dropped the oldest turn" in out
    # 14 words never fit beside a 2-token answer in 12: refused, and not kept.
    assert "[error: 14 words do not fit]" in out
    assert "could not save to" in out and "No such file or directory" in out  # a bad path is one line
    messages = json.loads(saved.read_text())["messages"]
    assert [m["content"] for m in messages] == ["one two three", "ok 1", "four five six", "ok 3",
                                                "seven eight nine", "ok 3"]
    assert out.endswith("grok> ok 3\nyou> \n")  # the chat went on after the bad path, and the failed turns


def test_empty_answers_are_not_kept(monkeypatch, capsys, tmp_path):
    saved = tmp_path / "chat.json"
    out = run_loop(monkeypatch, capsys, ["Hi", f"/save {saved}"], lambda m, s: iter(["", " "]))
    assert "(no answer) (not kept" in out
    assert json.loads(saved.read_text())["messages"] == []


def test_default_answer_length_leaves_room():
    from grok1.cli.chat import answer_tokens

    assert answer_tokens(None, 256) == 64 and answer_tokens(None, 8192) == 512 and answer_tokens(100, 256) == 100
    with pytest.raises(ValueError, match="--max-tokens 300 leaves no room .* 256-token context"):
        answer_tokens(300, 256)


def test_non_utf8_input_is_refused_with_its_offset(model_args):
    run = subprocess.run([sys.executable, "-m", "grok1", "chat", *model_args, "--temperature", "0",
                          "--max-tokens", "4", "--max-seq-len", "128"], input=b"caf\xe9 au lait\nHi\n",
                         capture_output=True, timeout=300, check=False)
    out = run.stdout.decode()
    assert run.returncode == 0 and "Traceback" not in run.stderr.decode(), run.stderr.decode()
    assert "not valid UTF-8: byte 0xe9 at offset 3" in out and out.count("grok> ") == 1


def test_ten_turns_in_a_terminal_with_line_editing_and_history(tmp_path):
    """A user at a real terminal (a pseudo-terminal): ten turns with the bundled demo model (256-token context,
    so old turns must be dropped), arrow keys edit the line, the up arrow recalls the previous one."""
    import os
    import pty
    import select

    from torch.utils.cpp_extension import _get_build_directory

    from grok1 import kernels

    saved = tmp_path / "chat.json"
    built = str(Path(_get_build_directory(f"grok1_kernels_{kernels._build_tag()}", verbose=False)).parent)
    pid, fd = pty.fork()
    if pid == 0:  # the child: `grok1 chat` on the terminal
        os.environ["HOME"] = str(tmp_path)  # the input history file goes here
        os.environ["TORCH_EXTENSIONS_DIR"] = built  # (the compiled kernels stay where they are)
        os.execv(sys.executable, [sys.executable, "-m", "grok1", "chat", "--temperature", "0", "--seed", "0"])
    text = b""

    def wait_for(done, timeout=120.0):
        nonlocal text
        deadline = time.monotonic() + timeout
        while not done(text):
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"timed out; terminal so far:\n{text[-3000:].decode()}")
            try:
                text += os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                raise AssertionError(f"chat exited; terminal:\n{text[-3000:].decode()}") from None

    def ask(keys):
        prompts = text.count(b"you> ")
        os.write(fd, keys)
        wait_for(lambda t: t.count(b"you> ") > prompts and t.endswith(b"you> "))

    try:
        wait_for(lambda t: t.endswith(b"you> "))
        questions = ["Who is Mr Darcy?", "And Elizabeth?", "Where do they live?", "Is he rich?", "Tell me more.",
                     "What happens at the ball?", "Who is Jane?", "Does she marry?", "What about Lydia?"]
        for q in questions:
            ask(q.encode() + b"\r")
        # Turn ten, typed with a mistake and fixed with the arrow keys: "Thank yu" <- "o" -> "!".
        ask(b"Thank yu\x1b[Do\x1b[C!\r")
        # The up arrow recalls the last line; Ctrl-U clears it again; then save.
        os.write(fd, b"\x1b[A")
        wait_for(lambda t: t.rstrip().endswith(b"Thank you!"))
        ask(b"\x15" + f"/save {saved}\r".encode())
        os.write(fd, b"\x04")  # Ctrl-D
        _, status = os.waitpid(pid, 0)
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.close(fd)
    screen = text.decode("utf-8", "replace")
    assert os.waitstatus_to_exitcode(status) == 0, screen[-3000:]
    assert "[error" not in screen and "Traceback" not in screen and "^[[" not in screen, screen[-3000:]
    assert screen.count("grok> ") == 10
    users = [m["content"] for m in json.loads(saved.read_text())["messages"] if m["role"] == "user"]
    assert users == questions + ["Thank you!"]
    assert "dropped the oldest turn" in screen  # ten turns do not fit in 256 tokens
    history = (tmp_path / ".grok1_history").read_text()
    assert "Thank you!" in history and f"/save {saved}" in history


def engine_child(pid):
    """The pid of `grok1 serve`'s engine process (its multiprocessing child that is not the resource tracker)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                return int(child)
    return None


def test_serve_exits_non_zero_when_its_engine_process_dies(model_args):
    """After the engine dies the server cannot answer anything but 503: it exits (status 3) so a supervisor
    restarts it, failing the running stream with an error event first."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "grok1", "serve", *model_args, "--port", str(port),
                               "--max-seq-len", "2048", "--max-batch", "2"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
    events = []
    try:
        logs = Reader(server)
        logs.wait_for(lambda t: "Uvicorn running" in t or server.poll() is not None)
        child = engine_child(server.pid)
        assert child is not None, logs.text[-2000:]
        body = {"model": "tiny-ckpt", "prompt": "Go on forever:", "max_tokens": 2000, "stream": True,
                "ignore_eos": True}
        reader = stream_in_background(url, body, events)
        deadline = time.monotonic() + 60
        while len(events) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(child, signal.SIGKILL)
        assert server.wait(timeout=120) == 3, logs.text[-3000:]
        reader.join(timeout=60)
    finally:
        server.kill() if server.poll() is None else None
    assert "the engine process died (exit code -9)" in logs.text, logs.text[-3000:]
    assert events[-1] == "data: [DONE]" and '"error"' in events[-2], events[-3:]
