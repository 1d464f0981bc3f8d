"""Every DAG file imports, and every DAG follows the project's conventions."""

from __future__ import annotations

import sys
from datetime import timedelta

import pytest
from airflow.dag_processing.dagbag import DagBag

from tests.conftest import REPO

pytestmark = pytest.mark.airflow


@pytest.fixture(scope="module")
def dagbag(airflow_db) -> DagBag:
    # trafficwatch.assets names its bucket at import: imported first by a test whose environment named a
    # bucket of its own, it would keep that one. The DAGs are parsed here in the session's environment.
    sys.modules.pop("trafficwatch.assets", None)
    return DagBag(dag_folder=str(REPO / "dags"))


def test_no_import_errors(dagbag: DagBag) -> None:
    assert dagbag.import_errors == {}
    assert "traffic_ingest" in dagbag.dag_ids


def test_every_dag_is_documented_tagged_owned_and_retried(dagbag: DagBag) -> None:
    for dag_id, dag in dagbag.dags.items():
        assert dag.doc_md and len(dag.doc_md) > 100, f"{dag_id} has no doc_md"
        assert "trafficwatch" in dag.tags, f"{dag_id} lacks the trafficwatch tag"
        assert dag.catchup is False, f"{dag_id} catches up"
        for task in dag.tasks:
            assert task.owner == "trafficwatch", f"{dag_id}.{task.task_id} has owner {task.owner}"
            assert task.retries >= 1, f"{dag_id}.{task.task_id} has no retries"


def test_ingest_fits_a_one_minute_cadence(dagbag: DagBag) -> None:
    dag = dagbag.dags["traffic_ingest"]
    assert dag.max_active_runs == 1
    assert dag.dagrun_timeout is not None and dag.dagrun_timeout < timedelta(minutes=1)
    (task,) = dag.tasks
    assert task.execution_timeout < timedelta(minutes=1)
    assert task.retry_delay < timedelta(minutes=1)
    assert [outlet.uri for outlet in task.outlets] == ["s3://trafficwatch/raw"]
