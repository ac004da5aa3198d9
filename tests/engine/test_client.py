"""The edge every request passes once (check_request, check_room), whichever EngineClient takes it."""

import pytest

from grok1.engine.client import check_request, check_room
from grok1.engine.errors import ContextOverflow, InvalidRequest, QueueFull
from grok1.engine.sampling import SamplingParams


def check(prompt_ids, vocab_size=512, max_seq_len=8, has_tokenizer=False, **params):
    check_request(prompt_ids, SamplingParams(**params), vocab_size, max_seq_len, has_tokenizer)


def test_limits_are_clear_errors():
    with pytest.raises(ValueError, match="8 tokens but the context holds 8"):
        check(list(range(5, 13)))
    with pytest.raises(ValueError, match="empty"):
        check([])
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        check([5, 6, 7], stop=("x",))
    check_room(0, 1)
    with pytest.raises(QueueFull, match="limit is 1"):
        check_room(1, 1)


def test_errors_have_their_kinds_and_a_good_request_passes():
    with pytest.raises(ContextOverflow):
        check(list(range(5, 13)))
    with pytest.raises(InvalidRequest, match="token id 512 is outside"):
        check([5, 512])
    with pytest.raises(InvalidRequest, match="token id -1 is outside"):
        check([-1])
    check(list(range(5, 12)), stop=("x",), has_tokenizer=True)  # 7 tokens leave room for one more
