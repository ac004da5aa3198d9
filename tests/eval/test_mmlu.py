import json

from eval_helpers import write_csv_layout

from grok1.eval import mmlu


def test_csv_layout_and_prompt(tmp_path):
    write_csv_layout(tmp_path)
    items, notes = mmlu.load(tmp_path)
    assert [i["id"] for i in items] == ["algebra/0", "algebra/1", "world_history/0"]
    assert notes == {"layout": "csv", "name": "MMLU", "skipped": 1}
    assert items[2]["choices"] == ["1066", "1,2", "3", "4"]
    p = mmlu.prompt(items[0])
    assert p.startswith("The following are multiple choice questions (with answers) about algebra.\n\n")
    assert p.count("Answer:") == 6 and p.endswith("1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:")
    assert "algebra dev 4\nA. a\nB. b\nC. c\nD. d\nAnswer: A\n\n" in p


def test_jsonl_layout(tmp_path):
    rows = [{"question": f"q{i}", "options": "A. w\nB. x\nC. y\nD. z", "answer": "C. y"} for i in range(7)]
    rows.insert(3, {"question": "bad", "options": "A. 1\nB. 2", "answer": "A. 1"})
    rows.append({"question": "answer not an option", "options": "A. w\nB. x\nC. y\nD. z", "answer": "E. v"})
    f = tmp_path / "t.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items, notes = mmlu.load(f)
    assert notes["skipped"] == 2 and notes["name"] == "MMLU subset (2 questions)"
    assert [i["question"] for i in items] == ["q5", "q6"]  # q0..q4 (rows before "bad" and after) are the shots
    assert [s["question"] for s in items[0]["shots"]] == ["q0", "q1", "q2", "q3", "q4"]
    assert items[0]["answer"] == "C"


def test_score_picks_highest_letter():
    item = {"subject": "", "answer": "C"}
    assert mmlu.score(item, [-3.0, -2.0, -0.5, -4.0])["correct"]
    assert mmlu.score(item, [-0.1, -2.0, -0.5, -4.0])["pred"] == "A"


def test_shared_subset(shared_dir):
    items, notes = mmlu.load(shared_dir / "eval" / "mmlu-subset" / "test.jsonl")
    assert notes["skipped"] == 1 and len(items) == 2850 - 1 - mmlu.FEWSHOT_POOL
    shot_questions = {s["question"] for s in items[0]["shots"]}
    assert not shot_questions & {i["question"] for i in items}
