"""Run N real processes (one per rank, gloo on 127.0.0.1, one thread each), bounded in time."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

WORKER = Path(__file__).resolve().parent / "worker.py"
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    return os.environ | {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
                         "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def run_job(tmp: Path, timeout: float = 240, **job: object) -> list[dict]:
    """Run tests/parallel/worker.py on tp x ep ranks; every rank's results, in rank order."""
    world = int(job["tp"]) * int(job["ep"])
    job_file = tmp / f"job-{job['model']}-{job['tp']}x{job['ep']}-{job.get('mode')}.json"
    job["out"] = str(job_file.with_suffix(""))
    job_file.write_text(json.dumps(job))
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(job_file)], env=rank_env(r, world, port),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {r} exited with {p.returncode}:\n{out[-3000:]}"
    return [torch.load(f"{job['out']}.rank{r}.pt") for r in range(world)]
