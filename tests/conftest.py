"""Shared pytest fixtures."""

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def pytest_configure(config):
    config.addinivalue_line("markers", "compiles: builds the C++ kernels from scratch in a private cache "
                            "(about a minute per build on 2 cores); deselect with -m 'not compiles'")


@pytest.fixture
def shared_dir() -> Path:
    """The shared data directory next to the repo (../shared); skips when absent."""
    if not SHARED.is_dir():
        pytest.skip(f"shared data directory not found: {SHARED}")
    return SHARED


GOLDEN = SHARED / "golden"


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """shared/golden: the tiny release-format checkpoint and the reference's outputs."""
    if not (GOLDEN / "tiny-golden.npz").is_file():
        pytest.skip(f"golden reference data not found: {GOLDEN} (it lives in ../shared beside the repo)")
    return GOLDEN


@pytest.fixture(scope="session")
def golden(golden_dir: Path) -> dict:
    import numpy as np

    with np.load(golden_dir / "tiny-golden.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="session")
def golden_config(golden_dir: Path):
    from grok1.config import ModelConfig

    return ModelConfig.from_reference_json(golden_dir / "tiny-config.json")


@pytest.fixture(scope="session")
def golden_model(golden_dir: Path, golden_config):
    """The golden tiny checkpoint loaded through the release-format reader, float32 compute."""
    import torch

    from grok1.weights.load import load_model

    return load_model(golden_dir / "tiny-ckpt", golden_config, "cpu", torch.float32)


def small_config(**overrides):
    """The tiny preset with a small vocabulary and few layers: builds and runs in milliseconds."""
    import dataclasses

    from grok1.config import PRESETS

    base = dict(vocab_size=512, n_layers=2, max_seq_len=128)
    return dataclasses.replace(PRESETS["tiny"], **(base | overrides))


@pytest.fixture
def small_model():
    """A seeded random float32 model of the Grok-1 architecture (tiny preset shapes, vocab 512, 2 layers)."""
    import torch

    from grok1.model import Transformer, init_weights

    torch.manual_seed(0)
    model = Transformer(small_config())
    init_weights(model, torch.Generator().manual_seed(1234))
    return model.eval()


def generate(model, prompts, params, tokenizer=None):
    """Run the prompts to the end as `grok1 generate` does (an Engine with a row per prompt); one completion each:
    prompt_ids, token_ids (the generated ids), text, finish_reason."""
    from types import SimpleNamespace

    from grok1.engine.engine import engine_for

    reqs = engine_for(model, tokenizer, prompts, params).generate(prompts, params)
    return [SimpleNamespace(prompt_ids=r.prompt_ids, token_ids=r.output_ids, text=r.text, finish_reason=r.finish_reason)
            for r in reqs]
