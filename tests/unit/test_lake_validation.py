"""Row validation and in-snapshot duplicates: every rule rejects what it should, with its reason."""

from __future__ import annotations

import gzip
import json

import polars as pl
import pytest

from trafficwatch import lake
from trafficwatch.lake import dedupe, validate
from trafficwatch.payloads import normalize_payload

STATUSES = ("freeFlow", "heavy", "congested", "impossible", "unknown")  # the documented list


@pytest.fixture(scope="module")
def records(sample_bytes: bytes) -> list[dict]:
    return json.loads(sample_bytes)[:5]


def _frame(records: list[dict]) -> pl.DataFrame:
    frame = normalize_payload(json.dumps(records).encode()).frame
    return frame.with_columns(pl.lit("raw/k.json.gz").alias("source_key"))


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("averagevehiclespeed", 201, "speed_kmh 201 outside 0-200 km/h"),
        ("averagevehiclespeed", -1, "speed_kmh -1 outside 0-200 km/h"),
        ("averagevehiclespeed", "fast", "speed_kmh fast is not an integer"),
        ("averagevehiclespeed", 50.5, "speed_kmh 50.5 is not an integer"),
        ("traveltime", -3, "travel_time_s -3 is negative"),
        ("traveltimereliability", 101, "reliability_pct 101 outside 0-100 %"),
        ("traveltimereliability", -1, "reliability_pct -1 outside 0-100 %"),
        (
            "trafficstatus",
            "jammed",
            "traffic_status 'jammed' is not one of freeFlow, heavy, congested, impossible, unknown",
        ),
        ("vehicleprobemeasurement", -2, "probe_count -2 is negative"),
        ("geo_point_2d", {"lon": 2.35, "lat": 48.85}, "point (2.35, 48.85) is outside the Rennes area"),
        ("geo_point_2d", {"lon": -1.68, "lat": 0.0}, "point (-1.68, 0.0) is outside the Rennes area"),
        (
            "geo_shape",
            {"type": "Feature", "geometry": {"type": "Point", "coordinates": [-1.68, 48.11]}, "properties": {}},
            "geometry type Point is not LineString or MultiLineString",
        ),
    ],
)
def test_each_rule_rejects_with_its_reason(records, field, value, reason) -> None:
    records = [dict(record) for record in records]
    records[2][field] = value
    accepted, rejected = validate(_frame(records))
    assert accepted.height == 4
    assert rejected["reason"].to_list() == [reason]
    assert rejected["record_index"].to_list() == [2]


def test_several_failures_are_all_named(records) -> None:
    records = [dict(record) for record in records]
    records[0].update(averagevehiclespeed=999, traveltime=-1)
    _, rejected = validate(_frame(records))
    assert rejected["reason"].to_list() == ["speed_kmh 999 outside 0-200 km/h; travel_time_s -1 is negative"]


def test_valid_rows_get_the_lake_types_and_edge_values_pass(records) -> None:
    records = [dict(record) for record in records]
    records[0].update(averagevehiclespeed=0, traveltime=0, traveltimereliability=100)
    records[1].update(averagevehiclespeed=200, traveltimereliability=0, vehicleprobemeasurement=0)
    records[2].pop("geo_shape")  # no geometry: the observation is kept
    records[3]["averagevehiclespeed"] = "42"  # a number sent as text is still a number
    accepted, rejected = validate(_frame(records))
    assert rejected.is_empty()
    assert accepted.schema["speed_kmh"] == pl.Int32
    assert accepted["speed_kmh"].to_list()[:4] == [0, 200, records[2]["averagevehiclespeed"], 42]


def test_duplicate_keys_keep_one_row_deterministically(records) -> None:
    twin = dict(records[0], vehicleprobemeasurement=records[0]["vehicleprobemeasurement"] + 3, averagevehiclespeed=11)
    frame = _frame([*records, twin, dict(records[1])])
    accepted, _ = validate(frame)
    unique, dropped = dedupe(accepted)
    assert unique.height == 5
    assert dropped.to_dicts() == [{"source_key": "raw/k.json.gz", "duplicate_rows": 2}]
    kept = unique.filter(pl.col("segment_key") == records[0]["predefinedlocationreference"])
    assert kept["speed_kmh"].to_list() == [11]  # the twin with more probes wins
    again, _ = dedupe(accepted.reverse())
    assert again.sort("segment_key").equals(unique.sort("segment_key"))  # order of arrival does not matter


def test_gunzip_reads_what_gzip_reads_and_fails_where_it_fails() -> None:
    body = b'[{"datetime": "2024-08-26T12:43:00+02:00"}]' * 100
    single, other = gzip.compress(body, mtime=0), gzip.compress(b"more", mtime=0)
    assert lake.gunzip(single) == body
    assert lake.gunzip(single + other) == body + b"more"  # several members: all of them, as gzip does
    with pytest.raises(EOFError):
        lake.gunzip(single[:-20])  # truncated
    with pytest.raises(gzip.BadGzipFile):
        lake.gunzip(b"junk")
