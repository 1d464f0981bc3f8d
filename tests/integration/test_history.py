"""The demo's simulated history through the real path: landed under raw/ of a real S3 server while a worker
runs (as in `make demo`), merged and built by the functions the DAGs call, found in the marts; seeded twice,
it lands nothing new."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import duckdb
import pytest

from tests.integration.test_worker import running_worker  # noqa: F401
from trafficwatch import landing, worker
from trafficwatch_dev import history
from trafficwatch_dev.simulator import Simulator
from trafficwatch_dev.snapshots import DEFAULT_BASE, load_snapshot

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]

PARIS = ZoneInfo("Europe/Paris")
NOW = datetime(2026, 11, 26, 13, 1, 20, tzinfo=UTC)  # a Thursday: the history covers Wednesday 14:00 (Rennes) on
CADENCE = timedelta(minutes=30)  # a coarse cadence: 48 snapshots a day


def test_a_seeded_day_is_merged_and_built_by_the_pipeline_and_a_second_seeding_lands_nothing(
    running_worker,  # noqa: F811
) -> None:
    settings = running_worker
    s3 = landing_client(settings)
    # The live minute, landed as the ingest would: the worker's incremental listing now knows a newer key
    # than any of the history's.
    live = NOW.replace(second=0)
    body = Simulator(load_snapshot(DEFAULT_BASE), 0, live, 60).exports_body(live)
    assert landing.put_raw(s3, settings.bucket, live, body, {"record-count": "2859"}).landed
    assert worker.count_pending(settings) == 1
    assert worker.merge_pending(settings).merged_objects == 1

    progress = history.seed(settings, days=1, now=NOW, cadence=CADENCE)
    assert (progress.snapshots_total, progress.snapshots_landed, progress.snapshots_present) == (48, 48, 0)
    assert (progress.days_done, progress.worker_relists) == (1, 1) and progress.finished_at
    assert history.read_progress(settings) == progress
    assert history.status_line(settings).startswith("history: done, 1 days")
    # The worker was told: the older keys are pending now, not at its next full listing.
    assert worker.count_pending(settings) == 48

    merged = worker.merge_pending(settings)
    assert (merged.merged_objects, merged.observations, merged.rejected_rows) == (48, 48 * 2859, 0)
    built = worker.build_marts(settings)
    assert built.latest_measured_at == live

    end = datetime(2026, 11, 26, 13, 0, tzinfo=UTC)
    first = end - timedelta(days=1)
    with duckdb.connect(str(built.serving_db), read_only=True) as con:
        days = dict(
            con.execute("SELECT local_date, sum(bucket_count) FROM road_reliability_daily GROUP BY 1").fetchall()
        )
        hours = con.execute(
            "SELECT count(*), min(hour_start), max(hour_start) FROM network_congestion_hourly"
        ).fetchone()
        buckets = con.execute("SELECT count(DISTINCT bucket_start) FROM segment_traffic_15min").fetchone()[0]
        weekdays = {
            row[0] for row in con.execute("SELECT DISTINCT day_of_week FROM road_hour_of_week_profile").fetchall()
        }
        events = con.execute("SELECT count(*) FROM congestion_events").fetchone()[0]
    # Daily rows for each Rennes day the history covers: Wednesday (from 14:00) and Thursday.
    assert set(days) == {first.astimezone(PARIS).date(), end.astimezone(PARIS).date()}
    assert all(count > 0 for count in days.values())
    assert hours == (25, first, live.replace(minute=0))  # 24 hours of history and the live minute's hour
    assert buckets == 48 + 1
    assert weekdays == {3, 4}
    assert events > 0

    # A second `make demo` on the same home: every key is landed already; nothing new to merge.
    again = history.seed(settings, days=1, now=NOW + timedelta(minutes=2), cadence=CADENCE)
    assert (again.snapshots_landed, again.snapshots_present, again.worker_relists) == (0, 48, 0)
    assert worker.count_pending(settings) == 0
    assert worker.merge_pending(settings).merged_objects == 0


def landing_client(settings):
    from trafficwatch import storage

    return storage.s3_client(settings)
