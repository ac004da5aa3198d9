"""The dependency direction of STYLE.md section 1, checked by parsing every module's imports."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "grok1"

# module or package -> the grok1 modules/packages it may import (itself always allowed)
ALLOWED = {
    "config": set(),
    "tokenizer": set(),
    "model": {"config"},
    "plan": {"config", "quant"},  # the memory planner: arithmetic on a ModelConfig and the stored formats
    "memory": set(),  # how much memory this process may use (RAM, cgroup limits)
    "fileio": set(),  # atomic writes, page release: file I/O shared by weights and train
    "extension": set(),  # builds and loads the compiled kernels (torch only)
    "kernels": {"model", "extension"},  # compiled CPU kernels, and CompiledAttention (a model.Attention subclass); used by quant
    "quant": {"config", "model", "kernels"},
    "panels": {"model", "kernels", "quant"},  # the kernel's storage layout for int8 / float32 matrices
    "parallel": {"config", "model", "quant", "panels", "kernels"},
    "weights": {"config", "model", "quant", "panels", "kernels", "parallel", "memory", "fileio"},
    "engine": {"config", "model", "quant", "panels", "kernels", "parallel", "weights", "tokenizer"},
    "server": {"engine", "tokenizer"},
    "eval": {"engine", "weights", "model", "tokenizer", "config"},
    "train": {"config", "model", "weights", "parallel", "tokenizer", "quant", "fileio"},
    "cli": {"*"},
    "__main__": {"cli"},
    "__init__": set(),
}


def _grok1_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "grok1" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_imports_follow_the_layers():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        owner = rel.parts[0].removesuffix(".py")
        allowed = ALLOWED[owner]
        for imported in _grok1_imports(path) - {owner}:
            if "*" not in allowed and imported not in allowed:
                bad.append(f"{rel} imports grok1.{imported}")
    assert not bad, "layering violations (STYLE.md section 1):\n" + "\n".join(bad)


def test_model_knows_nothing_of_distribution_or_files():
    text = (PACKAGE / "model.py").read_text()
    for word in ("torch.distributed", "open(", "safetensors", "pickle", ".cuda"):
        assert word not in text, word
