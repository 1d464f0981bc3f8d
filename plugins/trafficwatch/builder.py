"""The marts builder: a long-lived process that has imported dbt once and runs the builds it is asked for.

Importing dbt costs 5-6 s of CPU on this kind of machine (its dataclass serializers are generated at
import), more than half of a one-minute build-and-publish cycle, and every Airflow task is a new process.
`trafficwatch marts-builder` pays that import once, then serves build requests on a Unix socket,
`$TRAFFICWATCH_HOME/run/marts-builder.sock`, one at a time (the warehouse has a single writer).

`build_marts`, which the `traffic_marts` task and `trafficwatch build` call, hands the build to the builder
when one listens for the same home and bucket, and otherwise builds in its own process. Either way the
same function, `serving.build`, does the work, and failures come back as the same exceptions.

Protocol: one JSON line each way per connection. Request `{"full_refresh", "home", "bucket"}`; answer
`{"result": BuildResult.as_dict()}`, or `{"error", "failed_tests"}`, or `{"mismatch"}` when the builder
serves another home or bucket.
"""

from __future__ import annotations

import json
import logging
import socket
import traceback
from pathlib import Path
from typing import Any

from trafficwatch import serving
from trafficwatch.config import ConfigError, Settings

log = logging.getLogger(__name__)

SOCKET_NAME = "marts-builder.sock"


def socket_path(settings: Settings) -> Path:
    return settings.home / "run" / SOCKET_NAME


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


# --------------------------------------------------------------------------- the builder process


def _answer(request: dict[str, Any], settings: Settings) -> dict[str, Any]:
    if (request.get("home"), request.get("bucket")) != (str(settings.home), settings.bucket):
        return {"mismatch": f"this builder serves home {settings.home} and bucket {settings.bucket}"}
    try:
        result = serving.build(settings, full_refresh=bool(request.get("full_refresh")))
    except serving.DataTestsFailed as failure:
        return {"error": str(failure), "failed_tests": failure.tests}
    except (serving.BuildError, ConfigError) as error:
        return {"error": str(error), "failed_tests": []}
    except Exception as error:  # the builder outlives any one build; the requester gets the cause
        log.error("build failed:\n%s", traceback.format_exc())
        return {"error": f"marts builder: {type(error).__name__}: {error}", "failed_tests": []}
    log.info(result.summary())
    return {"result": result.as_dict()}


def serve(settings: Settings, path: Path | None = None) -> None:
    """Import dbt, then answer build requests on the socket until the process is stopped."""
    from dbt.cli.main import dbtRunner  # noqa: F401  the import this process exists to pay once

    path = path or socket_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen(16)
        log.info("marts builder ready on %s (home %s, bucket %s)", path, settings.home, settings.bucket)
        while True:
            conn, _ = server.accept()
            with conn:
                try:
                    request = _receive(conn)
                    if request is not None:
                        _send(conn, _answer(request, settings))
                except (OSError, ValueError) as error:  # a requester that went away or sent garbage
                    log.warning("marts builder: dropped a request: %s", error)


# --------------------------------------------------------------------------- requesting a build


def _connect(path: Path) -> socket.socket | None:
    if not path.exists():
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
    except OSError:  # a socket left by a builder that is gone
        conn.close()
        return None
    return conn


def _result(answer: dict[str, Any]) -> serving.BuildResult:
    if "error" in answer:
        if answer.get("failed_tests"):
            raise serving.DataTestsFailed(answer["error"], answer["failed_tests"])
        raise serving.BuildError(answer["error"])
    return serving.BuildResult.from_dict(answer["result"])


def build_marts(settings: Settings, full_refresh: bool = False) -> serving.BuildResult:
    """dbt build and publish (`serving.build`), in the marts builder when one runs, else in this process."""
    conn = _connect(socket_path(settings))
    if conn is not None:
        with conn:
            _send(conn, {"full_refresh": full_refresh, "home": str(settings.home), "bucket": settings.bucket})
            answer = _receive(conn)
        if answer is None:
            raise serving.BuildError("the marts builder closed the connection before answering (did it stop?)")
        if "mismatch" not in answer:
            log.info("built by the marts builder on %s", socket_path(settings))
            return _result(answer)
        log.warning("%s: building in this process", answer["mismatch"])
    return serving.build(settings, full_refresh=full_refresh)
