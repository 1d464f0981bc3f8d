"""A loopback TCP proxy in front of the real S3 server that counts HTTP requests and injects one fault.

Clients (boto3, delta-rs) talk plain HTTP/1.1 with keep-alive to `proxy.url` instead of the server. The
proxy reads the request stream of each connection just enough to tell where one request ends and the
next begins (headers, then a Content-Length or chunked body), numbers every request across all
connections (1, 2, ...) and, at the request armed with `arm(n, ...)`:

- `CUT`: closes both sockets before anything of request n reaches the server;
- `DROP_RESPONSE`: forwards request n whole, waits for the server's answer and closes both sockets
  instead of passing it on (the write happened, the client cannot know);
- `HOOK`: calls `hook()` (e.g. SIGKILL a process), then closes both sockets as `CUT` does.

The fault fires once per `arm` (or, `lasting`, cuts every request from then on: S3 is gone), counting
every request or only those of some methods (`WRITES`). Responses are relayed unparsed. `requests` and
`seen` tell what went through since the last `arm` or `reset`, as a count mode. `hold` keeps requests
waiting until `release`: a process started ahead stops at its first request, its start-up done.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

CUT = "cut"
DROP_RESPONSE = "drop_response"
HOOK = "hook"
ACTIONS = (CUT, DROP_RESPONSE, HOOK)
WRITES = ("PUT", "POST", "DELETE")


@dataclass(frozen=True)
class SeenRequest:
    number: int
    method: str
    target: str


@dataclass
class _Fault:
    at: int
    action: str
    hook: Callable[[], None] | None
    methods: tuple[str, ...]
    lasting: bool
    matched: int = 0  # requests numbered for the fault so far
    fired: threading.Event = field(default_factory=threading.Event)


class _RequestFramer:
    """Incremental HTTP/1.1 request framing over one connection's client-to-server bytes.

    `feed(data)` yields ("head", bytes, method, target) when a request's headers are complete and
    ("body", bytes) for the bytes of its body (Content-Length or chunked) as they come.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._state = "head"
        self._remaining = 0  # body bytes left (Content-Length) or of the current chunk
        self._chunked = False

    def feed(self, data: bytes) -> Iterator[tuple]:
        self._buffer += data
        while self._buffer:
            if self._state == "head":
                end = self._buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                head, self._buffer = self._buffer[: end + 4], self._buffer[end + 4 :]
                lines = head.decode("latin-1").split("\r\n")
                method, target = [*lines[0].split(" "), "", ""][:2]
                headers = {}
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                yield ("head", head, method, target)
                self._chunked = "chunked" in headers.get("transfer-encoding", "").lower()
                if self._chunked:
                    self._state = "chunk-size"
                else:
                    self._remaining = int(headers.get("content-length") or 0)
                    self._state = "body"
                    if self._remaining == 0:
                        self._state = "head"
            elif self._state == "body":
                part, self._buffer = self._buffer[: self._remaining], self._buffer[self._remaining :]
                self._remaining -= len(part)
                yield ("body", part)
                if self._remaining == 0:
                    self._state = "head"
            elif self._state in ("chunk-size", "trailer"):
                end = self._buffer.find(b"\r\n")
                if end < 0:
                    return
                line, self._buffer = self._buffer[: end + 2], self._buffer[end + 2 :]
                yield ("body", line)
                if self._state == "trailer":
                    if line == b"\r\n":
                        self._state = "head"
                    continue
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    self._state = "trailer"
                else:
                    self._remaining, self._state = size + 2, "chunk-data"  # the data and its CRLF
            elif self._state == "chunk-data":
                part, self._buffer = self._buffer[: self._remaining], self._buffer[self._remaining :]
                self._remaining -= len(part)
                yield ("body", part)
                if self._remaining == 0:
                    self._state = "chunk-size"


class _Connection:
    def __init__(self, proxy: S3Proxy, client: socket.socket, upstream: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream = upstream
        self.drop_next_response = False
        self._closed = False
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()
        self.proxy._forget(self)

    def client_to_upstream(self) -> None:
        framer = _RequestFramer()
        try:
            while True:
                data = self.client.recv(65536)
                if not data:
                    break
                for event in framer.feed(data):
                    if event[0] == "head":
                        action = self.proxy._on_request(event[2], event[3])
                        if action in (CUT, HOOK):
                            return
                        # Set before the request goes out: its answer may come back at once.
                        self.drop_next_response = action == DROP_RESPONSE
                        self.upstream.sendall(event[1])
                    elif event[0] == "body":
                        self.upstream.sendall(event[1])
        except OSError:
            pass
        finally:
            self.close()

    def upstream_to_client(self) -> None:
        try:
            while True:
                data = self.upstream.recv(65536)
                if not data:
                    break
                # An interim "100 Continue" lets the client send the body; the final answer is dropped.
                if self.drop_next_response and not data.startswith(b"HTTP/1.1 1"):
                    break
                self.client.sendall(data)
        except OSError:
            pass
        finally:
            self.close()


class S3Proxy:
    """See the module docstring. Use as a context manager, or `start()` and `close()`."""

    def __init__(self, upstream_url: str) -> None:
        parts = urlsplit(upstream_url)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._lock = threading.Lock()
        self._count = 0
        self._seen: list[SeenRequest] = []
        self._fault: _Fault | None = None
        self._connections: set[_Connection] = set()
        self._stopping = threading.Event()
        self._open = threading.Event()  # the gate: requests wait here while it is shut (`hold`)
        self._open.set()
        self._thread = threading.Thread(target=self._accept, name="s3proxy-accept", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._listener.getsockname()[:2]
        return f"http://{host}:{port}"

    def start(self) -> S3Proxy:
        self._thread.start()
        return self

    def __enter__(self) -> S3Proxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stopping.set()
        self._open.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() that close() alone would not
        with contextlib.suppress(OSError):
            self._listener.close()
        self.drop_connections()
        self._thread.join(timeout=5)

    def drop_connections(self) -> None:
        """Close every open connection (kept-alive ones of earlier clients included)."""
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            connection.close()

    # -- counting and faults ---------------------------------------------------------------------

    def hold(self) -> None:
        """Keep every request waiting, uncounted, until `release()`: a client started ahead waits there."""
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def reset(self) -> None:
        """Count from zero again, with no fault armed, and close the connections kept alive so far."""
        with self._lock:
            self._count, self._seen, self._fault = 0, [], None
        self.drop_connections()

    def arm(
        self,
        at: int,
        action: str = CUT,
        hook: Callable[[], None] | None = None,
        methods: tuple[str, ...] = (),
        lasting: bool = False,
    ) -> None:
        """Count from zero again; the `at`-th request from now (1-based) gets `action`.

        With `methods` (e.g. WRITES), only requests with one of those methods are numbered for the
        fault. With `lasting`, every request after it is cut too: the server is gone for good.
        """
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}; expected one of {', '.join(ACTIONS)}")
        if (action == HOOK) != (hook is not None):
            raise ValueError("a hook goes with the HOOK action, and only with it")
        with self._lock:
            self._count, self._seen = 0, []
            self._fault = _Fault(at, action, hook, methods, lasting)

    @property
    def requests(self) -> int:
        with self._lock:
            return self._count

    @property
    def seen(self) -> list[SeenRequest]:
        with self._lock:
            return list(self._seen)

    @property
    def fired(self) -> bool:
        with self._lock:
            return self._fault is not None and self._fault.fired.is_set()

    def _on_request(self, method: str, target: str) -> str | None:
        self._open.wait()
        with self._lock:
            self._count += 1
            self._seen.append(SeenRequest(self._count, method, target))
            fault = self._fault
            if fault is None:
                return None
            if fault.fired.is_set():
                return CUT if fault.lasting else None
            if not fault.methods or method in fault.methods:
                fault.matched += 1
            if fault.matched != fault.at:
                return None
            fault.fired.set()
        if fault.hook is not None:
            fault.hook()
        return fault.action

    # -- plumbing --------------------------------------------------------------------------------

    def _forget(self, connection: _Connection) -> None:
        with self._lock:
            self._connections.discard(connection)

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self._upstream, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection = _Connection(self, client, upstream)
            with self._lock:
                self._connections.add(connection)
            for target, name in ((connection.client_to_upstream, "up"), (connection.upstream_to_client, "down")):
                threading.Thread(target=target, name=f"s3proxy-{name}", daemon=True).start()
