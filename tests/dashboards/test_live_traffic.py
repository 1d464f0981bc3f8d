"""The viewer opens "Live traffic" in a real browser: every chart renders, the maps draw the network.

Waits on page state (chart containers filled, no spinner, map canvases sized and painted), never on
network idle. Offline (TRAFFICWATCH_BASE_MAP=none, as the test Superset runs) the maps have no base map, and the
page asks no host but Superset.
"""

from __future__ import annotations

import base64
import time
from pathlib import Path

import duckdb
import pytest
import yaml
from playwright.sync_api import Browser, Page

from .conftest import (
    ALL_CHARTS_SETTLED,
    CHART_ERRORS,
    REPO,
    SupersetInstance,
    chart_count,
    charts_on_opening,
    log_in,
    open_tab,
)

pytestmark = [pytest.mark.dashboards, pytest.mark.timeout(900)]

ARTIFACTS = REPO / "test-artifacts"
BUNDLE = REPO / "superset" / "bundle"
LIVE_TRAFFIC = BUNDLE / "dashboards" / "live_traffic.yaml"
SEGMENTS_IN_SAMPLE = "2,859"
# Status colours of the map (js_data_mutator of map_traffic_status.yaml): free flow, heavy, congested.
STATUS_COLORS = {"freeFlow": (46, 158, 68), "heavy": (242, 140, 40), "congested": (224, 32, 32)}
STATUS_MAP, SPEED_MAP = "Traffic now, by status", "Speed as a share of the limit"
SPEED_TAB = "Speed / limit"  # the maps' second tab (the dashboard opens on the status map's)
ROADS_TAB = "Roads"  # the third: the most congested roads now and the road charts of the last 24 h
ROADS_TAB_CHARTS = (
    "Most congested roads now",
    "Mean speed, last 24 h (vs typical)",
    "Travel time, last 24 h (vs typical)",
)

# How Playwright reports a request the content security policy refused (it never left the browser).
CSP_REFUSED = "csp"
TABLE_ROWS = '[data-test-chart-name="Most congested roads now"] tbody tr'
ONLY_ROAD_IN_TABLE = f"""(road) => {{
  const rows = Array.from(document.querySelectorAll('{TABLE_ROWS}'));
  return rows.length === 1 && rows[0].querySelector('td').innerText.trim() === road;
}}"""
MAP_CANVAS_SIZES = "() => Array.from(document.querySelectorAll('canvas#deckgl-overlay'), c => [c.width, c.height])"
MAP_CANVAS_SIZES_OF = """(name) => Array.from(
  document.querySelectorAll(`[data-test-chart-name="${name}"] canvas#deckgl-overlay`), c => [c.width, c.height])"""
# Decode a PNG in the page (no imaging library in the test environment) and count pixels of each colour.
COUNT_COLORS = """async ([png, colors]) => {
  const image = new Image();
  image.src = 'data:image/png;base64,' + png;
  await image.decode();
  const canvas = document.createElement('canvas');
  canvas.width = image.width;
  canvas.height = image.height;
  const context = canvas.getContext('2d');
  context.drawImage(image, 0, 0);
  const data = context.getImageData(0, 0, image.width, image.height).data;
  const counts = Object.fromEntries(Object.keys(colors).map(name => [name, 0]));
  for (let i = 0; i < data.length; i += 4) {
    for (const [name, [r, g, b]] of Object.entries(colors)) {
      const near = Math.abs(data[i] - r) < 16 && Math.abs(data[i + 1] - g) < 16 && Math.abs(data[i + 2] - b) < 16;
      if (near) counts[name]++;
    }
  }
  return counts;
}"""


def screenshot_dashboard(page: Page, path: Path, expected: int) -> None:
    """The whole dashboard as one image, in a viewport as tall as the page. Chromium's full-page capture
    came out as an empty grey grid on dashboards with a filter bar: the charts are laid out again while
    it captures. The viewport is put back afterwards."""
    path.parent.mkdir(parents=True, exist_ok=True)
    viewport = page.viewport_size
    height = page.evaluate("() => document.documentElement.scrollHeight")
    page.set_viewport_size({"width": viewport["width"], "height": max(height, viewport["height"])})
    page.wait_for_function(ALL_CHARTS_SETTLED, arg=expected, timeout=180_000, polling=1000)
    time.sleep(2)  # the charts' drawing animations
    page.screenshot(path=str(path), timeout=180_000)
    page.set_viewport_size(viewport)


def kpi_text(page: Page, chart_name: str) -> str:
    return page.locator(f'[data-test-chart-name="{chart_name}"] .header-line').inner_text().strip()


def map_colors(page: Page, chart_name: str, timeout_s: float = 60) -> dict[str, int]:
    """Pixels of each status colour in the map, once the map has painted them (deck.gl draws a frame later)."""
    chart = page.locator(f'[data-test-chart-name="{chart_name}"] [data-test="chart-container"]')
    deadline = time.monotonic() + timeout_s
    while True:
        png = base64.b64encode(chart.screenshot(timeout=120_000)).decode()
        counts = page.evaluate(COUNT_COLORS, [png, STATUS_COLORS])
        if all(counts.values()) or time.monotonic() > deadline:
            return counts
        time.sleep(2)


def test_viewer_sees_live_traffic_and_no_sql_lab(
    superset: SupersetInstance, browser: Browser, serving_db: Path
) -> None:
    page = log_in(browser, superset, "viewer", superset.viewer_password)
    console_errors: list[str] = []
    page.on("pageerror", lambda error: console_errors.append(str(error)))
    # Requests to any host but Superset (a tile server, a telemetry pixel, a font host, ...), with how each
    # ended: one the content security policy refused never left the browser.
    elsewhere: dict[str, str] = {}
    local = (superset.url + "/", "data:", "blob:")
    page.on("request", lambda request: request.url.startswith(local) or elsewhere.setdefault(request.url, "sent"))
    page.on(
        "requestfailed",
        lambda request: request.url in elsewhere and elsewhere.update({request.url: request.failure or "failed"}),
    )

    # The viewer's home is the live dashboard.
    page.goto(superset.url + "/")
    page.wait_for_url("**/superset/dashboard/live-traffic/", timeout=60_000)

    # It opens on the status map's tab: the tiles and the status map; the speed map and the Roads tab's charts
    # are drawn once their tab is opened.
    expected = charts_on_opening(LIVE_TRAFFIC)
    assert expected == chart_count(LIVE_TRAFFIC) - 1 - len(ROADS_TAB_CHARTS)
    page.wait_for_function(ALL_CHARTS_SETTLED, arg=expected, timeout=240_000, polling=1000)
    assert page.evaluate(CHART_ERRORS) == []
    assert page.locator("[data-test-chart-id]").count() == expected
    for later in (SPEED_MAP, *ROADS_TAB_CHARTS):
        assert page.locator(f'[data-test-chart-name="{later}"]').count() == 0, later

    assert kpi_text(page, "Segments") == SEGMENTS_IN_SAMPLE
    with duckdb.connect(str(serving_db), read_only=True) as con:
        (reporting,) = con.execute("SELECT segments_reporting FROM network_kpis_latest").fetchone()
    assert kpi_text(page, "Reporting") == f"{reporting:,}"

    sizes = page.evaluate(MAP_CANVAS_SIZES)
    assert len(sizes) == 1
    assert all(width > 300 and height > 150 for width, height in sizes), sizes  # 300x150: WebGL never started
    counts = map_colors(page, STATUS_MAP)
    assert all(count > 50 for count in counts.values()), f"the status map did not draw the network: {counts}"

    ARTIFACTS.mkdir(exist_ok=True)
    screenshot_dashboard(page, ARTIFACTS / "live_traffic.png", expected)
    # A full-page screenshot resizes the viewport: the grid lays itself out again before it is counted.
    page.wait_for_function(ALL_CHARTS_SETTLED, arg=expected, timeout=120_000, polling=1000)
    assert page.locator("[data-test-chart-id]").count() == expected
    assert page.evaluate(CHART_ERRORS) == []

    # The speed map's tab: its map drawn too (its colours for >= 95 %, 60-80 % and 40-60 % of the limit are the
    # status map's free flow, heavy and congested).
    open_tab(page, SPEED_TAB)
    expected = chart_count(LIVE_TRAFFIC) - len(ROADS_TAB_CHARTS)
    page.wait_for_function(ALL_CHARTS_SETTLED, arg=expected, timeout=240_000, polling=1000)
    assert page.evaluate(CHART_ERRORS) == []
    assert len(page.evaluate(MAP_CANVAS_SIZES)) == 2  # the status map's stays, hidden with its tab
    ((width, height),) = page.evaluate(MAP_CANVAS_SIZES_OF, SPEED_MAP)
    assert width > 300 and height > 150, (width, height)
    counts = map_colors(page, SPEED_MAP)
    assert all(count > 50 for count in counts.values()), f"the speed map did not draw the network: {counts}"

    # The Roads tab: the table of the most congested roads and the two road charts.
    open_tab(page, ROADS_TAB)
    expected = chart_count(LIVE_TRAFFIC)
    page.wait_for_function(ALL_CHARTS_SETTLED, arg=expected, timeout=240_000, polling=1000)
    assert page.evaluate(CHART_ERRORS) == []
    for chart in ROADS_TAB_CHARTS:
        assert page.locator(f'[data-test-chart-name="{chart}"]').count() == 1, chart
    assert console_errors == []
    left = {url: end for url, end in elsewhere.items() if end != CSP_REFUSED}
    assert left == {}, f"the page asked hosts other than Superset: {left}"

    # The Road filter drives the maps, the road charts and the table; the network-wide tiles ignore it.
    road = page.locator(f"{TABLE_ROWS} td").first.inner_text().strip()
    page.locator('[data-test="NATIVE_FILTER-live-road"] .ant-select-selector').click()
    page.keyboard.type(road)
    page.locator(f'.ant-select-item-option[title="{road}"]').click()
    page.keyboard.press("Escape")
    page.click('[data-test="filter-bar__apply-button"]')
    page.wait_for_function(ONLY_ROAD_IN_TABLE, arg=road, timeout=120_000, polling=1000)
    page.wait_for_function(ALL_CHARTS_SETTLED, arg=expected, timeout=120_000, polling=1000)
    assert page.evaluate(CHART_ERRORS) == []
    assert kpi_text(page, "Segments") == SEGMENTS_IN_SAMPLE

    # No SQL Lab for viewers: neither the page nor its API.
    response = page.goto(superset.url + "/sqllab/")
    assert response is not None and response.status == 403
    assert page.locator(".SqlEditor, [data-test='sql-editor-tabs']").count() == 0
    assert page.request.get(superset.url + "/api/v1/database/").status == 403
    assert page.request.get(superset.url + "/api/v1/sqllab/").status == 403
    page.close()


def dataset_column(column: str) -> str:
    """A column of the segment_latest dataset as Superset selects it: its SQL expression when it is calculated."""
    dataset = yaml.safe_load((BUNDLE / "datasets" / "segment_latest.yaml").read_text())
    (definition,) = [c for c in dataset["columns"] if c["column_name"] == column]
    return f"{definition['expression']} AS {column}" if definition.get("expression") else column


@pytest.mark.parametrize("chart", ["map_traffic_status", "map_speed_ratio"])
def test_the_map_tooltips_say_what_the_dataset_says(chart: str, browser: Browser, serving_db: Path) -> None:
    """The maps send only their js_columns, and their js_data_mutator derives the tooltip's status label and
    (speed map) the speed as a percentage of the limit. On every segment of the sample, the mutator run in
    Chromium gives what the dataset's own expressions give in DuckDB (status_label, speed_pct_of_limit over
    segment_latest.speed_ratio): one definition may not drift from the other."""
    params = yaml.safe_load((BUNDLE / "charts" / f"{chart}.yaml").read_text())["params"]
    columns = params["js_columns"]
    derived = ["status_label"] + (["speed_pct_of_limit"] if "speed_pct_of_limit" in params["tooltip_template"] else [])
    with duckdb.connect(str(serving_db), read_only=True) as con:
        selected = ", ".join(dataset_column(name) for name in [*columns, *derived])
        cursor = con.execute(f"SELECT {selected} FROM segment_latest ORDER BY segment_key")
        names = [d[0] for d in cursor.description]
        rows = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
    sent = [{"extraProps": {name: row[name] for name in columns}} for row in rows]
    page = browser.new_page()
    try:
        mutated = page.evaluate(
            "([source, rows]) => (new Function('return ' + source)())(rows).map(row => row.extraProps)",
            [params["js_data_mutator"], sent],
        )
    finally:
        page.close()
    assert len(mutated) == len(rows) > 2000
    for name in derived:
        wrong = [(row, props[name]) for row, props in zip(rows, mutated, strict=True) if props[name] != row[name]]
        assert wrong == [], f"{chart}: {len(wrong)} segments where the mutator's {name} differs: {wrong[:3]}"
    assert {props["status_label"] for props in mutated} >= {"free flow", "heavy", "congested", "unknown"}
