"""Prometheus text exposition for /metrics: request and token counters, queue and batch gauges,
latency histograms, and the middleware that counts requests. Written by the event loop (requests) and the
engine thread (steps), hence the lock."""

from __future__ import annotations

import bisect
import threading
from collections import Counter

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, cumulative = [], 0
        for le, c in zip([*map(str, self.buckets), "+Inf"], self.counts):
            cumulative += c
            out.append(f'{name}_bucket{{le="{le}"}} {cumulative}')
        return out + [f"{name}_sum {self.sum}", f"{name}_count {self.count}"]


class Metrics:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()  # (endpoint, status) -> count
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.hist = {
            "grok1_time_to_first_token_seconds": Histogram(LATENCY_BUCKETS),
            "grok1_time_per_output_token_seconds": Histogram(LATENCY_BUCKETS),
            "grok1_request_latency_seconds": Histogram(LATENCY_BUCKETS),
            "grok1_step_seconds": Histogram(LATENCY_BUCKETS),
            "grok1_batch_size": Histogram(BATCH_BUCKETS),
        }

    def count_request(self, endpoint: str, status: int) -> None:
        with self.lock:
            self.requests[(endpoint, status)] += 1

    def observe(self, name: str, value: float) -> None:
        with self.lock:
            self.hist[name].observe(value)

    def finished(self, prompt_tokens: int, completion_tokens: int, ttft: float | None, latency: float) -> None:
        """One completion choice is done: count its tokens and time it."""
        with self.lock:
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
            self.hist["grok1_request_latency_seconds"].observe(latency)
            if ttft is not None:
                self.hist["grok1_time_to_first_token_seconds"].observe(ttft)
                if completion_tokens > 1:
                    self.hist["grok1_time_per_output_token_seconds"].observe((latency - ttft) / (completion_tokens - 1))

    def step(self, batch_size: int, seconds: float) -> None:
        """Engine hook: one model step over `batch_size` requests."""
        with self.lock:
            self.hist["grok1_batch_size"].observe(batch_size)
            self.hist["grok1_step_seconds"].observe(seconds)

    def render(self, stats: dict) -> str:
        """The exposition text; `stats` is Engine.stats()."""
        with self.lock:
            lines = ["# HELP grok1_requests_total HTTP API requests by endpoint and status code.",
                     "# TYPE grok1_requests_total counter"]
            lines += [f'grok1_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                      for (e, s), n in sorted(self.requests.items())]
            for name, value, kind, text in [
                ("grok1_prompt_tokens_total", self.prompt_tokens, "counter", "Prompt tokens of finished requests."),
                ("grok1_generation_tokens_total", self.completion_tokens, "counter", "Tokens generated for clients."),
                ("grok1_engine_steps_total", stats["steps"], "counter", "Engine steps (one model run each)."),
                ("grok1_reused_prompt_tokens_total", stats.get("reused_prompt_tokens", 0), "counter",
                 "Prompt tokens not computed: a cache row already held them (prefix reuse)."),
                ("grok1_queue_length", stats["waiting"], "gauge", "Requests waiting for a KV-cache slot."),
                ("grok1_running_requests", stats["running"], "gauge", "Requests in the running batch."),
                ("grok1_free_slots", stats["free_slots"], "gauge", "KV-cache rows free for new requests."),
                ("grok1_max_batch", stats["max_batch"], "gauge", "KV-cache rows in total."),
            ]:
                lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {value}"]
            lines += ["# HELP grok1_finished_requests_total Engine requests by finish reason.",
                      "# TYPE grok1_finished_requests_total counter"]
            lines += [f'grok1_finished_requests_total{{reason="{r}"}} {n}' for r, n in sorted(stats["finished"].items())]
            for name, h in self.hist.items():
                lines += [f"# TYPE {name} histogram", *h.lines(name)]
        return "\n".join(lines) + "\n"


class CountRequests:
    """ASGI middleware: count every HTTP request by endpoint and status for /metrics (a path outside
    `endpoints` counts as "other")."""

    def __init__(self, app, metrics: Metrics, endpoints: set[str]) -> None:
        self.app, self.metrics, self.endpoints = app, metrics, endpoints

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope["path"] if scope["path"] in self.endpoints else "other"
            self.metrics.count_request(path, status)
