"""Fixtures of the marts tests: the real-pipeline serving file, and Airflow's database for DAG runs."""

from dataclasses import replace

import pytest

from tests.dags.conftest import airflow_db  # noqa: F401
from tests.marts.fixtures import sample_serving_db  # noqa: F401
from trafficwatch.config import Settings


@pytest.fixture
def s3_settings(s3_settings: Settings) -> Settings:
    """The root fixture's settings, taking hand-made snapshots of a few segments (not refused as partial
    answers: TRAFFICWATCH_MIN_RECORDS)."""
    return replace(s3_settings, min_records=1)
