"""Superset with the TrafficWatch dashboards, bootstrapped in a temporary home, and a headless Chromium.

Superset runs from its own environment (.venv-superset, `make superset-install`) in its own process group
through `trafficwatch.services`, on a free port; it is stopped by its process group. The browser is Debian's
Chromium (`make browser-install`), driven by Playwright. `running_superset`, `log_in` and `ALL_CHARTS_SETTLED`
also serve bench/viewer_latency.py (bench code may import tests; the pipeline imports neither).
"""

from __future__ import annotations

import contextlib
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
from typing import TYPE_CHECKING

import pytest
import yaml

from tests.marts.fixtures import build_serving_db, pipeline_settings
from trafficwatch import services
from trafficwatch.config import environ
from trafficwatch_dev.simulator import Simulator
from trafficwatch_dev.snapshots import DEFAULT_BASE, load_snapshot

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

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


@contextlib.contextmanager
def running_superset(home: Path, serving_db: Path) -> Iterator[SupersetInstance]:
    """Superset bootstrapped (migrated, roles, users, bundle) in `home` with fresh random secrets, serving
    `serving_db`, on a free port; stopped by its process group on exit. The fixture below and
    bench/viewer_latency.py both run it."""
    port = _free_port()
    settings = {
        "TRAFFICWATCH_HOME": str(home),
        "TRAFFICWATCH_SERVING_DB": str(serving_db),
        "TRAFFICWATCH_SUPERSET_PORT": str(port),
        "TRAFFICWATCH_BASE_MAP": "none",  # offline: no tile host (superset/bootstrap.py)
        "SUPERSET_SECRET_KEY": secrets.token_urlsafe(48),
        "TRAFFICWATCH_SUPERSET_ADMIN_PASSWORD": secrets.token_urlsafe(18),
        "TRAFFICWATCH_SUPERSET_VIEWER_PASSWORD": secrets.token_urlsafe(18),
        "TRAFFICWATCH_SUPERSET_OPERATOR_PASSWORD": secrets.token_urlsafe(18),
    }
    changes = {**settings, "TRAFFICWATCH_SUPERSET_PUBLIC": None, "SUPERSET_DATABASE_URI": None}
    instance = SupersetInstance(
        url=f"http://127.0.0.1:{port}",
        home=home,
        env={**{name: value for name, value in os.environ.items() if name not in changes}, **settings},
        viewer_password=settings["TRAFFICWATCH_SUPERSET_VIEWER_PASSWORD"],
        admin_password=settings["TRAFFICWATCH_SUPERSET_ADMIN_PASSWORD"],
        operator_password=settings["TRAFFICWATCH_SUPERSET_OPERATOR_PASSWORD"],
    )
    try:
        run_bootstrap(instance.env)
        # This process's environment only while Superset starts (services.start hands it os.environ), never
        # while it runs: held for the session, TRAFFICWATCH_HOME and TRAFFICWATCH_SERVING_DB were every later
        # test's in this process, and under pytest-xdist a worker's builds (tests/integration/test_history.py's)
        # then published into this very serving file before the next dashboard test read it.
        with environ(changes):
            services.start(services.superset(port, REPO), home)
        yield instance
    finally:
        services.stop(home, "superset")


@pytest.fixture(scope="session")
def superset(tmp_path_factory: pytest.TempPathFactory, serving_db: Path) -> Iterator[SupersetInstance]:
    """Superset bootstrapped (migrated, roles, users, bundle) in a temporary home, serving `serving_db`."""
    if not SUPERSET_PYTHON.exists():
        pytest.fail(f"{SUPERSET_PYTHON} is missing: run `make superset-install`")
    with running_superset(tmp_path_factory.mktemp("superset-home"), serving_db) as instance:
        yield instance


# --------------------------------------------------------------------------- in the browser

# Whether a dashboard has finished rendering: `expected` chart holders, none loading, each with something
# drawn (or an error, which CHART_ERRORS reports), and the deck.gl maps' canvases sized.
# One chart is settled: its error is shown (reported by CHART_ERRORS), or it is drawn (no spinner; a canvas, svg,
# table or number) and, for a deck.gl map, its canvas sized; or it is in a tab drawn before and not shown now (a
# deck.gl map there shrinks its canvas to 1 x 1).
CHART_SETTLED = """(chart) => {
  if (chart.closest('[role="tabpanel"][aria-hidden="true"]')) return true;
  if (chart.querySelector('.ant-alert-error, [data-test="error-tooltip"]')) return true;
  if (chart.querySelector('[data-test="loading-indicator"]')) return false;
  if (!chart.querySelector('[data-test="chart-container"] :is(canvas, svg, table, .header-line)')) return false;
  const canvas = chart.querySelector('canvas#deckgl-overlay');
  return chart.getAttribute('data-test-viz-type') !== 'deck_path' || Boolean(canvas && canvas.width > 300);
}"""
ALL_CHARTS_SETTLED = f"""(expected) => {{
  const charts = Array.from(document.querySelectorAll('[data-test-chart-id]'));
  return charts.length >= expected && charts.every({CHART_SETTLED});
}}"""

CHART_ERRORS = """() => Array.from(document.querySelectorAll('[data-test-chart-id]'))
  .filter(chart => chart.querySelector('.ant-alert-error, [data-test="error-tooltip"]')
                   || !chart.querySelector('[data-test="chart-container"]'))
  .map(chart => `${chart.getAttribute('data-test-chart-name')}: ${chart.innerText.slice(0, 300)}`)"""


def _layout(dashboard_yaml: Path) -> list[dict]:
    position = yaml.safe_load(dashboard_yaml.read_text())["position"]
    return [node for node in position.values() if isinstance(node, dict)]


def chart_count(dashboard_yaml: Path) -> int:
    """Every chart of the dashboard's layout, in all its tabs."""
    return sum(1 for node in _layout(dashboard_yaml) if node.get("type") == "CHART")


def later_tabs(dashboard_yaml: Path) -> list[tuple[str, int]]:
    """The tabs the dashboard does not open on (each tab group's tabs but its first), in layout order, with the
    charts under each: Superset draws a tab's charts once the tab is opened."""
    nodes = _layout(dashboard_yaml)
    tabs = [tab for group in nodes if group.get("type") == "TABS" for tab in group["children"][1:]]
    by_id = {node["id"]: node for node in nodes}
    return [
        (by_id[tab]["meta"]["text"], sum(1 for n in nodes if n.get("type") == "CHART" and tab in n["parents"]))
        for tab in tabs
    ]


def chart_tab(dashboard_yaml: Path, chart_name: str) -> str | None:
    """The title of the tab holding the chart named `chart_name`; None for a chart outside every tab."""
    nodes = _layout(dashboard_yaml)
    by_id = {node["id"]: node for node in nodes}
    (chart,) = [n for n in nodes if n.get("type") == "CHART" and n["meta"].get("sliceName") == chart_name]
    tabs = [by_id[parent]["meta"]["text"] for parent in chart["parents"] if by_id[parent].get("type") == "TAB"]
    return tabs[-1] if tabs else None


def charts_on_opening(dashboard_yaml: Path) -> int:
    """The charts drawn when the dashboard opens: all but those of its later tabs."""
    return chart_count(dashboard_yaml) - sum(charts for _, charts in later_tabs(dashboard_yaml))


def open_tab(page: Page, title: str) -> float:
    """Open the dashboard tab `title`; the page's clock (`performance.now()`, ms) just before the click."""
    clicked_at = page.evaluate("() => performance.now()")
    page.locator('[data-test="dashboard-component-tabs"] [role="tab"]', has_text=title).click()
    return clicked_at


LOGIN_MESSAGES = """() => Array.from(document.querySelectorAll('[role=alert], .ant-alert, .ant-message'))
  .map(element => element.innerText)"""


def log_in(browser: Browser, superset: SupersetInstance, username: str, password: str) -> Page:
    """A page logged in as `username`, in a browser context (cookie jar) of its own, so no page of an earlier
    user can send a cookie into it. (The login page's own event log, posted as it unloads, used to answer with
    the anonymous session's cookie over the new login's: superset_config.py now answers it without a cookie.)"""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    context = browser.new_context(viewport={"width": 1600, "height": 2400})
    page = context.new_page()
    # Two WebGL maps drawn in software keep a loaded machine's renderer busy: be patient with every action.
    page.set_default_timeout(120_000)
    page.goto(f"{superset.url}/login/")
    page.fill('[data-test="username-input"]', username)
    page.fill('[data-test="password-input"]', password)
    page.click('[data-test="login-button"]')
    try:
        page.wait_for_url(lambda url: "/login" not in url, timeout=60_000)
    except PlaywrightTimeout:
        said = page.evaluate(LOGIN_MESSAGES)
        raise AssertionError(f"{username}: still on {page.url} 60 s after logging in, the page says {said}") from None
    return page


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Debian's headless Chromium through Playwright (Playwright's own browser downloads do not work here).

    One per test module, not per session: while Playwright's sync API is open, its asyncio loop counts as running
    in the process's main thread, and a later module's asyncio code there (the SMTP sink of
    tests/dags/test_pipeline_freshness.py, dag.test() of tests/dags/test_traffic_merge.py) failed with "Cannot
    run the event loop while another loop is running" whenever pytest-xdist gave it the same worker after a
    dashboards module."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make browser-install`")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser  # each login gets a context of its own (log_in)
        finally:
            browser.close()
