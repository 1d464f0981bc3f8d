"""A fresh `make demo` with its simulated history: within 10 minutes, every chart has data.

`make demo` on a temporary home and free ports, with the default history (DEMO_HISTORY_DAYS, 14 days,
seeded newest first in the background). From the moment `make demo` returns, at most DEADLINE_S:
- the serving file shows at least MIN_PAST_DAYS whole past local days of history (the live minutes alone
  already put a point in every chart: data from them proves nothing about the history);
- headless Chromium then sees data in every chart of Trends as the viewer and of Pipeline health as the
  operator (no "No results", something drawn);
- meanwhile Live traffic keeps updating (the newest measurement the serving file shows moves on).
Live traffic's "Most congested roads now" lists the roads congested in the latest snapshot: it must be empty
exactly when the serving file shows no congested or impassable segment (the simulator has none around 06:00 and
overnight), and have data otherwise.
The time each took is reported.

Screenshots of the three dashboards go to test-artifacts/, and to TRAFFICWATCH_SCREENSHOTS_DIR when set:
`make screenshots` makes the README's images this way (docs/screenshots/), once a week of history is shown.

About 20 minutes and the whole machine: run by `make test-demo` (and `make screenshots`), not by
`make test`, which starts the stack once already (tests/e2e/test_stack.py).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import duckdb
import pytest

from tests.conftest import REPO
from tests.dashboards.conftest import (
    ALL_CHARTS_SETTLED,
    CHART_ERRORS,
    browser,  # noqa: F401  the dashboards' headless Chromium, as a fixture here
    chart_count,
    charts_on_opening,
    later_tabs,
    log_in,
    open_tab,
)
from tests.dashboards.test_live_traffic import ARTIFACTS, screenshot_dashboard
from tests.support.stack import LocalStack
from trafficwatch import operate

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(3600),
    pytest.mark.skipif(
        os.environ.get("TRAFFICWATCH_DEMO_TEST") != "1", reason="the demo's own test: `make test-demo` runs it"
    ),
]

DEADLINE_S = 600
MIN_PAST_DAYS = 3  # whole local days before today that Trends must show by the deadline
SCREENSHOT_PAST_DAYS = 7  # for `make screenshots`: a whole week shown (the typical week filled) before the pictures
SCREENSHOT_WAIT_S = 1500
LIVE_WAIT_S = 300  # for the next live minute to be shown (the feed's minute, its merge and build)
HISTORY_DAYS = "14"  # make demo's default
DASHBOARDS = REPO / "superset" / "bundle" / "dashboards"
EMPTY = "No results were returned for this query"
# The charts of a settled dashboard that show no data, by name.
DRAWN = '[data-test="chart-container"] :is(canvas, svg, table tbody tr, .header-line)'
MOST_CONGESTED = "Most congested roads now"
EMPTY_CHARTS = f"""() => Array.from(document.querySelectorAll('[data-test-chart-id]'))
  .filter(chart => chart.innerText.includes('{EMPTY}') || !chart.querySelector('{DRAWN}'))
  .map(chart => chart.getAttribute('data-test-chart-name'))"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    home = tmp_path_factory.mktemp("demo-history")
    stack = LocalStack.on_free_ports(home, extra_env={"DEMO_HISTORY_DAYS": HISTORY_DAYS})
    try:
        stack.up()
        yield stack
    finally:
        stack.down()


def newest_shown(stack: LocalStack) -> datetime | None:
    shown, _ = operate.served_latest(stack.serving_db)
    return shown


def past_days_shown(stack: LocalStack) -> int:
    """Whole local days (23 hours or more: a clock change day has 23) before the newest one in the network's
    hourly congestion mart of the serving file."""
    if not stack.serving_db.is_file():
        return 0
    with duckdb.connect(str(stack.serving_db), read_only=True) as con:
        (days,) = con.execute(
            "SELECT count(*) FROM (SELECT local_date FROM network_congestion_hourly GROUP BY local_date "
            "HAVING count(*) >= 23 AND local_date < (SELECT max(local_date) FROM network_congestion_hourly))"
        ).fetchone()
    return days


def congested_segments_now(stack: LocalStack) -> int:
    """Segments congested or impassable in the latest snapshot the serving file shows."""
    with duckdb.connect(str(stack.serving_db), read_only=True) as con:
        (segments,) = con.execute(
            "SELECT count(*) FROM segment_latest WHERE traffic_status IN ('congested', 'impossible')"
        ).fetchone()
    return segments


def wait_for_history(stack: LocalStack, days: int, deadline: float) -> int:
    shown = past_days_shown(stack)
    while shown < days and time.monotonic() < deadline:
        time.sleep(10)
        shown = past_days_shown(stack)
    return shown


def wait_for_data(page, url: str, dashboard: str, deadline: float) -> list[str]:
    """Open the dashboard, and each of its other tabs, until every chart shows data or the deadline passes (once
    if it has passed); the charts still empty."""
    layout = DASHBOARDS / f"{dashboard}.yaml"
    while True:
        page.goto(url)
        expected = charts_on_opening(layout)
        page.wait_for_function(ALL_CHARTS_SETTLED, arg=expected, timeout=300_000, polling=1000)
        for title, charts in later_tabs(layout):
            open_tab(page, title)
            expected += charts
            page.wait_for_function(ALL_CHARTS_SETTLED, arg=expected, timeout=300_000, polling=1000)
        assert expected == chart_count(layout), dashboard
        assert page.evaluate(CHART_ERRORS) == [], dashboard
        empty = page.evaluate(EMPTY_CHARTS)
        if not empty or time.monotonic() > deadline:
            return empty
        time.sleep(20)


def screenshot(page, name: str, dashboard: str) -> None:
    path = ARTIFACTS / f"demo_{name}.png"
    layout = DASHBOARDS / f"{dashboard}.yaml"
    if later_tabs(layout):  # wait_for_data left its last tab open: the picture shows the dashboard as it opens
        page.reload()
    screenshot_dashboard(page, path, charts_on_opening(layout))
    if target := os.environ.get("TRAFFICWATCH_SCREENSHOTS_DIR"):
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(target) / f"{name}.png")


def test_every_chart_has_data_within_ten_minutes_while_live_traffic_updates(
    stack: LocalStack,
    browser,  # noqa: F811  (the fixture imported above)
    e2e_report: list[str],
) -> None:
    started = time.monotonic()
    deadline = started + DEADLINE_S
    environment = stack.environment()
    superset = SimpleNamespace(url=stack.superset_url)

    days = wait_for_history(stack, MIN_PAST_DAYS, deadline)
    history_s = time.monotonic() - started
    assert days >= MIN_PAST_DAYS, f"{days} whole past days shown {DEADLINE_S} s after make demo"
    viewer = log_in(browser, superset, "viewer", environment["TRAFFICWATCH_SUPERSET_VIEWER_PASSWORD"])
    empty = wait_for_data(viewer, f"{stack.superset_url}/superset/dashboard/trends/", "trends", deadline)
    trends_s = time.monotonic() - started
    assert empty == [], f"Trends charts without data {DEADLINE_S} s after make demo: {empty}"
    at_deadline = wait_for_history(stack, int(HISTORY_DAYS), deadline)
    if os.environ.get("TRAFFICWATCH_SCREENSHOTS_DIR"):  # the README's pictures show a week of history
        wait_for_history(stack, SCREENSHOT_PAST_DAYS, started + SCREENSHOT_WAIT_S)
        wait_for_data(viewer, f"{stack.superset_url}/superset/dashboard/trends/", "trends", deadline)
    screenshot(viewer, "trends", "trends")
    viewer.close()
    first_shown = newest_shown(stack)

    operator = log_in(browser, superset, "operator", environment["TRAFFICWATCH_SUPERSET_OPERATOR_PASSWORD"])
    url = f"{stack.superset_url}/superset/dashboard/pipeline-health/"
    empty = wait_for_data(operator, url, "pipeline_health", deadline)
    health_s = time.monotonic() - started
    assert empty == [], f"Pipeline health charts without data {DEADLINE_S} s after make demo: {empty}"
    screenshot(operator, "pipeline_health", "pipeline_health")

    # Live traffic as the serving file is: every chart with data, but "Most congested roads now" empty when no
    # segment is congested or impassable. Looked at again while the file changed during a look, or while a chart
    # cached (60 s) from an earlier snapshot still shows it, until a minute and a half past the deadline.
    url, until = f"{stack.superset_url}/superset/dashboard/live-traffic/", max(deadline, time.monotonic() + 90)
    while True:
        before = congested_segments_now(stack)
        empty = wait_for_data(operator, url, "live_traffic", deadline=0)  # one look
        after = congested_segments_now(stack)
        expected = [] if before else [MOST_CONGESTED]
        steady = (before == 0) == (after == 0)
        if (steady and empty == expected) or time.monotonic() > until:
            break
        time.sleep(20)
    assert steady and empty == expected, (
        f"Live traffic charts without data: {empty}, with {before} then {after} segments congested or impassable"
    )
    screenshot(operator, "live_traffic", "live_traffic")
    operator.close()

    # The live minute keeps flowing while the history is merged and built: a newer minute is shown soon.
    last_shown, waited = newest_shown(stack), time.monotonic()
    while last_shown == first_shown and time.monotonic() - waited < LIVE_WAIT_S:
        time.sleep(10)
        last_shown = newest_shown(stack)
    assert first_shown is not None and last_shown is not None and last_shown > first_shown
    e2e_report.append(
        f"demo with {HISTORY_DAYS} days of history: {MIN_PAST_DAYS} whole past days shown {history_s:.0f} s, "
        f"{at_deadline} at {DEADLINE_S} s; Trends with data {trends_s:.0f} s, Pipeline health {health_s:.0f} s "
        f"after make demo returned; live data shown moved from {first_shown} to {last_shown}"
    )
