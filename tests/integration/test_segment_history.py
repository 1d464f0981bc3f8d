"""road_segments is exactly the history the snapshots give, whatever order, batching, replay, backfill, crash
or race the merges go through (issue 11, build point 2).

The rule (`reference.expected_versions`): per segment, its points (the accepted row of every merged
snapshot) in time order, collapsed into runs of equal attributes; one version per run, `valid_from` its first
point, `valid_to` the next run's first point, current the last run. The property and small-case tests check it
after every merge, over the snapshots merged so far (a crash can leave the lake at any of these states); the
race and crash tests after both merges or the rerun, with the observations and nothing pending.

- `test_random_history_*`: a property test. A seed draws 4-8 real segments, their attribute changes over
  8-20 snapshots 1-5 minutes apart (name, limit, hierarchy, geometry; A -> B -> A; a segment missing from some
  snapshots, one appearing later, a rejected row now and then), a split into batches merged in random order
  (objects shuffled, small prepare tasks and commits, tables fresh or kept open as the worker does), replays
  and one backfill over a random range. A failure prints the seed, the command replaying it, the scenario
  and the first step whose table differs. `TRAFFICWATCH_HISTORY_SEEDS=0-199` (or `7,12`) runs other seeds.
- `test_small_case`: the smallest histories the property test found wrong (before the rewrite), named.
- `test_two_writers_*`: two merges of overlapping batches race with their own table handles; one is held
  before or after one of its table writes while the other runs to completion, then let go. And the same
  two batches one after the other (the control).
- `test_crash_*`: a merge raises before or after one of its table writes; `merge_pending` then reruns.

Hooks used (keep them, or change these tests with them): `lake.writes.commit_with_retries(table, action,
what)` runs each table write of a merge (every module calls it as `writes.commit_with_retries`), `what` being
the table name and `table` the handle from the `tables` given to `merge_objects` (calling it more than once
per table is fine: only the first call is held or crashed); `lake.preparation.OBJECTS_PER_TASK` and
`lake.merge.OBJECTS_PER_COMMIT` split a merge into prepare tasks and commits.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import gzip
import json
import os
import random
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest

from tests.conftest import SAMPLE_DATETIME
from tests.support import reference
from trafficwatch import lake, raw, storage
from trafficwatch.config import Settings
from trafficwatch.lake import merge, preparation, writes
from trafficwatch.payloads import normalize_payload
from trafficwatch.raw import raw_key

pytestmark = pytest.mark.integration

BASE = datetime.fromisoformat(SAMPLE_DATETIME.decode())
TEST_FILE = "tests/integration/test_segment_history.py"
SEEDS_VARIABLE = "TRAFFICWATCH_HISTORY_SEEDS"
DEFAULT_SEEDS = 8

# Small pools, so that values come back (A -> B -> A) often. Index 0 stands for the segment's real value.
NAMES = (None, "Rocade Ouest", "Rue de Nantes")
LIMITS = (None, 30, 50, 70)
HIERARCHIES = (None, "Réseau d'armature", "Réseau d'appui", "Réseau de distribution principale")
GEOMETRIES = ("multi", "line")  # the 2024 MultiLineString, or the 2025 LineString of the same points


# --------------------------------------------------------------------------- snapshots


@dataclasses.dataclass(frozen=True)
class State:
    """A segment's attributes in one snapshot, as indexes into the pools above."""

    name: int = 0
    limit: int = 0
    hierarchy: int = 0
    geometry: int = 0


HIERARCHY_CODES = {"armature": "arm", "appui": "app", "principale": "dp", "secondaire": "ds", "national": "nat"}


def _code(record: dict[str, Any], name: str | None, limit: int | None, hierarchy: str | None, line: bool) -> str:
    """Attributes in a few characters: name (R = the segment's real one, O = Rocade Ouest, N = Rue de Nantes),
    limit, hierarchy, geometry (M = MultiLineString, L = LineString)."""
    labels = {record["denomination"]: "R", NAMES[1]: "O", NAMES[2]: "N"}
    words = (hierarchy or "").replace("'", " ").split()
    level = next((HIERARCHY_CODES[w] for w in reversed(words) if w in HIERARCHY_CODES), repr(hierarchy))
    return f"{labels.get(name, repr(name))}/{limit}/{level}/{'L' if line else 'M'}"


def _state_code(record: dict[str, Any], state: State) -> str:
    return _code(
        record,
        NAMES[state.name] or record["denomination"],
        LIMITS[state.limit] or record["vitesse_maxi"],
        HIERARCHIES[state.hierarchy] or record["hierarchie"],
        bool(state.geometry),
    )


@dataclasses.dataclass
class Snapshot:
    minute: int
    states: dict[int, State]  # segment index -> its attributes; absent segments are not in the payload
    rejected: frozenset[int] = frozenset()  # segments whose row fails validation (speed 420) in this one

    def code(self, records: list[dict[str, Any]]) -> str:
        cells = []
        for index, record in enumerate(records):
            state = self.states.get(index)
            cells.append("-" if state is None else _state_code(record, state) + ("!" if index in self.rejected else ""))
        return f"+{self.minute:<3} " + " ".join(f"{cell:<14}" for cell in cells)


def _record(base: dict[str, Any], state: State, moment: datetime, rng: random.Random, bad: bool) -> dict[str, Any]:
    record = copy.deepcopy(base)
    record["datetime"] = moment.isoformat()
    if state.name:
        record["denomination"] = NAMES[state.name]
    if state.limit:
        record["vitesse_maxi"] = LIMITS[state.limit]
    if state.hierarchy:
        record["hierarchie"] = HIERARCHIES[state.hierarchy]
    if state.geometry:
        geometry = record["geo_shape"]["geometry"]
        record["geo_shape"]["geometry"] = {"type": "LineString", "coordinates": geometry["coordinates"][0]}
    record["averagevehiclespeed"] = 420 if bad else rng.randint(5, 90)
    return record


def _bodies(records: list[dict[str, Any]], snapshots: list[Snapshot], seed: int) -> list[bytes]:
    rng = random.Random(seed)
    bodies = []
    for snapshot in snapshots:
        moment = BASE + timedelta(minutes=snapshot.minute)
        payload = [
            _record(records[index], state, moment, rng, index in snapshot.rejected)
            for index, state in sorted(snapshot.states.items())
        ]
        bodies.append(json.dumps(payload).encode())
    return bodies


def _draw_snapshots(rng: random.Random, segments: int) -> list[Snapshot]:
    """Attribute changes over time: each snapshot changes a few attributes of a few segments."""
    count = rng.randint(8, 20)
    minute = 0
    late = rng.randrange(1, segments)  # a segment that appears only later
    appears = rng.randint(1, count - 1)
    gappy = rng.randrange(1, segments)  # a segment missing from some snapshots (maybe the late one)
    current = {index: State() for index in range(segments)}
    snapshots = []
    for position in range(count):
        for index in range(segments):
            if rng.random() < 0.3:
                field = rng.choice(["name", "limit", "hierarchy", "hierarchy", "geometry"])
                pool = {"name": NAMES, "limit": LIMITS, "hierarchy": HIERARCHIES, "geometry": GEOMETRIES}[field]
                current[index] = dataclasses.replace(current[index], **{field: rng.randrange(len(pool))})
        states = {
            index: current[index]
            for index in range(segments)
            if not (index == late and position < appears) and not (index == gappy and rng.random() < 0.3)
        }
        rejected = frozenset(index for index in states if index and rng.random() < 0.05)
        snapshots.append(Snapshot(minute, states, rejected))
        minute += rng.choice([1, 2, 3, 3, 3, 4, 5])
    return snapshots


# --------------------------------------------------------------------------- a lake under test


@pytest.fixture
def lake_settings(s3_settings: Settings) -> Iterator[Settings]:
    """`s3_settings` (a fresh bucket), and the bucket deleted after the test: SeaweedFS gives every bucket
    volumes of its own and runs out of them after some 120 buckets in one server, after which every write fails
    (the whole suite shares the server; this file alone makes 40)."""
    yield s3_settings
    s3 = storage.s3_client(s3_settings)
    keys = storage.list_keys(s3, s3_settings.bucket, "")
    for start in range(0, len(keys), 1000):
        batch = [{"Key": key} for key in keys[start : start + 1000]]
        s3.delete_objects(Bucket=s3_settings.bucket, Delete={"Objects": batch, "Quiet": True})
    s3.delete_bucket(Bucket=s3_settings.bucket)


# What the reference gives for a set of snapshots, computed once: the same sets come back after replays, and
# in every race and crash test (their snapshots are the same bytes).
@functools.lru_cache(maxsize=256)
def _expected_versions(bodies: tuple[bytes, ...]) -> list[dict[str, Any]]:
    return reference.expected_versions(bodies) if bodies else []


@functools.lru_cache(maxsize=64)
def _expected_observation_keys(bodies: tuple[bytes, ...]) -> frozenset[tuple[str, datetime]]:
    return frozenset(reference.expected_observation_keys(bodies)) if bodies else frozenset()


class Lake:
    """A bucket with snapshots landed under raw/, and what has been merged so far."""

    def __init__(self, settings: Settings, records: list[dict[str, Any]], snapshots: list[Snapshot], seed: int):
        self.settings = dataclasses.replace(settings, min_records=1)  # a few segments are a whole snapshot here
        self.s3 = storage.s3_client(self.settings)
        self.records, self.snapshots = records, snapshots
        self.bodies = _bodies(records, snapshots, seed)
        self.keys = [self._land(body) for body in self.bodies]
        landed = {obj.key: obj for obj in raw.list_raw(self.s3, self.settings.bucket)}
        self.objects = [landed[key] for key in self.keys]
        self.merged: set[int] = set()

    def _land(self, body: bytes) -> str:
        """`tests.conftest.land_raw` (gzip, keyed by the upstream datetime) through one client: a new boto3
        client for every object was a third of this file's CPU time."""
        key = raw_key(normalize_payload(body).measured_at)
        self.s3.put_object(Bucket=self.settings.bucket, Key=key, Body=gzip.compress(body, mtime=0))
        return key

    def objects_of(self, indexes: list[int]) -> list[raw.RawObject]:
        return [self.objects[index] for index in indexes]

    def merge(self, indexes: list[int], tables: dict[str, Any] | None = None) -> lake.MergeResult:
        result = lake.merge_objects(self.settings, self.objects_of(indexes), self.s3, tables)
        self.merged.update(indexes)
        return result

    def backfill(self, low: int, high: int) -> list[int]:
        """`lake.backfill` over [snapshot low, snapshot high): the snapshots of that range, merged or not."""
        start = BASE + timedelta(minutes=self.snapshots[low].minute)
        end = BASE + timedelta(minutes=self.snapshots[high].minute if high < len(self.snapshots) else 10**6)
        lake.backfill(self.settings, start, end, self.s3)
        chosen = list(range(low, high))
        self.merged.update(chosen)
        return chosen

    def merge_pending(self) -> lake.MergeResult:
        result = lake.merge_pending(self.settings, self.s3)
        self.merged.update(range(len(self.bodies)))
        return result

    def merged_bodies(self) -> list[bytes]:
        return [self.bodies[index] for index in sorted(self.merged)]

    def segment_key(self, index: int) -> str:
        return self.records[index]["predefinedlocationreference"]

    # ---- checks

    def history_problems(self) -> str | None:
        """None if road_segments holds exactly the versions of the snapshots merged so far, else what differs."""
        actual = reference.actual_versions(self.settings)
        expected = _expected_versions(tuple(self.merged_bodies()))
        problems = []
        duplicates = Counter((row["segment_key"], row["valid_from"]) for row in actual)
        twice = sorted(key for key, times in duplicates.items() if times > 1)
        if twice:
            problems.append("duplicate (segment_key, valid_from): " + ", ".join(self._key(*key) for key in twice))
        if actual != expected:
            actual_rows, expected_rows = map(self._rows, (actual, expected))
            missing = [row for row in expected_rows if row not in actual_rows]
            extra = [row for row in actual_rows if row not in expected_rows]
            problems.append("road_segments differs from the expected versions")
            problems += ["  expected:", *[f"    {row}" for row in expected_rows]]
            problems += ["  actual:", *[f"    {row}" for row in actual_rows]]
            problems += ["  missing:", *[f"    {row}" for row in missing], "  extra:", *[f"    {row}" for row in extra]]
        return "\n".join(problems) or None

    def observation_problems(self) -> str | None:
        table = lake.ensure_tables(self.settings, [lake.OBSERVATIONS])[lake.OBSERVATIONS]
        frame = lake.scan_table(table, lake.storage_options(self.settings)).select("segment_key", "measured_at")
        rows = frame.collect().rows()
        expected = _expected_observation_keys(tuple(self.merged_bodies()))
        if len(rows) != len(set(rows)):
            return f"duplicate observations: {sorted(k for k, n in Counter(rows).items() if n > 1)[:10]}"
        if set(rows) != expected:
            return (
                f"observations: missing {sorted(expected - set(rows))[:10]}, extra {sorted(set(rows) - expected)[:10]}"
            )
        return None

    def pending(self) -> list[str]:
        tables = lake.ensure_tables(self.settings, lake.MERGE_TABLES)
        return [obj.key for obj in lake.pending_raw(self.settings, self.s3, tables)]

    def _index(self, key: str) -> int:
        return next(i for i, record in enumerate(self.records) if record["predefinedlocationreference"] == key)

    def _minute(self, moment: datetime | None) -> str:
        return "None" if moment is None else f"+{int((moment - BASE).total_seconds() // 60)}"

    def _key(self, key: str, valid_from: datetime) -> str:
        return f"s{self._index(key)}@{self._minute(valid_from)}"

    def _rows(self, versions: list[dict[str, Any]]) -> list[str]:
        """Versions in a readable form: s<segment> [from, to) current, and the attribute codes."""
        rows = []
        for row in versions:
            index = self._index(row["segment_key"])
            line = '"LineString"' in (row["geometry_geojson"] or "")
            code = _code(self.records[index], row["road_name"], row["speed_limit_kmh"], row["hierarchy"], line)
            current = " current" if row["is_current"] else ""
            rows.append(
                f"s{index} [{self._minute(row['valid_from'])}, {self._minute(row['valid_to'])}){current} {code}"
            )
        return rows

    def describe(self) -> str:
        header = " ".join(f"s{i}={self.segment_key(i)}" for i in range(len(self.records)))
        legend = "name/limit/hierarchy/geometry: name R = real, O = Rocade Ouest, N = Rue de Nantes; M/L geometry"
        lines = [f"{len(self.snapshots)} snapshots, segments {header}", legend]
        lines.append("  minute per segment s0, s1... ('-' absent, '!' its row rejected)")
        lines += [f"  {snapshot.code(self.records)}" for snapshot in self.snapshots]
        return "\n".join(lines)


def _sample_records(sample_bytes: bytes, indexes: list[int]) -> list[dict[str, Any]]:
    records = json.loads(sample_bytes)
    return [records[index] for index in indexes]


# --------------------------------------------------------------------------- 1. the property test


def _seeds() -> list[int]:
    spec = os.environ.get(SEEDS_VARIABLE, "").strip()
    if not spec:
        return list(range(DEFAULT_SEEDS))
    seeds: list[int] = []
    for part in spec.split(","):
        low, _, high = part.partition("-")
        seeds += list(range(int(low), int(high) + 1)) if high else [int(low)]
    return seeds


@dataclasses.dataclass
class Plan:
    segments: list[int]  # indexes into the real sample
    snapshots: list[Snapshot]
    steps: list[tuple[Any, ...]]  # ("merge", [i...]) | ("replay", [i...]) | ("backfill", low, high)
    per_task: int
    per_commit: int
    open_tables: bool  # merges through one OpenTables, as the worker does, or fresh tables each time


def _draw_plan(seed: int) -> Plan:
    rng = random.Random(seed)
    segments = rng.sample(range(2859), rng.randint(4, 8))
    snapshots = _draw_snapshots(rng, len(segments))
    count = len(snapshots)
    order = list(range(count))
    if rng.random() < 0.5:  # contiguous runs of time...
        cuts = sorted(rng.sample(range(1, count), rng.randint(1, min(5, count - 1))))
        batches = [order[a:b] for a, b in zip([0, *cuts], [*cuts, count], strict=True)]
    else:  # ...or any partition
        rng.shuffle(order)
        parts = rng.randint(2, min(6, count))
        batches = [order[i::parts] for i in range(parts)]
    rng.shuffle(batches)
    for batch in batches:
        rng.shuffle(batch)  # merge_objects takes its objects in any order
    steps: list[tuple[Any, ...]] = []
    backfill_at = rng.randrange(len(batches) + 1)
    for position, batch in enumerate(batches):
        if position == backfill_at:
            low = rng.randrange(count)
            steps.append(("backfill", low, rng.randint(low + 1, count)))
        steps.append(("merge", batch))
        if rng.random() < 0.35:
            merged = [i for step in steps if step[0] == "merge" for i in step[1]]
            replay = (
                rng.choice([b for b in batches[: position + 1]])
                if rng.random() < 0.6
                else rng.sample(merged, rng.randint(1, len(merged)))
            )
            steps.append(("replay", list(replay)))
    if backfill_at == len(batches):
        low = rng.randrange(count)
        steps.append(("backfill", low, rng.randint(low + 1, count)))
    return Plan(
        segments=segments,
        snapshots=snapshots,
        steps=steps,
        per_task=rng.choice([1, 2, preparation.OBJECTS_PER_TASK]),
        per_commit=rng.choice([1, 3, merge.OBJECTS_PER_COMMIT]),
        open_tables=rng.random() < 0.5,
    )


def _step_text(lake_: Lake, step: tuple[Any, ...]) -> str:
    if step[0] == "backfill":
        _, low, high = step
        return f"backfill snapshots [{low}, {high}) = minutes {[lake_.snapshots[i].minute for i in range(low, high)]}"
    return f"{step[0]} snapshots {step[1]} = minutes {[lake_.snapshots[i].minute for i in step[1]]}"


@pytest.mark.parametrize("seed", _seeds())
def test_random_history_merged_in_any_order_batches_replays_and_backfill(
    seed, lake_settings, sample_bytes, monkeypatch
) -> None:
    plan = _draw_plan(seed)
    monkeypatch.setattr(preparation, "OBJECTS_PER_TASK", plan.per_task)
    monkeypatch.setattr(merge, "OBJECTS_PER_COMMIT", plan.per_commit)
    world = Lake(lake_settings, _sample_records(sample_bytes, plan.segments), plan.snapshots, seed)
    open_tables = lake.OpenTables(world.settings) if plan.open_tables else None
    done: list[str] = []

    def fail(problem: str) -> None:
        pytest.fail(
            f"seed {seed} (replay: {SEEDS_VARIABLE}={seed} .venv/bin/python -m pytest "
            f"'{TEST_FILE}::test_random_history_merged_in_any_order_batches_replays_and_backfill[{seed}]')\n"
            f"OBJECTS_PER_TASK={plan.per_task} OBJECTS_PER_COMMIT={plan.per_commit} "
            f"tables={'one OpenTables' if plan.open_tables else 'fresh per merge'}\n"
            f"{world.describe()}\nsteps:\n" + "\n".join(done) + f"\n{problem}",
            pytrace=False,
        )

    for number, step in enumerate(plan.steps, 1):
        done.append(f"  {number}. {_step_text(world, step)}")
        try:
            if step[0] == "backfill":
                world.backfill(step[1], step[2])
            else:
                world.merge(step[1], open_tables.get() if open_tables else None)
        except Exception as error:
            fail(f"step {number} raised {type(error).__name__}: {error}")
        problem = world.history_problems()
        if problem:
            fail(f"after step {number}: {problem}")
    assert world.merged == set(range(len(plan.snapshots)))
    for problem in (world.observation_problems(), world.pending() and f"still pending: {world.pending()}"):
        if problem:
            fail(problem)


# --------------------------------------------------------------------------- small cases, named

# One segment, renamed between snapshots three minutes apart (A = its real name, B = Rocade Ouest), and the
# merges run one after the other, each a list of snapshot indexes: the smallest histories the property test
# found wrong, kept readable.
SMALL_CASES = {
    "replay of a batch holding A-B-A": ([0, 1, 0], [[0, 1, 2], [0, 1, 2]]),
    "an older change merged after a newer one": ([0, 1], [[1], [0]]),
    "older and newer points merged after the current": ([0, 1, 1], [[1], [0, 2]]),
    "older points with the current's attributes and a change": ([1, 0, 1], [[2], [0, 1]]),
    "the next snapshots, then a late one between them": ([0, 1, 0], [[0, 2], [1]]),
    "a batch, then an earlier batch": ([0, 1, 0, 1], [[2, 3], [0, 1]]),
}


@pytest.mark.parametrize("case", list(SMALL_CASES))
def test_small_case(case, lake_settings, sample_bytes) -> None:
    names, merges = SMALL_CASES[case]
    snapshots = [Snapshot(3 * i, {0: State(name=name)}) for i, name in enumerate(names)]
    world = Lake(lake_settings, _sample_records(sample_bytes, [0]), snapshots, seed=0)
    done = []
    for batch in merges:
        done.append(f"merge {batch}")
        try:
            world.merge(batch)
        except Exception as error:
            pytest.fail(f"{case}: {' then '.join(done)} raised {type(error).__name__}: {error}", pytrace=False)
        problem = world.history_problems()
        if problem:
            pytest.fail(f"{case}: after {' then '.join(done)}\n{world.describe()}\n{problem}", pytrace=False)


# --------------------------------------------------------------------------- a fixed history for races and crashes

# Four real segments over eight snapshots, three minutes apart. s0 is renamed A -> B -> A -> C; s1's limit goes
# A A B B A B B A (so the last four alone hold A -> B -> A); s2 appears at +9 and changes hierarchy at +15; s3
# is missing from +6 and +15 and turns into a LineString at +12. One row is rejected at +3 and one at +18, so
# both writers below (and the crashing merge) write rejected_records.
FIXED_SEGMENTS = [0, 1, 2, 3]
FIXED_NAMES = [0, 0, 1, 1, 0, 0, 2, 2]
FIXED_LIMITS = [0, 0, 1, 1, 0, 1, 1, 0]
FIXED_REJECTED = {1: frozenset({1}), 6: frozenset({3})}


def _fixed_snapshots() -> list[Snapshot]:
    snapshots = []
    for position in range(8):
        states = {
            0: State(name=FIXED_NAMES[position]),
            1: State(limit=FIXED_LIMITS[position]),
            2: State(hierarchy=2 if position >= 5 else 0),
            3: State(geometry=int(position >= 4)),
        }
        if position < 3:
            del states[2]
        if position in (2, 5):
            del states[3]
        snapshots.append(Snapshot(3 * position, states, FIXED_REJECTED.get(position, frozenset())))
    return snapshots


def _fixed_lake(settings: Settings, sample_bytes: bytes) -> Lake:
    return Lake(settings, _sample_records(sample_bytes, FIXED_SEGMENTS), _fixed_snapshots(), seed=0)


WRITES = (lake.OBSERVATIONS, lake.SEGMENTS, lake.REJECTED, lake.MERGE_LOG)
POINTS = [(when, what) for what in WRITES for when in ("before", "after")]
POINT_IDS = [f"{when}-{what}" for when, what in POINTS]


def _hook_commit(monkeypatch: pytest.MonkeyPatch, around: Callable[[str, str, Any], Iterator[None]]) -> None:
    """Wrap `writes.commit_with_retries`: the generator `around(what, table)` runs to its first `yield` before
    each table write, and on to its second after it (so it can block or raise at either point)."""
    original = writes.commit_with_retries

    def commit(table: Any, action: Callable[[], Any], what: str) -> Any:
        steps = around(what, table)
        next(steps, None)
        result = original(table, action, what)
        next(steps, None)
        return result

    monkeypatch.setattr(writes, "commit_with_retries", commit)


def _assert_exact(world: Lake, context: str) -> None:
    problems = [world.history_problems(), world.observation_problems()]
    pending = world.pending()
    if pending:
        problems.append(f"still pending: {pending}")
    problems = [problem for problem in problems if problem]
    if problems:
        pytest.fail(f"{context}\n{world.describe()}\n" + "\n".join(problems), pytrace=False)


# --------------------------------------------------------------------------- 2. two writers racing

# Batches that overlap in time (and share the snapshot at +15), each with segment changes.
WRITER_BATCHES = {"A": [0, 2, 4, 5, 6], "B": [1, 3, 5, 7]}
HOLD_LIMIT_S = 180  # how long a writer is held at most (a hung test ends, failing)
ALONE_LIMIT_S = 30  # how long the other writer may take alone


@pytest.mark.parametrize("paused", ["A", "B"])
@pytest.mark.parametrize(("when", "what"), POINTS, ids=POINT_IDS)
def test_two_writers_one_held_at_a_write_while_the_other_completes(
    paused, when, what, lake_settings, sample_bytes, monkeypatch
) -> None:
    world = _fixed_lake(lake_settings, sample_bytes)
    lake.ensure_tables(world.settings)  # create them, then two handles each at version 0, as two processes
    tables = {name: lake.ensure_tables(world.settings) for name in WRITER_BATCHES}
    other = "B" if paused == "A" else "A"
    reached, release = threading.Event(), threading.Event()

    def around(name: str, table: Any) -> Iterator[None]:
        # The held writer is told apart by its table handles (its writes run on pool threads).
        mine = name == what and tables[paused].get(name) is table and not reached.is_set()
        if mine and when == "before":
            reached.set()
            release.wait(HOLD_LIMIT_S)
        yield
        if mine and when == "after":
            reached.set()
            release.wait(HOLD_LIMIT_S)
        yield

    _hook_commit(monkeypatch, around)
    errors: dict[str, BaseException] = {}

    def run(name: str) -> None:
        try:
            world.merge(WRITER_BATCHES[name], tables[name])
        except BaseException as error:
            errors[name] = error

    held = threading.Thread(target=run, args=(paused,), name=f"writer-{paused}")
    free = threading.Thread(target=run, args=(other,), name=f"writer-{other}")
    context = f"writer {paused} held {when} its {what} write while writer {other} merged; batches {WRITER_BATCHES}"
    held.start()
    try:
        while held.is_alive() and not reached.wait(0.05):
            pass
        assert reached.is_set(), f"writer {paused} ended without reaching {when} {what} (has the hook moved?): {errors}"
        free.start()
        free.join(ALONE_LIMIT_S)  # it runs to completion while the held one waits...
        if free.is_alive():  # ...unless it waits for the held one (merges serialized by a lock): let both go
            context += f" (writer {other} was still running after {ALONE_LIMIT_S} s: released {paused})"
    finally:
        release.set()
        held.join(HOLD_LIMIT_S)
        if free.ident is not None:
            free.join(HOLD_LIMIT_S)
    assert not held.is_alive() and not free.is_alive(), f"{context}: a writer did not finish"
    assert not errors, f"{context}: {errors!r}"
    _assert_exact(world, context)


@pytest.mark.parametrize("first", ["A", "B"])
def test_two_writers_one_after_the_other(first, lake_settings, sample_bytes) -> None:
    """The control of the race above: the same two batches, merged one after the other."""
    world = _fixed_lake(lake_settings, sample_bytes)
    order = [first, "B" if first == "A" else "A"]
    for name in order:
        world.merge(WRITER_BATCHES[name])
    _assert_exact(world, f"writers {order} one after the other; batches {WRITER_BATCHES}")


# --------------------------------------------------------------------------- 3. crash and rerun


class InjectedCrash(RuntimeError):
    pass


# Merged cleanly first; then the crashing merge takes the rest: a late snapshot between merged ones (+3) and the
# next ones, where s1 goes A -> B -> A (a rerun must not stretch its current version back over B).
CRASH_CLEAN, CRASH_BATCH = [0, 2, 3], [1, 4, 5, 6, 7]


@pytest.mark.parametrize(("when", "what"), POINTS, ids=POINT_IDS)
def test_crash_at_a_write_then_rerun(when, what, lake_settings, sample_bytes, monkeypatch) -> None:
    world = _fixed_lake(lake_settings, sample_bytes)
    clean, crashing = CRASH_CLEAN, CRASH_BATCH
    world.merge(clean)
    context = f"merged {clean}, then a merge of {crashing} crashed {when} its {what} write, then merge_pending"
    problem = world.history_problems()
    assert problem is None, f"before the crash: {problem}"

    crashed = threading.Event()

    def around(name: str, table: Any) -> Iterator[None]:
        mine = name == what and not crashed.is_set()
        if mine and when == "before":
            crashed.set()
            raise InjectedCrash(context)
        yield
        if mine and when == "after":
            crashed.set()
            raise InjectedCrash(context)
        yield

    with monkeypatch.context() as patch:
        _hook_commit(patch, around)
        try:
            lake.merge_objects(world.settings, world.objects_of(crashing), world.s3)
        except InjectedCrash:
            pass
        else:
            pytest.fail(f"the merge of {crashing} never reached {when} its {what} write (has the hook moved?)")
    world.merge_pending()
    _assert_exact(world, context)
