"""What the lake must hold after merging a set of snapshots, computed directly from the snapshots.

The fault-injection, property and race tests compare the real tables with these, whatever order,
batching, crash or race the merges went through. Parsing and row validation are the library's own
(`normalize_payload`, `validate`, `dedupe`): these tests are about exactly-once and history, not rules.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import polars as pl

from trafficwatch import lake
from trafficwatch.payloads import normalize_payload


def accepted_rows(bodies: Iterable[bytes]) -> pl.DataFrame:
    """The accepted, deduplicated rows of every good snapshot: one per (segment_key, measured_at)."""
    frames = []
    for body in bodies:
        frame = normalize_payload(body).frame.with_columns(
            pl.lit("reference").alias("source_key"), pl.lit(None, dtype=lake.UTC_US).alias("landed_at")
        )
        accepted, _ = lake.validate(frame)
        frames.append(lake.dedupe(accepted)[0])
    rows = pl.concat(frames, how="vertical_relaxed")
    # The same snapshot given twice (a replay) is one snapshot.
    return rows.unique(["segment_key", "measured_at"], keep="first").sort(["segment_key", "measured_at"])


def expected_observation_keys(bodies: Iterable[bytes]) -> set[tuple[str, datetime]]:
    return set(accepted_rows(bodies).select("segment_key", "measured_at").iter_rows())


def expected_versions(bodies: Iterable[bytes]) -> list[dict[str, Any]]:
    """Per segment, its points in time order collapsed into runs of equal attributes: one version per run,
    `valid_from` its first point, `valid_to` the next run's first point (None for the current one)."""
    rows = accepted_rows(bodies).rename({"geometry": "geometry_geojson"})
    versions: list[dict[str, Any]] = []
    columns = ["segment_key", "measured_at", *lake.SEGMENT_ATTRIBUTES]
    for key, points in itertools.groupby(rows.select(columns).iter_rows(named=True), lambda r: r["segment_key"]):
        runs: list[dict[str, Any]] = []
        for point in points:
            attributes = {name: point[name] for name in lake.SEGMENT_ATTRIBUTES}
            if not runs or runs[-1]["attributes"] != attributes:
                runs.append({"valid_from": point["measured_at"], "attributes": attributes})
        for run, following in itertools.zip_longest(runs, runs[1:]):
            versions.append(
                {
                    "segment_key": key,
                    "valid_from": run["valid_from"],
                    "valid_to": following["valid_from"] if following else None,
                    "is_current": following is None,
                    **run["attributes"],
                }
            )
    return versions


def actual_versions(settings: Any) -> list[dict[str, Any]]:
    """road_segments as the same list of dicts (sorted like `expected_versions`)."""
    table = lake.ensure_tables(settings, [lake.SEGMENTS])[lake.SEGMENTS]
    frame = lake.scan_table(table, lake.storage_options(settings)).collect()
    columns = ["segment_key", "valid_from", "valid_to", "is_current", *lake.SEGMENT_ATTRIBUTES]
    return frame.select(columns).sort(["segment_key", "valid_from"]).to_dicts()
