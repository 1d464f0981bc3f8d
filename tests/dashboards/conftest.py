"""Superset with the TrafficWatch dashboards, bootstrapped in a temporary home, and a headless Chromium.

Superset runs from its own environment (.venv-superset, `make superset-install`) in its own process group
through `trafficwatch.services`, on a free port; it is stopped by its process group. The browser is Debian's
Chromium (`make browser-install`), driven by Playwright.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.marts.fixtures import build_serving_db, pipeline_settings
from trafficwatch import services
from trafficwatch.config import environ
from trafficwatch_dev.simulator import Simulator
from trafficwatch_dev.snapshots import DEFAULT_BASE, load_snapshot

REPO = Path(__file__).resolve().parents[2]
SUPERSET_PYTHON = REPO / ".venv-superset" / "bin" / "python"
BOOTSTRAP = REPO / "superset" / "bootstrap.py"
CHROMIUM = Path("/usr/bin/chromium")
# The flags known to render deck.gl through SwiftShader (never --disable-software-rasterizer: blank maps).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "dashboards: runs Superset and a headless Chromium (slow, ~2 min)")


# The sample's hours before it, at dashboard grain: enough history for the 24-hour road charts.
HISTORY = timedelta(hours=24)
HISTORY_INTERVAL = timedelta(minutes=15)


@pytest.fixture(scope="session")
def serving_db(s3_server: str, tmp_path_factory: pytest.TempPathFactory, sample_bytes: bytes) -> Path:
    """The serving file built by the real pipeline (land, merge, dbt build, publish): a simulated day of
    Rennes traffic at 15-minute intervals, then the real sample snapshot (2,859 segments) as the latest state.

    TRAFFICWATCH_TEST_SERVING_DB=FILE runs the dashboard tests on a copy of FILE instead.
    """
    if source := os.environ.get("TRAFFICWATCH_TEST_SERVING_DB"):
        path = tmp_path_factory.mktemp("serving") / "traffic.duckdb"
        shutil.copyfile(source, path)
        return path
    latest = datetime.fromisoformat(json.loads(sample_bytes)[0]["datetime"]).astimezone(UTC)
    count = HISTORY // HISTORY_INTERVAL
    simulator = Simulator(
        load_snapshot(DEFAULT_BASE), seed=11, origin=latest - HISTORY, interval_s=HISTORY_INTERVAL.total_seconds()
    )
    history = [json.dumps(simulator.records(index)).encode() for index in range(count)]
    settings = pipeline_settings(s3_server, tmp_path_factory.mktemp("serving-pipeline"))
    return build_serving_db(settings, [*history, sample_bytes])


@dataclass(frozen=True)
class SupersetInstance:
    url: str
    home: Path
    env: dict[str, str]
    viewer_password: str
    admin_password: str
    operator_password: str

    @property
    def metadata_db(self) -> Path:
        return self.home / "superset" / "superset.db"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_bootstrap(env: dict[str, str]) -> str:
    """Run superset/bootstrap.py as `make superset-bootstrap` does; its output for the test's assertions."""
    done = subprocess.run(
        [str(SUPERSET_PYTHON), str(BOOTSTRAP)], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, f"bootstrap failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="session")
def superset(tmp_path_factory: pytest.TempPathFactory, serving_db: Path) -> Iterator[SupersetInstance]:
    """Superset bootstrapped (migrated, roles, users, bundle) in a temporary home, serving `serving_db`."""
    if not SUPERSET_PYTHON.exists():
        pytest.fail(f"{SUPERSET_PYTHON} is missing: run `make superset-install`")
    home = tmp_path_factory.mktemp("superset-home")
    port = _free_port()
    settings = {
        "TRAFFICWATCH_HOME": str(home),
        "TRAFFICWATCH_SERVING_DB": str(serving_db),
        "TRAFFICWATCH_SUPERSET_PORT": str(port),
        "SUPERSET_SECRET_KEY": secrets.token_urlsafe(48),
        "TRAFFICWATCH_SUPERSET_ADMIN_PASSWORD": secrets.token_urlsafe(18),
        "TRAFFICWATCH_SUPERSET_VIEWER_PASSWORD": secrets.token_urlsafe(18),
        "TRAFFICWATCH_SUPERSET_OPERATOR_PASSWORD": secrets.token_urlsafe(18),
    }
    with environ({**settings, "TRAFFICWATCH_SUPERSET_PUBLIC": None, "SUPERSET_DATABASE_URI": None}):
        instance = SupersetInstance(
            url=f"http://127.0.0.1:{port}",
            home=home,
            env=dict(os.environ),
            viewer_password=settings["TRAFFICWATCH_SUPERSET_VIEWER_PASSWORD"],
            admin_password=settings["TRAFFICWATCH_SUPERSET_ADMIN_PASSWORD"],
            operator_password=settings["TRAFFICWATCH_SUPERSET_OPERATOR_PASSWORD"],
        )
        try:
            run_bootstrap(instance.env)
            services.start(services.superset(port, REPO), home)
            yield instance
        finally:
            services.stop(home, "superset")


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    """Debian's headless Chromium through Playwright (Playwright's own browser downloads do not work here)."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make browser-install`")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser  # each login gets a context of its own (test_live_traffic.log_in)
        finally:
            browser.close()
