"""The merge log: one row per raw object a merge took, written last; which raw keys it holds (merged),
which of them it refused, and which landed objects it does not hold yet (pending).

Merge log rows are never deleted, so what a process read of them stays true: a process keeping its tables
open (`OpenTables`) reads, after the first time, only the data files added since (`Tables.reads`).
"""

from __future__ import annotations

from collections.abc import Set as AbstractSet
from datetime import datetime
from typing import Any

import polars as pl
from deltalake import DeltaTable

from trafficwatch import raw
from trafficwatch.config import Settings
from trafficwatch.lake import writes
from trafficwatch.lake.preparation import ObjectCounts
from trafficwatch.lake.schema import MERGE_LOG, SCHEMAS
from trafficwatch.lake.tables import TableReads, Tables, scan_table, storage_options
from trafficwatch.raw import RawIndex, RawObject


def merged_keys(settings: Settings, tables: Tables) -> AbstractSet[str]:
    """The raw keys the merge log holds.

    Merge log rows are never deleted, so a process that keeps the table open (`OpenTables`) reads, after
    the first time, only the files added since: one small file per merge, not 43,200 rows after 30 days.
    The set it returns is then the one this process keeps up to date (copying it each time would cost what
    the history holds): read it, do not keep it.
    """
    table, options = tables[MERGE_LOG], storage_options(settings)
    files = frozenset(table.file_uris())
    held = tables.reads.merged_keys
    cached = held.get(table.table_uri)
    if cached is not None and cached[0] is table:
        _, known_files, keys = cached
        if files - known_files:
            added = pl.scan_parquet(sorted(files - known_files), storage_options=options).select("source_key")
            keys.update(added.collect()["source_key"].to_list())
    else:
        keys = set(scan_table(table, options).select("source_key").collect()["source_key"].to_list())
    held[table.table_uri] = (table, files, keys)
    return keys


def refused_keys(settings: Settings, tables: Tables) -> set[str]:
    """The raw keys the merge log holds as refused (quarantined: no record read), e.g. a snapshot dated in
    the future: landed, but never to be shown."""
    frame = scan_table(tables[MERGE_LOG], storage_options(settings)).filter(pl.col("record_count") == 0)
    return set(frame.select("source_key").collect()["source_key"].to_list())


def _note_merged(reads: TableReads, table: DeltaTable, version: int, files: frozenset[str], keys: list[str]) -> None:
    """Add the keys this process just wrote to the merge log to what `merged_keys` knows, without reading
    them back, when its write was the only commit since the version `merged_keys` last read."""
    cached = reads.merged_keys.get(table.table_uri)
    if cached is None or cached[0] is not table or cached[1] != files or table.version() != version + 1:
        return
    cached[2].update(keys)
    reads.merged_keys[table.table_uri] = (table, frozenset(table.file_uris()), cached[2])


def pending_raw(settings: Settings, s3: Any, tables: Tables, index: RawIndex | None = None) -> list[RawObject]:
    """Landed objects the merge log does not hold yet, oldest first: whoever landed them."""
    return raw.pending(s3, settings.bucket, merged_keys(settings, tables), index)


def append_merge_log(tables: Tables, entries: pl.DataFrame, transaction: int) -> None:
    table, rows = tables[MERGE_LOG], entries.select(list(SCHEMAS[MERGE_LOG]))
    predicate = f"t.source_key = s.source_key AND {writes.time_bounds(rows)}"
    version, files = table.version(), frozenset(table.file_uris())
    writes.commit_with_retries(table, lambda: writes.insert_missing(table, rows, predicate, transaction), MERGE_LOG)
    _note_merged(tables.reads, table, version, files, rows["source_key"].to_list())


def log_row(item: ObjectCounts, merged_at: datetime, chunk_id: str) -> dict[str, Any]:
    return {
        "source_key": item.obj.key,
        "measured_at": item.measured_at,
        "landed_at": item.obj.landed_at,
        "merged_at": merged_at,
        "batch_id": chunk_id,
        "record_count": item.records,
        "accepted_rows": item.accepted,
        "rejected_rows": item.rejected,
        "duplicate_rows": item.duplicates,
        "observations_version": None,
        "segments_version": None,
    }
