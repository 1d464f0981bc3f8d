"""Superset configuration for TrafficWatch, read by `superset` through SUPERSET_CONFIG_PATH.

Everything comes from the environment (`scripts/env.sh` generates the local secrets). Superset refuses to
start here without a real SECRET_KEY. The dashboards read the serving DuckDB, which the pipeline replaces
every minute by an atomic rename, so caches last one minute and every query opens its own read-only
connection (see bootstrap.py, which registers the database).
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from flask import Flask, Response, g, redirect, request
from flask.sessions import SecureCookieSessionInterface, SessionMixin
from flask_login import current_user
from sqlalchemy.pool import QueuePool
from superset.utils.log import AbstractEventLogger

_REPO = Path(__file__).resolve().parents[1]
_PLACEHOLDER_KEYS = {"", "CHANGE_ME_TO_A_COMPLEX_RANDOM_SECRET", "thisISaSECRET_1234", "secret", "changeme"}


def _secret_key() -> str:
    key = os.environ.get("SUPERSET_SECRET_KEY", "")
    if key in _PLACEHOLDER_KEYS or len(key) < 32:
        sys.exit(
            "superset_config: SUPERSET_SECRET_KEY is missing, a known default or shorter than 32 characters: "
            "set a random one (`source scripts/env.sh` generates it into $TRAFFICWATCH_HOME/secrets.env)"
        )
    return key


SECRET_KEY = _secret_key()

TRAFFICWATCH_HOME = Path(os.environ.get("TRAFFICWATCH_HOME") or _REPO / ".data")
DATA_DIR = str(TRAFFICWATCH_HOME / "superset")
# Superset's files (metadata with password hashes, caches, uploads) are its owner's only.
Path(DATA_DIR).mkdir(mode=0o700, parents=True, exist_ok=True)
Path(DATA_DIR).chmod(0o700)
SQLALCHEMY_DATABASE_URI = os.environ.get("SUPERSET_DATABASE_URI") or (
    f"sqlite:///{DATA_DIR}/superset.db?check_same_thread=false"
)
if SQLALCHEMY_DATABASE_URI.startswith("sqlite:"):
    # Pooled connections to the metadata SQLite file, in WAL mode: see _sqlite_metadata_in_wal_mode.
    SQLALCHEMY_ENGINE_OPTIONS = {"poolclass": QueuePool}
if not os.environ.get("SUPERSET_DATABASE_URI"):
    # SQLite would create the file 0644; it keeps the mode of a file it finds, and gives it to its journals.
    os.close(os.open(f"{DATA_DIR}/superset.db", os.O_WRONLY | os.O_CREAT, 0o600))
    Path(DATA_DIR, "superset.db").chmod(0o600)
UPLOAD_FOLDER = f"{DATA_DIR}/uploads/"
IMG_UPLOAD_FOLDER = f"{DATA_DIR}/uploads/"

APP_NAME = "TrafficWatch"
LOGO_RIGHT_TEXT = "Rennes Métropole live traffic"

# The serving file changes every minute: a minute of cache at most, and auto-refresh reads through it
# ("fetch") instead of forcing every open dashboard to query DuckDB again.
_ONE_MINUTE = 60
DATA_CACHE_CONFIG = {
    "CACHE_TYPE": "FileSystemCache",
    "CACHE_DIR": f"{DATA_DIR}/cache/data",
    "CACHE_DEFAULT_TIMEOUT": _ONE_MINUTE,
    "CACHE_THRESHOLD": 2000,
    "CACHE_KEY_PREFIX": "tw_data_",
}
CACHE_CONFIG = {
    "CACHE_TYPE": "FileSystemCache",
    "CACHE_DIR": f"{DATA_DIR}/cache/meta",
    "CACHE_DEFAULT_TIMEOUT": 300,
    "CACHE_KEY_PREFIX": "tw_meta_",
}
DASHBOARD_AUTO_REFRESH_MODE = "fetch"

# OpenStreetMap tiles only: no Mapbox key needed. TRAFFICWATCH_BASE_MAP=none (the offline demo, the tests, the
# bench; bootstrap.py sets the maps' base map from the same variable) draws the roads on a blank map, and the
# content security policy then allows no tile host at all.
_OSM_TILES = "https://tile.openstreetmap.org"
DECKGL_BASE_MAP = [[f"{_OSM_TILES}/{{z}}/{{x}}/{{y}}.png", "OpenStreetMap"]]
_BASE_MAP = os.environ.get("TRAFFICWATCH_BASE_MAP", "osm")
if _BASE_MAP not in {"osm", "none"}:
    sys.exit(f"superset_config: TRAFFICWATCH_BASE_MAP must be osm or none, not {_BASE_MAP!r}")
_TILE_HOSTS = [_OSM_TILES] if _BASE_MAP == "osm" else []

# Behind an HTTPS proxy (TRAFFICWATCH_TLS_PROXY=1, README "Containers"): the session and remember-me cookies
# travel over HTTPS only, the proxy's X-Forwarded-For/-Proto/-Host/-Port/-Prefix are trusted (one hop) so that
# Superset sees the request as HTTPS and builds https URLs, and browsers are told to stay on HTTPS (HSTS).
# Off by default: on plain http://127.0.0.1 a Secure cookie would never come back and login would fail.
_TLS_PROXY = os.environ.get("TRAFFICWATCH_TLS_PROXY", "0")
if _TLS_PROXY not in {"0", "1"}:
    sys.exit(f"superset_config: TRAFFICWATCH_TLS_PROXY must be 0 or 1, not {_TLS_PROXY!r}")
BEHIND_TLS_PROXY = _TLS_PROXY == "1"
SESSION_COOKIE_SECURE = BEHIND_TLS_PROXY
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
REMEMBER_COOKIE_SECURE = BEHIND_TLS_PROXY
REMEMBER_COOKIE_HTTPONLY = True
ENABLE_PROXY_FIX = BEHIND_TLS_PROXY
PROXY_FIX_CONFIG = {"x_for": 1, "x_proto": 1, "x_host": 1, "x_port": 1, "x_prefix": 1}

# Superset's default policy, less the hosts we do not use, plus 'unsafe-eval': the maps colour each
# segment with a js_data_mutator, which Superset runs in an eval sandbox; without it the mutator fails
# silently and the maps stay blank. Only admins can save chart JavaScript (viewers cannot edit charts).
_FONT_HOSTS = ["https://fonts.googleapis.com", "https://fonts.gstatic.com"]
TALISMAN_ENABLED = True
TALISMAN_CONFIG = {
    "content_security_policy": {
        "base-uri": ["'self'"],
        "default-src": ["'self'"],
        "img-src": ["'self'", "blob:", "data:", *_TILE_HOSTS],
        "worker-src": ["'self'", "blob:"],
        "connect-src": ["'self'", *_TILE_HOSTS],
        "object-src": "'none'",
        "style-src": ["'self'", "'unsafe-inline'", *_FONT_HOSTS],
        "font-src": ["'self'", *_FONT_HOSTS],
        "script-src": ["'self'", "'strict-dynamic'", "'unsafe-eval'"],
    },
    "content_security_policy_nonce_in": ["script-src"],
    # TLS is the proxy's job (no redirect loop behind it); Talisman sets SESSION_COOKIE_SECURE from this.
    "force_https": False,
    "session_cookie_secure": BEHIND_TLS_PROXY,
    "strict_transport_security": BEHIND_TLS_PROXY,
}

# Dashboard legends are Markdown with coloured swatches: allow inline style, nothing more.
HTML_SANITIZATION_SCHEMA_EXTENSIONS = {"attributes": {"span": ["style"]}}

FEATURE_FLAGS = {"DASHBOARD_RBAC": False, "ENABLE_JAVASCRIPT_CONTROLS": False, "ALERT_REPORTS": False}

# Anonymous visitors get nothing unless TRAFFICWATCH_SUPERSET_PUBLIC=1, which gives them exactly the
# permissions of the read-only TrafficViewer role (created by bootstrap.py).
PUBLIC = os.environ.get("TRAFFICWATCH_SUPERSET_PUBLIC", "0") == "1"
AUTH_ROLE_PUBLIC = "TrafficViewer" if PUBLIC else "Public"

# Viewers land on the live map instead of Superset's welcome page; admins keep it.
HOME_DASHBOARD = "/superset/dashboard/live-traffic/"


def _viewers_home(app: Flask) -> None:
    @app.before_request
    def redirect_home() -> Response | None:
        if request.method != "GET" or request.path not in ("/", "/superset/welcome/"):
            return None
        roles = {role.name for role in getattr(current_user, "roles", None) or []}
        if "Admin" in roles or (current_user.is_anonymous and not PUBLIC):
            return None
        return redirect(HOME_DASHBOARD)


class _SessionCookies(SecureCookieSessionInterface):
    """Flask's signed-cookie sessions (Superset's default), except that an ignored anonymous event log's answer
    sets no cookie (see `_anonymous_event_logs_ignored`)."""

    def save_session(self, app: Flask, session: SessionMixin, response: Response) -> None:
        if g.get("ignored_event_log"):
            return
        super().save_session(app, session, response)


def _anonymous_event_logs_ignored(app: Flask) -> None:
    """Submitting the login form unloads the login page, which then posts its event log (POST /superset/log/)
    with the anonymous session cookie, beside the login in flight. Superset answered it with a redirect to the
    login page and a session cookie (the anonymous session): arriving after the login's answer, that cookie
    replaced the new session and the user was on the login page again. An anonymous event log is answered
    here, empty and without a cookie, whatever Flask-Login or the locale wrote to the session meanwhile."""
    app.session_interface = _SessionCookies()

    @app.before_request
    def ignore_anonymous_event_log() -> Response | None:
        if request.method == "POST" and request.path == "/superset/log/" and current_user.is_anonymous:
            g.ignored_event_log = True
            return Response(status=204)
        return None


def _duckdb_default_schema_remembered() -> None:
    """Superset asks the database for its default schema twice per chart data request on a virtual dataset
    (for the cache key and for the FROM clause, where a dataset with a schema of its own, as all of ours,
    does not even use it), each time by creating an engine and opening a DuckDB connection to the serving
    file just to read `current_schema()`: two file opens and dialect initializations per chart, beside the
    query's own. A DuckDB database's default schema is set by its URI and connection settings alone (DuckDB
    has no per-user search path and Superset no per-catalog schema for it), so the answer is kept per URI
    and settings: asked once, as before, then reused. The query itself still opens its own read-only
    connection (NullPool), so each chart reads the serving file published last."""
    from superset.db_engine_specs.duckdb import DuckDBEngineSpec

    ask_database = DuckDBEngineSpec.get_default_schema.__func__  # the inherited lookup through an inspector
    answers: dict[tuple[str, str, str | None], str | None] = {}

    def get_default_schema(cls: type[DuckDBEngineSpec], database: Any, catalog: str | None) -> str | None:
        key = (database.sqlalchemy_uri_decrypted, database.extra or "", catalog)
        if key not in answers:
            answers[key] = ask_database(cls, database, catalog)
        return answers[key]

    DuckDBEngineSpec.get_default_schema = classmethod(get_default_schema)  # type: ignore[method-assign]


class _HeldServingFile:
    """Each chart query used to open the serving file anew: Superset makes an engine with NullPool for every
    query and duckdb_engine a DuckDB database for every connection, reading the file's header and catalog: 25-28
    ms against 5-8 for a cursor of a database already open, at 30 days; opening and closing it were 17 % of a
    chart data request's time in py-spy. Connections cannot simply be pooled: each publish replaces the file
    whole (os.replace), and a connection kept open would go on reading the replaced file.

    So the file is held open per version: every read-only connection Superset asks for to a DuckDB file is a
    cursor (a connection of its own) of one in-memory DuckDB database that has the file attached read-only, its
    settings then applied (external access off, locked), and the file as the cursor's default database. Before
    each connection the path is looked at (inode, size, modification time): a replaced file gets a new
    database, and the old one is dropped, not closed, so a query still running on it finishes, and DuckDB
    frees it with its last cursor. A connection to anything else (another settings shape, a file not there)
    is left to duckdb_engine. (The in-memory database around the file holds nothing and could be written to
    only by naming it, `memory`, in SQL Lab, which viewers do not have and where the database allows no DML.)"""

    CATALOG = "serving"
    SETTINGS = frozenset({"enable_external_access", "lock_configuration"})  # what databases/*.yaml sets
    # Superset's DuckDB engine spec adds its user agent to every connection's config (get_extra_params).
    USER_AGENT = "custom_user_agent"
    log = logging.getLogger("trafficwatch.held_serving_file")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, tuple[tuple[int, int, int], Any]] = {}
        self.opened = 0  # file versions attached so far

    def install(self) -> None:
        """Listen to every DuckDB dialect's connections (on duckdb_engine's class: SQLAlchemy calls a dialect's
        do_connect listeners only if its class, or an instance, was listened to)."""
        from duckdb_engine import Dialect
        from sqlalchemy import event

        event.listen(Dialect, "do_connect", self.connect)

    def handles(self, dialect_name: str, cargs: Any, cparams: dict[str, Any]) -> bool:
        config = cparams.get("config") or {}
        return (
            dialect_name == "duckdb"
            and not cargs
            and set(cparams) <= {"database", "read_only", "config", "url_config"}
            and cparams.get("read_only") is True
            and not cparams.get("url_config")
            and cparams.get("database") not in (None, "", ":memory:")
            and set(config) <= self.SETTINGS | {self.USER_AGENT}
        )

    def connect(self, dialect: Any, _record: Any, cargs: Any, cparams: dict[str, Any]) -> Any:
        if not self.handles(dialect.name, cargs, cparams):
            return None
        path = cparams["database"]
        try:
            stat = os.stat(path)
        except OSError:
            return None  # duckdb_engine's own connect says what is wrong
        version = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        from duckdb_engine import ConnectionWrapper

        with self._lock:
            held = self._held.get(path)
            if held is None or held[0] != version:
                held = (version, self._attach(path, cparams.get("config") or {}))
                self._held[path] = held
                self.opened += 1
                self.log.info("serving file attached read-only: %s (inode %d, %d bytes)", path, *version[:2])
            cursor = held[1].cursor()
        cursor.execute(f"USE {self.CATALOG}")
        return ConnectionWrapper(cursor)

    def _attach(self, path: str, config: dict[str, Any]) -> Any:
        import duckdb

        agent = config.get(self.USER_AGENT)
        database = duckdb.connect(":memory:", config={self.USER_AGENT: agent} if agent else {})
        quoted = path.replace("'", "''")
        database.execute(f"ATTACH '{quoted}' AS {self.CATALOG} (READ_ONLY)")
        if config.get("enable_external_access") is False:
            database.execute("SET enable_external_access = false")
        if config.get("lock_configuration"):
            database.execute("SET lock_configuration = true")
        return database


def _sqlite_metadata_in_wal_mode(app: Flask) -> None:
    """Superset's event logger writes and commits a row of `logs` six times per chart data request (the request,
    the query, its post-processing, the answer...). In SQLite's default rollback-journal mode each commit
    syncs the database, its journal and the directory: 24 fsyncs per chart request (strace), 3 ms each at
    the median and 16 ms at the 90th percentile on this machine's busy disk. In write-ahead-log mode with
    synchronous=NORMAL a commit appends to the log without syncing it (synced at checkpoints): the database
    stays consistent after any crash, and a power cut can lose only the last commits, such as these event
    rows. The pool (SQLAlchemy 2's default for a SQLite file) keeps connections open: with SQLAlchemy 1.4's
    NullPool, closing the last connection after every request checkpointed and synced the log again.
    Only the local SQLite metadata database is concerned (the containers use PostgreSQL,
    SUPERSET_DATABASE_URI). The log files beside the database (-wal, -shm) take its 0600 mode."""
    if not SQLALCHEMY_DATABASE_URI.startswith("sqlite:"):
        return
    from sqlalchemy import event
    from superset.extensions import db

    def write_ahead(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")  # kept in the file; a no-op once set
        cursor.execute("PRAGMA synchronous=NORMAL")  # per connection
        cursor.close()

    with app.app_context():
        event.listen(db.engine, "connect", write_ahead)
        db.engine.dispose()  # connections pooled while the app was created reopen with the pragmas


class _IdleCollector:
    """Python's full garbage collections run while no request is in flight, not in the middle of one.

    Superset holds a heap of long-lived objects, and CPython walks all of them in each full collection of its
    cyclic garbage collector, which it starts on its own after enough allocations, in whichever request
    thread makes them: 176-528 ms pauses on this machine, 13 in one `make bench` viewer run (logged with
    `gc.callbacks`), each one a chart answered that much later. The youngest two generations are still
    collected as usual (a few ms); the full collections are left to a thread that runs one when CPython would
    have been ready to (10 collections of the middle generation since the last) and no request has been in
    flight for `IDLE_S`, or, if Superset is never idle that long, once `MAX_PENDING` collections of the middle
    generation have gone by: memory held by cyclic garbage stays bounded either way.

    What survives a full collection is frozen (`gc.freeze`): Superset's heap of long-lived objects is then left
    out of the next ones, which walk only what came after, and a request that arrives as one starts waits a
    few ms for it, not hundreds. Once every `UNFREEZE_EVERY_S` the frozen objects are walked again
    (`gc.unfreeze` before the collection), so cyclic garbage among them is reclaimed too."""

    IDLE_S = 1.0
    FULL_AFTER = 10  # CPython's default count for a full collection
    MAX_PENDING = 500
    UNFREEZE_EVERY_S = 900.0
    NEVER = 2**30  # CPython starts no full collection on its own above this count

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.in_flight = 0
        self.last_end = time.monotonic()
        self.last_unfreeze = time.monotonic()

    def counted(self, wsgi_app: Any) -> Any:
        """`wsgi_app`, counting the requests in flight (every request, whatever answers it)."""

        def app(environ: dict[str, Any], start_response: Any) -> Any:
            with self.lock:
                self.in_flight += 1
            try:
                return wsgi_app(environ, start_response)
            finally:
                with self.lock:
                    self.in_flight -= 1
                    self.last_end = time.monotonic()

        return app

    def due(self) -> bool:
        pending = gc.get_count()[2]  # collections of the middle generation since the last full one
        with self.lock:
            idle = self.in_flight == 0 and time.monotonic() - self.last_end >= self.IDLE_S
        return (idle and pending >= self.FULL_AFTER) or pending >= self.MAX_PENDING

    def collect(self) -> None:
        """One full collection of what is not frozen (of everything, once every UNFREEZE_EVERY_S), then
        its survivors frozen."""
        if time.monotonic() - self.last_unfreeze >= self.UNFREEZE_EVERY_S:
            gc.unfreeze()
            self.last_unfreeze = time.monotonic()
        gc.collect()
        gc.freeze()

    def run(self) -> None:
        while True:
            time.sleep(self.IDLE_S / 4)
            if self.due():
                self.collect()

    def install(self, app: Flask) -> None:
        young, middle, _ = gc.get_threshold()
        gc.set_threshold(young, middle, self.NEVER)
        app.wsgi_app = self.counted(app.wsgi_app)  # type: ignore[method-assign]
        threading.Thread(target=self.run, name="idle-gc", daemon=True).start()


class ServiceLogEventLogger(AbstractEventLogger):
    """Superset's event log (each page, API call and chart query, its user and duration) as one line each in
    Superset's own log, not as rows of its metadata DB. The default logger (DBEventLogger) wrote ~5 rows and
    ~6 KB of JSON there per chart query: ~95 MB a day for one Live traffic screen refreshing every minute,
    never pruned without Superset's Celery workers; its insert and commit took ~7 % of a chart query's time."""

    events = logging.getLogger("superset.event_log")

    def log(
        self,
        user_id: int | None,
        action: str,
        dashboard_id: int | None,
        duration_ms: int | None,
        slice_id: int | None,
        referrer: str | None,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        self.events.info(
            "%s user=%s dashboard=%s chart=%s duration_ms=%s", action, user_id, dashboard_id, slice_id, duration_ms
        )


EVENT_LOGGER = ServiceLogEventLogger()


def _mutate(app: Flask) -> None:
    _viewers_home(app)
    _anonymous_event_logs_ignored(app)
    _duckdb_default_schema_remembered()
    _HeldServingFile().install()
    _sqlite_metadata_in_wal_mode(app)
    _IdleCollector().install(app)


FLASK_APP_MUTATOR = _mutate
