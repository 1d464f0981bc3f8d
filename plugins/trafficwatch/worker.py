"""The worker: a long-lived process that keeps dbt imported and the Delta tables open, and runs the
merges, marts builds, audits and lake maintenance the DAG tasks (and the CLI) hand it.

Every Airflow task is a new process. Importing dbt costs it 5-6 s of CPU, more than half of a one-minute
build-and-publish cycle; opening the three Delta tables of a merge costs ~15 ms of CPU each (the S3 client
parses the system's CA certificates every time), half of a one-snapshot merge; and finding the pending
snapshots lists all of raw/ (10-14 s after 30 days here). `trafficwatch worker` pays these once (then lists
raw/ incrementally, see `raw.RawIndex`) and serves requests on a Unix socket,
`$TRAFFICWATCH_HOME/run/worker.sock`, for the lake of its own home and bucket. Merges run one at a time,
builds and audits one at a time (the warehouse has a single writer; one dbt invocation at a time in a process),
maintenance runs one at a time; a build or a maintenance does not hold up the next merge.

The hourly work runs here too: an audit task or a maintenance task that did it in its own process imported dbt
or delta-rs for it, at the top of the hour, beside the minute's merge and build tasks (the stack's memory peak).

`merge_pending`, `count_pending`, `build_marts`, `audit_marts`, `maintain_lake` and `check_freshness` go through
one path, `run`: it hands the operation to the worker when one listens for the same home and bucket, and
otherwise does it in this process. Either way the same functions do the work (`lake.merge_pending`,
`lake.pending_raw`, `serving.build`, `dbt_build.audit`, `lake.maintain`, `alerts.check_freshness`), the result
has the same type, and a failure is raised as the same exception: the
worker answers with the exception's class and arguments, and the requester raises that class again
(`DataTestsFailed` with its failed tests). Only a failure
whose class the requester cannot rebuild (not imported here, or not rebuilt from its arguments) comes back as
`WorkerError`, with its one-line cause. A failure the worker did not expect (not a `BuildError` or
`ConfigError`) carries the worker's one-line cause as `worker_cause`, ending with `WORKER_NOTE` (its traceback
and the frames that name its table or key are in the worker), and `errors.failure` prints that line.
The log lines the worker wrote while serving a request come back too, so the Airflow task log shows them.

A requester stays light: the lake and the build (DuckDB, polars, delta-rs, dbt) are imported only where the
work is done, in the worker's methods and in the fallbacks that do it in this process. A DAG task or the
triggerer's merge sensor that hands its work to the worker never loads them (~40 MiB of memory each); the
results and the build's errors it raises again come from `trafficwatch.results` and `trafficwatch.errors`.

A read writes nothing: a pending count on a lake whose merge log does not exist yet counts every landed
snapshot, without creating the tables (the worker creates them when it starts, a merge when it runs).

The worker is a service of its own, configured by its environment (`make demo` / `make up` and compose start it
with the S3 variables): it works with its own credentials, never with the requester's, which do not travel. A
request names the lake it means: home, bucket, S3 endpoint and access key id (not a secret). A requester whose
settings name another (a DAG task given other S3 credentials by its Airflow connection) gets a mismatch and
does the work in its own process with its own credentials.

Protocol: one JSON line each way per connection. Request `{"op": "merge" | "pending" | "build" | "relist" |
"freshness" | "audit" | "maintain", "home", "bucket", "s3_endpoint", "s3_access_key_id", "full_refresh",
"stale_after_s", "vacuum_retention_hours", "raw_retention_days"}` (the settings a requester's own environment
decides travel with the request); answer
`{"result", "log"}`, or
`{"error", "type", "args", "failed_tests", "unexpected", "log"}` (`type`: the exception's module and class name,
`args` its arguments when JSON can carry them, `unexpected`: true when its traceback is in the worker's log), or
`{"mismatch"}` when the worker serves another lake or credentials.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import socket
import socketserver
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trafficwatch import errors
from trafficwatch.alerts import Freshness
from trafficwatch.config import ConfigError, Settings
from trafficwatch.errors import BuildError, DataTestsFailed
from trafficwatch.results import BuildResult, MaintenanceResult, MergeResult

log = logging.getLogger(__name__)

SOCKET_NAME = "worker.sock"
RELIST_RAW_S = 900.0
WORKER_NOTE = "in the worker; traceback in its log"


class WorkerError(RuntimeError):
    """The worker failed a request for a reason other than the work itself (e.g. it stopped mid-way), or with
    an exception this process cannot raise again as the same class (the message is its one-line cause)."""


def socket_path(settings: Settings) -> Path:
    return settings.home / "run" / SOCKET_NAME


def lake_identity(settings: Settings) -> dict[str, str | None]:
    """What a request and the worker must agree on: the lake (home, bucket, S3 endpoint) and whose keys."""
    return {
        "home": str(settings.home),
        "bucket": settings.bucket,
        "s3_endpoint": (settings.s3_endpoint_url or "").rstrip("/") or None,
        "s3_access_key_id": settings.aws_access_key_id or os.environ.get("AWS_ACCESS_KEY_ID") or None,
    }


def _send(conn: socket.socket, message: dict[str, Any]) -> None:
    conn.sendall(json.dumps(message).encode() + b"\n")


def _receive(conn: socket.socket) -> dict[str, Any] | None:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            return None
        data += chunk
    return json.loads(data)


# --------------------------------------------------------------------------- the worker process


class _ThreadLog(logging.Handler):
    """Collects the records that one thread logs: the lines a request's answer carries back."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.thread = threading.get_ident()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.lines.append(record.getMessage())


@contextmanager
def _collected_log() -> Iterator[list[str]]:
    handler = _ThreadLog()
    logger = logging.getLogger("trafficwatch")
    logger.addHandler(handler)
    try:
        yield handler.lines
    finally:
        logger.removeHandler(handler)


class Worker:
    """What the worker process keeps between requests: the open tables and one lock per kind of work."""

    def __init__(self, settings: Settings) -> None:
        from trafficwatch import lake, raw, storage

        self.settings = settings
        self.s3 = storage.s3_client(settings)
        self.tables = lake.OpenTables(settings)
        self.raw = raw.RawIndex()
        self.lake_lock = threading.Lock()  # merges and pending counts share the open tables
        self.build_lock = threading.Lock()  # the warehouse DuckDB has a single writer, dbt one invocation
        self.maintenance_lock = threading.Lock()

    def relist_raw(self) -> None:
        """A full listing of raw/ now and every RELIST_RAW_S, beside the merges (see `raw.RawIndex`)."""
        while True:
            try:
                self.raw.relist(self.s3, self.settings.bucket)
            except Exception as error:  # S3 away for a while: the next round tries again
                log.warning("full listing of raw/ failed: %s", errors.describe(error, self.settings))
            time.sleep(RELIST_RAW_S)

    def merge(self, request: dict[str, Any]) -> dict[str, Any]:
        from trafficwatch import lake

        with self.lake_lock:
            return lake.merge_pending(self.settings, self.s3, self.tables.get(), self.raw).as_dict()

    def pending(self, request: dict[str, Any]) -> int:
        from trafficwatch import lake

        with self.lake_lock:
            return len(lake.pending_raw(self.settings, self.s3, self.tables.get(), self.raw))

    def relist(self, request: dict[str, Any]) -> None:
        """A full listing of raw/ now: objects put there out of order (older snapshots) become pending at once."""
        self.raw.relist(self.s3, self.settings.bucket)

    def build(self, request: dict[str, Any]) -> dict[str, Any]:
        from trafficwatch import serving

        with self.build_lock:
            return serving.build(self.settings, full_refresh=bool(request.get("full_refresh"))).as_dict()

    def audit(self, request: dict[str, Any]) -> dict[str, int]:
        with self.build_lock:
            return _audit_here(self.settings)

    def maintain(self, request: dict[str, Any]) -> dict[str, Any]:
        """Maintenance on tables of its own (not the merges' open ones, not under their lock): a commit of it
        between two merges is one the next merge sees, as when another process maintained the lake."""
        with self.maintenance_lock:
            retentions = (int(request["vacuum_retention_hours"]), int(request["raw_retention_days"]))
            return _maintain_here(self.settings, *retentions, s3=self.s3).as_dict()

    def freshness(self, request: dict[str, Any]) -> dict[str, Any]:
        """The freshness check (no lock: it reads S3, the merge log and the serving file, as a task would)."""
        return _freshness_here(self.settings, float(request["stale_after_s"])).as_dict()

    def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        own = lake_identity(self.settings)
        if {name: request.get(name) for name in own} != own:
            where = f"home {own['home']} and bucket {own['bucket']} on S3 {own['s3_endpoint'] or 'AWS S3'}"
            return {"mismatch": f"the worker serves {where}, with its own keys"}
        operations: dict[str, Callable[[dict[str, Any]], Any]] = {
            "merge": self.merge, "pending": self.pending, "build": self.build, "relist": self.relist,
            "freshness": self.freshness, "audit": self.audit, "maintain": self.maintain,
        }  # fmt: skip
        operation = operations.get(str(request.get("op")))
        if operation is None:
            return {"error": f"unknown operation {request.get('op')!r}", "failed_tests": [], "log": []}
        with _collected_log() as lines:
            try:
                return {"result": operation(request), "log": lines}
            except (BuildError, ConfigError) as error:  # the work's own failures, one line each
                return {**_failure(error, str(error), unexpected=False), "log": lines}
            except Exception as error:  # the worker outlives any one request; the requester gets the cause
                log.error("%s failed:\n%s", request.get("op"), traceback.format_exc())
                cause = f"{errors.describe(error, self.settings)} ({WORKER_NOTE})"
                return {**_failure(error, cause, unexpected=True), "log": lines}


def _failure(error: Exception, cause: str, unexpected: bool) -> dict[str, Any]:
    """The error answer: what the requester needs to raise the same exception (see `_raise_failure`)."""
    try:
        arguments: list[Any] | None = json.loads(json.dumps(list(error.args)))
    except (TypeError, ValueError):  # arguments JSON cannot carry: the requester gets a WorkerError
        arguments = None
    return {
        "error": cause,
        "type": [type(error).__module__, type(error).__qualname__],
        "args": arguments,
        "failed_tests": list(getattr(error, "tests", [])),
        "unexpected": unexpected,
    }


def serve(settings: Settings, path: Path | None = None) -> None:
    """Import dbt and parse the project, then answer requests on the socket (a thread each) until the
    process is stopped."""
    from dbt.cli.main import dbtRunner  # noqa: F401  the import this process exists to pay once

    from trafficwatch import dbt_build

    # Set once, before any thread starts: a build then finds it set and writes no environment variable
    # (config.environ) while the Rust runtimes of other requests may read the environment.
    os.environ["DO_NOT_TRACK"] = "1"
    # What a first build would pay (extensions checked, the project parsed), paid before any request and
    # before the tables' Rust runtimes start (it sets dbt's environment variables meanwhile).
    try:
        dbt_build.prepare(settings)
    except Exception as error:  # merges go on; each build reports the same error in its own words
        cause = dbt_build.one_line(str(error))
        log.warning("worker: dbt not prepared at start (the first build tries again): %s", cause)
    worker = Worker(settings)
    worker.tables.get()  # open (or create) the tables now, not on the first merge
    # dbt leaves ~165,000 long-lived objects that every full garbage collection would walk again (~115 ms,
    # holding the GIL, in the middle of whichever merge or build triggers it): take them out of its scope.
    gc.freeze()
    threading.Thread(target=worker.relist_raw, name="relist-raw", daemon=True).start()

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            try:
                request = _receive(self.request)
                if request is not None:
                    _send(self.request, worker.answer(request))
            except (OSError, ValueError) as error:  # a requester that went away or sent garbage
                log.warning("worker: dropped a request: %s", error)

    path = path or socket_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    with socketserver.ThreadingUnixStreamServer(str(path), Handler) as server:
        server.daemon_threads = True
        log.info("worker ready on %s (home %s, bucket %s)", path, settings.home, settings.bucket)
        server.serve_forever()


# --------------------------------------------------------------------------- asking the worker


def _connect(path: Path) -> socket.socket | None:
    if not path.exists():
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
    except OSError:  # a socket left by a worker that is gone
        conn.close()
        return None
    return conn


def _ask(settings: Settings, op: str, **arguments: Any) -> dict[str, Any] | None:
    """The worker's answer, or None when no worker serves this home and bucket."""
    conn = _connect(socket_path(settings))
    if conn is None:
        return None
    with conn:
        try:
            _send(conn, {"op": op, **lake_identity(settings), **arguments})
            answer = _receive(conn)
        except (OSError, ValueError) as error:  # it stopped mid-answer, or answered garbage
            raise WorkerError(f"the worker on {socket_path(settings)} failed to answer {op}: {error}") from None
    if answer is None:
        raise WorkerError(f"the worker closed the connection before answering {op} (did it stop?)")
    if "mismatch" in answer:
        log.warning("%s: %s in this process", answer["mismatch"], op)
        return None
    for line in answer.get("log", []):
        log.info("[worker] %s", line)
    return answer


# Where the exceptions of Rust extensions are exported: their classes name a module that is not importable
# (delta-rs's say `_internal`, DuckDB's `_duckdb`).
EXPORTED_IN = ("deltalake.exceptions", "duckdb")


def _exception_class(module: str, name: str) -> Any:
    """The class `module.name` as this process has it (None when it is not loaded here)."""
    found = getattr(sys.modules.get(module), name, None)
    for exported in EXPORTED_IN:
        if found is not None:
            break
        candidate = getattr(sys.modules.get(exported), name, None)
        found = candidate if getattr(candidate, "__module__", None) == module else None
    return found


def _raise_failure(answer: dict[str, Any]) -> None:
    """Raise the exception the worker's error answer describes, as the same class when this process has it
    (imported already: nothing is imported on the worker's word) and it is rebuilt from its arguments."""
    module, name = answer.get("type") or ("", "")
    cls = _exception_class(module, name)
    error: Exception = WorkerError(answer["error"])
    if cls is DataTestsFailed:
        error = DataTestsFailed(answer["error"], answer.get("failed_tests", []))
    elif isinstance(cls, type) and issubclass(cls, Exception) and answer.get("args") is not None:
        try:
            error = cls(*answer["args"])
        except Exception:  # a constructor that wants other arguments: WorkerError, with the cause
            error = WorkerError(answer["error"])
    if answer.get("unexpected") and not isinstance(error, WorkerError):
        error.worker_cause = answer["error"]  # type: ignore[attr-defined]  # see errors.worker_cause
    raise error


def _result(answer: dict[str, Any]) -> Any:
    if "error" in answer:
        _raise_failure(answer)
    return answer["result"]


def count_pending_here(settings: Settings) -> int:
    """The pending count in this process, read only: without a merge log yet, every landed snapshot is pending
    (nothing is created; `lake.ensure_tables` would create the tables)."""
    from trafficwatch import lake, raw, storage

    s3 = storage.s3_client(settings)
    merge_log = lake.existing_tables(settings, [lake.MERGE_LOG])[lake.MERGE_LOG]
    if merge_log is None:
        return len(raw.list_raw(s3, settings.bucket))
    return len(lake.pending_raw(settings, s3, lake.Tables({lake.MERGE_LOG: merge_log})))


def _merge_here(settings: Settings) -> MergeResult:
    from trafficwatch import lake

    return lake.merge_pending(settings)


def _build_here(settings: Settings, full_refresh: bool = False) -> BuildResult:
    from trafficwatch import serving

    return serving.build(settings, full_refresh=full_refresh)


def _audit_here(settings: Settings) -> dict[str, int]:
    from trafficwatch import dbt_build

    return dbt_build.audit(settings)


def _maintain_here(
    settings: Settings, vacuum_retention_hours: int, raw_retention_days: int, s3: Any = None
) -> MaintenanceResult:
    """`lake.maintain` with the requester's retentions (the worker's own settings may have others)."""
    from dataclasses import replace

    from trafficwatch import lake

    retentions = {"vacuum_retention_hours": vacuum_retention_hours, "raw_retention_days": raw_retention_days}
    return lake.maintain(replace(settings, **retentions), s3)


def _freshness_here(settings: Settings, stale_after_s: float) -> Freshness:
    """`alerts.check_freshness` with the requester's threshold (the worker's own settings may have another)."""
    from dataclasses import replace

    from trafficwatch import alerts

    return alerts.check_freshness(replace(settings, stale_after_s=stale_after_s))


@dataclass(frozen=True)
class _Operation:
    here: Callable[..., Any]  # the work in this process
    from_worker: Callable[[Any], Any]  # the worker's JSON result into the type `here` returns
    done: str = ""  # the log line when the worker did it (none for the frequent pending counts)


_OPERATIONS = {
    "merge": _Operation(_merge_here, MergeResult.from_dict),
    "pending": _Operation(count_pending_here, int),
    "build": _Operation(_build_here, BuildResult.from_dict, done="built by the worker on %s"),
    "freshness": _Operation(_freshness_here, Freshness.from_dict, done="freshness checked by the worker on %s"),
    "audit": _Operation(_audit_here, dict, done="audited by the worker on %s"),
    "maintain": _Operation(_maintain_here, MaintenanceResult.from_dict, done="maintained by the worker on %s"),
}


def run(settings: Settings, op: str, **arguments: Any) -> Any:
    """Operation `op` (a key of `_OPERATIONS`) in the worker when one serves this lake, else in this
    process: the same result type and the same exceptions either way (see the module's docstring)."""
    operation = _OPERATIONS[op]
    answer = _ask(settings, op, **arguments)
    if answer is None:
        return operation.here(settings, **arguments)
    result = operation.from_worker(_result(answer))
    if operation.done:
        log.info(operation.done, socket_path(settings))
    return result


def merge_pending(settings: Settings) -> MergeResult:
    """`lake.merge_pending`: in the worker when one runs, else in this process."""
    return run(settings, "merge")


def count_pending(settings: Settings) -> int:
    """How many landed snapshots wait to be merged: asked of the worker when one runs, else read here (read
    only). The worker answers once any merge it is running is done (they share the open tables)."""
    return run(settings, "pending")


def count_pending_in_worker(settings: Settings) -> int | None:
    """`count_pending` from the worker; None when no worker serves this home and bucket."""
    answer = _ask(settings, "pending")
    return None if answer is None else int(_result(answer))


def relist_raw(settings: Settings) -> bool:
    """Have the worker list raw/ in full now, after older snapshots were put there (a backfill upload, the demo's
    simulated history): its incremental listing only sees keys after the newest one, and its next full listing
    may be RELIST_RAW_S away. False when no worker serves this home and bucket (a merge here lists it all)."""
    answer = _ask(settings, "relist")
    if answer is None:
        return False
    _result(answer)
    return True


def check_freshness(settings: Settings) -> Freshness:
    """`alerts.check_freshness` (what the dashboards show against what landed): in the worker when one runs, else
    in this process. The check reads the serving file with DuckDB and the merge log with delta-rs; asked of the
    worker, which holds both already, the pipeline_freshness task's process stays light: 69 MiB of PSS where
    it took 106-141 MiB, every other minute, at the same time as an ingest."""
    return run(settings, "freshness", stale_after_s=settings.stale_after_s)


def build_marts(settings: Settings, full_refresh: bool = False) -> BuildResult:
    """dbt build and publish (`serving.build`): in the worker when one runs, else in this process."""
    return run(settings, "build", full_refresh=full_refresh)


def audit_marts(settings: Settings) -> dict[str, int]:
    """The hourly audit (`dbt_build.audit`): in the worker when one runs, else in this process. Raises
    DataTestsFailed naming the failing tests either way."""
    return run(settings, "audit")


def maintain_lake(settings: Settings) -> MaintenanceResult:
    """Compaction, checkpoints, vacuum and raw expiry (`lake.maintain`) with this process's retentions: in the
    worker when one runs, else in this process."""
    retentions = {
        "vacuum_retention_hours": settings.vacuum_retention_hours,
        "raw_retention_days": settings.raw_retention_days,
    }
    return run(settings, "maintain", **retentions)
