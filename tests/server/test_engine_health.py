"""A stopped engine process as HTTP clients see it: /health turns 503 and requests end with 503 within the
heartbeat timeout, instead of hanging; both recover when it runs again."""

import os
import signal
import threading
from functools import partial

import httpx
import pytest
from serving import MODEL, live_server, load_tokenizer, wait_for

from grok1.cli.main import build_parser
from grok1.cli.serve import engine_from_args
from grok1.engine.process import EngineProcess


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def test_a_stopped_engine_makes_health_and_requests_503(golden_dir, tok):
    args = build_parser().parse_args(["serve", "--checkpoint", str(golden_dir / "tiny-ckpt"), "--config",
                                      str(golden_dir / "tiny-config.json"), "--tokenizer", str(tok.path),
                                      "--threads", "1", "--max-batch", "2",
                                      "--max-seq-len", "4096"])
    engine = EngineProcess(partial(engine_from_args, args), tok, heartbeat_timeout=2.0)
    with live_server(None, tok, engine=engine) as (url, _):
        body = {"model": MODEL, "prompt": "Go on", "max_tokens": 4000, "ignore_eos": True}
        answer = {}
        waiting = threading.Thread(target=lambda: answer.update(r=httpx.post(url + "/v1/completions", json=body,
                                                                               timeout=120)))
        waiting.start()
        wait_for(lambda: engine.stats()["running"] == 1 or not waiting.is_alive(), what="the request to run")
        assert waiting.is_alive(), answer["r"].text  # still running when the engine stops
        os.kill(engine.proc.pid, signal.SIGSTOP)
        try:
            waiting.join(60)
            assert not waiting.is_alive(), "the request hangs on a stopped engine"
            assert answer["r"].status_code == 503 and answer["r"].json()["error"]["code"] == "engine_unavailable"
            health = httpx.get(url + "/health")
            assert health.status_code == 503 and health.json()["status"] == "engine not answering"
            again = httpx.post(url + "/v1/completions", json=body | {"max_tokens": 2}, timeout=60)
            assert again.status_code == 503
        finally:
            os.kill(engine.proc.pid, signal.SIGCONT)
        wait_for(lambda: httpx.get(url + "/health").status_code == 200, what="health to recover")
        ok = httpx.post(url + "/v1/completions", json=body | {"max_tokens": 2}, timeout=60)
        assert ok.status_code == 200
