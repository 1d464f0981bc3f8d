"""The `trafficwatch` command: argument parsing only, then one library call per subcommand."""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import logging
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from trafficwatch import cli_output, errors, localenv, services
from trafficwatch.cli_output import LogWriter, say, show_held, to_terminal
from trafficwatch.config import REPO_ROOT, ConfigError, load_settings

# Long-running commands: their stderr is their service log ($TRAFFICWATCH_HOME/logs/NAME.log), written live.
# `feed` and `history` are the development commands of `trafficwatch-dev` (devtools/), run through `run`.
SERVICES = ("worker", "feed", "history")


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


def _cmd_ingest(args: argparse.Namespace) -> int:
    """fetch the current snapshot once and land it in S3 (exit 0: landed or unchanged)

    Fetch the current snapshot from TRAFFICWATCH_API_URL in TRAFFICWATCH_API_MODE and land it unchanged under raw/
    in TRAFFICWATCH_BUCKET, unless that snapshot is already landed. Exit 0 when landed or unchanged; exit 1 with a
    one-line reason otherwise (the bad body goes to quarantine/).
    """
    from trafficwatch import landing

    settings = load_settings()
    result = landing.ingest(settings)
    say(result.summary(settings.bucket))
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    """merge every landed snapshot not merged yet into the Delta tables (what the DAG runs)

    Merge every raw object under raw/ that the merge log does not hold into the Delta tables under lake/, validating
    rows (invalid ones go to rejected_records) and recording each object in merge_log. Idempotent: a rerun or a
    concurrent run adds nothing twice.
    """
    from trafficwatch import worker

    say(worker.merge_pending(load_settings()).summary())
    return 0


def _cmd_backfill(args: argparse.Namespace) -> int:
    from trafficwatch import lake

    if args.end <= args.start:
        to_terminal(f"backfill: --end {args.end.isoformat()} is not after --start {args.start.isoformat()}")
        return 2
    say(lake.backfill(load_settings(), args.start, args.end).summary())
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    """JSON for operators: raw, pending and quarantined objects, latest measurement, tables, serving file

    Print, as JSON: raw_objects, pending_raw_objects, quarantined_objects, latest_measured_at, for each Delta table
    its uri, version, rows and files, and serving_db (the serving DuckDB's path) with serving_built_at (when it was
    last published, null if never).
    """
    from trafficwatch import serving

    say(json.dumps(serving.status(load_settings()), indent=2))
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    from trafficwatch import worker

    with contextlib.redirect_stdout(LogWriter(logging.getLogger("trafficwatch.dbt"))):  # dbt's console output
        result = worker.build_marts(load_settings(), full_refresh=args.full_refresh)
    say(result.summary())
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    """run the data tests every build leaves out: the lake's own guarantees (the marts_audit DAG)

    Run, under the build lock, the dbt data tests of the staging models (one row per segment and snapshot in the
    lake, known statuses, one road segment version in force), which the minute's build leaves out. Exit 1 with one
    line naming the failing tests.
    """
    from trafficwatch import worker

    with contextlib.redirect_stdout(LogWriter(logging.getLogger("trafficwatch.dbt"))):  # dbt's console output
        counts = worker.audit_marts(load_settings())
    tests = counts["data tests"]
    say(f"audit passed: {tests} data tests" if tests else "nothing to audit: the marts have not been built yet")
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

    say(json.dumps(operate.lag(load_settings()), indent=2))
    return 0


def _cmd_check_freshness(args: argparse.Namespace) -> int:
    """exit 1 with one line when the dashboards are stale while the source is up (the pipeline_freshness DAG)

    Compare the newest data the serving file shows with TRAFFICWATCH_STALE_AFTER (seconds, default 600). Stale while
    the newest snapshot in raw/ landed within that threshold (the source is up): print one line naming what is stale
    and by how much on stderr, exit 1. Otherwise (fresh, or the source quiet, or nothing landed yet) print the line
    on stdout, exit 0.
    """
    from trafficwatch import worker

    freshness = worker.check_freshness(load_settings())
    if freshness.stale:
        show_held()
        to_terminal(freshness.line)
        return 1
    say(freshness.line)
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    """stop every local service started from this home (what `make down` runs)

    Stop every service with a pid file in $TRAFFICWATCH_HOME/run, each by its process group (SIGTERM, then SIGKILL
    after 30 s), Superset and Airflow first and S3 last, and wait until no process of those groups is left.
    """
    from trafficwatch import operate

    stopped = operate.stop_all(load_settings().home)
    for name, was_running in stopped.items():
        say(f"{name}: {'stopped' if was_running else 'was not running'}")
    if not stopped:
        say("no service was started from this home")
    return 0


def _cmd_maintain(args: argparse.Namespace) -> int:
    """compact, checkpoint and vacuum the Delta tables; expire old raw objects (if configured)"""
    from trafficwatch import worker

    say(worker.maintain_lake(load_settings()).summary())
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
        say(f"{args.name}: {'stopped' if stopped else 'was not running'}")
        return 0
    if args.action == "status":
        pid = services.running_pid(home, args.name)
        say(f"{args.name}: {'running, pid ' + str(pid) if pid else 'not running'}")
        return 0 if pid else 3
    service = _service(args.name)
    try:
        pid = services.start(service, home)
    except RuntimeError as error:  # its own one line: exited with code N, see its log
        to_terminal(f"{args.name}: {error}")
        return 1
    say(f"{args.name}: running, pid {pid}, {service.url}")
    return 0


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


def command_parser(prog: str, description: str | None) -> tuple[argparse.ArgumentParser, Any]:
    """A command's parser with -v and its subcommands (add them with `.add_parser`), as `run` expects."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    return parser, parser.add_subparsers(dest="command", required=True, metavar="COMMAND")


def build_parser() -> argparse.ArgumentParser:
    parser, commands = command_parser("trafficwatch", __doc__)

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
    """The `trafficwatch` console script: one command of `build_parser`, see `run`."""
    return run(build_parser(), argv)


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Run one command of `parser` (this module's, or `trafficwatch-dev`'s). A failure is one line on stderr
    naming its cause, exit 1; its traceback goes to the log file ($TRAFFICWATCH_HOME/logs/trafficwatch.log).

    From the console script (no `argv`), in a checkout, the settings missing from the environment come from
    the repository's .env, the generated secrets and the local defaults, as `source scripts/env.sh` gives
    them to the make targets (`localenv`); a variable set in the environment always wins. Called with `argv`
    (tests, in-process), the environment is left as it is."""
    cli_output.start()
    args = parser.parse_args(argv)
    added: dict[str, str] = {}
    if argv is None:  # the console script: in a checkout, the local settings of the make targets (localenv)
        try:
            added = localenv.apply()
        except (OSError, ValueError) as error:  # an unreadable or malformed .env or secrets.env
            to_terminal(f"configuration error: {error}")
            return 2
    handlers = cli_output.configure_logging(args.command, args.verbose, service=args.command in SERVICES)
    log_file = (
        cli_output.log_file_path() if any(isinstance(handler, logging.FileHandler) for handler in handlers) else None
    )
    if added:
        logging.getLogger(__name__).debug("local settings of %s: %s", REPO_ROOT, ", ".join(sorted(added)))
    _spare_aws_lookups()
    quiet = log_file is not None and not args.verbose and args.command not in SERVICES
    try:
        # From the console script, fd 2 stays on the log file until the process ends: object_store's runtime
        # threads can still panic while the interpreter shuts down ("Already shut down", seen after S3 went away).
        with cli_output.other_output_to(log_file, until_exit=argv is None) if quiet else contextlib.nullcontext():
            return _run(args, log_file)
    finally:
        for handler in handlers:
            logging.getLogger().removeHandler(handler)
            handler.close()


def _run(args: argparse.Namespace, log_file: Path | None) -> int:
    try:
        code = args.func(args)
    except ConfigError as error:
        to_terminal(f"configuration error: {error}")
        return 2
    except KeyboardInterrupt:
        to_terminal(f"{args.command} interrupted")
        return 130
    except Exception as error:
        to_terminal(errors.failure(args.command, error, traceback_in=log_file))
        return 1
    show_held()
    return code


if __name__ == "__main__":
    sys.exit(main())
