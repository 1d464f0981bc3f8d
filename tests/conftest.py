"""Fixtures shared by every test: the real snapshot, a real local S3 server, the local feed, settings."""

from __future__ import annotations

import faulthandler
import gzip
import json
import os
import secrets
import signal
import tempfile
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import boto3
import pytest
from _pytest.faulthandler import fault_handler_stderr_fd_key

from trafficwatch import services
from trafficwatch.config import Settings, environ, load_settings
from trafficwatch_dev.feed import FeedConfig, FeedServer, start_in_thread
from trafficwatch_dev.snapshots import DEFAULT_BASE

REPO = Path(__file__).resolve().parents[1]
# Airflow reads its configuration once, at import: point it at a throwaway home before any test imports it.
os.environ["AIRFLOW_HOME"] = tempfile.mkdtemp(prefix="tw-airflow-")
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO / "dags")
os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"] = os.path.join(os.environ["AIRFLOW_HOME"], "plugins")  # none
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
# Set before any thread starts, as the worker does: builds in this process then write no environment variable.
os.environ["DO_NOT_TRACK"] = "1"
# The `trafficwatch` commands the tests run take their settings from the tests alone, never from the checkout's
# .env or generated secrets (tests/integration/test_cli_local_settings.py runs them with those on purpose).
os.environ["TRAFFICWATCH_LOCAL_SETTINGS"] = "0"

# The settings the pipeline reads from the environment (and Superset's), as every module must find them.
SETTINGS_PREFIXES = ("TRAFFICWATCH_", "SUPERSET_")


def _settings_environment() -> dict[str, str]:
    return {name: value for name, value in os.environ.items() if name.startswith(SETTINGS_PREFIXES)}


SESSION_SETTINGS = _settings_environment()


@pytest.fixture(scope="module", autouse=True)
def settings_environment_restored(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the module that leaves a setting changed in os.environ, its session fixtures' included: every later
    module in this process would read it (load_settings, the services and commands it starts). Under
    pytest-xdist which modules follow is chance: the `superset` fixture once held TRAFFICWATCH_SERVING_DB for
    the session, and a later module's worker published its marts into the dashboards' serving file."""
    yield
    now = _settings_environment()
    changed = sorted(
        name for name in SESSION_SETTINGS.keys() | now.keys() if SESSION_SETTINGS.get(name) != now.get(name)
    )
    assert not changed, f"{request.module.__name__} left these variables changed in os.environ: {', '.join(changed)}"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Airflow's DagBag installs a Python handler for SIGSEGV in this process and leaves it there: a crash in
    native code (delta-rs, polars, DuckDB) then kills pytest without a word. Give the signal back to faulthandler,
    writing where pytest's own faulthandler plugin writes (the real stderr, not the capture)."""
    if callable(signal.getsignal(signal.SIGSEGV)):
        signal.signal(signal.SIGSEGV, signal.SIG_DFL)
        faulthandler.disable()
        faulthandler.enable(file=item.config.stash[fault_handler_stderr_fd_key], all_threads=True)


E2E_REPORT_PROPERTY = "trafficwatch_e2e_report"  # tests/e2e/conftest.py: the end-to-end figures, as lines


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The end-to-end tests' figures at the end of the run. Here, not in tests/e2e/: under pytest-xdist the
    controlling process, which prints the summary, loads no conftest below this one."""
    lines = [
        line
        for reports in terminalreporter.stats.values()
        for report in reports
        for name, value in getattr(report, "user_properties", ())
        if name == E2E_REPORT_PROPERTY
        for line in value
    ]
    if lines:
        terminalreporter.section("TrafficWatch end to end: freshness, memory, timings")
        for line in lines:
            terminalreporter.write_line(line)


SAMPLE = DEFAULT_BASE
SAMPLE_RECORDS = 2859


@pytest.fixture(scope="session")
def sample_bytes() -> bytes:
    """The real exports/json response of 2024-08-26 (2,859 records), as the API sent it."""
    return gzip.decompress(SAMPLE.read_bytes())


@pytest.fixture(scope="session")
def sample_file(tmp_path_factory: pytest.TempPathFactory, sample_bytes: bytes) -> Path:
    path = tmp_path_factory.mktemp("samples") / "rennes_exports_2024-08-26.json"
    path.write_bytes(sample_bytes)
    return path


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real SeaweedFS S3 server for this test session, on free loopback ports, with random keys."""
    home = tmp_path_factory.mktemp("s3home")
    keys = {"AWS_ACCESS_KEY_ID": "test" + secrets.token_hex(6), "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(24)}
    with environ(keys):
        # boto3's default session keeps the credentials it first found in this process: a test that ran
        # before (in this worker) must not leave it other keys than this server's.
        boto3.DEFAULT_SESSION = None
        # A bucket per test: far more buckets (each its own volumes) than the default cap allows.
        service = services.local_s3(home / "s3", services.free_s3_port(), "trafficwatch", max_volumes=5000)
        services.start(service, home)
        try:
            yield service.url
        finally:
            services.stop(home, service.name)


@pytest.fixture
def s3_settings(s3_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Settings:
    """Settings pointing at the real local S3 server, with a fresh bucket for this test."""
    bucket = f"tw-{uuid.uuid4().hex[:12]}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("TRAFFICWATCH_BUCKET", bucket)
    monkeypatch.setenv("TRAFFICWATCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TRAFFICWATCH_HTTP_TIMEOUT", "2")
    monkeypatch.setenv("TRAFFICWATCH_FETCH_BUDGET", "10")
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    return load_settings()


def shifted_snapshot(sample_bytes: bytes, minutes: int, path: Path) -> Path:
    """The sample re-dated `minutes` later: another upstream snapshot with the same segments."""
    records = json.loads(sample_bytes)
    moment = datetime.fromisoformat(records[0]["datetime"]) + timedelta(minutes=minutes)
    for record in records:
        record["datetime"] = moment.isoformat()
        record["averagevehiclespeed"] = max(0, record["averagevehiclespeed"] - 1)
    path.write_text(json.dumps(records))
    return path


@pytest.fixture
def next_snapshot_file(sample_bytes: bytes, tmp_path: Path) -> Path:
    return shifted_snapshot(sample_bytes, 3, tmp_path / "rennes_plus_3min.json")


@pytest.fixture
def feed(sample_file: Path, next_snapshot_file: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FeedServer]:
    """The feed serving the real sample, then (after `advance()`) the same snapshot 3 minutes later.

    Its clock is slowed to a crawl so only `advance()` moves it.
    """
    server = start_in_thread(
        FeedConfig(port=0, files=(sample_file, next_snapshot_file), speed=1e-6, retry_after_s=1, slow_s=3.0)
    )
    monkeypatch.setenv("TRAFFICWATCH_API_URL", server.url)
    try:
        yield server
    finally:
        server.close()


SAMPLE_DATETIME = b"2024-08-26T12:43:00+02:00"


def redated(sample_bytes: bytes, minutes: int) -> bytes:
    """The sample as another upstream snapshot, `minutes` later (a cheap byte replacement)."""
    moment = datetime.fromisoformat(SAMPLE_DATETIME.decode()) + timedelta(minutes=minutes)
    return sample_bytes.replace(SAMPLE_DATETIME, moment.isoformat().encode())


def land_raw(settings: Settings, body: bytes) -> str:
    """Put a payload under raw/ as the ingest would (gzip, keyed by its upstream datetime)."""
    from trafficwatch.payloads import normalize_payload
    from trafficwatch.raw import raw_key

    key = raw_key(normalize_payload(body).measured_at)
    from trafficwatch.storage import s3_client

    s3_client(settings).put_object(Bucket=settings.bucket, Key=key, Body=gzip.compress(body, mtime=0))
    return key
