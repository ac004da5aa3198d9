"""Static-batch generation: batching invariance, stop conditions, streaming, scoring."""

import dataclasses

import pytest
import torch

from grok1.engine.generate import TextStream, generate, generate_stream, score
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
    events = list(generate_stream(small_model, [PROMPTS[0], PROMPTS[1]], [params, params], tok))
    for row in (0, 1):
        mine = [e for e in events if e[0] == row]
        completion = mine[-1][3]
        assert [e[1] for e in mine] == completion.token_ids
        assert "".join(e[2] for e in mine) == completion.text == tok.decode(completion.token_ids)


def test_text_stream_cuts_at_stop_string_and_holds_back_prefixes(tok):
    ids = tok.encode("Hello world. The end is near.")
    stream = TextStream(tok, ["end is"])
    out = []
    for i in ids:
        out.append(stream.push(i))
        if stream.stopped:
            break
    assert stream.stopped
    assert "".join(out) == "Hello world. The "
    # Text that could start a stop string is held back until it is clear, then released.
    stream = TextStream(tok, ["world!"])
    pieces = [stream.push(i) for i in tok.encode("Hello world.")]
    assert not stream.stopped
    assert "".join(pieces) + stream.finish() == "Hello world."
    assert "world" not in "".join(pieces[: len(tok.encode("Hello world"))])


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


def test_score_is_log_softmax_of_next_token(small_model):
    ids = PROMPTS[0]
    result = score(small_model, ids, top=3)
    with torch.no_grad():
        logp = torch.log_softmax(small_model(torch.tensor([ids]))[0], -1)
    expect = [logp[t, ids[t + 1]].item() for t in range(len(ids) - 1)]
    assert result["token_logprobs"] == pytest.approx(expect, abs=1e-5)
    assert result["total_logprob"] == pytest.approx(sum(expect), abs=1e-4)
    assert result["perplexity"] == pytest.approx(torch.tensor(expect).mean().neg().exp().item(), rel=1e-5)
    assert result["top_ids"][0][0] == int(logp[0].argmax())
    with pytest.raises(ValueError):
        score(small_model, [5])


def test_continuation_keeps_its_leading_space(tok):
    """Decoded after the prompt, a first piece "▁word" gives " word" (alone it would lose the space)."""
    prompt = tok.encode("She was rich,")
    cont = tok.encode("She was rich, and happy")[len(prompt):]
    stream = TextStream(tok, [], prompt)
    text = "".join(stream.push(t) for t in cont) + stream.finish()
    assert text == " and happy"
    assert tok.decode(prompt + cont) == tok.decode(prompt) + text
