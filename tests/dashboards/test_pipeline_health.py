"""The operator opens "Pipeline health" in a real browser: every chart has data; the viewer gets none of it.

The serving file is the session's, built by the real pipeline (land, merge, dbt build, publish): its health
tables hold the merge log of its snapshots, their freshness and the publish's build log. Through the chart
data API, every pipeline-health dataset gives the operator rows and refuses the viewer, and only the
operator's dashboard list holds the dashboard.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest
import requests
import yaml
from playwright.sync_api import Browser

from .conftest import ALL_CHARTS_SETTLED, CHART_ERRORS, REPO, SupersetInstance, chart_count, log_in
from .test_live_traffic import ARTIFACTS, screenshot_dashboard

pytestmark = [pytest.mark.dashboards, pytest.mark.timeout(900)]

BUNDLE = REPO / "superset" / "bundle"
PIPELINE_HEALTH = BUNDLE / "dashboards" / "pipeline_health.yaml"
SLUG = "pipeline-health"
EMPTY = "No results were returned for this query"


def chart_names(dashboard_yaml: Path) -> list[str]:
    position = yaml.safe_load(dashboard_yaml.read_text())["position"]
    charts = [node for node in position.values() if isinstance(node, dict) and node.get("type") == "CHART"]
    return [chart["meta"]["sliceName"] for chart in charts]


def health_datasets() -> dict[str, dict]:
    datasets = (yaml.safe_load(path.read_text()) for path in (BUNDLE / "datasets").glob("*.yaml"))
    return {dataset["table_name"]: dataset for dataset in datasets if dataset["schema"] == "health"}


def api_session(superset: SupersetInstance, username: str, password: str) -> requests.Session:
    session = requests.Session()
    login = session.post(
        f"{superset.url}/api/v1/security/login",
        json={"username": username, "password": password, "provider": "db"},
        timeout=30,
    )
    assert login.status_code == 200, login.text[:300]
    session.headers["Authorization"] = f"Bearer {login.json()['access_token']}"
    return session


def rows_of(session: requests.Session, superset: SupersetInstance, dataset_id: int, dataset: dict) -> requests.Response:
    """The dataset's rows (its first columns, uncached) through the chart data API."""
    query = {
        "datasource": {"id": dataset_id, "type": "table"},
        "queries": [{"columns": [c["column_name"] for c in dataset["columns"][:3]], "row_limit": 100}],
        "force": True,
        "result_format": "json",
        "result_type": "full",
    }
    return session.post(f"{superset.url}/api/v1/chart/data", json=query, timeout=120)


def dashboard_slugs(session: requests.Session, superset: SupersetInstance) -> set[str]:
    listing = session.get(f"{superset.url}/api/v1/dashboard/", params={"q": "(page_size:100)"}, timeout=30)
    assert listing.status_code == 200, listing.text[:300]
    return {dashboard["slug"] for dashboard in listing.json()["result"]}


def test_operator_sees_every_health_chart_with_data_and_the_viewer_is_refused(
    superset: SupersetInstance, browser: Browser, serving_db: Path
) -> None:
    with duckdb.connect(str(serving_db), read_only=True) as con:
        (snapshots,) = con.execute("SELECT count(*) FROM health.snapshots WHERE visible_at IS NOT NULL").fetchone()
        (builds,) = con.execute("SELECT count(*) FROM health.build_log").fetchone()
    assert snapshots > 24 and builds >= 1

    admin = api_session(superset, "admin", superset.admin_password)
    listing = admin.get(f"{superset.url}/api/v1/dataset/", params={"q": "(page_size:100)"}, timeout=30)
    ids = {d["table_name"]: d["id"] for d in listing.json()["result"]}
    operator = api_session(superset, "operator", superset.operator_password)
    viewer = api_session(superset, "viewer", superset.viewer_password)
    datasets = health_datasets()
    assert len(datasets) == 5  # pipeline_snapshots and its 7-day view, builds, quarantine and rejected rows per day
    for name, dataset in datasets.items():
        response = rows_of(operator, superset, ids[name], dataset)
        assert response.status_code == 200, f"{name}: {response.text[:300]}"
        assert response.json()["result"][0]["rowcount"] > 0, name
        refused = rows_of(viewer, superset, ids[name], dataset)
        assert refused.status_code == 403, f"{name}: the viewer got {refused.status_code}"
    assert SLUG in dashboard_slugs(operator, superset)
    assert SLUG in dashboard_slugs(admin, superset)
    viewer_slugs = dashboard_slugs(viewer, superset)
    assert SLUG not in viewer_slugs and {"live-traffic", "trends"} <= viewer_slugs

    page = log_in(browser, superset, "operator", superset.operator_password)
    console_errors: list[str] = []
    page.on("pageerror", lambda error: console_errors.append(str(error)))
    page.goto(superset.url + f"/superset/dashboard/{SLUG}/")
    expected = chart_count(PIPELINE_HEALTH)
    assert expected == 7
    page.wait_for_function(ALL_CHARTS_SETTLED, arg=expected, timeout=240_000, polling=1000)
    assert page.evaluate(CHART_ERRORS) == []
    assert page.locator("[data-test-chart-id]").count() == expected
    for name in chart_names(PIPELINE_HEALTH):
        chart = page.locator(f'[data-test-chart-name="{name}"]')
        assert chart.count() == 1, name
        chart.scroll_into_view_if_needed()
        assert EMPTY not in chart.inner_text(), f"{name}: no data"
        drawn = chart.locator('[data-test="chart-container"] :is(canvas, svg, table tbody tr)')
        assert drawn.count() > 0, f"{name}: nothing drawn"
    screenshot_dashboard(page, ARTIFACTS / "pipeline_health.png", expected)
    assert console_errors == []
    page.close()

    # The viewer's browser does not get the dashboard either.
    page = log_in(browser, superset, "viewer", superset.viewer_password)
    response = page.goto(superset.url + f"/superset/dashboard/{SLUG}/")
    assert response is not None
    page.wait_for_timeout(3000)
    assert page.locator("[data-test-chart-id]").count() == 0
    page.close()
