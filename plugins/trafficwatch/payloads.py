"""The normalizer of every payload shape of Rennes real-time traffic, and the rules a snapshot must meet.

Three endpoints give the same snapshot in three shapes (see `../shared/docs/rennes-api.md`):

- `exports`: one call, a bare JSON array of v2.1 records;
- `records`: pages of `{"total_count", "results"}`, at most 100 records each;
- `v1`: the legacy search API, `{"nhits", "records": [{"fields": {...}}]}` with `[lat, lon]` points,
  bare geometries and null fields omitted.

A paged read is landed as a JSON array of the page bodies, each byte for byte (see `source`).
`normalize_payload` recognises the shape from the content itself, so a landed object needs no side
information to be read back. The lake reads landed objects with this module alone, without the HTTP client.
"""

from __future__ import annotations

import json
import operator
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec
import polars as pl

from trafficwatch.config import Settings

Scalar = int | float | str | None  # values stay as sent; the lake enforces types row by row


class _Geometry(msgspec.Struct, gc=False):
    type: str
    coordinates: msgspec.Raw  # kept as JSON text: decoding every float would triple the parse time


class _Shape(msgspec.Struct, gc=False):
    """`geo_shape`: a GeoJSON Feature (v2.1) or a bare geometry (v1)."""

    type: str | None = None
    geometry: _Geometry | None = None
    coordinates: msgspec.Raw = msgspec.Raw(b"null")


class _LonLat(msgspec.Struct, gc=False):
    """`geo_point_2d` as v2.1 sends it (v1 sends `[lat, lon]`). A string (`"NaN"`) is kept so that the lake
    rejects that row, not the whole snapshot."""

    lon: float | str | None = None
    lat: float | str | None = None


class _Record(msgspec.Struct, gc=False):
    datetime: str
    predefinedlocationreference: str
    averagevehiclespeed: Scalar = None
    traveltime: Scalar = None
    traveltimereliability: Scalar = None
    trafficstatus: Scalar = None
    vehicleprobemeasurement: Scalar = None
    geo_point_2d: _LonLat | list[float] | None = None
    geo_shape: _Shape | None = None
    gml_id: Scalar = None
    id_rva_troncon_fcd_v1_1: Scalar = None
    hierarchie: Scalar = None
    hierarchie_dv: Scalar = None
    denomination: Scalar = None
    insee: Scalar = None
    sens_circule: Scalar = None
    vitesse_maxi: Scalar = None
    func_class: Scalar = None  # pre-2023 schema only


class _Page(msgspec.Struct):
    total_count: int
    results: list[_Record]


class _V1Item(msgspec.Struct):
    fields: _Record


class _V1Search(msgspec.Struct):
    nhits: int
    records: list[_V1Item]


_DECODE_EXPORTS = msgspec.json.Decoder(list[_Record])
_DECODE_PAGES = msgspec.json.Decoder(list[_Page])
_DECODE_PAGE = msgspec.json.Decoder(_Page)
_DECODE_V1 = msgspec.json.Decoder(_V1Search)

# Source field -> normalized column. Every column exists in every snapshot frame (null when the source
# did not send it, as the pre-2023 schema and v1's omitted nulls do).
FIELD_MAP: dict[str, str] = {
    "predefinedlocationreference": "segment_key",
    "averagevehiclespeed": "speed_kmh",
    "traveltime": "travel_time_s",
    "traveltimereliability": "reliability_pct",
    "trafficstatus": "traffic_status",
    "vehicleprobemeasurement": "probe_count",
    "gml_id": "gml_id",
    "id_rva_troncon_fcd_v1_1": "segment_id",
    "hierarchie": "hierarchy",
    "hierarchie_dv": "hierarchy_dv",
    "denomination": "road_name",
    "insee": "insee",
    "sens_circule": "direction",
    "vitesse_maxi": "speed_limit_kmh",
    "func_class": "func_class",
}
NORMALIZED_COLUMNS: tuple[str, ...] = (
    "record_index",
    "measured_at",
    *FIELD_MAP.values(),
    "point_lon",
    "point_lat",
    "geometry",
)
REQUIRED_FIELDS = ("datetime", "predefinedlocationreference")
# Fields every published schema carries (v2.1, the pre-2023 one, v1): a snapshot where no record has one
# of them is a renamed or dropped field upstream, not a snapshot of unmeasured roads.
MEASURE_FIELDS = ("averagevehiclespeed", "traveltime", "trafficstatus")
# The dataset is younger than this: an earlier upstream time is a broken clock or a broken payload.
EARLIEST_PLAUSIBLE = datetime(2000, 1, 1, tzinfo=UTC)


class SourceError(Exception):
    """A fetch or a payload that cannot be used. `reason` is one line naming the cause.

    `body` holds the bytes received, when there were any, so the caller can quarantine them.
    """

    def __init__(self, reason: str, body: bytes | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.body = body


@dataclass(frozen=True)
class Snapshot:
    """One upstream snapshot, normalized: one row per record, all sharing `measured_at` (UTC).

    `frame` has NORMALIZED_COLUMNS; values keep the types the API sent (the lake casts and validates),
    `geometry` is the bare GeoJSON geometry as compact text (`{"type":...,"coordinates":...}`), and
    `record_index` the record's position in the payload.
    """

    measured_at: datetime
    upstream_datetime: str
    frame: pl.DataFrame

    @property
    def record_count(self) -> int:
        return self.frame.height


def parse_json(body: bytes, what: str = "payload") -> Any:
    """Parse JSON bytes; an error names the byte offset, as operators need to find it.

    `NaN` and `Infinity` (which Python's parser accepts) stay strings, so the lake rejects the rows that
    carry them instead of storing them as nulls.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SourceError(f"{what} is not UTF-8 (bad byte at {exc.start})", body) from None
    try:
        return json.loads(text, parse_constant=str)
    except json.JSONDecodeError as exc:
        byte_at = len(text[: exc.pos].encode("utf-8"))
        raise SourceError(f"invalid JSON at byte {byte_at} of {len(body)}: {exc.msg}", body) from None
    except RecursionError:
        raise SourceError(f"invalid JSON: {what} is nested too deeply to be a snapshot", body) from None


def _shape_of(document: Any) -> str:
    """Tell which endpoint produced a parsed payload."""
    if isinstance(document, dict):
        if "records" in document and "nhits" in document:
            return "v1"
        if "results" in document and "total_count" in document:
            return "records-page"
    if isinstance(document, list):
        if not document:
            return "exports"
        first = document[0]
        if isinstance(first, dict) and "results" in first and "total_count" in first:
            return "records"
        if isinstance(first, dict):
            return "exports"
    return "unknown"


def _describe(document: Any) -> str:
    if isinstance(document, dict):
        return f"an object with keys {sorted(document)[:6]}"
    if isinstance(document, list):
        return f"an array of {type(document[0]).__name__ if document else 'nothing'}"
    return f"a JSON {type(document).__name__}"


def raw_records(document: Any) -> tuple[list[dict[str, Any]], str, int | None]:
    """Return the source records of a parsed payload, its shape and the count the API announced."""
    shape = _shape_of(document)
    if shape == "exports":
        return document, shape, None
    if shape == "records-page":
        return document["results"], "records", document["total_count"]
    if shape == "records":
        totals = {page.get("total_count") for page in document if isinstance(page, dict)}
        if len(totals) != 1:
            raise SourceError(f"inconsistent snapshot: pages announce different total_count {sorted(totals)}")
        records = [record for page in document for record in page.get("results") or []]
        return records, shape, totals.pop()
    if shape == "v1":
        records = []
        for item in document["records"]:
            fields = dict(item.get("fields") or {})
            records.append(fields)
        return records, shape, document["nhits"]
    raise SourceError(
        f"not the expected payload shape: expected an exports array, records pages or a v1 search "
        f"result, got {_describe(document)}"
    )


def parse_datetime(value: str) -> datetime:
    """An upstream `datetime` as an aware UTC datetime; a value without offset is taken as UTC.

    Never raises anything but SourceError: years 1 and 9999 overflow on conversion, and any time before
    EARLIEST_PLAUSIBLE is refused as implausible.
    """
    try:
        parsed = datetime.fromisoformat(value)
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        parsed = parsed.astimezone(UTC)
    except (TypeError, ValueError):
        raise SourceError(f"unreadable datetime {str(value)[:40]!r}") from None
    except OverflowError:
        raise SourceError(f"implausible time: datetime {value!r} is out of range") from None
    if parsed < EARLIEST_PLAUSIBLE:
        raise SourceError(f"implausible time: datetime {value!r} is before {EARLIEST_PLAUSIBLE:%Y-%m-%d}")
    return parsed


@dataclass(frozen=True)
class SnapshotRules:
    """What makes a well-formed snapshot plausible enough to land or merge (see `check_plausible`)."""

    min_records: int
    future_tolerance_s: float

    @classmethod
    def of(cls, settings: Settings) -> SnapshotRules:
        return cls(settings.min_records, settings.future_tolerance_s)


def check_plausible(snapshot: Snapshot, reference: datetime, reference_name: str, rules: SnapshotRules) -> None:
    """Refuse a snapshot from the future (beyond a tolerance, relative to its fetch or landing) and a
    snapshot far smaller than the network. Old snapshots are welcome: archives and replays."""
    ahead_s = (snapshot.measured_at - reference).total_seconds()
    if ahead_s > rules.future_tolerance_s:
        raise SourceError(
            f"implausible time: snapshot {snapshot.measured_at:%Y-%m-%dT%H:%M:%SZ} is {ahead_s:.0f} s after "
            f"its {reference_name} ({reference:%Y-%m-%dT%H:%M:%SZ}; tolerance {rules.future_tolerance_s:.0f} s, "
            "TRAFFICWATCH_FUTURE_TOLERANCE)"
        )
    if snapshot.record_count < rules.min_records:
        raise SourceError(
            f"too few records: {snapshot.record_count} in snapshot {snapshot.measured_at:%Y-%m-%dT%H:%M:%SZ}, "
            f"fewer than {rules.min_records} (TRAFFICWATCH_MIN_RECORDS): a partial answer, not the network"
        )


def _decode_fast(body: bytes) -> tuple[list[_Record], str, int | None] | None:
    """Typed decoding of the shape the first bytes announce (~8 ms for a whole snapshot); None if it fails."""
    head = body[:64].lstrip()
    try:
        if re.match(rb'\[\s*\{\s*"total_count"', head):
            pages = _DECODE_PAGES.decode(body)
            if len({page.total_count for page in pages}) != 1:
                return None  # the checked path names the inconsistency
            return [record for page in pages for record in page.results], "records", pages[0].total_count
        if re.match(rb'\{\s*"total_count"', head):
            page = _DECODE_PAGE.decode(body)
            return page.results, "records", page.total_count
        if re.match(rb'\{\s*"nhits"', head):
            search = _DECODE_V1.decode(body)
            return [item.fields for item in search.records], "v1", search.nhits
        if head.startswith(b"["):
            return _DECODE_EXPORTS.decode(body), "exports", None
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
        return None  # the checked path names the problem
    return None


def _decode_checked(body: bytes) -> tuple[list[_Record], str, int | None]:
    """The slow path, taken only by payloads the fast path refused: find out exactly what is wrong."""
    document = parse_json(body)
    records, shape, announced = raw_records(document)
    if not records:
        raise SourceError(f"empty snapshot: 0 records in the {shape} payload", body)
    _check_fields(records, body)
    try:
        return _DECODE_EXPORTS.decode(msgspec.json.encode(records)), shape, announced
    except msgspec.ValidationError as exc:
        raise SourceError(f"not the expected payload shape: {exc}", body) from None
    except UnicodeEncodeError:  # a lone surrogate escape such as "\ud800": JSON text no UTF-8 can hold
        raise SourceError("payload is not UTF-8 text: a string holds a lone surrogate escape", body) from None


def _geometry_text(shape: _Shape | None) -> str | None:
    """The bare geometry as compact GeoJSON text, the same bytes whichever endpoint sent it."""
    if shape is None:
        return None
    if shape.type == "Feature":
        geometry = shape.geometry
    elif shape.type and bytes(shape.coordinates) != b"null":  # v1 sends the bare geometry
        geometry = _Geometry(shape.type, shape.coordinates)
    else:
        geometry = None
    if geometry is None:
        return None
    coordinates = bytes(geometry.coordinates).translate(None, b" \t\r\n").decode()  # numbers only: no strings
    return f'{{"type":"{geometry.type}","coordinates":{coordinates}}}'


def _points(values: tuple[_LonLat | list[float] | None, ...]) -> tuple[list[Any], list[Any]]:
    """Longitudes and latitudes from `{"lon", "lat"}` (v2.1) or `[lat, lon]` (v1) points (anything but a
    number becomes null when cast: the lake rejects a row without both)."""
    lons = [p.lon if p.__class__ is _LonLat else (p[1] if p and len(p) == 2 else None) for p in values]
    lats = [p.lat if p.__class__ is _LonLat else (p[0] if p and len(p) == 2 else None) for p in values]
    return lons, lats


_FIELD_VALUES = operator.attrgetter(*FIELD_MAP, "geo_point_2d", "geo_shape")


def _frame(records: list[_Record], measured_at: datetime) -> pl.DataFrame:
    """The records as columns. Fields are read one record at a time with a single attrgetter call and
    transposed with zip: a whole snapshot costs a few milliseconds, the budget of a one-minute merge."""
    *fields, points, shapes = zip(*map(_FIELD_VALUES, records), strict=True)
    columns: dict[str, pl.Series] = {
        "record_index": pl.Series(range(len(records)), dtype=pl.Int32),
        "measured_at": pl.Series([measured_at], dtype=pl.Datetime("us", "UTC")).extend_constant(
            measured_at, len(records) - 1
        ),
    }
    for column, values in zip(FIELD_MAP.values(), fields, strict=True):
        columns[column] = pl.Series(list(values), strict=False)
    lons, lats = _points(points)
    columns["point_lon"] = pl.Series(lons, strict=False).cast(pl.Float64, strict=False)
    columns["point_lat"] = pl.Series(lats, strict=False).cast(pl.Float64, strict=False)
    columns["geometry"] = pl.Series(list(map(_geometry_text, shapes)), dtype=pl.String)
    return pl.DataFrame(columns)


def normalize_payload(body: bytes) -> Snapshot:
    """Parse and check one landed or fetched payload of any shape, and normalize its records.

    Checks the shape, that required fields are there, that every record carries the same upstream
    `datetime`, and that the announced count (records/v1) matches. Values are not validated here:
    that is the lake's job, row by row. Whatever the bytes, the only exception is SourceError, with
    the body, so that the caller can quarantine it.
    """
    try:
        return _normalize(body)
    except SourceError as error:
        raise SourceError(error.reason, body) from None
    except Exception as exc:  # a payload must never stop the pipeline with a traceback
        raise SourceError(f"unreadable payload: {type(exc).__name__}: {str(exc)[:160]}", body) from None


def _normalize(body: bytes) -> Snapshot:
    decoded = _decode_fast(body) or _decode_checked(body)
    records, shape, announced = decoded
    if not records:
        raise SourceError(f"empty snapshot: 0 records in the {shape} payload", body)
    datetimes = {record.datetime for record in records}
    if len(datetimes) > 1:
        shown = ", ".join(sorted(datetimes)[:3])
        reason = f"inconsistent snapshot: {len(datetimes)} different datetime values ({shown})"
        raise SourceError(reason, body)
    if announced is not None and announced != len(records):
        raise SourceError(
            f"record count mismatch: the API announced {announced} records, the payload has {len(records)}",
            body,
        )
    for name in MEASURE_FIELDS:
        if f'"{name}"'.encode() not in body:  # the bytes, not the decoded records: absent, not null
            raise SourceError(
                f"schema drift: no record has the field '{name}', which every published schema carries", body
            )
    upstream = datetimes.pop()
    measured_at = parse_datetime(upstream)
    return Snapshot(measured_at=measured_at, upstream_datetime=upstream, frame=_frame(records, measured_at))


def _check_fields(records: list[Any], body: bytes) -> None:
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise SourceError(f"not the expected payload shape: record {index} is not an object", body)
        missing = [name for name in REQUIRED_FIELDS if record.get(name) in (None, "")]
        if missing:
            keys = ", ".join(sorted(record)[:8])
            raise SourceError(
                f"not the expected payload shape: record {index} has no {', '.join(missing)} (keys: {keys})",
                body,
            )
