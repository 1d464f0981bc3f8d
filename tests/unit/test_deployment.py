"""The deployment files keep their promises: pinned images, loopback ports, no default secrets, documented settings."""

from __future__ import annotations

import re

import yaml

from tests.conftest import REPO

SECRET_NAMES = ("PASSWORD", "SECRET", "ACCESS_KEY_ID", "JWT")


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
