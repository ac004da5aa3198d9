"""What the server refuses before (and while) a route runs: foreign Host names, a missing key (before the
body is read), bodies over the cap, text that is not text, requests that can never fit, unsupported fields;
and that tokenizing a prompt never stalls the event loop."""

import concurrent.futures as cf
import json
import threading

import httpx
import pytest
from raw import connect, json_request, read_status, request_head
from serving import MODEL, live_server, load_tokenizer

KEY = "k3y"
AUTH = {"Authorization": f"Bearer {KEY}"}
CAP = 64 << 10


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def url(golden_model, tok):
    with live_server(golden_model, tok, max_batch=2, max_seq_len=64, max_queue=4, api_key=KEY,
                     allowed_hosts=frozenset({"localhost", "127.0.0.1", "::1"}), max_body_bytes=CAP,
                     body_timeout=2.0) as (url, _):
        yield url


def test_key_is_checked_before_the_body_is_read_and_bodies_are_capped(url):
    head = {"Content-Type": "application/json", "Content-Length": str(100_000_000)}
    with connect(url) as s:  # a 100 MB body announced, none sent: the answer cannot wait for it
        s.sendall(request_head(url, "POST", "/v1/completions", head))
        assert read_status(s) == 401
    with connect(url) as s:
        s.sendall(request_head(url, "POST", "/v1/completions", head | AUTH))
        assert read_status(s) == 413
    # no Content-Length: a chunked body is counted as it arrives
    chunk = b"x" * 16384
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(CAP // len(chunk) + 2)) + b"0\r\n\r\n"
    with connect(url) as s:
        s.sendall(request_head(url, "POST", "/v1/completions", {"Transfer-Encoding": "chunked"} | AUTH) + body)
        assert read_status(s) == 413
    big = json.dumps({"model": MODEL, "prompt": "word " * (CAP // 5 + 10)}).encode()
    assert json_request(url, "/v1/completions", big, KEY) == 413
    fits = json.dumps({"model": MODEL, "prompt": "word " * (CAP // 5 - 100)}).encode()  # too long for the context
    assert json_request(url, "/v1/completions", fits, KEY) == 400


def test_a_trickled_body_times_out(url):
    with connect(url) as s:
        s.sendall(request_head(url, "POST", "/v1/completions", {"Content-Length": "1000"} | AUTH) + b'{"mo')
        assert read_status(s) == 408


def test_what_needs_the_key_and_what_stays_open(url):
    for path in ("/metrics", "/docs", "/redoc", "/openapi.json", "/v1/models", "/v1/nothing"):
        r = httpx.get(url + path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
        assert httpx.get(url + path, headers=AUTH).status_code == (404 if path == "/v1/nothing" else 200), path
    for path in ("/health", "/"):
        assert httpx.get(url + path).status_code == 200, path


def test_host_allow_list_against_dns_rebinding(url):
    port = url.rsplit(":", 1)[1]
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST"):
        assert httpx.get(url + "/health", headers={"Host": host}).status_code == 200, host
    for host in (f"evil.example:{port}", "attacker.test", f"127.0.0.1.evil.example:{port}", ""):
        r = httpx.get(url + "/v1/models", headers={"Host": host} | AUTH)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host", host


SURROGATES = [  # (path, raw JSON body with an unpaired surrogate escape, the param named)
    ("/v1/completions", r'{"model": "tiny", "prompt": "ab\ud800c"}', "prompt"),
    ("/v1/completions", r'{"model": "tiny", "prompt": ["ok", "\udfff"]}', "prompt.1"),
    ("/v1/completions", r'{"model": "tiny", "prompt": "ok", "stop": "\ud800"}', "stop"),
    ("/v1/completions", r'{"model": "tiny", "prompt": "ok", "stop": ["x", "y\udc00"]}', "stop.1"),
    ("/v1/completions", r'{"model": "tiny\ud800", "prompt": "ok"}', "model"),
    ("/v1/completions", r'{"model": "tiny", "prompt": "ok", "user": "\ud800"}', "user"),
    ("/v1/completions", r'{"model": "tiny", "prompt": "ok", "logit_bias": {"\ud800": 1}}', "logit_bias"),
    ("/v1/completions", r'{"model": "tiny", "prompt": "ok", "whatever": {"deep": ["\ud800"]}}', "whatever.deep.0"),
    ("/v1/chat/completions", r'{"model": "tiny", "messages": [{"role": "user", "content": "\ud800"}]}',
     "messages.0.content"),
    ("/v1/chat/completions",
     r'{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "a\udbff"}]}]}',
     "messages.0.content.0.text"),
    ("/v1/chat/completions", r'{"model": "tiny", "messages": [{"role": "user", "content": "x", "name": "\ud800"}]}',
     "messages.0.name"),
    ("/v1/chat/completions", r'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "stop": "\udfff"}',
     "stop"),
]


@pytest.mark.parametrize("path,body,param", SURROGATES)
def test_lone_surrogates_are_400_naming_the_field(url, path, body, param):
    r = httpx.post(url + path, content=body.encode(), headers={"Content-Type": "application/json"} | AUTH)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and "surrogate" in r.json()["error"]["message"]


def test_surrogate_bytes_and_valid_pairs(url):
    # UTF-8-encoded surrogate bytes (json.loads lets them through as text): the same 400
    raw = b'{"model": "tiny", "prompt": "a\xed\xa0\x80b", "max_tokens": 1}'
    assert json_request(url, "/v1/completions", raw, KEY) == 400
    # a surrogate *pair* is one real character (U+1F600) and is fine
    ok = rb'{"model": "tiny", "prompt": "smile \ud83d\ude00", "max_tokens": 1}'
    assert json_request(url, "/v1/completions", ok, KEY) == 200


def test_a_request_that_can_never_fit_the_queue_is_400_not_429(url):
    for path, body, param in [
        ("/v1/completions", {"prompt": "hi", "n": 5}, "n"),
        ("/v1/completions", {"prompt": ["a", "b", "c"], "n": 2}, "prompt"),
        ("/v1/completions", {"prompt": ["a"] * 100}, "prompt"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 5}, "n"),
    ]:
        r = httpx.post(url + path, json={"model": MODEL, "max_tokens": 1} | body, headers=AUTH, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        assert r.json()["error"]["code"] == "too_many_completions"
    r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": ["a", "b"], "n": 2, "max_tokens": 1},
                   headers=AUTH, timeout=60)
    assert r.status_code == 200 and len(r.json()["choices"]) == 4  # 4 = the queue: fits


UNSUPPORTED = [
    ("/v1/completions", {"prompt": "a", "suffix": "b"}, "suffix"),
    ("/v1/completions", {"prompt": "a", "best_of": 3}, "best_of"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/v1/chat/completions", {"tool_choice": "required"}, "tool_choice"),
    ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions"),
    ("/v1/chat/completions", {"function_call": "auto"}, "function_call"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema"}}, "response_format"),
    ("/v1/chat/completions", {"audio": {"voice": "x"}}, "audio"),
    ("/v1/chat/completions", {"modalities": ["text", "audio"]}, "modalities"),
]


@pytest.mark.parametrize("path,extra,param", UNSUPPORTED)
def test_unsupported_fields_are_400_naming_the_field(url, path, extra, param):
    base = {"model": MODEL, "max_tokens": 1}
    base |= {"prompt": "a"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "a"}]}
    r = httpx.post(url + path, json=base | extra, headers=AUTH, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_supported_spellings_of_those_fields_still_work(url):
    chat = {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "a"}]}
    for extra in ({"response_format": {"type": "text"}}, {"tools": []}, {"tool_choice": "none"},
                  {"modalities": ["text"]}):
        assert httpx.post(url + "/v1/chat/completions", json=chat | extra, headers=AUTH, timeout=60).status_code == 200
    done = {"model": MODEL, "max_tokens": 1, "prompt": "a", "best_of": 1, "suffix": ""}
    assert httpx.post(url + "/v1/completions", json=done, headers=AUTH, timeout=60).status_code == 200


def test_logit_bias_forces_and_is_checked(url, tok):
    forced = tok.encode(" banana")[-1]
    body = {"model": MODEL, "prompt": "The", "max_tokens": 3, "temperature": 0, "ignore_eos": True,
            "logit_bias": {str(forced): 100}}
    r = httpx.post(url + "/v1/completions", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == tok.decode([forced] * 3)
    for bias in ({str(tok.vocab_size): 1}, {"abc": 1}, {"5": 101}):
        r = httpx.post(url + "/v1/completions", json=body | {"logit_bias": bias}, headers=AUTH, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"].startswith("logit_bias"), r.text


def test_openapi_documents_the_errors_it_returns(url):
    schema = httpx.get(url + "/openapi.json", headers=AUTH).json()
    assert "422" not in json.dumps(schema["paths"]) and "HTTPValidationError" not in schema["components"]["schemas"]
    for path in ("/v1/completions", "/v1/chat/completions"):
        responses = schema["paths"][path]["post"]["responses"]
        assert {"200", "400", "401", "413", "429", "503"} <= set(responses), path
    r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "a", "temperature": 9}, headers=AUTH)
    assert r.status_code == 400  # what the schema says validation failures are


class BlockingTokenizer:
    """The real tokenizer, except that encoding a text containing BLOCK waits until released."""

    def __init__(self, tok):
        self.tok, self.entered, self.release = tok, threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def encode(self, text, *args, **kwargs):
        if "BLOCK" in text:
            self.entered.set()
            self.release.wait(60)
        return self.tok.encode(text, *args, **kwargs)


def test_tokenizing_does_not_stall_the_event_loop(golden_model, tok):
    """While one request's prompt is being tokenized (held here by the tokenizer), /health still answers."""
    slow = BlockingTokenizer(tok)
    with live_server(golden_model, slow, max_batch=2, max_seq_len=64) as (url, _), cf.ThreadPoolExecutor(2) as pool:
        for path, body in [("/v1/completions", {"prompt": "BLOCK here"}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "BLOCK"}]})]:
            slow.entered.clear()
            slow.release.clear()
            pending = pool.submit(httpx.post, url + path, json={"model": MODEL, "max_tokens": 2} | body, timeout=120)
            assert slow.entered.wait(60), "the request never reached the tokenizer"
            try:
                health = httpx.get(url + "/health", timeout=10)
            finally:
                slow.release.set()
            assert health.status_code == 200, path
            assert pending.result().status_code == 200, path
