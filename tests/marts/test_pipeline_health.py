"""The pipeline-health tables of the serving file (`trafficwatch.health`), written by every publish.

Snapshots are hand-made (three segments); a row with an impossible speed is rejected, an object under
raw/ that is not gzip is quarantined by the merge, a refused answer is quarantined as the ingest does.
Expected values come from S3 and the lake themselves (listing times, the merge log), never from the
health tables' SQL.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import boto3
import duckdb
import polars as pl
import pytest

from tests.marts.handmade import HandmadeLake, Segment, utc
from trafficwatch import health, lake, serving
from trafficwatch.config import Settings
from trafficwatch.raw import list_raw, quarantine, raw_key

pytestmark = pytest.mark.integration

SEGMENTS = (Segment("H1", "Rue A", 50, 48.11), Segment("H2", "Rue A", 50, 48.112), Segment("H3", "Rue B", 30, 48.12))
START = utc(2024, 9, 2, 8)
FREE = ("freeFlow", 48, 30, 80, 5)


def read(path: Path, table: str) -> pl.DataFrame:
    with duckdb.connect(str(path), read_only=True) as con:
        con.execute("SET TimeZone = 'UTC'")
        return con.sql(f"SELECT * FROM {health.SCHEMA}.{table}").pl()


def published_at(path: Path) -> datetime:
    return serving.serving_built_at(path).astimezone(UTC)


def merge_log(settings: Settings) -> dict[str, dict]:
    table = lake.ensure_tables(settings, [lake.MERGE_LOG])[lake.MERGE_LOG]
    frame = lake.scan_table(table, lake.storage_options(settings)).collect()
    return {row["source_key"]: row for row in frame.iter_rows(named=True)}


def landed(settings: Settings) -> dict[str, datetime]:
    s3 = boto3.client("s3", endpoint_url=settings.s3_endpoint_url, region_name=settings.aws_region)
    return {obj.key: obj.landed_at for obj in list_raw(s3, settings.bucket)}


def test_build_log_snapshots_rejects_and_quarantine_over_three_publishes(
    s3_settings: Settings, sample_bytes: bytes
) -> None:
    made = HandmadeLake(s3_settings, sample_bytes)
    s3 = boto3.client("s3", endpoint_url=s3_settings.s3_endpoint_url, region_name=s3_settings.aws_region)
    bad_speed = dict.fromkeys(SEGMENTS, FREE) | {SEGMENTS[2]: ("freeFlow", 250, 30, 80, 5)}
    poison_key = raw_key(START + timedelta(minutes=1))
    s3.put_object(Bucket=s3_settings.bucket, Key=poison_key, Body=b"not a gzip body")
    ingest_copy = quarantine(s3, s3_settings.bucket, b"<html>", "HTML instead of JSON", "http://feed/x", "feed")
    made.land({START: dict.fromkeys(SEGMENTS, FREE), START + timedelta(minutes=3): bad_speed})

    result = serving.build(s3_settings, made.config)
    first_built = published_at(made.serving_db)
    log_rows = merge_log(s3_settings)
    times = landed(s3_settings)
    good = [key for key in log_rows if key != poison_key]
    assert len(good) == 2

    snapshots = {row["source_key"]: row for row in read(made.serving_db, "snapshots").iter_rows(named=True)}
    assert set(snapshots) == {*good, poison_key}
    for key, row in snapshots.items():
        expected = log_rows[key]
        assert row["landed_at"] == times[key] == expected["landed_at"]
        assert row["merged_at"] == expected["merged_at"]
        assert row["measured_at"] == expected["measured_at"]
        assert (row["record_count"], row["accepted_rows"], row["rejected_rows"]) == (
            expected["record_count"],
            expected["accepted_rows"],
            expected["rejected_rows"],
        )
        assert row["refused"] == (key == poison_key)
        assert row["visible_at"] == (None if key == poison_key else first_built)
    assert snapshots[raw_key(START + timedelta(minutes=3))]["rejected_rows"] == 1

    (rejected,) = read(made.serving_db, "rejected_rows").iter_rows(named=True)
    assert rejected["source_key"] == raw_key(START + timedelta(minutes=3))
    assert rejected["row_count"] == 1 and "speed" in rejected["reason"]

    quarantined = {row["object_key"]: row for row in read(made.serving_db, "quarantined_objects").iter_rows(named=True)}
    assert set(quarantined) == {ingest_copy, f"quarantine/{poison_key}"}
    assert quarantined[ingest_copy]["stage"] == "ingest"
    assert quarantined[ingest_copy]["reason"] == "HTML instead of JSON"
    assert quarantined[f"quarantine/{poison_key}"]["stage"] == "merge"
    assert poison_key in quarantined[f"quarantine/{poison_key}"]["reason"]

    (first,) = read(made.serving_db, "build_log").iter_rows(named=True)
    assert first["built_at"] == first_built == result.built_at
    assert first["dbt_seconds"] == pytest.approx(result.dbt_seconds)
    assert 0 < first["publish_seconds"] <= result.publish_seconds
    assert first["full_publish"] is True and result.full_publish
    assert first["serving_rows"] == sum(result.rows.values())
    assert first["snapshots_made_visible"] == 2
    assert first["latest_measured_at"] == START + timedelta(minutes=3)
    assert first["latest_landed_at"] == max(times[key] for key in good)

    # A second build patches the file: the history is carried over, the new snapshot made visible.
    made.land({START + timedelta(minutes=6): dict.fromkeys(SEGMENTS, FREE)})
    newest = raw_key(START + timedelta(minutes=6))
    # Only the merge log file written since is read: the file lists what the previous publish read.
    held = health.horizon(made.serving_db)
    merge_log_files = lake.ensure_tables(s3_settings, [lake.MERGE_LOG])[lake.MERGE_LOG].file_uris()
    assert len(held.files[lake.MERGE_LOG]) == len(merge_log_files) - 1
    assert health.read_lake_health(s3_settings, held).snapshots["source_key"].to_list() == [newest]
    second = serving.build(s3_settings, made.config)
    assert not second.full_publish
    second_built = published_at(made.serving_db)
    snapshots = {row["source_key"]: row for row in read(made.serving_db, "snapshots").iter_rows(named=True)}
    assert set(snapshots) == {*good, poison_key, newest}
    assert snapshots[newest]["visible_at"] == second_built
    assert snapshots[newest]["landed_at"] == landed(s3_settings)[newest]
    assert all(snapshots[key]["visible_at"] == first_built for key in good)
    build_log = read(made.serving_db, "build_log").sort("built_at")
    assert build_log["built_at"].to_list() == [first_built, second_built]
    assert build_log.row(0, named=True) == first
    assert build_log.row(1, named=True)["snapshots_made_visible"] == 1
    assert read(made.serving_db, "rejected_rows").height == 1
    assert read(made.serving_db, "quarantined_objects").height == 2

    # A whole copy (full refresh) starts from the marts only: the health tables come from the file it replaces.
    serving.build(s3_settings, made.config, full_refresh=True)
    build_log = read(made.serving_db, "build_log").sort("built_at")
    assert build_log["built_at"].to_list()[:2] == [first_built, second_built]
    assert build_log.height == 3 and build_log.row(2, named=True)["snapshots_made_visible"] == 0
    assert (
        read(made.serving_db, "snapshots")
        .sort("source_key")
        .equals(pl.DataFrame(list(snapshots.values())).sort("source_key"), null_equal=True)
    )

    # Compaction rewrites the merge log's files: the next publish reads all its rows again, adds none twice.
    lake.maintain(s3_settings)
    assert set(health.horizon(made.serving_db).files[lake.MERGE_LOG]).isdisjoint(
        uri.rsplit("/", 1)[-1] for uri in lake.ensure_tables(s3_settings, [lake.MERGE_LOG])[lake.MERGE_LOG].file_uris()
    )
    serving.build(s3_settings, made.config)
    assert (
        read(made.serving_db, "snapshots")
        .sort("source_key")
        .equals(pl.DataFrame(list(snapshots.values())).sort("source_key"), null_equal=True)
    )
    assert read(made.serving_db, "rejected_rows").height == 1


def test_a_publish_with_the_lake_unreadable_keeps_the_health_history(
    s3_settings: Settings, sample_bytes: bytes
) -> None:
    made = HandmadeLake(s3_settings, sample_bytes)
    made.land({START: dict.fromkeys(SEGMENTS, FREE)})
    made.build()
    before = read(made.serving_db, "snapshots")
    broken = replace(s3_settings, bucket="tw-no-such-bucket")
    recorder = serving.health_recorder(
        lambda: serving.read_lake_health(broken, made.config), made.config, dbt_seconds=1.5, started=0.0
    )
    serving.publish(made.config, full=True, record=recorder)
    assert read(made.serving_db, "snapshots").equals(before, null_equal=True)
    assert read(made.serving_db, "build_log")["dbt_seconds"].to_list()[-1] == 1.5


def _serving_file(path: Path, absorbed: list[tuple[datetime, datetime, datetime]]) -> Path:
    """A file as the publish leaves it before the health tables: the marts' lake state only."""
    with duckdb.connect(str(path)) as con:
        con.execute("CREATE SCHEMA meta")
        con.execute(
            "CREATE TABLE meta.lake_merges_absorbed (merged_at TIMESTAMPTZ, measured_at TIMESTAMPTZ, "
            "source_key VARCHAR, row_count BIGINT, absorbed_at TIMESTAMPTZ)"
        )
        for merged_at, measured_at, absorbed_at in absorbed:
            con.execute(
                "INSERT INTO meta.lake_merges_absorbed VALUES (?, ?, 'k', 1, ?)", [merged_at, measured_at, absorbed_at]
            )
    return path


def _found(rows: list[tuple[str, datetime, datetime, datetime]]) -> health.LakeHealth:
    empty = health.LakeHealth.empty()
    snapshots = pl.DataFrame(
        [(key, measured, landed, merged, 10, 10, 0, 0) for key, measured, landed, merged in rows],
        schema=health.SNAPSHOTS_SCHEMA,
        orient="row",
    )
    return replace(empty, snapshots=snapshots)


def test_trimmed_to_the_window_and_read_again_without_duplicates(tmp_path: Path) -> None:
    now = datetime(2026, 11, 30, 12, tzinfo=UTC)
    old = now - timedelta(days=40)
    build = {"dbt_seconds": 2.0, "publish_seconds": 0.5, "full_publish": True, "serving_rows": 7}
    first = _serving_file(tmp_path / "first.duckdb", [(old, old, old - timedelta(seconds=5))])
    health.record(first, None, _found([("a", old, old - timedelta(seconds=9), old)]), old, 30, build)
    (row,) = read(first, "snapshots").iter_rows(named=True)
    assert row["visible_at"] == old

    second = _serving_file(tmp_path / "second.duckdb", [(old, old, old), (now, now - timedelta(minutes=1), now)])
    found = _found([("a", old, old, old), ("b", now - timedelta(minutes=1), now - timedelta(seconds=20), now)])
    health.record(second, first, found, now + timedelta(seconds=3), 30, build)
    snapshots = read(second, "snapshots")
    assert snapshots["source_key"].to_list() == ["b"]  # "a" (40 days old) trimmed, not added again
    assert snapshots["visible_at"].to_list() == [now + timedelta(seconds=3)]
    build_log = read(second, "build_log")
    assert build_log["built_at"].to_list() == [now + timedelta(seconds=3)]
    assert build_log["latest_landed_at"].to_list() == [now - timedelta(seconds=20)]


def test_the_first_publish_after_an_upgrade_dates_what_was_served_by_its_absorption(tmp_path: Path) -> None:
    now = datetime(2026, 11, 30, 12, tzinfo=UTC)
    earlier, absorbed = now - timedelta(hours=2), now - timedelta(hours=2) + timedelta(seconds=8)
    served = [(earlier, earlier - timedelta(minutes=1), absorbed)]
    previous = _serving_file(tmp_path / "previous.duckdb", served)  # published before health tables existed
    new = _serving_file(tmp_path / "new.duckdb", [*served, (now, now - timedelta(minutes=1), now)])
    found = _found(
        [
            ("old", earlier - timedelta(minutes=1), earlier - timedelta(seconds=30), earlier),
            ("new", now - timedelta(minutes=1), now - timedelta(seconds=30), now),
        ]
    )
    build = {"dbt_seconds": 2.0, "publish_seconds": 0.5, "full_publish": False, "serving_rows": 7}
    health.record(new, previous, found, now + timedelta(seconds=2), 30, build)
    visible = dict(read(new, "snapshots").select("source_key", "visible_at").iter_rows())
    assert visible == {"old": absorbed, "new": now + timedelta(seconds=2)}


def test_the_hourly_landing_chart_reads_the_7_days_before_the_newest_snapshot(tmp_path: Path) -> None:
    newest = datetime(2026, 11, 30, 12, tzinfo=UTC)
    measured = [newest - timedelta(hours=6 * back) for back in range(40)]  # 10 days, one every 6 hours
    path = _serving_file(tmp_path / "serving.duckdb", [])
    rows = [
        (f"k{back}", moment, moment + timedelta(seconds=20), moment + timedelta(seconds=25))
        for back, moment in enumerate(measured)
    ]
    build = {"dbt_seconds": 2.0, "publish_seconds": 0.5, "full_publish": True, "serving_rows": 7}
    health.record(path, None, _found(rows), newest + timedelta(minutes=1), 30, build)
    with duckdb.connect(str(path)) as con:
        for view in ("pipeline_snapshots", "pipeline_snapshots_7d"):
            sql = (serving.DASHBOARD_VIEWS / health.SCHEMA / f"{view}.sql").read_text()
            con.execute(f"CREATE VIEW {health.SCHEMA}.{view} AS {sql}")
        every = {key for (key,) in con.execute("SELECT source_key FROM health.pipeline_snapshots").fetchall()}
        week = {key for (key,) in con.execute("SELECT source_key FROM health.pipeline_snapshots_7d").fetchall()}
    assert len(every) == 40
    assert week == {f"k{back}" for back in range(28)}  # 27 x 6 h back and newer; 28 x 6 h (7 days exactly) is out
