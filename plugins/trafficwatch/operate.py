"""Operating the local stack: stop all of it, say how far behind it is, how much memory it takes.

- `stop_all` stops every service that has a pid file under `<home>/run`, each by its process group, and
  waits until no process of those groups is left (`make down`, `trafficwatch down`).
- `lag` compares the newest snapshot landed in raw/ with what the serving file shows, and counts what
  waits to be merged (`make status`, `trafficwatch lag`).
- The stack driver and the freshness watcher of the end-to-end test and `bench/stack_freshness.py` live
  beside them, in tests/support/stack.py and tests/support/freshness.py.
- Processes are inspected through /proc: the members of a process group, their memory, and any process
  whose command line or environment mentions a path.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb

from trafficwatch import services
from trafficwatch.config import Settings

# Stopped first to last: the readers and the scheduler before the worker and the feed, S3 last of all.
# A service this list does not know (a pid file of another version) is stopped after Airflow.
STOP_ORDER = ("superset", "airflow", "*", "feed", "s3")


# --------------------------------------------------------------------------- processes, through /proc


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name (which may hold spaces): state is [0], pgrp [2], session [3]."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def _pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def group_members(pgid: int) -> list[int]:
    """Live processes of a process group (zombies excluded: they hold no memory and are being reaped)."""
    return _live_with(2, pgid)


def session_members(sid: int) -> list[int]:
    """Live processes of a session: a service's process group and the groups its processes made of their own
    (every Airflow task process leads a group of its own, in the session of the standalone that started it)."""
    return _live_with(3, sid)


def _live_with(index: int, value: int) -> list[int]:
    members = []
    for pid in _pids():
        fields = _stat_fields(pid)
        if fields and fields[index] == str(value) and fields[0] != "Z":
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
    """Memory of the processes of the services' sessions, at one moment."""

    processes: int
    rss_bytes: int  # sum of RSS: pages shared between forked processes are counted in each
    pss_bytes: int  # sum of proportional set sizes: shared pages split between their users
    per_service_rss: dict[str, int] = field(default_factory=dict)
    per_service_pss: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def stack_memory(home: Path) -> Memory:
    """Sum of RSS (and PSS) of every process in the running services' sessions (each service starts one: its
    pid is its session's id), so the Airflow task processes, each in a process group of its own, count too."""
    rss, pss, processes = {}, {}, 0
    for name, sid in service_groups(home).items():
        members = session_members(sid)
        processes += len(members)
        rss[name] = sum(rss_bytes(pid) for pid in members)
        pss[name] = sum(pss_bytes(pid) for pid in members)
    return Memory(processes, sum(rss.values()), sum(pss.values()), rss, pss)


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
