"""
### Traffic merge: landed snapshots into the Delta Lake tables, exactly once

Runs continuously, one run at a time. Each run first **waits in the triggerer** (deferrable sensor,
no worker slot held) until S3 holds landed snapshots that the merge log does not, whoever landed them:
the ingest DAG, a backfill upload or another producer. It then merges **every** pending snapshot in one
batch, so a backlog after an outage clears in one run.

The merge validates every row (types, speed 0-200 km/h, travel time >= 0, reliability 0-100, status,
coordinates), sends invalid rows to `rejected_records` with the reason, keeps one row per segment and
minute, and MERGEs into `traffic_observations`, `road_segments` (one row per segment version) and
`merge_log`. Every write inserts only what is missing, so a rerun, a crash or a concurrent merge never
duplicates a row. The log line of each snapshot gives its accepted, rejected and duplicate counts.

A run whose sensor waited `TRAFFICWATCH_MERGE_WAIT_TIMEOUT` seconds (default 900) for nothing ends
skipped, and the next run starts. Same function as `trafficwatch merge`: when the worker service runs
(`make demo` and `make up` start it), the merge runs there, on Delta tables it keeps open, and its log
lines come back into this task's log.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import dag, task
from airflow.sdk.exceptions import AirflowException, AirflowSkipException

from trafficwatch.assets import LAKE_OBSERVATIONS
from trafficwatch.config import load_settings
from trafficwatch.waiting import PendingRawSensor


@dag(
    schedule="@continuous",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,  # one writer at a time; concurrent merges are still safe, only wasteful
    doc_md=__doc__,
    tags=["trafficwatch", "lake", "delta"],
    default_args={"owner": "trafficwatch", "retries": 2, "retry_delay": timedelta(seconds=10)},
)
def traffic_merge() -> None:
    settings = load_settings()  # the sensor's timings: TRAFFICWATCH_MERGE_POLL_INTERVAL, _MERGE_WAIT_TIMEOUT
    wait = PendingRawSensor(
        task_id="wait_for_landed_snapshots",
        poll_interval_s=settings.merge_poll_interval_s,
        timeout=settings.merge_wait_timeout_s,
    )

    @task(outlets=[LAKE_OBSERVATIONS], execution_timeout=timedelta(minutes=30))
    def merge_pending_snapshots() -> dict[str, int | float]:
        from trafficwatch.connections import task_settings
        from trafficwatch.errors import failure
        from trafficwatch.worker import merge_pending

        settings = None
        try:
            settings = task_settings()
            result = merge_pending(settings)
        except Exception as error:  # one line naming the cause; the traceback is in the log above it
            raise AirflowException(failure("merge", error, settings)) from None
        if not result.merged_objects and not result.quarantined_objects:
            raise AirflowSkipException(result.summary())
        return result.as_dict()

    wait >> merge_pending_snapshots()


traffic_merge()
