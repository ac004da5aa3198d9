"""Generation to the end, as `grok1 generate` runs it (Engine.generate on an engine sized for the prompts):
batching invariance, stop conditions, streamed outputs, bad prompts."""

import dataclasses

import pytest
import torch
from conftest import generate

from grok1.engine.engine import engine_for
from grok1.engine.sampling import SamplingParams
from grok1.tokenizer import Tokenizer

PROMPTS = [[5, 9, 200, 31, 7, 7, 100], [42], [300, 301, 302, 303]]


@pytest.fixture(scope="module")
def tok(shared_dir_module):
    return Tokenizer(shared_dir_module / "grok-1" / "tokenizer.model")


@pytest.fixture(scope="module")
def shared_dir_module():
    from conftest import SHARED

    if not (SHARED / "grok-1" / "tokenizer.model").is_file():
        pytest.skip(f"Grok-1 tokenizer not found under {SHARED}")
    return SHARED


def test_batch_of_different_lengths_equals_each_alone(small_model):
    greedy = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)
    seeded = [SamplingParams(temperature=0.9, top_p=0.9, seed=s, max_new_tokens=12, ignore_eos=True)
              for s in (1, 2, 3)]
    for params in ([greedy] * 3, seeded):
        together = [c.token_ids for c in generate(small_model, PROMPTS, params)]
        alone = [generate(small_model, [p], [sp])[0].token_ids for p, sp in zip(PROMPTS, params)]
        assert together == alone
        assert all(len(t) == 12 for t in together)


def test_generation_equals_full_recompute_argmax(small_model):
    params = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)
    ids = list(PROMPTS[0])
    with torch.no_grad():
        for _ in range(8):
            ids.append(int(small_model(torch.tensor([ids]))[0, -1].argmax()))
    assert generate(small_model, [PROMPTS[0]], [params])[0].token_ids == ids[len(PROMPTS[0]):]


def test_stops_on_eos_unless_ignored(small_model):
    params = SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True)
    free = generate(small_model, [PROMPTS[2]], [params])[0].token_ids
    eos = free[4]
    first = free.index(eos)
    small_model.config = dataclasses.replace(small_model.config, eos_id=eos)
    stopped = generate(small_model, [PROMPTS[2]], [dataclasses.replace(params, ignore_eos=False)])[0]
    assert stopped.token_ids == free[:first] and stopped.finish_reason == "eos"
    ignored = generate(small_model, [PROMPTS[2]], [params])[0]
    assert ignored.token_ids == free and ignored.finish_reason == "length"


def test_stream_events_add_up(small_model, tok):
    params = SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True)
    prompts = [PROMPTS[0], PROMPTS[1]]
    eng = engine_for(small_model, tok, prompts, [params, params])
    events = []  # (row, output) as they arrive, the two requests sharing each step
    reqs = [eng.add_request(p, params, on_output=lambda out, row=row: events.append((row, out)))
            for row, p in enumerate(prompts)]
    while any(r.finish_reason is None for r in reqs):
        eng.step()
    for row in (0, 1):
        mine = [out for r, out in events if r == row]
        completion = reqs[row]
        assert [t for out in mine for t in out.token_ids] == completion.output_ids
        assert "".join(out.text for out in mine) == completion.text == tok.decode(completion.output_ids)


def test_stop_string_in_generation(small_model, tok):
    params = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)
    free = generate(small_model, [PROMPTS[0]], [params], tok)[0]
    stop = free.text[len(free.text) // 2: len(free.text) // 2 + 3]
    assert stop
    cut = generate(small_model, [PROMPTS[0]], [dataclasses.replace(params, stop=(stop,))], tok)[0]
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[: free.text.index(stop)]


def test_bad_prompts_are_rejected(small_model):
    params = SamplingParams(max_new_tokens=4)
    with pytest.raises(ValueError, match="empty"):
        generate(small_model, [[]], [params])
    with pytest.raises(ValueError, match="context holds"):
        generate(small_model, [[5] * small_model.config.max_seq_len], [params])
    with pytest.raises(ValueError, match="tokenizer"):
        generate(small_model, [[5]], [SamplingParams(stop=("x",))])


def test_max_new_tokens_capped_by_context(small_model):
    n = small_model.config.max_seq_len
    c = generate(small_model, [[5] * (n - 3)], [SamplingParams(temperature=0, max_new_tokens=50, ignore_eos=True)])[0]
    assert len(c.token_ids) == 3 and c.finish_reason == "length"


