"""The raw zone's own rules (moto): pending vs merged, quarantine listing by stage, expiry of merged objects only."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from tests.unit.conftest import BUCKET
from trafficwatch import raw

T0 = datetime(2024, 8, 26, 10, 0, tzinfo=UTC)


def _land(s3, *minutes: int) -> list[str]:
    keys = [raw.raw_key(T0 + timedelta(minutes=minute)) for minute in minutes]
    for key in keys:
        s3.put_object(Bucket=BUCKET, Key=key, Body=b"x")
    return keys


def test_pending_is_what_landed_and_is_not_merged_oldest_first(s3) -> None:
    first, second, third = _land(s3, 2, 0, 1)
    assert [obj.key for obj in raw.pending(s3, BUCKET, {second})] == [third, first]
    index = raw.RawIndex()
    assert [obj.key for obj in raw.pending(s3, BUCKET, set(), index)] == [second, third, first]


def test_quarantined_objects_are_listed_with_their_stage_and_reason(s3) -> None:
    (key,) = _land(s3, 0)
    by_ingest = raw.quarantine(s3, BUCKET, b"<html>", "not JSON", "http://x", "v1")
    by_merge = raw.quarantine(s3, BUCKET, b"{}", "no records", f"s3://{BUCKET}/{key}", "merge", raw.quarantine_key(key))
    listed = {obj.key: obj.stage for obj in raw.list_quarantined(s3, BUCKET)}
    assert listed == {by_ingest: "ingest", by_merge: "merge"}
    assert raw.quarantine_reason(s3, BUCKET, by_merge) == "no records"


def test_expire_deletes_only_merged_objects_older_than_the_cutoff(s3) -> None:
    old_merged, old_pending, new_merged = _land(s3, 0, 1, 60)
    s3.put_object(Bucket=BUCKET, Key="raw/date=2024-08-26/not-a-snapshot.json.gz", Body=b"x")
    cutoff = T0 + timedelta(minutes=30)
    merged = {old_merged, new_merged, "raw/date=2024-08-26/not-a-snapshot.json.gz"}
    assert raw.expire(s3, BUCKET, merged, cutoff) == 1
    left = {obj.key for obj in raw.list_raw(s3, BUCKET)}
    assert left == {old_pending, new_merged, "raw/date=2024-08-26/not-a-snapshot.json.gz"}
