"""Run the app under uvicorn with a graceful shutdown that ends every stream cleanly, and deadlines for slow
clients.

On Ctrl-C / SIGTERM uvicorn stops accepting connections and waits for the running responses.
Streams still running after `shutdown_timeout` seconds are cancelled in the engine, so each one
ends with an error event and `data: [DONE]` instead of being cut off mid-stream.

uvicorn times out idle keep-alive connections, but not a request whose headers never finish: a client that
sends half a request line (or one header byte a second) holds its connection, and its file descriptor,
forever. `deadline_protocol` closes a connection whose request headers are not complete `header_timeout`
seconds after it opened (or after its previous response), or that sends more than `max_header_bytes` of
them; the body has its own deadline (guard.py).
"""

from __future__ import annotations

import asyncio
import ipaddress
import sys
import threading
from collections.abc import Collection
from types import FrameType

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from grok1.engine.client import EngineClient
from grok1.server.app import BODY_TIMEOUT, MAX_BODY_BYTES, create_app
from grok1.server.guard import LOOPBACK_HOSTS
from grok1.tokenizer import Tokenizer

HEADER_TIMEOUT = 10.0  # seconds for a request's headers to arrive
MAX_HEADER_BYTES = 64 << 10
KEEP_ALIVE_TIMEOUT = 5  # seconds an idle keep-alive connection stays open


def deadline_protocol(header_timeout: float = HEADER_TIMEOUT, max_header_bytes: int = MAX_HEADER_BYTES) -> type:
    """uvicorn's HTTP protocol class, closing connections whose request headers come too slowly or too long.
    A request has started when uvicorn made it a new cycle (both of uvicorn's parsers do so on complete
    headers)."""

    class DeadlineProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def _arm(self) -> None:
            self._waiting_for, self._header_bytes = self.cycle, 0  # the cycle before the awaited request
            self._deadline = self.loop.call_later(header_timeout, self._expire)

        def _started(self) -> bool:
            return self.cycle is not self._waiting_for

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._deadline is None:
                return
            if self._started():
                self._deadline.cancel()
                self._deadline = None
            else:
                self._header_bytes += len(data)
                if self._header_bytes > max_header_bytes:
                    self._refuse(b"431 Request Header Fields Too Large")

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None
            super().connection_lost(exc)

        def _expire(self) -> None:
            self._deadline = None
            if not self._started():
                self._refuse(b"408 Request Timeout")

        def _refuse(self, status: bytes) -> None:
            if not self.transport.is_closing():
                self.transport.write(b"HTTP/1.1 " + status + b"\r\nconnection: close\r\ncontent-length: 0\r\n\r\n")
                self.transport.close()

    return DeadlineProtocol


def uvicorn_config(app, host: str, port: int, header_timeout: float = HEADER_TIMEOUT, **options) -> uvicorn.Config:
    """The server's uvicorn settings (the tests serve with these too)."""
    return uvicorn.Config(app, host=host, port=port, http=deadline_protocol(header_timeout),
                          timeout_keep_alive=KEEP_ALIVE_TIMEOUT, h11_max_incomplete_event_size=MAX_HEADER_BYTES,
                          **options)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_allowed_hosts(host: str) -> frozenset[str] | None:
    """The Host names a server bound to `host` answers to by default: on a loopback address only loopback
    names (against DNS rebinding); elsewhere any (the operator knows the names it is reached by)."""
    return LOOPBACK_HOSTS | {host.lower()} if is_loopback(host) else None


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: EngineClient, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.engine, self.shutdown_timeout = engine, shutdown_timeout

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:  # the first signal: give running streams `shutdown_timeout` seconds
            timer = threading.Timer(self.shutdown_timeout, self.engine.cancel_all)
            timer.daemon = True
            timer.start()
        super().handle_exit(sig, frame)


def serve(engine: EngineClient, tokenizer: Tokenizer, model_name: str, host: str = "127.0.0.1",
          port: int = 8000, api_key: str | None = None, system_prompt: str | None = None,
          shutdown_timeout: float = 10.0, allowed_hosts: Collection[str] | None = None,
          max_body_bytes: int = MAX_BODY_BYTES) -> int:
    """Serve until interrupted (blocks); returns 0, or 3 when the engine process died (a supervisor should
    restart the server: the engine is not restarted in place). `allowed_hosts`: the Host names to answer
    ("*": any); None: default_allowed_hosts(host)."""
    if allowed_hosts is None:
        hosts = default_allowed_hosts(host)
    else:
        hosts = None if "*" in allowed_hosts else frozenset(h.lower() for h in allowed_hosts)
    app = create_app(engine, tokenizer, model_name, api_key=api_key, system_prompt=system_prompt,
                     allowed_hosts=hosts, max_body_bytes=max_body_bytes, body_timeout=BODY_TIMEOUT)
    # uvicorn's own deadline is a backstop only: the engine has cancelled every stream well before it.
    config = uvicorn_config(app, host, port, timeout_graceful_shutdown=int(shutdown_timeout) + 10, log_level="info")
    server = _Server(config, engine, shutdown_timeout)
    died: list[int | None] = []

    def on_death(code: int | None) -> None:
        died.append(code)
        server.should_exit = True

    engine.on_death = on_death
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled, after shutting down cleanly
        pass
    if died:
        print(f"grok1 serve: the engine process died (exit code {died[0]}); exiting with status 3 so that a "
              "supervisor restarts the server", file=sys.stderr, flush=True)
        return 3
    return 0
