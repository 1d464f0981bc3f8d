"""
### Traffic marts: dbt build after every merge, then the serving DuckDB the dashboards read

Runs whenever `traffic_merge` has merged new snapshots (asset `traffic_lake_observations`); events that
arrive while a run is going are served together by the next run.

One `dbt build` (dbt-duckdb, project `dbt_project/`) reads the Delta tables in place and builds the
speed and travel-time marts into the warehouse DuckDB (`$TRAFFICWATCH_HOME/warehouse/traffic.duckdb`),
then one data test, the guard, over the rows it rebuilt (the models' YAML tests run hourly in
`marts_audit`). Large marts are incremental: a build's cost follows the new data,
not the history. Then the marts are published to the serving file (`$TRAFFICWATCH_HOME/serving/traffic.duckdb`)
by atomic replace, so a dashboard never sees a lock error or a half-built state.

If the guard fails, nothing is published (the dashboards keep the previous file), the task fails with
the failing tests named in one line, and it is not retried: the same data would fail the same way. The
log above that line has one line per dbt node with its result. Other errors are retried once. Same
function as `trafficwatch build`: when the worker service runs (`make demo` and `make up` start it), the
build runs there, in a process that imported dbt once, instead of paying dbt's 5-6 s import in every task;
those lines come back into the task log, and they and dbt's warnings are in
`$TRAFFICWATCH_HOME/logs/worker.log` (dbt's warnings are in the task log when the task builds itself).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import dag, task
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from trafficwatch.assets import LAKE_OBSERVATIONS, SERVING_DB


@dag(
    schedule=[LAKE_OBSERVATIONS],
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,  # the warehouse DuckDB file has a single writer: builds must not overlap
    doc_md=__doc__,
    tags=["trafficwatch", "dbt", "marts"],
    default_args={"owner": "trafficwatch", "retries": 1, "retry_delay": timedelta(seconds=30)},
)
def traffic_marts() -> None:
    @task(outlets=[SERVING_DB], execution_timeout=timedelta(minutes=30))
    def build_and_publish_marts() -> dict:
        from trafficwatch.connections import task_settings
        from trafficwatch.errors import DataTestsFailed, failure
        from trafficwatch.worker import build_marts

        settings = None
        try:
            settings = task_settings()
            return build_marts(settings).as_dict()
        except DataTestsFailed as error:  # the same data would fail the same way: no retry
            raise AirflowFailException(failure("build", error, settings)) from None
        except Exception as error:  # one line naming the cause; the traceback is in the log above it
            raise AirflowException(failure("build", error, settings)) from None

    build_and_publish_marts()


traffic_marts()
