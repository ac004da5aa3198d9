"""`grok1 serve`: the OpenAI-compatible HTTP server and the web chat page."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from functools import partial
from pathlib import Path

import torch

from grok1.cli import ranks
from grok1.cli.common import config_from_args, model_from_args, positive_int, tokenizer_from_args
from grok1.config import ModelConfig
from grok1.engine.client import EngineClient
from grok1.engine.engine import Engine, EngineConfig
from grok1.engine.follow import LeaderRunner, follow
from grok1.engine.process import EngineProcess, pin_process
from grok1.tokenizer import PERSONAS

# Below this many weight bytes a model's matmuls take microseconds: waking a second thread for each costs
# more than it saves (the demo model serves ~1.3x faster on 1 thread than on 2 here), so 1 is the default.
SMALL_MODEL_BYTES = 64 << 20


def add_engine_options(p: argparse.ArgumentParser) -> None:
    """Engine knobs shared by `serve` and `chat`."""
    g = p.add_argument_group("engine")
    g.add_argument("--max-batch", type=positive_int, default=16, metavar="N",
                   help="requests decoded together (KV-cache rows; default: serve 16, chat 1)")
    g.add_argument("--max-seq-len", type=int, default=2048, metavar="N",
                   help="tokens per request, prompt plus completion (default 2048, at most the model's context)")
    g.add_argument("--threads", type=int, metavar="N",
                   help="torch CPU threads (default: 1 for models under 64 MB of weights, such as the demo model, "
                        "whose matmuls are too small to share; else torch's choice); 1 is also often faster on a "
                        "busy machine, where idle-waiting threads stall every step")
    g.add_argument("--no-prefix-reuse", action="store_true",
                   help="compute every prompt whole (by default, with packed weights, a prompt that starts like a "
                        "finished request's tokens, e.g. the next turn of a chat, skips the part a free KV-cache "
                        "row still holds; the tokens are the same either way)")
    g.add_argument("--persona", choices=sorted(PERSONAS),
                   help="system prompt for chats that bring none: grok = witty, with a rebellious streak")


def engine_threads(args: argparse.Namespace, cfg: ModelConfig) -> int | None:
    """CPU threads for the model: --threads, else 1 for a small model on CPU, else None (torch's default)."""
    threads = args.threads
    if threads is None and torch.device(args.device).type == "cpu" and cfg.weight_bytes() < SMALL_MODEL_BYTES:
        threads = 1
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    return threads


def engine_cpus(args: argparse.Namespace, cfg: ModelConfig) -> set[int] | None:
    """The CPUs to pin the engine process to: the last `threads` of this process's CPUs, when the model runs
    on CPU with fewer threads than there are CPUs (the rest serve HTTP). None: no pinning."""
    threads = engine_threads(args, cfg)
    if args.engine_thread or args.no_pin or threads is None or torch.device(args.device).type != "cpu":
        return None
    if not hasattr(os, "sched_getaffinity"):  # not Linux
        return None
    cpus = sorted(os.sched_getaffinity(0))
    return set(cpus[-threads:]) if len(cpus) > threads else None


def engine_from_args(args: argparse.Namespace, job: ranks.Job | None = None) -> Engine:
    cfg = config_from_args(args)
    tokenizer = tokenizer_from_args(args)
    model = model_from_args(args, cfg, job.mesh if job else None)
    threads = engine_threads(args, cfg)
    if threads is not None:
        torch.set_num_threads(threads)
    if args.max_batch < 1 or args.max_seq_len < 2:
        raise ValueError(f"--max-batch must be >= 1 and --max-seq-len >= 2 (got {args.max_batch}, {args.max_seq_len})")
    config = EngineConfig(max_batch=args.max_batch, max_seq_len=args.max_seq_len,
                          prefix_reuse=not getattr(args, "no_prefix_reuse", False),
                          max_queue=getattr(args, "max_queue", EngineConfig.max_queue))
    return Engine(model, tokenizer, config)


def port_arg(text: str) -> int:
    """argparse type of --port: 0 (any free port) or 1..65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port (0..65535; 0 = any free port)")
    return port


def check_listen(host: str, port: int) -> int:
    """Bind host:port as the server will (before the model loads, which may take minutes), then let it go.
    Returns the port: for 0, a free one the server then uses, so the address it prints is the real one."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            s.bind((host, port))
            return s.getsockname()[1]
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("serve", parents=[common], help="serve an OpenAI-compatible API and a chat page",
                       description="Serve /v1/models, /v1/completions, /v1/chat/completions, /health, /metrics "
                                   "and a browser chat page at /, with continuous batching.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=port_arg, default=8000, help="port to listen on (default 8000; 0 = any free port)")
    key = p.add_mutually_exclusive_group()
    key.add_argument("--api-key", metavar="KEY",
                     help="require 'Authorization: Bearer KEY' on everything but /health and the chat page (/); "
                          "visible to `ps`: prefer --api-key-file or the GROK1_API_KEY environment variable")
    key.add_argument("--api-key-file", metavar="FILE", help="read the API key from FILE (its first line)")
    p.add_argument("--allowed-hosts", metavar="H1,H2",
                   help="Host header names to answer ('*': any; default: on a loopback --host only localhost, "
                        "127.0.0.1 and ::1, against DNS rebinding; elsewhere any)")
    p.add_argument("--max-body-bytes", type=int, metavar="N",
                   help="refuse request bodies larger than N bytes with HTTP 413 (default 4194304 = 4 MiB)")
    p.add_argument("--model-name", metavar="NAME",
                   help="the model id clients ask for (default: the checkpoint directory's name)")
    p.add_argument("--max-queue", type=positive_int, default=256, metavar="N",
                   help="waiting requests beyond which new ones get HTTP 429 (default 256)")
    p.add_argument("--engine-thread", action="store_true",
                   help="run the engine on a thread of the server process instead of in its own process (the "
                        "default; there the server's per-token Python never waits on the model's, and the other "
                        "way round)")
    p.add_argument("--no-pin", action="store_true",
                   help="do not pin the engine process to its own CPUs (by default, when the model runs on CPU with "
                        "fewer threads than there are CPUs, the engine gets the last --threads CPUs and the HTTP "
                        "server the others, so neither preempts the other)")
    p.add_argument("--shutdown-timeout", type=float, default=10.0, metavar="S",
                   help="on Ctrl-C/SIGTERM, let running streams finish for S seconds, then end them with an error "
                        "event and [DONE] (default 10)")
    add_engine_options(p)
    p.set_defaults(run=run)


def api_key(args: argparse.Namespace) -> str | None:
    """The key from --api-key, --api-key-file or $GROK1_API_KEY (in that order); an empty one is an error (it
    would lock every client out)."""
    if args.api_key is not None:
        key, source = args.api_key, "--api-key"
    elif args.api_key_file is not None:
        key, source = (Path(args.api_key_file).read_text().splitlines() or [""])[0], f"--api-key-file {args.api_key_file}"
    elif "GROK1_API_KEY" in os.environ:
        key, source = os.environ["GROK1_API_KEY"], "GROK1_API_KEY"
    else:
        return None
    key = key.strip()
    if not key:
        raise ValueError(f"{source}: the API key is empty (leave it out to serve without a key)")
    return key


def run(args: argparse.Namespace) -> int:
    from grok1.server.run import is_loopback, serve

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    key = api_key(args)
    if args.max_body_bytes is not None and args.max_body_bytes < 1024:
        raise ValueError(f"--max-body-bytes must be >= 1024, got {args.max_body_bytes}")
    if key is None and not is_loopback(args.host):
        print(f"grok1 serve: warning: listening on {args.host} without an API key: anyone who can reach this "
              "address can use the model (set GROK1_API_KEY or --api-key-file)", file=sys.stderr, flush=True)
    if args.shutdown_timeout < 0:
        raise ValueError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    if int(os.environ.get("RANK", "0")) == 0:  # the process that will listen (rank 0 under torchrun)
        args.port = check_listen(args.host, args.port)  # a bad address or a port in use: said before loading
    cfg = config_from_args(args)  # fail fast on a bad checkpoint path or config, before starting anything
    job = ranks.join(args, cfg)
    if job is not None and job.rank != 0:  # a follower: runs rank 0's steps through its shard until told to stop
        follow(engine_from_args(args, job).runner, job.control)
        job.leave()
        return 0
    tokenizer = tokenizer_from_args(args)
    if job is not None:  # rank 0 of a job: the engine runs in this process (the one in the process group)
        engine: EngineClient = leader_engine(args, job)
    elif args.engine_thread:
        engine = engine_from_args(args)
    else:
        cpus = engine_cpus(args, cfg)
        engine = EngineProcess(partial(engine_from_args, args), tokenizer, cpus=cpus)
        if cpus:  # this process (HTTP, tokenizing, streaming) keeps off the engine's CPUs
            pin_process(os.sched_getaffinity(0) - cpus)
            print(f"grok1 serve: engine process on CPU {', '.join(map(str, sorted(cpus)))}, "
                  f"HTTP on CPU {', '.join(map(str, sorted(os.sched_getaffinity(0))))} (--no-pin to turn off)",
                  flush=True)
    name = args.model_name or Path(args.checkpoint).resolve().name
    print(f"grok1 serve: model {name!r}, {args.max_batch} slots x {engine.max_seq_len} tokens; "
          f"chat page at http://{args.host}:{args.port}/", flush=True)
    hosts = [h.strip() for h in args.allowed_hosts.split(",") if h.strip()] if args.allowed_hosts else None
    code = serve(engine, tokenizer, name, args.host, args.port, api_key=key,
                 system_prompt=PERSONAS[args.persona] if args.persona else None,
                 shutdown_timeout=args.shutdown_timeout, allowed_hosts=hosts,
                 **({"max_body_bytes": args.max_body_bytes} if args.max_body_bytes else {}))
    if job is not None:
        if job.watchdog.failure is not None:
            raise ValueError(job.watchdog.failure)  # the ranks are gone: nothing to close
        engine.shutdown()
        engine.runner.close()
        job.leave()
    return code


def leader_engine(args: argparse.Namespace, job: ranks.Job) -> Engine:
    """Rank 0's engine: each step goes to the other ranks first; if one of them dies, the engine stops, so that
    /health and new requests answer 503 (an orchestrator restarts the job) instead of hanging clients."""
    engine = engine_from_args(args, job)
    engine.runner = LeaderRunner(engine.runner, job.control)

    def lost(message: str) -> None:
        logging.getLogger("grok1.serve").error("%s; the engine stops, /health answers 503", message)
        engine.stop()

    job.watchdog.on_failure = lost
    return engine
