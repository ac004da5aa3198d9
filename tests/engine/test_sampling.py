"""Sampling functions on hand-written logits with seeded generators."""

import math

import pytest
import torch

from grok1.engine.sampling import (
    SamplingParams,
    logprobs,
    make_generators,
    params_to_tensors,
    sample,
    top_k_filter,
    top_logprobs,
    top_p_filter,
    within_vocab,
)

NEG_INF = float("-inf")


def _sample(logits: torch.Tensor, params: list[SamplingParams], generators=None) -> torch.Tensor:
    t, p, k = params_to_tensors(params, "cpu")
    return sample(logits, t, p, k, generators or make_generators(params, "cpu"))


def _kept(filtered: torch.Tensor) -> list[list[bool]]:
    return (filtered > NEG_INF).tolist()


# --- SamplingParams ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value",
    [
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -1),
        ("top_k", 2.5),
        ("max_new_tokens", 0),
        ("logprobs", -1),
        ("logprobs", 21),
        ("stop", "\n"),
        ("stop", ("",)),
    ],
)
def test_params_validation(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"SamplingParams.{field}=") as e:
        SamplingParams(**{field: value})
    assert "must be" in str(e.value)


def test_params_defaults_and_tensors() -> None:
    params = [SamplingParams(), SamplingParams(temperature=0.0, top_p=0.5, top_k=7, seed=3, logprobs=20)]
    t, p, k = params_to_tensors(params, "cpu")
    assert t.dtype == p.dtype == torch.float32 and k.dtype == torch.int64
    assert t.tolist() == [1.0, 0.0] and p.tolist() == [1.0, 0.5] and k.tolist() == [0, 7]
    gens = make_generators(params, "cpu")
    assert gens[0] is None and gens[1].initial_seed() == 3


# --- top-k / top-p ----------------------------------------------------------------------


def test_top_k_exact_and_ties() -> None:
    logits = torch.tensor([[3.0, 2.0, 2.0, 1.0]] * 5)
    out = top_k_filter(logits, torch.tensor([1, 2, 3, 0, 100]))
    assert _kept(out) == [
        [True, False, False, False],
        [True, True, True, False],  # k=2: the tie at the 2nd place is kept
        [True, True, True, False],
        [True, True, True, True],  # 0 = off
        [True, True, True, True],  # k > V keeps all
    ]
    distinct = torch.tensor([[0.1, 0.5, -1.0, 2.0, 0.3, 0.0]])
    for k in range(1, 7):
        kept = top_k_filter(distinct, torch.tensor([k])) > NEG_INF
        assert kept.sum() == k and kept[0, distinct[0].topk(k).indices].all()


def test_top_p_reference_rule() -> None:
    # probs [0.5, 0.3, 0.15, 0.05]; ascending cumsum [0.05, 0.2, 0.5, 1.0].
    # keep logits >= the logit at the first index whose cumsum reaches 1 - p.
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(5, 4)
    out = top_p_filter(logits, torch.tensor([1.0, 0.9, 0.75, 0.4, 0.01]))
    assert _kept(out) == [
        [True, True, True, True],  # 1 - p = 0    -> index 0 (0.05): all
        [True, True, True, False],  # 1 - p = 0.1  -> index 1 (0.15)
        [True, True, False, False],  # 1 - p = 0.25 -> index 2 (0.3)
        [True, False, False, False],  # 1 - p = 0.6  -> index 3 (0.5)
        [True, False, False, False],
    ]
    assert torch.equal(out[0], logits[0])  # kept logits are unchanged


def test_top_p_ties_kept() -> None:
    # softmax([1, 0, 0, 0]) = [0.475, 0.175, 0.175, 0.175]; ascending cumsum [0.175, 0.35, 0.525, 1]
    logits = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 3)
    out = top_p_filter(logits, torch.tensor([0.5, 0.6, 0.3]))
    assert _kept(out) == [
        [True, True, True, True],  # 1 - p = 0.5 -> index 2, logit 0: all three tied zeros kept
        [True, True, True, True],  # 1 - p = 0.4 -> index 2
        [True, False, False, False],  # 1 - p = 0.7 -> index 3
    ]


def test_inputs_not_modified() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g).to(torch.bfloat16)
    before = logits.clone()
    t = torch.tensor([0.0, 0.7, 1.3])
    p = torch.tensor([1.0, 0.5, 0.9])
    k = torch.tensor([0, 5, 10])
    top_k_filter(logits, k), top_p_filter(logits, p), logprobs(logits), top_logprobs(logits, 3)
    tokens = sample(logits, t, p, k, [None, g, None])
    assert torch.equal(logits, before) and tokens.dtype == torch.int64 and tokens.shape == (3,)
    assert t.tolist() == pytest.approx([0.0, 0.7, 1.3]) and k.tolist() == [0, 5, 10]


# --- sample -----------------------------------------------------------------------------


def test_greedy_argmax_lowest_id_on_ties() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0, 5.0], [9.0, 9.0, 0.0, 0.0], [-1.0, -2.0, -3.0, -0.5]])
    tokens = _sample(logits, [SamplingParams(temperature=0.0)] * 3)
    assert tokens.tolist() == [1, 0, 3]


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_empirical_distribution(temperature: float) -> None:
    """Frequencies over seeded draws match softmax(logits / T) (chi-square, df = V - 1)."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    B, rounds = 2000, 10
    g = torch.Generator().manual_seed(1234)
    counts = torch.zeros(5)
    for _ in range(rounds):
        t, p, k = torch.full((B,), temperature), torch.ones(B), torch.zeros(B, dtype=torch.long)
        tokens = sample(logits.expand(B, 5), t, p, k, [g] * B)  # one generator shared by all rows
        counts += torch.bincount(tokens, minlength=5)
    expected = (logits / temperature).softmax(-1) * B * rounds
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 18.47, (chi2, counts, expected)  # 99.9% quantile of chi2(4)


def test_filters_respected_when_sampling() -> None:
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0, -2.0]).expand(2, 6)
    params = [SamplingParams(top_k=2, seed=0), SamplingParams(top_p=0.5, seed=1)]
    t, p, k = params_to_tensors(params, "cpu")
    gens = make_generators(params, "cpu")
    draws = torch.stack([sample(logits, t, p, k, gens) for _ in range(300)])  # [300, 2]
    assert set(draws[:, 0].tolist()) == {0, 1}  # top-k 2
    # p = 0.5: the largest prob (0.63) alone reaches it, so only the argmax survives
    assert set(draws[:, 1].tolist()) == {0}


def _run(logits_steps: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Sample every step of logits_steps [S, B, V] with one set of generators -> [S, B]."""
    t, p, k = params_to_tensors(params, "cpu")
    gens = make_generators(params, "cpu")
    return torch.stack([sample(step, t, p, k, gens) for step in logits_steps])


def test_same_seed_same_tokens() -> None:
    steps = torch.randn(8, 3, 1000, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=0.8, top_p=0.95, seed=s) for s in (11, 12, 11)]
    first, second = _run(steps, params), _run(steps, params)
    assert torch.equal(first, second)
    assert not torch.equal(first[:, 0], first[:, 1])  # different seeds differ (8 draws from 1000 ids)


def test_row_independent_of_batch() -> None:
    """A seeded request gets the same tokens alone or batched with other requests."""
    g = torch.Generator().manual_seed(7)
    V = 4096
    mine = SamplingParams(temperature=0.9, top_p=0.9, top_k=100, seed=42)
    others = [SamplingParams(temperature=1.5, seed=1), SamplingParams(temperature=0.0), SamplingParams(top_p=0.3)]
    batch_steps = torch.randn(10, 4, V, generator=g) * 3  # row 2 is `mine`
    alone = _run(batch_steps[:, 2:3], [mine])
    batched = _run(batch_steps, [others[0], others[1], mine, others[2]])
    assert torch.equal(alone[:, 0], batched[:, 2])


def test_mixed_greedy_and_sampled_rows() -> None:
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(3))
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(seed=1),
        SamplingParams(temperature=0.0, top_k=5),
        SamplingParams(seed=2),
    ]
    draws = _run(logits.expand(50, 4, 300), params)  # [50, 4]
    argmax = logits.argmax(-1)
    assert (draws[:, 0] == argmax[0]).all() and (draws[:, 2] == argmax[2]).all()
    assert len(set(draws[:, 1].tolist())) > 1 and len(set(draws[:, 3].tolist())) > 1


def test_logprobs() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.bfloat16)
    lp = logprobs(logits)
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(2))
    torch.testing.assert_close(lp[1], torch.full((4,), -math.log(4)))
    values, ids = top_logprobs(logits, 2)
    assert values.shape == ids.shape == (2, 2) and ids[0].tolist() == [0, 1]
    torch.testing.assert_close(values[0], lp[0, :2])


def test_sample_requests_equals_sample_row_by_row():
    """Mixed greedy / filtered / plain rows: the shortcut path gives what `sample` gives each row."""
    from grok1.engine.sampling import sample_requests

    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(3)) * 3
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, top_k=5, seed=1),
              SamplingParams(temperature=1.2, seed=2), SamplingParams(temperature=0.7, top_p=0.6, seed=3)]
    got = sample_requests(logits, params, make_generators(params, "cpu"))
    for b, p in enumerate(params):
        t, tp, tk = params_to_tensors([p], "cpu")
        want = sample(logits[b : b + 1], t, tp, tk, make_generators([p], "cpu"))
        assert got[b] == want[0], b


@pytest.mark.parametrize("temperature", [1e-30, 1e-38, 1e-40, 1e-45])
def test_tiny_temperature_is_the_greedy_limit(temperature: float) -> None:
    """logits / 1e-45 overflows to +-inf and inf - inf = nan; the limit T -> 0 of sampling is the argmax."""
    from grok1.engine.sampling import sample_requests

    logits = torch.randn(3, 300, generator=torch.Generator().manual_seed(5)) * 4
    logits[2] = logits[2] - 1e4  # large negative logits too: the argmax still wins
    params = [SamplingParams(temperature=temperature, seed=s, top_p=tp, top_k=tk)
              for s, tp, tk in [(0, 1.0, 0), (1, 0.9, 0), (2, 1.0, 50)]]
    want = logits.argmax(-1)
    for _ in range(5):
        assert sample_requests(logits, params, make_generators(params, "cpu")).tolist() == want.tolist()
    assert _sample(logits, params).tolist() == want.tolist()


def test_logit_bias_bans_and_forces_tokens() -> None:
    from grok1.engine.sampling import sample_requests

    logits = torch.randn(2, 40, generator=torch.Generator().manual_seed(2))
    top = logits.argmax(-1)
    banned = SamplingParams(temperature=0.0, logit_bias=((int(top[0]), -100.0),))
    forced = SamplingParams(temperature=0.9, seed=3, logit_bias=((7, 100.0),))
    got = sample_requests(logits, [banned, forced], make_generators([banned, forced], "cpu"))
    masked = logits[0].clone()
    masked[top[0]] -= 100
    assert got.tolist() == [int(masked.argmax()), 7]
    before = logits.clone()
    sample_requests(logits, [banned, forced], make_generators([banned, forced], "cpu"))
    assert torch.equal(logits, before)  # the caller's logits are not edited
    for bad in [((1, math.nan),), ((-1, 1.0),), ((1.5, 1.0),), [(1, 1.0)]]:
        with pytest.raises(ValueError, match="SamplingParams.logit_bias="):
            SamplingParams(logit_bias=bad)


def test_within_vocab_masks_ids_the_tokenizer_lacks():
    logits = torch.tensor([[0.0, 1.0, 5.0, 9.0], [3.0, 2.0, 1.0, 0.0]])
    masked = within_vocab(logits, 2)
    assert masked.tolist() == [[0.0, 1.0, NEG_INF, NEG_INF], [3.0, 2.0, NEG_INF, NEG_INF]]
    assert logits[0, 3] == 9.0  # the caller's logits are untouched
    assert within_vocab(logits, None) is logits and within_vocab(logits, 4) is logits
    assert masked.argmax(-1).tolist() == [1, 0]
