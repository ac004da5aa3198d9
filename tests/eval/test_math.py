import json

import pytest

from grok1.eval import math as math_task


@pytest.mark.parametrize("text, boxed", [
    (r"so $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
    (r"first \boxed{3} then \boxed{ \{1, 2\} }", r" \{1, 2\} "),
    (r"nested \boxed{\sqrt{x^{2}}+1}", r"\sqrt{x^{2}}+1"),
    (r"\boxed 5$", "5"),
    (r"cut off \boxed{\frac{1}{", None),
    ("no box", None),
])
def test_last_boxed(text, boxed):
    assert math_task.last_boxed(text) == boxed


@pytest.mark.parametrize("a, b", [
    (r"\frac12", r"\frac{1}{2}"), (r"\dfrac{1}{2}", r"\frac{1}{2}"), ("1/2", r"\frac{1}{2}"),
    (r"\left( 3, 4 \right)", "(3,4)"), ("x = 5", "5"), ("5.", "5"), (r"90^\circ", "90"),
    (r"10\%", "10"), (r"\$5", "5"), (r"5\text{ cm}", "5"), ("0.5", ".5"), ("3.00", "3"), ("1,000", "1000"),
    (r"\text{(B)}", "(B)"), (r"-\frac{2}{3}", r"-\frac23"),
])
def test_equivalent_after_normalize(a, b):
    assert math_task.normalize(a) == math_task.normalize(b)


@pytest.mark.parametrize("a, b", [("5", "6"), (r"\frac{1}{2}", r"\frac{2}{1}"), ("(3,4)", "[3,4]"), ("x^2", "x^3")])
def test_different_after_normalize(a, b):
    assert math_task.normalize(a) != math_task.normalize(b)


def write_fixture(root):
    """Two problems in the MATH release's layout (test/SUBJECT/N.json), written by hand."""
    (root / "algebra").mkdir(parents=True)
    (root / "geometry").mkdir()
    (root / "algebra" / "1.json").write_text(json.dumps({
        "problem": "What is $x$ if $2x = 1$?", "level": "Level 1", "type": "Algebra",
        "solution": r"Dividing by 2, $x = \boxed{\dfrac{1}{2}}$."}))
    (root / "geometry" / "7.json").write_text(json.dumps({
        "problem": "A square has side 3. What is its area?", "level": "Level 1", "type": "Geometry",
        "solution": r"The area is $3^2 = \boxed{9}$ square units."}))


def test_fixture_layout_and_scoring(tmp_path):
    write_fixture(tmp_path)
    items = math_task.load(tmp_path)
    assert [(i["id"], i["gold"], i["subject"]) for i in items] == [
        ("algebra/1.json", r"\dfrac{1}{2}", "Algebra"), ("geometry/7.json", "9", "Geometry")]
    assert math_task.score(items[0], r" So $x = \boxed{1/2}$.")["correct"]
    assert math_task.score(items[1], "The area is 9.\nFinal Answer: The final answer is $9$. I hope it is correct.")[
        "correct"]
    assert not math_task.score(items[1], r"$\boxed{6}$")["correct"]


def test_jsonl_layout(tmp_path):
    f = tmp_path / "test.jsonl"
    f.write_text(json.dumps({"problem": "p", "answer": "4", "subject": "Prealgebra", "level": 2,
                             "unique_id": "test/prealgebra/1.json"}) + "\n")
    assert math_task.load(f)[0] == {"id": "test/prealgebra/1.json", "problem": "p", "gold": "4",
                                    "subject": "Prealgebra", "level": 2}


def test_prompt_is_four_minerva_exemplars():
    p = math_task.prompt({"problem": "What is 1+1?"})
    assert p.count("Problem:\n") == 5 and p.count("Final Answer: The final answer is") == 4
    assert p.endswith("Problem:\nWhat is 1+1?\n\nSolution:")
