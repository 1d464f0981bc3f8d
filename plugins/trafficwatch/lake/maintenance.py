"""Keeping the lake cheap to read: compaction, checkpoints, vacuum, and the expiry of merged raw objects."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from trafficwatch import raw, storage
from trafficwatch.config import Settings
from trafficwatch.lake import writes
from trafficwatch.lake.mergelog import merged_keys
from trafficwatch.lake.tables import Tables, ensure_tables, table_properties
from trafficwatch.results import MaintenanceResult

log = logging.getLogger(__name__)


def maintain(settings: Settings, s3: Any = None) -> MaintenanceResult:
    """Compact small files, checkpoint and trim the logs, vacuum, and expire old raw objects.

    One-minute merges leave one small file per table per minute; compaction rewrites them into few,
    a checkpoint lets readers skip replaying the JSON log, and vacuum deletes what no version within
    the retention still needs. Raw objects are the replay source: kept unless `raw_retention_days` > 0.
    Retentions come from TRAFFICWATCH_VACUUM_RETENTION_HOURS and TRAFFICWATCH_RAW_RETENTION_DAYS.
    """
    tables = ensure_tables(settings)
    compacted, vacuumed = {}, {}
    wanted = table_properties(settings)
    for name, table in tables.items():
        if any(table.metadata().configuration.get(key) != value for key, value in wanted.items()):
            table.alter.set_table_properties(wanted)
        metrics = writes.commit_with_retries(table, lambda table=table: table.optimize.compact(), f"compact {name}")
        compacted[name] = int(metrics.get("numFilesRemoved", 0)) if metrics else 0
        table.update_incremental()
        table.create_checkpoint()
        table.cleanup_metadata()
        vacuumed[name] = len(
            table.vacuum(
                retention_hours=settings.vacuum_retention_hours, dry_run=False, enforce_retention_duration=False
            )
        )
    expired = expire_raw(settings, settings.raw_retention_days, s3 or storage.s3_client(settings), tables)
    result = MaintenanceResult(compacted, vacuumed, expired)
    log.info(result.summary())
    return result


def expire_raw(settings: Settings, retention_days: int, s3: Any, tables: Tables) -> int:
    """Delete raw objects older than the retention, but only those already merged."""
    if retention_days <= 0:
        return 0
    cutoff = datetime.now(UTC) - timedelta(days=retention_days)
    return raw.expire(s3, settings.bucket, merged_keys(settings, tables), cutoff)
