"""Benchmark of the lake merge (`trafficwatch.lake`): a one-day backfill, and one new snapshot into history.

What is measured (figures only: nothing here asserts a time)
-------------------------------------------------------------
1. One-day backfill: the 1,440 snapshots of one day (one a minute, 2,859 records each) landed under
   `raw/`, merged by one `lake.merge_objects` call into the empty tables of a fresh bucket; 3 runs.
2. One new snapshot into tables holding 1 day and 30 days of history: 23 consecutive snapshots (00:00 to
   00:22 of the next day), each merged into the tables the previous one left, as the minute merges would,
   by two paths:
   a. 11 runs in this process, `lake.merge_objects(settings, [that one object])`: the tables opened for
      it, as in an Airflow task without the worker;
   b. then a worker (`trafficwatch worker`) per history, started as `make demo` starts it, merges one
      snapshot to warm up (its first merge reads the whole merge log; not counted), then 11 runs of
      `worker.merge_pending(settings)` timed from the requesting process: what the merge DAG task calls,
      i.e. pending discovery (incremental listing of raw/) and the merge, on the tables the worker keeps open.
3. Discovering pending objects (`lake.pending_raw`: list `raw/`, read `merge_log`) at both sizes, with
   one new snapshot landed and not merged yet; 7 runs. And the worker's incremental listing of the same
   `raw/` (`raw.RawIndex.refresh` after its first, full listing); 7 runs.

Every figure is a median, every run is printed, with wall seconds and the CPU seconds of the process
(all threads). The 1-day and 30-day runs alternate (1, 30, 30, 1, ...) in one process, so both see the
same machine load. Each series runs in a fresh spawned process: a backfill's peak RSS is its process's
peak; a single merge's is the peak during the call (VmHWM reset through /proc/self/clear_refs).

How the data is made
--------------------
- Snapshots: the local feed (`trafficwatch_dev.feed`: the simulator evolving the real base snapshot, seed 0,
  one snapshot a minute from 2024-08-26 00:00 UTC) served on loopback, fetched and landed by
  `landing.ingest`: the exports/json body the feed serves, gzipped under `raw.raw_key` with its
  metadata, exactly as production lands it. A backfill run gets server-side copies of them.
- 1-day history: the first backfill run's tables, then `lake.maintain` (compact, checkpoint, vacuum).
- 30-day history (123.5 M observations): written directly with `write_deltalake` into tables created by
  `lake.ensure_tables` (exact `lake.SCHEMAS` and partitioning), one day per write: the 1-day history's
  rows re-dated by whole days (measured_at, measured_date, landed_at, merged_at and source keys move
  together), road_segments opened on the first day, one merge_log row per minute; then `lake.maintain`.
  Each snapshot's rows and merge_log row are stamped as the live minute merges stamp them (`live_stamps`:
  landed LIVE_LANDED_AFTER, merged LIVE_MERGED_AFTER its minute), not with the 1-day backfill's own stamps,
  which fall within half a minute for the whole day: with those, the newest day stayed inside the marts'
  late-commit margin (60 min behind the newest absorbed merge) and every marts build re-read its 4.1 M rows,
  which a lake filled by 30 days of minute merges never asks of a build.
  Its `raw/` zone is not created for real (43,200 objects, ~18 GB): the 30-day `pending_raw` figure lists
  a separate bucket holding the same 43,200 keys plus the new one, as empty placeholder objects.

A SeaweedFS S3 server (`weed mini`) is started on free loopback ports with random keys, its data under
`$TRAFFICWATCH_HOME/bench/s3` (default `.data/bench`). The raw zone and both histories are kept there and
reused when `manifest.json` and a check of every table (files and row counts) say they are complete.
Merges measured into a history are undone afterwards: the next day's rows deleted (their files hold
nothing else, so the table's files are again exactly the recorded ones; Delta restore to the recorded
version otherwise), a checkpoint written (the state maintenance leaves), the new raw objects deleted.

Run: `make bench`, or `.venv/bin/python bench/lake_merge.py [--profile]`. `--profile` then prints the wall
and CPU time of each step of the merge (ensure_tables, prepare, validate, each MERGE, ...) for one more
backfill and 11 more single merges per history size, by wrapping the lake package's functions in the
profiling process (the package itself is not changed). `--only backfill [--runs N]` runs the backfill alone
(N runs, 3 by default, each into a fresh bucket dropped afterwards; with `--profile`, one more profiled): each
run also prints the CPU seconds of the preparation workers and the cores busy ((CPU of the process and its
workers) / wall; 2.0 = both cores busy throughout).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import json
import logging
import multiprocessing
import os
import platform
import re
import resource
import secrets
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import botocore.exceptions
import deltalake
import polars as pl
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake

from trafficwatch import lake, landing, operate, raw, services, storage, worker
from trafficwatch.config import REPO_ROOT, Settings, load_settings
from trafficwatch.source import Client
from trafficwatch_dev.feed import FeedConfig, start_in_thread

DAY = datetime(2024, 8, 26, tzinfo=UTC)  # the base snapshot's day (a Monday), from 00:00 UTC
MINUTES = 1440
RECORDS = 2859  # records per snapshot: the base snapshot's segments
SINGLE_RUNS = 11
NEW_SNAPSHOTS = 2 * SINGLE_RUNS + 1  # merged in this process, then one to warm the worker up, then through it
BACKFILL_RUNS = 3
PENDING_RUNS = 7
HISTORY_DAYS = 30
SEED = 0
LAND_WORKERS = 2
COPY_THREADS = 8  # botocore keeps 10 connections per client

RAW_BUCKET = "bench-raw"
HISTORY_BUCKETS = {1: "bench-history-1d", HISTORY_DAYS: f"bench-history-{HISTORY_DAYS}d"}
LISTING_BUCKET = f"bench-listing-{HISTORY_DAYS}d"
CACHE_FORMAT = 1  # bump when the way the cached data is made changes

TARGET_BACKFILL_S = 60.0
TARGET_SINGLE_S = 0.2
TARGET_RATIO = 1.2

log = logging.getLogger("bench")


# --------------------------------------------------------------------------- small helpers


def minute(index: int) -> datetime:
    return DAY + timedelta(minutes=index)


def day_keys() -> list[str]:
    return [raw.raw_key(minute(i)) for i in range(MINUTES)]


def new_keys() -> list[str]:
    return [raw.raw_key(minute(MINUTES + i)) for i in range(NEW_SNAPSHOTS)]


def median(values: list[float]) -> float:
    return statistics.median(values)


def gb(kib: int) -> str:
    return f"{kib / 1024**2:.2f} GB"


def runs_text(values: list[float], digits: int) -> str:
    return " ".join(f"{v:.{digits}f}" for v in values)


def bench_home() -> Path:
    home = Path(os.environ.get("TRAFFICWATCH_HOME") or REPO_ROOT / ".data") / "bench"
    home.mkdir(parents=True, exist_ok=True)
    return home.resolve()


def settings_for(bucket: str, **changes: Any) -> Settings:
    """Settings for one bench bucket on the bench's S3 server (its endpoint is in AWS_ENDPOINT_URL)."""
    return replace(
        load_settings(), bucket=bucket, s3_endpoint_url=os.environ["AWS_ENDPOINT_URL"], api_mode="exports", **changes
    )


def s3_client() -> Any:
    return storage.s3_client(settings_for(RAW_BUCKET))


@contextlib.contextmanager
def stopwatch() -> Iterator[Callable[[], float]]:
    started = time.perf_counter()
    elapsed: list[float] = []
    yield lambda: elapsed[0] if elapsed else time.perf_counter() - started
    elapsed.append(time.perf_counter() - started)


class PeakRss:
    """Peak resident memory of this process since `reset()`, in KiB (Linux VmHWM; ru_maxrss otherwise)."""

    def __init__(self) -> None:
        self.resettable = True
        self.reset()

    def reset(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.resettable = False

    def read(self) -> int:
        with contextlib.suppress(OSError, AttributeError):
            match = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
            if match and self.resettable:
                return int(match.group(1))
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def in_child(function: Callable[..., Any], *args: Any) -> Any:
    """Run `function(*args)` in a fresh spawned process: clean memory figures, nothing left behind."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


# --------------------------------------------------------------------------- S3 server and buckets


@contextlib.contextmanager
def bench_s3(home: Path) -> Iterator[str]:
    """The bench's own SeaweedFS S3 server (random keys, free ports), stopped on exit."""
    services.stop(home, "s3")  # a server left by an interrupted bench run: its ports and keys are unknown
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench" + secrets.token_hex(6),
        AWS_SECRET_ACCESS_KEY=secrets.token_urlsafe(24),
        AWS_REGION=os.environ.get("AWS_REGION") or "us-east-1",
    )
    service = services.local_s3(home / "s3", services.free_s3_port(), RAW_BUCKET)
    os.environ["AWS_ENDPOINT_URL"] = service.url
    services.start(service, home)
    try:
        yield service.url
    finally:
        services.stop(home, service.name)


def bucket_exists(s3: Any, bucket: str) -> bool:
    try:
        s3.head_bucket(Bucket=bucket)
    except botocore.exceptions.ClientError:
        return False
    return True


def drop_bucket(s3: Any, bucket: str) -> None:
    if not bucket_exists(s3, bucket):
        return
    keys = storage.list_keys(s3, bucket, "")
    for start in range(0, len(keys), 1000):
        batch = [{"Key": key} for key in keys[start : start + 1000]]
        s3.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
    s3.delete_bucket(Bucket=bucket)


def fresh_bucket(s3: Any, bucket: str) -> None:
    drop_bucket(s3, bucket)
    s3.create_bucket(Bucket=bucket)


def copy_objects(s3: Any, source: str, target: str, keys: list[str]) -> None:
    """Server-side copies, metadata included (a copy's LastModified, hence its landed_at, is now)."""

    def copy(key: str) -> None:
        s3.copy_object(Bucket=target, Key=key, CopySource={"Bucket": source, "Key": key})

    with ThreadPoolExecutor(COPY_THREADS) as pool:
        list(pool.map(copy, keys))


def raw_object(s3: Any, bucket: str, key: str) -> raw.RawObject:
    modified = s3.head_object(Bucket=bucket, Key=key)["LastModified"]
    return raw.RawObject(key, modified.astimezone(UTC))


# --------------------------------------------------------------------------- the cache manifest


def fingerprint() -> str:
    """What cached tables depend on: the lake's schemas, partitioning and table properties, and this bench."""
    properties = lake.table_properties(load_settings()) if hasattr(lake, "table_properties") else {}
    text = repr((CACHE_FORMAT, lake.SCHEMAS, lake.PARTITIONS, properties, DAY, SEED, HISTORY_DAYS))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def code_version() -> str:
    """Which lake package the figures belong to: the commit, and its files' own hash (they may be uncommitted)."""
    package = Path(lake.__file__).parent
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in sorted(package.glob("*.py")))).hexdigest()[:12]
    try:
        head = subprocess.run(
            ["git", "-C", str(package), "log", "-1", "--format=%h", "--", "."],
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(package), "diff", "--quiet", "--", "."], timeout=10)
    except (OSError, subprocess.SubprocessError):
        return f"lake/*.py sha256 {digest}"
    return f"lake/*.py sha256 {digest} (last commit {head}{', uncommitted changes' if dirty.returncode else ''})"


@dataclass
class Manifest:
    path: Path
    data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, home: Path) -> Manifest:
        path = home / "manifest.json"
        try:
            data = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            data = {}
        if data.get("fingerprint") != fingerprint():
            data = {"fingerprint": fingerprint()}
        return cls(path, data)

    def get(self, stage: str) -> dict[str, Any] | None:
        return self.data.get(stage)

    def put(self, stage: str, value: dict[str, Any] | None) -> None:
        if value is None:
            self.data.pop(stage, None)
        else:
            self.data[stage] = value
        self.path.write_text(json.dumps(self.data, indent=1, default=str))


# --------------------------------------------------------------------------- 1. the raw zone


def _land_worker(indices: list[int]) -> int:
    """Serve snapshots from the local feed in a thread and land them with the production ingest."""
    server = start_in_thread(FeedConfig(port=0, start=DAY, interval_s=60.0, speed=1e-6, seed=SEED))
    try:
        settings = settings_for(RAW_BUCKET, api_url=server.url)
        s3, client = storage.s3_client(settings), Client(settings)
        for index in indices:
            server.advance(index - server.current_index())
            result = landing.ingest(settings, s3, client)
            if result.key != raw.raw_key(minute(index)):
                raise RuntimeError(f"feed served {result.key} for snapshot {index}")
    finally:
        server.close()
    return len(indices)


def ensure_raw_zone(s3: Any) -> None:
    """The day's 1,440 snapshots and the next day's first ones, landed once in the raw bucket."""
    wanted = {key: i for i, key in enumerate(day_keys() + new_keys())}
    present = set(storage.list_keys(s3, RAW_BUCKET, raw.RAW_PREFIX))
    missing = sorted(i for key, i in wanted.items() if key not in present)
    if not missing:
        print(f"raw zone: cached ({len(wanted)} snapshots in s3://{RAW_BUCKET}/raw/)")
        return
    print(f"raw zone: landing {len(missing)} snapshots from the simulator through the local feed ...", flush=True)
    with (
        stopwatch() as took,
        ProcessPoolExecutor(LAND_WORKERS, mp_context=multiprocessing.get_context("spawn")) as pool,
    ):
        shares = [missing[w::LAND_WORKERS] for w in range(LAND_WORKERS)]
        landed = sum(pool.map(_land_worker, shares))
    print(f"raw zone: landed {landed} snapshots in {took():.0f} s")
    present = set(storage.list_keys(s3, RAW_BUCKET, raw.RAW_PREFIX))
    if not set(wanted) <= present:
        raise RuntimeError("raw zone incomplete after landing")


# --------------------------------------------------------------------------- 2. backfill runs


@dataclass
class Run:
    seconds: float  # wall clock
    cpu: float  # CPU seconds of the whole process (every thread) during the call
    peak_kib: int
    rows: int = 0
    detail: dict[str, Any] = field(default_factory=dict)
    # CPU seconds of the processes it waited for during the call (the preparation workers), and their
    # largest peak RSS (ru_maxrss: a peak over the process's children so far, 0 if none)
    children_cpu: float = 0.0
    children_peak_kib: int = 0

    @property
    def busy_cores(self) -> float:
        """CPU seconds of the process and its workers per wall second: 2.0 is two cores busy throughout."""
        return (self.cpu + self.children_cpu) / self.seconds if self.seconds else 0.0


def timed_merge(settings: Settings, objects: list[raw.RawObject], peak: PeakRss) -> Run:
    """`lake.merge_objects(settings, objects)`, timed: what the brief measures, nothing around it."""
    peak.reset()
    cpu = time.process_time()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    with stopwatch() as took:
        result = lake.merge_objects(settings, objects)
    waited = resource.getrusage(resource.RUSAGE_CHILDREN)
    children_cpu = waited.ru_utime + waited.ru_stime - children.ru_utime - children.ru_stime
    run = Run(took(), time.process_time() - cpu, peak.read(), result.observations, result.as_dict())
    run.children_cpu, run.children_peak_kib = children_cpu, waited.ru_maxrss
    return run


def _backfill_child(bucket: str) -> Run:
    settings = settings_for(bucket)
    objects = sorted(raw.list_raw(storage.s3_client(settings), bucket), key=lambda o: o.key)
    return timed_merge(settings, objects, PeakRss())


def backfill_run(s3: Any, bucket: str) -> Run:
    """The day's snapshots copied into a fresh bucket, then merged into its empty tables in one call."""
    fresh_bucket(s3, bucket)
    copy_objects(s3, RAW_BUCKET, bucket, day_keys())
    run = in_child(_backfill_child, bucket)
    if run.detail["merged_objects"] != MINUTES:
        raise RuntimeError(f"backfill merged {run.detail['merged_objects']} snapshots, not {MINUTES}: {run.detail}")
    return run


# --------------------------------------------------------------------------- histories: record, check, restore


def table_state(settings: Settings) -> dict[str, dict[str, Any]]:
    """Per table: version, data files and row count (what a cached history must still have)."""
    options = lake.storage_options(settings)
    state = {}
    for name, table in lake.ensure_tables(settings).items():
        rows = lake.scan_table(table, options).select(pl.len()).collect().item()
        state[name] = {"version": table.version(), "files": sorted(table.file_uris()), "rows": rows}
    return state


def measured_rows() -> dict[str, str]:
    """Per table, the rows that measurements add (every new snapshot is on the day after the history)."""
    since = minute(MINUTES)
    moment = f"'{since:%Y-%m-%dT%H:%M:%S}Z'"
    return {
        lake.OBSERVATIONS: f"measured_date >= '{since:%Y-%m-%d}'",
        lake.SEGMENTS: f"valid_from >= {moment}",
        lake.REJECTED: f"measured_at >= {moment}",
        lake.MERGE_LOG: f"measured_at >= {moment}",
    }


def _undo(table: DeltaTable, name: str, want: dict[str, Any]) -> None:
    """Delete the measured rows (their files hold nothing else); time-travel restore if that is not enough.

    Deleting needs no old log version, which `delta.logRetentionDuration` may have cleaned up by now.
    """
    table.delete(measured_rows()[name])
    table.update_incremental()
    if sorted(table.file_uris()) != want["files"]:
        table.restore(want["version"])
        table.update_incremental()


def restore_history(s3: Any, settings: Settings, golden: dict[str, dict[str, Any]]) -> bool:
    """Undo what measurements merged into a history: False if it cannot be brought back."""
    stray = storage.list_keys(s3, settings.bucket, raw.raw_key(minute(MINUTES)).rsplit("/", 1)[0] + "/")
    for start in range(0, len(stray), 1000):
        batch = [{"Key": key} for key in stray[start : start + 1000]]
        s3.delete_objects(Bucket=settings.bucket, Delete={"Objects": batch, "Quiet": True})
    options = lake.storage_options(settings)
    try:
        for name, want in golden.items():
            table = DeltaTable(lake.table_uri(settings, name), storage_options=options)
            if sorted(table.file_uris()) != want["files"]:
                _undo(table, name, want)
            table.create_checkpoint()  # as after maintenance: no JSON commits to replay on open
        state = table_state(settings)
    except Exception as exc:  # a missing table, an expired log version: the history must be rebuilt
        print(f"  {settings.bucket}: cannot restore ({exc})")
        return False
    return all(state[n]["files"] == w["files"] and state[n]["rows"] == w["rows"] for n, w in golden.items())


def cached_history(s3: Any, manifest: Manifest, days: int, depends_on: str | None = None) -> dict[str, Any] | None:
    stage = manifest.get(f"history_{days}d")
    if stage is None or (depends_on is not None and stage.get("from") != depends_on):
        return None
    bucket = HISTORY_BUCKETS[days]
    if not bucket_exists(s3, bucket) or not restore_history(s3, settings_for(bucket), stage["tables"]):
        return None
    return stage


def record_history(manifest: Manifest, days: int, **extra: Any) -> dict[str, Any]:
    settings = settings_for(HISTORY_BUCKETS[days])
    stage = {"id": uuid.uuid4().hex, "built_at": datetime.now(UTC).isoformat(), **extra}
    stage["tables"] = table_state(settings)
    manifest.put(f"history_{days}d", stage)
    return stage


# --------------------------------------------------------------------------- 30-day history, written directly


def source_key_expr(column: str) -> pl.Expr:
    """`raw.raw_key` of a UTC timestamp column, vectorised."""
    moment = pl.col(column)
    return pl.format(
        raw.RAW_PREFIX + "date={}/{}" + raw.RAW_SUFFIX,
        moment.dt.strftime("%Y-%m-%d"),
        moment.dt.strftime("%Y%m%dT%H%M%SZ"),
    )


LIVE_LANDED_AFTER = timedelta(seconds=10)  # a snapshot of minute m lands ~10 s into the next minute
LIVE_MERGED_AFTER = timedelta(seconds=15)  # and is merged within seconds (the sensor's poke, the merge)
HISTORY_STAMPS = "live"  # how the 30-day history's landed_at / merged_at were made (its cache is kept per value)


def live_stamps(frame: pl.DataFrame) -> pl.DataFrame:
    """Rows (observations or merge_log) stamped as the live minute merges stamp them: landed_at and
    merged_at a few seconds after their snapshot's time, one merge stamp per snapshot."""
    return frame.with_columns(
        (pl.col("measured_at") + LIVE_LANDED_AFTER).alias("landed_at"),
        (pl.col("measured_at") + LIVE_MERGED_AFTER).alias("merged_at"),
    )


def redated(frame: pl.DataFrame, name: str, days_back: int) -> pl.DataFrame:
    """Rows of the 1-day history moved `days_back` days earlier, source keys included."""
    shift = timedelta(days=days_back)
    moved = [c for c in ("measured_at", "landed_at", "merged_at", "rejected_at", "measured_date") if c in frame.columns]
    frame = frame.with_columns([pl.col(c) - shift for c in moved])
    if "measured_at" in frame.columns:
        frame = frame.with_columns(source_key_expr("measured_at").alias("source_key"))
    return frame.select(list(lake.SCHEMAS[name])).cast(lake.SCHEMAS[name])


def opened_earlier(segments: pl.DataFrame, days_back: int) -> pl.DataFrame:
    """Segment versions: the first version of each segment opens `days_back` days earlier."""
    first = pl.col("valid_from") == pl.col("valid_from").min().over("segment_key")
    moved = pl.col("valid_from") - timedelta(days=days_back)
    return segments.with_columns(
        pl.when(first).then(moved).otherwise(pl.col("valid_from")).alias("valid_from"),
    ).with_columns(
        pl.when(first).then(source_key_expr("valid_from")).otherwise(pl.col("source_key")).alias("source_key"),
    )


def _append(table: DeltaTable, frame: pl.DataFrame, name: str, batch: int | None = None) -> int:
    properties = CommitProperties(app_transactions=[Transaction(lake.APP_ID, batch)]) if batch else None
    write_deltalake(
        table,
        frame.select(list(lake.SCHEMAS[name])).cast(lake.SCHEMAS[name]).to_arrow(),
        mode="append",
        partition_by=lake.PARTITIONS[name] or None,
        commit_properties=properties,
    )
    table.update_incremental()
    return table.version()


def _build_history_child(source_bucket: str, bucket: str, days: int) -> None:
    one_day, settings = settings_for(source_bucket), settings_for(bucket)
    options = lake.storage_options(one_day)
    source = lake.ensure_tables(one_day)
    frames = {name: lake.scan_table(table, options).collect() for name, table in source.items()}
    for name in (lake.OBSERVATIONS, lake.MERGE_LOG):
        frames[name] = live_stamps(frames[name])
    observations = frames[lake.OBSERVATIONS]
    if not observations.select((pl.col("source_key") == source_key_expr("measured_at")).all()).item():
        raise RuntimeError("1-day history: source_key is not raw_key(measured_at) on every row")
    batches_per_day = source[lake.OBSERVATIONS].transaction_version(lake.APP_ID) or 1

    fresh_bucket(storage.s3_client(settings), bucket)
    tables = lake.ensure_tables(settings)
    segments_version = _append(tables[lake.SEGMENTS], opened_earlier(frames[lake.SEGMENTS], days - 1), lake.SEGMENTS)
    logs = []
    for day in range(days):
        back = days - 1 - day
        batch = batches_per_day * (day + 1)
        version = _append(
            tables[lake.OBSERVATIONS], redated(observations, lake.OBSERVATIONS, back), lake.OBSERVATIONS, batch
        )
        if frames[lake.REJECTED].height:
            _append(tables[lake.REJECTED], redated(frames[lake.REJECTED], lake.REJECTED, back), lake.REJECTED)
        logs.append(
            redated(frames[lake.MERGE_LOG], lake.MERGE_LOG, back).with_columns(
                pl.lit(version, dtype=pl.Int64).alias("observations_version"),
                pl.lit(segments_version, dtype=pl.Int64).alias("segments_version"),
            )
        )
        print(f"  {bucket}: day {day + 1}/{days} written (observations version {version})", flush=True)
    _append(tables[lake.MERGE_LOG], pl.concat(logs), lake.MERGE_LOG)
    print(f"  {bucket}: {lake.maintain(settings).summary()}", flush=True)


def ensure_history_30d(s3: Any, manifest: Manifest, one_day: dict[str, Any]) -> dict[str, Any]:
    stage = cached_history(s3, manifest, HISTORY_DAYS, depends_on=one_day["id"])
    if stage and stage.get("stamps") != HISTORY_STAMPS:
        stage = None  # made by an earlier version of this bench
    if stage:
        print(f"{HISTORY_DAYS}-day history: cached in s3://{HISTORY_BUCKETS[HISTORY_DAYS]}")
        return stage
    manifest.put(f"history_{HISTORY_DAYS}d", None)
    print(f"{HISTORY_DAYS}-day history: writing it with write_deltalake, one day per write ...", flush=True)
    with stopwatch() as took:
        in_child(_build_history_child, HISTORY_BUCKETS[1], HISTORY_BUCKETS[HISTORY_DAYS], HISTORY_DAYS)
        stage = record_history(manifest, HISTORY_DAYS, **{"from": one_day["id"], "stamps": HISTORY_STAMPS})
    print(f"{HISTORY_DAYS}-day history: built in {took():.0f} s")
    return stage


def ensure_listing(s3: Any, history: dict[str, Any]) -> int:
    """Placeholder objects under the 30-day merge log's keys plus the first new one, for listing only."""
    settings = settings_for(HISTORY_BUCKETS[HISTORY_DAYS])
    merged = lake.merged_keys(settings, lake.ensure_tables(settings))
    wanted = merged | {new_keys()[0]}
    if bucket_exists(s3, LISTING_BUCKET) and set(storage.list_keys(s3, LISTING_BUCKET, raw.RAW_PREFIX)) == wanted:
        print(f"listing bucket: cached ({len(wanted):,} keys in s3://{LISTING_BUCKET}/raw/)")
        return len(wanted)
    print(f"listing bucket: writing {len(wanted):,} empty placeholder objects ...", flush=True)
    fresh_bucket(s3, LISTING_BUCKET)

    def put(key: str) -> None:
        s3.put_object(Bucket=LISTING_BUCKET, Key=key, Body=b"", Metadata={"bench": "listing placeholder"})

    with stopwatch() as took, ThreadPoolExecutor(COPY_THREADS) as pool:
        list(pool.map(put, sorted(wanted)))
    print(f"listing bucket: written in {took():.0f} s")
    return len(wanted)


# --------------------------------------------------------------------------- 3. single merges and pending discovery


@dataclass
class Series:
    """One history size: its single merges and its pending discoveries."""

    merges: list[Run] = field(default_factory=list)
    served: list[Run] = field(default_factory=list)  # through the worker
    worker_rss_kib: int = 0
    pending: list[float] = field(default_factory=list)
    incremental_listing: list[float] = field(default_factory=list)
    pending_found: int = 0
    listed: int = 0
    merge_log_rows: int = 0


def alternating(run: int) -> list[int]:
    """Both history sizes in every run, first one then the other: they share the machine's load."""
    sizes = list(HISTORY_BUCKETS)
    return sizes if run % 2 == 0 else sizes[::-1]


def listing_settings(days: int) -> Settings:
    """Where `pending_raw` lists raw objects: the history's own raw/ zone, or the placeholder bucket."""
    settings = settings_for(HISTORY_BUCKETS[days])
    return replace(settings, bucket=LISTING_BUCKET) if days == HISTORY_DAYS else settings


def _singles_child(keys: list[str]) -> dict[int, Series]:
    s3 = s3_client()
    series = {days: Series() for days in HISTORY_BUCKETS}
    for bucket in HISTORY_BUCKETS.values():
        copy_objects(s3, RAW_BUCKET, bucket, keys[:1])  # landed, not merged yet: one pending object
    for run in range(PENDING_RUNS):
        for days in alternating(run):
            tables = lake.ensure_tables(settings_for(HISTORY_BUCKETS[days]))
            with stopwatch() as took:
                series[days].pending_found = len(lake.pending_raw(listing_settings(days), s3, tables))
            series[days].pending.append(took())
    for days, figures in series.items():
        settings = settings_for(HISTORY_BUCKETS[days])
        index = raw.RawIndex()  # the worker's listing: once in full, then only what sorts after its last key
        index.refresh(s3, listing_settings(days).bucket)
        for _ in range(PENDING_RUNS):
            with stopwatch() as took:
                index.refresh(s3, listing_settings(days).bucket)
            figures.incremental_listing.append(took())
        figures.listed = len(raw.list_raw(s3, listing_settings(days).bucket))
        figures.merge_log_rows = len(lake.merged_keys(settings, lake.ensure_tables(settings)))
    peak = PeakRss()
    cold, warm_up, served = keys[:SINGLE_RUNS], keys[SINGLE_RUNS], keys[SINGLE_RUNS + 1 :]
    for run, key in enumerate(cold):
        for days in alternating(run):
            bucket = HISTORY_BUCKETS[days]
            copy_objects(s3, RAW_BUCKET, bucket, [key])
            series[days].merges.append(
                check(bucket, timed_merge(settings_for(bucket), [raw_object(s3, bucket, key)], peak))
            )
    with running_workers() as workers:
        for settings in workers.values():  # the worker's first merge reads the whole merge log
            copy_objects(s3, RAW_BUCKET, settings.bucket, [warm_up])
            check(settings.bucket, timed_worker_merge(settings))
        for run, key in enumerate(served):
            for days in alternating(run):
                settings = workers[days]
                copy_objects(s3, RAW_BUCKET, settings.bucket, [key])
                series[days].served.append(check(settings.bucket, timed_worker_merge(settings)))
        for days, settings in workers.items():
            series[days].worker_rss_kib = operate.rss_bytes(services.running_pid(settings.home, "worker") or 0) // 1024
    return series


def check(bucket: str, merged: Run) -> Run:
    if merged.detail["merged_objects"] != 1 or merged.rows != RECORDS:
        raise RuntimeError(f"{bucket}: expected one snapshot, {RECORDS} new observations, got {merged.detail}")
    return merged


@contextlib.contextmanager
def running_workers() -> Iterator[dict[int, Settings]]:
    """`trafficwatch worker` for each history bucket (each with its own home), as `make demo` runs one."""
    homes = {days: bench_home() / f"worker-{days}d" for days in HISTORY_BUCKETS}
    workers = {days: settings_for(HISTORY_BUCKETS[days], home=home) for days, home in homes.items()}
    try:
        for settings in workers.values():
            service = services.worker(worker.socket_path(settings))
            env = {"TRAFFICWATCH_HOME": str(settings.home), "TRAFFICWATCH_BUCKET": settings.bucket}
            services.start(replace(service, env=env), settings.home)
        yield workers
    finally:
        for settings in workers.values():
            services.stop(settings.home, "worker")


def timed_worker_merge(settings: Settings) -> Run:
    """`worker.merge_pending(settings)` as the DAG task calls it when the worker runs, timed from here."""
    cpu = time.process_time()
    with stopwatch() as took:
        result = worker.merge_pending(settings)
    return Run(took(), time.process_time() - cpu, 0, result.observations, result.as_dict())


def restore_all(s3: Any, histories: dict[int, dict[str, Any]]) -> None:
    for days, history in histories.items():
        if not restore_history(s3, settings_for(HISTORY_BUCKETS[days]), history["tables"]):
            raise RuntimeError(f"{HISTORY_BUCKETS[days]}: could not restore the history after measuring")


def measure_singles(s3: Any, histories: dict[int, dict[str, Any]]) -> dict[int, Series]:
    try:
        return in_child(_singles_child, new_keys())
    finally:
        restore_all(s3, histories)


# --------------------------------------------------------------------------- --profile: where the time goes

# The merge's steps, timed by wrapping the lake package's functions in the profiling process only (the package
# is not changed), each where it is called: "lake.merge.merge_observations" is the name the merge module calls.
# Steps nest: `_rewrite_versions` is part of `merge_segments`, `may_hold` of the writes. `prepare`
# (download, parse, validate, dedupe) runs in worker processes for batches of PROCESSES_FROM objects or more:
# there, only the main process's wait for the prepared batches shows.
PHASES = (
    ("storage.s3_client", "create the S3 client"),
    ("lake.merge.ensure_tables", "open the four tables"),
    ("lake.preparation.prepare", "prepare in this process: download + parse + validate + dedupe"),
    ("lake.merge._merge_chunk", "write the chunks (the rest of the total: waiting for prepared objects)"),
    ("lake.merge.merge_rejected", "write rejected_records"),
    ("lake.merge.merge_observations", "write traffic_observations (append, or MERGE if not new)"),
    ("lake.writes.may_hold", "  may the table hold these rows? (Delta log statistics)"),
    ("lake.preparation.validate", "  validate rows (in prepare)"),
    ("lake.merge.merge_segments", "road_segments: touched segments (none in a steady minute), after the observations"),
    ("lake.segments._rewrite_versions", "  recompute and write the versions of touched segments"),
    ("lake.merge.append_merge_log", "write merge_log"),
    ("lake.merge_objects", "merge_objects, total"),
)
THREAD_PHASES: set[str] = set()  # phases run in other threads: timed with per-thread CPU


@dataclass
class PhaseTimes:
    wall: float = 0.0
    cpu: float = 0.0
    calls: int = 0


@contextlib.contextmanager
def phase_timers() -> Iterator[dict[str, PhaseTimes]]:
    """Wall and CPU time per step of the merge while the block runs (the functions are restored afterwards)."""
    totals = {name: PhaseTimes() for name, _ in PHASES}
    modules = {name: importlib.import_module(f"trafficwatch.{name.rpartition('.')[0]}") for name in totals}
    originals: dict[str, Callable[..., Any]] = {}
    for name in totals:
        attribute = name.rpartition(".")[2]
        if hasattr(modules[name], attribute):
            originals[name] = getattr(modules[name], attribute)

    def timed(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        clock = time.thread_time if name in THREAD_PHASES else time.process_time

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            wall, cpu = time.perf_counter(), clock()
            try:
                return function(*args, **kwargs)
            finally:
                times = totals[name]
                times.wall += time.perf_counter() - wall
                times.cpu += clock() - cpu
                times.calls += 1

        return wrapper

    for name, function in originals.items():
        setattr(modules[name], name.rpartition(".")[2], timed(name, function))
    try:
        yield totals
    finally:
        for name, function in originals.items():
            setattr(modules[name], name.rpartition(".")[2], function)


def _profile_child(bucket: str, keys: list[str]) -> list[dict[str, PhaseTimes]]:
    """One backfill of `keys` (several keys), or one single merge per key, each with its phase times."""
    settings = settings_for(bucket)
    s3 = s3_client()
    groups = [keys] if len(keys) > 1 else [[key] for key in keys]
    profiles = []
    for group in groups:
        copy_objects(s3, RAW_BUCKET, bucket, group[-1:])
        objects = [raw_object(s3, bucket, key) for key in group]
        with phase_timers() as totals:
            lake.merge_objects(settings, objects)
        profiles.append(totals)
    return profiles


def _profile_singles_child(keys: list[str]) -> dict[int, list[dict[str, PhaseTimes]]]:
    profiles: dict[int, list[dict[str, PhaseTimes]]] = {days: [] for days in HISTORY_BUCKETS}
    for run, key in enumerate(keys):
        for days in alternating(run):
            profiles[days] += _profile_child(HISTORY_BUCKETS[days], [key])
    return profiles


def print_profile(title: str, profiles: list[dict[str, PhaseTimes]]) -> None:
    """Median wall and CPU seconds per phase over the profiled runs."""
    print(f"\n  phases of lake.merge_objects, {title} (median of {len(profiles)} run(s); wall s / CPU s / calls):")
    for name, label in PHASES:
        times = [p[name] for p in profiles if name in p]
        if not times:
            continue
        wall = "-" if name in THREAD_PHASES else f"{median([t.wall for t in times]):.3f}"
        print(f"    {label:<54} {wall:>8} {median([t.cpu for t in times]):8.3f} {times[0].calls:5d}")


def profile_backfill(s3: Any) -> None:
    """One more one-day backfill into a bucket of its own, with the time per step printed."""
    bucket = f"bench-profile-{uuid.uuid4().hex[:8]}"
    fresh_bucket(s3, bucket)
    copy_objects(s3, RAW_BUCKET, bucket, day_keys())
    try:
        print_profile("one-day backfill", in_child(_profile_child, bucket, day_keys()))
    finally:
        drop_bucket(s3, bucket)


def profile(s3: Any, histories: dict[int, dict[str, Any]]) -> None:
    profile_backfill(s3)
    try:
        singles = in_child(_profile_singles_child, new_keys()[:SINGLE_RUNS])
    finally:
        restore_all(s3, histories)
    for days, profiles in singles.items():
        print_profile(f"one snapshot into the {days}-day history", profiles)


# --------------------------------------------------------------------------- report


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def load_text() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.1f} / {five:.1f} / {fifteen:.1f}"


def report(backfills: list[Run], series: dict[int, Series], histories: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Print the figures; return them for the JSON report."""
    bf = median([r.seconds for r in backfills])
    rows = backfills[0].rows
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    print("\n=== lake merge benchmark ===")
    print(
        f"machine: {os.cpu_count()} CPUs, {memory:.1f} GiB, Python {platform.python_version()}, deltalake "
        f"{deltalake.__version__}, polars {pl.__version__}, SeaweedFS weed mini on loopback; "
        f"load average now (1/5/15 min): {load_text()}"
    )
    print(f"code: {code_version()}")
    print(
        f"one-day backfill: {MINUTES:,} snapshots, {rows:,} rows, median {bf:.1f} s "
        f"(runs: {runs_text([r.seconds for r in backfills], 1)}; CPU s: {runs_text([r.cpu for r in backfills], 1)}), "
        f"{rows / bf:,.0f} rows/s, peak RSS {gb(max(r.peak_kib for r in backfills))}   "
        f"[target < {TARGET_BACKFILL_S:.0f} s: {verdict(bf < TARGET_BACKFILL_S)}]"
    )
    figures: dict[str, Any] = {
        "backfill_1d": {
            "rows": rows,
            "median_s": bf,
            "runs_s": [r.seconds for r in backfills],
            "rows_per_s": rows / bf,
            "peak_rss_gb": max(r.peak_kib for r in backfills) / 1024**2,
            "target_s": TARGET_BACKFILL_S,
        }
    }
    for path, name, runs_of in (
        ("in a fresh process (tables opened for the merge)", "single_merge_fresh", lambda s: s.merges),
        (
            "through the worker, as the DAG task runs it (make demo / make up)",
            "single_merge_worker",
            lambda s: s.served,
        ),
    ):
        print(f"one new snapshot ({RECORDS:,} rows) merged {path}:")
        singles = {days: median([r.seconds for r in runs_of(s)]) for days, s in series.items()}
        for days, s in series.items():
            held = histories[days]["tables"][lake.OBSERVATIONS]["rows"]
            runs = runs_of(s)
            peak = max(r.peak_kib for r in runs)
            memory = f"peak RSS {gb(peak)}" if peak else f"worker RSS {gb(s.worker_rss_kib)}"
            print(
                f"  into {days}-day history ({held:,} rows): median {singles[days]:.3f} s "
                f"(runs: {runs_text([r.seconds for r in runs], 3)}; "
                f"median CPU in this process {median([r.cpu for r in runs]):.3f} s), "
                f"{RECORDS / singles[days]:,.0f} rows/s, {memory}   "
                f"[target < {TARGET_SINGLE_S} s: {verdict(singles[days] < TARGET_SINGLE_S)}]"
            )
        ratio = singles[HISTORY_DAYS] / singles[1]
        pairs = zip(runs_of(series[1]), runs_of(series[HISTORY_DAYS]), strict=True)
        per_run = [b.seconds / a.seconds for a, b in pairs]
        print(
            f"  {HISTORY_DAYS}-day / 1-day: {ratio:.2f}x (median of per-run ratios {median(per_run):.2f}x)   "
            f"[target <= {TARGET_RATIO}x: {verdict(ratio <= TARGET_RATIO)}]"
        )
        figures[name] = {
            **{f"{days}d_median_s": singles[days] for days in series},
            **{f"{days}d_runs_s": [r.seconds for r in runs_of(s)] for days, s in series.items()},
            "ratio": ratio,
            "target_s": TARGET_SINGLE_S,
            "target_ratio": TARGET_RATIO,
        }
    for days, s in series.items():
        where = "its raw/ zone" if days == 1 else f"empty placeholders in s3://{LISTING_BUCKET}"
        print(
            f"pending discovery at {days} day(s): {s.listed:,} raw objects listed ({where}), "
            f"{s.merge_log_rows:,} merge_log rows, {s.pending_found} pending: median {median(s.pending):.3f} s "
            f"(runs: {runs_text(s.pending, 3)}); the worker's incremental listing of the same raw/: median "
            f"{median(s.incremental_listing):.3f} s"
        )
        figures[f"pending_{days}d"] = {
            "raw_objects": s.listed,
            "full_listing_median_s": median(s.pending),
            "incremental_listing_median_s": median(s.incremental_listing),
        }
    return figures


# --------------------------------------------------------------------------- main


def print_backfill_run(number: int, run: Run) -> None:
    print(
        f"backfill run {number}: {run.seconds:.1f} s (CPU {run.cpu:.1f} s, its workers' {run.children_cpu:.1f} s: "
        f"{run.busy_cores:.2f} cores busy), {run.rows / run.seconds:,.0f} rows/s, peak RSS {gb(run.peak_kib)} "
        f"(workers' {gb(run.children_peak_kib)}), load {load_text()}, {run.detail}",
        flush=True,
    )


def backfills_only(s3: Any, runs: int, with_profile: bool) -> None:
    """`--only backfill`: the backfill runs alone, each into a fresh bucket dropped afterwards."""
    done = []
    for number in range(1, runs + 1):
        bucket = f"bench-backfill-{uuid.uuid4().hex[:8]}"
        try:
            done.append(backfill_run(s3, bucket))
        finally:
            drop_bucket(s3, bucket)
        print_backfill_run(number, done[-1])
    seconds = median([r.seconds for r in done])
    print(
        f"one-day backfill, code {code_version()}: median {seconds:.1f} s "
        f"(runs: {runs_text([r.seconds for r in done], 1)}), "
        f"{done[0].rows / seconds:,.0f} rows/s, cores busy {runs_text([r.busy_cores for r in done], 2)}, "
        f"peak RSS {gb(max(r.peak_kib for r in done))}; load average now: {load_text()}"
    )
    if with_profile:
        profile_backfill(s3)


def ensure_history_1d(s3: Any, manifest: Manifest) -> tuple[dict[str, Any] | None, list[Run]]:
    """The backfill runs; run 1's tables become the 1-day history when none is cached."""
    one_day = cached_history(s3, manifest, 1)
    if one_day:
        print(f"1-day history: cached in s3://{HISTORY_BUCKETS[1]}")
    else:
        manifest.put("history_1d", None)
    runs = []
    for number in range(1, BACKFILL_RUNS + 1):
        keep = one_day is None and number == 1
        bucket = HISTORY_BUCKETS[1] if keep else f"bench-backfill-{uuid.uuid4().hex[:8]}"
        run = backfill_run(s3, bucket)
        runs.append(run)
        print_backfill_run(number, run)
        if keep:
            print(f"  {bucket}: {lake.maintain(settings_for(bucket)).summary()}")
            one_day = record_history(manifest, 1)
        else:
            drop_bucket(s3, bucket)
    return one_day, runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--profile", action="store_true", help="add the time per step of the merge")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument(
        "--only", choices=["backfill"], help="only this stage: backfill = the one-day backfill runs (no histories)"
    )
    parser.add_argument("--runs", type=int, default=BACKFILL_RUNS, help="backfill runs with --only backfill")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    home = bench_home()
    manifest = Manifest.load(home)
    print(f"bench data: {home}; load average (1/5/15 min): {load_text()} on {os.cpu_count()} CPUs")
    with bench_s3(home) as endpoint:
        print(f"S3: {endpoint} (SeaweedFS, random keys)")
        s3 = s3_client()
        ensure_raw_zone(s3)
        if args.only == "backfill":
            backfills_only(s3, args.runs, args.profile)
            print(f"\ntotal wall time: {time.perf_counter() - started:.0f} s; load average now: {load_text()}")
            return 0
        one_day, backfills = ensure_history_1d(s3, manifest)
        if one_day is None:
            raise RuntimeError("no 1-day history after the backfill runs")
        histories = {1: one_day, HISTORY_DAYS: ensure_history_30d(s3, manifest, one_day)}
        ensure_listing(s3, histories[HISTORY_DAYS])
        print(f"single merges and pending discovery, alternating 1-day and {HISTORY_DAYS}-day ...", flush=True)
        series = measure_singles(s3, histories)
        figures = report(backfills, series, histories)
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2))
        if args.profile:
            profile(s3, histories)
    print(f"\ntotal wall time: {time.perf_counter() - started:.0f} s; load average now: {load_text()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
