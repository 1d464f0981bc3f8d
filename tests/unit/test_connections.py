"""How a DAG task resolves its settings: S3 from the Airflow connection when it exists (it wins over the
environment), the environment otherwise; the API's base URL likewise; a broken connection fails in one line."""

from __future__ import annotations

import json
import re

import boto3
import pytest
import yaml

from tests.conftest import REPO
from trafficwatch import dbt_build, errors, lake, storage, worker
from trafficwatch.config import DEFAULT_API_URL, ConfigError, Settings, load_settings
from trafficwatch.connections import connection_variables, task_settings

pytestmark = pytest.mark.airflow

ENV = {
    "AWS_ACCESS_KEY_ID": "envkey0001",
    "AWS_SECRET_ACCESS_KEY": "env-secret-0001",
    "AWS_ENDPOINT_URL": "http://env-s3:8333",
    "AWS_REGION": "eu-west-3",
    "TRAFFICWATCH_API_URL": "http://env-feed:8090/",
}


@pytest.fixture(autouse=True)
def environment(monkeypatch, tmp_path) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_PROFILE", "TRAFFICWATCH_S3_CONN_ID"):
        monkeypatch.delenv(name, raising=False)
    for name in ("TRAFFICWATCH_API_CONN_ID", "AIRFLOW_CONN_TRAFFICWATCH_S3", "AIRFLOW_CONN_TRAFFICWATCH_API"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TRAFFICWATCH_HOME", str(tmp_path / "home"))
    # boto3's default session keeps the first credentials it finds: these fake ones must not outlive the test.
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)


def _s3(monkeypatch, name: str = "AIRFLOW_CONN_TRAFFICWATCH_S3", **fields) -> None:
    connection = {"conn_type": "aws", "login": "connkey0001", "password": "conn-secret-0001", **fields}
    monkeypatch.setenv(name, json.dumps(connection))


def test_without_connections_the_environment_serves_as_for_the_cli() -> None:
    settings = task_settings()
    assert settings == load_settings()
    assert settings.s3_credentials == {} and settings.s3_source == "environment"
    assert (settings.s3_endpoint_url, settings.api_url) == ("http://env-s3:8333", "http://env-feed:8090")


def test_the_s3_connection_wins_over_the_environment(monkeypatch) -> None:
    _s3(monkeypatch, extra={"endpoint_url": "http://conn-s3:9000", "region_name": "us-west-2"})
    settings = task_settings()
    assert (settings.s3_endpoint_url, settings.aws_region) == ("http://conn-s3:9000", "us-west-2")
    assert settings.s3_credentials == {"AWS_ACCESS_KEY_ID": "connkey0001", "AWS_SECRET_ACCESS_KEY": "conn-secret-0001"}
    assert settings.s3_source == "the Airflow connection trafficwatch_s3"
    assert "conn-secret-0001" not in repr(settings)
    # The same credentials reach boto3, delta-rs (and polars) and dbt's DuckDB.
    client = storage.s3_client(settings)
    assert client.meta.endpoint_url == "http://conn-s3:9000"
    frozen = client._request_signer._credentials.get_frozen_credentials()
    assert (frozen.access_key, frozen.secret_key) == ("connkey0001", "conn-secret-0001")
    options = lake.storage_options(settings)
    assert options["AWS_ACCESS_KEY_ID"] == "connkey0001" and options["AWS_ENDPOINT_URL"] == "http://conn-s3:9000"
    dbt = dbt_build._dbt_environment(settings, dbt_build.ServingConfig.from_env(settings))
    assert dbt["AWS_ACCESS_KEY_ID"] == "connkey0001" and dbt["AWS_SECRET_ACCESS_KEY"] == "conn-secret-0001"
    assert dbt["AWS_SESSION_TOKEN"] is None  # no stale token of the environment beside the connection's keys
    assert dbt["AWS_ENDPOINT_URL"] == "http://conn-s3:9000"


def test_a_connection_is_the_whole_s3_description(monkeypatch) -> None:
    """No endpoint in the connection means AWS S3, whatever AWS_ENDPOINT_URL says; no region: the environment's."""
    _s3(monkeypatch, extra={"aws_session_token": "conn-token-0001"})
    settings = task_settings()
    assert settings.s3_endpoint_url is None
    assert settings.aws_region == "eu-west-3"
    assert settings.s3_credentials["AWS_SESSION_TOKEN"] == "conn-token-0001"
    assert "AWS_ENDPOINT_URL" not in lake.storage_options(settings)


def test_the_connection_ids_are_configurable(monkeypatch) -> None:
    monkeypatch.setenv("TRAFFICWATCH_S3_CONN_ID", "lake_s3")
    monkeypatch.setenv("TRAFFICWATCH_API_CONN_ID", "rennes_api")
    _s3(monkeypatch)  # under the default id: not the one asked for
    _s3(monkeypatch, "AIRFLOW_CONN_LAKE_S3", login="otherkey01", extra={"endpoint_url": "https://s3.example.org"})
    monkeypatch.setenv("AIRFLOW_CONN_RENNES_API", json.dumps({"conn_type": "http", "host": "https://api.example.org"}))
    settings = task_settings()
    assert settings.aws_access_key_id == "otherkey01" and settings.s3_endpoint_url == "https://s3.example.org"
    assert settings.s3_source == "the Airflow connection lake_s3"
    assert settings.api_url == "https://api.example.org"


@pytest.mark.parametrize(
    ("connection", "url"),
    [
        ({"host": "https://data.rennesmetropole.fr/"}, "https://data.rennesmetropole.fr"),
        ({"host": "127.0.0.1", "port": 8090}, "http://127.0.0.1:8090"),
        ({"host": "data.example.org", "schema": "https"}, "https://data.example.org"),
    ],
)
def test_the_api_base_url_comes_from_the_http_connection(monkeypatch, connection, url) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_TRAFFICWATCH_API", json.dumps({"conn_type": "http", **connection}))
    settings = task_settings()
    assert settings.api_url == url
    assert settings.s3_source == "environment"  # no S3 connection: S3 from the environment still


S3_VARIABLE, API_VARIABLE = "AIRFLOW_CONN_TRAFFICWATCH_S3", "AIRFLOW_CONN_TRAFFICWATCH_API"
S3_WHERE, API_WHERE = "^Airflow connection trafficwatch_s3", "^Airflow connection trafficwatch_api"
BROKEN = {
    "bad-json": (S3_VARIABLE, '{"conn_type": "aws", "login": ', rf"^{S3_VARIABLE} is not valid JSON \("),
    "wrong-type": (S3_VARIABLE, '{"conn_type": "http", "host": "x"}', rf"{S3_WHERE} has type 'http', expected 'aws'$"),
    "not-a-uri": (S3_VARIABLE, "not a connection", rf"{S3_WHERE} has type 'none', expected 'aws'$"),
    "bad-extra": (
        S3_VARIABLE,
        '{"conn_type": "aws", "login": "k0001", "password": "s0001", "extra": "{bad"}',
        rf"{S3_WHERE}: its extra is not valid JSON \(",
    ),
    "login-only": (
        S3_VARIABLE,
        '{"conn_type": "aws", "login": "connkey0001"}',
        rf"{S3_WHERE} has no password \(secret key\): give both",
    ),
    "bad-endpoint": (
        S3_VARIABLE,
        '{"conn_type": "aws", "login": "k0001", "password": "s0001", "extra": {"endpoint_url": "localhost:8333"}}',
        rf"{S3_WHERE}: extra endpoint_url 'localhost:8333' is not an http\(s\) URL$",
    ),
    "api-no-host": (API_VARIABLE, '{"conn_type": "http"}', rf"{API_WHERE} gives no http\(s\) base URL \('http://'\)"),
    "api-type": (API_VARIABLE, '{"conn_type": "aws", "host": "x"}', rf"{API_WHERE} has type 'aws', expected 'http'$"),
}


@pytest.mark.parametrize(("variable", "value", "message"), list(BROKEN.values()), ids=list(BROKEN))
def test_a_broken_connection_fails_in_one_line_instead_of_falling_back(monkeypatch, variable, value, message) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=message) as raised:
        task_settings()
    line = errors.failure("ingest", raised.value)
    assert "\n" not in line and line.startswith("ingest failed: configuration error: ")


def test_s3_errors_name_the_connection_the_keys_came_from(monkeypatch) -> None:
    _s3(monkeypatch, extra={"endpoint_url": "http://conn-s3:9000"})
    settings = task_settings()
    refused = errors._s3_code("InvalidAccessKeyId", "trafficwatch", settings, "")
    assert refused.endswith(
        "check the login (access key id) and password (secret key) of the Airflow connection trafficwatch_s3"
    )
    assert errors._s3_code("InvalidAccessKeyId", "trafficwatch", load_settings(), "").endswith(
        "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    )


def test_the_worker_serves_only_requests_for_its_own_lake_and_keys(monkeypatch) -> None:
    """The worker runs with its own (environment's) credentials: a task whose connection names other keys or
    another endpoint does the work in its own process instead of borrowing them."""
    own = load_settings()
    served = worker.Worker(own)
    same = worker.lake_identity(own)
    assert "mismatch" not in served.answer({"op": "nothing", **same})  # served (an unknown operation here)
    _s3(monkeypatch, extra={"endpoint_url": "http://env-s3:8333", "region_name": "eu-west-3"})
    other_keys = worker.lake_identity(task_settings())
    assert other_keys["s3_access_key_id"] == "connkey0001"
    assert "mismatch" in served.answer({"op": "merge", **other_keys})
    assert "mismatch" in served.answer({"op": "merge", **same, "s3_endpoint": "http://elsewhere:8333"})
    # The connection make demo writes from the same local settings is served by the worker.
    monkeypatch.delenv("AIRFLOW_CONN_TRAFFICWATCH_S3")
    for name, value in connection_variables(dict(ENV)).items():
        monkeypatch.setenv(name, value)
    assert worker.lake_identity(task_settings()) == same


def test_make_demo_connections_give_the_tasks_the_local_settings(monkeypatch) -> None:
    variables = connection_variables({**ENV, "AWS_SESSION_TOKEN": "env-token-0001"})
    assert set(variables) == {"AIRFLOW_CONN_TRAFFICWATCH_S3", "AIRFLOW_CONN_TRAFFICWATCH_API"}
    for name in ENV:
        monkeypatch.delenv(name)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    settings = task_settings()
    assert (settings.s3_endpoint_url, settings.aws_region, settings.api_url) == (
        "http://env-s3:8333", "eu-west-3", "http://env-feed:8090",
    )  # fmt: skip
    assert settings.s3_credentials == {
        "AWS_ACCESS_KEY_ID": "envkey0001",
        "AWS_SECRET_ACCESS_KEY": "env-secret-0001",
        "AWS_SESSION_TOKEN": "env-token-0001",
    }


def test_make_demo_leaves_a_connection_set_by_the_operator_and_needs_keys_for_s3() -> None:
    preset = {**ENV, "AIRFLOW_CONN_TRAFFICWATCH_S3": "{}", "TRAFFICWATCH_API_CONN_ID": "rennes"}
    assert set(connection_variables(preset)) == {"AIRFLOW_CONN_RENNES"}
    keyless = {name: value for name, value in ENV.items() if not name.startswith("AWS_ACCESS")}
    assert set(connection_variables(keyless)) == {"AIRFLOW_CONN_TRAFFICWATCH_API"}  # the AWS credential chain serves
    assert json.loads(connection_variables({})["AIRFLOW_CONN_TRAFFICWATCH_API"])["host"] == DEFAULT_API_URL


def test_explicit_credentials_are_settings_not_environment() -> None:
    """config.Settings takes explicit values; without them nothing changes for the CLI and the worker."""
    settings = load_settings()
    assert isinstance(settings, Settings) and settings.aws_access_key_id is None
    assert "AWS_ACCESS_KEY_ID" not in lake.storage_options(settings)


def _interpolated(text: str, values: dict[str, str]) -> str:
    """A compose value with `${NAME:-default}` / `${NAME:?message}` replaced as compose would."""

    def one(match: re.Match) -> str:
        name, operator, rest = match.group(1), match.group(2), match.group(3)
        return values.get(name) or (rest if operator == ":-" else "")

    return re.sub(r"\$\{([A-Z0-9_]+)(:[-?])?([^}]*)\}", one, text)


def test_compose_gives_the_airflow_services_both_connections(monkeypatch) -> None:
    """Built from the same variables as the worker's environment: the worker serves the tasks' requests."""
    environment = yaml.safe_load((REPO / "docker-compose.yml").read_text())["x-pipeline"]["environment"]
    values = {"AWS_ACCESS_KEY_ID": "composekey1", "AWS_SECRET_ACCESS_KEY": "compose/secret+1"}
    for name in ENV:
        monkeypatch.delenv(name)
    for name in ("AIRFLOW_CONN_TRAFFICWATCH_S3", "AIRFLOW_CONN_TRAFFICWATCH_API"):
        monkeypatch.setenv(name, _interpolated(environment[name], values))
    settings = task_settings()
    assert (settings.s3_endpoint_url, settings.aws_region) == ("http://s3:8333", "us-east-1")
    assert settings.s3_credentials == {"AWS_ACCESS_KEY_ID": "composekey1", "AWS_SECRET_ACCESS_KEY": "compose/secret+1"}
    assert settings.api_url == DEFAULT_API_URL
    worker_env = {name: _interpolated(str(environment[name]), values) for name in ENV if name in environment}
    assert worker_env["AWS_ENDPOINT_URL"] == settings.s3_endpoint_url
    assert worker_env["AWS_ACCESS_KEY_ID"] == settings.aws_access_key_id


def test_the_local_airflow_service_gets_both_connections(monkeypatch) -> None:
    """What `make demo` / `make up` start (`trafficwatch service start airflow`) carries the two connections."""
    from trafficwatch import services

    env = services.airflow(8080).env
    s3 = json.loads(env["AIRFLOW_CONN_TRAFFICWATCH_S3"])
    assert (s3["conn_type"], s3["login"], s3["extra"]["endpoint_url"]) == ("aws", "envkey0001", "http://env-s3:8333")
    assert json.loads(env["AIRFLOW_CONN_TRAFFICWATCH_API"])["host"] == "http://env-feed:8090"
    monkeypatch.setenv("AIRFLOW_CONN_TRAFFICWATCH_S3", '{"conn_type": "aws"}')  # the operator's own: kept
    assert "AIRFLOW_CONN_TRAFFICWATCH_S3" not in services.airflow(8080).env
