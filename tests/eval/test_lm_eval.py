"""grok1 inside lm-evaluation-harness: a local task (dataset_path: json) run by lm_eval.simple_evaluate through
Grok1LM; its log-likelihoods must equal sums of per-token log-probs from a full forward of each sequence."""

import json
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'grok1[eval]')")

DEMO = Path(__file__).resolve().parents[2] / "grok1" / "assets" / "grok-1-mini"
DOCS = [{"question": "It is a truth universally acknowledged, that a single man in possession of a good fortune,",
         "choices": [" must be in want of a wife.", " is a cat.", " said nothing at all."], "answer": 0},
        {"question": "Mr. Darcy bowed, and Elizabeth", "choices": [" curtsied.", " sixteen", " the the the"], "answer": 0},
        {"question": "\"My dear Mr. Bennet,\" said his lady to him one day,",
         "choices": [" \"have you heard", " 42", " xylophone"], "answer": 0}]


def write_task(root: Path) -> str:
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (root / "grok1_tiny.yaml").write_text(
        "task: grok1_tiny\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\n"
        "target_delimiter: ''\n"
        "metric_list:\n  - metric: acc\n")
    return "grok1_tiny"


@pytest.fixture(scope="module")
def demo():
    from grok1.config import resolve_config
    from grok1.tokenizer import Tokenizer
    from grok1.weights.load import load_model

    return load_model(DEMO, resolve_config(DEMO, None, None), "cpu"), Tokenizer(DEMO / "tokenizer.model")


def full_forward_loglik(model, tok, context: str, continuation: str) -> float:
    """The continuation's log-prob from one forward of the whole sequence, split as lm-eval splits it."""
    whole, ctx = tok.encode(context + continuation), tok.encode(context)
    with torch.no_grad():
        logp = model(torch.tensor([whole]))[0].float().log_softmax(-1)
    return sum(float(logp[t - 1, whole[t]]) for t in range(len(ctx), len(whole)))


def run_task(lm, tmp_path, monkeypatch, model_args=None):
    tmp_path.mkdir(exist_ok=True)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    from lm_eval.tasks import TaskManager

    name = write_task(tmp_path)
    out = lm_eval.simple_evaluate(model=lm, model_args=model_args, tasks=[name], log_samples=True, num_fewshot=0,
                                  task_manager=TaskManager(include_path=str(tmp_path)))
    return out["results"][name], out["samples"][name]


def sample_logliks(samples) -> dict[tuple[int, int], float]:
    return {(s["doc_id"], j): float(r[0][0]) for s in samples for j, r in enumerate(s["resps"])}


def test_simple_evaluate_in_process(demo, tmp_path, monkeypatch):
    from grok1.eval.lm_eval import Grok1LM

    model, tok = demo
    results, samples = run_task(Grok1LM(model, tok, batch_size=2), tmp_path, monkeypatch)
    got = sample_logliks(samples)
    expected = {(i, j): full_forward_loglik(model, tok, d["question"], c)
                for i, d in enumerate(DOCS) for j, c in enumerate(d["choices"])}
    assert got == pytest.approx(expected, abs=2e-3)
    picks = [max(range(3), key=lambda j: expected[(i, j)]) for i in range(len(DOCS))]
    assert results["acc,none"] == pytest.approx(sum(p == d["answer"] for p, d in zip(picks, DOCS)) / len(DOCS))


def test_rolling_and_generation(demo):
    from lm_eval.api.instance import Instance

    from grok1.eval.lm_eval import Grok1LM

    model, tok = demo
    lm = Grok1LM(model, tok)
    text = "It is a truth universally acknowledged, that a single man"
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    ids = [tok.bos_id] + tok.encode(text)
    with torch.no_grad():
        logp = model(torch.tensor([ids]))[0].float().log_softmax(-1)
    assert rolling == pytest.approx(sum(float(logp[t - 1, ids[t]]) for t in range(1, len(ids))), abs=2e-3)

    reqs = [Instance("generate_until", {}, (p, {"until": ["."], "max_gen_toks": 12}), i)
            for i, p in enumerate(["Mr. Darcy", "Emma Woodhouse, handsome, clever, and rich,"])]
    outs = lm.generate_until(reqs)
    from grok1.engine.engine import Engine
    from grok1.engine.sampling import SamplingParams

    for (prompt, _), out in zip((r.args for r in reqs), outs):
        alone = Engine(model, tok).generate([tok.encode(prompt)],
                                            [SamplingParams(temperature=0, max_new_tokens=12, stop=(".",))])[0]
        assert out == alone.text and "." not in out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def live_serve():
    """A real `grok1 serve` of the demo model in a subprocess on a free port; yields its base URL."""
    import os
    import subprocess
    import sys
    import time

    import httpx

    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.Popen([sys.executable, "-m", "grok1", "serve", "--port", str(port), "--max-seq-len", "256",
                             "--max-batch", "4"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        assert proc.poll() is None, "grok1 serve exited"
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_local_completions_against_grok1_serve(demo, live_serve, tmp_path, monkeypatch):
    import httpx

    from grok1.eval.lm_eval import Grok1LM

    model, tok = demo
    url = live_serve
    # The endpoints lm-eval's remote tokenizer uses.
    ids = httpx.post(url + "/tokenize", json={"prompt": "Mr. Darcy bowed"}).json()["tokens"]
    assert ids == tok.encode("Mr. Darcy bowed")
    assert httpx.post(url + "/detokenize", json={"tokens": ids}).json()["prompt"] == "Mr. Darcy bowed"
    info = httpx.get(url + "/tokenizer_info").json()
    assert httpx.post(url + "/tokenize", json={"prompt": info["eos_token"]}).json()["tokens"] == [tok.eos_id]
    # echo + logprobs: the prompt's own log-probs, the first one null, then the generated token's.
    r = httpx.post(url + "/v1/completions", json={"model": "grok-1-mini", "prompt": ids, "max_tokens": 1,
                                                   "temperature": 0, "logprobs": 1, "echo": True}, timeout=120).json()
    lp = r["choices"][0]["logprobs"]
    assert r["choices"][0]["text"].startswith("Mr. Darcy bowed")
    assert len(lp["token_logprobs"]) == len(ids) + 1 and lp["token_logprobs"][0] is None
    with torch.no_grad():
        logp = model(torch.tensor([ids]))[0].float().log_softmax(-1)
    assert lp["token_logprobs"][1:-1] == pytest.approx([float(logp[t - 1, ids[t]]) for t in range(1, len(ids))],
                                                       abs=2e-3)

    args = f"model=grok-1-mini,base_url={url}/v1/completions,tokenizer_backend=remote,max_length=256,batch_size=1"
    remote_results, remote = run_task("local-completions", tmp_path / "remote", monkeypatch, args)
    local_results, local = run_task(Grok1LM(model, tok, max_length=256), tmp_path / "local", monkeypatch)
    assert sample_logliks(remote) == pytest.approx(sample_logliks(local), abs=2e-3)
    assert remote_results["acc,none"] == local_results["acc,none"]
