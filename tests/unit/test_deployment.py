"""The deployment files keep their promises: pinned images, loopback ports, no default secrets, documented settings."""

from __future__ import annotations

import json
import re
from importlib import resources

import jsonschema
import yaml

from tests.conftest import REPO

SECRET_NAMES = ("PASSWORD", "SECRET", "ACCESS_KEY_ID", "JWT")
SUBCOMMANDS = {"ingest", "merge", "backfill", "status", "build", "worker", "maintain", "lag", "down", "service"}


def _compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_compose_images_are_pinned_and_ports_loopback_only() -> None:
    for name, service in _compose()["services"].items():
        image = service.get("image")
        if image:
            assert ":" in image and not image.endswith(":latest"), f"{name} image {image} is not pinned"
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_compose_secrets_have_no_defaults() -> None:
    text = (REPO / "docker-compose.yml").read_text()
    for match in re.finditer(r"\$\{([A-Z0-9_]+)(:?[-?])?([^}]*)\}", text):
        name, operator = match.group(1), match.group(2)
        if any(part in name for part in SECRET_NAMES):
            assert operator == ":?", f"${{{name}}} must be required (:?), not defaulted"


def test_every_setting_read_by_the_code_is_documented() -> None:
    code = "\n".join(path.read_text() for path in (REPO / "plugins" / "trafficwatch").glob("*.py"))
    names = set(re.findall(r'"(TRAFFICWATCH_[A-Z_]+)"', code))
    assert "TRAFFICWATCH_API_MODE" in names
    example = (REPO / ".env.example").read_text()
    readme = (REPO / "README.md").read_text()
    for name in names:
        assert name in example, f"{name} is missing from .env.example"
        assert name.removeprefix("TRAFFICWATCH") in readme, f"{name} is missing from the README"


def test_no_secret_values_in_the_repository() -> None:
    example = (REPO / ".env.example").read_text()
    for line in example.splitlines():
        if any(part in line for part in SECRET_NAMES) and "=" in line:
            assert line.split("=", 1)[1].strip() == "", f".env.example sets a secret: {line}"


def test_compose_file_follows_the_compose_specification() -> None:
    """The Compose specification's JSON schema, as check-jsonschema ships it (no network here)."""
    schema_file = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(schema_file.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(_compose())]
    assert errors == []
    # The schema can fail: a misspelled key is refused.
    broken = _compose()
    broken["services"]["worker"]["restart_policy"] = "always"
    assert not validator.is_valid(broken)


def test_everything_the_compose_file_references_exists() -> None:
    compose = _compose()
    services, volumes, secrets = compose["services"], set(compose["volumes"]), set(compose["secrets"])
    for name, service in services.items():
        for needed in service.get("depends_on", {}):
            assert needed in services, f"{name} depends on a service {needed} that is not defined"
        for secret in service.get("secrets", []):
            assert secret in secrets, f"{name} uses an undeclared secret {secret}"
        for mount in service.get("volumes", []):
            source = mount.split(":", 1)[0]
            if source.startswith("."):
                assert (REPO / source).exists(), f"{name} mounts {source}, which is not in the repository"
            else:
                assert source in volumes, f"{name} mounts an undeclared volume {source}"
        build = service.get("build")
        if build:
            context = REPO / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
            assert (context / dockerfile).is_file(), f"{name} builds from a missing {dockerfile}"
        command = service.get("command", [])
        if service.get("entrypoint") == ["python", "-m", "trafficwatch.cli"]:
            assert command[0] in SUBCOMMANDS, f"{name} runs an unknown trafficwatch command {command[0]}"
    # Every variable it reads is documented for whoever deploys it.
    example = (REPO / ".env.example").read_text()
    text = (REPO / "docker-compose.yml").read_text()
    for variable in set(re.findall(r"\$\{([A-Z0-9_]+)", text)):
        assert re.search(rf"^#? ?{variable}=", example, re.MULTILINE), f"${{{variable}}} is not in .env.example"
    # ... and the services of a real deployment are all there.
    assert {"postgres", "s3", "airflow-scheduler", "airflow-triggerer", "worker", "superset"} <= set(services)
    assert "/docker-entrypoint-initdb.d" in " ".join(services["postgres"]["volumes"])


def _flags(command: list[str]) -> set[str]:
    """The switches of a weed command that hold for any instance (no port, directory, bucket or address)."""
    instance = ("-dir=", "-bucket=", "-ip", "-config_dir=", "-s3.port=", "-admin.port=")
    instance += ("-master.port=", "-filer.port=", "-volume.port=")
    return {arg for arg in command if arg.startswith("-") and not arg.startswith(instance)}


def test_compose_s3_is_hardened_like_the_local_one(tmp_path) -> None:
    """Only S3 serves data: the same switches as `make demo`'s server, whose ports the integration test probes."""
    from trafficwatch import services

    compose = _compose()["services"]
    s3 = compose["s3"]
    local = services.local_s3(tmp_path / "s3", 8333, "trafficwatch").command
    hardening = {"-disableHttp", "-webdav=false", "-admin.ui=false", "-s3.iam=false", "-s3.port.iceberg=0"}
    assert hardening <= _flags(local)
    assert _flags(local) <= set(s3["command"]), "compose's s3 lacks switches that local runs have"
    assert s3["ports"] == ["127.0.0.1:8333:8333"]  # S3 alone is published
    # The same Go runtime settings (its memory: see services.local_s3).
    assert services.S3_GO_ENV and services.local_s3(tmp_path / "s3", 8333, "trafficwatch").env == services.S3_GO_ENV
    assert {name: s3["environment"].get(name) for name in services.S3_GO_ENV} == services.S3_GO_ENV
    # Its security configuration: written by s3-security at every start, installed by start.sh, read by weed.
    config_dir = next(arg for arg in s3["command"] if arg.startswith("-config_dir="))
    assert s3["command"].index(config_dir) < s3["command"].index("mini")  # a global option of weed
    target = config_dir.split("=", 1)[1]
    start = (REPO / "deploy" / "seaweedfs" / "start.sh").read_text()
    assert f"target_dir={target}\n" in start
    writer = compose["s3-security"]["entrypoint"]
    assert writer[:3] == ["python", "-m", "trafficwatch.services"] and writer[-1] == target
    source = re.search(r"^source_dir=(\S+)$", start, re.MULTILINE).group(1)
    assert writer[-2] == source
    assert f"s3-security:{source}" in compose["s3-security"]["volumes"]
    assert f"s3-security:{source}:ro" in s3["volumes"]
    assert s3["depends_on"]["s3-security"]["condition"] == "service_completed_successfully"
    # The pipeline image owns that directory (700), so a new volume is writable by s3-security alone.
    assert f"install -d -m 700 -o airflow -g root {source}" in (REPO / "Dockerfile").read_text()


def test_superset_has_its_own_postgres_role_and_database() -> None:
    compose = _compose()["services"]
    uri = compose["superset"]["environment"]["SUPERSET_DATABASE_URI"]
    match = re.fullmatch(r"postgresql\+psycopg2://(\w+):\$\{(\w+):\?[^}]*\}@postgres/(\w+)", uri)
    assert match, uri
    user, password_variable, database = match.groups()
    postgres = compose["postgres"]["environment"]
    assert (user, database) == ("superset", "superset")
    assert user != postgres["POSTGRES_USER"], "Superset must not log in as Postgres's superuser"
    assert password_variable != "POSTGRES_PASSWORD"
    # The init script gets the password from the postgres container's environment, never from the repository.
    assert postgres[password_variable] == f"${{{password_variable}:?set {password_variable}}}"
    (script,) = (REPO / "deploy" / "postgres-init").iterdir()
    text = script.read_text()
    assert f'superset_password="${password_variable}"' in text
    assert "PASSWORD :'superset_password'" in text
    assert "CREATE ROLE superset" in text and "NOSUPERUSER" in text
    assert "REVOKE ALL ON DATABASE superset FROM PUBLIC" in text
    assert not re.search(r"PASSWORD\s+'", text), "a literal password in the init script"
    airflow_uri = _compose()["x-pipeline"]["environment"]["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    assert "@postgres/airflow" in airflow_uri and "superset" not in airflow_uri


def test_secure_cookies_behind_a_tls_proxy_are_configured_and_documented() -> None:
    compose = _compose()["services"]
    assert compose["superset"]["environment"]["TRAFFICWATCH_TLS_PROXY"] == "${TRAFFICWATCH_TLS_PROXY:-0}"
    config = (REPO / "superset" / "superset_config.py").read_text()
    for setting in ("SESSION_COOKIE_SECURE = BEHIND_TLS_PROXY", "ENABLE_PROXY_FIX = BEHIND_TLS_PROXY"):
        assert setting in config
    assert '"session_cookie_secure": BEHIND_TLS_PROXY' in config  # Talisman would reset it otherwise
    apiserver = compose["airflow-apiserver"]
    assert "--proxy-headers" in apiserver["command"]
    assert apiserver["environment"]["FORWARDED_ALLOW_IPS"] == "${AIRFLOW_TRUSTED_PROXIES:-}"
    shared = _compose()["x-pipeline"]["environment"]["AIRFLOW__CORE__EXECUTOR"]
    assert apiserver["environment"]["AIRFLOW__CORE__EXECUTOR"] == shared  # the shared settings stay
    example, readme = (REPO / ".env.example").read_text(), (REPO / "README.md").read_text()
    credentials = readme[readme.index("**Credentials.**") : readme.index("**AWS S3.**")]
    for name in ("TRAFFICWATCH_TLS_PROXY", "AIRFLOW_TRUSTED_PROXIES", "SUPERSET_DB_PASSWORD"):
        assert re.search(rf"^# {name}=", example, re.MULTILINE), f"{name} is not in .env.example"
        assert name in credentials, f"{name} is not in the README's Credentials and Containers paragraphs"


def test_the_serving_database_is_registered_without_external_access() -> None:
    bundle = REPO / "superset" / "bundle" / "databases" / "trafficwatch_serving.yaml"
    connect_args = yaml.safe_load(bundle.read_text())["extra"]["engine_params"]["connect_args"]
    assert connect_args == {
        "read_only": True,
        "config": {"enable_external_access": False, "lock_configuration": True},
    }


SIZING = (
    "AIRFLOW__CORE__PARALLELISM",
    "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES",
    "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL",
    "AIRFLOW__CORE__EXECUTOR",  # the scheduler frozen for the garbage collector after forking the slots
)


def test_compose_sizes_airflow_like_local_runs() -> None:
    """The task slots, the DAG parsing and the executor that scripts/env.sh sizes for one machine (and says
    why) hold in compose too, overridable the same way."""
    env_sh = (REPO / "scripts" / "env.sh").read_text()
    pipeline_env = _compose()["x-pipeline"]["environment"]
    for name in SIZING:
        (local,) = re.findall(rf'^export {name}="\$\{{{name}:-([\w.]+)\}}"$', env_sh, re.MULTILINE)
        assert pipeline_env[name] == f"${{{name}:-{local}}}", name


def test_the_worker_keeps_two_malloc_arenas_locally_and_in_compose(tmp_path) -> None:
    """The worker's freed malloc memory stays bounded (services.WORKER_ENV says why) wherever it runs."""
    from trafficwatch import services

    assert services.WORKER_ENV == {"MALLOC_ARENA_MAX": "2"}
    assert services.worker(tmp_path / "worker.sock").env == services.WORKER_ENV
    worker = _compose()["services"]["worker"]["environment"]
    assert {name: worker.get(name) for name in services.WORKER_ENV} == services.WORKER_ENV
    assert _compose()["x-pipeline"]["environment"].items() <= worker.items()  # the pipeline's settings too
