"""Files holding secrets are never readable by others, not even for a moment after they are created.

`scripts/env.sh` (sourced by every make target) writes secrets.env and Airflow's passwords.json, and the
local S3 server's credentials come from `services.write_seaweedfs_security`. Each is run here under the most
permissive umask (000), with the usual suspects spied on: a file created with the umask's mode and then
chmod-ed would be world-readable in between, and is caught.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO
from trafficwatch import services

ENV_SH = REPO / "scripts" / "env.sh"
# A chmod that logs the mode its target had before, then does the real thing.
CHMOD_SPY = """#!/bin/sh
for arg in "$@"; do
  if [ -e "$arg" ]; then echo "$(stat -c %a "$arg") $arg" >> "$CHMOD_LOG"; fi
done
exec "$REAL_CHMOD" "$@"
"""


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def source_env_sh(home: Path, spy_dir: Path, log: Path, umask: str = "000") -> dict[str, str]:
    """Source scripts/env.sh as make does, in a clean environment; the resulting umask and settings."""
    script = f'umask {umask}; source "{ENV_SH}"; echo "umask=$(umask)"; echo "airflow_home=$AIRFLOW_HOME"'
    env = {
        "PATH": f"{spy_dir}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(home),
        "TRAFFICWATCH_HOME": str(home / "data"),
        "CHMOD_LOG": str(log),
        "REAL_CHMOD": shutil.which("chmod") or "/bin/chmod",
    }
    done = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)


@pytest.fixture
def spy(tmp_path: Path) -> tuple[Path, Path]:
    spy_dir = tmp_path / "spy"
    spy_dir.mkdir()
    (spy_dir / "chmod").write_text(CHMOD_SPY)
    (spy_dir / "chmod").chmod(0o755)
    return spy_dir, tmp_path / "chmod.log"


def chmods_of_readable_files(log: Path, names: set[str]) -> list[str]:
    """chmod calls on a secret file that others could read until then."""
    if not log.exists():
        return []
    found = []
    for line in log.read_text().splitlines():
        before, path = line.split(" ", 1)
        if Path(path).name in names and int(before, 8) & 0o077:
            found.append(line)
    return found


def test_env_sh_writes_its_secret_files_private_from_the_start(tmp_path: Path, spy: tuple[Path, Path]) -> None:
    spy_dir, log = spy
    result = source_env_sh(tmp_path, spy_dir, log)

    home, airflow_home = tmp_path / "data", Path(result["airflow_home"])
    secrets_env, passwords = home / "secrets.env", airflow_home / "passwords.json"
    assert chmods_of_readable_files(log, {"secrets.env", "passwords.json"}) == []
    assert mode(secrets_env) == 0o600
    assert mode(passwords) == 0o600
    assert result["umask"] == "0000", "sourcing env.sh changed the caller's umask"
    assert mode(airflow_home) == 0o700
    assert mode(home) == 0o700
    password = next(
        line.split("=", 1)[1]
        for line in secrets_env.read_text().splitlines()
        if line.startswith("TRAFFICWATCH_AIRFLOW_ADMIN_PASSWORD=")
    )
    assert passwords.read_text() == f'{{"admin": "{password}"}}\n'
    assert not [path for path in airflow_home.iterdir() if path.name.startswith(".passwords.json.")]


def test_env_sh_makes_older_secret_files_private_and_keeps_the_callers_umask(
    tmp_path: Path, spy: tuple[Path, Path]
) -> None:
    spy_dir, log = spy
    source_env_sh(tmp_path, spy_dir, log)
    secrets_env = tmp_path / "data" / "secrets.env"
    passwords = tmp_path / "data" / "airflow" / "passwords.json"
    generated = secrets_env.read_text()
    secrets_env.chmod(0o644)  # as an older version or a hand copy may have left them
    passwords.chmod(0o644)
    log.unlink()

    result = source_env_sh(tmp_path, spy_dir, log, umask="027")

    assert mode(secrets_env) == 0o600 and mode(passwords) == 0o600
    assert secrets_env.read_text() == generated  # generated once, never again
    assert result["umask"] == "0027"


def test_seaweedfs_credentials_are_created_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = tmp_path / "s3-security"
    directory.mkdir(mode=0o755)
    (directory / "seaweedfs.key").write_text("an older key, left world-readable")
    (directory / "seaweedfs.key").chmod(0o644)
    created: dict[str, int] = {}
    real_open = os.open

    def spying_open(path, flags, mode=0o777, *args, **kwargs):
        if flags & os.O_CREAT and Path(path).parent == directory:
            created[Path(path).name] = mode
        return real_open(path, flags, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", spying_open)
    previous = os.umask(0)
    try:
        toml = services.write_seaweedfs_security(directory)
    finally:
        os.umask(previous)

    assert mode(directory) == 0o700
    files = sorted(directory.iterdir())
    assert [path.name for path in files] == ["ca.crt", "seaweedfs.crt", "seaweedfs.key", "security.toml"]
    for path in files:
        assert mode(path) == 0o600, path
    # Each was created (under umask 000) with mode 0600 from the start, then renamed into place.
    assert len(created) == 4 and all(m == 0o600 for m in created.values()), created
    assert "an older key" not in (directory / "seaweedfs.key").read_text()
    text = toml.read_text()
    assert text.count("key = ") >= 4 + 7  # four JWT keys, a certificate key per gRPC component
    assert str(directory / "ca.crt") in text
