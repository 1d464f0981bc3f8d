"""Row validation: the lake's types enforced, values and geometries checked, every failed rule named; and
the deduplication of rows measured twice."""

from __future__ import annotations

import math

import polars as pl

from trafficwatch.lake.geometry import GEOMETRY_FACTS, GEOMETRY_TYPES, geometry_facts
from trafficwatch.lake.schema import INTEGER_COLUMNS

STATUSES = ("freeFlow", "heavy", "congested", "impossible", "unknown")
SPEED_RANGE_KMH = (0, 200)
RELIABILITY_RANGE_PCT = (0, 100)
# Rennes Métropole and a wide margin: a point outside is a broken coordinate, not a far-away road.
LON_RANGE = (-2.5, -1.0)
LAT_RANGE = (47.7, 48.5)


# How far a line's ends may lie from the record's point: 1.65 km in the real network (2024 sample).
MAX_POINT_TO_LINE_M = 5_000.0


def _as_integer(column: str) -> tuple[pl.Expr, pl.Expr]:
    """The column as Int32, and a flag for values that are present but not a whole number."""
    raw = pl.col(column)
    as_float = raw.cast(pl.Float64, strict=False)
    value = as_float.cast(pl.Int32, strict=False)
    bad = raw.is_not_null() & (as_float.is_null() | (as_float != as_float.round(0)) | value.is_null())
    return value, bad


def _reason(condition: pl.Expr, message: pl.Expr | str) -> pl.Expr:
    return pl.when(condition).then(message if isinstance(message, pl.Expr) else pl.lit(message))


def validate(frame: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split normalized rows into (accepted, rejected): types enforced, values checked, reasons given.

    Accepted rows come back with the lake's types; rejected rows carry `reason` (all failed rules,
    joined by "; ") and the record as JSON.
    """
    type_reasons: list[pl.Expr] = [
        _reason(pl.col("segment_key").is_null() | (pl.col("segment_key") == ""), "missing segment_key")
    ]
    typed: list[pl.Expr] = []
    for column in INTEGER_COLUMNS:
        value, bad = _as_integer(column)
        typed.append(value.alias(column))
        type_reasons.append(_reason(bad, pl.format("{} {} is not an integer", pl.lit(column), pl.col(column))))
    # Type failures are judged on the values as sent, before the casts below replace them. One lazy query:
    # each eager step would be a query of its own.
    lazy = frame.lazy().with_columns(pl.concat_str(type_reasons, separator="; ", ignore_nulls=True).alias("reason"))
    lazy = lazy.with_columns(
        *typed,
        pl.col("traffic_status").cast(pl.String, strict=False),
        pl.col("segment_id").cast(pl.Int64, strict=False),
        pl.col("func_class").cast(pl.Int32, strict=False),
        pl.col("point_lon").cast(pl.Float64, strict=False),
        pl.col("point_lat").cast(pl.Float64, strict=False),
        *[pl.col(c).cast(pl.String, strict=False) for c in ("road_name", "hierarchy", "hierarchy_dv", "direction")],
        pl.col("gml_id").cast(pl.String, strict=False),
    )
    reasons: list[pl.Expr] = [pl.when(pl.col("reason") != "").then(pl.col("reason"))]

    def outside(column: str, low: float, high: float, unit: str) -> pl.Expr:
        value = pl.col(column)
        message = pl.format(f"{column} {{}} outside {low:g}-{high:g} {unit}".rstrip(), value)
        return _reason(value.is_not_null() & ((value < low) | (value > high)), message)

    reasons += [
        outside("speed_kmh", *SPEED_RANGE_KMH, "km/h"),
        _reason(pl.col("travel_time_s") < 0, pl.format("travel_time_s {} is negative", pl.col("travel_time_s"))),
        outside("reliability_pct", *RELIABILITY_RANGE_PCT, "%"),
        _reason(pl.col("probe_count") < 0, pl.format("probe_count {} is negative", pl.col("probe_count"))),
        _reason(
            pl.col("traffic_status").is_not_null() & ~pl.col("traffic_status").is_in(STATUSES),
            pl.format("traffic_status '{}' is not one of " + ", ".join(STATUSES), pl.col("traffic_status")),
        ),
        _reason(
            pl.col("point_lon").is_not_null()
            & (
                ~pl.col("point_lon").is_between(*LON_RANGE)
                | ~pl.col("point_lat").fill_null(float("nan")).is_between(*LAT_RANGE)
            ),
            pl.format("point ({}, {}) is outside the Rennes area", pl.col("point_lon"), pl.col("point_lat")),
        ),
    ]
    reasons += [
        _reason(pl.col("point_lon").is_null() & pl.col("point_lat").is_null(), "point (geo_point_2d) is missing"),
        _reason(pl.col("point_lon").is_not_null() & pl.col("point_lat").is_null(), "point has no latitude"),
        _reason(pl.col("point_lon").is_null() & pl.col("point_lat").is_not_null(), "point has no longitude"),
        *_geometry_reasons(),
    ]
    facts = geometry_facts(frame["geometry"]).lazy()
    lazy = lazy.join(facts, on="geometry", how="left", maintain_order="left")
    checked = (
        lazy.with_columns(pl.concat_str(reasons, separator="; ", ignore_nulls=True).alias("reason"))
        .drop(GEOMETRY_FACTS)
        .collect()
    )
    failed = checked["reason"].is_not_null() & (checked["reason"] != "")
    return checked.filter(~failed).drop("reason"), checked.filter(failed)


def _geometry_reasons() -> list[pl.Expr]:
    """A geometry must be a (Multi)LineString of real lines (two points or more, finite numbers) whose ends
    lie near the record's point: a one-number coordinate or a line drawn elsewhere would corrupt lengths,
    travel-time sums and maps. A record without any geometry (older schemas) is accepted. Reads the
    columns of `geometry_facts`, joined to the rows."""
    geometry = pl.col("geometry")
    kind = pl.col("geometry_kind").fill_null("unknown")
    wrong_type = geometry.is_not_null() & ~pl.col("geometry_kind").fill_null("").is_in(GEOMETRY_TYPES)
    malformed = geometry.is_not_null() & ~wrong_type & ~pl.col("geometry_well_formed").fill_null(False)

    def distance_m(end: str) -> pl.Expr:
        dx = (pl.col(f"{end}_lon") - pl.col("point_lon")) * 111_320.0 * math.cos(math.radians(48.1))
        dy = (pl.col(f"{end}_lat") - pl.col("point_lat")) * 110_540.0
        return (dx * dx + dy * dy).sqrt()

    far = pl.max_horizontal(distance_m("first"), distance_m("last"))
    point_in_area = pl.col("point_lon").is_between(*LON_RANGE) & pl.col("point_lat").is_between(*LAT_RANGE)
    shaped = geometry.is_not_null() & ~wrong_type & ~malformed & point_in_area.fill_null(False)
    return [
        _reason(wrong_type, pl.format("geometry type {} is not LineString or MultiLineString", kind)),
        _reason(
            malformed,
            pl.format("geometry {} is malformed: lines of two or more [lon, lat] points of finite numbers", kind),
        ),
        _reason(
            shaped & ~(far <= MAX_POINT_TO_LINE_M),  # NaN (an infinite coordinate) counts as far
            pl.format(f"geometry lies {{}} m from its point (more than {MAX_POINT_TO_LINE_M:.0f} m)", far.round(0)),
        ),
    ]


def dedupe(accepted: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """One row per (segment_key, measured_at): the one with most probes, then the first in the payload.

    Returns (unique rows, count of dropped duplicates per source_key).
    """
    if not accepted.select(pl.struct("segment_key", "measured_at").is_duplicated().any()).item():
        return accepted, pl.DataFrame(schema={"source_key": pl.String, "duplicate_rows": pl.UInt32})
    ranked = accepted.sort(
        ["segment_key", "measured_at", "probe_count", "record_index"],
        descending=[False, False, True, False],
        nulls_last=True,
    )
    unique = ranked.unique(["segment_key", "measured_at"], keep="first", maintain_order=True)
    dropped = (
        ranked.group_by("source_key")
        .len()
        .join(unique.group_by("source_key").len(), on="source_key", suffix="_kept")
        .select("source_key", (pl.col("len") - pl.col("len_kept")).alias("duplicate_rows"))
    )
    return unique, dropped
