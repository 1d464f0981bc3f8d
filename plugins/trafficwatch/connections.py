"""The settings of a DAG task, with S3 and the API taken from Airflow connections when they are defined.

Operators manage the S3 credentials the Airflow way: an Amazon Web Services (`aws`) connection, id
`TRAFFICWATCH_S3_CONN_ID` (default `trafficwatch_s3`), made in the UI, as `AIRFLOW_CONN_TRAFFICWATCH_S3` or in a
secrets backend. **When it exists, it wins over the environment**: the amazon provider's `AwsBaseHook` builds
the boto3 session from it (keys from its login and password or extra, or a role or profile it names), and the
credentials of that session, with its endpoint (extra `endpoint_url`; none: AWS S3) and region (extra
`region_name`, else `AWS_REGION`), go into the settings, from which boto3, delta-rs, polars and dbt's DuckDB
all take them. When it does not exist, the task reads the environment exactly as the CLI does. Likewise the
Opendatasoft base URL comes from the `http` connection `TRAFFICWATCH_API_CONN_ID` (default `trafficwatch_api`)
when it exists, else from `TRAFFICWATCH_API_URL`. A connection that exists but cannot serve (wrong type,
unreadable extra or variable, no keys, no URL) fails the task in one line; it never falls back silently.

Airflow is imported here only inside the functions that look connections up, which only DAG code calls: the
CLI and the worker import the package without Airflow. `connection_variables` is plain Python: the
`AIRFLOW_CONN_*` variables that `make demo` / `make up` give their Airflow, from the local settings.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

from trafficwatch.config import DEFAULT_API_URL, DEFAULT_REGION, ConfigError, Settings, load_settings

S3_CONN_ID = "trafficwatch_s3"
API_CONN_ID = "trafficwatch_api"


def s3_conn_id(environ: Mapping[str, str] = os.environ) -> str:
    return environ.get("TRAFFICWATCH_S3_CONN_ID") or S3_CONN_ID


def api_conn_id(environ: Mapping[str, str] = os.environ) -> str:
    return environ.get("TRAFFICWATCH_API_CONN_ID") or API_CONN_ID


def variable_name(conn_id: str) -> str:
    """The environment variable Airflow reads a connection from."""
    return f"AIRFLOW_CONN_{conn_id.upper()}"


def task_settings() -> Settings:
    """The settings of a DAG task: the environment's, with S3 from the `aws` connection and the API's base URL
    from the `http` connection when they exist. ConfigError (one line) for a connection that cannot serve."""
    settings = load_settings()
    s3 = _connection(s3_conn_id(), "aws")
    if s3 is not None:
        settings = _with_s3(settings, s3)
    api = _connection(api_conn_id(), "http")
    if api is not None:
        settings = replace(settings, api_url=_api_url(api.conn_id))
    return settings


def _connection(conn_id: str, conn_type: str) -> Any | None:
    """The Airflow connection `conn_id`, None when none is defined; ConfigError when it is but is unusable."""
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        connection = BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        _check_variable(conn_id)
        return None
    where = f"Airflow connection {conn_id}"
    if connection.conn_type != conn_type:
        raise ConfigError(f"{where} has type {connection.conn_type or 'none'!r}, expected {conn_type!r}")
    if connection.extra:
        try:
            extra = json.loads(connection.extra)
        except ValueError as error:
            raise ConfigError(f"{where}: its extra is not valid JSON ({error})") from None
        if not isinstance(extra, dict):
            raise ConfigError(f"{where}: its extra is not a JSON object")
    return connection


def _check_variable(conn_id: str) -> None:
    """Airflow takes an unreadable `AIRFLOW_CONN_*` variable for no connection at all (and logs a traceback):
    a connection that is set but broken must not quietly give way to the environment."""
    name = variable_name(conn_id)
    value = os.environ.get(name, "").strip()
    if not value:
        return
    if value.startswith("{"):
        try:
            json.loads(value)
        except ValueError as error:
            raise ConfigError(f"{name} is not valid JSON ({error})") from None
    raise ConfigError(f"{name} is set but Airflow cannot read it as a connection (JSON or URI)")


def _with_s3(settings: Settings, connection: Any) -> Settings:
    from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook
    from airflow.sdk.log import mask_secret

    where = f"Airflow connection {connection.conn_id}"
    if bool(connection.login) != bool(connection.password):
        missing = "password (secret key)" if connection.login else "login (access key id)"
        raise ConfigError(f"{where} has no {missing}: give both, or neither to use the AWS credential chain")
    hook = AwsBaseHook(aws_conn_id=connection.conn_id, client_type="s3")
    config = hook.conn_config
    endpoint = config.get_service_endpoint_url("s3") or None
    if endpoint is not None:
        parts = urlsplit(str(endpoint))
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"{where}: extra endpoint_url {endpoint!r} is not an http(s) URL")
    region = config.region_name or settings.aws_region
    found = hook.get_session(region_name=region).get_credentials()
    if found is None:
        raise ConfigError(f"{where} gives no S3 credentials: set its login (access key id) and password (secret key)")
    credentials = found.get_frozen_credentials()
    mask_secret(credentials.secret_key)
    if credentials.token:
        mask_secret(credentials.token)
    return replace(
        settings,
        s3_endpoint_url=endpoint,
        aws_region=region,
        aws_access_key_id=credentials.access_key,
        aws_secret_access_key=credentials.secret_key,
        aws_session_token=credentials.token or None,
        s3_source=f"the {where}",
    )


def _api_url(conn_id: str) -> str:
    """The base URL the http provider's hook makes of the connection (host, or schema://host, and port)."""
    from airflow.providers.http.hooks.http import HttpHook

    url = HttpHook(method="GET", http_conn_id=conn_id).url_from_endpoint(None)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(
            f"Airflow connection {conn_id} gives no http(s) base URL ({url!r}): set its host, e.g. {DEFAULT_API_URL}"
        )
    return url.rstrip("/")


def connection_variables(environ: Mapping[str, str]) -> dict[str, str]:
    """`AIRFLOW_CONN_*` values for the S3 and API connections the local settings describe: what `make demo` and
    `make up` give their Airflow. A connection variable already set (in the shell or `.env`) is left alone; no S3
    connection without keys (the AWS credential chain then serves tasks and CLI alike)."""
    variables: dict[str, str] = {}
    s3_variable = variable_name(s3_conn_id(environ))
    key, secret = environ.get("AWS_ACCESS_KEY_ID"), environ.get("AWS_SECRET_ACCESS_KEY")
    if s3_variable not in environ and key and secret:
        extra = {"region_name": environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION") or DEFAULT_REGION}
        if environ.get("AWS_ENDPOINT_URL"):
            extra["endpoint_url"] = environ["AWS_ENDPOINT_URL"]
        if environ.get("AWS_SESSION_TOKEN"):
            extra["aws_session_token"] = environ["AWS_SESSION_TOKEN"]
        variables[s3_variable] = json.dumps({"conn_type": "aws", "login": key, "password": secret, "extra": extra})
    api_variable = variable_name(api_conn_id(environ))
    if api_variable not in environ:
        url = (environ.get("TRAFFICWATCH_API_URL") or DEFAULT_API_URL).rstrip("/")
        variables[api_variable] = json.dumps({"conn_type": "http", "host": url})
    return variables
