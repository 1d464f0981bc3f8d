"""Congestion episodes, as docs/traffic-measures.md defines them, on hand-made snapshots.

Eight snapshots, 08:00 to 08:35 UTC every 5 minutes; the episode gap is 15 minutes (var
episode_gap_minutes). One segment per rule, its statuses by minute (F freeFlow, H heavy, C congested,
I impossible, U unknown, - no row at all):

    minute        0   5  10  15  20  25  30  35
    short_gap     F   C   C   U   U   C   F   F    C at 10 and 25: 15 minutes apart, one episode, cleared at 30
    long_gap      F   C   U   U   U   -   C   F    C at 5 and 30: 25 minutes apart, two episodes
    worst         C   I   C   F   F   F   F   F    congested and impossible: one episode, from the first sample
    ongoing       F   F   F   F   F   F   C   C    still running at the latest snapshot
    ends_in_gap   C   C   U   U   U   U   U   U    nothing measured for 30 minutes: ended at its last minute
    late_clear    C   U   U   U   U   F   F   F    the clearing sample comes 25 minutes later: a gap, not a clear
    heavy_only    F   H   H   F   F   F   F   F    heavy is not congested: no episode

Then a late snapshot at 08:17 (long_gap alone) fills long_gap's gap with a congested minute (C at 5, 17,
30: never more than 15 minutes apart), merging its two episodes into one: the incremental build must say
so, as a full refresh does.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from tests.marts.fixtures import assert_same_marts, comparable
from tests.marts.handmade import HandmadeLake, Segment, utc

pytestmark = pytest.mark.integration

T0 = utc(2024, 8, 26, 8)
STATES = {"F": ("freeFlow", 45, 30, 100, 3), "H": ("heavy", 25, 54, 90, 2), "C": ("congested", 10, 135, 75, 2),
          "I": ("impossible", 0, 0, 60, 1), "U": ("unknown", 50, 27, 0, 0)}  # fmt: skip
TIMELINES = {
    "short_gap": "F C C U U C F F",
    "long_gap": "F C U U U - C F",
    "worst": "C I C F F F F F",
    "ongoing": "F F F F F F C C",
    "ends_in_gap": "C C U U U U U U",
    "late_clear": "C U U U U F F F",
    "heavy_only": "F H H F F F F F",
}
SEGMENTS = {name: Segment(name, "Rue des Épisodes", 50, 48.10 + 0.001 * i) for i, name in enumerate(TIMELINES)}


def at(minute: int):
    return T0 + timedelta(minutes=minute)


def snapshots() -> dict:
    moments = {}
    for name, timeline in TIMELINES.items():
        for index, letter in enumerate(timeline.split()):
            if letter != "-":
                moments.setdefault(at(5 * index), {})[SEGMENTS[name]] = STATES[letter]
    return moments


def episodes(marts) -> list[tuple]:
    columns = ("segment_key", "started_at", "last_congested_at", "ended_at", "end_reason", "is_ongoing",
               "worst_status", "sample_count", "closed_sample_count", "duration_minutes")  # fmt: skip
    return sorted(marts["congestion_events"].select(columns).rows())


@pytest.mark.timeout(1200)
def test_episodes_follow_the_documented_rules_and_late_minutes_merge_them(s3_settings, sample_bytes) -> None:
    handmade = HandmadeLake(s3_settings, sample_bytes)
    handmade.land(snapshots())
    marts = handmade.build()

    # By hand, from the timelines above (latest snapshot: 08:35).
    assert episodes(marts) == sorted([
        # C at 5, 10, 25 (15 minutes from 10: the gap is not longer than 15), cleared by F at 30.
        ("short_gap", at(5), at(25), at(30), "cleared", False, "congested", 3, 0, 25.0),
        # C at 5, then nothing measured until C at 30: 25 > 15 minutes, so the first ends at its last minute.
        ("long_gap", at(5), at(5), at(5), "gap", False, "congested", 1, 0, 0.0),
        ("long_gap", at(30), at(30), at(35), "cleared", False, "congested", 1, 0, 5.0),
        # From the very first sample; impossible at 5 keeps the worst status; cleared by F at 15.
        ("worst", at(0), at(10), at(15), "cleared", False, "impossible", 3, 1, 15.0),
        # Congested at 30 and 35, the latest snapshot: ongoing, lasting so far 5 minutes.
        ("ongoing", at(30), at(35), None, None, True, "congested", 2, 0, 5.0),
        # Last measured at 5; 30 minutes without a measurement by 08:35: ended at 5.
        ("ends_in_gap", at(0), at(5), at(5), "gap", False, "congested", 2, 0, 5.0),
        # F comes 25 minutes after the last C: the gap ended it at 0, the F does not clear it.
        ("late_clear", at(0), at(0), at(0), "gap", False, "congested", 1, 0, 0.0),
    ])  # fmt: skip
    closures = marts["congestion_events"].filter("is_closure")
    assert closures["segment_key"].to_list() == ["worst"]

    before = episodes(marts)

    # A late congested minute at 08:17 for long_gap: C at 5, 17, 30, each within 15 minutes of the next.
    handmade.land({at(17): {SEGMENTS["long_gap"]: STATES["C"]}})
    marts = handmade.build()
    long_gap = [row for row in episodes(marts) if row[0] == "long_gap"]
    assert long_gap == [("long_gap", at(5), at(30), at(35), "cleared", False, "congested", 3, 0, 30.0)]
    # Every other episode as before, and every mart as a full refresh gives it.
    assert [row for row in episodes(marts) if row[0] != "long_gap"] == [row for row in before if row[0] != "long_gap"]
    assert_same_marts(comparable(marts), comparable(handmade.build(full_refresh=True)))
