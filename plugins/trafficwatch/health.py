"""Pipeline health: what the serving file tells an operator about the pipeline itself.

Every publish writes the schema `health` of the new serving file, beside the marts, so that the
pipeline-health dashboard reads the one file Superset reads:

- `health.build_log`: one row per publish (marts build duration, publish duration, rows, what it served);
- `health.snapshots`: one row per landed object the merge took (its merge log row: landed, merged, counts,
  refused or not) and `visible_at`, the publish that first served its rows;
- `health.rejected_rows`: rows the merge rejected, per snapshot and reason (from `rejected_records`);
- `health.quarantined_objects`: the objects under `quarantine/`, by stage (ingest: a refused answer; merge:
  a refused raw object), with their reason.

The tables are carried over from the previous serving file and trimmed to its window (serving days), so a
publish reads only what the lake gained since: the data files of the merge log and rejected_records that
the previous file had not read (`health.lake_files` lists those it had: one new small file per merge, all of
them again after a compaction, whose rows already held are not added twice), and the objects quarantined
since the newest held minus a margin. Nothing is created: a missing lake table reads empty.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
from deltalake import DeltaTable
from deltalake.exceptions import TableNotFoundError

from trafficwatch import lake, raw, storage
from trafficwatch.config import Settings

log = logging.getLogger(__name__)

SCHEMA = "health"
# S3's LastModified is the end of an upload that began earlier: quarantined objects are listed from the
# newest held minus this margin (those already held are replaced, not added).
QUARANTINE_MARGIN = timedelta(minutes=60)
SNAPSHOT_COLUMNS = (
    "source_key",
    "measured_at",
    "landed_at",
    "merged_at",
    "record_count",
    "accepted_rows",
    "rejected_rows",
    "duplicate_rows",
)
TABLES = {
    "build_log": """
        built_at TIMESTAMPTZ NOT NULL,
        dbt_seconds DOUBLE,
        publish_seconds DOUBLE,
        full_publish BOOLEAN,
        serving_rows BIGINT,
        snapshots_made_visible BIGINT,
        latest_measured_at TIMESTAMPTZ,
        latest_landed_at TIMESTAMPTZ""",
    "snapshots": """
        source_key VARCHAR NOT NULL,
        measured_at TIMESTAMPTZ,
        landed_at TIMESTAMPTZ,
        merged_at TIMESTAMPTZ,
        record_count INTEGER,
        accepted_rows INTEGER,
        rejected_rows INTEGER,
        duplicate_rows INTEGER,
        refused BOOLEAN,
        visible_at TIMESTAMPTZ""",
    "rejected_rows": """
        source_key VARCHAR NOT NULL,
        measured_at TIMESTAMPTZ,
        rejected_at TIMESTAMPTZ NOT NULL,
        reason VARCHAR NOT NULL,
        row_count BIGINT NOT NULL""",
    "quarantined_objects": """
        object_key VARCHAR NOT NULL,
        quarantined_at TIMESTAMPTZ NOT NULL,
        stage VARCHAR NOT NULL,
        reason VARCHAR""",
    "lake_files": """
        table_name VARCHAR NOT NULL,
        file_name VARCHAR NOT NULL""",
}
# The column each table is trimmed on (rows older than the serving window go).
TRIMMED_ON = {
    "build_log": "built_at",
    "snapshots": "merged_at",
    "rejected_rows": "rejected_at",
    "quarantined_objects": "quarantined_at",
}


SNAPSHOTS_SCHEMA = {name: lake.SCHEMAS[lake.MERGE_LOG][name] for name in SNAPSHOT_COLUMNS}
REJECTED_SCHEMA = {
    "source_key": pl.String(),
    "measured_at": lake.UTC_US,
    "rejected_at": lake.UTC_US,
    "reason": pl.String(),
    "row_count": pl.UInt32(),
}
QUARANTINED_SCHEMA = {
    "object_key": pl.String(),
    "quarantined_at": lake.UTC_US,
    "stage": pl.String(),
    "reason": pl.String(),
}


@dataclass(frozen=True)
class LakeHealth:
    """What the lake and the quarantine gained since the serving file's health tables were written."""

    snapshots: pl.DataFrame  # SNAPSHOTS_SCHEMA, from the merge log
    rejected: pl.DataFrame  # REJECTED_SCHEMA: rows of rejected_records counted per snapshot and reason
    quarantined: pl.DataFrame  # QUARANTINED_SCHEMA
    files: dict[str, list[str]] | None = None  # the data files of LAKE_TABLES now (None: not read)

    @classmethod
    def empty(cls) -> LakeHealth:
        return cls(pl.DataFrame(schema=SNAPSHOTS_SCHEMA), pl.DataFrame(schema=REJECTED_SCHEMA),
                   pl.DataFrame(schema=QUARANTINED_SCHEMA))  # fmt: skip


@dataclass(frozen=True)
class Horizon:
    """What a serving file's health tables hold already: the data files read per lake table, and the
    time from which to list quarantine/ (None: everything)."""

    files: dict[str, frozenset[str]]
    quarantined_since: datetime | None

    @classmethod
    def nothing(cls) -> Horizon:
        return cls({}, None)


# --------------------------------------------------------------------------- reading the lake


def horizon(serving_db: Path) -> Horizon:
    """What the serving file at `serving_db` holds already (nothing if it has no health tables)."""
    if not serving_db.is_file():
        return Horizon.nothing()
    try:
        with duckdb.connect(str(serving_db), read_only=True) as con:
            files = con.execute(f"SELECT table_name, file_name FROM {SCHEMA}.lake_files").fetchall()
            (quarantined,) = con.execute(f"SELECT max(quarantined_at) FROM {SCHEMA}.quarantined_objects").fetchone()
    except duckdb.Error:  # no health tables yet
        return Horizon.nothing()
    read: dict[str, set[str]] = {}
    for table, name in files:
        read.setdefault(table, set()).add(name)
    since = quarantined.astimezone(UTC) - QUARANTINE_MARGIN if quarantined else None
    return Horizon({table: frozenset(names) for table, names in read.items()}, since)


def _open_existing(settings: Settings, name: str) -> DeltaTable | None:
    try:
        return DeltaTable(lake.table_uri(settings, name), storage_options=lake.storage_options(settings))
    except TableNotFoundError:
        return None


def _new_rows(settings: Settings, name: str, table: DeltaTable, read: frozenset[str]) -> tuple[pl.LazyFrame, list[str]]:
    """The rows of the table's data files not in `read`, and the names of all its data files now."""
    uris = table.file_uris()
    new = [uri for uri in uris if uri.rsplit("/", 1)[-1] not in read]
    names = [uri.rsplit("/", 1)[-1] for uri in uris]
    if not new:
        return lake.empty_frame(name).lazy(), names
    return pl.scan_parquet(new, storage_options=lake.storage_options(settings)), names


def _quarantined_since(settings: Settings, s3: Any, since: datetime | None) -> pl.DataFrame:
    """The objects under quarantine/ written at or after `since`, with their stage and reason."""
    rows = [
        (obj.key, obj.written_at, obj.stage, raw.quarantine_reason(s3, settings.bucket, obj.key))
        for obj in raw.list_quarantined(s3, settings.bucket)
        if since is None or obj.written_at >= since
    ]
    return pl.DataFrame(rows, schema=QUARANTINED_SCHEMA, orient="row")


def read_lake_health(settings: Settings, held: Horizon, s3: Any = None) -> LakeHealth:
    """The merge log rows, rejected rows (by snapshot and reason) and quarantined objects that a serving
    file holding `held` does not hold yet."""
    empty = LakeHealth.empty()
    snapshots, rejected, files = empty.snapshots, empty.rejected, {}
    if (merge_log := _open_existing(settings, lake.MERGE_LOG)) is not None:
        frame, files[lake.MERGE_LOG] = _new_rows(
            settings, lake.MERGE_LOG, merge_log, held.files.get(lake.MERGE_LOG, frozenset())
        )
        snapshots = frame.select(SNAPSHOT_COLUMNS).collect()
    if (rejected_table := _open_existing(settings, lake.REJECTED)) is not None:
        frame, files[lake.REJECTED] = _new_rows(
            settings, lake.REJECTED, rejected_table, held.files.get(lake.REJECTED, frozenset())
        )
        rejected = (
            frame.group_by("source_key", "measured_at", "rejected_at", "reason")
            .agg(pl.len().alias("row_count"))
            .collect()
            .cast(REJECTED_SCHEMA)
        )
    quarantined = _quarantined_since(settings, s3 or storage.s3_client(settings), held.quarantined_since)
    return LakeHealth(snapshots, rejected, quarantined, files)


# --------------------------------------------------------------------------- writing the serving file


def _quoted(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def _ensure_tables(con: duckdb.DuckDBPyConnection, previous: Path | None) -> None:
    """The health tables in the new file: there already when it is a patched copy of the previous file,
    else carried over from the previous file (a whole copy starts from the marts only), else empty.

    Also the temporary table `served_before`: the merges a previous file without health tables served
    (the first publish after an upgrade), with the time their build absorbed them; empty otherwise.
    """
    con.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
    con.execute(
        "CREATE OR REPLACE TEMP TABLE served_before (merged_at TIMESTAMPTZ, measured_at TIMESTAMPTZ, "
        "absorbed_at TIMESTAMPTZ)"
    )
    held = _tables_of(con, "current_database()")
    missing = [name for name in TABLES if name not in held]
    if not missing:
        return
    if previous is None or not previous.is_file():
        for name in missing:
            con.execute(f"CREATE TABLE {SCHEMA}.{name} ({TABLES[name]})")
        return
    con.execute(f"ATTACH {_quoted(previous)} AS previous (READ_ONLY)")
    carried = _tables_of(con, "'previous'")
    for name in missing:
        con.execute(f"CREATE TABLE {SCHEMA}.{name} ({TABLES[name]})")
        if name in carried:
            con.execute(f"INSERT INTO {SCHEMA}.{name} BY NAME SELECT * FROM previous.{SCHEMA}.{name}")
    if "snapshots" not in carried:
        with contextlib.suppress(duckdb.CatalogException):  # not a file the publish wrote
            con.execute(
                "INSERT INTO served_before SELECT merged_at, measured_at, absorbed_at "
                "FROM previous.meta.lake_merges_absorbed"
            )
    con.execute("DETACH previous")


def _tables_of(con: duckdb.DuckDBPyConnection, database: str) -> set[str]:
    query = f"SELECT table_name FROM duckdb_tables() WHERE database_name = {database} AND schema_name = ?"
    return {name for (name,) in con.execute(query, [SCHEMA]).fetchall()}


def record(
    path: Path,
    previous: Path | None,
    found: LakeHealth,
    built_at: datetime,
    days: int,
    build: dict[str, Any],
) -> None:
    """Write the health tables into the serving file at `path` (the new file, not yet published), with
    `previous` the file it replaces, and append this publish to the build log: `build` holds its
    dbt_seconds, publish_seconds (so far), full_publish and serving_rows."""
    cutoff = built_at - timedelta(days=days)
    with duckdb.connect(str(path)) as con:
        con.execute("SET TimeZone = 'UTC'")
        _ensure_tables(con, previous)
        # A row read again (a compacted file) is not added twice: the merge log's keys are unique, and a
        # key's rows all carry its merge's stamp (the bound only spares reading the older rows).
        con.register("found_snapshots", found.snapshots.to_arrow())
        con.execute(
            f"INSERT INTO {SCHEMA}.snapshots BY NAME SELECT f.*, f.record_count = 0 AS refused, NULL AS visible_at "
            f"FROM found_snapshots AS f ANTI JOIN (SELECT source_key FROM {SCHEMA}.snapshots "
            "WHERE merged_at >= (SELECT min(merged_at) FROM found_snapshots)) USING (source_key)"
        )
        con.register("found_rejected", found.rejected.to_arrow())
        con.execute(
            f"INSERT INTO {SCHEMA}.rejected_rows BY NAME SELECT * FROM found_rejected AS f "
            f"ANTI JOIN (SELECT source_key, reason FROM {SCHEMA}.rejected_rows "
            "WHERE rejected_at >= (SELECT min(rejected_at) FROM found_rejected)) USING (source_key, reason)"
        )
        if found.files is not None:
            con.execute(f"DELETE FROM {SCHEMA}.lake_files")
            for table, names in found.files.items():
                con.execute(f"INSERT INTO {SCHEMA}.lake_files SELECT ?, unnest(?::VARCHAR[])", [table, names])
        con.register("found_quarantined", found.quarantined.to_arrow())
        con.execute(
            f"DELETE FROM {SCHEMA}.quarantined_objects WHERE object_key IN (SELECT object_key FROM found_quarantined)"
        )
        con.execute(f"INSERT INTO {SCHEMA}.quarantined_objects BY NAME SELECT * FROM found_quarantined")
        # A snapshot is visible once the marts this file serves have absorbed its merge. What a file
        # without health tables served already is dated by when its build absorbed it.
        (made_visible,) = con.execute(
            f"UPDATE {SCHEMA}.snapshots AS s SET visible_at = coalesce(b.absorbed_at, $built_at) "
            "FROM meta.lake_merges_absorbed AS a LEFT JOIN served_before AS b USING (merged_at, measured_at) "
            "WHERE s.visible_at IS NULL AND a.merged_at = s.merged_at AND a.measured_at = s.measured_at",
            {"built_at": built_at},
        ).fetchone()
        for name, column in TRIMMED_ON.items():  # lake_files is replaced, not trimmed
            con.execute(f"DELETE FROM {SCHEMA}.{name} WHERE {column} < ?", [cutoff])
        (latest_measured, latest_landed) = con.execute(
            f"SELECT max(measured_at), max(landed_at) FROM {SCHEMA}.snapshots WHERE visible_at IS NOT NULL"
        ).fetchone()
        con.execute(
            f"INSERT INTO {SCHEMA}.build_log VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [built_at, build["dbt_seconds"], build["publish_seconds"], build["full_publish"], build["serving_rows"],
             made_visible, latest_measured, latest_landed],
        )  # fmt: skip
        con.execute("CHECKPOINT")
    log.info(
        "health: %d merge log rows, %d rejected row groups, %d quarantined objects read; %d snapshots made visible",
        found.snapshots.height,
        found.rejected.height,
        found.quarantined.height,
        made_visible,
    )
