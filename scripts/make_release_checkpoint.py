"""Write a synthetic Grok-1 checkpoint in the release's on-disk format, for benchmarks and load tests.

    python scripts/make_release_checkpoint.py OUT_DIR --preset bench-m [--seed 0]

Writes OUT_DIR/ckpt-0/tensor{i:05d}_000 exactly as the release lays them out (GROK1.md section 5,
`grok1.weights.legacy_write.write_checkpoint`), then OUT_DIR/config.json (`ModelConfig.to_dict()`). The
config is written last, so its presence marks a complete checkpoint.

Weights are random but reproducible: each tensor is drawn from its own numpy generator seeded by
(seed, crc32 of its reference path), so a tensor does not depend on the order or number of the
others. Matrices are N(0, 1/fan_in) in our [.., out, in] layout, quantised with the release's
recipe (`grok1.quant.quantize`: bf16 scale max|w|/127 per output and group; 8 groups for the
attention out-projection and the expert down-projection, 1 otherwise), then stored transposed in
the reference's [.., in, out] layout with int8 weights and bf16 scales. The embedding, norms and
router are float32. Tensors are made and written one at a time (expert matrices one expert at a
time), so memory stays near one tensor plus one expert's float32 temporaries.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from grok1.config import PRESETS, ModelConfig, from_name
from grok1.quant import quantize
from grok1.weights.legacy import QuantizedWeight8bit, expected_shape, reference_paths
from grok1.weights.legacy_write import write_checkpoint

GROUPS_8 = ("multi_head_attention/linear/w", "moe/linear_1/w")  # input axis was sharded 8 ways in the release


def _groups(path: str) -> int:
    return 8 if path.endswith(GROUPS_8) else 1


def tensor_bytes(path: str, config: ModelConfig) -> int:
    """Payload bytes of the tensor at a reference path: float32, or int8 weight + bf16 scales."""
    shape, kind = expected_shape(path, config)
    n = int(np.prod(shape))
    return 4 * n if kind == "ndarray" else n + 2 * n // shape[-2] * _groups(path)


def random_tensor(path: str, config: ModelConfig, seed: int) -> np.ndarray | QuantizedWeight8bit:
    """The synthetic tensor for a reference path: float32 array or release-quantised int8 weight."""
    rng = np.random.default_rng([seed, zlib.crc32(path.encode())])
    shape, kind = expected_shape(path, config)
    if kind == "ndarray":
        if path.endswith("/scale"):  # RMSNorm gains: around 1
            return (1 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
        fan_in = shape[-1] if path.endswith("embeddings") else shape[0]  # embeddings [V, D]; router [D, E]
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(fan_in ** -0.5)
    *lead, d_in, d_out = shape
    groups = _groups(path)
    weight = np.empty(shape, np.int8)  # [.., in, out]
    scales = np.empty((*lead, groups, d_out), np.uint16)  # [.., groups, out], bf16 bits
    for i in np.ndindex(*lead):  # one expert at a time (or the single matrix)
        w = rng.standard_normal((d_out, d_in), dtype=np.float32) * np.float32(d_in ** -0.5)  # ours: [out, in]
        q, s = quantize(torch.from_numpy(w), groups)  # [out, in] int8, [groups, out] bf16
        weight[i] = q.T.numpy()
        scales[i] = s.view(torch.int16).numpy().view(np.uint16)
    return QuantizedWeight8bit(weight, scales)


def _progress(total: int, unit: str) -> tuple:
    """(update(n, label), close()) on a tqdm bar if tqdm is installed, else a plain stderr line."""
    try:
        from tqdm import tqdm
    except ImportError:
        start, done = time.perf_counter(), [0]

        def update(n: int, label: str) -> None:
            done[0] += n
            print(f"\r{done[0] / 1e6:,.0f}/{total / 1e6:,.0f} M{unit} {time.perf_counter() - start:.0f}s {label[-60:]:60}",
                  end="", file=sys.stderr, flush=True)

        return update, lambda: print(file=sys.stderr)
    bar = tqdm(total=total, unit=unit, unit_scale=True, file=sys.stderr)

    def update_bar(n: int, label: str) -> None:
        bar.set_postfix_str(label[-40:], refresh=False)
        bar.update(n)

    return update_bar, bar.close


def make_checkpoint(out_dir: Path, config: ModelConfig, seed: int) -> Path:
    """Write the checkpoint and config.json; returns the ckpt-0 directory."""
    out_dir.mkdir(parents=True, exist_ok=True)
    marker = out_dir / "config.json"
    marker.unlink(missing_ok=True)  # an interrupted rewrite must not look complete
    paths = reference_paths(config)
    update, close = _progress(sum(tensor_bytes(p, config) for p in paths), "B")

    def tensors() -> Iterator[tuple[str, np.ndarray | QuantizedWeight8bit]]:
        for path in paths:
            yield path, random_tensor(path, config, seed)
            update(tensor_bytes(path, config), path)

    try:
        root = write_checkpoint(out_dir, tensors(), config)
    finally:
        close()
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    os.replace(tmp, marker)
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="directory to create OUT_DIR/ckpt-0/ and OUT_DIR/config.json in")
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS), help="model shape (grok1.config.PRESETS)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    args = parser.parse_args(argv)
    config = from_name(args.preset)
    need = sum(tensor_bytes(p, config) for p in reference_paths(config))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.out_dir).free
    if need > free:
        parser.error(f"{args.preset} needs about {need / 1e9:.1f} GB, {args.out_dir} has {free / 1e9:.1f} GB free")
    start = time.perf_counter()
    root = make_checkpoint(args.out_dir, config, args.seed)
    size = sum(f.stat().st_size for f in root.iterdir())
    print(f"wrote {root} ({len(reference_paths(config))} files, {size / 1e9:.2f} GB) and {args.out_dir / 'config.json'}"
          f" in {time.perf_counter() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
