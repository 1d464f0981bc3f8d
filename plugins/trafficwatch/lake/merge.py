"""The merge of landed snapshots into the lake, exactly once: prepare the objects, then commit them a chunk
at a time (observations and rejected rows, then the segments' versions, the merge log last).

Every write only inserts what is missing (see `writes`), so replaying any chunk after a crash, or racing
another merge, leaves the same rows. The merge log is written last: an object stays pending until its rows
are committed everywhere, and a rerun then merges it again harmlessly.
"""

from __future__ import annotations

import logging
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import polars as pl

from trafficwatch import raw, storage
from trafficwatch.config import Settings
from trafficwatch.lake.mergelog import append_merge_log, log_row, pending_raw
from trafficwatch.lake.preparation import Prepared, collapse_versions, prepared_tasks
from trafficwatch.lake.schema import MERGE_LOG, MERGE_TABLES, OBSERVATIONS, REJECTED, SCHEMAS, UTC_US
from trafficwatch.lake.segments import hash_attributes, merge_segments, segment_rows
from trafficwatch.lake.tables import Tables, ensure_tables, open_table, storage_options
from trafficwatch.lake.writes import merge_observations, merge_rejected
from trafficwatch.raw import RawIndex, RawObject, key_time
from trafficwatch.results import MergeResult

log = logging.getLogger(__name__)

OBJECTS_PER_COMMIT = 720  # ~2 M rows: bounds memory on long backfills
# A chunk is committed as soon as the previous commit is done and it holds this many objects (or, at the
# latest, OBJECTS_PER_COMMIT): the commits follow the preparation closely, so the last one, which nothing
# else overlaps, is small. Fewer objects per commit would add commits (and data files) for little gain.
MIN_OBJECTS_PER_COMMIT = 120


def _transaction_number() -> int:
    """The version of a chunk's app transaction (APP_ID): its start time in microseconds.

    delta-rs' conflict check looks at the app id only (two merges racing conflict whatever their versions),
    so the version need not be read back from the log (`transaction_version` GETs the checkpoint three
    times); it only has to grow from one merge to the next.
    """
    return time.time_ns() // 1000


def merge_objects(
    settings: Settings, objects: list[RawObject], s3: Any = None, tables: Tables | None = None
) -> MergeResult:
    """Merge the given landed objects into the lake (idempotent), then record them in the merge log.

    Objects are committed a chunk at a time, in order, by one committing thread while the next ones are
    being prepared (`prepared_tasks`: worker processes for many objects). A chunk goes to the committer as
    soon as it is free and the chunk holds MIN_OBJECTS_PER_COMMIT objects, and waits for it at
    OBJECTS_PER_COMMIT (bounded memory on long backfills): chunks are large while commits lag behind the
    preparation and small at the end, so that the last commit, alone on the machine, is short. One commit
    at a time, each finished before the next starts: a chunk that fails stops the merge there, and every
    object not in the merge log stays pending, as before.
    """
    started = time.perf_counter()
    s3 = s3 or storage.s3_client(settings)
    result = MergeResult()
    smallest = min(MIN_OBJECTS_PER_COMMIT, OBJECTS_PER_COMMIT)
    with ThreadPoolExecutor(max_workers=1) as committer:
        # The tables open (S3 round trips, without the GIL) while the first objects are parsed (CPU).
        opening = committer.submit(lambda: tables or ensure_tables(settings, MERGE_TABLES))
        committing: Future[None] | None = None
        chunk: list[Prepared] = []
        for prepared in prepared_tasks(settings, s3, objects):
            chunk.append(prepared)
            size = sum(len(p.counts) for p in chunk)
            busy = committing is not None and not committing.done()
            if size < smallest or (busy and size < OBJECTS_PER_COMMIT):
                continue
            if committing is not None:
                committing.result()  # raises what the previous chunk's commit raised
            committing = committer.submit(_merge_chunk, settings, s3, opening.result(), chunk, result)
            chunk = []
        if committing is not None:
            committing.result()
        if chunk:
            _merge_chunk(settings, s3, opening.result(), chunk, result)
    result.seconds = time.perf_counter() - started
    log.info(result.summary())
    return result


def _merge_chunk(settings: Settings, s3: Any, tables: Tables, chunk: list[Prepared], result: MergeResult) -> None:
    """Commit the objects of one chunk: quarantine the unreadable ones, write the rows of the others."""
    counts = [c for p in chunk for c in p.counts]
    for item in counts:
        if item.error is not None:
            key = raw.quarantine(s3, settings.bucket, item.body or b"", f"refused raw object {item.obj.key}: "
                                 f"{item.error}", f"s3://{settings.bucket}/{item.obj.key}", "merge",
                                 key=raw.quarantine_key(item.obj.key))  # fmt: skip
            log.error("quarantined %s: %s (copy at %s)", item.obj.key, item.error, key)
            result.quarantined_objects += 1
    merged_at = datetime.now(UTC)
    transaction = _transaction_number()
    observations = pl.concat([p.observations for p in chunk])
    obs_version = seg_version = tables[OBSERVATIONS].version()
    if observations.height:
        options = storage_options(settings)
        rejected = pl.concat([p.rejected for p in chunk], how="diagonal_relaxed")
        if rejected.height and REJECTED not in tables:
            tables[REJECTED] = open_table(settings, REJECTED)
        versions = pl.concat([p.versions for p in chunk if p.versions.height])
        current = segment_rows(tables, options).filter(pl.col("is_current"))
        hashes = hash_attributes(versions.unique(["segment_key", "fingerprint"]), current).select(
            "segment_key", "fingerprint", "attributes_hash"
        )
        versions = collapse_versions(versions.join(hashes, on=["segment_key", "fingerprint"]), by="attributes_hash")
        rows = observations.join(hashes, on=["segment_key", "fingerprint"], how="left").with_columns(
            pl.lit(merged_at, dtype=UTC_US).alias("merged_at")
        )
        # Rejected rows and observations are independent commits: side by side. The segments follow the
        # observations (see merge_segments); the merge log waits for all of them.
        with ThreadPoolExecutor(max_workers=2) as writers:
            rejected_written = writers.submit(merge_rejected, tables.get(REJECTED), rejected, transaction)
            obs_version = merge_observations(tables[OBSERVATIONS], rows, transaction)
            rejected_written.result()
        points = rows.select("segment_key", "measured_at")
        seg_version = merge_segments(tables, versions, points, options, transaction)
    for item in counts:
        if item.error is None:
            log.info("%s: %d records, %d accepted, %d rejected, %d duplicates",
                     item.obj.key, item.records, item.accepted, item.rejected, item.duplicates)  # fmt: skip
            result.merged_objects += 1
            result.observations += item.accepted
            result.rejected_rows += item.rejected
            result.duplicate_rows += item.duplicates
    if counts:
        chunk_id = uuid.uuid4().hex
        entries = pl.DataFrame([log_row(item, merged_at, chunk_id) for item in counts], schema=SCHEMAS[MERGE_LOG])
        entries = entries.with_columns(
            pl.lit(obs_version, dtype=pl.Int64).alias("observations_version"),
            pl.lit(seg_version, dtype=pl.Int64).alias("segments_version"),
        )
        append_merge_log(tables, entries, transaction)


def merge_pending(
    settings: Settings, s3: Any = None, tables: Tables | None = None, index: RawIndex | None = None
) -> MergeResult:
    """Merge every landed snapshot not merged yet, in one run. The CLI and the DAG both call this
    (in the worker, with its open tables and raw index)."""
    s3 = s3 or storage.s3_client(settings)
    tables = tables or ensure_tables(settings, MERGE_TABLES)
    pending = pending_raw(settings, s3, tables, index)
    log.info("%d landed snapshots pending", len(pending))
    return merge_objects(settings, pending, s3, tables)


def backfill(settings: Settings, start: datetime, end: datetime, s3: Any = None) -> MergeResult:
    """Merge again every landed snapshot measured in [start, end): idempotent, nothing is duplicated."""
    s3 = s3 or storage.s3_client(settings)
    landed = raw.list_raw(s3, settings.bucket)
    chosen = [obj for obj in landed if (when := key_time(obj.key)) is not None and start <= when < end]
    log.info("backfill %s to %s: %d landed snapshots", start.isoformat(), end.isoformat(), len(chosen))
    if unnamed := sum(1 for obj in landed if key_time(obj.key) is None):
        log.warning("%d raw objects have a key that names no snapshot time: the merge quarantines them", unnamed)
    return merge_objects(settings, sorted(chosen, key=lambda o: o.key), s3)
