"""Closures and road directions on hand-made snapshots, every expected value computed here by hand.

Five snapshots, 08:00 to 08:20 UTC on a Monday (10:xx in Rennes), statuses by minute (F freeFlow, H
heavy, C congested, I impossible; speeds in brackets):

    minute            0        5        10       15       20
    K1  Rue Fermée    F(40)    I        I        F(44)    F(42)
    K2  Rue Fermée    H(20)    H(18)    C(8)     H(22)    I
    K3  Av. Ouverte   F(60)    F(62)    F(64)    F(66)    F(68)
    N1_D Route Nord   F(80)    F(70)    ...                          one carriageway of a divided stretch
    N1_G Route Nord   F(85)    F(75)    ...                          the other one
    N2   Route Nord   H(30)    H(25)    ...                          an undivided stretch of the same road

Closures (status impossible, published at 0 km/h) enter no speed and no travel time; they are counted as
closed samples, closure minutes, closed segments and km, and closure episodes. Route Nord is a divided
road: direction D is N1_D + N2, direction G is N1_G + N2, each one trip; the two carriageways are never
added up. The undivided roads are one direction, `both`.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from tests.marts.fixtures import pipeline_settings
from tests.marts.handmade import HandmadeLake, Segment, assert_close, harmonic, mean, row_of, utc

pytestmark = pytest.mark.integration

T0 = utc(2024, 8, 26, 8)
B0, B1 = T0, T0 + timedelta(minutes=15)
K1 = Segment("K1", "Rue Fermée", 50, 48.100)
K2 = Segment("K2", "Rue Fermée", 30, 48.102)
K3 = Segment("K3", "Avenue Ouverte", 70, 48.104)
N1_D = Segment("N1_D", "Route Nord", 90, 48.106)
N1_G = Segment("N1_G", "Route Nord", 90, 48.1065)
N2 = Segment("N2", "Route Nord", 50, 48.108, lon_span=0.002)
CLOSED = ("impossible", 0, 0, 60, 1)


def at(minute: int):
    return T0 + timedelta(minutes=minute)


def sample(status: str, speed: int, travel_time: int) -> tuple:
    return (status, speed, travel_time, 90, 2)


# minute -> segment -> (status, speed, travel time, reliability, probes)
SNAPSHOTS = {
    0: {K1: sample("freeFlow", 40, 45), K2: sample("heavy", 20, 50), K3: sample("freeFlow", 60, 25),
        N1_D: sample("freeFlow", 80, 13), N1_G: sample("freeFlow", 85, 12), N2: sample("heavy", 30, 18)},
    5: {K1: CLOSED, K2: sample("heavy", 18, 55), K3: sample("freeFlow", 62, 24),
        N1_D: sample("freeFlow", 70, 15), N1_G: sample("freeFlow", 75, 14), N2: sample("heavy", 25, 22)},
    10: {K1: CLOSED, K2: sample("congested", 8, 125), K3: sample("freeFlow", 64, 23)},
    15: {K1: sample("freeFlow", 44, 41), K2: sample("heavy", 22, 45), K3: sample("freeFlow", 66, 22)},
    20: {K1: sample("freeFlow", 42, 43), K2: CLOSED, K3: sample("freeFlow", 68, 22)},
}  # fmt: skip


@pytest.fixture(scope="module")
def marts(s3_server, sample_bytes, tmp_path_factory):
    settings = pipeline_settings(s3_server, tmp_path_factory.mktemp("closures"))
    handmade = HandmadeLake(settings, sample_bytes)
    handmade.land({T0 + timedelta(minutes=m): states for m, states in SNAPSHOTS.items()})
    return handmade.build()


def test_closures_enter_no_speed_and_are_counted(marts) -> None:
    segments = marts["segment_traffic_15min"]
    # K1, 08:00-08:15: one speed sample (40 km/h, 45 s) and two closures. The old 1 km/h floor would have
    # made it 3 / (1/40 + 1 + 1) = 1.48 km/h.
    assert_close(
        row_of(segments, segment_key="K1", bucket_start=B0),
        {"mean_speed_kmh": 40.0, "mean_travel_time_s": 45.0, "sample_count": 1, "closed_sample_count": 2,
         "congested_share": 2 / 3, "closed_share": 2 / 3, "closed_minutes": 15 * 2 / 3},
    )  # fmt: skip
    # K2, 08:15-08:30: heavy at 22 km/h, then closed: half of its status samples.
    assert_close(
        row_of(segments, segment_key="K2", bucket_start=B1),
        {"mean_speed_kmh": 22.0, "mean_travel_time_s": 45.0, "sample_count": 1, "closed_sample_count": 1,
         "congested_share": 0.5, "closed_share": 0.5, "closed_minutes": 7.5},
    )  # fmt: skip

    # The road, 08:00-08:15: space-mean speed over K1 (40 km/h) and K2 (20, 18, 8 km/h), travel time
    # K1's 45 s plus K2's mean, shares weighted by length.
    l1, l2 = K1.length_m, K2.length_m
    k2_hours_per_km = mean([1 / 20, 1 / 18, 1 / 8])
    assert_close(
        row_of(marts["road_traffic_15min"], road_name="Rue Fermée", bucket_start=B0),
        {
            "direction": "both",
            "mean_speed_kmh": (l1 + l2) / (l1 / 40 + l2 * k2_hours_per_km),
            "travel_time_s": 45 + mean([50, 55, 125]),
            "sample_count": 4,
            "closed_sample_count": 2,
            "closed_share": (l1 * 2 / 3) / (l1 + l2),
            "congested_share": (l1 * 2 / 3 + l2 * 1 / 3) / (l1 + l2),
            "closed_segment_minutes": 10.0,
        },
    )
    # The hour: K1 closed 2 of its 5 samples, K2 1 of 5.
    k1_hour, k2_hour = mean([1 / 40, 1 / 44, 1 / 42]), mean([1 / 20, 1 / 18, 1 / 8, 1 / 22])
    assert_close(
        row_of(marts["road_traffic_hourly"], road_name="Rue Fermée", hour_start=T0),
        {
            "mean_speed_kmh": (l1 + l2) / (l1 * k1_hour + l2 * k2_hour),
            "travel_time_s": mean([45, 41, 43]) + mean([50, 55, 125, 45]),
            "closed_sample_count": 3,
            "closed_segment_minutes": 60 * 2 / 5 + 60 * 1 / 5,
        },
    )  # fmt: skip
    # The typical speed of the hour of the week leaves the closures out too.
    profile = row_of(marts["road_hour_of_week_profile"], road_name="Rue Fermée", day_of_week=1, hour_of_day=10)
    assert (profile["sample_count"], profile["closed_sample_count"]) == (7, 3)

    # Now (08:20): K2 is closed.
    latest = marts["segment_latest"]
    k2 = row_of(latest, segment_key="K2")
    assert (k2["is_closed"], k2["speed_ratio"], k2["free_flow_speed_ratio"], k2["speed_vs_typical_kmh"]) == (
        True, None, None, None,
    )  # fmt: skip
    assert row_of(latest, segment_key="K1")["is_closed"] is False
    (kpis,) = marts["network_kpis_latest"].iter_rows(named=True)
    # 08:20 holds K1, K2, K3 only (Route Nord reported at 0 and 5): 6 segments, 1 closed.
    assert_close(
        kpis,
        {"closed_segments": 1, "closed_km": l2 / 1000, "share_impossible": 1 / 6, "segments_reporting": 3,
         "mean_speed_ratio": (l1 / 50 + K3.length_m / 70) / (l1 / 42 + K3.length_m / 68)},
    )  # fmt: skip

    # Closure episodes: K1 closed at 5 and 10, cleared at 15; K2 congested at 10 (cleared at 15), then
    # closed at 20, the latest snapshot: ongoing.
    events = marts["congestion_events"].select(
        "segment_key", "started_at", "ended_at", "is_ongoing", "worst_status", "is_closure", "closed_sample_count"
    )
    assert sorted(events.rows()) == [
        ("K1", at(5), at(15), False, "impossible", True, 2),
        ("K2", at(10), at(15), False, "congested", False, 0),
        ("K2", at(20), None, True, "impossible", True, 1),
    ]


def test_a_divided_road_is_reported_per_direction_never_both_carriageways_added(marts) -> None:
    roads = marts["road_traffic_15min"]
    directions = sorted(set(roads.select("road_name", "direction").rows()))
    assert directions == [("Avenue Ouverte", "both"), ("Route Nord", "D"), ("Route Nord", "G"), ("Rue Fermée", "both")]

    n1d, n1g, n2 = N1_D.length_m, N1_G.length_m, N2.length_m
    expected = {
        # One carriageway plus the undivided stretch, driven either way.
        "D": {"segment_count": 2, "length_m": n1d + n2, "travel_time_s": mean([13, 15]) + mean([18, 22]),
              "mean_speed_kmh": (n1d + n2) / (n1d * mean([1 / 80, 1 / 70]) + n2 * mean([1 / 30, 1 / 25]))},
        "G": {"segment_count": 2, "length_m": n1g + n2, "travel_time_s": mean([12, 14]) + mean([18, 22]),
              "mean_speed_kmh": (n1g + n2) / (n1g * mean([1 / 85, 1 / 75]) + n2 * mean([1 / 30, 1 / 25]))},
    }  # fmt: skip
    for direction, values in expected.items():
        assert_close(row_of(roads, road_name="Route Nord", direction=direction, bucket_start=B0), values)
        assert_close(row_of(marts["road_traffic_hourly"], road_name="Route Nord", direction=direction,
                            hour_start=T0), values)  # fmt: skip
        typical = row_of(marts["road_hour_of_week_profile"], road_name="Route Nord", direction=direction)
        assert typical["typical_travel_time_s"] == pytest.approx(values["travel_time_s"])
        assert typical["typical_speed_kmh"] == pytest.approx(values["mean_speed_kmh"])

    latest = marts["segment_latest"]
    assert {row["segment_key"]: row["carriageway"] for row in latest.iter_rows(named=True)} == {
        "K1": None, "K2": None, "K3": None, "N1_D": "D", "N1_G": "G", "N2": None,
    }  # fmt: skip
    # The harmonic means of one segment still hold: N1_D over 80 and 70 km/h.
    assert row_of(marts["segment_traffic_15min"], segment_key="N1_D", bucket_start=B0)["mean_speed_kmh"] == (
        pytest.approx(harmonic([80, 70]))
    )
