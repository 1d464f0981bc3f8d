"""Superset refuses to start on a default SECRET_KEY, and the bootstrap on a default or weak admin password.

Both run the real programs from Superset's environment, as `make superset-up` and `make superset-bootstrap` do.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from pathlib import Path

import pytest

from tests.dashboards.conftest import BOOTSTRAP, REPO, SUPERSET_PYTHON

pytestmark = pytest.mark.dashboards

SUPERSET = SUPERSET_PYTHON.parent / "superset"


def environment(home: Path, **values: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SUPERSET_", "TRAFFICWATCH_SUPERSET_"))}
    env |= {
        "TRAFFICWATCH_HOME": str(home),
        "SUPERSET_CONFIG_PATH": str(REPO / "superset" / "superset_config.py"),
        "FLASK_APP": "superset",
        "SUPERSET_SECRET_KEY": secrets.token_urlsafe(48),
        "TRAFFICWATCH_SUPERSET_ADMIN_PASSWORD": secrets.token_urlsafe(18),
        "TRAFFICWATCH_SUPERSET_VIEWER_PASSWORD": secrets.token_urlsafe(18),
        "TRAFFICWATCH_SUPERSET_OPERATOR_PASSWORD": secrets.token_urlsafe(18),
    }
    for name, value in values.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


@pytest.mark.parametrize(
    "key",
    [None, "", "CHANGE_ME_TO_A_COMPLEX_RANDOM_SECRET", "thisISaSECRET_1234", "short-but-random-9f3k"],
    ids=["unset", "empty", "superset-default", "old-superset-default", "too-short"],
)
def test_superset_refuses_to_start_without_a_real_secret_key(key: str | None, tmp_path: Path) -> None:
    done = subprocess.run(
        [str(SUPERSET), "run", "--host", "127.0.0.1", "--port", "0"],
        env=environment(tmp_path, SUPERSET_SECRET_KEY=key),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode != 0
    assert "SUPERSET_SECRET_KEY is missing, a known default or shorter than 32 characters" in done.stderr
    assert not (tmp_path / "superset" / "superset.db").exists()  # it stopped before touching any database


@pytest.mark.parametrize("password", [None, "admin", "changeme", "Sh0rt"], ids=["unset", "admin", "changeme", "short"])
def test_bootstrap_refuses_a_default_or_weak_admin_password(password: str | None, tmp_path: Path) -> None:
    done = subprocess.run(
        [str(SUPERSET_PYTHON), str(BOOTSTRAP)],
        env=environment(tmp_path, TRAFFICWATCH_SUPERSET_ADMIN_PASSWORD=password),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode != 0
    assert "TRAFFICWATCH_SUPERSET_ADMIN_PASSWORD is missing or weak" in done.stderr
    assert not (tmp_path / "superset" / "superset.db").exists()  # no user was created with it
