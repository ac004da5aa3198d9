"""Fuzz every checkpoint file format grok1 reads with a seeded random mutator (fuzz_files.py), a few seconds
each: every malformed file must give grok1's clear error (ValueError), never another exception, a hang (the
timeout) or an unbounded allocation (the address-space limit turns one into a MemoryError)."""

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("fuzz_files.py")
SECONDS = 3.0
ADDRESS_SPACE = 4 << 30  # torch itself maps ~0.7 GB; a file that makes grok1 allocate gigabytes fails here


def limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


@pytest.mark.parametrize("kind", ["pickle", "safetensors", "index", "config", "gguf"])
def test_malformed_files_give_only_clear_errors(kind, tmp_path):
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(SCRIPT), kind, "16", str(SECONDS), str(tmp_path / "work")],
                         capture_output=True, text=True, timeout=240, env=env, preexec_fn=limit_memory, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"fuzz {kind}: {report['tried']} cases, {report['clear_errors']} clear errors, "
          f"{len(report['crashes'])} crashes")
    assert report["tried"] >= 20 and report["clear_errors"] > 0
    assert not report["crashes"], "\n\n".join(c[-2000:] for c in report["crashes"])
