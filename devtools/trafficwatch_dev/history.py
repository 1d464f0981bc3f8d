"""The demo's simulated history: past snapshots of the feed's simulator, landed under raw/ as the ingest lands
live ones, for the normal merge and marts build to take.

`make demo` starts it in the background once the stack is up (`trafficwatch service start history`: the last
DEMO_HISTORY_DAYS days, default 14, 0 to skip). It lands one snapshot every 3 minutes (the upstream's cadence,
480 a day), newest day first and newest minute first, so that the dashboards' recent windows fill first and
every batch the merge takes is older than what it merged before (appended, never a MERGE). A snapshot is the
exports/json body the local feed would have served at that minute (same simulator, seed and base), under the
raw key of its upstream time: a key already landed (by the live ingest, or an earlier run) is left alone, so a
second run lands only what is missing, and the merge is exactly-once anyway.

After each day it asks the worker to list raw/ again: the worker otherwise sees only keys newer than the newest
it knows (these are older) until its next full listing. `traffic_merge` then merges the day in one batch and
`traffic_marts` builds it, the late-data path: both show it in the Airflow UI. Before landing a day it waits
until the worker has no more than one day of snapshots pending (at most 10 minutes): the merge's batches stay
about a day (a live snapshot waits at most one such merge) and the CPU goes to merging what is landed rather
than to landing more. Progress goes to
`$TRAFFICWATCH_HOME/demo-history.json`; `make status` prints it (`trafficwatch-dev history status`).

Demo tooling: nothing of the pipeline imports this package (the DAGs never do).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from trafficwatch import landing, raw, services, storage
from trafficwatch.config import ConfigError, Settings
from trafficwatch_dev.simulator import Simulator
from trafficwatch_dev.snapshots import DEFAULT_BASE, DEFAULT_TIMEZONE, load_snapshot

log = logging.getLogger(__name__)

DAYS_VARIABLE = "DEMO_HISTORY_DAYS"
DEFAULT_DAYS = 14
MAX_DAYS = 366
CADENCE = timedelta(minutes=3)  # the upstream publishes about every 3 minutes
PROGRESS_FILE = "demo-history.json"
SERVICE = "history"
# gzip level 1: ~20 ms a snapshot against ~100 ms at the ingest's 6, for ~20 % more bytes (~0.5 MB a snapshot,
# 3.4 GB for 14 days): the history's cost is CPU, on a machine that also runs the stack.
GZIP_LEVEL = 1
PROGRESS_EVERY = 48  # snapshots between two writes of the progress file
BACKLOG_WAIT_S = 600.0  # longest wait for the merge before landing the next day anyway (the merge DAG paused?)
NICE = 5  # `trafficwatch-dev history seed` lowers its priority by this much: the live minute goes first


def days_from_env(environ: Mapping[str, str] = os.environ) -> int:
    """DEMO_HISTORY_DAYS: whole days of history to seed (default 14; 0: none)."""
    text = (environ.get(DAYS_VARIABLE) or "").strip() or str(DEFAULT_DAYS)
    try:
        days = int(text)
    except ValueError:
        raise ConfigError(f"{DAYS_VARIABLE}={text!r} is not a whole number of days (0 to skip)") from None
    if not 0 <= days <= MAX_DAYS:
        raise ConfigError(f"{DAYS_VARIABLE}={days} is out of range: 0 (none) to {MAX_DAYS} days")
    return days


@dataclass(frozen=True)
class Plan:
    """The snapshot times of a history: `days` whole days before `end` (exclusive), one every `cadence`."""

    end: datetime
    days: int
    cadence: timedelta = CADENCE

    @classmethod
    def before(cls, now: datetime, days: int, cadence: timedelta = CADENCE) -> Plan:
        """The history that ends where the live data starts: at `now` floored to the cadence."""
        step = cadence.total_seconds()
        end = datetime.fromtimestamp(math.floor(now.timestamp() / step) * step, UTC)
        return cls(end, days, cadence)

    @property
    def per_day(self) -> int:
        return round(timedelta(days=1) / self.cadence)

    @property
    def total(self) -> int:
        return self.days * self.per_day

    @property
    def start(self) -> datetime:
        return self.end - timedelta(days=self.days)

    def day(self, number: int) -> list[datetime]:
        """The times of day `number` (0: the newest day, just before `end`), newest first."""
        first = number * self.per_day + 1
        return [self.end - k * self.cadence for k in range(first, first + self.per_day)]


@dataclass
class Progress:
    """How far a seeding got, as `demo-history.json` holds it."""

    days: int
    snapshots_total: int
    start: str  # the plan's oldest time and its (exclusive) end, UTC
    end: str
    seed: int
    pid: int
    started_at: str
    days_done: int = 0
    snapshots_done: int = 0  # landed now, or found landed already
    snapshots_landed: int = 0
    snapshots_present: int = 0
    oldest_done: str | None = None
    updated_at: str | None = None
    finished_at: str | None = None
    seconds: float = 0.0
    worker_relists: int = 0
    waited_s: float = 0.0  # waiting for the merge to take the previous day
    day_seconds: list[float] = field(default_factory=list)

    def line(self, running_pid: int | None) -> str:
        """One line for `make status`."""
        counts = (
            f"{self.snapshots_done:,} of {self.snapshots_total:,} snapshots: {self.snapshots_landed:,} landed by "
            f"this run, {self.snapshots_present:,} were there"
        )
        if self.finished_at:
            return (
                f"history: done, {self.days} days from {self.start} ({counts}) in {self.seconds:.0f} s; the merge and "
                "the marts take them: see pending_merge and unserved_snapshots below"
            )
        where = f"{self.days_done} of {self.days} days landed, newest first, back to {self.oldest_done or self.end}"
        if running_pid is not None:
            return f"history: {where} ({counts}); running, pid {running_pid}"
        return f"history: stopped at {where} ({counts}); the next `make demo` lands the rest"


def progress_path(settings: Settings) -> Path:
    return settings.home / PROGRESS_FILE


def read_progress(settings: Settings) -> Progress | None:
    try:
        data = json.loads(progress_path(settings).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise ConfigError(f"{progress_path(settings)} is unreadable: {error}") from None
    return Progress(**data)


def _write_progress(settings: Settings, progress: Progress) -> None:
    path = progress_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(asdict(progress), indent=2))
    os.replace(temporary, path)


def status_line(settings: Settings) -> str:
    """`make status`'s line about the history: how far it got, running or not."""
    progress = read_progress(settings)
    if progress is None:
        return f"history: none seeded in this home ({DAYS_VARIABLE}=0, or `make demo` has not started it)"
    return progress.line(services.running_pid(settings.home, SERVICE))


def _landed_keys(s3: Any, bucket: str, day: date) -> set[str]:
    """The raw keys under one date= prefix (UTC day)."""
    keys: set[str] = set()
    prefix = f"{raw.RAW_PREFIX}date={day:%Y-%m-%d}/"
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.update(item["Key"] for item in page.get("Contents", []))
    return keys


def _ask_worker_to_relist(settings: Settings) -> bool:
    """Tell the worker, if one runs, that older snapshots were landed (see the module's docstring)."""
    from trafficwatch import worker  # the pipeline's client side, imported only when there is something to say

    try:
        return worker.relist_raw(settings)
    except Exception as error:  # the worker's failure, as its own class; e.g. a worker started before this version
        log.warning("the worker did not list raw/ again (%s): it sees the history within %.0f min", error,
                    worker.RELIST_RAW_S / 60)  # fmt: skip
        return False


def _pending_in_worker(settings: Settings) -> int | None:
    """Snapshots the worker (if one runs) sees pending; None without a worker, or when it cannot say."""
    from trafficwatch import worker

    try:
        return worker.count_pending_in_worker(settings)
    except Exception as error:  # the worker's failure, as its own class: the seeding goes on
        log.warning("the worker did not count the pending snapshots: %s", error)
        return None


def _wait_for_the_merge(settings: Settings, most: int, pending: Callable[[Settings], int | None]) -> None:
    """Wait until at most `most` snapshots are pending, or BACKLOG_WAIT_S passed, or nobody can say."""
    deadline = time.monotonic() + BACKLOG_WAIT_S
    while (count := pending(settings)) is not None and count > most:
        if time.monotonic() > deadline:
            log.warning("history: %d snapshots still pending after %.0f s: landing the next day anyway", count,
                        BACKLOG_WAIT_S)  # fmt: skip
            return
        time.sleep(5)


class _Lander:
    """Puts snapshots from a background thread (gzip and the upload release the GIL) while the next one is
    simulated; at most `depth` waiting."""

    def __init__(self, s3: Any, bucket: str, depth: int = 2) -> None:
        self.s3, self.bucket, self.depth = s3, bucket, depth
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="history-put")
        self.waiting: list[Future[landing.LandingResult]] = []

    def put(self, moment: datetime, body: bytes, metadata: dict[str, str]) -> Iterator[landing.LandingResult]:
        """Queue one put; yields the results of the puts that had to finish to make room."""
        while len(self.waiting) >= self.depth:
            yield self.waiting.pop(0).result()
        self.waiting.append(self.pool.submit(landing.put_raw, self.s3, self.bucket, moment, body, metadata, GZIP_LEVEL))

    def drain(self) -> Iterator[landing.LandingResult]:
        while self.waiting:
            yield self.waiting.pop(0).result()

    def close(self) -> None:
        for future in self.waiting:
            future.cancel()
        self.pool.shutdown(wait=True)


def seed(
    settings: Settings,
    days: int,
    seed: int = 0,
    now: datetime | None = None,
    cadence: timedelta = CADENCE,
    s3: Any = None,
    base: Path = DEFAULT_BASE,
    relist: Callable[[Settings], bool] = _ask_worker_to_relist,
    pending: Callable[[Settings], int | None] = _pending_in_worker,
) -> Progress:
    """Land the simulated snapshots of the `days` days before `now` that raw/ does not hold yet, newest first;
    after each day, `relist` (the worker lists raw/ again); before each, wait until `pending` says at most a
    day of snapshots waits for the merge. Returns the progress, also written to `demo-history.json` as it goes."""
    plan = Plan.before(now or datetime.now(UTC), days, cadence)
    s3 = s3 or storage.s3_client(settings)
    started = time.monotonic()
    progress = Progress(
        days=days,
        snapshots_total=plan.total,
        start=plan.start.isoformat(),
        end=plan.end.isoformat(),
        seed=seed,
        pid=os.getpid(),
        started_at=datetime.now(UTC).isoformat(),
    )
    _write_progress(settings, progress)
    log.info("history: %d days of simulated snapshots, one every %.0f s, from %s to %s (seed %d), newest first",
             days, cadence.total_seconds(), plan.start.isoformat(), plan.end.isoformat(), seed)  # fmt: skip
    simulator: Simulator | None = None  # built on the first snapshot to land (~0.6 s): not on a rerun
    source_url = f"simulator seed {seed} (trafficwatch history)"
    paris = ZoneInfo(DEFAULT_TIMEZONE)
    lander = _Lander(s3, settings.bucket)
    try:
        for number in range(days):
            day_started = time.monotonic()
            times = plan.day(number)
            landed_keys: set[str] = set()
            for day in sorted({moment.date() for moment in times}):
                landed_keys |= _landed_keys(s3, settings.bucket, day)
            landed_before = progress.snapshots_landed
            waited = False
            for moment in times:
                if raw.raw_key(moment) in landed_keys:
                    progress.snapshots_present += 1
                    progress.snapshots_done += 1
                    continue
                if not waited and number:
                    started_waiting = time.monotonic()
                    _wait_for_the_merge(settings, plan.per_day, pending)
                    progress.waited_s = round(progress.waited_s + time.monotonic() - started_waiting, 1)
                    waited = True
                if simulator is None:
                    simulator = Simulator(load_snapshot(base), seed, plan.end, cadence.total_seconds())
                body = simulator.exports_body(moment)
                metadata = {
                    "upstream-datetime": moment.astimezone(paris).isoformat(),  # as the body says it
                    "measured-at": moment.isoformat(),
                    "fetched-at": datetime.now(UTC).isoformat(),
                    "source-url": source_url,
                    "source-mode": "exports",
                    "record-count": str(len(simulator.segments)),
                    "sha256": hashlib.sha256(body).hexdigest(),
                }
                for result in lander.put(moment, body, metadata):
                    _count(progress, result)
                    if progress.snapshots_done % PROGRESS_EVERY == 0:
                        _note(settings, progress, started)
            for result in lander.drain():
                _count(progress, result)
            progress.days_done = number + 1
            progress.oldest_done = times[-1].isoformat()
            progress.day_seconds.append(round(time.monotonic() - day_started, 1))
            landed = progress.snapshots_landed - landed_before
            if landed and relist(settings):
                progress.worker_relists += 1
            _note(settings, progress, started)
            log.info("history: day %d of %d (%s to %s): %d snapshots landed, %d were there, in %.1f s",
                     number + 1, days, times[-1].isoformat(), times[0].isoformat(), landed,
                     len(times) - landed, progress.day_seconds[-1])  # fmt: skip
    finally:
        with contextlib.suppress(Exception):
            lander.close()
    progress.finished_at = datetime.now(UTC).isoformat()
    _note(settings, progress, started)
    log.info("history: done: %d snapshots landed, %d were there, in %.0f s", progress.snapshots_landed,
             progress.snapshots_present, progress.seconds)  # fmt: skip
    return progress


def _count(progress: Progress, result: landing.LandingResult) -> None:
    progress.snapshots_done += 1
    if result.landed:
        progress.snapshots_landed += 1
    else:  # landed meanwhile by the live ingest (the same snapshot: same simulator and seed)
        progress.snapshots_present += 1


def _note(settings: Settings, progress: Progress, started: float) -> None:
    progress.seconds = round(time.monotonic() - started, 1)
    progress.updated_at = datetime.now(UTC).isoformat()
    _write_progress(settings, progress)
