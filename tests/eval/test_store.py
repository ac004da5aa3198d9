import pytest

from grok1.eval.store import ResultStore


def test_resume_skips_done_items_and_drops_a_torn_line(tmp_path):
    path = tmp_path / "r.items.jsonl"
    s = ResultStore(path, {"task": "t"})
    s.add({"id": 0, "correct": True})
    s.add({"id": "a/1", "correct": False})
    with open(path, "a") as f:
        f.write('{"id": 2, "corr')  # killed mid-write
    s2 = ResultStore(path, {"task": "t"})
    assert s2.done(0) and s2.done("a/1") and not s2.done(2)
    s2.add({"id": 2, "correct": True})
    assert ResultStore(path, {"task": "t"}).records["2"] == {"id": 2, "correct": True}


def test_a_different_run_is_refused(tmp_path):
    path = tmp_path / "r.items.jsonl"
    ResultStore(path, {"task": "gsm8k", "data": "a"})
    with pytest.raises(ValueError, match="different run.*data"):
        ResultStore(path, {"task": "gsm8k", "data": "b"})
