"""The `trafficwatch` command: argument parsing only, then one library call per subcommand."""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import json
import logging
import logging.handlers
import os
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from trafficwatch import errors, localenv, services
from trafficwatch.config import REPO_ROOT, ConfigError, home_from_env, load_settings

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Long-running commands: their stderr is their service log ($TRAFFICWATCH_HOME/logs/NAME.log), written live.
SERVICES = ("worker", "feed", "history")
_held: _HeldLog | None = None
_stderr: TextIO = sys.stderr  # the terminal's stderr, kept for the command's own lines (see _other_output_to)


def log_file_path() -> Path:
    """The log of every command (of services: their warnings and errors), with every failure's traceback."""
    return home_from_env() / "logs" / "trafficwatch.log"


class _WithoutTraceback(logging.Formatter):
    """A record's traceback goes to the log file, not to the terminal or a service log."""

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        try:
            return super().format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


class _HeldLog(logging.Handler):
    """The log lines of a one-shot command, shown on stderr once it succeeds (before its result) and
    dropped if it fails: a failure is one line on the terminal, the lines before it are in the log file."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def show(self) -> None:
        for line in self.lines:
            print(line, file=_stderr)
        self.lines.clear()


def _configure_logging(command: str, verbose: bool) -> list[logging.Handler]:
    """Log records go to the log file, and to stderr: once a one-shot command succeeded, or live with -v or
    for a service (its stderr is its own log). Tracebacks go to the log file only, unless -v."""
    global _held
    level = logging.DEBUG if verbose else logging.INFO
    root = logging.getLogger()
    root.setLevel(level)
    logging.getLogger("botocore").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    _held = None
    terminal: logging.Handler
    if command in SERVICES or verbose:
        terminal = logging.StreamHandler(sys.stderr)
    else:
        terminal = _held = _HeldLog()
    if verbose:
        terminal.setFormatter(logging.Formatter(LOG_FORMAT))
    else:
        terminal.setFormatter(_WithoutTraceback(LOG_FORMAT))
        terminal.addFilter(lambda record: record.name != errors.log.name)  # main prints that line itself
    handlers = [terminal]
    path = log_file_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        log_file = logging.handlers.RotatingFileHandler(path, maxBytes=10_000_000, backupCount=3, encoding="utf-8")
    except OSError:  # a read-only home: the terminal line still names the cause
        log_file = None
    if log_file is not None:
        log_file.setLevel(logging.WARNING if command in SERVICES else level)  # services: their log has the rest
        # Many processes append to it: each line says which process and command wrote it.
        log_file.setFormatter(logging.Formatter(LOG_FORMAT.replace(" ", f" [%(process)d {command}] ", 1)))
        handlers.append(log_file)
    for handler in handlers:
        root.addHandler(handler)
    return handlers


def _spare_aws_lookups() -> None:
    """No lookup of EC2's metadata service (IMDS) when the environment already says what it would.

    delta-rs opens a table on AWS's own endpoint with an AWS SDK configuration whose region comes from the
    process's environment (AWS_REGION: the AWS_REGION of the storage options is not read there), the
    profile files, then IMDS: three warnings `aws_config::imds::region` per table opened, off EC2. Without
    keys, its credentials chain asks IMDS too. So the region is always set (as load_settings sets it: Python's
    S3 client and delta-rs read the same one), and IMDS is off when credentials cannot come from it: keys
    given, or an endpoint of our own (the local S3)."""
    if not os.environ.get("AWS_REGION"):
        os.environ["AWS_REGION"] = os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    keys = os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY")
    if keys or os.environ.get("AWS_ENDPOINT_URL"):
        os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")


class _LogWriter(io.TextIOBase):
    """A text stream whose lines become log records: dbt's console output follows the command's log."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__()
        self.logger = logger
        self.partial = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        *lines, self.partial = (self.partial + text).split("\n")
        for line in lines:
            if line.strip():
                self.logger.info(line.rstrip())
        return len(text)


def _say(text: str) -> None:
    """A command's result, on stdout, after the log lines held for the terminal."""
    if _held is not None:
        _held.show()
    print(text, flush=True)


def _cmd_feed(args: argparse.Namespace) -> int:
    from trafficwatch import feed

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


def _cmd_ingest(args: argparse.Namespace) -> int:
    """fetch the current snapshot once and land it in S3 (exit 0: landed or unchanged)

    Fetch the current snapshot from TRAFFICWATCH_API_URL in TRAFFICWATCH_API_MODE and land it unchanged under raw/
    in TRAFFICWATCH_BUCKET, unless that snapshot is already landed. Exit 0 when landed or unchanged; exit 1 with a
    one-line reason otherwise (the bad body goes to quarantine/).
    """
    from trafficwatch import landing

    settings = load_settings()
    result = landing.ingest(settings)
    _say(result.summary(settings.bucket))
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    """merge every landed snapshot not merged yet into the Delta tables (what the DAG runs)

    Merge every raw object under raw/ that the merge log does not hold into the Delta tables under lake/, validating
    rows (invalid ones go to rejected_records) and recording each object in merge_log. Idempotent: a rerun or a
    concurrent run adds nothing twice.
    """
    from trafficwatch import worker

    _say(worker.merge_pending(load_settings()).summary())
    return 0


def _cmd_backfill(args: argparse.Namespace) -> int:
    from trafficwatch import lake

    if args.end <= args.start:
        print(f"backfill: --end {args.end.isoformat()} is not after --start {args.start.isoformat()}", file=_stderr)
        return 2
    _say(lake.backfill(load_settings(), args.start, args.end).summary())
    return 0


def _cmd_history(args: argparse.Namespace) -> int:
    from trafficwatch import history

    settings = load_settings()
    if args.action == "status":
        _say(history.status_line(settings))
        return 0
    days = history.days_from_env() if args.days is None else args.days
    if days <= 0:
        _say(f"history: nothing to seed ({history.DAYS_VARIABLE}=0)")
        return 0
    os.nice(history.NICE)  # background work: the live minute goes first
    history.seed(settings, days, seed=args.seed)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    """JSON for operators: raw, pending and quarantined objects, latest measurement, tables, serving file

    Print, as JSON: raw_objects, pending_raw_objects, quarantined_objects, latest_measured_at, for each Delta table
    its uri, version, rows and files, and serving_db (the serving DuckDB's path) with serving_built_at (when it was
    last published, null if never).
    """
    from trafficwatch import serving

    _say(json.dumps(serving.status(load_settings()), indent=2))
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    from trafficwatch import worker

    with contextlib.redirect_stdout(_LogWriter(logging.getLogger("trafficwatch.dbt"))):  # dbt's console output
        result = worker.build_marts(load_settings(), full_refresh=args.full_refresh)
    _say(result.summary())
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    """run the data tests every build leaves out: the lake's own guarantees (the marts_audit DAG)

    Run, under the build lock, the dbt data tests of the staging models (one row per segment and snapshot in the
    lake, known statuses, one road segment version in force), which the minute's build leaves out. Exit 1 with one
    line naming the failing tests.
    """
    from trafficwatch import dbt_build

    with contextlib.redirect_stdout(_LogWriter(logging.getLogger("trafficwatch.dbt"))):  # dbt's console output
        counts = dbt_build.audit(load_settings())
    tests = counts["data tests"]
    _say(f"audit passed: {tests} data tests" if tests else "nothing to audit: the marts have not been built yet")
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    """serve merges and builds from a process that keeps dbt imported and the Delta tables open

    Import dbt and open the lake's tables, then run the merges, pending counts and builds that `trafficwatch
    merge|build` and the DAGs ask for on the Unix socket $TRAFFICWATCH_HOME/run/worker.sock (merges one at a time,
    builds one at a time). Saves dbt's 5-6 s import per build and the tables' opening per merge. Usually started as
    a service: `trafficwatch service start worker` (make demo and make up do).
    """
    from trafficwatch import worker

    worker.serve(load_settings())
    return 0


def _cmd_lag(args: argparse.Namespace) -> int:
    """JSON for operators: how far the dashboards are behind what has landed, and what waits to be merged

    Print, as JSON: the newest snapshot landed in raw/ (key, upstream time, landing time), the newest measurement
    the serving file shows (max measured_at of segment_latest) and when it was published and serving_age_s (its age
    now), lag_s (the difference in upstream time; 0 when up to date), unserved_snapshots and how long the oldest of
    them has waited (oldest_unserved_waiting_s), and pending_merge (landed snapshots the merge log does not hold)
    with the oldest of them.
    """
    from trafficwatch import operate

    _say(json.dumps(operate.lag(load_settings()), indent=2))
    return 0


def _cmd_check_freshness(args: argparse.Namespace) -> int:
    """exit 1 with one line when the dashboards are stale while the source is up (the pipeline_freshness DAG)

    Compare the newest data the serving file shows with TRAFFICWATCH_STALE_AFTER (seconds, default 600). Stale while
    the newest snapshot in raw/ landed within that threshold (the source is up): print one line naming what is stale
    and by how much on stderr, exit 1. Otherwise (fresh, or the source quiet, or nothing landed yet) print the line
    on stdout, exit 0.
    """
    from trafficwatch import alerts

    freshness = alerts.check_freshness(load_settings())
    if freshness.stale:
        if _held is not None:
            _held.show()
        print(freshness.line, file=_stderr)
        return 1
    _say(freshness.line)
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    """stop every local service started from this home (what `make down` runs)

    Stop every service with a pid file in $TRAFFICWATCH_HOME/run, each by its process group (SIGTERM, then SIGKILL
    after 30 s), Superset and Airflow first and S3 last, and wait until no process of those groups is left.
    """
    from trafficwatch import operate

    stopped = operate.stop_all(load_settings().home)
    for name, was_running in stopped.items():
        _say(f"{name}: {'stopped' if was_running else 'was not running'}")
    if not stopped:
        _say("no service was started from this home")
    return 0


def _cmd_maintain(args: argparse.Namespace) -> int:
    """compact, checkpoint and vacuum the Delta tables; expire old raw objects (if configured)"""
    from trafficwatch import lake

    _say(lake.maintain(load_settings()).summary())
    return 0


def _service(name: str) -> services.Service:
    settings = load_settings()
    if name == "s3":
        return services.local_s3(settings.home / "s3", settings.s3_port, settings.bucket)
    if name == "feed":
        return services.feed(settings.feed_port, os.environ.get("TRAFFICWATCH_FEED_ARGS", "").split())
    if name == "worker":
        from trafficwatch.worker import socket_path

        return services.worker(socket_path(settings))
    if name == "airflow":
        return services.airflow(settings.airflow_port)
    if name == "superset":
        return services.superset(settings.superset_port, REPO_ROOT)
    if name == "history":
        return services.history(settings.bucket)
    raise ConfigError(f"unknown service {name!r}")


def _cmd_service(args: argparse.Namespace) -> int:
    home = load_settings().home
    if args.action == "stop":
        stopped = services.stop(home, args.name)
        _say(f"{args.name}: {'stopped' if stopped else 'was not running'}")
        return 0
    if args.action == "status":
        pid = services.running_pid(home, args.name)
        _say(f"{args.name}: {'running, pid ' + str(pid) if pid else 'not running'}")
        return 0 if pid else 3
    service = _service(args.name)
    try:
        pid = services.start(service, home)
    except RuntimeError as error:  # its own one line: exited with code N, see its log
        print(f"{args.name}: {error}", file=_stderr)
        return 1
    _say(f"{args.name}: running, pid {pid}, {service.url}")
    return 0


def _iso(value: str) -> datetime:
    return datetime.fromisoformat(value)


def _utc(value: str) -> datetime:
    """An ISO 8601 time; without an offset it is taken as UTC."""
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _add_command(commands: Any, func: Callable[[argparse.Namespace], int]) -> None:
    """The subcommand of a function without arguments: named after it (`_cmd_check_freshness`: check-freshness),
    its help the docstring's first paragraph, its description the rest (argparse joins the lines)."""
    help_text, _, description = inspect.cleandoc(func.__doc__ or "").partition("\n\n")
    name = func.__name__.removeprefix("_cmd_").replace("_", "-")
    commands.add_parser(name, help=help_text, description=description or None).set_defaults(func=func)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trafficwatch", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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

    for simple in (_cmd_ingest, _cmd_merge):
        _add_command(commands, simple)

    backfill = commands.add_parser(
        "backfill",
        help="merge again the landed snapshots of a time range (idempotent)",
        description="Re-merge every landed snapshot measured in [--start, --end). Rows already in the lake "
        "are left as they are, missing ones are added: running it twice changes nothing.",
    )
    backfill.add_argument("--start", type=_utc, required=True, help="ISO 8601, inclusive (UTC if no offset)")
    backfill.add_argument("--end", type=_utc, required=True, help="ISO 8601, exclusive (UTC if no offset)")
    backfill.set_defaults(func=_cmd_backfill)

    build = commands.add_parser(
        "build",
        help="dbt build of the marts, then publish the serving DuckDB (what the marts DAG runs)",
        description="Run one `dbt build` of dbt_project/ into $TRAFFICWATCH_HOME/warehouse/traffic.duckdb "
        "(models and their data tests), then publish the marts to the serving file "
        "($TRAFFICWATCH_HOME/serving/traffic.duckdb or TRAFFICWATCH_SERVING_DB) by atomic replace. Exit 1 "
        "with a one-line reason, naming any failing data test, when nothing was published. Runs in the "
        "worker when one is running (`trafficwatch service start worker`), else here.",
    )
    build.add_argument(
        "--full-refresh", action="store_true", help="rebuild the incremental marts from the whole lake history"
    )
    build.set_defaults(func=_cmd_build)

    for simple in (_cmd_audit, _cmd_worker, _cmd_status, _cmd_lag, _cmd_check_freshness, _cmd_down):
        _add_command(commands, simple)

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

    _add_command(commands, _cmd_maintain)

    service = commands.add_parser(
        "service",
        help="start, stop or check a local background service (s3, feed, worker, airflow, superset, history)",
        description="Local services for offline runs, each in its own process group with its pid in "
        "$TRAFFICWATCH_HOME/run and its log in $TRAFFICWATCH_HOME/logs.",
    )
    service.add_argument("action", choices=("start", "stop", "status"))
    service.add_argument("name", choices=("s3", "feed", "worker", "airflow", "superset", "history"))
    service.set_defaults(func=_cmd_service)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. A failure is one line on stderr naming its cause, exit 1; its traceback goes to the
    log file ($TRAFFICWATCH_HOME/logs/trafficwatch.log).

    From the console script (no `argv`), in a checkout, the settings missing from the environment come from
    the repository's .env, the generated secrets and the local defaults, as `source scripts/env.sh` gives
    them to the make targets (`localenv`); a variable set in the environment always wins. Called with `argv`
    (tests, in-process), the environment is left as it is."""
    global _stderr
    _stderr = sys.stderr
    args = build_parser().parse_args(argv)
    added: dict[str, str] = {}
    if argv is None:  # the console script: in a checkout, the local settings of the make targets (localenv)
        try:
            added = localenv.apply()
        except (OSError, ValueError) as error:  # an unreadable or malformed .env or secrets.env
            print(f"configuration error: {error}", file=_stderr)
            return 2
    handlers = _configure_logging(args.command, args.verbose)
    log_file = log_file_path() if any(isinstance(handler, logging.FileHandler) for handler in handlers) else None
    if added:
        logging.getLogger(__name__).debug("local settings of %s: %s", REPO_ROOT, ", ".join(sorted(added)))
    _spare_aws_lookups()
    quiet = log_file is not None and not args.verbose and args.command not in SERVICES
    try:
        # From the console script, fd 2 stays on the log file until the process ends: object_store's runtime
        # threads can still panic while the interpreter shuts down ("Already shut down", seen after S3 went away).
        with _other_output_to(log_file, until_exit=argv is None) if quiet else contextlib.nullcontext():
            return _run(args, log_file)
    finally:
        for handler in handlers:
            logging.getLogger().removeHandler(handler)
            handler.close()


def _run(args: argparse.Namespace, log_file: Path | None) -> int:
    try:
        code = args.func(args)
    except ConfigError as error:
        print(f"configuration error: {error}", file=_stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{args.command} interrupted", file=_stderr)
        return 130
    except Exception as error:
        print(errors.failure(args.command, error, traceback_in=log_file), file=_stderr)
        return 1
    if _held is not None:
        _held.show()
    return code


@contextlib.contextmanager
def _other_output_to(log_file: Path, until_exit: bool = False) -> Iterator[None]:
    """Send to the log file whatever else writes to stderr: Rust panics and warnings of delta-rs, polars and
    their object store (written straight to file descriptor 2), Python warnings, libraries' prints. The
    terminal's stderr is kept for the command's own lines (`_stderr`)."""
    global _stderr
    entry = sys.stderr
    entry.flush()
    saved = os.dup(2)
    try:
        on_fd_2 = entry.fileno() == 2
    except (AttributeError, OSError, ValueError):  # replaced by a capture (tests): not the terminal's fd
        on_fd_2 = False
    terminal = os.fdopen(os.dup(saved), "w", buffering=1, errors="backslashreplace") if on_fd_2 else entry
    log_stream = open(log_file, "a", buffering=1, encoding="utf-8", errors="backslashreplace")  # noqa: SIM115
    os.dup2(log_stream.fileno(), 2)
    _stderr, sys.stderr = terminal, log_stream
    try:
        yield
    finally:
        terminal.flush()
        _stderr, sys.stderr = entry, entry
        if not until_exit:
            os.dup2(saved, 2)
            log_stream.close()
        os.close(saved)
        if terminal is not entry:
            terminal.close()


if __name__ == "__main__":
    sys.exit(main())
