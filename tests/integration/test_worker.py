"""The worker service: a real `trafficwatch worker` process serving merges, pending counts and builds."""

from __future__ import annotations

import json
import logging
import socket
from dataclasses import replace

import duckdb
import polars as pl
import pytest

from tests.conftest import SAMPLE_RECORDS, land_raw, redated
from trafficwatch import alerts, errors, lake, services, serving, storage, worker

pytestmark = pytest.mark.integration


@pytest.fixture
def running_worker(s3_settings):
    """The worker, started as `make demo` starts it, on the test's home and bucket; stopped by its group."""
    service = services.worker(worker.socket_path(s3_settings))
    services.start(service, s3_settings.home)
    yield s3_settings
    services.stop(s3_settings.home, service.name)


def _renamed(sample_bytes: bytes, minutes: int, key: str, name: str) -> bytes:
    """The sample `minutes` later, with segment `key` under another road name (a new segment version)."""
    records = json.loads(redated(sample_bytes, minutes))
    for record in records:
        if record["predefinedlocationreference"] == key:
            record["denomination"] = name
    return json.dumps(records).encode()


def _lake_rows(settings) -> dict[str, pl.DataFrame]:
    options = lake.storage_options(settings)
    return {name: lake.scan_table(table, options).collect() for name, table in lake.ensure_tables(settings).items()}


def test_merges_and_pending_counts_run_in_the_worker_on_tables_it_keeps_open(
    running_worker, sample_bytes, caplog
) -> None:
    settings = running_worker
    land_raw(settings, sample_bytes)
    assert worker.count_pending(settings) == 1
    with caplog.at_level(logging.INFO, logger="trafficwatch.worker"):
        result = worker.merge_pending(settings)
    assert (result.merged_objects, result.observations) == (1, SAMPLE_RECORDS)
    assert "[worker] raw/" in caplog.text and f"{SAMPLE_RECORDS} records" in caplog.text  # its log came back
    assert worker.count_pending(settings) == 0
    assert worker.merge_pending(settings).merged_objects == 0

    # Another process merges behind the worker's back, and changes one segment's road name...
    key = json.loads(sample_bytes)[0]["predefinedlocationreference"]
    land_raw(settings, _renamed(sample_bytes, 3, key, "Rue du Test"))
    assert lake.merge_pending(settings).merged_objects == 1
    # ... then the worker merges the next snapshot (same new name): its open tables must see that commit.
    land_raw(settings, _renamed(sample_bytes, 6, key, "Rue du Test"))
    assert worker.count_pending(settings) == 1
    assert worker.merge_pending(settings).observations == SAMPLE_RECORDS

    rows = _lake_rows(settings)
    observations, segments = rows[lake.OBSERVATIONS], rows[lake.SEGMENTS]
    assert observations.height == 3 * SAMPLE_RECORDS
    assert observations.select("segment_key", "measured_at").n_unique() == 3 * SAMPLE_RECORDS
    assert rows[lake.MERGE_LOG]["source_key"].n_unique() == rows[lake.MERGE_LOG].height == 3
    # One version more for the renamed segment, none for the others: the worker did not compare the
    # third snapshot with the road_segments it had read before the rename.
    assert segments.height == SAMPLE_RECORDS + 1
    renamed = segments.filter(pl.col("segment_key") == key).sort("valid_from")
    assert renamed["road_name"].to_list()[-1] == "Rue du Test"
    assert renamed["is_current"].to_list() == [False, True]


def test_builds_run_in_the_worker_and_failures_come_back(running_worker, sample_bytes, caplog) -> None:
    settings = running_worker
    land_raw(settings, sample_bytes)
    worker.merge_pending(settings)
    with caplog.at_level(logging.INFO, logger="trafficwatch.worker"):
        result = worker.build_marts(settings)
    assert "built by the worker" in caplog.text
    assert result.rows["segment_latest"] == SAMPLE_RECORDS
    assert result.serving_db == serving.ServingConfig.from_env(settings).serving_db
    with duckdb.connect(str(result.serving_db), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM segment_latest").fetchone() == (SAMPLE_RECORDS,)
    log_text = (settings.home / "logs" / "worker.log").read_text()
    assert "worker ready" in log_text and "built " in log_text  # the dbt build ran over there
    # The project was parsed once, as the worker started, not by its first build.
    assert log_text.count("dbt project parsed in") == 1
    assert log_text.index("dbt project parsed in") < log_text.index("worker ready")

    # A requester for another bucket is not served by this worker: it builds in its own process.
    caplog.clear()
    other = replace(settings, bucket=settings.bucket + "-other")
    with caplog.at_level(logging.WARNING, logger="trafficwatch.worker"), pytest.raises(serving.BuildError):
        worker.build_marts(other)  # ... and that bucket has no lake: the local build fails, one line
    assert f"the worker serves home {settings.home} and bucket {settings.bucket}" in caplog.text


def test_the_freshness_check_runs_in_the_worker_with_the_requesters_threshold(
    running_worker, sample_bytes, caplog
) -> None:
    settings = running_worker
    land_raw(settings, sample_bytes)  # landed now, measured in 2024: the data shown is old, the source up
    worker.merge_pending(settings)
    worker.build_marts(settings)
    with caplog.at_level(logging.INFO, logger="trafficwatch.worker"):
        stale = worker.check_freshness(settings)
    assert "freshness checked by the worker" in caplog.text
    here = alerts.check_freshness(settings)
    assert stale.state == here.state == alerts.STALE
    assert (stale.serving_measured_at, stale.newest_landed) == (here.serving_measured_at, here.newest_landed)
    assert stale.newest_landed.merged and stale.line.startswith("dashboards stale: newest data shown 2024-")
    # The worker started with the default threshold (600 s); the requester's own is the one applied.
    lenient = worker.check_freshness(replace(settings, stale_after_s=10**9))
    assert (lenient.state, lenient.stale_after_s) == (alerts.FRESH, 10**9)


def test_the_hourly_audit_and_maintenance_run_in_the_worker_with_the_requesters_retentions(
    running_worker, sample_bytes, caplog
) -> None:
    settings = running_worker
    assert worker.audit_marts(settings) == {"data tests": 0}  # a new home: nothing built, nothing to audit
    for minutes in (0, 3):
        land_raw(settings, redated(sample_bytes, minutes))
        assert worker.merge_pending(settings).merged_objects == 1  # a small file per table per merge
    worker.build_marts(settings)
    with caplog.at_level(logging.INFO, logger="trafficwatch.worker"):
        audited = worker.audit_marts(settings)
        # The worker started with the defaults (vacuum after 168 h, raw kept forever): the requester's apply.
        maintained = worker.maintain_lake(replace(settings, vacuum_retention_hours=0, raw_retention_days=1))
    assert "audited by the worker" in caplog.text and "maintained by the worker" in caplog.text
    assert audited["data tests"] > 20
    assert maintained.compacted[lake.OBSERVATIONS] == 2  # the two merges' files, rewritten as one
    assert maintained.vacuumed_files[lake.OBSERVATIONS] == 2  # ... and deleted at once (retention 0 h)
    assert maintained.expired_raw_objects == 2  # measured in 2024, merged: past a one-day retention
    listed = storage.s3_client(settings).list_objects_v2(Bucket=settings.bucket, Prefix="raw/")
    assert listed.get("KeyCount") == 0
    assert f"[worker] {maintained.summary()}" in caplog.text  # the maintenance's log line came back
    observations = _lake_rows(settings)[lake.OBSERVATIONS]
    assert observations.height == 2 * SAMPLE_RECORDS  # nothing lost to the compaction
    assert worker.merge_pending(settings).merged_objects == 0  # the merges' open tables after it: still right


def test_a_socket_left_by_a_stopped_worker_means_working_here(s3_settings, sample_bytes, caplog) -> None:
    path = worker.socket_path(s3_settings)
    path.parent.mkdir(parents=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(str(path))  # bound, never listening: what a killed worker leaves
    land_raw(s3_settings, sample_bytes)
    assert worker.count_pending(s3_settings) == 1
    with caplog.at_level(logging.INFO, logger="trafficwatch.worker"):
        assert worker.merge_pending(s3_settings).observations == SAMPLE_RECORDS
        result = worker.build_marts(s3_settings)
    assert "[worker]" not in caplog.text and "built by the worker" not in caplog.text
    assert result.rows["segment_latest"] == SAMPLE_RECORDS


def test_a_failing_merge_raises_the_same_exception_in_the_worker_and_here(running_worker) -> None:
    settings = running_worker
    assert worker.merge_pending(settings).merged_objects == 0  # the worker has its tables open
    key = f"{lake.LAKE_PREFIX}{lake.MERGE_LOG}/_delta_log/00000000000000000001.json"
    client = storage.s3_client(settings)
    client.put_object(Bucket=settings.bucket, Key=key, Body=b"garbage, not a commit\n")

    with pytest.raises(Exception) as in_worker:
        worker.merge_pending(settings)
    assert not isinstance(in_worker.value, worker.WorkerError)
    assert errors.describe(in_worker.value).endswith(f"({worker.WORKER_NOTE})")  # its traceback is over there

    services.stop(settings.home, "worker")
    with pytest.raises(Exception) as here:
        worker.merge_pending(settings)  # no worker: the same merge in this process
    assert type(in_worker.value) is type(here.value)


def test_a_pending_count_here_creates_no_table(s3_settings, sample_bytes) -> None:
    client = storage.s3_client(s3_settings)

    def lake_objects() -> list[str]:
        listed = client.list_objects_v2(Bucket=s3_settings.bucket, Prefix=lake.LAKE_PREFIX)
        return [item["Key"] for item in listed.get("Contents", [])]

    assert worker.count_pending(s3_settings) == 0  # an empty bucket: no worker, read here
    land_raw(s3_settings, sample_bytes)
    assert worker.count_pending(s3_settings) == 1  # no merge log yet: every landed snapshot is pending
    assert lake_objects() == []
