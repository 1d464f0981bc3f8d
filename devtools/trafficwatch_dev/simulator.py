"""The simulator: traffic evolved from the real base snapshot, a pure function of (segment, simulated time,
seed), so one moment always renders the same bytes, on any run, and any past minute can be rendered too
(`Simulator.exports_body`: the demo's simulated history, see `trafficwatch_dev.history`)."""

from __future__ import annotations

import hashlib
import json
import math
import operator
import random
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from datetime import time as time_of_day
from typing import Any
from zoneinfo import ZoneInfo

from trafficwatch.geodesy import geometry_length_m
from trafficwatch_dev.snapshots import DEFAULT_TIMEZONE, LRU, geometry, json_array


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


def segment_length_m(geo_shape: Any) -> float:
    """Length of a LineString / MultiLineString along its vertices (the lake's own measure)."""
    shape = geometry(geo_shape) or {}
    if not shape.get("coordinates"):
        return 0.0
    return geometry_length_m(json.dumps(shape)) or 0.0


def _uniforms(key: bytes) -> tuple[float, float, float]:
    """Three deterministic uniforms in [0, 1) from a key (hashlib, unlike hash(), is not salted)."""
    a, b, c = struct.unpack("<3I", hashlib.blake2b(key, digest_size=12).digest())
    return a / 2**32, b / 2**32, c / 2**32


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
        self._cache = LRU(4)
        self._incident_hours = LRU(8)
        self._roadworks_nights = LRU(4)
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
        return json_array(parts).encode("ascii")

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
