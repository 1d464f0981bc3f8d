"""What the lake reads from a segment's GeoJSON geometry text: its type, whether it is well formed and its end
points (for validation). Its length (for road_segments) is `trafficwatch.geodesy`'s, which the local feed's
simulator shares."""

from __future__ import annotations

import polars as pl

GEOMETRY_TYPES = ("LineString", "MultiLineString")
GEOMETRY_TYPE = pl.col("geometry").str.extract(r'"type"\s*:\s*"([A-Za-z]+)"')  # from the GeoJSON text
# The shape of the compact GeoJSON text the source writes: lines of at least two points of two (or three)
# JSON numbers. NaN, Infinity or null in place of a number do not match.
_NUMBER = r"-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?"
_POSITION = rf"\[{_NUMBER},{_NUMBER}(?:,{_NUMBER})?\]"
_LINE = rf"\[{_POSITION}(?:,{_POSITION})+\]"
_LINES = rf'LineString","coordinates":{_LINE}|MultiLineString","coordinates":\[{_LINE}(?:,{_LINE})*\]'
GEOMETRY_SHAPE = rf'^\{{"type":"(?:{_LINES})\}}$'
_FIRST_POSITION = rf'^\{{"type":"\w+","coordinates":\[+({_NUMBER}),({_NUMBER})'
_LAST_POSITION = rf"\[({_NUMBER}),({_NUMBER})[^\[\]]*\]+\}}$"


GEOMETRY_FACTS = {
    "geometry_kind": pl.String(),
    "geometry_well_formed": pl.Boolean(),
    "first_lon": pl.Float64(),
    "first_lat": pl.Float64(),
    "last_lon": pl.Float64(),
    "last_lat": pl.Float64(),
}
# What `geometry_facts` found in this process, keyed on the text itself: it only saves work (a text's facts
# never change), whoever asks.
_known_geometries = pl.DataFrame(schema={"geometry": pl.String(), **GEOMETRY_FACTS})
KNOWN_GEOMETRIES_MAX = 50_000  # a few networks' worth; beyond, start again


def geometry_facts(geometries: pl.Series) -> pl.DataFrame:
    """Per distinct geometry text: its type, whether it is well formed (lines of two or more [lon, lat]
    points of finite JSON numbers: NaN, Infinity or null do not match) and its end points.

    The regular expressions cost ~25 ms a snapshot, and a segment's geometry is the same text snapshot
    after snapshot: what this process has seen is kept, so a steady minute costs a join.
    """
    global _known_geometries
    distinct = geometries.drop_nulls().unique().to_frame("geometry")
    new = distinct.join(_known_geometries, on="geometry", how="anti")
    if new.height:
        text = pl.col("geometry")
        ends = [
            text.str.extract(pattern, group).cast(pl.Float64, strict=False).alias(name)
            for pattern, names in (
                (_FIRST_POSITION, ("first_lon", "first_lat")),
                (_LAST_POSITION, ("last_lon", "last_lat")),
            )
            for group, name in enumerate(names, start=1)
        ]
        new = new.with_columns(
            GEOMETRY_TYPE.alias("geometry_kind"), text.str.contains(GEOMETRY_SHAPE).alias("geometry_well_formed"), *ends
        )
        if _known_geometries.height + new.height > KNOWN_GEOMETRIES_MAX:
            _known_geometries = _known_geometries.clear()
        _known_geometries = pl.concat([_known_geometries, new])
    return distinct.join(_known_geometries, on="geometry", how="left")
