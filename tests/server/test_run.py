"""Slow and hostile clients against the server as `grok1 serve` runs it (run.py's uvicorn settings): every
connection that never finishes its request headers is closed, and a mix of hostile requests gets no 5xx and
leaves memory flat."""

import json
import select
import socket
import time

import httpx
import pytest
from raw import connect, json_request, read_status, read_until_closed, request_head
from serving import MODEL, live_server, load_tokenizer, wait_for

HEADER_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def server(golden_model, tok):
    with live_server(golden_model, tok, max_batch=4, max_seq_len=64, max_queue=8, header_timeout=HEADER_TIMEOUT,
                     max_body_bytes=64 << 10, body_timeout=2.0) as (url, engine):
        yield url, engine


def closed_by_server(sock: socket.socket) -> bytes:
    """What the server sent before closing `sock` (raises socket.timeout if it keeps it open 15 s)."""
    sock.settimeout(15)
    return read_until_closed(sock)


def test_connections_that_never_finish_their_headers_are_closed(server):
    url, _ = server
    half = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le"
    socks = [connect(url) for _ in range(40)]
    try:
        for i, s in enumerate(socks):
            if i % 2:  # half of them say nothing at all
                s.sendall(half)
        for s in socks:
            assert closed_by_server(s).startswith((b"", b"HTTP/1.1 408"))
    finally:
        for s in socks:
            s.close()


def test_a_slowloris_is_closed_despite_sending(server):
    url, _ = server
    with connect(url) as s:
        line = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Slow: " + b"a" * 1000
        for i in range(len(line)):  # a byte every 50 ms: 50 s if never stopped
            try:
                s.sendall(line[i:i + 1])
            except OSError:  # reset by the server
                break
            if select.select([s], [], [], 0.05)[0]:
                assert closed_by_server(s).startswith((b"", b"HTTP/1.1 408"))
                break
        else:
            pytest.fail("the server kept a connection open whose headers took 50 s")
        assert i < len(line) - 1


def test_endless_headers_are_refused(server):
    url, _ = server
    with connect(url) as s:
        try:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Pad: " + b"p" * (200 << 10))
        except OSError:
            pass  # reset mid-send: also refused
        assert closed_by_server(s).startswith((b"", b"HTTP/1.1 431", b"HTTP/1.1 400"))


def test_a_keep_alive_connection_gets_the_same_deadline_for_its_next_request(server):
    url, _ = server
    with connect(url) as s:
        s.sendall(request_head(url, "GET", "/health", {}))
        assert read_status(s) == 200
        s.sendall(b"GET /health HTTP/1.1\r\nHo")  # the next request, half sent
        assert closed_by_server(s).count(b"HTTP/1.1 ") <= 2  # closed (its 200's rest, maybe a 408)


def test_a_complete_request_is_not_cut_off_by_the_header_deadline(server):
    url, _ = server
    body = {"model": MODEL, "prompt": "Tell me a story", "max_tokens": 40, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        time.sleep(HEADER_TIMEOUT * 1.5)  # the response outlives the header deadline
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and len(lines) > 2


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def hostile_round(url: str) -> tuple[int, list[int]]:
    """One round of hostile clients; returns (cases tried, the HTTP statuses that came back)."""
    statuses = []
    bodies = [
        json.dumps({"model": MODEL, "prompt": "x" * (70 << 10)}).encode(),  # over the cap
        rb'{"model": "tiny", "prompt": "\ud800"}',  # lone surrogate
        rb'{"model": "tiny", "messages": [{"role": "user", "content": "\udfff"}]}',
        b'{"model": "tiny", "prompt": "a\xed\xa0\x80"}',  # surrogate as UTF-8 bytes
        b"[" * 50_000 + b"]" * 50_000,  # deep nesting
        b'{"model": "tiny", "prompt": ' + b"[" * 3000 + b"]" * 3000 + b"}",
        b'{"model": "tiny", "prompt": [99999999999999999999999]}',
        b'{"model": "tiny", "prompt": "hi", "n": 1000}',
        b'{"model": "tiny", "prompt": ["a", "b", "c", "d", "e", "f", "g", "h", "i"]}',
        b'{"model": "tiny", "prompt": "hi", "temperature": 1e-45, "max_tokens": 2}',
        b'{"model": "tiny", "prompt": "hi", "logit_bias": {"-1": 5}}',
        b"\xff\xfe not json",
        b'{"model": "tiny", "messages": []}',
    ]
    for body in bodies:
        path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
        statuses.append(json_request(url, path, body))
    # a disconnect storm: streams opened and dropped after the first bytes, or before any
    storm = {"model": MODEL, "prompt": "Tell me a story", "max_tokens": 50, "ignore_eos": True, "stream": True}
    payload = json.dumps(storm).encode()
    for i in range(12):
        s = connect(url)
        s.sendall(request_head(url, "POST", "/v1/completions", {"Content-Type": "application/json",
                                                                  "Content-Length": str(len(payload))}) + payload)
        if i % 2:
            statuses.append(read_status(s))
        s.close()
    # half headers, a trickled body and a chunked body over the cap
    half = [connect(url) for _ in range(10)]
    for s in half:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    with connect(url) as s:
        s.sendall(request_head(url, "POST", "/v1/completions", {"Content-Length": "500"}) + b"{")
        statuses.append(read_status(s))
    with connect(url) as s:
        chunk = b"y" * 30000
        s.sendall(request_head(url, "POST", "/v1/completions", {"Transfer-Encoding": "chunked"})
                  + b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(4)) + b"0\r\n\r\n")
        statuses.append(read_status(s))
    for s in half:
        closed_by_server(s)
        s.close()
    return len(bodies) + 12 + 10 + 2, statuses


def test_hostile_clients_get_no_5xx_and_memory_stays_flat(server):
    url, engine = server
    tried, statuses = hostile_round(url)  # warm-up: first-use allocations
    wait_for(lambda: engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0, what="the storm to drain")
    before = rss_mib()
    for _ in range(3):
        n, got = hostile_round(url)
        tried, statuses = tried + n, statuses + got
    wait_for(lambda: engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0, what="the storm to drain")
    after = rss_mib()
    print(f"hostile clients: {tried} cases, {len(statuses)} HTTP answers, "
          f"{sum(s >= 500 for s in statuses)} 5xx; RSS {before:.0f} -> {after:.0f} MiB")
    assert not [s for s in statuses if s >= 500], statuses
    assert {400, 408, 413}.issubset(statuses) and 200 in statuses
    metrics = httpx.get(url + "/metrics").text
    assert 'status="5' not in metrics, metrics
    assert after - before < 64, (before, after)  # three rounds moved through ~1.5 MB of bodies each
    assert httpx.get(url + "/health").json()["status"] == "ok"
    stats = engine.stats()
    assert stats["free_slots"] == stats["max_batch"]
