"""`grok1 chat`: a terminal chat, with the model in this process or on a `grok1 serve` server (--url).

Commands: /reset (forget the conversation), /system TEXT (set the system prompt), /save FILE (write the
conversation as JSON), /help, /quit. Ctrl-C stops the current answer and keeps the chat; Ctrl-D exits.
Line editing and input history (kept in ~/.grok1_history) come from readline when the input is a terminal.

The context holds the prompt and the answer: each answer may take --max-tokens (default a quarter of the
context, at most 512), and when the conversation no longer fits beside it the oldest turns are dropped from
what the model sees (they stay in /save). A turn that fails or yields no answer leaves the history as it was.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from grok1.cli.common import check_sampling, positive_int, seed_arg
from grok1.cli.serve import add_engine_options, engine_from_args
from grok1.engine.client import EngineClient
from grok1.engine.sampling import SamplingParams
from grok1.tokenizer import CHAT_STOP, PERSONAS, chat_prompt

HELP = "commands: /reset, /system TEXT, /save FILE, /help, /quit; Ctrl-C stops an answer, Ctrl-D exits"
HISTORY = Path("~/.grok1_history")  # readline's input history between sessions
Reply = Callable[[list[dict], dict], Iterator[str]]  # (messages, settings) -> text pieces


class ContextFull(ValueError):
    """The conversation plus room for the answer does not fit the model's context."""


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("chat", parents=[common], help="chat in the terminal",
                       description="Chat with the model in the terminal, streaming each answer. " + HELP + ". "
                                   "When the conversation fills the context, its oldest turns are dropped.")
    p.add_argument("--url", help="talk to a running `grok1 serve` at this base URL (e.g. http://127.0.0.1:8000) "
                                 "instead of loading the model here")
    p.add_argument("--api-key", metavar="KEY", help="API key for --url")
    p.add_argument("--system", metavar="TEXT", help="system prompt (default: none, or the --persona prompt)")
    p.add_argument("--max-tokens", type=positive_int, metavar="N",
                   help="longest answer in tokens (default: a quarter of the context, at most 512)")
    p.add_argument("--temperature", type=float, default=0.8, metavar="T", help="0 = greedy (default 0.8)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling; 1 = off (default)")
    p.add_argument("--seed", type=seed_arg, metavar="S", help="random seed for reproducible answers")
    add_engine_options(p)
    p.set_defaults(run=run, max_batch=1)


def answer_tokens(requested: int | None, context: int) -> int:
    """Tokens reserved for each answer: --max-tokens, or a quarter of the context (at most 512); it must leave
    room for a question."""
    n = requested if requested is not None else max(1, min(512, context // 4))
    if n > context - 2:
        raise ValueError(f"--max-tokens {n} leaves no room for the conversation in the model's {context}-token "
                         f"context; use at most {context // 2}")
    return n


def run(args: argparse.Namespace) -> int:
    check_sampling(args, "--max-tokens")
    system = args.system or (PERSONAS[args.persona] if args.persona else None)
    # Ctrl-C stops an answer: make it raise KeyboardInterrupt even if SIGINT came in ignored (a process started
    # from a background job of a non-interactive shell inherits SIG_IGN, and Python then leaves it so).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if args.url:
        if not args.url.startswith(("http://", "https://")):
            raise ValueError(f"--url {args.url}: give the server's base URL, e.g. http://127.0.0.1:8000")
        reply, context = partial_remote(args.url.rstrip("/"), args.api_key)
        return chat_loop(reply, settings(args, context), system)
    engine = engine_from_args(args)
    engine.start()
    try:
        return chat_loop(partial_local(engine), settings(args, engine.max_seq_len), system)
    finally:
        engine.shutdown()


def settings(args: argparse.Namespace, context: int) -> dict:
    return {"max_tokens": answer_tokens(args.max_tokens, context), "temperature": args.temperature,
            "top_p": args.top_p, "seed": args.seed}


def read_line(prompt: str) -> str | None:
    """One line of input; None at Ctrl-D. Bytes that are not UTF-8 are refused with a line saying where."""
    line = input(prompt)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError as e:  # stdin decodes with surrogateescape (see chat_loop)
        offset = len(line[:e.start].encode("utf-8", "surrogateescape"))
        print(f"(that line is not valid UTF-8: byte 0x{ord(line[e.start]) & 0xFF:02x} at offset {offset}; "
              "it was not sent)")
        return ""
    return line


def start_readline() -> Callable[[], None]:
    """Line editing and history when input is a terminal; returns what saves the history at exit."""
    if not sys.stdin.isatty():
        return lambda: None
    try:
        import readline
    except ImportError:  # Windows without pyreadline: plain input()
        return lambda: None
    path = HISTORY.expanduser()
    try:
        readline.read_history_file(path)
    except OSError:
        pass
    readline.set_history_length(1000)

    def save() -> None:
        try:
            readline.write_history_file(path)
        except OSError:
            pass

    return save


def chat_loop(reply: Reply, settings: dict, system: str | None) -> int:
    """Read lines, run commands, stream answers. Returns the exit code."""
    if hasattr(sys.stdin, "reconfigure"):  # undecodable input reaches read_line instead of raising in input()
        sys.stdin.reconfigure(errors="surrogateescape")
    save_history = start_readline()
    messages: list[dict] = []  # the whole conversation (what /save writes)
    first = 0  # messages[first:] is what the model sees; older turns were dropped to fit the context
    print(f"grok1 chat. {HELP}.", flush=True)
    try:
        while True:
            try:
                line = read_line("you> ")
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
                    first = 0
                    print("(conversation cleared)")
                elif cmd == "/system":
                    system = rest.strip() or None
                    print(f"(system prompt {'set' if system else 'cleared'})")
                elif cmd == "/save" and rest.strip():
                    save(rest.strip(), system, messages)
                else:
                    print(f"({HELP})")
                continue
            first = turn(reply, settings, system, messages, first, line)
    finally:
        save_history()


def save(path: str, system: str | None, messages: list[dict]) -> None:
    turns = ([{"role": "system", "content": system}] if system else []) + messages
    try:
        Path(path).expanduser().write_text(json.dumps({"messages": turns}, indent=2, ensure_ascii=False) + "\n")
    except OSError as e:
        print(f"(could not save to {path}: {e.strerror or e})")
        return
    print(f"(saved {len(turns)} messages to {path})")


def turn(reply: Reply, settings: dict, system: str | None, messages: list[dict], first: int, line: str) -> int:
    """Ask `line` and stream the answer; on success both join `messages`. Returns the new `first`; a turn that
    fails leaves `messages` and `first` as they were."""
    messages.append({"role": "user", "content": line})
    start = first
    while True:
        turns = ([{"role": "system", "content": system}] if system else []) + messages[first:]
        try:
            pieces = reply(turns, settings)  # a context error comes before any text
        except ContextFull as e:
            if len(messages) - first > 1:  # drop the oldest turn (a question and its answer) and try again
                first += 2 if messages[first + 1]["role"] == "assistant" else 1
                print(f"(dropped the oldest turn to fit the context; the model sees the last "
                      f"{len(messages) - first} messages)", flush=True)
                continue
            messages.pop()
            print(f"[error: {e}]", flush=True)
            return start
        except (OSError, ValueError) as e:
            messages.pop()
            print(f"[error: {e}]", flush=True)
            return start
        except KeyboardInterrupt:
            messages.pop()
            print(" [stopped]", flush=True)
            return start
        break
    sys.stdout.write("grok> ")
    sys.stdout.flush()
    answer, stopped = "", ""
    try:
        for piece in pieces:
            answer += piece
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        stopped = " [stopped]"
        pieces.close()
    except (OSError, ValueError) as e:
        stopped = f" [error: {e}]"
        pieces.close()
        answer = ""  # an answer cut by an error is not kept
    answer = answer.strip()
    if not answer:
        messages.pop()  # no answer: the question leaves the history too, so the next turn starts clean
        print(f"{stopped or ' (no answer)'} (not kept in the conversation)", flush=True)
        return start
    print(stopped, flush=True)
    messages.append({"role": "assistant", "content": answer})
    return first


def partial_local(engine: EngineClient) -> Reply:
    """Answers from an engine whose loop runs elsewhere (Ctrl-C lands here, not in a step)."""
    tok = engine.tokenizer
    assert tok is not None

    def reply(messages: list[dict], s: dict) -> Iterator[str]:
        prompt = tok.encode(chat_prompt(messages))
        if len(prompt) + s["max_tokens"] > engine.max_seq_len:
            raise ContextFull(f"the conversation ({len(prompt)} tokens) and an answer of up to {s['max_tokens']} "
                              f"do not fit the {engine.max_seq_len}-token context; /reset to start over")
        params = SamplingParams(temperature=s["temperature"], top_p=s["top_p"], seed=s["seed"], stop=CHAT_STOP,
                                max_new_tokens=s["max_tokens"])
        return stream(prompt, params)

    def stream(prompt: list[int], params: SamplingParams) -> Iterator[str]:
        started = False  # the reply's leading space (after "Assistant:") is dropped
        for out in engine.stream(prompt, params):  # closing it (Ctrl-C) cancels the request
            text = out.text if started else out.text.lstrip()
            started = started or bool(text)
            yield text

    return reply


def http_error(e: urllib.error.HTTPError, url: str) -> ValueError:
    """A server's error response as one line: its own message, and what to do about a 401."""
    try:
        body = json.loads(e.read() or b"{}")
    except ValueError:
        body = {}
    error = body.get("error") if isinstance(body, dict) else None
    error = error if isinstance(error, dict) else {}
    message = f"{url} answered {e.code}: {error.get('message') or e.reason}"
    if e.code == 401:
        message += " (pass the server's key with --api-key KEY)"
    if error.get("code") == "context_length_exceeded":
        return ContextFull(message)
    return ValueError(message)


def partial_remote(url: str, api_key: str | None) -> tuple[Reply, int]:
    """Answers from a server's /v1/chat/completions, streamed as server-sent events; and the server's context."""
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(urllib.request.Request(url + "/v1/models", headers=headers), timeout=30) as r:
            model = json.load(r)["data"][0]
    except urllib.error.HTTPError as e:
        raise http_error(e, url) from None
    except urllib.error.URLError as e:
        raise ValueError(f"cannot reach {url}: {e.reason} (is `grok1 serve` running there?)") from None
    except TimeoutError:
        raise ValueError(f"{url} did not answer within 30 s") from None
    except (ValueError, KeyError, IndexError):
        raise ValueError(f"{url}/v1/models did not answer like a grok1 or OpenAI server") from None

    def reply(messages: list[dict], s: dict) -> Iterator[str]:
        body = {"model": model["id"], "messages": messages, "stream": True} | {k: v for k, v in s.items()
                                                                                 if v is not None}
        request = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(), headers)
        try:
            response = urllib.request.urlopen(request, timeout=600)
        except urllib.error.HTTPError as e:
            raise http_error(e, url) from None
        except urllib.error.URLError as e:
            raise ValueError(f"cannot reach {url}: {e.reason}") from None
        return events(response)

    def events(response) -> Iterator[str]:
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

    return reply, int(model.get("max_model_len") or 2048)
