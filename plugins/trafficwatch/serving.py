"""Marts: one `dbt build` of the warehouse DuckDB (`trafficwatch.dbt_build`), then the atomic publish of the
serving DuckDB.

After a build whose every data test passed, the marts are published to the serving file
(`$TRAFFICWATCH_HOME/serving/traffic.duckdb`, or TRAFFICWATCH_SERVING_DB): a new file is written beside it,
checkpointed, fsynced, renamed over it (`os.replace`, atomic on POSIX) and made durable by an fsync of the
directory. A reader opening the serving path gets the previous file or the new one, complete either way,
and no lock error: nobody ever writes the serving file in place. The new file is normally a copy of the
previous one patched with the rows the build changed, so a publish costs what the new data costs, not
what the history weighs; a whole copy of the marts is written the first time, after a full refresh, once
a day (to reclaim deleted rows) and whenever a patched mart does not match the warehouse. The 15-minute
marts and the congestion events keep only the last TRAFFICWATCH_SERVING_DAYS days (default 30) there;
the warehouse keeps all. Every publish also (re)creates the views the dashboards read over the marts and the
health tables (DASHBOARD_VIEWS).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb

from trafficwatch import dbt_build, health
from trafficwatch.config import DEFAULT_SERVING_DAYS as DEFAULT_SERVING_DAYS  # where tests and benches name it
from trafficwatch.config import Settings, serving_db_path
from trafficwatch.dbt_build import WAREHOUSE_NAME, ServingConfig
from trafficwatch.dbt_build import project_var as project_var  # where `trafficwatch.operate` names it

# The errors of `build`, where its callers catch them.
from trafficwatch.errors import BuildError as BuildError
from trafficwatch.errors import DataTestsFailed as DataTestsFailed
from trafficwatch.results import BuildResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Mart:
    """A mart of the serving file, and how it is published.

    `keep`: which rows the serving file keeps (SQL on $cutoff, the start of the serving window).
    `changed`: for marts patched in place, the rows a build may have rebuilt since the previous publish:
    SQL on the temporary table `touched` (the snapshot times merged since, `measured_at`) and on $since
    (for episodes: the earliest of those times and the previous latest snapshot, minus the episode gap).
    It is the rule the dbt models use to rebuild rows. `typical`: the road marts, whose typical values
    (joined from the all-history profile on PROFILE_KEY) are refreshed where the profile moved.
    `stable`: for a mart whose every row changes each minute but some wide columns seldom do (a segment's
    geometry), the unique `key` and those columns: the other columns are updated in place and only rows
    whose stable columns changed are rewritten, so the file's checkpoint does not write them again.
    `days`: a shorter window than the serving file's for this mart (its `keep` then cuts there).
    """

    name: str
    keep: str | None = None
    changed: str | None = None
    typical: bool = False
    key: str | None = None
    stable: tuple[str, ...] = ()
    days: int | None = None


DETAIL_DAYS = 7  # days of 15-minute marts in the serving file (at most)
TOUCHED_BUCKETS = "SELECT DISTINCT time_bucket(INTERVAL 15 MINUTE, measured_at) FROM touched"
TOUCHED_HOURS = "SELECT DISTINCT time_bucket(INTERVAL 1 HOUR, measured_at) FROM touched"
# What the dashboards read, in the serving file's `main` schema.
MARTS = (
    Mart("segment_latest", key="segment_key", stable=("geometry_geojson", "path_json")),
    Mart("network_kpis_latest"),
    Mart("road_hour_of_week_profile"),
    Mart("segment_free_flow"),
    Mart("road_reliability_daily", keep="local_date > CAST($cutoff AS DATE)"),
    Mart("network_congestion_hourly", keep="hour_start > $cutoff"),
    # The 15-minute marts are the recent detail: the dashboards read the last 24 hours of the road buckets
    # and none of the segments' (over 30 days these two were 90 % of the file every publish copies and
    # syncs). The serving file keeps their last week; hourly and daily marts keep the whole window.
    Mart(
        "segment_traffic_15min",
        keep="bucket_start > $cutoff",
        changed=f"bucket_start IN ({TOUCHED_BUCKETS})",
        days=DETAIL_DAYS,
    ),
    Mart(
        "road_traffic_15min",
        keep="bucket_start > $cutoff",
        changed=f"bucket_start IN ({TOUCHED_BUCKETS})",
        typical=True,
        days=DETAIL_DAYS,
    ),
    Mart("road_traffic_hourly", changed=f"hour_start IN ({TOUCHED_HOURS})", typical=True),
    Mart(
        "congestion_events",
        keep="ended_at IS NULL OR ended_at > $cutoff",
        changed="ended_at IS NULL OR ended_at >= $since",
    ),
)
# The road marts' columns joined from road_hour_of_week_profile, and the profile's columns they come from.
TYPICAL_COLUMNS = {
    "typical_speed_kmh": "typical_speed_kmh",
    "typical_travel_time_s": "typical_travel_time_s",
    "typical_measured_km": "measured_km",
    "typical_measured_hours": "measured_hours",
}
PROFILE_KEY = ("road_name", "direction", "day_of_week", "hour_of_day")
LAKE_STATE = "lake_merges_absorbed"  # the merges the marts hold (dbt_project/macros/lake_changes.sql)
# The dashboards' datasets that are not a mart as it is: one view per file, <schema>/<name>.sql, over the
# serving file's marts and health tables. Superset reads a view as a table; a dataset defined by its own SQL
# it parses again (sqlglot) several times per chart query: 25-40 % of those charts' query time here. A view
# whose name starts with "_" is no dataset's but what the others share; those are created first.
DASHBOARD_VIEWS = Path(__file__).with_name("dashboard_views")
PUBLISH_FORMAT = 3
# A patched file keeps deleted rows' space until a whole copy rewrites it: one whole copy a day.
FULL_PUBLISH_EVERY = timedelta(hours=24)


# --------------------------------------------------------------------------- publish


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _quoted(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


@dataclass
class Published:
    rows: dict[str, int]
    built_at: datetime
    latest_measured_at: datetime | None
    full: bool  # every mart copied whole (else the previous file was patched)


def _reusable(con: duckdb.DuckDBPyConnection, config: ServingConfig, built_at: datetime) -> str | None:
    """Why the previous serving file (attached as `serving`) cannot be patched, or None if it can."""
    try:
        row = con.execute("SELECT format, serving_days, marts, full_built_at FROM serving.meta.publish").fetchone()
    except duckdb.Error:
        return "it has no publish metadata"
    if row is None:
        return "its publish metadata is empty"
    format_, days, marts, full_built_at = row
    if (format_, days, marts) != (PUBLISH_FORMAT, config.serving_days, [m.name for m in MARTS]):
        return "it was published with another layout or window"
    if built_at - full_built_at > FULL_PUBLISH_EVERY:
        return f"its last full copy is older than {FULL_PUBLISH_EVERY} (this one reclaims deleted rows)"
    (unknown,) = con.execute(
        f"SELECT count(*) FROM serving.meta.{LAKE_STATE} s ANTI JOIN {WAREHOUSE_NAME}.main.{LAKE_STATE} w "
        "USING (merged_at, measured_at)"
    ).fetchone()
    if unknown:
        return "it holds merges the warehouse does not (the warehouse was rebuilt)"
    return None


def mart_cutoff(mart: Mart, newest: datetime, serving_days: int) -> datetime:
    """The start of a mart's window in the serving file: `serving_days` before the newest measurement, or
    the mart's own shorter `days`."""
    return newest - timedelta(days=min(serving_days, mart.days or serving_days))


def _copy(con: duckdb.DuckDBPyConnection, mart: Mart, cutoff: datetime) -> None:
    keep = f"WHERE {mart.keep}" if mart.keep else ""
    con.execute(f"DROP TABLE IF EXISTS serving.main.{mart.name}")
    con.execute(
        f"CREATE TABLE serving.main.{mart.name} AS SELECT * FROM {WAREHOUSE_NAME}.main.{mart.name} {keep}",
        {"cutoff": cutoff} if mart.keep else None,
    )


def _touched(con: duckdb.DuckDBPyConnection) -> int:
    """The snapshot times the warehouse absorbed since the previous publish, as the temporary table
    `touched`: the (merge stamp, snapshot) pairs its state holds and the serving file's copy does not, so
    late snapshots and merges that committed out of stamp order count."""
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE touched AS SELECT DISTINCT measured_at FROM {WAREHOUSE_NAME}.main.{LAKE_STATE} "
        f"ANTI JOIN serving.meta.{LAKE_STATE} USING (merged_at, measured_at)"
    )
    return con.execute("SELECT count(*) FROM touched").fetchone()[0]


def _typical_moved(con: duckdb.DuckDBPyConnection) -> None:
    """The hours of the week whose typical values moved since the previous publish, as the temporary
    table `typical_moved`: the rows of road_hour_of_week_profile that differ between the warehouse and
    the serving file (read before the profile is copied over)."""
    columns = ", ".join((*PROFILE_KEY, *TYPICAL_COLUMNS.values()))
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE typical_moved AS SELECT DISTINCT {', '.join(PROFILE_KEY)} FROM ("
        f"(SELECT {columns} FROM {WAREHOUSE_NAME}.main.road_hour_of_week_profile "
        f"EXCEPT SELECT {columns} FROM serving.main.road_hour_of_week_profile) UNION ALL "
        f"(SELECT {columns} FROM serving.main.road_hour_of_week_profile "
        f"EXCEPT SELECT {columns} FROM {WAREHOUSE_NAME}.main.road_hour_of_week_profile))"
    )


def _patch(con: duckdb.DuckDBPyConnection, mart: Mart, cutoff: datetime, since: datetime) -> bool:
    """Bring a mart of the previous serving file up to date with the warehouse; False if it drifted.

    The rows the build may have rebuilt (`mart.changed`, from the snapshots merged since the previous
    publish) are replaced, and the rows out of the window dropped. Typical values move with history: they
    are refreshed in the rows of the hours of the week whose profile moved. The row count is then checked
    against the warehouse; a mismatch means the two diverged.
    """
    served, source = f"serving.main.{mart.name}", f"{WAREHOUSE_NAME}.main.{mart.name}"
    keep = f"AND ({mart.keep})" if mart.keep else ""
    changed = {"since": since} if "$since" in (mart.changed or "") else None
    con.execute(f"DELETE FROM {served} WHERE {mart.changed}", changed)
    con.execute(
        f"INSERT INTO {served} SELECT * FROM {source} WHERE ({mart.changed}) {keep}",
        {**(changed or {}), **({"cutoff": cutoff} if mart.keep else {})} or None,
    )
    if mart.keep:
        con.execute(f"DELETE FROM {served} WHERE NOT ({mart.keep})", {"cutoff": cutoff})
    if mart.typical:
        # The typical values of the moved hours of the week, read from the profile itself (the road marts
        # join them from it on PROFILE_KEY: the same values, without evaluating the mart's view over the
        # whole window); a profile row that disappeared leaves nulls, as the mart's left join does.
        profile = ", ".join(f"p.{column} AS {typical}" for typical, column in TYPICAL_COLUMNS.items())
        moved = (
            f"(SELECT m.*, {profile} FROM typical_moved AS m "
            f"LEFT JOIN {WAREHOUSE_NAME}.main.road_hour_of_week_profile AS p USING ({', '.join(PROFILE_KEY)}))"
        )
        on = " AND ".join(f"s.{column} = w.{column}" for column in PROFILE_KEY)
        assignments = ", ".join(f"{column} = w.{column}" for column in TYPICAL_COLUMNS)
        con.execute(f"UPDATE {served} AS s SET {assignments} FROM {moved} AS w WHERE {on}")
    (served_rows,) = con.execute(f"SELECT count(*) FROM {served}").fetchone()
    (source_rows,) = con.execute(
        f"SELECT count(*) FROM {source} {'WHERE ' + mart.keep if mart.keep else ''}",
        {"cutoff": cutoff} if mart.keep else None,
    ).fetchone()
    return served_rows == source_rows


def _patch_columns(con: duckdb.DuckDBPyConnection, mart: Mart) -> bool:
    """Bring a mart with `stable` columns up to date column-wise; False if its columns drifted.

    Rows whose key left the warehouse or whose stable columns changed are deleted and written again;
    every other column of the remaining rows is updated in place. A DuckDB checkpoint rewrites only the
    columns that changed: the geometry of 2,859 segments is not written again every minute.
    """
    served, source = f"serving.main.{mart.name}", f"{WAREHOUSE_NAME}.main.{mart.name}"
    columns = [row[0] for row in con.execute(f"DESCRIBE {source}").fetchall()]
    if columns != [row[0] for row in con.execute(f"DESCRIBE {served}").fetchall()]:
        return False
    same = " AND ".join(f"w.{column} IS NOT DISTINCT FROM s.{column}" for column in (mart.key, *mart.stable))
    con.execute(f"DELETE FROM {served} AS s WHERE NOT EXISTS (SELECT 1 FROM {source} AS w WHERE {same})")
    assignments = ", ".join(f"{c} = w.{c}" for c in columns if c != mart.key and c not in mart.stable)
    con.execute(f"UPDATE {served} AS s SET {assignments} FROM {source} AS w WHERE s.{mart.key} = w.{mart.key}")
    con.execute(
        f"INSERT INTO {served} SELECT * FROM {source} AS w "
        f"WHERE NOT EXISTS (SELECT 1 FROM {served} AS s WHERE s.{mart.key} = w.{mart.key})"
    )
    (served_rows,) = con.execute(f"SELECT count(*) FROM {served}").fetchone()
    (source_rows,) = con.execute(f"SELECT count(*) FROM {source}").fetchone()
    return served_rows == source_rows


# Called with the new file (not yet published), the file it replaces and what was published into it.
Recorder = Callable[[Path, Path, Published], None]


def publish(config: ServingConfig, record: Recorder, full: bool = False) -> Published:
    """Publish the warehouse's marts to the serving file by atomic replace (under the build lock).

    The new file is the previous serving file patched with what changed (its cost follows the merged
    snapshots), or, when there is no usable previous file, when `full` is asked, once a day, or if a
    patched mart does not match the warehouse, a whole copy of the marts. `record` then writes what else
    the new file carries (the pipeline-health tables, `health_recorder`), and the dashboards' views are
    made over both, before it replaces the old one.
    """
    target = config.serving_db
    target.parent.mkdir(parents=True, exist_ok=True)
    # Beside the target, so that os.replace stays on one filesystem and is atomic.
    temporary = target.with_name(f"{target.name}.{uuid.uuid4().hex[:12]}.tmp")
    built_at = datetime.now(UTC)
    for stale in target.parent.glob(f"{target.name}.*.tmp*"):  # left by a publish that was killed
        stale.unlink(missing_ok=True)
    try:
        published = None
        if not full and target.is_file():
            shutil.copyfile(target, temporary)
            published = _publish_into(config, temporary, built_at, patch=True)
        if published is None:
            temporary.unlink(missing_ok=True)
            published = _publish_into(config, temporary, built_at, patch=False)
        record(temporary, target, published)
        create_dashboard_views(temporary)
        _fsync(temporary)
        os.replace(temporary, target)
        _fsync(target.parent, directory=True)
    finally:
        temporary.unlink(missing_ok=True)
        temporary.with_name(temporary.name + ".wal").unlink(missing_ok=True)
    return published


def _publish_into(config: ServingConfig, path: Path, built_at: datetime, patch: bool) -> Published | None:
    """Write the marts into the file at `path` (patching what it holds if `patch`); None if it cannot be
    patched, and then `path` is left unchanged."""
    with duckdb.connect(":memory:") as con:
        con.execute("SET TimeZone = 'UTC'")
        # The warehouse's views name their tables "traffic"."main"...: it is attached under that name.
        con.execute(f"ATTACH {_quoted(config.warehouse_db)} AS {WAREHOUSE_NAME} (READ_ONLY)")
        con.execute(f"ATTACH {_quoted(path)} AS serving")
        if patch and (reason := _reusable(con, config, built_at)):
            log.info("publishing a whole copy: the previous serving file cannot be patched, %s", reason)
            return None
        (latest,) = con.execute(f"SELECT max(measured_at) FROM {WAREHOUSE_NAME}.main.segment_latest").fetchone()
        con.execute("BEGIN")
        if patch:
            _touched(con)
            _typical_moved(con)
            (served_latest,) = con.execute("SELECT latest_measured_at FROM serving.meta.publish").fetchone()
            (earliest,) = con.execute("SELECT min(measured_at) FROM touched").fetchone()
            moments = [moment for moment in (earliest, served_latest) if moment is not None]
            since = (min(moments) if moments else built_at) - dbt_build.episode_gap() - timedelta(minutes=1)
        for mart in MARTS:
            cutoff = mart_cutoff(mart, latest or built_at, config.serving_days)
            if patch and (mart.changed or mart.stable):
                patched = _patch(con, mart, cutoff, since) if mart.changed else _patch_columns(con, mart)
                if not patched:
                    log.warning("publishing a whole copy: %s in the serving file differs from the warehouse", mart.name)
                    con.execute("ROLLBACK")
                    return None
            else:
                _copy(con, mart, cutoff)
        rows = {m.name: con.execute(f"SELECT count(*) FROM serving.main.{m.name}").fetchone()[0] for m in MARTS}
        full_built_at = (
            con.execute("SELECT full_built_at FROM serving.meta.publish").fetchone()[0] if patch else built_at
        )
        con.execute("CREATE SCHEMA IF NOT EXISTS serving.meta")
        # What the marts hold of the lake, for the next patch and for `trafficwatch lag`.
        if patch:
            con.execute(
                f"INSERT INTO serving.meta.{LAKE_STATE} SELECT * FROM {WAREHOUSE_NAME}.main.{LAKE_STATE} "
                f"ANTI JOIN serving.meta.{LAKE_STATE} USING (merged_at, measured_at)"
            )
        else:
            con.execute(
                f"CREATE OR REPLACE TABLE serving.meta.{LAKE_STATE} AS SELECT * FROM {WAREHOUSE_NAME}.main.{LAKE_STATE}"
            )
        con.execute(
            "CREATE OR REPLACE TABLE serving.meta.publish AS SELECT ?::INTEGER AS format, "
            "?::TIMESTAMPTZ AS built_at, ?::TIMESTAMPTZ AS latest_measured_at, ?::INTEGER AS serving_days, "
            "?::VARCHAR[] AS marts, ?::JSON AS mart_rows, ?::TIMESTAMPTZ AS full_built_at",
            [PUBLISH_FORMAT, built_at, latest, config.serving_days, [m.name for m in MARTS], json.dumps(rows),
             full_built_at],
        )  # fmt: skip
        con.execute("COMMIT")
        con.execute("CHECKPOINT serving")  # everything in the file itself: no WAL beside it
        con.execute("DETACH serving")
    return Published(rows, built_at, latest, full=not patch)


def create_dashboard_views(path: Path) -> list[str]:
    """Make the serving file's views exactly those of DASHBOARD_VIEWS: each (re)created from its file, so a
    patched copy gets a changed definition too, and any other view dropped (30-60 ms). The views' names."""
    ordered = sorted(DASHBOARD_VIEWS.glob("*/*.sql"), key=lambda sql: (not sql.stem.startswith("_"), sql))
    files = {f"{sql.parent.name}.{sql.stem}": sql for sql in ordered}
    with duckdb.connect(str(path)) as con:
        con.execute("BEGIN")
        held = con.execute("SELECT schema_name || '.' || view_name FROM duckdb_views() WHERE NOT internal")
        for name in {name for (name,) in held.fetchall()} - files.keys():
            con.execute(f"DROP VIEW {name}")
        for name, sql in files.items():
            con.execute(f"CREATE SCHEMA IF NOT EXISTS {sql.parent.name}")
            con.execute(f"CREATE OR REPLACE VIEW {name} AS {sql.read_text()}")
        con.execute("COMMIT")
        con.execute("CHECKPOINT")
    return list(files)


# --------------------------------------------------------------------------- the whole step


def read_lake_health(settings: Settings, config: ServingConfig) -> health.LakeHealth:
    """What the lake gained since the serving file's health tables (`trafficwatch.health`). Health is the
    operator's view, not the dashboards' data: a lake that cannot be read gives nothing new, with a warning,
    and the health tables stay as they were."""
    try:
        return health.read_lake_health(settings, health.horizon(config.serving_db))
    except Exception as error:  # reported in one line: the marts are published regardless
        log.warning(
            "health: could not read the merge log, rejected rows or quarantine: %s", dbt_build.one_line(str(error))
        )
        return health.LakeHealth.empty()


def health_recorder(
    found: Callable[[], health.LakeHealth], config: ServingConfig, dbt_seconds: float, started: float
) -> Recorder:
    """The recorder that writes the health tables, with what `found()` returns (read_lake_health) and this
    build's row of the build log, into the new serving file. `started`: when the publish began
    (time.perf_counter())."""

    def record(path: Path, previous: Path, published: Published) -> None:
        build = {
            "dbt_seconds": dbt_seconds,
            "publish_seconds": time.perf_counter() - started,
            "full_publish": published.full,
            "serving_rows": sum(published.rows.values()),
        }
        health.record(path, previous, found(), published.built_at, config.serving_days, build)

    return record


def build(settings: Settings, config: ServingConfig | None = None, full_refresh: bool = False) -> BuildResult:
    """dbt build, then publish the serving file if every model and data test passed.

    The DAG `traffic_marts` and `trafficwatch build` both call this.
    """
    config = config or ServingConfig.from_env(settings)
    with dbt_build.build_lock(config):
        started = time.perf_counter()
        nodes = dbt_build.run_dbt(settings, config, full_refresh=full_refresh)
        dbt_seconds = time.perf_counter() - started
        started = time.perf_counter()
        # The lake's health (S3 reads, ~0.2 s) is read while the marts are published, not before: only once
        # dbt is done, as it sets process variables, which must not change while delta-rs threads read them.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="health") as pool:
            lake_health = pool.submit(read_lake_health, settings, config)
            record = health_recorder(lake_health.result, config, dbt_seconds, started)
            published = publish(config, record, full=full_refresh)
        result = BuildResult(
            serving_db=config.serving_db,
            built_at=published.built_at,
            latest_measured_at=published.latest_measured_at,
            nodes=nodes,
            rows=published.rows,
            full_publish=published.full,
            dbt_seconds=dbt_seconds,
            publish_seconds=time.perf_counter() - started,
        )
    log.info(result.summary())
    return result


def serving_built_at(path: Path) -> datetime | None:
    """When the serving file at `path` was published, read from its metadata; None if there is none."""
    if not path.is_file():
        return None
    with duckdb.connect(str(path), read_only=True) as con:
        row = con.execute("SELECT built_at FROM meta.publish").fetchone()
    return row[0] if row else None


def status(settings: Settings) -> dict[str, Any]:
    """The lake's status (`lake.status`) and where the serving file is, and when it was published."""
    from trafficwatch import lake

    path = serving_db_path(settings)
    built_at = serving_built_at(path)
    return {
        **lake.status(settings),
        "serving_db": str(path),
        "serving_built_at": built_at.astimezone(UTC).isoformat() if built_at else None,
    }
