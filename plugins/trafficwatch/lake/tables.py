"""Opening the lake's Delta tables, keeping them open, and reading them.

`ensure_tables` opens (and creates, and adds new columns to) the tables, as a `Tables`: the open tables by
name, with what was read from them at their loaded versions (`TableReads`), so that a merge, or a process
keeping its tables open (`OpenTables`, the worker), does not read again what did not change. What was read
lives as long as the `Tables` (or the `OpenTables`) it belongs to: there is no module-level state.
`existing_tables` opens them as they are, for reads that must create nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import polars as pl
from deltalake import DeltaTable
from deltalake import Field as DeltaField
from deltalake.exceptions import CommitFailedError, TableNotFoundError

from trafficwatch.config import Settings
from trafficwatch.lake.schema import LAKE_PREFIX, MERGE_TABLES, PARTITIONS, SCHEMAS

log = logging.getLogger(__name__)


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


def open_table(settings: Settings, name: str) -> DeltaTable:
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


class TableReads:
    """What was read from open tables, each kept with the table object it was read from and the version (or
    data files) it was read at: used again only while that very object is still there.

    `at_version` serves reads of a whole table (road_segments' versions: in a steady minute no segment
    changes, so the table is not read again); `merged_keys` is the merge log's keys as `mergelog.merged_keys`
    keeps them up to date (table uri -> table, data files read, keys).
    """

    def __init__(self) -> None:
        self._by_version: dict[tuple[str, str], tuple[DeltaTable, int, Any]] = {}
        self.merged_keys: dict[str, tuple[DeltaTable, frozenset[str], set[str]]] = {}

    def at_version(self, table: DeltaTable, purpose: str, read: Callable[[], Any]) -> Any:
        """`read()`, or what it gave last time for this very table object at the same version."""
        key, version = (table.table_uri, purpose), table.version()
        cached = self._by_version.get(key)
        if cached is not None and cached[0] is table and cached[1] == version:
            return cached[2]
        value = read()
        self._by_version[key] = (table, version, value)
        return value


class Tables(dict[str, DeltaTable]):
    """Open tables by name, and what was read from them (`reads`, shared by every `Tables` that an
    `OpenTables` gives)."""

    def __init__(
        self, tables: Mapping[str, DeltaTable] | Iterable[tuple[str, DeltaTable]] = (), reads: TableReads | None = None
    ) -> None:
        super().__init__(tables)
        self.reads = reads if reads is not None else TableReads()


def ensure_tables(settings: Settings, names: Iterable[str] = tuple(SCHEMAS)) -> Tables:
    """Open the tables (all four by default), creating the missing ones (safe when two processes race).

    They are opened side by side: each open is mostly S3 round trips.
    """
    names = tuple(names)
    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        return Tables(zip(names, pool.map(lambda name: open_table(settings, name), names), strict=True))


class OpenTables:
    """The lake's tables kept open by a long-lived process (the worker), brought up to date before each use.

    Opening a Delta table on S3 costs ~15 ms of CPU whatever its size (each object store client parses the
    system's CA certificates), about half of a one-snapshot merge for three tables; bringing an open table
    up to date reads only the commits since its version (~1 ms). What was read from them is kept here too
    (`reads`), for as long as they stay open. Not thread-safe: one user at a time.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._tables: dict[str, DeltaTable] = {}
        self.reads = TableReads()

    def get(self, names: Iterable[str] = MERGE_TABLES) -> Tables:
        names = tuple(names)
        missing = [name for name in names if name not in self._tables]
        if missing:
            self._tables.update(ensure_tables(self.settings, missing))
        opened = [self._tables[name] for name in names if name not in missing]
        with ThreadPoolExecutor(max_workers=max(len(opened), 1)) as pool:  # S3 round trips: side by side
            list(pool.map(DeltaTable.update_incremental, opened))
        return Tables(((name, self._tables[name]) for name in names), self.reads)


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


def scan_table(table: DeltaTable, options: dict[str, str]) -> pl.LazyFrame:
    """The table at its loaded version, read by polars' own Parquet reader.

    Reading through pyarrow's dataset API (`to_pyarrow_table`) intermittently aborts the interpreter at
    exit with delta-rs 1.6 ("terminate called without an active exception"); polars' reader does not.
    """
    return pl.scan_delta(table, storage_options=options)
