"""llama.cpp, the anchor of every speed claim, built on this machine from the sources vendored in a pinned
llama-cpp-python sdist (BENCH.md's recipe), cached, and run on grok1's own GGUF export.

    python -m bench.llamacpp                      # build (or find) llama-bench and llama-simple, print their directory
    python -m bench.llamacpp --isa avx2           # the AVX2-only build (what an AVX2 CPU would run)

The sdist is fetched once with pip (PyPI), unpacked, and built with CMake and Ninja under
~/.cache/grok1-bench (GROK1_BENCH_CACHE overrides): `build-native` (-DGGML_NATIVE=ON) and `build-avx2`
(AVX2 + FMA + F16C, AVX-512 off). A finished build is never rebuilt: delete its directory to force one.
About 5-8 minutes per build on 2 cores the first time. Used by bench/versus.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

VERSION = "0.3.36"  # the llama-cpp-python release whose vendored llama.cpp BENCH.md's figures used
CACHE = Path(os.environ.get("GROK1_BENCH_CACHE", Path.home() / ".cache" / "grok1-bench"))
TARGETS = ("llama-bench", "llama-simple")  # BENCH.md also names llama-cli: not needed here, and its multimodal part doubles the build
ISAS = {
    "native": ["-DGGML_NATIVE=ON"],
    "avx2": ["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
             "-DGGML_AVX512=OFF", "-DGGML_AVX512_VBMI=OFF", "-DGGML_AVX512_VNNI=OFF", "-DGGML_AVX512_BF16=OFF",
             "-DGGML_AVX_VNNI=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"],
}


def log(msg: str) -> None:
    print(f"llama.cpp: {msg}", file=sys.stderr, flush=True)


def source_dir() -> Path:
    """llama.cpp's source tree from the pinned sdist, downloaded and unpacked once."""
    root = CACHE / f"llama-cpp-python-{VERSION}"
    src = root / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
    if (src / "CMakeLists.txt").is_file():
        return src
    sdist = CACHE / "sdist" / f"llama_cpp_python-{VERSION}.tar.gz"
    if not sdist.is_file():
        log(f"downloading the llama-cpp-python {VERSION} sdist (~77 MB) with pip")
        got = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                              f"llama-cpp-python=={VERSION}", "-d", str(sdist.parent)], stdout=subprocess.DEVNULL)
        if got.returncode or not sdist.is_file():
            raise SystemExit(f"llama.cpp: could not download the llama-cpp-python {VERSION} sdist with pip (see above)")
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    with tarfile.open(sdist) as tar:
        tar.extractall(partial, filter="data")
    shutil.rmtree(root, ignore_errors=True)
    partial.rename(root)  # whole or absent
    return src


def build(isa: str = "native") -> Path:
    """The directory holding llama-bench and llama-simple built for `isa` (built once, cached)."""
    if isa not in ISAS:
        raise SystemExit(f"--isa: unknown {isa!r}; valid: {', '.join(ISAS)}")
    out = CACHE / f"llama.cpp-{VERSION}" / f"build-{isa}"
    bin_dir = out / "bin"
    stamp = out / "done.json"
    if stamp.is_file() and all((bin_dir / t).is_file() for t in TARGETS):
        return bin_dir
    for tool in ("cmake", "ninja"):
        if shutil.which(tool) is None:
            raise SystemExit(f"llama.cpp: {tool} not found (pip install cmake ninja, or apt-get install {tool})")
    src = source_dir()
    log(f"building {', '.join(TARGETS)} ({isa}) in {out}: 5-8 minutes on 2 cores, once")
    args = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DBUILD_SHARED_LIBS=OFF",
            *ISAS[isa]]
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"build-{isa}.log", "w") as f:
        for cmd in (["cmake", "-S", str(src), "-B", str(out), "-G", "Ninja", *args],
                    ["ninja", "-C", str(out), *TARGETS]):
            if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode:
                raise SystemExit(f"llama.cpp: the build failed; see {f.name}")
    stamp.write_text(json.dumps({"version": VERSION, "isa": isa, "cmake": args}) + "\n")
    return bin_dir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--isa", default="native", choices=sorted(ISAS),
                   help="native: -DGGML_NATIVE=ON (this CPU's best); avx2: AVX2/FMA/F16C only (default native)")
    print(build(p.parse_args().isa))


if __name__ == "__main__":
    main()
