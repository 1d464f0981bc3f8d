"""The serving database Superset queries reads its own file and nothing else: no local file through SQL Lab
or a dataset's SQL, even as admin, and no query can turn that back on.

DuckDB's `read_only` alone still reads any file the Superset process can (`read_text('/proc/self/environ')`,
its SECRET_KEY included): the bundle's database opens it with `enable_external_access = false` and
`lock_configuration = true`. The control below shows the same read succeeding on a connection opened
read-only only, so the test fails if the settings are lost on the way to Superset's real connection.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest
import requests

from .conftest import SupersetInstance

pytestmark = [pytest.mark.dashboards, pytest.mark.timeout(600)]

DATABASE_NAME = "TrafficWatch serving"
REFUSED = "file system operations are disabled by configuration"


@pytest.fixture
def admin(superset: SupersetInstance) -> Iterator[requests.Session]:
    session = requests.Session()
    login = session.post(
        f"{superset.url}/api/v1/security/login",
        json={"username": "admin", "password": superset.admin_password, "provider": "db"},
        timeout=30,
    )
    assert login.status_code == 200, login.text[:300]
    session.headers["Authorization"] = f"Bearer {login.json()['access_token']}"
    csrf = session.get(f"{superset.url}/api/v1/security/csrf_token/", timeout=30)
    session.headers.update({"X-CSRFToken": csrf.json()["result"], "Referer": superset.url})
    yield session
    session.close()


@pytest.fixture
def private_file(tmp_path: Path) -> tuple[Path, str]:
    """A file the Superset process may read (same user), holding a token no query result may show."""
    token = "tw-private-" + secrets.token_hex(16)
    path = tmp_path / "private.txt"
    path.write_text(token + "\n")
    return path, token


def serving_database(session: requests.Session, superset: SupersetInstance) -> dict:
    listing = session.get(f"{superset.url}/api/v1/database/", params={"q": "(page_size:100)"}, timeout=30)
    (database,) = [d for d in listing.json()["result"] if d["database_name"] == DATABASE_NAME]
    detail = session.get(f"{superset.url}/api/v1/database/{database['id']}", timeout=30)
    return detail.json()["result"]


def sql_lab(session: requests.Session, superset: SupersetInstance, database_id: int, sql: str) -> requests.Response:
    body = {"database_id": database_id, "sql": sql, "runAsync": False, "client_id": secrets.token_hex(5)}
    return session.post(f"{superset.url}/api/v1/sqllab/execute/", json=body, timeout=120)


def test_read_only_alone_would_read_the_file(serving_db: Path, private_file: tuple[Path, str]) -> None:
    """The control: what a connection opened only read-only gives away (so the next tests can fail)."""
    path, token = private_file
    with duckdb.connect(str(serving_db), read_only=True) as con:
        (content,) = con.execute("SELECT content FROM read_text(?)", [str(path)]).fetchone()
    assert token in content


def test_the_database_is_registered_with_external_access_off_and_locked(superset: SupersetInstance) -> None:
    with sqlite3.connect(superset.metadata_db) as con:
        (extra,) = con.execute("SELECT extra FROM dbs WHERE database_name = ?", [DATABASE_NAME]).fetchone()
    config = json.loads(extra)["engine_params"]["connect_args"]
    assert config["read_only"] is True
    assert config["config"] == {"enable_external_access": False, "lock_configuration": True}


def test_sql_lab_reads_no_local_file(
    admin: requests.Session, superset: SupersetInstance, serving_db: Path, private_file: tuple[Path, str]
) -> None:
    database_id = serving_database(admin, superset)["id"]
    # The connection works: the marts answer.
    answer = sql_lab(admin, superset, database_id, "SELECT count(*) AS segments FROM segment_latest")
    assert answer.status_code == 200, answer.text[:500]
    with duckdb.connect(str(serving_db), read_only=True) as con:
        (segments,) = con.execute("SELECT count(*) FROM segment_latest").fetchone()
    assert answer.json()["data"] == [{"segments": segments}]

    path, token = private_file
    for sql in (
        f"SELECT content FROM read_text('{path}')",
        f"SELECT * FROM read_csv('{path}', header = false)",
        "SELECT content FROM read_text('/proc/self/environ')",
    ):
        answer = sql_lab(admin, superset, database_id, sql)
        assert answer.status_code != 200, f"{sql} ran: {answer.text[:300]}"
        assert REFUSED in answer.text, f"{sql}: {answer.text[:500]}"
        assert token not in answer.text
        assert superset.env["SUPERSET_SECRET_KEY"] not in answer.text

    # No statement turns the settings back on (Superset lets SET through to the database).
    for sql in ("SET enable_external_access = true", "SET lock_configuration = false"):
        answer = sql_lab(admin, superset, database_id, sql)
        assert answer.status_code != 200, f"{sql} ran: {answer.text[:300]}"
        assert "locked" in answer.text or "Cannot" in answer.text, answer.text[:500]


def test_a_dataset_sql_reads_no_local_file(
    admin: requests.Session, superset: SupersetInstance, private_file: tuple[Path, str]
) -> None:
    database_id = serving_database(admin, superset)["id"]
    path, token = private_file
    body = {
        "database": database_id,
        "schema": "main",
        "table_name": f"probe_{secrets.token_hex(4)}",
        "sql": f"SELECT content FROM read_text('{path}')",
    }
    created = admin.post(f"{superset.url}/api/v1/dataset/", json=body, timeout=120)
    dataset_id = created.json().get("id") if created.status_code == 201 else None
    try:
        assert token not in created.text
        if dataset_id is not None:  # created without running it: its chart data must fail
            query = {
                "datasource": {"id": dataset_id, "type": "table"},
                "queries": [{"columns": ["content"], "metrics": [], "row_limit": 10}],
                "force": True,
                "result_format": "json",
                "result_type": "full",
            }
            data = admin.post(f"{superset.url}/api/v1/chart/data", json=query, timeout=120)
            assert data.status_code != 200, data.text[:300]
            assert token not in data.text
        else:
            assert created.status_code >= 400, created.text[:300]
        # Why it failed: DuckDB refused the file (Superset may answer the client only "Fatal error").
        log = (superset.home / "logs" / "superset.log").read_text(errors="replace")
        assert f'Cannot access file "{path}" - {REFUSED}' in log
    finally:
        if dataset_id is not None:
            admin.delete(f"{superset.url}/api/v1/dataset/{dataset_id}", timeout=60)
