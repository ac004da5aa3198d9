"""MMLU: 5-shot multiple choice, scored by the log-likelihood of the answer letters.

Prompt (Hendrycks et al. 2021's format): a header naming the subject, five solved dev questions, then
the test question ending in "Answer:". One forward per question; the prediction is whichever of
" A", " B", " C", " D" has the highest log-probability at the last prompt position.

Two layouts:
  - the original MMLU CSVs: DIR/dev/SUBJECT_dev.csv (5 exemplars each) and DIR/test/SUBJECT_test.csv,
    rows "question,A,B,C,D,answer" without a header; per-subject accuracies and their macro average;
  - a jsonl of questions without subjects ("question", "options" = four lines "A. ...", "answer" = the right
    option's line), e.g. ../shared/eval/mmlu-subset/test.jsonl: its first FEWSHOT_POOL rows are the exemplars
    (never scored) and the rest are scored; reported as "MMLU subset (N questions)", never as MMLU.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

NAME = "mmlu"
DATA_HINT = ("the MMLU CSV folder (with dev/ and test/, from people.eecs.berkeley.edu/~hendrycks/data.tar, "
             "github.com/hendrycks/test) or a jsonl of questions such as ../shared/eval/mmlu-subset/test.jsonl")
LETTERS = ("A", "B", "C", "D")
SHOTS = 5
FEWSHOT_POOL = 5  # jsonl layout: rows 0..4 are the exemplars of every question (disjoint from the scored rows)
OPTION = re.compile(r"^([ABCD])\.\s?(.*)$", re.DOTALL)


def subject_name(subject: str) -> str:
    return subject.replace("_", " ")


def format_question(q: dict, answer: bool) -> str:
    text = q["question"].strip() + "".join(f"\n{letter}. {c}" for letter, c in zip(LETTERS, q["choices"]))
    return text + "\nAnswer:" + (f" {q['answer']}\n\n" if answer else "")


def prompt(item: dict) -> str:
    topic = f" about {subject_name(item['subject'])}" if item.get("subject") else ""
    header = f"The following are multiple choice questions (with answers){topic}.\n\n"
    return header + "".join(format_question(s, True) for s in item["shots"]) + format_question(item, False)


def load(path: str | Path) -> tuple[list[dict], dict]:
    """Items {"id", "subject", "question", "choices", "answer", "shots"} and notes {"layout", "skipped", ...}."""
    p = Path(path)
    if p.is_dir():
        return load_csv_dir(p)
    return load_jsonl(p)


def load_csv_dir(root: Path) -> tuple[list[dict], dict]:
    if not (root / "test").is_dir() or not (root / "dev").is_dir():
        raise ValueError(f"{root}: an MMLU folder needs dev/ and test/ subfolders of SUBJECT_dev.csv / SUBJECT_test.csv")
    items: list[dict] = []
    skipped = 0
    for test in sorted((root / "test").glob("*_test.csv")):
        subject = test.name[: -len("_test.csv")]
        dev = root / "dev" / f"{subject}_dev.csv"
        if not dev.is_file():
            raise ValueError(f"{dev}: missing (the 5-shot exemplars of subject {subject!r})")
        shots, _ = read_csv(dev)
        if len(shots) < SHOTS:
            raise ValueError(f"{dev}: has {len(shots)} usable rows, {SHOTS} exemplars are needed")
        rows, bad_test = read_csv(test)
        skipped += bad_test
        for i, q in enumerate(rows):
            items.append({"id": f"{subject}/{i}", "subject": subject, **q, "shots": shots[:SHOTS]})
    if not items:
        raise ValueError(f"{root / 'test'}: no SUBJECT_test.csv files")
    return items, {"layout": "csv", "name": "MMLU", "skipped": skipped}


def read_csv(path: Path) -> tuple[list[dict], int]:
    """Rows question,A,B,C,D,answer -> question dicts; malformed rows are counted, not fatal."""
    out, bad = [], 0
    with open(path, encoding="utf-8", newline="") as f:
        for row in csv.reader(f):
            if len(row) != 6 or row[5].strip() not in LETTERS:
                bad += 1
                continue
            out.append({"question": row[0], "choices": row[1:5], "answer": row[5].strip()})
    return out, bad


def load_jsonl(path: Path) -> tuple[list[dict], dict]:
    rows, skipped = [], 0
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            q = parse_jsonl_row(json.loads(line))
            if q is None:
                skipped += 1
                continue
            rows.append({"id": i, "subject": "", **q})
    if len(rows) <= FEWSHOT_POOL:
        raise ValueError(f"{path}: {len(rows)} usable questions; more than {FEWSHOT_POOL} are needed")
    shots = [{k: r[k] for k in ("question", "choices", "answer")} for r in rows[:FEWSHOT_POOL]]
    items = [{**r, "shots": shots} for r in rows[FEWSHOT_POOL:]]
    name = f"MMLU subset ({len(items)} questions)"
    return items, {"layout": "jsonl", "name": name, "skipped": skipped, "fewshot_rows": FEWSHOT_POOL}


def parse_jsonl_row(row: dict) -> dict | None:
    """{"question", "options": "A. ..\\nB. ..", "answer": "C. .."} -> question dict; None when malformed
    (not exactly four options A-D, or the answer is not one of them)."""
    if not isinstance(row.get("options"), str) or not isinstance(row.get("answer"), str):
        return None
    lines = row["options"].split("\n")
    parsed = [OPTION.match(line) for line in lines]
    if len(lines) != 4 or any(m is None for m in parsed) or [m.group(1) for m in parsed] != list(LETTERS):
        return None
    answer = [letter for letter, line in zip(LETTERS, lines) if line.strip() == row["answer"].strip()]
    if len(answer) != 1:
        return None
    return {"question": row["question"], "choices": [m.group(2) for m in parsed], "answer": answer[0]}


def score(item: dict, letter_logprobs: list[float]) -> dict:
    """letter_logprobs: log-probabilities of " A".." D" after the prompt."""
    pred = LETTERS[max(range(len(LETTERS)), key=lambda i: letter_logprobs[i])]
    return {"subject": item["subject"], "pred": pred, "gold": item["answer"], "correct": pred == item["answer"],
            "logprobs": [round(x, 4) for x in letter_logprobs]}


METRICS = {"acc": "correct"}
