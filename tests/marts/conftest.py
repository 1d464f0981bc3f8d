"""Fixtures of the marts tests: the real-pipeline serving file, and Airflow's database for DAG runs."""

from tests.dags.conftest import airflow_db  # noqa: F401
from tests.marts.fixtures import sample_serving_db  # noqa: F401
