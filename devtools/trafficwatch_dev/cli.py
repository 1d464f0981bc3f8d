"""The `trafficwatch-dev` command: the local feed and the demo's simulated history, for development, demos,
tests and benchmarks. The same logging, settings and one-line failures as `trafficwatch` (`trafficwatch.cli.run`).
`make demo` starts both as services (`trafficwatch service start feed|history`)."""

from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime
from pathlib import Path

from trafficwatch import cli
from trafficwatch.cli_output import say
from trafficwatch.config import load_settings


def _cmd_feed(args: argparse.Namespace) -> int:
    from trafficwatch_dev import feed

    config = feed.FeedConfig(
        port=args.port,
        files=tuple(args.files),
        base=args.base,
        interval_s=args.interval,
        speed=args.speed,
        start=args.start,
        seed=args.seed,
        fault=args.fault,
        fault_count=args.fault_count,
        retry_after_s=args.retry_after,
        slow_s=args.slow_seconds,
    )
    feed.serve(config)
    return 0


def _cmd_history(args: argparse.Namespace) -> int:
    from trafficwatch_dev import history

    settings = load_settings()
    if args.action == "status":
        say(history.status_line(settings))
        return 0
    days = history.days_from_env() if args.days is None else args.days
    if days <= 0:
        say(f"history: nothing to seed ({history.DAYS_VARIABLE}=0)")
        return 0
    os.nice(history.NICE)  # background work: the live minute goes first
    history.seed(settings, days, seed=args.seed)
    return 0


def _iso(value: str) -> datetime:
    return datetime.fromisoformat(value)


def build_parser() -> argparse.ArgumentParser:
    parser, commands = cli.command_parser("trafficwatch-dev", __doc__)

    feed = commands.add_parser(
        "feed",
        help="serve the Opendatasoft API locally from snapshot files or a simulator",
        description="Serve the three Rennes traffic endpoints (exports, records, v1) on 127.0.0.1, from "
        "snapshot files given in order (one per upstream interval) or, without files, from a simulator "
        "evolving a real base snapshot. Control: GET /_feed/state, POST /_feed/advance, POST /_feed/fault.",
    )
    feed.add_argument("files", nargs="*", type=Path, help="exports/json snapshot files, served in order")
    feed.add_argument("--port", type=int, default=8090, help="port on 127.0.0.1 (default 8090)")
    feed.add_argument("--base", type=Path, help="simulator base snapshot (default: the packaged real one)")
    feed.add_argument("--interval", type=float, default=180.0, help="upstream interval, simulated s")
    feed.add_argument("--speed", type=float, default=1.0, help="simulated seconds per real second")
    feed.add_argument("--start", type=_iso, help="simulated start time, ISO 8601 (default: now)")
    feed.add_argument("--seed", type=int, default=0, help="simulator seed")
    feed.add_argument("--fault", help="misbehave: http500, http429, slow, truncated, html200, empty, ...")
    feed.add_argument("--fault-count", type=int, help="misbehave on the next N data requests only")
    feed.add_argument("--retry-after", type=int, default=2, help="Retry-After seconds for http429")
    feed.add_argument("--slow-seconds", type=float, default=30.0, help="delay of the slow fault")
    feed.set_defaults(func=_cmd_feed)

    history = commands.add_parser(
        "history",
        help="demo: land simulated past snapshots under raw/ for the merge and build to take; or how far that got",
        description="seed: land the local feed simulator's snapshots of the last --days days (default "
        "DEMO_HISTORY_DAYS, else 14), one every 3 minutes, newest first, under raw/ as the ingest lands live ones; "
        "keys already landed are left alone (a rerun lands only what is missing). After each day, the worker (if "
        "running) lists raw/ again, so traffic_merge and traffic_marts take the day at once. Progress in "
        "$TRAFFICWATCH_HOME/demo-history.json. status: one line saying how far it got. `make demo` runs it as "
        "the service `history`.",
    )
    history.add_argument("action", choices=("seed", "status"))
    history.add_argument("--days", type=int, help="days of history (default: DEMO_HISTORY_DAYS, else 14)")
    history.add_argument("--seed", type=int, default=0, help="simulator seed: the demo feed's (default 0)")
    history.set_defaults(func=_cmd_history)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command, as `trafficwatch` runs its own (`trafficwatch.cli.run`)."""
    return cli.run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
