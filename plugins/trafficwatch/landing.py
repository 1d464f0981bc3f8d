"""Landing in the raw zone: "already landed?", the conditional put with its lineage, and one ingest poll.

A snapshot is landed once, under the raw key of its upstream `datetime` (`raw.raw_key`). The object is the
payload exactly as received, gzip-compressed, with its lineage in S3 metadata. The put is conditional
(`If-None-Match: *`), so two pollers racing on one snapshot land it once and nothing landed is ever
overwritten. Payloads that cannot be used go to quarantine (`raw.quarantine`) with the reason.
"""

from __future__ import annotations

import gzip
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import botocore.exceptions

from trafficwatch import storage
from trafficwatch.config import Settings
from trafficwatch.payloads import SnapshotRules, SourceError, check_plausible
from trafficwatch.raw import metadata_text, quarantine, raw_key
from trafficwatch.source import Client, FetchedSnapshot, KnownSnapshot

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LandingResult:
    status: str  # "landed" or "unchanged"
    key: str
    measured_at: datetime
    record_count: int | None = None
    sha256: str | None = None

    @property
    def landed(self) -> bool:
        return self.status == "landed"

    def as_dict(self) -> dict[str, str | int]:
        return {"key": self.key, "measured_at": self.measured_at.isoformat(), "records": self.record_count or 0}

    def summary(self, bucket: str) -> str:
        when = self.measured_at.strftime("%Y-%m-%dT%H:%M:%SZ")
        if self.landed:
            return f"landed snapshot {when}: {self.record_count} records -> s3://{bucket}/{self.key}"
        return f"unchanged: snapshot {when} is already landed at s3://{bucket}/{self.key}; nothing written"


class IngestError(Exception):
    """A poll that failed. The message is one line; the body, if any, is already in quarantine."""


def is_landed(s3: Any, bucket: str, key: str) -> bool:
    try:
        s3.head_object(Bucket=bucket, Key=key)
    except botocore.exceptions.ClientError as exc:
        if exc.response["Error"]["Code"] in ("404", "NoSuchKey", "NotFound"):
            return False
        raise
    return True


def land(s3: Any, bucket: str, fetched: FetchedSnapshot) -> LandingResult:
    """Write a fetched snapshot to the raw zone unless that upstream snapshot is already there."""
    snapshot = fetched.snapshot
    key = raw_key(snapshot.measured_at)
    if is_landed(s3, bucket, key):  # the usual case between two upstream updates: skip the upload
        return LandingResult("unchanged", key, snapshot.measured_at)
    metadata = {
        "upstream-datetime": metadata_text(snapshot.upstream_datetime),
        "measured-at": snapshot.measured_at.isoformat(),
        "fetched-at": fetched.fetched_at.isoformat(),
        "source-url": metadata_text(fetched.source_url),
        "source-mode": fetched.mode,
        "record-count": str(fetched.record_count),
        "sha256": fetched.sha256,
    }
    return put_raw(s3, bucket, snapshot.measured_at, fetched.payload, metadata)


def put_raw(
    s3: Any, bucket: str, measured_at: datetime, payload: bytes, metadata: dict[str, str], compresslevel: int = 6
) -> LandingResult:
    """Put a payload, gzipped, under the raw key of its snapshot time, with its lineage as metadata, unless
    that key holds an object already (conditional put: nothing landed is ever overwritten)."""
    key = raw_key(measured_at)
    try:
        s3.put_object(
            Bucket=bucket,
            Key=key,
            Body=gzip.compress(payload, compresslevel=compresslevel, mtime=0),
            ContentType="application/gzip",
            Metadata=metadata,
            IfNoneMatch="*",
        )
    except botocore.exceptions.ClientError as exc:
        if exc.response["Error"]["Code"] in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
            return LandingResult("unchanged", key, measured_at)
        raise
    count = int(metadata["record-count"]) if "record-count" in metadata else None
    return LandingResult("landed", key, measured_at, count, metadata.get("sha256"))


def ingest(settings: Settings, s3: Any | None = None, client: Client | None = None) -> LandingResult:
    """One poll: fetch the current snapshot and land it, or say it is unchanged.

    The CLI (`trafficwatch ingest`) and the `traffic_ingest` DAG both call this. Any failure raises
    IngestError with a one-line reason, after keeping the received body in quarantine.
    """
    s3 = s3 or storage.s3_client(settings)
    client = client or Client(settings)
    bucket = settings.bucket

    def already_landed(measured_at: datetime) -> bool:
        return is_landed(s3, bucket, raw_key(measured_at))

    try:
        fetched = client.fetch(skip_if=already_landed)
        if isinstance(fetched, FetchedSnapshot):
            try:
                check_plausible(fetched.snapshot, fetched.fetched_at, "fetch", SnapshotRules.of(settings))
            except SourceError as error:
                raise SourceError(error.reason, fetched.payload) from None
    except SourceError as error:
        reason = error.reason
        if error.body:
            source_url = settings.api_url
            key = quarantine(s3, bucket, error.body, reason, source_url, settings.api_mode)
            reason = f"{reason} (body kept at s3://{bucket}/{key})"
        log.error("ingest failed: %s", reason)
        raise IngestError(reason) from None
    if isinstance(fetched, KnownSnapshot):
        result = LandingResult("unchanged", raw_key(fetched.measured_at), fetched.measured_at)
    else:
        result = land(s3, bucket, fetched)
    log.info(result.summary(bucket))
    return result
