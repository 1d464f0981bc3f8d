"""Freshness of the whole stack: from a snapshot landing in S3 to its being visible in `segment_latest`.

Brings the stack up with `make demo` in a temporary home on free loopback ports (whatever the calling
shell's settings), lets Airflow's scheduler land, merge and build N snapshots (the feed paced so that
it publishes as fast as the ingest fetches, one a minute), polls the serving file read-only every 0.5 s
as the dashboards read it, and samples the memory of the running stack (sum of RSS, and of PSS, of every
process in the services' process groups) every second. Halfway, it triggers the two hourly DAGs
(`lake_maintenance`, `marts_audit`) through Airflow's REST API, as the top of every hour runs them beside
the minute's tasks: the stack's peak is then in the window whatever the clock. Prints one line per
snapshot, the median and p95, where the time went (merge sensor, merge, marts build), the memory, the
hourly runs; writes everything to --json; then `make down`. The same code as the end-to-end test
(tests/support/stack.py and freshness.py). Figures only: nothing is asserted.

    source scripts/env.sh && .venv/bin/python bench/stack_freshness.py --json /tmp/stack.json
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from trafficwatch import operate

# Run as a script (sys.path[0] is bench/): the repository root, for the stack driver the end-to-end test uses.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support import freshness
from tests.support.stack import LocalStack, write_json

# The feed's clock stopped: the pacer moves it on once its snapshot has landed.
FEED_ARGS = "--interval 60 --speed 0.000001"
MIB = 2**20
HOURLY_DAGS = ("lake_maintenance", "marts_audit")


class HourlyRuns:
    """The hourly DAGs, triggered once `at_s` seconds after `start`, then their runs as Airflow recorded them."""

    def __init__(self, stack: LocalStack, at_s: float) -> None:
        self.stack = stack
        self.runs: dict[str, str] = {}
        self.error = ""
        self.started = time.monotonic()
        self.timer = threading.Timer(at_s, self.trigger)
        self.timer.daemon = True

    def start(self) -> HourlyRuns:
        self.timer.start()
        return self

    def trigger(self) -> None:
        try:
            session = self.stack.airflow_api()
            for dag_id in HOURLY_DAGS:
                self.runs[dag_id] = self.stack.trigger_dag(session, dag_id)
            print(f"+{time.monotonic() - self.started:.0f} s: triggered {', '.join(HOURLY_DAGS)}", flush=True)
        except Exception as error:  # a report: the figures say the hour's work was not in the window
            self.error = f"{type(error).__name__}: {error}"

    def outcome(self, wait_s: float = 120) -> dict[str, Any]:
        """Each run's state and seconds (waiting up to `wait_s` for runs still going)."""
        self.timer.cancel()
        if not self.runs:
            return {"error": self.error or "not triggered: the window ended first"}
        session = self.stack.airflow_api()
        deadline = time.monotonic() + wait_s
        while True:
            runs = {dag_id: self.stack.dag_run(session, dag_id, run) for dag_id, run in self.runs.items()}
            if all(run["end_date"] for run in runs.values()) or time.monotonic() > deadline:
                break
            time.sleep(2)
        return {dag_id: {"state": run["state"], "seconds": _seconds(run)} for dag_id, run in runs.items()}


def _seconds(run: dict[str, Any]) -> float | None:
    if not (run.get("start_date") and run.get("end_date")):
        return None
    start, end = (datetime.fromisoformat(run[name]) for name in ("start_date", "end_date"))
    return round((end - start).total_seconds(), 1)


def measure(stack: LocalStack, snapshots: int) -> dict[str, Any]:
    up_s = stack.up()
    print(f"make demo: {up_s:.0f} s; timing {snapshots} snapshots (about a minute each)", flush=True)
    watcher = stack.watcher().start()
    hourly = HourlyRuns(stack, at_s=60.0 * (snapshots // 2)).start()
    try:
        watcher.collect(snapshots, timeout_s=180 + 90 * snapshots, feed_url=stack.feed_url)
    finally:
        watcher.stop()
    hourly_runs = hourly.outcome()
    print(f"the hourly DAGs, triggered halfway: {hourly_runs}")
    measured = watcher.measured()
    summary = freshness.freshness_summary(measured)
    rows = stack.breakdown(measured)
    rss = [sample.rss_bytes for sample in watcher.samples]
    pss = [sample.pss_bytes for sample in watcher.samples]
    peak = max(watcher.samples, key=lambda sample: sample.pss_bytes)
    print(freshness.format_freshness(summary))
    print("where the time went (s): landed -> " + freshness.format_breakdown(rows))
    print(
        f"memory of the running stack ({len(rss)} samples): RSS median {statistics.median(rss) / MIB:,.0f} MiB, "
        f"peak {max(rss) / MIB:,.0f} MiB; PSS median {statistics.median(pss) / MIB:,.0f} MiB, "
        f"peak {max(pss) / MIB:,.0f} MiB; {peak.processes} processes; per service at the PSS peak (PSS MiB): "
        + ", ".join(f"{name} {value / MIB:,.0f}" for name, value in peak.per_service_pss.items())
    )
    return {
        "freshness_median_s": summary["median_s"],
        "freshness_p95_s": summary["p95_s"],
        "freshness_max_s": summary["max_s"],
        "snapshots": summary["snapshots"],
        "per_snapshot": summary["per_snapshot"],
        "breakdown": rows,
        "stack_rss_mb": round(max(rss) / MIB),
        "stack_rss_median_mb": round(statistics.median(rss) / MIB),
        "stack_pss_mb": round(max(pss) / MIB),
        "stack_pss_median_mb": round(statistics.median(pss) / MIB),
        "memory_peak": peak.as_dict(),
        "hourly_runs": hourly_runs,
        "make_demo_s": round(up_s, 1),
    }


def setting(text: str) -> tuple[str, str]:
    name, equals, value = text.partition("=")
    if not equals or not name:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE")
    return name, value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--snapshots", type=int, default=8, help="snapshots to time (default 8, ~1 min each)")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    parser.add_argument("--home", type=Path, help="the stack's home (default: a temporary directory, removed)")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        type=setting,
        metavar="NAME=VALUE",
        help="a setting for the stack, e.g. TRAFFICWATCH_MERGE_POLL_INTERVAL=2 (the calling shell's are not used)",
    )
    args = parser.parse_args()
    settings = dict(args.env)
    home = args.home or Path(tempfile.mkdtemp(prefix="tw-stack-bench-"))
    stack = LocalStack.on_free_ports(home, FEED_ARGS, extra_env=settings)
    figures: dict[str, Any] = {"home": str(stack.home), "settings": settings}
    try:
        figures.update(measure(stack, args.snapshots))
    finally:
        try:
            figures["make_down_s"] = round(stack.down(), 1)
        finally:
            operate.stop_all(stack.home)  # in case make down itself failed
            if args.json:
                write_json(args.json, figures)
                print(f"figures: {args.json}")
            if not args.home:
                shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
