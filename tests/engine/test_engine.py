"""The continuous-batching Engine: batching never changes results, slots come back, limits are errors."""

import threading
from contextlib import contextmanager

import pytest
import torch
from conftest import generate

from grok1.engine.engine import Engine, EngineConfig
from grok1.engine.errors import QueueFull
from grok1.engine.sampling import SamplingParams

PROMPTS = [[5, 9, 200, 31, 7, 7, 100], [42], [300, 301, 302, 303], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True)


def engine(model, tokenizer=None, **config) -> Engine:
    return Engine(model, tokenizer, EngineConfig(**({"max_batch": 4, "max_seq_len": 64} | config)))


def run_staggered(eng, prompts, params):
    """Requests arrive one per step, so they join a batch that is already decoding."""
    reqs = []
    for p, sp in zip(prompts, params):
        reqs.append(eng.add_request(p, sp))
        eng.step()
    while any(r.finish_reason is None for r in reqs):
        eng.step()
    return [r.output_ids for r in reqs]



def demo(packed: bool = False):
    """The bundled demo model (int8, compiled kernels), packed in panels as the commands run it or not."""
    from grok1 import kernels
    from grok1.cli.common import DEFAULT_CHECKPOINT
    from grok1.config import resolve_config
    from grok1.tokenizer import Tokenizer
    from grok1.weights.load import load_model

    if packed and kernels.cpu_ops() is None:
        pytest.skip("the CPU kernel could not be compiled here: nothing is packed")
    model = load_model(DEFAULT_CHECKPOINT, resolve_config(DEFAULT_CHECKPOINT, None, None), pack=packed)
    return model, Tokenizer(DEFAULT_CHECKPOINT / "tokenizer.model")


@contextmanager
def counting_forwards(model):
    """A list that gets one entry per model call while the block runs."""
    calls = []
    forward = model.forward
    model.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    try:
        yield calls
    finally:
        del model.forward

def test_concurrent_greedy_equals_each_alone_and_static_generate(small_model):
    eng = engine(small_model)
    alone = [eng.generate([p], [GREEDY])[0].output_ids for p in PROMPTS]
    assert [c.token_ids for c in generate(small_model, PROMPTS, [GREEDY] * 4)] == alone
    assert [r.output_ids for r in eng.generate(PROMPTS, [GREEDY] * 4)] == alone
    assert run_staggered(eng, PROMPTS, [GREEDY] * 4) == alone
    # more requests than slots: some wait, then reuse the slots of finished ones
    assert [r.output_ids for r in engine(small_model, max_batch=2).generate(PROMPTS, [GREEDY] * 4)] == alone


def test_seeded_sampling_is_independent_of_the_batch(small_model):
    params = [SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=s, max_new_tokens=10, ignore_eos=True)
              for s in range(4)]
    mixed = [params[0], GREEDY, params[2], params[3]]  # greedy and sampled rows in one batch
    eng = engine(small_model)
    for ps in (params, mixed):
        alone = [eng.generate([p], [sp])[0].output_ids for p, sp in zip(PROMPTS, ps)]
        assert run_staggered(eng, PROMPTS, ps) == alone
        assert [c.token_ids for c in generate(small_model, PROMPTS, ps)] == alone


def test_golden_model_batched_text_equals_alone(golden_model, shared_dir):
    from grok1.tokenizer import Tokenizer

    tok = Tokenizer(shared_dir / "grok-1" / "tokenizer.model")
    eng = Engine(golden_model, tok, EngineConfig(max_batch=8, max_seq_len=128))
    texts = ["The answer to life the universe and everything is", "Hello", "Once upon a time", "1, 2, 3,"]
    prompts = [tok.encode(t) for t in texts]
    params = [SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)] * 4
    alone = [eng.generate([p], params[:1])[0] for p in prompts]
    together = eng.generate(prompts * 2, params * 2)
    assert [r.output_ids for r in together] == [r.output_ids for r in alone] * 2
    assert [r.text for r in together] == [tok.decode(r.output_ids) for r in alone] * 2
    # a stop string cuts the text before it and finishes with "stop"
    cut = alone[0].text[4:7]
    stopped = eng.generate([prompts[0]], [SamplingParams(temperature=0.0, max_new_tokens=8, stop=(cut,))])[0]
    assert stopped.finish_reason == "stop" and stopped.text == alone[0].text[: alone[0].text.index(cut)]


def test_cancel_frees_the_slot_at_the_next_step(small_model):
    eng = engine(small_model, max_batch=1)
    long = eng.add_request(PROMPTS[0], SamplingParams(temperature=0.0, max_new_tokens=50))
    waiting = eng.add_request(PROMPTS[1], GREEDY)
    eng.step()
    eng.step()
    assert eng.stats()["free_slots"] == 0 and waiting.slot == -1
    eng.cancel(long.id)
    outs = eng.step()
    assert long.finish_reason == "cancelled" and waiting.slot == 0
    assert [o.finish_reason for o in outs if o.request_id == long.id] == ["cancelled"]
    stream = eng.stream(PROMPTS[2], GREEDY)
    next(stream)
    stream.close()  # the client stops reading: the request is cancelled and its slot freed right away
    while waiting.finish_reason is None:
        eng.step()
    assert eng.stats()["free_slots"] == 1 and not eng.scheduler.has_work()
    many = [eng.add_request(p, GREEDY) for p in PROMPTS]
    eng.step()
    eng.cancel_all()  # the end of a graceful shutdown
    eng.step()
    assert {r.finish_reason for r in many} == {"cancelled"} and eng.stats()["free_slots"] == 1


def test_prompt_too_long_empty_and_queue_full_are_rejected(small_model):
    eng = engine(small_model, max_seq_len=16, max_queue=2)
    with pytest.raises(ValueError, match="16 tokens but the context holds 16"):
        eng.add_request(list(range(5, 21)), GREEDY)
    with pytest.raises(ValueError, match="empty"):
        eng.add_request([], GREEDY)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        eng.add_request([5, small_model.config.vocab_size], GREEDY)
    eng.add_request([5], GREEDY)
    eng.add_request([5], GREEDY)
    with pytest.raises(QueueFull):
        eng.add_request([5], GREEDY)
    # a prompt that leaves room for some tokens stops at the end of the context
    short = engine(small_model, max_seq_len=16).generate([list(range(5, 17))], [GREEDY])[0]
    assert short.finish_reason == "length" and len(short.output_ids) == 4


def test_logprobs_match_a_full_forward(small_model):
    eng = engine(small_model)
    outs = list(eng.stream(PROMPTS[0], SamplingParams(temperature=0.0, max_new_tokens=3, ignore_eos=True),
                           logprobs=3))
    ids = PROMPTS[0] + [o.token_ids[0] for o in outs]
    with torch.no_grad():
        ref = small_model(torch.tensor([ids]))[0].float().log_softmax(-1)  # [T, V]
    for i, o in enumerate(outs):
        (lp,) = o.logprobs
        row = ref[len(PROMPTS[0]) - 1 + i]
        assert lp.token_id == ids[len(PROMPTS[0]) + i]
        assert lp.logprob == pytest.approx(float(row[lp.token_id]), abs=1e-4)
        assert [t for t, _ in lp.top] == row.topk(3).indices.tolist()


def test_background_thread_serves_many_threads_and_shuts_down(small_model):
    eng = engine(small_model)
    alone = [eng.generate([p], [GREEDY])[0].output_ids for p in PROMPTS]
    eng.start()
    results, done = {}, threading.Barrier(len(PROMPTS) + 1)

    def client(i):
        got = []
        finished = threading.Event()

        def sink(out):
            got.extend(out.token_ids)
            if out.finish_reason:
                finished.set()

        eng.add_request(PROMPTS[i], GREEDY, on_output=sink)
        finished.wait(timeout=120)
        results[i] = got
        done.wait(timeout=120)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    done.wait(timeout=120)
    assert [results[i] for i in range(len(PROMPTS))] == alone
    stuck = []
    eng.add_request(PROMPTS[0], SamplingParams(max_new_tokens=60), on_output=lambda o: stuck.append(o))
    eng.shutdown()
    assert stuck and stuck[-1].finish_reason == "cancelled" and not eng.alive()
    with pytest.raises(RuntimeError, match="shutting down"):
        eng.add_request([5], GREEDY)


def test_a_failing_step_finishes_its_requests_with_error_and_the_engine_goes_on(small_model, monkeypatch):
    eng = engine(small_model)
    real = eng.runner._decode
    calls = {"n": 0}

    def flaky(reqs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return real(reqs)

    monkeypatch.setattr(eng.runner, "_decode", flaky)
    eng.start()
    try:
        outs, finished = [], threading.Event()
        eng.add_request(PROMPTS[0], GREEDY, on_output=lambda o: (outs.append(o), o.finish_reason and finished.set()))
        assert finished.wait(timeout=60) and outs[-1].finish_reason == "error"
        outs.clear()
        finished.clear()
        eng.add_request(PROMPTS[0], GREEDY, on_output=lambda o: (outs.append(o), o.finish_reason and finished.set()))
        assert finished.wait(timeout=60) and outs[-1].finish_reason == "length" and eng.alive()
    finally:
        eng.shutdown()


def test_prompts_joining_a_running_batch_share_its_forward_and_change_nothing():
    """On the bundled demo model (int8, compiled kernels, as served): a prompt that arrives while others
    decode is run in the same forward as them (one model call per step), and every request still gets
    exactly the tokens it gets alone."""
    model, tok = demo()
    prompts = [tok.encode(t) for t in ["It is a truth universally acknowledged", "Mr. Darcy was",
                                       "The weather at Longbourn", "She said"]]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=24, ignore_eos=True)
    eng = Engine(model, tok, EngineConfig(max_batch=4, max_seq_len=128))
    alone = [eng.generate([p], [greedy])[0].output_ids for p in prompts]
    with counting_forwards(model) as calls:
        reqs = []
        for p in prompts:
            reqs.append(eng.add_request(p, greedy))
            before = len(calls)
            eng.step()
            assert len(calls) - before == 1, "the new prompt and the running requests took separate forwards"
        while any(r.finish_reason is None for r in reqs):
            eng.step()
    assert [r.output_ids for r in reqs] == alone


def test_packed_model_takes_any_batch_of_prompts_in_one_forward_and_changes_nothing():
    """With panel-packed weights (what `grok1 serve` runs) no batch size switches kernels, so prompts joining a
    running batch share its forward even past the row-major kernel's 32-row switch, and every request still
    gets exactly the tokens it gets alone."""
    from grok1 import kernels
    from grok1.panels import is_packed

    model, tok = demo(packed=True)
    assert is_packed(model)
    texts = ["It is a truth universally acknowledged, that a single man", "Mr. Darcy was", "She said",
             "The weather at Longbourn had been fine for a week, and the ladies", "Elizabeth could not help",
             "Mrs. Bennet was quite disconcerted by the news that the officers would", "Jane smiled"]
    prompts = [tok.encode(t) for t in texts]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)
    eng = Engine(model, tok, EngineConfig(max_batch=8, max_seq_len=128))
    alone = [eng.generate([p], [greedy])[0].output_ids for p in prompts]
    with counting_forwards(model) as calls:
        reqs = [eng.add_request(p, greedy) for p in prompts[:2]]
        eng.step()
        eng.step()
        reqs += [eng.add_request(p, greedy) for p in prompts[2:]]  # five prompts at once join two decoding rows
        assert 2 + sum(len(p) for p in prompts[2:]) > kernels.GEMM_MIN_ROWS
        before = len(calls)
        eng.step()
        assert len(calls) - before == 1, "the prompts and the running requests took separate forwards"
        while any(r.finish_reason is None for r in reqs):
            eng.step()
    assert [r.output_ids for r in reqs] == alone


def test_prefix_reuse_skips_what_a_row_holds_and_changes_nothing(small_model):
    """With packed weights a prompt admitted into a row that holds a finished request's tokens computes
    only the rest, and gets exactly the tokens a fresh engine gives it; unpacked models never reuse."""
    model, tok = demo(packed=True)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True)
    first = tok.encode("It is a truth universally acknowledged")

    def fresh(prompt):
        return Engine(model, tok, EngineConfig(max_batch=2, max_seq_len=128)).generate([prompt], [greedy])[0]

    eng = Engine(model, tok, EngineConfig(max_batch=2, max_seq_len=128))
    a = eng.generate([first], [greedy])[0]
    assert a.cached == 0
    # a second turn: the first prompt, part of its answer, new words (a chat re-sends its history)
    follow = first + a.output_ids[:6] + tok.encode(" said Mrs. Bennet")
    b = eng.generate([follow], [greedy])[0]
    assert b.cached == len(first) + 6 and b.output_ids == fresh(follow).output_ids
    again = eng.generate([first], [greedy])[0]  # the same prompt: all but its last token are held
    assert again.cached == len(first) - 1 and again.output_ids == a.output_ids
    # two at once: one row holds a prefix of both; the longer match takes it, the other prompt runs whole
    both = eng.generate([follow, first], [greedy, greedy])
    assert [r.output_ids for r in both] == [b.output_ids, a.output_ids]
    assert [r.cached for r in both] == [len(first) + 6, 0]
    assert eng.stats()["reused_prompt_tokens"] == sum(r.cached for r in [b, again, *both])
    plain = Engine(small_model, None, EngineConfig(max_batch=2, max_seq_len=64))
    p = [5, 9, 200, 31]
    plain.generate([p], [greedy])
    assert plain.generate([p], [greedy])[0].cached == 0
