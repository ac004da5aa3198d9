"""The recipe of grok1's bundled demo model, grok-1-mini: Jane Austen's six novels -> tokenizer ->
training -> evaluation against a bigram baseline -> int8 export into grok1/assets/grok-1-mini.

    python scripts/make_demo_model.py                 # every stage; re-run it to resume after a stop
    python scripts/make_demo_model.py --stage train   # one stage (corpus, tokenizer, train, export)

Reproducible: fixed seeds, and every stage's output is kept in --work (default runs/grok-1-mini),
so an interrupted run resumes (training continues from its latest checkpoint exactly).
The corpus is ../shared/corpus/austen/austen.txt when present; otherwise (or with --from-debian)
it is rebuilt from Debian's r-cran-janeaustenr package (apt-get download + the PyPI package rdata).
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_CORPUS = ROOT.parent / "shared" / "corpus" / "austen" / "austen.txt"
ASSET = ROOT / "grok1" / "assets" / "grok-1-mini"
DOCS = ROOT / "docs"
BOOKS = ["emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility"]

VOCAB = 4096
TRAIN = {  # grok1 train options of the demo run
    "--preset": "grok-1-mini", "--seq-len": 256, "--batch-size": 8, "--grad-accum": 1, "--max-steps": 1200,
    "--lr": 2e-3, "--min-lr-ratio": 0.1, "--warmup-steps": 100, "--weight-decay": 0.1, "--grad-clip": 1.0,
    "--aux-loss-coef": 0.01, "--z-loss-coef": 0.001, "--seed": 0, "--heldout-fraction": 0.05,
    "--log-every": 10, "--eval-every": 100, "--eval-sequences": 64, "--save-every": 50,
}
PROMPTS = ["It is a truth universally acknowledged", "Mr. Darcy", "Emma Woodhouse, handsome, clever, and rich,",
           "\"My dear Mr. Bennet,\" said his lady to him one day,", "Captain Wentworth"]


def corpus_from_debian(out: Path) -> None:
    """Rebuild austen.txt from Debian's r-cran-janeaustenr (the six novels as R character vectors)."""
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "rdata"], check=True)
    import warnings

    import rdata

    warnings.filterwarnings("ignore", module="rdata")  # "Unknown file type: assumed RDS" for each chunk

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", "r-cran-janeaustenr"], cwd=tmp, check=True)
        deb = next(Path(tmp).glob("r-cran-janeaustenr_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(Path(tmp) / "x")], check=True)
        data = next(Path(tmp, "x").rglob("janeaustenr/data/Rdata.rdb"))
        index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress(data.with_suffix(".rdx").read_bytes())))
        blob = data.read_bytes()
        books = []
        for name in BOOKS:
            offset, length = (int(x) for x in index["variables"][name])
            chunk = blob[offset : offset + length]
            lines = rdata.conversion.convert(rdata.parser.parse_data(zlib.decompress(chunk[4:])))
            books.append("\n".join(str(x) for x in lines))
    out.write_text("\n\n".join(books), encoding="utf-8")  # byte-identical to shared/corpus/austen/austen.txt


def stage_corpus(work: Path, from_debian: bool) -> Path:
    """austen.txt, then the same text reflowed: one paragraph per line, paragraphs separated by a
    blank line (the source's hard line wraps would otherwise cost a token every ~12 and teach the
    model to wrap lines)."""
    raw = work / "austen.txt"
    if not raw.is_file():
        if SHARED_CORPUS.is_file() and not from_debian:
            raw.write_bytes(SHARED_CORPUS.read_bytes())
        else:
            corpus_from_debian(raw)
    out = work / "austen-paragraphs.txt"
    paragraphs = [" ".join(line.strip() for line in p.splitlines()) for p in re.split(r"\n\s*\n", raw.read_text("utf-8"))]
    out.write_text("\n\n".join(p for p in paragraphs if p.strip()) + "\n", encoding="utf-8")
    return out


def grok1(*args: str) -> None:
    """Run the grok1 command line in this interpreter's environment, failing loudly."""
    subprocess.run([sys.executable, "-m", "grok1", *args], check=True)


def stage_tokenizer(work: Path, text: Path) -> Path:
    tok = work / "tokenizer.model"
    if not tok.is_file():
        grok1("train", "tokenizer", "--input", str(text), "--out", str(tok), "--vocab-size", str(VOCAB))
    return tok


def stage_train(work: Path, text: Path, tok: Path, threads: int) -> Path:
    run = work / "run"
    args = ["train", "--data", str(text), "--tokenizer", str(tok), "--out", str(run), "--threads", str(threads)]
    args += [str(x) for kv in TRAIN.items() for x in kv]
    if (run / "latest").is_file():
        args.append("--resume")
    start = time.time()
    grok1(*args)
    (work / "train-wall-seconds.txt").write_text(f"{time.time() - start:.0f}\n")  # of the last invocation
    return run


def stage_export(work: Path, run: Path, tok: Path, threads: int) -> dict:
    """Quantise the final weights to int8 (the release's layout), write them into the package,
    evaluate float and int8 against the bigram baseline, sample, plot, and write the summary."""
    import torch

    from grok1.config import resolve_config
    from grok1.engine.engine import engine_for
    from grok1.engine.sampling import SamplingParams
    from grok1.quant import quantize_model
    from grok1.tokenizer import Tokenizer
    from grok1.train import checkpoint
    from grok1.train.data import TokenData, bigram_loss, load_shards
    from grok1.train.loop import heldout_loss
    from grok1.train.plot import plot_run, read_log
    from grok1.weights.load import load_model, save_model

    torch.set_num_threads(threads)
    final = checkpoint.latest(run)
    cfg = resolve_config(final)
    model = load_model(final, cfg, "cpu", torch.float32)
    opts = json.loads((run / "options.json").read_text())
    data = TokenData(load_shards([run / "tokens.npy"]), opts["seq_len"], opts["heldout_fraction"], 0, opts["seed"])
    summary: dict = {"checkpoint": final.name, "parameters": cfg.num_params(), "active_parameters": cfg.active_params()}
    summary["heldout_tokens"] = int(len(data.heldout) * data.seq_len)
    summary["train_tokens_per_epoch"] = data.tokens_per_epoch
    # The baseline: an add-k bigram model counted on the training sequences, k tuned on the held-out
    # set itself (which flatters the baseline, not the model).
    bigram = {k: bigram_loss(data, cfg.vocab_size, k) for k in (0.003, 0.01, 0.03, 0.1, 0.3)}
    summary["bigram_smoothing"] = min(bigram, key=bigram.get)
    summary["bigram_heldout_loss"] = bigram[summary["bigram_smoothing"]]
    summary["float32_heldout_loss"] = heldout_loss(model, data, 16)
    quantize_model(model)
    summary["int8_heldout_loss"] = heldout_loss(model, data, 16)
    save_model(model, ASSET, tok)
    summary["asset_bytes"] = sum(f.stat().st_size for f in ASSET.iterdir() if f.is_file())
    summary["weights_bytes"] = sum(f.stat().st_size for f in ASSET.glob("*.safetensors"))

    records = read_log(run)
    train_recs = [r for r in records if "loss" in r]
    summary["steps"], summary["training_tokens"] = train_recs[-1]["step"], train_recs[-1]["tokens"]
    summary["epochs"] = summary["training_tokens"] / data.tokens_per_epoch
    summary["training_tokens_per_s_median"] = sorted(r["tokens_per_s"] for r in train_recs)[len(train_recs) // 2]
    summary["final_training_loss"] = train_recs[-1]["loss"]
    summary["final_expert_load"] = train_recs[-1]["expert_load"]
    wall = work / "train-wall-seconds.txt"
    summary["train_wall_seconds_last_invocation"] = int(wall.read_text()) if wall.is_file() else None
    summary["recipe"] = {"vocab_size": VOCAB, "train": TRAIN}

    tokenizer = Tokenizer(ASSET / "tokenizer.model")
    samples = []
    for i, prompt in enumerate(PROMPTS):
        params = SamplingParams(temperature=0.8, top_p=0.95, seed=i, max_new_tokens=80)
        t0 = time.perf_counter()
        ids = tokenizer.encode(prompt)
        c = engine_for(model, tokenizer, [ids], [params]).generate([ids], [params])[0]
        dt = time.perf_counter() - t0
        # Decode the continuation in context: decoding it alone drops the space of its first piece.
        text = tokenizer.decode(ids + c.output_ids)[len(tokenizer.decode(ids)) :]
        samples.append({"prompt": prompt, "text": text, "tokens": len(c.output_ids),
                        "tokens_per_s": len(c.output_ids) / dt})
    summary["samples"] = samples
    DOCS.mkdir(exist_ok=True)
    plot_run(run, DOCS / "grok-1-mini-loss.png", title="grok-1-mini on Jane Austen (held-out 5%)",
             baseline=summary["bigram_heldout_loss"])
    (DOCS / "grok-1-mini.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "grok-1-mini", help="working directory")
    p.add_argument("--stage", choices=["corpus", "tokenizer", "train", "export", "all"], default="all")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1 is as fast as 2 on a busy 2-core machine, and more predictable)")
    p.add_argument("--from-debian", action="store_true", help="rebuild the corpus from the Debian package")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    text = stage_corpus(args.work, args.from_debian)
    if args.stage == "corpus":
        return 0
    tok = stage_tokenizer(args.work, text)
    if args.stage == "tokenizer":
        return 0
    if args.stage in ("train", "all"):
        stage_train(args.work, text, tok, args.threads)
    if args.stage in ("export", "all"):
        summary = stage_export(args.work, args.work / "run", tok, args.threads)
        print(json.dumps({k: v for k, v in summary.items() if k != "samples"}, indent=1))
        for s in summary["samples"]:
            print(f"\n--- {s['prompt']!r} ({s['tokens_per_s']:.0f} tokens/s)\n{s['prompt']}{s['text']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
