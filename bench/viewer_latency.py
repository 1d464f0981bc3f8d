"""What a viewer waits for: each chart's data and each dashboard's render, over 30 days of history.

What is measured (figures only: nothing here asserts a time)
-------------------------------------------------------------
Superset is bootstrapped in a temporary home and started on a free loopback port (`running_superset`, the
dashboards tests' own), reading the serving DuckDB of the marts bench's cached 30-day marts (`--serving-db
FILE` reads another one). Each dashboard of the bundle is opened by the user it is for: `viewer`, or
`operator` for a dashboard whose charts read the serving file's `health` schema (Pipeline health: viewers get
none of its datasets, see superset/bootstrap.py). For each dashboard:

1. Warm-up: headless Chromium (Debian's, as in the dashboards tests) logs in through the login form and
   renders the dashboard once; every `POST /api/v1/chart/data` body the charts send is kept, by the chart's
   slice id in its form_data. The bundle's charts hold no saved query context, so these bodies are the only
   exact queries of the charts (native filters' defaults included).
2. Chart data: each body replayed with `requests`, in a session holding the browser's login cookie, N times
   with `"force": true` (past Superset's data cache: the query runs on DuckDB) and then N times with
   `"force": false` (answered from the cache the forced runs filled; how many were hits is counted). Each
   time is the whole round trip on loopback, body read. p50 and p95 per chart, in ms.
3. Render: the dashboard opened again, timed from the navigation's start (the page's `performance.now()`)
   to the first moment, polled every 100 ms, when every chart is settled (`ALL_CHARTS_SETTLED`: every chart
   holder present, no loading spinner, something drawn, the maps' canvases sized): once with Superset's
   data cache emptied (its files removed), then at once again with the cache that render filled; 3 times
   each, the median. The browser's own HTTP cache is warm (the warm-up loaded the scripts): a returning
   viewer's case. A dashboard with tabs opens on its first: Superset draws a tab's charts once the tab is
   opened, so each other tab is then opened in turn (a click on its title) and timed from the click until its
   charts are settled too; the report's worst render counts these beside the dashboards'.

Targets, printed beside the figures: chart data forced p95 <= 200 ms per chart, dashboard render <= 5 s.

Run: `make bench` (the 4th stage, after the marts bench has cached the 30-day marts), or
`.venv/bin/python bench/viewer_latency.py [--serving-db FILE] [--runs 7] [--render-runs 3] [--json FILE]`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import duckdb
import requests
import yaml

# Run as a script (sys.path[0] is bench/): the repository root, for the dashboards tests' helpers.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.dashboards.conftest import (
    ALL_CHARTS_SETTLED,
    CHART_ERRORS,
    CHROMIUM,
    CHROMIUM_ARGS,
    REPO,
    SupersetInstance,
    chart_count,
    later_tabs,
    log_in,
    open_tab,
    running_superset,
)
from tests.support.freshness import percentile

BUNDLE = REPO / "superset" / "bundle"
OPERATOR_SCHEMA = "health"  # superset/bootstrap.py: datasets over this schema are the operators' only
CHART_DATA_PATH = "/api/v1/chart/data"
RUNS = 7
RENDER_RUNS = 3
RENDER_TIMEOUT_MS = 300_000
TARGET_FORCED_P95_MS = 200.0
TARGET_RENDER_S = 5.0
# The time from the navigation's start at which every chart is settled, or false while one is not.
SETTLED_AT = f"(expected) => ({ALL_CHARTS_SETTLED})(expected) ? performance.now() : false"
CHART_NAMES = """() => Object.fromEntries(Array.from(document.querySelectorAll('[data-test-chart-id]'),
  chart => [chart.getAttribute('data-test-chart-id'),
            [chart.getAttribute('data-test-chart-name'), chart.getAttribute('data-test-viz-type')]]))"""


# --------------------------------------------------------------------------- pure helpers


@dataclass(frozen=True)
class Dashboard:
    slug: str
    title: str
    charts: int  # chart holders in its layout, all tabs
    user: str  # who opens it: viewer, or operator
    tabs: tuple[tuple[str, int], ...] = ()  # the tabs it does not open on, in layout order: title, charts

    @property
    def on_opening(self) -> int:
        """The charts drawn when it opens: all but those of its other tabs."""
        return self.charts - sum(charts for _, charts in self.tabs)


def user_for(dataset_schemas: Iterable[str]) -> str:
    """`operator` when a dashboard reads a dataset of the operators' schema (viewers get none), else `viewer`."""
    return "operator" if OPERATOR_SCHEMA in set(dataset_schemas) else "viewer"


def bundle_dashboards(bundle: Path = BUNDLE) -> list[Dashboard]:
    """The bundle's dashboards, each with its chart count and its user (from its charts' datasets' schemas)."""
    schemas = {str(d["uuid"]): d["schema"] for d in _yamls(bundle / "datasets")}
    chart_datasets = {str(c["uuid"]): str(c["dataset_uuid"]) for c in _yamls(bundle / "charts")}
    dashboards = []
    for path in sorted((bundle / "dashboards").glob("*.yaml")):
        dashboard = yaml.safe_load(path.read_text())
        nodes = dashboard["position"].values()
        charts = [n["meta"]["uuid"] for n in nodes if isinstance(n, dict) and n.get("type") == "CHART"]
        user = user_for(schemas[chart_datasets[str(uuid)]] for uuid in charts)
        title = dashboard["dashboard_title"]
        dashboards.append(Dashboard(dashboard["slug"], title, chart_count(path), user, tuple(later_tabs(path))))
    return dashboards


def _yamls(folder: Path) -> list[dict[str, Any]]:
    return [yaml.safe_load(path.read_text()) for path in sorted(folder.glob("*.yaml"))]


def slice_id(body: dict[str, Any]) -> int | None:
    """The chart a chart data request is for (None: a native filter's options, not a chart)."""
    form_data = body.get("form_data")
    value = form_data.get("slice_id") if isinstance(form_data, dict) else None
    return int(value) if value is not None else None


def replay_body(captured: dict[str, Any], force: bool) -> dict[str, Any]:
    """The captured request body, asked past Superset's data cache (`force`) or through it."""
    body = copy.deepcopy(captured)
    body["force"] = force
    return body


def latency(seconds: list[float]) -> dict[str, Any]:
    """p50 and p95 (linear interpolation) in ms, and each run."""
    ms = [s * 1000 for s in seconds]
    return {
        "p50_ms": round(percentile(ms, 50), 1),
        "p95_ms": round(percentile(ms, 95), 1),
        "runs_ms": [round(v, 1) for v in ms],
    }


def worst(figures: list[tuple[float, str]]) -> tuple[float | None, str | None]:
    """The largest of (figure, whose) pairs; (None, None) when there are none."""
    return max(figures) if figures else (None, None)


def _chart_figures(dashboards: dict[str, dict[str, Any]], series: str) -> list[tuple[float, str]]:
    return [
        (chart[series]["p95_ms"], f"{dashboard['title']}: {chart['name']}")
        for dashboard in dashboards.values()
        for chart in dashboard["charts"].values()
        if chart.get(series)
    ]


def _render_figures(dashboards: dict[str, dict[str, Any]], cache: str) -> list[tuple[float, str]]:
    figures = []
    for dashboard in dashboards.values():
        if not (render := dashboard["render"].get(cache)):
            continue
        figures.append((render["median_s"], dashboard["title"]))
        for tab, opened in render.get("tabs", {}).items():
            figures.append((opened["median_s"], f"{dashboard['title']}, tab {tab}"))
    return figures


def headline(dashboards: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The worst figures over every chart and dashboard: what the report's table shows."""
    figures: dict[str, Any] = {}
    for key, candidates in (
        ("forced_p95_ms", _chart_figures(dashboards, "forced")),
        ("cached_p95_ms", _chart_figures(dashboards, "cached")),
        ("render_empty_cache_s", _render_figures(dashboards, "empty_cache")),
        ("render_full_cache_s", _render_figures(dashboards, "full_cache")),
    ):
        figures[f"worst_{key}"], figures[f"{key}_where"] = worst(candidates)
    return figures


# --------------------------------------------------------------------------- the serving file


def marts_bench() -> ModuleType:
    """bench/marts_build.py as a module: its cached 30-day marts are the data read here. Imported by its package
    name, so that the child process it builds the marts in (when they are missing) can import it too."""
    return importlib.import_module("bench.marts_build")


def describe_serving(path: Path) -> dict[str, Any]:
    """What the dashboards read: the file's size and the Rennes days its daily marts hold."""
    with duckdb.connect(str(path), read_only=True) as con:
        first, last, days = con.execute(
            "SELECT min(local_date), max(local_date), count(DISTINCT local_date) FROM main.road_reliability_daily"
        ).fetchone()
        (observed,) = con.execute("SELECT count(*) FROM main.segment_traffic_15min").fetchone()
    return {
        "path": str(path),
        "size_mb": round(path.stat().st_size / 2**20, 1),
        "days": days,
        "first_day": str(first),
        "last_day": str(last),
        "segment_15min_rows": observed,
    }


# --------------------------------------------------------------------------- measuring


def clear_data_cache(superset: SupersetInstance) -> int:
    """Remove every entry of Superset's data cache (a FileSystemCache: one file per entry); how many."""
    removed = 0
    for entry in (superset.home / "superset" / "cache" / "data").glob("*"):
        with contextlib.suppress(FileNotFoundError):
            entry.unlink()
            removed += 1
    return removed


def cache_entries(superset: SupersetInstance) -> dict[str, int]:
    folder = superset.home / "superset" / "cache" / "data"
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*") if not p.name.startswith("__")}


def _settled_at_ms(page: Any, dashboard: Dashboard, expected: int) -> float:
    settled = page.wait_for_function(SETTLED_AT, arg=expected, timeout=RENDER_TIMEOUT_MS, polling=100)
    errors = page.evaluate(CHART_ERRORS)
    if errors:
        raise RuntimeError(f"{dashboard.title}: charts in error: {errors}")
    return float(settled.json_value())


def render_once(page: Any, superset: SupersetInstance, dashboard: Dashboard) -> tuple[float, dict[str, float]]:
    """Open the dashboard: seconds from the navigation's start until every chart it opens with is settled;
    then each of its other tabs in turn: seconds from the click until that tab's charts are settled too."""
    page.goto(f"{superset.url}/superset/dashboard/{dashboard.slug}/", wait_until="commit")
    seconds = _settled_at_ms(page, dashboard, dashboard.on_opening) / 1000
    tabs, expected = {}, dashboard.on_opening
    for title, charts in dashboard.tabs:
        expected += charts
        clicked_at = open_tab(page, title)
        tabs[title] = (_settled_at_ms(page, dashboard, expected) - clicked_at) / 1000
    return seconds, tabs


def capture_chart_requests(page: Any, superset: SupersetInstance, dashboard: Dashboard) -> dict[int, dict[str, Any]]:
    """Render the dashboard once, each of its tabs opened, and keep the chart data request body of each chart
    (its last, by slice id)."""
    bodies: dict[int, dict[str, Any]] = {}

    def keep(request: Any) -> None:
        if request.method == "POST" and request.url.split("?")[0].endswith(CHART_DATA_PATH) and request.post_data:
            body = json.loads(request.post_data)
            if (chart := slice_id(body)) is not None:
                bodies[chart] = body

    page.on("request", keep)
    try:
        render_once(page, superset, dashboard)
    finally:
        page.remove_listener("request", keep)
    return bodies


def api_session(page: Any, superset: SupersetInstance) -> requests.Session:
    """A `requests` session logged in as the page's user: the browser's cookies, and the CSRF token of the
    page it shows (viewers may not ask the API for one)."""
    session = requests.Session()
    for cookie in page.context.cookies():
        session.cookies.set(cookie["name"], cookie["value"])
    session.headers["Referer"] = superset.url
    if token := page.evaluate("() => document.getElementById('csrf_token')?.value"):
        session.headers["X-CSRFToken"] = token
    return session


def timed_chart_data(session: requests.Session, superset: SupersetInstance, body: dict[str, Any]) -> tuple[float, bool]:
    """One chart data request: its seconds (round trip, body read) and whether every query came from the cache."""
    started = time.perf_counter()
    response = session.post(f"{superset.url}{CHART_DATA_PATH}", json=body, timeout=300)
    seconds = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"chart data answered {response.status_code}: {response.text[:300]}")
    results = response.json()["result"]
    return seconds, all(result.get("is_cached") for result in results)


def measure_chart(
    session: requests.Session, superset: SupersetInstance, body: dict[str, Any], runs: int
) -> dict[str, Any]:
    forced = [timed_chart_data(session, superset, replay_body(body, force=True))[0] for _ in range(runs)]
    cached = [timed_chart_data(session, superset, replay_body(body, force=False)) for _ in range(runs)]
    return {
        "forced": latency(forced),
        "cached": {**latency([seconds for seconds, _ in cached]), "hits": sum(hit for _, hit in cached)},
    }


def measure_dashboard(
    browser: Any, superset: SupersetInstance, dashboard: Dashboard, runs: int, render_runs: int
) -> dict[str, Any]:
    password = superset.operator_password if dashboard.user == "operator" else superset.viewer_password
    page = log_in(browser, superset, dashboard.user, password)
    try:
        clear_data_cache(superset)
        bodies = capture_chart_requests(page, superset, dashboard)
        names = page.evaluate(CHART_NAMES)
        session = api_session(page, superset)
        page.goto("about:blank")  # nothing drawing in the browser while the API is timed
        captured = f"{len(bodies)} of {dashboard.charts} charts captured"
        print(f"{dashboard.title} (as {dashboard.user}): {captured}", flush=True)
        charts: dict[str, dict[str, Any]] = {}
        for chart, body in sorted(bodies.items()):
            name, viz = names.get(str(chart), [f"chart {chart}", None])
            charts[str(chart)] = {"name": name, "viz_type": viz, **measure_chart(session, superset, body, runs)}
            forced, cached = charts[str(chart)]["forced"], charts[str(chart)]["cached"]
            print(
                f"  {name[:58]:<58} forced p50 {forced['p50_ms']:7.1f} p95 {forced['p95_ms']:7.1f} ms; "
                f"cached p50 {cached['p50_ms']:6.1f} p95 {cached['p95_ms']:6.1f} ms ({cached['hits']}/{runs} hits)",
                flush=True,
            )
        empty: list[tuple[float, dict[str, float]]] = []
        full: list[tuple[float, dict[str, float]]] = []
        refilled = []
        for _ in range(render_runs):
            clear_data_cache(superset)
            empty.append(render_once(page, superset, dashboard))
            before = cache_entries(superset)
            full.append(render_once(page, superset, dashboard))
            refilled.append(sum(1 for n, t in cache_entries(superset).items() if before.get(n) != t))
        render = {"empty_cache": render_figures(empty), "full_cache": render_figures(full)}
        render["full_cache"]["cache_entries_written"] = refilled  # 0: every query of the render came from the cache
        for cache in ("empty", "full"):
            figures = render[f"{cache}_cache"]
            line = f"  render, cache {cache}: median {figures['median_s']:.2f} s (runs {_runs(figures['runs_s'])})"
            for tab, opened in figures["tabs"].items():
                line += f"; tab {tab} opened: median {opened['median_s']:.2f} s (runs {_runs(opened['runs_s'])})"
            print(line, flush=True)
    finally:
        page.context.close()
    return {
        "title": dashboard.title,
        "user": dashboard.user,
        "charts_in_layout": dashboard.charts,
        "charts": charts,
        "render": render,
    }


def render_figures(runs: list[tuple[float, dict[str, float]]]) -> dict[str, Any]:
    """The median and runs of the dashboard's opening, and of each of its other tabs'."""

    def figures(seconds: list[float]) -> dict[str, Any]:
        return {"median_s": round(statistics.median(seconds), 2), "runs_s": [round(s, 2) for s in seconds]}

    tabs = {title: figures([run[1][title] for run in runs]) for title in runs[0][1]} if runs else {}
    return {**figures([run[0] for run in runs]), "tabs": tabs}


def _runs(values: list[float]) -> str:
    return " ".join(f"{v:.2f}" for v in values)


def report(figures: dict[str, Any]) -> None:
    head = figures["headline"]
    forced, render = head["worst_forced_p95_ms"], head["worst_render_empty_cache_s"]
    print(f"\n=== viewer latency benchmark ({figures['serving']['days']} days in {figures['serving']['path']}) ===")
    print(f"load average now (1/5/15 min): {' / '.join(f'{v:.1f}' for v in os.getloadavg())} on {os.cpu_count()} CPUs")
    print(
        f"chart data forced, worst p95: {forced} ms ({head['forced_p95_ms_where']}) "
        f"[target <= {TARGET_FORCED_P95_MS:.0f} ms: {_verdict(forced, TARGET_FORCED_P95_MS)}]"
    )
    print(f"chart data cached, worst p95: {head['worst_cached_p95_ms']} ms ({head['cached_p95_ms_where']})")
    print(
        f"dashboard render, cache empty, worst median: {render} s ({head['render_empty_cache_s_where']}) "
        f"[target <= {TARGET_RENDER_S:.0f} s: {_verdict(render, TARGET_RENDER_S)}]"
    )
    full = head["worst_render_full_cache_s"]
    print(
        f"dashboard render, cache full, worst median: {full} s ({head['render_full_cache_s_where']}) "
        f"[target <= {TARGET_RENDER_S:.0f} s: {_verdict(full, TARGET_RENDER_S)}]"
    )


def _verdict(value: float | None, target: float) -> str:
    return "n/a" if value is None else "met" if value <= target else "MISSED"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--serving-db", type=Path, help="this serving DuckDB instead of the cached 30-day marts'")
    parser.add_argument("--runs", type=int, default=RUNS, help=f"chart data requests per chart and mode ({RUNS})")
    parser.add_argument(
        "--render-runs", type=int, default=RENDER_RUNS, help=f"renders per dashboard and cache state ({RENDER_RUNS})"
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()
    started = time.perf_counter()
    serving_db = (args.serving_db or marts_bench().cached_serving_db()).resolve()
    figures: dict[str, Any] = {"serving": describe_serving(serving_db), "runs": args.runs}
    figures["render_runs"] = args.render_runs
    print(f"serving file: {figures['serving']}", flush=True)
    from playwright.sync_api import sync_playwright

    dashboards: dict[str, dict[str, Any]] = {}
    with (
        tempfile.TemporaryDirectory(prefix="tw-viewer-bench-") as home,
        running_superset(Path(home), serving_db) as superset,
        sync_playwright() as playwright,
    ):
        print(f"Superset: {superset.url} (home {home})", flush=True)
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            for dashboard in bundle_dashboards():
                dashboards[dashboard.slug] = measure_dashboard(
                    browser, superset, dashboard, args.runs, args.render_runs
                )
        finally:
            browser.close()
    figures["dashboards"] = dashboards
    figures["headline"] = headline(dashboards)
    figures["targets"] = {"forced_p95_ms": TARGET_FORCED_P95_MS, "render_s": TARGET_RENDER_S}
    report(figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    print(f"\ntotal wall time: {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
