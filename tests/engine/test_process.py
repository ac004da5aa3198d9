"""EngineProcess: the Engine in a spawned child, as `grok1 serve` runs it (real processes, the bundled demo model)."""

import os
import signal
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

import pytest

from grok1.cli.common import tokenizer_from_args
from grok1.cli.main import build_parser
from grok1.cli.serve import engine_from_args
from grok1.engine.errors import EngineUnavailable, QueueFull
from grok1.engine.process import EngineProcess
from grok1.engine.sampling import SamplingParams

PROMPTS = ["It is a truth universally acknowledged", "Mr. Darcy", "The weather at Longbourn", "Elizabeth said"]


def serve_args(*extra: str):
    return build_parser().parse_args(["serve", "--threads", "1", "--max-batch", "4", "--max-seq-len", "128",
                                      "--max-queue", "4", *extra])


@pytest.fixture(scope="module")
def in_process():
    return engine_from_args(serve_args())


@pytest.fixture(scope="module")
def child():
    """The engine process as `grok1 serve` runs it: the parent decodes text (given the tokenizer)."""
    proc = EngineProcess(partial(engine_from_args, serve_args()), tokenizer_from_args(serve_args()))
    yield proc
    proc.shutdown()


@pytest.fixture(scope="module")
def child_decoding_there():
    """Without a tokenizer in the parent, the child decodes every request's text."""
    proc = EngineProcess(partial(engine_from_args, serve_args()))
    yield proc
    proc.shutdown()


class Collector:
    """on_output target: gathers one request's outputs; `done` is set at its finish."""

    def __init__(self) -> None:
        self.outputs, self.done = [], threading.Event()

    def __call__(self, out) -> None:
        self.outputs.append(out)
        if out.finish_reason is not None:
            self.done.set()

    @property
    def token_ids(self) -> list[int]:
        return [t for o in self.outputs for t in o.token_ids]

    @property
    def text(self) -> str:
        return "".join(o.text for o in self.outputs)


@pytest.mark.parametrize("which", ["child", "child_decoding_there"])
def test_child_gives_the_in_process_engines_greedy_tokens_and_text(in_process, which, request):
    """Same tokens, same text chunk by chunk, same finish, wherever the text is decoded; a request with stop
    strings (decoded in the child, which must see the text to stop) ends where the in-process engine's does."""
    child = request.getfixturevalue(which)
    tok = in_process.tokenizer
    prompts = [tok.encode(p) for p in PROMPTS]
    params = [SamplingParams(temperature=0, max_new_tokens=n) for n in (12, 30, 7, 12)]
    first = in_process.generate(prompts[:1], params[:1])[0].text
    params[3] = SamplingParams(temperature=0, max_new_tokens=40, stop=(first[len(first) // 2 :][:3],))
    prompts[3] = prompts[0]
    expected = [list(in_process.stream(ids, sp)) for ids, sp in zip(prompts, params)]
    collectors = [Collector() for _ in prompts]
    for ids, sp, c in zip(prompts, params, collectors):  # all at once: they share the child's batch
        child.add_request(ids, sp, on_output=c)
    for c, want in zip(collectors, expected):
        assert c.done.wait(60), "no finish from the engine process"
        assert [(o.token_ids, o.text, o.finish_reason) for o in c.outputs] == \
               [(o.token_ids, o.text, o.finish_reason) for o in want]
    assert collectors[3].outputs[-1].finish_reason == "stop"
    assert child.stats()["running"] == 0 and child.stats()["generated_tokens"] >= 12 + 30 + 7


def test_bad_requests_fail_in_the_parent_with_the_engines_errors(child):
    sp = SamplingParams(max_new_tokens=4)
    with pytest.raises(ValueError, match="empty"):
        child.add_request([], sp)
    with pytest.raises(ValueError, match="context holds 128"):
        child.add_request([5] * 128, sp)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        child.add_request([5, 99999], sp)
    assert child.alive()


def test_queue_limit_and_cancel_free_the_slots(child):
    """4 slots + 4 waiting fill it; the ninth is refused; cancelling every request empties the engine."""
    long = SamplingParams(max_new_tokens=120, ignore_eos=True)
    collectors = [Collector() for _ in range(8)]
    reqs = [child.add_request([5, 6, 7], long, on_output=c) for c in collectors]
    with pytest.raises(QueueFull):
        child.add_request([5, 6, 7], long)
    for r in reqs:
        child.cancel(r.id)
    for c in collectors:
        assert c.done.wait(60)
        assert c.outputs[-1].finish_reason in ("cancelled", "length")
    assert any(c.outputs[-1].finish_reason == "cancelled" for c in collectors)
    stats = child.stats()
    assert stats["running"] == 0 and stats["waiting"] == 0 and stats["free_slots"] == 4


def test_shutdown_cancels_what_runs_and_stops_the_child():
    proc = EngineProcess(partial(engine_from_args, serve_args()))
    c = Collector()
    proc.add_request([5, 6, 7], SamplingParams(max_new_tokens=120, ignore_eos=True), on_output=c)
    proc.shutdown()
    assert c.done.wait(10) and c.outputs[-1].finish_reason == "cancelled"
    assert not proc.alive() and not proc.proc.is_alive()
    with pytest.raises(RuntimeError, match="shutting down"):
        proc.add_request([5], SamplingParams())


def test_a_dead_child_fails_its_requests_instead_of_hanging():
    proc = EngineProcess(partial(engine_from_args, serve_args()))
    c = Collector()
    proc.add_request([5, 6, 7], SamplingParams(max_new_tokens=120, ignore_eos=True), on_output=c)
    os.kill(proc.proc.pid, signal.SIGKILL)
    assert c.done.wait(30) and c.outputs[-1].finish_reason == "error"
    proc.reader.join(30)
    assert not proc.alive()
    with pytest.raises(RuntimeError, match="engine process is not running"):
        proc.add_request([5], SamplingParams())
    proc.shutdown()


def test_a_bad_checkpoint_is_a_clean_error_from_the_child(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError):
        EngineProcess(partial(engine_from_args, serve_args("--checkpoint", str(tmp_path))))


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux CPU affinity and at least 2 CPUs")
def test_engine_process_runs_on_the_cpus_it_is_given():
    """`grok1 serve` pins the engine to its own CPUs; the child (and its threads) stay there and still serve."""
    cpu = max(os.sched_getaffinity(0))
    proc = EngineProcess(partial(engine_from_args, serve_args()), cpus={cpu})
    try:
        assert os.sched_getaffinity(proc.proc.pid) == {cpu}
        for tid in os.listdir(f"/proc/{proc.proc.pid}/task"):
            assert os.sched_getaffinity(int(tid)) == {cpu}
        c = Collector()
        proc.add_request([5, 6, 7], SamplingParams(temperature=0, max_new_tokens=3), on_output=c)
        assert c.done.wait(60) and len(c.token_ids) == 3
    finally:
        proc.shutdown()


def test_serve_pins_the_engine_only_when_cpus_are_left_for_http():
    from grok1.cli.serve import engine_cpus
    from grok1.config import from_name

    cfg = from_name("grok-1-mini")  # small: 1 thread by default
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    expected = {cpus[-1]} if len(cpus) > 1 else None
    assert engine_cpus(serve_args(), cfg) == expected
    assert engine_cpus(serve_args("--no-pin"), cfg) is None
    assert engine_cpus(serve_args("--engine-thread"), cfg) is None
    assert engine_cpus(serve_args("--threads", str(max(1, len(cpus)))), cfg) is None  # nothing left for HTTP


def wait_until(predicate, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_a_stopped_engine_process_fails_its_requests_and_recovers():
    """SIGSTOP: the heartbeat stops, the parent calls it stalled within its timeout, fails what was running
    ("unavailable", the server's 503) and refuses new work; after SIGCONT it serves again."""
    proc = EngineProcess(partial(engine_from_args, serve_args()), tokenizer_from_args(serve_args()),
                         heartbeat_timeout=2.0)
    try:
        running = Collector()
        proc.add_request([1, 2, 3], SamplingParams(temperature=0, max_new_tokens=120, ignore_eos=True),
                         on_output=running)
        wait_until(lambda: running.outputs, what="the first token")
        os.kill(proc.proc.pid, signal.SIGSTOP)
        try:
            assert running.done.wait(60), "the request never failed"
            assert running.outputs[-1].finish_reason == "unavailable" and proc.stalled()
            with pytest.raises(EngineUnavailable, match="has not answered"):
                proc.add_request([1, 2], SamplingParams(max_new_tokens=2))
        finally:
            os.kill(proc.proc.pid, signal.SIGCONT)
        wait_until(lambda: not proc.stalled(), what="the heartbeat to come back")
        again = Collector()
        proc.add_request([1, 2, 3], SamplingParams(temperature=0, max_new_tokens=3), on_output=again)
        assert again.done.wait(60) and again.outputs[-1].finish_reason == "length"
    finally:
        proc.shutdown()


PARENT = """
import sys, time
from functools import partial
from grok1.engine.process import EngineProcess
EngineProcess(partial(time.sleep, 3600))  # a child that 'loads the model' for an hour
"""


def test_the_engine_process_dies_with_its_parent():
    parent = subprocess.Popen([sys.executable, "-c", PARENT])
    try:
        def engine_pids():  # (not multiprocessing's resource tracker, also a child)
            tasks = Path(f"/proc/{parent.pid}/task")
            pids = [int(p) for t in tasks.iterdir() for p in (t / "children").read_text().split()] \
                if tasks.exists() else []
            return [p for p in pids if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]

        wait_until(engine_pids, what="the engine process to start")
        child = engine_pids()[0]
        time.sleep(1.0)  # well into its start-up
        parent.kill()  # SIGKILL: the parent can clean nothing up
        parent.wait(30)

        def gone():
            try:
                return Path(f"/proc/{child}/stat").read_text().split(") ")[1][0] in "ZX"
            except OSError:
                return True

        wait_until(gone, timeout=30, what=f"the orphaned engine process {child} to exit")
    finally:
        parent.kill() if parent.poll() is None else None
