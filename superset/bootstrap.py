"""Bootstrap Superset for TrafficWatch; running it again changes nothing.

Run by `make superset-bootstrap` with Superset's own Python (.venv-superset) and the local settings
(scripts/env.sh). In one process (each `superset` command spends ~10 s importing Superset):

1. migrate the metadata DB and sync the built-in roles: what `superset db upgrade` and `superset init` do;
2. the read-only role TrafficViewer: the traffic dashboards' datasets and the pages needed to view a
   dashboard, nothing else (no SQL Lab, no Explore, no database, no editing); the read-only role
   TrafficOperator: the same, plus the pipeline-health datasets (schema `health` of the serving file);
3. users `admin` (Admin), `viewer` (TrafficViewer) and `operator` (TrafficOperator), passwords from the
   environment;
4. the bundle under superset/bundle/ zipped and imported with overwrite (same UUIDs every time), its
   database pointed at this machine's serving DuckDB and its maps' base map set from TRAFFICWATCH_BASE_MAP.

`--zip FILE` only writes the bundle (database pointed at the serving file) for another Superset's
`POST /api/v1/assets/import/`.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
import warnings
import zipfile
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
BUNDLE = HERE / "bundle"
BUNDLE_ROOT = "trafficwatch_dashboards"
SERVING_URI_PLACEHOLDER = "duckdb:///TRAFFICWATCH_SERVING_DB"
VIEWER_ROLE = "TrafficViewer"
OPERATOR_ROLE = "TrafficOperator"
# Datasets over this schema of the serving file (pipeline health) are for operators, not viewers.
OPERATOR_SCHEMA = "health"
# The maps' base map (their `mapbox_style`), chosen by TRAFFICWATCH_BASE_MAP: OpenStreetMap's tiles (`osm`, the
# default, as the bundle has it) or none (`none`: `make demo`, the tests and the bench, which run offline). Offline
# the tile host cannot answer, and every failed tile made deck.gl draw its map again: 12 WebGL frames per render of
# Live traffic instead of 6, each ~0.5 s of CPU where WebGL is drawn in software. superset_config.py allows the
# tile host in its content security policy only when the base map is on.
BASE_MAPS = {"osm": "https://tile.openstreetmap.org/{z}/{x}/{y}.png", "none": ""}
WEAK_PASSWORDS = {"admin", "viewer", "operator", "password", "changeme", "superset", "general"}

# What a viewer (or an operator) needs to open a dashboard and use its filters; dataset access is added per dataset.
VIEWER_PERMISSIONS = [
    ("can_read", "Dashboard"),
    ("can_read", "Chart"),
    ("can_dashboard", "Superset"),
    ("can_explore_json", "Superset"),
    ("can_log", "Superset"),
    ("can_language_pack", "Superset"),
    ("can_share_dashboard", "Superset"),
    ("can_read", "DashboardFilterStateRestApi"),
    ("can_write", "DashboardFilterStateRestApi"),
    ("can_read", "DashboardPermalinkRestApi"),
    ("can_write", "DashboardPermalinkRestApi"),
    ("can_time_range", "Api"),
    ("can_query_form_data", "Api"),
    ("can_read", "CurrentUserRestApi"),
    ("can_get", "MenuApi"),
    ("can_read", "AvailableDomains"),
    ("can_read", "Theme"),
    ("can_userinfo", "UserDBModelView"),
    ("resetmypassword", "UserDBModelView"),
    ("can_this_form_get", "ResetMyPasswordView"),
    ("can_this_form_post", "ResetMyPasswordView"),
    ("menu_access", "Dashboards"),
]


def log(message: str) -> None:
    print(f"superset-bootstrap: {message}", flush=True)


def serving_db_path() -> Path:
    if path := os.environ.get("TRAFFICWATCH_SERVING_DB"):
        return Path(path).resolve()
    home = Path(os.environ.get("TRAFFICWATCH_HOME") or HERE.parent / ".data")
    return (home / "serving" / "traffic.duckdb").resolve()


def base_map() -> str:
    """The maps' `mapbox_style` TRAFFICWATCH_BASE_MAP names ('' for none)."""
    name = os.environ.get("TRAFFICWATCH_BASE_MAP", "osm")
    if name not in BASE_MAPS:
        choices = ", ".join(BASE_MAPS)
        raise SystemExit(f"superset-bootstrap: TRAFFICWATCH_BASE_MAP must be one of {choices}, not {name!r}")
    return BASE_MAPS[name]


def with_base_map(chart_yaml: str, style: str) -> str:
    """A chart's YAML with its base map set to `style`; unchanged when it has none (not a map) or has that one."""
    chart = yaml.safe_load(chart_yaml)
    params = chart.get("params") or {}
    if "mapbox_style" not in params or params["mapbox_style"] == style:
        return chart_yaml
    params["mapbox_style"] = style
    return yaml.safe_dump(chart, sort_keys=False, allow_unicode=True)


def bundle_zip(serving_db: Path) -> bytes:
    """The bundle as an import ZIP, its database pointed at `serving_db`, its maps on the chosen base map."""
    style = base_map()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(BUNDLE.rglob("*.yaml")):
            text = path.read_text()
            if path.parent.name == "databases":
                if SERVING_URI_PLACEHOLDER not in text:
                    raise SystemExit(f"{path}: sqlalchemy_uri must be {SERVING_URI_PLACEHOLDER} (set at import)")
                text = text.replace(SERVING_URI_PLACEHOLDER, f"duckdb:///{serving_db}")
            elif path.parent.name == "charts":
                text = with_base_map(text, style)
            archive.writestr(f"{BUNDLE_ROOT}/{path.relative_to(BUNDLE)}", text)
    return buffer.getvalue()


def bundle_uuids() -> dict[str, set[str]]:
    """UUIDs of the bundle's objects by kind (databases, datasets, charts, dashboards)."""
    uuids: dict[str, set[str]] = {}
    for path in BUNDLE.glob("*/*.yaml"):
        uuids.setdefault(path.parent.name, set()).add(str(yaml.safe_load(path.read_text())["uuid"]))
    return uuids


def operator_only_datasets() -> set[str]:
    """UUIDs of the bundle's datasets over the serving file's OPERATOR_SCHEMA (pipeline health)."""
    return {
        str(dataset["uuid"])
        for path in (BUNDLE / "datasets").glob("*.yaml")
        if (dataset := yaml.safe_load(path.read_text())).get("schema") == OPERATOR_SCHEMA
    }


def required_password(name: str) -> str:
    password = os.environ.get(name, "")
    if len(password) < 12 or password.lower() in WEAK_PASSWORDS:
        raise SystemExit(
            f"superset-bootstrap: {name} is missing or weak (12 characters at least): set it, or "
            "`source scripts/env.sh` to generate it into $TRAFFICWATCH_HOME/secrets.env"
        )
    return password


def migrate() -> None:
    """`superset db upgrade` then `superset init`, in this process."""
    from flask_migrate import upgrade
    from superset.extensions import appbuilder, db, security_manager

    upgrade()
    appbuilder.add_permissions(update_perms=True)
    security_manager.sync_role_definitions()
    db.session.commit()
    log("metadata DB migrated, built-in roles synced")


def import_bundle(serving_db: Path) -> None:
    from superset.commands.exceptions import CommandInvalidError
    from superset.commands.importers.v1.assets import ImportAssetsCommand
    from superset.commands.importers.v1.utils import get_contents_from_bundle
    from superset.extensions import security_manager
    from superset.utils.core import override_user

    with zipfile.ZipFile(io.BytesIO(bundle_zip(serving_db))) as archive:
        contents = get_contents_from_bundle(archive)
    try:
        with override_user(security_manager.find_user(username="admin")):
            ImportAssetsCommand(contents).run()
    except CommandInvalidError as error:
        raise SystemExit(f"superset-bootstrap: the bundle does not validate: {error.normalized_messages()}") from error
    counts = {kind: len(uuids) for kind, uuids in sorted(bundle_uuids().items())}
    log(f"bundle imported with overwrite: {counts}; database -> {serving_db}")
    if not serving_db.exists():
        log(f"note: {serving_db} does not exist yet: the dashboards show errors until the pipeline publishes it")


def sync_role(role_name: str, dataset_uuids: set[str]) -> None:
    """The role gets exactly VIEWER_PERMISSIONS plus access to the given datasets of the bundle."""
    from superset.connectors.sqla.models import SqlaTable
    from superset.extensions import db, security_manager

    role = security_manager.find_role(role_name) or security_manager.add_role(role_name)
    wanted = []
    for permission, view in VIEWER_PERMISSIONS:
        pvm = security_manager.find_permission_view_menu(permission, view)
        if pvm is None:
            raise SystemExit(f"superset-bootstrap: permission {permission} on {view} is unknown to this Superset")
        wanted.append(pvm)
    datasets = db.session.query(SqlaTable).filter(SqlaTable.uuid.in_(dataset_uuids)).all()
    for dataset in datasets:
        pvm = security_manager.find_permission_view_menu("datasource_access", dataset.perm)
        wanted.append(pvm or security_manager.add_permission_view_menu("datasource_access", dataset.perm))
    if {pvm.id for pvm in role.permissions} == {pvm.id for pvm in wanted}:
        log(f"role {role_name}: {len(wanted)} permissions, unchanged")
        return
    role.permissions = wanted
    db.session.commit()
    log(f"role {role_name}: set to {len(wanted)} permissions ({len(datasets)} datasets)")


def sync_user(username: str, role_name: str, password: str) -> None:
    """Create the user, or bring its role and password back to what the environment says."""
    from superset.extensions import db, security_manager
    from werkzeug.security import check_password_hash

    role = security_manager.find_role(role_name)
    user = security_manager.find_user(username=username)
    if user is None:
        security_manager.add_user(
            username, "TrafficWatch", username.capitalize(), f"{username}@trafficwatch.localhost", role, password
        )
        log(f"user {username}: created with role {role_name}")
        return
    changes = []
    if [r.name for r in user.roles] != [role_name]:
        user.roles = [role]
        changes.append(f"role set to {role_name}")
    if not user.active:
        user.active = True
        changes.append("reactivated")
    db.session.commit()
    if not check_password_hash(user.password, password):
        security_manager.reset_password(user.id, password)
        changes.append("password reset from the environment")
    log(f"user {username}: {', '.join(changes) or 'unchanged'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zip", type=Path, help="only write the bundle ZIP to this file")
    args = parser.parse_args(argv)
    serving_db = serving_db_path()
    if args.zip:
        args.zip.write_bytes(bundle_zip(serving_db))
        log(f"bundle written to {args.zip} (database -> {serving_db})")
        return 0

    admin_password = required_password("TRAFFICWATCH_SUPERSET_ADMIN_PASSWORD")
    viewer_password = required_password("TRAFFICWATCH_SUPERSET_VIEWER_PASSWORD")
    operator_password = required_password("TRAFFICWATCH_SUPERSET_OPERATOR_PASSWORD")
    os.environ.setdefault("SUPERSET_CONFIG_PATH", str(HERE / "superset_config.py"))
    from superset.app import create_app

    app = create_app()
    # Superset logs every step at INFO; this script says what it decided, one line each.
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="sqlalchemy")
    with app.app_context():
        migrate()
        sync_user("admin", "Admin", admin_password)
        import_bundle(serving_db)
        datasets, operator_only = bundle_uuids()["datasets"], operator_only_datasets()
        sync_role(VIEWER_ROLE, datasets - operator_only)
        sync_role(OPERATOR_ROLE, datasets)
        sync_user("viewer", VIEWER_ROLE, viewer_password)
        sync_user("operator", OPERATOR_ROLE, operator_password)
    return 0


if __name__ == "__main__":
    sys.exit(main())
