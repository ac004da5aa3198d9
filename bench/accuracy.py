"""Logit error of each weight format against the weights it was made from.

    python -m bench.accuracy [--configs tiny-golden,bench-m] [--tokens 64]

tiny-golden: the golden checkpoint's int8 weights (exact, as released) against the reference's
fp32 golden logits; with `--table int8|bf16` (a rounded copy of the table for the output projection
only); with the whole table int8; then the same weights repacked as int4 / bf16 (from the dequantised int8).
bench-s / bench-m: seeded random float32 weights against each stored format, on random tokens.
One JSON line per (config, format): max and mean absolute logit error, relative error (max error
over the largest reference logit) and top-1 agreement over all positions.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from bench.common import REPO_DIR, provenance
from bench.generate import dequantize_model
from grok1.config import ModelConfig, from_name
from grok1.model import Transformer, init_weights
from grok1.quant import quantize_embedding, quantize_model
from grok1.weights.load import load_model

GOLDEN = REPO_DIR.parent / "shared" / "golden"


def compare(config: str, fmt: str, ours: torch.Tensor, ref: torch.Tensor) -> dict:
    err = (ours.float() - ref.float()).abs()
    return {"config": config, "format": fmt, "max_abs": round(float(err.max()), 5), "mean_abs": round(float(err.mean()), 6),
            "rel": round(float(err.max() / ref.abs().max()), 6),
            "top1_agree": round(float((ours.argmax(-1) == ref.argmax(-1)).float().mean()), 4)}


def golden_rows() -> list[dict]:
    cfg = ModelConfig.from_reference_json(GOLDEN / "tiny-config.json")
    z = np.load(GOLDEN / "tiny-golden.npz")
    prompts = [torch.tensor(z["prompt_ids"][k : k + 1, : z["prompt_lens"][k]], dtype=torch.long) for k in range(3)]
    ref = torch.cat([torch.from_numpy(z[f"logits_fp32_p{k}"]) for k in range(3)])
    rows = []
    for fmt in ("int8", "--table int8", "--table bf16", "int8+int8-table", "int4", "bf16"):
        # --table: what `grok1 generate --table ...` loads (a rounded copy for the output projection only)
        table = fmt.removeprefix("--table ") if fmt.startswith("--table") else None
        model = load_model(GOLDEN / "tiny-ckpt", cfg, "cpu", torch.float32, table=table)
        if not table and fmt in ("int4", "bf16"):
            dequantize_model(model)
            quantize_model(model, fmt)
        if fmt != "int8" and not table:
            quantize_embedding(model, "bf16" if fmt == "bf16" else "int8")
        with torch.inference_mode():
            ours = torch.cat([model(p)[0] for p in prompts])
        rows.append(compare("tiny-golden", fmt, ours, ref))
    return rows


def random_rows(config: str, n_tokens: int) -> list[dict]:
    cfg = from_name(config)
    tokens = torch.randint(3, cfg.vocab_size, (1, n_tokens), generator=torch.Generator().manual_seed(1))
    rows, ref = [], None
    for fmt in ("fp32", "int8", "int4", "bf16"):
        with torch.device("meta"):
            model = Transformer(cfg)
        model.to_empty(device="cpu")
        init_weights(model, torch.Generator().manual_seed(0))
        if fmt != "fp32":
            quantize_model(model, fmt)
            quantize_embedding(model, "bf16" if fmt == "bf16" else "int8")
        with torch.inference_mode():
            logits = model(tokens)[0]
        if ref is None:
            ref = logits
        else:
            rows.append(compare(config, fmt, logits, ref))
        del model
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="tiny-golden,bench-m", help="comma list of tiny-golden, bench-s, bench-m")
    p.add_argument("--tokens", type=int, default=64, help="random tokens scored on bench configs (default 64)")
    args = p.parse_args()
    base = provenance()
    for config in args.configs.split(","):
        rows = golden_rows() if config == "tiny-golden" else random_rows(config, args.tokens)
        for row in rows:
            print(json.dumps(base | row), flush=True)


if __name__ == "__main__":
    main()
