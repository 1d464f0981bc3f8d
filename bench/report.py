"""`make bench`: every benchmark of the project, one after the other, gathered into one report.

Runs, each in its own process and each printing its own detail as it goes:

1. `bench/lake_merge.py`: the one-day backfill, one new snapshot into 1-day and 30-day history (in a fresh
   process and through the worker), pending discovery;
2. `bench/marts_build.py`: the build-and-publish cycle after a new snapshot over 30 days of history;
3. `bench/stack_freshness.py`: the whole stack (`make demo` on a temporary home) and the time from a
   snapshot landing in S3 to being visible in `segment_latest`, with the memory of the running stack;
4. `bench/viewer_latency.py`: Superset over the marts bench's cached 30-day serving file, as the viewer (the
   operator for Pipeline health): each chart's data through the chart data API, past the cache and from it
   (p50 and p95 per chart), and each dashboard's render in headless Chromium, cache empty and full.

Then prints one table of the headline figures (medians; p95 for freshness; for the viewer, the worst chart's
p95 and the slowest dashboard's median render) against their targets and
writes everything to `$TRAFFICWATCH_HOME/bench/report.json`. Figures only: nothing here asserts a time.
Extra arguments go to the lake benchmark (e.g. `make bench BENCH_ARGS=--profile`).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
STAGES = (
    ("lake", "lake_merge.py"),
    ("marts", "marts_build.py"),
    ("stack", "stack_freshness.py"),
    ("viewer", "viewer_latency.py"),
)


def run_stage(script: str, result: Path, extra: list[str]) -> dict[str, Any]:
    """One benchmark script in its own process; its figures, or why there are none."""
    started = time.perf_counter()
    completed = subprocess.run([sys.executable, str(BENCH / script), "--json", str(result), *extra], check=False)
    figures: dict[str, Any] = {"exit_code": completed.returncode, "seconds": round(time.perf_counter() - started)}
    if result.exists():
        figures.update(json.loads(result.read_text()))
    return figures


def _get(figures: dict[str, Any], *path: str) -> float | None:
    value: Any = figures
    for part in path:
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return float(value) if isinstance(value, int | float) else None


def rows(stages: dict[str, dict[str, Any]]) -> list[tuple[str, float | None, str, str]]:
    """(what, figure, unit, target) for the table."""
    lake, marts, stack = stages["lake"], stages["marts"], stages["stack"]
    viewer = stages["viewer"].get("headline", {})  # the worst chart's and the slowest dashboard's figures
    return [
        ("lake: one-day backfill (4.1 M rows)", _get(lake, "backfill_1d", "median_s"), "s", "<= 40 s"),
        ("lake: one-day backfill throughput", _get(lake, "backfill_1d", "rows_per_s"), "rows/s", ""),
        ("lake: backfill peak RSS", _get(lake, "backfill_1d", "peak_rss_gb"), "GB", ""),
        ("lake: one snapshot into 1 day, worker", _get(lake, "single_merge_worker", "1d_median_s"), "s", "< 0.2 s"),
        ("lake: one snapshot into 30 days, worker", _get(lake, "single_merge_worker", "30d_median_s"), "s", "< 0.2 s"),
        ("lake: 30-day / 1-day, worker", _get(lake, "single_merge_worker", "ratio"), "x", "<= 1.2"),
        ("lake: one snapshot into 1 day, fresh process", _get(lake, "single_merge_fresh", "1d_median_s"), "s", ""),
        ("lake: one snapshot into 30 days, fresh process", _get(lake, "single_merge_fresh", "30d_median_s"), "s", ""),
        ("lake: pending, 30 days, full listing", _get(lake, "pending_30d", "full_listing_median_s"), "s", ""),
        ("lake: pending, 30 days, worker", _get(lake, "pending_30d", "incremental_listing_median_s"), "s", ""),
        ("marts: build + publish, 30 days, worker", _get(marts, "cycle_worker", "median_s"), "s", "<= 3 s"),
        ("marts: build + publish, fresh process", _get(marts, "cycle_fresh_process", "median_s"), "s", ""),
        ("stack: freshness, landing to segment_latest, median", _get(stack, "freshness_median_s"), "s", ""),
        ("stack: freshness, landing to segment_latest, p95", _get(stack, "freshness_p95_s"), "s", "<= 12 s"),
        ("stack: memory of the running stack, peak RSS", _get(stack, "stack_rss_mb"), "MiB", ""),
        ("stack: peak PSS, the hourly DAGs in the window", _get(stack, "stack_pss_mb"), "MiB", "<= 1,907 MiB (2.0 GB)"),
        ("viewer: chart data, forced, worst chart's p95", _get(viewer, "worst_forced_p95_ms"), "ms", "<= 200 ms"),
        ("viewer: chart data, cached, worst chart's p95", _get(viewer, "worst_cached_p95_ms"), "ms", ""),
        ("viewer: dashboard render, cache empty, slowest", _get(viewer, "worst_render_empty_cache_s"), "s", "<= 5 s"),
        ("viewer: dashboard render, cache full, slowest", _get(viewer, "worst_render_full_cache_s"), "s", "<= 5 s"),
    ]  # fmt: skip


def print_table(stages: dict[str, dict[str, Any]]) -> None:
    print("\n=== TrafficWatch benchmarks (medians unless said) ===")
    print(f"{'what':<52} {'figure':>12}  {'unit':<7} target")
    for what, figure, unit, target in rows(stages):
        shown = "n/a" if figure is None else f"{figure:,.0f}" if figure >= 1000 else f"{figure:.3g}"
        print(f"{what:<52} {shown:>12}  {unit:<7} {target}")
    for name, figures in stages.items():
        if figures["exit_code"] != 0:
            print(f"warning: the {name} benchmark exited with code {figures['exit_code']}")


def main() -> int:
    home = Path(os.environ.get("TRAFFICWATCH_HOME") or BENCH.parent / ".data")
    out = home / "bench" / "report.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    stages: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="tw-bench-") as scratch:
        for name, script in STAGES:
            print(f"\n##### {name}: bench/{script}", flush=True)
            extra = sys.argv[1:] if name == "lake" else []
            stages[name] = run_stage(script, Path(scratch) / f"{name}.json", extra)
    report = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_average": os.getloadavg()},
        "stages": stages,
    }
    out.write_text(json.dumps(report, indent=2))
    print_table(stages)
    print(f"\nreport: {out}")
    return 0 if all(figures["exit_code"] == 0 for figures in stages.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
