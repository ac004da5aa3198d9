"""Run the app under uvicorn with a graceful shutdown that ends every stream cleanly.

On Ctrl-C / SIGTERM uvicorn stops accepting connections and waits for the running responses.
Streams still running after `shutdown_timeout` seconds are cancelled in the engine, so each one
ends with an error event and `data: [DONE]` instead of being cut off mid-stream.
"""

from __future__ import annotations

import threading
from types import FrameType

import uvicorn

from grok1.engine.engine import Engine
from grok1.engine.process import EngineProcess
from grok1.server.app import create_app
from grok1.tokenizer import Tokenizer


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: Engine | EngineProcess, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.engine, self.shutdown_timeout = engine, shutdown_timeout

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:  # the first signal: give running streams `shutdown_timeout` seconds
            timer = threading.Timer(self.shutdown_timeout, self.engine.cancel_all)
            timer.daemon = True
            timer.start()
        super().handle_exit(sig, frame)


def serve(engine: Engine | EngineProcess, tokenizer: Tokenizer, model_name: str, host: str = "127.0.0.1",
          port: int = 8000, api_key: str | None = None, system_prompt: str | None = None,
          shutdown_timeout: float = 10.0) -> None:
    """Serve until interrupted (blocks)."""
    app = create_app(engine, tokenizer, model_name, api_key=api_key, system_prompt=system_prompt)
    # uvicorn's own deadline is a backstop only: the engine has cancelled every stream well before it.
    config = uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=int(shutdown_timeout) + 10,
                            log_level="info")
    try:
        _Server(config, engine, shutdown_timeout).run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled, after shutting down cleanly
        pass
