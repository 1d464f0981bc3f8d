"""Background services for local runs: the S3 server, the feed, the worker, Airflow and Superset.

`make` starts and stops them through `trafficwatch service start|stop|status NAME`; the tests use the same
functions with a temporary home. Each service runs in its own process group (Airflow standalone leaves
children behind on a plain SIGTERM), with its pid in `<home>/run/NAME.pid` and its log in
`<home>/logs/NAME.log`.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import botocore.exceptions


@dataclass(frozen=True)
class Service:
    name: str
    command: list[str]
    ready: Callable[[], bool]
    url: str
    env: dict[str, str] = field(default_factory=dict)
    start_timeout_s: float = 60.0


def venv_bin(name: str) -> str:
    """A program installed in this Python environment (it may not be on PATH)."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        raise RuntimeError(f"`{name}` is not installed in {sys.prefix}: run `make install`")
    return found


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def http_ok(url: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return 200 <= response.status < 300
        except (urllib.error.URLError, OSError):
            return False

    return check


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_s3_port() -> int:
    """A port P such that P..P+5 and their gRPC twins (+10000) are free: what `local_s3` needs."""
    for _ in range(200):
        port = random.randrange(20000, 29000, 10)
        if all(_port_free(port + i) and _port_free(port + 10000 + i) for i in range(6)):
            return port
    raise RuntimeError("no free block of loopback ports for a local S3 server")


def local_s3(data_dir: Path, port: int, bucket: str) -> Service:
    """SeaweedFS `weed mini`: S3 on `port`; its other services take the next five ports and each + 10000."""
    endpoint = f"http://127.0.0.1:{port}"
    command = [
        venv_bin("weed"), "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-master.telemetry=false", f"-bucket={bucket}", f"-s3.port={port}", f"-master.port={port + 1}",
        f"-filer.port={port + 2}", f"-volume.port={port + 3}", f"-admin.port={port + 4}",
        f"-webdav.port={port + 5}", "-s3.port.iceberg=0", "-s3.port.lance=0",
    ]  # fmt: skip

    def ready() -> bool:
        if not _port_open(port):
            return False
        try:  # weed creates the bucket a moment after S3 answers
            boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").head_bucket(Bucket=bucket)
        except (botocore.exceptions.ClientError, botocore.exceptions.EndpointConnectionError):
            return False
        return True

    data_dir.mkdir(parents=True, exist_ok=True)
    return Service("s3", command, ready, endpoint)


def feed(port: int, args: list[str]) -> Service:
    url = f"http://127.0.0.1:{port}"
    command = [venv_bin("trafficwatch"), "feed", "--port", str(port), *args]
    return Service("feed", command, http_ok(f"{url}/health"), url)


def worker(socket_path: Path) -> Service:
    """`trafficwatch worker`: dbt imported and the tables open once, merges and builds served on a Unix
    socket (see worker.py)."""

    def ready() -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            try:
                conn.connect(str(socket_path))
            except OSError:
                return False
        return True

    return Service("worker", [venv_bin("trafficwatch"), "worker"], ready, f"unix:{socket_path}")


def airflow(port: int) -> Service:
    url = f"http://127.0.0.1:{port}"
    bin_dir = str(Path(venv_bin("airflow")).parent)
    # standalone launches `airflow` subprocesses by name, so the environment's bin must lead PATH.
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    return Service(
        "airflow",
        [venv_bin("airflow"), "standalone"],
        http_ok(f"{url}/api/v2/monitor/health"),
        url,
        env,
        start_timeout_s=300,
    )


def superset(port: int, repo: Path) -> Service:
    """Superset from its own environment (.venv-superset): its SQLAlchemy pin conflicts with Airflow's."""
    url = f"http://127.0.0.1:{port}"
    binary = repo / ".venv-superset" / "bin" / "superset"
    if not binary.exists():
        raise RuntimeError(f"{binary} is missing: run `make superset-install`")
    env = {"SUPERSET_CONFIG_PATH": str(repo / "superset" / "superset_config.py"), "FLASK_APP": "superset"}
    command = [str(binary), "run", "--host", "127.0.0.1", "--port", str(port), "--with-threads"]
    return Service("superset", command, http_ok(f"{url}/health"), url, env, start_timeout_s=120)


# --------------------------------------------------------------------------- lifecycle


def _pid_file(home: Path, name: str) -> Path:
    return home / "run" / f"{name}.pid"


def running_pid(home: Path, name: str) -> int | None:
    path = _pid_file(home, name)
    try:
        pid = int(path.read_text().strip())
        os.killpg(pid, 0)
    except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
        return None
    return pid


def start(service: Service, home: Path) -> int:
    """Start a service in its own process group unless it runs already; wait until it is ready."""
    pid = running_pid(home, service.name)
    if pid is not None:
        return pid
    log_path = home / "logs" / f"{service.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    _pid_file(home, service.name).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            service.command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, **service.env},
        )
    _pid_file(home, service.name).write_text(str(process.pid))
    deadline = time.monotonic() + service.start_timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            _pid_file(home, service.name).unlink(missing_ok=True)
            raise RuntimeError(f"{service.name} exited with code {process.returncode}; see {log_path}")
        if service.ready():
            return process.pid
        time.sleep(0.3)
    stop(home, service.name)
    raise RuntimeError(f"{service.name} was not ready within {service.start_timeout_s:.0f} s; see {log_path}")


def stop(home: Path, name: str, timeout_s: float = 20.0) -> bool:
    """SIGTERM the service's process group, SIGKILL it if it lingers. False if it was not running."""
    pid = running_pid(home, name)
    _pid_file(home, name).unlink(missing_ok=True)
    if pid is None:
        return False
    os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap it if it is our own child
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    os.killpg(pid, signal.SIGKILL)
    return True
