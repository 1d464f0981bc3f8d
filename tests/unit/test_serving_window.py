"""How much of each mart the serving file keeps: the serving window, or a mart's own shorter one."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from trafficwatch import serving

NEWEST = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def mart(name: str) -> serving.Mart:
    (found,) = [m for m in serving.MARTS if m.name == name]
    return found


def test_the_hourly_and_daily_marts_keep_the_whole_serving_window() -> None:
    for name in ("road_traffic_hourly", "road_reliability_daily", "network_congestion_hourly", "congestion_events"):
        assert serving.mart_cutoff(mart(name), NEWEST, 30) == NEWEST - timedelta(days=30), name


def test_the_15_minute_marts_keep_their_last_week_only() -> None:
    assert serving.DETAIL_DAYS == 7
    for name in ("segment_traffic_15min", "road_traffic_15min"):
        assert serving.mart_cutoff(mart(name), NEWEST, 30) == NEWEST - timedelta(days=7), name
        # A serving window shorter than the mart's own wins.
        assert serving.mart_cutoff(mart(name), NEWEST, 2) == NEWEST - timedelta(days=2), name
