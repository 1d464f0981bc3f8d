"""The typical week (road_hour_of_week_profile) after incremental builds equals a full refresh, also when the
network it groups and weighs segments by changes: a road renamed, a speed limit changed, a new segment.

Hand-made snapshots on four local days; after each step an incremental build, then a full refresh of the
same warehouse, and every serving table of the two must be equal. The profile is rebuilt whole from the
incremental sums per segment and hour of the week, with the current network: an old hour counts a renamed
segment under its new name.
"""

from __future__ import annotations

import pytest

from tests.marts.fixtures import assert_same_marts, comparable, pipeline_settings
from tests.marts.handmade import HandmadeLake, Segment, row_of, utc
from trafficwatch.errors import DataTestsFailed

pytestmark = pytest.mark.integration

S1 = Segment("S1", "Rue Simple", 50, 48.110)
S2 = Segment("S2", "Rue Simple", 30, 48.112)
N_D = Segment("N_D", "Route Nord", 90, 48.114)
N_G = Segment("N_G", "Route Nord", 90, 48.1145)
N2 = Segment("N2", "Route Nord", 50, 48.116)
S1_RENAMED = Segment("S1", "Rue Renommée", 50, 48.110)
S2_SLOWER = Segment("S2", "Rue Simple", 20, 48.112)
S3 = Segment("S3", "Rue Simple", 50, 48.118)


def sample(speed: int) -> tuple:
    return ("freeFlow", speed, 30, 90, 2)


def network(*segments: Segment, speed: int = 40) -> dict[Segment, tuple]:
    return {segment: sample(speed + index) for index, segment in enumerate(segments)}


# Each step: snapshots (UTC) merged, then one build. Monday 08:00 UTC is 10:00 in Rennes.
ALL = (S1, S2, N_D, N_G, N2)
LATER = (S1_RENAMED, S2_SLOWER, N_D, N_G, N2)
STEPS = [
    ("first snapshots", {utc(2024, 8, 26, 8, m): network(*ALL) for m in (0, 5)}),
    ("a new hour, network unchanged", {utc(2024, 8, 27, 9): network(*ALL, speed=30)}),
    ("S1 renamed, S2's limit lowered", {utc(2024, 8, 28, 9): network(*LATER)}),
    ("the same hour again, network unchanged", {utc(2024, 8, 28, 9, 5): network(*LATER)}),
    ("a new segment on Rue Simple", {utc(2024, 8, 29, 7): network(*LATER, S3)}),
    ("an old hour again", {utc(2024, 8, 26, 8, 10): network(*LATER, S3)}),
]  # fmt: skip


def test_an_incremental_profile_equals_a_full_refresh_as_the_network_changes(s3_server, sample_bytes, tmp_path) -> None:
    handmade = HandmadeLake(pipeline_settings(s3_server, tmp_path), sample_bytes)
    for step, snapshots in STEPS:
        handmade.land(snapshots)
        incremental = comparable(handmade.build())
        full = comparable(handmade.build(full_refresh=True))
        assert_same_marts(incremental, full)  # every mart, the profile among them
        profile = incremental["road_hour_of_week_profile"]
        assert profile.height > 0, step

    # The renamed segment's old hours count under its current name; Route Nord is one trip per direction.
    monday = row_of(profile, road_name="Rue Renommée", direction="both", day_of_week=1, hour_of_day=10)
    assert monday["sample_count"] == 3
    directions = set(profile.filter(road_name="Route Nord", day_of_week=1, hour_of_day=10)["direction"])
    assert directions == {"D", "G"}


@pytest.mark.xfail(
    strict=True,
    raises=DataTestsFailed,
    reason="known defect: road_reliability_daily divides a past day's travel time (its road directions as they "
    "were that day) by the free-flow travel time of the road's directions in the current network; a road that "
    "became divided has no current 'both' direction, so its past days get a null index and the guard fails",
)
def test_a_road_that_becomes_divided_keeps_the_reliability_of_its_past_days(s3_server, sample_bytes, tmp_path) -> None:
    handmade = HandmadeLake(pipeline_settings(s3_server, tmp_path), sample_bytes)
    handmade.land({utc(2024, 8, 26, 8, m): network(S1, S2) for m in (0, 5)})
    handmade.build()
    handmade.land({utc(2024, 8, 27, 8): network(S1, S2, Segment("S4_D", "Rue Simple", 50, 48.120))})
    marts = handmade.build(full_refresh=True)
    monday = row_of(marts["road_reliability_daily"], road_name="Rue Simple", direction="both")
    assert monday["travel_time_index"] is not None
