r"""MATH (Hendrycks et al. 2021): 4-shot, Minerva-style (Lewkowycz et al. 2022), greedy.

Prompt: the four Minerva exemplars as "Problem:\n...\n\nSolution:\n..." (each ending in "Final Answer: The
final answer is X. I hope it is correct."), then the problem; generation stops at the next "Problem:".
The answer is the last \boxed{...} of the completion, else the text after "The final answer is"; answers are
compared after LaTeX normalisation (`normalize`), against the gold answer (the last \boxed{} of the reference
solution, or the "answer" field of the 500-problem jsonl).

Data (not bundled, nothing is downloaded): the MATH release (github.com/hendrycks/math: MATH.tar, whose
test/SUBJECT/N.json files hold "problem", "level", "type", "solution"; pass the MATH/test folder), or the
500-problem subset as jsonl ("problem", "answer", "subject", ...; test.jsonl of github.com/openai/prm800k,
prm800k/math_splits/test.jsonl).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

NAME = "math"
DATA_HINT = ("MATH's test folder (MATH/test/SUBJECT/N.json, from github.com/hendrycks/math) or the 500-problem "
             "jsonl (prm800k/math_splits/test.jsonl from github.com/openai/prm800k)")
STOP = ("Problem:",)
MAX_NEW_TOKENS = 512

EXEMPLARS = [
    (r"Find the domain of the expression  $\frac{\sqrt{x-2}}{\sqrt{5-x}}$.",
     r"The expressions inside each square root must be non-negative. Therefore, $x-2 \ge 0$, so $x\ge2$, and "
     r"$5 - x \ge 0$, so $x \le 5$. Also, the denominator cannot be equal to zero, so $5-x>0$, which gives $x<5$. "
     r"Therefore, the domain of the expression is $\boxed{[2,5)}$."
     "\nFinal Answer: The final answer is $[2,5)$. I hope it is correct."),
    (r"If $\det \mathbf{A} = 2$ and $\det \mathbf{B} = 12,$ then find $\det (\mathbf{A} \mathbf{B}).$",
     r"We have that $\det (\mathbf{A} \mathbf{B}) = (\det \mathbf{A})(\det \mathbf{B}) = (2)(12) = \boxed{24}.$"
     "\nFinal Answer: The final answer is $24$. I hope it is correct."),
    ("Terrell usually lifts two 20-pound weights 12 times. If he uses two 15-pound weights instead, how many times "
     "must Terrell lift them in order to lift the same total weight?",
     r"If Terrell lifts two 20-pound weights 12 times, he lifts a total of $2\cdot 12\cdot20=480$ pounds of weight. "
     r"If he lifts two 15-pound weights instead for $n$ times, he will lift a total of $2\cdot15\cdot n=30n$ pounds "
     "of weight.  Equating this to 480 pounds, we can solve for $n$:\n"
     "\\begin{align*}\n30n&=480\\\\\n\\Rightarrow\\qquad n&=480/30=\\boxed{16}\n\\end{align*}"
     "\nFinal Answer: The final answer is $16$. I hope it is correct."),
    ("If the system of equations\n\n\\begin{align*}\n6x-4y&=a,\\\\\n6y-9x &=b.\n\\end{align*}has a solution "
     r"$(x, y)$ where $x$ and $y$ are both nonzero, find $\frac{a}{b},$ assuming $b$ is nonzero.",
     r"If we multiply the first equation by $-\frac{3}{2}$, we obtain"
     "\n\n$$6y-9x=-\\frac{3}{2}a.$$Since we also know that $6y-9x=b$, we have\n\n"
     r"$$-\frac{3}{2}a=b\Rightarrow\frac{a}{b}=\boxed{-\frac{2}{3}}.$$"
     "\nFinal Answer: The final answer is $-\\frac{2}{3}$. I hope it is correct."),
]


def load(path: str | Path) -> list[dict]:
    """Items {"id", "problem", "gold", "subject", "level"} from a MATH folder (searched recursively for *.json)
    or a jsonl file."""
    p = Path(path)
    items = []
    if p.is_dir():
        files = sorted(p.rglob("*.json"))
        if not files:
            raise ValueError(f"{p}: no MATH problem files (SUBJECT/N.json) in this folder")
        for f in files:
            row = json.loads(f.read_text(encoding="utf-8"))
            items.append(_item(str(f.relative_to(p)), row, f))
    else:
        with open(p, encoding="utf-8") as fh:
            for i, line in enumerate(fh):
                if line.strip():
                    row = json.loads(line)
                    items.append(_item(row.get("unique_id", i), row, p))
    return items


def _item(item_id: object, row: dict, where: Path) -> dict:
    if "problem" not in row or not ("answer" in row or "solution" in row):
        raise ValueError(f"{where}: a MATH problem needs 'problem' and 'solution' (or 'answer')")
    gold = row["answer"] if "answer" in row else last_boxed(row["solution"])
    if gold is None:
        raise ValueError(f"{where}: the solution of problem {item_id} has no \\boxed{{}} answer")
    return {"id": item_id, "problem": row["problem"], "gold": gold, "subject": row.get("type", row.get("subject", "")),
            "level": row.get("level", "")}


def prompt(item: dict) -> str:
    shots = "".join(f"Problem:\n{q}\n\nSolution:\n{a}\n\n" for q, a in EXEMPLARS)
    return f"{shots}Problem:\n{item['problem']}\n\nSolution:"


def last_boxed(text: str) -> str | None:
    r"""The contents of the last \boxed{...} (or \fbox{...}, or "\boxed x") with nested braces matched."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = text[start:]
    m = re.match(r"\\(?:boxed|fbox)\s*\{", rest)
    if m is None:
        m2 = re.match(r"\\boxed (\S+?)(?:\$|\s|$)", rest)
        return m2.group(1) if m2 else None
    depth, i = 1, m.end()
    while i < len(rest):
        depth += {"{": 1, "}": -1}.get(rest[i], 0)
        if depth == 0:
            return rest[m.end(): i]
        i += 1
    return None  # unbalanced: the completion was cut


def extract(completion: str) -> str | None:
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed
    m = re.search(r"[Tt]he final answer is\s*(.+?)(?:\.\s*I hope|\n|$)", completion)
    return m.group(1).strip().strip("$").strip() if m else None


def _fix_fracs(s: str) -> str:
    r"""\frac12 -> \frac{1}{2}, \frac1{72} -> \frac{1}{72}, \frac{a}b -> \frac{a}{b}."""
    def arg(t: str) -> tuple[str, str]:
        if t.startswith("{"):
            depth = 0
            for i, ch in enumerate(t):
                depth += {"{": 1, "}": -1}.get(ch, 0)
                if depth == 0:
                    return t[: i + 1], t[i + 1:]
            return t, ""
        return ("{" + t[0] + "}", t[1:]) if t else ("", "")

    parts = s.split("\\frac")
    out = parts[0]
    for part in parts[1:]:
        a, rest = arg(part)
        b, rest = arg(rest)
        out += "\\frac" + a + b + rest
    return out


def normalize(answer: str | None) -> str | None:
    """Strip what does not change a MATH answer: spaces, \\left/\\right, $, degree signs, \\text{} units, a
    leading "x =", trailing periods, \\dfrac/\\tfrac, "0.5" vs ".5", "\\%", "\\!"; fractions get their braces."""
    if answer is None:
        return None
    s = answer.strip()
    s = re.sub(r"\\text\{\s*([a-zA-Z ]*)\}\s*$", "", s) if re.search(r"\d", s) else s  # trailing unit words
    s = re.sub(r"\\(?:text|textbf|mbox|mathrm)\{(.*?)\}", r"\1", s)
    for old, new in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\ ", ""),
                     ("\\$", ""), ("$", ""), ("\\%", ""), ("%", ""), ("^\\circ", ""), ("^{\\circ}", ""),
                     ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\displaystyle", "")):
        s = s.replace(old, new)
    s = s.replace(" ", "").rstrip(".")
    if re.fullmatch(r"[a-zA-Z]\w*=.+", s):  # "x=5" -> "5"
        s = s.split("=", 1)[1]
    s = re.sub(r"(^|[^\d])\.(\d)", r"\g<1>0.\2", s)  # ".5" -> "0.5"
    s = re.sub(r"^(-?\d+)\.0+$", r"\1", s)  # "3.00" -> "3"
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")  # 1,000 -> 1000
    s = _fix_fracs(s)
    if re.fullmatch(r"-?\d+/\d+", s):  # 1/2 -> \frac{1}{2}
        neg, (a, b) = s.startswith("-"), s.lstrip("-").split("/")
        s = ("-" if neg else "") + f"\\frac{{{a}}}{{{b}}}"
    return s


def score(item: dict, completion: str) -> dict:
    pred = extract(completion)
    ok = pred is not None and normalize(pred) == normalize(item["gold"])
    return {"pred": pred, "gold": item["gold"], "subject": item["subject"], "level": item["level"], "correct": ok}


METRICS = {"acc": "correct"}
