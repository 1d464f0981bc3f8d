"""The raw zone and the quarantine in S3: key format, listing, pending vs merged, quarantine and expiry.

A snapshot is landed once (see `landing`), under a key made of its upstream `datetime` in UTC:

    raw/date=2024-08-26/20240826T104300Z.json.gz

Keys sort by snapshot time, which is what lets `RawIndex` list only what landed since its last listing.
Payloads that cannot be used go to `quarantine/` with the reason: an ingest's refused answer under a key of
its own, a raw object the merge refused under `quarantine/` + its raw key.
"""

from __future__ import annotations

import gzip
import re
import threading
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

RAW_PREFIX = "raw/"
QUARANTINE_PREFIX = "quarantine/"
RAW_SUFFIX = ".json.gz"
RAW_KEY = re.compile(r"raw/date=(\d{4}-\d{2}-\d{2})/(\d{8}T\d{6}Z)\.json\.gz")
DELETES_PER_REQUEST = 1000  # S3's limit for one DeleteObjects


# --------------------------------------------------------------------------- keys


def raw_key(measured_at: datetime) -> str:
    utc = measured_at.astimezone(UTC)
    return f"{RAW_PREFIX}date={utc:%Y-%m-%d}/{utc:%Y%m%dT%H%M%SZ}{RAW_SUFFIX}"


def measured_at_of(key: str) -> datetime:
    """The snapshot time a raw key stands for (the inverse of `raw_key`); ValueError if it stands for none."""
    not_a_key = ValueError(f"{key} is not a snapshot key (raw/date=YYYY-MM-DD/YYYYMMDDTHHMMSSZ{RAW_SUFFIX})")
    match = RAW_KEY.fullmatch(key)
    if match is None:
        raise not_a_key
    day, stamp = match.groups()
    try:  # the digits may still name no date (month 13)
        measured_at = datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        partition = date.fromisoformat(day)
    except ValueError:
        raise not_a_key from None
    # A copy under another day's partition names the same minute as its twin: merged side by side, every
    # row would be there twice. Only the partition of the snapshot's own UTC day stands for it.
    if partition != measured_at.date():
        raise ValueError(
            f"{key} is not a snapshot key: its partition date={day} is not the UTC day of its time "
            f"{measured_at:%Y-%m-%dT%H:%M:%SZ}"
        )
    return measured_at


def key_time(key: str) -> datetime | None:
    """The snapshot time a raw key names, or None when it names none."""
    try:
        return measured_at_of(key)
    except ValueError:
        return None


def metadata_text(value: str, limit: int = 512) -> str:
    """S3 user metadata must be ASCII and small."""
    return value.encode("ascii", "replace").decode("ascii")[:limit]


# --------------------------------------------------------------------------- listing


@dataclass(frozen=True)
class RawObject:
    key: str
    landed_at: datetime


def list_raw(s3: Any, bucket: str, start_after: str = "") -> list[RawObject]:
    """The landed objects under raw/ (only those whose key sorts after `start_after`, if given)."""
    objects = []
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=RAW_PREFIX, StartAfter=start_after)
    for page in pages:
        for item in page.get("Contents", []):
            if item["Key"].endswith(RAW_SUFFIX):
                objects.append(RawObject(item["Key"], item["LastModified"].astimezone(UTC)))
    return objects


class RawIndex:
    """The landed objects as a long-lived process (the worker) knows them, listed incrementally.

    Listing raw/ costs one request per 1,000 keys: after 30 days (43,200 keys) a full listing took 10-14 s
    on the local S3 server, on every sensor poll and every merge. Raw keys name their snapshot's time, so
    what the ingest lands sorts after every key seen: `refresh` lists only the keys after the last one.
    `relist` (a full listing; the worker runs one every 15 minutes, beside the merges) also catches objects
    landed out of order (an upload of older snapshots) and forgets expired ones.
    """

    def __init__(self) -> None:
        self._objects: dict[str, RawObject] = {}
        self._complete = False
        self._lock = threading.Lock()

    def relist(self, s3: Any, bucket: str) -> None:
        listed = {obj.key: obj for obj in list_raw(s3, bucket)}
        last = max(listed, default="")
        with self._lock:  # keep what a refresh found after this listing went past
            self._objects = listed | {key: obj for key, obj in self._objects.items() if key > last}
            self._complete = True

    def refresh(self, s3: Any, bucket: str) -> list[RawObject]:
        if not self._complete:
            self.relist(s3, bucket)
        with self._lock:
            last = max(self._objects, default="")
        found = list_raw(s3, bucket, start_after=last)
        with self._lock:
            self._objects.update((obj.key, obj) for obj in found)
            return list(self._objects.values())


# --------------------------------------------------------------------------- pending vs merged


def pending(s3: Any, bucket: str, merged: AbstractSet[str], index: RawIndex | None = None) -> list[RawObject]:
    """Landed objects whose key is not in `merged` (the merge log's keys), oldest first: whoever landed them.

    Listed incrementally through `index` when the caller keeps one, else in full."""
    landed = index.refresh(s3, bucket) if index else list_raw(s3, bucket)
    return sorted((obj for obj in landed if obj.key not in merged), key=lambda o: o.key)


# --------------------------------------------------------------------------- quarantine


@dataclass(frozen=True)
class QuarantinedObject:
    key: str
    written_at: datetime

    @property
    def stage(self) -> str:
        """ "merge" for a raw object the merge refused (kept under its raw key), else "ingest"."""
        return "merge" if self.key.startswith(f"{QUARANTINE_PREFIX}{RAW_PREFIX}") else "ingest"


def quarantine(
    s3: Any, bucket: str, body: bytes, reason: str, source_url: str, mode: str, key: str | None = None
) -> str:
    """Keep a payload that could not be used, with the reason and the time, for an operator to inspect.

    `key`: where, when the payload has a name of its own (a refused raw object: quarantined again by a
    backfill, it replaces its copy instead of adding one); by default a new key per call.
    """
    now = datetime.now(UTC)
    if key is None:
        slug = re.sub(r"[^a-z0-9]+", "-", reason.lower()).strip("-")[:40]
        key = f"{QUARANTINE_PREFIX}date={now:%Y-%m-%d}/{now:%Y%m%dT%H%M%S.%fZ}_{mode}_{slug}.gz"
    s3.put_object(
        Bucket=bucket,
        Key=key,
        Body=gzip.compress(body, mtime=0),
        ContentType="application/gzip",
        Metadata={
            "reason": metadata_text(reason, 1024),
            "quarantined-at": now.isoformat(),
            "source-url": metadata_text(source_url),
            "source-mode": mode,
        },
    )
    return key


def quarantine_key(raw: str) -> str:
    """Where the merge keeps a raw object it refused."""
    return f"{QUARANTINE_PREFIX}{raw}"


def list_quarantined(s3: Any, bucket: str) -> list[QuarantinedObject]:
    """Every object under quarantine/, with the time it was written."""
    objects = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=QUARANTINE_PREFIX):
        for item in page.get("Contents", []):
            objects.append(QuarantinedObject(item["Key"], item["LastModified"].astimezone(UTC)))
    return objects


def quarantine_reason(s3: Any, bucket: str, key: str) -> str | None:
    """The reason a quarantined object was kept (its S3 metadata), None if it carries none."""
    return s3.head_object(Bucket=bucket, Key=key).get("Metadata", {}).get("reason")


# --------------------------------------------------------------------------- expiry


def expire(s3: Any, bucket: str, merged: AbstractSet[str], cutoff: datetime) -> int:
    """Delete the raw objects measured before `cutoff`, but only those whose key is in `merged`: the raw
    zone is the merge's replay source. Returns how many were deleted."""
    expired = [
        obj.key
        for obj in list_raw(s3, bucket)
        if obj.key in merged and (when := key_time(obj.key)) is not None and when < cutoff
    ]
    for start in range(0, len(expired), DELETES_PER_REQUEST):
        keys = [{"Key": key} for key in expired[start : start + DELETES_PER_REQUEST]]
        s3.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
    return len(expired)
