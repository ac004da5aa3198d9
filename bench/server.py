"""How does `grok1 serve` hold up under concurrent streaming clients?

Starts `grok1 serve` as a subprocess on a free loopback port, then for each concurrency level runs
that many streaming clients (each sending `--requests` completions one after another, greedy,
`--max-tokens` tokens, EOS ignored), in `--reps` rounds over all levels, and prints one JSON line
per level: aggregate throughput (completion tokens / wall seconds; the median over the rounds, each
round's value in `tokens_per_s_each_rep`, and each round's ratio to the first level's same round in
`x_first_level_each_rep`), time to first token and time per output token (p50, p99
over all requests of the level), errors, the engine's mean step time and batch, and
`other_cpu_pct` (CPU used by processes other than the server, its engine process and this script,
over the whole series: the machine is shared). `--soak S` then runs the highest level for S seconds and reports
errors and the server's RSS at start and end.

The clients share the machine with the server, so what they spend per token is taken from it: the default
`--client raw` speaks HTTP/1.1 over asyncio streams (keep-alive, chunked bodies, server-sent events scanned
as bytes, JSON decoded only for the usage chunk), ~25 us of CPU per token here; `--client httpx` is the
usual Python client (~110 us per token, more than the HTTP server's own ~80 us). Like clients on other
machines, they keep off the engine's CPU: when `grok1 serve` pins its engine process (the default with
more CPUs than engine threads), this script runs on the CPUs left to HTTP (`--clients-anywhere` turns
that off and lets the OS place the clients, on the engine's CPU too).

    python -m bench.server --table                          # the bundled demo model
    python -m bench.server --golden --concurrency 1,16 --requests 2 --soak 0
    python -m bench.server --checkpoint DIR --config JSON --tokenizer MODEL

Never imported by grok1/ or tests/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from statistics import median

import httpx

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO.parent / "shared" / "golden"
PROMPT = "The answer to life, the universe and everything is a question that"


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def process_jiffies(pid: int) -> int:
    parts = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(parts[11]) + int(parts[12])  # utime + stime (fields 14, 15)


def children(pid: int) -> list[int]:
    """Child processes of pid (grok1 serve runs its engine in one)."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def rss_mb(pid: int) -> float:
    """Resident memory of pid and its children (the engine process holds the model)."""
    total = 0
    for p in [pid, *children(pid)]:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return round(total / 1024, 1)


class CpuMeter:
    """Share of the machine's CPU used by everything except the server (and its engine process) and this one."""

    def __init__(self, server_pid: int) -> None:
        self.pids = [server_pid, *children(server_pid), os.getpid()]
        self.start = self.sample()

    def sample(self) -> tuple[int, int, int]:
        busy, total = cpu_jiffies()
        return busy, total, sum(process_jiffies(p) for p in self.pids)

    def other_pct(self) -> float:
        busy, total, ours = (b - a for a, b in zip(self.start, self.sample()))
        return round(100 * max(0, busy - ours) / max(1, total), 1)


def keep_off_engine_cpus(server_pid: int) -> list[int] | None:
    """Run this process on the server's HTTP CPUs when grok1 serve has pinned its engine process to CPUs
    of its own (and itself to the rest); returns those CPUs, or None when nothing is pinned."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    ours, http = os.sched_getaffinity(0), os.sched_getaffinity(server_pid)
    if not http < ours:
        return None
    os.sched_setaffinity(0, http)
    return sorted(http)


def request_body(model: str, max_tokens: int) -> dict:
    """A greedy streaming completion of PROMPT, EOS ignored, usage in the last chunk."""
    return {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}


async def one_request(client: httpx.AsyncClient, url: str, model: str, max_tokens: int) -> dict:
    """Stream one completion; returns timings, or {"error": ...}."""
    body = request_body(model, max_tokens)
    t0 = time.perf_counter()
    first = last = None
    tokens, done = 0, False
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"error": chunk["error"]["message"]}
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                elif chunk["choices"] and chunk["choices"][0]["text"]:
                    last = time.perf_counter()
                    first = first or last
    except httpx.HTTPError as e:
        return {"error": f"{type(e).__name__}: {e}"}
    if not done or first is None or last is None:
        return {"error": "stream ended without [DONE] or without text"}
    return {"ttft": first - t0, "tpot": (last - first) / max(1, tokens - 1), "tokens": tokens}


class RawClient:
    """One keep-alive HTTP/1.1 connection, reopened after an error."""

    def __init__(self, url: str) -> None:
        host, _, port = url.removeprefix("http://").partition(":")
        self.host, self.port = host, int(port)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def stream(self, body: dict) -> AsyncIterator[bytes]:
        """POST /v1/completions; yields each server-sent event's data (bytes)."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        data = json.dumps(body).encode()
        self.writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (self.host.encode(), len(data), data))
        status = await self.reader.readline()
        headers = []
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            headers.append(line.lower())
        if b" 200 " not in status:
            length = next((int(h.split(b":")[1]) for h in headers if h.startswith(b"content-length:")), 0)
            raise ValueError(f"{status.decode().strip()}: {(await self.reader.readexactly(length))[:200]!r}")
        pending = b""
        while size := int((await self.reader.readline()).strip(), 16):  # chunked body; 0 = its end
            pending += (await self.reader.readexactly(size + 2))[:-2]
            *events, pending = pending.split(b"\n\n")
            for event in events:
                if event.startswith(b"data: "):
                    yield event[6:]
        await self.reader.readexactly(2)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def one_request_raw(client: RawClient, model: str, max_tokens: int) -> dict:
    """one_request over a RawClient: the same body and measurements."""
    body = request_body(model, max_tokens)
    t0 = time.perf_counter()
    first = last = None
    tokens, done = 0, False
    try:
        async for data in client.stream(body):
            if data == b"[DONE]":
                done = True
            elif data.startswith(b'{"error"'):
                return {"error": json.loads(data)["error"]["message"]}
            elif b'"usage": {' in data:
                tokens = json.loads(data)["usage"]["completion_tokens"]
            elif b'"text": ""' not in data:
                last = time.perf_counter()
                first = first or last
    except (OSError, ValueError, asyncio.IncompleteReadError) as e:
        client.close()
        return {"error": f"{type(e).__name__}: {e}"}
    if not done or first is None or last is None:
        return {"error": "stream ended without [DONE] or without text"}
    return {"ttft": first - t0, "tpot": (last - first) / max(1, tokens - 1), "tokens": tokens}


async def run_level(url: str, model: str, clients: int, requests: int | None, seconds: float | None,
                    max_tokens: int, rss_pid: int | None = None, kind: str = "raw") -> tuple[list[dict], float]:
    """`clients` concurrent loops (`kind`: raw or httpx clients), each doing `requests` requests (or until `seconds` pass); with `rss_pid`,
    that process's RSS is sampled every 10 s into results as {"rss_mb": ...} entries."""
    results: list[dict] = []
    deadline = time.perf_counter() + seconds if seconds else None

    async def sample_rss() -> None:
        while rss_pid is not None and deadline is not None and time.perf_counter() < deadline - 5:
            await asyncio.sleep(10)
            results.append({"rss_mb": rss_mb(rss_pid)})

    async def loop(client: httpx.AsyncClient) -> None:
        raw = RawClient(url) if kind == "raw" else None
        n = 0
        while (requests is None or n < requests) and (deadline is None or time.perf_counter() < deadline):
            results.append(await (one_request_raw(raw, model, max_tokens) if raw else
                                  one_request(client, url, model, max_tokens)))
            n += 1
        if raw:
            raw.close()

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(sample_rss(), *(loop(client) for _ in range(clients)))
        return results, time.perf_counter() - t0


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000 * seconds, 1)


def summarize(results: list[dict], wall: float) -> dict:
    results = [r for r in results if "rss_mb" not in r]
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    return {"requests": len(results), "errors": len(errors), "first_error": errors[0] if errors else None,
            "tokens": sum(r["tokens"] for r in ok), "wall_s": round(wall, 2),
            "tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 1),
            "ttft_p50_ms": ms(percentile([r["ttft"] for r in ok], 50)),
            "ttft_p99_ms": ms(percentile([r["ttft"] for r in ok], 99)),
            "tpot_p50_ms": ms(percentile([r["tpot"] for r in ok], 50)),
            "tpot_p99_ms": ms(percentile([r["tpot"] for r in ok], 99))}


def engine_counters(url: str) -> dict[str, float]:
    """Step count, step seconds and batch-size sum from the server's /metrics."""
    wanted = {"grok1_step_seconds_count": "steps", "grok1_step_seconds_sum": "step_s", "grok1_batch_size_sum": "rows"}
    out = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            out[wanted[name]] = float(value)
    return out


def engine_summary(before: dict[str, float], after: dict[str, float]) -> dict:
    """Mean engine step time and batch size over a level: tells engine time from HTTP/client overhead."""
    steps = max(1.0, after["steps"] - before["steps"])
    return {"step_ms_mean": round(1000 * (after["step_s"] - before["step_s"]) / steps, 1),
            "batch_mean": round((after["rows"] - before["rows"]) / steps, 1)}


def start_server(args: argparse.Namespace, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "grok1", "serve", "--port", str(port),
           "--max-batch", str(args.max_batch), "--max-seq-len", str(args.max_seq_len), "--model-name", "bench",
           "--threads", str(args.threads)] + (["--no-pin"] if args.no_pin else []) + (
              ["--no-prefix-reuse"] if args.no_prefix_reuse else [])
    for flag in ("checkpoint", "config", "tokenizer", "preset", "dtype"):
        if getattr(args, flag):
            cmd += [f"--{flag}", getattr(args, flag)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"grok1 serve exited with {proc.returncode}: {' '.join(cmd)}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise SystemExit("grok1 serve did not become healthy within 300 s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="default: grok1 serve's default, the bundled demo model")
    ap.add_argument("--golden", action="store_true",
                    help="bench the golden tiny random model of ../shared/golden (131k vocab) instead")
    ap.add_argument("--config", help="model config JSON")
    ap.add_argument("--tokenizer", help="SentencePiece model")
    ap.add_argument("--preset", help="named config instead of --config")
    ap.add_argument("--dtype", help="compute dtype passed to grok1 serve")
    ap.add_argument("--concurrency", default="1,2,4,8,16", help="comma-separated client counts (default 1,2,4,8,16)")
    ap.add_argument("--requests", type=int, default=4, help="requests per client per level and rep (default 4)")
    ap.add_argument("--reps", type=int, default=3,
                    help="rounds over all levels; tokens/s is the median over rounds (default 3)")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens per completion (default 64)")
    ap.add_argument("--max-batch", type=int, default=16, help="server --max-batch (default 16)")
    ap.add_argument("--max-seq-len", type=int, default=256, help="server --max-seq-len (default 256)")
    ap.add_argument("--threads", type=int, default=1, help="server --threads (default 1; see grok1 serve --help)")
    ap.add_argument("--soak", type=float, default=60, help="seconds of soak at the highest level (0 = none)")
    ap.add_argument("--table", action="store_true", help="also print a markdown table on stderr")
    ap.add_argument("--no-pin", action="store_true", help="pass --no-pin to grok1 serve (engine not pinned to its CPU)")
    ap.add_argument("--clients-anywhere", action="store_true",
                    help="let the OS place the clients (by default they keep off the engine's CPU, as remote "
                         "clients would)")
    ap.add_argument("--no-prefix-reuse", action="store_true",
                    help="pass --no-prefix-reuse to grok1 serve (every request sends the same prompt, so by default "
                         "all but its last token come from a cache row)")
    ap.add_argument("--client", choices=("raw", "httpx"), default="raw",
                    help="the streaming client: raw (asyncio HTTP/1.1, ~25 us of CPU per token) or httpx (~110 us); "
                         "they run on the server's machine (default raw)")
    args = ap.parse_args()
    if args.golden:
        args.checkpoint, args.config = str(GOLDEN / "tiny-ckpt"), str(GOLDEN / "tiny-config.json")
        args.tokenizer = str(REPO.parent / "shared" / "grok-1" / "tokenizer.model")
    if args.preset:
        args.config = None
    levels = [int(c) for c in args.concurrency.split(",")]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(args, port)
    client_cpus = None if args.clients_anywhere else keep_off_engine_cpus(server.pid)
    base = {"bench": "server", "commit": commit(), "model": Path(args.checkpoint or "grok-1-mini").name, "max_tokens": args.max_tokens,
            "max_batch": args.max_batch, "threads": args.threads, "cpus": os.cpu_count(), "client": args.client,
            "prefix_reuse": not args.no_prefix_reuse, "client_cpus": client_cpus}
    rows = []
    try:
        asyncio.run(run_level(url, "bench", 1, 2, None, args.max_tokens, kind=args.client))  # warm up
        # Rounds over all levels, `--reps` times: the machine's speed drifts, so each level's median comes
        # from runs spread over the whole measurement, and the ratios between levels compare like with like.
        runs: dict[int, list[tuple[list[dict], float, dict, dict]]] = {c: [] for c in levels}
        meters = {c: CpuMeter(server.pid) for c in levels}
        for _ in range(args.reps):
            for c in levels:
                before = engine_counters(url)
                results, wall = asyncio.run(run_level(url, "bench", c, args.requests, None, args.max_tokens,
                                                     kind=args.client))
                runs[c].append((results, wall, before, engine_counters(url)))
        for c in levels:
            pooled = [r for results, _, _, _ in runs[c] for r in results]
            row = base | {"clients": c, "reps": args.reps} | summarize(pooled, sum(w for _, w, _, _ in runs[c]))
            each = [summarize(res, w)["tokens_per_s"] for res, w, _, _ in runs[c]]
            row["tokens_per_s"], row["tokens_per_s_each_rep"] = round(median(each), 1), each
            first = [summarize(res, w)["tokens_per_s"] for res, w, _, _ in runs[levels[0]]]
            row["x_first_level_each_rep"] = [round(e / f, 2) if f else None for e, f in zip(each, first)]
            steps = {k: sum(after[k] - before[k] for _, _, before, after in runs[c]) for k in runs[c][0][2]}
            row |= engine_summary({k: 0.0 for k in steps}, steps) | {"other_cpu_pct": meters[c].other_pct(),
                                                                     "loadavg_1m": os.getloadavg()[0]}
            rows.append(row)
            print(json.dumps(row), flush=True)
        if args.soak > 0:
            c = max(levels)
            rss_start = rss_mb(server.pid)
            meter = CpuMeter(server.pid)
            results, wall = asyncio.run(run_level(url, "bench", c, None, args.soak, args.max_tokens, server.pid,
                                                 kind=args.client))
            health = httpx.get(url + "/health", timeout=10).json()
            soak = base | {"soak_s": args.soak, "clients": c} | summarize(results, wall) | {
                "rss_start_mb": rss_start, "rss_end_mb": rss_mb(server.pid),
                "rss_every_10s_mb": [r["rss_mb"] for r in results if "rss_mb" in r], "health": health["status"],
                "running_after": health["running"], "other_cpu_pct": meter.other_pct(),
                "loadavg_1m": os.getloadavg()[0]}
            print(json.dumps(soak), flush=True)
    finally:
        server.terminate()
        server.wait(timeout=60)
    if args.table and rows:
        one = rows[0]["tokens_per_s"] or float("nan")
        print("| clients | tokens/s | x 1 client | x 1 client, each round | TTFT p50 / p99 ms | TPOT p50 / p99 ms "
              "| engine step ms (batch) | errors | other CPU % |\n|---|---|---|---|---|---|---|---|---|", file=sys.stderr)
        for r in rows:
            rounds = ", ".join(f"{x:.1f}" for x in r["x_first_level_each_rep"] if x is not None)
            print(f"| {r['clients']} | {r['tokens_per_s']} | {r['tokens_per_s'] / one:.1f} | {rounds} | {r['ttft_p50_ms']} / "
                  f"{r['ttft_p99_ms']} | {r['tpot_p50_ms']} / {r['tpot_p99_ms']} | {r['step_ms_mean']} ({r['batch_mean']}) | "
                  f"{r['errors']} | "
                  f"{r['other_cpu_pct']} |", file=sys.stderr)


if __name__ == "__main__":
    main()
