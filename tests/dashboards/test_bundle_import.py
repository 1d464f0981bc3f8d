"""The bootstrap is idempotent: a second run leaves the same objects, with the same UUIDs and content."""

from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path

import pytest
import yaml

from .conftest import REPO, SupersetInstance, run_bootstrap

pytestmark = [pytest.mark.dashboards, pytest.mark.timeout(900)]

BUNDLE = REPO / "superset" / "bundle"
# Objects the bundle creates, with what must not change from one import to the next.
SNAPSHOT_QUERIES = {
    "databases": "SELECT uuid, database_name, sqlalchemy_uri, extra FROM dbs",
    "datasets": "SELECT uuid, table_name, sql FROM tables",
    "columns": "SELECT uuid, table_id, column_name, expression FROM table_columns",
    "metrics": "SELECT uuid, table_id, metric_name, expression FROM sql_metrics",
    "charts": "SELECT uuid, slice_name, viz_type, params FROM slices",
    "dashboards": "SELECT uuid, slug, dashboard_title, position_json, json_metadata, published FROM dashboards",
    "dashboard_charts": "SELECT dashboard_id, slice_id FROM dashboard_slices",
    "users": "SELECT id, username, active FROM ab_user",
    "user_roles": "SELECT user_id, role_id FROM ab_user_role",
    "roles": "SELECT id, name FROM ab_role",
    "role_permissions": "SELECT role_id, permission_view_id FROM ab_permission_view_role",
}


def snapshot(metadata_db: Path) -> dict[str, list[tuple]]:
    with sqlite3.connect(metadata_db) as con:
        return {name: sorted(map(tuple, con.execute(query).fetchall())) for name, query in SNAPSHOT_QUERIES.items()}


def as_uuid(value: bytes | str) -> str:
    """Superset stores UUIDs as 16 bytes in SQLite."""
    return str(uuid.UUID(bytes=value)) if isinstance(value, bytes) else str(uuid.UUID(value))


def bundle_uuids(kind: str) -> set[str]:
    return {str(yaml.safe_load(path.read_text())["uuid"]) for path in (BUNDLE / kind).glob("*.yaml")}


def test_reimporting_the_bundle_changes_nothing(superset: SupersetInstance, serving_db: Path) -> None:
    before = snapshot(superset.metadata_db)
    output = run_bootstrap(superset.env)
    after = snapshot(superset.metadata_db)

    for kind in ("databases", "datasets", "charts", "dashboards"):
        assert {as_uuid(row[0]) for row in after[kind]} == bundle_uuids(kind), kind
    (database,) = after["databases"]
    assert database[2] == f"duckdb:///{serving_db}"
    for name in SNAPSHOT_QUERIES:
        assert after[name] == before[name], f"{name} changed on re-import"
    decisions = [line for line in output.splitlines() if line.startswith("superset-bootstrap: ")]
    for role in ("TrafficViewer", "TrafficOperator"):
        assert any(
            line.startswith(f"superset-bootstrap: role {role}:") and line.endswith("unchanged") for line in decisions
        )
    assert "superset-bootstrap: user admin: unchanged" in decisions
    assert "superset-bootstrap: user viewer: unchanged" in decisions
    assert "superset-bootstrap: user operator: unchanged" in decisions


def health_datasets() -> set[str]:
    """The bundle's pipeline-health datasets (over the serving file's `health` schema): operators' only."""
    return {
        yaml.safe_load(path.read_text())["table_name"]
        for path in (BUNDLE / "datasets").glob("*.yaml")
        if yaml.safe_load(path.read_text())["schema"] == "health"
    }


def role_permissions(superset: SupersetInstance, role: str) -> list[tuple[str, str]]:
    with sqlite3.connect(superset.metadata_db) as con:
        return con.execute(
            """SELECT p.name, v.name FROM ab_role AS r
               JOIN ab_permission_view_role AS pvr ON pvr.role_id = r.id
               JOIN ab_permission_view AS pv ON pv.id = pvr.permission_view_id
               JOIN ab_permission AS p ON p.id = pv.permission_id
               JOIN ab_view_menu AS v ON v.id = pv.view_menu_id
               WHERE r.name = ?""",
            [role],
        ).fetchall()


@pytest.mark.parametrize("role", ["TrafficViewer", "TrafficOperator"])
def test_viewer_and_operator_roles_are_read_only(superset: SupersetInstance, role: str) -> None:
    permissions = role_permissions(superset, role)
    views = {view for _, view in permissions}
    assert not {"SQLLab", "SQL Lab", "Database", "Dataset", "Explore"} & views
    # The only writes: the viewer's own filter state and share links.
    writes = {
        view for permission, view in permissions if permission in {"can_write", "can_add", "can_edit", "can_delete"}
    }
    assert writes <= {"DashboardFilterStateRestApi", "DashboardPermalinkRestApi"}
    datasets = {view for permission, view in permissions if permission == "datasource_access"}
    health = health_datasets()
    assert len(health) == 5  # pipeline_snapshots (and its 7-day view), _builds, _quarantine_daily, _rejected_rows_daily
    if role == "TrafficViewer":
        assert len(datasets) == len(bundle_uuids("datasets")) - len(health)
        assert not {view for view in datasets if any(f"[{name}]" in view for name in health)}
    else:
        assert len(datasets) == len(bundle_uuids("datasets"))
