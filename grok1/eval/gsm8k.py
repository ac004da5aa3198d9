"""GSM8k: 8-shot chain-of-thought (Wei et al. 2022), greedy, two answer extractions.

The prompt is the eight exemplars of the chain-of-thought paper in `Q:`/`A:` form, each answer ending in
"The answer is N.", then the test question; generation stops at the next "Q:" or a blank line (the same
prompt and stops as lm-evaluation-harness's `gsm8k_cot`). Two extractions are reported:
  strict:   the number in "The answer is N" (the first such phrase);
  flexible: the last number anywhere in the completion.
Both are normalised (commas, "$", units, a trailing period, "18.00" == "18", negatives) and compared
numerically with the gold answer after "####".
"""

from __future__ import annotations

import json
import re
from decimal import Decimal, InvalidOperation
from pathlib import Path

NAME = "gsm8k"
DATA_HINT = ("the GSM8k test split as jsonl with 'question' and 'answer' fields (test.jsonl, 1,319 problems, "
             "from github.com/openai/grade-school-math: grade_school_math/data/test.jsonl)")
STOP = ("Q:", "\n\n")
MAX_NEW_TOKENS = 256

EXEMPLARS = [
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, "
     "there will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have "
     "been 21 - 15 = 6. The answer is 6."),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5."),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, "
     "they had 74 - 35 = 39. The answer is 39."),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did "
     "Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. "
     "The answer is 8."),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have "
     "now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. "
     "The answer is 9."),
    ("There were nine computers in the server room. Five more computers were installed each day, from monday to "
     "thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 "
     "computers were added. 9 + 20 is 29. The answer is 29."),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf "
     "balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, "
     "he had 35 - 2 = 33 golf balls. The answer is 33."),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars "
     "left. 23 - 15 is 8. The answer is 8."),
]

# A number as people write it: optional sign and "$", digits with optional thousands commas, optional decimals.
NUMBER = r"-?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\$?\s?\.\d+"
STRICT = re.compile(r"The answer is\s*:?\s*(" + NUMBER + ")", re.IGNORECASE)
ANY_NUMBER = re.compile(NUMBER)


def load(path: str | Path) -> list[dict]:
    """Items {"id", "question", "gold"} from a GSM8k jsonl (gold: the number after "####")."""
    items = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            row = json.loads(line)
            if "question" not in row or "answer" not in row or "####" not in row["answer"]:
                raise ValueError(f"{path}: line {i + 1} is not a GSM8k problem (needs 'question' and an 'answer' "
                                 "ending in '#### N')")
            items.append({"id": i, "question": row["question"], "gold": normalize(row["answer"].split("####")[-1])})
    return items


def prompt(item: dict) -> str:
    shots = "".join(f"Q: {q}\nA: {a}\n\n" for q, a in EXEMPLARS)
    return f"{shots}Q: {item['question']}\nA:"


def normalize(text: str | None) -> str | None:
    """A number's canonical text: "$1,234.50" -> "1234.5", "18.00" -> "18", "-3." -> "-3"; None if no number."""
    if text is None:
        return None
    m = ANY_NUMBER.search(text)
    if m is None:
        return None
    s = m.group(0).replace(",", "").replace("$", "").replace(" ", "")
    try:
        d = Decimal(s)
    except InvalidOperation:
        return None
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def extract_strict(completion: str) -> str | None:
    m = STRICT.search(completion)
    return normalize(m.group(1)) if m else None


def extract_flexible(completion: str) -> str | None:
    found = ANY_NUMBER.findall(completion)
    return normalize(found[-1]) if found else None


def score(item: dict, completion: str) -> dict:
    strict, flexible = extract_strict(completion), extract_flexible(completion)
    return {"strict": strict, "flexible": flexible, "gold": item["gold"],
            "correct": strict is not None and strict == item["gold"],
            "correct_flexible": flexible is not None and flexible == item["gold"]}


METRICS = {"strict": "correct", "flexible": "correct_flexible"}  # reported name -> per-item field
