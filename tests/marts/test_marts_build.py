"""`dbt build` and the publish on real data: the shared sample, then a simulated day of Rennes traffic.

Expectations come from the snapshots themselves (counted in Python here), never from the marts' SQL.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import polars as pl
import pytest

from tests.conftest import SAMPLE_RECORDS, land_raw
from tests.marts.fixtures import assert_same_marts, comparable, read_marts, serving_config
from trafficwatch import dbt_build, lake, serving
from trafficwatch_dev.simulator import Simulator
from trafficwatch_dev.snapshots import DEFAULT_BASE, load_snapshot

pytestmark = pytest.mark.integration

TRAFFICWATCH = str(Path(sys.executable).parent / "trafficwatch")
DAY = datetime(2024, 8, 27, tzinfo=UTC)  # a Tuesday, from 00:00 UTC (02:00 in Rennes)
DAY_INTERVAL = timedelta(minutes=10)


def test_the_sample_snapshot_gives_every_mart(sample_serving_db, sample_bytes) -> None:
    records = json.loads(sample_bytes)
    statuses = Counter(record["trafficstatus"] for record in records)
    roads = {record["denomination"] for record in records}
    marts = read_marts(sample_serving_db)

    latest = marts["segment_latest"]
    assert latest.height == SAMPLE_RECORDS
    assert latest["segment_key"].n_unique() == SAMPLE_RECORDS
    assert latest["path_json"].null_count() == 0
    by_key = {record["predefinedlocationreference"]: record for record in records}
    for key in ("10273_D", next(k for k, r in by_key.items() if len(r["geo_shape"]["geometry"]["coordinates"]) == 4)):
        row = latest.filter(pl.col("segment_key") == key).row(0, named=True)
        geometry = by_key[key]["geo_shape"]["geometry"]
        assert json.loads(row["geometry_geojson"]) == geometry
        path = json.loads(row["path_json"])
        points = [point for part in geometry["coordinates"] for point in part]
        assert len(path) == len(points)
        for drawn, point in zip(path, points, strict=True):
            # Rounded to 6 decimals (the path_json macro): within half a unit of the 6th, and no more digits.
            assert drawn == [round(coordinate, 6) for coordinate in drawn]
            assert drawn == pytest.approx(point[:2], rel=0, abs=5e-7 + 1e-12)

    (kpis,) = marts["network_kpis_latest"].iter_rows(named=True)
    measured = SAMPLE_RECORDS - statuses["unknown"]
    assert (kpis["segments_total"], kpis["segments_reporting"]) == (SAMPLE_RECORDS, measured)
    assert kpis["share_freeflow"] == pytest.approx(statuses["freeFlow"] / SAMPLE_RECORDS)
    assert kpis["share_heavy"] == pytest.approx(statuses["heavy"] / SAMPLE_RECORDS)
    assert kpis["share_congested"] == pytest.approx(statuses["congested"] / SAMPLE_RECORDS)
    assert kpis["share_unknown"] == pytest.approx(statuses["unknown"] / SAMPLE_RECORDS)
    assert kpis["measured_at"] == datetime(2024, 8, 26, 10, 43, tzinfo=UTC)

    # One snapshot: one bucket per measured segment, one per road, a profile for Monday 12:00 in Rennes.
    assert marts["segment_traffic_15min"].height == measured
    assert set(marts["road_traffic_15min"]["road_name"]) == roads
    assert set(marts["road_hour_of_week_profile"].select("day_of_week", "hour_of_day").rows()) == {(1, 12)}
    # Every congested or closed segment is in an episode since its first (and only) sample, ongoing.
    events = marts["congestion_events"]
    assert events.height == statuses["congested"] + statuses["impossible"]
    assert events["is_ongoing"].all()


def simulated_day(count: int) -> list[bytes]:
    """`count` snapshots of the feed's simulator, every DAY_INTERVAL from DAY, in the exports shape."""
    simulator = Simulator(load_snapshot(DEFAULT_BASE), seed=7, origin=DAY, interval_s=DAY_INTERVAL.total_seconds())
    return [json.dumps(simulator.records(index)).encode() for index in range(count)]


@pytest.mark.timeout(1200)  # a day of snapshots to simulate, land and merge, then three builds
def test_a_simulated_day_builds_and_an_incremental_build_equals_a_full_refresh(s3_settings) -> None:
    snapshots = int(timedelta(days=1) / DAY_INTERVAL)
    bodies = simulated_day(snapshots + 1)
    for body in bodies[:snapshots]:
        land_raw(s3_settings, body)
    lake.merge_pending(s3_settings)
    config = serving_config(s3_settings, days=1)  # a one-day window, so that the next publish trims a bucket
    first = serving.build(s3_settings, config)
    assert first.full_publish
    last = DAY + (snapshots - 1) * DAY_INTERVAL

    marts = read_marts(config.serving_db)
    assert marts["segment_latest"].height == SAMPLE_RECORDS
    assert set(marts["segment_latest"]["measured_at"]) == {last}
    (kpis,) = marts["network_kpis_latest"].iter_rows(named=True)
    shares = kpis["share_freeflow"] + kpis["share_heavy"] + kpis["share_congested"] + kpis["share_unknown"]
    assert shares == pytest.approx(1.0)
    # A UTC day is 24 local hours (02:00 Tuesday to 01:59 Wednesday in Rennes).
    hours = set(marts["road_hour_of_week_profile"].select("day_of_week", "hour_of_day").rows())
    assert hours == {(2, h) for h in range(2, 24)} | {(3, 0), (3, 1)}
    buckets = marts["segment_traffic_15min"]["bucket_start"]
    assert (buckets.min(), buckets.n_unique()) == (DAY, 96)

    # Speed samples per bucket, counted from the lake's rows, match the mart's sample counts.
    observations = lake.scan_table(
        lake.ensure_tables(s3_settings)[lake.OBSERVATIONS], lake.storage_options(s3_settings)
    ).collect()
    from_lake = (
        observations.filter(pl.col("traffic_status").is_in(["freeFlow", "heavy", "congested"]))
        .group_by(pl.col("measured_at").dt.truncate("15m").alias("bucket_start"))
        .len()
    )
    from_mart = marts["segment_traffic_15min"].group_by("bucket_start").agg(pl.col("sample_count").sum())
    joined = from_lake.join(from_mart, on="bucket_start", how="full")
    assert joined.height == 96
    assert (joined["len"] == joined["sample_count"]).all()
    assert marts["congestion_events"].height > 0

    # One more snapshot: the publish patches the previous file, and it equals a full rebuild.
    land_raw(s3_settings, bodies[snapshots])
    lake.merge_pending(s3_settings)
    incremental = serving.build(s3_settings, config)
    assert not incremental.full_publish
    # The views were made by the first build for this very project: not again, their data tests still run.
    views = warehouse_views(config.warehouse_db)
    assert len(views) >= 5 and {"congestion_events", "road_traffic_15min", "segment_traffic_15min"} <= views
    assert incremental.nodes["models"] == first.nodes["models"] - len(views)
    assert incremental.nodes["data tests"] == first.nodes["data tests"]
    assert warehouse_views(config.warehouse_db) == views
    patched = read_marts(config.serving_db)
    # The window keeps buckets starting after (latest - 1 day): the new one came, the first one went.
    buckets = patched["segment_traffic_15min"]["bucket_start"]
    assert (buckets.min(), buckets.max()) == (DAY + timedelta(minutes=15), DAY + timedelta(days=1))
    assert buckets.n_unique() == 96
    rebuilt = serving.build(s3_settings, config, full_refresh=True)
    assert_same_marts(comparable(patched), comparable(read_marts(config.serving_db)))
    assert rebuilt.nodes["models"] == first.nodes["models"]  # a full refresh makes the views again

    # Another project (here: its record of the views says so): the next build makes the views again.
    with duckdb.connect(str(config.warehouse_db)) as con:
        con.execute(f"UPDATE main.{dbt_build.VIEWS_STATE} SET fingerprint = 'another project'")
    assert serving.build(s3_settings, config).nodes["models"] == first.nodes["models"]


def warehouse_views(warehouse_db: Path) -> set[str]:
    with duckdb.connect(str(warehouse_db), read_only=True) as con:
        rows = con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal AND schema_name = 'main'")
        return {name for (name,) in rows.fetchall()}


def test_cli_build_then_status_names_the_serving_file(s3_settings, sample_bytes, monkeypatch, tmp_path) -> None:
    serving_db = tmp_path / "dashboards" / "traffic.duckdb"
    monkeypatch.setenv("TRAFFICWATCH_SERVING_DB", str(serving_db))
    land_raw(s3_settings, sample_bytes)
    lake.merge_pending(s3_settings)
    before = json.loads(subprocess.run([TRAFFICWATCH, "status"], capture_output=True, text=True, check=True).stdout)
    assert (before["serving_db"], before["serving_built_at"]) == (str(serving_db), None)

    built = subprocess.run([TRAFFICWATCH, "build"], capture_output=True, text=True, env=os.environ.copy())
    assert built.returncode == 0, built.stderr[-3000:]
    assert f"to {serving_db}" in built.stdout

    after = json.loads(subprocess.run([TRAFFICWATCH, "status"], capture_output=True, text=True, check=True).stdout)
    assert after["serving_db"] == str(serving_db)
    with duckdb.connect(str(serving_db), read_only=True) as con:
        (built_at,) = con.execute("SELECT built_at FROM meta.publish").fetchone()
    assert datetime.fromisoformat(after["serving_built_at"]) == built_at
    assert after["tables"]["traffic_observations"]["rows"] == SAMPLE_RECORDS
