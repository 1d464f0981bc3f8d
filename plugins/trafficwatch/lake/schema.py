"""The lake's tables and their columns: names, schemas, partitioning, and the columns that make a segment version.

Tables, under `s3://BUCKET/lake/`:

- `traffic_observations`: one row per (segment_key, measured_at), partitioned by `measured_date`;
- `road_segments`: one row per segment version (valid_from/valid_to), geometry kept as GeoJSON text;
- `rejected_records`: rows that failed validation, with the reason;
- `merge_log`: one row per merged raw object, with counts and the Delta versions it produced.
"""

from __future__ import annotations

import polars as pl

LAKE_PREFIX = "lake/"
APP_ID = "trafficwatch-merge"


UTC_US = pl.Datetime("us", "UTC")

OBSERVATIONS = "traffic_observations"
SEGMENTS = "road_segments"
REJECTED = "rejected_records"
MERGE_LOG = "merge_log"

SCHEMAS: dict[str, dict[str, pl.DataType]] = {
    OBSERVATIONS: {
        "segment_key": pl.String(),
        "measured_at": UTC_US,
        "measured_date": pl.Date(),
        "speed_kmh": pl.Int32(),
        "travel_time_s": pl.Int32(),
        "reliability_pct": pl.Int32(),
        "traffic_status": pl.String(),
        "probe_count": pl.Int32(),
        "attributes_hash": pl.String(),  # the point's segment attributes: versions are recomputed from these
        "source_key": pl.String(),
        "landed_at": UTC_US,
        "merged_at": UTC_US,
    },
    SEGMENTS: {
        "segment_key": pl.String(),
        "valid_from": UTC_US,
        "valid_to": UTC_US,
        "is_current": pl.Boolean(),
        "road_name": pl.String(),
        "hierarchy": pl.String(),
        "hierarchy_dv": pl.String(),
        "speed_limit_kmh": pl.Int32(),
        "insee": pl.Int32(),
        "direction": pl.String(),
        "gml_id": pl.String(),
        "segment_id": pl.Int64(),
        "func_class": pl.Int32(),
        "point_lon": pl.Float64(),
        "point_lat": pl.Float64(),
        "geometry_type": pl.String(),
        "geometry_geojson": pl.String(),
        "length_m": pl.Float64(),
        "attributes_hash": pl.String(),
        "source_key": pl.String(),
    },
    REJECTED: {
        "source_key": pl.String(),
        "record_index": pl.Int32(),
        "measured_at": UTC_US,
        "segment_key": pl.String(),
        "reason": pl.String(),
        "record_json": pl.String(),
        "rejected_at": UTC_US,
    },
    MERGE_LOG: {
        "source_key": pl.String(),
        "measured_at": UTC_US,
        "landed_at": UTC_US,
        "merged_at": UTC_US,
        "batch_id": pl.String(),  # one id per chunk: the objects a merge commits together
        "record_count": pl.Int32(),
        "accepted_rows": pl.Int32(),
        "rejected_rows": pl.Int32(),
        "duplicate_rows": pl.Int32(),
        "observations_version": pl.Int64(),
        "segments_version": pl.Int64(),
    },
}
# What every merge writes; rejected_records is opened only when a chunk has rejected rows.
MERGE_TABLES = (OBSERVATIONS, SEGMENTS, MERGE_LOG)
PARTITIONS = {OBSERVATIONS: ["measured_date"], REJECTED: [], SEGMENTS: [], MERGE_LOG: []}
# Columns that make a segment version: a change in any of them opens a new version.
SEGMENT_ATTRIBUTES = (
    "road_name",
    "hierarchy",
    "hierarchy_dv",
    "speed_limit_kmh",
    "insee",
    "direction",
    "gml_id",
    "segment_id",
    "func_class",
    "point_lon",
    "point_lat",
    "geometry_geojson",
)
INTEGER_COLUMNS = ("speed_kmh", "travel_time_s", "reliability_pct", "probe_count", "speed_limit_kmh", "insee")
