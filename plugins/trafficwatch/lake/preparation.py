"""Preparing raw objects for a merge, the CPU-heavy half of it: download, gunzip, normalize, validate and
deduplicate them, in this process or, for many objects, in spawned worker processes (`prepared_tasks`)."""

from __future__ import annotations

import collections
import gzip
import itertools
import multiprocessing
import os
import zlib
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import polars as pl

from trafficwatch import storage
from trafficwatch.config import Settings
from trafficwatch.lake.geometry import GEOMETRY_TYPE
from trafficwatch.lake.schema import OBSERVATIONS, SCHEMAS, SEGMENT_ATTRIBUTES, UTC_US
from trafficwatch.lake.validation import dedupe, validate
from trafficwatch.payloads import SnapshotRules, SourceError, check_plausible, normalize_payload
from trafficwatch.raw import RawObject, key_time, measured_at_of


@dataclass
class ObjectCounts:
    """What one raw object gave: its records, accepted, rejected and duplicate rows (all 0 if unreadable)."""

    obj: RawObject
    measured_at: datetime | None  # None: the key names no snapshot time
    records: int = 0
    accepted: int = 0
    rejected: int = 0
    duplicates: int = 0
    error: str | None = None
    body: bytes | None = None  # the unreadable payload, for quarantine


@dataclass
class Prepared:
    """Raw objects read, validated and deduplicated, ready to merge.

    `observations`: accepted rows with the observation columns (not yet `merged_at` and `attributes_hash`)
    and `fingerprint`, a fast in-process hash of the segment's attributes. `versions`: the segment
    attributes of accepted rows, keeping per segment only the rows where they differ from its previous row
    in these objects (a day of snapshots holds the same geometry 1,440 times), with the same `fingerprint`.
    """

    observations: pl.DataFrame
    versions: pl.DataFrame
    rejected: pl.DataFrame
    counts: list[ObjectCounts]


VERSION_COLUMNS = ("segment_key", "measured_at", "source_key", *SEGMENT_ATTRIBUTES, "geometry_type", "fingerprint")
PREPARED_COLUMNS = [c for c in SCHEMAS[OBSERVATIONS] if c not in ("merged_at", "attributes_hash")] + ["fingerprint"]
FINGERPRINT = pl.struct(list(SEGMENT_ATTRIBUTES)).hash()  # stable within one polars version, never stored
OBJECTS_PER_TASK = 24  # objects one worker prepares at a time: consecutive minutes, so versions collapse
# Fewer objects are prepared in this process. A spawned worker costs 1-5 s to start (under Airflow it
# imports Airflow again), ~20 s of parsing here pays for that many times over.
PROCESSES_FROM = 240
# Tasks submitted to the workers ahead of the one the merge waits for: enough to keep them busy while a
# commit holds the merge back (~10 s of parsing on two cores), few enough to bound what waits in memory.
TASKS_AHEAD = 16


def gunzip(data: bytes) -> bytes:
    """`gzip.decompress`, about twice as fast for the single-member files the ingest writes (zlib does it
    in one call); other files (several members, truncated, not gzip) go the standard way, or fail there."""
    inflater = zlib.decompressobj(wbits=31)
    try:
        body = inflater.decompress(data)
    except zlib.error:
        body = b""
    if inflater.eof and not inflater.unused_data:
        return body
    return gzip.decompress(data)


def _download(s3: Any, bucket: str, obj: RawObject) -> bytes:
    return s3.get_object(Bucket=bucket, Key=obj.key)["Body"].read()


def collapse_versions(versions: pl.DataFrame, by: str = "fingerprint") -> pl.DataFrame:
    """Per segment, in time order, drop rows whose attributes (their `by` hash) equal the previous row's."""
    if versions["segment_key"].n_unique() == versions.height:  # one snapshot: nothing to collapse
        return versions
    versions = versions.sort(["segment_key", "measured_at"])
    return versions.filter(pl.col(by).ne_missing(pl.col(by).shift(1).over("segment_key")))


def _read_object(obj: RawObject, compressed: bytes, rules: SnapshotRules) -> tuple[datetime, pl.DataFrame]:
    """One raw object as a normalized frame, or SourceError (with the body to keep) saying why it cannot be."""
    try:
        keyed_at = measured_at_of(obj.key)
    except ValueError as exc:
        raise SourceError(str(exc)) from None
    try:
        body = gunzip(compressed)
    except (OSError, EOFError, zlib.error) as exc:
        raise SourceError(f"not a gzip file: {exc}") from None
    snapshot = normalize_payload(body)
    if snapshot.measured_at != keyed_at:
        raise SourceError(
            f"the key says {keyed_at:%Y-%m-%dT%H:%M:%SZ} but the snapshot's datetime is "
            f"{snapshot.measured_at:%Y-%m-%dT%H:%M:%SZ}",
            body,
        )
    try:
        check_plausible(snapshot, obj.landed_at, "landing", rules)
    except SourceError as error:
        raise SourceError(error.reason, body) from None
    frame = snapshot.frame.with_columns(
        pl.lit(obj.key).alias("source_key"), pl.lit(obj.landed_at, dtype=UTC_US).alias("landed_at")
    )
    return snapshot.measured_at, frame


def prepare(s3: Any, bucket: str, objects: list[RawObject], rules: SnapshotRules) -> Prepared:
    """Download, gunzip, normalize, validate and deduplicate raw objects; the CPU-heavy half of a merge.

    An object that cannot be read as a plausible snapshot, whatever it holds, comes back as an error with
    its body (for quarantine); it never stops the others.
    """
    with ThreadPoolExecutor(max_workers=4) as pool:  # downloads wait on the network, not the CPU
        bodies = {
            obj.key: body
            for obj, body in zip(objects, pool.map(lambda o: _download(s3, bucket, o), objects), strict=True)
        }
    counts: dict[str, ObjectCounts] = {}
    frames: list[pl.DataFrame] = []
    for obj in objects:
        try:
            measured_at, frame = _read_object(obj, bodies[obj.key], rules)
        except Exception as exc:  # SourceError, or whatever else a payload can do: keep it, name it, go on
            counts[obj.key] = _refused(obj, bodies[obj.key], exc)
            continue
        counts[obj.key] = ObjectCounts(obj, measured_at, records=frame.height)
        frames.append(frame)
    checked = []
    for batch in _batches(frames):
        try:
            checked.append(_checked(pl.concat(batch)))
        except Exception:  # one object's rows broke the batch: check them one at a time, to refuse it alone
            for frame in batch:
                key = frame["source_key"][0]
                try:
                    checked.append(_checked(frame))
                except Exception as exc:
                    counts[key] = _refused(counts[key].obj, bodies[key], exc)
    observations, versions, rejected = [], [], []
    for unique, bad, dropped in checked:
        for key, rows in unique.group_by("source_key").len().rows():
            counts[key].accepted = rows
        for key, rows in bad.group_by("source_key").len().rows():
            counts[key].rejected = rows
        for key, rows in dropped.rows():
            counts[key].duplicates = rows
        observations.append(unique.select(PREPARED_COLUMNS))
        versions.append(unique.select(VERSION_COLUMNS))
        if bad.height:
            rejected.append(bad)
    obs_schema = {c: SCHEMAS[OBSERVATIONS].get(c, pl.UInt64()) for c in PREPARED_COLUMNS}
    return Prepared(
        observations=pl.concat(observations) if observations else pl.DataFrame(schema=obs_schema),
        versions=collapse_versions(pl.concat(versions)) if versions else pl.DataFrame(),
        rejected=pl.concat(rejected, how="vertical_relaxed") if rejected else pl.DataFrame(),
        counts=list(counts.values()),
    )


def _refused(obj: RawObject, compressed: bytes, exc: Exception) -> ObjectCounts:
    """The counts of an object that cannot be merged: the reason, and the body to quarantine."""
    if isinstance(exc, SourceError):
        return ObjectCounts(obj, key_time(obj.key), error=exc.reason, body=exc.body or compressed)
    reason = f"unreadable: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    return ObjectCounts(obj, key_time(obj.key), error=reason, body=compressed)


def _batches(frames: list[pl.DataFrame]) -> Iterator[list[pl.DataFrame]]:
    """Consecutive frames with the same columns and types, to be checked as one.

    Validation and deduplication work row by row, so checking a batch gives each object's rows what
    checking it alone would; one set of polars queries over 24 snapshots costs a quarter to a third of 24
    sets. A snapshot whose values came with other types (a column of nulls, numbers sent as text) starts a
    batch of its own.
    """
    for _, group in itertools.groupby(frames, key=lambda frame: frame.schema):
        yield list(group)


def _checked(frame: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """Rows of one or more snapshots validated and deduplicated: (accepted rows with the columns a merge
    needs, rejected rows, duplicate rows dropped per source_key)."""
    accepted, bad = validate(frame)
    unique, dropped = dedupe(accepted)
    unique = unique.with_columns(
        pl.col("measured_at").dt.date().alias("measured_date"),
        pl.col("geometry").alias("geometry_geojson"),
        GEOMETRY_TYPE.alias("geometry_type"),
    ).with_columns(FINGERPRINT.alias("fingerprint"))
    return unique, bad, dropped


_worker_s3: Any = None


def _prepare_in_worker(settings: Settings, objects: list[RawObject]) -> Prepared:
    global _worker_s3
    if _worker_s3 is None:
        _worker_s3 = storage.s3_client(settings)
    return prepare(_worker_s3, settings.bucket, objects, SnapshotRules.of(settings))


def prepared_tasks(settings: Settings, s3: Any, objects: list[RawObject]) -> Iterator[Prepared]:
    """`prepare` over the objects, in order, OBJECTS_PER_TASK at a time.

    Many objects (a backlog, a backfill) are prepared by worker processes, one per core and one more: parsing is pure
    Python work that one process's GIL would serialize. Workers are spawned, never forked: this process
    holds threads (delta-rs, boto3) that a fork would copy in an unknown state. They work at most
    TASKS_AHEAD tasks ahead of the consumer: prepared objects waiting for their commit stay bounded.
    """
    tasks = [objects[i : i + OBJECTS_PER_TASK] for i in range(0, len(objects), OBJECTS_PER_TASK)]
    cores = os.cpu_count() or 1
    if len(objects) < PROCESSES_FROM or cores < 2:
        for task in tasks:
            yield prepare(s3, settings.bucket, task, SnapshotRules.of(settings))
        return
    # One more worker than cores: while one waits for its downloads, the others keep the cores busy.
    workers = min(cores + 1, len(tasks), 5)
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        waiting = iter(tasks)
        ahead = collections.deque(
            pool.submit(_prepare_in_worker, settings, task) for task in itertools.islice(waiting, TASKS_AHEAD)
        )
        while ahead:
            prepared = ahead.popleft().result()
            if (task := next(waiting, None)) is not None:
                ahead.append(pool.submit(_prepare_in_worker, settings, task))
            yield prepared
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
