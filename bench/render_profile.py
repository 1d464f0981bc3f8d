"""Where a dashboard's render time goes in headless Chromium: which chart settles when, and which browser
process and thread spends the CPU (a companion to bench/viewer_latency.py, which only times the whole).

On a loaded machine the wall time of a render swings by a factor of 3 between runs; the CPU seconds each
process spends do not, so they are what this prints beside the time:

- the time from the navigation's start at which each chart first counts as settled (the per-chart part of
  `ALL_CHARTS_SETTLED`), polled every 100 ms: which chart the dashboard waits for;
- CPU seconds per Chromium process type and thread (from /proc) during the render, and during the
  `--after` seconds that follow it: the renderer's main thread runs Superset's JavaScript, layout and the
  compositor commits; in the GPU process, with `--disable-gpu`, the WebGL of the deck.gl maps runs in
  SwiftShader (main thread: ANGLE and SwiftShader's shader compilation; `Thread<NN>`: SwiftShader's raster
  workers) and VizCompositorThread composites the page in software. A WebGL frame reaches the page through a
  synchronous read-back in the renderer's commit, so the GPU process's work is on the render's critical path;
- the page's long tasks (over 50 ms on the main thread), summed.

The data cache is left as the warm-up filled it (`--empty-cache` empties it before each render).

Run: `.venv/bin/python bench/render_profile.py [--serving-db FILE] [--dashboard live-traffic] [--runs 2]`.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.viewer_latency import (
    SETTLED_AT,
    bundle_dashboards,
    clear_data_cache,
    marts_bench,
)
from tests.dashboards.conftest import CHART_SETTLED, CHROMIUM, CHROMIUM_ARGS, log_in, running_superset

RENDER_TIMEOUT_MS = 300_000
# Per chart, by name: settled or not (CHART_SETTLED, the test ALL_CHARTS_SETTLED makes of every chart).
CHARTS_SETTLED = f"""() => Object.fromEntries(Array.from(document.querySelectorAll('[data-test-chart-id]'),
  chart => [chart.getAttribute('data-test-chart-name'), ({CHART_SETTLED})(chart)]))"""
LONG_TASKS = """window.__longTasks = [];
new PerformanceObserver(list => { for (const task of list.getEntries()) window.__longTasks.push(task.duration); })
  .observe({type: 'longtask', buffered: true});"""
# WebGL frames begun (clears of a drawing buffer) and draw calls, counted by wrapping the WebGL2 context's methods.
WEBGL_COUNTS = """window.__webgl = {clears: 0, draws: 0};
for (const name of ['clear', 'drawArrays', 'drawElements', 'drawArraysInstanced', 'drawElementsInstanced']) {
  const original = WebGL2RenderingContext.prototype[name];
  WebGL2RenderingContext.prototype[name] = function (...rest) {
    window.__webgl[name === 'clear' ? 'clears' : 'draws'] += 1;
    return original.apply(this, rest);
  };
}"""

CpuTimes = collections.Counter[tuple[str, str]]


def process_kind(process: psutil.Process) -> str:
    """Chromium's process type (renderer, gpu-process, utility, zygote) from its --type flag; the browser has none."""
    return next((arg[len("--type=") :] for arg in process.cmdline() if arg.startswith("--type=")), "browser")


def cpu_seconds(browser_process: psutil.Process) -> CpuTimes:
    """User + system CPU seconds of every thread of the browser and its children, by (process type, thread name)."""
    times: CpuTimes = collections.Counter()
    for process in [browser_process, *browser_process.children(recursive=True)]:
        try:
            kind = process_kind(process)
            for thread in process.threads():
                try:
                    name = Path(f"/proc/{process.pid}/task/{thread.id}/comm").read_text().strip()
                except OSError:
                    continue  # the thread ended
                times[(kind, name)] += thread.user_time + thread.system_time
        except psutil.Error:
            continue  # the process ended
    return times


def spent(after: CpuTimes, before: CpuTimes) -> CpuTimes:
    return collections.Counter({key: after[key] - before.get(key, 0.0) for key in after})


def by_process(times: CpuTimes) -> dict[str, float]:
    totals: collections.Counter[str] = collections.Counter()
    for (kind, _), seconds in times.items():
        totals[kind] += seconds
    return {kind: round(seconds, 2) for kind, seconds in totals.most_common()}


def render(page: Any, url: str, expected: int) -> tuple[float, dict[str, float]]:
    """Open the dashboard; seconds until all charts are settled, and each chart's first settled time."""
    page.goto(url, wait_until="commit")
    settled_at: dict[str, float] = {}
    while True:
        now = page.evaluate("() => performance.now()")
        for name, settled in page.evaluate(CHARTS_SETTLED).items():
            if settled and name not in settled_at:
                settled_at[name] = now / 1000
        done = page.evaluate(SETTLED_AT, expected)
        if done is not False:  # a chart that settled between the two evaluations: at the end
            names = page.evaluate(CHARTS_SETTLED)
            return done / 1000, {name: settled_at.get(name, done / 1000) for name in names}
        if now > RENDER_TIMEOUT_MS:
            raise TimeoutError(f"{url}: not settled after {RENDER_TIMEOUT_MS / 1000:.0f} s")
        time.sleep(0.1)


def report_run(
    run: int, seconds: float, settled_at: dict[str, float], during: CpuTimes, after: CpuTimes, after_s: float
) -> None:
    print(f"run {run}: settled at {seconds:.2f} s; load average {psutil.getloadavg()[0]:.1f}")
    for name, at in sorted(settled_at.items(), key=lambda item: item[1]):
        print(f"  {at:6.2f} s  {name}")
    print(f"  browser CPU during the render: {sum(during.values()):.2f} s {by_process(during)}")
    for (kind, thread), cpu in during.most_common(8):
        print(f"    {cpu:6.2f} s  {kind:<12} {thread}")
    print(f"  browser CPU in the {after_s:.0f} s after it: {sum(after.values()):.2f} s {by_process(after)}")


def main(args: argparse.Namespace) -> int:
    serving_db = (args.serving_db or marts_bench().cached_serving_db()).resolve()
    dashboard = next(d for d in bundle_dashboards() if d.slug == args.dashboard)
    from playwright.sync_api import sync_playwright

    with (
        tempfile.TemporaryDirectory(prefix="tw-render-profile-") as home,
        running_superset(Path(home), serving_db) as superset,
        sync_playwright() as playwright,
    ):
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            # The Playwright driver's oldest Chromium child is the browser process.
            chromium = min(
                (p for p in psutil.Process().children(recursive=True) if "chrom" in p.name()),
                key=lambda p: p.create_time(),
            )
            password = superset.operator_password if dashboard.user == "operator" else superset.viewer_password
            page = log_in(browser, superset, dashboard.user, password)
            page.add_init_script(LONG_TASKS)
            page.add_init_script(WEBGL_COUNTS)
            url = f"{superset.url}/superset/dashboard/{dashboard.slug}/"
            render(page, url, dashboard.on_opening)  # warm-up: the browser's HTTP cache and Superset's data cache
            for run in range(args.runs):
                page.goto("about:blank")
                time.sleep(1)
                if args.empty_cache:
                    clear_data_cache(superset)
                before = cpu_seconds(chromium)
                seconds, settled_at = render(page, url, dashboard.on_opening)
                settled = cpu_seconds(chromium)
                long_tasks = page.evaluate("() => window.__longTasks")
                webgl = page.evaluate("() => ({...window.__webgl})")
                time.sleep(args.after)
                webgl_after = page.evaluate("() => ({...window.__webgl})")
                after = spent(cpu_seconds(chromium), settled)
                report_run(run, seconds, settled_at, spent(settled, before), after, args.after)
                print(f"  long tasks until settled: {len(long_tasks)}, {sum(long_tasks) / 1000:.2f} s")
                print(
                    f"  WebGL until settled: {webgl['clears']} clears, {webgl['draws']} draw calls; in the "
                    f"{args.after:.0f} s after: {webgl_after['clears'] - webgl['clears']} clears, "
                    f"{webgl_after['draws'] - webgl['draws']} draw calls"
                )
        finally:
            browser.close()
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--serving-db", type=Path, help="this serving DuckDB instead of the cached 30-day marts'")
    parser.add_argument("--dashboard", default="live-traffic", help="the dashboard's slug (live-traffic)")
    parser.add_argument("--runs", type=int, default=2, help="renders measured after the warm-up (2)")
    parser.add_argument("--after", type=float, default=5.0, help="seconds of CPU counted after each render (5)")
    parser.add_argument("--empty-cache", action="store_true", help="empty Superset's data cache before each render")
    sys.exit(main(parser.parse_args()))
