"""`traffic_ingest` run for real with dag.test(), against the local feed and the real local S3 server."""

from __future__ import annotations

import pytest
from airflow.dag_processing.dagbag import DagBag

from tests.conftest import REPO
from trafficwatch import storage

pytestmark = [pytest.mark.airflow, pytest.mark.integration]


def _task_state(dag_run) -> str:
    (ti,) = dag_run.get_task_instances()
    return ti.state


def test_dag_lands_a_new_snapshot_then_skips_an_unchanged_one(airflow_db, feed, s3_settings) -> None:
    dag = DagBag(dag_folder=str(REPO / "dags" / "traffic_ingest.py")).dags["traffic_ingest"]
    s3 = storage.s3_client(s3_settings)

    first = dag.test()
    assert first.state == "success"
    assert _task_state(first) == "success"
    assert storage.list_keys(s3, s3_settings.bucket, "raw/") == ["raw/date=2024-08-26/20240826T104300Z.json.gz"]

    second = dag.test()
    assert second.state == "success"
    assert _task_state(second) == "skipped"  # unchanged upstream: nothing written, no asset event
    assert storage.list_keys(s3, s3_settings.bucket, "raw/") == ["raw/date=2024-08-26/20240826T104300Z.json.gz"]
