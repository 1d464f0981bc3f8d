"""The Airflow assets that chain the DAGs: each names the data a stage produces, by its URI (S3, or file for
the serving DuckDB)."""

from __future__ import annotations

from airflow.sdk import Asset

# Light imports only: every DAG file imports this module, so every task process and DAG parse does too.
from trafficwatch.config import load_settings, serving_db_path

_settings = load_settings()
_bucket = _settings.bucket

RAW_SNAPSHOTS = Asset(name="traffic_raw_snapshots", uri=f"s3://{_bucket}/raw")
LAKE_OBSERVATIONS = Asset(name="traffic_lake_observations", uri=f"s3://{_bucket}/lake/traffic_observations")
SERVING_DB = Asset(name="traffic_serving_db", uri=serving_db_path(_settings).as_uri())
