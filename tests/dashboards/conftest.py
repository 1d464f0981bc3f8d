"""Superset with the TrafficWatch dashboards, bootstrapped in a temporary home, and a headless Chromium.

Superset runs from its own environment (.venv-superset, `make superset-install`) in its own process group
through `trafficwatch.services`, on a free port; it is stopped by its process group. The browser is Debian's
Chromium (`make browser-install`), driven by Playwright.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import secrets
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow
import pytest

from trafficwatch import services

REPO = Path(__file__).resolve().parents[2]
SUPERSET_PYTHON = REPO / ".venv-superset" / "bin" / "python"
BOOTSTRAP = REPO / "superset" / "bootstrap.py"
CHROMIUM = Path("/usr/bin/chromium")
# The flags known to render deck.gl through SwiftShader (never --disable-software-rasterizer: blank maps).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "dashboards: runs Superset and a headless Chromium (slow, ~2 min)")


# TODO(pipeline): replace this fixture by the serving file built by the real pipeline (dbt + publish) from
# the sample snapshot. Until then it builds a throwaway file with the serving contract's tables: the
# latest state is the real snapshot (2,859 segments), the history is synthetic (two days, weekday peaks).
# TRAFFICWATCH_TEST_SERVING_DB=FILE runs the dashboard tests on a copy of FILE instead.
@pytest.fixture(scope="session")
def serving_db(tmp_path_factory: pytest.TempPathFactory, sample_bytes: bytes) -> Path:
    path = tmp_path_factory.mktemp("serving") / "traffic.duckdb"
    if source := os.environ.get("TRAFFICWATCH_TEST_SERVING_DB"):
        shutil.copyfile(source, path)
    else:
        _build_throwaway_serving(json.loads(sample_bytes), path)
    return path


SEGMENT_COLUMNS = (
    "segment_key", "road_name", "hierarchy", "insee", "speed_limit_kmh", "traffic_status", "speed_kmh",
    "travel_time_s", "reliability_pct", "probe_count", "measured_at", "geometry_geojson", "path_json", "length_m",
)  # fmt: skip


def _length_m(parts: list[list[list[float]]]) -> float:
    total = 0.0
    for part in parts:
        for (lon1, lat1), (lon2, lat2) in itertools.pairwise(part):
            lat1, lat2, dlon = math.radians(lat1), math.radians(lat2), math.radians(lon2 - lon1)
            h = math.sin((lat2 - lat1) / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin(dlon / 2) ** 2
            total += 2 * 6_371_000 * math.asin(math.sqrt(h))
    return total


def _build_throwaway_serving(records: list[dict], path: Path) -> None:
    columns: dict[str, list] = {name: [] for name in SEGMENT_COLUMNS}
    for r in records:
        geometry = r["geo_shape"]["geometry"]
        parts = geometry["coordinates"] if geometry["type"] == "MultiLineString" else [geometry["coordinates"]]
        values = (
            r["predefinedlocationreference"], r["denomination"], r["hierarchie"], r["insee"], r["vitesse_maxi"],
            r["trafficstatus"], r["averagevehiclespeed"], r["traveltime"], r["traveltimereliability"],
            r["vehicleprobemeasurement"], r["datetime"], json.dumps(geometry),
            json.dumps([point for part in parts for point in part]), _length_m(parts),
        )  # fmt: skip
        for name, value in zip(SEGMENT_COLUMNS, values, strict=True):
            columns[name].append(value)
    con = duckdb.connect(str(path))
    con.execute("SET TimeZone = 'UTC'")
    con.register("snapshot", pyarrow.table(columns))
    con.execute("""CREATE TABLE seg AS SELECT * REPLACE (CAST(measured_at AS TIMESTAMPTZ) AS measured_at,
        CAST(insee AS INTEGER) AS insee, CAST(speed_limit_kmh AS INTEGER) AS speed_limit_kmh,
        CAST(speed_kmh AS INTEGER) AS speed_kmh, CAST(travel_time_s AS INTEGER) AS travel_time_s,
        CAST(reliability_pct AS INTEGER) AS reliability_pct, CAST(probe_count AS INTEGER) AS probe_count)
        FROM snapshot""")
    con.unregister("snapshot")
    con.execute("""
        CREATE TABLE segment_traffic_15min AS
        WITH b AS (SELECT unnest(generate_series(m - INTERVAL 2 DAY, m - INTERVAL 15 MINUTE, INTERVAL 15 MINUTE))
                   AS bucket_start FROM (SELECT max(measured_at) AS m FROM seg)),
        x AS (SELECT s.*, b.bucket_start, hour(b.bucket_start) + minute(b.bucket_start) / 60.0 AS h,
                     (hash(s.segment_key, b.bucket_start) % 1000) / 1000.0 AS noise
              FROM seg AS s CROSS JOIN b),
        y AS (SELECT *, greatest(0.1, 1.0 - 0.45 * exp(-((h - 7.5) ^ 2) / 1.2) - 0.5 * exp(-((h - 16) ^ 2) / 1.5)
                                      - 0.25 * noise * noise) AS ratio FROM x)
        SELECT segment_key, road_name, hierarchy, bucket_start, speed_limit_kmh * ratio AS mean_speed_kmh,
               speed_limit_kmh * ratio * 0.85 AS min_speed_kmh, speed_limit_kmh * ratio * 1.1 AS max_speed_kmh,
               length_m / greatest(speed_limit_kmh * ratio / 3.6, 0.5) AS mean_travel_time_s,
               70.0 + 20 * noise AS mean_reliability_pct, 15 AS sample_count,
               CASE WHEN ratio < 0.5 THEN 1.0 ELSE 0.0 END AS congested_share, length_m, speed_limit_kmh
        FROM y""")
    con.execute("""
        CREATE TABLE road_hour_of_week_profile AS
        SELECT road_name, isodow(bucket_start)::INTEGER AS day_of_week, hour(bucket_start)::INTEGER AS hour_of_day,
               sum(mean_speed_kmh * length_m) / sum(length_m) AS typical_speed_kmh,
               sum(mean_travel_time_s) / count(DISTINCT bucket_start) AS typical_travel_time_s,
               sum(mean_speed_kmh * length_m) / sum(speed_limit_kmh * length_m) AS typical_speed_ratio,
               sum(sample_count)::INTEGER AS sample_count
        FROM segment_traffic_15min GROUP BY ALL""")
    for table, time_column, grain in (
        ("road_traffic_15min", "bucket_start", "bucket_start"),
        ("road_traffic_hourly", "hour_start", "date_trunc('hour', bucket_start)"),
    ):
        con.execute(f"""
            CREATE TABLE {table} AS
            WITH r AS (
                SELECT road_name, {grain} AS {time_column}, count(DISTINCT segment_key)::INTEGER AS segment_count,
                       sum(mean_speed_kmh * length_m) / sum(length_m) AS mean_speed_kmh,
                       min(min_speed_kmh) AS min_speed_kmh, max(max_speed_kmh) AS max_speed_kmh,
                       sum(mean_travel_time_s) / count(DISTINCT bucket_start) AS travel_time_s,
                       avg(mean_reliability_pct) AS mean_reliability_pct, sum(sample_count)::INTEGER AS sample_count,
                       avg(congested_share) AS congested_share
                FROM segment_traffic_15min GROUP BY ALL)
            SELECT r.*, p.typical_speed_kmh, p.typical_travel_time_s
            FROM r LEFT JOIN road_hour_of_week_profile AS p ON p.road_name = r.road_name
                AND p.day_of_week = isodow(r.{time_column}) AND p.hour_of_day = hour(r.{time_column})""")
    con.execute("""
        CREATE TABLE congestion_events AS
        WITH s AS (SELECT segment_key, road_name, bucket_start, congested_share > 0 AS congested,
                          lag(congested_share > 0, 1, false) OVER per_segment AS before
                   FROM segment_traffic_15min WINDOW per_segment AS (PARTITION BY segment_key ORDER BY bucket_start)),
        g AS (SELECT *, sum((congested AND NOT before)::INTEGER) OVER per_segment AS episode
              FROM s WHERE congested WINDOW per_segment AS (PARTITION BY segment_key ORDER BY bucket_start))
        SELECT segment_key, any_value(road_name) AS road_name, 'freeFlow' AS from_status, 'congested' AS to_status,
               min(bucket_start) AS started_at, max(bucket_start) + INTERVAL 15 MINUTE AS ended_at,
               (epoch(max(bucket_start)) - epoch(min(bucket_start))) / 60.0 + 15 AS duration_minutes
        FROM g GROUP BY segment_key, episode""")
    con.execute("""
        CREATE TABLE segment_latest AS
        SELECT segment_key, road_name, hierarchy, insee, speed_limit_kmh, traffic_status, speed_kmh, travel_time_s,
               reliability_pct, probe_count, measured_at, 1.0::DOUBLE AS minutes_since_update,
               speed_kmh / nullif(speed_limit_kmh, 0) AS speed_ratio, NULL::DOUBLE AS typical_speed_kmh,
               NULL::DOUBLE AS speed_vs_typical_kmh, length_m, geometry_geojson, path_json
        FROM seg""")
    con.execute("""
        CREATE TABLE network_kpis_latest AS
        SELECT max(measured_at) AS measured_at,
               count(*) FILTER (WHERE traffic_status <> 'unknown')::INTEGER AS segments_reporting,
               count(*)::INTEGER AS segments_total, avg((traffic_status = 'freeFlow')::INTEGER) AS share_freeflow,
               avg((traffic_status = 'heavy')::INTEGER) AS share_heavy,
               avg((traffic_status IN ('congested', 'impossible'))::INTEGER) AS share_congested,
               avg((traffic_status = 'impossible')::INTEGER) AS share_impossible,
               avg((traffic_status = 'unknown')::INTEGER) AS share_unknown,
               avg(speed_ratio) FILTER (WHERE traffic_status <> 'unknown') AS mean_speed_ratio,
               1.0::DOUBLE AS minutes_since_update
        FROM segment_latest""")
    con.execute("ALTER TABLE segment_traffic_15min DROP COLUMN length_m")
    con.execute("ALTER TABLE segment_traffic_15min DROP COLUMN speed_limit_kmh")
    con.execute("DROP TABLE seg")
    con.close()


# --------------------------------------------------------------------------- Superset


@dataclass(frozen=True)
class SupersetInstance:
    url: str
    home: Path
    env: dict[str, str]
    viewer_password: str
    admin_password: str

    @property
    def metadata_db(self) -> Path:
        return self.home / "superset" / "superset.db"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_bootstrap(env: dict[str, str]) -> str:
    """Run superset/bootstrap.py as `make superset-bootstrap` does; its output for the test's assertions."""
    done = subprocess.run(
        [str(SUPERSET_PYTHON), str(BOOTSTRAP)], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, f"bootstrap failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="session")
def superset(tmp_path_factory: pytest.TempPathFactory, serving_db: Path) -> Iterator[SupersetInstance]:
    """Superset bootstrapped (migrated, roles, users, bundle) in a temporary home, serving `serving_db`."""
    if not SUPERSET_PYTHON.exists():
        pytest.fail(f"{SUPERSET_PYTHON} is missing: run `make superset-install`")
    home = tmp_path_factory.mktemp("superset-home")
    port = _free_port()
    settings = {
        "TRAFFICWATCH_HOME": str(home),
        "TRAFFICWATCH_SERVING_DB": str(serving_db),
        "TRAFFICWATCH_SUPERSET_PORT": str(port),
        "SUPERSET_SECRET_KEY": secrets.token_urlsafe(48),
        "TRAFFICWATCH_SUPERSET_ADMIN_PASSWORD": secrets.token_urlsafe(18),
        "TRAFFICWATCH_SUPERSET_VIEWER_PASSWORD": secrets.token_urlsafe(18),
    }
    saved = {
        name: os.environ.get(name) for name in (*settings, "TRAFFICWATCH_SUPERSET_PUBLIC", "SUPERSET_DATABASE_URI")
    }
    os.environ.update(settings)
    os.environ.pop("TRAFFICWATCH_SUPERSET_PUBLIC", None)
    os.environ.pop("SUPERSET_DATABASE_URI", None)
    instance = SupersetInstance(
        url=f"http://127.0.0.1:{port}",
        home=home,
        env=dict(os.environ),
        viewer_password=settings["TRAFFICWATCH_SUPERSET_VIEWER_PASSWORD"],
        admin_password=settings["TRAFFICWATCH_SUPERSET_ADMIN_PASSWORD"],
    )
    try:
        run_bootstrap(instance.env)
        services.start(services.superset(port, REPO), home)
        yield instance
    finally:
        services.stop(home, "superset")
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="session")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """Debian's headless Chromium through Playwright (Playwright's own browser downloads do not work here)."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make browser-install`")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        profile = tmp_path_factory.mktemp("chromium-profile")
        context = playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1600, "height": 2400},
        )
        try:
            yield context
        finally:
            context.close()
