"""Every DAG task fails with one line naming the cause, the same line `trafficwatch` prints.

Each task's function runs as Airflow would call it, against an S3 endpoint nothing listens on; one DAG
also runs whole with dag.test().
"""

from __future__ import annotations

import re
import socket

import pytest
from airflow.dag_processing.dagbag import DagBag
from airflow.sdk.exceptions import AirflowException

from tests.conftest import REPO

pytestmark = [pytest.mark.airflow, pytest.mark.integration]

# (DAG, task, what the line says failed)
TASKS = [
    ("traffic_ingest", "fetch_and_land", "ingest"),
    ("traffic_merge", "merge_pending_snapshots", "merge"),
    ("lake_maintenance", "compact_checkpoint_vacuum", "maintenance"),
    ("pipeline_freshness", "check_dashboards_freshness", "freshness check"),
]


@pytest.fixture(scope="module")
def dags(airflow_db) -> dict:
    return DagBag(dag_folder=str(REPO / "dags")).dags


@pytest.fixture
def closed_endpoint(s3_settings, monkeypatch) -> str:
    """The test's settings, but S3 at a loopback port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    return endpoint


@pytest.mark.parametrize(("dag_id", "task_id", "action"), TASKS, ids=[task for _, task, _ in TASKS])
def test_task_fails_with_one_line_naming_the_cause(dag_id, task_id, action, dags, closed_endpoint, request) -> None:
    if dag_id == "traffic_ingest":
        request.getfixturevalue("feed")  # the snapshot is fetched; landing it fails
    task = dags[dag_id].get_task(task_id)
    with pytest.raises(AirflowException) as failure:
        task.python_callable()
    assert str(failure.value) == f"{action} failed: S3 endpoint {closed_endpoint} unreachable (connection refused)"
    assert failure.value.__suppress_context__  # raised `from None`: Airflow shows this line, not a chain


@pytest.mark.parametrize(
    ("dag_id", "task_id", "action"),
    [("traffic_marts", "build_and_publish_marts", "build"), ("marts_audit", "audit_lake_through_staging", "audit")],
)
def test_marts_tasks_fail_with_one_line(dag_id, task_id, action, dags, s3_settings, monkeypatch) -> None:
    monkeypatch.setenv("TRAFFICWATCH_SERVING_DAYS", "a week")
    task = dags[dag_id].get_task(task_id)
    with pytest.raises(AirflowException) as failure:
        task.python_callable()
    assert str(failure.value) == (
        f"{action} failed: configuration error: TRAFFICWATCH_SERVING_DAYS='a week' is not a whole number of days"
    )


def test_a_dag_run_fails_with_that_line_in_its_log(dags, closed_endpoint, capfd, monkeypatch) -> None:
    dag = dags["lake_maintenance"]
    monkeypatch.setattr(dag.get_task("compact_checkpoint_vacuum"), "retries", 0)  # fail now, not in 2 minutes
    run = dag.test()
    (task,) = run.get_task_instances()
    assert (run.state, task.state) == ("failed", "failed")
    output = capfd.readouterr()
    line = f"maintenance failed: S3 endpoint {closed_endpoint} unreachable (connection refused)"
    assert line in output.out + output.err


def test_merge_sensor_and_its_trigger_fail_with_one_line(dags, closed_endpoint) -> None:
    import asyncio

    from trafficwatch.waiting import PendingRawTrigger

    expected = f"wait for landed snapshots failed: S3 endpoint {closed_endpoint} unreachable (connection refused)"
    sensor = dags["traffic_merge"].get_task("wait_for_landed_snapshots")
    with pytest.raises(AirflowException) as failure:
        sensor.execute(context={})
    assert str(failure.value) == expected
    assert failure.value.__suppress_context__

    async def first_event() -> dict:
        async for event in PendingRawTrigger(poll_interval_s=0.1, wait_s=5).run():
            return event.payload
        raise AssertionError("the trigger ended without an event")

    event = asyncio.run(first_event())  # the triggerer hands the line back to the task
    assert event == {"pending": 0, "error": expected}
    with pytest.raises(AirflowException, match=f"^{re.escape(expected)}$"):
        sensor.execute_complete(context={}, event=event)
