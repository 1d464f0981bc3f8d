"""
### Traffic ingest: land every new Rennes traffic snapshot in S3

Every minute, fetch the whole real-time snapshot of the 2,859 road segments of Rennes Métropole from the
Opendatasoft API (the Airflow connection `trafficwatch_api`, else `TRAFFICWATCH_API_URL`; `TRAFFICWATCH_API_MODE`)
and land it unchanged under `raw/` in the `TRAFFICWATCH_BUCKET` bucket (S3 from the Airflow connection
`trafficwatch_s3`, else the AWS variables), keyed by the snapshot's upstream `datetime`.

The upstream publishes about every 3 minutes, so most polls find a snapshot that is already landed: the
task then writes nothing and ends **skipped**, and no asset event is emitted. A **success** means a new
snapshot landed and `traffic_raw_snapshots` was updated. A **failure** carries a one-line reason in the
log (HTTP status, timeout, invalid JSON at byte N, wrong payload shape, record count mismatch); the body
received, if any, is kept under `quarantine/`.

Runs never overlap (`max_active_runs=1`) and each run must end within the minute.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import dag, task
from airflow.sdk.exceptions import AirflowException, AirflowSkipException

from trafficwatch.assets import RAW_SNAPSHOTS


@dag(
    schedule="* * * * *",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    dagrun_timeout=timedelta(seconds=58),
    doc_md=__doc__,
    tags=["trafficwatch", "ingest", "rennes"],
    default_args={
        "owner": "trafficwatch",
        "retries": 2,
        "retry_delay": timedelta(seconds=5),
        "execution_timeout": timedelta(seconds=45),
    },
)
def traffic_ingest() -> None:
    @task(outlets=[RAW_SNAPSHOTS])
    def fetch_and_land(*, outlet_events=None) -> dict[str, str | int]:
        from trafficwatch.connections import task_settings
        from trafficwatch.errors import failure
        from trafficwatch.landing import ingest

        settings = None
        try:
            settings = task_settings()
            result = ingest(settings)
        except Exception as error:  # one line naming the cause; the traceback is in the log above it
            raise AirflowException(failure("ingest", error, settings)) from None
        if not result.landed:
            raise AirflowSkipException(result.summary(settings.bucket))
        outlet_events[RAW_SNAPSHOTS].extra = result.as_dict()
        return result.as_dict()

    fetch_and_land()


traffic_ingest()
