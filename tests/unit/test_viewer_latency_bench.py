"""The pure parts of the viewer latency bench (bench/viewer_latency.py) and its rows in `make bench`'s table:
percentiles, who opens which dashboard, the replayed request bodies, the headline figures."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.dashboards.conftest import chart_count, charts_on_opening

REPO = Path(__file__).resolve().parents[2]


def load(script: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"{script}_under_test", REPO / "bench" / f"{script}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def viewer() -> ModuleType:
    return load("viewer_latency")


@pytest.fixture(scope="module")
def report() -> ModuleType:
    return load("report")


def test_latency_gives_p50_and_p95_in_ms_by_interpolation(viewer: ModuleType) -> None:
    figures = viewer.latency([0.7, 0.1, 0.3, 0.2, 0.5, 0.4, 0.6])
    assert figures["p50_ms"] == pytest.approx(400.0)
    assert figures["p95_ms"] == pytest.approx(670.0)  # 95 % of the way over 6 gaps: 600 + 0.7 x 100
    assert figures["runs_ms"] == pytest.approx([700.0, 100.0, 300.0, 200.0, 500.0, 400.0, 600.0])
    one = viewer.latency([0.05])
    assert one["p50_ms"] == one["p95_ms"] == pytest.approx(50.0)


def test_operator_only_for_a_dashboard_reading_the_health_schema(viewer: ModuleType) -> None:
    assert viewer.user_for(["main", "main"]) == "viewer"
    assert viewer.user_for(["main", "health"]) == "operator"
    assert viewer.user_for([]) == "viewer"


def test_the_bundle_dashboards_with_their_users_and_charts(viewer: ModuleType) -> None:
    dashboards = {d.slug: d for d in viewer.bundle_dashboards()}
    assert {slug: d.user for slug, d in dashboards.items()} == {
        "live-traffic": "viewer",
        "trends": "viewer",
        "pipeline-health": "operator",
    }
    folder = REPO / "superset" / "bundle" / "dashboards"
    for name, slug in (("live_traffic", "live-traffic"), ("trends", "trends"), ("pipeline_health", "pipeline-health")):
        assert dashboards[slug].charts == chart_count(folder / f"{name}.yaml") > 0
        assert dashboards[slug].on_opening == charts_on_opening(folder / f"{name}.yaml") > 0
    assert dashboards["pipeline-health"].title == "Pipeline health"
    # Live traffic opens on its status map; the speed map and the Roads tab's three charts are drawn once their
    # tab is opened.
    live = dashboards["live-traffic"]
    assert live.tabs == (("Speed / limit", 1), ("Roads", 3))
    assert live.on_opening == live.charts - 4
    # Trends opens on its hour-by-hour heatmaps; its two other tabs hold the seven other charts.
    trends = dashboards["trends"]
    assert trends.tabs == (("Day by day", 4), ("Episodes", 3))
    assert trends.on_opening == trends.charts - 7 == 2


def test_a_captured_body_is_keyed_by_its_slice_and_native_filters_are_not_charts(viewer: ModuleType) -> None:
    assert viewer.slice_id({"form_data": {"slice_id": 12, "viz_type": "table"}, "queries": []}) == 12
    assert viewer.slice_id({"form_data": {"slice_id": "7"}}) == 7
    assert viewer.slice_id({"form_data": {"viz_type": "filter_select"}, "queries": []}) is None
    assert viewer.slice_id({"queries": []}) is None


def test_replayed_bodies_force_or_not_and_leave_the_capture_alone(viewer: ModuleType) -> None:
    captured: dict[str, Any] = {
        "datasource": {"id": 3, "type": "table"},
        "force": False,
        "form_data": {"slice_id": 12},
        "queries": [{"columns": ["road_name"], "row_limit": 100}],
        "result_format": "json",
        "result_type": "full",
    }
    forced = viewer.replay_body(captured, force=True)
    cached = viewer.replay_body(captured, force=False)
    assert forced["force"] is True and cached["force"] is False
    assert {k: v for k, v in forced.items() if k != "force"} == {k: v for k, v in captured.items() if k != "force"}
    forced["queries"][0]["row_limit"] = 1
    assert captured["force"] is False and captured["queries"][0]["row_limit"] == 100


def dashboards_figures() -> dict[str, dict[str, Any]]:
    def chart(name: str, forced: float, cached: float) -> dict[str, Any]:
        return {"name": name, "forced": {"p95_ms": forced}, "cached": {"p95_ms": cached}}

    return {
        "live-traffic": {
            "title": "Live traffic",
            "charts": {"1": chart("Map", 180.0, 9.0), "2": chart("Segments", 40.0, 12.0)},
            "render": {
                "empty_cache": {"median_s": 4.1, "tabs": {"Speed / limit": {"median_s": 4.6}}},
                "full_cache": {"median_s": 2.0, "tabs": {"Speed / limit": {"median_s": 1.0}}},
            },
        },
        "trends": {
            "title": "Trends",
            "charts": {"3": chart("Daily speed", 250.0, 8.0)},
            "render": {"empty_cache": {"median_s": 3.2}, "full_cache": {"median_s": 2.5}},
        },
    }


def test_the_headline_is_the_worst_chart_and_the_slowest_dashboard(viewer: ModuleType) -> None:
    head = viewer.headline(dashboards_figures())
    assert head["worst_forced_p95_ms"] == 250.0 and head["forced_p95_ms_where"] == "Trends: Daily speed"
    assert head["worst_cached_p95_ms"] == 12.0 and head["cached_p95_ms_where"] == "Live traffic: Segments"
    assert head["worst_render_empty_cache_s"] == 4.6  # a tab opened counts beside the dashboards
    assert head["render_empty_cache_s_where"] == "Live traffic, tab Speed / limit"
    assert head["worst_render_full_cache_s"] == 2.5 and head["render_full_cache_s_where"] == "Trends"
    assert viewer.headline({})["worst_forced_p95_ms"] is None


def test_render_figures_give_the_median_of_the_opening_and_of_each_tab(viewer: ModuleType) -> None:
    runs = [(5.0, {"Speed / limit": 2.0}), (3.0, {"Speed / limit": 4.0}), (4.0, {"Speed / limit": 3.5})]
    figures = viewer.render_figures(runs)
    assert figures["median_s"] == 4.0 and figures["runs_s"] == [5.0, 3.0, 4.0]
    assert figures["tabs"] == {"Speed / limit": {"median_s": 3.5, "runs_s": [2.0, 4.0, 3.5]}}
    assert viewer.render_figures([(2.5, {})]) == {"median_s": 2.5, "runs_s": [2.5], "tabs": {}}


def test_the_report_has_the_viewer_stage_and_its_rows(viewer: ModuleType, report: ModuleType) -> None:
    assert ("viewer", "viewer_latency.py") in report.STAGES
    stages: dict[str, dict[str, Any]] = {name: {"exit_code": 0} for name, _ in report.STAGES}
    stages["viewer"]["headline"] = viewer.headline(dashboards_figures())
    found = {what: (figure, unit, target) for what, figure, unit, target in report.rows(stages)}
    assert found["viewer: chart data, forced, worst chart's p95"] == (250.0, "ms", "<= 200 ms")
    assert found["viewer: chart data, cached, worst chart's p95"] == (12.0, "ms", "")
    assert found["viewer: dashboard render, cache empty, slowest"] == (4.6, "s", "<= 5 s")
    assert found["viewer: dashboard render, cache full, slowest"] == (2.5, "s", "<= 5 s")
    # A viewer stage that failed before any figure: its rows say n/a, the table is still printed.
    failed = {name: {"exit_code": 0} for name, _ in report.STAGES} | {"viewer": {"exit_code": 1}}
    assert all(figure is None for what, figure, _, _ in report.rows(failed) if what.startswith("viewer"))
