"""The viewer opens "Trends" in a real browser: every chart renders, the reliability views with data.

The serving file is the session's (a simulated day of Rennes traffic, then the real sample): it holds two
Rennes days, so the Travel Time and Planning Time Index charts have points, the network's congestion level
fills a day-by-hour heatmap, and the episodes tables have rows. Each expectation about data is read from
the serving file itself, as the dashboards' datasets would select it.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest
from playwright.sync_api import Browser

from .conftest import (
    ALL_CHARTS_SETTLED,
    CHART_ERRORS,
    REPO,
    SupersetInstance,
    chart_count,
    chart_tab,
    charts_on_opening,
    later_tabs,
    log_in,
    open_tab,
)
from .test_live_traffic import ARTIFACTS, screenshot_dashboard

pytestmark = [pytest.mark.dashboards, pytest.mark.timeout(900)]

TRENDS = REPO / "superset" / "bundle" / "dashboards" / "trends.yaml"
NEW_CHARTS = (
    "Travel Time Index per day, last 30 days",
    "Planning Time Index per day, last 30 days",
    "Network congestion level by hour and day, last 30 days",
    "Closures, last 7 days",
    "Longest congestion episodes, last 7 days",
)
# What a chart shows when its query returned nothing.
EMPTY = "No results were returned for this query"


def test_viewer_sees_the_reliability_views_with_data(
    superset: SupersetInstance, browser: Browser, serving_db: Path
) -> None:
    with duckdb.connect(str(serving_db), read_only=True) as con:
        (days,) = con.execute("SELECT count(DISTINCT local_date) FROM road_reliability_daily").fetchone()
        (hours,) = con.execute("SELECT count(*) FROM network_congestion_hourly").fetchone()
        (closures,) = con.execute("SELECT count(*) FROM congestion_events WHERE is_closure").fetchone()
        (episodes,) = con.execute("SELECT count(*) FROM congestion_events").fetchone()
    assert days >= 2 and hours >= 24 and episodes > 0

    page = log_in(browser, superset, "viewer", superset.viewer_password)
    console_errors: list[str] = []
    page.on("pageerror", lambda error: console_errors.append(str(error)))
    page.goto(superset.url + "/superset/dashboard/trends/")
    # It opens on its first tab; Superset draws each other tab's charts once that tab is opened.
    expected = charts_on_opening(TRENDS)
    assert len(later_tabs(TRENDS)) == 2 and expected < chart_count(TRENDS)
    page.wait_for_function(ALL_CHARTS_SETTLED, arg=expected, timeout=240_000, polling=1000)
    assert page.locator("[data-test-chart-id]").count() == expected
    screenshot_dashboard(page, ARTIFACTS / "trends.png", expected)
    for title, charts in later_tabs(TRENDS):
        open_tab(page, title)
        expected += charts
        page.wait_for_function(ALL_CHARTS_SETTLED, arg=expected, timeout=240_000, polling=1000)
    assert page.evaluate(CHART_ERRORS) == []
    assert page.locator("[data-test-chart-id]").count() == chart_count(TRENDS)

    ARTIFACTS.mkdir(exist_ok=True)
    for number, name in enumerate(NEW_CHARTS):
        open_tab(page, chart_tab(TRENDS, name))  # a chart is drawn and visible only in its open tab
        chart = page.locator(f'[data-test-chart-name="{name}"]')
        assert chart.count() == 1, name
        chart.scroll_into_view_if_needed()
        chart.screenshot(path=str(ARTIFACTS / f"trends_{number + 1}.png"), timeout=120_000)
        text = chart.inner_text()
        if name == "Closures, last 7 days" and closures == 0:
            continue  # the simulated day had no incident: an empty table is right
        assert EMPTY not in text, f"{name}: no data"
        drawn = chart.locator('[data-test="chart-container"] :is(canvas, svg, table tbody tr)')
        assert drawn.count() > 0, f"{name}: nothing drawn"
    rows = page.locator('[data-test-chart-name="Longest congestion episodes, last 7 days"] tbody tr')
    assert rows.count() > 0
    assert console_errors == []
    page.close()
