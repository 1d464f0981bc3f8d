"""Serving files built through the real pipeline (land -> merge -> dbt build -> publish), for any test.

`sample_serving_db` is a session fixture: the real sample snapshot landed on the session's local S3
server, merged into the lake, modelled by dbt and published, exactly as production does it. Tests of
the dashboards use it instead of a hand-made file; import it into a conftest to use it:

    from tests.marts.fixtures import sample_serving_db  # noqa: F401

`build_serving_db(pipeline_settings(...), bodies)` does the same with any payloads (e.g. the sample
re-dated with `tests.conftest.redated`, or the feed's Simulator), for a file with more history.
"""

from __future__ import annotations

import uuid
from dataclasses import replace
from pathlib import Path

import boto3
import duckdb
import polars as pl
import pytest

from trafficwatch import lake, serving
from trafficwatch.config import Settings, load_settings

MART_NAMES = tuple(mart.name for mart in serving.MARTS)


def pipeline_settings(s3_url: str, home: Path, bucket: str | None = None) -> Settings:
    """Settings for a fresh bucket on the test S3 server, with all local state under `home`."""
    bucket = bucket or f"tw-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_url, region_name="us-east-1").create_bucket(Bucket=bucket)
    # Hand-made snapshots of a few segments: not refused as partial answers (TRAFFICWATCH_MIN_RECORDS).
    return replace(
        load_settings(), home=home, bucket=bucket, s3_endpoint_url=s3_url, aws_region="us-east-1", min_records=1
    )


def serving_config(settings: Settings, days: int = serving.DEFAULT_SERVING_DAYS) -> serving.ServingConfig:
    """Where a test's warehouse and serving file go: under its home, whatever the environment says."""
    return serving.ServingConfig(
        home=settings.home,
        warehouse_db=settings.home / "warehouse" / "traffic.duckdb",
        serving_db=settings.home / "serving" / "traffic.duckdb",
        serving_days=days,
    )


def build_serving_db(settings: Settings, bodies: list[bytes]) -> Path:
    """Land the payloads, merge them, build and publish: the serving file's path."""
    from tests.conftest import land_raw  # here, so that tests/conftest.py may import this module

    for body in bodies:
        land_raw(settings, body)
    lake.merge_pending(settings)
    return serving.build(settings, serving_config(settings)).serving_db


def read_marts(path: Path) -> dict[str, pl.DataFrame]:
    """Every mart of a serving file, read-only, as the dashboards see it."""
    with duckdb.connect(str(path), read_only=True) as con:
        con.execute("SET TimeZone = 'UTC'")
        return {name: con.sql(f"SELECT * FROM main.{name}").pl() for name in MART_NAMES}


def comparable(marts: dict[str, pl.DataFrame]) -> dict[str, pl.DataFrame]:
    """Marts sorted on every column, without the ages that depend on when the build ran."""
    frames = {}
    for name, frame in marts.items():
        frame = frame.drop("minutes_since_update", strict=False)
        frames[name] = frame.sort(frame.columns, nulls_last=True)
    return frames


def assert_same_marts(left: dict[str, pl.DataFrame], right: dict[str, pl.DataFrame]) -> None:
    """Same rows in every mart; floats equal but for summation order (incremental sums add up otherwise)."""
    for name in left:
        assert left[name].columns == right[name].columns, name
        assert left[name].height == right[name].height, name
        for column in left[name].columns:
            a, b = left[name][column], right[name][column]
            if a.dtype.is_float():
                assert (a.is_null() == b.is_null()).all(), f"{name}.{column}: nulls differ"
                assert a.drop_nulls().to_list() == pytest.approx(b.drop_nulls().to_list(), rel=1e-9), f"{name}.{column}"
            else:
                assert a.to_list() == b.to_list(), f"{name}.{column}"


@pytest.fixture(scope="session")
def sample_serving_db(s3_server: str, sample_bytes: bytes, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A serving DuckDB built from the real sample snapshot (2,859 segments) through the whole pipeline."""
    settings = pipeline_settings(s3_server, tmp_path_factory.mktemp("sample-serving"))
    return build_serving_db(settings, [sample_bytes])
