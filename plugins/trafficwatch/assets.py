"""The Airflow assets that chain the DAGs: each names the data a stage produces, by its S3 URI."""

from __future__ import annotations

from airflow.sdk import Asset

from trafficwatch.config import load_settings

_bucket = load_settings().bucket

RAW_SNAPSHOTS = Asset(name="traffic_raw_snapshots", uri=f"s3://{_bucket}/raw")
LAKE_OBSERVATIONS = Asset(name="traffic_lake_observations", uri=f"s3://{_bucket}/lake/traffic_observations")
