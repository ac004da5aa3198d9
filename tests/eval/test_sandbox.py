"""The sandbox stops what model-written code must not do. Each program announces success on stdout only
if the harmful action worked; the run must end (not hang) with that marker absent."""

import os
import uuid
from pathlib import Path

from grok1.eval.sandbox import Limits, isolation, run_python

FAST = Limits(timeout_s=5, memory_mb=512, file_mb=1, processes=16)


def test_plain_program_runs_and_fails_normally():
    assert run_python("print(6 * 7)", FAST).output.strip() == "42"
    assert run_python("assert 1 == 2", FAST).status == "failed"


def test_infinite_loop_is_killed_at_the_timeout():
    r = run_python("while True:\n    pass\nprint('ESCAPED')", Limits(timeout_s=2))
    assert r.status == "timeout" and "ESCAPED" not in r.output


def test_children_do_not_outlive_the_run(tmp_path):
    # A child that detaches (new session) and sleeps past the timeout: it must be dead after the run.
    code = ("import os, subprocess, sys, time\n"
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True)\n"
            "print('CHILD', p.pid, flush=True)\n"
            "time.sleep(60)\n")
    r = run_python(code, Limits(timeout_s=3))
    assert r.status == "timeout"
    if isolation() == "namespaces":  # the child's pid is only meaningful inside its PID namespace
        assert "CHILD" in r.output
    else:  # audit hook: the child was never started
        assert "CHILD" not in r.output


def test_fork_bomb_is_stopped():
    code = ("import os\n"
            "pids = []\n"
            "for _ in range(500):\n"
            "    pid = os.fork()\n"
            "    if pid == 0:\n"
            "        import time; time.sleep(30); os._exit(0)\n"
            "    pids.append(pid)\n"
            "print('ESCAPED', len(pids))\n")
    r = run_python(code, FAST)
    assert r.status == "failed" and "ESCAPED" not in r.output
    assert ("Resource temporarily unavailable" in r.output) or ("not allowed" in r.output)


def test_memory_bomb_is_stopped():
    r = run_python("x = bytearray(8 << 30)\nprint('ESCAPED')", FAST)
    assert r.status == "failed" and "MemoryError" in r.output and "ESCAPED" not in r.output


def test_no_network():
    code = ("import socket\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n"
            "s.settimeout(2)\n"
            "s.connect(('1.1.1.1', 80))\n"
            "print('ESCAPED')\n")
    r = run_python(code, FAST)
    assert r.status == "failed" and "ESCAPED" not in r.output


def test_writes_outside_the_sandbox_do_not_land(tmp_path):
    inside_tmp = Path("/tmp") / f"grok1-sandbox-escape-{uuid.uuid4().hex}"
    outside = tmp_path / "escape.txt"
    os.chmod(tmp_path, 0o755)  # readable, but writable only by its owner
    for target in (outside, inside_tmp):
        r = run_python(f"open({str(target)!r}, 'w').write('x')\nprint('WROTE')", FAST)
        assert not target.exists(), (target, r)
    r = run_python("open('scratch.txt', 'w').write('ok')\nprint(open('scratch.txt').read())", FAST)
    assert r.output.strip() == "ok"  # its own working directory is writable


def test_file_size_is_limited():
    r = run_python("open('big', 'wb').write(b'x' * (4 << 20))\nprint('ESCAPED')", FAST)
    assert r.status == "failed" and "ESCAPED" not in r.output
