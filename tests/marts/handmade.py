"""Hand-made snapshots for the marts tests: a few segments whose every sample the test writes itself.

A `Segment` is one road segment (id, road, limit, a straight geometry of a chosen length); `payload`
builds the API's exports/json body of one snapshot from `{segment: (status, speed, travel time,
reliability, probes)}`; `HandmadeLake` lands and merges snapshots given by their UTC time and builds the
marts. Expected values are computed in the tests from the same samples, by hand.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import polars as pl
import pytest

from tests.conftest import land_raw
from tests.marts.fixtures import read_marts, serving_config
from trafficwatch import lake, serving
from trafficwatch.config import Settings

PARIS = ZoneInfo("Europe/Paris")
EARTH_RADIUS_M = 6_371_008.8  # the lake's haversine radius: lengths are checked against lake.geometry_length_m


@dataclass(frozen=True)
class Segment:
    key: str
    road: str
    limit: int
    lat: float  # a west-east line at this latitude, from lon -1.70
    lon_span: float = 0.004

    @property
    def geometry(self) -> dict:
        return {"type": "LineString", "coordinates": [[-1.70, self.lat], [-1.70 + self.lon_span, self.lat]]}

    @property
    def length_m(self) -> float:
        return lake.geometry_length_m(json.dumps(self.geometry))


def haversine_m(lon1: float, lat1: float, lon2: float, lat2: float) -> float:
    """Independent of the lake's own function: what a test expects a straight segment to measure."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(math.sqrt(a))


def payload(template: dict, moment: datetime, states: dict[Segment, tuple]) -> bytes:
    """One exports/json snapshot at `moment` (UTC), in the API's shape (local time in `datetime`)."""
    records = []
    for index, (segment, (status, speed, travel_time, reliability, probes)) in enumerate(
        sorted(states.items(), key=lambda item: item[0].key)
    ):
        record = copy.deepcopy(template)
        start = segment.geometry["coordinates"][0]
        record.update(
            datetime=moment.astimezone(PARIS).isoformat(),
            predefinedlocationreference=segment.key,
            denomination=segment.road,
            vitesse_maxi=segment.limit,
            trafficstatus=status,
            averagevehiclespeed=speed,
            traveltime=travel_time,
            traveltimereliability=reliability,
            vehicleprobemeasurement=probes,
            gml_id=f"handmade.{index}",
            id_rva_troncon_fcd_v1_1=index,
            geo_point_2d={"lon": start[0], "lat": start[1]},
            geo_shape={"type": "Feature", "geometry": segment.geometry, "properties": {}},
        )
        records.append(record)
    return json.dumps(records).encode()


class HandmadeLake:
    """Land and merge hand-made snapshots into a test bucket, build and read the marts."""

    def __init__(self, settings: Settings, sample_bytes: bytes) -> None:
        self.settings = settings
        self.template = json.loads(sample_bytes)[0]
        self.config = serving_config(settings)

    def land(self, snapshots: dict[datetime, dict[Segment, tuple]]) -> None:
        for moment, states in snapshots.items():
            land_raw(self.settings, payload(self.template, moment, states))
        lake.merge_pending(self.settings)

    def build(self, full_refresh: bool = False) -> dict[str, pl.DataFrame]:
        serving.build(self.settings, self.config, full_refresh=full_refresh)
        return read_marts(self.config.serving_db)

    @property
    def serving_db(self) -> Path:
        return self.config.serving_db


def row_of(frame: pl.DataFrame, **keys: object) -> dict:
    found = frame.filter(*[pl.col(k) == v for k, v in keys.items()])
    assert found.height == 1, f"{keys}: {found.height} rows"
    return found.row(0, named=True)


def assert_close(actual: dict, expected: dict) -> None:
    for column, value in expected.items():
        if isinstance(value, float):
            assert actual[column] == pytest.approx(value, rel=1e-9), column
        else:
            assert actual[column] == value, column


def harmonic(speeds: list[float]) -> float:
    return len(speeds) / sum(1 / v for v in speeds)


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def percentile_linear(values: list[float], q: float) -> float:
    """The q-quantile (0-1) by linear interpolation between closest ranks."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def utc(year: int, month: int, day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


def minutes(start: datetime, *offsets: int) -> list[datetime]:
    return [start + timedelta(minutes=m) for m in offsets]
