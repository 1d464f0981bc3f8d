"""How fresh the stack keeps the dashboards: each snapshot timed from its landing in S3 to its visibility in
the serving file, read-only and by polling, as the dashboards read it; where that time went (the merge log
and Airflow's task runs); and the pacing of the local feed. Used by tests/e2e and bench/stack_freshness.py.
"""

from __future__ import annotations

import contextlib
import json
import math
import sqlite3
import statistics
import threading
import time
import urllib.request
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from trafficwatch.operate import _iso, landed_snapshots, served_latest
from trafficwatch.raw import measured_at_of, raw_key


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
