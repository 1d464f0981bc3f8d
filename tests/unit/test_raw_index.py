"""The worker's incremental listing of raw/ (moto): new landings, out-of-order uploads, expired objects."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from tests.unit.conftest import BUCKET
from trafficwatch.raw import RawIndex, list_raw, raw_key

T0 = datetime(2024, 8, 26, 10, 0, tzinfo=UTC)


class CountingS3:
    """The S3 client, counting list calls and the keys they returned."""

    def __init__(self, client) -> None:
        self.client = client
        self.listed_keys = 0

    def get_paginator(self, name: str):
        paginator = self.client.get_paginator(name)
        outer = self

        class Counting:
            def paginate(self, **arguments):
                for page in paginator.paginate(**arguments):
                    outer.listed_keys += len(page.get("Contents", []))
                    yield page

        return Counting()


def _land(s3, minutes: int) -> str:
    key = raw_key(T0 + timedelta(minutes=minutes))
    s3.put_object(Bucket=BUCKET, Key=key, Body=b"x")
    return key


def test_refresh_lists_only_what_landed_after_the_last_key(s3) -> None:
    for minute in range(50):
        _land(s3, minute)
    counting = CountingS3(s3)
    index = RawIndex()
    assert len(index.refresh(counting, BUCKET)) == 50
    assert counting.listed_keys == 50  # the first refresh lists everything

    counting.listed_keys = 0
    new = {_land(s3, 50), _land(s3, 24 * 60)}  # next minute, and the next day's first (another prefix)
    landed = {obj.key for obj in index.refresh(counting, BUCKET)}
    assert counting.listed_keys == 2  # ... later ones only the new keys
    assert landed == {obj.key for obj in list_raw(s3, BUCKET)} and new <= landed


def test_a_full_listing_catches_out_of_order_uploads_and_forgets_expired_objects(s3) -> None:
    keys = [_land(s3, minute) for minute in range(10)]
    index = RawIndex()
    index.refresh(s3, BUCKET)
    older = _land(s3, -60)  # an upload of an older snapshot: its key sorts before the ones seen
    s3.delete_object(Bucket=BUCKET, Key=keys[0])  # expired
    assert older not in {obj.key for obj in index.refresh(s3, BUCKET)}  # not until the next full listing

    index.relist(s3, BUCKET)
    landed = {obj.key for obj in index.refresh(s3, BUCKET)}
    assert older in landed and keys[0] not in landed and len(landed) == 10
