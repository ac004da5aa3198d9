"""Raw-socket HTTP for the hostile-client tests: what a well-behaved client library would never send.

(Not a conftest.py: a second module named conftest would shadow tests/conftest.py.)
"""

import socket
from urllib.parse import urlsplit


def connect(url: str, timeout: float = 15.0) -> socket.socket:
    parts = urlsplit(url)
    return socket.create_connection((parts.hostname, parts.port), timeout=timeout)


def request_head(url: str, method: str, path: str, headers: dict[str, str]) -> bytes:
    host = urlsplit(url).netloc
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"] + [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_status(sock: socket.socket) -> int:
    """The status code of the response on `sock` (reads its head; the socket's timeout bounds the wait)."""
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"closed without a response (got {data!r})")
        data += chunk
    return int(data.split(b" ", 2)[1])


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (the socket's timeout bounds the wait: a
    server that never closes raises socket.timeout)."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def json_request(url: str, path: str, body: bytes, key: str | None = None, timeout: float = 60.0) -> int:
    """POST a raw JSON body (any bytes) and return the status."""
    headers = {"Content-Type": "application/json", "Content-Length": str(len(body)), "Connection": "close"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    with connect(url, timeout) as s:
        s.sendall(request_head(url, "POST", path, headers) + body)
        return read_status(s)
