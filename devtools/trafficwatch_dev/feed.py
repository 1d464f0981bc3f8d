"""A local imitation of the Rennes Métropole Opendatasoft API, for development, demos and tests.

It serves the dataset `etat-du-trafic-en-temps-reel` on 127.0.0.1 with the same paths and payload
shapes as the real portal (v2.1 exports, v2.1 records, legacy v1 search), either replaying snapshot
files in order or simulating traffic evolved from a real base snapshot. Upstream faults (errors,
quotas, slowness, broken or changed payloads) can be switched on to exercise a client's resilience.

Which snapshot is served follows a clock: index = floor(elapsed * speed / interval) + manual offset.
The simulator is a pure function of (segment, simulated time, seed), so one index always renders the
same bytes, on any run, and any past minute can be rendered too (`Simulator.exports_body`: the demo's
simulated history, see `trafficwatch_dev.history`).

Here: the HTTP server, its clock and its faults. Beside it: the simulator (`simulator.py`), snapshot files
and the rendering of records (`snapshots.py`), the API's paths, limits and errors (`api.py`).
"""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from trafficwatch.config import DATASET
from trafficwatch_dev.api import (
    CALL_LIMIT,
    EXPORTS_PATH,
    HTML_TYPE,
    JSON_TYPE,
    RECORDS_PATH,
    V1_PATH,
    V2_PREFIX,
    ApiError,
    exports_window,
    int_param,
    next_midnight_utc,
    records_window,
    v1_window,
)
from trafficwatch_dev.simulator import Simulator
from trafficwatch_dev.snapshots import (
    DEFAULT_BASE,
    DEFAULT_TIMEZONE,
    LRU,
    FileSource,
    iso_utc,
    json_array,
    load_snapshot,
    render_records,
    shifted,
)

FAULT_MODES = ("http500", "http429", "slow", "truncated", "html200", "empty", "schema", "inconsistent")

_PROXY_PAGE = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)


@dataclass(frozen=True)
class FeedConfig:
    port: int = 8090
    host: str = "127.0.0.1"
    files: tuple[Path, ...] = ()  # snapshot files (exports/json bare arrays, .json or .json.gz); empty -> simulator
    base: Path | None = None  # simulator base snapshot; None -> the packaged data/rennes_base_snapshot.json.gz
    interval_s: float = 180.0  # upstream publishes a new snapshot every interval (simulated seconds)
    speed: float = 1.0  # simulated seconds per real second (a faster clock for demos, e.g. 60)
    start: datetime | None = None  # simulated clock start (UTC); None -> now
    seed: int = 0
    fault: str | None = None  # one of FAULT_MODES, applied to data requests
    fault_count: int | None = None  # None = every request, N = the next N data requests only
    retry_after_s: int = 2
    slow_s: float = 30.0


class FeedServer(ThreadingHTTPServer):
    """The feed: an HTTP server plus the clock, the snapshot source, the fault switch and a render cache."""

    daemon_threads = True
    block_on_close = False  # a request sleeping in the 'slow' fault must not hold close()

    def __init__(self, config: FeedConfig) -> None:
        if config.interval_s <= 0 or config.speed <= 0:
            raise ValueError("interval_s and speed must be positive")
        self.config = config
        self.source: FileSource | Simulator = self._make_source(config)
        self._clock_start = time.monotonic()
        self._manual_offset = 0
        self._lock = threading.Lock()
        self._fault: str | None = None
        self._fault_remaining: int | None = None
        self.set_fault(config.fault, config.fault_count)
        self._calls = 0
        self._calls_day = datetime.now(UTC).date()
        # The snapshot served now and the one before, in a shape or two (~4 MB each): pages of one snapshot reuse it.
        self._bodies = LRU(4)
        self._stopping = threading.Event()
        self._serving = False
        super().__init__((config.host, config.port), _Handler)

    @staticmethod
    def _make_source(config: FeedConfig) -> FileSource | Simulator:
        if config.files:
            return FileSource(config.files)
        start = config.start or datetime.now(UTC)
        if start.tzinfo is None:
            start = start.replace(tzinfo=UTC)
        step = config.interval_s
        origin = datetime.fromtimestamp(math.floor(start.timestamp() / step) * step, UTC)
        return Simulator(load_snapshot(config.base or DEFAULT_BASE), config.seed, origin, step)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    # -- clock and control -------------------------------------------------------------------------

    def current_index(self) -> int:
        """The index of the snapshot being served (clock-derived index plus manual advances)."""
        elapsed = time.monotonic() - self._clock_start
        with self._lock:
            offset = self._manual_offset
        return self.source.clamp(math.floor(elapsed * self.config.speed / self.config.interval_s) + offset)

    def advance(self, steps: int = 1) -> int:
        """Move `steps` snapshots on (or back); returns the new index."""
        target = self.current_index() + steps
        with self._lock:
            # Never accumulate an offset past the first (or, for files, the last) snapshot.
            self._manual_offset += steps + self.source.clamp(target) - target
        return self.current_index()

    def set_fault(self, mode: str | None, count: int | None = 1) -> None:
        """Switch a fault on for the next `count` data requests (None = all), or off with None/'none'."""
        if mode in (None, "none") or (count is not None and count <= 0):
            mode, count = None, None
        elif mode not in FAULT_MODES:
            raise ValueError(f"unknown fault mode {mode!r}; expected one of {', '.join(FAULT_MODES)}")
        with self._lock:
            self._fault, self._fault_remaining = mode, count

    def state(self) -> dict[str, Any]:
        index = self.current_index()
        moment = self.source.datetime_at(index)
        with self._lock:
            fault, remaining = self._fault, self._fault_remaining
        return {
            "index": index,
            "datetime": iso_utc(moment) if moment else None,
            "source": self.source.kind,
            "fault": fault,
            "fault_remaining": remaining,
            "interval_s": self.config.interval_s,
            "speed": self.config.speed,
            "seed": self.config.seed,
            "file": self.source.files[index].name if isinstance(self.source, FileSource) else None,
        }

    def records_at(self, index: int) -> list[dict[str, Any]]:
        """The records of snapshot `index` as stored (simulator datetimes in UTC); for tests and tools."""
        return self.source.records(self.source.clamp(index))

    def _take_fault(self) -> str | None:
        """The fault for this data request, if any, consuming one unit of its count."""
        with self._lock:
            fault = self._fault
            if fault is not None and self._fault_remaining is not None:
                self._fault_remaining -= 1
                if self._fault_remaining <= 0:
                    self._fault, self._fault_remaining = None, None
            return fault

    def _count_call(self) -> int:
        """Count a data request against the daily quota; returns the calls left."""
        today = datetime.now(UTC).date()
        with self._lock:
            if today != self._calls_day:
                self._calls_day, self._calls = today, 0
            self._calls += 1
            return max(CALL_LIMIT - self._calls, 0)

    # -- rendering ---------------------------------------------------------------------------------

    def rendered(self, index: int, shape: str, tz: ZoneInfo) -> list[str]:
        """Per-record JSON texts of one snapshot, cached per (index, shape, timezone)."""
        index = self.source.clamp(index)

        def build() -> list[str]:
            return render_records(self.source.records(index), shape, tz, self.source.datetime_at(index))

        return self._bodies.get((index, shape, str(tz)), build)

    def other_rendered(self, index: int, shape: str, tz: ZoneInfo) -> list[str]:
        """Another snapshot than `index` (another datetime), for the 'inconsistent' fault: the next one,
        else the previous one, else (a single file) the same records one interval later."""
        index = self.source.clamp(index)
        here = self.source.datetime_at(index)
        for candidate in (index + 1, index - 1):
            if self.source.clamp(candidate) == candidate and self.source.datetime_at(candidate) != here:
                return self.rendered(candidate, shape, tz)
        shift = timedelta(seconds=self.config.interval_s)
        records = [shifted(record, shift) for record in self.source.records(index)]
        return render_records(records, shape, tz, here + shift if here else None)

    # -- lifecycle ---------------------------------------------------------------------------------

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self._serving = True  # from now on close() must shut the loop down
        super().serve_forever(poll_interval)

    def close(self) -> None:
        """Stop serving (if serving) and release the socket."""
        self._stopping.set()
        if self._serving:
            self.shutdown()
        self.server_close()

    def sleep(self, seconds: float) -> None:
        """Sleep that close() interrupts."""
        self._stopping.wait(seconds)


class _Handler(BaseHTTPRequestHandler):
    server: FeedServer
    server_version = "TrafficWatchFeed/1.0"

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the feed serves many polls a minute."""

    # -- plumbing ----------------------------------------------------------------------------------

    def _send(
        self,
        status: int,
        body: bytes | str,
        content_type: str = JSON_TYPE,
        headers: dict[str, str] | None = None,
    ) -> None:
        data = body.encode("utf-8") if isinstance(body, str) else body
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (e.g. timed out on a slow answer)

    def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload), headers=headers)

    # -- routing -----------------------------------------------------------------------------------

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        path = url.path.rstrip("/") or "/"
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        if path == "/health":
            self._send_json(200, {"status": "ok"})
        elif path == "/_feed/state":
            self._send_json(200, self.server.state())
        elif path == V1_PATH or path.startswith(V2_PREFIX):
            try:
                self._data_request(path, query)
            except Exception as exc:  # a bug must still answer like a server, not drop the connection
                print(f"feed: error on {self.path}: {exc!r}", file=sys.stderr)
                self._send_json(500, {"status_code": 500, "message": "Internal error", "error_code": "InternalError"})
        else:
            self._send_json(404, {"status_code": 404, "message": f"Not found: {path}", "error_code": "NotFound"})

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        path = url.path.rstrip("/")
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        try:
            if path == "/_feed/advance":
                self.server.advance(int(query.get("steps", "1")))
            elif path == "/_feed/fault":
                count_text = query.get("count", "1")
                count = None if count_text in ("all", "") else int(count_text)
                if not query.get("mode"):
                    raise ValueError("mode is required: one of " + ", ".join((*FAULT_MODES, "none")))
                self.server.set_fault(query["mode"], count)
            else:
                self._send_json(404, {"status_code": 404, "message": f"Not found: {path}", "error_code": "NotFound"})
                return
        except ValueError as exc:
            self._send_json(400, {"status_code": 400, "message": str(exc), "error_code": "BadRequest"})
            return
        self._send_json(200, self.server.state())

    # -- data endpoints ----------------------------------------------------------------------------

    def _data_request(self, path: str, query: dict[str, str]) -> None:
        is_v1 = path == V1_PATH
        remaining = self.server._count_call()
        reset = next_midnight_utc()
        headers = {
            "X-RateLimit-Limit": str(CALL_LIMIT),
            "X-RateLimit-Remaining": str(remaining),
            "X-RateLimit-Reset": reset.isoformat(),
        }
        try:
            kind = self._endpoint(path, query, is_v1)
            fault = self.server._take_fault()
            if fault and self._answer_fault(fault, headers, reset):
                return
            tz = self._timezone(query)
            index = self.server.current_index()
            body = self._body(kind, query, tz, index, fault)
        except ApiError as err:
            self._send_error(err, is_v1, headers)
            return
        if fault == "truncated":
            body = body[: len(body) // 2]  # ASCII-only JSON: cutting characters cuts bytes
        self._send(200, body, headers=headers)

    @staticmethod
    def _endpoint(path: str, query: dict[str, str], is_v1: bool) -> str:
        if is_v1:
            if query.get("dataset") != DATASET:
                raise ApiError(404, f"Unknown dataset: {query.get('dataset', '')}", "UnknownDataset")
            return "v1"
        if path == EXPORTS_PATH:
            return "exports"
        if path == RECORDS_PATH:
            return "records"
        dataset = path[len(V2_PREFIX) :].split("/", 1)[0]
        if dataset != DATASET:
            raise ApiError(404, f"Unknown dataset: {dataset}", "UnknownDatasetError")
        raise ApiError(404, f"Not found: {path}", "NotFound")

    def _send_error(self, err: ApiError, is_v1: bool, headers: dict[str, str]) -> None:
        if is_v1:
            payload: dict[str, Any] = {"error": err.message}
        else:
            payload = {"status_code": err.status, "message": err.message, "error_code": err.error_code}
        self._send_json(err.status, payload, headers)

    def _answer_fault(self, fault: str, headers: dict[str, str], reset: datetime) -> bool:
        """Answer the faults that replace the response; True when the request is done."""
        if fault == "http500":
            raise ApiError(500, "An unexpected error happened, please retry later.", "InternalServerError")
        if fault == "http429":
            reset_text = reset.isoformat()
            body = {
                "errorcode": 10002,
                "reset_time": reset_text,
                "limit_time_unit": "day",
                "call_limit": CALL_LIMIT,
                "error": "Too many requests on the domain. Please contact the domain administrator.",
            }
            limited = {**headers, "X-RateLimit-Remaining": "0", "Retry-After": str(self.server.config.retry_after_s)}
            self._send_json(429, body, limited)
            return True
        if fault == "html200":
            self._send(200, _PROXY_PAGE, HTML_TYPE, headers)
            return True
        if fault == "slow":
            self.server.sleep(self.server.config.slow_s)
        return False

    @staticmethod
    def _timezone(query: dict[str, str]) -> ZoneInfo:
        name = query.get("timezone") or DEFAULT_TIMEZONE
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            raise ApiError(400, f"Invalid value for timezone API parameter: {name} is not a valid timezone.") from None

    def _body(self, kind: str, query: dict[str, str], tz: ZoneInfo, index: int, fault: str | None) -> str:
        shape = ("v1" if kind == "v1" else "v2") + ("-schema" if fault == "schema" else "")
        parts = [] if fault == "empty" else self.server.rendered(index, shape, tz)
        if fault == "inconsistent" and parts:
            parts = self._mixed(parts, kind, query, shape, tz, index)
        if kind == "exports":
            start, stop = exports_window(query, len(parts))
            return json_array(parts[start:stop])
        if kind == "records":
            limit, offset = records_window(query)
            total = len(parts)
            return f'{{"total_count": {total}, "results": {json_array(parts[offset : offset + limit])}}}'
        rows, start = v1_window(query)
        params = {"dataset": DATASET, "rows": rows, "start": start, "format": "json", "timezone": str(tz)}
        records = json_array(parts[start : start + rows])
        head = f'{{"nhits": {len(parts)}, "parameters": {json.dumps(params)}'
        return f'{head}, "records": {records}, "facet_groups": []}}'

    def _mixed(
        self, parts: list[str], kind: str, query: dict[str, str], shape: str, tz: ZoneInfo, index: int
    ) -> list[str]:
        """Records from two snapshots: later pages (records) or the second half (exports, v1)."""
        other_parts = self.server.other_rendered(index, shape, tz)
        if kind == "records":
            offset = int_param(query, "offset", 0)
            return other_parts if offset > 0 else parts
        half = len(parts) // 2
        return parts[:half] + other_parts[half:]


def make_server(config: FeedConfig) -> FeedServer:
    """The feed, bound to its port (0 picks a free one) but not yet serving."""
    return FeedServer(config)


def start_in_thread(config: FeedConfig) -> FeedServer:
    """The feed serving in a daemon thread; `server.close()` stops it."""
    server = make_server(config)
    server._serving = True  # set before the thread starts so an immediate close() still shuts down
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="trafficwatch-feed", daemon=True)
    thread.start()
    return server


def serve(config: FeedConfig) -> None:
    """Serve until SIGTERM or SIGINT (blocking)."""
    server = make_server(config)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    server._serving = True
    thread = threading.Thread(target=server.serve_forever, args=(0.1,), name="trafficwatch-feed", daemon=True)
    thread.start()
    try:
        print(f"feed: serving {server.source.describe()} on {server.url}", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        server.close()
        thread.join(timeout=5)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":  # pragma: no cover - `trafficwatch-dev feed` is the supported entry point
    serve(FeedConfig(port=int(sys.argv[1]) if len(sys.argv) > 1 else 8090))
