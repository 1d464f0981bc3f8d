"""Superset's event log goes to its own log file, one line per event, not into its metadata DB
(superset_config.ServiceLogEventLogger): a screen refreshing Live traffic every minute would otherwise add
~95 MB a day of rows there, never pruned."""

from __future__ import annotations

import sqlite3
import time

import pytest
import yaml

from .conftest import REPO, SupersetInstance
from .test_pipeline_health import api_session, rows_of

pytestmark = [pytest.mark.dashboards, pytest.mark.timeout(600)]


def logged_events(superset: SupersetInstance) -> int:
    with sqlite3.connect(superset.metadata_db) as con:
        return con.execute("SELECT count(*) FROM logs").fetchone()[0]


def test_a_chart_query_is_logged_in_the_service_log_not_the_metadata_db(superset: SupersetInstance) -> None:
    admin = api_session(superset, "admin", superset.admin_password)
    listing = admin.get(f"{superset.url}/api/v1/dataset/", params={"q": "(page_size:100)"}, timeout=30)
    dataset_id = {d["table_name"]: d["id"] for d in listing.json()["result"]}["road_traffic_24h"]
    dataset = yaml.safe_load((REPO / "superset" / "bundle" / "datasets" / "road_traffic_24h.yaml").read_text())
    me = admin.get(f"{superset.url}/api/v1/me/", timeout=30).json()["result"]
    log_file = superset.home / "logs" / "superset.log"
    before_rows, before_size = logged_events(superset), log_file.stat().st_size

    for _ in range(3):
        answer = rows_of(admin, superset, dataset_id, dataset)
        assert answer.status_code == 200, answer.text[:300]

    line = f"superset.event_log:ChartDataRestApi.data user={me['id']} "
    deadline = time.monotonic() + 30
    while (found := log_file.read_bytes()[before_size:].decode(errors="replace").count(line)) < 3:
        tail = log_file.read_bytes()[before_size:].decode(errors="replace")[-1500:]
        assert time.monotonic() < deadline, f"{found} of 3 chart queries in superset.log: {tail}"
        time.sleep(0.5)
    assert found == 3
    assert logged_events(superset) == before_rows
