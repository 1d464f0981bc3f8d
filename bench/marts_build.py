"""Benchmark of the marts step (`trafficwatch.serving.build`): one build-and-publish cycle after a new snapshot,
with 30 days of history in the lake.

What is measured (figures only: nothing here asserts a time)
-------------------------------------------------------------
A cycle is what the `traffic_marts` DAG task does after a merge: `serving.build(settings)`, i.e. one
`dbt build` (17 table and incremental models; the 9 views only when the project changed; one data test, the guard
over the rows the build rebuilt, the models' YAML tests being left to the hourly audit) into the warehouse DuckDB,
then the publish of the serving DuckDB
by atomic replace. Before each cycle, one new snapshot (2,859 records) is merged into the lake (not
timed). Two series, each giving a median:

1. each cycle in a fresh spawned process, as an Airflow task runs it: importing dbt (~5 s of CPU, done
   inside `build`) is part of the cycle; only the interpreter's start is not;
2. cycles in one process that has imported dbt already (its first cycle, which imports it, is left out);
3. each cycle in a fresh spawned process asking the worker service (`trafficwatch worker`,
   started by `make demo` and `make up`) to build and publish: what the DAG task does when it runs. The
   history is restored to its cached state first, so the same snapshots as series 1 are used. The
   3 s target (issue 15) applies to this series.

Then a late day: the day before the 30-day history (older than every bucket the marts hold: 1,440
snapshots, 4.1 M rows, merged now) appended to the lake, and one build and publish in a process that has
imported dbt: what the next build costs after a backfill or an archive import of a whole day.

Every run is printed with its dbt / publish split and the load average.

The data
--------
The 30-day lake history (123.5 M observations) is the one `bench/lake_merge.py` builds and caches in
`$TRAFFICWATCH_HOME/bench` (default `.data/bench`): this script reuses its SeaweedFS data, cache manifest,
functions and the new snapshots it landed (next day, 00:00 onwards), building them first if they are
missing. The marts of that history (a full dbt build over 30 days, a one-off of several minutes) are
cached beside it in `bench/marts/<history id>-<dbt project hash>/`; each run works on a copy of them, and the history is
restored to its cached state afterwards. The two benches share that directory: run them one after the
other (`make bench` does).

Run: `make bench`, or `.venv/bin/python bench/marts_build.py [--cycles N]`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import shutil
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import polars as pl

from trafficwatch import dbt_build, lake, services, serving, worker
from trafficwatch.config import Settings

# Run as a script (sys.path[0] is bench/): the repository root, for the environment helper the tests use.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trafficwatch.config import environ

HISTORY_DAYS = 30
DEFAULT_CYCLES = 5  # per series: the lake bench lands 23 new snapshots (2 x 5 + 1 needed)
TARGET_CYCLE_S = 3.0  # issue 15: build and publish through the worker at 30 days

log = logging.getLogger("bench")


def lake_bench() -> ModuleType:
    """bench/lake_merge.py as a module: its S3 server, cache and 30-day history are reused here."""
    path = Path(__file__).resolve().parent / "lake_merge.py"
    spec = importlib.util.spec_from_file_location("lake_merge_bench", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # spawned children find it by this name
    spec.loader.exec_module(module)
    return module


LM = lake_bench()


def ensure_one_day(s3: Any, manifest: Any) -> dict[str, Any]:
    """The lake bench's cached 1-day history (what its 30-day history is made of), or one backfill to make it."""
    one_day = LM.cached_history(s3, manifest, 1)
    if one_day:
        return one_day
    manifest.put("history_1d", None)
    print("1-day history: one backfill of the day's snapshots ...", flush=True)
    LM.backfill_run(s3, LM.HISTORY_BUCKETS[1])
    lake.maintain(LM.settings_for(LM.HISTORY_BUCKETS[1]))
    return LM.record_history(manifest, 1)


def marts_config(root: Path) -> serving.ServingConfig:
    return serving.ServingConfig(
        home=root,
        warehouse_db=root / "warehouse" / "traffic.duckdb",
        serving_db=root / "serving" / "traffic.duckdb",
        serving_days=serving.DEFAULT_SERVING_DAYS,
    )


def history_settings(root: Path) -> Settings:
    return replace(LM.settings_for(LM.HISTORY_BUCKETS[HISTORY_DAYS]), home=root)


def _full_build_child(root: str) -> dict[str, Any]:
    logging.basicConfig(level=logging.WARNING)
    path = Path(root)
    started = time.perf_counter()
    result = serving.build(history_settings(path), marts_config(path), full_refresh=True)
    return {"seconds": time.perf_counter() - started, "rows": result.rows}


def ensure_cached_marts(home: Path, history: dict[str, Any]) -> Path:
    """The marts of the cached 30-day history, built once (full refresh) per history and dbt project."""
    root = home / "marts" / f"{history['id']}-{dbt_build.project_fingerprint()}"
    done = root / "complete"
    if done.is_file():
        print(f"30-day marts: cached in {root}")
        return root
    for stale in (home / "marts").glob("*"):
        shutil.rmtree(stale, ignore_errors=True)
    print("30-day marts: first full dbt build over the whole history (a one-off) ...", flush=True)
    built = LM.in_child(_full_build_child, str(root))
    print(f"30-day marts: built in {built['seconds']:.0f} s; published rows {built['rows']}")
    done.write_text(history["id"])
    return root


def ensure_marts(s3: Any, manifest: Any, home: Path) -> tuple[dict[str, Any], Path]:
    """The cached 30-day history and the directory of its cached marts, each made first if missing."""
    LM.ensure_raw_zone(s3)
    history = LM.ensure_history_30d(s3, manifest, ensure_one_day(s3, manifest))
    return history, ensure_cached_marts(home, history)


def cached_serving_db() -> Path:
    """The serving DuckDB of the cached 30-day marts, for the benches that read what the dashboards read
    (bench/viewer_latency.py); made first, with its history, when missing. The bench S3 server runs meanwhile."""
    home = LM.bench_home()
    if services.running_pid(home, "s3"):
        raise RuntimeError(f"another benchmark is using {home}/s3: run the benches one after the other")
    manifest = LM.Manifest.load(home)
    with LM.bench_s3(home):
        _, root = ensure_marts(LM.s3_client(), manifest, home)
    path = root / "serving" / "traffic.duckdb"
    serving.create_dashboard_views(path)  # the dashboards' views of this code, whenever the marts were cached
    return path


def working_copy(cached: Path, work: Path) -> None:
    """A copy of the cached marts to run cycles on: the cache stays as the history it matches."""
    shutil.rmtree(work, ignore_errors=True)
    for part in ("warehouse", "serving", "dbt", "duckdb"):
        if (cached / part).exists():
            shutil.copytree(cached / part, work / part)


def _cycles_child(root: str, keys: list[str]) -> list[dict[str, Any]]:
    """For each key, merge that new snapshot (not timed), then build and publish, in this one process."""
    logging.basicConfig(level=logging.WARNING)
    path = Path(root)
    settings = history_settings(path)
    s3 = LM.s3_client()
    cycles = []
    for key in keys:
        LM.copy_objects(s3, LM.RAW_BUCKET, settings.bucket, [key])
        merged = lake.merge_objects(settings, [LM.raw_object(s3, settings.bucket, key)])
        if merged.observations != LM.RECORDS:
            raise RuntimeError(f"{key}: expected {LM.RECORDS} new observations, got {merged.as_dict()}")
        fresh = "dbt.cli.main" not in sys.modules
        started = time.perf_counter()
        result = serving.build(settings, marts_config(path))
        cycles.append(
            {
                "key": key,
                "fresh": fresh,
                "seconds": time.perf_counter() - started,
                "dbt": result.dbt_seconds,
                "publish": result.publish_seconds,
                "full_publish": result.full_publish,
                "merge": merged.seconds,
            }
        )
        print(f"  {key}: {cycles[-1]['seconds']:.2f} s{' (imports dbt)' if fresh else ''}", flush=True)
    return cycles


def _worker_cycle_child(root: str, key: str) -> dict[str, Any]:
    """One cycle as the DAG task runs it when the worker service runs: a fresh process merges the new
    snapshot (not timed), then asks the worker (dbt imported there once) to build and publish."""
    logging.basicConfig(level=logging.WARNING)
    settings = history_settings(Path(root))
    s3 = LM.s3_client()
    LM.copy_objects(s3, LM.RAW_BUCKET, settings.bucket, [key])
    merged = lake.merge_objects(settings, [LM.raw_object(s3, settings.bucket, key)])
    if merged.observations != LM.RECORDS:
        raise RuntimeError(f"{key}: expected {LM.RECORDS} new observations, got {merged.as_dict()}")
    started = time.perf_counter()
    result = worker.build_marts(settings)
    seconds = time.perf_counter() - started
    if "dbt.cli.main" in sys.modules:
        raise RuntimeError("the worker did not take the build: this process imported dbt")
    print(f"  {key}: {seconds:.2f} s (worker)", flush=True)
    return {
        "key": key,
        "fresh": False,
        "seconds": seconds,
        "dbt": result.dbt_seconds,
        "publish": result.publish_seconds,
        "full_publish": result.full_publish,
        "merge": merged.seconds,
    }


def _late_day_child(root: str) -> dict[str, Any]:
    """A whole day older than the history, appended to the lake with a new merge stamp, then one build and
    publish timed (after a first build with nothing new, which imports dbt)."""
    logging.basicConfig(level=logging.WARNING)
    path = Path(root)
    settings, config = history_settings(path), marts_config(path)
    serving.build(settings, config)
    one_day = LM.settings_for(LM.HISTORY_BUCKETS[1])
    source = lake.ensure_tables(one_day, [lake.OBSERVATIONS])[lake.OBSERVATIONS]
    rows = LM.redated(lake.scan_table(source, lake.storage_options(one_day)).collect(), lake.OBSERVATIONS, HISTORY_DAYS)
    rows = rows.with_columns(pl.lit(datetime.now(UTC), dtype=lake.UTC_US).alias("merged_at"))
    LM._append(lake.ensure_tables(settings, [lake.OBSERVATIONS])[lake.OBSERVATIONS], rows, lake.OBSERVATIONS)
    started = time.perf_counter()
    result = serving.build(settings, config)
    seconds = time.perf_counter() - started
    day = rows["measured_date"].min()
    print(f"  late day {day} ({rows.height:,} rows): {seconds:.2f} s", flush=True)
    return {
        "day": str(day),
        "rows": rows.height,
        "seconds": seconds,
        "dbt": result.dbt_seconds,
        "publish": result.publish_seconds,
        "full_publish": result.full_publish,
    }


@contextlib.contextmanager
def running_worker(root: Path) -> Iterator[None]:
    """`trafficwatch worker` for the history bucket and the working copy, as `make demo` runs it."""
    settings = history_settings(root)
    service = services.worker(worker.socket_path(settings))
    with environ({"TRAFFICWATCH_HOME": str(root), "TRAFFICWATCH_BUCKET": settings.bucket}):
        try:
            services.start(service, root)
            yield
        finally:
            services.stop(root, service.name)


def summary(cycles: list[dict[str, Any]]) -> str:
    return (
        f"median {statistics.median(c['seconds'] for c in cycles):.2f} s over {len(cycles)} cycles "
        f"(dbt {statistics.median(c['dbt'] for c in cycles):.2f} s, "
        f"publish {statistics.median(c['publish'] for c in cycles):.2f} s)"
    )


def report(
    cold: list[dict[str, Any]],
    warm: list[dict[str, Any]],
    served: list[dict[str, Any]],
    late: dict[str, Any],
    observations: int,
) -> dict[str, Any]:
    """Print the figures; return them for the JSON report."""
    print(f"\n=== marts build benchmark ({HISTORY_DAYS}-day history, {observations:,} observations) ===")
    print(f"load average now (1/5/15 min): {LM.load_text()} on {os.cpu_count()} CPUs")
    for c in cold + warm + served:
        kind = "whole copy" if c["full_publish"] else "patched"
        print(
            f"{c['key']}: {c['seconds']:.2f} s = dbt build {c['dbt']:.2f} s"
            f"{' (incl. importing dbt)' if c['fresh'] else ''} + publish {c['publish']:.2f} s ({kind}); "
            f"the merge before it: {c['merge']:.2f} s"
        )
    print(f"cycle in a fresh process without the worker (dbt imported each time): {summary(cold)}")
    print(f"cycle in a process that has imported dbt already: {summary(warm)}")
    print(f"cycle as the DAG task runs it with the worker service (make demo / make up): {summary(served)}")
    print(
        f"a late day ({late['day']}, {late['rows']:,} rows, older than every bucket) merged, then one build: "
        f"{late['seconds']:.2f} s (dbt {late['dbt']:.2f} s, publish {late['publish']:.2f} s, "
        f"{'whole copy' if late['full_publish'] else 'patched'})"
    )
    median_served = statistics.median(c["seconds"] for c in served)
    verdict = "met" if median_served <= TARGET_CYCLE_S else "MISSED"
    print(f"[target <= {TARGET_CYCLE_S:.0f} s for the DAG's cycle (with the worker): {verdict}]")
    return {
        "observations": observations,
        **{
            f"cycle_{name}": {
                "median_s": statistics.median(c["seconds"] for c in cycles),
                "runs_s": [c["seconds"] for c in cycles],
            }
            for name, cycles in (("fresh_process", cold), ("warm_process", warm), ("worker", served))
        },
        "late_day": late,
        "target_s": TARGET_CYCLE_S,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--cycles", type=int, default=DEFAULT_CYCLES, help="cycles per series (at most 5)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    home = LM.bench_home()
    if services.running_pid(home, "s3"):
        print(f"another benchmark is using {home}/s3: run the benches one after the other", file=sys.stderr)
        return 1
    manifest = LM.Manifest.load(home)
    print(f"bench data: {home}; load average (1/5/15 min): {LM.load_text()} on {os.cpu_count()} CPUs")
    with LM.bench_s3(home) as endpoint:
        print(f"S3: {endpoint} (SeaweedFS, random keys)")
        s3 = LM.s3_client()
        history, cached = ensure_marts(s3, manifest, home)
        observations = history["tables"][lake.OBSERVATIONS]["rows"]
        work = home / "marts-work"
        working_copy(cached, work)
        keys = LM.new_keys()
        if len(keys) < 2 * args.cycles + 1:
            raise RuntimeError(
                f"{len(keys)} new snapshots in the lake bench's raw zone: at most {len(keys) // 2 - 1} cycles"
            )
        cold, warm, served, late = [], [], [], {}
        try:
            print(f"{args.cycles} cycles, each in a fresh process (merge one new snapshot, then build and publish):")
            for key in keys[: args.cycles]:
                cold += LM.in_child(_cycles_child, str(work), [key])
            print(f"{args.cycles} cycles in one process, after one that imports dbt:")
            warm = LM.in_child(_cycles_child, str(work), keys[args.cycles : 2 * args.cycles + 1])[1:]
            # The same snapshots again, from the cached state, through the worker service.
            if not LM.restore_history(s3, history_settings(work), history["tables"]):
                raise RuntimeError("the 30-day history could not be restored between series")
            working_copy(cached, work)
            print(f"{args.cycles} cycles, each in a fresh process asking the worker service:")
            with running_worker(work):
                served = [LM.in_child(_worker_cycle_child, str(work), key) for key in keys[: args.cycles]]
            print("a late day, older than the history, then one build and publish:")
            late = LM.in_child(_late_day_child, str(work))
        finally:
            if not LM.restore_history(s3, history_settings(work), history["tables"]):
                print("warning: the 30-day history could not be restored; the next run rebuilds it", file=sys.stderr)
            shutil.rmtree(work, ignore_errors=True)
        figures = report(cold, warm, served, late, observations)
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2))
    print(f"\ntotal wall time: {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
