"""
### Marts audit: the data tests a minute's build leaves out, every hour

A build after every merge runs one data test, the guard (`dbt_project/tests/guard_built_rows.sql`): the
models' rules (keys, required columns, accepted values) on the rows that build rebuilt, in one query.
Here, once an hour, every model's YAML data tests check the same rules over whole tables, and the tests of
the staging models check the lake itself over its last two days: one row per segment and snapshot, only
known traffic statuses, one version in force per road segment (the merge guarantees those).

A failure names the failing tests in one line, is not retried (the same data fails the same way) and
needs an operator. Same function as
`trafficwatch audit`; it waits for a running build (one writer on the warehouse) and holds the next. Skipped
until the marts have been built once (a new home). When the worker service runs, the audit runs there, where
dbt is imported already: this task's process stays light beside the minute's tasks.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import dag, task
from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowSkipException


@dag(
    schedule="@hourly",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["trafficwatch", "dbt", "audit"],
    default_args={"owner": "trafficwatch", "retries": 1, "retry_delay": timedelta(minutes=1)},
)
def marts_audit() -> None:
    @task(execution_timeout=timedelta(minutes=20))
    def audit_lake_through_staging() -> dict:
        from trafficwatch.connections import task_settings
        from trafficwatch.errors import DataTestsFailed, failure
        from trafficwatch.worker import audit_marts

        settings = None
        try:
            settings = task_settings()
            counts = audit_marts(settings)
        except DataTestsFailed as error:  # the same data would fail the same way: no retry
            raise AirflowFailException(failure("audit", error, settings)) from None
        except Exception as error:  # one line naming the cause; the traceback is in the log above it
            raise AirflowException(failure("audit", error, settings)) from None
        if not counts["data tests"]:
            raise AirflowSkipException("nothing to audit: the marts have not been built yet")
        return counts

    audit_lake_through_staging()


marts_audit()
