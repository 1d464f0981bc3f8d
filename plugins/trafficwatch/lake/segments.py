"""road_segments: the history of each segment's versions, recomputed from its points.

A segment's versions are a function of its points: every merged snapshot's accepted row, in time order,
collapsed into runs of equal attributes (valid_from = a run's first point, valid_to = the next run's).
Observations carry each point's `attributes_hash`, so the lake holds every point and the versions can be
recomputed exactly, whatever order snapshots arrive in. A merge recomputes only the segments whose points
do not simply continue their current version (a steady minute touches none), and only around the new
points: the versions outside their time range stand for the points they cover.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import datetime, timedelta

import polars as pl
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake

from trafficwatch.geodesy import geometry_length_m
from trafficwatch.lake import writes
from trafficwatch.lake.schema import APP_ID, OBSERVATIONS, SCHEMAS, SEGMENT_ATTRIBUTES, SEGMENTS
from trafficwatch.lake.tables import Tables, scan_table

log = logging.getLogger(__name__)

SEGMENT_ROW_KEY = ("segment_key", "valid_from")
TAIL_PROBE = timedelta(hours=1)  # where the first point after a chunk is looked for before the whole table


def _sha1_attributes(frame: pl.DataFrame) -> pl.Series:
    values = frame.select(SEGMENT_ATTRIBUTES).iter_rows()
    return pl.Series([hashlib.sha1(repr(row).encode()).hexdigest() for row in values], dtype=pl.String)


def hash_attributes(versions: pl.DataFrame, current: pl.DataFrame) -> pl.DataFrame:
    """`versions` with their `attributes_hash`: the current version's where the attributes equal it (the
    usual case: nothing to hash), else the SHA-1 of the attribute values."""
    against = current.select(
        "segment_key",
        pl.col("attributes_hash").alias("cur"),
        *[pl.col(name).alias(f"{name}__cur") for name in SEGMENT_ATTRIBUTES],
    )
    unchanged = pl.all_horizontal([pl.col(name).eq_missing(pl.col(f"{name}__cur")) for name in SEGMENT_ATTRIBUTES])
    joined = versions.join(against, on="segment_key", how="left").with_columns(
        pl.when(unchanged).then(pl.col("cur")).alias("attributes_hash")
    )
    joined = joined.drop("cur", *[f"{name}__cur" for name in SEGMENT_ATTRIBUTES])
    other = joined.filter(pl.col("attributes_hash").is_null())
    if other.is_empty():
        return joined
    other = other.with_columns(attributes_hash=_sha1_attributes(other))
    return pl.concat([joined.filter(pl.col("attributes_hash").is_not_null()), other])


def segment_rows(tables: Tables, options: dict[str, str]) -> pl.DataFrame:
    """Every version of every segment at the table's loaded version (read once per version)."""
    table = tables[SEGMENTS]
    return tables.reads.at_version(table, "versions", lambda: scan_table(table, options).collect())


def _touched(candidates: pl.DataFrame, current: pl.DataFrame) -> list[str]:
    """The segments whose candidate versions do not just continue their current version (same attributes,
    later): the only ones whose history a chunk can change."""
    joined = candidates.join(
        current.select("segment_key", pl.col("valid_from").alias("cur_from"), pl.col("attributes_hash").alias("cur")),
        on="segment_key",
        how="left",
    )
    continues = ((pl.col("attributes_hash") == pl.col("cur")) & (pl.col("measured_at") > pl.col("cur_from"))).fill_null(
        False
    )
    return joined.filter(~continues)["segment_key"].unique().to_list()


def _files_overlapping(table: DeltaTable, low: datetime, high: datetime | None) -> list[str]:
    """The data files whose `measured_at` statistics overlap [low, high] (high None: no upper bound)."""
    actions = pl.DataFrame(table.get_add_actions(flatten=True))
    if actions.is_empty():
        return []
    lowest, highest = pl.col("min.measured_at"), pl.col("max.measured_at")
    overlap = lowest.is_null() | highest.is_null() | (highest >= low)
    if high is not None:
        overlap = overlap & (lowest.is_null() | (lowest <= high))
    paths = actions.filter(overlap)["path"].to_list()
    return [f"{table.table_uri.rstrip('/')}/{path}" for path in paths]


POINT_COLUMNS = ("segment_key", "measured_at", "attributes_hash", "source_key")


def _points_between(
    table: DeltaTable, options: dict[str, str], keys: list[str], low: datetime, high: datetime | None
) -> pl.DataFrame:
    """The observations' points of these segments measured in [low, high]."""
    files = _files_overlapping(table, low, high)
    schema = {name: SCHEMAS[OBSERVATIONS][name] for name in POINT_COLUMNS}
    if not files:
        return pl.DataFrame(schema=schema)
    when = pl.col("measured_at") >= low
    if high is not None:
        when = when & (pl.col("measured_at") <= high)
    scan = pl.scan_parquet(files, storage_options=options, missing_columns="insert")
    return (
        scan.select(POINT_COLUMNS).filter(pl.col("segment_key").is_in(keys) & when).collect().cast(schema)  # type: ignore[arg-type]
    )


def _first_points_after(table: DeltaTable, options: dict[str, str], after: pl.DataFrame) -> pl.DataFrame:
    """Per segment of `after` (segment_key, t_max, until), its first point in (t_max, until): where the version
    a chunk cut into resumes. Looked for in the hour after the chunk first, then in the whole table."""
    found: list[pl.DataFrame] = []
    for probe in (TAIL_PROBE, None):
        if after.is_empty():
            break
        low = after["t_max"].min()
        high = None if probe is None else after["t_max"].max() + probe
        points = _points_between(table, options, after["segment_key"].to_list(), low, high)
        first = (
            points.join(after, on="segment_key")
            .filter(pl.col("measured_at") > pl.col("t_max"))
            .filter((pl.col("measured_at") < pl.col("until")).fill_null(True))
            .sort("measured_at")
            .unique("segment_key", keep="first")
            .select(POINT_COLUMNS)
        )
        found.append(first)
        after = after.join(first, on="segment_key", how="anti")
    return pl.concat(found) if found else pl.DataFrame(schema={n: SCHEMAS[OBSERVATIONS][n] for n in POINT_COLUMNS})


def _recomputed_versions(
    touched: pl.DataFrame,
    existing: pl.DataFrame,
    points: pl.DataFrame,
    attributes: pl.DataFrame,
) -> pl.DataFrame:
    """Every version of the touched segments, from their points: the observations inside each segment's new
    range (and the first one after it), and outside it the versions' own starts, which stand for the points
    they cover. Points whose attributes no version or chunk knows yet (a merge that died between its
    observations and its segments, and will be merged again) are left out until then."""
    schema = SCHEMAS[SEGMENTS]
    outside = (
        existing.join(touched, on="segment_key")
        .filter(~pl.col("valid_from").is_between(pl.col("t_min"), pl.col("t_max")))
        .select("segment_key", pl.col("valid_from").alias("measured_at"), "attributes_hash", "source_key")
    )
    # Observations written before points carried their hash: the version they lie in says it.
    points = points.sort("measured_at").join_asof(
        existing.select(
            "segment_key", pl.col("valid_from").alias("measured_at"), pl.col("attributes_hash").alias("held")
        ).sort("measured_at"),
        on="measured_at",
        by="segment_key",
        strategy="backward",
        check_sortedness=False,  # sorted by time within each segment, which is what counts
    )
    points = points.with_columns(pl.coalesce("attributes_hash", "held").alias("attributes_hash")).drop("held")
    known = attributes.select("segment_key", "attributes_hash")
    every = (
        pl.concat([outside, points.select(outside.columns)])
        .join(known, on=["segment_key", "attributes_hash"], how="semi")
        .unique(["segment_key", "measured_at"], keep="first")
        .sort(["segment_key", "measured_at"])
    )
    starts = every.filter(pl.col("attributes_hash").ne_missing(pl.col("attributes_hash").shift(1).over("segment_key")))
    starts = starts.with_columns(
        pl.col("measured_at").alias("valid_from"),
        pl.col("measured_at").shift(-1).over("segment_key").alias("valid_to"),
    ).with_columns(pl.col("valid_to").is_null().alias("is_current"))
    details = [name for name in schema if name not in ("valid_from", "valid_to", "is_current", "source_key")]
    versions = starts.join(attributes.select(details), on=["segment_key", "attributes_hash"], how="left")
    # A version that already exists keeps its lineage; a new one takes its first point's.
    lineage = existing.select(*SEGMENT_ROW_KEY, pl.col("source_key").alias("kept_source"))
    versions = versions.join(lineage, on=list(SEGMENT_ROW_KEY), how="left").with_columns(
        pl.coalesce("kept_source", "source_key").alias("source_key")
    )
    return versions.select(list(schema)).cast(schema)  # type: ignore[arg-type]


def _version_attributes(existing: pl.DataFrame, candidates: pl.DataFrame) -> pl.DataFrame:
    """The attributes (and geometry type, length) of every (segment, attributes_hash) known."""
    columns = ["segment_key", "attributes_hash", *SEGMENT_ATTRIBUTES, "geometry_type", "length_m"]
    known = existing.select(columns).unique(["segment_key", "attributes_hash"], keep="first")
    new = candidates.join(known, on=["segment_key", "attributes_hash"], how="anti").unique(
        ["segment_key", "attributes_hash"], keep="first"
    )
    new = new.with_columns(
        pl.col("geometry_geojson").map_elements(geometry_length_m, return_dtype=pl.Float64).alias("length_m")
        if new.height
        else pl.lit(None, dtype=pl.Float64).alias("length_m")
    )
    return pl.concat([known, new.select(columns)], how="vertical_relaxed")


def _same_versions(left: pl.DataFrame, right: pl.DataFrame) -> bool:
    columns = [*SEGMENT_ROW_KEY, "valid_to", "attributes_hash"]
    return left.select(columns).sort(columns).equals(right.select(columns).sort(columns))


def merge_segments(
    tables: Tables, candidates: pl.DataFrame, points: pl.DataFrame, options: dict[str, str], transaction: int
) -> int:
    """Bring the versions of the segments this chunk touches in line with all their points.

    `candidates`: the chunk's candidate versions, hashed (see `hash_attributes`); `points`: the chunk's
    accepted (segment_key, measured_at). Runs after the chunk's observations are committed, so that two merges
    racing cannot both miss each other: each reads the segments after its own observations landed, and a merge
    that changed versions looks again when other observations landed meanwhile.
    """
    table, observations = tables[SEGMENTS], tables[OBSERVATIONS]
    touched: set[str] = set()

    def attempt() -> bool:
        current = segment_rows(tables, options).filter(pl.col("is_current"))
        touched.update(_touched(candidates, current))
        return bool(touched) and _rewrite_versions(tables, candidates, points, touched, options, transaction)

    for _ in range(writes.COMMIT_ATTEMPTS):
        table.update_incremental()  # what other merges committed while this one wrote its observations
        seen = observations.version()
        written = writes.commit_with_retries(table, attempt, SEGMENTS)
        if not written:
            break
        observations.update_incremental()
        if observations.version() == seen:
            break
        log.info("observations landed while segment versions were recomputed: recomputing")
    return table.version()


def _rewrite_versions(
    tables: Tables,
    candidates: pl.DataFrame,
    points: pl.DataFrame,
    keys: set[str],
    options: dict[str, str],
    transaction: int,
) -> bool:
    """Recompute and write the versions of `keys`; False when they were already right (nothing written)."""
    table, observations = tables[SEGMENTS], tables[OBSERVATIONS]
    existing_all = segment_rows(tables, options)
    existing = existing_all.filter(pl.col("segment_key").is_in(list(keys)))
    touched = (
        points.filter(pl.col("segment_key").is_in(list(keys)))
        .group_by("segment_key")
        .agg(pl.col("measured_at").min().alias("t_min"), pl.col("measured_at").max().alias("t_max"))
    )
    low, high = touched["t_min"].min(), touched["t_max"].max()
    inside = _points_between(observations, options, touched["segment_key"].to_list(), low, high)
    inside = inside.join(touched, on="segment_key").filter(pl.col("measured_at").is_between("t_min", "t_max"))
    # Where the chunk ends inside a version, that version resumes at its first point after the chunk.
    containing = (
        existing.join(touched, on="segment_key")
        .filter(pl.col("valid_from") <= pl.col("t_max"))
        .filter(pl.col("valid_to").is_null() | (pl.col("valid_to") > pl.col("t_max")))
        .select("segment_key", "t_max", pl.col("valid_to").alias("until"))
    )
    tail = _first_points_after(observations, options, containing)
    points = pl.concat([inside.select(POINT_COLUMNS), tail.select(POINT_COLUMNS)])
    attributes = _version_attributes(existing, candidates.filter(pl.col("segment_key").is_in(list(keys))))
    versions = _recomputed_versions(touched, existing, points, attributes)
    if _same_versions(versions, existing):
        return False
    commit = CommitProperties(app_transactions=[Transaction(APP_ID, transaction)])
    if existing_all.is_empty() and table.version() <= 0:
        write_deltalake(table, versions.to_arrow(), mode="append", commit_properties=commit,
                        post_commithook_properties=writes.MERGE_HOOKS)  # fmt: skip
        return True
    quoted = ", ".join("'" + key.replace("'", "''") + "'" for key in sorted(keys))
    (
        table.merge(
            versions.to_arrow(),
            predicate="t.segment_key = s.segment_key AND t.valid_from = s.valid_from",
            source_alias="s",
            target_alias="t",
            commit_properties=commit,
            post_commithook_properties=writes.MERGE_HOOKS,
        )
        .when_matched_update_all()
        .when_not_matched_insert_all()
        .when_not_matched_by_source_delete(predicate=f"t.segment_key IN ({quoted})")
        .execute()
    )
    return True
