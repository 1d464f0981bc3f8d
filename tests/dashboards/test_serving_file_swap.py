"""Superset reads the serving file published last: the pipeline replaces it with os.replace every minute,
so a connection kept open would go on reading the old, unlinked file."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import duckdb
import pytest
import requests

from .conftest import SupersetInstance

pytestmark = [pytest.mark.dashboards, pytest.mark.timeout(300)]


def segments_reporting(session: requests.Session, superset: SupersetInstance) -> int:
    """The KPI tile's query, bypassing the one-minute cache."""
    datasets = session.get(f"{superset.url}/api/v1/dataset/", params={"q": "(page_size:100)"}, timeout=30)
    (dataset,) = [d for d in datasets.json()["result"] if d["table_name"] == "network_kpis_latest"]
    query = {
        "datasource": {"id": dataset["id"], "type": "table"},
        "queries": [{"metrics": ["segments_reporting"], "columns": []}],
        "force": True,
        "result_format": "json",
        "result_type": "full",
    }
    response = session.post(f"{superset.url}/api/v1/chart/data", json=query, timeout=60)
    assert response.status_code == 200, response.text[:500]
    return response.json()["result"][0]["data"][0]["segments_reporting"]


def publish(source: Path, serving_db: Path, segments: int) -> None:
    """Build a changed copy next to the served file and swap it in, as the pipeline's publish does."""
    staged = serving_db.with_suffix(".staged")
    shutil.copyfile(source, staged)
    with duckdb.connect(str(staged)) as con:
        con.execute("UPDATE network_kpis_latest SET segments_reporting = ?", [segments])
    os.replace(staged, serving_db)


def attached(superset: SupersetInstance) -> int:
    """How many times Superset has opened its one serving file so far (superset_config._HeldServingFile logs
    each)."""
    return (superset.home / "logs" / "superset.log").read_text(errors="replace").count("serving file attached")


def test_a_replaced_serving_file_is_read_at_once(superset: SupersetInstance, serving_db: Path, tmp_path: Path) -> None:
    session = requests.Session()
    login = session.post(
        f"{superset.url}/api/v1/security/login",
        json={"username": "admin", "password": superset.admin_password, "provider": "db"},
        timeout=30,
    )
    session.headers["Authorization"] = f"Bearer {login.json()['access_token']}"
    original = tmp_path / "original.duckdb"
    shutil.copyfile(serving_db, original)
    first = segments_reporting(session, superset)
    # Superset's queries of one published file are served by one open of it, not one open per query.
    opened = attached(superset)
    assert opened >= 1
    assert [segments_reporting(session, superset) for _ in range(3)] == [first] * 3
    assert attached(superset) == opened
    try:
        publish(original, serving_db, first + 1)
        assert segments_reporting(session, superset) == first + 1
        assert segments_reporting(session, superset) == first + 1
        assert attached(superset) == opened + 1
        publish(original, serving_db, first + 2)
        assert segments_reporting(session, superset) == first + 2
        assert attached(superset) == opened + 2
    finally:
        shutil.copyfile(original, serving_db.with_suffix(".staged"))
        os.replace(serving_db.with_suffix(".staged"), serving_db)
    assert segments_reporting(session, superset) == first
