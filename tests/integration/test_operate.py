"""`trafficwatch lag` on the real local S3 server: newest landed snapshot against the serving file, pending merges."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import duckdb
import pytest
from deltalake import DeltaTable

from tests.conftest import land_raw, redated
from trafficwatch import lake, operate
from trafficwatch.config import Settings
from trafficwatch.raw import measured_at_of

pytestmark = pytest.mark.integration


def record_served_merges(con: duckdb.DuckDBPyConnection, settings: Settings) -> None:
    """Make a hand-made serving file say it holds every row merged so far, as a publish records it: the
    merge stamps (`merged_at`) of the lake's observations in `meta.lake_merges_absorbed`."""
    options = lake.storage_options(settings)
    table = DeltaTable(lake.table_uri(settings, lake.OBSERVATIONS), storage_options=options)
    stamps = lake.scan_table(table, options).select("merged_at").unique().collect()["merged_at"].to_list()
    con.execute("CREATE SCHEMA IF NOT EXISTS meta")
    con.execute("CREATE OR REPLACE TABLE meta.lake_merges_absorbed (merged_at TIMESTAMPTZ)")
    con.executemany("INSERT INTO meta.lake_merges_absorbed VALUES (?)", [[stamp] for stamp in stamps])


def test_lag_compares_the_newest_landed_snapshot_with_the_serving_file(
    s3_settings: Settings, sample_bytes: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    serving_db = tmp_path / "serving.duckdb"
    s3_settings = replace(s3_settings, serving_db=serving_db)  # TRAFFICWATCH_SERVING_DB, as load_settings reads it
    first = land_raw(s3_settings, redated(sample_bytes, 0))

    nothing_merged = operate.lag(s3_settings)  # no merge log table yet, no serving file
    assert (nothing_merged["pending_merge"], nothing_merged["oldest_pending"]["key"]) == (1, first)
    assert (nothing_merged["lag_s"], nothing_merged["serving_measured_at"]) == (None, None)
    assert nothing_merged["unserved_snapshots"] == 1

    second = land_raw(s3_settings, redated(sample_bytes, 3))
    lake.merge_pending(s3_settings)
    third = land_raw(s3_settings, redated(sample_bytes, 6))
    with duckdb.connect(str(serving_db)) as con:  # the dashboards show the first two snapshots, all their rows
        con.execute("CREATE TABLE segment_latest AS SELECT ?::TIMESTAMPTZ AS measured_at", [measured_at_of(second)])
        record_served_merges(con, s3_settings)

    lag = operate.lag(s3_settings)
    assert lag["newest_landed"]["key"] == third
    assert lag["serving_measured_at"] == measured_at_of(second).isoformat()
    assert lag["lag_s"] == 180.0
    assert (lag["landed_snapshots"], lag["unserved_snapshots"], lag["pending_merge"]) == (3, 1, 1)
    assert lag["oldest_pending"]["key"] == third
    assert lag["oldest_unserved_waiting_s"] >= 0

    lake.merge_pending(s3_settings)
    after_merge = operate.lag(s3_settings)  # merged, not yet built: its rows wait for the marts
    assert (after_merge["unserved_snapshots"], after_merge["unserved_rows"], after_merge["pending_merge"]) == (
        1, len(json.loads(sample_bytes)), 0)  # fmt: skip
    with duckdb.connect(str(serving_db)) as con:
        con.execute("UPDATE segment_latest SET measured_at = ?", [measured_at_of(third)])
        record_served_merges(con, s3_settings)
    caught_up = operate.lag(s3_settings)
    assert (caught_up["lag_s"], caught_up["unserved_snapshots"], caught_up["pending_merge"]) == (0.0, 0, 0)

    # What `make status` prints: the same, from the command line.
    trafficwatch = Path(sys.executable).parent / "trafficwatch"
    done = subprocess.run([str(trafficwatch), "lag"], capture_output=True, text=True, env=dict(os.environ), timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["newest_landed"]["key"] == third


def test_check_freshness_command_exits_1_with_the_line_when_stale(
    s3_settings: Settings, sample_bytes: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """`trafficwatch check-freshness`: the function of the pipeline_freshness DAG, on the real local S3."""
    from datetime import UTC, datetime, timedelta

    from tests.conftest import SAMPLE_DATETIME
    from trafficwatch import cli

    serving_db = tmp_path / "serving.duckdb"
    monkeypatch.setenv("TRAFFICWATCH_SERVING_DB", str(serving_db))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # what main sets, undone after the test
    now = datetime.now(UTC)
    assert cli.main(["check-freshness"]) == 0  # nothing landed, nothing shown
    assert capsys.readouterr().out.startswith("nothing to show yet: no data in the serving file")

    minutes = int((now - datetime.fromisoformat(SAMPLE_DATETIME.decode())).total_seconds() // 60) - 3
    land_raw(s3_settings, redated(sample_bytes, minutes))  # dated 3 minutes ago, landed now: the source is up
    with duckdb.connect(str(serving_db)) as con:
        shown = now - timedelta(minutes=16)
        con.execute("CREATE TABLE segment_latest AS SELECT ?::TIMESTAMPTZ AS measured_at", [shown])
    assert cli.main(["check-freshness"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    (line,) = err.splitlines()
    assert line.startswith("dashboards stale: newest data shown ") and " is 16.0 min old (threshold 10 min); " in line
    assert line.endswith("merged: no")

    monkeypatch.setenv("TRAFFICWATCH_STALE_AFTER", "1200")
    assert cli.main(["check-freshness"]) == 0
    assert capsys.readouterr().out.startswith("dashboards fresh: ")
