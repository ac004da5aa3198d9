"""`grok1 chat`: a terminal chat, with the model in this process or on a `grok1 serve` server (--url).

Commands: /reset (forget the conversation), /system TEXT (set the system prompt), /save FILE (write the
conversation as JSON), /help, /quit. Ctrl-C stops the current answer and keeps the chat; Ctrl-D exits.
"""

from __future__ import annotations

import argparse
import json
import queue
import signal
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from grok1.cli.serve import add_engine_options, engine_from_args
from grok1.engine.engine import Engine
from grok1.engine.sampling import SamplingParams
from grok1.engine.scheduler import Output
from grok1.tokenizer import CHAT_STOP, PERSONAS, chat_prompt

HELP = "commands: /reset, /system TEXT, /save FILE, /help, /quit; Ctrl-C stops an answer, Ctrl-D exits"
Reply = Callable[[list[dict], dict], Iterator[str]]  # (messages, settings) -> text pieces


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("chat", parents=[common], help="chat in the terminal",
                       description="Chat with the model in the terminal, streaming each answer. " + HELP + ".")
    p.add_argument("--url", help="talk to a running `grok1 serve` at this base URL (e.g. http://127.0.0.1:8000) "
                                 "instead of loading the model here")
    p.add_argument("--api-key", metavar="KEY", help="API key for --url")
    p.add_argument("--system", metavar="TEXT", help="system prompt (default: none, or the --persona prompt)")
    p.add_argument("--max-tokens", type=int, default=512, metavar="N", help="longest answer in tokens (default 512)")
    p.add_argument("--temperature", type=float, default=0.8, metavar="T", help="0 = greedy (default 0.8)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling; 1 = off (default)")
    p.add_argument("--seed", type=int, metavar="S", help="random seed for reproducible answers")
    add_engine_options(p)
    p.set_defaults(run=run, max_batch=1)


def run(args: argparse.Namespace) -> int:
    settings = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
                "seed": args.seed}
    system = args.system or (PERSONAS[args.persona] if args.persona else None)
    # Ctrl-C stops an answer: make it raise KeyboardInterrupt even if SIGINT came in ignored (a process started
    # from a background job of a non-interactive shell inherits SIG_IGN, and Python then leaves it so).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if args.url:
        return chat_loop(partial_remote(args.url.rstrip("/"), args.api_key), settings, system)
    engine = engine_from_args(args)
    engine.start()
    try:
        return chat_loop(partial_local(engine), settings, system)
    finally:
        engine.shutdown()


def chat_loop(reply: Reply, settings: dict, system: str | None) -> int:
    """Read lines, run commands, stream answers. Returns the exit code."""
    messages: list[dict] = []
    print(f"grok1 chat. {HELP}.", flush=True)
    while True:
        try:
            line = input("you> ")
        except EOFError:  # Ctrl-D
            print()
            return 0
        except KeyboardInterrupt:
            print("\n(Ctrl-D exits)")
            continue
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, rest = line.partition(" ")
            if cmd in ("/quit", "/exit"):
                return 0
            if cmd == "/reset":
                messages.clear()
                print("(conversation cleared)")
            elif cmd == "/system":
                system = rest.strip() or None
                print(f"(system prompt {'set' if system else 'cleared'})")
            elif cmd == "/save" and rest.strip():
                turns = ([{"role": "system", "content": system}] if system else []) + messages
                Path(rest.strip()).write_text(json.dumps({"messages": turns}, indent=2, ensure_ascii=False) + "\n")
                print(f"(saved {len(turns)} messages to {rest.strip()})")
            else:
                print(f"({HELP})")
            continue
        messages.append({"role": "user", "content": line})
        turns = ([{"role": "system", "content": system}] if system else []) + messages
        answer = ""
        sys.stdout.write("grok> ")
        sys.stdout.flush()
        try:
            for piece in reply(turns, settings):
                answer += piece
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        except (OSError, ValueError) as e:
            sys.stdout.write(f"[error: {e}]")
        print(flush=True)
        messages.append({"role": "assistant", "content": answer.strip()})


def partial_local(engine: Engine) -> Reply:
    """Answers from an in-process engine running on its background thread (Ctrl-C lands here, not in a step)."""
    tok = engine.tokenizer
    assert tok is not None

    def reply(messages: list[dict], s: dict) -> Iterator[str]:
        prompt = tok.encode(chat_prompt(messages))
        room = engine.max_seq_len - len(prompt)
        if room < 1:
            raise ValueError(f"the conversation ({len(prompt)} tokens) fills the context; /reset to start over")
        params = SamplingParams(temperature=s["temperature"], top_p=s["top_p"], seed=s["seed"], stop=CHAT_STOP,
                                max_new_tokens=min(s["max_tokens"], room))
        outputs: queue.Queue[Output] = queue.Queue()
        req = engine.add_request(prompt, params, on_output=outputs.put)
        started = False  # the reply's leading space (after "Assistant:") is dropped
        try:
            while True:
                try:
                    out = outputs.get(timeout=0.1)  # a timeout keeps Ctrl-C responsive
                except queue.Empty:
                    continue
                text = out.text if started else out.text.lstrip()
                started = started or bool(text)
                yield text
                if out.finish_reason is not None:
                    return
        finally:
            if req.finish_reason is None:
                engine.cancel(req.id)

    return reply


def partial_remote(url: str, api_key: str | None) -> Reply:
    """Answers from a server's /v1/chat/completions, streamed as server-sent events."""
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {api_key}"} if api_key else {})
    with urllib.request.urlopen(urllib.request.Request(url + "/v1/models", headers=headers), timeout=30) as r:
        model = json.load(r)["data"][0]["id"]

    def reply(messages: list[dict], s: dict) -> Iterator[str]:
        body = {"model": model, "messages": messages, "stream": True} | {k: v for k, v in s.items() if v is not None}
        request = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(), headers)
        try:
            response = urllib.request.urlopen(request, timeout=600)
        except urllib.error.HTTPError as e:
            raise ValueError(json.loads(e.read() or b"{}").get("error", {}).get("message", str(e))) from None
        with response:  # closing it early (Ctrl-C) makes the server cancel the request
            for raw in response:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise ValueError(chunk["error"]["message"])
                for choice in chunk["choices"]:
                    yield choice["delta"].get("content") or ""

    return reply
