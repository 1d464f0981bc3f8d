"""The merge into Delta tables on the real local S3 server: counts, idempotency, crashes, races, geometry."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import boto3
import polars as pl
import pytest

from tests.conftest import land_raw, redated
from trafficwatch import lake, raw
from trafficwatch.config import Settings
from trafficwatch.lake import preparation
from trafficwatch.payloads import SnapshotRules

pytestmark = pytest.mark.integration

TRAFFICWATCH = str(Path(sys.executable).parent / "trafficwatch")
# Columns that differ between two runs by design (when they ran), left out of row comparisons.
RUN_TIME_COLUMNS = {"merged_at", "rejected_at", "batch_id", "observations_version", "segments_version"}


def snapshot_of_tables(settings: Settings) -> dict[str, pl.DataFrame]:
    """Every table's rows, sorted, without the columns that record when a run happened."""
    tables = lake.ensure_tables(settings)
    options = lake.storage_options(settings)
    frames = {}
    for name, table in tables.items():
        frame = lake.scan_table(table, options).collect()
        frame = frame.drop([c for c in frame.columns if c in RUN_TIME_COLUMNS])
        frames[name] = frame.sort(frame.columns)
    return frames


def counts(settings: Settings) -> dict[str, int]:
    return {name: frame.height for name, frame in snapshot_of_tables(settings).items()}


def versions(settings: Settings) -> dict[str, int]:
    return {name: table.version() for name, table in lake.ensure_tables(settings).items()}


def assert_same_rows(left: dict[str, pl.DataFrame], right: dict[str, pl.DataFrame]) -> None:
    assert left.keys() == right.keys()
    for name in left:
        assert left[name].equals(right[name]), f"{name} differs"


def test_sample_merges_to_2859_observations_and_segments_once(s3_settings, sample_bytes) -> None:
    land_raw(s3_settings, sample_bytes)
    result = lake.merge_pending(s3_settings)
    assert (result.merged_objects, result.observations, result.rejected_rows) == (1, 2859, 0)
    assert counts(s3_settings) == {
        "traffic_observations": 2859,
        "road_segments": 2859,
        "rejected_records": 0,
        "merge_log": 1,
    }
    before, tables_before = versions(s3_settings), snapshot_of_tables(s3_settings)

    assert lake.merge_pending(s3_settings).merged_objects == 0  # nothing pending
    from datetime import UTC, datetime

    again = lake.backfill(s3_settings, datetime(2024, 8, 26, tzinfo=UTC), datetime(2024, 8, 27, tzinfo=UTC))
    assert again.merged_objects == 1  # merged again on purpose...
    assert versions(s3_settings) == before  # ...and nothing changed, not even a new table version
    assert_same_rows(snapshot_of_tables(s3_settings), tables_before)

    status = lake.status(s3_settings)
    assert (status["raw_objects"], status["pending_raw_objects"]) == (1, 0)
    assert status["latest_measured_at"] == "2024-08-26T10:43:00+00:00"
    assert status["tables"]["traffic_observations"]["rows"] == 2859


def test_lineage_and_merge_log(s3_settings, sample_bytes) -> None:
    key = land_raw(s3_settings, sample_bytes)
    lake.merge_pending(s3_settings)
    frames = snapshot_of_tables(s3_settings)
    observations = frames["traffic_observations"]
    assert observations["source_key"].unique().to_list() == [key]
    assert observations["measured_date"].unique().to_list()[0].isoformat() == "2024-08-26"
    entry = frames["merge_log"].row(0, named=True)
    assert (entry["source_key"], entry["record_count"], entry["accepted_rows"], entry["rejected_rows"]) == (
        key,
        2859,
        2859,
        0,
    )


@pytest.mark.parametrize("where", ["this process", "worker processes"])
def test_backlog_of_100_snapshots_clears_in_one_run(where, s3_settings, sample_bytes, monkeypatch) -> None:
    # Backlogs from PROCESSES_FROM objects on are parsed in spawned worker processes: test both paths.
    monkeypatch.setattr(preparation, "PROCESSES_FROM", 1000 if where == "this process" else 50)
    for minutes in range(0, 300, 3):
        land_raw(s3_settings, redated(sample_bytes, minutes))
    assert lake.status(s3_settings)["pending_raw_objects"] == 100
    result = lake.merge_pending(s3_settings)
    assert result.merged_objects == 100
    assert counts(s3_settings)["traffic_observations"] == 285_900
    assert counts(s3_settings)["road_segments"] == 2859  # same attributes all along: one version each
    assert lake.status(s3_settings)["pending_raw_objects"] == 0


def _geometry_by_key(settings: Settings) -> dict[str, dict]:
    frame = snapshot_of_tables(settings)["road_segments"]
    return {key: json.loads(text) for key, text in frame.select("segment_key", "geometry_geojson").iter_rows()}


def test_linestring_and_multilinestring_snapshots_keep_their_geometry(s3_settings, sample_bytes) -> None:
    s3_settings = replace(s3_settings, min_records=50)  # 50 records of the sample: not refused as partial
    records = json.loads(sample_bytes)[:50]
    line_records = json.loads(json.dumps(records))
    for record in line_records:  # the 2025 shape: LineString
        record["geo_shape"]["geometry"] = {
            "type": "LineString",
            "coordinates": record["geo_shape"]["geometry"]["coordinates"][0],
        }
        record["datetime"] = "2025-03-01T08:00:00+01:00"
    land_raw(s3_settings, json.dumps(records).encode())
    land_raw(s3_settings, json.dumps(line_records).encode())
    lake.merge_pending(s3_settings)
    frame = snapshot_of_tables(s3_settings)["road_segments"]
    # The later snapshot changed the geometry type: each segment has two versions, both faithful.
    assert frame.height == 100
    by_version = {
        (key, kind): json.loads(text)
        for key, kind, text in frame.select("segment_key", "geometry_type", "geometry_geojson").iter_rows()
    }
    for old, new in zip(records, line_records, strict=True):
        key = old["predefinedlocationreference"]
        assert by_version[(key, "MultiLineString")] == old["geo_shape"]["geometry"]
        assert by_version[(key, "LineString")] == new["geo_shape"]["geometry"]
    lengths = frame["length_m"].to_list()
    assert all(length > 0 for length in lengths)


def test_attribute_change_opens_a_new_segment_version(s3_settings, sample_bytes) -> None:
    land_raw(s3_settings, sample_bytes)
    renamed = json.loads(redated(sample_bytes, 3))
    renamed[0]["denomination"] = "Rocade Ouest"
    land_raw(s3_settings, json.dumps(renamed).encode())
    lake.merge_pending(s3_settings)
    segments = snapshot_of_tables(s3_settings)["road_segments"]
    versions_of_first = segments.filter(pl.col("segment_key") == renamed[0]["predefinedlocationreference"]).sort(
        "valid_from"
    )
    assert versions_of_first["road_name"].to_list() == ["Route départementale 34", "Rocade Ouest"]
    assert versions_of_first["is_current"].to_list() == [False, True]
    assert versions_of_first["valid_to"][0] == versions_of_first["valid_from"][1]
    assert versions_of_first["valid_to"][1] is None
    assert segments.filter(pl.col("is_current")).height == 2859


def test_invalid_rows_are_rejected_and_counted_duplicates_resolved(s3_settings, sample_bytes) -> None:
    records = json.loads(sample_bytes)
    records[0]["averagevehiclespeed"] = 420
    records[1]["trafficstatus"] = "jam"
    records.append(dict(records[10]))  # a segment twice in one snapshot, as real data has had
    key = land_raw(s3_settings, json.dumps(records).encode())
    result = lake.merge_pending(s3_settings)
    assert (result.observations, result.rejected_rows, result.duplicate_rows) == (2857, 2, 1)
    frames = snapshot_of_tables(s3_settings)
    assert sorted(frames["rejected_records"]["reason"].to_list()) == [
        "speed_kmh 420 outside 0-200 km/h",
        "traffic_status 'jam' is not one of freeFlow, heavy, congested, impossible, unknown",
    ]
    rejected = json.loads(frames["rejected_records"].sort("record_index")["record_json"][0])
    assert rejected["speed_kmh"] == 420
    entry = frames["merge_log"].row(0, named=True)
    assert (entry["source_key"], entry["record_count"], entry["accepted_rows"]) == (key, 2860, 2857)
    assert (entry["rejected_rows"], entry["duplicate_rows"]) == (2, 1)
    assert frames["traffic_observations"].height == 2857


def test_an_unreadable_raw_object_is_quarantined_not_retried(s3_settings, sample_bytes) -> None:
    land_raw(s3_settings, sample_bytes)
    client = boto3.client("s3", endpoint_url=s3_settings.s3_endpoint_url)
    client.put_object(Bucket=s3_settings.bucket, Key="raw/date=2024-08-26/20240826T104600Z.json.gz", Body=b"junk")
    result = lake.merge_pending(s3_settings)
    assert (result.merged_objects, result.quarantined_objects) == (1, 1)
    quarantined = client.list_objects_v2(Bucket=s3_settings.bucket, Prefix="quarantine/")["Contents"]
    assert len(quarantined) == 1
    head = client.head_object(Bucket=s3_settings.bucket, Key=quarantined[0]["Key"])
    assert head["Metadata"]["reason"].startswith(
        "refused raw object raw/date=2024-08-26/20240826T104600Z.json.gz: not a gzip file"
    )
    assert lake.status(s3_settings)["pending_raw_objects"] == 0
    assert counts(s3_settings)["traffic_observations"] == 2859


def _land_backlog(settings: Settings, sample_bytes: bytes, count: int) -> None:
    for index in range(count):
        land_raw(settings, redated(sample_bytes, 3 * index))


def _clean_run(settings: Settings, sample_bytes: bytes, count: int, monkeypatch) -> dict[str, pl.DataFrame]:
    """The rows a clean, uninterrupted merge of the same backlog gives, in another bucket."""
    client = boto3.client("s3", endpoint_url=settings.s3_endpoint_url)
    reference = settings.bucket + "-ref"
    client.create_bucket(Bucket=reference)
    monkeypatch.setenv("TRAFFICWATCH_BUCKET", reference)
    from trafficwatch.config import load_settings

    ref_settings = load_settings()
    _land_backlog(ref_settings, sample_bytes, count)
    lake.merge_pending(ref_settings)
    rows = snapshot_of_tables(ref_settings)
    monkeypatch.setenv("TRAFFICWATCH_BUCKET", settings.bucket)
    return {name: frame.drop("source_key", "landed_at", strict=False) for name, frame in rows.items()}


def _without_lineage(frames: dict[str, pl.DataFrame]) -> dict[str, pl.DataFrame]:
    return {name: frame.drop("source_key", "landed_at", strict=False) for name, frame in frames.items()}


def _observations_committed(settings: Settings) -> bool:
    client = boto3.client("s3", endpoint_url=settings.s3_endpoint_url)
    listing = client.list_objects_v2(
        Bucket=settings.bucket, Prefix="lake/traffic_observations/_delta_log/00000000000000000001.json"
    )
    return listing.get("KeyCount", 0) > 0


@pytest.mark.parametrize("kill_when", ["reading", "after_observations_commit"])
def test_sigkill_mid_merge_then_rerun_gives_the_rows_of_a_clean_run(
    kill_when, s3_settings, sample_bytes, monkeypatch
) -> None:
    count = 12
    expected = _clean_run(s3_settings, sample_bytes, count, monkeypatch)
    _land_backlog(s3_settings, sample_bytes, count)
    lake.ensure_tables(s3_settings)
    merge = subprocess.Popen([TRAFFICWATCH, "merge"], env=os.environ.copy(), stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    if kill_when == "reading":
        time.sleep(0.5)
    else:
        while not _observations_committed(s3_settings) and time.monotonic() < deadline:
            time.sleep(0.01)
    merge.send_signal(signal.SIGKILL)
    merge.wait(timeout=30)
    assert merge.returncode == -signal.SIGKILL
    interrupted = counts(s3_settings)
    assert interrupted["merge_log"] < count  # it really died before finishing
    if kill_when == "after_observations_commit":
        assert interrupted["traffic_observations"] == count * 2859  # rows committed, log not yet

    rerun = subprocess.run([TRAFFICWATCH, "merge"], env=os.environ.copy(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert_same_rows(_without_lineage(snapshot_of_tables(s3_settings)), expected)


def test_two_concurrent_merges_give_the_rows_of_one(s3_settings, sample_bytes, monkeypatch) -> None:
    count = 10
    expected = _clean_run(s3_settings, sample_bytes, count, monkeypatch)
    _land_backlog(s3_settings, sample_bytes, count)
    lake.ensure_tables(s3_settings)
    runs = [
        subprocess.Popen([TRAFFICWATCH, "merge"], env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    logs = []
    for run in runs:
        _, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr.decode()[-2000:]
        logs.append(stderr.decode())
    assert all(f"merged {count} snapshots" in text for text in logs)  # both really merged the backlog
    assert_same_rows(_without_lineage(snapshot_of_tables(s3_settings)), expected)


def _observations_of(settings: Settings, body: bytes, key: str) -> pl.DataFrame:
    """The rows a merge would write for one payload, prepared as the merge prepares them."""
    from datetime import UTC, datetime

    client = boto3.client("s3", endpoint_url=settings.s3_endpoint_url, region_name=settings.aws_region)
    rules = SnapshotRules.of(settings)
    prepared = lake.prepare(client, settings.bucket, [raw.RawObject(key, datetime.now(UTC))], rules)
    return prepared.observations.drop("fingerprint").with_columns(
        pl.lit("test", dtype=pl.String).alias("attributes_hash"),
        pl.lit(datetime.now(UTC), dtype=lake.UTC_US).alias("merged_at"),
    )


def test_new_rows_are_appended_and_rows_the_table_may_hold_are_merged(s3_settings, sample_bytes) -> None:
    first = _observations_of(s3_settings, sample_bytes, land_raw(s3_settings, sample_bytes))
    later = _observations_of(s3_settings, sample_bytes, land_raw(s3_settings, redated(sample_bytes, 1)))
    table = lake.ensure_tables(s3_settings)[lake.OBSERVATIONS]
    assert not lake.may_hold(table, first)  # an empty table holds nothing
    lake.merge_observations(table, first, transaction=1)
    assert lake.may_hold(table, first)  # its file's statistics cover that minute now
    assert not lake.may_hold(table, later)  # and not the next one
    assert table.history(1)[0]["operation"] == "WRITE"  # new rows: a plain append

    version = lake.merge_observations(table, first, transaction=2)  # a replay: the MERGE finds every row there
    assert version == 1
    assert lake.scan_table(table, lake.storage_options(s3_settings)).select(pl.len()).collect().item() == 2859


def test_two_writers_appending_the_same_rows_from_one_version_do_not_duplicate(s3_settings, sample_bytes) -> None:
    """The race two merges run when both see the rows as new: the app transaction (same app id, any
    version) makes the second commit fail, and its retry, on the fresh table, finds the rows there."""
    rows = _observations_of(s3_settings, sample_bytes, land_raw(s3_settings, sample_bytes))
    lake.ensure_tables(s3_settings)
    one = lake.ensure_tables(s3_settings)[lake.OBSERVATIONS]
    two = lake.ensure_tables(s3_settings)[lake.OBSERVATIONS]
    assert one.version() == two.version() == 0
    lake.merge_observations(one, rows, transaction=1)
    assert not lake.may_hold(two, rows)  # `two` still sees the table as it was: the rows look new to it
    lake.merge_observations(two, rows, transaction=2)
    frame = lake.scan_table(lake.ensure_tables(s3_settings)[lake.OBSERVATIONS], lake.storage_options(s3_settings))
    assert frame.select(pl.len()).collect().item() == 2859


def test_a_process_keeping_its_tables_open_knows_what_it_merged_without_reading_it_back(
    s3_settings, sample_bytes, monkeypatch
) -> None:
    s3 = boto3.client("s3", endpoint_url=s3_settings.s3_endpoint_url)
    tables = lake.OpenTables(s3_settings)
    first = land_raw(s3_settings, redated(sample_bytes, 0))
    assert lake.merge_pending(s3_settings, s3, tables.get()).merged_objects == 1
    read_back: list[list[str]] = []  # merge log files read
    scan_parquet = pl.scan_parquet

    def counted(source, **options):
        if "merge_log" in str(source):
            read_back.append([source] if isinstance(source, str) else list(source))
        return scan_parquet(source, **options)

    monkeypatch.setattr(pl, "scan_parquet", counted)

    second = land_raw(s3_settings, redated(sample_bytes, 1))
    assert lake.merge_pending(s3_settings, s3, tables.get()).merged_objects == 1
    assert lake.pending_raw(s3_settings, s3, tables.get()) == []
    assert lake.merged_keys(s3_settings, tables.get()) == {first, second}
    assert read_back == []  # the merge log file it had just written was not read again

    # Another process merges: its merge log file is read, and only that one.
    third = land_raw(s3_settings, redated(sample_bytes, 2))
    other = subprocess.run([TRAFFICWATCH, "merge"], env=os.environ.copy(), capture_output=True, text=True, timeout=300)
    assert other.returncode == 0, other.stderr
    assert lake.merged_keys(s3_settings, tables.get()) == {first, second, third}
    assert len(read_back) == 1 and len(read_back[0]) == 1
    fourth = land_raw(s3_settings, redated(sample_bytes, 3))
    assert lake.merge_pending(s3_settings, s3, tables.get()).merged_objects == 1
    assert lake.pending_raw(s3_settings, s3, tables.get()) == []
    assert lake.merged_keys(s3_settings, tables.get()) == {first, second, third, fourth}
    rows = counts(s3_settings)
    assert (rows["traffic_observations"], rows["merge_log"]) == (4 * 2859, 4)
