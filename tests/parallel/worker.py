"""One rank of a multi-process test: `python tests/parallel/worker.py JOB.json` with RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT set (by tests/parallel/ranks.py or torchrun). Builds the job's model on
this rank (the whole model then `parallelize`, or a sliced load), computes full-sequence logits and
greedy tokens, and writes them to JOB["out"] + ".rank{r}.pt", with the bytes read and the peak RSS."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from grok1 import kernels
from grok1.panels import pack_model
from grok1.parallel.dist import build_mesh, parallelize

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import PROMPTS, build, greedy  # noqa: E402


def rchar() -> int:
    """Bytes this process has read through read()/pread() so far (page cache hits included)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


def main(job_file: str) -> None:
    job = json.loads(Path(job_file).read_text())
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=__import__("datetime").timedelta(seconds=job.get("timeout", 60)))
    mesh = build_mesh(job["tp"], job["ep"])
    kernels.cpu_ops()  # loaded before counting: only the checkpoint's bytes are counted
    before = rchar()
    if job["mode"] == "load":
        model = build(job["model"], job.get("fmt"), mesh=mesh, pack=job.get("pack", False))
    else:
        model = parallelize(build(job["model"], job.get("fmt")), mesh)
        if job.get("pack"):
            pack_model(model)
    read = rchar() - before
    prompts = PROMPTS[job["model"]]
    with torch.inference_mode():
        logits = [model(torch.tensor([p]))[0] for p in prompts]
    tokens = [greedy(model, p, job.get("new_tokens", 6)) for p in prompts]
    torch.save({"logits": logits, "tokens": tokens, "read_bytes": read,
                "max_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss},
               f"{job['out']}.rank{dist.get_rank()}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
