"""Write the demo model's held-out Austen text: the 5 % of 256-token sequences grok-1-mini never trained on.

    python scripts/austen_heldout.py --out /tmp/austen-heldout.txt
    grok1 eval perplexity --data /tmp/austen-heldout.txt --window 256 --stride 128

It redoes the demo recipe's data steps (scripts/make_demo_model.py: paragraphs of ../shared/corpus/austen,
tokenized with the bundled tokenizer, split by TokenData with the recipe's seed and fraction) and decodes each
held-out sequence, one per paragraph. Re-tokenizing the text gives nearly the same tokens (a sequence may
start or end inside a word).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from grok1.tokenizer import Tokenizer
from grok1.train.data import TokenData, load_shards, tokenize_files
from scripts.make_demo_model import ASSET, SHARED_CORPUS, TRAIN


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default=str(SHARED_CORPUS), help="austen.txt (default ../shared/corpus/austen)")
    p.add_argument("--out", required=True, help="text file to write")
    args = p.parse_args()
    raw = Path(args.corpus).read_text("utf-8")
    paragraphs = [" ".join(line.strip() for line in q.splitlines()) for q in re.split(r"\n\s*\n", raw)]
    tok = Tokenizer(ASSET / "tokenizer.model")
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "austen-paragraphs.txt"
        text.write_text("\n\n".join(q for q in paragraphs if q.strip()) + "\n", encoding="utf-8")
        data = TokenData(load_shards([tokenize_files([text], tok, Path(tmp) / "tokens.npy", progress=False)]),
                         TRAIN["--seq-len"], TRAIN["--heldout-fraction"], 0, TRAIN["--seed"])
        seqs = data.sequences(data.heldout)[:, :-1].tolist()  # the last token starts the next sequence
    Path(args.out).write_text("\n\n".join(tok.decode(s).strip() for s in seqs) + "\n", encoding="utf-8")
    print(f"{args.out}: {len(seqs)} held-out sequences of {TRAIN['--seq-len']} tokens")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
