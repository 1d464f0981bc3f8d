"""Every setting of TrafficWatch, read once from the environment.

The same variables drive the CLI, the DAGs and the tests; `.env.example` documents each one.
AWS credentials are not read here: boto3 and delta-rs take them from the standard variables, unless the
settings carry explicit ones (the DAG tasks' Airflow connection, see `connections`), which then go to boto3,
delta-rs and dbt's DuckDB alike.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

DATASET = "etat-du-trafic-en-temps-reel"
API_MODES = ("exports", "records", "v1")
# The dataset's paths on the portal, one per API mode (the client, `trafficwatch.source`, and the local feed).
EXPORTS_PATH = f"/api/explore/v2.1/catalog/datasets/{DATASET}/exports/json"
RECORDS_PATH = f"/api/explore/v2.1/catalog/datasets/{DATASET}/records"
V1_PATH = "/api/records/1.0/search/"
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_API_URL = "https://data.rennesmetropole.fr"
DEFAULT_REGION = "us-east-1"
DEFAULT_SERVING_DAYS = 30
DEFAULT_SMTP_CONN_ID = "trafficwatch_smtp"
NOTIFIERS = ("smtp",)


class ConfigError(ValueError):
    """A setting is missing or malformed."""


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None


def _int(name: str, default: int) -> int:
    value = _float(name, default)
    if value != int(value):
        raise ConfigError(f"{name}={value!r} is not a whole number")
    return int(value)


def _days(name: str, default: int) -> int:
    raw = os.environ.get(name) or str(default)
    try:
        days = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a whole number of days") from None
    if days < 1:
        raise ConfigError(f"{name}={days} must be at least 1")
    return days


def _positive_s(name: str, default: float) -> float:
    value = _float(name, default)
    if value <= 0:
        raise ConfigError(f"{name}={value!r} is not a positive number of seconds")
    return value


def _notifier() -> str:
    kind = os.environ.get("TRAFFICWATCH_ALERT_NOTIFIER", "").strip().lower()
    if kind not in ("", "none", *NOTIFIERS):
        raise ConfigError(f"TRAFFICWATCH_ALERT_NOTIFIER={kind!r} is not one of none, {', '.join(NOTIFIERS)}")
    return "" if kind == "none" else kind


def home_from_env() -> Path:
    """TRAFFICWATCH_HOME, else the checkout's .data: where the lake's local state and the logs live."""
    return Path(os.environ.get("TRAFFICWATCH_HOME") or REPO_ROOT / ".data").resolve()


@dataclass(frozen=True)
class Settings:
    home: Path
    bucket: str
    api_url: str
    api_mode: str
    http_timeout_s: float
    http_attempts: int
    fetch_budget_s: float
    s3_endpoint_url: str | None
    aws_region: str
    merge_poll_interval_s: float
    vacuum_retention_hours: int
    log_retention: str
    raw_retention_days: int
    # A snapshot with fewer records is refused as partial, not taken as the network (2,859 segments; the
    # smallest real answer seen held 2,368).
    min_records: int = 2000
    # How far a snapshot's upstream time may lie after its fetch (ingest) or its landing (merge): clocks
    # drift a little, a snapshot from the future is a broken source.
    future_tolerance_s: float = 600.0
    # Explicit S3 credentials (an Airflow connection's); None: the standard AWS variables and credential chain.
    aws_access_key_id: str | None = field(default=None, repr=False)
    aws_secret_access_key: str | None = field(default=None, repr=False)
    aws_session_token: str | None = field(default=None, repr=False)
    # Where the S3 endpoint and credentials come from, as error messages name it.
    s3_source: str = "environment"
    # How long a merge run's sensor waits for a landed snapshot before it skips.
    merge_wait_timeout_s: float = 900.0
    # The serving file: days of hourly and daily marts it keeps, and where it is (None: under home).
    serving_days: int = DEFAULT_SERVING_DAYS
    serving_db: Path | None = None
    # The freshness check: how old the newest data shown may be, and the notifier of a failed check.
    stale_after_s: float = 600.0
    alert_notifier: str = ""  # "" (none) or one of NOTIFIERS
    alert_email_to: tuple[str, ...] = ()
    alert_email_from: str | None = None
    alert_smtp_conn_id: str = DEFAULT_SMTP_CONN_ID
    # The local services' ports (127.0.0.1 only).
    s3_port: int = 8333
    feed_port: int = 8090
    airflow_port: int = 8080
    superset_port: int = 8088

    @property
    def s3_credentials(self) -> dict[str, str]:
        """The explicit credentials as AWS variable names (empty when they come from the environment)."""
        if not self.aws_access_key_id:
            return {}
        named = {"AWS_ACCESS_KEY_ID": self.aws_access_key_id, "AWS_SECRET_ACCESS_KEY": self.aws_secret_access_key}
        if self.aws_session_token:
            named["AWS_SESSION_TOKEN"] = self.aws_session_token
        return {name: value for name, value in named.items() if value}

    @property
    def raw_uri(self) -> str:
        return f"s3://{self.bucket}/raw/"


def load_settings() -> Settings:
    """Read the settings from the environment (see `.env.example`)."""
    mode = os.environ.get("TRAFFICWATCH_API_MODE", "exports").strip().lower()
    if mode not in API_MODES:
        raise ConfigError(f"TRAFFICWATCH_API_MODE={mode!r} is not one of {', '.join(API_MODES)}")
    serving_db = os.environ.get("TRAFFICWATCH_SERVING_DB")
    addresses = os.environ.get("TRAFFICWATCH_ALERT_EMAIL_TO", "").split(",")
    return Settings(
        home=home_from_env(),
        bucket=os.environ.get("TRAFFICWATCH_BUCKET", "trafficwatch"),
        api_url=os.environ.get("TRAFFICWATCH_API_URL", DEFAULT_API_URL).rstrip("/"),
        api_mode=mode,
        http_timeout_s=_float("TRAFFICWATCH_HTTP_TIMEOUT", 15.0),
        http_attempts=_int("TRAFFICWATCH_HTTP_ATTEMPTS", 3),
        fetch_budget_s=_float("TRAFFICWATCH_FETCH_BUDGET", 40.0),
        s3_endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None,
        aws_region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or DEFAULT_REGION,
        merge_poll_interval_s=_float("TRAFFICWATCH_MERGE_POLL_INTERVAL", 10.0),
        vacuum_retention_hours=_int("TRAFFICWATCH_VACUUM_RETENTION_HOURS", 168),
        log_retention=os.environ.get("TRAFFICWATCH_LOG_RETENTION", "interval 24 hours"),
        raw_retention_days=_int("TRAFFICWATCH_RAW_RETENTION_DAYS", 0),
        min_records=_int("TRAFFICWATCH_MIN_RECORDS", 2000),
        future_tolerance_s=_float("TRAFFICWATCH_FUTURE_TOLERANCE", 600.0),
        merge_wait_timeout_s=_float("TRAFFICWATCH_MERGE_WAIT_TIMEOUT", 900.0),
        serving_days=_days("TRAFFICWATCH_SERVING_DAYS", DEFAULT_SERVING_DAYS),
        serving_db=Path(serving_db).resolve() if serving_db else None,
        stale_after_s=_positive_s("TRAFFICWATCH_STALE_AFTER", 600.0),
        alert_notifier=_notifier(),
        alert_email_to=tuple(address.strip() for address in addresses if address.strip()),
        alert_email_from=os.environ.get("TRAFFICWATCH_ALERT_EMAIL_FROM") or None,
        alert_smtp_conn_id=os.environ.get("TRAFFICWATCH_ALERT_SMTP_CONN_ID") or DEFAULT_SMTP_CONN_ID,
        s3_port=_int("TRAFFICWATCH_S3_PORT", 8333),
        feed_port=_int("TRAFFICWATCH_FEED_PORT", 8090),
        airflow_port=_int("TRAFFICWATCH_AIRFLOW_PORT", 8080),
        superset_port=_int("TRAFFICWATCH_SUPERSET_PORT", 8088),
    )


def serving_db_path(settings: Settings) -> Path:
    """The file dashboards open read-only: TRAFFICWATCH_SERVING_DB, else $TRAFFICWATCH_HOME/serving/traffic.duckdb.

    Here rather than in dbt_build (which re-exports it) so that trafficwatch.assets, imported by every DAG file
    and so by every task process and DAG parse, imports no DuckDB, polars, delta-rs or boto3 for it."""
    return settings.serving_db or settings.home / "serving" / "traffic.duckdb"


@contextlib.contextmanager
def environ(values: Mapping[str, str | None], replace: bool = False) -> Iterator[None]:
    """os.environ changed by `values` for the block (None: unset), and given back as it was afterwards. dbt reads
    its profile from the environment in this process; tests and benches run stacks of other settings.

    Only the variables whose value differs are written (and restored): setenv while another thread reads the C
    environment (the Rust runtimes of delta-rs and polars resolving a host name) can crash the process, and a
    worker builds with the same values every minute, so in steady state nothing is written. With `replace`, the
    environment is `values` alone for the block, and is restored whole afterwards."""
    saved = dict(os.environ) if replace else {name: os.environ.get(name) for name in values}
    if replace:
        os.environ.clear()
    changed = {name: value for name, value in values.items() if os.environ.get(name) != value}
    try:
        _assign(changed)
        yield
    finally:
        if replace:
            os.environ.clear()
        _assign({name: value for name, value in saved.items() if os.environ.get(name) != value})


def _assign(values: Mapping[str, str | None]) -> None:
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
