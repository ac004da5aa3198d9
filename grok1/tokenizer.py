"""SentencePiece tokenizer wrapper, a streaming detokenizer and the text stream of one generation.

Grok-1 ships a SentencePiece BPE model (vocab 131072, byte fallback, pad 0, bos 1,
eos 2, unk 3). Prompts are encoded without BOS, as the reference runner does.

Chat template. Grok-1 is a base model, so grok1 defines a plain-text chat format (used by
`/v1/chat/completions`, `grok1 chat` and the web page): each turn is `Role: text` followed by a
blank line, roles System, User and Assistant, and the prompt ends with `Assistant:` for the model
to continue. Generation stops at CHAT_STOP (the start of the next turn):

    System: You are a helpful assistant.

    User: Hi!

    Assistant: Hello! How can I help?

    User: What is 2 + 2?

    Assistant:

Imports nothing from grok1 (layer 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm

CHAT_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
CHAT_STOP = ("\nUser:", "\nSystem:")  # a reply ends where the model starts the next turn
PERSONAS = {
    "grok": "You are Grok, a chatbot built by xAI and inspired by the Hitchhiker's Guide to the Galaxy. "
            "You answer with wit and a rebellious streak, you are maximally helpful, and you say so "
            "plainly when you do not know something.",
}


def chat_prompt(messages: Sequence[dict[str, str]]) -> str:
    """OpenAI-style messages [{"role": "system"|"user"|"assistant", "content": str}, ...] -> prompt text
    in the chat template above, ending with "Assistant:". Raises ValueError for an unknown role."""
    turns = []
    for i, m in enumerate(messages):
        role = CHAT_ROLES.get(m.get("role", ""))
        if role is None:
            raise ValueError(f"message {i}: role {m.get('role')!r} is not one of {', '.join(CHAT_ROLES)}")
        turns.append(f"{role}: {str(m.get('content') or '').strip()}\n\n")
    return "".join(turns) + "Assistant:"


class Tokenizer:
    """Thin wrapper over `sentencepiece.SentencePieceProcessor`."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"tokenizer model not found: {path} (expected a SentencePiece .model file)")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"cannot load SentencePiece model from {path}: {e}") from e
        self.path = path

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    @property
    def pad_id(self) -> int:
        return self.sp.pad_id()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def unk_id(self) -> int:
        return self.sp.unk_id()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Text -> ids; BOS/EOS are added only when asked (the runner adds neither)."""
        ids: list[int] = self.sp.encode(text)
        if bos:
            if self.bos_id < 0:
                raise ValueError(f"{self.path} defines no BOS piece; cannot encode with bos=True")
            ids.insert(0, self.bos_id)
        if eos:
            if self.eos_id < 0:
                raise ValueError(f"{self.path} defines no EOS piece; cannot encode with eos=True")
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text. Control pieces decode to ''; invalid byte runs to U+FFFD per byte."""
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def byte_value(self, i: int) -> int | None:
        """The byte of a byte-fallback piece `<0xNN>`, else None."""
        return int(self.id_to_piece(i)[3:5], 16) if self.sp.is_byte(int(i)) else None

    def is_control(self, i: int) -> bool:
        """True for control pieces ([PAD], [BOS], [EOS]), which decode to ''."""
        return self.sp.is_control(int(i))


def _incomplete_utf8_tail(tail: Sequence[int]) -> bool:
    """Whether the last bytes could be the start of a multi-byte UTF-8 character."""
    for n, b in enumerate(reversed(tail[-3:])):  # n continuation bytes after `b`
        if b >= 0xC0:  # lead byte
            need = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
            return n + 1 < need
        if not 0x80 <= b < 0xC0:  # ASCII: nothing pending
            return False
    return False


class StreamDecoder:
    """Turns ids pushed one at a time into text, emitting each character once complete.

    Invariant: "".join(push(i) for i in ids) + flush() == tokenizer.decode(ids).

    Not quadratic: only `ids[prefix:]` is re-decoded, where `prefix` is the latest
    boundary before `read` (ids[:read] are emitted). A boundary is any piece that is not
    a control piece and not a UTF-8 continuation byte: it starts a fresh character and
    decodes to non-empty text (or consumes the leading `▁`), which ends SentencePiece's
    leading-space stripping. So the text added after it is the same whether decoding
    starts at 0 or at `prefix`.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start
        self.read = 0  # ids[:read] have been emitted
        self.prefix_text = ""  # decode(ids[prefix:read])

    def push(self, token_id: int) -> str:
        """Add one id; return the newly completed text (possibly '')."""
        self.ids.append(int(token_id))
        if self._pending_bytes():
            return ""  # hold back: a multi-byte character is not complete yet
        return self._emit()

    def flush(self) -> str:
        """Return whatever is held back (an incomplete character decodes to U+FFFD)."""
        return self._emit() if self.read < len(self.ids) else ""

    def _pending_bytes(self) -> bool:
        tail: list[int] = []  # trailing byte-fallback values, at most 3
        for i in reversed(self.ids[self.read :]):
            b = self.tok.byte_value(i)
            if b is None or len(tail) == 3:
                break
            tail.append(b)
        return _incomplete_utf8_tail(tail[::-1])

    def _is_boundary(self, i: int) -> bool:
        b = self.tok.byte_value(i)
        return not (self.tok.is_control(i) or (b is not None and 0x80 <= b < 0xC0))

    def _emit(self) -> str:
        text = self.tok.decode(self.ids[self.prefix :])
        assert text.startswith(self.prefix_text), (self.prefix_text, text)
        new = text[len(self.prefix_text) :]
        self.read = len(self.ids)
        start = next(
            (j for j in range(self.read - 1, self.prefix, -1) if self._is_boundary(self.ids[j])),
            self.prefix,
        )
        self.prefix_text = text if start == self.prefix else self.tok.decode(self.ids[start : self.read])
        self.prefix = start
        return new


CONTEXT_IDS = 16  # prompt ids replayed into a TextStream's decoder: enough to reach a piece boundary


class TextStream:
    """Incremental text of one request, holding back anything that might begin a stop string."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str], context: Sequence[int] = ()) -> None:
        """`context`: the prompt ids. The continuation is decoded after them, so a first piece like
        "▁may" gives " may" (decoded alone, SentencePiece would drop that leading space)."""
        self.decoder = StreamDecoder(tokenizer)
        for token in context[-CONTEXT_IDS:]:
            self.decoder.push(token)  # primes the decoder; the prompt's own text is not emitted
        self.stop = [s for s in stop if s]
        self.text = ""  # all text decoded so far
        self.emitted = 0  # characters of `text` already handed out
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; return the text that is now final. Sets `stopped` when a stop string appears."""
        return self._advance(self.decoder.push(token))

    def finish(self) -> str:
        """No more tokens: release whatever was held back."""
        return self._advance(self.decoder.flush(), final=True)

    def _advance(self, new: str, final: bool = False) -> str:
        self.text += new
        longest = max((len(s) for s in self.stop), default=0)
        start = max(0, self.emitted - longest)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
            final = True
        safe = len(self.text)
        if not final:  # hold back a suffix that is a prefix of some stop string
            for s in self.stop:
                for n in range(min(len(s) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(s[:n]):
                        safe = min(safe, len(self.text) - n)
                        break
        out, self.emitted = self.text[self.emitted : safe], max(self.emitted, safe)
        return out
