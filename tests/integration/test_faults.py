"""Every way the feed misbehaves ends in a one-line reason, the body in quarantine, and nothing lost."""

from __future__ import annotations

import gzip
import re
import time

import pytest

from trafficwatch import storage
from trafficwatch.config import Settings, load_settings
from trafficwatch.landing import IngestError, ingest

pytestmark = pytest.mark.integration


def _objects(settings: Settings, prefix: str) -> dict[str, bytes]:
    s3 = storage.s3_client(settings)
    return {
        key: s3.get_object(Bucket=settings.bucket, Key=key)["Body"].read()
        for key in storage.list_keys(s3, settings.bucket, prefix)
    }


# (fault, API mode, expected reason, whether a body is quarantined)
FAULTS = [
    ("http500", "exports", r"^HTTP 500 from http://127\.0\.0\.1:\d+/\S+: .* \(after 3 attempts\)", True),
    (
        "http429",
        "exports",
        r"^HTTP 429 rate limited \(Retry-After 1, X-RateLimit-Remaining 0\) from http://127\.0\.0\.1:\d+/\S+: "
        r"Too many requests.* \(after 3 attempts\)",
        True,
    ),
    ("slow", "exports", r"^timeout after 2 s: GET http://127\.0\.0\.1:\d+/\S+ \(after 3 attempts\)", False),
    ("truncated", "exports", r"^invalid JSON at byte \d+ of \d+: ", True),
    ("html200", "exports", r"^not JSON: HTTP 200 with Content-Type text/html.*", True),
    ("empty", "exports", r"^empty snapshot: 0 records in the exports payload", True),
    (
        "schema",
        "exports",
        r"^not the expected payload shape: record 0 has no datetime, predefinedlocationreference",
        True,
    ),
    ("inconsistent", "exports", r"^inconsistent snapshot: 2 different datetime values", True),
    ("inconsistent", "records", r"^inconsistent snapshot", True),
    ("truncated", "records", r"^invalid JSON at byte \d+ of \d+: ", True),
    ("empty", "v1", r"^empty snapshot: 0 records in the v1 payload", True),
    ("schema", "v1", r"^not the expected payload shape", True),
]


@pytest.mark.parametrize(("fault", "mode", "reason", "quarantined"), FAULTS, ids=[f"{f}-{m}" for f, m, *_ in FAULTS])
def test_fault_gives_clear_error_quarantine_and_no_loss(
    fault, mode, reason, quarantined, feed, s3_settings, monkeypatch
):
    monkeypatch.setenv("TRAFFICWATCH_API_MODE", mode)
    settings = load_settings()
    assert ingest(settings).status == "landed"
    landed_before = _objects(settings, "raw/")

    feed.advance()  # a new upstream snapshot is due, but the API misbehaves from now on
    feed.set_fault(fault, None)
    with pytest.raises(IngestError) as caught:
        ingest(settings)
    message = str(caught.value)
    assert "\n" not in message
    assert re.match(reason, message), message

    quarantine = _objects(settings, "quarantine/")
    if quarantined:
        assert len(quarantine) == 1
        ((key, body),) = quarantine.items()
        assert f"(body kept at s3://{settings.bucket}/{key})" in message
        assert len(gzip.decompress(body)) > 0
        head = storage.s3_client(settings).head_object(Bucket=settings.bucket, Key=key)
        assert head["Metadata"]["reason"] in message
        assert head["Metadata"]["source-mode"] == mode
    else:
        assert quarantine == {}
    assert _objects(settings, "raw/") == landed_before  # nothing already landed changed

    feed.set_fault("none", 0)  # the API recovers: the snapshot it withheld lands
    assert ingest(settings).status == "landed"
    assert len(_objects(settings, "raw/")) == 2


@pytest.mark.parametrize("fault", ["http500", "http429", "slow"])
def test_transient_faults_are_retried_within_the_poll(fault, feed, s3_settings):
    feed.set_fault(fault, 1)
    started = time.monotonic()
    result = ingest(s3_settings)
    assert result.status == "landed"
    assert result.record_count == 2859
    if fault == "http429":
        assert time.monotonic() - started >= 1.0  # Retry-After: 1 was honoured
    assert _objects(s3_settings, "quarantine/") == {}
