"""The Scheduler alone (no model): admission into slots, prefill budget, stop conditions, cancel, limits."""


from grok1.engine.sampling import SamplingParams
from grok1.engine.scheduler import Request, Scheduler

EOS = 2


def make(max_batch=2, max_seq_len=16, prefill_tokens=64):
    return Scheduler(max_batch, max_seq_len, prefill_tokens, EOS)


def req(n=3, **params):
    return Request(list(range(5, 5 + n)), SamplingParams(**({"max_new_tokens": 4} | params)))


def test_admits_into_free_slots_in_arrival_order():
    s = make()
    a, b, c = req(), req(), req()
    for r in (a, b, c):
        s.add(r)
    batch, emits = s.schedule()
    assert batch.prefill == [a, b] and batch.decode == [] and emits == []
    assert (a.slot, b.slot, c.slot) == (0, 1, -1) and list(s.waiting) == [c]
    s.postprocess([a, b], [7, 8], [None, None])
    batch, _ = s.schedule()
    assert batch.prefill == [] and batch.decode == [a, b]


def test_finished_request_frees_its_slot_for_the_next_step():
    s = make(max_batch=1)
    a, b = req(max_new_tokens=1), req()
    s.add(a)
    s.add(b)
    s.schedule()
    ((r, out),) = s.postprocess([a], [9], [None])
    assert r is a and out.finish_reason == "length" and out.token_ids == [9] and out.completion_tokens == 1
    batch, _ = s.schedule()
    assert batch.prefill == [b] and b.slot == 0


def test_stop_conditions_eos_length_and_context():
    s = make(max_seq_len=6)
    eos, length, ctx, ignore = req(), req(max_new_tokens=2), req(n=4, max_new_tokens=9), req(ignore_eos=True)
    for r in (eos, length, ctx):
        s.add(r)
    s.schedule()
    first = s.postprocess([eos, length, ctx], [EOS, 7, 7], [None] * 3)
    assert [o.finish_reason for _, o in first] == ["eos", None, None]
    assert eos.output_ids == []  # EOS is not part of the completion
    second = s.postprocess([length, ctx], [7, 7], [None] * 2)
    assert [o.finish_reason for _, o in second] == ["length", "length"]  # 4 + 2 tokens fill a 6-token context
    s.add(ignore)
    s.schedule()
    assert s.postprocess([ignore], [EOS], [None])[0][1].finish_reason is None


def test_prefill_budget_limits_padded_prompt_tokens_but_admits_one():
    s = make(max_batch=4, max_seq_len=64, prefill_tokens=10)
    big, small1, small2 = req(n=20), req(n=3), req(n=3)
    for r in (big, small1, small2):
        s.add(r)
    assert s.schedule()[0].prefill == [big]  # over budget alone, still admitted
    assert s.schedule()[0].prefill == [small1, small2]  # 2 x 3 <= 10
    s2 = make(max_batch=4, max_seq_len=64, prefill_tokens=8)
    for r in (req(n=3), req(n=3), req(n=3)):
        s2.add(r)
    assert len(s2.schedule()[0].prefill) == 2  # 3 x 3 = 9 > 8


def test_cancel_retires_waiting_and_running_at_next_schedule():
    s = make(max_batch=1)
    a, b = req(), req()
    s.add(a)
    s.add(b)
    s.schedule()
    s.cancel(a.id)
    s.cancel(b.id)
    s.cancel("no-such-request")  # unknown ids are ignored
    batch, emits = s.schedule()
    assert len(batch) == 0 and {o.finish_reason for _, o in emits} == {"cancelled"}
    assert s.slots.num_free == 1 and not s.has_work() and s.requests == {}
