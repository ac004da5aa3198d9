import json

import pytest

from grok1.eval import gsm8k


@pytest.mark.parametrize("completion, strict, flexible", [
    (" She has 23 - 15 = 8 dollars left. The answer is 8.", "8", "8"),
    (" The answer is $1,234.", "1234", "1234"),
    (" The answer is 18 dollars.\n", "18", "18"),
    (" The answer is -3.", "-3", "-3"),
    (" The answer is 2.50", "2.5", "2.5"),
    (" The answer is 7.00.", "7", "7"),
    (" So 5 * 4 = 20 computers were added. 9 + 20 is 29 computers.", None, "29"),
    (" The answer is 12. Then 13 more.", "12", "13"),
    (" It costs $ 1,000,000 in all. The answer is: 1,000,000", "1000000", "1000000"),
    (" I do not know.", None, None),
    (" The answer is .5", "0.5", "0.5"),
])
def test_extraction(completion, strict, flexible):
    assert gsm8k.extract_strict(completion) == strict
    assert gsm8k.extract_flexible(completion) == flexible


def test_normalize_is_numeric_equality():
    assert gsm8k.normalize("18.0") == gsm8k.normalize("18") == gsm8k.normalize("$18.") == "18"
    assert gsm8k.normalize("-0.50") == "-0.5"
    assert gsm8k.normalize("1,000") == "1000"


def test_score_strict_and_flexible():
    item = {"gold": "8"}
    assert gsm8k.score(item, " 23 - 15 = 8. The answer is 8.")["correct"]
    r = gsm8k.score(item, " 23 - 15 = 8.")
    assert not r["correct"] and r["correct_flexible"]


def test_prompt_is_eight_cot_exemplars():
    p = gsm8k.prompt({"question": "How many?"})
    assert p.count("Q: ") == 9 and p.count("The answer is") == 8 and p.endswith("Q: How many?\nA:")
    assert p.startswith("Q: There are 15 trees in the grove.")
    # the stop strings end a completion before the model starts the next exemplar
    assert all(s in "\n\nQ:" for s in gsm8k.STOP)


def test_load(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps({"question": "q", "answer": "work\n#### 1,234"}) + "\n")
    assert gsm8k.load(f) == [{"id": 0, "question": "q", "gold": "1234"}]
    f.write_text(json.dumps({"question": "q", "answer": "no marker"}) + "\n")
    with pytest.raises(ValueError, match="line 1"):
        gsm8k.load(f)


def test_official_test_set(shared_dir):
    items = gsm8k.load(shared_dir / "eval" / "gsm8k" / "test.jsonl")
    assert len(items) == 1319
    assert items[0]["gold"] == "18"
    assert all(i["gold"] is not None for i in items)
