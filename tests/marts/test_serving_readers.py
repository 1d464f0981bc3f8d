"""Dashboards read the serving file while it is republished: never an error, never a half-built state.

Reader processes open the serving file read-only in a loop, as Superset does, and check each time that
it holds exactly the marts, with the row counts its publish metadata announces and one latest snapshot
everywhere. Meanwhile 20 cycles land a new snapshot, merge it and build-and-publish.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.conftest import land_raw, redated
from tests.marts.fixtures import MART_NAMES, serving_config
from trafficwatch import lake, serving

pytestmark = pytest.mark.integration

CYCLES = 20
READERS = 3

READER = r"""
import json, os, sys, time
import duckdb

path, stop, marts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
reads, errors, builds = 0, [], set()
while not os.path.exists(stop):
    try:
        with duckdb.connect(path, read_only=True) as con:
            tables = {name for (name,) in con.execute(
                "SELECT table_name FROM duckdb_tables() WHERE schema_name = 'main'").fetchall()}
            assert tables == set(marts), f"tables {sorted(tables)}"
            built_at, latest, announced = con.execute(
                "SELECT built_at, latest_measured_at, mart_rows FROM meta.publish").fetchone()
            announced = json.loads(announced)
            for mart in marts:
                (rows,) = con.execute(f"SELECT count(*) FROM main.{mart}").fetchone()
                assert rows == announced[mart], f"{mart}: {rows} rows, its publish announced {announced[mart]}"
            (segments,) = con.execute("SELECT max(measured_at) FROM segment_latest").fetchone()
            (kpis,) = con.execute("SELECT measured_at FROM network_kpis_latest").fetchone()
            (bucket,) = con.execute("SELECT max(bucket_start) FROM segment_traffic_15min").fetchone()
            assert segments == latest == kpis, f"latest snapshot {segments} / {latest} / {kpis}"
            assert 0 <= (latest - bucket).total_seconds() < 900, f"latest bucket {bucket} for {latest}"
            builds.add(built_at.isoformat())
        reads += 1
    except Exception as error:
        errors.append(f"{type(error).__name__}: {error}")
    time.sleep(0.05)
print(json.dumps({"reads": reads, "errors": errors[:10], "error_count": len(errors), "builds": len(builds)}))
"""


@pytest.mark.timeout(1800)  # 20 full cycles: ~5 min on an idle 2-core machine
def test_readers_never_see_an_error_or_a_partial_publish(s3_settings, sample_bytes, tmp_path) -> None:
    config = serving_config(s3_settings)
    land_raw(s3_settings, sample_bytes)
    lake.merge_pending(s3_settings)
    serving.build(s3_settings, config)

    stop = tmp_path / "stop"
    readers = [
        subprocess.Popen(
            [sys.executable, "-c", READER, str(config.serving_db), str(stop), json.dumps(MART_NAMES)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(READERS)
    ]
    try:
        patched = 0
        for cycle in range(1, CYCLES + 1):
            land_raw(s3_settings, redated(sample_bytes, 3 * cycle))
            lake.merge_pending(s3_settings)
            patched += not serving.build(s3_settings, config).full_publish
        time.sleep(0.5)  # let every reader see the last file too
    finally:
        stop.touch()
    reports = []
    for reader in readers:
        stdout, stderr = reader.communicate(timeout=60)
        assert reader.returncode == 0, stderr[-2000:]
        reports.append(json.loads(stdout))
    for report in reports:
        assert report["error_count"] == 0, report["errors"]
        assert report["reads"] > CYCLES
        assert report["builds"] > CYCLES // 2  # the readers really read across many publishes
    assert patched == CYCLES  # every cycle took the incremental publish path
