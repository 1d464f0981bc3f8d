"""Operating the local stack: stop all of it, say how far behind it is, measure how fresh it keeps the dashboards.

- `stop_all` stops every service that has a pid file under `<home>/run`, each by its process group, and
  waits until no process of those groups is left (`make down`, `trafficwatch down`).
- `lag` compares the newest snapshot landed in raw/ with what the serving file shows, and counts what
  waits to be merged (`make status`, `trafficwatch lag`).
- `LocalStack` is the stack of `make demo` in a home of its own on free loopback ports, driven through the
  real make targets; `FreshnessWatcher` times each snapshot from its landing in S3 to its visibility in
  the serving file, read-only and by polling, as the dashboards read it. The end-to-end test and
  `bench/stack_freshness.py` both use them.
- Processes are inspected through /proc: the members of a process group, their memory, and any process
  whose command line or environment mentions a path.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import sqlite3
import statistics
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Collection, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import duckdb

from trafficwatch import services
from trafficwatch.config import REPO_ROOT, Settings, load_settings
from trafficwatch.landing import measured_at_of, raw_key

# Stopped first to last: the readers and the scheduler before the worker and the feed, S3 last of all.
# A service this list does not know (a pid file of another version) is stopped after Airflow.
STOP_ORDER = ("superset", "airflow", "*", "feed", "s3")


# --------------------------------------------------------------------------- processes, through /proc


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name (which may hold spaces): state is [0], pgrp [2]."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def _pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def group_members(pgid: int) -> list[int]:
    """Live processes of a process group (zombies excluded: they hold no memory and are being reaped)."""
    members = []
    for pid in _pids():
        fields = _stat_fields(pid)
        if fields and fields[2] == str(pgid) and fields[0] != "Z":
            members.append(pid)
    return members


def _proc_bytes(pid: int, file: str, field: str) -> int:
    """A `Field:  N kB` line of /proc/PID/FILE, in bytes; 0 if the process is gone or it is unreadable."""
    try:
        for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (VmRSS), 0 if it is gone."""
    return _proc_bytes(pid, "status", "VmRSS:")


def pss_bytes(pid: int) -> int:
    """Proportional memory of a process (its share of pages shared with others), 0 if unreadable."""
    return _proc_bytes(pid, "smaps_rollup", "Pss:")


def processes_mentioning(text: str, exclude: set[int] | None = None) -> dict[int, str]:
    """Processes whose command line or environment contains `text`, with their command lines."""
    needle, found = text.encode(), {}
    skip = {os.getpid(), *(exclude or set())}
    for pid in _pids():
        if pid in skip:
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:  # gone, or not ours to read
            continue
        if needle in cmdline or needle in environ:
            found[pid] = cmdline.replace(b"\0", b" ").decode(errors="replace").strip()
    return found


# --------------------------------------------------------------------------- services of a home


def service_groups(home: Path) -> dict[str, int]:
    """The process group of every service running from `home` (its pid is its group: setsid at start)."""
    groups = {}
    for pid_file in sorted((home / "run").glob("*.pid")):
        pid = services.running_pid(home, pid_file.stem)
        if pid is not None:
            groups[pid_file.stem] = pid
    return groups


def _stop_rank(name: str) -> int:
    return STOP_ORDER.index(name) if name in STOP_ORDER else STOP_ORDER.index("*")


def stop_all(home: Path, timeout_s: float = 30.0) -> dict[str, bool]:
    """Stop every service with a pid file under `home/run`, by process group, in `STOP_ORDER`.

    Returns, per pid file, whether its service was running. Returns once no process of those groups is
    left (they are killed if they outlive `timeout_s` after their SIGTERM).
    """
    names = sorted((path.stem for path in (home / "run").glob("*.pid")), key=lambda name: (_stop_rank(name), name))
    groups = service_groups(home)
    stopped = {name: services.stop(home, name, timeout_s=timeout_s) for name in names}
    deadline = time.monotonic() + 10
    while any(group_members(pgid) for pgid in groups.values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pgid in groups.values():  # whatever outlived the SIGKILL that services.stop sent
        if group_members(pgid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
    return stopped


@dataclass(frozen=True)
class Memory:
    """Memory of the processes of the services' process groups, at one moment."""

    processes: int
    rss_bytes: int  # sum of RSS: pages shared between forked processes are counted in each
    pss_bytes: int  # sum of proportional set sizes: shared pages split between their users
    per_service_rss: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def stack_memory(home: Path) -> Memory:
    """Sum of RSS (and PSS) of every process in the running services' process groups."""
    per_service, processes, pss = {}, 0, 0
    for name, pgid in service_groups(home).items():
        members = group_members(pgid)
        processes += len(members)
        per_service[name] = sum(rss_bytes(pid) for pid in members)
        pss += sum(pss_bytes(pid) for pid in members)
    return Memory(processes, sum(per_service.values()), pss, per_service)


# --------------------------------------------------------------------------- lag


def served_latest(serving_db: Path) -> tuple[datetime | None, datetime | None]:
    """(max measured_at in segment_latest, publish time) of the serving file, read-only; (None, None) if absent."""
    if not serving_db.is_file():
        return None, None
    with duckdb.connect(str(serving_db), read_only=True) as con:
        (latest,) = con.execute("SELECT max(measured_at) FROM segment_latest").fetchone()
        try:
            row = con.execute("SELECT built_at FROM meta.publish").fetchone()
        except duckdb.Error:
            row = None
    return (latest.astimezone(UTC) if latest else None), (row[0].astimezone(UTC) if row and row[0] else None)


def merge_log_keys(settings: Settings, storage_options: dict[str, str]) -> tuple[Collection[str], Collection[str]]:
    """Raw keys in the merge log, and those of them it refused (quarantined), read without creating the
    table when it does not exist yet."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    from trafficwatch import lake

    try:
        table = DeltaTable(lake.table_uri(settings, lake.MERGE_LOG), storage_options=storage_options)
    except TableNotFoundError:
        return frozenset(), frozenset()
    tables = lake.Tables({lake.MERGE_LOG: table})
    return lake.merged_keys(settings, tables), lake.refused_keys(settings, tables)


def landed_snapshots(s3: Any, bucket: str) -> dict[str, datetime]:
    """Raw key -> LastModified, for every landed snapshot."""
    from trafficwatch import raw

    return {obj.key: obj.landed_at for obj in raw.list_raw(s3, bucket)}


def showable_snapshots(landed: Collection[str], refused: Collection[str]) -> dict[str, datetime]:
    """Raw key -> upstream time of the landed snapshots the dashboards should show: neither what the merge
    refused (a snapshot dated 2030 would otherwise be "newest" forever) nor keys that name no snapshot time
    (the merge refuses them)."""
    from trafficwatch import raw

    showable = {key: raw.key_time(key) for key in landed if key not in refused}
    return {key: when for key, when in showable.items() if when is not None}


def _iso(moment: datetime | None) -> str | None:
    return moment.astimezone(UTC).isoformat() if moment else None


def _served_merges(serving_db: Path) -> set[datetime]:
    """The merge stamps whose rows the serving file's marts hold, as its publish recorded them
    (`meta.lake_merges_absorbed`); empty without a file or that record."""
    if not serving_db.is_file():
        return set()
    with duckdb.connect(str(serving_db), read_only=True) as con:
        try:
            rows = con.execute("SELECT DISTINCT merged_at FROM meta.lake_merges_absorbed").fetchall()
        except duckdb.Error:
            return set()
    return {merged_at.astimezone(UTC) for (merged_at,) in rows}


def _unserved_rows(settings: Settings, storage_options: dict[str, str], held: set[datetime]) -> dict[str, int]:
    """Raw key -> observations of the lake whose merge stamp the marts served do not hold.

    Only the files whose merged_at statistics reach past the newest stamp held minus the dbt project's
    late-commit margin are read (stamps before that are held, as the build's own rule has it)."""
    from datetime import timedelta

    import polars as pl
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    from trafficwatch import lake, serving

    try:
        table = DeltaTable(lake.table_uri(settings, lake.OBSERVATIONS), storage_options=storage_options)
    except TableNotFoundError:
        return {}
    horizon = None
    if held:
        horizon = max(held) - timedelta(minutes=float(serving.project_var("late_commit_margin_minutes")))
    actions = pl.DataFrame(table.get_add_actions(flatten=True))
    if actions.is_empty():
        return {}
    if horizon is not None and "max.merged_at" in actions.columns:
        actions = actions.filter(pl.col("max.merged_at").is_null() | (pl.col("max.merged_at") > horizon))
    files = [f"{table.table_uri.rstrip('/')}/{path}" for path in actions["path"].to_list()]
    if not files:
        return {}
    rows = pl.scan_parquet(files, storage_options=storage_options).select("source_key", "merged_at")
    if horizon is not None:
        rows = rows.filter(pl.col("merged_at") > horizon)
    rows = rows.filter(~pl.col("merged_at").is_in(list(held))).group_by("source_key").len().collect()
    return dict(rows.rows())


def lag(
    settings: Settings,
    s3: Any = None,
    storage_options: dict[str, str] | None = None,
    serving_db: Path | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """How far the dashboards are behind what has landed, and what waits to be merged.

    `lag_s`: upstream time of the newest landed snapshot minus the newest measurement in the serving
    file's `segment_latest` (0 when the dashboards show everything landed; null before the first publish).
    `unserved_snapshots`: landed snapshots whose rows the marts served do not all hold yet, whatever their
    time: not merged yet, or with rows merged (by their merge stamp, `merged_at`) after the served build;
    `late_unserved_snapshots` are those of them no newer than what is served (an outage, a replay, a
    backfill, an archive); `unserved_rows` the merged rows not served yet (rows of snapshots not merged
    yet are not counted: the snapshots are). `oldest_unserved_waiting_s`: how long the unserved snapshot
    that landed first has been in S3. `pending_merge`: landed snapshots the merge log does not hold. `serving_age_s`:
    how old the newest measurement shown is (grows when nothing lands: upstream or ingest).
    """
    from trafficwatch import lake, serving, storage

    s3 = s3 or storage.s3_client(settings)
    options = storage_options if storage_options is not None else lake.storage_options(settings)
    now = now or datetime.now(UTC)
    landed = landed_snapshots(s3, settings.bucket)
    merged, refused = merge_log_keys(settings, options)
    pending = sorted(set(landed) - set(merged))
    serving_db = serving_db or serving.serving_db_path(settings)
    served, built_at = served_latest(serving_db)
    showable = showable_snapshots(landed, refused)
    newest = max(showable, default=None)  # keys sort by upstream time
    newest_at = showable[newest] if newest else None
    unserved_rows = {
        key: count
        for key, count in _unserved_rows(settings, options, _served_merges(serving_db)).items()
        if key in showable
    }
    unserved = set(unserved_rows) | {key for key in pending if key in showable}
    late = [key for key in unserved if served is not None and showable[key] <= served]
    oldest = min(unserved, key=lambda key: landed[key], default=None)
    return {
        "checked_at": _iso(now),
        "newest_landed": {"key": newest, "measured_at": _iso(newest_at), "landed_at": _iso(landed.get(newest))}
        if newest
        else None,
        "serving_db": str(serving_db),
        "serving_measured_at": _iso(served),
        "serving_built_at": _iso(built_at),
        "serving_age_s": round((now - served).total_seconds(), 1) if served else None,
        "lag_s": round((newest_at - served).total_seconds(), 1) if newest_at and served else None,
        "unserved_snapshots": len(unserved),
        "late_unserved_snapshots": len(late),
        "unserved_rows": sum(unserved_rows.values()),
        "oldest_unserved_waiting_s": round((now - landed[oldest]).total_seconds(), 1) if oldest else 0.0,
        "landed_snapshots": len(landed),
        "pending_merge": len(pending),
        "oldest_pending": {"key": pending[0], "landed_at": _iso(landed[pending[0]])} if pending else None,
    }


# --------------------------------------------------------------------------- freshness


@dataclass
class SnapshotFreshness:
    """One landed snapshot: when it landed in S3 and when the serving file first showed it."""

    key: str
    measured_at: datetime
    landed_at: datetime
    visible_at: datetime | None = None
    measured: bool = True  # False: landed before the watch began, its freshness is not known

    @property
    def freshness_s(self) -> float | None:
        if not self.measured or self.visible_at is None:
            return None
        return max(0.0, (self.visible_at - self.landed_at).total_seconds())


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation between closest ranks."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class FreshnessWatcher:
    """Polls raw/ and the serving file every `poll_s` seconds in a thread and times every snapshot.

    Landing time: the later of the object's LastModified (whole seconds on SeaweedFS) and its `fetched-at`
    metadata (the fetch just before the put), so at most the put's duration early. Visible: the first poll
    at which `max(measured_at)` of `segment_latest` in the serving file, opened read-only as the
    dashboards open it, reaches the snapshot's upstream time. Snapshots already landed when the watch
    began are recorded but not measured. Errors (a service restarting) are counted, not raised.
    """

    def __init__(
        self,
        s3: Any,
        bucket: str,
        serving_db: Path,
        poll_s: float = 0.5,
        sample: Callable[[], Any] | None = None,
        sample_every_s: float = 5.0,
    ) -> None:
        self.s3, self.bucket, self.serving_db, self.poll_s = s3, bucket, serving_db, poll_s
        self.snapshots: dict[str, SnapshotFreshness] = {}
        self.served: datetime | None = None
        self.errors: list[str] = []
        self.samples: list[Any] = []
        self._sample, self._sample_every_s, self._last_sample = sample, sample_every_s, 0.0
        self._started_at: datetime | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> FreshnessWatcher:
        self._started_at = datetime.now(UTC)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="freshness-watcher", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching; snapshots not visible by now stay unmeasured (`visible_at` None)."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.poll()
            except Exception as error:  # a service restarting, a file being replaced: try again next poll
                self.errors.append(f"{datetime.now(UTC).isoformat()} {type(error).__name__}: {error}")
            if self._sample and started - self._last_sample >= self._sample_every_s:
                self._last_sample = started
                with contextlib.suppress(Exception):
                    self.samples.append(self._sample())
            self._stop.wait(max(0.0, self.poll_s - (time.monotonic() - started)))

    def _landed_at(self, key: str, last_modified: datetime) -> datetime:
        metadata = self.s3.head_object(Bucket=self.bucket, Key=key).get("Metadata", {})
        fetched = metadata.get("fetched-at")
        return max(last_modified, datetime.fromisoformat(fetched).astimezone(UTC)) if fetched else last_modified

    def poll(self) -> None:
        """One look at raw/ and at the serving file."""
        for key, last_modified in landed_snapshots(self.s3, self.bucket).items():
            if key not in self.snapshots:
                landed_at = self._landed_at(key, last_modified)
                measured = self._started_at is not None and landed_at >= self._started_at
                with self._lock:
                    self.snapshots[key] = SnapshotFreshness(key, measured_at_of(key), landed_at, measured=measured)
        served, _ = served_latest(self.serving_db)
        seen_at = datetime.now(UTC)
        with self._lock:
            self.served = served
            for snapshot in self.snapshots.values():
                if snapshot.visible_at is None and served is not None and snapshot.measured_at <= served:
                    snapshot.visible_at = seen_at

    def measured(self) -> list[SnapshotFreshness]:
        """Snapshots landed during the watch and seen in the serving file, oldest first."""
        with self._lock:
            return sorted((s for s in self.snapshots.values() if s.freshness_s is not None), key=lambda s: s.key)

    def collect(self, count: int, timeout_s: float, feed_url: str | None = None) -> list[SnapshotFreshness]:
        """Wait until `count` snapshots have landed during this watch and every landed snapshot is visible;
        the measured ones, oldest first. With `feed_url`, the local feed is paced (`pace_feed`) until then.

        TimeoutError after `timeout_s`, saying how far it got.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                landed = set(self.snapshots)
                new = sum(1 for s in self.snapshots.values() if s.measured)
                all_visible = all(s.visible_at for s in self.snapshots.values())
            if new >= count and all_visible:
                return self.measured()
            if new < count and feed_url:
                with contextlib.suppress(OSError):  # the feed restarting: next poll
                    pace_feed(feed_url, landed)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{count} fresh snapshots not served within {timeout_s:.0f} s: {self.describe()}")
            time.sleep(self.poll_s)

    def describe(self) -> str:
        with self._lock:
            landed = len(self.snapshots)
            visible = sum(1 for s in self.snapshots.values() if s.visible_at)
        return f"{landed} landed, {visible} visible, serving shows {_iso(self.served)}, {len(self.errors)} poll errors"


def freshness_summary(snapshots: list[SnapshotFreshness]) -> dict[str, Any]:
    """Median, p95 and max of the freshness of measured snapshots, and each snapshot's figures."""
    values = [s.freshness_s for s in snapshots if s.freshness_s is not None]
    return {
        "snapshots": len(values),
        "median_s": round(statistics.median(values), 1) if values else None,
        "p95_s": round(percentile(values, 95), 1) if values else None,
        "max_s": round(max(values), 1) if values else None,
        "per_snapshot": [
            {
                "key": s.key,
                "measured_at": _iso(s.measured_at),
                "landed_at": _iso(s.landed_at),
                "visible_at": _iso(s.visible_at),
                "freshness_s": round(s.freshness_s, 1) if s.freshness_s is not None else None,
            }
            for s in snapshots
        ],
    }


def format_freshness(summary: dict[str, Any]) -> str:
    """A small table: one line per snapshot, then median, p95 and max."""
    lines = [f"{'snapshot (upstream time)':<26} {'landed':>9} {'visible':>9} {'freshness':>10}"]
    for row in summary["per_snapshot"]:
        landed, visible = row["landed_at"][11:19], (row["visible_at"] or "-" * 19)[11:19]
        value = f"{row['freshness_s']:.1f} s" if row["freshness_s"] is not None else "-"
        lines.append(f"{row['measured_at'][:19]:<26} {landed:>9} {visible:>9} {value:>10}")
    lines.append(
        f"{summary['snapshots']} snapshots: median {summary['median_s']} s, p95 {summary['p95_s']} s, "
        f"max {summary['max_s']} s"
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------- where the time goes


def _airflow_time(value: str | None) -> datetime | None:
    if not value:
        return None
    moment = datetime.fromisoformat(value)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def task_runs(airflow_db: Path) -> list[dict[str, Any]]:
    """Every finished try of the merge and marts tasks, from Airflow's SQLite database opened read-only."""
    query = (
        "SELECT dag_id, task_id, run_id, state, queued_dttm, start_date, end_date FROM task_instance "
        "WHERE dag_id IN ('traffic_merge', 'traffic_marts') AND end_date IS NOT NULL"
    )
    with contextlib.closing(sqlite3.connect(f"file:{airflow_db}?mode=ro", uri=True, timeout=10)) as con:
        rows = con.execute(query).fetchall()
    columns = ("dag_id", "task_id", "run_id", "state", "queued_at", "started_at", "ended_at")
    runs = [dict(zip(columns, row, strict=True)) for row in rows]
    for run in runs:
        for name in ("queued_at", "started_at", "ended_at"):
            run[name] = _airflow_time(run[name])
    return sorted(runs, key=lambda run: run["started_at"] or run["ended_at"])


def breakdown(
    snapshots: list[SnapshotFreshness], merged_at: dict[str, datetime], runs: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Where each snapshot's freshness went, in seconds, from the merge log and Airflow's task runs.

    detect: landed -> the merge sensor succeeded (its S3 poll, the deferral's return); merge_start: ->
    the merge task began (scheduling, task process start-up); merge: -> its row in the merge log;
    marts_start: merge written -> the marts task began (the asset event, a new run, start-up, or waiting
    for the build before); build: -> the marts task ended (dbt build, publish, then the task's own
    wrap-up); seen: -> the watcher saw it in the serving file (its poll interval; slightly negative when
    the publish came before the task's end was recorded).
    """

    def first(dag_task: tuple[str, str], after: datetime, key: str = "started_at") -> dict[str, Any] | None:
        return next((r for r in runs if (r["dag_id"], r["task_id"]) == dag_task and r[key] and r[key] >= after), None)

    rows = []
    for snapshot in snapshots:
        merged = merged_at.get(snapshot.key)
        if snapshot.visible_at is None or merged is None:
            continue
        merge = next(
            (
                r
                for r in runs
                if r["task_id"] == "merge_pending_snapshots"
                and r["started_at"]
                and r["started_at"] <= merged
                and r["ended_at"] >= merged
            ),
            None,
        )
        sensor = merge and next(
            (r for r in runs if r["run_id"] == merge["run_id"] and r["task_id"] == "wait_for_landed_snapshots"), None
        )
        marts = first(("traffic_marts", "build_and_publish_marts"), merged)
        if not (merge and sensor and marts):
            continue
        marks = [
            ("detect", sensor["ended_at"]),
            ("merge_start", merge["started_at"]),
            ("merge", merged),
            ("marts_start", marts["started_at"]),
            ("build", marts["ended_at"]),
            ("seen", snapshot.visible_at),
        ]
        row: dict[str, Any] = {"key": snapshot.key}
        previous = snapshot.landed_at
        for name, moment in marks:
            row[f"{name}_s"] = round((moment - previous).total_seconds(), 1)
            previous = max(previous, moment)
        rows.append(row)
    return rows


def format_breakdown(rows: list[dict[str, Any]]) -> str:
    if rows and "error" in rows[0]:
        return f"no breakdown: {rows[0]['error']}"
    if not rows:
        return "no breakdown (no snapshot matched a merge and a marts run)"
    names = [name for name in rows[0] if name.endswith("_s")]
    lines = ["median s: " + ", ".join(f"{n[:-2]} {statistics.median(r[n] for r in rows):.1f}" for n in names)]
    lines += [f"{r['key'].rsplit('/', 1)[-1][:16]}: " + " ".join(f"{r[n]:5.1f}" for n in names) for r in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the local feed


def _feed_call(url: str, method: str = "GET") -> dict[str, Any]:
    request = urllib.request.Request(url, method=method)
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def pace_feed(feed_url: str, landed: Collection[str]) -> str | None:
    """Move the local feed to its next snapshot once the one it serves has landed (its raw key is in
    `landed`): upstream then publishes exactly as fast as the ingest fetches, and no snapshot is missed
    whatever the phase between the feed and the ingest's schedule. The feed's own clock should be stopped
    (`--speed 0.000001`). Returns the upstream time now served, or None if it did not move.
    """
    state = _feed_call(f"{feed_url}/_feed/state")
    if not state["datetime"] or raw_key(datetime.fromisoformat(state["datetime"])) not in landed:
        return None
    return _feed_call(f"{feed_url}/_feed/advance", "POST").get("datetime")


# --------------------------------------------------------------------------- the stack of `make demo`


class StackError(RuntimeError):
    """A make target of the stack failed; the message ends with the tail of its output."""


def _free_port(taken: set[int]) -> int:
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in taken:
            return port


# Variables of the calling shell that scripts/env.sh would honour over the stack's own home.
_INHERITED_PREFIXES = ("TRAFFICWATCH_", "AWS_", "AIRFLOW_", "SUPERSET_", "MAKE", "MFLAGS")


@dataclass
class LocalStack:
    """The stack of `make demo` in `home`, on its own ports, driven by the real make targets.

    `env` is the whole environment make runs with: the caller's, minus every setting scripts/env.sh
    would take from it, plus the home, the ports and the demo feed's arguments.
    """

    home: Path
    env: dict[str, str]
    repo: Path = REPO_ROOT
    _environment: dict[str, str] | None = field(default=None, repr=False)
    _settings: Settings | None = field(default=None, repr=False)
    _serving_db: Path | None = field(default=None, repr=False)

    @classmethod
    def on_free_ports(
        cls, home: Path, feed_args: str = "--interval 60", extra_env: dict[str, str] | None = None
    ) -> LocalStack:
        s3_port = services.free_s3_port()
        taken = {s3_port + i for i in range(6)} | {s3_port + 10000 + i for i in range(6)}
        ports = {}
        for name in ("FEED", "AIRFLOW", "SUPERSET"):
            ports[name] = _free_port(taken)
            taken.add(ports[name])
        env = {k: v for k, v in os.environ.items() if not k.startswith(_INHERITED_PREFIXES)}
        env.update(
            TRAFFICWATCH_HOME=str(home),
            TRAFFICWATCH_S3_PORT=str(s3_port),
            TRAFFICWATCH_FEED_PORT=str(ports["FEED"]),
            TRAFFICWATCH_AIRFLOW_PORT=str(ports["AIRFLOW"]),
            TRAFFICWATCH_SUPERSET_PORT=str(ports["SUPERSET"]),
            DEMO_FEED_ARGS=feed_args,
            DEMO_HISTORY_DAYS="0",  # no simulated history unless asked for: the stack's own figures stay comparable
        )
        env.update(extra_env or {})
        home.mkdir(parents=True, exist_ok=True)
        return cls(home=home, env=env)

    def make(self, target: str, timeout_s: float = 900) -> float:
        """Run `make TARGET` in the repository with the stack's environment; its duration in seconds.

        The output goes to `<home>/logs/make-TARGET.log` (appended); StackError quotes its tail on failure.
        """
        log_path = self.home / "logs" / f"make-{target}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        with open(log_path, "ab") as log_file:
            log_file.write(f"\n=== make {target} at {datetime.now(UTC).isoformat()}\n".encode())
            log_file.flush()
            done = subprocess.run(
                ["make", "--no-print-directory", target],
                cwd=self.repo,
                env=self.env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                timeout=timeout_s,
                check=False,
            )
        if done.returncode != 0:
            tail = log_path.read_text(errors="replace").splitlines()[-25:]
            raise StackError(f"make {target} exited with {done.returncode}:\n" + "\n".join(tail))
        return time.monotonic() - started

    def up(self) -> float:
        """`make demo`: S3, the feed, the worker, Airflow and Superset; seconds it took."""
        return self.make("demo")

    def down(self) -> float:
        """`make down`; seconds it took."""
        return self.make("down", timeout_s=300)

    def environment(self) -> dict[str, str]:
        """The environment the services get: scripts/env.sh sourced over `env` (it creates the secrets once)."""
        if self._environment is None:
            self._environment = self._source_env()
        return self._environment

    def _source_env(self) -> dict[str, str]:
        done = subprocess.run(
            ["bash", "-c", "source scripts/env.sh >/dev/null && env -0"],
            cwd=self.repo,
            env=self.env,
            capture_output=True,
            timeout=60,
            check=True,
        )
        pairs = (item.split(b"=", 1) for item in done.stdout.split(b"\0") if b"=" in item)
        return {name.decode(): value.decode() for name, value in pairs}

    def settings(self) -> Settings:
        """The stack's settings, as its services read them (never from this process's environment)."""
        if self._settings is None:
            from trafficwatch import serving

            with _environ(self.environment()):
                self._settings = load_settings()
                self._serving_db = serving.serving_db_path(self._settings)
        return self._settings

    @property
    def serving_db(self) -> Path:
        """The stack's serving file (serving_db_path reads TRAFFICWATCH_SERVING_DB from the environment)."""
        self.settings()
        assert self._serving_db is not None
        return self._serving_db

    def s3(self) -> Any:
        """An S3 client on the stack's S3 server, with its generated keys."""
        env = self.environment()
        return boto3.client(
            "s3",
            endpoint_url=env["AWS_ENDPOINT_URL"],
            region_name=env["AWS_REGION"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        )

    def storage_options(self) -> dict[str, str]:
        """delta-rs options for the stack's tables, keys included (this process does not have them)."""
        from trafficwatch import lake

        env = self.environment()
        return {
            **lake.storage_options(self.settings()),
            "AWS_ACCESS_KEY_ID": env["AWS_ACCESS_KEY_ID"],
            "AWS_SECRET_ACCESS_KEY": env["AWS_SECRET_ACCESS_KEY"],
        }

    def watcher(self, poll_s: float = 0.5) -> FreshnessWatcher:
        """A freshness watcher on this stack's bucket and serving file, sampling its memory every 5 s."""
        return FreshnessWatcher(
            self.s3(),
            self.settings().bucket,
            self.serving_db,
            poll_s,
            sample=lambda: stack_memory(self.home),
        )

    def lag(self) -> dict[str, Any]:
        return lag(self.settings(), self.s3(), self.storage_options(), self.serving_db)

    def merged_at(self) -> dict[str, datetime]:
        """Raw key -> when the merge log recorded it."""
        import polars as pl
        from deltalake import DeltaTable

        from trafficwatch import lake

        options = self.storage_options()
        table = DeltaTable(lake.table_uri(self.settings(), lake.MERGE_LOG), storage_options=options)
        frame = lake.scan_table(table, options).select("source_key", "merged_at").collect()
        return {
            key: moment.astimezone(UTC) for key, moment in frame.group_by("source_key").agg(pl.min("merged_at")).rows()
        }

    def breakdown(self, snapshots: list[SnapshotFreshness], wait_s: float = 30) -> list[dict[str, Any]]:
        """`breakdown` for this stack's snapshots; a report, so a failure is a row saying why, not an error.

        The marts task that published the newest snapshot ends a moment after the file is visible: this
        waits up to `wait_s` for every snapshot's task runs to be recorded.
        """
        deadline = time.monotonic() + wait_s
        try:
            while True:
                rows = breakdown(snapshots, self.merged_at(), task_runs(self.airflow_db))
                if len(rows) >= len(snapshots) or time.monotonic() > deadline:
                    return rows
                time.sleep(1)
        except Exception as error:
            return [{"error": f"{type(error).__name__}: {error}"}]

    @property
    def feed_url(self) -> str:
        return f"http://127.0.0.1:{self.env['TRAFFICWATCH_FEED_PORT']}"

    @property
    def superset_url(self) -> str:
        return f"http://127.0.0.1:{self.env['TRAFFICWATCH_SUPERSET_PORT']}"

    @property
    def airflow_db(self) -> Path:
        return self.home / "airflow" / "airflow.db"


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """os.environ replaced by `values` for the block (load_settings reads the environment)."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
