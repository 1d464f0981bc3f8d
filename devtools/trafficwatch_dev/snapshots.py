"""Snapshots as the local feed serves them: the packaged real base snapshot, snapshot files replayed in
order, and the rendering of records into the API's three payload shapes (v2.1 exports and records, v1)."""

from __future__ import annotations

import gzip
import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from trafficwatch.config import DATASET

DEFAULT_BASE = Path(__file__).resolve().parent / "data" / "rennes_base_snapshot.json.gz"
DEFAULT_TIMEZONE = "Europe/Paris"  # how the sample renders datetimes (+02:00 in summer)


def load_snapshot(path: Path) -> list[dict[str, Any]]:
    """Read an exports/json snapshot (a bare JSON array), plain or gzipped."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    data = json.loads(raw.decode("utf-8"))
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a bare JSON array of records (exports/json shape)")
    return data


def geometry(geo_shape: Any) -> dict[str, Any] | None:
    """The bare geometry of a geo_shape, with or without its Feature wrapper."""
    if not isinstance(geo_shape, dict):
        return None
    if geo_shape.get("type") == "Feature":
        return geo_shape.get("geometry")
    return geo_shape


def iso_utc(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat()


class LRU:
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
        self._cache = LRU(4)
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
            value = geometry(value)
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
        out["record_timestamp"] = iso_utc(moment)
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


def shifted(record: dict[str, Any], shift: timedelta) -> dict[str, Any]:
    value = record.get("datetime")
    if not isinstance(value, str):
        return record
    return {**record, "datetime": (datetime.fromisoformat(value) + shift).isoformat()}


def json_array(parts: Sequence[str]) -> str:
    """Records joined like the real exports stream them: ',' between records, ', ' inside them."""
    return "[" + ",".join(parts) + "]"


# --------------------------------------------------------------------------------------------------
