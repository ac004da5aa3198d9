"""The server's front door: an ASGI middleware that answers hostile or careless requests before any route runs.

In order, for each HTTP request:
  1. Host allow-list (when one is set, e.g. for a loopback bind): a browser page on another site can point a
     DNS name of its own at 127.0.0.1 (DNS rebinding) and then read the API as same-origin; its requests
     carry that foreign name in Host, so they get 400.
  2. The API key, when one is set, for every path except OPEN ones: checked on the headers, before a single
     byte of the body is read (an unauthenticated client cannot make the server read 100 MB).
  3. The body: a Content-Length above `max_body_bytes` is refused at once (413); a chunked body is counted
     as it arrives and refused when it passes the cap; the whole body must arrive within `body_timeout`
     seconds (408), so a client that trickles its body cannot hold the request open.

Open with a key: `/health` (supervisors and load balancers probe it; it shows counts, no content) and `/` (the
static chat page, which asks for the key itself). Everything else, /metrics, /docs, /redoc and
/openapi.json included, needs the key.
"""

from __future__ import annotations

import asyncio
import secrets
import time

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

OPEN = frozenset({"/health", "/"})
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


def host_name(host_header: str) -> str:
    """The name in a Host header, without the port, lowercased ('[::1]:8000' -> '::1')."""
    h = host_header.strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def error(status: int, message: str, code: str, kind: str = "invalid_request_error",
          headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}},
                        status_code=status, headers=headers)


class Guard:
    """See the module docstring. `allowed_hosts` None: any Host; `api_key` None: no key."""

    def __init__(self, app, api_key: str | None, allowed_hosts: frozenset[str] | None, max_body_bytes: int,
                 body_timeout: float) -> None:
        self.app, self.api_key, self.allowed_hosts = app, api_key, allowed_hosts
        self.max_body_bytes, self.body_timeout = max_body_bytes, body_timeout

    def refusal(self, scope) -> JSONResponse | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.allowed_hosts is not None:
            host = host_name(headers.get("host", ""))
            if host not in self.allowed_hosts:
                return error(400, f"the Host header {host!r} is not one this server answers to (see serve "
                             "--allowed-hosts)", "invalid_host")
        if self.api_key is not None and scope["path"] not in OPEN:
            given = headers.get("authorization", "")
            if not given.startswith("Bearer ") or not secrets.compare_digest(given[7:].encode(),
                                                                             self.api_key.encode()):
                return error(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", "invalid_api_key",
                             headers={"WWW-Authenticate": "Bearer"})
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return error(413, f"the request body ({length} bytes) is larger than this server accepts "
                         f"({self.max_body_bytes} bytes; see serve --max-body-bytes)", "body_too_large")
        return None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refused = self.refusal(scope)
        if refused is not None:
            return await refused(scope, receive, send)
        received, deadline, complete = 0, time.monotonic() + self.body_timeout, False

        async def bounded_receive() -> dict:
            nonlocal received, complete
            if complete:  # after the body: disconnect notices, unbounded in time
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise HTTPException(408, f"the request body did not arrive within {self.body_timeout:g} s") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if received > self.max_body_bytes:
                    raise HTTPException(413, f"the request body is larger than this server accepts "
                                        f"({self.max_body_bytes} bytes; see serve --max-body-bytes)")
            else:
                complete = True
            return message

        await self.app(scope, bounded_receive, send)
