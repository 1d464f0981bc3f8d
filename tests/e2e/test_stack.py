"""The whole stack, end to end, through the real make targets, on a temporary home and free loopback ports.

`make demo` starts S3, the feed, the worker, Airflow and Superset; Airflow's own scheduler then runs the
ingest every minute, the merge on its sensor and the marts build after every merge. The feed's clock is
stopped and the test moves it to its next snapshot once the current one has landed (`freshness.pace_feed`):
upstream publishes as fast as the ingest fetches, one snapshot a minute, and none can be missed by the
phase between the two. Then `make down` in the middle and `make demo` again on the same home, and a last
`make down` that must leave no process behind.

Freshness (landing in S3 to visible in the serving file, polled read-only every 0.5 s) is measured and
reported, never asserted: see the terminal summary and test-artifacts/e2e_stack.json.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import duckdb
import polars as pl
import pytest
import requests
from deltalake import DeltaTable

from tests.conftest import REPO
from tests.support import freshness
from tests.support.stack import LocalStack, write_json
from trafficwatch import lake, operate
from trafficwatch.raw import measured_at_of, raw_key

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

# The feed's clock stopped (speed ~0): only the pacer moves it on, one upstream minute per landed snapshot.
FEED_ARGS = "--interval 60 --speed 0.000001"
MEASURED_SNAPSHOTS = 4  # landed after `make demo` returned, each timed to its visibility
SNAPSHOTS_AFTER_RESTART = 1  # with the one cut short by make down: landed before, merged after
WAIT_S = 600  # for snapshots to land and be served (a minute each, and Airflow's start)
SERVICES = {"s3", "feed", "airflow", "superset"}  # at least; the worker too, under its current name
RESULTS = REPO / "test-artifacts" / "e2e_stack.json"


@dataclass
class E2E:
    stack: LocalStack
    report: list[str]
    groups: dict[str, int] = field(default_factory=dict)  # every service process group seen in this module
    figures: dict[str, Any] = field(default_factory=dict)
    first_phase_done: bool = False

    def record(self, name: str, value: Any) -> None:
        """Keep a figure and write all of them to the home and to test-artifacts/ (partial runs included)."""
        self.figures[name] = value
        for path in (self.stack.home / "e2e_stack.json", RESULTS):
            write_json(path, self.figures)

    def up(self) -> float:
        seconds = self.stack.up()
        groups = operate.service_groups(self.stack.home)
        self.groups.update({f"{name}@{pgid}": pgid for name, pgid in groups.items()})
        assert set(groups) >= SERVICES, f"make demo left only {sorted(groups)} running"
        return seconds


@pytest.fixture(scope="module")
def e2e(tmp_path_factory: pytest.TempPathFactory, e2e_report: list[str]) -> Iterator[E2E]:
    home = tmp_path_factory.mktemp("e2e") / "home"
    state = E2E(LocalStack.on_free_ports(home, FEED_ARGS), e2e_report)
    try:
        yield state
    finally:
        if operate.service_groups(home):  # a test stopped half-way
            with contextlib.suppress(Exception):
                state.stack.down()
            operate.stop_all(home)
        for pgid in state.groups.values():
            if operate.group_members(pgid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)


# --------------------------------------------------------------------------- what the stack holds


def _utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC)


def raw_objects(stack: LocalStack) -> dict[str, dict[str, str]]:
    """Every landed raw key and its landing metadata."""
    s3, bucket = stack.s3(), stack.settings().bucket
    return {key: s3.head_object(Bucket=bucket, Key=key)["Metadata"] for key in operate.landed_snapshots(s3, bucket)}


def table(stack: LocalStack, name: str, columns: list[str]) -> pl.DataFrame:
    options = stack.storage_options()
    delta = DeltaTable(lake.table_uri(stack.settings(), name), storage_options=options)
    return lake.scan_table(delta, options).select(columns).collect()


def served(stack: LocalStack) -> tuple[datetime, int]:
    """Newest measured_at in segment_latest of the serving file, and how many segments show it."""
    with duckdb.connect(str(stack.serving_db), read_only=True) as con:
        latest, segments = con.execute(
            "SELECT max(measured_at), count(*) FILTER (WHERE measured_at = (SELECT max(measured_at) "
            "FROM segment_latest)) FROM segment_latest"
        ).fetchone()
    return _utc(latest), segments


def superset_latest(stack: LocalStack) -> tuple[datetime, int]:
    """Through Superset's chart data API as the viewer: the newest measured_at of the live map's dataset
    (segment_latest) and its segment count, bypassing Superset's cache."""
    session = requests.Session()
    password = stack.environment()["TRAFFICWATCH_SUPERSET_VIEWER_PASSWORD"]
    login = session.post(
        f"{stack.superset_url}/api/v1/security/login",
        json={"username": "viewer", "password": password, "provider": "db"},
        timeout=30,
    )
    assert login.status_code == 200, login.text[:300]
    session.headers["Authorization"] = f"Bearer {login.json()['access_token']}"
    charts = session.get(f"{stack.superset_url}/api/v1/chart/", params={"q": "(page_size:100)"}, timeout=30)
    assert charts.status_code == 200, charts.text[:300]
    (chart,) = [c for c in charts.json()["result"] if c["slice_name"] == "Traffic now, by status"]
    assert chart["datasource_name_text"] == "main.segment_latest"
    query = {
        "datasource": {"id": chart["datasource_id"], "type": "table"},
        "queries": [{"columns": ["measured_at"], "metrics": ["segments"], "orderby": [["measured_at", False]]}],
        "force": True,
        "result_format": "json",
        "result_type": "full",
    }
    response = session.post(f"{stack.superset_url}/api/v1/chart/data", json=query, timeout=60)
    assert response.status_code == 200, response.text[:500]
    newest = response.json()["result"][0]["data"][0]
    return datetime.fromtimestamp(newest["measured_at"] / 1000, UTC), newest["segments"]


def assert_every_snapshot_served_once(stack: LocalStack) -> dict[str, Any]:
    """Raw objects, the lake, the serving file and Superset agree: each landed snapshot once, all of it."""
    objects = raw_objects(stack)
    times = sorted(measured_at_of(key) for key in objects)
    for key, metadata in objects.items():  # one object per upstream datetime, keyed by it
        assert _utc(datetime.fromisoformat(metadata["measured-at"])) == measured_at_of(key), key
    assert len({metadata["measured-at"] for metadata in objects.values()}) == len(objects)

    observations = table(stack, lake.OBSERVATIONS, ["segment_key", "measured_at", "source_key"])
    segments = observations["segment_key"].n_unique()
    assert segments > 0
    assert observations.height == segments * len(objects), "observations != distinct segments x landed snapshots"
    assert observations.unique(["segment_key", "measured_at"]).height == observations.height, "duplicate rows"
    per_snapshot = dict(observations.group_by("measured_at").len().rows())
    assert {_utc(moment): rows for moment, rows in per_snapshot.items()} == dict.fromkeys(times, segments)
    assert set(observations["source_key"].unique()) == set(objects)

    merge_log = table(stack, lake.MERGE_LOG, ["source_key", "accepted_rows"])
    assert sorted(merge_log["source_key"]) == sorted(objects), "merge_log must hold each raw object exactly once"
    assert set(merge_log["accepted_rows"]) == {segments}

    latest, showing = served(stack)
    assert latest == times[-1], f"segment_latest shows {latest}, the newest landed snapshot is {times[-1]}"
    assert showing == segments
    assert superset_latest(stack) == (times[-1], segments)

    lag = stack.lag()
    assert (lag["lag_s"], lag["unserved_snapshots"], lag["pending_merge"]) == (0.0, 0, 0), lag
    return {"snapshots": len(objects), "segments": segments, "rows": observations.height, "times": times}


def gaps(times: list[datetime]) -> list[timedelta]:
    """Steps between consecutive upstream times that are not one feed interval."""
    steps = (later - earlier for earlier, later in itertools.pairwise(times))
    return [step for step in steps if step != timedelta(minutes=1)]


def report_freshness(e2e: E2E, watcher: freshness.FreshnessWatcher, name: str) -> dict[str, Any]:
    summary = freshness.freshness_summary(watcher.measured())
    rows = e2e.stack.breakdown(watcher.measured())
    memory = [sample.as_dict() for sample in watcher.samples]
    peak = max(memory, key=lambda sample: sample["pss_bytes"], default=None)
    e2e.record(name, {**summary, "breakdown": rows, "memory_peak": peak, "poll_errors": watcher.errors[-5:]})
    e2e.report.append(f"freshness, {name} (landing in S3 -> visible in segment_latest of the serving file):")
    e2e.report.extend("  " + line for line in freshness.format_freshness(summary).splitlines())
    e2e.report.extend("  " + line for line in freshness.format_breakdown(rows).splitlines())
    if peak:
        e2e.report.append(
            f"  stack memory (PSS peak of {len(memory)} samples): PSS {peak['pss_bytes'] / 2**20:,.0f} MiB, "
            f"RSS {peak['rss_bytes'] / 2**20:,.0f} MiB, {peak['processes']} processes; PSS MiB per service "
            + ", ".join(f"{k} {v / 2**20:,.0f}" for k, v in peak["per_service_pss"].items())
        )
    return summary


# --------------------------------------------------------------------------- the tests, in order


def test_airflow_lands_merges_and_serves_every_snapshot_once(e2e: E2E, record_property: Any) -> None:
    stack = e2e.stack
    up_s = e2e.up()
    e2e.report.append(f"make demo: {up_s:.0f} s (home {stack.home})")
    watcher = stack.watcher().start()
    try:
        watcher.collect(MEASURED_SNAPSHOTS, WAIT_S, feed_url=stack.feed_url)
    finally:
        watcher.stop()
    facts = assert_every_snapshot_served_once(stack)
    assert facts["snapshots"] >= MEASURED_SNAPSHOTS
    assert not gaps(facts["times"]), f"a snapshot the feed served was not landed: {gaps(facts['times'])}"
    summary = report_freshness(e2e, watcher, "first run")
    e2e.record("make_demo_s", round(up_s, 1))
    record_property("freshness_median_s", summary["median_s"])
    record_property("freshness_p95_s", summary["p95_s"])
    e2e.first_phase_done = True


def _task_log(
    stack: LocalStack, session: requests.Session, dag_id: str, task_id: str, states: list[str]
) -> dict[str, Any]:
    """The newest task instance of `task_id` in one of `states`, and its log as the Airflow UI reads it."""
    dag_url = f"{stack.airflow_url}/api/v2/dags/{dag_id}/dagRuns"
    listed = session.get(
        f"{dag_url}/~/taskInstances",
        params={"task_id": task_id, "state": states, "order_by": "-start_date", "limit": 1},
        timeout=30,
    )
    assert listed.status_code == 200, listed.text[:300]
    (ti,) = listed.json()["task_instances"]
    log = session.get(
        f"{dag_url}/{ti['dag_run_id']}/taskInstances/{task_id}/logs/{ti['try_number']}",
        params={"full_content": "true"},
        timeout=60,
    )
    assert log.status_code == 200, log.text[:300]
    return {"state": ti["state"], "events": [str(line.get("event", "")) for line in log.json()["content"]]}


def test_task_logs_are_readable_through_the_api(e2e: E2E) -> None:
    """The scheduler and triggerer run without log servers (--skip-serve-logs): the api-server reads task logs
    from the shared log folder, finished and deferred tasks alike."""
    if not e2e.first_phase_done:
        pytest.skip("the first run did not complete")
    stack = e2e.stack
    session = stack.airflow_api()
    logs_dir = str(stack.home / "airflow" / "logs")
    ingest = _task_log(stack, session, "traffic_ingest", "fetch_and_land", ["success"])
    assert any(event.startswith(logs_dir) for event in ingest["events"]), ingest["events"][:10]
    assert len(ingest["events"]) > 5, ingest["events"]
    sensor = _task_log(stack, session, "traffic_merge", "wait_for_landed_snapshots", ["success"])
    assert any("landed snapshots are waiting to be merged" in event for event in sensor["events"]), sensor["events"]
    waiting = _task_log(stack, session, "traffic_merge", "wait_for_landed_snapshots", ["deferred", "success"])
    assert any(event.startswith(logs_dir) for event in waiting["events"]), waiting["events"][:10]
    e2e.report.append(
        f"task logs through the API: ingest {len(ingest['events'])} lines, merge sensor {len(sensor['events'])}, "
        f"a {waiting['state']} sensor {len(waiting['events'])}; sources: "
        + "; ".join(e for e in waiting["events"] if e.startswith(logs_dir) or "served logs" in e)
    )


HOURLY = {"lake_maintenance": "compact_checkpoint_vacuum", "marts_audit": "audit_lake_through_staging"}


def test_the_hourly_dags_hand_their_work_to_the_worker(e2e: E2E) -> None:
    """lake_maintenance and marts_audit, triggered as an operator would from the UI, beside the minute's tasks:
    they succeed, and the worker did their work (their task processes import neither delta-rs nor dbt)."""
    if not e2e.first_phase_done:
        pytest.skip("the first run did not complete")
    stack = e2e.stack
    session = stack.airflow_api()
    runs = {dag_id: stack.trigger_dag(session, dag_id) for dag_id in HOURLY}
    deadline = time.monotonic() + 300
    while True:
        states = {dag_id: stack.dag_run(session, dag_id, run)["state"] for dag_id, run in runs.items()}
        if not set(states.values()) & {"queued", "running"} or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert states == dict.fromkeys(HOURLY, "success")
    maintenance = _task_log(stack, session, "lake_maintenance", HOURLY["lake_maintenance"], ["success"])
    audit = _task_log(stack, session, "marts_audit", HOURLY["marts_audit"], ["success"])  # run, not skipped
    assert any("maintained by the worker" in event for event in maintenance["events"]), maintenance["events"][-20:]
    assert any("[worker] compacted " in event for event in maintenance["events"]), maintenance["events"][-20:]
    assert any("audited by the worker" in event for event in audit["events"]), audit["events"][-20:]
    e2e.report.append(f"hourly DAGs through the worker: {states}")


def test_down_and_demo_again_in_the_middle_merge_every_snapshot_once(e2e: E2E, record_property: Any) -> None:
    if not e2e.first_phase_done:
        pytest.skip("the first run did not complete")
    stack = e2e.stack
    before = set(raw_objects(stack))
    # One more snapshot, and the stack goes down the moment it lands: its merge and build are cut short.
    with contextlib.suppress(OSError):
        freshness.pace_feed(stack.feed_url, before)
    deadline = time.monotonic() + 150
    while not (landed := set(raw_objects(stack)) - before):
        assert time.monotonic() < deadline, "the next snapshot did not land within 150 s"
        time.sleep(0.5)
    at_down = stack.lag()
    down_s = stack.down()
    assert not operate.service_groups(stack.home)
    assert not [pid for pgid in e2e.groups.values() for pid in operate.group_members(pgid)]

    up_s = e2e.up()
    up_done = datetime.now(UTC)
    watcher = stack.watcher().start()
    try:
        watcher.collect(SNAPSHOTS_AFTER_RESTART, WAIT_S, feed_url=stack.feed_url)
    finally:
        watcher.stop()
    facts = assert_every_snapshot_served_once(stack)
    assert set(landed) <= {raw_key(t) for t in facts["times"]}
    assert facts["snapshots"] >= len(before) + 1 + SNAPSHOTS_AFTER_RESTART
    # The feed restarts on the current minute: one gap at most, where the stack was down.
    assert len(gaps(facts["times"])) <= 1, gaps(facts["times"])

    (cut,) = landed
    caught_up = watcher.snapshots[cut].visible_at
    catch_up_s = (caught_up - up_done).total_seconds() if caught_up else None
    e2e.record(
        "restart",
        {
            "at_down": at_down,
            "make_down_s": round(down_s, 1),
            "make_demo_s": round(up_s, 1),
            "cut_snapshot": cut,
            "cut_snapshot_visible_after_make_demo_s": catch_up_s,
        },
    )
    e2e.report.append(
        f"restart: at make down, {at_down['pending_merge']} snapshot(s) pending merge and "
        f"{at_down['unserved_snapshots']} unserved; make down {down_s:.0f} s, make demo {up_s:.0f} s; "
        f"the cut snapshot was served {catch_up_s if catch_up_s is None else round(catch_up_s, 1)} s after "
        f"make demo returned; {facts['snapshots']} snapshots x {facts['segments']} segments = {facts['rows']} rows"
    )
    report_freshness(e2e, watcher, "after the restart")


def test_make_down_leaves_no_process_behind(e2e: E2E) -> None:
    if not e2e.groups:
        pytest.skip("the stack never came up")
    stack = e2e.stack
    down_s = stack.down()
    e2e.record("final_make_down_s", round(down_s, 1))
    assert not list((stack.home / "run").glob("*.pid")), "make down left pid files"
    alive = {name: operate.group_members(pgid) for name, pgid in e2e.groups.items() if operate.group_members(pgid)}
    assert not alive, f"processes left in the services' process groups: {alive}"
    left = operate.processes_mentioning(str(stack.home))
    assert not left, f"processes still mention {stack.home}: {left}"
    e2e.report.append(f"final make down: {down_s:.0f} s, no process left; figures in {RESULTS}")
