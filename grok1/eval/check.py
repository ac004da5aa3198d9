"""Layer-by-layer comparison of a model against golden reference activations.

Every Grok-1 port has got some constant wrong (a multiplier, the norm layout, the router);
comparing the residual stream after each layer shows where a model first departs from the
reference. The golden file is an .npz with `prompt_ids` [P, T] (right-padded), `prompt_lens`
[P], and per prompt k `hidden_{precision}_p{k}` [L+1, T_k, D] (index 0 = scaled embeddings,
i = output of layer i-1) and `logits_{precision}_p{k}` [T_k, V].
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from grok1.model import ForwardMeta, Transformer


@dataclass
class LayerDiff:
    prompt: int
    layer: str  # "embed", "layer 0", ..., "logits"
    max_abs: float
    rel: float  # max |ours - golden| / max |golden|
    ok: bool


def load_golden(path: str | Path) -> dict[str, np.ndarray]:
    try:
        data = np.load(path, allow_pickle=False)
    except OSError as e:
        raise ValueError(f"cannot read golden file {path}: {e.strerror or e}") from None
    except Exception:  # noqa: BLE001  numpy's many ways of not understanding a file (ValueError, BadZipFile, ...)
        raise ValueError(f"{path} is not a golden .npz file (numpy cannot read it)") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} is not a golden .npz file (it holds a single array, not named arrays)")  # noqa: TRY004
    try:
        with data:
            return {k: data[k] for k in data.files}
    except Exception:  # noqa: BLE001  a damaged member
        raise ValueError(f"{path} is not a golden .npz file (a member cannot be read)") from None


@torch.no_grad()
def compare(model: Transformer, golden: dict[str, np.ndarray], precision: str = "fp32",
            rel_tol: float = 1e-4, logit_tol: float = 1e-3) -> list[LayerDiff]:
    """Run each golden prompt through `model` and diff its hidden states and logits against the golden ones."""
    for key in ("prompt_ids", "prompt_lens"):
        if key not in golden:
            raise ValueError(f"golden data has no {key!r} array")
    device = model.norm.weight.device
    rows: list[LayerDiff] = []
    for k, (ids, n) in enumerate(zip(golden["prompt_ids"], golden["prompt_lens"])):
        hidden_ref = golden.get(f"hidden_{precision}_p{k}")
        logits_ref = golden.get(f"logits_{precision}_p{k}")
        if hidden_ref is None:
            raise ValueError(f"golden data has no hidden_{precision}_p{k}")
        if hidden_ref.shape[0] != model.config.n_layers + 1 or hidden_ref.shape[2] != model.config.dim:
            raise ValueError(f"golden hidden_{precision}_p{k} has shape {hidden_ref.shape}, the model needs "
                             f"[{model.config.n_layers + 1}, T, {model.config.dim}]")
        hidden: list[torch.Tensor] = []
        logits = model(torch.tensor(ids[None, :n], dtype=torch.long, device=device), meta=ForwardMeta(hidden=hidden))
        names = ["embed"] + [f"layer {i}" for i in range(len(hidden) - 1)]
        for name, ours, ref in zip(names, hidden, hidden_ref):
            rows.append(_diff(k, name, ours[0].float().cpu().numpy(), ref, rel_tol, None))
        if logits_ref is not None:
            rows.append(_diff(k, "logits", logits[0].float().cpu().numpy(), logits_ref, None, logit_tol))
    return rows


def _diff(prompt: int, name: str, ours: np.ndarray, ref: np.ndarray, rel_tol: float | None,
          abs_tol: float | None) -> LayerDiff:
    err = float(np.abs(ours - ref).max())
    rel = err / max(float(np.abs(ref).max()), 1e-30)
    ok = (rel_tol is None or rel <= rel_tol) and (abs_tol is None or err <= abs_tol)
    return LayerDiff(prompt, name, err, rel, ok)
