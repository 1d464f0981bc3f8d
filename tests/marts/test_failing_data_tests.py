"""A failing data test stops the publish, names the test, and fails the Airflow task without retrying.

The warehouse is damaged on purpose (a segment's latest observation duplicated), which the minute's guard
test (dbt_project/tests/guard_built_rows.sql) must catch on the next build, naming the model and the rule
(with no new snapshot, which would replace that segment's rows and repair it).
"""

from __future__ import annotations

import re

import duckdb
import pytest
from airflow.dag_processing.dagbag import DagBag

import trafficwatch.assets  # noqa: F401  (imported now, with the default bucket: see below)
from tests.conftest import REPO, land_raw
from tests.marts.fixtures import serving_config
from trafficwatch import dbt_build, lake, serving

pytestmark = pytest.mark.integration

FAILING_TEST = dbt_build.GUARD_TEST
FINDING = "int_segment_last_observation: duplicate segment_key (2 rows)"
# trafficwatch.assets reads the bucket when first imported; imported above, at collection, its assets keep
# the default bucket instead of a test's, which the DAG integrity test checks whatever the test order.


def _built_at(config: serving.ServingConfig):
    with duckdb.connect(str(config.serving_db), read_only=True) as con:
        return con.execute("SELECT built_at FROM meta.publish").fetchone()[0]


def _duplicate_a_latest_observation(config: serving.ServingConfig) -> None:
    with duckdb.connect(str(config.warehouse_db)) as con:
        con.execute(
            "INSERT INTO main.int_segment_last_observation SELECT * FROM main.int_segment_last_observation LIMIT 1"
        )


def _node_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    messages = [record.getMessage() for record in caplog.records if record.name == dbt_build.log.name]
    return [message for message in messages if re.match(r"dbt (model|test|operation) \S+: ", message)]


def test_a_failing_data_test_names_itself_and_nothing_is_published(s3_settings, sample_bytes, caplog, capfd) -> None:
    config = serving_config(s3_settings)
    land_raw(s3_settings, sample_bytes)
    lake.merge_pending(s3_settings)
    caplog.set_level("INFO", logger=dbt_build.log.name)
    built = serving.build(s3_settings, config)
    published = _built_at(config)
    # One line per node, logged by trafficwatch (dbt's own console and file loggers are off).
    lines = _node_lines(caplog)
    assert len(lines) == sum(built.nodes.values())
    assert any(line.startswith("dbt model segment_latest: success in ") for line in lines)
    assert f"dbt test {FAILING_TEST}: pass in " in " ".join(lines)
    assert "PASS=" not in capfd.readouterr().out

    caplog.clear()
    _duplicate_a_latest_observation(config)
    with pytest.raises(serving.DataTestsFailed) as failure:
        serving.build(s3_settings, config)
    assert any(line.startswith(f"dbt test {FAILING_TEST}: fail in ") for line in _node_lines(caplog))
    assert failure.value.tests == [FAILING_TEST]
    message = str(failure.value)
    assert "\n" not in message
    assert FAILING_TEST in message and "not published" in message
    assert FINDING in message
    assert _built_at(config) == published  # the dashboards keep the previous file


@pytest.mark.airflow
def test_marts_dag_publishes_then_fails_without_retry_on_a_failing_test(
    airflow_db, s3_settings, sample_bytes, capfd
) -> None:
    dag = DagBag(dag_folder=str(REPO / "dags" / "traffic_marts.py")).dags["traffic_marts"]
    config = serving.ServingConfig.from_env(s3_settings)
    land_raw(s3_settings, sample_bytes)
    lake.merge_pending(s3_settings)

    first = dag.test()
    (task,) = first.get_task_instances()
    assert (first.state, task.state) == ("success", "success")
    published = _built_at(config)

    _duplicate_a_latest_observation(config)
    second = dag.test()
    (task,) = second.get_task_instances()
    assert (second.state, task.state) == ("failed", "failed")  # failed, not up_for_retry
    assert _built_at(config) == published
    log = capfd.readouterr()
    assert FAILING_TEST in log.out + log.err and FINDING in log.out + log.err
