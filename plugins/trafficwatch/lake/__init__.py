"""The lake: Delta tables of the landed snapshots, their schemas, row validation, and the exactly-once merge.

Modules, in the order a merge goes through them:

- `schema`: the tables' names, columns and partitioning;
- `tables`: opening them (`ensure_tables`, `existing_tables`), keeping them open (`OpenTables`), reading them;
- `preparation`: raw objects downloaded, parsed, validated (`validation`, `geometry`) and deduplicated;
- `writes`: exactly-once inserts, and the retry of a commit that raced another merge;
- `segments`: road_segments' versions, recomputed from the points the observations hold;
- `mergelog`: the merge log, written last, and which raw keys it holds (merged, refused, pending);
- `merge`: `merge_objects`, `merge_pending` and `backfill`, a chunk of objects per commit;
- `maintenance`: compaction, vacuum, raw expiry;
- `state`: `status`, what the lake holds.

The raw zone the merge reads (keys, listing, quarantine) is `trafficwatch.raw`. Callers use the names below,
as `lake.merge_pending(...)`; tests that hook into a step patch it in the module that calls it.
"""

from trafficwatch.geodesy import geometry_length_m
from trafficwatch.lake.maintenance import MaintenanceResult, expire_raw, maintain
from trafficwatch.lake.merge import MergeResult, backfill, merge_objects, merge_pending
from trafficwatch.lake.mergelog import append_merge_log, merged_keys, pending_raw, refused_keys
from trafficwatch.lake.preparation import gunzip, prepare
from trafficwatch.lake.schema import (
    APP_ID,
    LAKE_PREFIX,
    MERGE_LOG,
    MERGE_TABLES,
    OBSERVATIONS,
    PARTITIONS,
    REJECTED,
    SCHEMAS,
    SEGMENT_ATTRIBUTES,
    SEGMENTS,
    UTC_US,
)
from trafficwatch.lake.segments import merge_segments
from trafficwatch.lake.state import status
from trafficwatch.lake.tables import (
    OpenTables,
    Tables,
    empty_frame,
    ensure_tables,
    existing_tables,
    scan_table,
    storage_options,
    table_properties,
    table_uri,
)
from trafficwatch.lake.validation import dedupe, validate
from trafficwatch.lake.writes import may_hold, merge_observations, merge_rejected

__all__ = [
    "APP_ID",
    "LAKE_PREFIX",
    "MERGE_LOG",
    "MERGE_TABLES",
    "OBSERVATIONS",
    "PARTITIONS",
    "REJECTED",
    "SCHEMAS",
    "SEGMENTS",
    "SEGMENT_ATTRIBUTES",
    "UTC_US",
    "MaintenanceResult",
    "MergeResult",
    "OpenTables",
    "Tables",
    "append_merge_log",
    "backfill",
    "dedupe",
    "empty_frame",
    "ensure_tables",
    "existing_tables",
    "expire_raw",
    "geometry_length_m",
    "gunzip",
    "maintain",
    "may_hold",
    "merge_objects",
    "merge_observations",
    "merge_pending",
    "merge_rejected",
    "merge_segments",
    "merged_keys",
    "pending_raw",
    "prepare",
    "refused_keys",
    "scan_table",
    "status",
    "storage_options",
    "table_properties",
    "table_uri",
    "validate",
]
