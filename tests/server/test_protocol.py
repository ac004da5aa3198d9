"""The wire format's side of engine errors: each kind of engine refusal becomes its own OpenAI error."""

from grok1.engine.errors import ContextOverflow, EngineUnavailable, InvalidRequest, QueueFull, ShuttingDown
from grok1.server import protocol as p


def test_engine_errors_become_openai_errors_by_type():
    expected = {  # error -> (HTTP status, error type, code, param); the message is the engine's
        InvalidRequest("the prompt is empty"): (400, "invalid_request_error", "invalid_value", "prompt"),
        ContextOverflow("the prompt has 9 tokens"): (400, "invalid_request_error", "context_length_exceeded", "prompt"),
        ShuttingDown("the engine is shutting down"): (503, "server_error", "shutting_down", None),
        EngineUnavailable("the engine process is not running"): (503, "server_error", "engine_unavailable", None),
    }
    for e, (status, kind, code, param) in expected.items():
        api = p.engine_error(e, "prompt")
        assert (api.status, api.type, api.code, api.param) == (status, kind, code, param), e
        assert api.body()["error"]["message"] == str(e)
    # a message that mentions the context is not what makes an overflow: the type is
    assert p.engine_error(InvalidRequest("no context here"), "prompt").code == "invalid_value"
    busy = p.engine_error(QueueFull("3 requests are already waiting"), "prompt")
    assert (busy.status, busy.type, busy.code) == (429, "rate_limit_error", "queue_full")
    assert busy.message == "the server is busy: 3 requests are already waiting; retry later"
