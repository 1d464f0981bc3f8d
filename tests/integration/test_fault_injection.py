"""Fault injection (issue 11): whatever S3, a crash, a race, a backfill or bad input does to a merge, the lake
ends holding exactly what the good input gives.

Every scenario ends with the same checks (`assert_lake_holds`), against `tests/support/reference.py`:
traffic_observations holds the distinct (segment, minute) of the good input, road_segments the segment
versions computed from the good snapshots, nothing landed is pending, every bad body is in quarantine/
with its reason in the object's metadata, and bad rows are in rejected_records with theirs.

1. S3 cut by a proxy at each request of a merge onto a lake with history, the answer to each write lost
   (on a fresh lake too: table creations), and S3 gone for good from the first or the last write of a
   CLI merge (which must fail in one line); then a normal merge.
2. SIGKILL of `trafficwatch merge` onto a lake with history before each of its S3 requests from its first
   write on (before that, every kill leaves S3 as it was: one test, at request 1), then a rerun.
3. Two concurrent `trafficwatch merge` on a fresh lake and on one with history, segments changing.
4. Backfill of older snapshots (other segment attributes) under newer merged ones; a replay.
5. Poison objects put straight under raw/, merged with good ones, one by one and all together.
6. The same poisons as API answers: the ingest refuses them with one line and keeps raw/ unchanged.

Snapshots are 40 records of the real sample (tests/support/faultdata.py), so that a merge through the
proxy takes well under a second and every request of it can be tried.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gzip
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import requests

from tests.conftest import SAMPLE
from tests.support import faultdata, reference
from tests.support.faultdata import Poison, Snapshot
from tests.support.rawfeed import RawFeed
from tests.support.s3proxy import CUT, DROP_RESPONSE, HOOK, WRITES, S3Proxy
from tests.support.warm import WarmProcesses
from trafficwatch import lake, storage
from trafficwatch.config import Settings, load_settings
from trafficwatch.landing import IngestError, ingest
from trafficwatch.source import EXPORTS_PATH
from trafficwatch_dev.feed import FeedConfig, start_in_thread

pytestmark = pytest.mark.integration

TRAFFICWATCH = str(Path(sys.executable).parent / "trafficwatch")
# Columns that differ between two runs by design (when they ran), left out of "nothing changed".
RUN_TIME_COLUMNS = {"merged_at", "rejected_at", "batch_id", "observations_version", "segments_version"}
# Upper bounds of the S3 requests (and writes) of the merge the proxy tests interrupt: the tests are
# parametrized up to these, and test_the_proxy_tests_reach_every_request_of_a_merge fails when a merge
# makes more (raise them then).
MAX_MERGE_REQUESTS = 72
MAX_MERGE_WRITES = 16
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


# --------------------------------------------------------------------------- settings, buckets, landing


_clients: dict[tuple[str | None, str], Any] = {}


def s3_client(settings: Settings) -> Any:
    """One boto3 client per endpoint (making one costs tens of milliseconds; they are thread-safe)."""
    where = (settings.s3_endpoint_url, settings.aws_region)
    if where not in _clients:
        _clients[where] = storage.s3_client(settings)
    return _clients[where]


@pytest.fixture(scope="module")
def module_settings(s3_server: str, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Settings on the session's S3 server, where small snapshots are whole snapshots (min_records below
    their 40 records)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ENDPOINT_URL", s3_server)
        env.setenv("AWS_REGION", "us-east-1")
        env.setenv("TRAFFICWATCH_HOME", str(tmp_path_factory.mktemp("fault-home")))
        env.setenv("TRAFFICWATCH_MIN_RECORDS", str(faultdata.MIN_RECORDS))
        env.setenv("TRAFFICWATCH_HTTP_TIMEOUT", "2")
        env.setenv("TRAFFICWATCH_FETCH_BUDGET", "10")
        return load_settings()


@pytest.fixture(scope="module")
def new_bucket(module_settings: Settings) -> Iterator[Callable[[], Settings]]:
    """Makes buckets (settings for each), all deleted at the module's end. Few: SeaweedFS gives every bucket
    volumes of its own and runs out of them after some 120 buckets, after which every write fails."""
    made: list[str] = []

    def make() -> Settings:
        bucket = f"tw-fi-{uuid.uuid4().hex[:12]}"
        s3_client(module_settings).create_bucket(Bucket=bucket)
        made.append(bucket)
        return dataclasses.replace(module_settings, bucket=bucket)

    yield make
    for bucket in made:
        empty_bucket(module_settings, bucket)
        s3_client(module_settings).delete_bucket(Bucket=bucket)


def empty_bucket(settings: Settings, bucket: str) -> None:
    s3 = s3_client(settings)
    keys = storage.list_keys(s3, bucket, "")
    for start in range(0, len(keys), 1000):
        batch = [{"Key": key} for key in keys[start : start + 1000]]
        s3.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})


@pytest.fixture(scope="module")
def workbench(new_bucket: Callable[[], Settings]) -> Settings:
    return new_bucket()


@pytest.fixture
def settings(workbench: Settings) -> Settings:
    """The module's one working bucket, emptied: every test starts from nothing."""
    empty_bucket(workbench, workbench.bucket)
    return workbench


def put(settings: Settings, key: str, body: bytes) -> None:
    """Put an object as it is (no ingest, no check): how bad objects reach raw/."""
    s3_client(settings).put_object(Bucket=settings.bucket, Key=key, Body=body)


def land(settings: Settings, snapshots: list[Snapshot]) -> None:
    for snapshot in snapshots:
        put(settings, snapshot.key, snapshot.stored)


def from_template(settings: Settings, source: str) -> None:
    """Server-side copy of every object of `source` into the settings' bucket (a lake is relative paths)."""
    s3 = s3_client(settings)
    keys = storage.list_keys(s3, source, "")
    with ThreadPoolExecutor(max_workers=8) as pool:
        copies = pool.map(
            lambda key: s3.copy_object(Bucket=settings.bucket, Key=key, CopySource={"Bucket": source, "Key": key}),
            keys,
        )
        list(copies)


def objects(settings: Settings, prefix: str) -> dict[str, bytes]:
    s3 = s3_client(settings)
    return {
        key: s3.get_object(Bucket=settings.bucket, Key=key)["Body"].read()
        for key in storage.list_keys(s3, settings.bucket, prefix)
    }


def through(settings: Settings, proxy: S3Proxy) -> Settings:
    """The same settings, with boto3 and delta-rs talking to S3 through the proxy."""
    return dataclasses.replace(settings, s3_endpoint_url=proxy.url)


def cli_env(settings: Settings, endpoint: str | None = None) -> dict[str, str]:
    """The environment of a `trafficwatch` subprocess for these settings (S3 reached at `endpoint`)."""
    return {
        **os.environ,
        "AWS_ENDPOINT_URL": endpoint or settings.s3_endpoint_url or "",
        "AWS_REGION": settings.aws_region,
        "TRAFFICWATCH_BUCKET": settings.bucket,
        "TRAFFICWATCH_HOME": str(settings.home),
        "TRAFFICWATCH_MIN_RECORDS": str(settings.min_records),
        "TRAFFICWATCH_API_URL": settings.api_url,
    }


def reason_lines(stderr: str) -> list[str]:
    """What a command printed on stderr after its last log line: its reason for failing, if it failed."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    last_log = max((i for i, line in enumerate(lines) if LOG_LINE.match(line)), default=-1)
    return lines[last_log + 1 :]


def assert_clean_cli_output(run: subprocess.CompletedProcess[str], what: str) -> None:
    """No traceback; a failure ends with its reason in one line."""
    assert "Traceback" not in run.stderr, f"{what} printed a traceback:\n{run.stderr[-3000:]}"
    if run.returncode != 0:
        reason = reason_lines(run.stderr)
        assert len(reason) == 1, f"{what} failed (exit {run.returncode}) without one line of reason:\n{run.stderr}"


# --------------------------------------------------------------------------- what the lake must hold


def _sample(items: set[Any], limit: int = 5) -> list[Any]:
    return sorted(items, key=repr)[:limit]


def _versions_diff(actual: list[dict[str, Any]], expected: list[dict[str, Any]], limit: int = 8) -> list[str]:
    """The versions that differ, by (segment_key, valid_from), naming the fields that differ."""
    have = {(v["segment_key"], v["valid_from"]): v for v in actual}
    want = {(v["segment_key"], v["valid_from"]): v for v in expected}
    lines = []
    for key in sorted(have.keys() | want.keys()):
        name = f"{key[0]} from {key[1]:%H:%M}"
        if key not in have:
            lines.append(f"missing {name}: {want[key]}")
        elif key not in want:
            lines.append(f"unexpected {name}: {have[key]}")
        elif have[key] != want[key]:
            got, wanted = have[key], want[key]
            fields = [f"{f}={got[f]!r} (expected {wanted[f]!r})" for f in wanted if got[f] != wanted[f]]
            lines.append(f"{name}: {', '.join(fields)}")
    return lines[:limit] + ([f"... {len(lines) - limit} more"] if len(lines) > limit else [])


def assert_lake_holds(settings: Settings, good: list[bytes], poisons: Sequence[Poison] = ()) -> None:
    """The checks every scenario ends with.

    `good`: the payloads whose rows must be in the lake (for a row-level poison, its `good_payload`);
    `poisons`: the bad inputs, snapshot-level ones expected in quarantine/, row-level ones in
    rejected_records, each with a reason matching its pattern.
    """
    tables = lake.ensure_tables(settings)
    options = lake.storage_options(settings)
    rows = lake.scan_table(tables[lake.OBSERVATIONS], options).select("segment_key", "measured_at").collect().rows()
    expected, expected_versions = _expected(tuple(good))
    found = set(rows)
    assert len(rows) == len(found), f"{len(rows) - len(found)} duplicate observations"
    assert found == expected, (
        f"observations: {len(found)} (segment, minute) keys, expected {len(expected)}; "
        f"missing {_sample(expected - found)}, unexpected {_sample(found - expected)}"
    )

    actual_versions = reference.actual_versions(settings)
    if actual_versions != expected_versions:
        differences = "\n  ".join(_versions_diff(actual_versions, expected_versions))
        pytest.fail(
            f"road_segments: {len(actual_versions)} versions, expected {len(expected_versions)}:\n  {differences}"
        )

    s3 = s3_client(settings)
    pending = lake.pending_raw(settings, s3, tables)
    assert pending == [], f"still pending: {[obj.key for obj in pending]}"

    quarantined = quarantine_of(settings)
    for poison in poisons:
        if poison.snapshot_level:
            candidates = {poison.stored, gunzip_or_none(poison.stored)}
            reasons = [reason for body, reason in quarantined if body in candidates]
            assert reasons, f"{poison.name}: {poison.key} is not in quarantine/ (it holds {len(quarantined)})"
            assert all("\n" not in reason for reason in reasons), reasons
            assert any(re.search(poison.reason, reason, re.IGNORECASE) for reason in reasons), (
                f"{poison.name}: quarantined with reason {reasons!r}, expected /{poison.reason}/"
            )
    rejected = lake.scan_table(tables[lake.REJECTED], options).select("source_key", "record_index", "reason").collect()
    expected_rejected = {(p.key, index) for p in poisons for index in p.bad_rows}
    found_rejected = {(key, index) for key, index, _ in rejected.rows()}
    assert found_rejected == expected_rejected, (
        f"rejected_records: missing {_sample(expected_rejected - found_rejected)}, "
        f"unexpected {_sample(found_rejected - expected_rejected)}"
    )
    for poison in poisons:
        for key, index, reason in rejected.filter(pl.col("source_key") == poison.key).rows():
            assert re.search(poison.reason, reason, re.IGNORECASE), (
                f"{poison.name}: row {index} of {key} rejected with {reason!r}, expected /{poison.reason}/"
            )


@functools.cache
def _expected(good: tuple[bytes, ...]) -> tuple[set[tuple[str, Any]], list[dict[str, Any]]]:
    """The reference's observation keys and segment versions, computed once per input."""
    return reference.expected_observation_keys(good), reference.expected_versions(good)


def gunzip_or_none(data: bytes) -> bytes | None:
    try:
        return gzip.decompress(data)
    except (OSError, EOFError):
        return None


def quarantine_of(settings: Settings) -> list[tuple[bytes | None, str]]:
    """Every object under quarantine/: its body (ungzipped) and the reason in its metadata."""
    s3 = s3_client(settings)
    found = []
    for key in storage.list_keys(s3, settings.bucket, "quarantine/"):
        answer = s3.get_object(Bucket=settings.bucket, Key=key)
        found.append((gunzip_or_none(answer["Body"].read()), answer["Metadata"].get("reason", "")))
    return found


def lake_state(settings: Settings) -> dict[str, Any]:
    """Every table's version and rows (without run-time columns), and the quarantine's keys."""
    state: dict[str, Any] = {}
    options = lake.storage_options(settings)
    for name, table in lake.ensure_tables(settings).items():
        frame = lake.scan_table(table, options).collect()
        frame = frame.drop([c for c in frame.columns if c in RUN_TIME_COLUMNS])
        state[name] = (table.version(), frame.sort(frame.columns).rows())
    state["quarantine/"] = sorted(storage.list_keys(s3_client(settings), settings.bucket, "quarantine/"))
    return state


def assert_unchanged(before: dict[str, Any], after: dict[str, Any], what: str) -> None:
    changed = [name for name in before if before[name] != after[name]]
    added = sorted(set(after["quarantine/"]) - set(before["quarantine/"]))
    assert not changed, f"{what} changed {changed}" + (f"; quarantined again: {added}" if added else "")


def assert_merging_again_changes_nothing(settings: Settings) -> None:
    before = lake_state(settings)
    result = lake.merge_pending(settings)
    assert (result.merged_objects, result.quarantined_objects) == (0, 0), result.summary()
    assert_unchanged(before, lake_state(settings), "merging again")


# --------------------------------------------------------------------------- shared inputs

# Built at import: the poisons parametrize tests.
SAMPLE_BYTES = gzip.decompress(SAMPLE.read_bytes())
POISONS = {poison.name: poison for poison in faultdata.poisons(SAMPLE_BYTES)}


@pytest.fixture(scope="module")
def good() -> list[Snapshot]:
    return faultdata.good_snapshots(SAMPLE_BYTES)


@pytest.fixture(scope="module")
def proxy(s3_server: str) -> Iterator[S3Proxy]:
    with S3Proxy(s3_server) as running:
        yield running


@pytest.fixture(scope="module")
def template(new_bucket: Callable[[], Settings], good: list[Snapshot]) -> str:
    """A bucket where the first good snapshot is merged and the two others (segment changes) are landed:
    a merge onto history, closing segment versions. Tests copy it into their own bucket."""
    settings = new_bucket()
    land(settings, good[:1])
    lake.merge_pending(settings)
    land(settings, good[1:])
    return settings.bucket


FRESH, HISTORY = "fresh lake", "lake with history"


def prepare_merge(settings: Settings, kind: str, good: list[Snapshot], template: str) -> None:
    """The good snapshots pending: all three in an empty bucket (the merge creates the tables), or the
    template's two onto the first."""
    if kind == FRESH:
        land(settings, good)
    else:
        from_template(settings, template)


@pytest.fixture(scope="module")
def merge_requests(
    new_bucket: Callable[[], Settings], good: list[Snapshot], template: str, proxy: S3Proxy
) -> dict[str, dict[str, int]]:
    """Count mode: the S3 requests and writes of the merge of either kind, in this process."""
    counts = {}
    for kind in (FRESH, HISTORY):
        settings = new_bucket()
        prepare_merge(settings, kind, good, template)
        proxy.arm(10**9)
        lake.merge_pending(through(settings, proxy))
        seen = proxy.seen
        proxy.reset()
        counts[kind] = {"requests": len(seen), "writes": sum(1 for request in seen if request.method in WRITES)}
    return counts


@pytest.fixture(scope="module")
def cli_merge_requests(new_bucket: Callable[[], Settings], template: str, proxy: S3Proxy) -> dict[str, int]:
    """Count mode: the S3 requests of `trafficwatch merge` onto the template's history, and the number of
    its first write."""
    settings = new_bucket()
    from_template(settings, template)
    proxy.arm(10**9)
    run = subprocess.run(
        [TRAFFICWATCH, "merge"], env=cli_env(settings, proxy.url), capture_output=True, text=True, timeout=120
    )
    seen = proxy.seen
    proxy.reset()
    assert run.returncode == 0, run.stderr
    first_write = next((request.number for request in seen if request.method in WRITES), len(seen))
    return {"requests": len(seen), "first_write": first_write}


def test_the_proxy_tests_reach_every_request_of_a_merge(merge_requests, cli_merge_requests) -> None:
    for counts in (merge_requests[HISTORY], cli_merge_requests):  # cut, killed at each request
        assert counts["requests"] <= MAX_MERGE_REQUESTS, (merge_requests, cli_merge_requests)
    for counts in merge_requests.values():  # each write's answer lost
        assert counts["writes"] <= MAX_MERGE_WRITES, merge_requests


# --------------------------------------------------------------------------- 1. S3 cut by a proxy


def _merge_ignoring_failure(settings: Settings) -> None:
    with contextlib.suppress(Exception):  # a merge may fail when S3 does: what matters is what the next leaves
        lake.merge_pending(settings)


@pytest.mark.parametrize("at", range(1, MAX_MERGE_REQUESTS + 1), ids=lambda n: f"request-{n}")
def test_s3_cut_at_each_request_of_a_merge(at, settings, good, template, proxy, merge_requests) -> None:
    """The merge onto history (it closes segment versions). A fresh lake's merge makes 76 requests instead
    of 54, each try costing twice as much: its table creations are covered by the lost answers below."""
    if at > merge_requests[HISTORY]["requests"]:
        pytest.skip("the merge makes fewer requests")
    prepare_merge(settings, HISTORY, good, template)
    proxy.arm(at, CUT)
    _merge_ignoring_failure(through(settings, proxy))
    assert proxy.fired
    proxy.reset()
    lake.merge_pending(settings)
    assert_lake_holds(settings, [snapshot.payload for snapshot in good])


@pytest.mark.parametrize("kind", [FRESH, HISTORY])
@pytest.mark.parametrize("at", range(1, MAX_MERGE_WRITES + 1), ids=lambda n: f"write-{n}")
def test_s3_write_done_but_its_answer_lost(at, kind, settings, good, template, proxy, merge_requests) -> None:
    """The server did the write (a table's creation, a data file, a commit), the merge never heard back:
    its client retries it, or the merge fails."""
    if at > merge_requests[kind]["writes"]:
        pytest.skip("the merge makes fewer writes")
    prepare_merge(settings, kind, good, template)
    proxy.arm(at, DROP_RESPONSE, methods=WRITES)
    _merge_ignoring_failure(through(settings, proxy))
    assert proxy.fired
    proxy.reset()
    lake.merge_pending(settings)
    assert_lake_holds(settings, [snapshot.payload for snapshot in good])


@pytest.mark.parametrize("which", ["first", "last"])
def test_s3_gone_from_a_write_on_fails_the_cli_merge_in_one_line(
    which, settings, good, template, proxy, merge_requests
) -> None:
    """S3 stops answering at the merge's first write (nothing written) or its last (the merge log's commit).
    Each costs the S3 clients' retries (several seconds): two points, not every write."""
    prepare_merge(settings, HISTORY, good, template)
    proxy.arm(1 if which == "first" else merge_requests[HISTORY]["writes"], CUT, methods=WRITES, lasting=True)
    run = subprocess.run(
        [TRAFFICWATCH, "merge"], env=cli_env(settings, proxy.url), capture_output=True, text=True, timeout=300
    )
    assert proxy.fired
    proxy.reset()
    assert_clean_cli_output(run, "trafficwatch merge with S3 gone")
    assert run.returncode != 0
    lake.merge_pending(settings)
    assert_lake_holds(settings, [snapshot.payload for snapshot in good])


# --------------------------------------------------------------------------- 2. SIGKILL at each request


@pytest.fixture(scope="module")
def warm_merges(s3_server: str, workbench: Settings) -> Iterator[WarmProcesses]:
    """`trafficwatch merge` processes on the working bucket, started ahead and held at their first request."""
    processes = WarmProcesses(s3_server, [TRAFFICWATCH, "merge"], lambda endpoint: cli_env(workbench, endpoint))
    yield processes
    processes.close()


@pytest.mark.parametrize("at", range(1, MAX_MERGE_REQUESTS + 1), ids=lambda n: f"request-{n}")
def test_sigkill_at_each_request_of_a_cli_merge(at, settings, good, template, warm_merges, cli_merge_requests) -> None:
    """Killed before request `at` goes out. Until the merge's first write, S3 holds what it held before:
    those requests are one crash, tried at request 1 (they are cut one by one in scenario 1)."""
    if at > cli_merge_requests["requests"]:
        pytest.skip("the merge makes fewer requests")
    if 1 < at < cli_merge_requests["first_write"]:
        pytest.skip("before the merge's first write: the same crash as at request 1")
    held = warm_merges.take()  # started (by the previous test, usually), waiting at its first S3 request
    try:
        from_template(settings, template)
        held.proxy.arm(at, HOOK, hook=lambda: os.kill(held.process.pid, signal.SIGKILL))  # before `at` goes out
        held.proxy.release()
        _, stderr = held.process.communicate(timeout=120)
    finally:
        held.proxy.close()
    assert held.proxy.fired, f"the merge ended before request {at}: {stderr.decode()[-2000:]}"
    assert held.process.returncode == -signal.SIGKILL
    if at < cli_merge_requests["requests"]:
        warm_merges.prepare()  # the next test's process starts up while this one checks
    lake.merge_pending(settings)
    assert_lake_holds(settings, [snapshot.payload for snapshot in good])


# --------------------------------------------------------------------------- 3. two concurrent merges


def _more_snapshots() -> list[Snapshot]:
    """Six more snapshots after the good ones, segments changing on the way (a new version, and back)."""
    records = faultdata.base_records(SAMPLE_BYTES)
    renamed = {5: {"denomination": faultdata.RENAMED_ROAD}}
    changes = [renamed, renamed, {**renamed, 9: {"hierarchie": "Réseau national"}}, renamed, {}, {}]
    return [faultdata.snapshot_at(records, 9 + 3 * i, change) for i, change in enumerate(changes)]


@pytest.mark.parametrize("kind", [FRESH, HISTORY])
def test_two_concurrent_cli_merges(kind, settings, good, template) -> None:
    inputs = good + _more_snapshots()
    prepare_merge(settings, kind, good, template)
    land(settings, inputs[len(good) :])
    env = cli_env(settings)
    runs = [
        subprocess.Popen([TRAFFICWATCH, "merge"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    for run in runs:
        stdout, stderr = run.communicate(timeout=300)
        assert_clean_cli_output(subprocess.CompletedProcess(run.args, run.returncode, stdout, stderr), "merge")
        assert run.returncode == 0
    assert_lake_holds(settings, [snapshot.payload for snapshot in inputs])
    assert_merging_again_changes_nothing(settings)


# --------------------------------------------------------------------------- 4. backfill over segment changes


def test_backfill_of_older_snapshots_with_other_segment_attributes_then_a_replay(settings) -> None:
    records = faultdata.base_records(SAMPLE_BYTES)
    newer = [faultdata.snapshot_at(records, 20), faultdata.snapshot_at(records, 30)]
    land(settings, newer)
    lake.merge_pending(settings)
    older = [
        faultdata.snapshot_at(records, 0, {5: {"denomination": "Ancien nom"}, 6: {"vitesse_maxi": 90}}),
        faultdata.snapshot_at(records, 10, {5: {"denomination": "Ancien nom"}}),
        faultdata.snapshot_at(records, 25, {7: {"sens_circule": None}, 8: {"insee": 35051}}),  # between the merged
    ]
    land(settings, older)
    # The three older ones, and the 20-minute one again.
    lake.backfill(settings, faultdata.moment(0), faultdata.moment(25) + timedelta(minutes=1))
    everything = [snapshot.payload for snapshot in older + newer]
    assert_lake_holds(settings, everything)

    before = lake_state(settings)
    lake.backfill(settings, faultdata.moment(0), faultdata.moment(30) + timedelta(minutes=1))
    assert_unchanged(before, lake_state(settings), "a replay")
    assert_lake_holds(settings, everything)
    assert_merging_again_changes_nothing(settings)


# --------------------------------------------------------------------------- 5. poison objects under raw/


def good_input(snapshots: list[Snapshot], poisons: list[Poison]) -> list[bytes]:
    """The payloads whose rows must be merged: the good snapshots and the good rows of row-level poisons."""
    return [snapshot.payload for snapshot in snapshots] + [p.good_payload for p in poisons if p.good_payload]


@pytest.mark.parametrize("poison", POISONS.values(), ids=POISONS.keys())
def test_poison_object_under_raw_with_good_ones(poison, settings, good, template) -> None:
    from_template(settings, template)  # one good snapshot merged, two pending
    put(settings, poison.key, poison.stored)
    lake.merge_pending(settings)
    assert_lake_holds(settings, good_input(good, [poison]), [poison])
    assert_merging_again_changes_nothing(settings)


def test_every_poison_at_once_through_the_cli_then_merge_and_backfill_again(settings, good) -> None:
    poisons = list(POISONS.values())
    land(settings, good)
    for poison in poisons:
        put(settings, poison.key, poison.stored)
    env = cli_env(settings)
    merge = subprocess.run([TRAFFICWATCH, "merge"], env=env, capture_output=True, text=True, timeout=300)
    assert_clean_cli_output(merge, "trafficwatch merge")
    assert merge.returncode == 0
    assert_lake_holds(settings, good_input(good, poisons), poisons)

    before = lake_state(settings)
    again = subprocess.run([TRAFFICWATCH, "merge"], env=env, capture_output=True, text=True, timeout=300)
    assert_clean_cli_output(again, "trafficwatch merge, again")
    assert again.returncode == 0
    assert_unchanged(before, lake_state(settings), "merging again")
    backfill = subprocess.run(
        [TRAFFICWATCH, "backfill", "--start", "2024-08-26", "--end", "2024-08-27"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert_clean_cli_output(backfill, "trafficwatch backfill over the poisons' day")
    assert backfill.returncode == 0
    assert_unchanged(before, lake_state(settings), "a backfill of the poisons' day")
    assert_lake_holds(settings, good_input(good, poisons), poisons)


# --------------------------------------------------------------------------- 6. crafted answers to the ingest

# The feed parses its files and renders them again: it cannot send bytes that are not UTF-8, nor nesting
# deeper than Python's JSON parser goes. Those are sent byte for byte by RawFeed.
FEED_CANNOT_SEND = {"latin1", "nested"}
ANSWERS = {name: poison for name, poison in POISONS.items() if poison.snapshot_level and poison.payload}


def _serve(poison: Poison, first: bytes, tmp_path: Path) -> Any:
    """A server answering `first`, then (after `advance()`) the poison; use it as a context manager."""
    if poison.name in FEED_CANNOT_SEND:
        return RawFeed([first, poison.payload])
    files = (tmp_path / "first.json", tmp_path / f"{poison.name}.json")
    files[0].write_bytes(first)
    files[1].write_bytes(poison.payload)
    return contextlib.closing(start_in_thread(FeedConfig(port=0, files=files, speed=1e-6)))


@pytest.mark.parametrize("poison", ANSWERS.values(), ids=ANSWERS.keys())
def test_poison_answer_is_refused_in_one_line_and_kept_in_quarantine(poison, settings, good, tmp_path) -> None:
    with _serve(poison, good[0].payload, tmp_path) as server:
        fetching = dataclasses.replace(settings, api_url=server.url)
        assert ingest(fetching).status == "landed"
        landed = objects(settings, "raw/")
        server.advance()
        answer = requests.get(server.url + EXPORTS_PATH, timeout=10).content  # what the ingest will get
        with pytest.raises(IngestError) as caught:
            ingest(fetching)
    message = str(caught.value)
    assert "\n" not in message
    assert re.search(poison.reason, message, re.IGNORECASE), message
    assert objects(settings, "raw/") == landed  # nothing landed, nothing changed
    quarantined = quarantine_of(settings)
    assert [body for body, _ in quarantined] == [answer], "the answer is not in quarantine/, alone"
    assert re.search(poison.reason, quarantined[0][1], re.IGNORECASE), quarantined[0][1]


@pytest.mark.parametrize("name", ["year-2030", "drift-speed"])
def test_cli_ingest_refuses_a_future_or_drifted_answer_in_one_line(name, settings, good, tmp_path) -> None:
    poison = POISONS[name]
    with _serve(poison, good[0].payload, tmp_path) as server:
        fetching = dataclasses.replace(settings, api_url=server.url)
        assert ingest(fetching).status == "landed"
        landed = objects(settings, "raw/")
        server.advance()
        run = subprocess.run(
            [TRAFFICWATCH, "ingest"], env=cli_env(fetching), capture_output=True, text=True, timeout=120
        )
    assert_clean_cli_output(run, "trafficwatch ingest")
    assert run.returncode == 1
    assert re.search(poison.reason, run.stderr, re.IGNORECASE), run.stderr
    assert objects(settings, "raw/") == landed
