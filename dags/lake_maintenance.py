"""
### Lake maintenance: keep the Delta tables fast and their storage bounded

Every hour, for each Delta table: compact the small files that one-minute merges leave behind, write a
checkpoint and trim the transaction log past its retention, and vacuum files no version within
`TRAFFICWATCH_VACUUM_RETENTION_HOURS` (default 168) still references. Raw snapshots older than
`TRAFFICWATCH_RAW_RETENTION_DAYS` are deleted once merged; the default, 0, keeps them all, since they
are the replay source of `trafficwatch backfill`. Same function as `trafficwatch maintain`: when the worker
service runs, the work is done there (delta-rs loaded already; this task's process stays light) with this
task's retention settings, and its log lines come back into this task's log.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import dag, task
from airflow.sdk.exceptions import AirflowException


@dag(
    schedule="@hourly",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["trafficwatch", "lake", "maintenance"],
    default_args={"owner": "trafficwatch", "retries": 2, "retry_delay": timedelta(minutes=1)},
)
def lake_maintenance() -> None:
    @task(execution_timeout=timedelta(minutes=30))
    def compact_checkpoint_vacuum() -> str:
        from trafficwatch.connections import task_settings
        from trafficwatch.errors import failure
        from trafficwatch.worker import maintain_lake

        settings = None
        try:
            settings = task_settings()
            return maintain_lake(settings).summary()
        except Exception as error:  # one line naming the cause; the traceback is in the log above it
            raise AirflowException(failure("maintenance", error, settings)) from None

    compact_checkpoint_vacuum()


lake_maintenance()
