"""score: per-token log-probabilities against a full forward's log-softmax."""

import pytest
import torch

from grok1.eval.score import score

PROMPTS = [[5, 9, 200, 31, 7, 7, 100], [42], [300, 301, 302, 303]]


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
