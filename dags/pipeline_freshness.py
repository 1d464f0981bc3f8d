"""
### Pipeline freshness: alert when the dashboards fall behind while the source still publishes

Every 2 minutes, one task compares the newest data the dashboards show (the newest `measured_at` of
`segment_latest` in the serving DuckDB, as `trafficwatch lag` reads it) with `TRAFFICWATCH_STALE_AFTER`
(default 600 s), and looks at the newest snapshot landed in `raw/`.

- **success**: fresh; the log line says how old the data shown is.
- **failed**: *stale*: the data shown is older than the threshold **while the source is up**, i.e. the
  newest snapshot in `raw/` landed within the threshold, so the merge, the dbt build or the publish is
  stuck, not the upstream. The one-line reason names both, e.g. `dashboards stale: newest data shown
  2026-11-30T10:02:00+00:00 is 14.2 min old (threshold 10 min); newest landed 2026-11-30T10:14:00+00:00
  (landed 0.5 min ago), merged: no`. Look at `traffic_merge` (merged: no) or `traffic_marts` (merged: yes).
  A failure is not retried (the next check is 2 minutes later); a check that could not read S3 or the
  serving file is retried once, then fails with that cause.
- **skipped**: the source is quiet (nothing landed within the threshold: the upstream or `traffic_ingest`
  is down, and `traffic_ingest` shows which), or nothing has landed yet. No alert: stale dashboards are
  then expected.

When the task fails, the notifier `TRAFFICWATCH_ALERT_NOTIFIER` names is called (`smtp`: an e-mail to
`TRAFFICWATCH_ALERT_EMAIL_TO` through the Airflow connection `trafficwatch_smtp`, subject the one line), once
when the check turns red, not again while it stays red. Unset: the failed task is the only signal. Same
function as `trafficwatch check-freshness`.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import dag, task
from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowSkipException

from trafficwatch.alerts import notifier_from_env


@dag(
    schedule="*/2 * * * *",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    dagrun_timeout=timedelta(minutes=2),
    doc_md=__doc__,
    tags=["trafficwatch", "monitoring", "alert"],
    default_args={
        "owner": "trafficwatch",
        "retries": 1,
        "retry_delay": timedelta(seconds=20),
        "execution_timeout": timedelta(seconds=90),
    },
)
def pipeline_freshness() -> None:
    @task(on_failure_callback=notifier_from_env())
    def check_dashboards_freshness() -> dict:
        from trafficwatch import alerts, worker
        from trafficwatch.connections import task_settings
        from trafficwatch.errors import failure

        settings = None
        try:
            settings = task_settings()
            freshness = worker.check_freshness(settings)  # in the worker when one runs: this process stays light
        except Exception as error:  # one line naming the cause; the traceback is in the log above it
            raise AirflowException(failure("freshness check", error, settings)) from None
        if freshness.stale:  # the same state would fail the same way: no retry, the next check comes soon
            raise AirflowFailException(freshness.line)
        if freshness.state != alerts.FRESH:
            raise AirflowSkipException(freshness.line)
        return freshness.as_dict()

    check_dashboards_freshness()


pipeline_freshness()
