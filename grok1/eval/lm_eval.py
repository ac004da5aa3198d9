"""grok1 as an lm-evaluation-harness model, in-process: `Grok1LM` (an `lm_eval.api.model.LM`).

    import lm_eval
    from grok1.eval.lm_eval import Grok1LM
    lm_eval.simple_evaluate(model=Grok1LM.load("path/to/checkpoint"), tasks=["hellaswag"])

Needs `pip install lm-eval` (or `pip install 'grok1[eval]'`).

It builds on lm-eval's `TemplateLM`, the base its API models (`local-completions`) share, so text is split
into context and continuation tokens the same way whether lm-eval talks to grok1 here or to `grok1 serve`:
  - loglikelihood: one full forward per (context + continuation), batched; a sequence longer than the
    context keeps its last max_length tokens (max_length: the context less one, as the API models count);
  - loglikelihood_rolling: lm-eval's disjoint rolling windows, prefixed with the BOS token;
  - generate_until: every request queued at once in the continuous-batching Engine, greedy unless the task
    asks for a temperature, with the task's stop strings and max_gen_toks.
"""

from __future__ import annotations

from functools import partial

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from grok1.engine.engine import Engine, EngineConfig
from grok1.engine.sampling import SamplingParams
from grok1.engine.scheduler import Output
from grok1.model import Transformer
from grok1.tokenizer import Tokenizer

MAX_GEN_TOKS = 256


class Grok1LM(TemplateLM):
    def __init__(self, model: Transformer | None = None, tokenizer: Tokenizer | None = None,
                 checkpoint: str | None = None, batch_size: int | str = 8, max_batch: int = 16,
                 max_length: int | None = None, device: str = "cpu", **_: object) -> None:
        super().__init__()
        if model is None:
            model, tokenizer = self._load(checkpoint, device)
        assert tokenizer is not None, "Grok1LM needs the model's tokenizer"
        self.model, self.tokenizer_ = model, tokenizer
        self.batch = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_batch = int(max_batch)
        # As lm-eval's API models count it: the context less one token (kept for generation).
        self.max_length = int(max_length or model.config.max_seq_len) - 1

    @staticmethod
    def _load(checkpoint: str | None, device: str) -> tuple[Transformer, Tokenizer]:
        from pathlib import Path

        from grok1.config import resolve_config
        from grok1.weights.load import load_model

        path = Path(checkpoint) if checkpoint else Path(__file__).resolve().parents[1] / "assets" / "grok-1-mini"
        tokenizer = next((Tokenizer(p) for p in (path / "tokenizer.model", path.parent / "tokenizer.model")
                          if p.is_file()), None)
        if tokenizer is None:
            raise ValueError(f"no tokenizer.model next to checkpoint {path}")
        return load_model(path, resolve_config(path, None, None), device), tokenizer

    @classmethod
    def load(cls, checkpoint: str | None = None, **kwargs: object) -> Grok1LM:
        """From a checkpoint directory (default: the bundled demo model)."""
        return cls(checkpoint=checkpoint, **kwargs)

    # ---- tokens ----

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer_.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer_.bos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: object) -> list[int]:
        return self.tokenizer_.encode(string)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer_.decode(tokens)

    # ---- scoring ----

    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs: object) -> list[tuple[float, bool]]:
        """requests: ((context, continuation), context ids, continuation ids) -> (log-prob of the continuation,
        whether greedy decoding would produce it)."""
        seqs, n_cont = [], []
        for _, ctx, cont in requests:
            seqs.append((ctx + cont)[-self.max_length:])
            n_cont.append(len(cont))
        out: list[tuple[float, bool]] = [(0.0, True)] * len(seqs)
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        bar = tqdm(total=len(seqs), disable=disable_tqdm, desc="grok1 loglikelihood")
        device = self.model.norm.weight.device
        for s in range(0, len(order), self.batch):
            idx = order[s: s + self.batch]
            longest = max(len(seqs[i]) for i in idx)
            tokens = torch.full((len(idx), longest), self.model.config.pad_id, dtype=torch.long, device=device)
            for row, i in enumerate(idx):
                tokens[row, : len(seqs[i])] = torch.tensor(seqs[i])
            logp = self.model(tokens)[:, :-1].float().log_softmax(-1)  # [B, T-1, V]
            for row, i in enumerate(idx):
                n, t = n_cont[i], len(seqs[i])
                lp = logp[row, t - 1 - n: t - 1]  # [n, V]: the positions that predict the continuation
                target = tokens[row, t - n: t]
                chosen = lp.gather(-1, target[:, None])[:, 0]
                out[i] = (float(chosen.sum()), bool((lp.argmax(-1) == target).all()))
            bar.update(len(idx))
        bar.close()
        return out

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        out = []
        for (text,) in tqdm([r.args for r in requests], disable=disable_tqdm, desc="grok1 rolling"):
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length - 1, context_len=1)]
            scores = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows], disable_tqdm=True)
            out.append(sum(lp for lp, _ in scores))
        return out

    # ---- generation ----

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        engine = Engine(self.model, self.tokenizer_, EngineConfig(max_batch=self.max_batch,
                                                                  max_queue=len(requests) + 1))
        texts: list[list[str]] = [[] for _ in requests]
        left = [len(requests)]
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="grok1 generate")

        def on_output(i: int, out: Output) -> None:
            texts[i].append(out.text)
            if out.finish_reason is not None:
                left[0] -= 1
                bar.update(1)

        for i, (context, gen_kwargs) in enumerate(r.args for r in requests):
            kw = dict(gen_kwargs)
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.get("max_gen_toks", MAX_GEN_TOKS))
            temperature = float(kw.get("temperature", 0.0)) if kw.get("do_sample", False) or \
                kw.get("temperature") else 0.0
            ids = self.tok_encode(context)
            max_new = max(1, min(max_new, engine.max_seq_len - 1))
            ids = ids[-(engine.max_seq_len - max_new):] or [self.prefix_token_id]  # keep the end of a long context
            params = SamplingParams(temperature=temperature, max_new_tokens=max_new, stop=tuple(s for s in until if s),
                                    seed=1234 if temperature > 0 else None)
            engine.add_request(ids, params, on_output=partial(on_output, i))
        while left[0]:
            engine.step()
        bar.close()
        return ["".join(t) for t in texts]
