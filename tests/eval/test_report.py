import math

from grok1.eval import report


def test_mean_and_standard_error_by_hand():
    mean, se = report.mean_se([1, 0, 1, 1])
    assert mean == 0.75
    assert math.isclose(se, math.sqrt(0.75 * 0.25 / 3))  # p(1-p)/(n-1), lm-eval's sample stderr


def test_macro_average_over_subjects():
    recs = [{"subject": "a", "correct": True}, {"subject": "a", "correct": False},
            {"subject": "b", "correct": True}, {"subject": "b", "correct": True}, {"subject": "b", "correct": True}]
    s = report.summarize(recs, {"acc": "correct"}, by="subject")
    assert s["acc"]["value"] == 0.8
    assert s["acc_macro"]["value"] == (0.5 + 1.0) / 2 and s["acc_macro"]["groups"] == 2
    assert math.isclose(s["acc_macro"]["stderr"], math.sqrt(0.5 ** 2 + 0.0) / 2)  # SE(a) = sqrt(.25/1) = .5
    assert s["acc_by_subject"]["a"] == {"value": 0.5, "stderr": 0.5, "n": 2}


def test_perplexity_is_token_weighted():
    s = report.perplexity_summary([{"tokens": 2, "logprob": -2.0}, {"tokens": 6, "logprob": -10.0}])
    assert s["nll_per_token"] == 1.5 and math.isclose(s["perplexity"], math.exp(1.5))


def test_table_sits_beside_xais_numbers():
    s = report.summarize([{"correct": True}, {"correct": False}], {"strict": "correct"})
    t = report.table("gsm8k", "GSM8k", s, {"items": 2, "wall_s": 1.0, "items_per_s": 2.0})
    assert "62.9" in t and "50.0" in t and "base model" in t
