"""The marts builder service: a real `trafficwatch marts-builder` process serving `build_marts` requests."""

from __future__ import annotations

import logging
import socket
from dataclasses import replace

import duckdb
import pytest

from tests.conftest import SAMPLE_RECORDS, land_raw
from trafficwatch import builder, lake, services, serving

pytestmark = pytest.mark.integration


@pytest.fixture
def marts_builder(s3_settings):
    """The builder, started as `make demo` starts it, on the test's home and bucket; stopped by its group."""
    service = services.marts_builder(builder.socket_path(s3_settings))
    services.start(service, s3_settings.home)
    yield s3_settings
    services.stop(s3_settings.home, service.name)


def test_builds_run_in_the_builder_and_failures_come_back(marts_builder, sample_bytes, caplog) -> None:
    settings = marts_builder
    land_raw(settings, sample_bytes)
    lake.merge_pending(settings)
    with caplog.at_level(logging.INFO, logger="trafficwatch.builder"):
        result = builder.build_marts(settings)
    assert "built by the marts builder" in caplog.text
    assert result.rows["segment_latest"] == SAMPLE_RECORDS
    assert result.serving_db == serving.ServingConfig.from_env(settings).serving_db
    with duckdb.connect(str(result.serving_db), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM segment_latest").fetchone() == (SAMPLE_RECORDS,)
    log_text = (settings.home / "logs" / "marts-builder.log").read_text()
    assert "marts builder ready" in log_text and "built " in log_text  # the dbt build ran over there

    # A requester for another bucket is not served by this builder: it builds in its own process.
    caplog.clear()
    other = replace(settings, bucket=settings.bucket + "-other")
    with caplog.at_level(logging.WARNING, logger="trafficwatch.builder"), pytest.raises(serving.BuildError):
        builder.build_marts(other)  # ... and that bucket has no lake: the local build fails, one line
    assert f"this builder serves home {settings.home} and bucket {settings.bucket}" in caplog.text


def test_a_socket_left_by_a_stopped_builder_means_building_here(s3_settings, sample_bytes, caplog) -> None:
    path = builder.socket_path(s3_settings)
    path.parent.mkdir(parents=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(str(path))  # bound, never listening: what a killed builder leaves
    land_raw(s3_settings, sample_bytes)
    lake.merge_pending(s3_settings)
    with caplog.at_level(logging.INFO, logger="trafficwatch.builder"):
        result = builder.build_marts(s3_settings)
    assert "built by the marts builder" not in caplog.text
    assert result.rows["segment_latest"] == SAMPLE_RECORDS
