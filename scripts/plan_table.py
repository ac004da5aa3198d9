"""Print the README's `grok1 plan` table: runs `grok1 plan ... --json` for each common case.

    python scripts/plan_table.py        (tests/cli/test_plan.py checks the README holds its output)
"""

from __future__ import annotations

import contextlib
import io
import json
import shlex

from grok1.cli.main import main

CASES = [
    ("8x H100 80 GB", "--weights int8 --devices 8 --memory-per-device 80GB --batch 8 --context 8192"),
    ("4x H200 141 GB", "--weights int8 --devices 4 --memory-per-device 141GB --batch 8 --context 8192"),
    ("2x H200 141 GB", "--weights int4 --devices 2 --memory-per-device 141GB --batch 8 --context 8192"),
    ("8x A100 40 GB", "--weights int4 --devices 8 --memory-per-device 40GB --batch 8 --context 8192"),
    ("CPU box, 512 GB RAM", "--weights int8 --devices 1 --memory-per-device 512GB --batch 1 --context 8192"),
    ("CPU box, 256 GB RAM + NVMe", "--weights int8 --devices 1 --memory-per-device 256GB --batch 1 --context 8192"),
]


def run(flags: str) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["plan", *shlex.split(flags), "--json"]) == 0
    return json.loads(out.getvalue())


def table() -> str:
    rows = ["| hardware | `grok1 plan` flags | split | weights | KV cache | activations | headroom | total | fits |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, flags in CASES:
        r = run(flags)
        d = r["per_device"]
        fits = "yes" if r["fits"] else "no"
        if "one_box" in r and r["one_box"]["mode"] == "memory-mapped":
            fits = f"no: memory-mapped, ~{r['one_box']['page_in_gb_per_token']:g} GB read per token"
        rows.append(f"| {name} | `{flags}` | TP {r['tp']} x EP {r['ep']} | {d['weights_gb']} | "
                    f"{d['kv_cache_gb']} | {d['activations_gb']} | {d['headroom_gb']} | "
                    f"{d['total_gb']} / {d['memory_gb']:g} | {fits} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
