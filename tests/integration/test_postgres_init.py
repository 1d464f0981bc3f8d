"""deploy/postgres-init/10-superset.sh against a real PostgreSQL, run as the postgres image runs it at the
first start of docker-compose.yml: Superset gets its own login role (password from the environment, no
superuser), owning its own database, and cannot connect to Airflow's. Run again, it takes a new password
and changes nothing else.

The cluster is the machine's PostgreSQL server binaries (Debian's postgresql), in a temporary directory,
owned by the `postgres` system user when the tests run as root (PostgreSQL refuses to run as root).
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.integration

INIT_SCRIPT = REPO / "deploy" / "postgres-init" / "10-superset.sh"
SUPERUSER, AIRFLOW_DB = "airflow", "airflow"  # POSTGRES_USER and POSTGRES_DB of docker-compose.yml


def _server_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb")) or [shutil.which("initdb") or ""]
    if not found[-1]:
        pytest.fail("PostgreSQL's server binaries (initdb) are missing: apt-get install postgresql")
    return Path(found[-1]).parent


@dataclass(frozen=True)
class Cluster:
    bin: Path
    root: Path
    port: int

    def as_owner(self, *command: str, env: dict[str, str] | None = None, check: bool = True):
        """Run a command as the cluster's owner (postgres when we are root), with the cluster's address."""
        environment = {"PATH": os.environ["PATH"], "PGHOST": str(self.root / "run"), "PGPORT": str(self.port)}
        environment |= env or {}
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        wrapped = [*prefix, "env", "-i", *(f"{k}={v}" for k, v in environment.items()), *command]
        done = subprocess.run(wrapped, capture_output=True, text=True, timeout=120, check=False)
        if check:
            assert done.returncode == 0, f"{command}: {done.stdout}\n{done.stderr}"
        return done

    def query(self, sql: str, database: str = AIRFLOW_DB) -> str:
        psql = [str(self.bin / "psql"), "-X", "-At", "-U", SUPERUSER, "-d", database, "-c", sql]
        return self.as_owner(*psql).stdout.strip()

    def login(self, user: str, password: str, database: str, sql: str = "SELECT current_user"):
        """A password login over TCP, as Superset's container connects."""
        psql = [str(self.bin / "psql"), "-X", "-At", "-h", "127.0.0.1", "-p", str(self.port), "-U", user]
        environment = {"PATH": os.environ["PATH"], "PGPASSWORD": password}
        return subprocess.run(
            [*psql, "-d", database, "-c", sql], env=environment, capture_output=True, text=True, timeout=60, check=False
        )

    def run_init_script(self, password: str | None) -> subprocess.CompletedProcess:
        env = {"POSTGRES_USER": SUPERUSER, "POSTGRES_DB": AIRFLOW_DB}
        if password is not None:
            env["SUPERSET_DB_PASSWORD"] = password
        env["PATH"] = f"{self.bin}{os.pathsep}{os.environ['PATH']}"
        return self.as_owner("sh", str(self.root / "10-superset.sh"), env=env, check=False)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    # Not under pytest's base directory (0700, root's): the postgres user must reach its own files.
    root = Path(tempfile.mkdtemp(prefix="tw-postgres-"))
    (root / "run").mkdir()
    shutil.copy(INIT_SCRIPT, root / "10-superset.sh")
    if os.geteuid() == 0:
        for path in (root, root / "run", root / "10-superset.sh"):
            shutil.chown(path, "postgres")
    cluster = Cluster(_server_bin(), root, _free_port())
    try:
        cluster.as_owner(
            str(cluster.bin / "initdb"), "-D", str(root / "data"), "-U", SUPERUSER,
            "--auth-local=trust", "--auth-host=scram-sha-256",
        )  # fmt: skip
        options = f"-k {root / 'run'} -p {cluster.port} -c listen_addresses=127.0.0.1"
        # -l: the server's output to a file, not to our pipes (which would then never close)
        pg_ctl = [str(cluster.bin / "pg_ctl"), "-D", str(root / "data"), "-l", str(root / "server.log")]
        cluster.as_owner(*pg_ctl, "-o", options, "-w", "start")
        try:
            cluster.query(f"CREATE DATABASE {AIRFLOW_DB}", database="postgres")  # the image's POSTGRES_DB
            yield cluster
        finally:
            cluster.as_owner(*pg_ctl, "-m", "fast", "-w", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_without_a_password_the_script_creates_nothing(cluster: Cluster) -> None:
    done = cluster.run_init_script(None)
    assert done.returncode != 0
    assert "SUPERSET_DB_PASSWORD" in done.stderr
    assert cluster.query("SELECT count(*) FROM pg_roles WHERE rolname = 'superset'") == "0"


def test_superset_gets_its_own_role_and_database(cluster: Cluster) -> None:
    password = secrets.token_urlsafe(24)
    done = cluster.run_init_script(password)
    assert done.returncode == 0, done.stderr

    role = cluster.query(
        "SELECT rolcanlogin, rolsuper, rolcreatedb, rolcreaterole FROM pg_roles WHERE rolname = 'superset'"
    )
    assert role == "t|f|f|f"
    owner = "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'superset'"
    assert cluster.query(owner) == "superset"
    # Superset logs in with its password and can build its schema (what `superset db upgrade` does).
    login = cluster.login("superset", password, "superset", "CREATE TABLE probe (id int); SELECT current_user")
    assert login.returncode == 0, login.stderr
    assert login.stdout.strip().endswith("superset")
    assert cluster.login("superset", password + "x", "superset").returncode != 0
    # ... and nothing of Airflow's.
    airflow = cluster.login("superset", password, AIRFLOW_DB)
    assert airflow.returncode != 0
    assert "permission denied for database" in airflow.stderr


def test_running_it_again_takes_a_new_password_and_keeps_the_data(cluster: Cluster) -> None:
    first, second = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    assert cluster.run_init_script(first).returncode == 0
    assert cluster.login("superset", first, "superset", "CREATE TABLE IF NOT EXISTS kept (id int)").returncode == 0

    done = cluster.run_init_script(second)

    assert done.returncode == 0, done.stderr
    assert cluster.login("superset", first, "superset").returncode != 0
    kept = cluster.login("superset", second, "superset", "SELECT count(*) FROM kept")
    assert kept.returncode == 0 and kept.stdout.strip() == "0"
