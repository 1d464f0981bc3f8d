"""An API stand-in that answers every GET with given bytes, unparsed, as `application/json`.

The local feed (`trafficwatch_dev.feed`) parses its snapshot files and renders them again, so it cannot send
what JSON cannot hold (Latin-1 bytes, 100,000 levels of nesting). This one sends `bodies[i]` exactly,
`i` moving on with `advance()` and staying on the last body.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class RawFeed(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, bodies: list[bytes]) -> None:
        self.bodies = bodies
        self.index = 0
        super().__init__(("127.0.0.1", 0), _Handler)
        self._thread = threading.Thread(target=self.serve_forever, args=(0.05,), name="rawfeed", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def advance(self) -> None:
        self.index = min(self.index + 1, len(self.bodies) - 1)

    def __enter__(self) -> RawFeed:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(timeout=5)


class _Handler(BaseHTTPRequestHandler):
    server: RawFeed

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""

    def do_GET(self) -> None:
        body = self.server.bodies[self.server.index]
        self.send_response(200)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
