"""Small snapshots cut from the real sample, and the poison objects and answers of the fault-injection suite.

Snapshots keep the first `RECORDS` records of the real sample (2024-08-26T12:43:00+02:00), re-dated
`minute` minutes later, so that a merge of a few of them costs well under a second. Each poison has its
own minute, so the good rows of one never stand for another's.
"""

from __future__ import annotations

import copy
import gzip
import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

RECORDS = 40
# Below RECORDS (small snapshots are not partial), above 1 (a one-record snapshot is).
MIN_RECORDS = 10
SAMPLE_DATETIME = datetime.fromisoformat("2024-08-26T12:43:00+02:00")
RENAMED_ROAD = "Rocade Ouest (renommée)"

Changes = dict[int, dict[str, Any]]  # record index -> field -> new value


def base_records(sample_bytes: bytes, count: int = RECORDS) -> list[dict[str, Any]]:
    return json.loads(sample_bytes)[:count]


def moment(minute: int) -> datetime:
    return SAMPLE_DATETIME + timedelta(minutes=minute)


def records_at(records: list[dict[str, Any]], minute: int, changes: Changes | None = None) -> list[dict[str, Any]]:
    """A deep copy of `records` re-dated `minute` minutes after the sample, with `changes[i]` applied to
    record i (field -> value), and the speeds nudged so that two snapshots never hold the same numbers."""
    out = copy.deepcopy(records)
    stamp = moment(minute).isoformat()
    for index, record in enumerate(out):
        record["datetime"] = stamp
        record["averagevehiclespeed"] = max(0, record["averagevehiclespeed"] - minute % 5)
        record.update((changes or {}).get(index, {}))
    return out


def snapshot(records: list[dict[str, Any]], minute: int, changes: Changes | None = None) -> bytes:
    """An exports/json answer (a bare array), as bytes."""
    return json.dumps(records_at(records, minute, changes)).encode()


@dataclass(frozen=True)
class Snapshot:
    key: str  # where the ingest would land it
    payload: bytes  # the exports/json answer

    @property
    def stored(self) -> bytes:
        return gz(self.payload)


def snapshot_at(records: list[dict[str, Any]], minute: int, changes: Changes | None = None) -> Snapshot:
    return Snapshot(raw_key_at(moment(minute)), snapshot(records, minute, changes))


def good_snapshots(sample_bytes: bytes) -> list[Snapshot]:
    """Three snapshots 3 minutes apart; from the second on, record 5's segment has another road name, and
    in the second only, record 6's has another speed limit (its versions go A, B, A)."""
    records = base_records(sample_bytes)
    renamed = {5: {"denomination": RENAMED_ROAD}}
    return [
        snapshot_at(records, 0),
        snapshot_at(records, 3, {**renamed, 6: {"vitesse_maxi": 110}}),
        snapshot_at(records, 6, renamed),
    ]


def raw_key_at(when: datetime) -> str:
    """The raw key the ingest would use, with four-digit years (strftime drops the zeros of year 1)."""
    utc = when.astimezone(UTC)
    day = f"{utc.year:04d}-{utc.month:02d}-{utc.day:02d}"
    stamp = f"{utc.year:04d}{utc.month:02d}{utc.day:02d}T{utc.hour:02d}{utc.minute:02d}{utc.second:02d}Z"
    return f"raw/date={day}/{stamp}.json.gz"


def gz(body: bytes) -> bytes:
    return gzip.compress(body, mtime=0)


@dataclass(frozen=True)
class Poison:
    """One bad input: the object put under raw/ and, when an API could send it, the answer itself.

    Snapshot-level poisons (`bad_rows` empty) must end in quarantine/ with a reason matching `reason`
    (a case-insensitive regular expression); row-level ones must reject exactly `bad_rows` (record
    indices) into rejected_records with that reason and merge `good_payload`, the rest of the snapshot.
    """

    name: str
    key: str
    stored: bytes
    payload: bytes | None
    reason: str
    bad_rows: tuple[int, ...] = ()
    good_payload: bytes | None = None

    @property
    def snapshot_level(self) -> bool:
        return not self.bad_rows


def _answer(name: str, minute: int, payload: bytes, reason: str, when: datetime | None = None) -> Poison:
    return Poison(name, raw_key_at(when or moment(minute)), gz(payload), payload, reason)


def _rows(name: str, records: list[dict[str, Any]], minute: int, bad: Changes, reason: str) -> Poison:
    rows = records_at(records, minute, bad)
    payload = json.dumps(rows).encode()
    good = json.dumps([row for index, row in enumerate(rows) if index not in bad]).encode()
    return Poison(name, raw_key_at(moment(minute)), gz(payload), payload, reason, tuple(sorted(bad)), good)


def _dated(records: list[dict[str, Any]], stamp: str) -> bytes:
    rows = copy.deepcopy(records)
    for row in rows:
        row["datetime"] = stamp
    return json.dumps(rows).encode()


def _renamed(records: list[dict[str, Any]], minute: int, field: str, new_name: str) -> bytes:
    rows = records_at(records, minute)
    for row in rows:
        row[new_name] = row.pop(field)
    return json.dumps(rows).encode()


def _feature(geometry: dict[str, Any]) -> dict[str, Any]:
    return {"geo_shape": {"type": "Feature", "properties": {}, "geometry": geometry}}


def poisons(sample_bytes: bytes, first_minute: int = 30) -> list[Poison]:
    """Every poison of issue 11, each at its own minute from `first_minute` on (every 3 minutes), and two
    controls that the merge and the ingest already handled before issue 11."""
    records = base_records(sample_bytes)
    minutes = iter(range(first_minute, first_minute + 3 * 100, 3))
    shape = records[0]["geo_shape"]["geometry"]["type"]

    latin1_at = next(minutes)
    text = json.dumps(records_at(records, latin1_at), ensure_ascii=False)
    assert text.encode("latin-1") != text.encode("utf-8"), "the sample holds no accented letter any more"
    surrogate_at = next(minutes)
    surrogate = snapshot(records, surrogate_at, {3: {"denomination": "Rue \ud800"}})
    nested_at = next(minutes)
    nested = snapshot(records, nested_at, {0: {"denomination": "@NEST@"}})
    nested = nested.replace(b'"@NEST@"', b"[" * 100_000 + b"]" * 100_000)
    year_1, year_9999 = datetime(1, 1, 1, tzinfo=UTC), datetime(9999, 6, 1, tzinfo=UTC)
    year_2030 = moment(0).replace(year=2030)
    bad_geometry = {
        1: _feature({"type": "LineString", "coordinates": [[-1.61]]}),
        2: _feature({"type": shape, "coordinates": None}),
    }
    nan_speeds = {4: {"averagevehiclespeed": math.nan}, 5: {"averagevehiclespeed": math.inf}}
    nan_speeds[6] = {"averagevehiclespeed": -math.inf}
    null_latitude = {7: {"geo_point_2d": {"lon": -1.68, "lat": None}}}
    in_paris = {8: _feature({"type": "MultiLineString", "coordinates": [[[2.35, 48.85], [2.3512, 48.8507]]]})}
    one_record_at, bad_key_at, not_gzip_at = next(minutes), next(minutes), next(minutes)
    two_datetimes_at = next(minutes)
    twin = good_snapshots(sample_bytes)[-1]
    misdated = Snapshot(twin.key.replace("date=2024-08-26/", "date=2024-08-27/"), twin.payload)
    assert misdated.key != twin.key, "the good snapshots moved to another day"
    two_datetimes = records_at(records, two_datetimes_at)
    two_datetimes[-1]["datetime"] = moment(two_datetimes_at + 1).isoformat()
    return [
        _answer("latin1", latin1_at, text.encode("latin-1"), r"not UTF-8|invalid JSON"),
        _answer("surrogate", surrogate_at, surrogate, r"not UTF-8|invalid JSON"),
        _answer("nested", nested_at, nested, r"nested"),
        _rows("geometry-shape", records, next(minutes), bad_geometry, r"geometry"),
        _answer("year-0001", 0, _dated(records, year_1.isoformat()), r"implausible time", year_1),
        _answer("year-9999", 0, _dated(records, year_9999.isoformat()), r"implausible time", year_9999),
        _answer("year-2030", 0, _dated(records, year_2030.isoformat()), r"implausible time", year_2030),
        _answer(
            "drift-speed",
            (at := next(minutes)),
            _renamed(records, at, "averagevehiclespeed", "averageVehicleSpeed"),
            r"(?=.*schema drift)(?=.*averagevehiclespeed)",
        ),
        _answer(
            "drift-status",
            (at := next(minutes)),
            _renamed(records, at, "trafficstatus", "trafficStatus"),
            r"(?=.*schema drift)(?=.*trafficstatus)",
        ),
        _rows("nan-speed", records, next(minutes), nan_speeds, r"not an integer|not finite"),
        _rows("null-latitude", records, next(minutes), null_latitude, r"latitude"),
        _rows("line-in-paris", records, next(minutes), in_paris, r"geometry"),
        _answer("one-record", one_record_at, snapshot(records[:1], one_record_at), r"too few records"),
        Poison(
            "not-a-snapshot-key",
            "raw/date=2024-08-26/notatime.json.gz",
            gz(snapshot(records, bad_key_at)),
            None,
            r"not a snapshot key",
        ),
        Poison("not-gzip", raw_key_at(moment(not_gzip_at)), snapshot(records, not_gzip_at), None, r"gzip"),
        # The last good snapshot landed again under the next day's partition: its key names the same minute,
        # so merged beside its twin it would give every row twice.
        Poison("misdated-key", misdated.key, misdated.stored, None, r"(?=.*date=2024-08-27)(?=.*2024-08-26)"),
        # Controls: bad input that the code of 2026-11 already handles, so the checks are seen to pass.
        _answer("two-datetimes", two_datetimes_at, json.dumps(two_datetimes).encode(), r"inconsistent snapshot"),
        _rows("speed-420", records, next(minutes), {9: {"averagevehiclespeed": 420}}, r"outside 0-200"),
    ]
