"""The engine's errors, by kind, so that callers (the server, the CLI) classify them by type, never by message.

Each also derives from the builtin that older callers caught (ValueError for a bad request, RuntimeError for
an engine that cannot take work), so `except ValueError` keeps working.
"""


class EngineError(Exception):
    """Base of every error the engine raises on purpose."""


class InvalidRequest(EngineError, ValueError):
    """The request can never run as given: an empty prompt, an id outside the vocabulary, a duplicate id, bad
    sampling parameters (HTTP 400)."""


class ContextOverflow(InvalidRequest):
    """The prompt (plus at least one generated token) does not fit the context (HTTP 400,
    `context_length_exceeded`)."""


class QueueFull(EngineError):
    """Too many requests are waiting; the caller should retry later (HTTP 429)."""


class EngineUnavailable(EngineError, RuntimeError):
    """The engine cannot take work: it is not running, or it died (HTTP 503)."""


class ShuttingDown(EngineUnavailable):
    """The engine is draining for a shutdown and takes no new requests (HTTP 503)."""
