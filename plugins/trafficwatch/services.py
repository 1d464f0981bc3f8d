"""Background services for local runs: the S3 server, the feed, the worker, Airflow, Superset and the demo's
simulated history.

`make` starts and stops them through `trafficwatch service start|stop|status NAME`; the tests use the same
functions with a temporary home. Each service runs in its own process group (a service's children, Airflow's
components and task processes, must not outlive it), with its pid in `<home>/run/NAME.pid` and its log in
`<home>/logs/NAME.log`.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import ipaddress
import json
import os
import random
import secrets
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

from trafficwatch import airflow_components, connections


@dataclass(frozen=True)
class Service:
    name: str
    command: list[str]
    ready: Callable[[], bool]
    url: str
    env: dict[str, str] = field(default_factory=dict)
    start_timeout_s: float = 60.0
    # Called just before the process starts (never while it runs): e.g. fresh credentials for it.
    prepare: Callable[[], None] | None = None
    # The process's umask; -1 keeps the caller's.
    umask: int = -1


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


# The local S3 server's Go runtime settings (see local_s3); docker-compose.yml gives its s3 service the same.
S3_GO_ENV = {"GOGC": "25"}


def local_s3(data_dir: Path, port: int, bucket: str, max_volumes: int | None = None) -> Service:
    """SeaweedFS `weed mini`: S3 on `port`, keys required; nothing else serves or takes data without credentials.

    Its other servers take the next four ports and each + 10000 (gRPC). The master's and filer's HTTP APIs
    are off (`-disableHttp`: the master answers only its status page), so are WebDAV, the admin UI, the IAM
    API and the Iceberg and Lance catalogs; the volume server wants a JWT signed with a key of this start for
    every read and write, and every gRPC port (and its Unix socket in /tmp) a client certificate from a CA
    made for this start: see `write_seaweedfs_security`. Its files and sockets are the owner's only (umask).

    Each bucket is a SeaweedFS collection with volumes of its own, and by default the volume server holds as
    many volumes as free disk / 1 GiB (67 on a disk with 68 GB free): past that, every PutObject into a new
    bucket fails with InternalError. `max_volumes` raises the cap for a server that holds many buckets (the
    test session's: a bucket per test); volumes are sparse files, not preallocated.

    Its Go runtime collects garbage once its heap has grown by a quarter (`GOGC=25`, `S3_GO_ENV`), not by
    Go's default of all of it: while snapshots land every minute, the server's memory (PSS) went from
    152-241 MiB over four minutes to 152-185 MiB, the most the stack's memory peak can lose in one service.
    """
    endpoint = f"http://127.0.0.1:{port}"
    security_dir = data_dir.with_name(f"{data_dir.name}-security")
    command = [
        venv_bin("weed"), f"-config_dir={security_dir}", "mini", f"-dir={data_dir}", "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1", "-master.telemetry=false", f"-bucket={bucket}", f"-s3.port={port}",
        f"-master.port={port + 1}", f"-filer.port={port + 2}", f"-volume.port={port + 3}", f"-admin.port={port + 4}",
        "-disableHttp", "-webdav=false", "-admin.ui=false", "-s3.iam=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
    ]  # fmt: skip
    if max_volumes is not None:
        command.append(f"-volume.max={max_volumes}")

    # Here, not at the top: every `trafficwatch` command imports this module, and the local feed's process too.
    import boto3
    import botocore.exceptions

    def ready() -> bool:
        if not _port_open(port):
            return False
        try:  # weed creates the bucket a moment after S3 answers
            boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").head_bucket(Bucket=bucket)
        except (botocore.exceptions.ClientError, botocore.exceptions.EndpointConnectionError):
            return False
        return True

    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    data_dir.chmod(0o700)
    return Service(
        "s3", command, ready, endpoint, dict(S3_GO_ENV),
        prepare=lambda: write_seaweedfs_security(security_dir), umask=0o077,
    )  # fmt: skip


def write_private(path: Path, content: bytes | str) -> None:
    """Write a file that only its owner may read, from its first byte: a new file created 0600 (whatever the
    umask) and renamed over the old one, so an older file's wider mode never applies."""
    data = content.encode() if isinstance(content, str) else content
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_seaweedfs_security(directory: Path, installed_at: Path | None = None) -> Path:
    """SeaweedFS's security.toml for one start, in `directory` (mode 700, files 600); returns its path.
    `installed_at`: where weed reads the files, when they are copied there (docker-compose.yml's s3).

    Fresh random keys sign the JWTs that the volume server requires for every read and write (the master's
    and filer's HTTP APIs, which would hand them out, are off), and the filer's (were its HTTP API on). A
    fresh CA signs one certificate that SeaweedFS's own components present to each other on gRPC (mutual TLS,
    host names not checked); the CA's key is never written, so no other certificate can be made for it.
    docker-compose.yml writes the s3 container's with `python -m trafficwatch.services DIRECTORY INSTALLED_AT`.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)
    now = datetime.datetime.now(datetime.UTC)
    ca_key, node_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "TrafficWatch SeaweedFS CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    node_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "seaweedfs")]))
        .issuer_name(ca_name)
        .public_key(node_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = {
        "ca.crt": ca_cert.public_bytes(serialization.Encoding.PEM),
        "seaweedfs.crt": node_cert.public_bytes(serialization.Encoding.PEM),
        "seaweedfs.key": node_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    }
    for name, content in files.items():
        write_private(directory / name, content)

    def toml(value: str) -> str:
        return json.dumps(value)  # a JSON string is a TOML basic string

    read_from = installed_at or directory
    cert, key = toml(str(read_from / "seaweedfs.crt")), toml(str(read_from / "seaweedfs.key"))
    lines = ["# Written by trafficwatch.services.write_seaweedfs_security at each start; never edit.", ""]
    for section in ("jwt.signing", "jwt.signing.read", "jwt.filer_signing", "jwt.filer_signing.read"):
        lines += [f"[{section}]", f"key = {toml(secrets.token_hex(32))}", "expires_after_seconds = 10", ""]
    lines += ["[access]", "ui = false", "", "[filer.expose_directory_metadata]", "enabled = false", ""]
    lines += ["[grpc]", f"ca = {toml(str(read_from / 'ca.crt'))}", ""]
    for component in ("master", "volume", "filer", "s3", "admin", "worker", "client"):
        lines += [f"[grpc.{component}]", f"cert = {cert}", f"key = {key}", ""]
    path = directory / "security.toml"
    write_private(path, "\n".join(lines))
    return path


def dev_command(*args: str) -> list[str]:
    """`trafficwatch-dev ARGS`, the development package (devtools/: the local feed and the demo's history),
    run by this environment's Python. `make install` installs it beside the pipeline; the image does not."""
    if importlib.util.find_spec("trafficwatch_dev") is None:
        raise RuntimeError(f"`trafficwatch-dev` is not installed in {sys.prefix}: run `make install`")
    return [sys.executable, "-m", "trafficwatch_dev.cli", *args]


def feed(port: int, args: list[str]) -> Service:
    """`trafficwatch-dev feed`: the local imitation of the Rennes API (devtools/trafficwatch_dev/feed.py)."""
    url = f"http://127.0.0.1:{port}"
    command = dev_command("feed", "--port", str(port), *args)
    return Service("feed", command, http_ok(f"{url}/health"), url)


# The worker's glibc malloc keeps two arenas, not up to eight per core. Each build runs on threads (dbt's, the
# request's) that glibc spreads over new arenas, each keeping what was freed in it: over 20 minutes of the stack
# (a build a minute), the worker's free-but-held malloc memory grew 44 -> ~150 MiB and its anonymous memory at
# rest 197 -> ~263 MiB, levelling off once its 16 arenas were in use; with two arenas 26-35 and 187 -> ~218 MiB.
WORKER_ENV = {"MALLOC_ARENA_MAX": "2"}


def worker(socket_path: Path) -> Service:
    """`trafficwatch worker`: dbt imported, the project parsed and the tables open once, merges and builds
    served on a Unix socket (see worker.py), with two malloc arenas (`WORKER_ENV`). Ready once it listens:
    ~8 s of CPU before that, so up to 120 s on a loaded machine."""

    def ready() -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            try:
                conn.connect(str(socket_path))
            except OSError:
                return False
        return True

    command = [venv_bin("trafficwatch"), "worker"]
    return Service("worker", command, ready, f"unix:{socket_path}", dict(WORKER_ENV), start_timeout_s=120)


def history(bucket: str) -> Service:
    """`trafficwatch-dev history seed`: the demo's simulated history landed under raw/
    (devtools/trafficwatch_dev/history.py); it ends when every day is landed."""
    command = dev_command("history", "seed")
    return Service("history", command, lambda: True, f"s3://{bucket}/raw/")


def airflow(port: int) -> Service:
    """Airflow's api-server, scheduler, dag-processor and triggerer, forked by trafficwatch.airflow_components
    from one process that imported Airflow once for all four; ready when the api-server's health endpoint
    answers."""
    url = f"http://127.0.0.1:{port}"
    # Airflow may start `airflow` subprocesses by name: the environment's bin must lead PATH.
    env = {"PATH": f"{Path(venv_bin('airflow')).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    # Its tasks take S3 and the API from Airflow connections: made from the local settings, unless set already.
    env.update(connections.connection_variables(os.environ))
    return Service(
        "airflow",
        [
            sys.executable,
            "-m",
            "trafficwatch.airflow_components",
            airflow_components.AIRFLOW_MAIN,
            *airflow_components.PRELOAD,
        ],
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
    if service.prepare is not None:
        service.prepare()
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
            umask=service.umask,
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


if __name__ == "__main__":  # docker-compose.yml's s3-security service: the s3 container's security.toml
    print(write_seaweedfs_security(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else None))
