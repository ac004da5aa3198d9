"""The Engine in a child process, for servers.

In one process, the server's Python (HTTP parsing, JSON, server-sent events: per token, per client)
and the engine's Python (the glue between model ops) take turns on one interpreter lock, so every
streamed token slows the model step. `EngineProcess` runs the Engine's step loop in a spawned child
and talks to it over two pipes; the parent keeps only what a server needs:

    the EngineClient interface (grok1.engine.client), as `Engine` implements it in-thread.

Requests are checked in the parent, once (the child queues what it is sent); outputs come back once
per step in one message and reach each request's `on_output` on the parent's reader thread. The child
runs the same loop as the in-thread engine (`Engine.loop`), reading the pipe while it waits.

The child builds its own Engine by calling `build()` (a picklable zero-argument callable), so the
weights are loaded once, in the process that uses them. Given the `tokenizer`, the parent turns token
ids into text itself (the model's process is the busy one), except for requests with stop strings,
whose text the child needs to see.

Liveness: the child sends a heartbeat every second from a thread of its own (a long model step does not
stop it; a stopped or frozen process does). After `heartbeat_timeout` seconds without any message the
parent calls the engine stalled (`stalled()`): it fails the pending requests with finish reason
"unavailable", refuses new ones, and recovers if the child answers again. A child that exits on its own
calls `on_death(exit code)` (the server then exits non-zero, so a supervisor restarts it). The child
watches its parent and exits when it is gone, also while it is still loading the model.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import multiprocessing as mp
import operator
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection

from grok1.engine.client import EngineClient, check_request, check_room
from grok1.engine.engine import Engine
from grok1.engine.errors import EngineUnavailable, InvalidRequest, ShuttingDown
from grok1.engine.sampling import SamplingParams
from grok1.engine.scheduler import Output, Request
from grok1.tokenizer import TextStream, Tokenizer

log = logging.getLogger("grok1.engine")


@dataclass(eq=False)
class RemoteRequest:
    """The parent's handle on a request running in the child."""
    id: str
    prompt_ids: list[int]
    on_output: Callable[[Output], None] | None
    finish_reason: str | None = None
    stream: TextStream | None = None  # the parent decodes this request's text (the child sends ids only)

    def text_of(self, out: Output) -> Output:
        """The output with its text decoded here, as the Scheduler would have (see Scheduler.postprocess)."""
        if self.stream is None:
            return out
        text = "".join(self.stream.push(t) for t in out.token_ids)
        if out.finish_reason in ("eos", "length"):
            text += self.stream.finish()
        return dataclasses.replace(out, text=text)


# An Output crosses the pipe as the tuple of its fields: pickling 16 plain tuples per step costs a fraction of
# pickling 16 dataclass instances (each goes through __reduce_ex__), and this is on the model's process.
_output_fields = operator.attrgetter(*(f.name for f in dataclasses.fields(Output)))


class EngineProcess(EngineClient):
    def __init__(self, build: Callable[[], Engine], tokenizer: Tokenizer | None = None,
                 cpus: set[int] | None = None, start_timeout: float = 600.0, heartbeat_timeout: float = 15.0) -> None:
        """`cpus`: pin the child (and the threads it starts) to these CPUs (Linux). `heartbeat_timeout`: seconds
        of silence after which the child counts as stalled (module doc)."""
        self.tokenizer = tokenizer
        self.heartbeat_timeout = heartbeat_timeout
        ctx = mp.get_context("spawn")  # a clean interpreter: no inherited OpenMP or torch thread state
        child_in, self._to_child = ctx.Pipe(duplex=False)  # (receiving end, sending end)
        self._from_child, child_out = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=_child_main, args=(build, child_out, child_in, cpus, os.getpid()),
                                name="grok1-engine", daemon=True)
        self.proc.start()
        child_in.close()
        child_out.close()
        if not self._from_child.poll(start_timeout):
            self.proc.kill()
            raise RuntimeError(f"the engine process did not start within {start_timeout:.0f} s")
        try:
            kind, info = self._from_child.recv()
        except EOFError:
            raise RuntimeError(f"the engine process exited during start-up (exit code {self.proc.exitcode})") from None
        if kind == "error":
            self.proc.join()
            raise ValueError(info)
        self.max_seq_len: int = info["max_seq_len"]
        self.vocab_size: int = info["vocab_size"]
        self.max_batch: int = info["max_batch"]
        self.max_queue: int = info["max_queue"]
        self.child_decodes: bool = info["has_tokenizer"]  # the child can decode text (stop strings need it)
        self._stats: dict = info["stats"]
        self.on_step: Callable[[int, float], None] | None = None
        self.on_death: Callable[[int | None], None] | None = None  # the child exited on its own (exit code)
        self.last_heard = time.monotonic()
        self._stall_reported = False
        self.lock = threading.Lock()  # guards requests, the send pipe and the flags
        self.requests: dict[str, RemoteRequest] = {}
        self._ids = itertools.count()
        self.stopping = False
        self.reader = threading.Thread(target=self._read, name="grok1-engine-reader", daemon=True)
        self.reader.start()

    # ---- the EngineClient interface (any thread) ----

    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams, request_id: str | None = None,
                    logprobs: int | None = None, on_output: Callable[[Output], None] | None = None,
                    prompt_logprobs: int | None = None) -> RemoteRequest:
        check_request(prompt_ids, params, self.vocab_size, self.max_seq_len, self.child_decodes)
        with self.lock:
            if self.stopping:
                raise ShuttingDown("the engine is shutting down")
            if not self.alive():
                raise EngineUnavailable(f"the engine process is not running (exit code {self.proc.exitcode}); "
                                   "see the server log")
            if self.stalled():
                raise EngineUnavailable(f"the engine process has not answered for {self.silence():.0f} s (stopped "
                                        "or hung); see the server log")
            request_id = request_id if request_id is not None else f"r{next(self._ids)}"
            if request_id in self.requests:
                raise InvalidRequest(f"request id {request_id!r} is already in use")
            check_room(len(self.requests) - self.max_batch, self.max_queue)
            req = RemoteRequest(request_id, list(prompt_ids), on_output)
            if self.tokenizer is not None and not params.stop:
                req.stream = TextStream(self.tokenizer, (), req.prompt_ids)
            self.requests[request_id] = req
            self._to_child.send(("add", request_id, req.prompt_ids, params, logprobs, req.stream is None,
                                prompt_logprobs))
        return req

    def cancel(self, request_id: str) -> None:
        with self.lock:
            if request_id in self.requests and self.alive():
                self._to_child.send(("cancel", request_id))

    def cancel_all(self) -> None:
        with self.lock:
            if self.alive():
                self._to_child.send(("cancel_all",))

    def stats(self) -> dict:
        return dict(self._stats)

    def alive(self) -> bool:
        return self.proc.is_alive() and self.reader.is_alive()

    def silence(self) -> float:
        """Seconds since the child's last message (outputs or heartbeat)."""
        return time.monotonic() - self.last_heard

    def stalled(self) -> bool:
        """The child is running but has sent nothing, not even its heartbeat, for `heartbeat_timeout` s."""
        return self.silence() > self.heartbeat_timeout

    def start(self) -> None:
        """The child runs from construction on; nothing to do (for Engine compatibility)."""

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the child; requests still queued or running finish as "cancelled"."""
        with self.lock:
            self.stopping = True
            if self.proc.is_alive():
                try:
                    self._to_child.send(("stop",))
                except OSError:
                    pass
        self.reader.join(timeout)
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self._fail_all("cancelled")

    # ---- outputs (the reader thread) ----

    def _read(self) -> None:
        while True:
            try:
                if not self._from_child.poll(1.0):
                    self._watch()
                    continue
                kind, payload = self._from_child.recv()
            except (EOFError, OSError):
                break
            self.last_heard = time.monotonic()
            if kind == "beat":
                self._watch()
                continue
            if kind == "stopped":
                break
            outputs, stats, step = payload
            self._stats = stats
            if step is not None and self.on_step is not None:
                self.on_step(*step)
            for fields in outputs:
                out = Output(*fields)
                with self.lock:
                    req = self.requests.get(out.request_id)
                    if req is not None and out.finish_reason is not None:
                        req.finish_reason = out.finish_reason
                        del self.requests[out.request_id]
                if req is not None and req.on_output is not None:
                    req.on_output(req.text_of(out))
        died = not self.stopping
        if died:
            self.proc.join(5)
            log.error("the engine process exited (exit code %s); failing its requests", self.proc.exitcode)
        self._fail_all("error" if died else "cancelled")
        if died and self.on_death is not None:
            self.on_death(self.proc.exitcode)

    def _watch(self) -> None:
        """On the reader thread, at least once a second: notice the child going silent, and coming back."""
        if self.stalled() and not self._stall_reported and not self.stopping:
            self._stall_reported = True
            log.error("the engine process (pid %s) has not answered for %.0f s (stopped or hung); failing its "
                      "requests and refusing new ones until it answers", self.proc.pid, self.silence())
            with self.lock:
                try:
                    self._to_child.send(("cancel_all",))  # done if it ever wakes up
                except OSError:
                    pass
            self._fail_all("unavailable")
        elif self._stall_reported and not self.stalled():
            self._stall_reported = False
            log.warning("the engine process answers again")

    def _fail_all(self, reason: str) -> None:
        with self.lock:
            gone, self.requests = list(self.requests.values()), {}
        for req in gone:
            req.finish_reason = reason
            if req.on_output is not None:
                req.on_output(Output(req.id, [], "", [], reason, len(req.prompt_ids), 0))


def pin_process(cpus: set[int]) -> None:
    """Run every thread of this process on `cpus` (Linux); threads started later inherit it from their creator.
    Every thread, because some start early (while torch is imported, or an EngineProcess's reader)."""
    tasks = os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else ["0"]
    for tid in tasks:
        try:
            os.sched_setaffinity(int(tid), cpus)
        except ProcessLookupError:  # the thread has ended meanwhile
            pass


def _watch_parent(parent: int) -> None:
    """Exit this process (at once, even mid-load) when `parent` is gone: a child must not outlive its server."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="grok1-parent-watch", daemon=True).start()


def _heartbeat(send: Callable[[bytes], None], seconds: float = 1.0) -> None:
    """Tell the parent this process is alive every `seconds`, from a thread of its own (module doc)."""
    beat = pickle.dumps(("beat", None), pickle.HIGHEST_PROTOCOL)

    def run() -> None:
        while True:
            time.sleep(seconds)
            try:
                send(beat)
            except OSError:  # the parent is gone
                return

    threading.Thread(target=run, name="grok1-heartbeat", daemon=True).start()


def _child_main(build: Callable[[], Engine], out: Connection, inbox: Connection, cpus: set[int] | None,
                parent: int) -> None:
    """The child: build the Engine, then run its loop, reading the parent's messages while it waits."""
    _watch_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent decides
    if cpus:
        pin_process(cpus)
    try:
        engine = build()
    except Exception as e:  # noqa: BLE001  a bad checkpoint etc.: the parent raises it as a clean error
        out.send(("error", str(e) or type(e).__name__))
        return
    outputs: list[Output] = []
    steps: list[tuple[int, float]] = []
    engine.on_step = lambda batch_size, seconds: steps.append((batch_size, seconds))
    out.send(("ready", {"max_seq_len": engine.max_seq_len, "vocab_size": engine.model.config.vocab_size,
                        "max_batch": engine.config.max_batch, "max_queue": engine.config.max_queue,
                        "has_tokenizer": engine.tokenizer is not None, "stats": engine.stats()}))
    sending = threading.Lock()  # the heartbeat thread shares the pipe

    def send(data: bytes) -> None:
        with sending:
            out.send_bytes(data)

    _heartbeat(send)

    def receive(timeout: float) -> None:
        """Apply the parent's messages, waiting up to `timeout` for the first."""
        while inbox.poll(timeout):
            timeout = 0
            try:
                msg = inbox.recv()
            except EOFError:  # the parent is gone
                msg = ("stop",)
            if msg[0] == "add":  # the parent checked it and enforces the queue limit
                _, request_id, prompt_ids, params, logprobs, detokenize, prompt_logprobs = msg
                engine.submit(Request(prompt_ids, params, request_id, logprobs, outputs.append, detokenize,
                                      prompt_logprobs))
            elif msg[0] == "cancel":
                engine.cancel(msg[1])
            elif msg[0] == "cancel_all":
                engine.cancel_all()
            elif msg[0] == "stop":
                engine.stop()
                return

    def flush() -> None:
        if outputs or steps:
            # pickle.dumps, not Connection.send: its ForkingPickler copies the reducer table on every call
            send(pickle.dumps(("outputs", ([_output_fields(o) for o in outputs], engine.stats(),
                                           steps[-1] if steps else None)), pickle.HIGHEST_PROTOCOL))
            outputs.clear()
            steps.clear()

    engine.loop(receive, flush)
    send(pickle.dumps(("stopped", None)))
