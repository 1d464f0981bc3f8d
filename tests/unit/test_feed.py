"""The local feed: endpoints and payload shapes of the real API, the clock, determinism, faults, and
the simulator's traffic properties. Servers run in threads on free ports; the client is urllib."""

from __future__ import annotations

import gzip
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.error import HTTPError
from urllib.request import Request, urlopen
from zoneinfo import ZoneInfo

import pytest

from trafficwatch_dev.api import EXPORTS_PATH, RECORDS_PATH
from trafficwatch_dev.feed import FAULT_MODES, FeedConfig, FeedServer, make_server, start_in_thread
from trafficwatch_dev.simulator import segment_length_m, traffic_status
from trafficwatch_dev.snapshots import DEFAULT_BASE

V1_PATH = "/api/records/1.0/search/?dataset=etat-du-trafic-en-temps-reel"
FROZEN = 1e-9  # a clock speed at which the served index never moves by itself during a test
PARIS = ZoneInfo("Europe/Paris")
DYNAMIC = {
    "datetime",
    "averagevehiclespeed",
    "traveltime",
    "traveltimereliability",
    "trafficstatus",
    "vehicleprobemeasurement",
}
ARTERIAL = {"Réseau national", "Réseau d'armature"}
PRINCIPAL = "Réseau de distribution principale"
MONDAY_MIDNIGHT_PARIS = datetime(2024, 8, 25, 22, 0, tzinfo=UTC)


def get(url: str, timeout: float = 10, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) for any status code."""
    try:
        with urlopen(Request(url, method=method), timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except HTTPError as err:
        return err.code, dict(err.headers), err.read()


def get_json(url: str) -> Any:
    status, _, body = get(url)
    assert status == 200, body[:300]
    return json.loads(body)


def post(url: str) -> tuple[int, Any]:
    status, _, body = get(url, method="POST")
    return status, json.loads(body)


@pytest.fixture(scope="module")
def sample_bytes() -> bytes:
    """The real exports/json snapshot of 2024-08-26 (packaged as the simulator's base)."""
    return gzip.decompress(DEFAULT_BASE.read_bytes())


@pytest.fixture(scope="module")
def sample(sample_bytes: bytes) -> list[dict[str, Any]]:
    return json.loads(sample_bytes)


@pytest.fixture(scope="module")
def snapshot_files(tmp_path_factory: pytest.TempPathFactory, sample_bytes: bytes) -> tuple[Path, Path]:
    """The sample as plain .json, then a later snapshot (3 minutes on, other speeds) as .json.gz."""
    folder = tmp_path_factory.mktemp("snapshots")
    first = folder / "snap1.json"
    first.write_bytes(sample_bytes)
    later = json.loads(sample_bytes)
    for record in later:
        record["datetime"] = "2024-08-26T12:46:00+02:00"
        record["averagevehiclespeed"] += 1
    second = folder / "snap2.json.gz"
    second.write_bytes(gzip.compress(json.dumps(later).encode()))
    return first, second


def _running(config: FeedConfig) -> Iterator[FeedServer]:
    server = start_in_thread(config)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def files_server(snapshot_files: tuple[Path, Path]) -> Iterator[FeedServer]:
    """Two snapshot files, fast faults (Retry-After 7 s, slow 0.6 s)."""
    config = FeedConfig(port=0, files=snapshot_files, speed=FROZEN, retry_after_s=7, slow_s=0.6)
    yield from _running(config)


@pytest.fixture
def files_feed(files_server: FeedServer) -> Iterator[FeedServer]:
    """The shared files feed, back on its first file and without fault after each test."""
    yield files_server
    files_server.set_fault(None)
    files_server.advance(-files_server.current_index())


@pytest.fixture(scope="module")
def sim_feed() -> Iterator[FeedServer]:
    """A simulator frozen at a Monday 12:42 (Paris); tests that change its state use their own."""
    yield from _running(FeedConfig(port=0, start=datetime(2024, 8, 26, 10, 42, tzinfo=UTC), speed=FROZEN))


# --------------------------------------------------------------------------------------------------
# Files mode and payload shapes


def test_exports_in_files_mode_serve_the_sample_byte_for_byte(files_feed: FeedServer, sample_bytes: bytes) -> None:
    status, headers, body = get(files_feed.url + EXPORTS_PATH)
    assert status == 200
    assert headers["Content-Type"] == "application/json; charset=utf-8"
    assert body == sample_bytes
    assert len(json.loads(body)) == 2859


def test_records_paging_covers_the_snapshot_in_29_pages(files_feed: FeedServer, sample: list[dict]) -> None:
    pages, offset = [], 0
    while True:
        page = get_json(f"{files_feed.url}{RECORDS_PATH}?limit=100&offset={offset}&select=*&lang=fr")
        assert page["total_count"] == 2859
        if not page["results"]:
            break
        pages.append(page["results"])
        offset += 100
    assert len(pages) == 29
    records = [record for page in pages for record in page]
    assert len({r["predefinedlocationreference"] for r in records}) == 2859
    assert records == sample  # stable order, same v2.1 records as the exports
    default = get_json(files_feed.url + RECORDS_PATH)
    assert default["results"] == sample[:10]


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("limit=200", "Invalid value for limit API parameter: 200 was found but -1 <= limit <= 100 is expected."),
        ("limit=100&offset=9950", "Invalid value for sum of offset + limit API parameter: 10050 was found"),
        ("limit=ten", "Invalid value for limit API parameter"),
    ],
)
def test_records_parameters_are_validated_like_the_real_api(files_feed: FeedServer, query: str, message: str) -> None:
    status, headers, body = get(f"{files_feed.url}{RECORDS_PATH}?{query}")
    assert status == 400
    assert headers["Content-Type"].startswith("application/json")
    error = json.loads(body)
    assert error["status_code"] == 400
    assert error["error_code"] == "InvalidRESTParameterError"
    assert error["message"].startswith(message)


def test_v1_shape(files_feed: FeedServer, sample: list[dict]) -> None:
    payload = get_json(f"{files_feed.url}{V1_PATH}&rows=10000&start=0")
    assert payload["nhits"] == 2859
    assert payload["parameters"]["dataset"] == "etat-du-trafic-en-temps-reel"
    assert payload["facet_groups"] == []
    assert len(payload["records"]) == 2859
    for v1, v2 in zip(payload["records"], sample, strict=True):
        fields = v1["fields"]
        assert v1["datasetid"] == "etat-du-trafic-en-temps-reel"
        assert len(v1["recordid"]) == 40
        assert fields["geo_point_2d"] == [v2["geo_point_2d"]["lat"], v2["geo_point_2d"]["lon"]]
        assert v1["geometry"] == {
            "type": "Point",
            "coordinates": [v2["geo_point_2d"]["lon"], v2["geo_point_2d"]["lat"]],
        }
        assert fields["geo_shape"] == v2["geo_shape"]["geometry"]  # bare geometry, no Feature
        assert fields["geo_shape"]["type"] == "MultiLineString"
        assert set(fields) == {k for k, v in v2.items() if v is not None}  # nulls omitted
        assert fields["averagevehiclespeed"] == v2["averagevehiclespeed"]
        assert datetime.fromisoformat(v1["record_timestamp"]) == datetime.fromisoformat(v2["datetime"])
    assert any(r["sens_circule"] is None for r in sample)
    assert len(get_json(files_feed.url + V1_PATH)["records"]) == 10  # rows defaults to 10


def test_v1_errors(files_feed: FeedServer) -> None:
    status, _, body = get(files_feed.url + "/api/records/1.0/search/?dataset=nope&rows=10")
    assert status == 404
    assert "nope" in json.loads(body)["error"]
    assert get(files_feed.url + "/api/records/1.0/search/?rows=10")[0] == 404
    assert get(f"{files_feed.url}{V1_PATH}&rows=10001")[0] == 400


@pytest.mark.parametrize(
    "path",
    [
        "/api/explore/v2.1/catalog/datasets/other-dataset/exports/json",
        "/api/explore/v2.1/catalog/datasets/other-dataset/records",
        "/api/explore/v2.1/catalog/datasets/etat-du-trafic-en-temps-reel/exports/xml",
        "/nothing/here",
    ],
)
def test_unknown_dataset_or_path_is_a_json_404(files_feed: FeedServer, path: str) -> None:
    status, headers, body = get(files_feed.url + path)
    assert status == 404
    assert headers["Content-Type"] == "application/json; charset=utf-8"
    assert json.loads(body)["status_code"] == 404


def test_rate_limit_headers_count_down(files_feed: FeedServer) -> None:
    remaining = []
    for path in (RECORDS_PATH, RECORDS_PATH + "?limit=1", V1_PATH):
        _, headers, _ = get(files_feed.url + path)
        assert headers["X-RateLimit-Limit"] == "10000"
        remaining.append(int(headers["X-RateLimit-Remaining"]))
        reset = datetime.fromisoformat(headers["X-RateLimit-Reset"])
        now = datetime.now(UTC)
        assert reset.utcoffset() == timedelta(0)
        assert (reset.hour, reset.minute, reset.second) == (0, 0, 0)
        assert now < reset <= now + timedelta(days=1)
    assert remaining == [remaining[0], remaining[0] - 1, remaining[0] - 2]
    assert "X-RateLimit-Remaining" not in get(files_feed.url + "/health")[1]


def test_timezone_renders_the_same_instant_with_another_offset(files_feed: FeedServer) -> None:
    paris = get_json(f"{files_feed.url}{RECORDS_PATH}?limit=5")["results"]
    utc = get_json(f"{files_feed.url}{RECORDS_PATH}?limit=5&timezone=UTC")["results"]
    assert paris[0]["datetime"] == "2024-08-26T12:43:00+02:00"
    assert utc[0]["datetime"] == "2024-08-26T10:43:00+00:00"
    for a, b in zip(paris, utc, strict=True):
        assert datetime.fromisoformat(a["datetime"]) == datetime.fromisoformat(b["datetime"])
        assert {**a, "datetime": None} == {**b, "datetime": None}
    assert get(f"{files_feed.url}{RECORDS_PATH}?timezone=Mars/Olympus")[0] == 400


def test_files_mode_advances_to_the_next_file_and_stays_on_the_last(files_feed: FeedServer) -> None:
    def served() -> tuple[str, int]:
        first = get_json(f"{files_feed.url}{RECORDS_PATH}?limit=1")["results"][0]
        return first["datetime"], first["averagevehiclespeed"]

    assert served() == ("2024-08-26T12:43:00+02:00", 72)
    status, state = post(files_feed.url + "/_feed/advance?steps=1")
    assert status == 200
    assert (state["index"], state["source"], state["file"]) == (1, "files", "snap2.json.gz")
    assert state["datetime"] == "2024-08-26T10:46:00+00:00"
    assert served() == ("2024-08-26T12:46:00+02:00", 73)
    files_feed.advance(5)
    assert files_feed.current_index() == 1  # stays on the last file
    files_feed.advance(-1)
    assert served() == ("2024-08-26T12:43:00+02:00", 72)  # no hidden offset piled up past the end


def test_bad_snapshot_files_fail_at_start(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        make_server(FeedConfig(port=0, files=(tmp_path / "missing.json",)))
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text('{"results": []}')
    with pytest.raises(ValueError, match="bare JSON array"):
        make_server(FeedConfig(port=0, files=(wrapped,)))


def test_config_is_validated(snapshot_files: tuple[Path, Path]) -> None:
    with pytest.raises(ValueError, match="unknown fault mode"):
        make_server(FeedConfig(port=0, files=snapshot_files, fault="teapot"))
    with pytest.raises(ValueError, match="positive"):
        make_server(FeedConfig(port=0, files=snapshot_files, interval_s=0))


# --------------------------------------------------------------------------------------------------
# Control endpoints, clock and determinism


def test_control_endpoints(sim_feed: FeedServer) -> None:
    assert get_json(sim_feed.url + "/health") == {"status": "ok"}
    state = get_json(sim_feed.url + "/_feed/state")
    assert state["index"] == 0
    assert state["source"] == "simulator"
    assert state["datetime"] == "2024-08-26T10:42:00+00:00"
    assert (state["fault"], state["fault_remaining"]) == (None, None)
    assert post(sim_feed.url + "/_feed/fault?mode=teapot")[0] == 400
    assert post(sim_feed.url + "/_feed/fault")[0] == 400
    assert post(sim_feed.url + "/_feed/nothing")[0] == 404


def test_the_clock_moves_the_index(sample: list[dict]) -> None:
    server = make_server(FeedConfig(port=0, interval_s=180, speed=1800))  # one snapshot every 0.1 s
    try:
        first = server.current_index()
        time.sleep(0.25)
        assert server.current_index() >= first + 2
    finally:
        server.close()


def test_simulator_advance_moves_the_datetime_by_one_interval(sample: list[dict]) -> None:
    start = datetime(2024, 8, 26, 10, 44, 30, tzinfo=UTC)
    for server in _running(FeedConfig(port=0, start=start, speed=FROZEN, interval_s=180)):
        before = get_json(server.url + EXPORTS_PATH)
        status, state = post(server.url + "/_feed/advance")
        assert status == 200
        assert state["index"] == 1
        after = get_json(server.url + EXPORTS_PATH)

    stamps = {r["datetime"] for r in before}
    assert stamps == {"2024-08-26T12:42:00+02:00"}  # floor(start / interval) * interval, Paris offset
    assert {r["datetime"] for r in after} == {"2024-08-26T12:45:00+02:00"}
    assert state["datetime"] == "2024-08-26T10:45:00+00:00"
    assert len(after) == len(sample)
    assert [r["averagevehiclespeed"] for r in before] != [r["averagevehiclespeed"] for r in after]
    for simulated, base in zip(after, sample, strict=True):
        assert list(simulated) == list(base)  # same keys, same order
        assert {k: v for k, v in simulated.items() if k not in DYNAMIC} == {
            k: v for k, v in base.items() if k not in DYNAMIC
        }


def test_same_seed_and_index_render_the_same_bytes_on_two_servers() -> None:
    paths = [EXPORTS_PATH, RECORDS_PATH + "?limit=100&offset=2800", V1_PATH + "&rows=50&start=7"]
    start = datetime(2024, 9, 3, 6, 30, tzinfo=UTC)

    def bodies(seed: int) -> list[bytes]:
        for server in _running(FeedConfig(port=0, start=start, seed=seed, speed=FROZEN)):
            server.advance(3)
            return [get(server.url + path)[2] for path in paths] + [get(server.url + paths[0])[2]]
        raise AssertionError("unreachable")

    one, two = bodies(7), bodies(7)
    assert one == two
    assert one[0] == one[-1]  # a cached body and its first rendering are the same
    for server in _running(FeedConfig(port=0, start=start, seed=8, speed=FROZEN)):
        server.advance(3)
        assert get(server.url + paths[1])[2] != one[1]  # another seed, other traffic


# --------------------------------------------------------------------------------------------------
# Faults


def test_http500(files_feed: FeedServer) -> None:
    files_feed.set_fault("http500", 1)
    status, headers, body = get(files_feed.url + EXPORTS_PATH)
    assert status == 500
    assert headers["Content-Type"] == "application/json; charset=utf-8"
    assert json.loads(body)["status_code"] == 500
    assert get(files_feed.url + EXPORTS_PATH)[0] == 200  # count=1 faults one request only


def test_http429(files_feed: FeedServer) -> None:
    files_feed.set_fault("http429", 2)
    for _ in range(2):
        status, headers, body = get(files_feed.url + RECORDS_PATH)
        assert status == 429
        assert headers["Retry-After"] == "7"
        assert headers["X-RateLimit-Remaining"] == "0"
        error = json.loads(body)
        assert error["errorcode"] == 10002
        assert (error["limit_time_unit"], error["call_limit"]) == ("day", 10000)
        assert error["error"] == "Too many requests on the domain. Please contact the domain administrator."
        assert error["reset_time"] == headers["X-RateLimit-Reset"]
    assert get(files_feed.url + RECORDS_PATH)[0] == 200


def test_truncated(files_feed: FeedServer, sample_bytes: bytes) -> None:
    files_feed.set_fault("truncated", 1)
    status, headers, body = get(files_feed.url + EXPORTS_PATH)
    assert status == 200
    assert headers["Content-Type"] == "application/json; charset=utf-8"
    assert abs(len(body) - len(sample_bytes) / 2) <= 1
    assert sample_bytes.startswith(body)
    with pytest.raises(json.JSONDecodeError):
        json.loads(body)


def test_html200(files_feed: FeedServer) -> None:
    files_feed.set_fault("html200", 1)
    status, headers, body = get(files_feed.url + V1_PATH)
    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    assert b"502 Bad Gateway" in body
    assert "X-RateLimit-Remaining" in headers
    with pytest.raises(json.JSONDecodeError):
        json.loads(body)


def test_empty(files_feed: FeedServer) -> None:
    files_feed.set_fault("empty", 3)
    assert get_json(files_feed.url + EXPORTS_PATH) == []
    assert get_json(files_feed.url + RECORDS_PATH + "?limit=100") == {"total_count": 0, "results": []}
    v1 = get_json(files_feed.url + V1_PATH + "&rows=100")
    assert (v1["nhits"], v1["records"]) == (0, [])
    assert len(get_json(files_feed.url + EXPORTS_PATH)) == 2859


def test_schema(files_feed: FeedServer) -> None:
    files_feed.set_fault("schema", 2)
    records = get_json(files_feed.url + EXPORTS_PATH)
    assert len(records) == 2859
    keys = set(records[0])
    assert {"predefinedLocationReference", "averageVehicleSpeed", "trafficStatus", "dateTime"} <= keys
    assert not keys & {"predefinedlocationreference", "datetime", "averagevehiclespeed", "trafficstatus"}
    v1 = get_json(files_feed.url + V1_PATH)["records"][0]
    assert "trafficStatus" in v1["fields"] and "trafficstatus" not in v1["fields"]
    assert v1["geometry"]["type"] == "Point"  # the wrapper is intact, the fields changed


def test_inconsistent(files_feed: FeedServer) -> None:
    files_feed.set_fault("inconsistent", None)  # every request
    stamps = set()
    for offset in range(0, 2900, 100):
        stamps |= {
            r["datetime"] for r in get_json(f"{files_feed.url}{RECORDS_PATH}?limit=100&offset={offset}")["results"]
        }
    assert stamps == {"2024-08-26T12:43:00+02:00", "2024-08-26T12:46:00+02:00"}
    assert len({r["datetime"] for r in get_json(files_feed.url + EXPORTS_PATH)}) == 2
    v1 = get_json(files_feed.url + V1_PATH + "&rows=10000")["records"]
    assert len({r["fields"]["datetime"] for r in v1}) == 2
    files_feed.advance(1)  # on the last file, the other snapshot is the previous one
    assert len({r["datetime"] for r in get_json(files_feed.url + EXPORTS_PATH)}) == 2


def test_inconsistent_with_a_single_file(snapshot_files: tuple[Path, Path]) -> None:
    for server in _running(FeedConfig(port=0, files=snapshot_files[:1], speed=FROZEN, fault="inconsistent")):
        stamps = {r["datetime"] for r in get_json(server.url + EXPORTS_PATH)}
    assert stamps == {"2024-08-26T12:43:00+02:00", "2024-08-26T12:46:00+02:00"}


def test_slow_answers_after_the_delay(files_feed: FeedServer) -> None:
    files_feed.set_fault("slow", 2)
    with pytest.raises((TimeoutError, socket.timeout)):
        urlopen(files_feed.url + RECORDS_PATH, timeout=0.2)
    began = time.monotonic()
    status, _, body = get(files_feed.url + RECORDS_PATH, timeout=5)
    assert time.monotonic() - began >= 0.55
    assert status == 200 and json.loads(body)["total_count"] == 2859
    began = time.monotonic()
    assert get(files_feed.url + RECORDS_PATH)[0] == 200
    assert time.monotonic() - began < 0.5


def test_fault_count_and_control_endpoints(files_feed: FeedServer) -> None:
    status, state = post(files_feed.url + "/_feed/fault?mode=http500&count=2")
    assert (status, state["fault"], state["fault_remaining"]) == (200, "http500", 2)
    assert get(files_feed.url + "/health")[0] == 200  # control endpoints are never faulted
    assert get_json(files_feed.url + "/_feed/state")["fault_remaining"] == 2
    assert get(files_feed.url + EXPORTS_PATH)[0] == 500
    assert get_json(files_feed.url + "/_feed/state")["fault_remaining"] == 1
    assert get(files_feed.url + V1_PATH)[0] == 500
    assert get_json(files_feed.url + "/_feed/state")["fault"] is None
    assert get(files_feed.url + EXPORTS_PATH)[0] == 200
    assert post(files_feed.url + "/_feed/fault?mode=http429")[1]["fault_remaining"] == 1  # count defaults to 1
    assert post(files_feed.url + "/_feed/fault?mode=none")[1]["fault"] is None
    assert get(files_feed.url + EXPORTS_PATH)[0] == 200


def test_a_configured_fault_without_count_hits_every_request(snapshot_files: tuple[Path, Path]) -> None:
    for server in _running(FeedConfig(port=0, files=snapshot_files, speed=FROZEN, fault="http500")):
        assert [get(server.url + RECORDS_PATH)[0] for _ in range(3)] == [500, 500, 500]
        assert get_json(server.url + "/_feed/state")["fault_remaining"] is None


def test_every_fault_mode_is_covered() -> None:
    tests = [name for name in globals() if name.startswith("test_")]
    assert all(any(name.startswith(f"test_{mode}") for name in tests) for mode in FAULT_MODES)


# --------------------------------------------------------------------------------------------------
# Simulator: believable traffic over a simulated weekday


@pytest.fixture(scope="module")
def weekday() -> dict[str, list[dict[str, Any]]]:
    """Snapshots of a Monday every hour and at 17:30, 22:30, keyed by local time 'HH:MM'."""
    server = make_server(FeedConfig(port=0, start=MONDAY_MIDNIGHT_PARIS, interval_s=1800, speed=FROZEN))
    try:
        day = {}
        for index in [*range(0, 48, 2), 35, 45]:
            local = server.source.datetime_at(index).astimezone(PARIS)
            assert local.weekday() == 0
            day[local.strftime("%H:%M")] = server.records_at(index)
        return day
    finally:
        server.close()


def _mean_ratio(records: list[dict], hierarchies: set[str]) -> float:
    ratios = [
        r["averagevehiclespeed"] / r["vitesse_maxi"]
        for r in records
        if r["hierarchie"] in hierarchies and r["vehicleprobemeasurement"] > 0
    ]
    assert len(ratios) > 30
    return sum(ratios) / len(ratios)


def _congested_share(records: list[dict]) -> float:
    known = [r for r in records if r["trafficstatus"] != "unknown"]
    return sum(r["trafficstatus"] in ("congested", "impossible") for r in known) / len(known)


def test_status_agrees_with_speed_limit_and_probes(weekday: dict[str, list[dict]]) -> None:
    statuses: Counter[str] = Counter()
    for records in weekday.values():
        assert len({r["datetime"] for r in records}) == 1
        for r in records:
            speed, limit, probes = r["averagevehiclespeed"], r["vitesse_maxi"], r["vehicleprobemeasurement"]
            assert r["trafficstatus"] == traffic_status(speed, limit, probes)
            assert (r["trafficstatus"] == "unknown") == (probes == 0)
            if probes == 0:
                assert (speed, r["traveltimereliability"]) == (limit, 0)
            else:
                assert 1 <= r["traveltimereliability"] <= 100
            assert isinstance(r["traveltime"], int) and r["traveltime"] >= 0
            assert speed > 0
            statuses[r["trafficstatus"]] += 1
    assert statuses["impossible"] < 0.001 * statuses.total()
    assert {"freeFlow", "heavy", "congested", "unknown"} <= set(statuses)


def test_traveltime_is_length_over_speed(weekday: dict[str, list[dict]]) -> None:
    for r in weekday["08:00"][:300]:
        expected = segment_length_m(r["geo_shape"]) / (r["averagevehiclespeed"] / 3.6)
        assert abs(r["traveltime"] - expected) <= 0.5 + 1e-9


def test_arterials_feel_the_morning_peak_more(weekday: dict[str, list[dict]]) -> None:
    arterial_night, arterial_peak = _mean_ratio(weekday["03:00"], ARTERIAL), _mean_ratio(weekday["08:00"], ARTERIAL)
    local_night = _mean_ratio(weekday["03:00"], {PRINCIPAL})
    local_peak = _mean_ratio(weekday["08:00"], {PRINCIPAL})
    assert arterial_peak < arterial_night - 0.25
    assert arterial_night - arterial_peak > (local_night - local_peak) + 0.05


def test_congestion_builds_and_clears(weekday: dict[str, list[dict]]) -> None:
    share = {hhmm: _congested_share(records) for hhmm, records in weekday.items()}
    assert share["03:00"] < 0.01
    assert share["08:00"] > share["06:00"] + 0.1  # builds towards the morning peak
    assert share["11:00"] < share["08:00"] / 2  # clears after it
    assert share["17:30"] > share["14:00"] + 0.1  # the evening peak
    assert share["22:30"] < 0.02
    unknown = {hhmm: sum(r["vehicleprobemeasurement"] == 0 for r in recs) for hhmm, recs in weekday.items()}
    assert unknown["03:00"] > 2 * unknown["12:00"]  # fewer probes at night


def _log_speed_changes(now: list[dict], later: list[dict]) -> dict[str, list[float]]:
    """Per road, the log speed change of each segment measured (and not blocked) in both snapshots."""
    changes: dict[str, list[float]] = {}
    for a, b in zip(now, later, strict=True):
        if all(r["vehicleprobemeasurement"] and r["trafficstatus"] != "impossible" for r in (a, b)):
            change = math.log(b["averagevehiclespeed"] / a["averagevehiclespeed"])
            changes.setdefault(a["denomination"], []).append(change)
    return changes


def test_congestion_changes_smoothly_and_together_along_a_road() -> None:
    # Tuesday 10:00 in Paris: the daily demand is flat, so changes come from the slow waves.
    server = make_server(FeedConfig(port=0, start=datetime(2024, 8, 27, 8, 0, tzinfo=UTC), speed=FROZEN))
    try:
        now, next_one, later = server.records_at(0), server.records_at(1), server.records_at(7)
    finally:
        server.close()
    steps = [
        abs(a["averagevehiclespeed"] - b["averagevehiclespeed"]) / a["vitesse_maxi"]
        for a, b in zip(now, next_one, strict=True)
        if a["vehicleprobemeasurement"] and b["vehicleprobemeasurement"] and a["trafficstatus"] != "impossible"
    ]
    assert max(steps) < 0.15  # 3 minutes on, no segment jumps

    by_road = _log_speed_changes(now, later)  # 21 minutes on
    overall = statistics.pstdev([change for changes in by_road.values() for change in changes])
    within = statistics.mean(statistics.pstdev(changes) for changes in by_road.values() if len(changes) >= 5)
    assert overall > 0.05  # things do change...
    assert within < 0.7 * overall  # ...and the segments of one road change alike


# --------------------------------------------------------------------------------------------------
# serve(): the blocking entry point of `trafficwatch-dev feed`


def test_serve_prints_its_url_and_stops_on_sigterm() -> None:
    code = "from trafficwatch_dev.feed import FeedConfig, serve; serve(FeedConfig(port=0))"
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(repo / folder) for folder in ("plugins", "devtools"))}
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env) as process:
        try:
            assert process.stdout is not None
            line = process.stdout.readline().strip()
            assert line.startswith("feed: serving simulator")
            url = line.rsplit(" on ", 1)[1]
            assert url.startswith("http://127.0.0.1:")
            assert get_json(url + "/health") == {"status": "ok"}
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=10) == 0
        finally:
            if process.poll() is None:
                process.kill()
