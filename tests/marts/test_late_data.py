"""Snapshots landed in any order reach every mart exactly once: incremental builds equal full refreshes.

Simulated Rennes traffic (the feed's simulator: 2,859 segments, congestion, incidents that close segments,
segments without probes) every 5 minutes from 19:00 UTC (21:00 in Rennes, so the off-peak night and the
free-flow speeds are in it). The snapshots land out of order, each step followed by an incremental build
of one warehouse, while a second warehouse is rebuilt with `--full-refresh` from the same lake; every
serving table of the two must be equal after every step:

1. the first hour, with two snapshots missing;
2. a jump ahead (21:30-21:45 UTC): a latest bucket far from the rest;
3. the two missing snapshots (older than the latest bucket, inside buckets already built) and more;
4. a newer snapshot in the latest bucket, then one landing late *inside* that bucket (older than the
   latest measurement held, newer than the bucket's start);
5. everything else in one merge, in reverse order;
6. rows lost from two old snapshots (deleted from the lake), then `trafficwatch backfill` of their hour,
   which merges them again: no new merge log entry, only rows with a new merged_at.

`trafficwatch lag` must count the late snapshots as unserved until the build, then nothing.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import boto3
import polars as pl
import pytest

from tests.conftest import land_raw
from tests.marts.fixtures import assert_same_marts, comparable, read_marts, serving_config
from trafficwatch import lake, operate, serving
from trafficwatch_dev.simulator import Simulator
from trafficwatch_dev.snapshots import DEFAULT_BASE, load_snapshot

pytestmark = pytest.mark.integration

ORIGIN = datetime(2024, 8, 26, 19, 0, tzinfo=UTC)  # a Monday, 21:00 in Rennes
INTERVAL = timedelta(minutes=5)
COUNT = 40  # 19:00 to 22:15 UTC


def at(index: int) -> datetime:
    return ORIGIN + index * INTERVAL


@pytest.fixture(scope="module")
def bodies() -> list[bytes]:
    simulator = Simulator(load_snapshot(DEFAULT_BASE), seed=11, origin=ORIGIN, interval_s=INTERVAL.total_seconds())
    return [json.dumps(simulator.records(index)).encode() for index in range(COUNT)]


def _lag(settings) -> dict:
    s3 = boto3.client("s3", endpoint_url=settings.s3_endpoint_url, region_name=settings.aws_region)
    return operate.lag(settings, s3, serving_db=serving_config(settings).serving_db)


@pytest.mark.timeout(1800)  # 7 incremental and 7 full builds of 2,859 segments
def test_snapshots_landed_out_of_order_give_the_marts_of_a_full_refresh(s3_settings, bodies, tmp_path) -> None:
    incremental = serving_config(s3_settings)
    full = serving.ServingConfig(
        home=tmp_path / "full",
        warehouse_db=tmp_path / "full" / "warehouse" / "traffic.duckdb",
        serving_db=tmp_path / "full" / "serving" / "traffic.duckdb",
        serving_days=serving.DEFAULT_SERVING_DAYS,
    )
    landed: set[int] = set()

    def step(indices: list[int]) -> dict[str, pl.DataFrame]:
        served_latest = max((at(i) for i in landed), default=None)
        for index in indices:
            land_raw(s3_settings, bodies[index])
        assert _lag(s3_settings)["pending_merge"] == len(indices)
        merged = lake.merge_pending(s3_settings)
        landed.update(indices)
        # Merged, not built: lag counts every one of them, late ones included.
        before = _lag(s3_settings)
        late = sum(1 for i in indices if served_latest is not None and at(i) <= served_latest)
        expected = {"unserved_snapshots": len(indices), "late_unserved_snapshots": late,
                    "unserved_rows": merged.observations, "pending_merge": 0}  # fmt: skip
        assert {name: before[name] for name in expected} == expected
        serving.build(s3_settings, incremental)
        after = _lag(s3_settings)
        assert (after["unserved_snapshots"], after["unserved_rows"], after["pending_merge"]) == (0, 0, 0), after
        serving.build(s3_settings, full, full_refresh=True)
        built = read_marts(incremental.serving_db)
        assert_same_marts(comparable(built), comparable(read_marts(full.serving_db)))
        return built

    # 1. The first hour, two snapshots missing.
    first = [i for i in range(12) if i not in (4, 9)]
    marts = step(first)
    assert set(marts["segment_traffic_15min"]["bucket_start"]) == {at(i) for i in (0, 3, 6, 9)}
    # 2. A jump ahead.
    marts = step([30, 31, 32, 33])
    assert marts["segment_latest"]["measured_at"].max() == at(33)
    # 3. The missing two (late, in buckets already built), and more.
    step([4, 9, *range(12, 21)])
    # 4. The latest bucket starts at at(33) = 21:45: a newer snapshot in it, then one late inside it.
    step([35])
    marts = step([34])
    observations = lake.scan_table(
        lake.ensure_tables(s3_settings)[lake.OBSERVATIONS], lake.storage_options(s3_settings)
    ).collect()
    speed_samples = observations.filter(
        pl.col("measured_at").is_in([at(33), at(34), at(35)])
        & pl.col("traffic_status").is_in(["freeFlow", "heavy", "congested"])
    )
    bucket = marts["segment_traffic_15min"].filter(pl.col("bucket_start") == at(33))
    assert bucket["sample_count"].sum() == speed_samples.height  # the late snapshot is in its bucket
    # 5. Everything else in one merge, newest first.
    step(sorted(set(range(COUNT)) - landed, reverse=True))
    # 6. Rows lost from two old snapshots (deleted from the lake), then `trafficwatch backfill` of the first
    # hour: it merges them again (with a new merged_at; the merge log already lists their snapshots).
    tables = lake.ensure_tables(s3_settings)
    lost = sorted(json.loads(bodies[0])[i]["predefinedlocationreference"] for i in range(0, 2859, 20))
    keys = ", ".join(f"'{key}'" for key in lost)
    for index in (1, 5):
        tables[lake.OBSERVATIONS].delete(
            f"measured_date = '{at(index):%Y-%m-%d}' AND measured_at = '{at(index):%Y-%m-%dT%H:%M:%SZ}' "
            f"AND segment_key IN ({keys})"
        )
    backfilled = lake.backfill(s3_settings, at(0), at(12))
    assert backfilled.merged_objects == 12
    before = _lag(s3_settings)
    assert (before["unserved_snapshots"], before["late_unserved_snapshots"], before["unserved_rows"]) == (
        2,
        2,
        2 * len(lost),
    ), before
    serving.build(s3_settings, incremental)
    assert _lag(s3_settings)["unserved_snapshots"] == 0
    serving.build(s3_settings, full, full_refresh=True)
    marts = read_marts(incremental.serving_db)
    assert_same_marts(comparable(marts), comparable(read_marts(full.serving_db)))
    assert marts["segment_latest"]["measured_at"].max() == at(COUNT - 1)
    # Every landed row is in the marts once: the speed and closure samples of segment_traffic_15min are
    # the lake's, counted here.
    observations = lake.scan_table(
        lake.ensure_tables(s3_settings)[lake.OBSERVATIONS], lake.storage_options(s3_settings)
    ).collect()
    counts = observations.select(
        pl.col("traffic_status").is_in(["freeFlow", "heavy", "congested"]).sum().alias("sample_count"),
        (pl.col("traffic_status") == "impossible").sum().alias("closed_sample_count"),
    ).row(0, named=True)
    assert marts["segment_traffic_15min"].select("sample_count", "closed_sample_count").sum().row(0, named=True) == (
        counts
    )
