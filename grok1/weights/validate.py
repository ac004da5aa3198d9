"""Checks of what a checkpoint's files say before anything trusts it: JSON files read with a size limit and
one clear error, safetensors headers whose every tensor is possible in its file, and value excerpts for
error messages (never a file's raw bytes).
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import torch

from grok1.fileio import check_regular

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I8": torch.int8,
          "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool}


def short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def read_json(file: Path, limit: int = 100 << 20) -> object:
    """A small JSON file (config, index): a ValueError naming the file if it is not one (never its bytes)."""
    try:
        file = check_regular(file)
        if file.stat().st_size > limit:
            raise ValueError(f"{file}: larger than {limit >> 20} MB; not a checkpoint's JSON file")
        return json.loads(file.read_bytes())
    except OSError as e:
        raise ValueError(f"cannot read {file}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        at = f" (at byte {e.pos})" if isinstance(e, json.JSONDecodeError) else ""
        raise ValueError(f"{file}: not valid JSON{at}") from None


def check_header(header: object, file: Path, data_bytes: int) -> None:
    """A safetensors header is an object of tensor entries {"dtype": known, "shape": [ints >= 0],
    "data_offsets": [begin, end]} whose byte ranges fit the `data_bytes` after the header, match their dtype
    and shape, and do not overlap (plus an optional "__metadata__" object)."""
    if not isinstance(header, dict):
        raise ValueError(f"{file}: corrupt safetensors header: a JSON {type(header).__name__}, expected an object")
    spans = []
    for name, info in header.items():
        where = f"{file}: tensor {short(name)}"
        if name == "__metadata__":
            if not isinstance(info, dict):
                raise ValueError(f"{file}: corrupt safetensors header: __metadata__ is not an object")
            continue
        if not isinstance(info, dict):
            raise ValueError(f"{where}: its header entry is not an object")
        dtype = DTYPES.get(info.get("dtype")) if isinstance(info.get("dtype"), str) else None
        if dtype is None:
            raise ValueError(f"{where}: dtype {short(info.get('dtype'))} is not one of {', '.join(DTYPES)}")
        shape = info.get("shape")
        if not (isinstance(shape, list) and len(shape) <= 8 and all(type(d) is int and 0 <= d < 1 << 48 for d in shape)):
            raise ValueError(f"{where}: shape {short(shape)} is not a list of at most 8 integers >= 0")
        offsets = info.get("data_offsets")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise ValueError(f"{where}: data_offsets {short(offsets)} is not [begin, end] with integers "
                             "0 <= begin <= end")
        if offsets[1] > data_bytes:
            raise ValueError(f"{where}: truncated or corrupt: its data ends at byte {offsets[1]} after the header, the "
                             f"file holds {data_bytes}")
        need = math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
        if offsets[1] - offsets[0] != need:
            raise ValueError(f"{where}: data_offsets span {offsets[1] - offsets[0]} bytes, its dtype {info['dtype']} "
                             f"and shape {shape} need {need}")
        if need:
            spans.append((offsets[0], offsets[1], name))
    spans.sort()
    for (_, end, a), (begin, _, b) in itertools.pairwise(spans):
        if begin < end:
            raise ValueError(f"{file}: tensors {short(a)} and {short(b)} overlap (bytes {begin}..{end})")
