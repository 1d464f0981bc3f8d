"""Maintenance keeps files and logs bounded under one-minute merges, and expires only merged raw objects."""

from __future__ import annotations

import time

import boto3
import pytest

from tests.conftest import land_raw, redated
from trafficwatch import lake
from trafficwatch.config import load_settings

pytestmark = pytest.mark.integration

MERGES = 120  # two simulated hours of one-minute merges
MAINTAIN_EVERY = 30


def _log_files(settings, name: str) -> int:
    client = boto3.client("s3", endpoint_url=settings.s3_endpoint_url)
    prefix = f"lake/{name}/_delta_log/"
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=settings.bucket, Prefix=prefix).get("Contents", [])]
    return sum(1 for key in keys if key.endswith(".json"))


def _data_files(settings, name: str) -> int:
    client = boto3.client("s3", endpoint_url=settings.s3_endpoint_url)
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=settings.bucket, Prefix=f"lake/{name}/")
    return sum(1 for page in pages for o in page.get("Contents", []) if o["Key"].endswith(".parquet"))


@pytest.mark.timeout(900)
def test_files_and_logs_stay_bounded_under_one_minute_merges(s3_settings, sample_bytes, monkeypatch) -> None:
    monkeypatch.setenv("TRAFFICWATCH_LOG_RETENTION", "interval 1 seconds")
    monkeypatch.setenv("TRAFFICWATCH_VACUUM_RETENTION_HOURS", "0")
    settings = load_settings()
    # A 3-minute upstream with a few snapshots re-dated so every minute brings one: 120 merges.
    bodies = [redated(sample_bytes, minute) for minute in range(MERGES)]
    for minute, body in enumerate(bodies, start=1):
        land_raw(settings, body)
        lake.merge_pending(settings)
        if minute % MAINTAIN_EVERY == 0:
            time.sleep(1.1)  # let the log entries pass their (test-sized) retention
            lake.maintain(settings)
    status = lake.status(settings)
    assert status["pending_raw_objects"] == 0
    assert status["tables"]["traffic_observations"]["rows"] == MERGES * 2859
    for name in ("traffic_observations", "merge_log"):
        assert status["tables"][name]["files"] <= 2, status["tables"][name]  # one per partition after compaction
        assert _data_files(settings, name) <= 2  # vacuum removed what compaction replaced
        assert _log_files(settings, name) <= 3  # commits since the last checkpoint, not the whole history


def test_raw_expiry_deletes_only_old_merged_objects(s3_settings, sample_bytes, monkeypatch) -> None:
    monkeypatch.setenv("TRAFFICWATCH_RAW_RETENTION_DAYS", "1")
    settings = load_settings()
    merged_old = land_raw(settings, sample_bytes)  # measured in 2024: long past the retention
    lake.merge_pending(settings)
    pending_old = land_raw(settings, redated(sample_bytes, 3))  # old too, but not merged yet
    result = lake.maintain(settings)
    assert result.expired_raw_objects == 1
    client = boto3.client("s3", endpoint_url=settings.s3_endpoint_url)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=settings.bucket, Prefix="raw/")["Contents"]]
    assert keys == [pending_old]
    assert merged_old not in keys


def test_default_retention_keeps_every_raw_object(s3_settings, sample_bytes) -> None:
    land_raw(s3_settings, sample_bytes)
    lake.merge_pending(s3_settings)
    assert lake.maintain(s3_settings).expired_raw_objects == 0
    assert lake.status(s3_settings)["raw_objects"] == 1
