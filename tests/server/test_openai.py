"""The server driven by the real `openai` package (and raw httpx where the client hides the wire)."""

import concurrent.futures as cf

import httpx
import openai
import pytest
from conftest import generate
from serving import MODEL, live_server, load_tokenizer, wait_for

from grok1.engine.sampling import SamplingParams
from grok1.tokenizer import chat_prompt

PROMPTS = ["The answer to life the universe and everything is", "Hello", "Once upon a time", "1, 2, 3,",
           "The capital of France", "def fib(n):", "Dear diary,", "Q: Why is the sky blue?\nA:"]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def server(golden_model, tok):
    with live_server(golden_model, tok) as (url, engine):
        yield url, engine


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=120)


def reference(model, tok, text, n):
    """Greedy continuation of `text` computed without the server (static batch of one)."""
    params = SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True)
    return generate(model, [tok.encode(text)], [params], tok)[0].text


def test_models(client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_completion_non_stream_and_stream(client, golden_model, tok):
    expected = reference(golden_model, tok, PROMPTS[0], 12)
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True}, logprobs=2)
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(tok.encode(PROMPTS[0])) and r.usage.completion_tokens == 12
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == 12 and all(len(t) <= 2 for t in lp.top_logprobs)
    assert "".join(lp.tokens).strip() == expected.strip()
    stream = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_non_stream_and_stream_agree(client, golden_model, tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there!"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                       logprobs=True, top_logprobs=3)
    text = r.choices[0].message.content
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(tok.encode(chat_prompt(messages)))
    assert len(r.choices[0].logprobs.content) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 3 for t in r.choices[0].logprobs.content)
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.total_tokens == r.usage.total_tokens


def test_stop_seed_and_n(client, golden_model, tok):
    full = reference(golden_model, tok, PROMPTS[2], 16)
    stop = full[6:9]
    r = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].text == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"
    kw = {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 8, "temperature": 1.0, "seed": 7, "n": 2}
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # same seed, same answers
    assert a.usage.prompt_tokens == len(tok.encode(PROMPTS[1]))  # counted once for n=2


def test_concurrent_streams_equal_each_alone(client, server, golden_model, tok):
    def ask(prompt):
        stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        return "".join(c.choices[0].text for c in stream)

    with cf.ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(ask, PROMPTS))
    assert together == [reference(golden_model, tok, p, 16) for p in PROMPTS]
    metrics = httpx.get(server[0] + "/metrics").text
    count = float(metric(metrics, "grok1_batch_size_count"))
    ones = float(metric(metrics, 'grok1_batch_size_bucket{le="1"}'))
    assert ones < count, "no engine step ever ran more than one request"


def metric(text, name):
    return next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " "))


def test_errors_are_openai_errors_and_the_server_stays_healthy(client, server):
    url = server[0]
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="hi")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi", temperature=3)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="word " * 400)
    assert e.value.body["code"] == "context_length_exceeded"  # never silently truncated
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=1000)
    assert "context" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=[10**9])
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="hi", stop=["a", "b", "c", "d", "e"])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], top_logprobs=2)
    raw = httpx.post(url + "/v1/chat/completions", content=b'{"model": "tiny", "messages": [',
                     headers={"content-type": "application/json"})
    assert raw.status_code == 400 and raw.json()["error"]["code"] == "json_invalid"
    raw = httpx.post(url + "/v1/completions", json={"model": MODEL})
    assert raw.status_code == 400 and raw.json()["error"]["param"] == "prompt"
    assert httpx.get(url + "/v1/nothing").json()["error"]["type"] == "not_found_error"
    assert httpx.get(url + "/health").json()["status"] == "ok"
    r = client.completions.create(model=MODEL, prompt="still alive?", max_tokens=3)
    assert r.usage.completion_tokens <= 3


def test_disconnect_mid_stream_frees_the_slot(server):
    url, engine = server
    cancelled = engine.stats()["finished"].get("cancelled", 0)
    body = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 200, "stream": True,
            "extra": "ignored", "ignore_eos": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        got = [line for line, _ in zip(lines, range(6)) if line.startswith("data: ")]
        assert len(got) >= 2 and engine.stats()["running"] == 1
    # the client is gone: the request is cancelled and its slot is free by the next engine step
    wait_for(lambda: engine.stats()["finished"].get("cancelled", 0) == cancelled + 1, what="cancellation")
    stats = engine.stats()
    assert stats["running"] == 0 and stats["free_slots"] == stats["max_batch"]
    assert 'grok1_finished_requests_total{reason="cancelled"}' in httpx.get(url + "/metrics").text


def test_non_streaming_client_that_gives_up_is_cancelled(server):
    url, engine = server
    cancelled = engine.stats()["finished"].get("cancelled", 0)
    body = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 240, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json=body, timeout=httpx.Timeout(60, read=0.5))  # closes the connection
    wait_for(lambda: engine.stats()["finished"].get("cancelled", 0) == cancelled + 1, what="cancellation")
    assert engine.stats()["free_slots"] == engine.stats()["max_batch"]


def test_api_key(golden_model, tok):
    with live_server(golden_model, tok, max_batch=1, max_seq_len=64, api_key="sekret") as (url, _):
        bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            bad.models.list()
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        missing = httpx.get(url + "/v1/models")  # (the openai client refuses to send no key at all)
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
        assert httpx.post(url + "/v1/completions", json={}).status_code == 401  # auth before validation
        good = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0)
        assert good.completions.create(model=MODEL, prompt="hi", max_tokens=2).usage.completion_tokens <= 2
        assert httpx.get(url + "/health").status_code == 200  # health and the page need no key


def test_too_many_queued_requests_is_429(golden_model, tok):
    with live_server(golden_model, tok, max_batch=1, max_seq_len=256, max_queue=1) as (url, engine):
        body = {"model": MODEL, "prompt": "long", "max_tokens": 250, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as running, \
                httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as queued:
            assert running.status_code == queued.status_code == 200
            client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
            with pytest.raises(openai.RateLimitError) as e:
                client.completions.create(model=MODEL, prompt="one more", max_tokens=2)
            assert e.value.body["code"] == "queue_full"
        wait_for(lambda: engine.stats()["free_slots"] == 1 and engine.stats()["waiting"] == 0, what="slots back")
        assert client.completions.create(model=MODEL, prompt="now", max_tokens=2).choices[0].finish_reason
