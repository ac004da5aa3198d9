"""Fuzz the server against its own OpenAPI schema with schemathesis: no input may cause a 5xx."""

import shutil
import subprocess
import sys

import httpx
import pytest
from serving import live_server, load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def test_no_server_errors_for_any_generated_request(golden_model, tok, tmp_path):
    if shutil.which("schemathesis") is None and not _importable("schemathesis"):
        pytest.skip("schemathesis is not installed (pip install -e '.[test]')")
    # A short context keeps every generated completion short; a key checks that fuzzing passes auth.
    with live_server(golden_model, tok, max_batch=4, max_seq_len=48, max_queue=8, api_key="k") as (url, engine):
        cmd = [sys.executable, "-m", "schemathesis.cli", "run", url + "/openapi.json", "--checks", "not_a_server_error",
               "--max-examples", "15", "--seed", "1", "--workers", "1", "--request-timeout", "60",
               "--header", "Authorization: Bearer k", "--report", "ndjson", "--report-dir", str(tmp_path)]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
        assert httpx.get(url + "/health").json()["status"] == "ok"
        metrics = httpx.get(url + "/metrics", headers={"Authorization": "Bearer k"}).text
        for endpoint in ("/v1/completions", "/v1/chat/completions"):  # the fuzzer got past validation too
            assert f'grok1_requests_total{{endpoint="{endpoint}",status="200"}}' in metrics, metrics
        assert 'status="5' not in metrics, metrics
        assert engine.stats()["running"] == 0


def _importable(name):
    try:
        __import__(name)
    except ImportError:
        return False
    return True
