"""The deployment files keep their promises: pinned images, loopback ports, no default secrets, documented settings."""

from __future__ import annotations

import json
import re
from importlib import resources

import jsonschema
import yaml

from tests.conftest import REPO

SECRET_NAMES = ("PASSWORD", "SECRET", "ACCESS_KEY_ID", "JWT")
SUBCOMMANDS = {"feed", "ingest", "merge", "backfill", "status", "build", "worker", "maintain", "lag", "down", "service"}


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
