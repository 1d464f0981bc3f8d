"""The demo's simulated history (`trafficwatch_dev.history`): its plan, its snapshots (what the feed serves, byte for
byte) and the plausibility of the simulator's traffic over two weeks, computed from generated snapshots."""

from __future__ import annotations

import gzip
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from urllib.request import urlopen
from zoneinfo import ZoneInfo

import pytest

from trafficwatch.config import ConfigError
from trafficwatch.payloads import normalize_payload
from trafficwatch.raw import raw_key
from trafficwatch_dev import history
from trafficwatch_dev.api import EXPORTS_PATH
from trafficwatch_dev.feed import FeedConfig, start_in_thread
from trafficwatch_dev.simulator import Simulator
from trafficwatch_dev.snapshots import DEFAULT_BASE, load_snapshot

PARIS = ZoneInfo("Europe/Paris")
FORTNIGHT_START = datetime(2026, 11, 2, tzinfo=PARIS)  # a Monday, local midnight
MEASURED = ("freeFlow", "heavy", "congested")


@pytest.fixture(scope="module")
def simulator() -> Simulator:
    return Simulator(load_snapshot(DEFAULT_BASE), seed=0, origin=FORTNIGHT_START, interval_s=180)


# --------------------------------------------------------------------------------------------------
# The plan and the settings


def test_days_come_from_demo_history_days() -> None:
    assert history.days_from_env({}) == 14
    assert history.days_from_env({"DEMO_HISTORY_DAYS": ""}) == 14
    assert history.days_from_env({"DEMO_HISTORY_DAYS": "0"}) == 0
    assert history.days_from_env({"DEMO_HISTORY_DAYS": " 3 "}) == 3
    for bad in ("two", "-1", "1.5", "400"):
        with pytest.raises(ConfigError, match="DEMO_HISTORY_DAYS"):
            history.days_from_env({"DEMO_HISTORY_DAYS": bad})


def test_the_plan_ends_where_the_live_data_starts_and_runs_newest_first() -> None:
    now = datetime(2026, 11, 30, 12, 4, 31, tzinfo=UTC)
    plan = history.Plan.before(now, days=2)
    assert plan.end == datetime(2026, 11, 30, 12, 3, tzinfo=UTC)  # floored to the 3-minute cadence
    assert (plan.per_day, plan.total) == (480, 960)
    newest, older = plan.day(0), plan.day(1)
    assert newest[0] == plan.end - timedelta(minutes=3) and newest[-1] == plan.end - timedelta(days=1)
    assert older[0] == newest[-1] - timedelta(minutes=3) and older[-1] == plan.start
    times = newest + older
    assert times == sorted(times, reverse=True) and len({raw_key(t) for t in times}) == 960
    assert all(t.second == 0 and t.minute % 3 == 0 for t in times)
    # The same instant later in the same 3 minutes plans the same keys: a rerun finds them landed.
    assert history.Plan.before(now + timedelta(seconds=80), days=2) == plan


# --------------------------------------------------------------------------------------------------
# A history snapshot is what the feed serves for that minute


def test_a_history_snapshot_is_the_feeds_answer_byte_for_byte(simulator: Simulator) -> None:
    moment = datetime(2026, 11, 10, 7, 57, tzinfo=UTC)
    server = start_in_thread(FeedConfig(port=0, start=moment, interval_s=180, speed=1e-9))
    try:
        with urlopen(server.url + EXPORTS_PATH, timeout=30) as response:
            served = response.read()
    finally:
        server.close()
    body = simulator.exports_body(moment)
    assert body == served
    snapshot = normalize_payload(body)
    assert (snapshot.measured_at, snapshot.record_count) == (moment, 2859)
    assert snapshot.upstream_datetime == moment.astimezone(PARIS).isoformat()


def test_the_history_is_deterministic_by_seed(simulator: Simulator) -> None:
    moment = datetime(2026, 11, 4, 17, 30, tzinfo=UTC)
    again = Simulator(load_snapshot(DEFAULT_BASE), seed=0, origin=moment, interval_s=60)
    other = Simulator(load_snapshot(DEFAULT_BASE), seed=1, origin=moment, interval_s=60)
    assert again.exports_body(moment) == simulator.exports_body(moment)
    assert other.exports_body(moment) != simulator.exports_body(moment)


# --------------------------------------------------------------------------------------------------
# Plausibility over two weeks (one snapshot an hour, Rennes time)


def _fortnight(simulator: Simulator) -> Iterator[tuple[datetime, list[dict]]]:
    for hour in range(14 * 24):
        local = (FORTNIGHT_START.astimezone(UTC) + timedelta(hours=hour)).astimezone(PARIS)
        rows = []
        for seg, (speed, _, _, status, probes) in zip(simulator.segments, simulator.measures(local), strict=True):
            rows.append({"key": seg.record["predefinedlocationreference"], "limit": seg.limit, "speed": speed,
                         "status": status, "probes": probes})  # fmt: skip
        yield local, rows


@pytest.fixture(scope="module")
def fortnight(simulator: Simulator) -> dict[datetime, list[dict]]:
    return dict(_fortnight(simulator))


def _mean_ratio(rows: list[dict]) -> float:
    return statistics.mean(r["speed"] / r["limit"] for r in rows if r["status"] in MEASURED)


def _share(rows: list[dict], statuses: tuple[str, ...]) -> float:
    return sum(r["status"] in statuses for r in rows) / len(rows)


def _at(fortnight: dict[datetime, list[dict]], weekdays: range, hour: int) -> list[list[dict]]:
    return [rows for local, rows in fortnight.items() if local.weekday() in weekdays and local.hour == hour]


def test_weekday_mornings_are_slower_than_nights(fortnight) -> None:
    for morning, night in zip(_at(fortnight, range(5), 8), _at(fortnight, range(5), 3), strict=True):
        assert _mean_ratio(morning) < _mean_ratio(night) - 0.2
        assert _share(morning, ("congested", "impossible")) > 0.05


def test_quiet_nights_have_many_unknown(fortnight) -> None:
    for night, noon in zip(_at(fortnight, range(7), 3), _at(fortnight, range(7), 12), strict=True):
        assert _share(night, ("unknown",)) > 0.6
        assert _share(night, ("unknown",)) > 2 * _share(noon, ("unknown",))


def test_weekend_peaks_are_milder(fortnight) -> None:
    weekday_peak = min(_mean_ratio(rows) for rows in _at(fortnight, range(5), 8))
    weekday_congested = min(_share(rows, ("congested",)) for rows in _at(fortnight, range(5), 8))
    weekend = [rows for local, rows in fortnight.items() if local.weekday() >= 5]
    assert min(_mean_ratio(rows) for rows in weekend) > weekday_peak + 0.05
    assert max(_share(rows, ("congested",)) for rows in weekend) < weekday_congested / 2


def test_a_few_incidents_and_closures(fortnight) -> None:
    closed = Counter()  # closed segments per Rennes day, as hourly snapshots see them
    night_works = 0
    for local, rows in fortnight.items():
        closures = [r for r in rows if r["status"] == "impossible"]
        closed[local.date()] += len(closures)
        night_works += len(closures) if local.hour in (0, 1, 2, 3, 4) else 0
        assert len(closures) < 20  # a few, never a network-wide failure
        assert all(r["probes"] > 0 for r in closures)  # a closure is reported, not unknown
    total = sum(closed.values())
    assert 0 < total < 0.002 * 14 * 24 * 2859
    assert sum(1 for count in closed.values() if count) >= 10  # most days have some
    assert night_works > 0  # planned night works, beside the incidents


def test_per_segment_free_flow_speeds_are_stable_across_days(fortnight) -> None:
    night_speeds: dict[tuple[str, int], list[int]] = defaultdict(list)  # (segment, week) -> measured night speeds
    for local, rows in fortnight.items():
        if local.hour >= 22 or local.hour < 6:
            week = (local - FORTNIGHT_START).days // 7
            for r in rows:
                if r["status"] in MEASURED:
                    night_speeds[(r["key"], week)].append(r["speed"])

    def p85(values: list[int]) -> float:
        return statistics.quantiles(values, n=20, method="inclusive")[16]

    both = [key for key, _ in night_speeds if _ == 0 and len(night_speeds[(key, 0)]) >= 5
            and len(night_speeds.get((key, 1), [])) >= 5]  # fmt: skip
    assert len(both) > 300
    stable = [key for key in both if abs(p85(night_speeds[(key, 1)]) / p85(night_speeds[(key, 0)]) - 1) <= 0.05]
    assert len(stable) >= 0.95 * len(both)


# --------------------------------------------------------------------------------------------------
# Seeding (moto S3): idempotent, and paced by the merge


def test_seeding_waits_for_the_merge_and_a_second_run_lands_nothing(s3, tmp_path, monkeypatch) -> None:
    from dataclasses import replace

    from tests.unit.conftest import BUCKET
    from trafficwatch.config import load_settings

    settings = replace(load_settings(), home=tmp_path, bucket=BUCKET)
    monkeypatch.setattr(history.time, "sleep", lambda seconds: None)
    counts = iter([9, 8, 4, 5, 4])  # what the worker says is pending before day 2, then before day 3
    asked: list[int] = []
    relisted: list[int] = []

    def pending(_settings) -> int:
        asked.append(next(counts))
        return asked[-1]

    now, cadence = datetime(2026, 11, 30, 12, 0, tzinfo=UTC), timedelta(hours=6)  # 4 snapshots a day
    progress = history.seed(settings, 3, now=now, cadence=cadence, s3=s3, relist=relisted.append, pending=pending)
    assert (progress.snapshots_landed, progress.days_done, len(relisted)) == (12, 3, 3)
    assert asked == [9, 8, 4, 5, 4]  # day 2 waited until a day (4) at most was pending; day 3 likewise
    keys = sorted(item["Key"] for item in s3.list_objects_v2(Bucket=BUCKET)["Contents"])
    assert keys == sorted(raw_key(now - k * cadence) for k in range(1, 13))
    stored = s3.get_object(Bucket=BUCKET, Key=keys[0])
    assert stored["Metadata"]["source-url"].startswith("simulator seed 0")
    assert normalize_payload(gzip.decompress(stored["Body"].read())).record_count == 2859

    # Without a worker (pending says None) nothing waits; every key is there already: nothing lands.
    again = history.seed(settings, 3, now=now, cadence=cadence, s3=s3, relist=relisted.append, pending=lambda _: None)
    assert (again.snapshots_landed, again.snapshots_present, len(relisted)) == (0, 12, 3)
    assert history.status_line(settings).startswith("history: done, 3 days")
