"""Free-flow speeds and reliability indices on hand-made snapshots, around the autumn clock change.

Two segments of one undivided road, a snapshot every 15 minutes from Saturday 2024-10-26 21:45 UTC (23:45
in Rennes) to Sunday 2024-10-27 23:00 UTC (00:00 on Monday in Rennes): Sunday the 27th is the day the
clocks go back (03:00 CEST -> 02:00 CET), a Rennes day of 25 hours (100 buckets), with local 02:00 twice.
Then Monday morning's peak, 07:00-10:00 local (06:00-09:00 UTC).

- R1 (limit 70) is measured throughout: 60 to 72 km/h at night (the off-peak hours, 22:00-06:00 local),
  45 km/h at 08-10 and 17-19 local, 55 otherwise. Its free-flow speed is the 85th percentile of its night
  speeds (nearest rank), computed here.
- R2 (limit 50) has no probe at night but for 5 samples: too few (< 30), so its free-flow speed is its
  limit, flagged. Without a speed sample, its travel time counts at its limit.

Everything expected is computed in this file from the same samples.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta

import pytest

from tests.marts.fixtures import pipeline_settings
from tests.marts.handmade import PARIS, HandmadeLake, Segment, assert_close, mean, percentile_linear, row_of, utc

pytestmark = pytest.mark.integration

R1 = Segment("R1", "Boulevard Test", 70, 48.110)
R2 = Segment("R2", "Boulevard Test", 50, 48.112, lon_span=0.003)
START = utc(2024, 10, 26, 21, 45)
NIGHT = utc(2024, 10, 27, 23, 0)  # the last snapshot of the run: 00:00 on Monday in Rennes
SUNDAY = [START + timedelta(minutes=15 * k) for k in range(102)]  # 21:45 UTC on the 26th to 23:00 on the 27th
MONDAY_PEAK = [utc(2024, 10, 28, 6) + timedelta(minutes=15 * k) for k in range(12)]  # 07:00-09:45 local
R2_NIGHT_PROBES = set(SUNDAY[93:98])  # 5 night samples of R2 (21:00-22:00 UTC on the 27th: 22:00-23:00 local)
OFF_PEAK = {22, 23, 0, 1, 2, 3, 4, 5}


def local_hour(moment: datetime) -> int:
    return moment.astimezone(PARIS).hour


def speed_of(segment: Segment, index: int, moment: datetime) -> int | None:
    """The speed sample of a segment at a snapshot; None when it has no probe (unknown)."""
    hour = local_hour(moment)
    busy = hour in (8, 9, 17, 18)
    if segment is R1:
        return 60 + 2 * (index % 7) if hour in OFF_PEAK else (45 if busy else 55)
    if hour in OFF_PEAK:
        return 48 if moment in R2_NIGHT_PROBES else None
    return 30 if busy else 40


def travel_time_of(segment: Segment, speed: int) -> int:
    return max(1, round(segment.length_m / (speed / 3.6)))


def samples() -> dict[datetime, dict[Segment, tuple]]:
    """moment -> segment -> (status, speed, travel time, reliability, probes)."""
    snapshots = {}
    for index, moment in enumerate(SUNDAY + MONDAY_PEAK):
        states = {}
        for segment in (R1, R2):
            speed = speed_of(segment, index, moment)
            if speed is None:
                states[segment] = ("unknown", segment.limit, travel_time_of(segment, segment.limit), 0, 0)
            else:
                status = "freeFlow" if 10 * speed >= 7 * segment.limit else "heavy"
                states[segment] = (status, speed, travel_time_of(segment, speed), 90, 2)
        snapshots[moment] = states
    return snapshots


SAMPLES = samples()


def measured(segment: Segment, moments: list[datetime]) -> list[tuple]:
    return [SAMPLES[m][segment] for m in moments if m in SAMPLES and SAMPLES[m][segment][0] != "unknown"]


def segment_travel_time(segment: Segment, moments: list[datetime]) -> float:
    """A segment over some snapshots: its mean travel time over speed samples, else at its limit."""
    rows = measured(segment, moments)
    return mean([row[2] for row in rows]) if rows else segment.length_m / segment.limit * 3.6


def nearest_rank(values: list[int], percent: int) -> int:
    """The smallest value that at least `percent` % of the values do not exceed."""
    ordered = sorted(values)
    return ordered[math.ceil(percent / 100 * len(ordered)) - 1]


@pytest.fixture(scope="module")
def marts(s3_server, sample_bytes, tmp_path_factory):
    settings = pipeline_settings(s3_server, tmp_path_factory.mktemp("reliability"))
    handmade = HandmadeLake(settings, sample_bytes)
    handmade.land(SAMPLES)
    return handmade.build()


def free_flow() -> dict[str, tuple]:
    night = [m for m in SAMPLES if local_hour(m) in OFF_PEAK]
    r1_night = [row[1] for row in measured(R1, night)]
    r2_night = [row[1] for row in measured(R2, night)]
    assert (len(r1_night), len(r2_night)) == (38, 5)  # 1 + 28 + 8 + 1 night snapshots; R2's 5 probes
    return {"R1": (nearest_rank(r1_night, 85), len(r1_night), False), "R2": (R2.limit, len(r2_night), True)}


def test_free_flow_speed_is_the_off_peak_85th_percentile_or_the_limit(marts) -> None:
    expected = free_flow()
    for segment in (R1, R2):
        speed, count, fallback = expected[segment.key]
        assert_close(
            row_of(marts["segment_free_flow"], segment_key=segment.key),
            {"free_flow_speed_kmh": speed, "off_peak_sample_count": count, "is_limit_fallback": fallback,
             "free_flow_travel_time_s": segment.length_m / speed * 3.6},
        )  # fmt: skip
    # R1's night speeds cycle through 60..72: 38 samples, the 33rd smallest (ceil(0.85 x 38)) is 70.
    assert expected["R1"][0] == 70


def test_daily_reliability_over_a_25_hour_rennes_day(marts) -> None:
    speeds = free_flow()
    free_flow_s = sum(s.length_m / speeds[s.key][0] * 3.6 for s in (R1, R2))
    days = marts["road_reliability_daily"]
    assert sorted(days["local_date"].cast(str).to_list()) == ["2024-10-26", "2024-10-27", "2024-10-28"]

    # Sunday the 27th in Rennes: 22:00 UTC on the 26th to 23:00 UTC on the 27th, 25 hours, 100 buckets.
    day = [m for m in SUNDAY if m.astimezone(PARIS).date().isoformat() == "2024-10-27"]
    assert (len(day), day[0], day[-1]) == (100, utc(2024, 10, 26, 22), utc(2024, 10, 27, 22, 45))
    buckets = [segment_travel_time(R1, [m]) + segment_travel_time(R2, [m]) for m in day]
    hours = [day[i : i + 4] for i in range(0, 100, 4)]
    hourly = [segment_travel_time(R1, h) + segment_travel_time(R2, h) for h in hours]
    average, p95 = mean(buckets), percentile_linear(buckets, 0.95)
    assert_close(
        row_of(days, road_name="Boulevard Test", direction="both", local_date=day[0].astimezone(PARIS).date()),
        {
            "day_of_week": 7,
            "bucket_count": 100,
            "hours_with_data": 25,
            "mean_travel_time_s": average,
            "p95_travel_time_s": p95,
            "free_flow_travel_time_s": free_flow_s,
            "free_flow_limit_share": R2.length_m / (R1.length_m + R2.length_m),
            "travel_time_index": average / free_flow_s,
            "planning_time_index": p95 / free_flow_s,
            "buffer_index": (p95 - average) / average,
            "peak_bucket_count": 0,  # a Sunday: no weekday peak
            "peak_travel_time_index": None,
            "congested_hours": sum(1 for t in hourly if 0.9 * t > free_flow_s),
        },
    )
    # The local day boundaries: 23:45 on Saturday alone, then Monday's midnight and morning peak.
    saturday = row_of(days, local_date=START.astimezone(PARIS).date())
    assert saturday["bucket_count"] == 1
    monday = row_of(days, local_date=NIGHT.astimezone(PARIS).date())
    peak = [segment_travel_time(R1, [m]) + segment_travel_time(R2, [m]) for m in MONDAY_PEAK]
    assert_close(
        monday,
        {"bucket_count": 13, "peak_bucket_count": 12,
         "peak_travel_time_index": mean(peak) / free_flow_s,
         "peak_planning_time_index": percentile_linear(peak, 0.95) / free_flow_s,
         "peak_buffer_index": (percentile_linear(peak, 0.95) - mean(peak)) / mean(peak)},
    )  # fmt: skip


def test_the_repeated_hour_and_the_network_congestion_level(marts) -> None:
    # Local 02:00 on the 27th happens twice (00:00 and 01:00 UTC): one hour of the week, both hours' samples.
    twice = [m for m in SUNDAY if m.astimezone(PARIS).date().isoformat() == "2024-10-27" and local_hour(m) == 2]
    assert len(twice) == 8
    profile = row_of(marts["road_hour_of_week_profile"], road_name="Boulevard Test", day_of_week=7, hour_of_day=2)
    assert profile["sample_count"] == len(measured(R1, twice)) + len(measured(R2, twice)) == 8
    r1_hours = mean([1 / row[1] for row in measured(R1, twice)])
    assert profile["typical_speed_kmh"] == pytest.approx(1 / r1_hours)

    # Every hour with a speed sample has its level; 09:00 local on Sunday (08:00 UTC): both segments measured.
    speeds = free_flow()
    hour = [utc(2024, 10, 27, 8) + timedelta(minutes=15 * k) for k in range(4)]
    travel = segment_travel_time(R1, hour) + segment_travel_time(R2, hour)
    free = sum(s.length_m / speeds[s.key][0] * 3.6 for s in (R1, R2))
    levels = marts["network_congestion_hourly"]
    assert_close(
        row_of(levels, hour_start=hour[0]),
        {"local_date": hour[0].astimezone(PARIS).date(), "day_of_week": 7, "hour_of_day": 9, "measured_segments": 2,
         "travel_time_s": travel, "free_flow_travel_time_s": free, "congestion_level": travel / free - 1},
    )  # fmt: skip
    # 03:00 UTC (04:00 local): R2 has no probe, only R1 counts.
    night = [utc(2024, 10, 27, 3) + timedelta(minutes=15 * k) for k in range(4)]
    r1_free = R1.length_m / speeds["R1"][0] * 3.6
    assert_close(
        row_of(levels, hour_start=night[0]),
        {"measured_segments": 1, "congestion_level": segment_travel_time(R1, night) / r1_free - 1},
    )
    hours_with_samples = {m.replace(minute=0) for m in SAMPLES if measured(R1, [m]) or measured(R2, [m])}
    assert levels.height == len(hours_with_samples)
