"""Marts: one `dbt build` of the warehouse DuckDB, then the atomic publish of the serving DuckDB.

dbt (dbt-duckdb, project in `dbt_project/`) reads the lake's Delta tables in place through DuckDB's delta
extension and builds the marts into its own warehouse file, `$TRAFFICWATCH_HOME/warehouse/traffic.duckdb`.
Dashboards never open that file: DuckDB allows one writer or many readers, never both, so a dashboard
holding it would block the build and the build would break the dashboard.

After a build whose every data test passed, the marts are published to the serving file
(`$TRAFFICWATCH_HOME/serving/traffic.duckdb`, or TRAFFICWATCH_SERVING_DB): a new file is written beside it,
checkpointed, fsynced, renamed over it (`os.replace`, atomic on POSIX) and made durable by an fsync of the
directory. A reader opening the serving path gets the previous file or the new one, complete either way,
and no lock error: nobody ever writes the serving file in place. The new file is normally a copy of the
previous one patched with the rows the build changed, so a publish costs what the new data costs, not
what the history weighs; a whole copy of the marts is written the first time, after a full refresh, once
a day (to reclaim deleted rows) and whenever a patched mart does not match the warehouse. The 15-minute
marts and the congestion events keep only the last TRAFFICWATCH_SERVING_DAYS days (default 30) there;
the warehouse keeps all.

The DuckDB extensions (httpfs, delta) are installed from their PyPI wheels into
`$TRAFFICWATCH_HOME/duckdb/extensions`, the `extension_directory` of the dbt profile, so dbt-duckdb's
INSTALL/LOAD finds them there and never downloads anything.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb

from trafficwatch import health
from trafficwatch.config import DEFAULT_SERVING_DAYS as DEFAULT_SERVING_DAYS  # where tests and benches name it
from trafficwatch.config import REPO_ROOT, Settings

log = logging.getLogger(__name__)

DBT_PROJECT_DIR = REPO_ROOT / "dbt_project"
EXTENSIONS = ("httpfs", "delta")
WAREHOUSE_NAME = "traffic"  # dbt-duckdb names the warehouse catalog after its file: traffic.duckdb


@dataclass(frozen=True)
class Mart:
    """A mart of the serving file, and how it is published.

    `keep`: which rows the serving file keeps (SQL on $cutoff, the start of the serving window).
    `changed`: for marts patched in place, the rows a build may have rebuilt since the previous publish:
    SQL on the temporary table `touched` (the snapshot times merged since, `measured_at`) and on $since
    (for episodes: the earliest of those times and the previous latest snapshot, minus the episode gap).
    It is the rule the dbt models use to rebuild rows. `typical`: the road marts, whose typical values
    (joined from the all-history profile on PROFILE_KEY) are refreshed where the profile moved.
    `stable`: for a mart whose every row changes each minute but some wide columns seldom do (a segment's
    geometry), the unique `key` and those columns: the other columns are updated in place and only rows
    whose stable columns changed are rewritten, so the file's checkpoint does not write them again.
    `days`: a shorter window than the serving file's for this mart (its `keep` then cuts there).
    """

    name: str
    keep: str | None = None
    changed: str | None = None
    typical: bool = False
    key: str | None = None
    stable: tuple[str, ...] = ()
    days: int | None = None


DETAIL_DAYS = 7  # days of 15-minute marts in the serving file (at most)
TOUCHED_BUCKETS = "SELECT DISTINCT time_bucket(INTERVAL 15 MINUTE, measured_at) FROM touched"
TOUCHED_HOURS = "SELECT DISTINCT time_bucket(INTERVAL 1 HOUR, measured_at) FROM touched"
# What the dashboards read, in the serving file's `main` schema.
MARTS = (
    Mart("segment_latest", key="segment_key", stable=("geometry_geojson", "path_json")),
    Mart("network_kpis_latest"),
    Mart("road_hour_of_week_profile"),
    Mart("segment_free_flow"),
    Mart("road_reliability_daily", keep="local_date > CAST($cutoff AS DATE)"),
    Mart("network_congestion_hourly", keep="hour_start > $cutoff"),
    # The 15-minute marts are the recent detail: the dashboards read the last 24 hours of the road buckets
    # and none of the segments' (over 30 days these two were 90 % of the file every publish copies and
    # syncs). The serving file keeps their last week; hourly and daily marts keep the whole window.
    Mart(
        "segment_traffic_15min",
        keep="bucket_start > $cutoff",
        changed=f"bucket_start IN ({TOUCHED_BUCKETS})",
        days=DETAIL_DAYS,
    ),
    Mart(
        "road_traffic_15min",
        keep="bucket_start > $cutoff",
        changed=f"bucket_start IN ({TOUCHED_BUCKETS})",
        typical=True,
        days=DETAIL_DAYS,
    ),
    Mart("road_traffic_hourly", changed=f"hour_start IN ({TOUCHED_HOURS})", typical=True),
    Mart(
        "congestion_events",
        keep="ended_at IS NULL OR ended_at > $cutoff",
        changed="ended_at IS NULL OR ended_at >= $since",
    ),
)
# The road marts' columns joined from road_hour_of_week_profile, and the profile's columns they come from.
TYPICAL_COLUMNS = {
    "typical_speed_kmh": "typical_speed_kmh",
    "typical_travel_time_s": "typical_travel_time_s",
    "typical_measured_km": "measured_km",
    "typical_measured_hours": "measured_hours",
}
PROFILE_KEY = ("road_name", "direction", "day_of_week", "hour_of_day")
LAKE_STATE = "lake_merges_absorbed"  # the merges the marts hold (dbt_project/macros/lake_changes.sql)
VIEWS_STATE = "dbt_views_built_for"  # the project fingerprint the warehouse's views were built from (run_dbt)
PUBLISH_FORMAT = 3
# A patched file keeps deleted rows' space until a whole copy rewrites it: one whole copy a day.
FULL_PUBLISH_EVERY = timedelta(hours=24)


class BuildError(RuntimeError):
    """The marts could not be built or published; the message is one line for the operator."""


class DataTestsFailed(BuildError):
    """dbt data tests failed: the data is wrong, so nothing was published (retrying will not help)."""

    def __init__(self, message: str, tests: list[str]) -> None:
        super().__init__(message)
        self.tests = tests


@dataclass(frozen=True)
class ServingConfig:
    """Where the marts are built and published, and how much the serving file keeps."""

    home: Path
    warehouse_db: Path
    serving_db: Path
    serving_days: int

    @property
    def extension_dir(self) -> Path:
        return self.home / "duckdb" / "extensions"

    @property
    def dbt_dir(self) -> Path:
        """dbt's target and logs: per home, so partial parsing state follows the warehouse it describes."""
        return self.home / "dbt"

    @classmethod
    def from_env(cls, settings: Settings) -> ServingConfig:
        """The serving settings of `settings` (read from the environment by `load_settings`)."""
        return cls(
            home=settings.home,
            warehouse_db=settings.home / "warehouse" / f"{WAREHOUSE_NAME}.duckdb",
            serving_db=serving_db_path(settings),
            serving_days=settings.serving_days,
        )


def serving_db_path(settings: Settings) -> Path:
    """The file dashboards open read-only: TRAFFICWATCH_SERVING_DB, else $TRAFFICWATCH_HOME/serving/traffic.duckdb."""
    return settings.serving_db or settings.home / "serving" / "traffic.duckdb"


@dataclass
class BuildResult:
    serving_db: Path
    built_at: datetime
    latest_measured_at: datetime | None
    nodes: dict[str, int] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    full_publish: bool = True
    dbt_seconds: float = 0.0
    publish_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "serving_db": str(self.serving_db),
            "built_at": self.built_at.isoformat(),
            "latest_measured_at": self.latest_measured_at.isoformat() if self.latest_measured_at else None,
            "nodes": self.nodes,
            "rows": self.rows,
            "full_publish": self.full_publish,
            "dbt_seconds": round(self.dbt_seconds, 3),
            "publish_seconds": round(self.publish_seconds, 3),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BuildResult:
        """The inverse of `as_dict` (a build done by the worker process comes back as JSON)."""
        latest = data["latest_measured_at"]
        return cls(
            serving_db=Path(data["serving_db"]),
            built_at=datetime.fromisoformat(data["built_at"]),
            latest_measured_at=datetime.fromisoformat(latest) if latest else None,
            nodes=data["nodes"],
            rows=data["rows"],
            full_publish=data["full_publish"],
            dbt_seconds=data["dbt_seconds"],
            publish_seconds=data["publish_seconds"],
        )

    def summary(self) -> str:
        nodes = ", ".join(f"{count} {kind}" for kind, count in sorted(self.nodes.items()))
        latest = self.latest_measured_at.isoformat() if self.latest_measured_at else "no data"
        return (
            f"built {nodes} in {self.dbt_seconds:.1f} s; published {len(self.rows)} marts "
            f"({'whole copy' if self.full_publish else 'patched'}, "
            f"{sum(self.rows.values()):,} rows, latest measurement {latest}) to {self.serving_db} "
            f"in {self.publish_seconds:.1f} s"
        )


# --------------------------------------------------------------------------- DuckDB extensions


def _wheel_extension(name: str) -> Path:
    """The extension file shipped in the `duckdb-extension-NAME` wheel for this DuckDB version."""
    spec = importlib.util.find_spec(f"duckdb_extension_{name}")
    if spec is None or spec.origin is None:
        raise BuildError(f"the DuckDB {name} extension is not installed: run `make install` (duckdb-extension-{name})")
    path = Path(spec.origin).parent / "extensions" / f"v{duckdb.__version__}" / f"{name}.duckdb_extension"
    if not path.is_file():
        raise BuildError(f"{path} is missing: duckdb-extension-{name} must match duckdb {duckdb.__version__}")
    return path


def ensure_extensions(directory: Path) -> None:
    """Install httpfs and delta from their wheels into `directory` unless they are there already."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {"extension_directory": str(directory), "autoinstall_known_extensions": False}
    with duckdb.connect(":memory:", config=config) as con:
        installed = {
            name
            for (name,) in con.execute(
                "select extension_name from duckdb_extensions() where installed and install_mode <> 'STATICALLY_LINKED'"
            ).fetchall()
        }
        for name in EXTENSIONS:
            if name not in installed:
                con.execute(f"INSTALL '{_wheel_extension(name)}'")
                log.info("installed the DuckDB %s extension from its wheel into %s", name, directory)


# --------------------------------------------------------------------------- dbt


@contextlib.contextmanager
def _environment(values: dict[str, str | None]) -> Iterator[None]:
    """Set (or unset, for None) environment variables for the duration of the block: dbt reads its
    profile and sources from the environment, and runs in this process.

    Only the variables whose value differs are written (and restored): setenv while another thread reads
    the C environment (the Rust runtimes of delta-rs and polars resolving a host name) can crash the
    process, and a worker builds with the same values every minute, so in steady state nothing is written.
    """
    changed = {name: value for name, value in values.items() if os.environ.get(name) != value}
    saved = {name: os.environ.get(name) for name in changed}

    def apply(assignments: dict[str, str | None]) -> None:
        for name, value in assignments.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    try:
        apply(changed)
        yield
    finally:
        apply(saved)


def _dbt_environment(settings: Settings, config: ServingConfig) -> dict[str, str | None]:
    """What profiles.yml and __sources.yml read, taken from the settings so both always agree. Explicit
    credentials (a DAG task's Airflow connection) replace the process's AWS keys for the build; without them
    DuckDB's S3 secret takes the keys of the environment."""
    values: dict[str, str | None] = {
        "TRAFFICWATCH_HOME": str(config.home),
        "TRAFFICWATCH_BUCKET": settings.bucket,
        "AWS_ENDPOINT_URL": settings.s3_endpoint_url,
        "AWS_REGION": settings.aws_region,
        "DO_NOT_TRACK": "1",
    }
    credentials = settings.s3_credentials
    if credentials:
        values.update({"AWS_SESSION_TOKEN": None, **credentials})
    return values


def _one_line(text: str, limit: int = 300) -> str:
    """dbt's multi-line messages ("Runtime Error in model X", then the cause) as one line."""
    line = " ".join(part.strip() for part in text.splitlines() if part.strip())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _failure_message(results: list[Any]) -> tuple[str, list[str]]:
    """One line naming what failed in a dbt run, and the names of the failing data tests."""
    failed_tests = sorted(
        r.node.name for r in results if r.node.resource_type == "test" and str(r.status) in ("fail", "error")
    )
    errored = [
        f"{r.node.name}: {_one_line(r.message or 'error')}"
        for r in results
        if r.node.resource_type != "test" and str(r.status) == "error"
    ]
    parts = []
    if failed_tests:
        parts.append(f"{len(failed_tests)} data test(s) failed: {', '.join(failed_tests)}")
    if errored:
        parts.append(f"{len(errored)} model(s) errored: {'; '.join(errored)}")
    return "; ".join(parts), failed_tests


def _guard_findings(config: ServingConfig, results: list[Any]) -> str:
    """What the failed guard test found, as it stored it (store_failures): "model: problem (n rows); ..."."""
    (guard,) = [r for r in results if r.node.resource_type == "test" and r.node.name == GUARD_TEST]
    try:
        with duckdb.connect(str(config.warehouse_db), read_only=True) as con:
            rows = con.execute(f"SELECT model, problem, failing_rows FROM {guard.node.relation_name}").fetchall()
    except duckdb.Error as error:
        return f"its findings could not be read: {_one_line(str(error), 120)}"
    return "; ".join(f"{model}: {problem} ({count} row{'s' if count != 1 else ''})" for model, problem, count in rows)


def _release_warehouse() -> None:
    """Close the DuckDB connection dbt-duckdb keeps open between the nodes of a run.

    It is kept open during the run (reopening would load the extensions and create the S3 secret again
    for every model and test) but must be closed afterwards: the publish opens the warehouse read-only,
    which DuckDB refuses while this process still holds it read-write.
    """
    from dbt.adapters.duckdb.connections import DuckDBConnectionManager

    with contextlib.suppress(Exception):  # nothing was opened (e.g. dbt failed to parse)
        DuckDBConnectionManager.env().close()
    DuckDBConnectionManager.close_all_connections()


def project_fingerprint() -> str:
    """A digest of the dbt project's files (models, macros, tests, configuration): what the views depend on."""
    digest = hashlib.sha256()
    for path in sorted(DBT_PROJECT_DIR.rglob("*")):
        if path.is_file() and path.suffix in (".sql", ".yml") and "target" not in path.parts:
            digest.update(str(path.relative_to(DBT_PROJECT_DIR)).encode() + path.read_bytes())
    return digest.hexdigest()[:12]


def _views_built_for(config: ServingConfig) -> str | None:
    """The project fingerprint the warehouse's views were last built from (None: not known)."""
    if not config.warehouse_db.is_file():
        return None
    try:
        with duckdb.connect(str(config.warehouse_db), read_only=True) as con:
            row = con.execute(f"SELECT fingerprint FROM main.{VIEWS_STATE}").fetchone()
    except duckdb.Error:
        return None
    return row[0] if row else None


def _record_views_built(config: ServingConfig, fingerprint: str) -> None:
    with duckdb.connect(str(config.warehouse_db)) as con:
        con.execute(f"CREATE OR REPLACE TABLE main.{VIEWS_STATE} AS SELECT ?::VARCHAR AS fingerprint", [fingerprint])


def _dbt_common_args(config: ServingConfig) -> list[str]:
    return [
        "--project-dir", str(DBT_PROJECT_DIR),
        "--profiles-dir", str(DBT_PROJECT_DIR),
        "--target-path", str(config.dbt_dir / "target"),
        "--log-path", str(config.dbt_dir / "logs"),
        # dbt.log keeps one line per node, not every SQL statement: at debug level, writing it (under a
        # lock the node threads queue for) was a tenth of a minute's build. The statements are in the
        # compiled files under the target path.
        "--log-level-file", "info",
    ]  # fmt: skip


# The models' YAML data tests (whole tables, staging's included): hourly in `audit`, not in a minute's build,
# which runs the one guard test over the rows it rebuilt instead (dbt_project/tests/guard_built_rows.sql).
AUDIT_SELECTION = "test_type:generic"
GUARD_TEST = "guard_built_rows"
_PARSED: dict[tuple[Any, ...], Any] = {}  # the last parsed project: (fingerprint, dbt environment) -> Manifest


def _parsed_project(common_args: list[str], key: tuple[Any, ...]) -> Any:
    """The dbt project parsed once per process (for one fingerprint and environment), then handed to every
    build: even a partial parse that finds nothing changed reads and checks the whole saved manifest, ~0.5 s
    of CPU a build, which the worker service (a long-lived process) need not pay each minute."""
    from dbt.cli.main import dbtRunner

    if key not in _PARSED:
        outcome = dbtRunner().invoke(["parse", *common_args, "--no-write-json"])
        if not outcome.success:
            cause = _one_line(str(outcome.exception or "see the dbt log"))
            raise BuildError(f"dbt could not parse the project: {cause}")
        _PARSED.clear()
        _PARSED[key] = outcome.result
    return _PARSED[key]


def run_dbt(settings: Settings, config: ServingConfig, full_refresh: bool = False) -> dict[str, int]:
    """One `dbt build` (models, then their data tests) into the warehouse; counts of nodes built by type.

    Runs in this process with dbt's programmatic runner; partial parsing is kept in `config.dbt_dir`.
    Views are created again only when the project changed since they were (or on a full refresh): a view
    holds no data, and dbt's cost per node (~0.2 s of Python each, under the GIL) made the nine views a
    seventh of a minute's build. Their data tests run every time. Raises DataTestsFailed naming the
    failing tests, BuildError for anything else that went wrong.
    """
    from dbt.cli.main import dbtRunner

    ensure_extensions(config.extension_dir)
    config.warehouse_db.parent.mkdir(parents=True, exist_ok=True)
    fingerprint = project_fingerprint()
    views_current = not full_refresh and _views_built_for(config) == fingerprint
    common = _dbt_common_args(config)
    args = [
        "build",
        *common,
        "--no-write-json",  # manifest.json and run_results.json: ~1 s a build that nobody reads here
    ]
    if views_current:
        # Every node but the view models. Not `--exclude` of the views: that drops their data tests too.
        args += ["--select", "config.materialized:table config.materialized:incremental resource_type:test"]
    if not full_refresh:
        # The YAML data tests, 36 nodes at ~0.2 s of dbt's Python each, run hourly in `audit`; the guard
        # checks the same rules on the rows this build rebuilt, in one node.
        args += ["--exclude", AUDIT_SELECTION]
    if full_refresh:
        # Every incremental model then reads the whole history: one at a time bounds memory and S3 load.
        args += ["--full-refresh", "--threads", "1"]
    environment = _dbt_environment(settings, config)
    with _environment(environment):
        try:
            manifest = _parsed_project(common, (fingerprint, *sorted(environment.items(), key=str)))
            outcome = dbtRunner(manifest=manifest).invoke(args)
        finally:
            _release_warehouse()
    results = list(getattr(outcome.result, "results", None) or [])
    if not outcome.success:
        message, failed_tests = _failure_message(results)
        if not message:
            message = f"dbt could not run: {_one_line(str(outcome.exception or 'see the dbt log above'))}"
        if GUARD_TEST in failed_tests:
            message += f" ({_guard_findings(config, results)})"
        message = f"dbt build failed, serving file not published: {message}"
        if failed_tests:
            raise DataTestsFailed(message, failed_tests)
        raise BuildError(message)
    if not views_current:
        _record_views_built(config, fingerprint)
    counts: dict[str, int] = {}
    for result in results:
        kind = "data tests" if result.node.resource_type == "test" else f"{result.node.resource_type}s"
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def audit(settings: Settings, config: ServingConfig | None = None) -> dict[str, int]:
    """The data tests a minute's build leaves out (`AUDIT_SELECTION`: every model's YAML data tests, over
    whole tables, and the lake's own guarantees seen through the staging models), run on their own: the
    `marts_audit` DAG every hour and `trafficwatch audit`. Counts of tests run, none before the marts were
    first built; raises DataTestsFailed naming the failing tests."""
    from dbt.cli.main import dbtRunner

    config = config or ServingConfig.from_env(settings)
    ensure_extensions(config.extension_dir)
    common = _dbt_common_args(config)
    environment = _dbt_environment(settings, config)
    with _build_lock(config), _environment(environment):
        if _views_built_for(config) is None:  # a new home: the staging views do not exist before a build
            return {"data tests": 0}
        try:
            manifest = _parsed_project(common, (project_fingerprint(), *sorted(environment.items(), key=str)))
            outcome = dbtRunner(manifest=manifest).invoke(
                ["test", *common, "--no-write-json", "--select", AUDIT_SELECTION]
            )
        finally:
            _release_warehouse()
    results = list(getattr(outcome.result, "results", None) or [])
    if not outcome.success:
        message, failed_tests = _failure_message(results)
        message = f"dbt test failed: {message or _one_line(str(outcome.exception or 'see the dbt log above'))}"
        if failed_tests:
            raise DataTestsFailed(message, failed_tests)
        raise BuildError(message)
    if not results:
        raise BuildError(f"audit ran no data test: nothing matches {AUDIT_SELECTION!r}")
    return {"data tests": len(results)}


# --------------------------------------------------------------------------- publish


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _quoted(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


@dataclass
class Published:
    rows: dict[str, int]
    built_at: datetime
    latest_measured_at: datetime | None
    full: bool  # every mart copied whole (else the previous file was patched)


def _reusable(con: duckdb.DuckDBPyConnection, config: ServingConfig, built_at: datetime) -> str | None:
    """Why the previous serving file (attached as `serving`) cannot be patched, or None if it can."""
    try:
        row = con.execute("SELECT format, serving_days, marts, full_built_at FROM serving.meta.publish").fetchone()
    except duckdb.Error:
        return "it has no publish metadata"
    if row is None:
        return "its publish metadata is empty"
    format_, days, marts, full_built_at = row
    if (format_, days, marts) != (PUBLISH_FORMAT, config.serving_days, [m.name for m in MARTS]):
        return "it was published with another layout or window"
    if built_at - full_built_at > FULL_PUBLISH_EVERY:
        return f"its last full copy is older than {FULL_PUBLISH_EVERY} (this one reclaims deleted rows)"
    (unknown,) = con.execute(
        f"SELECT count(*) FROM serving.meta.{LAKE_STATE} s ANTI JOIN {WAREHOUSE_NAME}.main.{LAKE_STATE} w "
        "USING (merged_at, measured_at)"
    ).fetchone()
    if unknown:
        return "it holds merges the warehouse does not (the warehouse was rebuilt)"
    return None


def mart_cutoff(mart: Mart, newest: datetime, serving_days: int) -> datetime:
    """The start of a mart's window in the serving file: `serving_days` before the newest measurement, or
    the mart's own shorter `days`."""
    return newest - timedelta(days=min(serving_days, mart.days or serving_days))


def _copy(con: duckdb.DuckDBPyConnection, mart: Mart, cutoff: datetime) -> None:
    keep = f"WHERE {mart.keep}" if mart.keep else ""
    con.execute(f"DROP TABLE IF EXISTS serving.main.{mart.name}")
    con.execute(
        f"CREATE TABLE serving.main.{mart.name} AS SELECT * FROM {WAREHOUSE_NAME}.main.{mart.name} {keep}",
        {"cutoff": cutoff} if mart.keep else None,
    )


def _touched(con: duckdb.DuckDBPyConnection) -> int:
    """The snapshot times the warehouse absorbed since the previous publish, as the temporary table
    `touched`: the (merge stamp, snapshot) pairs its state holds and the serving file's copy does not, so
    late snapshots and merges that committed out of stamp order count."""
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE touched AS SELECT DISTINCT measured_at FROM {WAREHOUSE_NAME}.main.{LAKE_STATE} "
        f"ANTI JOIN serving.meta.{LAKE_STATE} USING (merged_at, measured_at)"
    )
    return con.execute("SELECT count(*) FROM touched").fetchone()[0]


def _typical_moved(con: duckdb.DuckDBPyConnection) -> None:
    """The hours of the week whose typical values moved since the previous publish, as the temporary
    table `typical_moved`: the rows of road_hour_of_week_profile that differ between the warehouse and
    the serving file (read before the profile is copied over)."""
    columns = ", ".join((*PROFILE_KEY, *TYPICAL_COLUMNS.values()))
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE typical_moved AS SELECT DISTINCT {', '.join(PROFILE_KEY)} FROM ("
        f"(SELECT {columns} FROM {WAREHOUSE_NAME}.main.road_hour_of_week_profile "
        f"EXCEPT SELECT {columns} FROM serving.main.road_hour_of_week_profile) UNION ALL "
        f"(SELECT {columns} FROM serving.main.road_hour_of_week_profile "
        f"EXCEPT SELECT {columns} FROM {WAREHOUSE_NAME}.main.road_hour_of_week_profile))"
    )


def _patch(con: duckdb.DuckDBPyConnection, mart: Mart, cutoff: datetime, since: datetime) -> bool:
    """Bring a mart of the previous serving file up to date with the warehouse; False if it drifted.

    The rows the build may have rebuilt (`mart.changed`, from the snapshots merged since the previous
    publish) are replaced, and the rows out of the window dropped. Typical values move with history: they
    are refreshed in the rows of the hours of the week whose profile moved. The row count is then checked
    against the warehouse; a mismatch means the two diverged.
    """
    served, source = f"serving.main.{mart.name}", f"{WAREHOUSE_NAME}.main.{mart.name}"
    keep = f"AND ({mart.keep})" if mart.keep else ""
    changed = {"since": since} if "$since" in (mart.changed or "") else None
    con.execute(f"DELETE FROM {served} WHERE {mart.changed}", changed)
    con.execute(
        f"INSERT INTO {served} SELECT * FROM {source} WHERE ({mart.changed}) {keep}",
        {**(changed or {}), **({"cutoff": cutoff} if mart.keep else {})} or None,
    )
    if mart.keep:
        con.execute(f"DELETE FROM {served} WHERE NOT ({mart.keep})", {"cutoff": cutoff})
    if mart.typical:
        # The typical values of the moved hours of the week, read from the profile itself (the road marts
        # join them from it on PROFILE_KEY: the same values, without evaluating the mart's view over the
        # whole window); a profile row that disappeared leaves nulls, as the mart's left join does.
        profile = ", ".join(f"p.{column} AS {typical}" for typical, column in TYPICAL_COLUMNS.items())
        moved = (
            f"(SELECT m.*, {profile} FROM typical_moved AS m "
            f"LEFT JOIN {WAREHOUSE_NAME}.main.road_hour_of_week_profile AS p USING ({', '.join(PROFILE_KEY)}))"
        )
        on = " AND ".join(f"s.{column} = w.{column}" for column in PROFILE_KEY)
        assignments = ", ".join(f"{column} = w.{column}" for column in TYPICAL_COLUMNS)
        con.execute(f"UPDATE {served} AS s SET {assignments} FROM {moved} AS w WHERE {on}")
    (served_rows,) = con.execute(f"SELECT count(*) FROM {served}").fetchone()
    (source_rows,) = con.execute(
        f"SELECT count(*) FROM {source} {'WHERE ' + mart.keep if mart.keep else ''}",
        {"cutoff": cutoff} if mart.keep else None,
    ).fetchone()
    return served_rows == source_rows


def _patch_columns(con: duckdb.DuckDBPyConnection, mart: Mart) -> bool:
    """Bring a mart with `stable` columns up to date column-wise; False if its columns drifted.

    Rows whose key left the warehouse or whose stable columns changed are deleted and written again;
    every other column of the remaining rows is updated in place. A DuckDB checkpoint rewrites only the
    columns that changed: the geometry of 2,859 segments is not written again every minute.
    """
    served, source = f"serving.main.{mart.name}", f"{WAREHOUSE_NAME}.main.{mart.name}"
    columns = [row[0] for row in con.execute(f"DESCRIBE {source}").fetchall()]
    if columns != [row[0] for row in con.execute(f"DESCRIBE {served}").fetchall()]:
        return False
    same = " AND ".join(f"w.{column} IS NOT DISTINCT FROM s.{column}" for column in (mart.key, *mart.stable))
    con.execute(f"DELETE FROM {served} AS s WHERE NOT EXISTS (SELECT 1 FROM {source} AS w WHERE {same})")
    assignments = ", ".join(f"{c} = w.{c}" for c in columns if c != mart.key and c not in mart.stable)
    con.execute(f"UPDATE {served} AS s SET {assignments} FROM {source} AS w WHERE s.{mart.key} = w.{mart.key}")
    con.execute(
        f"INSERT INTO {served} SELECT * FROM {source} AS w "
        f"WHERE NOT EXISTS (SELECT 1 FROM {served} AS s WHERE s.{mart.key} = w.{mart.key})"
    )
    (served_rows,) = con.execute(f"SELECT count(*) FROM {served}").fetchone()
    (source_rows,) = con.execute(f"SELECT count(*) FROM {source}").fetchone()
    return served_rows == source_rows


# Called with the new file (not yet published), the file it replaces and what was published into it.
Recorder = Callable[[Path, Path, Published], None]


def publish(config: ServingConfig, full: bool = False, record: Recorder | None = None) -> Published:
    """Publish the warehouse's marts to the serving file by atomic replace (under the build lock).

    The new file is the previous serving file patched with what changed (its cost follows the merged
    snapshots), or, when there is no usable previous file, when `full` is asked, once a day, or if a
    patched mart does not match the warehouse, a whole copy of the marts. `record` then writes what else
    the new file carries (the pipeline-health tables, `health_recorder`) before it replaces the old one.
    """
    target = config.serving_db
    target.parent.mkdir(parents=True, exist_ok=True)
    # Beside the target, so that os.replace stays on one filesystem and is atomic.
    temporary = target.with_name(f"{target.name}.{uuid.uuid4().hex[:12]}.tmp")
    built_at = datetime.now(UTC)
    for stale in target.parent.glob(f"{target.name}.*.tmp*"):  # left by a publish that was killed
        stale.unlink(missing_ok=True)
    try:
        published = None
        if not full and target.is_file():
            shutil.copyfile(target, temporary)
            published = _publish_into(config, temporary, built_at, patch=True)
        if published is None:
            temporary.unlink(missing_ok=True)
            published = _publish_into(config, temporary, built_at, patch=False)
        if record is not None:
            record(temporary, target, published)
        _fsync(temporary)
        os.replace(temporary, target)
        _fsync(target.parent, directory=True)
    finally:
        temporary.unlink(missing_ok=True)
        temporary.with_name(temporary.name + ".wal").unlink(missing_ok=True)
    return published


def project_var(name: str) -> Any:
    """A var of the dbt project (dbt_project.yml), read without dbt."""
    import yaml

    return yaml.safe_load((DBT_PROJECT_DIR / "dbt_project.yml").read_text())["vars"][name]


def episode_gap() -> timedelta:
    """How far back a merged snapshot may change congestion episodes (var episode_gap_minutes)."""
    return timedelta(minutes=float(project_var("episode_gap_minutes")))


def _publish_into(config: ServingConfig, path: Path, built_at: datetime, patch: bool) -> Published | None:
    """Write the marts into the file at `path` (patching what it holds if `patch`); None if it cannot be
    patched, and then `path` is left unchanged."""
    with duckdb.connect(":memory:") as con:
        con.execute("SET TimeZone = 'UTC'")
        # The warehouse's views name their tables "traffic"."main"...: it is attached under that name.
        con.execute(f"ATTACH {_quoted(config.warehouse_db)} AS {WAREHOUSE_NAME} (READ_ONLY)")
        con.execute(f"ATTACH {_quoted(path)} AS serving")
        if patch and (reason := _reusable(con, config, built_at)):
            log.info("publishing a whole copy: the previous serving file cannot be patched, %s", reason)
            return None
        (latest,) = con.execute(f"SELECT max(measured_at) FROM {WAREHOUSE_NAME}.main.segment_latest").fetchone()
        con.execute("BEGIN")
        if patch:
            _touched(con)
            _typical_moved(con)
            (served_latest,) = con.execute("SELECT latest_measured_at FROM serving.meta.publish").fetchone()
            (earliest,) = con.execute("SELECT min(measured_at) FROM touched").fetchone()
            moments = [moment for moment in (earliest, served_latest) if moment is not None]
            since = (min(moments) if moments else built_at) - episode_gap() - timedelta(minutes=1)
        for mart in MARTS:
            cutoff = mart_cutoff(mart, latest or built_at, config.serving_days)
            if patch and (mart.changed or mart.stable):
                patched = _patch(con, mart, cutoff, since) if mart.changed else _patch_columns(con, mart)
                if not patched:
                    log.warning("publishing a whole copy: %s in the serving file differs from the warehouse", mart.name)
                    con.execute("ROLLBACK")
                    return None
            else:
                _copy(con, mart, cutoff)
        rows = {m.name: con.execute(f"SELECT count(*) FROM serving.main.{m.name}").fetchone()[0] for m in MARTS}
        full_built_at = (
            con.execute("SELECT full_built_at FROM serving.meta.publish").fetchone()[0] if patch else built_at
        )
        con.execute("CREATE SCHEMA IF NOT EXISTS serving.meta")
        # What the marts hold of the lake, for the next patch and for `trafficwatch lag`.
        if patch:
            con.execute(
                f"INSERT INTO serving.meta.{LAKE_STATE} SELECT * FROM {WAREHOUSE_NAME}.main.{LAKE_STATE} "
                f"ANTI JOIN serving.meta.{LAKE_STATE} USING (merged_at, measured_at)"
            )
        else:
            con.execute(
                f"CREATE OR REPLACE TABLE serving.meta.{LAKE_STATE} AS SELECT * FROM {WAREHOUSE_NAME}.main.{LAKE_STATE}"
            )
        con.execute(
            "CREATE OR REPLACE TABLE serving.meta.publish AS SELECT ?::INTEGER AS format, "
            "?::TIMESTAMPTZ AS built_at, ?::TIMESTAMPTZ AS latest_measured_at, ?::INTEGER AS serving_days, "
            "?::VARCHAR[] AS marts, ?::JSON AS mart_rows, ?::TIMESTAMPTZ AS full_built_at",
            [PUBLISH_FORMAT, built_at, latest, config.serving_days, [m.name for m in MARTS], json.dumps(rows),
             full_built_at],
        )  # fmt: skip
        con.execute("COMMIT")
        con.execute("CHECKPOINT serving")  # everything in the file itself: no WAL beside it
        con.execute("DETACH serving")
    return Published(rows, built_at, latest, full=not patch)


# --------------------------------------------------------------------------- the whole step


@contextlib.contextmanager
def _build_lock(config: ServingConfig) -> Iterator[None]:
    """One build at a time per warehouse (DuckDB has one writer): a second caller waits its turn."""
    config.warehouse_db.parent.mkdir(parents=True, exist_ok=True)
    with open(config.warehouse_db.parent / ".build.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another build of %s is running: waiting for it", config.warehouse_db)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_lake_health(settings: Settings, config: ServingConfig) -> health.LakeHealth:
    """What the lake gained since the serving file's health tables (`trafficwatch.health`). Health is the
    operator's view, not the dashboards' data: a lake that cannot be read gives nothing new, with a warning,
    and the health tables stay as they were."""
    try:
        return health.read_lake_health(settings, health.horizon(config.serving_db))
    except Exception as error:  # reported in one line: the marts are published regardless
        log.warning("health: could not read the merge log, rejected rows or quarantine: %s", _one_line(str(error)))
        return health.LakeHealth.empty()


def health_recorder(
    found: Callable[[], health.LakeHealth], config: ServingConfig, dbt_seconds: float, started: float
) -> Recorder:
    """The recorder that writes the health tables, with what `found()` returns (read_lake_health) and this
    build's row of the build log, into the new serving file. `started`: when the publish began
    (time.perf_counter())."""

    def record(path: Path, previous: Path, published: Published) -> None:
        build = {
            "dbt_seconds": dbt_seconds,
            "publish_seconds": time.perf_counter() - started,
            "full_publish": published.full,
            "serving_rows": sum(published.rows.values()),
        }
        health.record(path, previous, found(), published.built_at, config.serving_days, build)

    return record


def build(settings: Settings, config: ServingConfig | None = None, full_refresh: bool = False) -> BuildResult:
    """dbt build, then publish the serving file if every model and data test passed.

    The DAG `traffic_marts` and `trafficwatch build` both call this.
    """
    config = config or ServingConfig.from_env(settings)
    with _build_lock(config):
        started = time.perf_counter()
        nodes = run_dbt(settings, config, full_refresh=full_refresh)
        dbt_seconds = time.perf_counter() - started
        started = time.perf_counter()
        # The lake's health (S3 reads, ~0.2 s) is read while the marts are published, not before: only once
        # dbt is done, as it sets process variables, which must not change while delta-rs threads read them.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="health") as pool:
            lake_health = pool.submit(read_lake_health, settings, config)
            record = health_recorder(lake_health.result, config, dbt_seconds, started)
            published = publish(config, full=full_refresh, record=record)
        result = BuildResult(
            serving_db=config.serving_db,
            built_at=published.built_at,
            latest_measured_at=published.latest_measured_at,
            nodes=nodes,
            rows=published.rows,
            full_publish=published.full,
            dbt_seconds=dbt_seconds,
            publish_seconds=time.perf_counter() - started,
        )
    log.info(result.summary())
    return result


def serving_built_at(path: Path) -> datetime | None:
    """When the serving file at `path` was published, read from its metadata; None if there is none."""
    if not path.is_file():
        return None
    with duckdb.connect(str(path), read_only=True) as con:
        row = con.execute("SELECT built_at FROM meta.publish").fetchone()
    return row[0] if row else None


def status(settings: Settings) -> dict[str, Any]:
    """The lake's status (`lake.status`) and where the serving file is, and when it was published."""
    from trafficwatch import lake

    path = serving_db_path(settings)
    built_at = serving_built_at(path)
    return {
        **lake.status(settings),
        "serving_db": str(path),
        "serving_built_at": built_at.astimezone(UTC).isoformat() if built_at else None,
    }
