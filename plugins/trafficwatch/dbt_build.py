"""The warehouse side of the marts step: the DuckDB extensions, one `dbt build` (or the hourly audit of the
data tests it leaves out) of the warehouse DuckDB, and what is shared with the publish (`trafficwatch.serving`):
where both files are (ServingConfig), the build lock, the errors.

dbt (dbt-duckdb, project in `dbt_project/`) reads the lake's Delta tables in place through DuckDB's delta
extension and builds the marts into its own warehouse file, `$TRAFFICWATCH_HOME/warehouse/traffic.duckdb`.
Dashboards never open that file: DuckDB allows one writer or many readers, never both, so a dashboard
holding it would block the build and the build would break the dashboard.

The DuckDB extensions (httpfs, delta) are installed from their PyPI wheels into
`$TRAFFICWATCH_HOME/duckdb/extensions`, the `extension_directory` of the dbt profile, so dbt-duckdb's
INSTALL/LOAD finds them there and never downloads anything. DuckDB checks an extension's signature by
hashing the whole file at every LOAD: ~0.4 s of CPU for the two (delta is 82 MB) at the start of every
build. `ensure_extensions` has it checked once per process and file instead; builds then load them with
the check skipped (DUCKDB_EXTENSIONS_SIGNATURES_CHECKED, read by profiles.yml).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import duckdb

from trafficwatch.config import REPO_ROOT, Settings, environ, serving_db_path
from trafficwatch.errors import BuildError, DataTestsFailed

log = logging.getLogger(__name__)

DBT_PROJECT_DIR = REPO_ROOT / "dbt_project"
EXTENSIONS = ("httpfs", "delta")
WAREHOUSE_NAME = "traffic"  # dbt-duckdb names the warehouse catalog after its file: traffic.duckdb
VIEWS_STATE = "dbt_views_built_for"  # the project fingerprint the warehouse's views were built from (run_dbt)


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


@contextlib.contextmanager
def build_lock(config: ServingConfig) -> Iterator[None]:
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


# The extension files whose signature DuckDB checked in this process: (path, inode, size, mtime in ns).
_VERIFIED: set[tuple[str, int, int, int]] = set()


def ensure_extensions(directory: Path) -> None:
    """Install httpfs and delta from their wheels into `directory` unless they are there already, and have
    DuckDB check each one's signature (a LOAD with the check on) unless it did in this process for the same
    file: same path, inode, size and modification time. Raises BuildError naming a file that fails it."""
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
        paths = dict(
            con.execute(
                "select extension_name, install_path from duckdb_extensions() where extension_name in ?",
                [list(EXTENSIONS)],
            ).fetchall()
        )
        for name in EXTENSIONS:
            path = Path(paths[name])
            stat = path.stat()
            key = (str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
            if key in _VERIFIED:
                continue
            try:
                con.execute(f"LOAD '{path}'")
            except duckdb.Error as error:
                raise BuildError(f"the DuckDB {name} extension {path} was refused: {one_line(str(error))}") from None
            _VERIFIED.add(key)


# --------------------------------------------------------------------------- dbt


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
        # Not a setting: ensure_extensions, which every build and audit calls first, had DuckDB check the files.
        "DUCKDB_EXTENSIONS_SIGNATURES_CHECKED": "true",
    }
    credentials = settings.s3_credentials
    if credentials:
        values.update({"AWS_SESSION_TOKEN": None, **credentials})
    return values


def one_line(text: str, limit: int = 300) -> str:
    """dbt's multi-line messages ("Runtime Error in model X", then the cause) as one line."""
    line = " ".join(part.strip() for part in text.splitlines() if part.strip())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _failure_message(results: list[Any]) -> tuple[str, list[str]]:
    """One line naming what failed in a dbt run, and the names of the failing data tests."""
    failed_tests = sorted(
        r.node.name for r in results if r.node.resource_type == "test" and str(r.status) in ("fail", "error")
    )
    errored = [
        f"{r.node.name}: {one_line(r.message or 'error')}"
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
        return f"its findings could not be read: {one_line(str(error), 120)}"
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
        # No dbt logger, on the console or in dbt.log: each formats every event, debug ones included
        # (SQL statements, ~300 a build), and scrubs it of secrets by reading the whole environment,
        # before its level drops it: 0.1-0.15 s of a minute's build, under the GIL the node threads
        # share. What they showed is logged here instead: each node's result (`_results`), and
        # dbt's warnings and errors as they come (`_forward_warnings`).
        "--log-level", "none",
        "--log-level-file", "none",
    ]  # fmt: skip


DBT_ERRORS_LOGGED = "see dbt's errors logged above"


def _forward_warnings(message: Any) -> None:
    """dbt's warnings and errors (deprecations, a failing node's cause), logged as they are fired; other
    events are dropped without being formatted."""
    if message.info.level in ("warn", "error"):
        log.warning("dbt: %s", one_line(message.info.msg, limit=1000))


def _runner(manifest: Any = None) -> Any:
    from dbt.cli.main import dbtRunner

    return dbtRunner(manifest=manifest, callbacks=[_forward_warnings])


def _results(outcome: Any) -> list[Any]:
    """The node results of a dbt run, each logged in one line (what dbt printed): its kind, name, status and
    time, and a failed test's failing rows."""
    results = list(getattr(outcome.result, "results", None) or [])
    for result in results:
        node = result.node
        failures = f", {result.failures} failing rows" if getattr(result, "failures", None) else ""
        log.info(
            "dbt %s %s: %s in %.2f s%s", node.resource_type, node.name, result.status, result.execution_time, failures
        )
    return results


# The models' YAML data tests (whole tables, staging's included): hourly in `audit`, not in a minute's build,
# which runs the one guard test over the rows it rebuilt instead (dbt_project/tests/guard_built_rows.sql).
AUDIT_SELECTION = "test_type:generic"
GUARD_TEST = "guard_built_rows"
_PARSED: dict[tuple[Any, ...], Any] = {}  # the last parsed project: (fingerprint, dbt environment) -> Manifest


def _parsed_project(common_args: list[str], key: tuple[Any, ...]) -> Any:
    """The dbt project parsed once per process (for one fingerprint and environment), then handed to every
    build: even a partial parse that finds nothing changed reads and checks the whole saved manifest, ~0.5 s
    of CPU a build, which the worker service (a long-lived process) need not pay each minute."""
    if key not in _PARSED:
        started = time.perf_counter()
        outcome = _runner().invoke(["parse", *common_args, "--no-write-json"])
        if not outcome.success:
            cause = one_line(str(outcome.exception or DBT_ERRORS_LOGGED))
            raise BuildError(f"dbt could not parse the project: {cause}")
        _PARSED.clear()
        _PARSED[key] = outcome.result
        log.info("dbt project parsed in %.1f s", time.perf_counter() - started)
    return _PARSED[key]


def _project_key(fingerprint: str, environment: dict[str, str]) -> tuple[Any, ...]:
    """What a parsed project is valid for: the project's files (`project_fingerprint`) and dbt's environment."""
    return (fingerprint, *sorted(environment.items(), key=str))


def prepare(settings: Settings, config: ServingConfig | None = None) -> None:
    """Pay now what a process's first build pays before its first model: the extensions' signature check and
    dbt's parse of the project (3.5-6 s of a worker's first build at 30 days in the benches, against ~3 s for
    the next ones). The worker calls it as it starts, so that its first build after a restart or a deploy
    is as quick as the next."""
    config = config or ServingConfig.from_env(settings)
    ensure_extensions(config.extension_dir)
    environment = _dbt_environment(settings, config)
    with environ(environment):
        _parsed_project(_dbt_common_args(config), _project_key(project_fingerprint(), environment))


def run_dbt(settings: Settings, config: ServingConfig, full_refresh: bool = False) -> dict[str, int]:
    """One `dbt build` (models, then their data tests) into the warehouse; counts of nodes built by type.

    Runs in this process with dbt's programmatic runner; partial parsing is kept in `config.dbt_dir`.
    Views are created again only when the project changed since they were (or on a full refresh): a view
    holds no data, and dbt's cost per node (~0.2 s of Python each, under the GIL) made the nine views a
    seventh of a minute's build. Their data tests run every time. Raises DataTestsFailed naming the
    failing tests, BuildError for anything else that went wrong.
    """
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
    with environ(environment):
        try:
            manifest = _parsed_project(common, _project_key(fingerprint, environment))
            outcome = _runner(manifest).invoke(args)
        finally:
            _release_warehouse()
    results = _results(outcome)
    if not outcome.success:
        message, failed_tests = _failure_message(results)
        if not message:
            message = f"dbt could not run: {one_line(str(outcome.exception or DBT_ERRORS_LOGGED))}"
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
    config = config or ServingConfig.from_env(settings)
    ensure_extensions(config.extension_dir)
    common = _dbt_common_args(config)
    environment = _dbt_environment(settings, config)
    with build_lock(config), environ(environment):
        if _views_built_for(config) is None:  # a new home: the staging views do not exist before a build
            return {"data tests": 0}
        try:
            manifest = _parsed_project(common, _project_key(project_fingerprint(), environment))
            outcome = _runner(manifest).invoke(["test", *common, "--no-write-json", "--select", AUDIT_SELECTION])
        finally:
            _release_warehouse()
    results = _results(outcome)
    if not outcome.success:
        message, failed_tests = _failure_message(results)
        message = f"dbt test failed: {message or one_line(str(outcome.exception or DBT_ERRORS_LOGGED))}"
        if failed_tests:
            raise DataTestsFailed(message, failed_tests)
        raise BuildError(message)
    if not results:
        raise BuildError(f"audit ran no data test: nothing matches {AUDIT_SELECTION!r}")
    return {"data tests": len(results)}


def project_var(name: str) -> Any:
    """A var of the dbt project (dbt_project.yml), read without dbt."""
    import yaml

    return yaml.safe_load((DBT_PROJECT_DIR / "dbt_project.yml").read_text())["vars"][name]


def episode_gap() -> timedelta:
    """How far back a merged snapshot may change congestion episodes (var episode_gap_minutes)."""
    return timedelta(minutes=float(project_var("episode_gap_minutes")))
