"""How much of each mart the serving file keeps: the serving window, or a mart's own shorter one."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from trafficwatch import serving

NEWEST = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def mart(name: str) -> serving.Mart:
    (found,) = [m for m in serving.MARTS if m.name == name]
    return found


def test_the_road_marts_keep_the_whole_serving_window() -> None:
    for name in ("road_traffic_15min", "road_traffic_hourly", "network_congestion_hourly", "congestion_events"):
        assert serving.mart_cutoff(mart(name), NEWEST, 30) == NEWEST - timedelta(days=30), name


def test_the_per_segment_buckets_keep_their_last_week_only() -> None:
    segments = mart("segment_traffic_15min")
    assert serving.mart_cutoff(segments, NEWEST, 30) == NEWEST - timedelta(days=serving.SEGMENT_DETAIL_DAYS)
    assert serving.SEGMENT_DETAIL_DAYS == 7
    # A serving window shorter than the mart's own wins.
    assert serving.mart_cutoff(segments, NEWEST, 2) == NEWEST - timedelta(days=2)
