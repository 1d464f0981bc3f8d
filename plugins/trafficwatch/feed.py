"""A local imitation of the Rennes Métropole Opendatasoft API, for development, demos and tests.

It serves the dataset `etat-du-trafic-en-temps-reel` on 127.0.0.1 with the same paths and payload
shapes as the real portal (v2.1 exports, v2.1 records, legacy v1 search), either replaying snapshot
files in order or simulating traffic evolved from a real base snapshot. Upstream faults (errors,
quotas, slowness, broken or changed payloads) can be switched on to exercise a client's resilience.

Which snapshot is served follows a clock: index = floor(elapsed * speed / interval) + manual offset.
The simulator is a pure function of (segment, simulated time, seed), so one index always renders the
same bytes, on any run, and any past minute can be rendered too (`Simulator.exports_body`: the demo's
simulated history, see `trafficwatch.history`).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import operator
import random
import signal
import struct
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from datetime import time as time_of_day
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from trafficwatch.config import DATASET

FAULT_MODES = ("http500", "http429", "slow", "truncated", "html200", "empty", "schema", "inconsistent")
DEFAULT_BASE = Path(__file__).resolve().parent / "data" / "rennes_base_snapshot.json.gz"
DEFAULT_TIMEZONE = "Europe/Paris"  # how the sample renders datetimes (+02:00 in summer)

EXPORTS_PATH = f"/api/explore/v2.1/catalog/datasets/{DATASET}/exports/json"
RECORDS_PATH = f"/api/explore/v2.1/catalog/datasets/{DATASET}/records"
V1_PATH = "/api/records/1.0/search"
_V2_PREFIX = "/api/explore/v2.1/catalog/datasets/"

RECORDS_MAX_LIMIT = 100
RECORDS_DEFAULT_LIMIT = 10
V1_MAX_ROWS = 10_000
V1_DEFAULT_ROWS = 10
MAX_WINDOW = 10_000  # offset + limit (v2.1) and start + rows (v1) may not go beyond this
CALL_LIMIT = 10_000  # daily quota advertised in X-RateLimit-Limit and in the 429 body

JSON_TYPE = "application/json; charset=utf-8"
HTML_TYPE = "text/html; charset=utf-8"

_PROXY_PAGE = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)


@dataclass(frozen=True)
class FeedConfig:
    port: int = 8090
    host: str = "127.0.0.1"
    files: tuple[Path, ...] = ()  # snapshot files (exports/json bare arrays, .json or .json.gz); empty -> simulator
    base: Path | None = None  # simulator base snapshot; None -> the packaged data/rennes_base_snapshot.json.gz
    interval_s: float = 180.0  # upstream publishes a new snapshot every interval (simulated seconds)
    speed: float = 1.0  # simulated seconds per real second (a faster clock for demos, e.g. 60)
    start: datetime | None = None  # simulated clock start (UTC); None -> now
    seed: int = 0
    fault: str | None = None  # one of FAULT_MODES, applied to data requests
    fault_count: int | None = None  # None = every request, N = the next N data requests only
    retry_after_s: int = 2
    slow_s: float = 30.0


# --------------------------------------------------------------------------------------------------
# Small helpers


def load_snapshot(path: Path) -> list[dict[str, Any]]:
    """Read an exports/json snapshot (a bare JSON array), plain or gzipped."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    data = json.loads(raw.decode("utf-8"))
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a bare JSON array of records (exports/json shape)")
    return data


def traffic_status(speed: int, limit: int, probes: int) -> str:
    """Status from the speed ratio r = speed / limit, with the thresholds measured on the real sample.

    Integer arithmetic keeps the boundaries exact (r = 0.7 is freeFlow, r = 0.3 is heavy).
    """
    if probes <= 0:
        return "unknown"
    if 20 * speed < limit:
        return "impossible"
    if 10 * speed < 3 * limit:
        return "congested"
    if 10 * speed < 7 * limit:
        return "heavy"
    return "freeFlow"


def _haversine_m(a: Sequence[float], b: Sequence[float]) -> float:
    lon1, lat1, lon2, lat2 = map(math.radians, (a[0], a[1], b[0], b[1]))
    h = math.sin((lat2 - lat1) / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    return 2 * 6_371_008.8 * math.asin(math.sqrt(h))


def _geometry(geo_shape: Any) -> dict[str, Any] | None:
    """The bare geometry of a geo_shape, with or without its Feature wrapper."""
    if not isinstance(geo_shape, dict):
        return None
    if geo_shape.get("type") == "Feature":
        return geo_shape.get("geometry")
    return geo_shape


def segment_length_m(geo_shape: Any) -> float:
    """Length of a LineString / MultiLineString along its vertices."""
    geometry = _geometry(geo_shape) or {}
    coords = geometry.get("coordinates") or []
    lines = [coords] if geometry.get("type") == "LineString" else coords
    return sum(_haversine_m(line[i], line[i + 1]) for line in lines for i in range(len(line) - 1))


def _uniforms(key: bytes) -> tuple[float, float, float]:
    """Three deterministic uniforms in [0, 1) from a key (hashlib, unlike hash(), is not salted)."""
    a, b, c = struct.unpack("<3I", hashlib.blake2b(key, digest_size=12).digest())
    return a / 2**32, b / 2**32, c / 2**32


def _next_midnight_utc(now: datetime | None = None) -> datetime:
    now = now or datetime.now(UTC)
    return datetime(now.year, now.month, now.day, tzinfo=UTC) + timedelta(days=1)


def _iso_utc(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat()


class _LRU:
    """A small thread-safe LRU: a few rendered snapshots are reused by every page request."""

    def __init__(self, maxsize: int) -> None:
        self._maxsize = maxsize
        self._items: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any, build: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = build()  # outside the lock: two threads may build the same (identical) value
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self._maxsize:
                self._items.popitem(last=False)
        return value


# --------------------------------------------------------------------------------------------------
# Snapshot sources: both give a list of v2.1 records (datetimes as stored) for an index


class FileSource:
    """Snapshot files served in order, one per interval, staying on the last one."""

    kind = "files"

    def __init__(self, files: Sequence[Path]) -> None:
        missing = [str(p) for p in files if not Path(p).is_file()]
        if missing:
            raise FileNotFoundError(f"snapshot file(s) not found: {', '.join(missing)}")
        self.files = tuple(Path(p) for p in files)
        self._cache = _LRU(4)
        for i in range(len(self.files)):  # fail at start-up, not on the first poll, on a bad file
            self.records(i)

    def clamp(self, index: int) -> int:
        return min(max(index, 0), len(self.files) - 1)

    def records(self, index: int) -> list[dict[str, Any]]:
        i = self.clamp(index)
        return self._cache.get(i, lambda: load_snapshot(self.files[i]))

    def datetime_at(self, index: int) -> datetime | None:
        for record in self.records(index):
            value = record.get("datetime")
            if isinstance(value, str):
                try:
                    return datetime.fromisoformat(value)
                except ValueError:
                    return None
        return None

    def describe(self) -> str:
        return f"{len(self.files)} snapshot file(s)"


# Response of each road hierarchy to demand: (all-day activity weight, commuter-peak weight).
# Arterials ('Réseau national', "Réseau d'armature") feel the peaks most.
_HIERARCHY_RESPONSE = {
    "Réseau national": (0.9, 1.45),
    "Réseau d'armature": (1.0, 1.4),
    "Réseau d'appui": (0.95, 0.9),
    "Réseau de distribution principale": (0.9, 0.4),
    "Réseau de distribution secondaire": (0.8, 0.35),
}
_DEFAULT_RESPONSE = (0.9, 0.8)

# Slow oscillations (periods in seconds, weights) that make congestion build and clear smoothly.
_WAVES = ((41 * 60, 0.45), (73 * 60, 0.35), (139 * 60, 0.2))
_WAVE_DEPTH = 0.35
_MAX_CONGESTION = 0.92  # outside closures the speed ratio never falls into 'impossible'
_INCIDENT_PROBABILITY = 0.0001  # per segment and simulated hour: a blocked road is very rare (~7 a day)
_INCIDENT_MINUTES = (20, 120)  # how long an incident blocks its segment, uniformly drawn
# Planned night works: on a weeknight (Sunday to Thursday evening), with this probability, a few consecutive
# segments of a main road are closed from about 21:00-22:30 to 05:00-06:00 (Rennes time).
_ROADWORKS_PROBABILITY = 0.6
_ROADWORKS_HIERARCHIES = ("Réseau national", "Réseau d'armature", "Réseau d'appui")
_RELIABILITY_CAP = {1: 60, 2: 75, 3: 90}  # measured on the sample; 4+ probes reach 100
# The fields a simulated snapshot changes, in the order the simulator sets them.
_DYNAMIC_FIELDS = (
    "datetime",
    "averagevehiclespeed",
    "traveltime",
    "traveltimereliability",
    "trafficstatus",
    "vehicleprobemeasurement",
)
_STATUS_JSON = {status: json.dumps(status) for status in ("freeFlow", "heavy", "congested", "impossible", "unknown")}

Measure = tuple[int, int, int, str, int]  # speed km/h, travel time s, reliability %, status, probes


def _logistic(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _bump(hour: float, centre: float, width: float) -> float:
    return math.exp(-0.5 * ((hour - centre) / width) ** 2)


def daily_demand(local: datetime) -> tuple[float, float]:
    """(all-day activity, commuter peaks) at a local time: peaks ~08:00 and ~17:30 on weekdays,
    a weaker late-morning / afternoon pattern at weekends, near zero at night."""
    hour = local.hour + local.minute / 60 + local.second / 3600
    weekday = local.weekday()
    if weekday < 5:
        activity = 0.42 * _logistic((hour - 6.3) / 0.5) * _logistic((20.8 - hour) / 0.8)
        peaks = 0.75 * _bump(hour, 8.0, 0.8) + 0.85 * _bump(hour, 17.5, 1.1)
        return activity, peaks
    scale = 0.85 if weekday == 5 else 0.6
    activity = 0.32 * scale * _logistic((hour - 8.5) / 0.7) * _logistic((20.0 - hour) / 0.9)
    peaks = scale * (0.18 * _bump(hour, 11.5, 1.5) + 0.22 * _bump(hour, 17.0, 1.8))
    return activity, peaks


@dataclass(frozen=True)
class _Demand:
    """The network-wide demand at one simulated instant."""

    t: float  # epoch seconds
    activity: float
    peaks: float

    @property
    def volume(self) -> float:
        """Relative number of vehicles on the network (drives the probe counts)."""
        return 0.05 + self.activity + 0.5 * self.peaks

    def load_for(self, response: tuple[float, float], phases: Sequence[float]) -> float:
        """Demand felt by a road of this response, modulated +-35 % by its slow waves."""
        waves = zip(_WAVES, phases, strict=True)
        wave = sum(weight * math.sin(2 * math.pi * self.t / period + phase) for (period, weight), phase in waves)
        return (response[0] * self.activity + response[1] * self.peaks) * (1 + _WAVE_DEPTH * wave)


@dataclass(frozen=True)
class _Segment:
    """What the simulator keeps of one base record: its constants and per-segment parameters."""

    record: dict[str, Any]
    limit: int
    length_m: float
    free_flow: float  # free-flow speed / limit
    response: tuple[float, float]
    susceptibility: float
    phases: tuple[float, ...]  # one per wave: the road's phase plus a small per-segment shift
    probe_level: float  # expected probes at the base snapshot's traffic volume
    noise_key: bytes  # prefix of the per-minute random draws of this segment
    # weight * (cos, sin) of each wave's phase: sin(a + p) = sin a cos p + cos a sin p, so a snapshot computes
    # each wave's sine and cosine once, not once per segment
    wave_terms: tuple[float, ...] = ()


class Simulator:
    """Believable traffic evolved from a base snapshot; snapshot `index` is at origin + index * interval."""

    kind = "simulator"

    def __init__(self, base: list[dict[str, Any]], seed: int, origin: datetime, interval_s: float) -> None:
        if not base:
            raise ValueError("the simulator base snapshot has no records")
        self.seed = seed
        self.origin = origin
        self.interval_s = interval_s
        self._paris = ZoneInfo(DEFAULT_TIMEZONE)
        self._base_demand = self._demand(self._base_datetime(base))
        self._roads: dict[str, tuple[list[float], float]] = {}
        self.segments = [self._segment(record) for record in base]
        self._cache = _LRU(4)
        self._incident_hours = _LRU(8)
        self._roadworks_nights = _LRU(4)
        self._templates: list[tuple[str, bool]] | None = None
        self._main_roads = self._roads_for_works()

    def datetime_at(self, index: int) -> datetime:
        moment = self.origin + timedelta(seconds=index * self.interval_s)
        return moment.replace(second=0, microsecond=0)  # upstream datetimes are whole minutes

    def clamp(self, index: int) -> int:
        return max(index, 0)

    def records(self, index: int) -> list[dict[str, Any]]:
        return self._cache.get(index, lambda: self._simulate(self.datetime_at(index)))

    def describe(self) -> str:
        return f"simulator ({len(self.segments)} segments, seed {self.seed})"

    # -- per-segment constants ---------------------------------------------------------------------

    @staticmethod
    def _base_datetime(base: list[dict[str, Any]]) -> datetime:
        try:
            return datetime.fromisoformat(base[0]["datetime"])
        except (KeyError, TypeError, ValueError):
            return datetime(2024, 8, 26, 10, 43, tzinfo=UTC)  # the sample's: a Monday lunchtime

    def _demand(self, moment: datetime) -> _Demand:
        activity, peaks = daily_demand(moment.astimezone(self._paris))
        return _Demand(moment.timestamp(), activity, peaks)

    def _road(self, name: str) -> tuple[list[float], float]:
        """(wave phases, congestion proneness) shared by the segments of one road."""
        if name not in self._roads:
            rng = random.Random(f"{self.seed}|road|{name}")
            self._roads[name] = ([rng.uniform(0, 2 * math.pi) for _ in _WAVES], rng.gauss(0, 1))
        return self._roads[name]

    def _segment(self, record: dict[str, Any]) -> _Segment:
        key = f"{record.get('predefinedlocationreference')}|{record.get('gml_id')}"
        limit = int(record.get("vitesse_maxi") or record.get("averagevehiclespeed") or 50)
        base_speed = int(record.get("averagevehiclespeed") or limit)
        base_probes = int(record.get("vehicleprobemeasurement") or 0)
        road_phases, road_proneness = self._road(str(record.get("denomination")))
        rng = random.Random(f"{self.seed}|segment|{key}")
        phases = tuple(p + rng.uniform(-0.6, 0.6) for p in road_phases)
        response = _HIERARCHY_RESPONSE.get(str(record.get("hierarchie")), _DEFAULT_RESPONSE)

        ratio = base_speed / limit
        # Free flow as measured where the base saw fluid traffic, else near the limit.
        measured = base_probes > 0 and ratio >= 0.7
        free_flow = min(max(ratio, 0.8), 1.25) if measured else rng.uniform(0.9, 1.1)

        # A random proneness to congestion, shared along a road, raised to what the base shows.
        susceptibility = 0.3 * math.exp(0.35 * road_proneness + 0.3 * rng.gauss(0, 1))
        if base_probes > 0:
            seen = min(max(1 - ratio / free_flow, 0.0), 0.9)
            load = self._base_demand.load_for(response, phases)
            susceptibility = max(susceptibility, -math.log(1 - seen) / max(load, 0.05))
        susceptibility = min(susceptibility, 4.0)

        probe_level = base_probes if base_probes > 0 else rng.uniform(0.1, 0.6)
        terms = [(w * math.cos(p), w * math.sin(p)) for (_, w), p in zip(_WAVES, phases, strict=True)]
        return _Segment(
            record=record,
            limit=limit,
            length_m=segment_length_m(record.get("geo_shape")),
            free_flow=free_flow,
            response=response,
            susceptibility=susceptibility,
            phases=phases,
            probe_level=probe_level / self._base_demand.volume,
            noise_key=f"{self.seed}|{key}|".encode(),
            wave_terms=tuple(value for pair in terms for value in pair),
        )

    # -- one snapshot ------------------------------------------------------------------------------

    def measures(self, moment: datetime) -> list[Measure]:
        """(speed km/h, travel time s, reliability %, status, probes) of every segment at `moment`, in the
        base snapshot's order: what `records` and `exports_body` render."""
        demand = self._demand(moment)
        minute = int(demand.t // 60)
        closed = self._closed(minute)
        trig: list[float] = []
        for period, _ in _WAVES:
            angle = 2 * math.pi * demand.t / period
            trig += (math.sin(angle), math.cos(angle))
        volume, activity, peaks = demand.volume, demand.activity, demand.peaks
        minute_key = str(minute).encode()
        statuses = traffic_status
        out: list[Measure] = []
        for index, seg in enumerate(self.segments):
            u_probe, u_rel, u_rel_level = _uniforms(seg.noise_key + minute_key)
            probes = int(seg.probe_level * volume + u_probe)
            limit = seg.limit
            if index in closed:
                probes = max(probes, 1)  # a closure is known (operators report it), probes or not
                speed = max(1, int(0.04 * limit))
            elif probes == 0:
                speed = limit  # no measure: upstream reports about the limit
            else:
                wave = sum(map(operator.mul, seg.wave_terms, trig))
                felt = (seg.response[0] * activity + seg.response[1] * peaks) * (1 + _WAVE_DEPTH * wave)
                congestion = min(1 - math.exp(-seg.susceptibility * felt), _MAX_CONGESTION)
                speed = round(limit * seg.free_flow * (1 - congestion))
                speed = max(speed, limit // 20 + 1)  # keeps 'impossible' for closures only
            travel_time = round(seg.length_m / (speed / 3.6))
            reliability = self._reliability(probes, u_rel, u_rel_level)
            out.append((speed, travel_time, reliability, statuses(speed, limit, probes), probes))
        return out

    def _simulate(self, moment: datetime) -> list[dict[str, Any]]:
        stamp = moment.astimezone(UTC).isoformat()
        records = []
        for seg, (speed, travel_time, reliability, status, probes) in zip(
            self.segments, self.measures(moment), strict=True
        ):
            record = dict(seg.record)
            record["datetime"] = stamp
            record["averagevehiclespeed"] = speed
            record["traveltime"] = travel_time
            record["traveltimereliability"] = reliability
            record["trafficstatus"] = status
            record["vehicleprobemeasurement"] = probes
            records.append(record)
        return records

    def exports_body(self, moment: datetime, tz: ZoneInfo | None = None) -> bytes:
        """The exports/json body the feed would serve for a snapshot at `moment` (whole minutes), byte for
        byte, in `tz` (default Europe/Paris, as the feed): ~10 times faster than rendering its records, as
        each segment's constant fields are serialized once (for the demo's simulated history)."""
        moment = moment.replace(second=0, microsecond=0)
        stamp = json.dumps(moment.astimezone(tz or self._paris).isoformat())
        parts = []
        for (template, ordered), (speed, travel_time, reliability, status, probes) in zip(
            self._record_templates(), self.measures(moment), strict=True
        ):
            values = (stamp, speed, travel_time, reliability, _STATUS_JSON[status], probes)
            parts.append(template % values if ordered else template % dict(zip(_DYNAMIC_FIELDS, values, strict=True)))
        return _json_array(parts).encode("ascii")

    def _record_templates(self) -> list[tuple[str, bool]]:
        """Per segment, its record's JSON text with a %-placeholder for each dynamic field, and whether they
        come in _DYNAMIC_FIELDS order (positional formatting) or not (by name)."""
        if self._templates is None:
            templates = []
            for seg in self.segments:
                marked = dict(seg.record)
                for name in _DYNAMIC_FIELDS:  # assigned in the order _simulate assigns them
                    marked[name] = f"\x00{name}\x00"
                text = json.dumps(marked).replace("%", "%%")
                order = [name for name in marked if name in _DYNAMIC_FIELDS]
                ordered = order == list(_DYNAMIC_FIELDS)
                for name in _DYNAMIC_FIELDS:
                    text = text.replace(json.dumps(f"\x00{name}\x00"), "%s" if ordered else f"%({name})s")
                templates.append((text, ordered))
            self._templates = templates
        return self._templates

    # -- closures ----------------------------------------------------------------------------------

    def _closed(self, minute: int) -> set[int]:
        """Segments closed at this minute (epoch minutes): incidents, and planned night works."""
        hour = minute // 60
        closed = {
            index
            for started in range(hour - math.ceil(_INCIDENT_MINUTES[1] / 60), hour + 1)
            for index, start, end in self._incidents(started)
            if start <= minute < end
        }
        local_day = datetime.fromtimestamp(minute * 60, self._paris).date()
        for evening in (local_day - timedelta(days=1), local_day):
            for indices, start, end in self._roadworks(evening):
                if start <= minute < end:
                    closed.update(indices)
        return closed

    def _incidents(self, hour: int) -> list[tuple[int, int, int]]:
        """Incidents starting in one simulated hour (epoch hours): a Poisson draw of a very rare event, each
        (segment index, first minute, end minute) with a random start in the hour and a random duration."""

        def draw() -> list[tuple[int, int, int]]:
            rng = random.Random(f"{self.seed}|incidents|{hour}")
            expected = _INCIDENT_PROBABILITY * len(self.segments)
            count, threshold, product = 0, math.exp(-expected), rng.random()
            while product > threshold:
                count += 1
                product *= rng.random()
            incidents = []
            for index in rng.sample(range(len(self.segments)), min(count, len(self.segments))):
                start = hour * 60 + rng.randrange(60)
                incidents.append((index, start, start + rng.randint(*_INCIDENT_MINUTES)))
            return incidents

        return self._incident_hours.get(hour, draw)

    def _roadworks(self, evening: date) -> list[tuple[tuple[int, ...], int, int]]:
        """Night works starting on the evening of a Rennes date: (segment indices, first and end minute)."""

        def draw() -> list[tuple[tuple[int, ...], int, int]]:
            rng = random.Random(f"{self.seed}|roadworks|{evening.isoformat()}")
            weeknight = evening.weekday() in (6, 0, 1, 2, 3)  # Sunday to Thursday evenings
            if not weeknight or rng.random() >= _ROADWORKS_PROBABILITY or not self._main_roads:
                return []
            members = self._main_roads[rng.randrange(len(self._main_roads))]
            length = min(rng.randint(1, 3), len(members))
            first = rng.randrange(len(members) - length + 1)
            start = datetime.combine(evening, time_of_day(21), self._paris) + timedelta(minutes=rng.randrange(90))
            end = datetime.combine(evening + timedelta(days=1), time_of_day(5), self._paris)
            end += timedelta(minutes=rng.randrange(60))
            return [(tuple(members[first : first + length]), int(start.timestamp()) // 60, int(end.timestamp()) // 60)]

        return self._roadworks_nights.get(evening, draw)

    def _roads_for_works(self) -> list[list[int]]:
        """The segment indices of each main road with two segments or more, roads in name order."""
        roads: dict[str, list[int]] = {}
        for index, seg in enumerate(self.segments):
            if seg.record.get("hierarchie") in _ROADWORKS_HIERARCHIES:
                roads.setdefault(str(seg.record.get("denomination")), []).append(index)
        return [members for _, members in sorted(roads.items()) if len(members) >= 2]

    @staticmethod
    def _reliability(probes: int, u_rel: float, u_level: float) -> int:
        """0 without probes; capped by the probe count (60, 75, 90, 100), often below the cap."""
        if probes <= 0:
            return 0
        cap = _RELIABILITY_CAP.get(probes, 100)
        if u_rel < 0.45:
            return round(cap * (0.17 + 0.83 * u_level))
        return cap


# --------------------------------------------------------------------------------------------------
# Rendering records into the three payload shapes


_CAMEL_KEYS = {
    "datetime": "dateTime",
    "predefinedlocationreference": "predefinedLocationReference",
    "averagevehiclespeed": "averageVehicleSpeed",
    "traveltime": "travelTime",
    "traveltimereliability": "travelTimeReliability",
    "trafficstatus": "trafficStatus",
    "vehicleprobemeasurement": "vehicleProbeMeasurement",
    "geo_point_2d": "geoPoint2d",
    "geo_shape": "geoShape",
    "gml_id": "gmlId",
    "id_rva_troncon_fcd_v1_1": "idRvaTronconFcdV11",
    "hierarchie_dv": "hierarchieDv",
    "sens_circule": "sensCircule",
    "vitesse_maxi": "vitesseMaxi",
}


def _retime(record: dict[str, Any], tz: ZoneInfo) -> dict[str, Any]:
    """The record with its datetime rendered in `tz` (the same instant)."""
    value = record.get("datetime")
    if not isinstance(value, str):
        return record
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return record
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    out = dict(record)
    out["datetime"] = moment.astimezone(tz).isoformat()
    return out


def _v1_record(record: dict[str, Any], moment: datetime | None) -> dict[str, Any]:
    """Legacy v1 wrapping: geo_point_2d as [lat, lon], bare geo_shape, null fields omitted."""
    fields: dict[str, Any] = {}
    for key, value in record.items():
        if value is None:
            continue
        if key == "geo_point_2d" and isinstance(value, dict):
            value = [value.get("lat"), value.get("lon")]
        elif key == "geo_shape":
            value = _geometry(value)
        fields[key] = value
    identity = "|".join(str(record.get(k)) for k in ("predefinedlocationreference", "gml_id", "datetime"))
    out: dict[str, Any] = {
        "datasetid": DATASET,
        "recordid": hashlib.sha1(identity.encode()).hexdigest(),  # one id per record and snapshot
        "fields": fields,
    }
    point = record.get("geo_point_2d")
    if isinstance(point, dict):
        out["geometry"] = {"type": "Point", "coordinates": [point.get("lon"), point.get("lat")]}
    if moment is not None:
        out["record_timestamp"] = _iso_utc(moment)
    return out


def _schema_changed(record: dict[str, Any]) -> dict[str, Any]:
    return {_CAMEL_KEYS.get(key, key): value for key, value in record.items()}


def render_records(records: Iterable[dict[str, Any]], shape: str, tz: ZoneInfo, moment: datetime | None) -> list[str]:
    """Each record as JSON text in one shape: "v2" or "v1", "-schema" appended for camelCase keys."""
    out = []
    for record in records:
        rendered = _retime(record, tz)
        if shape.startswith("v1"):
            rendered = _v1_record(rendered, moment)
            if shape.endswith("-schema"):
                rendered["fields"] = _schema_changed(rendered["fields"])
        elif shape.endswith("-schema"):
            rendered = _schema_changed(rendered)
        out.append(json.dumps(rendered))
    return out


def _shifted(record: dict[str, Any], shift: timedelta) -> dict[str, Any]:
    value = record.get("datetime")
    if not isinstance(value, str):
        return record
    return {**record, "datetime": (datetime.fromisoformat(value) + shift).isoformat()}


def _json_array(parts: Sequence[str]) -> str:
    """Records joined like the real exports stream them: ',' between records, ', ' inside them."""
    return "[" + ",".join(parts) + "]"


# --------------------------------------------------------------------------------------------------
# The server


class ApiError(Exception):
    """An error answered as JSON in the style of the API family that raised it."""

    def __init__(self, status: int, message: str, error_code: str = "InvalidRESTParameterError") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code


class FeedServer(ThreadingHTTPServer):
    """The feed: an HTTP server plus the clock, the snapshot source, the fault switch and a render cache."""

    daemon_threads = True
    block_on_close = False  # a request sleeping in the 'slow' fault must not hold close()

    def __init__(self, config: FeedConfig) -> None:
        if config.interval_s <= 0 or config.speed <= 0:
            raise ValueError("interval_s and speed must be positive")
        self.config = config
        self.source: FileSource | Simulator = self._make_source(config)
        self._clock_start = time.monotonic()
        self._manual_offset = 0
        self._lock = threading.Lock()
        self._fault: str | None = None
        self._fault_remaining: int | None = None
        self.set_fault(config.fault, config.fault_count)
        self._calls = 0
        self._calls_day = datetime.now(UTC).date()
        self._bodies = _LRU(12)
        self._stopping = threading.Event()
        self._serving = False
        super().__init__((config.host, config.port), _Handler)

    @staticmethod
    def _make_source(config: FeedConfig) -> FileSource | Simulator:
        if config.files:
            return FileSource(config.files)
        start = config.start or datetime.now(UTC)
        if start.tzinfo is None:
            start = start.replace(tzinfo=UTC)
        step = config.interval_s
        origin = datetime.fromtimestamp(math.floor(start.timestamp() / step) * step, UTC)
        return Simulator(load_snapshot(config.base or DEFAULT_BASE), config.seed, origin, step)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    # -- clock and control -------------------------------------------------------------------------

    def current_index(self) -> int:
        """The index of the snapshot being served (clock-derived index plus manual advances)."""
        elapsed = time.monotonic() - self._clock_start
        with self._lock:
            offset = self._manual_offset
        return self.source.clamp(math.floor(elapsed * self.config.speed / self.config.interval_s) + offset)

    def advance(self, steps: int = 1) -> int:
        """Move `steps` snapshots on (or back); returns the new index."""
        target = self.current_index() + steps
        with self._lock:
            # Never accumulate an offset past the first (or, for files, the last) snapshot.
            self._manual_offset += steps + self.source.clamp(target) - target
        return self.current_index()

    def set_fault(self, mode: str | None, count: int | None = 1) -> None:
        """Switch a fault on for the next `count` data requests (None = all), or off with None/'none'."""
        if mode in (None, "none") or (count is not None and count <= 0):
            mode, count = None, None
        elif mode not in FAULT_MODES:
            raise ValueError(f"unknown fault mode {mode!r}; expected one of {', '.join(FAULT_MODES)}")
        with self._lock:
            self._fault, self._fault_remaining = mode, count

    def state(self) -> dict[str, Any]:
        index = self.current_index()
        moment = self.source.datetime_at(index)
        with self._lock:
            fault, remaining = self._fault, self._fault_remaining
        return {
            "index": index,
            "datetime": _iso_utc(moment) if moment else None,
            "source": self.source.kind,
            "fault": fault,
            "fault_remaining": remaining,
            "interval_s": self.config.interval_s,
            "speed": self.config.speed,
            "seed": self.config.seed,
            "file": self.source.files[index].name if isinstance(self.source, FileSource) else None,
        }

    def records_at(self, index: int) -> list[dict[str, Any]]:
        """The records of snapshot `index` as stored (simulator datetimes in UTC); for tests and tools."""
        return self.source.records(self.source.clamp(index))

    def _take_fault(self) -> str | None:
        """The fault for this data request, if any, consuming one unit of its count."""
        with self._lock:
            fault = self._fault
            if fault is not None and self._fault_remaining is not None:
                self._fault_remaining -= 1
                if self._fault_remaining <= 0:
                    self._fault, self._fault_remaining = None, None
            return fault

    def _count_call(self) -> int:
        """Count a data request against the daily quota; returns the calls left."""
        today = datetime.now(UTC).date()
        with self._lock:
            if today != self._calls_day:
                self._calls_day, self._calls = today, 0
            self._calls += 1
            return max(CALL_LIMIT - self._calls, 0)

    # -- rendering ---------------------------------------------------------------------------------

    def rendered(self, index: int, shape: str, tz: ZoneInfo) -> list[str]:
        """Per-record JSON texts of one snapshot, cached per (index, shape, timezone)."""
        index = self.source.clamp(index)

        def build() -> list[str]:
            return render_records(self.source.records(index), shape, tz, self.source.datetime_at(index))

        return self._bodies.get((index, shape, str(tz)), build)

    def other_rendered(self, index: int, shape: str, tz: ZoneInfo) -> list[str]:
        """Another snapshot than `index` (another datetime), for the 'inconsistent' fault: the next one,
        else the previous one, else (a single file) the same records one interval later."""
        index = self.source.clamp(index)
        here = self.source.datetime_at(index)
        for candidate in (index + 1, index - 1):
            if self.source.clamp(candidate) == candidate and self.source.datetime_at(candidate) != here:
                return self.rendered(candidate, shape, tz)
        shift = timedelta(seconds=self.config.interval_s)
        records = [_shifted(record, shift) for record in self.source.records(index)]
        return render_records(records, shape, tz, here + shift if here else None)

    # -- lifecycle ---------------------------------------------------------------------------------

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self._serving = True  # from now on close() must shut the loop down
        super().serve_forever(poll_interval)

    def close(self) -> None:
        """Stop serving (if serving) and release the socket."""
        self._stopping.set()
        if self._serving:
            self.shutdown()
        self.server_close()

    def sleep(self, seconds: float) -> None:
        """Sleep that close() interrupts."""
        self._stopping.wait(seconds)


class _Handler(BaseHTTPRequestHandler):
    server: FeedServer
    server_version = "TrafficWatchFeed/1.0"

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the feed serves many polls a minute."""

    # -- plumbing ----------------------------------------------------------------------------------

    def _send(
        self,
        status: int,
        body: bytes | str,
        content_type: str = JSON_TYPE,
        headers: dict[str, str] | None = None,
    ) -> None:
        data = body.encode("utf-8") if isinstance(body, str) else body
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (e.g. timed out on a slow answer)

    def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload), headers=headers)

    # -- routing -----------------------------------------------------------------------------------

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        path = url.path.rstrip("/") or "/"
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        if path == "/health":
            self._send_json(200, {"status": "ok"})
        elif path == "/_feed/state":
            self._send_json(200, self.server.state())
        elif path == V1_PATH or path.startswith(_V2_PREFIX):
            try:
                self._data_request(path, query)
            except Exception as exc:  # a bug must still answer like a server, not drop the connection
                print(f"feed: error on {self.path}: {exc!r}", file=sys.stderr)
                self._send_json(500, {"status_code": 500, "message": "Internal error", "error_code": "InternalError"})
        else:
            self._send_json(404, {"status_code": 404, "message": f"Not found: {path}", "error_code": "NotFound"})

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        path = url.path.rstrip("/")
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        try:
            if path == "/_feed/advance":
                self.server.advance(int(query.get("steps", "1")))
            elif path == "/_feed/fault":
                count_text = query.get("count", "1")
                count = None if count_text in ("all", "") else int(count_text)
                if not query.get("mode"):
                    raise ValueError("mode is required: one of " + ", ".join((*FAULT_MODES, "none")))
                self.server.set_fault(query["mode"], count)
            else:
                self._send_json(404, {"status_code": 404, "message": f"Not found: {path}", "error_code": "NotFound"})
                return
        except ValueError as exc:
            self._send_json(400, {"status_code": 400, "message": str(exc), "error_code": "BadRequest"})
            return
        self._send_json(200, self.server.state())

    # -- data endpoints ----------------------------------------------------------------------------

    def _data_request(self, path: str, query: dict[str, str]) -> None:
        is_v1 = path == V1_PATH
        remaining = self.server._count_call()
        reset = _next_midnight_utc()
        headers = {
            "X-RateLimit-Limit": str(CALL_LIMIT),
            "X-RateLimit-Remaining": str(remaining),
            "X-RateLimit-Reset": reset.isoformat(),
        }
        try:
            kind = self._endpoint(path, query, is_v1)
            fault = self.server._take_fault()
            if fault and self._answer_fault(fault, headers, reset):
                return
            tz = self._timezone(query)
            index = self.server.current_index()
            body = self._body(kind, query, tz, index, fault)
        except ApiError as err:
            self._send_error(err, is_v1, headers)
            return
        if fault == "truncated":
            body = body[: len(body) // 2]  # ASCII-only JSON: cutting characters cuts bytes
        self._send(200, body, headers=headers)

    @staticmethod
    def _endpoint(path: str, query: dict[str, str], is_v1: bool) -> str:
        if is_v1:
            if query.get("dataset") != DATASET:
                raise ApiError(404, f"Unknown dataset: {query.get('dataset', '')}", "UnknownDataset")
            return "v1"
        if path == EXPORTS_PATH:
            return "exports"
        if path == RECORDS_PATH:
            return "records"
        dataset = path[len(_V2_PREFIX) :].split("/", 1)[0]
        if dataset != DATASET:
            raise ApiError(404, f"Unknown dataset: {dataset}", "UnknownDatasetError")
        raise ApiError(404, f"Not found: {path}", "NotFound")

    def _send_error(self, err: ApiError, is_v1: bool, headers: dict[str, str]) -> None:
        if is_v1:
            payload: dict[str, Any] = {"error": err.message}
        else:
            payload = {"status_code": err.status, "message": err.message, "error_code": err.error_code}
        self._send_json(err.status, payload, headers)

    def _answer_fault(self, fault: str, headers: dict[str, str], reset: datetime) -> bool:
        """Answer the faults that replace the response; True when the request is done."""
        if fault == "http500":
            raise ApiError(500, "An unexpected error happened, please retry later.", "InternalServerError")
        if fault == "http429":
            reset_text = reset.isoformat()
            body = {
                "errorcode": 10002,
                "reset_time": reset_text,
                "limit_time_unit": "day",
                "call_limit": CALL_LIMIT,
                "error": "Too many requests on the domain. Please contact the domain administrator.",
            }
            limited = {**headers, "X-RateLimit-Remaining": "0", "Retry-After": str(self.server.config.retry_after_s)}
            self._send_json(429, body, limited)
            return True
        if fault == "html200":
            self._send(200, _PROXY_PAGE, HTML_TYPE, headers)
            return True
        if fault == "slow":
            self.server.sleep(self.server.config.slow_s)
        return False

    @staticmethod
    def _timezone(query: dict[str, str]) -> ZoneInfo:
        name = query.get("timezone") or DEFAULT_TIMEZONE
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            raise ApiError(400, f"Invalid value for timezone API parameter: {name} is not a valid timezone.") from None

    def _body(self, kind: str, query: dict[str, str], tz: ZoneInfo, index: int, fault: str | None) -> str:
        shape = ("v1" if kind == "v1" else "v2") + ("-schema" if fault == "schema" else "")
        parts = [] if fault == "empty" else self.server.rendered(index, shape, tz)
        if fault == "inconsistent" and parts:
            parts = self._mixed(parts, kind, query, shape, tz, index)
        if kind == "exports":
            start, stop = _exports_window(query, len(parts))
            return _json_array(parts[start:stop])
        if kind == "records":
            limit, offset = _records_window(query)
            total = len(parts)
            return f'{{"total_count": {total}, "results": {_json_array(parts[offset : offset + limit])}}}'
        rows, start = _v1_window(query)
        params = {"dataset": DATASET, "rows": rows, "start": start, "format": "json", "timezone": str(tz)}
        records = _json_array(parts[start : start + rows])
        head = f'{{"nhits": {len(parts)}, "parameters": {json.dumps(params)}'
        return f'{head}, "records": {records}, "facet_groups": []}}'

    def _mixed(
        self, parts: list[str], kind: str, query: dict[str, str], shape: str, tz: ZoneInfo, index: int
    ) -> list[str]:
        """Records from two snapshots: later pages (records) or the second half (exports, v1)."""
        other_parts = self.server.other_rendered(index, shape, tz)
        if kind == "records":
            offset = _int_param(query, "offset", 0)
            return other_parts if offset > 0 else parts
        half = len(parts) // 2
        return parts[:half] + other_parts[half:]


def _int_param(query: dict[str, str], name: str, default: int) -> int:
    text = query.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise ApiError(400, f"Invalid value for {name} API parameter: {text} is not an integer.") from None


def _records_window(query: dict[str, str]) -> tuple[int, int]:
    """(limit, offset) of a v2.1 records request, validated like the real API."""
    limit = _int_param(query, "limit", RECORDS_DEFAULT_LIMIT)
    offset = _int_param(query, "offset", 0)
    if not -1 <= limit <= RECORDS_MAX_LIMIT:
        raise ApiError(
            400,
            f"Invalid value for limit API parameter: {limit} was found but -1 <= limit <= "
            f"{RECORDS_MAX_LIMIT} is expected.",
        )
    if limit == -1:
        limit = RECORDS_MAX_LIMIT
    if offset < 0:
        raise ApiError(400, f"Invalid value for offset API parameter: {offset} was found but >= 0 is expected.")
    _check_window(offset, limit)
    return limit, offset


def _exports_window(query: dict[str, str], total: int) -> tuple[int, int]:
    """Exports return everything; `limit` (-1 = all) and `offset` slice it."""
    limit = _int_param(query, "limit", -1)
    offset = _int_param(query, "offset", 0)
    if limit < -1 or offset < 0:
        raise ApiError(400, "Invalid value for limit or offset API parameter.")
    if offset:
        _check_window(offset, total if limit == -1 else limit)
    return offset, total if limit == -1 else offset + limit


def _v1_window(query: dict[str, str]) -> tuple[int, int]:
    rows = _int_param(query, "rows", V1_DEFAULT_ROWS)
    start = _int_param(query, "start", 0)
    if not 0 <= rows <= V1_MAX_ROWS or start < 0 or start + rows > MAX_WINDOW:
        raise ApiError(400, f"Invalid value for rows or start parameter: rows must be within 0..{V1_MAX_ROWS}.")
    return rows, start


def _check_window(offset: int, limit: int) -> None:
    if offset + limit > MAX_WINDOW:
        raise ApiError(
            400,
            f"Invalid value for sum of offset + limit API parameter: {offset + limit} was found but "
            f"<= {MAX_WINDOW} is expected.",
        )


# --------------------------------------------------------------------------------------------------
# Entry points


def make_server(config: FeedConfig) -> FeedServer:
    """The feed, bound to its port (0 picks a free one) but not yet serving."""
    return FeedServer(config)


def start_in_thread(config: FeedConfig) -> FeedServer:
    """The feed serving in a daemon thread; `server.close()` stops it."""
    server = make_server(config)
    server._serving = True  # set before the thread starts so an immediate close() still shuts down
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="trafficwatch-feed", daemon=True)
    thread.start()
    return server


def serve(config: FeedConfig) -> None:
    """Serve until SIGTERM or SIGINT (blocking)."""
    server = make_server(config)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    server._serving = True
    thread = threading.Thread(target=server.serve_forever, args=(0.1,), name="trafficwatch-feed", daemon=True)
    thread.start()
    try:
        print(f"feed: serving {server.source.describe()} on {server.url}", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        server.close()
        thread.join(timeout=5)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":  # pragma: no cover - `trafficwatch feed` is the supported entry point
    serve(FeedConfig(port=int(sys.argv[1]) if len(sys.argv) > 1 else 8090))
