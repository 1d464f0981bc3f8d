"""The raw zone on S3 (moto): keys, metadata, landing once, quarantine."""

from __future__ import annotations

import gzip
import hashlib
import re
from datetime import UTC, datetime

import pytest

from tests.unit.conftest import BUCKET
from trafficwatch import landing, raw
from trafficwatch.payloads import normalize_payload
from trafficwatch.source import FetchedSnapshot


def _fetched(body: bytes, mode: str = "exports") -> FetchedSnapshot:
    return FetchedSnapshot(
        payload=body,
        mode=mode,
        source_url="http://127.0.0.1:1/api/explore/v2.1/catalog/datasets/etat-du-trafic-en-temps-reel/exports/json",
        fetched_at=datetime(2024, 8, 26, 10, 45, 5, tzinfo=UTC),
        snapshot=normalize_payload(body),
    )


def test_raw_key_is_the_upstream_datetime_in_utc() -> None:
    measured_at = datetime(2024, 8, 26, 10, 43, tzinfo=UTC)
    key = raw.raw_key(measured_at)
    assert key == "raw/date=2024-08-26/20240826T104300Z.json.gz"
    assert raw.measured_at_of(key) == measured_at


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("raw/date=2024-08-27/20240826T104300Z.json.gz", "partition date=2024-08-27 is not the UTC day of its time"),
        ("raw/date=2024-08-26/20241326T104300Z.json.gz", "is not a snapshot key (raw/date=YYYY-MM-DD/"),
        ("raw/date=2024-08-26/notatime.json.gz", "is not a snapshot key (raw/date=YYYY-MM-DD/"),
    ],
)
def test_a_key_that_names_no_snapshot_time_is_refused(key: str, reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)):
        raw.measured_at_of(key)
    assert raw.key_time(key) is None


def test_land_writes_the_payload_unchanged_once(s3, sample_bytes: bytes) -> None:
    fetched = _fetched(sample_bytes)
    first = landing.land(s3, BUCKET, fetched)
    assert first.status == "landed"
    assert first.record_count == 2859
    stored = s3.get_object(Bucket=BUCKET, Key=first.key)
    assert gzip.decompress(stored["Body"].read()) == sample_bytes
    metadata = stored["Metadata"]
    assert metadata["sha256"] == hashlib.sha256(sample_bytes).hexdigest()
    assert metadata["record-count"] == "2859"
    assert metadata["source-mode"] == "exports"
    assert metadata["upstream-datetime"] == "2024-08-26T12:43:00+02:00"
    assert metadata["fetched-at"] == "2024-08-26T10:45:05+00:00"
    assert metadata["source-url"].endswith("/exports/json")

    second = landing.land(s3, BUCKET, fetched)
    assert second.status == "unchanged"
    assert second.key == first.key
    assert s3.list_objects_v2(Bucket=BUCKET)["KeyCount"] == 1


def test_a_racing_writer_cannot_overwrite_a_landed_snapshot(s3, sample_bytes: bytes, monkeypatch) -> None:
    fetched = _fetched(sample_bytes)
    s3.put_object(Bucket=BUCKET, Key=raw.raw_key(fetched.snapshot.measured_at), Body=b"first writer")
    # The other poller checked before the first one wrote: only the conditional put stands between them.
    monkeypatch.setattr(landing, "is_landed", lambda *args: False)
    result = landing.land(s3, BUCKET, fetched)
    assert result.status == "unchanged"
    assert s3.get_object(Bucket=BUCKET, Key=result.key)["Body"].read() == b"first writer"


def test_quarantine_keeps_body_reason_and_time(s3) -> None:
    key = raw.quarantine(s3, BUCKET, b"<html>oops</html>", "not JSON: HTTP 200 with text/html", "http://x", "v1")
    assert key.startswith("quarantine/date=")
    assert "_v1_not-json-http-200-with-text-html" in key
    stored = s3.get_object(Bucket=BUCKET, Key=key)
    assert gzip.decompress(stored["Body"].read()) == b"<html>oops</html>"
    assert stored["Metadata"]["reason"] == "not JSON: HTTP 200 with text/html"
    assert datetime.fromisoformat(stored["Metadata"]["quarantined-at"]).tzinfo is not None
