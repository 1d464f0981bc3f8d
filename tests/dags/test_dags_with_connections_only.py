"""The DAGs run with S3 given only as an Airflow connection: dag.test() with every AWS variable unset in the
process, `AIRFLOW_CONN_TRAFFICWATCH_S3` pointing at the real local S3 server, and the API's base URL given
only as the `http` connection `AIRFLOW_CONN_TRAFFICWATCH_API`."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import boto3
import botocore.exceptions
import duckdb
import pytest
from airflow.dag_processing.dagbag import DagBag

from tests.conftest import REPO, SAMPLE_RECORDS, land_raw
from trafficwatch import lake, serving, storage
from trafficwatch.config import load_settings

pytestmark = [pytest.mark.airflow, pytest.mark.integration]

AWS_VARIABLES = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_REGION",
    "AWS_DEFAULT_REGION", "AWS_PROFILE",
)  # fmt: skip


def _dag(name: str):
    return DagBag(dag_folder=str(REPO / "dags" / f"{name}.py")).dags[name]


def _states(dag_run) -> dict[str, str]:
    return {ti.task_id: ti.state for ti in dag_run.get_task_instances()}


@pytest.fixture
def connections_only(airflow_db, s3_server, s3_settings, feed, monkeypatch, tmp_path):
    """S3 and the API as Airflow connections only: no AWS variable, no TRAFFICWATCH_API_URL in the process.
    Yields the settings the test itself checks the lake with (explicit keys: the environment has none)."""
    keys = {"login": os.environ["AWS_ACCESS_KEY_ID"], "password": os.environ["AWS_SECRET_ACCESS_KEY"]}
    s3 = {"conn_type": "aws", **keys, "extra": {"endpoint_url": s3_server, "region_name": "us-east-1"}}
    monkeypatch.setenv("AIRFLOW_CONN_TRAFFICWATCH_S3", json.dumps(s3))
    monkeypatch.setenv("AIRFLOW_CONN_TRAFFICWATCH_API", json.dumps({"conn_type": "http", "host": feed.url}))
    for name in (*AWS_VARIABLES, "TRAFFICWATCH_API_URL"):
        monkeypatch.delenv(name, raising=False)
    # No credentials file either: nothing but the connection can give the keys.
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    # boto3's default session keeps the credentials it found first (the environment's, earlier in the session).
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)
    monkeypatch.setenv("TRAFFICWATCH_MERGE_WAIT_TIMEOUT", "3")
    monkeypatch.setenv("TRAFFICWATCH_MERGE_POLL_INTERVAL", "0.5")
    return replace(s3_settings, aws_access_key_id=keys["login"], aws_secret_access_key=keys["password"])


def test_ingest_and_merge_run_with_s3_only_as_an_airflow_connection(connections_only) -> None:
    checked = connections_only
    # The environment alone reaches no S3 now: whatever lands below came through the connections.
    with pytest.raises(botocore.exceptions.NoCredentialsError):
        storage.s3_client(replace(load_settings(), s3_endpoint_url=checked.s3_endpoint_url)).list_buckets()

    ingest = _dag("traffic_ingest").test()
    assert _states(ingest) == {"fetch_and_land": "success"}  # fetched from the feed named by trafficwatch_api
    assert storage.list_keys(storage.s3_client(checked), checked.bucket, "raw/") == [
        "raw/date=2024-08-26/20240826T104300Z.json.gz"
    ]

    merge = _dag("traffic_merge").test()
    assert _states(merge) == {"wait_for_landed_snapshots": "success", "merge_pending_snapshots": "success"}
    status = lake.status(checked)
    assert status["pending_raw_objects"] == 0
    assert status["tables"]["traffic_observations"]["rows"] == SAMPLE_RECORDS

    maintenance = _dag("lake_maintenance").test()
    assert _states(maintenance) == {"compact_checkpoint_vacuum": "success"}


def test_marts_build_and_freshness_check_read_the_lake_with_the_connection_credentials(
    connections_only, sample_bytes, monkeypatch
) -> None:
    """dbt's DuckDB gets the connection's keys: the build reads the Delta tables on the local S3 and publishes."""
    checked = connections_only
    land_raw(checked, sample_bytes)
    lake.merge_pending(checked)

    marts = _dag("traffic_marts").test()
    assert _states(marts) == {"build_and_publish_marts": "success"}
    with duckdb.connect(str(serving.serving_db_path(checked)), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM segment_latest").fetchone()[0] == SAMPLE_RECORDS
    # The build put the process's AWS variables back as they were: none.
    assert not [name for name in AWS_VARIABLES if name in os.environ]

    # The freshness check reads raw/ and the serving file: fresh under a threshold of years (the sample is of 2024).
    monkeypatch.setenv("TRAFFICWATCH_STALE_AFTER", str(20 * 365 * 86400))
    freshness = _dag("pipeline_freshness").test()
    assert _states(freshness) == {"check_dashboards_freshness": "success"}
