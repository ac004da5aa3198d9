"""Helpers for the server tests: a real uvicorn server on a free loopback port, in this process.

(Not a conftest.py: a second module named conftest would shadow tests/conftest.py.)
"""

import threading
import time
from contextlib import contextmanager

import pytest

MODEL = "tiny"


def load_tokenizer():
    """The Grok-1 tokenizer from ../shared (skips the test when absent)."""
    from conftest import SHARED

    from grok1.tokenizer import Tokenizer

    path = SHARED / "grok-1" / "tokenizer.model"
    if not path.is_file():
        pytest.skip(f"the Grok-1 tokenizer is not at {path} (../shared beside the repo)")
    return Tokenizer(path)


@contextmanager
def live_server(model, tok, max_batch=8, max_seq_len=256, max_queue=64, header_timeout=10.0, name=MODEL,
                engine=None, **app_options):
    """Serve `model` (or a given `engine`) with uvicorn on 127.0.0.1 (a free port), with `grok1 serve`'s uvicorn
    settings; yields (base_url, engine)."""
    import uvicorn

    from grok1.engine.engine import Engine, EngineConfig
    from grok1.server.app import create_app
    from grok1.server.run import uvicorn_config

    if engine is None:
        engine = Engine(model, tok, EngineConfig(max_batch=max_batch, max_seq_len=max_seq_len, max_queue=max_queue))
    app = create_app(engine, tok, name, **app_options)
    server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", 0, header_timeout, log_level="warning",
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(1200):  # bounded wait for startup
        if server.started or not thread.is_alive():
            break
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", engine
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        assert not thread.is_alive(), "uvicorn did not shut down"
        assert not engine.alive(), "the engine thread outlived the server"


def wait_for(predicate, timeout=60.0, what="condition"):
    """Poll until predicate() is truthy (bounded); returns its value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
