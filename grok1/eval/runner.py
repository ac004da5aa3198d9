"""Run one evaluation task end to end: load items, skip those already done, run the model, score, report.

Generation tasks (gsm8k, humaneval, math) go through the continuous-batching Engine: every prompt is queued
at once and the engine keeps its batch full, greedy, with the task's stop strings; each finished completion
is scored (HumanEval's in the sandbox, on a worker thread so the engine keeps stepping) and appended to the
results file. Log-likelihood tasks (mmlu, perplexity) run batched full forwards (`grok1.eval.loglik`).

A prompt longer than the model's context leaves room for the completion by dropping its oldest tokens
(recorded per item as "truncated"; a model with Grok-1's 8,192-token context never needs it on these tasks,
the 256-token demo model always does). The report is rebuilt from the results file, so a run killed and
started again with the same options gives the same report (only its "run" timings differ).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import ModuleType

from tqdm import tqdm

from grok1.engine.engine import Engine, EngineConfig
from grok1.engine.sampling import SamplingParams
from grok1.engine.scheduler import Output
from grok1.eval import gsm8k, humaneval, loglik, math, mmlu, perplexity, report
from grok1.eval.store import ResultStore
from grok1.model import Transformer
from grok1.tokenizer import Tokenizer

TASKS: dict[str, ModuleType] = {"gsm8k": gsm8k, "mmlu": mmlu, "humaneval": humaneval, "math": math,
                                "perplexity": perplexity}


@dataclass(frozen=True)
class EvalConfig:
    task: str
    data: str
    out: Path  # the report JSON; per-item results go to out with suffix .items.jsonl
    checkpoint: str = ""
    limit: int | None = None  # the first N items only
    max_new_tokens: int | None = None  # generation tasks; default: the task's
    max_batch: int = 16  # generation: requests decoding together (KV-cache rows)
    batch: int = 8  # log-likelihood tasks: sequences per forward
    window: int | None = None  # perplexity; default: the model's context
    stride: int | None = None  # perplexity; default: half the window
    progress: bool = True


def items_path(out: Path) -> Path:
    return out.with_name(out.stem + ".items.jsonl")


def fit_prompt(ids: list[int], context: int, max_new: int) -> tuple[list[int], int, int]:
    """(prompt ids, max new tokens, tokens dropped): when prompt + completion exceed the context, the
    completion keeps max(half the context, what is left) and the prompt loses its oldest tokens."""
    if len(ids) + max_new <= context:
        return ids, max_new, 0
    new = min(max_new, max(context // 2, context - len(ids)))
    keep = context - new
    return ids[len(ids) - keep:], new, max(0, len(ids) - keep)


class Progress:
    """tqdm bar: items done, accuracy so far, tokens/s, ETA."""

    def __init__(self, total: int, done: list[dict], field: str | None, enabled: bool, what: str) -> None:
        self.field, self.what = field, what
        self.right = sum(bool(r.get(field)) for r in done) if field else 0
        self.count, self.tokens, self.start = len(done), 0, time.perf_counter()
        self.bar = tqdm(total=total, initial=len(done), disable=not enabled, unit="item", dynamic_ncols=True)

    def update(self, record: dict, tokens: int) -> None:
        self.count += 1
        self.tokens += tokens
        self.right += bool(record.get(self.field)) if self.field else 0
        rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        post = {f"{self.what}/s": f"{rate:.0f}"}
        if self.field:
            post = {"acc": f"{self.right / self.count:.3f}"} | post
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def run_generation(task: ModuleType, model: Transformer, tokenizer: Tokenizer, items: list[dict],
                   store: ResultStore, cfg: EvalConfig, progress: Progress, engine: Engine | None = None) -> None:
    """`engine`: default a new Engine over `model` (tests pass a scripted one)."""
    todo = [it for it in items if not store.done(it["id"])]
    if not todo:
        return
    max_new = cfg.max_new_tokens or task.MAX_NEW_TOKENS
    if engine is None:
        engine = Engine(model, tokenizer, EngineConfig(max_batch=cfg.max_batch, max_queue=len(todo) + 1))
    finished: list[tuple[dict, int, Output, str]] = []  # (item, dropped, last output, text); engine thread

    def on_output(item: dict, dropped: int, text: list[str], out: Output) -> None:
        text.append(out.text)
        if out.finish_reason is not None:
            finished.append((item, dropped, out, "".join(text)))

    for item in todo:
        ids, new, dropped = fit_prompt(tokenizer.encode(task.prompt(item)), engine.max_seq_len, max_new)
        params = SamplingParams(temperature=0.0, max_new_tokens=new, stop=task.STOP)
        engine.add_request(ids, params, on_output=partial(on_output, item, dropped, []))

    def record(item: dict, dropped: int, out: Output, text: str) -> dict:
        scored = task.score(item, text)
        return {"id": item["id"], "completion": text, "finish_reason": out.finish_reason,
                "prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
                "truncated": dropped, **scored}

    pending: list[Future] = []
    with ThreadPoolExecutor(max_workers=2) as pool:  # scoring (HumanEval runs code) beside the engine
        remaining = len(todo)
        while remaining or pending:
            if remaining:
                engine.step()
            while finished:
                remaining -= 1
                pending.append(pool.submit(record, *finished.pop(0)))
            if not remaining and pending:
                pending[0].result()  # nothing left to step: wait for the scorers
            for f in [f for f in pending if f.done()]:
                pending.remove(f)
                rec = f.result()
                store.add(rec)
                progress.update(rec, rec["completion_tokens"])


def letter_ids(tokenizer: Tokenizer) -> list[int]:
    """The token of " A" ... " D" as they follow "Answer:" (each must be one token)."""
    base = tokenizer.encode("Answer:")
    out = []
    for letter in mmlu.LETTERS:
        ids = tokenizer.encode(f"Answer: {letter}")
        if ids[: len(base)] != base or len(ids) != len(base) + 1:
            raise ValueError(f"the tokenizer splits ' {letter}' after 'Answer:' into {ids[len(base):]}: MMLU "
                             "letter scoring needs one token per letter")
        out.append(ids[-1])
    return out


def run_mmlu(model: Transformer, tokenizer: Tokenizer, items: list[dict], store: ResultStore, cfg: EvalConfig,
             progress: Progress) -> None:
    todo = [it for it in items if not store.done(it["id"])]
    letters = letter_ids(tokenizer)
    seqs, dropped = [], []
    for it in todo:
        ids, _, d = fit_prompt(tokenizer.encode(mmlu.prompt(it)), model.config.max_seq_len, 0)
        seqs.append(ids)
        dropped.append(d)

    def done(i: int, lps: list[float]) -> None:
        rec = {"id": todo[i]["id"], "prompt_tokens": len(seqs[i]), "truncated": dropped[i], **mmlu.score(todo[i], lps)}
        store.add(rec)
        progress.update(rec, len(seqs[i]))

    loglik.last_logprobs(model, seqs, letters, cfg.batch, done)


def run_perplexity(model: Transformer, tokenizer: Tokenizer, ids: list[int], store: ResultStore, cfg: EvalConfig,
                   progress: Progress) -> list[dict]:
    spans = window_items(model, ids, cfg)
    todo = [s for s in spans if not store.done(s["id"])]
    seqs = [ids[s["begin"]: s["end"]] for s in todo]

    def done(i: int, lps: list[float]) -> None:
        s = todo[i]
        scored = lps[s["first"] - s["begin"] - 1:]  # lps[j] scores token begin + j + 1
        rec = s | {"tokens": len(scored), "logprob": sum(scored)}
        store.add(rec)
        progress.update(rec, s["end"] - s["begin"])

    loglik.next_token_logprobs(model, seqs, cfg.batch, done)
    return spans


def window_items(model: Transformer, ids: list[int], cfg: EvalConfig) -> list[dict]:
    window = cfg.window or model.config.max_seq_len
    if window > model.config.max_seq_len:
        raise ValueError(f"--window {window} is longer than the model's context ({model.config.max_seq_len})")
    stride = cfg.stride or max(1, window // 2)
    return [{"id": k, "begin": b, "end": e, "first": f}
            for k, (b, e, f) in enumerate(perplexity.windows(len(ids), window, stride))]


def evaluate(cfg: EvalConfig, model: Transformer, tokenizer: Tokenizer,
             on_ready: Callable[[str], None] = print, engine: Engine | None = None) -> dict:
    """Run (or finish) one task; write and return the report. `on_ready` receives the printable lines;
    `engine`: for generation tasks, default a new Engine over `model`."""
    task = TASKS[cfg.task]
    start = time.perf_counter()
    notes: dict = {}
    if cfg.task == "perplexity":
        ids = tokenizer.encode(perplexity.load_text(cfg.data))
        items = window_items(model, ids, cfg)
        name = f"perplexity of {Path(cfg.data).name}"
    elif cfg.task == "mmlu":
        items, notes = mmlu.load(cfg.data)
        name = notes["name"]
    else:
        items = task.load(cfg.data)
        name = {"gsm8k": "GSM8k (8-shot CoT)", "humaneval": "HumanEval (0-shot)", "math": "MATH (4-shot)"}[cfg.task]
    if cfg.limit is not None:
        items = items[: cfg.limit]
    header = {"task": cfg.task, "checkpoint": cfg.checkpoint, "data": str(Path(cfg.data).resolve()),
              "context": model.config.max_seq_len, "max_new_tokens": cfg.max_new_tokens,
              "window": cfg.window, "stride": cfg.stride}
    store = ResultStore(items_path(cfg.out), header)
    resumed = sum(store.done(it["id"]) for it in items)
    if resumed:
        on_ready(f"resuming {items_path(cfg.out)}: {resumed} of {len(items)} items already done")
    field = None if cfg.task == "perplexity" else "correct"
    bar = Progress(len(items), [store.records[str(it["id"])] for it in items if store.done(it["id"])], field,
                   cfg.progress, "tok")
    try:
        if cfg.task == "perplexity":
            run_perplexity(model, tokenizer, ids, store, cfg, bar)
        elif cfg.task == "mmlu":
            run_mmlu(model, tokenizer, items, store, cfg, bar)
        else:
            run_generation(task, model, tokenizer, items, store, cfg, bar, engine)
    finally:
        bar.close()
    records = [store.records[str(it["id"])] for it in items]
    if cfg.task == "perplexity":
        summary = report.perplexity_summary(records)
    else:
        summary = report.summarize(records, task.METRICS, by="subject" if notes.get("layout") == "csv" else None)
        summary["truncated_prompts"] = sum(1 for r in records if r.get("truncated"))
        if cfg.task == "mmlu":
            summary["skipped_malformed"] = notes["skipped"]
    wall = time.perf_counter() - start
    new = len(items) - resumed
    tokens = bar.tokens
    run = {"items": len(items), "resumed_items": resumed, "wall_s": round(wall, 2),
           "items_per_s": round(new / wall, 3) if wall else 0.0, "tokens_per_s": round(tokens / wall, 1) if wall else 0.0}
    result = {"task": cfg.task, "name": name, **header, "limit": cfg.limit, "summary": summary,
              "published": report.PUBLISHED.get(cfg.task, (None, None))[1], "note": report.NOTE,
              "run": run, "items": records}
    report.write(cfg.out, result)
    on_ready(report.table(cfg.task, name, summary, run))
    return result
