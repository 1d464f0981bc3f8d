"""Delta tables of the lake: their schemas, row validation, and the exactly-once merge of landed snapshots.

Tables, under `s3://BUCKET/lake/`:

- `traffic_observations`: one row per (segment_key, measured_at), partitioned by `measured_date`;
- `road_segments`: one row per segment version (valid_from/valid_to), geometry kept as GeoJSON text;
- `rejected_records`: rows that failed validation, with the reason;
- `merge_log`: one row per merged raw object, with counts and the Delta versions it produced.

Exactly once: every write only inserts what is missing (or closes a segment version that is still
open), so replaying any batch after a crash, or racing another merge, leaves the same rows. Rows whose
time range no file of the table covers (the Delta log's statistics say so) are appended; otherwise a
MERGE on the natural key inserts the missing ones. The merge log is written last: an object stays
pending until its rows are committed everywhere, and a rerun then merges it again harmlessly. Every
commit of a merge carries the app transaction APP_ID, so two merges racing conflict (CommitFailedError)
instead of both appending; the loser retries on the fresh table state, where its rows are no longer new.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import logging
import math
import multiprocessing
import os
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator
from collections.abc import Set as AbstractSet
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import polars as pl
from deltalake import CommitProperties, DeltaTable, PostCommitHookProperties, Transaction, write_deltalake
from deltalake import Field as DeltaField
from deltalake.exceptions import CommitFailedError, TableNotFoundError

from trafficwatch import storage
from trafficwatch.config import Settings
from trafficwatch.landing import QUARANTINE_PREFIX, RAW_PREFIX, RAW_SUFFIX, measured_at_of, quarantine
from trafficwatch.payloads import SnapshotRules, SourceError, check_plausible, normalize_payload

log = logging.getLogger(__name__)

LAKE_PREFIX = "lake/"
APP_ID = "trafficwatch-merge"
STATUSES = ("freeFlow", "heavy", "congested", "impossible", "unknown")
SPEED_RANGE_KMH = (0, 200)
RELIABILITY_RANGE_PCT = (0, 100)
# Rennes Métropole and a wide margin: a point outside is a broken coordinate, not a far-away road.
LON_RANGE = (-2.5, -1.0)
LAT_RANGE = (47.7, 48.5)
GEOMETRY_TYPES = ("LineString", "MultiLineString")
GEOMETRY_TYPE = pl.col("geometry").str.extract(r'"type"\s*:\s*"([A-Za-z]+)"')  # from the GeoJSON text
# The shape of the compact GeoJSON text the source writes: lines of at least two points of two (or three)
# JSON numbers. NaN, Infinity or null in place of a number do not match.
_NUMBER = r"-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?"
_POSITION = rf"\[{_NUMBER},{_NUMBER}(?:,{_NUMBER})?\]"
_LINE = rf"\[{_POSITION}(?:,{_POSITION})+\]"
_LINES = rf'LineString","coordinates":{_LINE}|MultiLineString","coordinates":\[{_LINE}(?:,{_LINE})*\]'
GEOMETRY_SHAPE = rf'^\{{"type":"(?:{_LINES})\}}$'
_FIRST_POSITION = rf'^\{{"type":"\w+","coordinates":\[+({_NUMBER}),({_NUMBER})'
_LAST_POSITION = rf"\[({_NUMBER}),({_NUMBER})[^\[\]]*\]+\}}$"
# How far a line's ends may lie from the record's point: 1.65 km in the real network (2024 sample).
MAX_POINT_TO_LINE_M = 5_000.0
COMMIT_ATTEMPTS = 5
# After every commit delta-rs would list the whole _delta_log to delete expired entries (1,600 files with a
# 24 h log retention: a cost that grows with the log). Merges leave that to lake_maintenance (hourly);
# they still write a checkpoint every delta.checkpointInterval commits.
MERGE_HOOKS = PostCommitHookProperties(create_checkpoint=True, cleanup_expired_logs=False)
OBJECTS_PER_COMMIT = 720  # ~2 M rows: bounds memory on long backfills

UTC_US = pl.Datetime("us", "UTC")

OBSERVATIONS = "traffic_observations"
SEGMENTS = "road_segments"
REJECTED = "rejected_records"
MERGE_LOG = "merge_log"

SCHEMAS: dict[str, dict[str, pl.DataType]] = {
    OBSERVATIONS: {
        "segment_key": pl.String(),
        "measured_at": UTC_US,
        "measured_date": pl.Date(),
        "speed_kmh": pl.Int32(),
        "travel_time_s": pl.Int32(),
        "reliability_pct": pl.Int32(),
        "traffic_status": pl.String(),
        "probe_count": pl.Int32(),
        "attributes_hash": pl.String(),  # the point's segment attributes: versions are recomputed from these
        "source_key": pl.String(),
        "landed_at": UTC_US,
        "merged_at": UTC_US,
    },
    SEGMENTS: {
        "segment_key": pl.String(),
        "valid_from": UTC_US,
        "valid_to": UTC_US,
        "is_current": pl.Boolean(),
        "road_name": pl.String(),
        "hierarchy": pl.String(),
        "hierarchy_dv": pl.String(),
        "speed_limit_kmh": pl.Int32(),
        "insee": pl.Int32(),
        "direction": pl.String(),
        "gml_id": pl.String(),
        "segment_id": pl.Int64(),
        "func_class": pl.Int32(),
        "point_lon": pl.Float64(),
        "point_lat": pl.Float64(),
        "geometry_type": pl.String(),
        "geometry_geojson": pl.String(),
        "length_m": pl.Float64(),
        "attributes_hash": pl.String(),
        "source_key": pl.String(),
    },
    REJECTED: {
        "source_key": pl.String(),
        "record_index": pl.Int32(),
        "measured_at": UTC_US,
        "segment_key": pl.String(),
        "reason": pl.String(),
        "record_json": pl.String(),
        "rejected_at": UTC_US,
    },
    MERGE_LOG: {
        "source_key": pl.String(),
        "measured_at": UTC_US,
        "landed_at": UTC_US,
        "merged_at": UTC_US,
        "batch_id": pl.String(),
        "record_count": pl.Int32(),
        "accepted_rows": pl.Int32(),
        "rejected_rows": pl.Int32(),
        "duplicate_rows": pl.Int32(),
        "observations_version": pl.Int64(),
        "segments_version": pl.Int64(),
    },
}
# What every merge writes; rejected_records is opened only when a batch has rejected rows.
MERGE_TABLES = (OBSERVATIONS, SEGMENTS, MERGE_LOG)
PARTITIONS = {OBSERVATIONS: ["measured_date"], REJECTED: [], SEGMENTS: [], MERGE_LOG: []}
# Columns that make a segment version: a change in any of them opens a new version.
SEGMENT_ATTRIBUTES = (
    "road_name",
    "hierarchy",
    "hierarchy_dv",
    "speed_limit_kmh",
    "insee",
    "direction",
    "gml_id",
    "segment_id",
    "func_class",
    "point_lon",
    "point_lat",
    "geometry_geojson",
)
INTEGER_COLUMNS = ("speed_kmh", "travel_time_s", "reliability_pct", "probe_count", "speed_limit_kmh", "insee")


# --------------------------------------------------------------------------- tables


def storage_options(settings: Settings) -> dict[str, str]:
    """delta-rs (and polars) object store options; credentials come from the standard AWS variables unless
    the settings carry explicit ones."""
    options = {"AWS_REGION": settings.aws_region, **settings.s3_credentials}
    if settings.s3_endpoint_url:
        options["AWS_ENDPOINT_URL"] = settings.s3_endpoint_url
        options["AWS_ALLOW_HTTP"] = str(settings.s3_endpoint_url.startswith("http://")).lower()
    return options


def table_uri(settings: Settings, name: str) -> str:
    return f"s3://{settings.bucket}/{LAKE_PREFIX}{name}"


def empty_frame(name: str) -> pl.DataFrame:
    return pl.DataFrame(schema=SCHEMAS[name])


def table_properties(settings: Settings) -> dict[str, str]:
    """Delta properties that keep a table read at one-minute cadence cheap to open."""
    return {"delta.logRetentionDuration": settings.log_retention, "delta.checkpointInterval": "10"}


def _open_table(settings: Settings, name: str) -> DeltaTable:
    uri, options = table_uri(settings, name), storage_options(settings)
    try:
        return _with_new_columns(DeltaTable(uri, storage_options=options), name)
    except TableNotFoundError:
        try:
            return DeltaTable.create(
                uri,
                schema=empty_frame(name).to_arrow().schema,
                mode="ignore",
                partition_by=PARTITIONS[name] or None,
                name=name,
                configuration=table_properties(settings),
                storage_options=options,
            )
        except CommitFailedError:  # another process created it first
            return DeltaTable(uri, storage_options=options)


def _with_new_columns(table: DeltaTable, name: str) -> DeltaTable:
    """Add the columns a newer TrafficWatch writes to a table created by an older one (null in old rows)."""
    held = {field.name for field in table.schema().fields}
    missing = [column for column in SCHEMAS[name] if column not in held]
    if missing:
        fields = empty_frame(name).select(missing).to_arrow().schema
        table.alter.add_columns([DeltaField.from_arrow(field) for field in fields])
        log.info("%s: added columns %s", name, ", ".join(missing))
    return table


def ensure_tables(settings: Settings, names: Iterable[str] = tuple(SCHEMAS)) -> dict[str, DeltaTable]:
    """Open the tables (all four by default), creating the missing ones (safe when two processes race).

    They are opened side by side: each open is mostly S3 round trips.
    """
    names = tuple(names)
    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        return dict(zip(names, pool.map(lambda name: _open_table(settings, name), names), strict=True))


class OpenTables:
    """The lake's tables kept open by a long-lived process (the worker), brought up to date before each use.

    Opening a Delta table on S3 costs ~15 ms of CPU whatever its size (each object store client parses the
    system's CA certificates), about half of a one-snapshot merge for three tables; bringing an open table
    up to date reads only the commits since its version (~1 ms). Not thread-safe: one user at a time.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._tables: dict[str, DeltaTable] = {}

    def get(self, names: Iterable[str] = MERGE_TABLES) -> dict[str, DeltaTable]:
        names = tuple(names)
        missing = [name for name in names if name not in self._tables]
        if missing:
            self._tables.update(ensure_tables(self.settings, missing))
        opened = [self._tables[name] for name in names if name not in missing]
        with ThreadPoolExecutor(max_workers=max(len(opened), 1)) as pool:  # S3 round trips: side by side
            list(pool.map(DeltaTable.update_incremental, opened))
        return {name: self._tables[name] for name in names}


_last_reads: dict[tuple[str, str], tuple[DeltaTable, int, Any]] = {}


def _read_per_version(table: DeltaTable, purpose: str, read: Callable[[], Any]) -> Any:
    """`read()`, or what it gave last time for this very table object at the same version.

    Only a process that keeps its tables open (`OpenTables`) ever hits: in a steady minute no segment
    changes, so road_segments is not read again.
    """
    key, version = (table.table_uri, purpose), table.version()
    cached = _last_reads.get(key)
    if cached is not None and cached[0] is table and cached[1] == version:
        return cached[2]
    value = read()
    _last_reads[key] = (table, version, value)
    return value


def scan_table(table: DeltaTable, options: dict[str, str]) -> pl.LazyFrame:
    """The table at its loaded version, read by polars' own Parquet reader.

    Reading through pyarrow's dataset API (`to_pyarrow_table`) intermittently aborts the interpreter at
    exit with delta-rs 1.6 ("terminate called without an active exception"); polars' reader does not.
    """
    return pl.scan_delta(table, storage_options=options)


# --------------------------------------------------------------------------- raw objects


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


_merged_keys_read: dict[str, tuple[DeltaTable, frozenset[str], set[str]]] = {}


def merged_keys(settings: Settings, tables: dict[str, DeltaTable]) -> AbstractSet[str]:
    """The raw keys the merge log holds.

    Merge log rows are never deleted, so a process that keeps the table open (`OpenTables`) reads, after
    the first time, only the files added since: one small file per merge, not 43,200 rows after 30 days.
    The set it returns is then the one this process keeps up to date (copying it each time would cost what
    the history holds): read it, do not keep it.
    """
    table, options = tables[MERGE_LOG], storage_options(settings)
    files = frozenset(table.file_uris())
    cached = _merged_keys_read.get(table.table_uri)
    if cached is not None and cached[0] is table:
        _, known_files, keys = cached
        if files - known_files:
            added = pl.scan_parquet(sorted(files - known_files), storage_options=options).select("source_key")
            keys.update(added.collect()["source_key"].to_list())
    else:
        keys = set(scan_table(table, options).select("source_key").collect()["source_key"].to_list())
    _merged_keys_read[table.table_uri] = (table, files, keys)
    return keys


def refused_keys(settings: Settings, tables: dict[str, DeltaTable]) -> set[str]:
    """The raw keys the merge log holds as refused (quarantined: no record read), e.g. a snapshot dated in
    the future: landed, but never to be shown."""
    frame = scan_table(tables[MERGE_LOG], storage_options(settings)).filter(pl.col("record_count") == 0)
    return set(frame.select("source_key").collect()["source_key"].to_list())


def _note_merged(table: DeltaTable, version: int, files: frozenset[str], keys: list[str]) -> None:
    """Add the keys this process just wrote to the merge log to what `merged_keys` knows, without reading
    them back, when its write was the only commit since the version `merged_keys` last read."""
    cached = _merged_keys_read.get(table.table_uri)
    if cached is None or cached[0] is not table or cached[1] != files or table.version() != version + 1:
        return
    cached[2].update(keys)
    _merged_keys_read[table.table_uri] = (table, frozenset(table.file_uris()), cached[2])


def pending_raw(
    settings: Settings, s3: Any, tables: dict[str, DeltaTable], index: RawIndex | None = None
) -> list[RawObject]:
    """Landed objects the merge log does not hold yet, oldest first: whoever landed them."""
    merged = merged_keys(settings, tables)
    landed = index.refresh(s3, settings.bucket) if index else list_raw(s3, settings.bucket)
    return sorted((obj for obj in landed if obj.key not in merged), key=lambda o: o.key)


# --------------------------------------------------------------------------- parsing and validation


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
# Smaller batches are prepared in this process. A spawned worker costs 1-5 s to start (under Airflow it
# imports Airflow again), ~20 s of parsing here pays for that many times over.
PROCESSES_FROM = 240


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


def _collapse_versions(versions: pl.DataFrame, by: str = "fingerprint") -> pl.DataFrame:
    """Per segment, in time order, drop rows whose attributes (their `by` hash) equal the previous row's."""
    if versions["segment_key"].n_unique() == versions.height:  # one snapshot: nothing to collapse
        return versions
    versions = versions.sort(["segment_key", "measured_at"])
    return versions.filter(pl.col(by).ne_missing(pl.col(by).shift(1).over("segment_key")))


def key_time(key: str) -> datetime | None:
    """The snapshot time a raw key names, or None when it names none."""
    try:
        return measured_at_of(key)
    except ValueError:
        return None


def _read_object(obj: RawObject, compressed: bytes, rules: SnapshotRules) -> tuple[datetime, pl.DataFrame]:
    """One raw object as a normalized frame, or SourceError (with the body to keep) saying why it cannot be."""
    keyed_at = key_time(obj.key)
    if keyed_at is None:
        raise SourceError(f"{obj.key} is not a snapshot key (raw/date=YYYY-MM-DD/YYYYMMDDTHHMMSSZ.json.gz)")
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
        bodies = list(pool.map(lambda obj: _download(s3, bucket, obj), objects))
    observations, versions, rejected, counts = [], [], [], []
    for obj, compressed in zip(objects, bodies, strict=True):
        try:
            measured_at, frame = _read_object(obj, compressed, rules)
            accepted, bad = validate(frame)
            unique, dropped = dedupe(accepted)
        except SourceError as error:
            counts.append(ObjectCounts(obj, key_time(obj.key), error=error.reason, body=error.body or compressed))
            continue
        except Exception as exc:  # whatever else a payload can do: keep it, name it, go on
            reason = f"unreadable: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            counts.append(ObjectCounts(obj, key_time(obj.key), error=reason, body=compressed))
            continue
        duplicates = int(dropped["duplicate_rows"].sum()) if dropped.height else 0
        counts.append(ObjectCounts(obj, measured_at, frame.height, unique.height, bad.height, duplicates))
        unique = unique.with_columns(
            pl.col("measured_at").dt.date().alias("measured_date"),
            pl.col("geometry").alias("geometry_geojson"),
            GEOMETRY_TYPE.alias("geometry_type"),
        ).with_columns(FINGERPRINT.alias("fingerprint"))
        observations.append(unique.select(PREPARED_COLUMNS))
        versions.append(unique.select(VERSION_COLUMNS))
        if bad.height:
            rejected.append(bad)
    obs_schema = {c: SCHEMAS[OBSERVATIONS].get(c, pl.UInt64()) for c in PREPARED_COLUMNS}
    return Prepared(
        observations=pl.concat(observations) if observations else pl.DataFrame(schema=obs_schema),
        versions=_collapse_versions(pl.concat(versions)) if versions else pl.DataFrame(),
        rejected=pl.concat(rejected, how="vertical_relaxed") if rejected else pl.DataFrame(),
        counts=counts,
    )


_worker_s3: Any = None


def _prepare_in_worker(settings: Settings, objects: list[RawObject]) -> Prepared:
    global _worker_s3
    if _worker_s3 is None:
        _worker_s3 = storage.s3_client(settings)
    return prepare(_worker_s3, settings.bucket, objects, SnapshotRules.of(settings))


def prepared_batches(settings: Settings, s3: Any, objects: list[RawObject]) -> Iterator[Prepared]:
    """`prepare` over the objects, in order, OBJECTS_PER_TASK at a time.

    Large batches (a backlog, a backfill) are prepared by worker processes, one per core and one more: parsing is pure
    Python work that one process's GIL would serialize. Workers are spawned, never forked: this process
    holds threads (delta-rs, boto3) that a fork would copy in an unknown state.
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
        yield from pool.map(_prepare_in_worker, itertools.repeat(settings), tasks)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _as_integer(column: str) -> tuple[pl.Expr, pl.Expr]:
    """The column as Int32, and a flag for values that are present but not a whole number."""
    raw = pl.col(column)
    as_float = raw.cast(pl.Float64, strict=False)
    value = as_float.cast(pl.Int32, strict=False)
    bad = raw.is_not_null() & (as_float.is_null() | (as_float != as_float.round(0)) | value.is_null())
    return value, bad


def _reason(condition: pl.Expr, message: pl.Expr | str) -> pl.Expr:
    return pl.when(condition).then(message if isinstance(message, pl.Expr) else pl.lit(message))


def validate(frame: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split normalized rows into (accepted, rejected): types enforced, values checked, reasons given.

    Accepted rows come back with the lake's types; rejected rows carry `reason` (all failed rules,
    joined by "; ") and the record as JSON.
    """
    type_reasons: list[pl.Expr] = [
        _reason(pl.col("segment_key").is_null() | (pl.col("segment_key") == ""), "missing segment_key")
    ]
    typed: list[pl.Expr] = []
    for column in INTEGER_COLUMNS:
        value, bad = _as_integer(column)
        typed.append(value.alias(column))
        type_reasons.append(_reason(bad, pl.format("{} {} is not an integer", pl.lit(column), pl.col(column))))
    # Type failures are judged on the values as sent, before the casts below replace them. One lazy query:
    # each eager step would be a query of its own.
    lazy = frame.lazy().with_columns(pl.concat_str(type_reasons, separator="; ", ignore_nulls=True).alias("reason"))
    lazy = lazy.with_columns(
        *typed,
        pl.col("traffic_status").cast(pl.String, strict=False),
        pl.col("segment_id").cast(pl.Int64, strict=False),
        pl.col("func_class").cast(pl.Int32, strict=False),
        pl.col("point_lon").cast(pl.Float64, strict=False),
        pl.col("point_lat").cast(pl.Float64, strict=False),
        *[pl.col(c).cast(pl.String, strict=False) for c in ("road_name", "hierarchy", "hierarchy_dv", "direction")],
        pl.col("gml_id").cast(pl.String, strict=False),
    )
    reasons: list[pl.Expr] = [pl.when(pl.col("reason") != "").then(pl.col("reason"))]

    def outside(column: str, low: float, high: float, unit: str) -> pl.Expr:
        value = pl.col(column)
        message = pl.format(f"{column} {{}} outside {low:g}-{high:g} {unit}".rstrip(), value)
        return _reason(value.is_not_null() & ((value < low) | (value > high)), message)

    reasons += [
        outside("speed_kmh", *SPEED_RANGE_KMH, "km/h"),
        _reason(pl.col("travel_time_s") < 0, pl.format("travel_time_s {} is negative", pl.col("travel_time_s"))),
        outside("reliability_pct", *RELIABILITY_RANGE_PCT, "%"),
        _reason(pl.col("probe_count") < 0, pl.format("probe_count {} is negative", pl.col("probe_count"))),
        _reason(
            pl.col("traffic_status").is_not_null() & ~pl.col("traffic_status").is_in(STATUSES),
            pl.format("traffic_status '{}' is not one of " + ", ".join(STATUSES), pl.col("traffic_status")),
        ),
        _reason(
            pl.col("point_lon").is_not_null()
            & (
                ~pl.col("point_lon").is_between(*LON_RANGE)
                | ~pl.col("point_lat").fill_null(float("nan")).is_between(*LAT_RANGE)
            ),
            pl.format("point ({}, {}) is outside the Rennes area", pl.col("point_lon"), pl.col("point_lat")),
        ),
    ]
    reasons += [
        _reason(pl.col("point_lon").is_null() & pl.col("point_lat").is_null(), "point (geo_point_2d) is missing"),
        _reason(pl.col("point_lon").is_not_null() & pl.col("point_lat").is_null(), "point has no latitude"),
        _reason(pl.col("point_lon").is_null() & pl.col("point_lat").is_not_null(), "point has no longitude"),
        *_geometry_reasons(),
    ]
    facts = geometry_facts(frame["geometry"]).lazy()
    lazy = lazy.join(facts, on="geometry", how="left", maintain_order="left")
    checked = (
        lazy.with_columns(pl.concat_str(reasons, separator="; ", ignore_nulls=True).alias("reason"))
        .drop(GEOMETRY_FACTS)
        .collect()
    )
    failed = checked["reason"].is_not_null() & (checked["reason"] != "")
    return checked.filter(~failed).drop("reason"), checked.filter(failed)


GEOMETRY_FACTS = {
    "geometry_kind": pl.String(),
    "geometry_well_formed": pl.Boolean(),
    "first_lon": pl.Float64(),
    "first_lat": pl.Float64(),
    "last_lon": pl.Float64(),
    "last_lat": pl.Float64(),
}
_known_geometries = pl.DataFrame(schema={"geometry": pl.String(), **GEOMETRY_FACTS})
KNOWN_GEOMETRIES_MAX = 50_000  # a few networks' worth; beyond, start again


def geometry_facts(geometries: pl.Series) -> pl.DataFrame:
    """Per distinct geometry text: its type, whether it is well formed (lines of two or more [lon, lat]
    points of finite JSON numbers: NaN, Infinity or null do not match) and its end points.

    The regular expressions cost ~25 ms a snapshot, and a segment's geometry is the same text snapshot
    after snapshot: what this process has seen is kept, so a steady minute costs a join.
    """
    global _known_geometries
    distinct = geometries.drop_nulls().unique().to_frame("geometry")
    new = distinct.join(_known_geometries, on="geometry", how="anti")
    if new.height:
        text = pl.col("geometry")
        ends = [
            text.str.extract(pattern, group).cast(pl.Float64, strict=False).alias(name)
            for pattern, names in (
                (_FIRST_POSITION, ("first_lon", "first_lat")),
                (_LAST_POSITION, ("last_lon", "last_lat")),
            )
            for group, name in enumerate(names, start=1)
        ]
        new = new.with_columns(
            GEOMETRY_TYPE.alias("geometry_kind"), text.str.contains(GEOMETRY_SHAPE).alias("geometry_well_formed"), *ends
        )
        if _known_geometries.height + new.height > KNOWN_GEOMETRIES_MAX:
            _known_geometries = _known_geometries.clear()
        _known_geometries = pl.concat([_known_geometries, new])
    return distinct.join(_known_geometries, on="geometry", how="left")


def _geometry_reasons() -> list[pl.Expr]:
    """A geometry must be a (Multi)LineString of real lines (two points or more, finite numbers) whose ends
    lie near the record's point: a one-number coordinate or a line drawn elsewhere would corrupt lengths,
    travel-time sums and maps. A record without any geometry (older schemas) is accepted. Reads the
    columns of `geometry_facts`, joined to the rows."""
    geometry = pl.col("geometry")
    kind = pl.col("geometry_kind").fill_null("unknown")
    wrong_type = geometry.is_not_null() & ~pl.col("geometry_kind").fill_null("").is_in(GEOMETRY_TYPES)
    malformed = geometry.is_not_null() & ~wrong_type & ~pl.col("geometry_well_formed").fill_null(False)

    def distance_m(end: str) -> pl.Expr:
        dx = (pl.col(f"{end}_lon") - pl.col("point_lon")) * 111_320.0 * math.cos(math.radians(48.1))
        dy = (pl.col(f"{end}_lat") - pl.col("point_lat")) * 110_540.0
        return (dx * dx + dy * dy).sqrt()

    far = pl.max_horizontal(distance_m("first"), distance_m("last"))
    point_in_area = pl.col("point_lon").is_between(*LON_RANGE) & pl.col("point_lat").is_between(*LAT_RANGE)
    shaped = geometry.is_not_null() & ~wrong_type & ~malformed & point_in_area.fill_null(False)
    return [
        _reason(wrong_type, pl.format("geometry type {} is not LineString or MultiLineString", kind)),
        _reason(
            malformed,
            pl.format("geometry {} is malformed: lines of two or more [lon, lat] points of finite numbers", kind),
        ),
        _reason(
            shaped & ~(far <= MAX_POINT_TO_LINE_M),  # NaN (an infinite coordinate) counts as far
            pl.format(f"geometry lies {{}} m from its point (more than {MAX_POINT_TO_LINE_M:.0f} m)", far.round(0)),
        ),
    ]


def dedupe(accepted: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """One row per (segment_key, measured_at): the one with most probes, then the first in the payload.

    Returns (unique rows, count of dropped duplicates per source_key).
    """
    if not accepted.select(pl.struct("segment_key", "measured_at").is_duplicated().any()).item():
        return accepted, pl.DataFrame(schema={"source_key": pl.String, "duplicate_rows": pl.UInt32})
    ranked = accepted.sort(
        ["segment_key", "measured_at", "probe_count", "record_index"],
        descending=[False, False, True, False],
        nulls_last=True,
    )
    unique = ranked.unique(["segment_key", "measured_at"], keep="first", maintain_order=True)
    dropped = (
        ranked.group_by("source_key")
        .len()
        .join(unique.group_by("source_key").len(), on="source_key", suffix="_kept")
        .select("source_key", (pl.col("len") - pl.col("len_kept")).alias("duplicate_rows"))
    )
    return unique, dropped


# --------------------------------------------------------------------------- geometry


def _haversine_m(lon1: float, lat1: float, lon2: float, lat2: float) -> float:
    phi1, phi2 = math.radians(lat1), math.radians(lat2)
    a = (
        math.sin((phi2 - phi1) / 2) ** 2
        + math.cos(phi1) * math.cos(phi2) * math.sin(math.radians(lon2 - lon1) / 2) ** 2
    )
    return 2 * 6_371_008.8 * math.asin(math.sqrt(a))


def geometry_length_m(geojson: str | None) -> float | None:
    """Length along a LineString or every part of a MultiLineString, in metres."""
    if not geojson:
        return None
    geometry = json.loads(geojson)
    lines = geometry["coordinates"] if geometry.get("type") == "MultiLineString" else [geometry["coordinates"]]
    return sum(_haversine_m(*a[:2], *b[:2]) for line in lines for a, b in itertools.pairwise(line))


# --------------------------------------------------------------------------- writing


def _commit(table: DeltaTable, action: Callable[[], Any], what: str) -> Any:
    """Run a Delta write, retrying on a conflicting concurrent commit with fresh table state.

    Every write of a merge carries the app transaction APP_ID: delta-rs refuses a commit when a commit
    with the same app id landed since the version it read, so two merges racing cannot both append.
    """
    for attempt in range(1, COMMIT_ATTEMPTS + 1):
        try:
            return action()
        except CommitFailedError as exc:
            if attempt == COMMIT_ATTEMPTS:
                raise
            log.warning("%s: concurrent commit (%s); retrying on fresh state (%d)", what, exc, attempt)
            time.sleep(0.2 * attempt)
            table.update_incremental()
    return None


def _time_bounds(frame: pl.DataFrame) -> str:
    """Literal time bounds of a batch: delta-rs does not prune the target from join predicates alone,
    but skips every file whose `measured_at` statistics fall outside literals. None when some row has no
    time (a merge log row of a key that names none): such rows are matched on their key alone."""
    if frame["measured_at"].null_count():
        return "true"
    low, high = (_utc_literal(frame["measured_at"].min()), _utc_literal(frame["measured_at"].max()))
    return f"t.measured_at >= '{low}' AND t.measured_at <= '{high}'"


def _utc_literal(moment: datetime) -> str:
    """An instant as SQL text to the second; the year zero-padded (`%Y` writes year 1 as "1")."""
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="seconds") + "Z"


def _bounds_predicate(frame: pl.DataFrame) -> str:
    dates = ", ".join(f"'{day}'" for day in frame["measured_date"].unique().sort().to_list())
    return f"t.measured_date IN ({dates}) AND {_time_bounds(frame)}"


def may_hold(table: DeltaTable, frame: pl.DataFrame) -> bool:
    """Whether any file of the table may hold rows measured within the frame's time range.

    Decided from the `measured_at` statistics of the Delta log alone. When no file may, the rows are
    new for certain and are appended; otherwise a MERGE inserts only the missing ones (a replay after
    a crash, or a backfill into the past). Files without statistics count as "may".
    """
    actions = pl.DataFrame(table.get_add_actions(flatten=True))
    if actions.is_empty():
        return False
    if "min.measured_at" not in actions.columns or "max.measured_at" not in actions.columns:
        return True
    low, high = frame["measured_at"].min(), frame["measured_at"].max()
    lowest, highest = pl.col("min.measured_at"), pl.col("max.measured_at")
    overlap = lowest.is_null() | highest.is_null() | ((lowest <= high) & (highest >= low))
    return bool(actions.select(overlap.any()).item())


def _insert_missing(table: DeltaTable, rows: pl.DataFrame, key_predicate: str, batch: int) -> None:
    """Append the rows if the table cannot hold any of them yet, else MERGE inserting the missing ones."""
    commit = CommitProperties(app_transactions=[Transaction(APP_ID, batch)])
    source = rows.to_arrow()
    if not may_hold(table, rows):
        write_deltalake(table, source, mode="append", commit_properties=commit, post_commithook_properties=MERGE_HOOKS)
        return
    table.merge(
        source,
        predicate=key_predicate,
        source_alias="s",
        target_alias="t",
        commit_properties=commit,
        post_commithook_properties=MERGE_HOOKS,
    ).when_not_matched_insert_all().execute()


def merge_observations(table: DeltaTable, rows: pl.DataFrame, batch: int) -> int:
    """Insert the observations that are not there yet; returns the table version after the write."""
    rows = rows.select(list(SCHEMAS[OBSERVATIONS]))
    predicate = "t.segment_key = s.segment_key AND t.measured_at = s.measured_at AND " + _bounds_predicate(rows)
    _commit(table, lambda: _insert_missing(table, rows, predicate, batch), OBSERVATIONS)
    return table.version()


# --------------------------------------------------------------------------- segment history
#
# A segment's versions are a function of its points: every merged snapshot's accepted row, in time order,
# collapsed into runs of equal attributes (valid_from = a run's first point, valid_to = the next run's).
# Observations carry each point's `attributes_hash`, so the lake holds every point and the versions can be
# recomputed exactly, whatever order snapshots arrive in. A merge recomputes only the segments whose points
# do not simply continue their current version (a steady minute touches none), and only around the new
# points: the versions outside their time range stand for the points they cover.

SEGMENT_ROW_KEY = ("segment_key", "valid_from")
TAIL_PROBE = timedelta(hours=1)  # where the first point after a batch is looked for before the whole table


def _sha1_attributes(frame: pl.DataFrame) -> pl.Series:
    values = frame.select(SEGMENT_ATTRIBUTES).iter_rows()
    return pl.Series([hashlib.sha1(repr(row).encode()).hexdigest() for row in values], dtype=pl.String)


def hash_attributes(versions: pl.DataFrame, current: pl.DataFrame) -> pl.DataFrame:
    """`versions` with their `attributes_hash`: the current version's where the attributes equal it (the
    usual case: nothing to hash), else the SHA-1 of the attribute values."""
    against = current.select(
        "segment_key",
        pl.col("attributes_hash").alias("cur"),
        *[pl.col(name).alias(f"{name}__cur") for name in SEGMENT_ATTRIBUTES],
    )
    unchanged = pl.all_horizontal([pl.col(name).eq_missing(pl.col(f"{name}__cur")) for name in SEGMENT_ATTRIBUTES])
    joined = versions.join(against, on="segment_key", how="left").with_columns(
        pl.when(unchanged).then(pl.col("cur")).alias("attributes_hash")
    )
    joined = joined.drop("cur", *[f"{name}__cur" for name in SEGMENT_ATTRIBUTES])
    other = joined.filter(pl.col("attributes_hash").is_null())
    if other.is_empty():
        return joined
    other = other.with_columns(attributes_hash=_sha1_attributes(other))
    return pl.concat([joined.filter(pl.col("attributes_hash").is_not_null()), other])


def _segment_rows(table: DeltaTable, options: dict[str, str]) -> pl.DataFrame:
    """Every version of every segment at the table's loaded version (read once per version)."""
    return _read_per_version(table, "versions", lambda: scan_table(table, options).collect())


def _touched(batch: pl.DataFrame, current: pl.DataFrame) -> list[str]:
    """The segments whose candidate versions do not just continue their current version (same attributes,
    later): the only ones whose history a batch can change."""
    joined = batch.join(
        current.select("segment_key", pl.col("valid_from").alias("cur_from"), pl.col("attributes_hash").alias("cur")),
        on="segment_key",
        how="left",
    )
    continues = ((pl.col("attributes_hash") == pl.col("cur")) & (pl.col("measured_at") > pl.col("cur_from"))).fill_null(
        False
    )
    return joined.filter(~continues)["segment_key"].unique().to_list()


def _files_overlapping(table: DeltaTable, low: datetime, high: datetime | None) -> list[str]:
    """The data files whose `measured_at` statistics overlap [low, high] (high None: no upper bound)."""
    actions = pl.DataFrame(table.get_add_actions(flatten=True))
    if actions.is_empty():
        return []
    lowest, highest = pl.col("min.measured_at"), pl.col("max.measured_at")
    overlap = lowest.is_null() | highest.is_null() | (highest >= low)
    if high is not None:
        overlap = overlap & (lowest.is_null() | (lowest <= high))
    paths = actions.filter(overlap)["path"].to_list()
    return [f"{table.table_uri.rstrip('/')}/{path}" for path in paths]


POINT_COLUMNS = ("segment_key", "measured_at", "attributes_hash", "source_key")


def _points_between(
    table: DeltaTable, options: dict[str, str], keys: list[str], low: datetime, high: datetime | None
) -> pl.DataFrame:
    """The observations' points of these segments measured in [low, high]."""
    files = _files_overlapping(table, low, high)
    schema = {name: SCHEMAS[OBSERVATIONS][name] for name in POINT_COLUMNS}
    if not files:
        return pl.DataFrame(schema=schema)
    when = pl.col("measured_at") >= low
    if high is not None:
        when = when & (pl.col("measured_at") <= high)
    scan = pl.scan_parquet(files, storage_options=options, missing_columns="insert")
    return (
        scan.select(POINT_COLUMNS).filter(pl.col("segment_key").is_in(keys) & when).collect().cast(schema)  # type: ignore[arg-type]
    )


def _first_points_after(table: DeltaTable, options: dict[str, str], after: pl.DataFrame) -> pl.DataFrame:
    """Per segment of `after` (segment_key, t_max, until), its first point in (t_max, until): where the version
    a batch cut into resumes. Looked for in the hour after the batch first, then in the whole table."""
    found: list[pl.DataFrame] = []
    for probe in (TAIL_PROBE, None):
        if after.is_empty():
            break
        low = after["t_max"].min()
        high = None if probe is None else after["t_max"].max() + probe
        points = _points_between(table, options, after["segment_key"].to_list(), low, high)
        first = (
            points.join(after, on="segment_key")
            .filter(pl.col("measured_at") > pl.col("t_max"))
            .filter((pl.col("measured_at") < pl.col("until")).fill_null(True))
            .sort("measured_at")
            .unique("segment_key", keep="first")
            .select(POINT_COLUMNS)
        )
        found.append(first)
        after = after.join(first, on="segment_key", how="anti")
    return pl.concat(found) if found else pl.DataFrame(schema={n: SCHEMAS[OBSERVATIONS][n] for n in POINT_COLUMNS})


def _recomputed_versions(
    touched: pl.DataFrame,
    existing: pl.DataFrame,
    points: pl.DataFrame,
    attributes: pl.DataFrame,
) -> pl.DataFrame:
    """Every version of the touched segments, from their points: the observations inside each segment's new
    range (and the first one after it), and outside it the versions' own starts, which stand for the points
    they cover. Points whose attributes no version or batch knows yet (a merge that died between its
    observations and its segments, and will be merged again) are left out until then."""
    schema = SCHEMAS[SEGMENTS]
    outside = (
        existing.join(touched, on="segment_key")
        .filter(~pl.col("valid_from").is_between(pl.col("t_min"), pl.col("t_max")))
        .select("segment_key", pl.col("valid_from").alias("measured_at"), "attributes_hash", "source_key")
    )
    # Observations written before points carried their hash: the version they lie in says it.
    points = points.sort("measured_at").join_asof(
        existing.select(
            "segment_key", pl.col("valid_from").alias("measured_at"), pl.col("attributes_hash").alias("held")
        ).sort("measured_at"),
        on="measured_at",
        by="segment_key",
        strategy="backward",
        check_sortedness=False,  # sorted by time within each segment, which is what counts
    )
    points = points.with_columns(pl.coalesce("attributes_hash", "held").alias("attributes_hash")).drop("held")
    known = attributes.select("segment_key", "attributes_hash")
    every = (
        pl.concat([outside, points.select(outside.columns)])
        .join(known, on=["segment_key", "attributes_hash"], how="semi")
        .unique(["segment_key", "measured_at"], keep="first")
        .sort(["segment_key", "measured_at"])
    )
    starts = every.filter(pl.col("attributes_hash").ne_missing(pl.col("attributes_hash").shift(1).over("segment_key")))
    starts = starts.with_columns(
        pl.col("measured_at").alias("valid_from"),
        pl.col("measured_at").shift(-1).over("segment_key").alias("valid_to"),
    ).with_columns(pl.col("valid_to").is_null().alias("is_current"))
    details = [name for name in schema if name not in ("valid_from", "valid_to", "is_current", "source_key")]
    versions = starts.join(attributes.select(details), on=["segment_key", "attributes_hash"], how="left")
    # A version that already exists keeps its lineage; a new one takes its first point's.
    lineage = existing.select(*SEGMENT_ROW_KEY, pl.col("source_key").alias("kept_source"))
    versions = versions.join(lineage, on=list(SEGMENT_ROW_KEY), how="left").with_columns(
        pl.coalesce("kept_source", "source_key").alias("source_key")
    )
    return versions.select(list(schema)).cast(schema)  # type: ignore[arg-type]


def _version_attributes(existing: pl.DataFrame, batch: pl.DataFrame) -> pl.DataFrame:
    """The attributes (and geometry type, length) of every (segment, attributes_hash) known."""
    columns = ["segment_key", "attributes_hash", *SEGMENT_ATTRIBUTES, "geometry_type", "length_m"]
    known = existing.select(columns).unique(["segment_key", "attributes_hash"], keep="first")
    new = batch.join(known, on=["segment_key", "attributes_hash"], how="anti").unique(
        ["segment_key", "attributes_hash"], keep="first"
    )
    new = new.with_columns(
        pl.col("geometry_geojson").map_elements(geometry_length_m, return_dtype=pl.Float64).alias("length_m")
        if new.height
        else pl.lit(None, dtype=pl.Float64).alias("length_m")
    )
    return pl.concat([known, new.select(columns)], how="vertical_relaxed")


def _same_versions(left: pl.DataFrame, right: pl.DataFrame) -> bool:
    columns = [*SEGMENT_ROW_KEY, "valid_to", "attributes_hash"]
    return left.select(columns).sort(columns).equals(right.select(columns).sort(columns))


def merge_segments(
    tables: dict[str, DeltaTable], batch: pl.DataFrame, points: pl.DataFrame, options: dict[str, str], batch_no: int
) -> int:
    """Bring the versions of the segments this batch touches in line with all their points.

    `batch`: the batch's candidate versions, hashed (see `hash_attributes`); `points`: the batch's accepted
    (segment_key, measured_at). Runs after the batch's observations are committed, so that two merges racing
    cannot both miss each other: each reads the segments after its own observations landed, and a merge that
    changed versions looks again when other observations landed meanwhile.
    """
    table, observations = tables[SEGMENTS], tables[OBSERVATIONS]
    touched: set[str] = set()

    def attempt() -> bool:
        current = _segment_rows(table, options).filter(pl.col("is_current"))
        touched.update(_touched(batch, current))
        return bool(touched) and _rewrite_versions(tables, batch, points, touched, options, batch_no)

    for _ in range(COMMIT_ATTEMPTS):
        table.update_incremental()  # what other merges committed while this one wrote its observations
        seen = observations.version()
        written = _commit(table, attempt, SEGMENTS)
        if not written:
            break
        observations.update_incremental()
        if observations.version() == seen:
            break
        log.info("observations landed while segment versions were recomputed: recomputing")
    return table.version()


def _rewrite_versions(
    tables: dict[str, DeltaTable],
    batch: pl.DataFrame,
    points: pl.DataFrame,
    keys: set[str],
    options: dict[str, str],
    batch_no: int,
) -> bool:
    """Recompute and write the versions of `keys`; False when they were already right (nothing written)."""
    table, observations = tables[SEGMENTS], tables[OBSERVATIONS]
    existing_all = _segment_rows(table, options)
    existing = existing_all.filter(pl.col("segment_key").is_in(list(keys)))
    touched = (
        points.filter(pl.col("segment_key").is_in(list(keys)))
        .group_by("segment_key")
        .agg(pl.col("measured_at").min().alias("t_min"), pl.col("measured_at").max().alias("t_max"))
    )
    low, high = touched["t_min"].min(), touched["t_max"].max()
    inside = _points_between(observations, options, touched["segment_key"].to_list(), low, high)
    inside = inside.join(touched, on="segment_key").filter(pl.col("measured_at").is_between("t_min", "t_max"))
    # Where the batch ends inside a version, that version resumes at its first point after the batch.
    containing = (
        existing.join(touched, on="segment_key")
        .filter(pl.col("valid_from") <= pl.col("t_max"))
        .filter(pl.col("valid_to").is_null() | (pl.col("valid_to") > pl.col("t_max")))
        .select("segment_key", "t_max", pl.col("valid_to").alias("until"))
    )
    tail = _first_points_after(observations, options, containing)
    points = pl.concat([inside.select(POINT_COLUMNS), tail.select(POINT_COLUMNS)])
    attributes = _version_attributes(existing, batch.filter(pl.col("segment_key").is_in(list(keys))))
    versions = _recomputed_versions(touched, existing, points, attributes)
    if _same_versions(versions, existing):
        return False
    commit = CommitProperties(app_transactions=[Transaction(APP_ID, batch_no)])
    if existing_all.is_empty() and table.version() <= 0:
        write_deltalake(table, versions.to_arrow(), mode="append", commit_properties=commit,
                        post_commithook_properties=MERGE_HOOKS)  # fmt: skip
        return True
    quoted = ", ".join("'" + key.replace("'", "''") + "'" for key in sorted(keys))
    (
        table.merge(
            versions.to_arrow(),
            predicate="t.segment_key = s.segment_key AND t.valid_from = s.valid_from",
            source_alias="s",
            target_alias="t",
            commit_properties=commit,
            post_commithook_properties=MERGE_HOOKS,
        )
        .when_matched_update_all()
        .when_not_matched_insert_all()
        .when_not_matched_by_source_delete(predicate=f"t.segment_key IN ({quoted})")
        .execute()
    )
    return True


def merge_rejected(table: DeltaTable | None, rejected: pl.DataFrame, batch: int) -> None:
    if rejected.is_empty() or table is None:
        return
    now = datetime.now(UTC)
    record_columns = [c for c in rejected.columns if c not in ("reason", "source_key", "landed_at")]
    rows = rejected.with_columns(
        pl.struct(record_columns).struct.json_encode().alias("record_json"),
        pl.lit(now, dtype=UTC_US).alias("rejected_at"),
        pl.col("segment_key").cast(pl.String),
    ).select(list(SCHEMAS[REJECTED]))
    predicate = "t.source_key = s.source_key AND t.record_index = s.record_index AND " + _time_bounds(rows)
    _commit(table, lambda: _insert_missing(table, rows, predicate, batch), REJECTED)


def append_merge_log(table: DeltaTable, entries: pl.DataFrame, batch: int) -> None:
    rows = entries.select(list(SCHEMAS[MERGE_LOG]))
    predicate = f"t.source_key = s.source_key AND {_time_bounds(rows)}"
    version, files = table.version(), frozenset(table.file_uris())
    _commit(table, lambda: _insert_missing(table, rows, predicate, batch), MERGE_LOG)
    _note_merged(table, version, files, rows["source_key"].to_list())


# --------------------------------------------------------------------------- the merge


@dataclass
class MergeResult:
    merged_objects: int = 0
    observations: int = 0
    rejected_rows: int = 0
    duplicate_rows: int = 0
    quarantined_objects: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, int | float]:
        return {
            "merged_objects": self.merged_objects,
            "observations": self.observations,
            "rejected_rows": self.rejected_rows,
            "duplicate_rows": self.duplicate_rows,
            "quarantined_objects": self.quarantined_objects,
            "seconds": round(self.seconds, 3),
        }

    @classmethod
    def from_dict(cls, data: dict[str, int | float]) -> MergeResult:
        return cls(**data)  # type: ignore[arg-type]

    def summary(self) -> str:
        if not self.merged_objects and not self.quarantined_objects:
            return "nothing to merge: every landed snapshot is already in the lake"
        return (
            f"merged {self.merged_objects} snapshots: {self.observations} observations accepted, "
            f"{self.rejected_rows} rows rejected, {self.duplicate_rows} duplicate rows dropped, "
            f"{self.quarantined_objects} unreadable objects quarantined, in {self.seconds:.1f} s"
        )


def _batch_number() -> int:
    """The version of a chunk's app transaction (APP_ID): its start time in microseconds.

    delta-rs' conflict check looks at the app id only (two merges racing conflict whatever their versions),
    so the version need not be read back from the log (`transaction_version` GETs the checkpoint three
    times); it only has to grow from one merge to the next.
    """
    return time.time_ns() // 1000


def merge_objects(
    settings: Settings, objects: list[RawObject], s3: Any = None, tables: dict[str, DeltaTable] | None = None
) -> MergeResult:
    """Merge the given landed objects into the lake (idempotent), then record them in the merge log.

    Objects are committed OBJECTS_PER_COMMIT at a time (bounded memory on long backfills) while the
    next ones are being prepared.
    """
    started = time.perf_counter()
    s3 = s3 or storage.s3_client(settings)
    result = MergeResult()
    with ThreadPoolExecutor(max_workers=1) as background:
        # The tables open (S3 round trips, without the GIL) while the first objects are parsed (CPU).
        opening = background.submit(lambda: tables or ensure_tables(settings, MERGE_TABLES))
        pending: list[Prepared] = []
        for prepared in prepared_batches(settings, s3, objects):
            pending.append(prepared)
            if sum(len(p.counts) for p in pending) >= OBJECTS_PER_COMMIT:
                _merge_chunk(settings, s3, opening.result(), pending, result)
                pending = []
        if pending:
            _merge_chunk(settings, s3, opening.result(), pending, result)
    result.seconds = time.perf_counter() - started
    log.info(result.summary())
    return result


def _merge_chunk(
    settings: Settings, s3: Any, tables: dict[str, DeltaTable], batches: list[Prepared], result: MergeResult
) -> None:
    counts = [c for p in batches for c in p.counts]
    for item in counts:
        if item.error is not None:
            key = quarantine(s3, settings.bucket, item.body or b"", f"refused raw object {item.obj.key}: "
                             f"{item.error}", f"s3://{settings.bucket}/{item.obj.key}", "merge",
                             key=f"{QUARANTINE_PREFIX}{item.obj.key}")  # fmt: skip
            log.error("quarantined %s: %s (copy at %s)", item.obj.key, item.error, key)
            result.quarantined_objects += 1
    merged_at = datetime.now(UTC)
    batch = _batch_number()
    observations = pl.concat([p.observations for p in batches])
    obs_version = seg_version = tables[OBSERVATIONS].version()
    if observations.height:
        options = storage_options(settings)
        rejected = pl.concat([p.rejected for p in batches], how="diagonal_relaxed")
        if rejected.height and REJECTED not in tables:
            tables[REJECTED] = _open_table(settings, REJECTED)
        versions = pl.concat([p.versions for p in batches if p.versions.height])
        current = _segment_rows(tables[SEGMENTS], options).filter(pl.col("is_current"))
        hashes = hash_attributes(versions.unique(["segment_key", "fingerprint"]), current).select(
            "segment_key", "fingerprint", "attributes_hash"
        )
        versions = _collapse_versions(versions.join(hashes, on=["segment_key", "fingerprint"]), by="attributes_hash")
        rows = observations.join(hashes, on=["segment_key", "fingerprint"], how="left").with_columns(
            pl.lit(merged_at, dtype=UTC_US).alias("merged_at")
        )
        # Rejected rows and observations are independent commits: side by side. The segments follow the
        # observations (see merge_segments); the merge log waits for all of them.
        with ThreadPoolExecutor(max_workers=2) as writers:
            rejected_written = writers.submit(merge_rejected, tables.get(REJECTED), rejected, batch)
            obs_version = merge_observations(tables[OBSERVATIONS], rows, batch)
            rejected_written.result()
        points = rows.select("segment_key", "measured_at")
        seg_version = merge_segments(tables, versions, points, options, batch)
    for item in counts:
        if item.error is None:
            log.info("%s: %d records, %d accepted, %d rejected, %d duplicates",
                     item.obj.key, item.records, item.accepted, item.rejected, item.duplicates)  # fmt: skip
            result.merged_objects += 1
            result.observations += item.accepted
            result.rejected_rows += item.rejected
            result.duplicate_rows += item.duplicates
    if counts:
        batch_id = uuid.uuid4().hex
        entries = pl.DataFrame([_log_row(item, merged_at, batch_id) for item in counts], schema=SCHEMAS[MERGE_LOG])
        entries = entries.with_columns(
            pl.lit(obs_version, dtype=pl.Int64).alias("observations_version"),
            pl.lit(seg_version, dtype=pl.Int64).alias("segments_version"),
        )
        append_merge_log(tables[MERGE_LOG], entries, batch)


def _log_row(item: ObjectCounts, merged_at: datetime, batch_id: str) -> dict[str, Any]:
    return {
        "source_key": item.obj.key,
        "measured_at": item.measured_at,
        "landed_at": item.obj.landed_at,
        "merged_at": merged_at,
        "batch_id": batch_id,
        "record_count": item.records,
        "accepted_rows": item.accepted,
        "rejected_rows": item.rejected,
        "duplicate_rows": item.duplicates,
        "observations_version": None,
        "segments_version": None,
    }


def merge_pending(
    settings: Settings, s3: Any = None, tables: dict[str, DeltaTable] | None = None, index: RawIndex | None = None
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
    landed = list_raw(s3, settings.bucket)
    chosen = [obj for obj in landed if (when := key_time(obj.key)) is not None and start <= when < end]
    log.info("backfill %s to %s: %d landed snapshots", start.isoformat(), end.isoformat(), len(chosen))
    if unnamed := sum(1 for obj in landed if key_time(obj.key) is None):
        log.warning("%d raw objects have a key that names no snapshot time: the merge quarantines them", unnamed)
    return merge_objects(settings, sorted(chosen, key=lambda o: o.key), s3)


# --------------------------------------------------------------------------- maintenance and status


@dataclass
class MaintenanceResult:
    compacted: dict[str, int]
    vacuumed_files: dict[str, int]
    expired_raw_objects: int

    def summary(self) -> str:
        return (
            f"compacted {sum(self.compacted.values())} files into fewer, vacuumed "
            f"{sum(self.vacuumed_files.values())} unreferenced files, expired {self.expired_raw_objects} raw objects"
        )


def maintain(settings: Settings, s3: Any = None) -> MaintenanceResult:
    """Compact small files, checkpoint and trim the logs, vacuum, and expire old raw objects.

    One-minute merges leave one small file per table per minute; compaction rewrites them into few,
    a checkpoint lets readers skip replaying the JSON log, and vacuum deletes what no version within
    the retention still needs. Raw objects are the replay source: kept unless `raw_retention_days` > 0.
    Retentions come from TRAFFICWATCH_VACUUM_RETENTION_HOURS and TRAFFICWATCH_RAW_RETENTION_DAYS.
    """
    tables = ensure_tables(settings)
    compacted, vacuumed = {}, {}
    wanted = table_properties(settings)
    for name, table in tables.items():
        if any(table.metadata().configuration.get(key) != value for key, value in wanted.items()):
            table.alter.set_table_properties(wanted)
        metrics = _commit(table, lambda table=table: table.optimize.compact(), f"compact {name}")
        compacted[name] = int(metrics.get("numFilesRemoved", 0)) if metrics else 0
        table.update_incremental()
        table.create_checkpoint()
        table.cleanup_metadata()
        vacuumed[name] = len(
            table.vacuum(
                retention_hours=settings.vacuum_retention_hours, dry_run=False, enforce_retention_duration=False
            )
        )
    expired = expire_raw(settings, settings.raw_retention_days, s3 or storage.s3_client(settings), tables)
    result = MaintenanceResult(compacted, vacuumed, expired)
    log.info(result.summary())
    return result


def expire_raw(settings: Settings, retention_days: int, s3: Any, tables: dict[str, DeltaTable]) -> int:
    """Delete raw objects older than the retention, but only those already merged."""
    if retention_days <= 0:
        return 0
    cutoff = datetime.now(UTC) - timedelta(days=retention_days)
    merged = merged_keys(settings, tables)
    expired = [
        obj.key
        for obj in list_raw(s3, settings.bucket)
        if obj.key in merged and (when := key_time(obj.key)) is not None and when < cutoff
    ]
    for start in range(0, len(expired), 1000):
        batch = [{"Key": key} for key in expired[start : start + 1000]]
        s3.delete_objects(Bucket=settings.bucket, Delete={"Objects": batch, "Quiet": True})
    return len(expired)


def existing_tables(settings: Settings, names: Iterable[str] = tuple(SCHEMAS)) -> dict[str, DeltaTable | None]:
    """Open the tables (all four by default) as they are, None for a table not created yet: unlike
    `ensure_tables`, nothing is created or altered (the reads of `status`). Opened side by side."""
    names, options = tuple(names), storage_options(settings)

    def open_one(name: str) -> DeltaTable | None:
        try:
            return DeltaTable(table_uri(settings, name), storage_options=options)
        except TableNotFoundError:
            return None

    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        return dict(zip(names, pool.map(open_one, names), strict=True))


def status(settings: Settings, s3: Any = None) -> dict[str, Any]:
    """What an operator asks first: how much is landed, pending, quarantined, and the state of each table.

    A read: nothing is created, not even the tables (one not created yet has version None and no rows)."""
    s3 = s3 or storage.s3_client(settings)
    # S3 first: an unreachable endpoint, wrong keys or a missing bucket fail here, in S3's own words.
    raw = list_raw(s3, settings.bucket)
    quarantined = storage.list_keys(s3, settings.bucket, QUARANTINE_PREFIX)
    tables = existing_tables(settings)
    options = storage_options(settings)
    log_table = tables[MERGE_LOG]
    merged = merged_keys(settings, {MERGE_LOG: log_table}) if log_table is not None else frozenset()
    observations = tables[OBSERVATIONS]
    latest = None
    if observations is not None:
        latest = scan_table(observations, options).select(pl.col("measured_at").max()).collect().item()
    return {
        "bucket": settings.bucket,
        "raw_objects": len(raw),
        "pending_raw_objects": sum(1 for obj in raw if obj.key not in merged),
        "quarantined_objects": len(quarantined),
        "latest_measured_at": latest.isoformat() if latest else None,
        "tables": {name: _table_state(settings, name, table, options) for name, table in tables.items()},
    }


def _table_state(settings: Settings, name: str, table: DeltaTable | None, options: dict[str, str]) -> dict[str, Any]:
    if table is None:  # not created yet
        return {"uri": table_uri(settings, name), "version": None, "rows": 0, "files": 0}
    return {
        "uri": table_uri(settings, name),
        "version": table.version(),
        "rows": scan_table(table, options).select(pl.len()).collect().item(),
        "files": len(table.file_uris()),
    }
