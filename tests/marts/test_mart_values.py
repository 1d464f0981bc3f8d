"""Every mart's values on a small fixture, against expectations computed by hand in this file.

Three segments, four snapshots (08:00, 08:05, 08:10, 08:20 UTC, a Monday: 10:xx in Rennes):

- A and B are the two segments of "Rue Alpha"; C alone is "Avenue Beta".
- A goes freeFlow, freeFlow, heavy, heavy (heavy is not congested: no episode).
- B is congested throughout, from its first sample: one episode, ongoing; its geometry is a
  MultiLineString of two parts.
- C has no probe at 08:05 and 08:20 (unknown, upstream's placeholder speed 70): those samples count in
  no speed, and C's 08:15 bucket has no measurement at all (its travel time there is at its limit).
- No segment id ends in _D or _G: both roads are one direction, `both`.
- 10:xx in Rennes is not off-peak: every free-flow speed falls back to the limit.

Then a fifth snapshot (08:25) is merged and an incremental build must equal a full refresh.
"""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta

import polars as pl
import pytest

from tests.conftest import land_raw
from tests.marts.fixtures import assert_same_marts, comparable, read_marts, serving_config
from trafficwatch import lake, serving

pytestmark = pytest.mark.integration

T0 = datetime(2024, 8, 26, 8, 0, tzinfo=UTC)
BUCKET_0, BUCKET_1 = T0, T0 + timedelta(minutes=15)

GEOMETRY = {
    "A": {"type": "LineString", "coordinates": [[-1.68, 48.11], [-1.68, 48.115]]},
    "B": {
        "type": "MultiLineString",
        "coordinates": [[[-1.68, 48.115], [-1.68, 48.117]], [[-1.68, 48.117], [-1.679, 48.117]]],
    },
    "C": {"type": "LineString", "coordinates": [[-1.70, 48.10], [-1.69, 48.10]]},
}
ROAD = {"A": "Rue Alpha", "B": "Rue Alpha", "C": "Avenue Beta"}
LIMIT = {"A": 50, "B": 30, "C": 70}
LENGTH = {key: lake.geometry_length_m(json.dumps(geometry)) for key, geometry in GEOMETRY.items()}

# (minutes after 08:00) -> segment -> (status, speed km/h, travel time s, reliability %, probes)
SNAPSHOTS = {
    0: {"A": ("freeFlow", 45, 44, 100, 3), "B": ("congested", 10, 80, 60, 1), "C": ("freeFlow", 60, 45, 90, 2)},
    5: {"A": ("freeFlow", 40, 50, 75, 2), "B": ("congested", 12, 66, 60, 1), "C": ("unknown", 70, 38, 0, 0)},
    10: {"A": ("heavy", 30, 67, 100, 4), "B": ("congested", 8, 100, 75, 2), "C": ("freeFlow", 66, 41, 100, 5)},
    20: {"A": ("heavy", 20, 100, 50, 1), "B": ("congested", 15, 53, 90, 3), "C": ("unknown", 70, 38, 0, 0)},
}
LATER = {25: {"A": ("freeFlow", 44, 45, 100, 3), "B": ("congested", 9, 89, 60, 1), "C": ("freeFlow", 65, 41, 90, 2)}}


def payload(template: dict, minutes: int, states: dict[str, tuple]) -> bytes:
    """One exports/json snapshot of the three fixture segments, in the API's shape (local time)."""
    moment = (T0 + timedelta(minutes=minutes)).astimezone(datetime.fromisoformat("2024-08-26T00:00+02:00").tzinfo)
    records = []
    for index, (key, (status, speed, travel_time, reliability, probes)) in enumerate(sorted(states.items())):
        record = copy.deepcopy(template)
        first_point = GEOMETRY[key]["coordinates"][0]
        first_point = first_point[0] if isinstance(first_point[0], list) else first_point
        record.update(
            datetime=moment.isoformat(),
            predefinedlocationreference=key,
            denomination=ROAD[key],
            vitesse_maxi=LIMIT[key],
            trafficstatus=status,
            averagevehiclespeed=speed,
            traveltime=travel_time,
            traveltimereliability=reliability,
            vehicleprobemeasurement=probes,
            gml_id=f"fixture.{index}",
            id_rva_troncon_fcd_v1_1=index,
            geo_point_2d={"lon": first_point[0], "lat": first_point[1]},
            geo_shape={"type": "Feature", "geometry": GEOMETRY[key], "properties": {}},
        )
        records.append(record)
    return json.dumps(records).encode()


def samples(key: str, minutes: range | list[int], snapshots: dict = SNAPSHOTS) -> list[tuple]:
    return [snapshots[m][key] for m in minutes if m in snapshots]


def measured(rows: list[tuple]) -> list[tuple]:
    return [row for row in rows if row[0] != "unknown"]


def harmonic(speeds: list[float]) -> float:
    return len(speeds) / sum(1 / v for v in speeds)


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


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


@pytest.fixture
def fixture_lake(s3_settings, sample_bytes):
    """The four fixture snapshots landed and merged; returns a function landing more."""
    template = json.loads(sample_bytes)[0]

    def land(snapshots: dict) -> None:
        for minutes, states in snapshots.items():
            land_raw(s3_settings, payload(template, minutes, states))
        lake.merge_pending(s3_settings)

    land(SNAPSHOTS)
    return land


def road_expectation(keys: list[str], minutes: list[int], snapshots: dict = SNAPSHOTS) -> dict:
    """A road over some snapshots, averaged as road_traffic_15min's YAML says, computed by hand."""
    segment_rows = {key: samples(key, minutes, snapshots) for key in keys}
    measured_keys = [key for key in keys if measured(segment_rows[key])]
    hours_per_km = {key: mean([1 / row[1] for row in measured(segment_rows[key])]) for key in measured_keys}
    # A segment without a speed sample in the bucket counts at its limit: length / limit.
    travel_time = sum(
        mean([row[2] for row in measured(rows)]) if measured(rows) else LENGTH[key] / LIMIT[key] * 3.6
        for key, rows in segment_rows.items()
    )
    length = sum(LENGTH[key] for key in measured_keys)
    return {
        "direction": "both",
        "segment_count": len(keys),
        "measured_length_share": length / sum(LENGTH[k] for k in keys),
        "mean_speed_kmh": length / sum(LENGTH[k] * hours_per_km[k] for k in measured_keys) if measured_keys else None,
        "min_speed_kmh": min((r[1] for k in keys for r in measured(segment_rows[k])), default=None),
        "max_speed_kmh": max((r[1] for k in keys for r in measured(segment_rows[k])), default=None),
        "travel_time_s": float(travel_time),
        "mean_reliability_pct": (
            sum(LENGTH[k] * mean([r[3] for r in measured(segment_rows[k])]) for k in measured_keys) / length
            if measured_keys
            else None
        ),
        "sample_count": sum(len(measured(segment_rows[k])) for k in keys),
        "congested_share": (
            sum(
                LENGTH[k] * mean([r[0] in ("congested", "impossible") for r in measured(segment_rows[k])])
                for k in measured_keys
            )
            / length
            if measured_keys
            else None
        ),
    }


def test_every_mart_matches_hand_computed_values(fixture_lake, s3_settings) -> None:
    result = serving.build(s3_settings, serving_config(s3_settings))
    assert result.rows["segment_latest"] == 3
    marts = read_marts(result.serving_db)

    # segment_traffic_15min: harmonic mean speeds over measured samples; C's 08:15 bucket has none.
    segments = marts["segment_traffic_15min"]
    assert segments.height == 5
    assert segments.filter((pl.col("segment_key") == "C") & (pl.col("bucket_start") == BUCKET_1)).is_empty()
    for key, bucket, minutes in [("A", BUCKET_0, [0, 5, 10]), ("A", BUCKET_1, [20]), ("B", BUCKET_0, [0, 5, 10]),
                                 ("B", BUCKET_1, [20]), ("C", BUCKET_0, [0, 5, 10])]:  # fmt: skip
        rows = measured(samples(key, minutes))
        assert_close(
            row_of(segments, segment_key=key, bucket_start=bucket),
            {
                "road_name": ROAD[key],
                "mean_speed_kmh": harmonic([r[1] for r in rows]),
                "min_speed_kmh": min(r[1] for r in rows),
                "max_speed_kmh": max(r[1] for r in rows),
                "mean_travel_time_s": float(mean([r[2] for r in rows])),
                "mean_reliability_pct": float(mean([r[3] for r in rows])),
                "sample_count": len(rows),
                "congested_share": float(mean([r[0] == "congested" for r in rows])),
            },
        )
    # Worked once in numbers, so the formula above is not the only witness: A at 08:00 ran 45, 40, 30 km/h,
    # 3 / (1/45 + 1/40 + 1/30) = 3 / (29/360) = 1080/29 km/h (the arithmetic mean, 38.3, would overstate it).
    assert row_of(segments, segment_key="A", bucket_start=BUCKET_0)["mean_speed_kmh"] == pytest.approx(1080 / 29)

    # road_hour_of_week_profile: all four snapshots fall on Monday 10:00-11:00 in Rennes.
    profile = marts["road_hour_of_week_profile"]
    assert profile.select("road_name", "day_of_week", "hour_of_day").sort("road_name").rows() == [
        ("Avenue Beta", 1, 10),
        ("Rue Alpha", 1, 10),
    ]
    all_minutes = [0, 5, 10, 20]
    for road, keys in [("Rue Alpha", ["A", "B"]), ("Avenue Beta", ["C"])]:
        hand = road_expectation(keys, all_minutes)
        hours = {k: mean([1 / r[1] for r in measured(samples(k, all_minutes))]) for k in keys}
        ratio = sum(LENGTH[k] / LIMIT[k] for k in keys) / sum(LENGTH[k] * hours[k] for k in keys)
        assert_close(
            row_of(profile, road_name=road),
            {
                "typical_speed_kmh": hand["mean_speed_kmh"],
                "typical_travel_time_s": hand["travel_time_s"],
                "typical_speed_ratio": ratio,
                "sample_count": hand["sample_count"],
            },
        )
    typical = {row["road_name"]: row for row in profile.iter_rows(named=True)}

    # road_traffic_15min: space-mean speed, travel time summed along the road, typical values beside.
    roads = marts["road_traffic_15min"]
    assert roads.height == 4
    for road, keys, bucket, minutes in [("Rue Alpha", ["A", "B"], BUCKET_0, [0, 5, 10]),
                                        ("Rue Alpha", ["A", "B"], BUCKET_1, [20]),
                                        ("Avenue Beta", ["C"], BUCKET_0, [0, 5, 10]),
                                        ("Avenue Beta", ["C"], BUCKET_1, [20])]:  # fmt: skip
        expected = road_expectation(keys, minutes)
        expected |= {
            "typical_speed_kmh": typical[road]["typical_speed_kmh"],
            "typical_travel_time_s": typical[road]["typical_travel_time_s"],
        }
        assert_close(row_of(roads, road_name=road, direction="both", bucket_start=bucket), expected)
    # Beta at 08:15: C had no probe: no speed, and its travel time is the one at its limit, 742.6 m at 70 km/h.
    beta = row_of(roads, road_name="Avenue Beta", bucket_start=BUCKET_1)
    assert (beta["mean_speed_kmh"], beta["sample_count"]) == (None, 0)
    assert beta["travel_time_s"] == pytest.approx(LENGTH["C"] / (70 / 3.6))

    # road_traffic_hourly: one hour holding every snapshot, so it equals the profile here.
    hourly = marts["road_traffic_hourly"]
    assert hourly.height == 2
    for road, keys in [("Rue Alpha", ["A", "B"]), ("Avenue Beta", ["C"])]:
        assert_close(row_of(hourly, road_name=road, hour_start=T0), road_expectation(keys, all_minutes))

    # segment_latest: the 08:20 snapshot; C is unknown there, so it has no ratio and no comparison.
    latest = marts["segment_latest"]
    assert sorted(latest["segment_key"]) == ["A", "B", "C"]
    for key in "AB":
        status, speed, travel_time, reliability, probes = SNAPSHOTS[20][key]
        typical_speed = harmonic([r[1] for r in measured(samples(key, all_minutes))])
        assert_close(
            row_of(latest, segment_key=key),
            {
                "road_name": ROAD[key],
                "traffic_status": status,
                "speed_kmh": speed,
                "travel_time_s": travel_time,
                "reliability_pct": reliability,
                "probe_count": probes,
                "speed_limit_kmh": LIMIT[key],
                "measured_at": T0 + timedelta(minutes=20),
                "speed_ratio": speed / LIMIT[key],
                "is_closed": False,
                "free_flow_speed_kmh": LIMIT[key],  # no off-peak sample: the limit
                "free_flow_is_limit": True,
                "free_flow_speed_ratio": speed / LIMIT[key],
                "typical_speed_kmh": typical_speed,
                "speed_vs_typical_kmh": speed - typical_speed,
                "length_m": LENGTH[key],
                "insee": 35206,
            },
        )
    c = row_of(latest, segment_key="C")
    assert (c["traffic_status"], c["speed_kmh"]) == ("unknown", 70)
    assert (c["speed_ratio"], c["speed_vs_typical_kmh"]) == (None, None)
    assert c["typical_speed_kmh"] == pytest.approx(harmonic([60, 66]))
    assert json.loads(row_of(latest, segment_key="B")["path_json"]) == [
        [-1.68, 48.115], [-1.68, 48.117], [-1.68, 48.117], [-1.679, 48.117]
    ]  # fmt: skip
    assert json.loads(row_of(latest, segment_key="A")["path_json"]) == GEOMETRY["A"]["coordinates"]
    assert json.loads(row_of(latest, segment_key="B")["geometry_geojson"]) == GEOMETRY["B"]
    age = (datetime.now(UTC) - (T0 + timedelta(minutes=20))).total_seconds() / 60
    assert row_of(latest, segment_key="A")["minutes_since_update"] == pytest.approx(age, abs=10)

    # network_kpis_latest: A heavy, B congested, C unknown in the 08:20 snapshot.
    (kpis,) = marts["network_kpis_latest"].iter_rows(named=True)
    assert_close(
        kpis,
        {
            "measured_at": T0 + timedelta(minutes=20),
            "segments_reporting": 2,
            "segments_total": 3,
            "share_freeflow": 0.0,
            "share_heavy": 1 / 3,
            "share_congested": 1 / 3,
            "share_impossible": 0.0,
            "share_unknown": 1 / 3,
            "closed_segments": 0,
            "closed_km": 0.0,
            "mean_speed_ratio": (LENGTH["A"] / 50 + LENGTH["B"] / 30) / (LENGTH["A"] / 20 + LENGTH["B"] / 15),
        },
    )

    # congestion_events: B's one episode, from its first sample, ongoing at the latest snapshot (08:20).
    events = marts["congestion_events"].select(
        "segment_key", "road_name", "started_at", "last_congested_at", "ended_at", "is_ongoing", "worst_status",
        "sample_count", "duration_minutes",
    )  # fmt: skip
    assert events.rows() == [("B", "Rue Alpha", T0, T0 + timedelta(minutes=20), None, True, "congested", 4, 20.0)]


def test_incremental_build_after_a_new_snapshot_equals_a_full_refresh(fixture_lake, s3_settings) -> None:
    config = serving_config(s3_settings)
    serving.build(s3_settings, config)
    fixture_lake(LATER)  # 08:25: A back to freeFlow (a second change), C measured again
    serving.build(s3_settings, config)
    incremental = comparable(read_marts(config.serving_db))
    serving.build(s3_settings, config, full_refresh=True)
    assert_same_marts(incremental, comparable(read_marts(config.serving_db)))

    # The new snapshot really went through: B's episode goes on, now 25 minutes long.
    assert incremental["congestion_events"].select("segment_key", "started_at", "ended_at", "sample_count",
                                                   "duration_minutes").rows() == [
        ("B", T0, None, 5, 25.0),
    ]  # fmt: skip
    both = {**SNAPSHOTS, **LATER}
    alpha = row_of(incremental["road_traffic_15min"], road_name="Rue Alpha", bucket_start=BUCKET_1)
    assert_close(alpha, road_expectation(["A", "B"], [20, 25], both))
