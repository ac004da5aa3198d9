import pytest

from grok1.eval.perplexity import windows


@pytest.mark.parametrize("n, window, stride", [(10, 4, 4), (10, 4, 2), (10, 4, 1), (3, 8, 4), (100, 16, 5), (2, 2, 1)])
def test_every_token_after_the_first_is_scored_once(n, window, stride):
    spans = windows(n, window, stride)
    scored = [t for b, e, f in spans for t in range(f, e)]
    assert scored == list(range(1, n))
    for b, e, f in spans:
        assert e - b <= window and b < f <= e
        assert f - b >= min(window - stride, f)  # at least window - stride tokens of context once past the start


def test_hand_computed_windows():
    assert windows(10, 4, 2) == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    assert windows(10, 4, 4) == [(0, 4, 1), (3, 7, 4), (6, 10, 7)]


@pytest.mark.parametrize("n, window, stride", [(10, 1, 1), (10, 4, 5), (10, 4, 0), (1, 4, 2)])
def test_bad_settings(n, window, stride):
    with pytest.raises(ValueError):
        windows(n, window, stride)
