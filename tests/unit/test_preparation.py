"""Preparing raw objects for a merge (moto S3): many snapshots checked as one batch give each snapshot what
checking it alone gives, and a snapshot that breaks its batch is refused alone."""

from __future__ import annotations

from datetime import UTC, datetime

import polars as pl
import pytest

from tests.support import faultdata
from tests.unit.conftest import BUCKET
from trafficwatch.lake import preparation
from trafficwatch.payloads import SnapshotRules
from trafficwatch.raw import RawObject

RULES = SnapshotRules(min_records=faultdata.MIN_RECORDS, future_tolerance_s=1e9)
LANDED_AT = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
def objects(s3, sample_bytes: bytes) -> list[RawObject]:
    """Seven landed objects: good snapshots, one with a row out of range, one with a segment sent twice, one
    whose func_class column has numbers (the others' holds only nulls: other types, another batch), one
    that is not gzip."""
    records = faultdata.base_records(sample_bytes)
    twice = faultdata.records_at(records, 2)
    twice.append({**twice[5], "vehicleprobemeasurement": 99})
    bodies = [
        faultdata.snapshot(records, 0),
        faultdata.snapshot(records, 1, {3: {"averagevehiclespeed": 420}}),
        faultdata.json.dumps(twice).encode(),
        faultdata.snapshot(records, 3, {0: {"func_class": 3}}),
        faultdata.snapshot(records, 4),
        None,  # not gzip: the payload as it is
        faultdata.snapshot(records, 6),
    ]
    landed = []
    for minute, body in enumerate(bodies):
        key = faultdata.raw_key_at(faultdata.moment(minute))
        stored = faultdata.gz(body) if body is not None else faultdata.snapshot(records, minute)
        s3.put_object(Bucket=BUCKET, Key=key, Body=stored)
        landed.append(RawObject(key, LANDED_AT))
    return landed


def _rows(frame: pl.DataFrame) -> list[tuple]:
    return frame.sort(frame.columns).rows() if frame.height else []


def _counts(prepared: preparation.Prepared) -> list[tuple]:
    return [(c.obj.key, c.records, c.accepted, c.rejected, c.duplicates, c.error) for c in prepared.counts]


def _alone(s3, objects: list[RawObject]) -> list[preparation.Prepared]:
    return [preparation.prepare(s3, BUCKET, [obj], RULES) for obj in objects]


def test_a_batch_gives_each_snapshot_what_it_gets_alone(s3, objects) -> None:
    together = preparation.prepare(s3, BUCKET, objects, RULES)
    alone = _alone(s3, objects)
    assert _counts(together) == [count for prepared in alone for count in _counts(prepared)]
    by_key = {count[0]: count[1:] for count in _counts(together)}
    assert by_key[objects[1].key][:3] == (40, 39, 1)  # speed 420 rejected
    assert by_key[objects[2].key][:4] == (41, 40, 0, 1)  # segment sent twice: one kept
    assert by_key[objects[5].key][4].startswith("not a gzip file")
    observations = pl.concat([p.observations for p in alone])
    assert _rows(together.observations) == _rows(observations)
    assert together.observations.height == 6 * 40 - 1
    kept = together.observations.filter(pl.col("source_key") == objects[2].key, pl.col("probe_count") == 99)
    assert kept.height == 1  # the duplicate with the most probes
    assert _rows(together.rejected) == _rows(pl.concat([p.rejected for p in alone], how="diagonal_relaxed"))
    versions = pl.concat([p.versions for p in alone if p.versions.width])
    assert _rows(together.versions) == _rows(preparation.collapse_versions(versions))


def test_a_snapshot_that_breaks_its_batch_is_refused_alone(s3, objects, monkeypatch) -> None:
    expected = _alone(s3, objects)
    broken = objects[4].key
    checks = preparation.validate

    def validate(frame: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
        if broken in frame["source_key"]:
            raise RuntimeError("a value no check foresaw\nsecond line")
        return checks(frame)

    monkeypatch.setattr(preparation, "validate", validate)
    prepared = preparation.prepare(s3, BUCKET, objects, RULES)
    counts = {count.obj.key: count for count in prepared.counts}
    assert list(counts) == [obj.key for obj in objects]
    assert counts[broken].error == "unreadable: RuntimeError: a value no check foresaw"
    assert counts[broken].body == s3.get_object(Bucket=BUCKET, Key=broken)["Body"].read()
    assert counts[broken].accepted == 0
    others = [p for obj, p in zip(objects, expected, strict=True) if obj.key != broken]
    assert [c for c in _counts(prepared) if c[0] != broken] == [c for p in others for c in _counts(p)]
    assert _rows(prepared.observations) == _rows(pl.concat([p.observations for p in others]))
