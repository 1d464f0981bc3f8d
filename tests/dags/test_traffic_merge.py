"""`traffic_merge` run for real with dag.test(): the sensor defers, the merge runs, reruns change nothing."""

from __future__ import annotations

import pytest
from airflow.dag_processing.dagbag import DagBag

from tests.conftest import REPO, land_raw, redated
from trafficwatch import lake

pytestmark = [pytest.mark.airflow, pytest.mark.integration]


def _states(dag_run) -> dict[str, str]:
    return {ti.task_id: ti.state for ti in dag_run.get_task_instances()}


def test_merge_dag_merges_pending_snapshots_and_reruns_change_nothing(
    airflow_db, s3_settings, sample_bytes, monkeypatch
) -> None:
    monkeypatch.setenv("TRAFFICWATCH_MERGE_WAIT_TIMEOUT", "3")
    monkeypatch.setenv("TRAFFICWATCH_MERGE_POLL_INTERVAL", "0.5")
    dag = DagBag(dag_folder=str(REPO / "dags" / "traffic_merge.py")).dags["traffic_merge"]
    land_raw(s3_settings, sample_bytes)
    land_raw(s3_settings, redated(sample_bytes, 3))

    first = dag.test()
    assert _states(first) == {"wait_for_landed_snapshots": "success", "merge_pending_snapshots": "success"}
    status = lake.status(s3_settings)
    assert status["pending_raw_objects"] == 0
    assert status["tables"]["traffic_observations"]["rows"] == 2 * 2859
    tables = {name: (t["version"], t["rows"]) for name, t in status["tables"].items()}

    second = dag.test()  # nothing new: the sensor gives up after its timeout and the run skips
    assert _states(second) == {"wait_for_landed_snapshots": "skipped", "merge_pending_snapshots": "skipped"}
    assert {name: (t["version"], t["rows"]) for name, t in lake.status(s3_settings)["tables"].items()} == tables

    land_raw(s3_settings, redated(sample_bytes, 6))  # a producer other than the ingest DAG lands one
    third = dag.test()
    assert _states(third)["merge_pending_snapshots"] == "success"
    assert lake.status(s3_settings)["tables"]["traffic_observations"]["rows"] == 3 * 2859
