"""The normalizer: every payload shape gives the same records; bad payloads give one-line reasons."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime

import pytest

from trafficwatch.payloads import NORMALIZED_COLUMNS, SourceError, normalize_payload, parse_datetime

SAMPLE_RECORDS = 2859


def _records_pages(records: list[dict], limit: int = 100) -> bytes:
    pages = [
        json.dumps({"total_count": len(records), "results": records[offset : offset + limit]})
        for offset in range(0, len(records), limit)
    ]
    return ("[" + ",".join(pages) + "]").encode()


def _v1(records: list[dict]) -> bytes:
    items = []
    for record in records:
        fields = {key: value for key, value in record.items() if value is not None}
        point = fields.pop("geo_point_2d")
        fields["geo_point_2d"] = [point["lat"], point["lon"]]
        fields["geo_shape"] = fields["geo_shape"]["geometry"]
        items.append({"datasetid": "etat-du-trafic-en-temps-reel", "recordid": record["gml_id"], "fields": fields})
    return json.dumps({"nhits": len(records), "parameters": {}, "records": items, "facet_groups": []}).encode()


@pytest.fixture(scope="module")
def sample_records(sample_bytes: bytes) -> list[dict]:
    return json.loads(sample_bytes)


def test_exports_sample_normalizes_to_2859_segments(sample_bytes: bytes) -> None:
    snapshot = normalize_payload(sample_bytes)
    rows = snapshot.frame.to_dicts()
    assert snapshot.record_count == SAMPLE_RECORDS
    assert len({row["segment_key"] for row in rows}) == SAMPLE_RECORDS
    assert snapshot.measured_at == datetime(2024, 8, 26, 10, 43, tzinfo=UTC)
    assert snapshot.upstream_datetime == "2024-08-26T12:43:00+02:00"
    first = rows[0]
    assert tuple(snapshot.frame.columns) == NORMALIZED_COLUMNS
    assert (first["record_index"], rows[-1]["record_index"]) == (0, SAMPLE_RECORDS - 1)
    assert first["segment_key"] == "10273_D"
    assert (first["speed_kmh"], first["travel_time_s"], first["reliability_pct"]) == (72, 10, 60)
    assert (first["point_lon"], first["point_lat"]) == (-1.6502152435538264, 48.044792756860865)
    geometry = json.loads(first["geometry"])
    assert geometry["type"] == "MultiLineString"
    assert geometry["coordinates"][0][0] == [-1.651560961036608, 48.04488583237593]
    statuses = [row["traffic_status"] for row in rows]
    assert {s: statuses.count(s) for s in set(statuses)} == {
        "freeFlow": 1403,
        "heavy": 737,
        "unknown": 607,
        "congested": 112,
    }


def test_records_pages_and_v1_give_the_same_rows_as_exports(sample_bytes: bytes, sample_records: list[dict]) -> None:
    exports = normalize_payload(sample_bytes).frame
    for body in (_records_pages(sample_records), _v1(sample_records)):
        frame = normalize_payload(body).frame
        assert frame.drop("geometry").equals(exports.drop("geometry"))
        parsed = [json.loads(text) for text in frame["geometry"]]
        assert parsed == [json.loads(text) for text in exports["geometry"]]


def test_linestring_geometry_and_missing_optional_fields(sample_records: list[dict]) -> None:
    records = copy.deepcopy(sample_records[:3])
    records[0]["geo_shape"]["geometry"] = {"type": "LineString", "coordinates": [[-1.6, 48.1], [-1.61, 48.11]]}
    del records[1]["geo_shape"]  # older snapshots had records without geometry
    for name in ("vehicleprobemeasurement", "hierarchie", "vitesse_maxi", "insee"):
        del records[2][name]  # the pre-2023 schema had none of these
    rows = normalize_payload(json.dumps(records).encode()).frame.to_dicts()
    assert json.loads(rows[0]["geometry"]) == {"type": "LineString", "coordinates": [[-1.6, 48.1], [-1.61, 48.11]]}
    assert rows[1]["geometry"] is None
    assert rows[1]["speed_kmh"] == records[1]["averagevehiclespeed"]
    assert (rows[2]["probe_count"], rows[2]["hierarchy"], rows[2]["speed_limit_kmh"], rows[2]["insee"]) == (
        None,
        None,
        None,
        None,
    )


def test_v1_point_order_is_lat_lon(sample_records: list[dict]) -> None:
    row = normalize_payload(_v1(sample_records[:1])).frame.row(0, named=True)
    assert row["point_lon"] == sample_records[0]["geo_point_2d"]["lon"]
    assert row["point_lat"] == sample_records[0]["geo_point_2d"]["lat"]
    assert row["point_lon"] < 0 < row["point_lat"]  # Rennes: west of Greenwich, north of the equator


def test_datetime_offsets_convert_to_utc() -> None:
    assert parse_datetime("2024-08-26T12:43:00+02:00") == datetime(2024, 8, 26, 10, 43, tzinfo=UTC)
    assert parse_datetime("2024-08-26T10:43:00") == datetime(2024, 8, 26, 10, 43, tzinfo=UTC)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda b, r: b[: len(b) // 2], r"^invalid JSON at byte \d+ of \d+"),
        (lambda b, r: b"<html><title>502 Bad Gateway</title></html>", r"^invalid JSON at byte 0 "),
        (lambda b, r: b"[]", r"^empty snapshot: 0 records"),
        (lambda b, r: b'{"error": "x"}', r"^not the expected payload shape: .*object with keys \['error'\]"),
        (
            lambda b, r: json.dumps([{k.upper(): v for k, v in r[0].items()}]).encode(),
            r"^not the expected payload shape: record 0 has no datetime, predefinedlocationreference",
        ),
        (
            lambda b, r: json.dumps([r[0], {**r[1], "datetime": "2024-08-26T12:46:00+02:00"}]).encode(),
            r"^inconsistent snapshot: 2 different datetime values",
        ),
        (
            lambda b, r: json.dumps({"nhits": 5, "records": [{"fields": r[0]}]}).encode(),
            r"^record count mismatch: the API announced 5 records, the payload has 1",
        ),
        (
            lambda b, r: (
                "["
                + json.dumps({"total_count": 3, "results": r[:1]})
                + ","
                + json.dumps({"total_count": 4, "results": r[1:3]})
                + "]"
            ).encode(),
            r"^inconsistent snapshot: pages announce different total_count \[3, 4\]",
        ),
    ],
    ids=["truncated", "html", "empty", "object", "renamed-fields", "two-datetimes", "count-mismatch", "pages"],
)
def test_bad_payloads_raise_one_line_reasons(sample_bytes, sample_records, mutate, expected) -> None:
    body = mutate(sample_bytes, sample_records)
    with pytest.raises(SourceError, match=expected) as caught:
        normalize_payload(body)
    assert "\n" not in caught.value.reason
