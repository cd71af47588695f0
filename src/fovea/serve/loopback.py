"""fovea's server on a free loopback port in a background thread: for benchmarks and tests that talk to a real
HTTP server in the same process."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any


class LoopbackServer:
    """``with LoopbackServer(app) as url: ...`` serves ``app`` (an ASGI app) on 127.0.0.1 until the block ends."""

    def __init__(self, app: Any, *, log_level: str = "error", start_timeout_s: float = 30.0) -> None:
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level=log_level))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.start_timeout_s = start_timeout_s

    def start(self) -> LoopbackServer:
        self.thread.start()
        deadline = time.time() + self.start_timeout_s
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"the server did not start on {self.url} within {self.start_timeout_s:.0f} s")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def __enter__(self) -> str:
        return self.start().url

    def __exit__(self, *exc: object) -> None:
        self.stop()
