"""`trafficwatch ingest` against the local feed and the real local S3 server, in all three API modes."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import boto3
import pytest

from trafficwatch import storage
from trafficwatch.config import Settings, load_settings
from trafficwatch.landing import ingest
from trafficwatch.payloads import normalize_payload
from trafficwatch.source import EXPORTS_PATH, Client

pytestmark = pytest.mark.integration

TRAFFICWATCH = str(Path(sys.executable).parent / "trafficwatch")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TRAFFICWATCH, *args], capture_output=True, text=True, timeout=120, env=os.environ.copy())


def raw_objects(settings: Settings) -> dict[str, bytes]:
    s3 = storage.s3_client(settings)
    keys = storage.list_keys(s3, settings.bucket, "raw/")
    return {key: s3.get_object(Bucket=settings.bucket, Key=key)["Body"].read() for key in keys}


@pytest.mark.parametrize("mode", ["exports", "records", "v1"])
def test_ingest_lands_one_object_per_upstream_snapshot(mode, feed, s3_settings, monkeypatch, sample_bytes) -> None:
    monkeypatch.setenv("TRAFFICWATCH_API_MODE", mode)
    first = run_cli("ingest")
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("landed snapshot 2024-08-26T10:43:00Z: 2859 records -> s3://")

    objects = raw_objects(s3_settings)
    assert list(objects) == ["raw/date=2024-08-26/20240826T104300Z.json.gz"]
    payload = gzip.decompress(objects["raw/date=2024-08-26/20240826T104300Z.json.gz"])
    snapshot = normalize_payload(payload)
    assert snapshot.frame["segment_key"].n_unique() == 2859
    assert snapshot.frame.equals(normalize_payload(sample_bytes).frame)
    if mode == "exports":
        with urllib.request.urlopen(feed.url + EXPORTS_PATH) as response:
            assert payload == response.read()  # landed byte for byte as the API sent it

    again = run_cli("ingest")
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("unchanged: snapshot 2024-08-26T10:43:00Z is already landed")
    assert raw_objects(s3_settings) == objects


def test_records_mode_reads_29_pages_then_one_when_unchanged(feed, s3_settings, monkeypatch) -> None:
    monkeypatch.setenv("TRAFFICWATCH_API_MODE", "records")
    settings = load_settings()
    client = Client(settings)
    assert ingest(settings, client=client).status == "landed"
    assert client.requests_made == 29
    assert ingest(settings, client=client).status == "unchanged"
    assert client.requests_made == 1


def test_a_new_upstream_snapshot_lands_beside_the_first(feed, s3_settings) -> None:
    assert ingest(s3_settings).status == "landed"
    feed.advance()
    result = ingest(s3_settings)
    assert result.status == "landed"
    assert sorted(raw_objects(s3_settings)) == [
        "raw/date=2024-08-26/20240826T104300Z.json.gz",
        "raw/date=2024-08-26/20240826T104600Z.json.gz",
    ]


def test_landed_metadata_names_source_and_checksum(feed, s3_settings) -> None:
    result = ingest(s3_settings)
    head = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).head_object(
        Bucket=s3_settings.bucket, Key=result.key
    )
    metadata = head["Metadata"]
    assert metadata["record-count"] == "2859"
    assert metadata["source-mode"] == "exports"
    assert metadata["source-url"] == f"{feed.url}{EXPORTS_PATH}"
    assert metadata["sha256"] == result.sha256


def test_ingest_help_and_bad_mode() -> None:
    assert "landed or unchanged" in run_cli("ingest", "--help").stdout
    env = {**os.environ, "TRAFFICWATCH_API_MODE": "csv"}
    done = subprocess.run([TRAFFICWATCH, "ingest"], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == "configuration error: TRAFFICWATCH_API_MODE='csv' is not one of exports, records, v1"
