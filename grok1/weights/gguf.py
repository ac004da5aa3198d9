"""GGUF export for llama.cpp (and ollama, LM Studio, which use it): the "grok" architecture.

Written with the `gguf` package's GGUFWriter: header, metadata and tensor infos first, then tensor
data streamed piece by piece (memory: one source tensor), into `FILE.tmp`, renamed when complete;
`check` re-opens it with gguf's GGUFReader to check every tensor's name, type and shape.

Tensors (names.py, column "gguf"; numpy shapes equal ours): `token_embd`, `output_norm`, and per
layer `blk.{i}.` `attn_norm` (pre-attention), `attn_q` / `attn_k` / `attn_v` (our wqkv split),
`attn_output`, `attn_output_norm` (post-attention), `ffn_norm` (pre-MoE), `ffn_gate_inp` (router,
[E, D]), `ffn_gate_exps` (w1, the GELU branch) / `ffn_up_exps` (w3) / `ffn_down_exps` (w2), stacked
[E, ..] as ours, and `layer_output_norm` (post-MoE). No `output.weight`: llama.cpp reuses
`token_embd` for the tied output projection. Types: norms and the router F32 always; the matrices
and the embedding F32, F16 or Q8_0. Q8_0 needs rows that are a multiple of 32 values: a tensor
whose input size is not (e.g. `ffn_down_exps` with an expert width like 344) falls back to F16, as
llama.cpp's converter does. int8 weights are dequantised exactly first, so Q8_0 re-quantises them
(blocks of 32 with an f16 scale): within half a Q8_0 step of the release's values.

Metadata (`grok.*`): context_length, embedding_length, block_count, feed_forward_length and
expert_feed_forward_length (the expert width), attention.head_count / head_count_kv /
key_length / value_length, rope.dimension_count (the whole head: llama.cpp applies NEOX-style
rotate-half RoPE for grok, as the reference does), rope.freq_base, attention.layer_norm_rms_epsilon,
expert_count, expert_used_count, and the four Grok constants llama.cpp reads for this architecture:
embedding_scale (78.38 on the input embeddings), logit_scale (0.577 on the logits),
attention.output_scale (the QK scale, applied inside the soft-cap: 30 tanh(s * scale / 30)) and
attn_logit_softcapping (30). Plus general.file_type, and the SentencePiece vocabulary
(tokenizer.ggml.model "llama", tokens, scores, types, bos/eos/pad/unk ids, add_bos_token false: the
reference adds no BOS) when a tokenizer.model is available.

What llama.cpp does differently from the reference:
- it renormalises the top-2 router weights to sum to 1 (its grok graph calls build_moe_ffn with
  weight normalisation on); the reference uses the raw softmax probabilities p1, p2. So llama.cpp's
  MoE output is y / (p1 + p2) for each token: a positive per-token factor c. The next operation
  is the post-MoE RMSNorm: norm(c y) = c y / sqrt(c^2 mean(y^2) + eps) * g, which equals
  norm(y) = y / sqrt(mean(y^2) + eps) * g except for eps: their ratio is
  sqrt(1 + (c^2 - 1) eps / (c^2 mean(y^2) + eps)), within eps / (2 mean(y^2)) of 1 for any c >= 1
  (eps = 1e-5). The residual stream never sees the factor;
- no router soft-cap is applied (`grok.router_logit_softcapping` is read but unused), like the
  reference; vLLM and SGLang do apply one (see hf.py);
- the MoE output and gates are not rounded to bf16, and matmuls run in its own precision.
llama.cpp also requires `embedding_length == head_count * key_length` (it shapes attn_q and
attn_output as [n_embd, n_embd]); a model that differs (the golden tiny model) exports but will
not load there (`notes` say so).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import Tensor

from grok1.config import ModelConfig
from grok1.fileio import check_regular
from grok1.weights import hf, names
from grok1.weights.source import Source, float_pieces, fuse, model_shapes, scale_rows

ARCH = "grok"
QK = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]  # 32 values per Q8_0 block
FILE_TYPES = {"fp32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
_T = gguf.GGMLQuantizationType


def tensor_type(name: str, shape: tuple[int, ...], dtype: str) -> gguf.GGMLQuantizationType:
    """GGUF type of one of our tensors (or a q/k/v part) for --dtype fp32 | f16 | q8_0."""
    rel = names.split_layer(name)[1]
    if len(shape) == 1 or rel == "moe.gate.weight" or dtype == "fp32":
        return _T.F32
    if dtype == "q8_0" and shape[-1] % QK == 0:
        return _T.Q8_0
    return _T.F16


def nbytes(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * size


def plan(cfg: ModelConfig, dtype: str) -> list[tuple[str, str, int | None, tuple[int, ...], gguf.GGMLQuantizationType]]:
    """[(GGUF name, our name, wqkv part, shape, type)] in file order."""
    shapes, rows = model_shapes(cfg), hf.part_rows(cfg)
    out = []
    for unit in names.unit_names(cfg):
        layer, _ = names.split_layer(unit)
        for row in names.rows(unit):
            shape = shapes[unit]
            if row.part is not None:
                shape = (rows[row.part][1] - rows[row.part][0], *shape[1:])
            out.append((names.column(row, "gguf", layer), unit, row.part, shape, tensor_type(unit, shape, dtype)))
    return out


def _add_metadata(w: gguf.GGUFWriter, cfg: ModelConfig, dtype: str) -> None:
    w.add_name("grok1")
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_expert_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_base)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_expert_count(cfg.n_experts)
    w.add_expert_used_count(cfg.n_active_experts)
    w.add_embedding_scale(cfg.embedding_multiplier)
    w.add_logit_scale(cfg.output_multiplier)
    w.add_attn_output_scale(cfg.attn_scale)
    w.add_attn_logit_softcapping(cfg.attn_softcap)
    w.add_file_type(FILE_TYPES[dtype])
    if dtype == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_vocab(w: gguf.GGUFWriter, cfg: ModelConfig, tokenizer: Path) -> str | None:
    """SentencePiece vocabulary as llama.cpp's "llama" tokenizer; returns a note when skipped."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer))
    n = sp.get_piece_size()
    if n > cfg.vocab_size:
        return f"tokenizer {tokenizer} has {n} pieces, the model {cfg.vocab_size}: vocabulary not written"
    tokens, scores, types = [], [], []
    for i in range(n):
        tokens.append(sp.id_to_piece(i).encode())
        scores.append(sp.get_score(i))
        types.append(gguf.TokenType.UNKNOWN if sp.is_unknown(i) else gguf.TokenType.CONTROL if sp.is_control(i)
                     else gguf.TokenType.UNUSED if sp.is_unused(i) else gguf.TokenType.BYTE if sp.is_byte(i)
                     else gguf.TokenType.NORMAL)
    for i in range(n, cfg.vocab_size):  # rows of the embedding the tokenizer never produces
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(cfg.bos_id)
    w.add_eos_token_id(cfg.eos_id)
    w.add_pad_token_id(cfg.pad_id)
    if sp.unk_id() >= 0:
        w.add_unk_token_id(sp.unk_id())
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    return None


def _encode(pieces: Iterator[Tensor], qtype: gguf.GGMLQuantizationType) -> Iterator[np.ndarray]:
    for p in pieces:
        a = p.numpy()
        if qtype == _T.Q8_0:  # gguf's own Q8_0 (bit-exact with ggml), on the whole piece at once
            yield gguf.quants.Q8_0.quantize_blocks(a.reshape(-1, QK))
        else:
            yield a if qtype == _T.F32 else a.astype(np.float16)


def export(src: Source, out: Path, dtype: str, tokenizer: Path | None,
           progress: Callable[[int], object] | None = None) -> tuple[int, list[str]]:
    """Write src as one GGUF file `out` (f32, f16 or q8_0); returns (tensor bytes written, notes for the user)."""
    cfg, written_total, notes = src.config, 0, []
    if cfg.dim != cfg.n_heads * cfg.head_dim:
        notes.append(f"llama.cpp needs embedding_length ({cfg.dim}) == head_count x key_length "
                     f"({cfg.n_heads * cfg.head_dim}): this file will not load there")
    tensors = plan(cfg, dtype)
    fallback = sorted({n.split(".", 2)[-1] for n, _, _, s, t in tensors if dtype == "q8_0" and len(s) > 1
                       and not n.endswith("gate_inp.weight") and t != _T.Q8_0})
    if fallback:
        notes.append(f"Q8_0 needs rows that are a multiple of {QK}: {', '.join(fallback)} written as F16")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    w = gguf.GGUFWriter(tmp, ARCH)
    try:
        _add_metadata(w, cfg, dtype)
        if tokenizer is not None and (note := _add_vocab(w, cfg, tokenizer)):
            notes.append(note)
        for name, _, _, shape, qtype in tensors:
            w.add_tensor_info(name, shape, np.dtype(np.float16 if qtype == _T.F16 else np.float32),
                              nbytes(shape, qtype), raw_dtype=None if qtype in (_T.F32, _T.F16) else qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        assert w.fout is not None
        f = w.fout[0]
        w.write_padding(f, f.tell())
        rows = hf.part_rows(cfg)
        current: tuple[str, tuple[Tensor, Tensor | None]] | None = None
        for name, unit, part, shape, qtype in tensors:
            if current is None or current[0] != unit:
                current = (unit, src.read(unit))  # q/k/v: read once for the three parts
            weight, scales = current[1]
            if part is not None:
                r0, r1 = rows[part]
                weight, scales = weight[r0:r1], None if scales is None else scale_rows(scales, weight, r0, r1 - r0)
            written = 0
            for data in _encode(float_pieces(weight, scales, torch.float32), qtype):
                f.write(data.tobytes() if not data.flags.c_contiguous else data.data)
                written += data.nbytes
                if progress is not None:
                    progress(data.nbytes)
            assert written == nbytes(shape, qtype), (name, written, nbytes(shape, qtype))
            w.write_padding(f, written)
            written_total += written
        f.flush()
        os.fsync(f.fileno())
        w.close()
        os.replace(tmp, out)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return written_total, notes


def _reader(file: str | Path) -> gguf.GGUFReader:
    """gguf's reader over `file`; whatever it trips on in a malformed file becomes one ValueError naming the file."""
    file = check_regular(file)
    try:
        return gguf.GGUFReader(file)
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 -- a third-party parser of untrusted bytes: any failure is bad data
        raise ValueError(f"{file}: not a readable GGUF file ({type(e).__name__})") from None


def check(file: Path, tensors: list) -> None:
    """Re-open a written file with gguf's reader: every planned tensor present with its type and shape."""
    reader = _reader(file)
    found = {t.name: t for t in reader.tensors}
    for name, _, _, shape, qtype in tensors:
        t = found.get(name)
        if t is None or t.tensor_type != qtype or tuple(int(n) for n in reversed(t.shape)) != tuple(shape):
            raise ValueError(f"{file}: tensor {name} is missing or differs from what was written")
    if len(found) != len(tensors):
        raise ValueError(f"{file}: holds {len(found)} tensors, {len(tensors)} were written")


def read(file: str | Path) -> tuple[dict, dict[str, Tensor]]:
    """(metadata {key: value}, {our name: float32 tensor}) of a GGUF file written by `export`, through
    gguf's GGUFReader (Q8_0 and F16 dequantised; q/k/v fused back into wqkv). ValueError naming the file for
    anything else."""
    reader = _reader(file)
    try:
        return _read(reader, file)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 -- a missing key, a short tensor, a wrong type: the file's fault
        raise ValueError(f"{file}: not a GGUF file as grok1 writes them ({type(e).__name__})") from None


def _read(reader: gguf.GGUFReader, file: str | Path) -> tuple[dict, dict[str, Tensor]]:
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    by_name = {t.name: t for t in reader.tensors}
    ours: dict[str, list[Tensor]] = {}
    layers = int(meta[f"{ARCH}.block_count"])
    layer_names = dict.fromkeys(r.ours for r in names.LAYER)
    for unit in ["tok_embeddings.weight", *(f"layers.{i}.{n}" for i in range(layers) for n in layer_names), "norm.weight"]:
        layer, _ = names.split_layer(unit)
        for row in names.rows(unit):
            t = by_name[names.column(row, "gguf", layer)]
            data = gguf.quants.dequantize(t.data, t.tensor_type)
            ours.setdefault(unit, []).append(torch.from_numpy(np.array(data, dtype=np.float32)))
    return meta, {k: fuse([(t, None) for t in v], f"{file}: {k}")[0] for k, v in ours.items()}
