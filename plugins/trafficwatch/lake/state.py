"""What the lake holds, as an operator asks first (`status`): a read that creates nothing."""

from __future__ import annotations

from typing import Any

import polars as pl
from deltalake import DeltaTable

from trafficwatch import raw, storage
from trafficwatch.config import Settings
from trafficwatch.lake.mergelog import merged_keys
from trafficwatch.lake.schema import MERGE_LOG, OBSERVATIONS
from trafficwatch.lake.tables import Tables, existing_tables, scan_table, storage_options, table_uri


def status(settings: Settings, s3: Any = None) -> dict[str, Any]:
    """What an operator asks first: how much is landed, pending, quarantined, and the state of each table.

    A read: nothing is created, not even the tables (one not created yet has version None and no rows)."""
    s3 = s3 or storage.s3_client(settings)
    # S3 first: an unreachable endpoint, wrong keys or a missing bucket fail here, in S3's own words.
    landed = raw.list_raw(s3, settings.bucket)
    quarantined = raw.list_quarantined(s3, settings.bucket)
    tables = existing_tables(settings)
    options = storage_options(settings)
    log_table = tables[MERGE_LOG]
    merged = merged_keys(settings, Tables({MERGE_LOG: log_table})) if log_table is not None else frozenset()
    observations = tables[OBSERVATIONS]
    latest = None
    if observations is not None:
        latest = scan_table(observations, options).select(pl.col("measured_at").max()).collect().item()
    return {
        "bucket": settings.bucket,
        "raw_objects": len(landed),
        "pending_raw_objects": sum(1 for obj in landed if obj.key not in merged),
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
